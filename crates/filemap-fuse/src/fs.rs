//! [`VolumeFs`]: the kernel's FUSE requests served by a volume and a cache.
//!
//! Inode numbers: the root directory is 1; a file with volume id `id` is
//! `id + 1` (volume ids start at 1). Every open file is a [`FileHandle`] of
//! the file's one mapping ([`PageCache::open`] shares it between opens, and
//! keeps its pages after the last close), so each opener has its own
//! writeback-error cursor, as with `errseq`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
use filemap::{AlignedBuf, Backend, FileHandle, Mapping, PageCache, Volume, VolumeFile};
use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

/// How long the kernel may trust a reply: never, since the library may change
/// the files behind its back (and the cache makes asking cheap).
const TTL: Duration = Duration::ZERO;

/// The volume's block size, reported to `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// The volume's files as a file system.
pub struct VolumeFs {
    volume: Arc<Volume>,
    cache: PageCache,
    /// Every file's name by inode, as looked up, listed or created.
    names: Mutex<HashMap<u64, String>>,
    /// The open files by FUSE file handle.
    open: Mutex<HashMap<u64, OpenFile>>,
    next_handle: AtomicU64,
    /// Owner and times reported for every file (not stored yet).
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

struct OpenFile {
    handle: Arc<FileHandle>,
    /// Opened with `O_DIRECT`: reads and writes go to the cache's direct I/O.
    direct: bool,
}

/// The errno of a filemap error, for the kernel.
fn errno(error: &io::Error) -> Errno {
    Errno::from_i32(filemap::errno(error).unwrap_or(libc::EIO))
}

impl VolumeFs {
    /// A file system of `volume`'s files, cached by `cache`.
    pub fn new(volume: Arc<Volume>, cache: PageCache) -> io::Result<VolumeFs> {
        // SAFETY: `geteuid` and `getegid` only read the process's credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(VolumeFs {
            volume,
            cache,
            names: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            uid,
            gid,
            mounted_at: SystemTime::now(),
        })
    }

    /// The inode of a volume file.
    fn ino_of(file: &VolumeFile) -> io::Result<u64> {
        let identity = file
            .identity()?
            .ok_or_else(|| io::Error::other("no identity"))?;
        // The low half of a volume file's identity is its id.
        Ok((identity.file as u64) + 1)
    }

    /// The file named `name`, entered under its inode.
    fn open_named(&self, name: &str) -> io::Result<(u64, VolumeFile)> {
        let file = self.volume.open_file(name)?;
        let ino = Self::ino_of(&file)?;
        self.names.lock().insert(ino, name.to_owned());
        Ok((ino, file))
    }

    /// The file of inode `ino`, and its mapping.
    fn mapping(&self, ino: u64) -> io::Result<(VolumeFile, Arc<Mapping>)> {
        let name = self.names.lock().get(&ino).cloned();
        let name = name.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let file = self.volume.open_file(&name)?;
        let mapping = self.cache.open(Arc::new(file.clone()))?;
        Ok((file, mapping))
    }

    fn root_attr(&self) -> FileAttr {
        self.attr(INodeNo::ROOT.0, FileType::Directory, 0, 0, 0o755, 2)
    }

    fn attr(
        &self,
        ino: u64,
        kind: FileType,
        size: u64,
        blocks: u64,
        perm: u16,
        nlink: u32,
    ) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// The attributes of file `ino`, its size as its mapping sees it.
    fn file_attr(&self, ino: u64) -> io::Result<FileAttr> {
        let (file, mapping) = self.mapping(ino)?;
        let blocks = file.allocated_blocks()? * u64::from(BLOCK / 512);
        Ok(self.attr(ino, FileType::RegularFile, mapping.len(), blocks, 0o644, 1))
    }

    /// A new FUSE handle for an opener of `mapping`.
    fn new_handle(&self, mapping: &Arc<Mapping>, flags: i32) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let file = OpenFile {
            handle: Arc::new(mapping.handle()),
            direct: flags & libc::O_DIRECT != 0,
        };
        self.open.lock().insert(fh, file);
        fh
    }

    fn opened(&self, fh: u64) -> Result<(Arc<Mapping>, Arc<FileHandle>, bool), Errno> {
        let open = self.open.lock();
        let file = open.get(&fh).ok_or(Errno::EBADF)?;
        Ok((
            file.handle.mapping().clone(),
            file.handle.clone(),
            file.direct,
        ))
    }
}

/// A name the volume can hold: UTF-8.
fn name_of(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

fn is_root(ino: INodeNo) -> bool {
    ino == INodeNo::ROOT
}

impl fuser::Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Shared maps of files opened with the kernel's caching off; older
        // kernels refuse the flag, and then refuse such maps.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        // Unmounting: every mapping of the cache writes back when its last
        // handle goes; the volume commits.
        self.open.lock().clear();
        let _ = self.volume.sync();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if !is_root(parent) {
            return reply.error(Errno::ENOENT);
        }
        let found = name_of(name).and_then(|name| {
            let (ino, _) = self.open_named(name).map_err(|e| errno(&e))?;
            self.file_attr(ino).map_err(|e| errno(&e))
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
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        if is_root(ino) {
            return reply.attr(&TTL, &self.root_attr());
        }
        match self.file_attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(errno(&error)),
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
        _fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if is_root(ino) {
            return reply.error(Errno::EPERM);
        }
        // Not stored yet: refused rather than silently ignored.
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let changed = (|| {
            if let Some(size) = size {
                self.mapping(ino.0)?.1.set_len(size)?;
            }
            self.file_attr(ino.0)
        })();
        match changed {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !is_root(parent) {
            return reply.error(Errno::ENOENT);
        }
        let removed = name_of(name).and_then(|name| {
            self.volume.remove_file(name).map_err(|e| errno(&e))?;
            self.names.lock().retain(|_, known| known != name);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if is_root(ino) {
            return reply.error(Errno::EISDIR);
        }
        match self.mapping(ino.0) {
            Ok((_, mapping)) => {
                let fh = self.new_handle(&mapping, flags.0);
                reply.opened(fuser::FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if !is_root(parent) {
            return reply.error(Errno::ENOENT);
        }
        let created = name_of(name).and_then(|name| {
            let file = self.volume.create_file(name).map_err(|e| errno(&e))?;
            let ino = Self::ino_of(&file).map_err(|e| errno(&e))?;
            self.names.lock().insert(ino, name.to_owned());
            let mapping = self.cache.open(Arc::new(file)).map_err(|e| errno(&e))?;
            let fh = self.new_handle(&mapping, flags);
            let attr = self.file_attr(ino).map_err(|e| errno(&e))?;
            Ok((attr, fh))
        });
        match created {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                fuser::FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
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
        let (mapping, _, direct) = match self.opened(fh.0) {
            Ok(opened) => opened,
            Err(error) => return reply.error(error),
        };
        let read = if direct {
            let mut buf = AlignedBuf::new(size as usize, DIRECT_IO_MEMORY_ALIGN);
            mapping
                .read_direct(&mut buf, offset)
                .map(|n| buf[..n].to_vec())
        } else {
            read_fully(&mapping, offset, size as usize)
        };
        match read {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(errno(&error)),
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
        let (mapping, _, direct) = match self.opened(fh.0) {
            Ok(opened) => opened,
            Err(error) => return reply.error(error),
        };
        let written = if direct {
            let buf = AlignedBuf::from_slice(data, DIRECT_IO_MEMORY_ALIGN);
            mapping.write_direct(&buf, offset)
        } else {
            mapping.write_all_at(data, offset).map(|()| data.len())
        };
        match written {
            Ok(n) => reply.written(n as u32),
            Err(error) => reply.error(errno(&error)),
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
        // The mapping's last handle writes back and keeps its pages cached.
        let released = self.open.lock().remove(&fh.0);
        drop(released);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let synced = self
            .opened(fh.0)
            .and_then(|(_, handle, _)| handle.sync_all().map_err(|e| errno(&e)));
        match synced {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.volume.sync() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if !is_root(ino) {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (INodeNo::ROOT.0, FileType::Directory, ".".to_owned()),
            (INodeNo::ROOT.0, FileType::Directory, "..".to_owned()),
        ];
        for name in self.volume.file_names() {
            if let Ok((ino, _)) = self.open_named(&name) {
                entries.push((ino, FileType::RegularFile, name));
            }
        }
        // The offset of an entry is its place in the list plus one.
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.volume.file_names().len() as u64;
        let free = self.volume.free_blocks();
        reply.statfs(
            self.volume.total_blocks(),
            free,
            free,
            files,
            0,
            BLOCK,
            255,
            BLOCK,
        );
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
        let mapping = match self.opened(fh.0) {
            Ok((mapping, _, _)) => mapping,
            Err(error) => return reply.error(error),
        };
        let end = offset.saturating_add(length);
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let grow = |mapping: &Mapping| match keep_size || end <= mapping.len() {
            true => Ok(()),
            false => mapping.set_len(end),
        };
        let done = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            // Blocks are allocated when written: this only sets the size.
            0 => grow(&mapping),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => mapping.punch_hole(offset, length),
            libc::FALLOC_FL_ZERO_RANGE => {
                grow(&mapping).and_then(|()| mapping.zero_range(offset, length))
            }
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        };
        match done {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(&error)),
        }
    }
}

/// Reads `len` bytes at `offset`, or up to the end of file.
fn read_fully(mapping: &Mapping, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        match mapping.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf.truncate(done);
    Ok(buf)
}
