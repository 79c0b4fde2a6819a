//! Serving page faults: a touch of an absent page in the cache's own views or
//! in a user's map, filled as a read miss is; in a read-write map, the page
//! (and the cached pages after it) mapped under their page locks.

use std::io;

use super::fill::{Fill, FillBudget};
use super::{Mapping, UserView};
use crate::cache::faults::ServesFaults;
use crate::cache::page::PageState;
use crate::cache::shared::Need;
use crate::cache::stats;
use crate::cache::store::chunk_last;
use crate::lock::Mode;
use crate::page::{index_of, pages_to_cover, start_of, PAGE_SIZE};
use crate::schedule;

/// Pages a fault in a read-write map maps at once: the faulting page and the
/// cached pages after it, so a sequential first pass over cached pages costs a
/// round trip to the handler per 16 pages, not per page.
const FAULT_AROUND_PAGES: u64 = 16;

impl ServesFaults for Mapping {
    /// Serves a fault at `addr` in one of the store's views (MISSING, or MINOR
    /// in a read-write map): fills the page under Fill if it is absent, as a
    /// read miss does; in a read-write map, maps it there (and the cached pages
    /// after it) under their page locks; then wakes the toucher. Faults past the
    /// end of file, or on pages another thread is installing or dropping, are
    /// left to the toucher's retry (which then finds the page, or gets `SIGBUS`).
    fn serve_fault(&self, addr: usize, thread: u32) {
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
            if start_of(index) < self.len() {
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
        let _ = self.uffd().wake(page_addr, PAGE_SIZE);
    }
}

impl Mapping {
    /// Maps page `index` into the read-write map `view` at `page_addr`, with the
    /// cached pages after it up to [`FAULT_AROUND_PAGES`] (`UFFDIO_CONTINUE`,
    /// write-protected so stores stay tracked), each under its page lock: a
    /// drop that has zapped a page keeps it locked until it is punched, so no
    /// entry comes back in between. Stops at the first page that is not cached,
    /// is busy or lies past the end of file. Nothing is mapped if page `index`
    /// is gone (the toucher's retry faults MISSING).
    fn map_into_view(&self, view: &UserView, index: u64, page_addr: usize) {
        let view_last = index_of(view.offset) + (view.len / PAGE_SIZE) as u64 - 1;
        if view.span(index, index).is_none() {
            return;
        }
        let in_file = pages_to_cover(self.len());
        // One `UFFDIO_CONTINUE` maps pages of one region only.
        let last = view_last
            .min(index + FAULT_AROUND_PAGES - 1)
            .min(in_file.saturating_sub(1))
            .min(chunk_last(index));
        let mut locked = Vec::new();
        'pages: for i in index..=last {
            let Some(slot) = self.pages.get(i) else {
                break;
            };
            loop {
                let state = slot.load();
                if !state.is_present() {
                    break 'pages;
                }
                // A pinned page is mapped once its pins are gone: a store
                // through the map must not change it under them.
                if state.is_held() {
                    if i > index {
                        break 'pages;
                    }
                    self.wait_for_page(slot, PageState::is_held);
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
                .uffd()
                .continue_pages(page_addr, locked.len() * PAGE_SIZE);
        }
        for i in locked {
            let slot = self.pages.get(i).expect("locked slots exist");
            slot.unlock();
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
            let state = slot.wait_while_state(PageState::is_locked_or_filling);
            if state.is_present() {
                return;
            }
            // A fault cannot be refused: it evicts until a page is free.
            self.take_page(Need::Required);
            if slot.lock_for_create(state).is_err() {
                self.give_page();
                continue;
            }
            if self.store.install(index, &[0; PAGE_SIZE]).is_ok() {
                self.publish(index, slot, false);
            } else {
                slot.empty();
                self.give_page();
            }
            return;
        }
    }

    /// Makes page `index` present if it lies inside the file; fails if the
    /// backend could not be read.
    fn fault_in(&self, index: u64) -> io::Result<()> {
        let slot = self.pages.get_or_create(index);
        loop {
            if start_of(index) >= self.len() {
                return Ok(());
            }
            let state = slot.wait_while_state(PageState::is_locked_or_filling);
            if state.is_present() {
                return Ok(());
            }
            let want = self.cache.fill_batch_pages as u64;
            let fill = self.lock_mode(Mode::Fill, start_of(index)..start_of(index + want));
            // A fault cannot be refused: it evicts until its first page fits.
            if let Fill::BeyondEof = self.fill(index, want, FillBudget::Force, Some(fill))? {
                return Ok(());
            }
        }
    }
}
