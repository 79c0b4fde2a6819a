//! A backend of one host file per mapping: positioned I/O, `fallocate` and
//! `O_DIRECT` on a file of the host file system.
//!
//! The host kernel does the block mapping, so the stale-data window this cache
//! closes is the one between the cache dropping a range and the host file
//! changing it (see [`crate::backend::FaultyBackend`] to widen it in tests).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use rustix::fs::{fallocate, AtFlags, FallocateFlags, StatxFlags};

use super::Backend;
use crate::aligned::AlignedBuf;
use crate::device::block_locks::{BlockLocks, Stripes};
use crate::errno::{err, fail};
use crate::page::{PAGE, PAGE_SIZE};

/// The largest file size: `(2^32 - 1) * 4096` bytes, just under 16 TiB. That is
/// ext4's limit for extent-mapped files with 4 KiB blocks (logical block numbers
/// are 32 bits); `ftruncate` to 2^44 fails there with `EFBIG`. Other host file
/// systems may allow more; the backend promises no more than ext4 gives.
const MAX_FILE_SIZE: u64 = (1 << 44) - PAGE;

/// The buffer address alignment `O_DIRECT` needs when the file system does not
/// report one (the sector size of common block devices).
const DEFAULT_DIO_MEM_ALIGN: usize = 512;

/// `FS_IOC_GETVERSION`, `_IOR('v', 1, long)`.
const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;

/// The inode's generation (`FS_IOC_GETVERSION`), which file systems change
/// when they reuse an inode number; `None` where the file system has none.
#[allow(unsafe_code)]
fn inode_generation(file: &File) -> Option<u64> {
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes at most one `long` (file systems write an
    // `int`) through the pointer, which points to a live local of that type.
    let done = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETVERSION, &mut generation) };
    (done == 0).then_some(generation as u64)
}

/// One regular file of the host file system as a [`Backend`].
///
/// Buffered calls (`read_pages`, `write_pages`) use `pread`/`pwrite` on one
/// descriptor; direct calls use a second descriptor of the same file opened with
/// `O_DIRECT`, when the file system supports it (see [`HostFile::has_direct_io`];
/// otherwise they use the buffered descriptor). Punch, zero, collapse and insert
/// are `fallocate` calls.
///
/// The host kernel makes neither a buffered `pread` nor an `O_DIRECT` read atomic
/// against a racing write of the same 4 KiB block, so every data call holds
/// striped block locks (shared to read, exclusive to write), as does every call
/// that zeroes part of a block in place; whole pages are then read and written
/// atomically, which page atomicity (C4) rests on. Calls that change the size
/// exclude writes, so a write never extends the file.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{HostFile, PageCache};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("data");
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(HostFile::create(&path)?))?;
/// file.write_all_at(b"on the host file system", 0)?;
/// file.sync_all()?; // the cache's dirty pages reach the file, and fsync
/// assert_eq!(std::fs::read(&path)?, b"on the host file system");
/// file.punch_hole(0, 4096)?; // fallocate(PUNCH_HOLE | KEEP_SIZE)
/// assert_eq!(std::fs::read(&path)?, [0; 23]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct HostFile {
    /// The buffered descriptor.
    file: File,
    /// The `O_DIRECT` descriptor, if the file system supports direct I/O.
    direct: Option<File>,
    /// The buffer address alignment direct I/O needs.
    dio_mem_align: usize,
    /// The absolute path the file was opened by, for [`Backend::remove`].
    path: Option<PathBuf>,
    removed: AtomicBool,
    /// Serialises [`Backend::remove`], so a path is unlinked at most once.
    remove_lock: Mutex<()>,
    /// Shared by writes and by calls that clamp to the size; exclusive for calls
    /// that change the size.
    size_lock: RwLock<()>,
    block_locks: BlockLocks,
}

impl HostFile {
    /// Opens an existing regular file for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = std::path::absolute(path)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Self::with_path(file, Some(path))
    }

    /// Creates a regular file, or truncates an existing one to zero bytes.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = std::path::absolute(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Self::with_path(file, Some(path))
    }

    /// Wraps an open regular file, which must be readable and writable (for
    /// example a `tempfile::tempfile()`). The backend knows no path for it, so
    /// [`Backend::remove`] only marks it removed; its storage is freed when the
    /// last descriptor of it closes.
    pub fn from_file(file: File) -> io::Result<Self> {
        Self::with_path(file, None)
    }

    fn with_path(file: File, path: Option<PathBuf>) -> io::Result<Self> {
        if !file.metadata()?.is_file() {
            return fail(libc::EINVAL);
        }
        let (direct, dio_mem_align) = open_direct(&file)?;
        Ok(Self {
            file,
            direct,
            dio_mem_align,
            path,
            removed: AtomicBool::new(false),
            remove_lock: Mutex::new(()),
            size_lock: RwLock::new(()),
            block_locks: BlockLocks::new(),
        })
    }

    /// Whether direct reads and writes bypass the host page cache (`O_DIRECT`).
    /// False on file systems without direct I/O, where they are buffered.
    pub fn has_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// The path the file was opened or created by, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn check_live(&self) -> io::Result<()> {
        if self.removed.load(Ordering::Acquire) {
            return fail(libc::ENOENT);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// `lseek` to data or a hole; `ENXIO` (none there) is `None`.
    fn seek(&self, to: rustix::fs::SeekFrom) -> io::Result<Option<u64>> {
        self.check_live()?;
        match rustix::fs::seek(&self.file, to) {
            Ok(at) => Ok(Some(at)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Writes `buf` at `start` through `file`, but only the bytes before the end
    /// of file: a write never extends the file. `EINVAL` if the last page of
    /// `buf` starts at or past the end of file, as for a volume file.
    fn write_below_eof(&self, start: u64, buf: &[u8], direct: bool) -> io::Result<()> {
        let end = end_of(start, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let _size = self.size_lock.read();
        let size = self.size()?;
        if end - PAGE >= size {
            return fail(libc::EINVAL);
        }
        let inside = (end.min(size) - start) as usize;
        let _blocks = self.block_locks.exclusive(start, buf.len() as u64);
        match (&self.direct, direct) {
            (Some(direct), true) => {
                // O_DIRECT moves whole blocks: the part of a straddling last page
                // that lies inside the file goes through the buffered descriptor.
                let whole = inside / PAGE_SIZE * PAGE_SIZE;
                self.write_direct_aligned(direct, &buf[..whole], start)?;
                self.file
                    .write_all_at(&buf[whole..inside], start + whole as u64)
            }
            _ => self.file.write_all_at(&buf[..inside], start),
        }
    }

    /// An `O_DIRECT` write, bounced through an aligned buffer if `buf` is not
    /// aligned as the file system needs.
    fn write_direct_aligned(&self, direct: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.as_ptr() as usize % self.dio_mem_align == 0 {
            return direct.write_all_at(buf, offset);
        }
        let bounce = AlignedBuf::from_slice(buf, self.dio_mem_align);
        direct.write_all_at(&bounce, offset)
    }

    /// An `O_DIRECT` read to the end of file, bounced like
    /// [`HostFile::write_direct_aligned`]; bytes past the end of file read zero.
    fn read_direct_aligned(&self, direct: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.as_ptr() as usize % self.dio_mem_align == 0 {
            return read_to_eof(direct, buf, offset, true);
        }
        let mut bounce = AlignedBuf::new(buf.len(), self.dio_mem_align);
        read_to_eof(direct, &mut bounce, offset, true)?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    /// `fallocate` of `offset..offset + len` clamped to the end of file, for
    /// modes that keep the size (punch and zero): nothing past the end of file
    /// needs changing, and clamping keeps huge lengths below the kernel's limit.
    fn fallocate_in_file(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        self.check_live()?;
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        let _size = self.size_lock.read();
        let end = end.min(self.size()?);
        if offset >= end {
            return Ok(());
        }
        // Partial blocks at the edges are zeroed in place in the host page cache,
        // where a racing read could see half of it: lock them.
        let mut edges = Stripes::default();
        if offset % PAGE != 0 {
            edges = edges.union(Stripes::of(offset, 1));
        }
        if end % PAGE != 0 {
            edges = edges.union(Stripes::of(end - 1, 1));
        }
        let _blocks = self.block_locks.exclusive_stripes(edges);
        fallocate(
            &self.file,
            mode | FallocateFlags::KEEP_SIZE,
            offset,
            end - offset,
        )?;
        Ok(())
    }

    /// `fallocate` with a mode that moves data and changes the size (collapse,
    /// insert), after the checks every backend makes.
    fn fallocate_shift(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        self.check_live()?;
        if offset % PAGE != 0 || len % PAGE != 0 || len == 0 || offset.checked_add(len).is_none() {
            return fail(libc::EINVAL);
        }
        let _size = self.size_lock.write();
        if mode == FallocateFlags::INSERT_RANGE {
            // The kernel's own limit may be larger on other file systems.
            let size = self.size()?;
            let grown = size
                .checked_add(len)
                .filter(|&grown| grown <= MAX_FILE_SIZE);
            if offset < size && grown.is_none() {
                return fail(libc::EFBIG);
            }
        }
        fallocate(&self.file, mode, offset, len)?;
        Ok(())
    }
}

/// Opens the `O_DIRECT` descriptor of `file` through `/proc/self/fd`, which
/// reaches the same inode even if its path changed. Returns `None` if the file
/// system has no direct I/O, or only with offsets coarser than a page.
fn open_direct(file: &File) -> io::Result<(Option<File>, usize)> {
    let mut mem_align = DEFAULT_DIO_MEM_ALIGN;
    // STATX_DIOALIGN (Linux 6.1) tells whether and how direct I/O works here.
    if let Ok(stat) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if stat.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
            let offset_align = u64::from(stat.stx_dio_offset_align);
            if offset_align == 0 || offset_align > PAGE || PAGE % offset_align != 0 {
                return Ok((None, mem_align));
            }
            mem_align = (stat.stx_dio_mem_align as usize).max(1);
        }
    }
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match opened {
        Ok(direct) => Ok((Some(direct), mem_align)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok((None, mem_align)),
        Err(error) => Err(error),
    }
}

/// The end of `len` bytes at `offset`, or `EINVAL` if it overflows.
fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| err(libc::EINVAL))
}

/// The byte offset of page `index`, checking that `len` is whole pages and the
/// span fits (`EINVAL` otherwise).
fn page_start(index: u64, len: usize) -> io::Result<u64> {
    if len % PAGE_SIZE != 0 {
        return fail(libc::EINVAL);
    }
    let start = index.checked_mul(PAGE).ok_or_else(|| err(libc::EINVAL))?;
    end_of(start, len)?;
    Ok(start)
}

/// Checks a direct I/O's alignment (`EINVAL` unless whole pages at a page offset).
fn check_direct(offset: u64, len: usize) -> io::Result<()> {
    if offset % PAGE != 0 || len % PAGE_SIZE != 0 {
        return fail(libc::EINVAL);
    }
    end_of(offset, len).map(drop)
}

/// Fills `buf` from `offset`, zeroing what lies past the end of file. An
/// `O_DIRECT` read that stops inside a page has reached the end of file (a retry
/// there would fail with `EINVAL`); a regular file reads short only there, or at
/// the kernel's cap of one read, which is page-aligned.
fn read_to_eof(file: &File, buf: &mut [u8], offset: u64, direct: bool) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if direct && done % PAGE_SIZE != 0 {
                    break;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

impl std::fmt::Debug for HostFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFile")
            .field("path", &self.path)
            .field("direct_io", &self.has_direct_io())
            .field("removed", &self.removed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Backend for HostFile {
    fn len(&self) -> io::Result<u64> {
        self.check_live()?;
        self.size()
    }

    /// The host's `lseek(SEEK_DATA)`. (The descriptor's offset moves, but no
    /// call here reads or writes at it.)
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(rustix::fs::SeekFrom::Data(offset))
    }

    /// The host's `lseek(SEEK_HOLE)`.
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(rustix::fs::SeekFrom::Hole(offset))
    }

    /// `(2^32 - 1) * 4096` bytes: ext4's limit with 4 KiB blocks.
    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_live()?;
        let start = page_start(index, buf.len())?;
        let _blocks = self.block_locks.shared(start, buf.len() as u64);
        read_to_eof(&self.file, buf, start, false)
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.check_live()?;
        let start = page_start(index, buf.len())?;
        self.write_below_eof(start, buf, false)
    }

    /// `ftruncate`. `EFBIG` past [`Backend::max_file_size`].
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_live()?;
        if len > MAX_FILE_SIZE {
            return fail(libc::EFBIG);
        }
        let _size = self.size_lock.write();
        // A shrink zeroes the tail of the new last block in place.
        let _blocks = (len % PAGE != 0).then(|| self.block_locks.exclusive(len, 1));
        self.file.set_len(len)
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` of the range clamped to the end of file.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_in_file(FallocateFlags::PUNCH_HOLE, offset, len)
    }

    /// `fallocate(ZERO_RANGE | KEEP_SIZE)` of the range clamped to the end of file.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_in_file(FallocateFlags::ZERO_RANGE, offset, len)
    }

    /// `fallocate(COLLAPSE_RANGE)`: `EINVAL` unless page-aligned, `len > 0` and
    /// the range ends before the end of file; `EOPNOTSUPP` on file systems
    /// without it.
    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_shift(FallocateFlags::COLLAPSE_RANGE, offset, len)
    }

    /// `fallocate(INSERT_RANGE)`: `EINVAL` unless page-aligned, `len > 0` and
    /// `offset` is before the end of file; `EFBIG` past the largest size;
    /// `EOPNOTSUPP` on file systems without it.
    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_shift(FallocateFlags::INSERT_RANGE, offset, len)
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_live()?;
        check_direct(offset, buf.len())?;
        let _blocks = self.block_locks.shared(offset, buf.len() as u64);
        match &self.direct {
            Some(direct) => self.read_direct_aligned(direct, buf, offset),
            None => read_to_eof(&self.file, buf, offset, false),
        }
    }

    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_live()?;
        check_direct(offset, buf.len())?;
        self.write_below_eof(offset, buf, true)
    }

    /// `fdatasync`.
    fn sync(&self) -> io::Result<()> {
        self.check_live()?;
        self.file.sync_data()
    }

    /// The host's device and inode number; the version from the inode's
    /// change and modification times, size, creation time and generation, so
    /// a change by another process while the file is closed in the cache, or
    /// a new file that reuses the inode number, is seen at the next open
    /// (close-to-open consistency). A change made while the cache has the file
    /// open is not seen: the host file must then change only through it.
    fn identity(&self) -> io::Result<Option<crate::FileIdentity>> {
        self.check_live()?;
        let stat = rustix::fs::statx(
            &self.file,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::BASIC_STATS | StatxFlags::BTIME,
        )?;
        // Nanoseconds since the epoch: one number per time (an exclusive or
        // of the two parts would let two times share one).
        let nanos = |t: rustix::fs::StatxTimestamp| {
            (t.tv_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(u64::from(t.tv_nsec))
        };
        let device = u64::from(stat.stx_dev_major) << 32 | u64::from(stat.stx_dev_minor);
        let mut rest = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(
            &(
                nanos(stat.stx_mtime),
                stat.stx_size,
                nanos(stat.stx_btime),
                inode_generation(&self.file),
            ),
            &mut rest,
        );
        Ok(Some(crate::FileIdentity {
            file: u128::from(device) << 64 | u128::from(stat.stx_ino),
            version: u128::from(nanos(stat.stx_ctime)) << 64
                | u128::from(std::hash::Hasher::finish(&rest)),
        }))
    }

    /// Unlinks the path the file was opened by (a symbolic link, not its
    /// target), unless that path now leads to another file, which is left alone;
    /// then fails every later call with `ENOENT`. The storage is freed when the
    /// last descriptor of the file closes.
    fn remove(&self) -> io::Result<()> {
        let _removing = self.remove_lock.lock();
        self.check_live()?;
        if let Some(path) = &self.path {
            let ours = self.file.metadata()?;
            match std::fs::metadata(path) {
                Ok(named) if named.dev() == ours.dev() && named.ino() == ours.ino() => {
                    std::fs::remove_file(path)?;
                }
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        self.removed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn errno<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
        result.unwrap_err().raw_os_error().expect("an errno")
    }

    fn temp() -> HostFile {
        HostFile::from_file(tempfile::tempfile().unwrap()).unwrap()
    }

    fn read(file: &HostFile, index: u64, pages: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; pages * PAGE_SIZE];
        file.read_pages(index, &mut buf).unwrap();
        buf
    }

    /// A file of `pages` pages, page i filled with byte `i + 1`.
    fn filled(pages: u64) -> HostFile {
        let file = temp();
        file.set_len(pages * PAGE).unwrap();
        let data: Vec<u8> = (0..pages).flat_map(|i| [i as u8 + 1; PAGE_SIZE]).collect();
        file.write_pages(0, &data).unwrap();
        file
    }

    /// The fill byte of every page, or `None` for a page that is not uniform.
    fn fills(data: &[u8]) -> Vec<Option<u8>> {
        data.chunks(PAGE_SIZE)
            .map(|page| page.iter().all(|&b| b == page[0]).then_some(page[0]))
            .collect()
    }

    #[test]
    fn buffered_and_direct_round_trip() {
        let file = temp();
        if file.has_direct_io() {
            let flags = rustix::fs::fcntl_getfl(file.direct.as_ref().unwrap()).unwrap();
            assert!(flags.contains(rustix::fs::OFlags::DIRECT));
        }
        file.set_len(4 * PAGE).unwrap();
        let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        file.write_pages(0, &data).unwrap();
        assert_eq!(read(&file, 0, 4), data);

        let mut aligned = AlignedBuf::new(2 * PAGE_SIZE, PAGE_SIZE);
        file.read_direct(PAGE, aligned.as_mut()).unwrap();
        assert_eq!(aligned.as_mut(), &data[PAGE_SIZE..3 * PAGE_SIZE]);
        aligned.as_mut().fill(5);
        file.write_direct(2 * PAGE, aligned.as_mut()).unwrap();
        assert_eq!(fills(&read(&file, 2, 2)), [Some(5), Some(5)]);

        // A buffer that is not aligned for O_DIRECT is bounced.
        let mut unaligned = vec![0u8; PAGE_SIZE + 1];
        unaligned[1..].fill(6);
        file.write_direct(0, &unaligned[1..]).unwrap();
        assert_eq!(read(&file, 0, 1), [6; PAGE_SIZE]);
        unaligned.fill(0);
        file.read_direct(2 * PAGE, &mut unaligned[1..]).unwrap();
        assert_eq!(unaligned[1..], [5; PAGE_SIZE]);
        assert_eq!(file.len().unwrap(), 4 * PAGE);
        file.sync().unwrap();
    }

    #[test]
    fn reads_past_eof_are_zero_and_writes_never_extend() {
        let file = filled(2);
        file.set_len(PAGE + 100).unwrap();
        let data = read(&file, 0, 3);
        assert_eq!(fills(&data[..PAGE_SIZE]), [Some(1)]);
        assert_eq!(&data[PAGE_SIZE..PAGE_SIZE + 100], &[2; 100]);
        assert!(data[PAGE_SIZE + 100..].iter().all(|&b| b == 0));
        assert_eq!(read(&file, 1 << 20, 1), [0; PAGE_SIZE]);

        let mut direct = AlignedBuf::new(3 * PAGE_SIZE, PAGE_SIZE);
        direct.as_mut().fill(0xAA);
        file.read_direct(0, direct.as_mut()).unwrap();
        assert_eq!(direct.as_mut(), &data[..]);

        // Only the bytes before the end of file are written.
        file.write_pages(1, &[3; PAGE_SIZE]).unwrap();
        assert_eq!(file.len().unwrap(), PAGE + 100);
        let mut page = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
        page.as_mut().fill(4);
        file.write_direct(PAGE, page.as_mut()).unwrap();
        assert_eq!(file.len().unwrap(), PAGE + 100);
        file.set_len(2 * PAGE).unwrap();
        let last = read(&file, 1, 1);
        assert_eq!(&last[..100], &[4; 100]);
        assert!(last[100..].iter().all(|&b| b == 0));

        // Pages that start at or past the end of file, and bad arguments.
        assert_eq!(errno(file.write_pages(2, &[1; PAGE_SIZE])), libc::EINVAL);
        assert_eq!(
            errno(file.write_direct(2 * PAGE, page.as_mut())),
            libc::EINVAL
        );
        assert_eq!(errno(file.write_pages(0, &[1; 100])), libc::EINVAL);
        assert_eq!(errno(file.read_pages(0, &mut [0; 100])), libc::EINVAL);
        assert_eq!(
            errno(file.read_pages(u64::MAX / PAGE, &mut [0; PAGE_SIZE])),
            libc::EINVAL
        );
        assert_eq!(
            errno(file.read_pages(u64::MAX, &mut [0; PAGE_SIZE])),
            libc::EINVAL
        );
        assert_eq!(errno(file.read_direct(100, page.as_mut())), libc::EINVAL);
        assert_eq!(
            errno(file.write_direct(u64::MAX - PAGE + 1, page.as_mut())),
            libc::EINVAL
        );
        assert_eq!(file.len().unwrap(), 2 * PAGE);
    }

    #[test]
    fn punch_and_zero_keep_the_size_and_clamp_to_eof() {
        let file = filled(4);
        let blocks = file.file.metadata().unwrap().blocks();
        // The last 100 bytes of page 0, all of page 1, the first 100 of page 2.
        file.punch_hole(PAGE - 100, PAGE + 200).unwrap();
        let data = read(&file, 0, 4);
        assert_eq!(&data[..PAGE_SIZE - 100], &[1; PAGE_SIZE - 100][..]);
        assert!(data[PAGE_SIZE - 100..2 * PAGE_SIZE + 100]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            &data[2 * PAGE_SIZE + 100..3 * PAGE_SIZE],
            &[3; PAGE_SIZE - 100][..]
        );
        assert_eq!(file.len().unwrap(), 4 * PAGE);
        assert_eq!(
            file.file.metadata().unwrap().blocks(),
            blocks - PAGE / 512,
            "the whole page was deallocated"
        );

        file.zero_range(3 * PAGE + 10, 20).unwrap();
        let last = read(&file, 3, 1);
        assert_eq!(&last[..10], &[4; 10]);
        assert_eq!(&last[10..30], &[0; 20]);
        assert_eq!(&last[30..], &[4; PAGE_SIZE - 30][..]);

        // Nothing, past the end of file, and up to the end of the address space.
        file.punch_hole(0, 0).unwrap();
        file.zero_range(8 * PAGE, PAGE).unwrap();
        file.zero_range(3 * PAGE, u64::MAX - 3 * PAGE).unwrap();
        file.punch_hole(2 * PAGE, u64::MAX - 2 * PAGE).unwrap();
        assert_eq!(file.len().unwrap(), 4 * PAGE);
        assert_eq!(&read(&file, 0, 4)[2 * PAGE_SIZE..], &[0; 2 * PAGE_SIZE][..]);
        assert_eq!(errno(file.punch_hole(u64::MAX, 2)), libc::EINVAL);
        assert_eq!(errno(file.zero_range(2, u64::MAX)), libc::EINVAL);
    }

    #[test]
    fn collapse_and_insert_move_the_data() {
        let file = filled(4);
        file.collapse_range(PAGE, PAGE).unwrap();
        assert_eq!(file.len().unwrap(), 3 * PAGE);
        assert_eq!(fills(&read(&file, 0, 3)), [Some(1), Some(3), Some(4)]);
        file.insert_range(PAGE, 2 * PAGE).unwrap();
        assert_eq!(file.len().unwrap(), 5 * PAGE);
        assert_eq!(
            fills(&read(&file, 0, 5)),
            [Some(1), Some(0), Some(0), Some(3), Some(4)]
        );

        for (offset, len) in [
            (1, PAGE),
            (0, PAGE + 1),
            (0, 0),
            (0, 5 * PAGE),
            (PAGE, 9 * PAGE),
        ] {
            assert_eq!(
                errno(file.collapse_range(offset, len)),
                libc::EINVAL,
                "{offset} {len}"
            );
        }
        for (offset, len) in [(1, PAGE), (0, 1), (0, 0), (5 * PAGE, PAGE)] {
            assert_eq!(
                errno(file.insert_range(offset, len)),
                libc::EINVAL,
                "{offset} {len}"
            );
        }
        assert_eq!(
            errno(file.collapse_range(u64::MAX - PAGE + 1, PAGE)),
            libc::EINVAL
        );
        assert_eq!(
            errno(file.insert_range(0, MAX_FILE_SIZE - 5 * PAGE + PAGE)),
            libc::EFBIG
        );
        assert_eq!(
            errno(file.insert_range(0, u64::MAX - PAGE + 1)),
            libc::EFBIG
        );
        assert_eq!(file.len().unwrap(), 5 * PAGE);
        assert_eq!(
            fills(&read(&file, 0, 5)),
            [Some(1), Some(0), Some(0), Some(3), Some(4)]
        );
    }

    #[test]
    fn set_len_up_to_the_largest_size() {
        let file = filled(2);
        assert_eq!(file.max_file_size(), MAX_FILE_SIZE);
        assert_eq!(errno(file.set_len(MAX_FILE_SIZE + 1)), libc::EFBIG);
        assert_eq!(errno(file.set_len(u64::MAX)), libc::EFBIG);
        file.set_len(MAX_FILE_SIZE).unwrap();
        assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
        assert_eq!(read(&file, MAX_FILE_SIZE / PAGE - 1, 1), [0; PAGE_SIZE]);
        file.set_len(PAGE + 7).unwrap();
        file.set_len(2 * PAGE).unwrap();
        let last = read(&file, 1, 1);
        assert_eq!(&last[..7], &[2; 7]);
        assert!(last[7..].iter().all(|&b| b == 0));
    }

    #[test]
    fn remove_unlinks_and_every_later_call_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let file = HostFile::create(&path).unwrap();
        assert_eq!(file.path(), Some(path.as_path()));
        file.set_len(PAGE).unwrap();
        file.remove().unwrap();
        assert!(!path.exists());
        let mut buf = vec![0; PAGE_SIZE];
        assert_eq!(errno(file.len()), libc::ENOENT);
        assert_eq!(errno(file.read_pages(0, &mut buf)), libc::ENOENT);
        assert_eq!(errno(file.write_pages(0, &buf)), libc::ENOENT);
        assert_eq!(errno(file.read_direct(0, &mut buf)), libc::ENOENT);
        assert_eq!(errno(file.write_direct(0, &buf)), libc::ENOENT);
        assert_eq!(errno(file.set_len(0)), libc::ENOENT);
        assert_eq!(errno(file.punch_hole(0, 1)), libc::ENOENT);
        assert_eq!(errno(file.zero_range(0, 1)), libc::ENOENT);
        assert_eq!(errno(file.collapse_range(0, PAGE)), libc::ENOENT);
        assert_eq!(errno(file.insert_range(0, PAGE)), libc::ENOENT);
        assert_eq!(errno(file.sync()), libc::ENOENT);
        assert_eq!(errno(file.remove()), libc::ENOENT);

        // A path that now names another file is left alone.
        let file = HostFile::create(&path).unwrap();
        std::fs::write(dir.path().join("other"), b"other").unwrap();
        std::fs::rename(dir.path().join("other"), &path).unwrap();
        file.remove().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"other");

        let anonymous = temp();
        anonymous.remove().unwrap();
        assert_eq!(errno(anonymous.len()), libc::ENOENT);
    }

    #[test]
    fn open_create_and_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        assert_eq!(
            HostFile::open(&path).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let file = HostFile::create(&path).unwrap();
        file.set_len(PAGE).unwrap();
        file.write_pages(0, &[8; PAGE_SIZE]).unwrap();
        drop(file);
        let file = HostFile::open(&path).unwrap();
        assert_eq!(read(&file, 0, 1), [8; PAGE_SIZE]);
        let file = HostFile::create(&path).unwrap();
        assert_eq!(file.len().unwrap(), 0, "create truncates");
        assert!(format!("{file:?}").contains("HostFile"));
        let directory = File::open(dir.path()).unwrap();
        assert_eq!(errno(HostFile::from_file(directory)), libc::EINVAL);
    }

    #[test]
    fn a_page_read_never_sees_half_a_write() {
        let file = temp();
        file.set_len(4 * PAGE).unwrap();
        // Tears are rare (a fraction of a percent of racing reads tear without the
        // block locks), so this takes many rounds; most writes are buffered because
        // direct ones are slow and race less.
        let rounds = 30_000u32;
        let file = &file;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut page = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
                for i in 0..rounds {
                    page.as_mut().fill((i % 251) as u8 + 1);
                    if i % 8 != 0 {
                        file.write_pages(1, page.as_mut()).unwrap();
                    } else {
                        file.write_direct(PAGE, page.as_mut()).unwrap();
                    }
                }
            });
            for direct in [false, true] {
                scope.spawn(move || {
                    let mut page = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
                    for _ in 0..rounds {
                        let buf = page.as_mut();
                        if direct {
                            file.read_direct(PAGE, buf).unwrap();
                        } else {
                            file.read_pages(1, buf).unwrap();
                        }
                        assert!(buf.iter().all(|&b| b == buf[0]), "torn page read");
                    }
                });
            }
        });
    }
}
