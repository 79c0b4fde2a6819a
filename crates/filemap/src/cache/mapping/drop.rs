//! Dropping cached pages: the first half of every invalidation (the pages go
//! before the backend changes), and eviction, which drops one page to make room.

use crate::sync::atomic::Ordering;
use std::io;

use super::Mapping;
use crate::cache::evict::Visit;
use crate::cache::page::{PageState, Slot};
use crate::cache::shared::Eviction;
use crate::cache::stats;
use crate::cache::tree::{PageTree, MAX_PAGES};
use crate::page::{index_of, offset_in_page, PAGE, PAGE_SIZE};
use crate::schedule;

/// What the eviction hand finds at page `index` of `pages` (of a mapping, or
/// of a closed file).
pub(super) fn visit_page(pages: &PageTree, index: u64) -> Visit {
    let Some(slot) = pages.get(index) else {
        return Visit::Stale;
    };
    let state = slot.load();
    if state.is_absent() {
        // The entry leaves the queue, unless a fill takes the page meanwhile.
        return match slot.unqueue_absent(state) {
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

/// Whether a dropped dirty page is written back first or discarded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DirtyPages {
    /// Its range is being punched, zeroed or truncated: the data goes anyway.
    Discard,
    /// Only the cache is being dropped: the data must reach the backend.
    WriteBack,
}

impl Mapping {
    /// What the eviction hand finds at page `index`.
    pub(super) fn eviction_visit(&self, index: u64) -> Visit {
        visit_page(&self.pages, index)
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
        if !state.is_present() {
            return if state.is_absent() {
                Eviction::Absent
            } else {
                Eviction::Busy
            };
        }
        if state.is_pinned() {
            return Eviction::Pinned;
        }
        if state.is_busy() {
            return Eviction::Busy;
        }
        if let Err(now) = slot.try_lock(state) {
            // Hazard pins show once a lock attempt found them.
            return if now.is_pinned() {
                Eviction::Pinned
            } else {
                Eviction::Busy
            };
        }
        self.trap_stores(&[index]);
        if self.write_back_locked(index, slot).is_err() {
            // It stays, dirty; the error is kept for the next sync.
            slot.unlock();
            return Eviction::Failed;
        }
        if self.store.remove(index, 1).is_err() {
            slot.unlock();
            return Eviction::Failed;
        }
        slot.empty();
        self.give_page();
        stats::add(&self.cache.counters.evictions, 1);
        Eviction::Evicted
    }

    /// Drops every page of a removed file and removes it from the backend,
    /// once: when it is removed with no map, or when its last map goes.
    pub(super) fn release_storage(&self) -> io::Result<()> {
        if self.storage_released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.drop_pages(0, MAX_PAGES - 1, DirtyPages::Discard)?;
        self.backend.remove()
    }

    /// Locks the page of `slot` to change its bytes or its place, after waiting
    /// for its fill and its writeback. An absent page yields `None`.
    pub(super) fn lock_for_change(&self, slot: &Slot) -> Option<PageState> {
        loop {
            let state = self.wait_for_page(slot, PageState::is_busy);
            if state.is_absent() {
                return None;
            }
            if slot.try_lock(state).is_ok() {
                return Some(state);
            }
        }
    }

    /// Removes the cache's copy of the bytes `start..end` before the backend
    /// changes them: pages wholly inside are dropped, the covered part of partial
    /// pages at the edges is zeroed. Dirty data of the range is discarded.
    pub(super) fn remove_cached_bytes(&self, start: u64, end: u64) {
        let (head, tail) = (index_of(start), index_of(end));
        let head_offset = offset_in_page(start);
        let tail_offset = offset_in_page(end);
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
            slot.unlock_changed();
        }
    }

    /// Gives back a zero page that an optimistic reader may have left in the
    /// hole of page `index` (see `cache/store.rs`), if the page is still absent:
    /// claims it, punches it and leaves it absent again.
    pub(super) fn remove_stray(&self, index: u64, slot: &Slot) {
        let state = slot.load();
        if state.is_absent() && slot.lock_for_create(state).is_ok() {
            let _ = self.store.remove(index, 1);
            slot.empty();
        }
    }

    /// Drops pages `first..=last` from the cache. Pages being filled are taken
    /// from their fill; pages locked or under writeback are waited for. The
    /// pages are locked, removed from the store with one punch (which zaps them
    /// from every map), then emptied: a fault that races the drop waits for the
    /// lock and then fills afresh.
    pub(super) fn drop_pages(&self, first: u64, last: u64, dirty: DirtyPages) -> io::Result<()> {
        self.drop_pages_where(first, last, dirty, |_| true)
    }

    /// [`Mapping::drop_pages`] for the pages `chosen` picks; the others stay.
    pub(super) fn drop_pages_where(
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
                        slot.unlock();
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
                    slot.empty();
                    self.give_page();
                } else {
                    slot.unlock();
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
            let state = self.wait_for_page(slot, PageState::is_busy);
            if state.is_absent() {
                return Ok(false);
            }
            if state.is_dirty() && dirty == DirtyPages::WriteBack {
                self.write_back_page(index, slot)?;
                continue;
            }
            if slot.try_lock(state).is_ok() {
                return Ok(true);
            }
        }
    }
}
