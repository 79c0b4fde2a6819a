//! [`VolumeFs`]: the kernel's FUSE requests served by a volume and a cache.
//!
//! Inode numbers are the volume's: the root directory is 1 for both. The
//! namespace (lookups, directories, links, renames, attributes) is the
//! volume's own, under its lock; the data of every regular file goes through
//! the file's one mapping of the cache ([`PageCache::open`] shares it between
//! opens, and keeps its pages after the last close). Every open is a
//! [`FileHandle`] of that mapping, so each opener has its own
//! writeback-error cursor, as with `errseq`.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::notify::serving_kernel;
use crate::open_files::{empty, errno, or_errno, OpenFiles, SyncsAtUnmount, UnmountSync};
use filemap::{Attr, FileKind, RenameFlags, SetAttr, Timestamp};
use filemap::{Mapping, PageCache, Volume};
use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, Request, TimeOrNow,
};

/// How long the kernel may trust a reply: never, since the library may change
/// the files behind its back (and the cache makes asking cheap).
const TTL: Duration = Duration::ZERO;

/// The volume's block size, reported to `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// Entries a `readdir` reply takes from the volume at a time: the kernel's
/// buffer (a page) holds about this many entries of short names.
const DIR_BATCH: usize = 128;

/// The volume's files as a file system.
pub struct VolumeFs {
    volume: Arc<Volume>,
    cache: Arc<PageCache>,
    /// The open files.
    pub(crate) open: OpenFiles,
    /// How files are opened: with the kernel's caching off or in front.
    open_flags: FopenFlags,
    /// What the sync at unmount found.
    synced: UnmountSync,
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

/// The kernel's view of `attr`.
fn fuse_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.atime.into(),
        mtime: attr.mtime.into(),
        ctime: attr.ctime.into(),
        crtime: attr.ctime.into(),
        kind: file_type(attr.kind),
        // At most 0o7777, checked by the volume.
        perm: attr.perm as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

fn timestamp(time: TimeOrNow) -> Timestamp {
    match time {
        TimeOrNow::SpecificTime(time) => time.into(),
        TimeOrNow::Now => Timestamp::now(),
    }
}

/// A name the volume can hold: UTF-8.
fn name_of(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

/// The permission bits a new inode gets: those asked for, less the umask.
fn perm_of(mode: u32, umask: u32) -> u32 {
    mode & !umask & 0o7777
}

impl VolumeFs {
    /// A file system of `volume`'s files, cached by `cache`.
    /// With `kernel_cache`, files are opened with the kernel's page cache in
    /// front (see [`crate::MountOptions::kernel_cache`]).
    pub fn new(volume: Arc<Volume>, cache: Arc<PageCache>, kernel_cache: bool) -> VolumeFs {
        VolumeFs {
            volume,
            cache,
            open_flags: match kernel_cache {
                // The kernel's pages stay valid from one open to the next:
                // every change it did not make, it is told of.
                true => FopenFlags::FOPEN_KEEP_CACHE,
                false => FopenFlags::FOPEN_DIRECT_IO,
            },
            open: OpenFiles::default(),
            synced: UnmountSync::default(),
        }
    }

    /// The attributes of inode `ino`; a regular file's size as its open
    /// mapping sees it, which writes not yet written back have moved.
    fn attr(&self, ino: u64) -> io::Result<Attr> {
        self.live_size(self.volume.attr(ino)?)
    }

    /// `attr`, with a regular file's size as its open mapping sees it.
    fn live_size(&self, mut attr: Attr) -> io::Result<Attr> {
        if attr.kind == FileKind::File {
            let file = self.volume.open_ino(attr.ino)?;
            if let Some(mapping) = self.cache.find(&file)? {
                attr.size = mapping.len();
            }
        }
        Ok(attr)
    }

    /// The mapping of regular file `ino`.
    fn mapping(&self, ino: u64) -> io::Result<Arc<Mapping>> {
        self.cache.open(Arc::new(self.volume.open_ino(ino)?))
    }
}

/// Replies to a request that made or found inode `attr`.
fn entry(reply: ReplyEntry, attr: Result<Attr, Errno>) {
    match attr {
        Ok(attr) => reply.entry(&TTL, &fuse_attr(&attr), Generation(0)),
        Err(error) => reply.error(error),
    }
}

impl fuser::Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Shared maps of files opened with the kernel's caching off; older
        // kernels refuse the flag, and then refuse such maps.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // The kernel keeps its pages when it sees a size change it did not
        // make: it is told of every change it did not make (see
        // `crate::notify`), and its own drop races buffered writes.
        let _ = config.add_capabilities(InitFlags::FUSE_EXPLICIT_INVAL_DATA);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        // Unmounting: every file's data into the volume, whoever holds its
        // mapping now, then the volume commits.
        self.open.clear();
        let synced = self.cache.sync_all().and_then(|()| self.volume.sync());
        self.synced.record(synced);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(
            reply,
            name_of(name).and_then(|name| {
                let found = or_errno(self.volume.lookup(parent.0, name))?;
                or_errno(self.live_size(found))
            }),
        );
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &fuse_attr(&attr)),
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
        serving_kernel();
        let changed = (|| {
            if let Some(size) = size {
                self.mapping(ino.0)?.set_len(size)?;
            }
            let change = SetAttr {
                perm: mode.map(|mode| mode & 0o7777),
                uid,
                gid,
                atime: atime.map(timestamp),
                mtime: mtime.map(timestamp),
            };
            if change != SetAttr::default() {
                self.volume.set_attr(ino.0, &change)?;
            }
            let mut attr = self.attr(ino.0)?;
            // The size as this request set it. The kernel drops its pages
            // past the new end only if the size answered differs from the
            // one it knew: a change through the library that moved the
            // size back meanwhile (a zero range past the end) would
            // otherwise leave the cut pages in its cache, read as they were
            // before the truncate. That change tells the kernel of itself,
            // and attributes are never trusted (`TTL`), so the kernel's size
            // catches up at its next look.
            if let Some(size) = size {
                attr.size = size;
            }
            Ok(attr)
        })();
        match changed {
            Ok(attr) => reply.attr(&TTL, &fuse_attr(&attr)),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.volume.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(error) => reply.error(errno(&error)),
        }
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
        entry(
            reply,
            name_of(name).and_then(|name| {
                let perm = perm_of(mode, umask);
                or_errno(
                    self.volume
                        .mkdir(parent.0, name, perm, req.uid(), req.gid()),
                )
            }),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            name_of(name).and_then(|name| or_errno(self.volume.unlink(parent.0, name))),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            name_of(name).and_then(|name| or_errno(self.volume.rmdir(parent.0, name))),
        );
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
            name_of(link_name).and_then(|name| {
                let target = target.to_str().ok_or(Errno::EINVAL)?;
                or_errno(
                    self.volume
                        .symlink(parent.0, name, target, req.uid(), req.gid()),
                )
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
        let known = fuser::RenameFlags::RENAME_NOREPLACE | fuser::RenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            return reply.error(Errno::EINVAL);
        }
        let flags = RenameFlags {
            no_replace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        empty(
            reply,
            name_of(name).and_then(|name| {
                let newname = name_of(newname)?;
                or_errno(
                    self.volume
                        .rename(parent.0, name, newparent.0, newname, flags),
                )
            }),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            name_of(newname).and_then(|name| {
                let linked = or_errno(self.volume.link(ino.0, newparent.0, name))?;
                or_errno(self.live_size(linked))
            }),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.mapping(ino.0) {
            Ok(mapping) => {
                let fh = self.open.insert(&mapping, flags.0);
                reply.opened(fh, self.open_flags)
            }
            Err(error) => reply.error(errno(&error)),
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
        let created = name_of(name).and_then(|name| {
            let perm = perm_of(mode, umask);
            let (attr, file) =
                or_errno(
                    self.volume
                        .create(parent.0, name, perm, req.uid(), req.gid()),
                )?;
            let mapping = or_errno(self.cache.open(Arc::new(file)))?;
            Ok((attr, self.open.insert(&mapping, flags)))
        });
        match created {
            Ok((attr, fh)) => {
                reply.created(&TTL, &fuse_attr(&attr), Generation(0), fh, self.open_flags)
            }
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
        empty(reply, or_errno(self.volume.sync()));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Offsets: `.` is 1, `..` is 2, an entry its cookie plus 2, so a
        // listing carries on after the last entry the kernel took, whatever
        // was linked or unlinked meanwhile.
        let parent = match self.volume.parent(ino.0) {
            Ok(parent) => parent,
            Err(error) => return reply.error(errno(&error)),
        };
        if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset < 2 && reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
            return reply.ok();
        }
        let mut after = offset.saturating_sub(2);
        loop {
            let entries = match self.volume.read_dir(ino.0, after, DIR_BATCH) {
                Ok(entries) => entries,
                Err(error) => return reply.error(errno(&error)),
            };
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                let full = reply.add(
                    INodeNo(entry.ino),
                    entry.cookie + 2,
                    file_type(entry.kind),
                    &entry.name,
                );
                if full {
                    return reply.ok();
                }
                after = entry.cookie;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stat = self.volume.statfs();
        reply.statfs(
            stat.blocks,
            stat.free_blocks,
            stat.free_blocks,
            stat.files,
            stat.free_files,
            stat.block_size,
            stat.name_max,
            stat.block_size,
        );
    }

    crate::open_files::serve_open_files!();
}

impl SyncsAtUnmount for VolumeFs {
    fn unmount_sync(&self) -> UnmountSync {
        self.synced.clone()
    }
}
