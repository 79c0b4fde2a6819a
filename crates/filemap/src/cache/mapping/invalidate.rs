//! The calls that change what the backend maps under a range, under
//! Invalidate: punch, zero, truncate, collapse, insert and `invalidate_range`.
//! Each drops the range's cached pages before the backend changes.

use crate::sync::atomic::Ordering;
use std::io;

use super::drop::DirtyPages;
use super::{end_of, Mapping, MAX_OFFSET};
use crate::cache::page::Slot;
use crate::cache::tree::MAX_PAGES;
use crate::errno::fail;
use crate::lock::Mode;
use crate::page::{index_of, PAGE, PAGE_SIZE};
use crate::schedule;

impl Mapping {
    /// Deallocates `offset..offset + len`, like
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: it reads as zeroes
    /// afterwards, the bytes of partial pages around it survive, and the size does
    /// not change. Cached data of the range, dirty or not, is dropped.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changing(offset..offset.saturating_add(len), || {
            let end = self.fallocate_end(offset, len)?;
            let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
            self.remove_cached_bytes(offset, end);
            schedule::point();
            self.backend.punch_hole(offset, len)
        })
    }

    /// Zeroes `offset..offset + len`, like `fallocate(FALLOC_FL_ZERO_RANGE)`:
    /// extends the file if the range ends past the end of file.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changing(offset..offset.saturating_add(len), || {
            let end = self.fallocate_end(offset, len)?;
            let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
            self.remove_cached_bytes(offset, end);
            schedule::point();
            self.extend_size(end)?;
            self.backend.zero_range(offset, len)
        })
    }

    /// Sets the file's size, like `ftruncate`: shrinking drops the cached pages
    /// past the new end and zeroes the rest of the last page; growing adds a hole.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.changing(len.min(self.len())..u64::MAX, || {
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
        })
    }

    /// Removes `offset..offset + len` and shifts the rest of the file down, like
    /// `fallocate(FALLOC_FL_COLLAPSE_RANGE)`: both must be multiples of
    /// [`PAGE_SIZE`], `len` positive, and the range must end before the end of
    /// file (`EINVAL` otherwise). Cached pages after the range move with their
    /// data; those inside it are dropped.
    pub fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changing(offset..u64::MAX, || {
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
            self.write_back_range(index_of(offset), MAX_PAGES - 1)?;
            self.drop_pages(index_of(offset), index_of(end) - 1, DirtyPages::WriteBack)?;
            // Pages filled from the backend as it was move below.
            self.settle_fills(index_of(end), MAX_PAGES - 1);
            self.backend.collapse_range(offset, len)?;
            self.move_pages(index_of(end), -((len / PAGE) as i64));
            self.set_size(size - len)
        })
    }

    /// Inserts a hole of `len` bytes at `offset`, shifting the rest of the file
    /// up, like `fallocate(FALLOC_FL_INSERT_RANGE)`: both must be multiples of
    /// [`PAGE_SIZE`], `len` positive and `offset` before the end of file (`EINVAL`
    /// otherwise); `EFBIG` if the file would outgrow
    /// [`Mapping::max_file_size`]. Cached pages move with their data.
    pub fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changing(offset..u64::MAX, || {
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
            self.write_back_range(index_of(offset), MAX_PAGES - 1)?;
            // Pages filled from the backend as it was move below.
            self.settle_fills(index_of(offset), MAX_PAGES - 1);
            self.backend.insert_range(offset, len)?;
            // Grow first: pages that move past the old end must be inside the file.
            self.set_size(size + len)?;
            self.move_pages(index_of(offset), (len / PAGE) as i64);
            Ok(())
        })
    }

    /// Drops the cached pages touching `offset..offset + len`, writing dirty ones
    /// back first (nothing is lost); the next access reads the backend.
    pub fn invalidate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.changing(offset..offset.saturating_add(len), || {
            self.check_live()?;
            let end = end_of(offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let _invalidate = self.lock_mode(Mode::Invalidate, offset..end);
            self.drop_pages(index_of(offset), index_of(end - 1), DirtyPages::WriteBack)
        })
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
            && slot.lock_for_create(empty).is_ok()
            && match self.store.install(target, &data) {
                Ok(()) => {
                    self.publish(target, slot, state.is_dirty());
                    true
                }
                Err(_) => {
                    slot.empty();
                    false
                }
            };
        // The old page goes either way; if the move failed, so does its data,
        // which the caller wrote back first.
        let _ = self.store.remove(index, 1);
        source.empty();
        if !moved {
            self.give_page();
        }
    }
}
