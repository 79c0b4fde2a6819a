//! Reads: the hit path (no lock, no shared write), misses that fill, and
//! reads that never wait.

use std::io::{self, IoSliceMut};

use super::fill::{Fill, FillBudget};
use super::region::buffer_in_a_map;
use super::vectored::{total_len, Destination, Scatter};
use super::{would_block, Mapping};
use crate::cache::page::{OptimisticRead, PageState, Slot, MAX_PINS};
use crate::cache::readahead::MissFill;
use crate::cache::stats;
use crate::lock::{CoherenceGuard, Mode};
use crate::page::{index_of, offset_in_page, start_of, PAGE_SIZE};
use crate::schedule;

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

impl Mapping {
    /// A plain `memcpy` of cached page `index` into `dst`, with no validation:
    /// the baseline that benchmarks compare the hit path with. Returns whether
    /// the page was present.
    ///
    /// # Safety
    /// Nothing may change this cache's pages during the call: no write, fill,
    /// invalidation or writeback on any mapping of the cache.
    #[cfg(feature = "bench")]
    #[doc(hidden)]
    #[allow(unsafe_code)]
    pub unsafe fn memcpy_cached_page(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) -> bool {
        if !self
            .pages
            .get(index)
            .is_some_and(|slot| slot.load().is_present())
        {
            return false;
        }
        // SAFETY: the page is present, and the caller guarantees that nothing
        // changes it during the call: `memcpy_page`'s contract.
        unsafe { self.store.memcpy_page(index, dst) };
        true
    }

    /// A copy of cached page `index` into `dst` with `copy`, with no lookup
    /// past the page's slot and no validation: what the hit path's copy alone
    /// costs, for the benchmarks' `copy-limit`. Returns whether the page was
    /// present (and `copy` available). Racing changes leave a torn copy.
    #[cfg(feature = "bench")]
    #[doc(hidden)]
    pub fn racy_copy_cached_page(
        &self,
        copy: crate::racy::RacyCopy,
        index: u64,
        dst: &mut [u8; PAGE_SIZE],
    ) -> bool {
        if !copy.is_available()
            || !self
                .pages
                .get(index)
                .is_some_and(|slot| slot.load().is_present())
        {
            return false;
        }
        self.store.read_with(copy, index, 0, dst);
        true
    }

    /// Reads up to `buf.len()` bytes at `offset`, like `pread`: returns how many,
    /// fewer only at the end of file (0 at or past it).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some((end, len)) = self.check_read(buf.len(), offset)? else {
            return Ok(0);
        };
        // Only `file-exclusive` locks whole reads; it then covers their fills too.
        let read = self.lock_mode(Mode::Read, offset..end);
        let fill_held = read.is_locking();
        copy_out_under(read, &mut buf[..len], |dst| {
            self.read_cached(dst, offset, fill_held)
        })
    }

    /// Reads into `bufs` in turn from `offset` on, like `preadv`: returns the
    /// bytes read, fewer than the buffers hold only at the end of file. The
    /// whole call takes the coherence mode a read needs once, not once per
    /// buffer; each page is copied in one step as by [`Mapping::read_at`],
    /// also one whose bytes the caller's buffers split (it is read whole into
    /// a page aside first), so no buffer holds half of one version of
    /// a page and half of another.
    ///
    /// ```
    /// use std::io::IoSliceMut;
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("rows")?))?;
    /// file.write_all_at(b"headerrow 1row 2", 0)?;
    /// let (mut header, mut rows) = ([0u8; 6], [0u8; 16]);
    /// let mut bufs = [IoSliceMut::new(&mut header), IoSliceMut::new(&mut rows)];
    /// assert_eq!(file.read_vectored_at(&mut bufs, 0)?, 16); // the end of file
    /// assert_eq!(&header, b"header");
    /// assert_eq!(&rows[..10], b"row 1row 2");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        let total = total_len(bufs.iter().map(|buf| buf.len()))?;
        let Some((end, len)) = self.check_read(total, offset)? else {
            return Ok(0);
        };
        let read = self.lock_mode(Mode::Read, offset..end);
        let fill_held = read.is_locking();
        if fill_held
            && bufs
                .iter()
                .any(|buf| buffer_in_a_map(buf.as_ptr(), buf.len()))
        {
            // As in `copy_out_under`: no fault on a map under the lock.
            let mut bounce = vec![0; len];
            let n = self.read_cached(&mut bounce, offset, true)?;
            drop(read);
            Scatter::new(bufs).put(&bounce[..n]);
            return Ok(n);
        }
        let mut scattered = Scatter::new(bufs);
        // Allocated at the first page the buffers split.
        let mut aside = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let (asked, n) = match scattered.next(offset, len - done) {
                Destination::Straight(dst) => {
                    let asked = dst.len();
                    let n = self.read_cached(dst, pos, fill_held)?;
                    scattered.advance(n);
                    (asked, n)
                }
                Destination::Aside(asked) => {
                    aside.resize(PAGE_SIZE, 0);
                    let n = self.read_cached(&mut aside[..asked], pos, fill_held)?;
                    scattered.put(&aside[..n]);
                    (asked, n)
                }
            };
            done += n;
            if n < asked {
                break; // the file shrank meanwhile
            }
        }
        Ok(done)
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
    /// let error = file.read_at_nowait(&mut buf[4096..], 4096).unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::WouldBlock);
    ///
    /// // Try without waiting; on `WouldBlock`, hand the read to a thread that may
    /// // wait (here, the blocking call itself).
    /// let mut waited = 0;
    /// let n = match file.read_at_nowait(&mut buf[4096..], 4096) {
    ///     Err(error) if error.kind() == ErrorKind::WouldBlock => {
    ///         waited += 1;
    ///         file.read_at(&mut buf[4096..], 4096)?
    ///     }
    ///     result => result?,
    /// };
    /// assert_eq!((n, waited), (4096, 1));
    /// assert_eq!(buf, [7; 8192]);
    /// assert_eq!(file.read_at_nowait(&mut buf, 0)?, 8192); // both pages cached now
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some((end, len)) = self.check_read(buf.len(), offset)? else {
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
            let (index, in_page) = (index_of(pos), offset_in_page(pos));
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

    /// Copies `dst.len()` bytes at `offset` (inside the file) into `dst`, filling
    /// misses (under Fill, unless `fill_held`: the caller holds a mode that
    /// covers fills). Returns fewer bytes only if the file shrank meanwhile.
    fn read_cached(&self, dst: &mut [u8], offset: u64, fill_held: bool) -> io::Result<usize> {
        let mut done = 0;
        while done < dst.len() {
            let pos = offset + done as u64;
            let index = index_of(pos);
            let in_page = offset_in_page(pos);
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
            if let Some(slot) = slot.filter(|slot| slot.load().is_locked_or_filling()) {
                // Never for the caller's own write pin.
                self.check_own_pins(index..index + 1, true)?;
                slot.wait_while_state(PageState::is_locked_or_filling);
                continue;
            }
            schedule::point();
            let rest = &mut dst[done..];
            let asked = (in_page + rest.len()).div_ceil(PAGE_SIZE) as u64;
            match self.fill_miss(index, asked, FillBudget::Uncached, fill_held)? {
                Fill::Read { data, current, .. } => {
                    // Pages whose claim was taken are read again (from the cache).
                    let valid = (current as usize * PAGE_SIZE).saturating_sub(in_page);
                    let n = valid.min(rest.len());
                    rest[..n].copy_from_slice(&data[in_page..in_page + n]);
                    done += n;
                }
                Fill::NotAbsent => {
                    if let Some(slot) = self.pages.get(index) {
                        self.check_own_pins(index..index + 1, true)?;
                        slot.wait_while_state(PageState::is_locked_or_filling);
                    }
                }
                Fill::BeyondEof => break,
                Fill::CacheFull => unreachable!("a read falls back to an uncached fill"),
            }
        }
        Ok(done)
    }

    /// Fills the miss at page `index` for a caller that wants `asked` pages
    /// from it on: a whole window if the reads look sequential. Counts the
    /// miss, and the pages read past `asked` as read ahead. Takes Fill for the
    /// pages unless `fill_held` (the caller holds a mode that covers fills).
    pub(super) fn fill_miss(
        &self,
        index: u64,
        asked: u64,
        budget: FillBudget,
        fill_held: bool,
    ) -> io::Result<Fill> {
        stats::add(&self.cache.counters.misses, 1);
        let batch = self.cache.fill_batch_pages as u64;
        let miss = self.readahead.on_miss(index, batch);
        let want = match miss {
            MissFill::Stream(window) => window.max(asked),
            MissFill::Ahead => asked,
        };
        let fill = (!fill_held)
            .then(|| self.lock_mode(Mode::Fill, start_of(index)..start_of(index + want)));
        let filled = self.fill(index, want, budget, fill)?;
        if let Fill::Read { pages, .. } = filled {
            if let MissFill::Stream(_) = miss {
                self.readahead.filled(index, pages, asked);
            }
            stats::add(
                &self.cache.counters.readahead_pages,
                pages.saturating_sub(asked),
            );
        }
        Ok(filled)
    }

    /// The hit path: copies from the stored page if it is up to date, validating
    /// the copy against the state word. Takes no lock and writes nothing shared.
    #[inline]
    fn read_hit(&self, slot: &Slot, index: u64, in_page: usize, dst: &mut [u8]) -> bool {
        // A few retries ride out a writer that changed the page mid-copy.
        for _ in 0..4 {
            match slot.read_optimistic(|| self.store.read(index, in_page, &mut *dst)) {
                OptimisticRead::Copied => {
                    self.cache.counters.hits.add();
                    return true;
                }
                OptimisticRead::NotReadable => return false,
                OptimisticRead::Changed => {
                    // Dropped during the copy: without a map, the copy may
                    // have left a zero page in the hole.
                    if !self.store.traps_faults() && slot.load().is_absent() {
                        self.remove_stray(index, slot);
                    }
                }
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
    /// `file-exclusive`): copies the page under a pin. An optimistic copy
    /// could touch a page an eviction just punched from the memfd, and the
    /// fault would need Fill from the handler thread, which a queued exclusive
    /// request would hold back behind the mode this reader holds. Eviction
    /// skips pinned pages, so a pinned copy never faults.
    fn read_hit_locked(&self, slot: &Slot, index: u64, in_page: usize, dst: &mut [u8]) -> bool {
        loop {
            let state = slot.load();
            if !state.is_readable() {
                return false;
            }
            let brief = self.cache.brief_pins.hold();
            if slot.try_pin(state).is_ok() {
                self.store.read(index, in_page, dst);
                slot.unpin();
                drop(brief);
                self.cache.counters.hits.add();
                return true;
            }
            drop(brief);
            if state.pins() == MAX_PINS {
                std::thread::yield_now();
            }
        }
    }
}
