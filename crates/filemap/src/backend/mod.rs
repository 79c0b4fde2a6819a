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
pub use volume::{
    Attr, DirEntry, FileKind, RenameFlags, SetAttr, StatFs, Timestamp, Volume, VolumeFile,
    BLOCK_SIZE,
};

/// The kind of a backend call, as fault rules of a [`FaultyBackend`] select them.
///
/// [`Backend::len`] and [`Backend::max_file_size`] are never faulted.
///
/// ```
/// use std::sync::Arc;
/// use filemap::backend::BackendOp;
/// use filemap::{Backend, FaultyBackend, HostFile};
///
/// let backend = FaultyBackend::new(Arc::new(HostFile::from_file(tempfile::tempfile()?)?), 1);
/// backend.set_len(8192)?;
/// backend.fail_nth(BackendOp::PunchHole, 1, libc::EIO); // the next punch fails
/// assert_eq!(backend.punch_hole(0, 4096).unwrap_err().raw_os_error(), Some(libc::EIO));
/// backend.punch_hole(0, 4096)?; // the rule fired once
/// # Ok::<(), std::io::Error>(())
/// ```
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
///
/// A backend of your own, here a file in memory, is all a storage engine
/// writes to put the cache over its storage:
///
/// ```
/// use std::io;
/// use std::sync::{Arc, Mutex};
/// use filemap::{Backend, PageCache, PAGE_SIZE};
///
/// /// A file in memory: its bytes, `None` once removed.
/// #[derive(Debug)]
/// struct MemFile(Mutex<Option<Vec<u8>>>);
///
/// impl MemFile {
///     fn with<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> io::Result<T> {
///         let mut bytes = self.0.lock().unwrap();
///         let bytes = bytes.as_mut().ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
///         Ok(f(bytes))
///     }
/// }
///
/// impl Backend for MemFile {
///     fn len(&self) -> io::Result<u64> {
///         self.with(|bytes| bytes.len() as u64)
///     }
///     fn max_file_size(&self) -> u64 {
///         1 << 30
///     }
///     fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
///         self.with(|bytes| {
///             let start = index as usize * PAGE_SIZE;
///             let end = (start + buf.len()).min(bytes.len()).max(start);
///             buf.fill(0); // holes and bytes past the end of file read as zero
///             buf[..end - start].copy_from_slice(&bytes[start..end]);
///         })
///     }
///     fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
///         // Writes never change the size: bytes past the end of file go nowhere.
///         self.with(|bytes| {
///             let start = index as usize * PAGE_SIZE;
///             let end = (start + buf.len()).min(bytes.len()).max(start);
///             bytes[start..end].copy_from_slice(&buf[..end - start]);
///         })
///     }
///     fn set_len(&self, len: u64) -> io::Result<()> {
///         self.with(|bytes| bytes.resize(len as usize, 0))
///     }
///     fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
///         self.zero_range(offset, len) // no storage to give back
///     }
///     fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
///         self.with(|bytes| {
///             let end = offset.saturating_add(len).min(bytes.len() as u64) as usize;
///             let start = (offset as usize).min(end);
///             bytes[start..end].fill(0);
///         })
///     }
///     fn sync(&self) -> io::Result<()> {
///         self.with(|_| ()) // memory is as durable as it gets
///     }
///     fn remove(&self) -> io::Result<()> {
///         let removed = self.0.lock().unwrap().take();
///         removed.map(drop).ok_or(io::Error::from_raw_os_error(libc::ENOENT))
///     }
/// }
///
/// // The cache keeps it coherent: it calls the backend under the right mode.
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(MemFile(Mutex::new(Some(Vec::new())))))?;
/// file.write_all_at(b"hello", 4090)?;
/// file.punch_hole(4092, 2)?;
/// let mut buf = [0; 5];
/// file.read_exact_at(&mut buf, 4090)?;
/// assert_eq!(&buf, b"he\0\0o");
/// file.sync_all()?;
/// assert_eq!(file.backend().len()?, 4095);
/// # Ok::<(), std::io::Error>(())
/// ```
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

    /// The first byte at or after `offset` that holds data, as
    /// `lseek(SEEK_DATA)` finds it: `None` if there is none before the end of
    /// file (`ENXIO` there). Default: every byte of the file is data.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }

    /// The first byte at or after `offset` in a hole, as `lseek(SEEK_HOLE)`
    /// finds it (the end of file is one): `None` if `offset` is at or past
    /// the end of file. Default: the only hole is the end of file.
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        let len = self.len()?;
        Ok((offset < len).then_some(len))
    }

    /// Writes back whole pages that a cache in front of the backend held
    /// dirty, as [`Backend::write_pages`] does; their data changed when it was
    /// written into the cache (see [`Backend::touch`]), so a backend that keeps
    /// times leaves them as they are. Default: [`Backend::write_pages`].
    fn write_back_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.write_pages(index, buf)
    }

    /// A write changed the file's data in a cache in front of the backend just
    /// now, to be written back later: a backend that keeps times moves its
    /// modification and change times now, as `write(2)` does, and not at
    /// writeback (a time set after the write, as `tar` sets one, must stay).
    /// Default: nothing.
    fn touch(&self) -> io::Result<()> {
        Ok(())
    }

    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;

    /// Removes the file and frees its storage; every later call fails with `ENOENT`.
    fn remove(&self) -> io::Result<()>;

    /// Which file this is, and which version of its content: see
    /// [`FileIdentity`]. Default: `None`, a file with no identity, whose
    /// mapping is its own and whose pages go when it is dropped.
    fn identity(&self) -> io::Result<Option<FileIdentity>> {
        Ok(None)
    }
}

/// Who a backend's file is, for the cache: what lets two opens of one file
/// share one [`crate::Mapping`], and a file's pages outlive its last handle
/// (as the kernel's page cache outlives a `close`).
///
/// - `file` is the same for every backend of the same file, in this process
///   and for as long as any of them lives, and differs between files (a
///   volume's number and the file's id; a host file's device and inode).
/// - `version` changes whenever the file's bytes or size change, through
///   this backend or any other, by the time the call that changed them
///   returns; equal versions promise equal contents.
///
/// When the last handle of a mapping goes, its dirty pages are written back
/// and its clean pages stay cached under `file`, with `version` read then.
/// The next [`crate::PageCache::open`] of a backend with that `file` finds
/// them, if `version` is still the same (close-to-open consistency, as NFS
/// gives); otherwise they are dropped. They are evicted like any other page.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{Backend, MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(4 << 20)))?;
/// let a = volume.create_file("a")?;
/// let before = a.identity()?.expect("volume files have one");
/// a.set_len(4096)?;
/// let after = volume.open_file("a")?.identity()?.expect("volume files have one");
/// assert_eq!(after.file, before.file, "the same file");
/// assert_ne!(after.version, before.version, "whose size changed");
///
/// let cache = PageCache::builder().build()?;
/// let first = cache.open(Arc::new(a))?;
/// let second = cache.open(Arc::new(volume.open_file("a")?))?;
/// assert!(Arc::ptr_eq(&first, &second), "two opens share one mapping");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// Which file.
    pub file: u128,
    /// Which version of its content.
    pub version: u128,
}
