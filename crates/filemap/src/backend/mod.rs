//! Backends: the address-space operations of one file.
//!
//! A backend maps file offsets to storage and moves whole pages; it knows nothing
//! of the cache and never takes a cache lock. [`crate::Mapping`] calls it only
//! while holding the coherence mode that makes the call safe, which is how the
//! cache is coherent by construction.

use std::fmt;
use std::io;

mod extent;
mod faulty;
mod hostfile;
mod volume;

pub use faulty::FaultyBackend;
pub use hostfile::HostFile;
pub use volume::{Volume, VolumeFile, BLOCK_SIZE};

/// The kind of a backend call, as fault rules of a [`FaultyBackend`] select them.
///
/// [`Backend::len`] and [`Backend::max_file_size`] are never faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendOp {
    /// [`Backend::read_pages`].
    ReadPages,
    /// [`Backend::write_pages`].
    WritePages,
    /// [`Backend::set_len`].
    SetLen,
    /// [`Backend::punch_hole`].
    PunchHole,
    /// [`Backend::zero_range`].
    ZeroRange,
    /// [`Backend::collapse_range`].
    CollapseRange,
    /// [`Backend::insert_range`].
    InsertRange,
    /// [`Backend::read_direct`].
    ReadDirect,
    /// [`Backend::write_direct`].
    WriteDirect,
    /// [`Backend::sync`].
    Sync,
    /// [`Backend::remove`].
    Remove,
}

/// The storage operations of one file, in whole pages of [`crate::PAGE_SIZE`]
/// bytes except where a byte range is named.
///
/// Contract for implementors:
/// - Reads of holes and of anything past the end of file return zeroes.
/// - The file's size changes only through [`Backend::set_len`],
///   [`Backend::collapse_range`] and [`Backend::insert_range`]; writes never
///   change it, and [`crate::Mapping`] never writes a page that starts at or past
///   the end of file.
/// - Bytes of the last page past the end of file read as zero.
/// - Calls on a removed file fail with `ENOENT`.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The file's size in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The largest size the file may grow to, in bytes (a multiple of the page size).
    fn max_file_size(&self) -> u64;

    /// Reads the pages starting at page `index` into `buf`, whose length is a
    /// multiple of the page size.
    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes the pages starting at page `index` from `buf`, whose length is a
    /// multiple of the page size, allocating storage for holes.
    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()>;

    /// Sets the file's size. Shrinking frees the storage past the new end and
    /// zeroes the rest of the last page; growing adds a hole.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Deallocates `offset..offset + len` (`fallocate(PUNCH_HOLE|KEEP_SIZE)`):
    /// it reads as zeroes afterwards; partial pages are zeroed in place. The size
    /// does not change.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Zeroes `offset..offset + len` inside the file, keeping or allocating its
    /// storage (`fallocate(ZERO_RANGE|KEEP_SIZE)`). The size does not change.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Removes `offset..offset + len` and shifts everything after it down by
    /// `len` (`fallocate(FALLOC_FL_COLLAPSE_RANGE)`); the size shrinks by `len`.
    /// The caller guarantees both are multiples of the page size, `len > 0`, and
    /// the range ends before the end of file. Backends that cannot fail with
    /// `EOPNOTSUPP`, as file systems without it do.
    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        crate::errno::fail(libc::EOPNOTSUPP)
    }

    /// Inserts a hole of `len` bytes at `offset`, shifting everything from there
    /// up by `len` (`fallocate(FALLOC_FL_INSERT_RANGE)`); the size grows by `len`.
    /// The caller guarantees both are multiples of the page size, `len > 0`,
    /// `offset` is before the end of file and the new size is allowed. Default:
    /// `EOPNOTSUPP`.
    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        crate::errno::fail(libc::EOPNOTSUPP)
    }

    /// A direct read of `buf.len()` bytes at `offset`, both multiples of the page
    /// size, bypassing any cache of the backend's own.
    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_pages(offset / crate::page::PAGE, buf)
    }

    /// A direct write of `buf` at `offset`, both multiples of the page size.
    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_pages(offset / crate::page::PAGE, buf)
    }

    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;

    /// Removes the file and frees its storage; every later call fails with `ENOENT`.
    fn remove(&self) -> io::Result<()>;
}
