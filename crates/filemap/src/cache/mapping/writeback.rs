//! Writeback: dirty pages to the backend, syncs, and the errseq cursor that
//! reports a writeback error to every [`FileHandle`] once.

use crate::sync::atomic::{AtomicU64, Ordering};
use std::fmt;
use std::io;
use std::sync::Arc;

use super::{end_of, Mapping};
use crate::cache::page::{PageState, Slot, MAX_PINS};
use crate::cache::stats;
use crate::cache::tree::MAX_PAGES;
use crate::page::{index_of, start_of, PAGE_SIZE};
use crate::schedule;

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
/// use filemap::backend::BackendOp;
/// use filemap::{FaultyBackend, MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let backend = Arc::new(FaultyBackend::new(Arc::new(volume.create_file("db")?), 1));
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(backend.clone())?;
/// let (wal, checkpointer) = (file.handle(), file.handle());
/// backend.fail_nth(BackendOp::WritePages, 1, libc::EIO); // the next writeback fails
/// wal.write_all_at(b"record", 0)?;
/// let error = wal.sync_all().unwrap_err();
/// assert_eq!(error.raw_os_error(), Some(libc::EIO));
/// // The checkpointer learns of the failure too, once, though it wrote nothing...
/// let error = checkpointer.sync_all().unwrap_err();
/// assert_eq!(error.raw_os_error(), Some(libc::EIO));
/// checkpointer.sync_all()?;
/// // ...and the page stayed dirty: the next sync writes it back.
/// wal.sync_all()?;
/// assert_eq!(file.cached_pages(), (1, 0)); // one page cached, none dirty
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

impl Mapping {
    /// Background writeback of every dirty page; failures are recorded for the
    /// next syncs (see [`FileHandle`]).
    pub(super) fn write_back_in_background(&self) {
        if !self.removed.load(Ordering::Acquire) {
            let _ = self.write_back_range(0, MAX_PAGES - 1);
        }
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
            None => self
                .check_own_pins(0..MAX_PAGES, true)
                .and_then(|()| self.write_back_range(0, MAX_PAGES - 1)),
            Some((offset, len)) => {
                let end = end_of(offset, len)?;
                if len > 0 {
                    // Writeback waits for write pins (a read pin it shares).
                    self.check_own_pins(index_of(offset)..index_of(end - 1) + 1, true)?;
                    self.write_back_range(index_of(offset), index_of(end - 1))
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

    /// Writes back the dirty pages of `first..=last` (stores through maps
    /// included) and waits for writeback already under way there. Returns the
    /// first error; failed pages stay dirty.
    pub(super) fn write_back_range(&self, first: u64, last: u64) -> io::Result<()> {
        self.scan_maps(first, last);
        let mut first_error = None;
        self.pages.for_each(first, last, |index, slot| {
            let state = slot.load();
            if !state.is_dirty() && !state.is_under_writeback() {
                return;
            }
            let written = self.write_back_page(index, slot);
            slot.wait_while_state(PageState::is_under_writeback);
            if let Err(error) = written {
                first_error.get_or_insert(error);
            }
        });
        first_error.map_or(Ok(()), Err)
    }

    /// Writes page `index` to the backend if it is dirty.
    pub(super) fn write_back_page(&self, index: u64, slot: &Slot) -> io::Result<()> {
        loop {
            let state = slot.load();
            if !state.is_dirty() {
                return Ok(());
            }
            // One writeback at a time per page, so an older snapshot never lands
            // after a newer one.
            if state.is_locked() || state.is_under_writeback() {
                slot.wait_while_state(|s| s.is_locked() || s.is_under_writeback());
                continue;
            }
            // A pin keeps the bytes steady for the snapshot, as the page lock
            // would, without holding up hits or the user's pins.
            let brief = self.cache.brief_pins.hold();
            if slot.try_pin(state).is_err() {
                drop(brief);
                if state.pins() == MAX_PINS {
                    std::thread::yield_now();
                }
                continue;
            }
            let mut data = vec![0; PAGE_SIZE];
            self.store.read(index, 0, &mut data);
            let snapshot = slot.finish_pinned_snapshot();
            drop(brief);
            if !snapshot {
                // Cleaned or under another writeback meanwhile: look again.
                continue;
            }
            schedule::point();
            let written = self.write_snapshot(index, &data);
            let failed = written.is_err();
            slot.end_writeback(failed);
            return written;
        }
    }

    /// Writes page `index`, which the caller locked, to the backend if it is
    /// dirty, and marks it clean.
    pub(super) fn write_back_locked(&self, index: u64, slot: &Slot) -> io::Result<()> {
        if !slot.load().is_dirty() {
            return Ok(());
        }
        let mut data = vec![0; PAGE_SIZE];
        self.store.read(index, 0, &mut data);
        self.write_snapshot(index, &data)?;
        slot.mark_clean();
        Ok(())
    }

    /// Writes `snapshot`, the bytes of page `index`, to the backend, unless the
    /// page lies at or past the end of file (it has nothing to write back). A
    /// write is counted; a failure is recorded for every handle's next sync.
    fn write_snapshot(&self, index: u64, snapshot: &[u8]) -> io::Result<()> {
        if start_of(index) >= self.len() {
            return Ok(());
        }
        match self.backend.write_back_pages(index, snapshot) {
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
}
