//! [`Mapping`]: the cached pages, coherence lock and size of one open file.
//!
//! Every path that changes what the backend maps under a range, or that adds
//! pages to the cache, holds the coherence mode that makes it safe:
//!
//! - A miss takes [`Mode::Fill`] to claim the absent pages (`FILLING`), and lets
//!   it go: it reads the backend and publishes each page with a compare-and-swap
//!   against the state it claimed under the claims alone, as the kernel reads a
//!   folio it added locked after dropping `invalidate_lock`.
//! - Punch, zero, truncate, collapse, insert and `invalidate_range` take
//!   [`Mode::Invalidate`], which keeps new claims out, and remove the cached
//!   pages before they change the backend, waiting for the fills claimed before
//!   (which read the backend as it was) and for pages under writeback (so that no
//!   old snapshot reaches the backend afterwards).
//! - Direct I/O takes [`Mode::Direct`], writes back and drops the range and waits
//!   for its fills before the I/O, and (for writes) drops it again afterwards, as
//!   the kernel does.
//! - Hits take no lock and write nothing shared: they copy the page between two
//!   loads of the page's state word and retry if it changed.
//!
//! The copy to or from the caller's buffer happens outside the coherence lock for
//! reads. Buffered writes copy from the caller's buffer under Fill, so that buffer
//! must not be memory that faults into this same mapping.

use std::fmt;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::evict::Visit;
use super::page::{
    PageState, Slot, DIRTY, FILLING, LOCKED, PRESENT, QUEUED, REFERENCED, UPTODATE, WRITEBACK,
};
use super::readahead::{MissFill, Readahead, MAX_WINDOW_PAGES};
use super::stats::{self, mode_slot};
use super::store::PageStore;
use super::tree::{PageTree, MAX_PAGES};
use super::{CacheShared, Eviction, Need, DIRECT_IO_MEMORY_ALIGN};
use crate::aligned::AlignedBuf;
use crate::backend::Backend;
use crate::errno::{err, fail, with_message};
use crate::lock::{CoherenceGuard, CoherenceLock, Mode, Strategy};
use crate::map::handler::FaultHandler;
use crate::map::memfd::{zap, View};
use crate::map::region::{buffer_in_a_map, MapAccess, MapRegion};
use crate::map::uffd::{scan_written, Userfaultfd};
use crate::page::{PAGE, PAGE_SIZE};
use crate::schedule;

/// Pages a fault in a read-write map maps at once: the faulting page and the
/// cached pages after it, so a sequential first pass over cached pages costs a
/// round trip to the handler per 16 pages, not per page.
const FAULT_AROUND_PAGES: u64 = 16;

/// The cached pages of one open file, with the `std::os::unix::fs::FileExt`
/// calls and the range operations of `fallocate`, `ftruncate`, `O_DIRECT` and
/// `fsync`, all coherent with each other.
///
/// [`crate::PageCache::open`] returns an `Arc<Mapping>`: share it between
/// threads; every call takes `&self`.
///
/// # Errors
/// Errors carry the errno a file on Linux gives for the same call, checked in
/// the kernel's order, and a call that fails its argument checks changes
/// nothing. Read it with `raw_os_error()`, or with [`crate::errno`] for the
/// few errors that carry a message too. `max` is [`Mapping::max_file_size`];
/// offsets are file offsets, which the kernel takes as signed (`loff_t`).
///
/// | call | `EINVAL` | `EFBIG` | other |
/// |---|---|---|---|
/// | `read_at` | `offset + len` past 2^63 - 1 | | |
/// | `write_at` | `offset + len` past 2^63 - 1 | `offset` at or past `max` (a write that crosses `max` is cut short there; an empty write returns 0) | `ENOMEM`: every cached page is dirty and its writeback fails |
/// | `read_direct` | as `read_at`; misaligned (see below; an empty read returns 0); from inside the file, `offset + len` past `max`, even where the file ends before (as ext4) | | |
/// | `write_direct` | as `write_at`; misaligned (an empty write returns 0) | as `write_at` | |
/// | `punch_hole`, `zero_range` | `offset` or `len` past 2^63 - 1; `len` 0 | `offset + len` past `max` | |
/// | `collapse_range` | as `punch_hole`; not page-aligned; `offset + len` at or past the end of file | as `punch_hole` | `EOPNOTSUPP` from a backend that cannot shift |
/// | `insert_range` | as `punch_hole`; not page-aligned; `offset` at or past the end of file | as `punch_hole`; the size would pass `max` | as `collapse_range` |
/// | `set_len` | `len` past 2^63 - 1 | `len` past `max` | |
/// | `invalidate_range`, `sync_range` | `offset + len` past 2^63 - 1 | | |
/// | `readahead` | `len` past 2^63 - 1 (any offset, as `readahead(2)`) | | |
/// | `map` | `offset` not page-aligned; `len` 0 (`len` is rounded up to whole pages) | | `EOVERFLOW` past 2^63 - 1; `EOPNOTSUPP` for a read-write map the kernel cannot track |
/// | `read_at_nowait`, `write_at_nowait` | as the blocking call | as the blocking call | `EAGAIN` (`ErrorKind::WouldBlock`) where it would wait |
///
/// Every call after [`Mapping::remove`] fails with `ENOENT`; errors of the
/// backend (`EIO`, `ENOSPC`, ...) are passed on as they are. Where filemap
/// differs from a file on purpose: direct I/O needs offsets and lengths in
/// whole pages and a buffer at [`DIRECT_IO_MEMORY_ALIGN`] (the kernel asks only
/// for the device's logical block size); `remove` is unlink and close at once
/// (only memory maps outlive it); `invalidate_range` has no twin in the kernel,
/// and `sync_range` of length 0 syncs nothing (`sync_file_range` would go to
/// the end of file).
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("log")?))?;
/// file.write_all_at(&[7; 10_000], 0)?;
/// file.set_len(5_000)?;
/// assert_eq!(file.len(), 5_000);
/// let mut buf = vec![0u8; 8192];
/// assert_eq!(file.read_at(&mut buf, 0)?, 5_000);
/// file.sync_all()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Mapping {
    cache: Arc<CacheShared>,
    /// This mapping's id in the cache's eviction queue.
    id: u32,
    backend: Arc<dyn Backend>,
    pages: PageTree,
    /// Where the pages live: the mapping's memfd.
    store: PageStore,
    uffd: Arc<Userfaultfd>,
    /// Serves the faults of every view of the store.
    handler: Mutex<Option<FaultHandler>>,
    /// The user's maps of this file, for faults and dirty scans.
    maps: parking_lot::RwLock<Vec<UserView>>,
    /// Held from a scan of written pages until they are marked dirty: the scan
    /// hands the kernel's "written" bit to one thread, and a writeback elsewhere
    /// must not look at `DIRTY` in between.
    scanning: Mutex<()>,
    lock: CoherenceLock,
    /// The file's size as callers see it; the backend's follows under `size_lock`.
    size: AtomicU64,
    /// Serialises size changes, so the backend's size and `size` agree.
    size_lock: Mutex<()>,
    max_size: u64,
    removed: AtomicBool,
    /// Set once a removed file's pages were dropped and its backend removed
    /// (see [`Mapping::remove`]).
    storage_released: AtomicBool,
    /// Writeback errors, errseq style: how many were recorded, whether the
    /// latest was reported to anyone, and its errno (see [`Mapping::handle`]).
    wb_err: AtomicU64,
    /// The errseq cursor of syncs called on the mapping itself.
    sync_seen: AtomicU64,
    /// Sequential readahead of read misses.
    readahead: Readahead,
}

/// The errno of the latest writeback error, in the low bits of `wb_err`.
const WB_ERRNO: u64 = 0xffff;
/// Set when the latest writeback error was reported by some sync.
const WB_SEEN: u64 = 1 << 16;
/// One more writeback error recorded.
const WB_COUNT_ONE: u64 = 1 << 17;

/// A handle on a [`Mapping`] with its own view of writeback errors, like an
/// open file description: a writeback failure, wherever it happened (a sync,
/// eviction, background writeback, a dropped map), is reported by the next
/// [`FileHandle::sync_all`] or [`FileHandle::sync_range`] of every handle open
/// at the time, once each (the kernel's errseq, the fix for PostgreSQL's fsync
/// problem). A handle opened while an error nobody has reported yet is pending
/// reports it too. Calls on the [`Mapping`] itself act as one more handle. The
/// failed pages stay dirty and are retried by later writebacks.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("db")?))?;
/// let (wal, checkpointer) = (file.handle(), file.handle());
/// wal.write_all_at(b"record", 0)?;
/// wal.sync_all()?;          // each handle learns of failures on its own
/// checkpointer.sync_all()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct FileHandle {
    mapping: Arc<Mapping>,
    seen: AtomicU64,
}

impl FileHandle {
    /// The mapping this handle is on.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.mapping
    }

    /// [`Mapping::sync_all`], reporting any writeback error recorded since this
    /// handle's last sync (or its opening).
    pub fn sync_all(&self) -> io::Result<()> {
        self.mapping.sync_with(&self.seen, None)
    }

    /// [`Mapping::sync_range`], reporting any writeback error recorded since
    /// this handle's last sync (or its opening), wherever in the file.
    pub fn sync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mapping.sync_with(&self.seen, Some((offset, len)))
    }
}

impl std::ops::Deref for FileHandle {
    type Target = Mapping;

    fn deref(&self) -> &Mapping {
        &self.mapping
    }
}

impl fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileHandle")
            .field("mapping", &self.mapping)
            .finish_non_exhaustive()
    }
}

/// One of the user's maps, as the mapping tracks it.
#[derive(Clone, Copy, Debug)]
struct UserView {
    addr: usize,
    len: usize,
    /// The file offset of the first byte.
    offset: u64,
    /// Read-write: registered as a store trap (see [`Mapping::trap_stores`])
    /// and scanned for stores.
    tracked: bool,
}

impl UserView {
    /// The page index `addr` shows, if `addr` is in this view.
    fn page_at(&self, addr: usize) -> Option<u64> {
        let at = addr.checked_sub(self.addr).filter(|&at| at < self.len)?;
        Some((self.offset + at as u64) / PAGE)
    }

    /// The part of pages `first..=last` this view shows: its first and last
    /// page, and its address range.
    fn span(&self, first: u64, last: u64) -> Option<(u64, u64, usize, usize)> {
        let view_first = self.offset / PAGE;
        let view_last = view_first + (self.len / PAGE_SIZE) as u64 - 1;
        let (first, last) = (first.max(view_first), last.min(view_last));
        if first > last {
            return None;
        }
        let addr = self.addr + ((first - view_first) * PAGE) as usize;
        Some((first, last, addr, ((last - first + 1) * PAGE) as usize))
    }
}

/// Whether a dropped dirty page is written back first or discarded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DirtyPages {
    /// Its range is being punched, zeroed or truncated: the data goes anyway.
    Discard,
    /// Only the cache is being dropped: the data must reach the backend.
    WriteBack,
}

/// What a fill does when the budget is used up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FillBudget {
    /// Read the first page without caching it (a read miss).
    Uncached,
    /// Report [`Fill::CacheFull`] (readahead).
    Cache,
    /// Wait for busy pages to come free for the first page; report
    /// [`Fill::CacheFull`] only if none can (a write that must read its page).
    Wait,
    /// Take the first page beyond the budget (a fault, which cannot be refused).
    Force,
}

/// What claiming pages for a fill found.
enum Claim {
    /// These claims, of consecutive pages from the first: read them.
    Pages(Vec<PageState>),
    /// The first page is absent and the budget is used up: read it uncached.
    Uncached,
    /// Nothing to read, for this reason.
    Nothing(Fill),
}

/// A buffer a fill reads the backend into, reused by its thread: a fill of up
/// to 2 MiB would otherwise map fresh memory, fault on each of its pages and
/// unmap it again every time. It starts at a page boundary, so that a device
/// opened with `O_DIRECT` reads straight into it.
struct FillBuf {
    buf: AlignedBuf,
    len: usize,
}

thread_local! {
    static FILL_BUFS: std::cell::RefCell<Vec<AlignedBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl FillBuf {
    /// A buffer of `len` bytes (not zeroed when reused: fills overwrite it).
    fn take(len: usize) -> FillBuf {
        let buf = FILL_BUFS
            .with(|bufs| bufs.borrow_mut().pop())
            .filter(|buf| buf.len() >= len)
            .unwrap_or_else(|| AlignedBuf::new(len, PAGE_SIZE));
        FillBuf { buf, len }
    }
}

impl Drop for FillBuf {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::new(0, 1));
        if buf.len() <= (MAX_WINDOW_PAGES as usize) * PAGE_SIZE {
            // A thread keeps two: a fill nests at most one inside another (a
            // read's bounce), and the pool must not grow without bound.
            FILL_BUFS.with(|bufs| {
                let mut bufs = bufs.borrow_mut();
                if bufs.len() < 2 {
                    bufs.push(buf);
                }
            });
        }
    }
}

impl std::ops::Deref for FillBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for FillBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// What a fill of absent pages achieved.
enum Fill {
    /// `pages` pages from the first one were read into `data`; the first
    /// `current` of them were still claimed when the read ended, so they hold
    /// the backend's data as of a moment during the fill. (Every change waits
    /// for claims, so none should be lost; if one is, the generation check
    /// keeps its data out of the cache and out of the caller's buffer.)
    Read {
        pages: u64,
        current: u64,
        data: FillBuf,
    },
    /// The first page is not absent (cached, or busy with another thread): look again.
    NotAbsent,
    /// The first page starts at or past the end of file.
    BeyondEof,
    /// The first page is absent and the budget has no room for it (only when
    /// the caller asked for the pages to be cached).
    CacheFull,
}

impl Mapping {
    pub(super) fn new(cache: Arc<CacheShared>, backend: Arc<dyn Backend>) -> io::Result<Arc<Self>> {
        let size = backend.len()?;
        let max_size = backend.max_file_size().min(MAX_PAGES * PAGE);
        let strategy = cache.strategy;
        let uffd = Arc::new(Userfaultfd::new()?);
        let store = PageStore::new(max_size, uffd.clone())?;
        let id = cache.new_mapping_id();
        let mapping = Arc::new(Mapping {
            cache,
            id,
            backend,
            pages: PageTree::default(),
            store,
            uffd: uffd.clone(),
            handler: Mutex::new(None),
            maps: parking_lot::RwLock::new(Vec::new()),
            scanning: Mutex::new(()),
            lock: CoherenceLock::new(strategy),
            size: AtomicU64::new(size),
            size_lock: Mutex::new(()),
            max_size,
            removed: AtomicBool::new(false),
            storage_released: AtomicBool::new(false),
            wb_err: AtomicU64::new(0),
            sync_seen: AtomicU64::new(0),
            readahead: Readahead::default(),
        });
        let handler = FaultHandler::start(uffd, Arc::downgrade(&mapping))?;
        *mapping.handler.lock() = Some(handler);
        mapping.cache.register(id, Arc::downgrade(&mapping));
        Ok(mapping)
    }

    /// Serves a fault at `addr` in one of the store's views (MISSING, or MINOR
    /// in a read-write map): fills the page under Fill if it is absent, as a
    /// read miss does; in a read-write map, maps it there (and the cached pages
    /// after it) under their page locks; then wakes the toucher. Faults past the
    /// end of file, or on pages another thread is installing or dropping, are
    /// left to the toucher's retry (which then finds the page, or gets `SIGBUS`).
    pub(crate) fn serve_fault(&self, addr: usize, thread: u32) {
        schedule::point();
        stats::add(&self.cache.counters.faults, 1);
        let page_addr = addr & !(PAGE_SIZE - 1);
        let internal = self.store.page_at(addr);
        let user_view = match internal {
            Some(_) => None,
            None => {
                let maps = self.maps.read();
                maps.iter()
                    .find(|view| view.page_at(addr).is_some())
                    .copied()
            }
        };
        let index = internal.or_else(|| user_view.and_then(|view| view.page_at(addr)));
        if let Some(index) = index {
            if index * PAGE < self.len() {
                let filled = self.fault_in(index);
                if filled.is_ok() {
                    if let Some(view) = user_view.filter(|view| view.tracked) {
                        self.map_into_view(&view, index, page_addr);
                    }
                } else if user_view.is_some() && thread != 0 {
                    // The backend cannot give the page: the kernel's answer to a
                    // map whose page cannot be read is SIGBUS, not a toucher that
                    // faults again for ever.
                    let _ = crate::map::uffd::send_sigbus(thread);
                }
            } else if internal.is_some() {
                // An optimistic reader that lost a race with a truncate.
                self.install_zeroes_past_end(index);
            } else if thread != 0 {
                // A user map touched a page wholly past the end of file.
                let _ = crate::map::uffd::send_sigbus(thread);
            }
        }
        let _ = self.uffd.wake(page_addr, PAGE_SIZE);
    }

    /// Takes `mode` over `range`, counting a wait if someone holds it in a
    /// conflicting way.
    fn lock_mode(&self, mode: Mode, range: std::ops::Range<u64>) -> CoherenceGuard<'_> {
        if let Some(guard) = self.lock.try_lock(mode, range.clone()) {
            return guard;
        }
        stats::add(&self.cache.counters.lock_waits[mode_slot(mode)], 1);
        self.lock.lock(mode, range)
    }

    /// Sets `set` (which makes the page present) and clears `clear` on page
    /// `index`, whose slot the caller holds locked or claimed, and gives the
    /// page its eviction queue entry if it has none.
    fn publish(&self, index: u64, slot: &Slot, set: u64, clear: u64) {
        let before = slot.update(|s| s.transition(set | QUEUED, clear, true));
        if !before.has(QUEUED) {
            self.cache.enqueue(self.id, index);
        }
    }

    /// What the eviction hand finds at page `index`.
    pub(super) fn eviction_visit(&self, index: u64) -> Visit {
        let Some(slot) = self.pages.get(index) else {
            return Visit::Stale;
        };
        let state = slot.load();
        if state.is_absent() {
            // The entry leaves the queue, unless a fill takes the page meanwhile.
            let unqueued = PageState(state.0 & !QUEUED);
            return match slot.replace(state, unqueued) {
                Ok(()) => Visit::Stale,
                Err(_) => Visit::Keep,
            };
        }
        if slot.take_referenced() {
            Visit::Keep
        } else {
            Visit::Candidate
        }
    }

    /// Evicts page `index` if it is present and not busy: holds stores through
    /// maps back, writes it back if dirty, and removes it. Never waits for a
    /// page or a coherence mode: eviction changes no backend mapping, so it
    /// needs none.
    pub(super) fn evict_page(&self, index: u64) -> Eviction {
        let Some(slot) = self.pages.get(index) else {
            return Eviction::Absent;
        };
        let state = slot.load();
        if !state.has(PRESENT) {
            return if state.is_absent() {
                Eviction::Absent
            } else {
                Eviction::Busy
            };
        }
        if state.has(LOCKED | FILLING | WRITEBACK) || slot.try_lock(state).is_err() {
            return Eviction::Busy;
        }
        self.trap_stores(&[index]);
        if self.write_back_locked(index, slot).is_err() {
            // It stays, dirty; the error is kept for the next sync.
            slot.update(|s| s.transition(0, LOCKED, false));
            return Eviction::Failed;
        }
        if self.store.remove(index, 1).is_err() {
            slot.update(|s| s.transition(0, LOCKED, false));
            return Eviction::Failed;
        }
        slot.update(PageState::emptied);
        self.cache.budget.release();
        stats::add(&self.cache.counters.evictions, 1);
        Eviction::Evicted
    }

    /// Background writeback of every dirty page; failures are recorded for the
    /// next syncs (see [`FileHandle`]).
    pub(super) fn write_back_in_background(&self) {
        if !self.removed.load(Ordering::Acquire) {
            let _ = self.write_back_range(0, MAX_PAGES - 1);
        }
    }

    /// Bytes of this mapping's page index.
    pub(super) fn index_bytes(&self) -> usize {
        self.pages.allocated_bytes()
    }

    /// How many of this mapping's pages are dirty (walks the page index).
    pub(super) fn dirty_pages(&self) -> u64 {
        let mut dirty = 0;
        self.pages.for_each(0, MAX_PAGES - 1, |_, slot| {
            dirty += u64::from(slot.load().has(DIRTY));
        });
        dirty
    }

    /// The name of the thread that serves this mapping's page faults (tests
    /// watch it go away with the mapping).
    #[doc(hidden)]
    pub fn fault_thread_name(&self) -> String {
        let handler = self.handler.lock();
        handler
            .as_ref()
            .map(|h| h.thread_name().to_owned())
            .unwrap_or_default()
    }

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
        if tracked && !self.uffd.has_store_trap() {
            // Stores could be neither tracked nor held back: they would be lost.
            return fail(libc::EOPNOTSUPP);
        }
        let view = View::new(self.store.memfd(), offset, len, tracked)?;
        if tracked {
            self.uffd.register_store_trap(view.addr(), view.len())?;
            // Arms write tracking over the whole view, pages present or not.
            scan_written(view.addr(), view.len())?;
        } else {
            self.uffd.register(view.addr(), view.len(), false)?;
        }
        self.maps.write().push(UserView {
            addr: view.addr(),
            len: view.len(),
            offset,
            tracked,
        });
        Ok(MapRegion::new(self.clone(), view, offset, access))
    }

    /// Called as a map goes away: marks the pages it stored to dirty, and stops
    /// tracking it.
    pub(crate) fn forget_map(&self, map: &MapRegion) {
        let range = map.addr_range();
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

    /// The state of page `index`, for readers of a map that validate their copy
    /// as the hit path does.
    pub(crate) fn page_state(&self, index: u64) -> Option<PageState> {
        self.pages.get(index).map(Slot::load)
    }

    /// After a direct write of `data` at `offset`, replaces the cached pages of
    /// `first..=last` that a map shows with what was written, whole (punch, then
    /// install), and marks them dirty: a store through a map that overlapped the
    /// write may be written back after it, and the cache, which now holds the
    /// write, must win that race again. Pages not cached are left to fault in.
    fn replace_mapped_pages(
        &self,
        first: u64,
        last: u64,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let mut result = Ok(());
        for index in first..=last {
            if !self.page_is_mapped(index) {
                continue;
            }
            let Some(slot) = self.pages.get(index) else {
                continue;
            };
            if self.lock_for_change(slot).is_none() {
                continue;
            }
            let at = (index * PAGE - offset) as usize;
            let replaced = self.replace_locked_page(index, slot, &data[at..at + PAGE_SIZE]);
            result = result.and(replaced);
        }
        result
    }

    /// Replaces page `index`, which the caller locked, with `page` whole (punch,
    /// then install), so that no map reader sees a change half done: a reader
    /// that touches it in between waits in its fault for the lock. Unlocks it
    /// dirty; on failure the page may be gone from the store, so it is forgotten.
    fn replace_locked_page(&self, index: u64, slot: &Slot, page: &[u8]) -> io::Result<()> {
        let replaced = self
            .store
            .remove(index, 1)
            .and_then(|()| self.store.install(index, page));
        match replaced {
            Ok(()) => {
                slot.update(|s| s.transition(DIRTY, LOCKED, true));
                Ok(())
            }
            Err(error) => {
                let _ = self.store.remove(index, 1);
                slot.update(PageState::emptied);
                self.cache.budget.release();
                Err(error)
            }
        }
    }

    /// Whether one of the user's maps shows page `index`.
    fn page_is_mapped(&self, index: u64) -> bool {
        let maps = self.maps.read();
        maps.iter().any(|view| {
            let first = view.offset / PAGE;
            (first..first + (view.len / PAGE_SIZE) as u64).contains(&index)
        })
    }

    /// Marks dirty the pages of `first..=last` that stores through the user's
    /// read-write maps changed since the last scan (which re-arms tracking).
    fn scan_maps(&self, first: u64, last: u64) {
        let views: Vec<UserView> = self
            .maps
            .read()
            .iter()
            .filter(|v| v.tracked)
            .copied()
            .collect();
        if views.is_empty() {
            return;
        }
        let _scanning = self.scanning.lock();
        for view in &views {
            self.mark_stores_dirty(view, first, last);
        }
    }

    fn mark_stores_dirty(&self, view: &UserView, first: u64, last: u64) {
        if !view.tracked {
            return;
        }
        let Some((_, _, addr, len)) = view.span(first, last) else {
            return;
        };
        let Ok(written) = scan_written(addr, len) else {
            return;
        };
        for range in written {
            for page_addr in range.step_by(PAGE_SIZE) {
                let Some(index) = view.page_at(page_addr) else {
                    continue;
                };
                // A present page, or a locked one: a store can land right after a
                // fill installed a page, before it publishes it. Not a fill's
                // unlocked claim: nothing is installed there to be stored to (the
                // report is of a page written, then removed).
                if let Some(slot) = self.pages.get(index) {
                    let before = slot.update(|s| {
                        if s.has(PRESENT | LOCKED) {
                            s.transition(DIRTY, 0, false)
                        } else {
                            s
                        }
                    });
                    if before.has(PRESENT | LOCKED) && !before.has(DIRTY) {
                        self.cache.dirtied();
                    }
                }
            }
        }
    }

    /// Holds back stores through the user's read-write maps to `pages` (sorted;
    /// the caller holds their page locks) and marks dirty those stored to since
    /// the last scan. The maps' entries for the pages are zapped first, so a
    /// store from then on faults (MINOR) and waits in the handler for the page
    /// lock; the scan after the zap still reports what was written before it
    /// (a written entry is left empty, which a scan reports). Until the pages
    /// are unlocked, their bytes and `DIRTY` flags are final, so a drop can
    /// write them back and punch them without losing a store.
    #[allow(unsafe_code)] // the zap, on views this mapping keeps track of
    fn trap_stores(&self, pages: &[u64]) {
        let maps = self.maps.read();
        if !maps.iter().any(|view| view.tracked) {
            return;
        }
        let _scanning = self.scanning.lock();
        for view in maps.iter().filter(|view| view.tracked) {
            for run in pages.chunk_by(|a, b| *b == *a + 1) {
                let Some((first, last, addr, len)) = view.span(run[0], run[run.len() - 1]) else {
                    continue;
                };
                // SAFETY: the range is inside a live view: a view stays mapped
                // while it is in `maps`, whose read lock is held (`forget_map`
                // removes it under the write lock before its region unmaps it).
                // A zap that fails leaves entries mapped; the scan below still
                // reports the stores made so far.
                let _ = unsafe { zap(addr, len) };
                self.mark_stores_dirty(view, first, last);
            }
        }
    }

    /// Maps page `index` into the read-write map `view` at `page_addr`, with the
    /// cached pages after it up to [`FAULT_AROUND_PAGES`] (`UFFDIO_CONTINUE`,
    /// write-protected so stores stay tracked), each under its page lock: a
    /// drop that has zapped a page keeps it locked until it is punched, so no
    /// entry comes back in between. Stops at the first page that is not cached,
    /// is busy or lies past the end of file. Nothing is mapped if page `index`
    /// is gone (the toucher's retry faults MISSING).
    fn map_into_view(&self, view: &UserView, index: u64, page_addr: usize) {
        let view_last = view.offset / PAGE + (view.len / PAGE_SIZE) as u64 - 1;
        if view.span(index, index).is_none() {
            return;
        }
        let in_file = self.len().div_ceil(PAGE);
        let last = view_last
            .min(index + FAULT_AROUND_PAGES - 1)
            .min(in_file.saturating_sub(1));
        let mut locked = Vec::new();
        'pages: for i in index..=last {
            let Some(slot) = self.pages.get(i) else {
                break;
            };
            loop {
                let state = slot.load();
                if !state.has(PRESENT) {
                    break 'pages;
                }
                if state.has(LOCKED) {
                    if i > index {
                        break 'pages;
                    }
                    slot.wait_while(LOCKED);
                    continue;
                }
                if slot.try_lock(state).is_ok() {
                    locked.push(i);
                    break;
                }
            }
        }
        if !locked.is_empty() {
            // EEXIST (mapped already) or a short count leave the rest to faults.
            let _ = self
                .uffd
                .continue_pages(page_addr, locked.len() * PAGE_SIZE);
        }
        for i in locked {
            let slot = self.pages.get(i).expect("locked slots exist");
            slot.update(|s| s.transition(0, LOCKED, false));
        }
    }

    /// Makes page `index`, past the end of file, a cached page of zeroes (the
    /// file's content there), so that an optimistic reader of the cache's view
    /// that raced a truncate can finish its copy, which it then discards. The
    /// page is an ordinary cached page: a later truncate drops it, and if the
    /// file grows over it, zeroes are right.
    fn install_zeroes_past_end(&self, index: u64) {
        let slot = self.pages.get_or_create(index);
        loop {
            let state = slot.load();
            if state.has(LOCKED | FILLING) {
                slot.wait_while(LOCKED | FILLING);
                continue;
            }
            if state.has(PRESENT) {
                return;
            }
            // A fault cannot be refused: it evicts until a page is free.
            self.cache.acquire(Need::Required);
            if slot.replace(state, state.with_flags(LOCKED)).is_err() {
                self.cache.budget.release();
                continue;
            }
            if self.store.install(index, &[0; PAGE_SIZE]).is_ok() {
                self.publish(index, slot, PRESENT | UPTODATE, LOCKED);
            } else {
                slot.update(PageState::emptied);
                self.cache.budget.release();
            }
            return;
        }
    }

    /// Makes page `index` present if it lies inside the file; fails if the
    /// backend could not be read.
    fn fault_in(&self, index: u64) -> io::Result<()> {
        let slot = self.pages.get_or_create(index);
        loop {
            if index * PAGE >= self.len() {
                return Ok(());
            }
            let state = slot.load();
            if state.has(LOCKED | FILLING) {
                slot.wait_while(LOCKED | FILLING);
                continue;
            }
            if state.has(PRESENT) {
                return Ok(());
            }
            let want = self.cache.fill_batch_pages as u64;
            let fill = self.lock_mode(Mode::Fill, index * PAGE..(index + want) * PAGE);
            // A fault cannot be refused: it evicts until its first page fits.
            if let Fill::BeyondEof = self.fill(index, want, FillBudget::Force, Some(fill))? {
                return Ok(());
            }
        }
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest size the file may reach.
    pub fn max_file_size(&self) -> u64 {
        self.max_size
    }

    /// The coherence strategy this mapping enforces.
    pub fn strategy(&self) -> Strategy {
        self.lock.strategy()
    }

    /// The backend this mapping caches.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Whether page `index` is cached and up to date (like one byte of `mincore`).
    pub fn is_page_cached(&self, index: u64) -> bool {
        self.pages
            .get(index)
            .is_some_and(|slot| slot.load().has(UPTODATE))
    }

    /// A plain `memcpy` of cached page `index` into `dst`, with no validation:
    /// the baseline that benchmarks compare the hit path with. Returns whether
    /// the page was present.
    ///
    /// # Safety
    /// Nothing may change this cache's pages during the call: no write, fill,
    /// invalidation or writeback on any mapping of the cache.
    #[doc(hidden)]
    #[allow(unsafe_code)]
    pub unsafe fn memcpy_cached_page(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) -> bool {
        if !self
            .pages
            .get(index)
            .is_some_and(|slot| slot.load().has(PRESENT))
        {
            return false;
        }
        // SAFETY: the page is present, and the caller guarantees that nothing
        // changes it during the call: `memcpy_page`'s contract.
        unsafe { self.store.memcpy_page(index, dst) };
        true
    }

    /// How many pages of this file are cached, and how many of those are dirty.
    pub fn cached_pages(&self) -> (u64, u64) {
        let (mut cached, mut dirty) = (0, 0);
        self.pages.for_each(0, MAX_PAGES - 1, |_, slot| {
            let state = slot.load();
            cached += state.has(UPTODATE) as u64;
            dirty += state.has(DIRTY) as u64;
        });
        (cached, dirty)
    }

    /// Reads up to `buf.len()` bytes at `offset`, like `pread`: returns how many,
    /// fewer only at the end of file (0 at or past it).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some((end, len)) = self.check_read(buf, offset)? else {
            return Ok(0);
        };
        // Only `file-exclusive` locks whole reads; it then covers their fills too.
        let read = self.lock_mode(Mode::Read, offset..end);
        let fill_held = read.is_locking();
        copy_out_under(read, &mut buf[..len], |dst| {
            self.read_cached(dst, offset, fill_held)
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset`, failing with
    /// `ErrorKind::UnexpectedEof` if the file ends first.
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// [`Mapping::read_at`] that never waits, like `preadv2` with `RWF_NOWAIT`
    /// (the kernel's `IOCB_NOWAIT`): it copies what cached pages hold from
    /// `offset` on and stops at the first page that would need a backend read
    /// or is busy (being filled, written or dropped), or if the coherence mode
    /// it needs is held by someone else. Returns the bytes copied (0 at or past
    /// the end of file), or `ErrorKind::WouldBlock` if it could copy none; it
    /// never fills, so a call that would block changes nothing.
    ///
    /// ```
    /// use std::io::ErrorKind;
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("log")?))?;
    /// file.write_all_at(&[7; 8192], 0)?;
    /// file.invalidate_range(4096, 4096)?; // page 1 now needs a backend read
    /// let mut buf = [0u8; 8192];
    /// assert_eq!(file.read_at_nowait(&mut buf, 0)?, 4096); // page 0 only
    /// let error = file.read_at_nowait(&mut buf, 4096).unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::WouldBlock);
    /// assert_eq!(file.read_at(&mut buf, 4096)?, 4096); // this one may wait
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some((end, len)) = self.check_read(buf, offset)? else {
            return Ok(0);
        };
        let Some(read) = self.lock.try_lock(Mode::Read, offset..end) else {
            return would_block();
        };
        let locked = read.is_locking();
        let copied = copy_out_under(read, &mut buf[..len], |dst| {
            Ok(self.read_cached_nowait(dst, offset, locked))
        })?;
        if copied == 0 {
            return would_block();
        }
        Ok(copied)
    }

    /// Copies from cached pages into `dst` up to the first page that is not a
    /// hit; `locked`: the caller holds a coherence mode (see
    /// [`Mapping::read_hit_locked`]).
    fn read_cached_nowait(&self, dst: &mut [u8], offset: u64, locked: bool) -> usize {
        let mut done = 0;
        while done < dst.len() {
            let pos = offset + done as u64;
            let (index, in_page) = (pos / PAGE, (pos % PAGE) as usize);
            let take = (PAGE_SIZE - in_page).min(dst.len() - done);
            let page = &mut dst[done..done + take];
            let hit = self
                .pages
                .get(index)
                .is_some_and(|slot| self.hit(slot, index, in_page, page, locked));
            if !hit {
                break;
            }
            done += take;
        }
        done
    }

    /// [`Mapping::write_at`] that never waits, like `pwritev2` with
    /// `RWF_NOWAIT`: it writes into cached pages from `offset` on and stops at
    /// the first page that is not cached (writing part of it would need a
    /// backend read, and a new page may need memory the budget does not have),
    /// is busy, or lies past the end of file (growing the file changes the
    /// backend), or if the coherence mode it needs is held by someone else.
    /// Returns the bytes written, or `ErrorKind::WouldBlock` if it wrote none
    /// (then nothing changed).
    pub fn write_at_nowait(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let Some(len) = self.check_write(buf.len(), offset)? else {
            return Ok(0);
        };
        let (buf, end) = (&buf[..len], offset + len as u64);
        if buffer_in_a_map(buf.as_ptr(), buf.len()) {
            let bounce: Vec<u8> = buf.to_vec();
            return self.write_at_nowait(&bounce, offset);
        }
        let Some(_write) = self.lock.try_lock(Mode::Write, offset..end) else {
            return would_block();
        };
        let size = self.len();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, in_page) = (pos / PAGE, (pos % PAGE) as usize);
            let take = (PAGE_SIZE - in_page).min(buf.len() - done);
            if pos + take as u64 > size {
                break;
            }
            let Some(slot) = self.pages.get(index) else {
                break;
            };
            let state = slot.load();
            if !state.has(PRESENT) || !state.is_readable() || slot.try_lock(state).is_err() {
                break;
            }
            if let Err(error) =
                self.write_locked_page(index, slot, in_page, &buf[done..done + take])
            {
                if done == 0 {
                    return Err(error);
                }
                break;
            }
            done += take;
        }
        if done == 0 {
            return would_block();
        }
        Ok(done)
    }

    /// Writes `buf` at `offset` into the cache, like `pwrite`, extending the
    /// file if it ends past the end of file. Returns `buf.len()`, or fewer if an
    /// error stopped it after some bytes were written; the file grows page by page
    /// as the bytes land, so a write that fails changes nothing and a short write
    /// grows the file only as far as it wrote. A write that crosses
    /// [`Mapping::max_file_size`] is cut short there; one that starts at or past
    /// it fails with `EFBIG`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let Some(len) = self.check_write(buf.len(), offset)? else {
            return Ok(0);
        };
        let (buf, end) = (&buf[..len], offset + len as u64);
        if buffer_in_a_map(buf.as_ptr(), buf.len()) {
            // Reading a map may fault into a handler that needs Fill: copy it
            // before taking Write, which a queued Invalidate would make it wait for.
            let bounce: Vec<u8> = buf.to_vec();
            return self.write_at(&bounce, offset);
        }
        let _write = self.lock_mode(Mode::Write, offset..end);
        let old_size = self.len();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let take = (PAGE_SIZE - in_page).min(buf.len() - done);
            if let Err(error) =
                self.write_page(pos / PAGE, in_page, &buf[done..done + take], old_size)
            {
                if done == 0 {
                    return Err(error);
                }
                break;
            }
            done += take;
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ))
                }
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Brings the pages of `offset..offset + len` (clipped to the end of file)
    /// into the cache without copying them anywhere, like `readahead(2)`. Stops
    /// quietly when the cache budget is used up.
    pub fn readahead(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_live()?;
        // As `readahead(2)`: any offset, and only a length past 2^63 - 1 fails.
        if len > MAX_OFFSET {
            return fail(libc::EINVAL);
        }
        let end = offset.saturating_add(len).min(self.len());
        if offset >= end {
            return Ok(());
        }
        let batch = self.cache.fill_batch_pages as u64;
        self.fill_absent(offset / PAGE, (end - 1) / PAGE, batch)?;
        Ok(())
    }

    /// Fills the absent pages of `first..=last` (inside the file), at most
    /// `batch` pages per backend read, skipping cached ones; stops quietly
    /// when the budget is used up, or when it has read a quarter of the budget
    /// (it would evict what it read ahead to read ahead more). Returns the
    /// pages it read.
    fn fill_absent(&self, first: u64, last: u64, batch: u64) -> io::Result<u64> {
        let mut read = 0;
        let mut index = first;
        while index <= last {
            if self
                .pages
                .get(index)
                .is_some_and(|slot| !slot.load().is_absent())
            {
                index += 1;
                continue;
            }
            let batch = (last - index + 1).min(batch);
            let fill = self.lock_mode(Mode::Fill, index * PAGE..(index + batch) * PAGE);
            match self.fill(index, batch, FillBudget::Cache, Some(fill))? {
                Fill::Read { pages, .. } => {
                    index += pages;
                    read += pages;
                }
                Fill::NotAbsent => index += 1,
                // A budget already used up stops readahead quietly rather than
                // failing it with `OutOfMemory`.
                Fill::BeyondEof | Fill::CacheFull => break,
            }
            if (index - first) * 4 >= self.cache.budget.capacity() {
                break;
            }
        }
        Ok(read)
    }

    /// A direct read, like `pread` on an `O_DIRECT` descriptor: dirty cached pages
    /// of the range are written back first (so completed buffered writes are
    /// seen), then the backend is read without caching. `offset` and `buf.len()`
    /// must be multiples of [`PAGE_SIZE`] and the buffer address a multiple of
    /// [`DIRECT_IO_MEMORY_ALIGN`], else `EINVAL` (an empty read returns 0
    /// whatever its alignment, as the kernel's does). Returns the bytes up to
    /// the end of file.
    pub fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.check_live()?;
        let end = end_of(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(0);
        }
        check_direct_alignment(offset, buf.len(), buf.as_ptr() as usize)?;
        if buffer_in_a_map(buf.as_ptr(), buf.len()) {
            // The device would fault on the map while we hold Direct: read into
            // memory of our own, and copy out once the mode is released.
            let mut bounce = AlignedBuf::new(buf.len(), DIRECT_IO_MEMORY_ALIGN);
            let n = self.read_direct(&mut bounce, offset)?;
            buf[..n].copy_from_slice(&bounce[..n]);
            return Ok(n);
        }
        let _direct = self.lock_mode(Mode::Direct, offset..end);
        let size = self.len();
        if offset >= size {
            return Ok(0);
        }
        // As ext4 answers a direct read from inside the file that reaches past
        // its largest size, even where the file ends before.
        if end > self.max_size {
            return fail(libc::EINVAL);
        }
        let whole = end.min(size.next_multiple_of(PAGE)) - offset;
        self.write_back_range(offset / PAGE, (offset + whole - 1) / PAGE)?;
        self.backend
            .read_direct(offset, &mut buf[..whole as usize])?;
        Ok((end.min(size) - offset) as usize)
    }

    /// A direct write, like `pwrite` on an `O_DIRECT` descriptor: the range's
    /// cached pages are written back and dropped before the write and dropped
    /// again after it, so no read that starts after it returns can see the data it
    /// replaced. Alignment as for [`Mapping::read_direct`]; the largest file
    /// size as for [`Mapping::write_at`]. Extends the file before the device
    /// write; if that write fails, the extension stays and reads as zeroes.
    pub fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let Some(len) = self.check_write(buf.len(), offset)? else {
            return Ok(0);
        };
        let (buf, end) = (&buf[..len], offset + len as u64);
        check_direct_alignment(offset, buf.len(), buf.as_ptr() as usize)?;
        if buffer_in_a_map(buf.as_ptr(), buf.len()) {
            // As for reads: take the data out of the map before taking Direct.
            let bounce = AlignedBuf::from_slice(buf, DIRECT_IO_MEMORY_ALIGN);
            return self.write_direct(&bounce, offset);
        }
        let _direct = self.lock_mode(Mode::Direct, offset..end);
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        // Pages a map shows are written back but kept: dropping one could lose a
        // store through the map that lands between the scan for written pages
        // and the punch. After the write they are replaced with its data.
        self.write_back_range(first, last)?;
        self.drop_pages_where(first, last, DirtyPages::WriteBack, |i| {
            !self.page_is_mapped(i)
        })?;
        // Fills of mapped pages must not read the device while it is written.
        self.settle_fills(first, last);
        self.extend_size(end)?;
        schedule::point();
        let written = self.backend.write_direct(offset, buf);
        schedule::point();
        // Fills that ran during the write may hold what it replaced.
        let dropped = match written {
            Ok(()) => self
                .drop_pages_where(first, last, DirtyPages::WriteBack, |i| {
                    !self.page_is_mapped(i)
                })
                .and(self.replace_mapped_pages(first, last, offset, buf)),
            // What reached the device is unknown: drop everything.
            Err(_) => self.drop_pages(first, last, DirtyPages::WriteBack),
        };
        written?;
        dropped?;
        Ok(len)
    }

    /// Deallocates `offset..offset + len`, like
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: it reads as zeroes
    /// afterwards, the bytes of partial pages around it survive, and the size does
    /// not change. Cached data of the range, dirty or not, is dropped.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.fallocate_end(offset, len)?;
        let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
        self.remove_cached_bytes(offset, end);
        schedule::point();
        self.backend.punch_hole(offset, len)
    }

    /// Zeroes `offset..offset + len`, like `fallocate(FALLOC_FL_ZERO_RANGE)`:
    /// extends the file if the range ends past the end of file.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.fallocate_end(offset, len)?;
        let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
        self.remove_cached_bytes(offset, end);
        schedule::point();
        self.extend_size(end)?;
        self.backend.zero_range(offset, len)
    }

    /// Sets the file's size, like `ftruncate`: shrinking drops the cached pages
    /// past the new end and zeroes the rest of the last page; growing adds a hole.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_live()?;
        if len > MAX_OFFSET {
            return fail(libc::EINVAL);
        }
        if len > self.max_size {
            return fail(libc::EFBIG);
        }
        let _invalidate = self.lock_mode(Mode::Invalidate, len.min(self.len())..u64::MAX);
        {
            let _size = self.size_lock.lock();
            let old = self.len();
            if len >= old {
                if len > old {
                    self.backend.set_len(len)?;
                    self.size.store(len, Ordering::Release);
                }
                return Ok(());
            }
            // Publish the new end first: fills that start now stop at it.
            self.size.store(len, Ordering::Release);
        }
        // Not under the size lock: dropping pages waits for page locks, and a
        // writer holding a page lock may be waiting for the size lock.
        self.remove_cached_bytes(len, u64::MAX);
        schedule::point();
        let _size = self.size_lock.lock();
        // Writers are excluded by Invalidate, so this is `len`, except under the
        // `none` strategy, where the backend must still follow the size callers see.
        self.backend.set_len(self.len())
    }

    /// Removes `offset..offset + len` and shifts the rest of the file down, like
    /// `fallocate(FALLOC_FL_COLLAPSE_RANGE)`: both must be multiples of
    /// [`PAGE_SIZE`], `len` positive, and the range must end before the end of
    /// file (`EINVAL` otherwise). Cached pages after the range move with their
    /// data; those inside it are dropped.
    pub fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.fallocate_end(offset, len)?;
        if offset % PAGE != 0 || len % PAGE != 0 {
            return fail(libc::EINVAL);
        }
        let _invalidate = self.lock_mode(Mode::Invalidate, offset..u64::MAX);
        let size = self.len();
        if end >= size {
            return fail(libc::EINVAL);
        }
        // The backend shifts what it holds: dirty data must be there first.
        self.write_back_range(offset / PAGE, MAX_PAGES - 1)?;
        self.drop_pages(offset / PAGE, end / PAGE - 1, DirtyPages::WriteBack)?;
        // Pages filled from the backend as it was move below.
        self.settle_fills(end / PAGE, MAX_PAGES - 1);
        self.backend.collapse_range(offset, len)?;
        self.move_pages(end / PAGE, -((len / PAGE) as i64));
        self.set_size(size - len)
    }

    /// Inserts a hole of `len` bytes at `offset`, shifting the rest of the file
    /// up, like `fallocate(FALLOC_FL_INSERT_RANGE)`: both must be multiples of
    /// [`PAGE_SIZE`], `len` positive and `offset` before the end of file (`EINVAL`
    /// otherwise); `EFBIG` if the file would outgrow
    /// [`Mapping::max_file_size`]. Cached pages move with their data.
    pub fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_end(offset, len)?;
        if offset % PAGE != 0 || len % PAGE != 0 {
            return fail(libc::EINVAL);
        }
        let _invalidate = self.lock_mode(Mode::Invalidate, offset..u64::MAX);
        let size = self.len();
        if size.checked_add(len).is_none_or(|new| new > self.max_size) {
            return fail(libc::EFBIG);
        }
        if offset >= size {
            return fail(libc::EINVAL);
        }
        self.write_back_range(offset / PAGE, MAX_PAGES - 1)?;
        // Pages filled from the backend as it was move below.
        self.settle_fills(offset / PAGE, MAX_PAGES - 1);
        self.backend.insert_range(offset, len)?;
        // Grow first: pages that move past the old end must be inside the file.
        self.set_size(size + len)?;
        self.move_pages(offset / PAGE, (len / PAGE) as i64);
        Ok(())
    }

    /// Drops the cached pages touching `offset..offset + len`, writing dirty ones
    /// back first (nothing is lost); the next access reads the backend.
    pub fn invalidate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_live()?;
        let end = end_of(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
        self.drop_pages(offset / PAGE, (end - 1) / PAGE, DirtyPages::WriteBack)
    }

    /// Writes back the dirty pages touching `offset..offset + len`, waits for
    /// writeback already under way there, and makes it durable in the backend.
    /// Reports a writeback error recorded since the last sync called on the
    /// mapping itself (see [`FileHandle`]), even one of other pages.
    pub fn sync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.sync_with(&self.sync_seen, Some((offset, len)))
    }

    /// Writes back every dirty page and makes the file durable, like `fsync`.
    /// Reports a writeback error recorded since the last sync called on the
    /// mapping itself (see [`FileHandle`]).
    pub fn sync_all(&self) -> io::Result<()> {
        self.sync_with(&self.sync_seen, None)
    }

    /// A new handle on this mapping with its own errseq cursor (see
    /// [`FileHandle`]).
    pub fn handle(self: &Arc<Self>) -> FileHandle {
        let now = self.wb_err.load(Ordering::Acquire);
        // An error nobody has reported yet is reported to the new handle too.
        let unseen = now >= WB_COUNT_ONE && now & WB_SEEN == 0;
        FileHandle {
            mapping: self.clone(),
            seen: AtomicU64::new(if unseen { 0 } else { now }),
        }
    }

    /// A sync for the errseq cursor `seen`: writes back `range` (offset and
    /// length; the whole file if `None`), syncs the backend, then reports its
    /// own failure or else any error recorded since `seen`.
    fn sync_with(&self, seen: &AtomicU64, range: Option<(u64, u64)>) -> io::Result<()> {
        self.check_live()?;
        let written = match range {
            None => self.write_back_range(0, MAX_PAGES - 1),
            Some((offset, len)) => {
                let end = end_of(offset, len)?;
                if len > 0 {
                    self.write_back_range(offset / PAGE, (end - 1) / PAGE)
                } else {
                    Ok(())
                }
            }
        };
        let synced = written.and_then(|()| {
            self.backend
                .sync()
                .inspect_err(|error| self.record_wb_error(error))
        });
        let reported = self.report_wb_error(seen);
        synced.and(reported)
    }

    /// Records a writeback failure for every handle's next sync.
    fn record_wb_error(&self, error: &io::Error) {
        let errno = error.raw_os_error().unwrap_or(libc::EIO) as u64 & WB_ERRNO;
        stats::add(&self.cache.counters.writeback_errors, 1);
        let _ = self
            .wb_err
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                Some(((word & !(WB_ERRNO | WB_SEEN)) + WB_COUNT_ONE) | errno)
            });
    }

    /// The latest writeback error if one was recorded since `seen`, which then
    /// moves up to it.
    fn report_wb_error(&self, seen: &AtomicU64) -> io::Result<()> {
        let now = self.wb_err.load(Ordering::Acquire);
        let before = seen.swap(now, Ordering::AcqRel);
        if now / WB_COUNT_ONE == before / WB_COUNT_ONE {
            return Ok(());
        }
        self.wb_err.fetch_or(WB_SEEN, Ordering::AcqRel);
        Err(io::Error::from_raw_os_error((now & WB_ERRNO) as i32))
    }

    /// Removes the file from its backend: its cached pages are dropped, its
    /// storage freed, and every later call on this mapping fails with `ENOENT`.
    ///
    /// As with a file unlinked on Linux, the maps of a removed file keep
    /// working until they go: the pages they show stay cached, and the file's
    /// storage (on a volume, its name too) stays until the last map is
    /// dropped, so a map reads what it read before and its stores land.
    pub fn remove(&self) -> io::Result<()> {
        self.check_live()?;
        let _invalidate = self.lock_mode(Mode::Invalidate, 0..u64::MAX);
        if self.removed.swap(true, Ordering::AcqRel) {
            return fail(libc::ENOENT);
        }
        self.drop_pages_where(0, MAX_PAGES - 1, DirtyPages::Discard, |index| {
            !self.page_is_mapped(index)
        })?;
        // A map that goes after the check above finds `removed` set, and
        // releases the storage itself.
        if self.maps.read().is_empty() {
            self.release_storage()
        } else {
            Ok(())
        }
    }

    /// Drops every page of a removed file and removes it from the backend,
    /// once: when it is removed with no map, or when its last map goes.
    fn release_storage(&self) -> io::Result<()> {
        if self.storage_released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.drop_pages(0, MAX_PAGES - 1, DirtyPages::Discard)?;
        self.backend.remove()
    }

    /// The checks of a write of `len` bytes at `offset`, as the kernel's
    /// `rw_verify_area` and `generic_write_checks` make them: `EINVAL` for a
    /// range past [`MAX_OFFSET`]; `None` for an empty write; `EFBIG` for one
    /// that starts at or past [`Mapping::max_file_size`]; otherwise how many
    /// bytes to write: a write that crosses the largest size is cut short there.
    fn check_write(&self, len: usize, offset: u64) -> io::Result<Option<usize>> {
        self.check_live()?;
        end_of(offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        if offset >= self.max_size {
            return fail(libc::EFBIG);
        }
        Ok(Some(len.min((self.max_size - offset) as usize)))
    }

    /// The end of the range of a `fallocate`-like call, checked in the order
    /// of the kernel's `vfs_fallocate`: `EINVAL` for an offset or length past
    /// [`MAX_OFFSET`] or a length of 0, `EFBIG` for an end past
    /// [`Mapping::max_file_size`].
    fn fallocate_end(&self, offset: u64, len: u64) -> io::Result<u64> {
        self.check_live()?;
        if offset > MAX_OFFSET || len == 0 || len > MAX_OFFSET {
            return fail(libc::EINVAL);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.max_size => Ok(end),
            _ => fail(libc::EFBIG),
        }
    }

    /// The argument checks of a read of `buf.len()` bytes at `offset`: the end
    /// of the range and how many of its bytes lie before the end of file, or
    /// `None` if none do.
    fn check_read(&self, buf: &[u8], offset: u64) -> io::Result<Option<(u64, usize)>> {
        self.check_live()?;
        let end = end_of(offset, buf.len())?;
        let size = self.len();
        if offset >= size {
            return Ok(None);
        }
        Ok(Some((end, (end.min(size) - offset) as usize)))
    }

    fn check_live(&self) -> io::Result<()> {
        if self.removed.load(Ordering::Acquire) {
            return fail(libc::ENOENT);
        }
        Ok(())
    }

    /// Grows the size (cache and backend) to `end` if it is smaller. May be
    /// called with a page locked: the size lock never waits for a page.
    fn extend_size(&self, end: u64) -> io::Result<()> {
        if end <= self.len() {
            return Ok(());
        }
        let _size = self.size_lock.lock();
        if end > self.len() {
            self.backend.set_len(end)?;
            self.size.store(end, Ordering::Release);
        }
        Ok(())
    }

    /// Sets the size the backend already has, after a collapse or insert.
    fn set_size(&self, size: u64) -> io::Result<()> {
        let _size = self.size_lock.lock();
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Moves every cached page from index `first` on by `delta` pages, in the
    /// order that always finds the target slot empty (down: ascending; up:
    /// descending). The caller holds Invalidate, so nothing fills meanwhile; a
    /// page whose target is taken anyway (only under the `none` strategy) or out
    /// of range is dropped. Optimistic readers of the old slot see it change and
    /// retry; the cost follows the cached pages moved, not the file's length.
    fn move_pages(&self, first: u64, delta: i64) {
        let mut cached = Vec::new();
        self.pages.for_each(first, MAX_PAGES - 1, |index, slot| {
            if !slot.load().is_absent() {
                cached.push(index);
            }
        });
        if delta > 0 {
            cached.reverse();
        }
        for index in cached {
            let source = self.pages.get(index).expect("visited slots exist");
            let target = index
                .checked_add_signed(delta)
                .filter(|&target| target < MAX_PAGES);
            match target {
                Some(target) => self.move_page(index, source, target),
                None => {
                    let _ = self.drop_pages(index, index, DirtyPages::Discard);
                }
            }
        }
    }

    /// Moves page `index` to the empty slot of page `target`, data and flags: the
    /// memfd cannot move a page, so the data is copied into a new page there and
    /// the old one removed. Its budget goes with it.
    fn move_page(&self, index: u64, source: &Slot, target: u64) {
        if self.lock_for_change(source).is_none() {
            return;
        }
        // Stores through maps to the old place move with the page.
        self.trap_stores(&[index]);
        let state = source.load();
        let mut data = vec![0; PAGE_SIZE];
        self.store.read(index, 0, &mut data);
        let slot = self.pages.get_or_create(target);
        let empty = slot.load();
        let moved = empty.is_absent()
            && slot.replace(empty, empty.with_flags(LOCKED)).is_ok()
            && match self.store.install(target, &data) {
                Ok(()) => {
                    self.publish(target, slot, PRESENT | UPTODATE | (state.0 & DIRTY), LOCKED);
                    true
                }
                Err(_) => {
                    slot.update(PageState::emptied);
                    false
                }
            };
        // The old page goes either way; if the move failed, so does its data,
        // which the caller wrote back first.
        let _ = self.store.remove(index, 1);
        source.update(PageState::emptied);
        if !moved {
            self.cache.budget.release();
        }
    }

    /// Locks the page of `slot` to change its bytes or its place, after waiting
    /// for its fill and its writeback. An absent page yields `None`.
    fn lock_for_change(&self, slot: &Slot) -> Option<PageState> {
        loop {
            let state = slot.load();
            if state.is_absent() {
                return None;
            }
            if state.has(LOCKED | FILLING | WRITEBACK) {
                slot.wait_while(LOCKED | FILLING | WRITEBACK);
                continue;
            }
            if slot.try_lock(state).is_ok() {
                return Some(state);
            }
        }
    }

    /// Copies `dst.len()` bytes at `offset` (inside the file) into `dst`, filling
    /// misses (under Fill, unless `fill_held`: the caller holds a mode that
    /// covers fills). Returns fewer bytes only if the file shrank meanwhile.
    fn read_cached(&self, dst: &mut [u8], offset: u64, fill_held: bool) -> io::Result<usize> {
        let mut done = 0;
        while done < dst.len() {
            let pos = offset + done as u64;
            let index = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let take = (PAGE_SIZE - in_page).min(dst.len() - done);
            if self.readahead.is_mark(index) {
                self.read_ahead_from(index);
            }
            let slot = self.pages.get(index);
            let page = &mut dst[done..done + take];
            let hit = slot.is_some_and(|slot| self.hit(slot, index, in_page, page, fill_held));
            if hit {
                done += take;
                continue;
            }
            // A page being filled (read ahead, most often) or changed: wait for
            // it and look again, rather than queue for Fill only to find it busy.
            if let Some(slot) = slot.filter(|slot| slot.load().has(FILLING | LOCKED)) {
                slot.wait_while(FILLING | LOCKED);
                continue;
            }
            schedule::point();
            stats::add(&self.cache.counters.misses, 1);
            let rest = &mut dst[done..];
            let asked = (in_page + rest.len()).div_ceil(PAGE_SIZE) as u64;
            let batch = self.cache.fill_batch_pages as u64;
            let miss = self.readahead.on_miss(index, batch);
            let want = match miss {
                MissFill::Stream(window) => window.max(asked),
                MissFill::Ahead => asked,
            };
            let fill = (!fill_held)
                .then(|| self.lock_mode(Mode::Fill, index * PAGE..(index + want) * PAGE));
            match self.fill(index, want, FillBudget::Uncached, fill)? {
                Fill::Read {
                    data,
                    pages,
                    current,
                } => {
                    if let MissFill::Stream(_) = miss {
                        self.readahead.filled(index, pages, asked);
                    }
                    let beyond = pages.saturating_sub(asked);
                    stats::add(&self.cache.counters.readahead_pages, beyond);
                    // Pages whose claim was taken are read again (from the cache).
                    let valid = (current as usize * PAGE_SIZE).saturating_sub(in_page);
                    let n = valid.min(rest.len());
                    rest[..n].copy_from_slice(&data[in_page..in_page + n]);
                    done += n;
                }
                Fill::NotAbsent => {
                    if let Some(slot) = self.pages.get(index) {
                        slot.wait_while(LOCKED | FILLING);
                    }
                }
                Fill::BeyondEof => break,
                Fill::CacheFull => unreachable!("a read falls back to an uncached fill"),
            }
        }
        Ok(done)
    }

    /// A read reached the readahead mark at `index`: hands the next window to
    /// the cache's readahead threads.
    fn read_ahead_from(&self, index: u64) {
        let eof_pages = self.len().div_ceil(PAGE);
        let threads = self.cache.readahead.is_served();
        if let Some((first, pages)) = self.readahead.take_mark(index, eof_pages, threads) {
            self.cache.readahead.submit(self.id, first, pages);
        }
    }

    /// Reads the window of `pages` pages from `first` into the cache, for the
    /// readahead threads: the absent pages from `first` on, as far as the budget
    /// allows without evicting more than a miss would. Errors are dropped: the
    /// pages stay absent, and the read that needs them fills them itself and
    /// reports the error.
    pub(super) fn fill_ahead(&self, first: u64, pages: u64) {
        if self.check_live().is_err() {
            return;
        }
        if let Ok(read) = self.fill_absent(first, first + pages - 1, MAX_WINDOW_PAGES) {
            stats::add(&self.cache.counters.readahead_pages, read);
            stats::add(&self.cache.counters.readahead_thread_pages, read);
        }
    }

    /// The hit path: copies from the stored page if it is up to date, validating
    /// the copy against the state word. Takes no lock and writes nothing shared.
    #[inline]
    fn read_hit(&self, slot: &Slot, index: u64, in_page: usize, dst: &mut [u8]) -> bool {
        // A few retries ride out a writer that changed the page mid-copy.
        for _ in 0..4 {
            let before = slot.load();
            if !before.is_readable() {
                return false;
            }
            self.store.read(index, in_page, dst);
            // Orders the copy before the re-check (the seqlock read side).
            fence(Ordering::Acquire);
            let after = slot.load();
            if before.same_contents(after) {
                slot.mark_referenced(after);
                self.cache.counters.hits.add();
                return true;
            }
        }
        false
    }

    /// A hit, by [`Mapping::read_hit_locked`] if the caller holds a coherence
    /// mode, else by [`Mapping::read_hit`].
    #[inline]
    fn hit(&self, slot: &Slot, index: u64, in_page: usize, dst: &mut [u8], locked: bool) -> bool {
        if locked {
            self.read_hit_locked(slot, index, in_page, dst)
        } else {
            self.read_hit(slot, index, in_page, dst)
        }
    }

    /// The hit path of a reader that holds a coherence mode (whole reads under
    /// `file-exclusive`): copies the page under its page lock. An optimistic
    /// copy could touch a page an eviction just punched from the memfd, and
    /// the fault would need Fill from the handler thread, which a queued
    /// exclusive request would hold back behind the mode this reader holds.
    /// Eviction skips locked pages, so a locked copy never faults.
    fn read_hit_locked(&self, slot: &Slot, index: u64, in_page: usize, dst: &mut [u8]) -> bool {
        loop {
            let state = slot.load();
            if !state.is_readable() {
                return false;
            }
            if slot.try_lock(state).is_ok() {
                self.store.read(index, in_page, dst);
                slot.update(|s| s.transition(REFERENCED, LOCKED, false));
                self.cache.counters.hits.add();
                return true;
            }
        }
    }

    /// Reads up to `want` absent pages from `index` from the backend into the
    /// cache; the caller holds Fill for them and keeps holding it. `budget` says
    /// what to do when the budget is used up.
    fn fill_locked(&self, index: u64, want: u64, budget: FillBudget) -> io::Result<Fill> {
        self.fill(index, want, budget, None)
    }

    /// Reads up to `want` absent pages from `index` from the backend into the
    /// cache. Fill for them is held by `fill` if it is given (and then let go
    /// once the pages are claimed), else by the caller.
    ///
    /// Fill is needed only to claim pages (`FILLING`): the backend read and the
    /// install run under the claims, as the kernel reads a folio it added to
    /// the page cache locked, after letting go of `invalidate_lock`. Every path
    /// that changes the backend under a range first waits for the claims there
    /// to end ([`Mapping::settle_fills`], or dropping the pages), which it can do
    /// because it holds a mode that keeps new claims out; so the data a claim
    /// reads is the backend's data at some moment the claim was held. Once the
    /// data is in, the fill locks exactly the claimed state, installs the page
    /// and publishes it; a claim that changed meanwhile (the generation check,
    /// a second guard) is not installed, and its data is not returned.
    fn fill(
        &self,
        index: u64,
        want: u64,
        budget: FillBudget,
        fill: Option<CoherenceGuard<'_>>,
    ) -> io::Result<Fill> {
        let claimed = match self.claim_pages(index, want, budget) {
            Claim::Pages(claimed) => claimed,
            Claim::Uncached => {
                // The budget is used up: serve this page uncached, still under Fill,
                // as nothing else keeps an invalidation from running under the read.
                let mut data = FillBuf::take(PAGE_SIZE);
                self.backend.read_pages(index, &mut data)?;
                drop(fill);
                return Ok(Fill::Read {
                    pages: 1,
                    current: 1,
                    data,
                });
            }
            Claim::Nothing(outcome) => return Ok(outcome),
        };
        drop(fill);
        self.read_claimed(index, &claimed)
    }

    /// Claims up to `want` absent pages from `index`, each with its share of
    /// the budget. The caller holds Fill.
    fn claim_pages(&self, index: u64, want: u64, budget: FillBudget) -> Claim {
        let eof_pages = self.len().div_ceil(PAGE);
        if index >= eof_pages {
            return Claim::Nothing(Fill::BeyondEof);
        }
        // A fill takes at most a quarter of the budget, so that a batch or a
        // window never evicts the pages the rest of the cache is working on.
        let most = (self.cache.budget.capacity() / 4).clamp(1, MAX_WINDOW_PAGES);
        let want = want.min(eof_pages - index).clamp(1, most);
        let mut claimed: Vec<PageState> = Vec::with_capacity(want as usize);
        for i in 0..want {
            let slot = self.pages.get_or_create(index + i);
            if !slot.load().is_absent() {
                break;
            }
            let need = match budget {
                FillBudget::Force if i == 0 => Need::Required,
                FillBudget::Wait if i == 0 => Need::Wait,
                _ => Need::Optional,
            };
            if !self.cache.acquire(need) {
                break;
            }
            // The state is loaded again: the reclaim that made room may have
            // changed it (the eviction hand unqueues absent pages), and a
            // change of flags alone is no reason to give the claim up.
            match slot.claim_absent(FILLING) {
                Some(filling) => claimed.push(filling),
                None => {
                    self.cache.budget.release();
                    break;
                }
            }
        }
        if !claimed.is_empty() {
            return Claim::Pages(claimed);
        }
        let first = self.pages.get_or_create(index).load();
        if !first.is_absent() {
            Claim::Nothing(Fill::NotAbsent)
        } else if budget != FillBudget::Uncached {
            Claim::Nothing(Fill::CacheFull)
        } else {
            Claim::Uncached
        }
    }

    /// Reads the pages `claimed` from `index` from the backend, then locks each
    /// claim that is still what it was, installs runs of them and publishes
    /// them. A claim that changed gives its budget back.
    fn read_claimed(&self, index: u64, claimed: &[PageState]) -> io::Result<Fill> {
        let mut data = FillBuf::take(claimed.len() * PAGE_SIZE);
        schedule::point();
        let started = Instant::now();
        let read = self.backend.read_pages(index, &mut data);
        let read_time = started.elapsed();
        schedule::point();
        // Lock every claim that survived; an emptied claim gives its budget back.
        let mut locked = Vec::with_capacity(claimed.len());
        for (i, &filling) in claimed.iter().enumerate() {
            let slot = self.pages.get_or_create(index + i as u64);
            let survived = read.is_ok()
                && slot
                    .replace(filling, filling.transition(LOCKED, 0, false))
                    .is_ok();
            if survived {
                locked.push(i);
            } else {
                // Nothing was read, or an invalidation took the page while we read.
                // Give the claim back if it is still ours, whatever flags it gained.
                slot.update(|s| {
                    if filling.is_same_claim(s) {
                        s.emptied()
                    } else {
                        s
                    }
                });
                self.cache.budget.release();
            }
        }
        // The data of the leading pages whose claims held is the backend's.
        let current = locked
            .iter()
            .enumerate()
            .take_while(|&(n, &i)| n == i)
            .count() as u64;
        // Install runs of consecutive locked pages, one copy each, then publish.
        let mut installed_all = Ok(());
        let started = Instant::now();
        for run in locked.chunk_by(|a, b| *b == *a + 1) {
            let first = run[0];
            let bytes = &data[first * PAGE_SIZE..(first + run.len()) * PAGE_SIZE];
            let installed = match self.store.install(index + first as u64, bytes) {
                Ok(()) => true,
                Err(error) => {
                    installed_all = installed_all.and(Err(error));
                    false
                }
            };
            // Last page first: a reader waiting for the first page of the run
            // (it overtook the readahead threads) wakes once, to a run it can read
            // whole, not once per page.
            for &i in run.iter().rev() {
                let slot = self.pages.get_or_create(index + i as u64);
                if installed {
                    self.publish(index + i as u64, slot, PRESENT | UPTODATE, FILLING | LOCKED);
                    stats::add(&self.cache.counters.fills, 1);
                } else {
                    slot.update(PageState::emptied);
                    self.cache.budget.release();
                }
            }
        }
        if read.is_ok() {
            self.readahead
                .observe(claimed.len() as u64, read_time, started.elapsed());
        }
        read?;
        installed_all?;
        Ok(Fill::Read {
            pages: claimed.len() as u64,
            current,
            data,
        })
    }

    /// Waits until no fill claims a page of `first..=last`. The caller holds a
    /// mode that keeps new claims out (Invalidate, or Direct), and calls this
    /// before it changes the backend there: a fill that claimed a page before
    /// then reads the backend as it was.
    fn settle_fills(&self, first: u64, last: u64) {
        self.pages.for_each(first, last, |_, slot| {
            slot.wait_while(FILLING);
        });
    }

    /// Writes `src` into page `index` at `in_page`, the caller holding Fill.
    /// `old_size` is the size before this write: absent pages past it are zeroes
    /// and need no read.
    ///
    /// The file grows to cover the bytes while the page is locked and before they
    /// land, as the kernel's `write_end` does: a dirty page is never past the end
    /// of file (writeback skips those), and a failure leaves the size alone. A
    /// new page is built aside and installed whole, so no map ever sees it half
    /// written.
    fn write_page(&self, index: u64, in_page: usize, src: &[u8], old_size: u64) -> io::Result<()> {
        let whole = src.len() == PAGE_SIZE;
        let end = index * PAGE + (in_page + src.len()) as u64;
        let mut zeroes_below = index * PAGE >= old_size;
        let slot = self.pages.get_or_create(index);
        loop {
            let state = slot.load();
            if state.has(LOCKED | FILLING) {
                slot.wait_while(LOCKED | FILLING);
                continue;
            }
            if state.has(PRESENT) {
                if slot.try_lock(state).is_err() {
                    continue;
                }
                if let Err(error) = self.extend_size(end) {
                    slot.update(|s| s.transition(0, LOCKED, false));
                    return Err(error);
                }
                return self.write_locked_page(index, slot, in_page, src);
            }
            if !whole && !zeroes_below {
                // A partial write into data we do not have: read the page first.
                match self.fill_locked(index, 1, FillBudget::Wait)? {
                    Fill::BeyondEof => zeroes_below = true,
                    Fill::CacheFull => return Err(self.cache_full()),
                    Fill::Read { .. } | Fill::NotAbsent => {}
                }
                continue;
            }
            if !self.cache.acquire(Need::Wait) {
                return Err(self.cache_full());
            }
            if slot.replace(state, state.with_flags(LOCKED)).is_err() {
                self.cache.budget.release();
                continue;
            }
            let mut page = vec![0; PAGE_SIZE];
            page[in_page..in_page + src.len()].copy_from_slice(src);
            let installed = self
                .extend_size(end)
                .and_then(|()| self.store.install(index, &page));
            if let Err(error) = installed {
                slot.update(PageState::emptied);
                self.cache.budget.release();
                return Err(error);
            }
            self.publish(index, slot, PRESENT | UPTODATE | DIRTY, LOCKED);
            self.cache.dirtied();
            return Ok(());
        }
    }

    /// Writes `src` at `in_page` into cached page `index`, which the caller
    /// locked, and unlocks it dirty.
    fn write_locked_page(
        &self,
        index: u64,
        slot: &Slot,
        in_page: usize,
        src: &[u8],
    ) -> io::Result<()> {
        self.cache.dirtied();
        if !self.page_is_mapped(index) {
            self.store.write(index, in_page, src);
            slot.update(|s| s.transition(DIRTY, LOCKED, true));
            return Ok(());
        }
        // A map shows this page: replace it whole, so that no map reader sees
        // the write half done, with the stores made through maps so far and none
        // lost in between.
        self.trap_stores(&[index]);
        let mut page = vec![0; PAGE_SIZE];
        self.store.read(index, 0, &mut page);
        page[in_page..in_page + src.len()].copy_from_slice(src);
        self.replace_locked_page(index, slot, &page)
    }

    /// Removes the cache's copy of the bytes `start..end` before the backend
    /// changes them: pages wholly inside are dropped, the covered part of partial
    /// pages at the edges is zeroed. Dirty data of the range is discarded.
    fn remove_cached_bytes(&self, start: u64, end: u64) {
        let (head, tail) = (start / PAGE, end / PAGE);
        let head_offset = (start % PAGE) as usize;
        let tail_offset = (end % PAGE) as usize;
        if head == tail {
            self.zero_cached(head, head_offset, tail_offset);
            return;
        }
        if head_offset != 0 {
            self.zero_cached(head, head_offset, PAGE_SIZE);
        }
        if tail_offset != 0 {
            self.zero_cached(tail, 0, tail_offset);
        }
        let first_whole = start.div_ceil(PAGE);
        if first_whole < tail {
            // Discarding cannot fail: no backend write is involved.
            let _ = self.drop_pages(first_whole, tail - 1, DirtyPages::Discard);
        }
    }

    /// Zeroes bytes `from..to` of page `index` if it is cached.
    fn zero_cached(&self, index: u64, from: usize, to: usize) {
        if from >= to {
            return;
        }
        let Some(slot) = self.pages.get(index) else {
            return;
        };
        if self.lock_for_change(slot).is_some() {
            self.store.zero(index, from, to - from);
            slot.update(|s| s.transition(0, LOCKED, true));
        }
    }

    /// Drops pages `first..=last` from the cache. Pages being filled are taken
    /// from their fill; pages locked or under writeback are waited for. The
    /// pages are locked, removed from the store with one punch (which zaps them
    /// from every map), then emptied: a fault that races the drop waits for the
    /// lock and then fills afresh.
    fn drop_pages(&self, first: u64, last: u64, dirty: DirtyPages) -> io::Result<()> {
        self.drop_pages_where(first, last, dirty, |_| true)
    }

    /// [`Mapping::drop_pages`] for the pages `chosen` picks; the others stay.
    fn drop_pages_where(
        &self,
        first: u64,
        last: u64,
        dirty: DirtyPages,
        chosen: impl Fn(u64) -> bool,
    ) -> io::Result<()> {
        if dirty == DirtyPages::WriteBack {
            self.scan_maps(first, last);
        }
        let mut first_error = None;
        let mut locked = Vec::new();
        self.pages.for_each(first, last, |index, slot| {
            if !chosen(index) {
                return;
            }
            match self.lock_for_drop(index, slot, dirty) {
                Ok(true) => locked.push(index),
                Ok(false) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        });
        if dirty == DirtyPages::WriteBack && !locked.is_empty() {
            // Stores through maps that landed after the scan above: hold further
            // ones back and write these back before the punch. A page that fails
            // stays cached, dirty.
            self.trap_stores(&locked);
            locked.retain(|&index| {
                let slot = self.pages.get(index).expect("locked slots exist");
                match self.write_back_locked(index, slot) {
                    Ok(()) => true,
                    Err(error) => {
                        slot.update(|s| s.transition(0, LOCKED, false));
                        first_error.get_or_insert(error);
                        false
                    }
                }
            });
        }
        schedule::point();
        // One punch per run of consecutive locked pages: never over a page this
        // call did not lock (one filled meanwhile would lose its data while its
        // state still says present).
        for run in locked.chunk_by(|a, b| *b == *a + 1) {
            let removed = self.store.remove(run[0], run.len() as u64);
            for &index in run {
                let slot = self.pages.get(index).expect("locked slots exist");
                if removed.is_ok() {
                    slot.update(PageState::emptied);
                    self.cache.budget.release();
                } else {
                    slot.update(|s| s.transition(0, LOCKED, false));
                }
            }
            if let Err(error) = removed {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Locks page `index` for dropping, writing it back first if `dirty` says
    /// so. Returns whether a present page is now locked. A page being filled is
    /// waited for, as the kernel waits for a locked folio: the fill read the
    /// backend as it was, and the page it installs is dropped here.
    fn lock_for_drop(&self, index: u64, slot: &Slot, dirty: DirtyPages) -> io::Result<bool> {
        loop {
            let state = slot.load();
            if state.is_absent() {
                return Ok(false);
            }
            if state.has(LOCKED | FILLING | WRITEBACK) {
                slot.wait_while(LOCKED | FILLING | WRITEBACK);
                continue;
            }
            if state.has(DIRTY) && dirty == DirtyPages::WriteBack {
                self.write_back_page(index, slot)?;
                continue;
            }
            if slot.try_lock(state).is_ok() {
                return Ok(true);
            }
        }
    }

    /// Writes back the dirty pages of `first..=last` (stores through maps
    /// included) and waits for writeback already under way there. Returns the
    /// first error; failed pages stay dirty.
    fn write_back_range(&self, first: u64, last: u64) -> io::Result<()> {
        self.scan_maps(first, last);
        let mut first_error = None;
        self.pages.for_each(first, last, |index, slot| {
            let written = self.write_back_page(index, slot);
            slot.wait_while(WRITEBACK);
            if let Err(error) = written {
                first_error.get_or_insert(error);
            }
        });
        first_error.map_or(Ok(()), Err)
    }

    /// Writes page `index` to the backend if it is dirty.
    fn write_back_page(&self, index: u64, slot: &Slot) -> io::Result<()> {
        loop {
            let state = slot.load();
            if !state.has(DIRTY) {
                return Ok(());
            }
            // One writeback at a time per page, so an older snapshot never lands
            // after a newer one.
            if state.has(LOCKED | WRITEBACK) {
                slot.wait_while(LOCKED | WRITEBACK);
                continue;
            }
            if slot.try_lock(state).is_err() {
                continue;
            }
            let mut data = vec![0; PAGE_SIZE];
            self.store.read(index, 0, &mut data);
            slot.update(|s| s.transition(WRITEBACK, LOCKED | DIRTY, false));
            schedule::point();
            let written = self.write_snapshot(index, &data);
            let failed = written.is_err();
            slot.update(|s| {
                if failed {
                    s.transition(DIRTY, WRITEBACK, false)
                } else {
                    s.transition(0, WRITEBACK, false)
                }
            });
            return written;
        }
    }

    /// Writes page `index`, which the caller locked, to the backend if it is
    /// dirty, and marks it clean.
    fn write_back_locked(&self, index: u64, slot: &Slot) -> io::Result<()> {
        if !slot.load().has(DIRTY) {
            return Ok(());
        }
        let mut data = vec![0; PAGE_SIZE];
        self.store.read(index, 0, &mut data);
        self.write_snapshot(index, &data)?;
        slot.update(|s| s.transition(0, DIRTY, false));
        Ok(())
    }

    /// Writes `snapshot`, the bytes of page `index`, to the backend, unless the
    /// page lies at or past the end of file (it has nothing to write back). A
    /// write is counted; a failure is recorded for every handle's next sync.
    fn write_snapshot(&self, index: u64, snapshot: &[u8]) -> io::Result<()> {
        if index * PAGE >= self.len() {
            return Ok(());
        }
        match self.backend.write_pages(index, snapshot) {
            Ok(()) => {
                stats::add(&self.cache.counters.writebacks, 1);
                Ok(())
            }
            Err(error) => {
                self.record_wb_error(&error);
                Err(error)
            }
        }
    }

    fn cache_full(&self) -> io::Error {
        with_message(
            libc::ENOMEM,
            format!(
                "page cache budget of {} bytes is used up by dirty pages whose writeback fails",
                self.cache.budget.capacity() * PAGE
            ),
        )
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Dropping the mapping drops its pages: write back what is dirty (call
        // `sync_all` first to see errors), give the budget back, stop the handler.
        self.cache.unregister(self.id);
        if *self.removed.get_mut() {
            let _ = self.release_storage();
        } else {
            let _ = self.write_back_range(0, MAX_PAGES - 1);
        }
        let _ = self.drop_pages(0, MAX_PAGES - 1, DirtyPages::Discard);
        if let Some(mut handler) = self.handler.get_mut().take() {
            handler.stop();
        }
    }
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("backend", &self.backend)
            .field("len", &self.len())
            .field("strategy", &self.strategy())
            .finish_non_exhaustive()
    }
}

/// Runs `copy` into `dst` under the read mode `read` and returns what it
/// copied. A buffer in a map of a locked read is filled only after the lock is
/// gone: a fault on it under the lock could wait for a queued Invalidate that
/// waits for us. So `copy` then fills a bounce buffer, copied out afterwards.
fn copy_out_under(
    read: CoherenceGuard<'_>,
    dst: &mut [u8],
    copy: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    if !(read.is_locking() && buffer_in_a_map(dst.as_ptr(), dst.len())) {
        return copy(dst);
    }
    let mut bounce = vec![0; dst.len()];
    let n = copy(&mut bounce)?;
    drop(read);
    dst[..n].copy_from_slice(&bounce[..n]);
    Ok(n)
}

/// The error of a `_nowait` call that would have to wait.
fn would_block<T>() -> io::Result<T> {
    Err(with_message(
        libc::EAGAIN,
        "the call would wait for a lock, a busy page or a backend read",
    ))
}

/// The largest byte offset a call takes: a file offset (`loff_t`) is signed.
const MAX_OFFSET: u64 = i64::MAX as u64;

/// `offset + len`, or `EINVAL` if the range reaches past [`MAX_OFFSET`], as
/// the kernel's `rw_verify_area` answers a read or write.
fn end_of(offset: u64, len: impl TryInto<u64>) -> io::Result<u64> {
    len.try_into()
        .ok()
        .and_then(|len| offset.checked_add(len))
        .filter(|&end| end <= MAX_OFFSET)
        .ok_or_else(|| err(libc::EINVAL))
}

/// `EINVAL` unless a direct I/O of `len` bytes at `offset` from `address` is
/// aligned: filemap's rule (offsets and lengths in whole pages, buffers at
/// [`DIRECT_IO_MEMORY_ALIGN`]) is stricter than the kernel's, which asks only
/// for the device's logical block size.
fn check_direct_alignment(offset: u64, len: usize, address: usize) -> io::Result<()> {
    if offset % PAGE != 0 || len % PAGE_SIZE != 0 || address % DIRECT_IO_MEMORY_ALIGN != 0 {
        return fail(libc::EINVAL);
    }
    Ok(())
}
