//! [`PassthroughFs`]: a host directory as a FUSE file system, its regular
//! files cached by one [`PageCache`].
//!
//! The namespace is the directory's own. Inodes follow libfuse's
//! `passthrough_ll` (see [`inodes`]): an `O_PATH` descriptor per inode the
//! kernel knows, every call made with the `*at` calls relative to it or its
//! parent's, and `/proc/self/fd/N` where a call needs a path, so a rename on
//! the host breaks no inode the kernel holds. The data of every regular file
//! goes through its one mapping of the cache, of a [`HostFile`] ([`PageCache::open`]
//! shares it between opens by the host's device and inode, and keeps its
//! pages after the last close while the host file stays unchanged): every
//! open is a [`filemap::FileHandle`] of it, served by the requests
//! [`crate::open_files`] writes.

mod backend;
mod inodes;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use filemap::{FileIdentity, HostFile, Mapping, PageCache};
use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, Request, TimeOrNow,
};
use parking_lot::Mutex;
use rustix::fs::{AtFlags, Gid, Mode, OFlags, SeekFrom, Statx, StatxTimestamp, Timespec, Uid};

use self::backend::{
    file_key, key_in, refuses_writing, reopen, statx_of, write_back, HostBackend, Named,
};
use self::inodes::{Inode, Inodes, ROOT};
use crate::notify::{serving_kernel, InodeOf};
use crate::open_files::{empty, or_errno, OpenFiles, SyncsAtUnmount, UnmountSync};

/// How long the kernel may trust a reply: never, since the host directory
/// may change behind its back.
const TTL: Duration = Duration::ZERO;

/// Bytes of directory entries read from the host at a time: about what the
/// kernel's buffer of a `readdir` (a page) holds.
const DIR_BUFFER: usize = 8 << 10;

/// A host directory as a file system.
pub struct PassthroughFs {
    cache: Arc<PageCache>,
    inodes: Arc<Inodes>,
    dirs: OpenDirs,
    /// The open files.
    pub(crate) open: OpenFiles,
    /// Whether a new inode gets its creator as owner: the server is root.
    as_root: bool,
    /// How files are opened: with the kernel's caching off, or on.
    open_flags: FopenFlags,
    /// What the sync at unmount found.
    synced: UnmountSync,
}

/// The open directories, by FUSE handle: each a descriptor of its own, whose
/// offset `readdir` moves.
#[derive(Default)]
struct OpenDirs {
    dirs: Mutex<HashMap<u64, Arc<Mutex<OwnedFd>>>>,
    next: AtomicU64,
}

impl OpenDirs {
    fn insert(&self, fd: OwnedFd) -> fuser::FileHandle {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.dirs.lock().insert(fh, Arc::new(Mutex::new(fd)));
        fuser::FileHandle(fh)
    }

    fn get(&self, fh: fuser::FileHandle) -> Result<Arc<Mutex<OwnedFd>>, Errno> {
        self.dirs.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn remove(&self, fh: fuser::FileHandle) {
        let released = self.dirs.lock().remove(&fh.0);
        drop(released);
    }
}

/// What a `setattr` changes.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

/// The kernel's errno of a host call's.
fn os(error: rustix::io::Errno) -> Errno {
    Errno::from_i32(error.raw_os_error())
}

/// The kernel's type of a host `st_mode`.
fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn system_time(time: StatxTimestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(time.tv_nsec));
    match u64::try_from(time.tv_sec) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(time.tv_sec.unsigned_abs()) + nanos,
    }
}

/// `utimensat`'s value for a time the kernel asks to set, or to keep.
fn timespec(time: Option<TimeOrNow>) -> Timespec {
    let (tv_sec, tv_nsec) = match time {
        None => (0, rustix::fs::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, rustix::fs::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(time)) => match time.duration_since(UNIX_EPOCH) {
            Ok(after) => (after.as_secs() as i64, after.subsec_nanos().into()),
            Err(before) => {
                // Before the epoch: whole seconds down, nanoseconds up.
                let before = before.duration();
                let (secs, nanos) = (before.as_secs() as i64, before.subsec_nanos());
                match nanos {
                    0 => (-secs, 0),
                    _ => (-secs - 1, (1_000_000_000 - nanos).into()),
                }
            }
        },
    };
    Timespec { tv_sec, tv_nsec }
}

/// The kernel's view of host file `stat`, inode `number`, of `size` bytes.
fn fuse_attr(number: u64, stat: &Statx, size: u64) -> FileAttr {
    let born = stat.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0;
    FileAttr {
        ino: INodeNo(number),
        size,
        blocks: stat.stx_blocks,
        atime: system_time(stat.stx_atime),
        mtime: system_time(stat.stx_mtime),
        ctime: system_time(stat.stx_ctime),
        crtime: system_time(if born { stat.stx_btime } else { stat.stx_ctime }),
        kind: kind_of(stat.stx_mode.into()),
        perm: stat.stx_mode & 0o7777,
        nlink: stat.stx_nlink,
        uid: stat.stx_uid,
        gid: stat.stx_gid,
        // The kernel's 32-bit encoding, which glibc's matches in its low half.
        rdev: libc::makedev(stat.stx_rdev_major, stat.stx_rdev_minor) as u32,
        blksize: stat.stx_blksize,
        flags: 0,
    }
}

/// The path that reaches the file of `fd` (an `O_PATH` one too) whatever
/// its names are now.
fn proc_path(fd: impl AsFd) -> String {
    format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())
}

/// `O_PATH` descriptor of `name` in directory `parent`, not following a link.
fn open_path(parent: &Inode, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(&parent.fd, name, flags, Mode::empty()).map_err(os)
}

/// Replies to a request that made or found an inode.
fn entry(reply: ReplyEntry, attr: Result<FileAttr, Errno>) {
    match attr {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(error) => reply.error(error),
    }
}

impl PassthroughFs {
    /// A file system of the host directory `dir`, its files cached by
    /// `cache`. Fails if `dir` cannot be opened or is not a directory.
    /// With `kernel_cache`, files are opened with the kernel's page cache in
    /// front (see [`crate::MountOptions::kernel_cache`]), dropped at each
    /// open: the host may change a file while it is closed, unseen.
    pub fn new(dir: &Path, cache: Arc<PageCache>, kernel_cache: bool) -> io::Result<PassthroughFs> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(dir, flags, Mode::empty())?;
        let stat = statx_of(&fd)?;
        let root = Inode {
            fd,
            key: file_key(&stat),
            kind: FileType::Directory,
        };
        Ok(PassthroughFs {
            cache,
            inodes: Arc::new(Inodes::new(root)),
            dirs: OpenDirs::default(),
            open: OpenFiles::default(),
            as_root: rustix::process::geteuid().is_root(),
            open_flags: match kernel_cache {
                true => FopenFlags::empty(),
                false => FopenFlags::FOPEN_DIRECT_IO,
            },
            synced: UnmountSync::default(),
        })
    }

    /// The FUSE inode of a host file's mapping, for the mount's
    /// [`crate::notify::KernelCache`]: its number if the kernel knows it.
    pub(crate) fn inode_of(&self) -> Box<InodeOf> {
        let inodes = self.inodes.clone();
        Box::new(move |identity: &FileIdentity| inodes.number_of(identity.file))
    }

    /// The kernel's view of `stat`, inode `number`: a regular file's size as
    /// its open mapping sees it, which writes not yet written back moved.
    fn attr_of(&self, number: u64, stat: &Statx) -> FileAttr {
        let mut size = stat.stx_size;
        if kind_of(stat.stx_mode.into()) == FileType::RegularFile {
            if let Ok(Some(mapping)) = self.cache.find(&Named(file_key(stat))) {
                size = mapping.len();
            }
        }
        fuse_attr(number, stat, size)
    }

    /// The attributes of inode `number`.
    fn attr(&self, number: u64, inode: &Inode) -> Result<FileAttr, Errno> {
        let stat = or_errno(statx_of(&inode.fd))?;
        Ok(self.attr_of(number, &stat))
    }

    /// Enters the file of `fd` (an `O_PATH` descriptor) as one more lookup
    /// by the kernel; its attributes.
    fn enter(&self, fd: OwnedFd) -> Result<FileAttr, Errno> {
        let stat = or_errno(statx_of(&fd))?;
        let kind = kind_of(stat.stx_mode.into());
        let number = self.inodes.look_up(fd, file_key(&stat), kind);
        Ok(self.attr_of(number, &stat))
    }

    fn look_up(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let inode = self.inodes.get(parent)?;
        // The root's parent lies outside the directory served.
        let name = match (parent, name.as_bytes()) {
            (ROOT, b"..") => OsStr::new("."),
            _ => name,
        };
        self.enter(open_path(&inode, name)?)
    }

    /// The mapping of regular file `inode`: its open one, or one of a new
    /// [`HostBackend`]. For `write`, the host must let the file be written
    /// (its errno otherwise); if not, a reader gets a read-only backend.
    fn mapping(&self, inode: &Inode, write: bool) -> io::Result<Arc<Mapping>> {
        if let Some(mapping) = self.cache.find(&Named(inode.key))? {
            if write {
                // The host's say, as it gives it to an `open` for writing.
                reopen(&inode.fd, OFlags::RDWR)?;
            }
            return Ok(mapping);
        }
        let backend = match reopen(&inode.fd, OFlags::RDWR) {
            Ok(file) => HostBackend::writable(HostFile::from_file(file)?),
            Err(error) if !write && refuses_writing(&error) => {
                HostBackend::read_only(reopen(&inode.fd, OFlags::RDONLY)?)
            }
            Err(error) => return Err(error),
        };
        self.cache.open(Arc::new(backend))
    }

    /// A FUSE handle of regular file `inode` for `open(2)`'s `flags`.
    fn open_file(&self, inode: &Inode, flags: i32) -> Result<fuser::FileHandle, Errno> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mapping = or_errno(self.mapping(inode, write))?;
        if write && flags & libc::O_TRUNC != 0 {
            or_errno(mapping.set_len(0))?;
        }
        Ok(self.open.insert(&mapping, flags))
    }

    /// Gives a new inode `fd` in `parent` the owner and mode the kernel
    /// asked for: the caller as its user (when the server is root), and as
    /// its group unless the parent passes its own on (set-group-ID); `perm`
    /// whole, which the server's umask may have cut (`None` for a link).
    fn settle_new(
        &self,
        req: &Request,
        parent: &Inode,
        fd: impl AsFd,
        perm: Option<u32>,
    ) -> io::Result<()> {
        let parent_mode = u32::from(statx_of(&parent.fd)?.stx_mode);
        if self.as_root {
            let group = (parent_mode & libc::S_ISGID == 0).then(|| Gid::from_raw(req.gid()));
            let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
            rustix::fs::chownat(&fd, "", Some(Uid::from_raw(req.uid())), group, flags)?;
        }
        let Some(perm) = perm else {
            return Ok(());
        };
        let stat = statx_of(&fd)?;
        let now = u32::from(stat.stx_mode) & 0o7777;
        let wanted = match kind_of(stat.stx_mode.into()) {
            // A directory keeps the set-group-ID bit its parent gave it.
            FileType::Directory => perm | now & libc::S_ISGID,
            // A file keeps the one asked for only in its creator's group.
            _ if stat.stx_gid != req.gid() => perm & !libc::S_ISGID,
            _ => perm,
        };
        if now != wanted {
            rustix::fs::chmod(proc_path(&fd), Mode::from_raw_mode(wanted))?;
        }
        Ok(())
    }

    fn create_file(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        perm: u32,
        flags: i32,
    ) -> Result<(FileAttr, fuser::FileHandle), Errno> {
        let dir = self.inodes.get(parent)?;
        let new = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(&dir.fd, name, new, Mode::from_raw_mode(perm)) {
            Ok(file) => File::from(file),
            Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                // There already: opened as `open` opens it.
                let attr = self.look_up(parent, name)?;
                let opened = self
                    .inodes
                    .get(attr.ino.0)
                    .and_then(|inode| self.open_file(&inode, flags));
                if opened.is_err() {
                    self.inodes.forget(attr.ino.0, 1);
                }
                return Ok((attr, opened?));
            }
            Err(error) => return Err(os(error)),
        };
        or_errno(self.settle_new(req, &dir, &file, Some(perm)))?;
        let path = or_errno(reopen(&file, OFlags::PATH))?;
        let host = or_errno(HostFile::from_file(file))?;
        let mapping = or_errno(self.cache.open(Arc::new(HostBackend::writable(host))))?;
        let attr = self.enter(path.into())?;
        Ok((attr, self.open.insert(&mapping, flags)))
    }

    fn set_attr(
        &self,
        ino: u64,
        change: AttrChange,
        fh: Option<fuser::FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        let inode = self.inodes.get(ino)?;
        let timed = atime.is_some() || mtime.is_some();
        // The file's mapping, for a size or for times: the open file's, or
        // one opened here (which waits for one whose last handle is going
        // to write back).
        let mapping = match (inode.kind, size.is_some() || timed) {
            (FileType::RegularFile, true) => {
                Some(match fh.and_then(|fh| self.open.mapping(fh).ok()) {
                    Some(mapping) => mapping,
                    None => or_errno(self.mapping(&inode, size.is_some()))?,
                })
            }
            _ => None,
        };
        if let (Some(size), Some(mapping)) = (size, &mapping) {
            or_errno(mapping.set_len(size))?;
        }
        if let Some(mode) = mode {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            rustix::fs::chmod(proc_path(&inode.fd), mode).map_err(os)?;
        }
        if uid.is_some() || gid.is_some() {
            let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
            let (uid, gid) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
            rustix::fs::chownat(&inode.fd, "", uid, gid, flags).map_err(os)?;
        }
        if timed {
            if let Some(mapping) = &mapping {
                // Writing the cache's pages back later would move the
                // modification time just set. A failure leaves them dirty,
                // for the next fsync to report.
                let _ = write_back(mapping);
            }
            let times = rustix::fs::Timestamps {
                last_access: timespec(atime),
                last_modification: timespec(mtime),
            };
            let set = match inode.kind {
                // No descriptor of a link reaches it but its own.
                FileType::Symlink => {
                    rustix::fs::utimensat(&inode.fd, "", &times, AtFlags::EMPTY_PATH)
                }
                _ => rustix::fs::utimensat(
                    rustix::fs::CWD,
                    proc_path(&inode.fd),
                    &times,
                    AtFlags::empty(),
                ),
            };
            set.map_err(os)?;
        }
        let mut attr = self.attr(ino, &inode)?;
        if let Some(size) = size {
            attr.size = size;
        }
        Ok(attr)
    }

    /// Makes an inode with `make` in directory `parent` as `name`, settles
    /// its owner and `perm`, and enters it.
    fn make(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        perm: Option<u32>,
        make: impl FnOnce(&Inode) -> rustix::io::Result<()>,
    ) -> Result<FileAttr, Errno> {
        let dir = self.inodes.get(parent)?;
        make(&dir).map_err(os)?;
        let fd = open_path(&dir, name)?;
        or_errno(self.settle_new(req, &dir, &fd, perm))?;
        self.enter(fd)
    }

    fn read_dir(
        &self,
        ino: u64,
        fh: fuser::FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), Errno> {
        let dir = self.dirs.get(fh)?;
        let fd = dir.lock();
        // Offsets are the host's cookies (`d_off`), as `telldir` gives them:
        // a listing carries on after the last entry the kernel took, whatever
        // changed meanwhile.
        rustix::fs::seek(&*fd, SeekFrom::Start(offset)).map_err(os)?;
        let dir_stat = or_errno(statx_of(&*fd))?;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); DIR_BUFFER];
        let mut entries = rustix::fs::RawDir::new(&*fd, &mut buf);
        let mut added = false;
        while let Some(entry) = entries.next() {
            let entry = match entry {
                Ok(entry) => entry,
                // What was read so far is an answer; the error comes again.
                Err(_) if added => break,
                Err(error) => return Err(os(error)),
            };
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            // The inode numbers the kernel would see are the FUSE ones; an
            // entry it never looked up has the host's.
            let number = match name.as_bytes() {
                b"." => ino,
                b".." if ino == ROOT => ROOT,
                _ => self
                    .inodes
                    .number_of(key_in(&dir_stat, entry.ino()))
                    .unwrap_or(entry.ino()),
            };
            let kind = match entry.file_type() {
                rustix::fs::FileType::Unknown => {
                    // Some file systems leave the type to a `stat`.
                    let flags = AtFlags::SYMLINK_NOFOLLOW;
                    match rustix::fs::statat(&*fd, name, flags) {
                        Ok(stat) => kind_of(stat.st_mode),
                        Err(_) => continue,
                    }
                }
                known => kind_of(known.as_raw_mode()),
            };
            if reply.add(INodeNo(number), entry.next_entry_cookie(), kind, name) {
                break;
            }
            added = true;
        }
        Ok(())
    }
}

impl fuser::Filesystem for PassthroughFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Shared maps of files opened with the kernel's caching off; older
        // kernels refuse the flag, and then refuse such maps.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // The kernel keeps its pages when it sees a size change it did not
        // make: its drop races buffered writes (see `crate::notify`), and
        // it is told of the changes made through the library. Changes other
        // programs make to the directory it never saw all of with its cache
        // in front (a change of the bytes alone it never saw).
        let _ = config.add_capabilities(InitFlags::FUSE_EXPLICIT_INVAL_DATA);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        // Unmounting: every file's data into its host file, whoever holds
        // its mapping now; then the host makes it durable.
        self.open.clear();
        let synced = self.cache.sync_all().and_then(|()| {
            let root = (self.inodes.get(ROOT))
                .map_err(|errno| io::Error::from_raw_os_error(errno.code()))?;
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let dir = rustix::fs::openat(&root.fd, ".", flags, Mode::empty())?;
            Ok(rustix::fs::syncfs(dir)?)
        });
        self.synced.record(synced);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.look_up(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        match self
            .inodes
            .get(ino.0)
            .and_then(|inode| self.attr(ino.0, &inode))
        {
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
        serving_kernel();
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        // A new size is answered as set, whatever the library made of it
        // since (see `crate::fs`'s `setattr`).
        match self.set_attr(ino.0, change, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self
            .inodes
            .get(ino.0)
            .and_then(|inode| rustix::fs::readlinkat(&inode.fd, "", Vec::new()).map_err(os));
        match target {
            Ok(target) => reply.data(target.as_bytes()),
            Err(error) => reply.error(error),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let perm = mode & !umask & 0o7777;
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        entry(
            reply,
            self.make(req, parent.0, name, Some(perm), |dir| {
                let perm = Mode::from_raw_mode(perm);
                rustix::fs::mknodat(&dir.fd, name, kind, perm, rdev.into())
            }),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = mode & !umask & 0o7777;
        entry(
            reply,
            self.make(req, parent.0, name, Some(perm), |dir| {
                rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(perm))
            }),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let unlinked = self
            .inodes
            .get(parent.0)
            .and_then(|dir| rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty()).map_err(os));
        empty(reply, unlinked);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self
            .inodes
            .get(parent.0)
            .and_then(|dir| rustix::fs::unlinkat(&dir.fd, name, AtFlags::REMOVEDIR).map_err(os));
        empty(reply, removed);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.make(req, parent.0, link_name, None, |dir| {
                rustix::fs::symlinkat(target, &dir.fd, link_name)
            }),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let Some(flags) = rustix::fs::RenameFlags::from_bits(flags.bits()) else {
            return reply.error(Errno::EINVAL);
        };
        let renamed = self.inodes.get(parent.0).and_then(|from| {
            let to = self.inodes.get(newparent.0)?;
            rustix::fs::renameat_with(&from.fd, name, &to.fd, newname, flags).map_err(os)
        });
        empty(reply, renamed);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let linked = self.inodes.get(ino.0).and_then(|inode| {
            let dir = self.inodes.get(newparent.0)?;
            // By the descriptor (which needs CAP_DAC_READ_SEARCH, `ENOENT`
            // without it), else by its path in /proc.
            let by_fd = rustix::fs::linkat(&inode.fd, "", &dir.fd, newname, AtFlags::EMPTY_PATH);
            match by_fd {
                Err(rustix::io::Errno::NOENT) => rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc_path(&inode.fd),
                    &dir.fd,
                    newname,
                    AtFlags::SYMLINK_FOLLOW,
                ),
                done => done,
            }
            .map_err(os)?;
            self.enter(open_path(&dir, newname)?)
        });
        entry(reply, linked);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        serving_kernel();
        let opened = self
            .inodes
            .get(ino.0)
            .and_then(|inode| self.open_file(&inode, flags.0));
        match opened {
            Ok(fh) => reply.opened(fh, self.open_flags),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        serving_kernel();
        let perm = mode & !umask & 0o7777;
        match self.create_file(req, parent.0, name, perm, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, self.open_flags),
            Err(error) => reply.error(error),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.inodes.get(ino.0).and_then(|inode| {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            rustix::fs::openat(&inode.fd, ".", flags, Mode::empty()).map_err(os)
        });
        match opened {
            Ok(fd) => reply.opened(self.dirs.insert(fd), FopenFlags::empty()),
            Err(error) => reply.error(error),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.read_dir(ino.0, fh, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(fh);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let synced = self.dirs.get(fh).and_then(|dir| {
            let fd = dir.lock();
            match datasync {
                true => rustix::fs::fdatasync(&*fd),
                false => rustix::fs::fsync(&*fd),
            }
            .map_err(os)
        });
        empty(reply, synced);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let stat = self
            .inodes
            .get(ino.0)
            .and_then(|inode| rustix::fs::fstatvfs(&inode.fd).map_err(os));
        match stat {
            Ok(stat) => reply.statfs(
                stat.f_blocks,
                stat.f_bfree,
                stat.f_bavail,
                stat.f_files,
                stat.f_ffree,
                stat.f_bsize as u32,
                stat.f_namemax as u32,
                stat.f_frsize as u32,
            ),
            Err(error) => reply.error(error),
        }
    }

    crate::open_files::serve_open_files!();
}

impl SyncsAtUnmount for PassthroughFs {
    fn unmount_sync(&self) -> UnmountSync {
        self.synced.clone()
    }
}
