//! The memfd that holds a mapping's mapped pages, and `MAP_SHARED` views of it.
//!
//! A [`Memfd`] is anonymous shmem: its pages are the pages every [`View`] of it
//! shows, so a store through one view is seen by every other view and by
//! [`Memfd::read_at`]. Pages enter it only through `UFFDIO_COPY` (see `map/uffd`);
//! [`Memfd::punch`] removes them from every view at once. See `map/mod.rs` for
//! the kernel behaviour this relies on.
//!
//! # Safety
//! The `unsafe` here is `mmap`, `madvise` and `munmap` of views. A [`View`] is
//! created by `mmap` with a null hint, so the kernel picks a range that overlaps
//! nothing Rust owns; it is unmapped exactly once, by `Drop`. A `View` never
//! dereferences its range and hands out only its address: whoever reads or writes
//! through that address needs its own `unsafe` and its own proof (the memory can
//! be changed by other views, other threads and the kernel at any time, so it is
//! never a `&[u8]`).
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SeekFrom};
use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::page::{PAGE, PAGE_SIZE};

/// An anonymous shmem file (`memfd_create`), closed on drop.
#[derive(Debug)]
pub(crate) struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// `memfd_create(name, MFD_CLOEXEC | MFD_NOEXEC_SEAL)`, without
    /// `MFD_NOEXEC_SEAL` on kernels before 6.3 (which reject it with `EINVAL`).
    ///
    /// `MFD_NOEXEC_SEAL` only forbids making the file executable; it also keeps
    /// 6.3+ kernels from logging a warning about memfds created without it. The
    /// file starts empty: give it a size with [`Memfd::set_len`].
    pub fn new(name: &str) -> io::Result<Self> {
        let fd = match rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::NOEXEC_SEAL)
        {
            Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?,
            other => other?,
        };
        Ok(Self { fd })
    }

    /// `ftruncate(fd, len)`. Shrinking frees the pages past the new end and zaps
    /// them from every view; a later touch there through a view is `SIGBUS`
    /// (registered or not: the size check comes before userfaultfd), and a kernel
    /// access to it (a syscall given that address) fails with `EFAULT`.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        Ok(rustix::fs::ftruncate(&self.fd, len)?)
    }

    /// `fstat(fd).st_size`.
    pub fn len(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.fd)?.st_size as u64)
    }

    /// `fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)`.
    ///
    /// Frees the pages and zaps them from every view (the kernel's
    /// `unmap_mapping_range`): the next touch through a registered view raises a
    /// MISSING fault again. Partial pages at either end are zeroed, not freed, so
    /// callers punch whole pages.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?)
    }

    /// `pread(fd, buf, offset)`: one call, so it may return fewer bytes than
    /// asked (0 at or past the end of the file).
    ///
    /// Reading a hole copies zeroes and allocates nothing: the hole stays a hole,
    /// so a later touch through a registered view still raises MISSING. (A read
    /// through a view would allocate a page instead; see `map/mod.rs`.)
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(rustix::io::pread(&self.fd, buf, offset)?)
    }

    /// `pwrite(fd, buf, offset)` until all of `buf` is written. Writing into a
    /// hole allocates the pages, and replaces a page that is there.
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = rustix::io::pwrite(&self.fd, buf, offset)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// `lseek(fd, offset, SEEK_DATA) == offset`: whether the page at `offset`
    /// (page-aligned) holds data, rather than being a hole or past the end.
    /// shmem answers per page, exactly.
    pub fn page_present(&self, offset: u64) -> io::Result<bool> {
        match rustix::fs::seek(&self.fd, SeekFrom::Data(offset)) {
            Ok(data) => Ok(data == offset),
            Err(rustix::io::Errno::NXIO) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The file descriptor.
    /// The parts of `within` that hold pages (`SEEK_DATA`, `SEEK_HOLE`).
    pub fn data_ranges(&self, within: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let mut ranges = Vec::new();
        let mut at = within.start;
        while at < within.end {
            let data = match rustix::fs::seek(&self.fd, SeekFrom::Data(at)) {
                Ok(data) => data,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= within.end {
                break;
            }
            let hole = rustix::fs::seek(&self.fd, SeekFrom::Hole(data))?.min(within.end);
            ranges.push(data..hole);
            at = hole;
        }
        Ok(ranges)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `MAP_SHARED` view of part of a [`Memfd`], unmapped on drop.
///
/// Views are `MADV_DONTFORK`: a `fork`ed child does not inherit them, so it can
/// never touch one (a touch through an unregistered mapping would allocate a zero
/// page and hide that page from MISSING for good).
///
/// `View` is `Send + Sync` (checked below): it holds an address range, not a
/// pointer, and never accesses the memory itself. Any thread may drop it, which
/// unmaps the range once; accessing the range is up to the holder of the address,
/// under its own `unsafe` contract.
#[derive(Debug)]
pub(crate) struct View {
    addr: usize,
    len: usize,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<View>();
};

impl View {
    /// `mmap(NULL, len, PROT_READ[ | PROT_WRITE], MAP_SHARED, memfd, offset)`
    /// then `madvise(addr, len, MADV_DONTFORK)`.
    ///
    /// `len` (non-zero) and `offset` must be page-aligned (`EINVAL` otherwise).
    /// `len` may reach past the memfd's size: a touch there is `SIGBUS`, as for a
    /// file. The mapping itself does not touch any page.
    pub fn new(memfd: &Memfd, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 || len % PAGE_SIZE != 0 || offset % PAGE != 0 || offset > i64::MAX as u64 {
            return Err(Errno::INVAL.into());
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a null hint without MAP_FIXED makes the kernel choose a free
        // range, so no existing mapping (no memory Rust owns) is replaced. The fd
        // is open for the duration of the call; the kernel takes its own file
        // reference.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                &memfd.fd,
                offset,
            )
        }?;
        let view = Self {
            addr: addr as usize,
            len,
        };
        // SAFETY: the range is the mapping just created and owned by `view`;
        // MADV_DONTFORK only changes what a future fork copies. On failure
        // `view` unmaps the range as it drops.
        unsafe { rustix::mm::madvise(addr, len, Advice::LinuxDontFork) }?;
        Ok(view)
    }

    /// One view of several page-aligned `(offset, len)` parts of the memfd,
    /// laid side by side in the order given: a `PROT_NONE` reservation of
    /// their total length, then each part mapped over its place in it with
    /// `MAP_FIXED`. Each part is a mapping of its own for the kernel (a
    /// userfaultfd copy or continue stays inside one); registration, scans and
    /// `madvise` cover them all. As [`View::new`] otherwise.
    pub fn of_parts(memfd: &Memfd, parts: &[(u64, usize)], writable: bool) -> io::Result<Self> {
        let misaligned = |&(offset, len): &(u64, usize)| {
            len == 0 || len % PAGE_SIZE != 0 || offset % PAGE != 0 || offset > i64::MAX as u64
        };
        if parts.is_empty() || parts.iter().any(misaligned) {
            return Err(Errno::INVAL.into());
        }
        if let [(offset, len)] = parts {
            return View::new(memfd, *offset, *len, writable);
        }
        let len = parts
            .iter()
            .try_fold(0usize, |total, (_, len)| total.checked_add(*len))
            .ok_or(Errno::NOMEM)?;
        // SAFETY: a null hint without MAP_FIXED makes the kernel choose a free
        // range, replacing nothing; the anonymous reservation is owned by
        // `view` below, which unmaps it (with whatever is mapped over it) once.
        let addr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let view = Self {
            addr: addr as usize,
            len,
        };
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        let mut at = view.addr;
        for &(offset, part) in parts {
            // SAFETY: `at..at + part` lies inside the reservation just made and
            // owned by `view` (the parts add up to its length), so MAP_FIXED
            // replaces only that reservation, never memory Rust uses.
            unsafe {
                rustix::mm::mmap(
                    at as *mut c_void,
                    part,
                    prot,
                    MapFlags::SHARED | MapFlags::FIXED,
                    &memfd.fd,
                    offset,
                )
            }?;
            at += part;
        }
        // SAFETY: as in `new`: the range is owned by `view`.
        unsafe { rustix::mm::madvise(addr, len, Advice::LinuxDontFork) }?;
        Ok(view)
    }

    /// The first byte of the view.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The length of the view in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }
}

/// `madvise(addr, len, MADV_DONTNEED)` on part of a view: removes the view's
/// page-table entries there, leaving the file's pages alone, so the next touch
/// through the view faults again (MINOR where the file has the page, MISSING
/// where it does not, for a view registered so). In a view tracked by
/// asynchronous write protection, a page written since the last scan is left
/// with an empty entry, which the next scan reports as written, and a protected
/// one keeps a marker (test `zap_keeps_stores_reported_and_traps_later_ones`).
///
/// # Safety
/// `addr..addr + len` (page-aligned) must lie inside a live [`View`] for the
/// whole call: on other memory, `MADV_DONTNEED` would discard anonymous data.
pub(crate) unsafe fn zap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is part of a live view (caller's contract): a
    // MAP_SHARED mapping of a memfd, whose data stays in the file, so dropping
    // the entries loses nothing and nothing Rust owns is touched.
    Ok(unsafe { rustix::mm::madvise(addr as *mut c_void, len, Advice::LinuxDontNeed) }?)
}

impl Drop for View {
    /// `munmap(addr, len)`. Unmapping a userfaultfd-registered range
    /// unregisters it; with no `EVENT_UNMAP` requested it never waits for the
    /// fault handler.
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `View::new`, is owned by this view
        // alone, and is unmapped only here, once. Nothing in Rust holds a
        // reference into it (views hand out addresses only).
        let unmapped = unsafe { rustix::mm::munmap(self.addr as *mut c_void, self.len) };
        debug_assert!(unmapped.is_ok(), "munmap of a view failed: {unmapped:?}");
    }
}
