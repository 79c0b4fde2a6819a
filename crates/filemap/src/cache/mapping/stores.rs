//! Stores through the user's read-write maps: finding the pages they made
//! dirty (the kernel's "written" bit, read by a scan) and holding further
//! stores back while a page is dropped, moved or replaced.

use std::io;

use super::{Mapping, UserView};
use crate::cache::page::Slot;
use crate::map::memfd::zap;
use crate::map::uffd::scan_written;
use crate::page::{index_of, PAGE_SIZE};

impl Mapping {
    /// Replaces page `index`, which the caller locked, with `page` whole (punch,
    /// then install), so that no map reader sees a change half done: a reader
    /// that touches it in between waits in its fault for the lock. Unlocks it
    /// dirty; on failure the page may be gone from the store, so it is forgotten.
    pub(super) fn replace_locked_page(
        &self,
        index: u64,
        slot: &Slot,
        page: &[u8],
    ) -> io::Result<()> {
        let replaced = self
            .store
            .remove(index, 1)
            .and_then(|()| self.store.install(index, page));
        match replaced {
            Ok(()) => {
                slot.unlock_written();
                Ok(())
            }
            Err(error) => {
                let _ = self.store.remove(index, 1);
                slot.empty();
                self.give_page();
                Err(error)
            }
        }
    }

    /// Whether one of the user's maps shows page `index`.
    pub(super) fn page_is_mapped(&self, index: u64) -> bool {
        let maps = self.maps.read();
        maps.iter().any(|view| {
            let first = index_of(view.offset);
            (first..first + (view.len / PAGE_SIZE) as u64).contains(&index)
        })
    }

    /// Marks dirty the pages of `first..=last` that stores through the user's
    /// read-write maps changed since the last scan (which re-arms tracking).
    pub(super) fn scan_maps(&self, first: u64, last: u64) {
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

    pub(super) fn mark_stores_dirty(&self, view: &UserView, first: u64, last: u64) {
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
                    if slot.mark_dirty_by_store() {
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
    pub(super) fn trap_stores(&self, pages: &[u64]) {
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
}
