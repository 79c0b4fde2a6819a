//! A pinned byte range: the cached pages of a read, pinned in order, so a
//! server can hand their bytes to the kernel in place (a FUSE reply, a
//! socket's `writev`) instead of copying them into a buffer first.
//!
//! Each page is a read pin as [`Mapping::pin`] takes it (see `pin.rs`), so
//! every change to the range waits while the guard lives, and reads of it go
//! on. Misses are filled as a read fills them: a window at a time when the
//! reads look sequential, and a readahead mark on the way hands the next
//! window to the readahead threads.
//!
//! The pages of one chunk of the file lie side by side in one region of the
//! arena (`cache/store.rs`), so a range inside a chunk (2 MiB for the first
//! two, twice the one before after that, each aligned to its size) is one
//! slice; a range across chunks is one slice per chunk.

use std::io::{self, IoSlice};
use std::marker::PhantomData;

use super::fill::{Fill, FillBudget};
use super::pin::{budget_all_pinned, PinnedPage};
use super::Mapping;
use crate::cache::page::{PageState, MAX_PINS};
use crate::cache::store::chunk_of;
use crate::errno::with_message;
use crate::page::{index_of, offset_in_page, start_of, PAGE_SIZE};

/// Read pins of the pages of a byte range, in order: its bytes in place, in
/// as few slices as the cache's memory allows. No write, store, punch,
/// truncate, zero range, collapse, insert, direct write, invalidation or
/// eviction changes them until the guard is dropped. See
/// [`Mapping::pin_range`].
///
/// Like [`PinnedPage`], the guard belongs to the thread that took it.
pub struct PinnedRange<'a> {
    /// The pins, of consecutive pages.
    pages: Vec<PinnedPage<'a>>,
    /// Where the range starts in its first page.
    skip: usize,
    /// The range's bytes.
    len: usize,
}

impl PinnedRange<'_> {
    /// The range's length in bytes: what was asked for, cut at the end of
    /// file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range holds no bytes (it began at or past the end of file).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range's bytes in order, one slice per run of pages that lie side
    /// by side in the cache's memory.
    pub fn slices(&self) -> PinnedSlices<'_> {
        PinnedSlices {
            range: self,
            page: 0,
            done: 0,
        }
    }

    /// [`PinnedRange::slices`] as `IoSlice`s, for a vectored write
    /// (`writev`, `sendmsg`) straight from the cache.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.slices().map(IoSlice::new).collect()
    }

    /// Copies the range into `dst`, which must be [`PinnedRange::len`] bytes.
    ///
    /// # Panics
    /// If `dst` is of another length.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "a copy of a pinned range of another length"
        );
        let mut done = 0;
        for slice in self.slices() {
            dst[done..done + slice.len()].copy_from_slice(slice);
            done += slice.len();
        }
    }

    /// Gives every pin back, last pinned first: each unpin finds its entry at
    /// the end of the thread's list of held pins.
    fn unpin_all(&mut self) {
        while let Some(page) = self.pages.pop() {
            drop(page);
        }
    }
}

impl Drop for PinnedRange<'_> {
    fn drop(&mut self) {
        self.unpin_all();
    }
}

/// How many times [`Mapping::pin_range`] gives its pins back to make a page
/// pinnable before it lets the caller read instead.
const MAX_RESTARTS: u32 = 16;

/// The slices of a [`PinnedRange`], in order.
pub struct PinnedSlices<'r> {
    range: &'r PinnedRange<'r>,
    /// The first page not yet in a slice.
    page: usize,
    /// The range's bytes in slices so far.
    done: usize,
}

impl<'r> Iterator for PinnedSlices<'r> {
    type Item = &'r [u8];

    #[allow(unsafe_code)] // the pages in place, side by side: what the range is for
    fn next(&mut self) -> Option<&'r [u8]> {
        let pages = &self.range.pages;
        if self.done == self.range.len {
            return None;
        }
        // The run: pages of the same chunk as the first.
        let first = self.page;
        let chunk = chunk_of(pages[first].index);
        let mut end = first + 1;
        while end < pages.len() && chunk_of(pages[end].index) == chunk {
            end += 1;
        }
        let skip = if first == 0 { self.range.skip } else { 0 };
        let run_bytes = (end - first) * PAGE_SIZE - skip;
        let len = run_bytes.min(self.range.len - self.done);
        let start = pages[first].as_ptr();
        debug_assert!(pages[first..end]
            .iter()
            .enumerate()
            .all(|(i, page)| page.as_ptr() == start.wrapping_add(i * PAGE_SIZE)));
        self.page = end;
        self.done += len;
        // SAFETY: the pages `first..end` are of one chunk, whose region lies
        // whole inside one view of the arena (one mapping: `cache/store.rs`),
        // at consecutive addresses in file order, so `start + skip` and the
        // `len` bytes after it (at most to the end of page `end - 1`) lie in
        // one allocation. Each page is pinned by `self.range`, which outlives
        // `'r`: present, and written by no one while pinned (the argument of
        // `PinnedPage`'s `Deref`), so a shared slice of them is sound.
        Some(unsafe { std::slice::from_raw_parts(start.add(skip), len) })
    }
}

impl Mapping {
    /// Read-pins the pages of `offset..offset + len` (cut at the end of
    /// file), filling those not cached as [`Mapping::read_at`] would: the
    /// guard shows the range's bytes in place ([`PinnedRange::slices`]),
    /// unchanged until it is dropped, so a server can send them without a
    /// copy. Other threads' reads and pins of the pages go on meanwhile;
    /// every change to them waits.
    ///
    /// It never waits while it holds pins of the range: a page that needs a
    /// fill, or is busy, makes it give them back and start again once the
    /// page is ready (a punch waiting for those pins would otherwise wait for
    /// the fill, and the fill for the punch).
    ///
    /// Fails as [`Mapping::read_at`] does for a bad range, with `EDEADLK` if
    /// this thread holds a write pin of one of the pages, and with
    /// `WouldBlock` if a page is not cached and every page of the budget is
    /// pinned (a range longer than the budget, or pins held elsewhere), or if
    /// the pages kept changing as it pinned them: the caller then reads the
    /// range instead.
    ///
    /// ```
    /// use std::io::Write;
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("blob")?))?;
    /// file.write_all_at(&[7; 10_000], 0)?;
    /// let range = file.pin_range(100, 1 << 20)?; // cut at the end of file
    /// assert_eq!(range.len(), 9_900);
    /// // Send it as it lies in the cache: here, into a Vec.
    /// let mut sent = Vec::new();
    /// sent.write_vectored(&range.io_slices())?;
    /// assert_eq!(sent, vec![7; 9_900]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn pin_range(&self, offset: u64, len: usize) -> io::Result<PinnedRange<'_>> {
        let mut range = PinnedRange {
            pages: Vec::new(),
            skip: offset_in_page(offset),
            len: 0,
        };
        let Some((_, len)) = self.check_read(len, offset)? else {
            return Ok(range);
        };
        if len == 0 {
            return Ok(range);
        }
        let (first, last) = (index_of(offset), index_of(offset + len as u64 - 1));
        self.check_own_pins(first..last + 1, true)?;
        range.pages.reserve((last - first + 1) as usize);
        let mut index = first;
        let mut restarts = 0;
        while index <= last && start_of(index) < self.len() {
            if self.readahead.is_mark(index) {
                self.read_ahead_from(index);
            }
            let pinned = match self.try_pin_cached(index) {
                // The file shrank since the loop looked.
                Err(_) if start_of(index) >= self.len() => break,
                pinned => pinned?,
            };
            match pinned {
                Some(bytes_and_entry) => {
                    range.pages.push(PinnedPage {
                        mapping: self,
                        index,
                        bytes_and_entry,
                        not_send: PhantomData,
                    });
                    index += 1;
                }
                None => {
                    // Never wait holding pins: a punch or truncate holding
                    // its mode over the range waits for them, and the fill or
                    // the wait would wait for it. Give them back, make the
                    // page pinnable, and start again.
                    range.unpin_all();
                    restarts += 1;
                    if restarts > MAX_RESTARTS {
                        return Err(with_message(
                            libc::EWOULDBLOCK,
                            format!(
                                "the pages of {offset}..{} kept changing while they \
                                 were pinned",
                                offset + len as u64
                            ),
                        ));
                    }
                    self.make_range_pinnable(index, last - index + 1)?;
                    index = first;
                }
            }
        }
        // Cut at the end of file as it is now: a truncate that began before a
        // pin was taken waits for it with the size already cut.
        let pinned = (range.pages.len() * PAGE_SIZE).saturating_sub(range.skip);
        let now = self.len().saturating_sub(offset) as usize;
        range.len = len.min(pinned).min(now);
        Ok(range)
    }

    /// Brings page `index`, wanted with `asked` pages after it by a pinned
    /// range, to a state a pin can take: fills it (and a window, if reads look
    /// sequential) if it is absent, else waits while it is busy.
    fn make_range_pinnable(&self, index: u64, asked: u64) -> io::Result<()> {
        let slot = self.pages.get_or_create(index);
        let state = slot.load();
        if state.is_absent() {
            return match self.fill_miss(index, asked, FillBudget::Wait, false)? {
                Fill::CacheFull => Err(budget_all_pinned(index)),
                Fill::Read { .. } | Fill::NotAbsent | Fill::BeyondEof => Ok(()),
            };
        }
        if state.pins() == MAX_PINS {
            std::thread::yield_now();
            return Ok(());
        }
        self.wait_for_page(slot, PageState::is_locked_or_filling);
        Ok(())
    }
}
