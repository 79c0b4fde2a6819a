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
//!
//! One file per job, each adding its methods to [`Mapping`], which this file
//! defines with the few calls every job needs:
//!
//! | file | job |
//! |---|---|
//! | `read.rs` | reads: the hit path, misses, `_nowait` reads |
//! | `fill.rs` | fills: claiming absent pages, reading and publishing them; readahead |
//! | `write.rs` | buffered writes |
//! | `vectored.rs` | the buffers of vectored reads and writes, a page at a time |
//! | `writeback.rs` | writeback, syncs and the errseq cursor of [`FileHandle`](crate::FileHandle) |
//! | `drop.rs` | dropping pages: invalidation's first half, eviction |
//! | `invalidate.rs` | punch, zero, truncate, collapse, insert, `invalidate_range` |
//! | `direct.rs` | direct I/O |
//! | `stores.rs` | stores through read-write maps: tracking and holding them back |
//! | `fault.rs` | serving page faults |
//! | `region.rs` | [`MapRegion`](crate::MapRegion): the user's memory maps |
//! | `open.rs` | opening, removing and dropping a mapping |
//! | `closed.rs` | files by identity: one mapping per open file, the pages of closed ones |
//! | `ext.rs` | `std::os::unix::fs::FileExt` |

use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use crate::sync::{Mutex, RwLock};

use self::closed::OpenFiles;
use super::page::Slot;
use super::readahead::Readahead;
use super::shared::{CacheShared, Need};
use super::stats::{self, mode_slot};
use super::store::PageStore;
use super::tree::{PageTree, MAX_PAGES};
use crate::backend::Backend;
use crate::errno::{err, fail, with_message};
use crate::lock::{CoherenceGuard, CoherenceLock, Mode, Strategy};
use crate::map::uffd::Userfaultfd;
use crate::page::{index_of, PAGE, PAGE_SIZE};

pub(super) mod closed;
pub(super) mod direct;
mod drop;
mod ext;
mod fault;
mod fill;
mod invalidate;
mod open;
pub(super) mod pin;
pub(super) mod pin_range;
mod read;
pub(super) mod region;
mod seek;
mod stores;
mod vectored;
mod write;
pub(super) mod writeback;

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
/// nothing. Read it with `raw_os_error()`, or with [`crate::errno()`] for the
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
/// whole pages and a buffer at [`DIRECT_IO_MEMORY_ALIGN`](crate::cache::DIRECT_IO_MEMORY_ALIGN) (the kernel asks only
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
    /// The `file` of the backend's identity, if it has one; then the mapping
    /// is entered in `files`.
    file: Option<u128>,
    files: Arc<OpenFiles>,
    pages: PageTree,
    /// Where the pages live: the mapping's regions of the cache's arena.
    store: PageStore,
    /// The user's maps of this file, for faults and dirty scans.
    maps: RwLock<Vec<UserView>>,
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
    /// Pages of the budget this mapping holds: one per page present, claimed
    /// or being created. At 0, with no map, the store gives its regions back.
    held: AtomicU64,
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
        Some(index_of(self.offset + at as u64))
    }

    /// The part of pages `first..=last` this view shows: its first and last
    /// page, and its address range.
    fn span(&self, first: u64, last: u64) -> Option<(u64, u64, usize, usize)> {
        let view_first = index_of(self.offset);
        let view_last = view_first + (self.len / PAGE_SIZE) as u64 - 1;
        let (first, last) = (first.max(view_first), last.min(view_last));
        if first > last {
            return None;
        }
        let addr = self.addr + ((first - view_first) * PAGE) as usize;
        Some((first, last, addr, ((last - first + 1) * PAGE) as usize))
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

impl Mapping {
    /// Takes `mode` over `range`, counting a wait if someone holds it in a
    /// conflicting way.
    fn lock_mode(&self, mode: Mode, range: std::ops::Range<u64>) -> CoherenceGuard<'_> {
        if let Some(guard) = self.lock.try_lock(mode, range.clone()) {
            return guard;
        }
        stats::add(&self.cache.counters.lock_waits[mode_slot(mode)], 1);
        self.lock.lock(mode, range)
    }

    /// The cache's userfaultfd, for the work of maps (serving faults,
    /// trapping stores): it exists once any file of the cache was mapped.
    fn uffd(&self) -> &Arc<Userfaultfd> {
        self.cache
            .faults
            .uffd()
            .expect("maps exist only once the cache has a userfaultfd")
    }

    /// Publishes page `index`, whose slot the caller holds locked (and
    /// perhaps claimed for a fill), as present and up to date (and `dirty`),
    /// and gives it its eviction queue entry if it has none.
    fn publish(&self, index: u64, slot: &Slot, dirty: bool) {
        let before = slot.publish(dirty);
        if !before.is_queued() {
            self.cache.enqueue(self.id, index);
        }
    }

    /// Takes one page of the cache's budget for this mapping (see
    /// [`CacheShared::acquire`]).
    fn take_page(&self, need: Need) -> bool {
        let taken = self.cache.acquire(need);
        if taken {
            self.held.fetch_add(1, Ordering::AcqRel);
        }
        taken
    }

    /// Gives back a page [`Mapping::take_page`] took, whose slot is absent
    /// again; the last one gives the store's regions back if no map exists.
    fn give_page(&self) {
        self.cache.budget.release();
        if self.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release_store_if_idle();
        }
    }

    /// Gives the store's regions back if the mapping holds no page and no map.
    pub(super) fn release_store_if_idle(&self) {
        self.store.release_if_empty(|| {
            self.held.load(Ordering::Acquire) == 0 && self.maps.read().is_empty()
        });
    }

    /// Bytes of this mapping's page index.
    pub(super) fn index_bytes(&self) -> usize {
        self.pages.allocated_bytes()
    }

    /// How many of this mapping's pages are dirty (walks the page index).
    pub(super) fn dirty_pages(&self) -> u64 {
        let mut dirty = 0;
        self.pages.for_each(0, MAX_PAGES - 1, |_, slot| {
            dirty += u64::from(slot.load().is_dirty());
        });
        dirty
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
            .is_some_and(|slot| slot.load().is_uptodate())
    }

    /// How many pages of this file are cached, and how many of those are dirty.
    pub fn cached_pages(&self) -> (u64, u64) {
        let (mut cached, mut dirty) = (0, 0);
        self.pages.for_each(0, MAX_PAGES - 1, |_, slot| {
            let state = slot.load();
            cached += state.is_uptodate() as u64;
            dirty += state.is_dirty() as u64;
        });
        (cached, dirty)
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

    /// The argument checks of a read of `len` bytes at `offset`: the end of
    /// the range and how many of its bytes lie before the end of file, or
    /// `None` if none do.
    fn check_read(&self, len: usize, offset: u64) -> io::Result<Option<(u64, usize)>> {
        self.check_live()?;
        let end = end_of(offset, len)?;
        let size = self.len();
        if offset >= size {
            return Ok(None);
        }
        Ok(Some((end, (end.min(size) - offset) as usize)))
    }

    /// Runs `change`, which changes the bytes of `range`, between the
    /// listener's calls; an empty range changes nothing and is not told.
    /// Fails with `EDEADLK` if the caller holds a pin of a page of `range`.
    fn changing<R>(
        &self,
        range: Range<u64>,
        change: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        // A change waits for the pins of its pages: never for the caller's.
        if !range.is_empty() {
            self.check_own_pins(index_of(range.start)..index_of(range.end - 1) + 1, false)?;
        }
        let Some(listener) = self.cache.listener.0.as_ref().filter(|_| !range.is_empty()) else {
            return change();
        };
        listener.before_change(self, range.clone());
        let done = change();
        listener.after_change(self, range);
        done
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
