//! A minimal pass-through FUSE file system: the files of one host directory,
//! every request forwarded to the host file with `pread`, `pwrite`, `fsync`
//! and `ftruncate`. It is the baseline a user-space file system author starts
//! from, and what [`crate::mount`] holds filemap's mount to.
//!
//! It is served exactly as `filemap_fuse` serves a volume, so that the two
//! differ only in what answers a request: the same `fuser` crate and mount
//! options, the same number of threads each reading its own clone of the
//! FUSE descriptor, `FUSE_DIRECT_IO_ALLOW_MMAP` and a 1 MiB `max_write` asked
//! for at `init`, every file opened with `FOPEN_DIRECT_IO` (the kernel's
//! caching off: every read and write reaches the server) and every reply
//! valid for no time at all. The host file under it is cached by the host's
//! page cache, as filemap's image is.
//!
//! What it serves: lookup, getattr, setattr of the size, open, create, read,
//! write, flush, fallocate, fsync and release, in one directory. Everything else is
//! `fuser`'s default (mostly `ENOSYS`). This is not the kernel's FUSE
//! passthrough (`FOPEN_PASSTHROUGH`), which would bypass the server.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// How long the kernel may trust a reply: never, as `filemap_fuse` says.
const TTL: Duration = Duration::ZERO;

/// The largest write the kernel sends in one request, as `filemap_fuse` asks.
const MAX_WRITE: u32 = 1 << 20;

/// The files of one host directory, served as they are.
pub struct Passthrough {
    root: PathBuf,
    inodes: Mutex<Inodes>,
    /// The open host files by FUSE file handle.
    open: Mutex<HashMap<u64, Arc<File>>>,
    next_handle: AtomicU64,
}

/// Inode numbers of the names looked up or created, from 2 up (1 is the
/// directory). A name keeps its number for the life of the mount.
#[derive(Default)]
struct Inodes {
    by_name: HashMap<OsString, u64>,
    names: HashMap<u64, OsString>,
}

impl Inodes {
    /// The inode of `name`, numbered now if it has none yet.
    fn of(&mut self, name: &OsStr) -> u64 {
        if let Some(&ino) = self.by_name.get(name) {
            return ino;
        }
        let ino = self.names.len() as u64 + 2;
        self.by_name.insert(name.to_owned(), ino);
        self.names.insert(ino, name.to_owned());
        ino
    }
}

/// The errno of a host error, for the kernel.
fn errno(error: &io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(libc::EIO))
}

/// A mutex's data, even if a thread panicked holding it: every update here is
/// one map insert or removal, never left half done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Passthrough {
    /// The files of the directory `root`.
    pub fn new(root: &Path) -> Passthrough {
        Passthrough {
            root: root.to_owned(),
            inodes: Mutex::new(Inodes::default()),
            open: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    /// The host path of inode `ino`.
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(self.root.clone());
        }
        let inodes = lock(&self.inodes);
        let name = inodes.names.get(&ino.0).ok_or(Errno::ENOENT)?;
        Ok(self.root.join(name))
    }

    /// The open host file of handle `fh`.
    fn file(&self, fh: fuser::FileHandle) -> Result<Arc<File>, Errno> {
        lock(&self.open).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// A new handle for `file`.
    fn new_handle(&self, file: File) -> fuser::FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(fh, Arc::new(file));
        fuser::FileHandle(fh)
    }

    /// The attributes of inode `ino`, from the open file `fh` if given.
    fn attr(&self, ino: INodeNo, fh: Option<fuser::FileHandle>) -> Result<FileAttr, Errno> {
        let metadata = match fh {
            Some(fh) => self.file(fh)?.metadata(),
            None => std::fs::metadata(self.path(ino)?),
        };
        Ok(attr_of(ino, &metadata.map_err(|e| errno(&e))?))
    }

    /// The host path of `name` in the directory `parent` (the only one).
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        if parent != INodeNo::ROOT {
            return Err(Errno::ENOENT);
        }
        Ok(self.root.join(name))
    }
}

/// The attributes the kernel is told of a host file (or the directory).
fn attr_of(ino: INodeNo, metadata: &Metadata) -> FileAttr {
    let time = |t: io::Result<SystemTime>| t.unwrap_or(SystemTime::UNIX_EPOCH);
    FileAttr {
        ino,
        size: metadata.len(),
        blocks: metadata.blocks(),
        atime: time(metadata.accessed()),
        mtime: time(metadata.modified()),
        ctime: SystemTime::UNIX_EPOCH + Duration::from_secs(metadata.ctime().max(0) as u64),
        crtime: time(metadata.created()),
        kind: if metadata.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (metadata.mode() & 0o7777) as u16,
        nlink: metadata.nlink() as u32,
        uid: metadata.uid(),
        gid: metadata.gid(),
        rdev: metadata.rdev() as u32,
        blksize: metadata.blksize() as u32,
        flags: 0,
    }
}

/// Options opening a host file for the open flags `flags` (their access mode;
/// `O_DIRECT` is not forwarded: the server's buffers are not aligned for it).
fn options_for(flags: i32) -> OpenOptions {
    let mut options = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => options.write(true),
        libc::O_RDWR => options.read(true).write(true),
        _ => options.read(true),
    };
    options
}

impl fuser::Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // What `filemap_fuse` asks for, so both are served alike.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.child(parent, name).and_then(|path| {
            let metadata = std::fs::metadata(path).map_err(|e| errno(&e))?;
            let ino = INodeNo(lock(&self.inodes).of(name));
            Ok(attr_of(ino, &metadata))
        });
        match found {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.attr(ino, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size only, as `filemap_fuse`: the rest is refused, not ignored.
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let changed = (|| {
            if let Some(size) = size {
                let file = match fh {
                    Some(fh) => self.file(fh)?,
                    None => {
                        let path = self.path(ino)?;
                        Arc::new(
                            options_for(libc::O_WRONLY)
                                .open(path)
                                .map_err(|e| errno(&e))?,
                        )
                    }
                };
                file.set_len(size).map_err(|e| errno(&e))?;
            }
            self.attr(ino, fh)
        })();
        match changed {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self
            .path(ino)
            .and_then(|path| options_for(flags.0).open(path).map_err(|e| errno(&e)));
        match opened {
            Ok(file) => reply.opened(self.new_handle(file), FopenFlags::FOPEN_DIRECT_IO),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self.child(parent, name).and_then(|path| {
            let file = options_for(flags)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .truncate(flags & libc::O_TRUNC != 0)
                .mode(mode & !umask)
                .open(path)
                .map_err(|e| errno(&e))?;
            let ino = INodeNo(lock(&self.inodes).of(name));
            let attr = attr_of(ino, &file.metadata().map_err(|e| errno(&e))?);
            Ok((attr, self.new_handle(file)))
        });
        match created {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let read = self
            .file(fh)
            .and_then(|file| read_fully(&file, offset, size as usize).map_err(|e| errno(&e)));
        match read {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self
            .file(fh)
            .and_then(|file| file.write_all_at(data, offset).map_err(|e| errno(&e)));
        match written {
            Ok(()) => reply.written(data.len() as u32),
            Err(error) => reply.error(error),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let done = self.file(fh).and_then(|file| {
            let mode =
                rustix::fs::FallocateFlags::from_bits(mode as u32).ok_or(Errno::EOPNOTSUPP)?;
            rustix::fs::fallocate(&*file, mode, offset, length)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match done {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let synced = self.file(fh).and_then(|file| {
            let synced = if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            };
            synced.map_err(|e| errno(&e))
        });
        match synced {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let released = lock(&self.open).remove(&fh.0);
        drop(released);
        reply.ok();
    }
}

/// Reads `len` bytes at `offset`, or up to the end of file.
fn read_fully(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Mounts the files of `root` at `mountpoint`, served by `threads` threads in
/// the background until the session is unmounted or dropped: the mount
/// options, threads and descriptors `filemap_fuse::mount` uses.
pub fn mount(
    root: &Path,
    mountpoint: &Path,
    threads: usize,
) -> io::Result<fuser::BackgroundSession> {
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: not a directory", root.display()),
        ));
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(root.display().to_string()),
        fuser::MountOption::Subtype("passthrough".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let naming = |error: io::Error| {
        io::Error::new(error.kind(), format!("{}: {error}", mountpoint.display()))
    };
    fuser::Session::new(Passthrough::new(root), mountpoint, &config)
        .map_err(naming)?
        .spawn()
}
