//! The `std::os::unix::fs::FileExt` shape: code written for files takes a
//! mapping, and the loops of `read_exact_at` and `write_all_at` are std's.

use std::io;
use std::os::unix::fs::FileExt;

use super::Mapping;

/// Reads and writes as a file's positional calls: the same as the inherent
/// [`Mapping::read_at`] and [`Mapping::write_at`].
///
/// ```
/// use std::os::unix::fs::FileExt;
/// use std::sync::Arc;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// fn checksum(file: &impl FileExt, len: usize) -> std::io::Result<u64> {
///     let mut buf = vec![0; len];
///     file.read_exact_at(&mut buf, 0)?;
///     Ok(buf.iter().map(|&b| u64::from(b)).sum())
/// }
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("data")?))?;
/// file.write_all_at(&[1; 100], 0)?;
/// assert_eq!(checksum(&*file, 100)?, 100);
/// # Ok::<(), std::io::Error>(())
/// ```
impl FileExt for Mapping {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Mapping::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        Mapping::write_at(self, buf, offset)
    }
}

impl Mapping {
    /// Reads exactly `buf.len()` bytes at `offset`, failing with
    /// `ErrorKind::UnexpectedEof` if the file ends first
    /// ([`FileExt::read_exact_at`], callable without importing the trait).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    /// Writes all of `buf` at `offset` ([`FileExt::write_all_at`], callable
    /// without importing the trait).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}
