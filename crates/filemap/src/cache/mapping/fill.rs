//! Fills: claiming absent pages under Fill, reading them from the backend
//! under the claims alone, and publishing them; readahead, which fills ahead
//! of the reader.

use std::io;
use std::time::Instant;

use super::{Mapping, MAX_OFFSET};
use crate::aligned::AlignedBuf;
use crate::cache::page::PageState;
use crate::cache::readahead::MAX_WINDOW_PAGES;
use crate::cache::shared::Need;
use crate::cache::stats;
use crate::errno::fail;
use crate::lock::{CoherenceGuard, Mode};
use crate::page::{index_of, pages_to_cover, start_of, PAGE_SIZE};
use crate::schedule;

/// What a fill does when the budget is used up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum FillBudget {
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
pub(super) struct FillBuf {
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
pub(super) enum Fill {
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
        self.fill_absent(index_of(offset), index_of(end - 1), batch)?;
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
            let fill = self.lock_mode(Mode::Fill, start_of(index)..start_of(index + batch));
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

    /// A read reached the readahead mark at `index`: hands the next window to
    /// the cache's readahead threads.
    pub(super) fn read_ahead_from(&self, index: u64) {
        let eof_pages = pages_to_cover(self.len());
        let queue = &self.cache.readahead;
        let window = self
            .readahead
            .take_mark(index, eof_pages, queue.threads(), queue.mode());
        if let Some((first, pages)) = window {
            queue.submit(self.id, first, pages);
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

    /// Reads up to `want` absent pages from `index` from the backend into the
    /// cache; the caller holds Fill for them and keeps holding it. `budget` says
    /// what to do when the budget is used up.
    pub(super) fn fill_locked(
        &self,
        index: u64,
        want: u64,
        budget: FillBudget,
    ) -> io::Result<Fill> {
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
    pub(super) fn fill(
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
        let eof_pages = pages_to_cover(self.len());
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
            if !self.take_page(need) {
                break;
            }
            // The state is loaded again: the reclaim that made room may have
            // changed it (the eviction hand unqueues absent pages), and a
            // change of flags alone is no reason to give the claim up.
            match slot.claim_for_fill() {
                Some(filling) => claimed.push(filling),
                None => {
                    self.give_page();
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
            let survived = read.is_ok() && slot.lock_fill_claim(filling).is_ok();
            if survived {
                locked.push(i);
            } else {
                // Nothing was read, or an invalidation took the page while we read.
                // Give the claim back if it is still ours, whatever flags it gained.
                slot.abandon_fill(filling);
                self.give_page();
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
                    self.publish(index + i as u64, slot, false);
                    stats::add(&self.cache.counters.fills, 1);
                } else {
                    slot.empty();
                    self.give_page();
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
    pub(super) fn settle_fills(&self, first: u64, last: u64) {
        self.pages.for_each(first, last, |_, slot| {
            slot.wait_while_state(PageState::is_filling);
        });
    }
}
