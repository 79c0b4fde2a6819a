//! The pass-through's backends: [`HostBackend`], a host file that the host
//! may let this process only read, and [`Named`], which names a host file
//! to the cache without opening it.

use std::cell::Cell;
use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use filemap::{Backend, FileIdentity, HostFile, Mapping, PAGE_SIZE};
use parking_lot::Mutex;
use rustix::fs::{AtFlags, Mode, OFlags, SeekFrom, Statx, StatxFlags, StatxTimestamp};

/// `HostFile`'s largest size, `(2^32 - 1)` pages: a file opened read-only
/// promises the same, so its mapping's limit holds once it becomes writable.
const MAX_FILE_SIZE: u64 = (1 << 44) - PAGE_SIZE as u64;

fn fail<T>(errno: i32) -> io::Result<T> {
    Err(io::Error::from_raw_os_error(errno))
}

/// Whether `error` is the host refusing to let this process write a file it
/// may read (a read-only file system, an immutable file, a mode without
/// write permission, a running program).
pub(super) fn refuses_writing(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)
    )
}

/// Opens the file of descriptor `fd` (an `O_PATH` one too) afresh with
/// `flags`, through `/proc/self/fd`: the same inode, whatever its names are
/// now, with the host's permission checks of an `open`.
pub(super) fn reopen(fd: impl AsFd, flags: OFlags) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    Ok(rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty())?.into())
}

/// The host's `statx` of `fd` (an `O_PATH` one too), not following a link.
pub(super) fn statx_of(fd: impl AsFd) -> io::Result<Statx> {
    Ok(rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )?)
}

/// Which host file `stat` is, as [`HostFile`]'s identity names it (device,
/// then inode number): every open of one file shares one mapping, whichever
/// backend opened it first.
pub(super) fn file_key(stat: &Statx) -> u128 {
    key_in(stat, stat.stx_ino)
}

/// Which host file inode number `ino` on the device of `stat` is.
pub(super) fn key_in(stat: &Statx, ino: u64) -> u128 {
    let device = u64::from(stat.stx_dev_major) << 32 | u64::from(stat.stx_dev_minor);
    u128::from(device) << 64 | u128::from(ino)
}

thread_local! {
    /// Whether a sync on this thread only writes back, leaving durability
    /// to the host (see [`write_back`]).
    static WRITE_BACK_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Writes `mapping`'s dirty pages back to the host file, and waits for
/// writeback already under way, without `fdatasync`: before its times are
/// set, so no later write of the cache's pages moves them.
pub(super) fn write_back(mapping: &Mapping) -> io::Result<()> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            WRITE_BACK_ONLY.with(|only| only.set(false));
        }
    }
    WRITE_BACK_ONLY.with(|only| only.set(true));
    let _reset = Reset;
    mapping.sync_all()
}

/// A host file as a backend: a [`HostFile`] while the host lets this process
/// write it; otherwise a read-only descriptor, and every call that would
/// change the file first reopens it for writing, failing with the host's
/// errno while the host still refuses.
#[derive(Debug)]
pub(super) struct HostBackend {
    /// Every call, once set.
    writable: OnceLock<HostFile>,
    /// Reads, until `writable` is set; `None` if it was from the start.
    readable: Option<File>,
    /// Serialises reopening for writing.
    reopening: Mutex<()>,
}

impl HostBackend {
    pub(super) fn writable(file: HostFile) -> HostBackend {
        HostBackend {
            writable: OnceLock::from(file),
            readable: None,
            reopening: Mutex::new(()),
        }
    }

    /// `file`, a regular file opened read-only.
    pub(super) fn read_only(file: File) -> HostBackend {
        HostBackend {
            writable: OnceLock::new(),
            readable: Some(file),
            reopening: Mutex::new(()),
        }
    }

    /// What serves reads now.
    fn reader(&self) -> Reader<'_> {
        match (self.writable.get(), &self.readable) {
            (Some(host), _) => Reader::Host(host),
            (None, Some(file)) => Reader::ReadOnly(file),
            (None, None) => unreachable!("a host backend has a file"),
        }
    }

    /// The [`HostFile`], reopening the file for writing if it was read-only.
    fn for_writing(&self) -> io::Result<&HostFile> {
        if let Some(host) = self.writable.get() {
            return Ok(host);
        }
        let _reopening = self.reopening.lock();
        let file = match self.reader() {
            Reader::Host(host) => return Ok(host),
            Reader::ReadOnly(file) => reopen(file, OFlags::RDWR)?,
        };
        let host = HostFile::from_file(file)?;
        Ok(self.writable.get_or_init(|| host))
    }
}

/// What serves a [`HostBackend`]'s reads.
enum Reader<'a> {
    Host(&'a HostFile),
    ReadOnly(&'a File),
}

/// Reads `buf` at `offset` of `file`, zeroing what lies past the end.
fn read_to_eof(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// `lseek` to data or a hole; `ENXIO` (none there) is `None`.
fn seek(file: &File, to: SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, to) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// `FS_IOC_GETVERSION`, `_IOR('v', 1, long)`.
const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;

/// The inode's generation, which file systems change when they reuse an
/// inode number; `None` where the file system has none.
fn inode_generation(file: &File) -> Option<u64> {
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes at most one `long` (file systems write an
    // `int`) through the pointer, which points to a live local of that type.
    let done = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETVERSION, &mut generation) };
    (done == 0).then_some(generation as u64)
}

/// The identity of a file opened read-only: the `file` [`HostFile`] gives
/// it, and a version from the same times, size and generation. Versions are not equal
/// to `HostFile`'s for the same contents (a reopen by the other kind of
/// backend reads afresh), and both start with the change time, so they are
/// never equal for different contents.
fn read_only_identity(file: &File) -> io::Result<FileIdentity> {
    let stat = statx_of(file)?;
    let nanos =
        |t: StatxTimestamp| (t.tv_sec as u64).wrapping_mul(1_000_000_000) ^ u64::from(t.tv_nsec);
    let mut rest = DefaultHasher::new();
    (
        "read-only",
        nanos(stat.stx_mtime),
        stat.stx_size,
        nanos(stat.stx_btime),
        inode_generation(file),
    )
        .hash(&mut rest);
    Ok(FileIdentity {
        file: file_key(&stat),
        version: u128::from(nanos(stat.stx_ctime)) << 64 | u128::from(rest.finish()),
    })
}

impl Backend for HostBackend {
    fn len(&self) -> io::Result<u64> {
        match self.reader() {
            Reader::ReadOnly(file) => Ok(file.metadata()?.len()),
            Reader::Host(host) => host.len(),
        }
    }

    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.reader() {
            Reader::ReadOnly(file) => match index.checked_mul(PAGE_SIZE as u64) {
                Some(offset) if buf.len() % PAGE_SIZE == 0 => read_to_eof(file, buf, offset),
                _ => fail(libc::EINVAL),
            },
            Reader::Host(host) => host.read_pages(index, buf),
        }
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.for_writing()?.write_pages(index, buf)
    }

    fn write_back_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.for_writing()?.write_back_pages(index, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.for_writing()?.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.for_writing()?.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.for_writing()?.zero_range(offset, len)
    }

    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.for_writing()?.collapse_range(offset, len)
    }

    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.for_writing()?.insert_range(offset, len)
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.reader() {
            Reader::ReadOnly(_) => self.read_pages(offset / PAGE_SIZE as u64, buf),
            Reader::Host(host) => host.read_direct(offset, buf),
        }
    }

    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.for_writing()?.write_direct(offset, buf)
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.reader() {
            Reader::ReadOnly(file) => seek(file, SeekFrom::Data(offset)),
            Reader::Host(host) => host.seek_data(offset),
        }
    }

    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.reader() {
            Reader::ReadOnly(file) => seek(file, SeekFrom::Hole(offset)),
            Reader::Host(host) => host.seek_hole(offset),
        }
    }

    fn touch(&self) -> io::Result<()> {
        match self.writable.get() {
            Some(host) => host.touch(),
            None => Ok(()),
        }
    }

    /// `fdatasync`, unless this thread only writes back (see [`write_back`]).
    fn sync(&self) -> io::Result<()> {
        if WRITE_BACK_ONLY.with(Cell::get) {
            return Ok(());
        }
        match self.reader() {
            Reader::ReadOnly(file) => file.sync_data(),
            Reader::Host(host) => host.sync(),
        }
    }

    fn remove(&self) -> io::Result<()> {
        self.for_writing()?.remove()
    }

    fn identity(&self) -> io::Result<Option<FileIdentity>> {
        match self.reader() {
            Reader::ReadOnly(file) => read_only_identity(file).map(Some),
            Reader::Host(host) => host.identity(),
        }
    }
}

/// A host file named by its identity's `file`, for [`filemap::PageCache::find`],
/// which asks a backend nothing else: opening the file to ask would cost two
/// descriptors and a `statx` per `stat`. Every other call fails (`EBADF`).
#[derive(Debug)]
pub(super) struct Named(pub(super) u128);

impl Backend for Named {
    fn len(&self) -> io::Result<u64> {
        fail(libc::EBADF)
    }

    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn read_pages(&self, _index: u64, _buf: &mut [u8]) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn write_pages(&self, _index: u64, _buf: &[u8]) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn sync(&self) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn remove(&self) -> io::Result<()> {
        fail(libc::EBADF)
    }

    fn identity(&self) -> io::Result<Option<FileIdentity>> {
        Ok(Some(FileIdentity {
            file: self.0,
            version: 0,
        }))
    }
}
