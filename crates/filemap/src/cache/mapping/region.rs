//! [`MapRegion`]: a memory map of part of a file, served from its mapping's
//! cache.
//!
//! A map is a `MAP_SHARED` view of the file's regions of the cache's arena
//! (see `cache/store.rs`), laid side by side in file order, registered with the
//! cache's userfaultfd: the first touch of a page faults into the cache's fault
//! service, which routes it to the mapping, which fills the page under Fill (from the cache or the backend) and
//! installs it; later touches cost nothing. Every invalidation punches the
//! memfd, which zaps the page from every map at once, so the next touch faults
//! and sees the new content (C1, C2). Stores through a read-write map land in
//! the cache's own page: `read_at` returns them at once; the map's pages are
//! write-protected in the kernel's asynchronous mode, and a scan of written pages
//! before every writeback marks them dirty, so they reach the backend on
//! `sync_range`, `sync_all` or [`MapRegion::flush`].
//!
//! As for any file map, touching a page wholly past the end of file raises
//! `SIGBUS`; the bytes of the last page past the end read as zero.
//!
//! Every map is entered in a process-wide registry, so that an I/O call whose
//! buffer lies in a map can avoid faulting on it while holding a coherence mode
//! (see [`buffer_in_a_map`]).
//!
//! # Safety
//! The only `unsafe` here copies between a caller's buffer and the view, both
//! ranges checked, through [`crate::racy::copy_racy`].
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use super::{end_of, Mapping, UserView};
use crate::cache::faults::ServesFaults;
use crate::cache::page::Slot;
use crate::cache::store::{chunks_end, ARENA_BYTES};
use crate::cache::tree::MAX_PAGES;
use crate::errno::{err, fail};
use crate::lock::Mode;
use crate::map::memfd::View;
use crate::map::uffd::{scan_written, Userfaultfd};
use crate::page::{index_of, pages_to_cover, PAGE, PAGE_SIZE};

/// What a map may do to the pages it shows.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MapAccess, MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("index")?))?;
/// file.write_all_at(b"read me", 0)?;
/// let map = file.map(0, 4096, MapAccess::Read)?;
/// assert_eq!(map.access(), MapAccess::Read);
/// let mut buf = [0; 7];
/// map.read(0, &mut buf)?;
/// assert_eq!(&buf, b"read me");
/// let error = map.write(0, b"no").unwrap_err(); // stores need `ReadWrite`
/// assert_eq!(error.raw_os_error(), Some(libc::EACCES));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapAccess {
    /// Loads only (`PROT_READ`).
    Read,
    /// Loads and stores (`PROT_READ | PROT_WRITE`, `MAP_SHARED`).
    ReadWrite,
}

/// A memory map of `len` bytes of a file from `offset`, shared with its cache.
///
/// It keeps its [`Mapping`] alive. Its memory may change under any access (other
/// threads, other maps, invalidations), so it is never handed out as `&[u8]`:
/// use [`MapRegion::read`] and [`MapRegion::write`], or the raw pointer under the
/// contract of [`MapRegion::as_ptr`]. See [`Mapping::map`].
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MapAccess, MemDevice, PageCache, Volume, PAGE_SIZE};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("pages")?))?;
/// file.write_all_at(&[1; 2 * PAGE_SIZE], 0)?;
/// let map = file.map(0, 2 * PAGE_SIZE, MapAccess::ReadWrite)?;
/// let mut buf = [0; 4];
/// map.read(PAGE_SIZE, &mut buf)?; // faults the page in from the cache
/// assert_eq!(buf, [1; 4]);
///
/// map.write(PAGE_SIZE, b"page")?; // lands in the cache's own page...
/// file.read_exact_at(&mut buf, PAGE_SIZE as u64)?;
/// assert_eq!(&buf, b"page"); // ...so reads see it at once
/// map.flush()?; // written back and durable, like `msync(MS_SYNC)`
/// let mut page = [0; PAGE_SIZE];
/// file.backend().read_pages(1, &mut page)?;
/// assert_eq!(&page[..4], b"page");
///
/// file.punch_hole(PAGE_SIZE as u64, PAGE_SIZE as u64)?;
/// map.read(PAGE_SIZE, &mut buf)?; // the map shows the hole
/// assert_eq!(buf, [0; 4]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct MapRegion {
    mapping: Arc<Mapping>,
    /// Unmapped in `drop`, before the regions it shows may be given back.
    view: ManuallyDrop<View>,
    offset: u64,
    access: MapAccess,
}

/// Start address -> end address of every live map, for [`buffer_in_a_map`].
static MAPS: RwLock<BTreeMap<usize, usize>> = RwLock::new(BTreeMap::new());
/// How many maps are alive: lets the common case (none) skip the registry.
static LIVE_MAPS: AtomicUsize = AtomicUsize::new(0);

/// Whether any byte of `ptr..ptr + len` lies in a filemap memory map.
pub(super) fn buffer_in_a_map(ptr: *const u8, len: usize) -> bool {
    if len == 0 || LIVE_MAPS.load(Ordering::Acquire) == 0 {
        return false;
    }
    let start = ptr as usize;
    let end = start.saturating_add(len);
    let maps = MAPS.read();
    maps.range(..end)
        .next_back()
        .is_some_and(|(_, &map_end)| map_end > start)
}

impl MapRegion {
    fn new(mapping: Arc<Mapping>, view: View, offset: u64, access: MapAccess) -> MapRegion {
        MAPS.write().insert(view.addr(), view.addr() + view.len());
        LIVE_MAPS.fetch_add(1, Ordering::AcqRel);
        MapRegion {
            mapping,
            view: ManuallyDrop::new(view),
            offset,
            access,
        }
    }

    /// The mapping this map shows.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.mapping
    }

    /// The file offset of the map's first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The map's length in bytes.
    pub fn len(&self) -> usize {
        self.view.len()
    }

    /// Whether the map is empty (never: maps cover at least one page).
    pub fn is_empty(&self) -> bool {
        self.view.len() == 0
    }

    /// What the map may do.
    pub fn access(&self) -> MapAccess {
        self.access
    }

    /// The address of the map's first byte.
    ///
    /// Accessing the memory is the caller's business, under the rules of any
    /// shared file map: another thread, map or invalidation may change it at any
    /// time (so never form a `&[u8]` or `&mut [u8]` over it), stores require
    /// [`MapAccess::ReadWrite`], and touching a page wholly past the end of file
    /// raises `SIGBUS`. The memory stays mapped until the `MapRegion` is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.view.addr() as *mut u8
    }

    /// Copies `buf.len()` bytes at `at` (relative to the map) into `buf`, faulting
    /// pages in as needed. Each page is copied whole as of one moment, as
    /// `read_at` does: the copy is validated against the page's state and retried
    /// if a write, punch or fill replaced the page meanwhile (stores through maps,
    /// which are plain shared memory, are the exception). `EINVAL` if the range is
    /// outside the map; `EFAULT` if it reaches past the end of file (checked
    /// first: a file truncated concurrently below the range raises `SIGBUS`, as
    /// with any file map).
    pub fn read(&self, at: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(at, buf.len())?;
        if !buf.is_empty() {
            // A load of a write-pinned page waits in its fault for the pin.
            let first = (self.offset + at as u64) / PAGE_SIZE as u64;
            let last = (self.offset + (at + buf.len() - 1) as u64) / PAGE_SIZE as u64;
            self.mapping.check_own_pins(first..last + 1, true)?;
        }
        let mut done = 0;
        while done < buf.len() {
            let pos = at + done;
            let take = (PAGE_SIZE - pos % PAGE_SIZE).min(buf.len() - done);
            let index = (self.offset + pos as u64) / PAGE_SIZE as u64;
            loop {
                // One walk of the tree: a slot, once made, stays for its index.
                let slot = self.mapping.pages.get(index);
                let before = slot.map(Slot::load);
                // SAFETY: `pos..pos + take` lies inside the view (checked), which
                // stays mapped while `self` lives; `buf` is not memory of this view
                // (it is borrowed exclusively). Concurrent stores race soundly
                // (see `copy_racy`).
                unsafe {
                    crate::racy::copy_racy(self.as_ptr().add(pos), buf[done..].as_mut_ptr(), take)
                };
                fence(Ordering::Acquire);
                let after = slot.map(Slot::load);
                // A page that was not readable before the copy (absent, or being
                // replaced) was faulted in or waited for by it: copy once more.
                if let (Some(before), Some(after)) = (before, after) {
                    if before.is_readable() && before.same_contents(after) {
                        break;
                    }
                }
            }
            done += take;
        }
        Ok(())
    }

    /// Stores `buf` at `at` (relative to the map) through the map. `EACCES` for a
    /// read-only map; otherwise as [`MapRegion::read`].
    pub fn write(&self, at: usize, buf: &[u8]) -> io::Result<()> {
        if self.access != MapAccess::ReadWrite {
            return fail(libc::EACCES);
        }
        self.check(at, buf.len())?;
        let start = self.offset + at as u64;
        self.mapping.changing(start..start + buf.len() as u64, || {
            // SAFETY: as in `read`, with the view writable (ReadWrite) and
            // `buf` a shared borrow outside the view.
            unsafe { crate::racy::copy_racy(buf.as_ptr(), self.as_ptr().add(at), buf.len()) };
            self.mapping.touch_backend();
            Ok(())
        })
    }

    /// Writes back the pages of this map that stores made dirty, and makes them
    /// durable (`msync(MS_SYNC)`).
    pub fn flush(&self) -> io::Result<()> {
        self.mapping.sync_range(self.offset, self.view.len() as u64)
    }

    fn check(&self, at: usize, len: usize) -> io::Result<()> {
        let end = at.checked_add(len).filter(|&end| end <= self.view.len());
        let Some(end) = end else {
            return fail(libc::EINVAL);
        };
        if self.offset + end as u64 > self.mapping.len().next_multiple_of(PAGE_SIZE as u64) {
            return fail(libc::EFAULT);
        }
        Ok(())
    }
}

impl Drop for MapRegion {
    fn drop(&mut self) {
        // Stores not yet seen by a scan must be marked dirty before the view goes.
        self.mapping.forget_map(self);
        MAPS.write().remove(&self.view.addr());
        LIVE_MAPS.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: `drop` runs once, and nothing uses the view after this line.
        unsafe { ManuallyDrop::drop(&mut self.view) };
        // Unmapped: if this was the last map and no page is cached, the
        // regions it showed can go to another file.
        self.mapping.release_store_if_idle();
    }
}

impl fmt::Debug for MapRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapRegion")
            .field("offset", &self.offset)
            .field("len", &self.view.len())
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl MapRegion {
    /// The view's address range, for the mapping's bookkeeping.
    fn addr_range(&self) -> std::ops::Range<usize> {
        self.view.addr()..self.view.addr() + self.view.len()
    }
}

impl Mapping {
    /// Maps `len` bytes of the file from `offset` as a [`MapRegion`] shared
    /// with this cache (see its docs), as `mmap(MAP_SHARED)` does: `offset`
    /// must be a multiple of [`PAGE_SIZE`] and `len` is rounded up to one. The
    /// range may reach past the end of file, and past
    /// [`Mapping::max_file_size`]: touching a page wholly past the end of file
    /// raises `SIGBUS`. `EINVAL` for a misaligned offset or a length of 0;
    /// `EOVERFLOW` for a range past 2^63 - 1; `EOPNOTSUPP` for a read-write map
    /// on a kernel that cannot track stores through it (without userfaultfd's
    /// `MINOR_SHMEM` and `WP_ASYNC`).
    pub fn map(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        access: MapAccess,
    ) -> io::Result<MapRegion> {
        self.check_live()?;
        // As `mmap`: the offset must be page-aligned and the length not 0; the
        // length is rounded up to whole pages, and the range must end by the
        // largest offset of any file (`EOVERFLOW`), not this file's largest
        // size: pages past it, as past the end of file, raise `SIGBUS`.
        if offset % PAGE != 0 || len == 0 {
            return fail(libc::EINVAL);
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or_else(|| err(libc::ENOMEM))?;
        if end_of(offset, len).is_err() {
            return fail(libc::EOVERFLOW);
        }
        let tracked = access == MapAccess::ReadWrite;
        let uffd = self.cache.faults.start()?;
        if tracked && !uffd.has_store_trap() {
            // Stores could be neither tracked nor held back: they would be lost.
            return fail(libc::EOPNOTSUPP);
        }
        self.trap_faults(uffd)?;
        // The regions stay this mapping's from here until the map is entered.
        let _regions = self.store.keep_regions();
        let view = self.view_of(offset, len, tracked)?;
        if tracked {
            uffd.register_store_trap(view.addr(), view.len())?;
            // Arms write tracking over the whole view, pages present or not.
            scan_written(view.addr(), view.len())?;
        } else {
            uffd.register(view.addr(), view.len(), false)?;
        }
        let owner: Weak<dyn ServesFaults> = Arc::downgrade(self) as _;
        self.cache.faults.route(view.addr(), view.len(), owner);
        self.maps.write().push(UserView {
            addr: view.addr(),
            len: view.len(),
            offset,
            tracked,
        });
        Ok(MapRegion::new(self.clone(), view, offset, access))
    }

    /// On the file's first map: from now on every view of its store faults
    /// into the cache's fault service, and pages enter the store only by
    /// `UFFDIO_COPY`. Under Invalidate over the whole file, with fills
    /// settled, no page is installed meanwhile; the zero pages optimistic
    /// readers left in holes before (see `cache/store.rs`) are given back, as a
    /// map touching one would read zeroes instead of faulting.
    fn trap_faults(self: &Arc<Self>, uffd: &Arc<Userfaultfd>) -> io::Result<()> {
        self.store.arena().trap_faults(uffd)?;
        if self.store.traps_faults() {
            return Ok(());
        }
        let _invalidate = self.lock_mode(Mode::Invalidate, 0..u64::MAX);
        self.settle_fills(0, MAX_PAGES - 1);
        self.store.trap_faults();
        // No page is being installed, and no new zero page can appear in a
        // hole (the arena traps faults): every page the arena holds for this
        // file that is not cached is one an optimistic reader left.
        for index in self.store.held_pages()? {
            let slot = self.pages.get_or_create(index);
            if slot.load().is_absent() {
                self.remove_stray(index, slot);
            }
        }
        Ok(())
    }

    /// A view of pages `offset..offset + len` of the file: of their regions of
    /// the arena, and past the largest file, of the arena past its end (where
    /// a touch raises `SIGBUS`). The caller keeps the regions
    /// ([`PageStore::keep_regions`](crate::cache::store::PageStore::keep_regions)).
    fn view_of(&self, offset: u64, len: usize, writable: bool) -> io::Result<View> {
        let first = index_of(offset);
        let pages = (len / PAGE_SIZE) as u64;
        let stored = chunks_end(pages_to_cover(self.max_size))
            .saturating_sub(first)
            .min(pages);
        let mut parts = self.store.arena_ranges(first, stored)?;
        if stored < pages {
            parts.push((ARENA_BYTES, ((pages - stored) * PAGE) as usize));
        }
        View::of_parts(self.store.arena().memfd()?, &parts, writable)
    }

    /// Called as a map goes away: marks the pages it stored to dirty, and stops
    /// tracking it.
    fn forget_map(&self, map: &MapRegion) {
        let range = map.addr_range();
        self.cache.faults.unroute(range.start);
        let view = {
            let mut maps = self.maps.write();
            let position = maps.iter().position(|view| view.addr == range.start);
            position.map(|at| maps.remove(at))
        };
        if let Some(view) = view {
            let _scanning = self.scanning.lock();
            self.mark_stores_dirty(&view, 0, MAX_PAGES - 1);
        }
        // The last map of a removed file takes its storage with it.
        if self.removed.load(Ordering::Acquire) && self.maps.read().is_empty() {
            let _ = self.release_storage();
        }
    }
}
