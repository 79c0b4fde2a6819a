//! `lseek`'s `SEEK_DATA` and `SEEK_HOLE`: where a file holds data, as the
//! backend knows it once the cache's dirty pages are in it.

use std::io;

use super::Mapping;
use crate::cache::tree::MAX_PAGES;
use crate::page::index_of;

impl Mapping {
    /// The first byte at or after `offset` that holds data, like
    /// `lseek(SEEK_DATA)`: `None` (`ENXIO` to `lseek`) if there is none before
    /// the end of file. Dirty pages from `offset` on are written back first,
    /// so data not yet in the backend counts; a hole is at least a page.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let found = self.seek_with(offset, |backend, offset| backend.seek_data(offset))?;
        Ok(found.filter(|&at| at < self.len()))
    }

    /// The first byte at or after `offset` in a hole, like
    /// `lseek(SEEK_HOLE)`; the end of file is one. `None` (`ENXIO` to
    /// `lseek`) if `offset` is at or past the end of file. Dirty pages from
    /// `offset` on are written back first.
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        let found = self.seek_with(offset, |backend, offset| backend.seek_hole(offset))?;
        // The backend's end of file may lag the mapping's by a racing write.
        Ok(found.map(|at| at.min(self.len())))
    }

    fn seek_with(
        &self,
        offset: u64,
        seek: impl FnOnce(&dyn crate::Backend, u64) -> io::Result<Option<u64>>,
    ) -> io::Result<Option<u64>> {
        self.check_live()?;
        if offset >= self.len() {
            return Ok(None);
        }
        self.write_back_range(index_of(offset), MAX_PAGES - 1)?;
        seek(self.backend.as_ref(), offset)
    }
}
