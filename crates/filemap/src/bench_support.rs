//! Baselines for the benchmarks (the `filemap-bench` crate), built on the
//! crate's private kernel wrappers. Not part of the library's interface: only
//! the `bench` feature (and the crate's own tests) build it.
//!
//! [`bare_uffd_round_trips`] measures the floor of any fault that userfaultfd
//! serves: one MISSING fault answered by a handler thread with a 4 KiB
//! `UFFDIO_COPY` and nothing else (no lookup, no lock, no backend read). It is
//! the round trip measured by the prototype test `fault_round_trip` in
//! `map/uffd/tests.rs`, in the shape the mappings use: the toucher faults in
//! one view, the handler installs through a second view of the same memfd and
//! wakes the faulting page.
//!
//! [`host_cached_pages`] and [`drop_host_cache`] look at and empty the host's
//! page cache of a file, for the benchmarks that read a disk and the tests
//! that check what a path leaves in that cache.
//!
//! # Safety
//! The `unsafe` here is a `UFFDIO_COPY` from a buffer the handler owns, the
//! toucher's volatile loads from a view that stays mapped, inside the memfd's
//! size, while it loads, and a `mincore` of a map never dereferenced; each
//! block states its proof.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use rustix::io::Errno;

pub use crate::racy::RacyCopy;

use crate::map::memfd::{Memfd, View};
use crate::map::uffd::{wait_readable, Event, EventFd, Readiness, Userfaultfd};
use crate::page::PAGE_SIZE;

/// Touches `pages` fresh pages one by one, each first touch a MISSING fault that
/// a handler thread serves with a 4 KiB `UFFDIO_COPY` into an install view and a
/// `UFFDIO_WAKE` of the faulting page. Returns the faults per second of the
/// touching alone (setting up and tearing down are not timed).
///
/// The handler sleeps in `poll`, as a mapping's handler does, and neither thread
/// is pinned, so the figure is what a mapping's own handler pays for the kernel's
/// part of a fault. `EINVAL` for zero pages.
pub fn bare_uffd_round_trips(pages: usize) -> io::Result<f64> {
    if pages == 0 {
        return Err(Errno::INVAL.into());
    }
    let len = pages
        .checked_mul(PAGE_SIZE)
        .ok_or_else(|| io::Error::from(Errno::INVAL))?;
    let memfd = Memfd::new("filemap-bench")?;
    memfd.set_len(len as u64)?;
    let uffd = Arc::new(Userfaultfd::new()?);
    // The faulting view is read-only: the toucher only loads. The install view
    // must be registered too, or `UFFDIO_COPY` into it fails with `ENOENT`.
    let user = View::new(&memfd, 0, len, false)?;
    let install = View::new(&memfd, 0, len, true)?;
    uffd.register(user.addr(), user.len(), false)?;
    uffd.register(install.addr(), install.len(), false)?;

    let handler = Handler::start(uffd.clone(), user.addr(), user.len(), install.addr())?;
    let start = Instant::now();
    let mut sum = 0u64;
    for page in 0..pages {
        // SAFETY: `user` is mapped until the end of this function, and
        // `user.addr() + page * PAGE_SIZE` lies inside it and inside the memfd's size
        // (no `SIGBUS`). The load blocks in a MISSING fault until the handler
        // installs the page (or, after a handler error, unregisters the view, so
        // the kernel maps a zero page). Nothing stores to the page once it is
        // mapped: the kernel fills it before mapping it, so the load races
        // nothing.
        let byte =
            unsafe { std::ptr::read_volatile((user.addr() + page * PAGE_SIZE) as *const u8) };
        sum += u64::from(byte);
    }
    let elapsed = start.elapsed();
    std::hint::black_box(sum);
    handler.stop()?;
    // The views go before the userfaultfd (drop order is reverse declaration),
    // so no touch can ever happen through an unregistered view.
    Ok(pages as f64 / elapsed.as_secs_f64())
}

/// The handler thread of [`bare_uffd_round_trips`], stopped on drop.
struct Handler {
    stop: Arc<EventFd>,
    thread: Option<thread::JoinHandle<()>>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl Handler {
    /// Serves the MISSING faults of the view at `user..user + len` through the
    /// install view at `install`.
    fn start(uffd: Arc<Userfaultfd>, user: usize, len: usize, install: usize) -> io::Result<Self> {
        let stop = Arc::new(EventFd::new()?);
        let error = Arc::new(Mutex::new(None));
        let thread = thread::Builder::new()
            .name("fm-bench-uffd".to_owned())
            .spawn({
                let (stop, error) = (stop.clone(), error.clone());
                move || {
                    if let Err(e) = serve(&uffd, &stop, user, len, install) {
                        // Unregistering wakes the toucher and lets the rest of its
                        // touches map zero pages, so it finishes instead of hanging.
                        let _ = uffd.unregister(user, len);
                        *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                }
            })?;
        Ok(Handler {
            stop,
            thread: Some(thread),
            error,
        })
    }

    /// Stops the thread and reports the error that ended it early, if any.
    fn stop(mut self) -> io::Result<()> {
        self.join();
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Writing an eventfd only fails if its counter would overflow.
            let _ = self.stop.signal();
            let _ = thread.join();
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.join();
    }
}

/// The handler's loop: wait in `poll`, read the events, copy one page per
/// MISSING fault into the install view, wake the faulting page.
fn serve(
    uffd: &Userfaultfd,
    stop: &EventFd,
    user: usize,
    len: usize,
    install: usize,
) -> io::Result<()> {
    // The content is irrelevant; a non-zero byte shows the page was installed.
    let page = vec![1u8; PAGE_SIZE];
    let mut events = Vec::new();
    loop {
        match wait_readable(uffd.as_fd(), stop.as_fd(), None)? {
            Readiness::Fd => {}
            Readiness::Wake => return Ok(()),
        }
        uffd.read_events(&mut events)?;
        for event in &events {
            let Event::Missing { addr, .. } = *event else {
                continue;
            };
            let addr = addr & !(PAGE_SIZE - 1);
            if !(user..user + len).contains(&addr) {
                continue;
            }
            let dst = install + (addr - user);
            // SAFETY: `page` is a live buffer of `PAGE_SIZE` bytes that only this
            // thread uses; the destination is the faulting page's place in the
            // install view, which is registered with `uffd` and mapped for as
            // long as the toucher runs (it is dropped after this thread joins).
            let copied = unsafe { uffd.copy(dst, page.as_ptr(), PAGE_SIZE, false, false) };
            match copied {
                // EEXIST: the page is there already (a repeated fault); wake anyway.
                Ok(_) => {}
                Err(e) if Errno::from_io_error(&e) == Some(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            // A copy through the install view wakes only waiters on its own range.
            uffd.wake(addr, PAGE_SIZE)?;
        }
    }
}

/// The racy copy this process's caches copy pages with (chosen once, the
/// fastest this processor runs: see [`RacyCopy`]).
pub fn chosen_racy_copy() -> RacyCopy {
    crate::racy::chosen()
}

/// How many pages of the `len` bytes at `offset` of `file` the host's page
/// cache holds (`mincore` of a map of them): what a path leaves in the
/// host's cache, for the tests and benchmarks that check it. `offset` must be
/// a multiple of the page size.
pub fn host_cached_pages(file: &File, offset: u64, len: usize) -> io::Result<usize> {
    use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared map of the file, which nothing else
    // aliases; it is never dereferenced, and unmapped below.
    let map = unsafe {
        mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED,
            file,
            offset,
        )
    }?;
    let mut resident = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `map..map + len` is the map made above, and `resident` holds
    // one byte per page of it, as `mincore` writes. (rustix has no mincore.)
    let done = unsafe { libc::mincore(map, len, resident.as_mut_ptr()) };
    let error = io::Error::last_os_error();
    // SAFETY: the map made above, no longer used.
    unsafe { munmap(map, len) }?;
    if done != 0 {
        return Err(error);
    }
    Ok(resident.iter().filter(|&&page| page & 1 != 0).count())
}

/// Syncs `file` and drops it from the host's page cache (`fadvise`
/// `DONTNEED`), so that the next reads of it come from the disk. A file
/// system that keeps its pages anyway (tmpfs) keeps them: check with
/// [`host_cached_pages`] where that matters.
pub fn drop_host_cache(file: &File) -> io::Result<()> {
    file.sync_all()?;
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_measured() {
        let rate = bare_uffd_round_trips(64).unwrap();
        assert!(rate > 0.0 && rate.is_finite());
        assert!(bare_uffd_round_trips(0).is_err());
    }
}
