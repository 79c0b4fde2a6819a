//! Buffered writes: into cached pages under Write, filling a partial page
//! first; the file grows as the bytes land.

use std::io::{self, IoSlice};

use super::fill::{Fill, FillBudget};
use super::region::buffer_in_a_map;
use super::vectored::{total_len, Gather};
use super::{would_block, Mapping};
use crate::cache::page::{PageState, Slot};
use crate::cache::shared::Need;
use crate::lock::Mode;
use crate::page::{index_of, offset_in_page, start_of, PAGE_SIZE};

impl Mapping {
    /// [`Mapping::write_at`] that never waits, like `pwritev2` with
    /// `RWF_NOWAIT`: it writes into cached pages from `offset` on and stops at
    /// the first page that is not cached (writing part of it would need a
    /// backend read, and a new page may need memory the budget does not have),
    /// is busy, or lies past the end of file (growing the file changes the
    /// backend), or if the coherence mode it needs is held by someone else.
    /// Returns the bytes written, or `ErrorKind::WouldBlock` if it wrote none
    /// (then nothing changed).
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
    /// assert_eq!(file.write_at_nowait(b"cached", 0)?, 6);
    /// let error = file.write_at_nowait(b"not cached", 4096).unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::WouldBlock);
    /// let error = file.write_at_nowait(b"grows the file", 8192).unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::WouldBlock);
    ///
    /// // Try without waiting; on `WouldBlock`, hand the write to a thread that
    /// // may wait (here, the blocking call itself).
    /// let mut waited = 0;
    /// let n = match file.write_at_nowait(b"not cached", 4096) {
    ///     Err(error) if error.kind() == ErrorKind::WouldBlock => {
    ///         waited += 1;
    ///         file.write_at(b"not cached", 4096)?
    ///     }
    ///     result => result?,
    /// };
    /// assert_eq!((n, waited), (10, 1));
    /// assert_eq!(file.write_at_nowait(b"now cached", 4096)?, 10);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn write_at_nowait(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.changing(offset..offset.saturating_add(buf.len() as u64), || {
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
                let (index, in_page) = (index_of(pos), offset_in_page(pos));
                let take = (PAGE_SIZE - in_page).min(buf.len() - done);
                if pos + take as u64 > size {
                    break;
                }
                let Some(slot) = self.pages.get(index) else {
                    break;
                };
                let state = slot.load();
                if !state.is_present() || !state.is_readable() || slot.try_lock(state).is_err() {
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
            self.touch_backend();
            Ok(done)
        })
    }

    /// Writes `buf` at `offset` into the cache, like `pwrite`, extending the
    /// file if it ends past the end of file. Returns `buf.len()`, or fewer if an
    /// error stopped it after some bytes were written; the file grows page by page
    /// as the bytes land, so a write that fails changes nothing and a short write
    /// grows the file only as far as it wrote. A write that crosses
    /// [`Mapping::max_file_size`] is cut short there; one that starts at or past
    /// it fails with `EFBIG`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.write_vectored_at(&[IoSlice::new(buf)], offset)
    }

    /// Writes the buffers of `bufs` in turn from `offset` on, like `pwritev`,
    /// and returns as [`Mapping::write_at`] does. The whole call takes the
    /// coherence mode a write needs once, not once per buffer, so no punch,
    /// truncate, zero range or direct I/O of its range falls between two of
    /// its buffers; each page is written in one step, also one whose bytes
    /// the caller's buffers split (they are gathered into one page first).
    ///
    /// ```
    /// use std::io::IoSlice;
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("log")?))?;
    /// let (header, body) = (b"len=5;", b"hello");
    /// let bufs = [IoSlice::new(header), IoSlice::new(body)];
    /// assert_eq!(file.write_vectored_at(&bufs, 0)?, 11);
    /// let mut back = [0u8; 11];
    /// file.read_exact_at(&mut back, 0)?;
    /// assert_eq!(&back, b"len=5;hello");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let total = total_len(bufs.iter().map(|buf| buf.len()))?;
        self.changing(offset..offset.saturating_add(total as u64), || {
            let Some(len) = self.check_write(total, offset)? else {
                return Ok(0);
            };
            if bufs
                .iter()
                .any(|buf| buffer_in_a_map(buf.as_ptr(), buf.len()))
            {
                // Reading a map may fault into a handler that needs Fill: copy it
                // before taking Write, which a queued Invalidate would make it wait for.
                let mut bounce = vec![0; len];
                Gather::new(bufs).copy_to(&mut bounce);
                return self.write_gathered(Gather::new(&[IoSlice::new(&bounce)]), offset, len);
            }
            self.write_gathered(Gather::new(bufs), offset, len)
        })
    }

    /// Writes the first `len` bytes of `source` at `offset`, under one
    /// acquisition of Write; the caller checked the range.
    fn write_gathered(
        &self,
        mut source: Gather<'_, '_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        let _write = self.lock_mode(Mode::Write, offset..offset + len as u64);
        let old_size = self.len();
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let in_page = offset_in_page(pos);
            let take = (PAGE_SIZE - in_page).min(len - done);
            if let Err(error) = self.write_page(index_of(pos), in_page, source.next(take), old_size)
            {
                if done == 0 {
                    return Err(error);
                }
                break;
            }
            done += take;
        }
        self.touch_backend();
        Ok(done)
    }

    /// Tells the backend that a write changed the file's data now (it moves
    /// the file's times, see [`crate::Backend::touch`]); a failure to move a
    /// time does not fail the write, which has landed.
    pub(super) fn touch_backend(&self) {
        let _ = self.backend.touch();
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
        let end = start_of(index) + (in_page + src.len()) as u64;
        let mut zeroes_below = start_of(index) >= old_size;
        let slot = self.pages.get_or_create(index);
        loop {
            let state = self.wait_for_page(slot, PageState::is_held_or_filling);
            if state.is_present() {
                if slot.try_lock(state).is_err() {
                    continue;
                }
                if let Err(error) = self.extend_size(end) {
                    slot.unlock();
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
            if !self.take_page(Need::Wait) {
                return Err(self.cache_full());
            }
            if slot.lock_for_create(state).is_err() {
                self.give_page();
                continue;
            }
            let mut page = vec![0; PAGE_SIZE];
            page[in_page..in_page + src.len()].copy_from_slice(src);
            let installed = self
                .extend_size(end)
                .and_then(|()| self.store.install(index, &page));
            if let Err(error) = installed {
                slot.empty();
                self.give_page();
                return Err(error);
            }
            self.publish(index, slot, true);
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
            slot.unlock_written();
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
}
