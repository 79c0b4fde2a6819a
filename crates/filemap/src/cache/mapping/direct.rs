//! Direct I/O: the backend read or written without the cache, coherent with
//! it (the range is written back and dropped around the I/O).

use std::io;

use super::drop::DirtyPages;
use super::region::buffer_in_a_map;
use super::{end_of, Mapping};
use crate::aligned::AlignedBuf;
use crate::errno::fail;
use crate::lock::Mode;
use crate::page::{index_of, start_of, PAGE, PAGE_SIZE};
use crate::schedule;

/// The alignment of buffer addresses for direct I/O (a logical sector). Offsets
/// and lengths of direct I/O must be multiples of [`PAGE_SIZE`].
pub const DIRECT_IO_MEMORY_ALIGN: usize = 512;

/// `EINVAL` unless a direct I/O of `len` bytes at `offset` from `address` is
/// aligned: filemap's rule (offsets and lengths in whole pages, buffers at
/// [`DIRECT_IO_MEMORY_ALIGN`]) is stricter than the kernel's, which asks only
/// for the device's logical block size.
fn check_direct_alignment(offset: u64, len: usize, address: usize) -> io::Result<()> {
    if offset % PAGE != 0 || len % PAGE_SIZE != 0 || address % DIRECT_IO_MEMORY_ALIGN != 0 {
        return fail(libc::EINVAL);
    }
    Ok(())
}

impl Mapping {
    /// After a direct write of `data` at `offset`, replaces the cached pages of
    /// `first..=last` that a map shows with what was written, whole (punch, then
    /// install), and marks them dirty: a store through a map that overlapped the
    /// write may be written back after it, and the cache, which now holds the
    /// write, must win that race again. Pages not cached are left to fault in.
    fn replace_mapped_pages(
        &self,
        first: u64,
        last: u64,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let mut result = Ok(());
        for index in first..=last {
            if !self.page_is_mapped(index) {
                continue;
            }
            let Some(slot) = self.pages.get(index) else {
                continue;
            };
            if self.lock_for_change(slot).is_none() {
                continue;
            }
            let at = (start_of(index) - offset) as usize;
            let replaced = self.replace_locked_page(index, slot, &data[at..at + PAGE_SIZE]);
            result = result.and(replaced);
        }
        result
    }

    /// A direct read, like `pread` on an `O_DIRECT` descriptor: dirty cached pages
    /// of the range are written back first (so completed buffered writes are
    /// seen), then the backend is read without caching. `offset` and `buf.len()`
    /// must be multiples of [`PAGE_SIZE`] and the buffer address a multiple of
    /// [`DIRECT_IO_MEMORY_ALIGN`], else `EINVAL` (an empty read returns 0
    /// whatever its alignment, as the kernel's does). Returns the bytes up to
    /// the end of file.
    pub fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.check_live()?;
        let end = end_of(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(0);
        }
        check_direct_alignment(offset, buf.len(), buf.as_ptr() as usize)?;
        // It writes back the dirty pages of its range, which waits for write
        // pins.
        self.check_own_pins(index_of(offset)..index_of(end - 1) + 1, true)?;
        if buffer_in_a_map(buf.as_ptr(), buf.len()) {
            // The device would fault on the map while we hold Direct: read into
            // memory of our own, and copy out once the mode is released.
            let mut bounce = AlignedBuf::new(buf.len(), DIRECT_IO_MEMORY_ALIGN);
            let n = self.read_direct(&mut bounce, offset)?;
            buf[..n].copy_from_slice(&bounce[..n]);
            return Ok(n);
        }
        let _direct = self.lock_mode(Mode::Direct, offset..end);
        let size = self.len();
        if offset >= size {
            return Ok(0);
        }
        // As ext4 answers a direct read from inside the file that reaches past
        // its largest size, even where the file ends before.
        if end > self.max_size {
            return fail(libc::EINVAL);
        }
        let whole = end.min(size.next_multiple_of(PAGE)) - offset;
        self.write_back_range(index_of(offset), index_of(offset + whole - 1))?;
        self.backend
            .read_direct(offset, &mut buf[..whole as usize])?;
        Ok((end.min(size) - offset) as usize)
    }

    /// A direct write, like `pwrite` on an `O_DIRECT` descriptor: the range's
    /// cached pages are written back and dropped before the write and dropped
    /// again after it, so no read that starts after it returns can see the data it
    /// replaced. Alignment as for [`Mapping::read_direct`]; the largest file
    /// size as for [`Mapping::write_at`]. Extends the file before the device
    /// write; if that write fails, the extension stays and reads as zeroes.
    pub fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.changing(offset..offset.saturating_add(buf.len() as u64), || {
            let Some(len) = self.check_write(buf.len(), offset)? else {
                return Ok(0);
            };
            let (buf, end) = (&buf[..len], offset + len as u64);
            check_direct_alignment(offset, buf.len(), buf.as_ptr() as usize)?;
            if buffer_in_a_map(buf.as_ptr(), buf.len()) {
                // As for reads: take the data out of the map before taking Direct.
                let bounce = AlignedBuf::from_slice(buf, DIRECT_IO_MEMORY_ALIGN);
                return self.write_direct(&bounce, offset);
            }
            let _direct = self.lock_mode(Mode::Direct, offset..end);
            let (first, last) = (index_of(offset), index_of(end - 1));
            // Pages a map shows are written back but kept: dropping one could lose a
            // store through the map that lands between the scan for written pages
            // and the punch. After the write they are replaced with its data.
            self.write_back_range(first, last)?;
            self.drop_pages_where(first, last, DirtyPages::WriteBack, |i| {
                !self.page_is_mapped(i)
            })?;
            // Fills of mapped pages must not read the device while it is written.
            self.settle_fills(first, last);
            self.extend_size(end)?;
            schedule::point();
            let written = self.backend.write_direct(offset, buf);
            schedule::point();
            // Fills that ran during the write may hold what it replaced.
            let dropped = match written {
                Ok(()) => self
                    .drop_pages_where(first, last, DirtyPages::WriteBack, |i| {
                        !self.page_is_mapped(i)
                    })
                    .and(self.replace_mapped_pages(first, last, offset, buf)),
                // What reached the device is unknown: drop everything.
                Err(_) => self.drop_pages(first, last, DirtyPages::WriteBack),
            };
            written?;
            dropped?;
            Ok(len)
        })
    }
}
