//! The volume's namespace: inodes (regular files, directories, symbolic
//! links), directories of named entries, hard links, rename, and the
//! attributes a file system shows (see "Namespace" in the volume's
//! documentation).
//!
//! Every call takes the volume's mutex once, checks everything before it
//! changes anything (a failed call changes nothing), and is durable from the
//! next commit on ([`Volume::sync`], or a sync of any file). Names are as
//! [`Volume::create_file`] takes them: 1 to 255 bytes of UTF-8 without `/` or
//! NUL, and neither `.` nor `..` (`EINVAL`; `ENAMETOOLONG` past 255 bytes).

use std::io;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::format::{
    check_name, DirMeta, Entry, FileMeta, Inode, Node, DIR_RECORD, ENTRY_RECORD, FILE_RECORD,
    MAX_NAME_LEN, MAX_SYMLINK_LEN, SYMLINK_RECORD,
};
use super::{State, Volume, VolumeFile, REMOVED};
use crate::errno::{err, fail, with_message};

/// The inode number of the root directory.
pub const ROOT: u64 = 1;

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file, read and written through a [`VolumeFile`].
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// A point in time: seconds and nanoseconds since the Unix epoch (the
/// seconds negative before it), as `struct timespec`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01 00:00:00 UTC.
    pub secs: i64,
    /// Nanoseconds past `secs`, below 10^9.
    pub nanos: u32,
}

impl Timestamp {
    /// The system clock's time now.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    /// The time, saturating at the ends of an `i64` of seconds.
    fn from(time: SystemTime) -> Timestamp {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp {
                secs: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                nanos: after.subsec_nanos(),
            },
            Err(before) => {
                let before = before.duration();
                let secs = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
                match before.subsec_nanos() {
                    0 => Timestamp {
                        secs: -secs,
                        nanos: 0,
                    },
                    nanos => Timestamp {
                        secs: (-secs).saturating_sub(1),
                        nanos: 1_000_000_000 - nanos,
                    },
                }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    /// The time; one outside what `SystemTime` holds saturates at its end.
    fn from(time: Timestamp) -> SystemTime {
        let nanos = Duration::from_nanos(time.nanos.into());
        let secs = Duration::from_secs(time.secs.unsigned_abs());
        if time.secs >= 0 {
            UNIX_EPOCH
                .checked_add(secs + nanos)
                .unwrap_or(UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2))
        } else {
            UNIX_EPOCH
                .checked_sub(secs)
                .and_then(|time| time.checked_add(nanos))
                .unwrap_or(UNIX_EPOCH)
        }
    }
}

/// An inode's attributes, as `stat` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The inode number; [`Volume::ROOT`] for the root directory.
    pub ino: u64,
    /// What the inode is.
    pub kind: FileKind,
    /// A file's size in bytes; a directory's number of entries (`.` and `..`
    /// not counted); a symbolic link's target length in bytes.
    pub size: u64,
    /// The storage the inode holds in 512-byte units (`st_blocks`): 8 per
    /// block a file maps; 0 for directories and symbolic links, whose
    /// records live in the metadata area.
    pub blocks: u64,
    /// The permission bits without the file type, at most `0o7777` (such as
    /// `0o644`).
    pub perm: u32,
    /// Names of a file or symbolic link (0 for a file unlinked while open);
    /// 2 plus the subdirectories for a directory.
    pub nlink: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's group id.
    pub gid: u32,
    /// Set only by [`Volume::set_attr`]: reads do not move it (as `noatime`).
    pub atime: Timestamp,
    /// The last change of the content: data writes, size changes, punch,
    /// zero, collapse and insert of a file; entries linked into or unlinked
    /// from a directory.
    pub mtime: Timestamp,
    /// The last change of the content or of the attributes (permissions,
    /// owner, times, link count, a rename of the inode).
    pub ctime: Timestamp,
}

/// The attributes [`Volume::set_attr`] changes: those that are `Some`.
/// Sizes change through [`Backend::set_len`](crate::Backend::set_len).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits, at most `0o7777`.
    pub perm: Option<u32>,
    /// A new owner.
    pub uid: Option<u32>,
    /// A new group.
    pub gid: Option<u32>,
    /// A new access time.
    pub atime: Option<Timestamp>,
    /// A new modification time.
    pub mtime: Option<Timestamp>,
}

/// How [`Volume::rename`] treats an existing target (`renameat2`'s flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with `EEXIST` rather than replace the target
    /// (`RENAME_NOREPLACE`).
    pub no_replace: bool,
    /// Swap the source and the target, which must exist (`RENAME_EXCHANGE`).
    pub exchange: bool,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name.
    pub name: String,
    /// The inode it names.
    pub ino: u64,
    /// What that inode is.
    pub kind: FileKind,
    /// The entry's place in the listing: given when the entry is linked and
    /// kept as long as it is there. Resume a listing after an entry by
    /// passing its cookie to [`Volume::read_dir`]. At least 1 and below 2^63,
    /// so it fits in an `off_t`.
    pub cookie: u64,
}

/// What [`Volume::statfs`] reports, as `statvfs` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Data blocks of the volume (superblocks and metadata areas not counted).
    pub blocks: u64,
    /// Data blocks that can be allocated now (blocks freed since the last
    /// commit are not counted until it is made).
    pub free_blocks: u64,
    /// Inodes in use plus `free_files`.
    pub files: u64,
    /// Empty files with 1-byte names the metadata area still has room for.
    pub free_files: u64,
    /// The longest name in bytes: 255.
    pub name_max: u32,
    /// The block size in bytes: 4096.
    pub block_size: u32,
}

/// `EINVAL` unless `perm` is permission bits only.
fn check_perm(perm: u32) -> io::Result<()> {
    if perm > 0o7777 {
        return fail(libc::EINVAL);
    }
    Ok(())
}

fn attr_of(ino: u64, inode: &Inode) -> Attr {
    let (size, blocks) = match &inode.node {
        Node::File(file) => (file.size, file.extents.mapped_blocks() * 8),
        Node::Dir(dir) => (dir.entries.len() as u64, 0),
        Node::Symlink(target) => (target.len() as u64, 0),
    };
    Attr {
        ino,
        kind: inode.kind(),
        size,
        blocks,
        perm: inode.perm,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        atime: inode.atime,
        mtime: inode.mtime,
        ctime: inode.ctime,
    }
}

impl State {
    /// Inode `ino`, orphans included; `ENOENT` if there is none.
    pub(super) fn inode(&self, ino: u64) -> io::Result<&Inode> {
        self.meta.inodes.get(&ino).ok_or_else(|| err(libc::ENOENT))
    }

    /// Directory `ino`: `ENOENT` if there is none, `ENOTDIR` if it is not one.
    fn dir(&self, ino: u64) -> io::Result<&DirMeta> {
        self.inode(ino)?.dir().ok_or_else(|| err(libc::ENOTDIR))
    }

    /// The inode `name` in directory `parent` names, after checking the name:
    /// `EINVAL`, `ENAMETOOLONG`, `ENOENT`, `ENOTDIR`.
    pub(super) fn child(&self, parent: u64, name: &str) -> io::Result<u64> {
        check_name(name)?;
        let dir = self.dir(parent)?;
        dir.entries
            .get(name)
            .map(|entry| entry.ino)
            .ok_or_else(|| err(libc::ENOENT))
    }

    /// `ENOSPC` unless `bytes` more of metadata fit beside what is used and
    /// reserved.
    fn check_room(&self, bytes: u64) -> io::Result<()> {
        if self.meta_len + self.meta_reserved + bytes > self.meta_capacity {
            return fail(libc::ENOSPC);
        }
        Ok(())
    }

    /// Runs `f` on inode `ino`, which exists, keeping the metadata length
    /// exact and marking the metadata changed.
    pub(super) fn edit<R>(&mut self, ino: u64, f: impl FnOnce(&mut Inode) -> R) -> R {
        let inode = self.meta.inodes.get_mut(&ino).expect("the inode exists");
        let before = inode.encoded_len();
        let result = f(inode);
        self.meta_len = self.meta_len - before + inode.encoded_len();
        self.dirty = true;
        result
    }

    /// Checks that `name` is free in directory `parent` and that `bytes` of
    /// metadata fit: `EINVAL`, `ENAMETOOLONG`, `ENOENT`, `ENOTDIR`, `EEXIST`,
    /// `ENOSPC` (no inode number left too, if `new_inode`).
    fn check_new_entry(
        &self,
        parent: u64,
        name: &str,
        bytes: u64,
        new_inode: bool,
    ) -> io::Result<()> {
        check_name(name)?;
        if self.dir(parent)?.entries.contains_key(name) {
            return fail(libc::EEXIST);
        }
        self.check_room(bytes)?;
        if new_inode && self.meta.next_id.checked_add(1).is_none() {
            return Err(with_message(
                libc::ENOSPC,
                "no inode numbers left: the next id is the last",
            ));
        }
        Ok(())
    }

    /// Adds `inode` under the next inode number, named `name` in `parent`.
    /// The caller ran [`State::check_new_entry`].
    fn add_inode(&mut self, parent: u64, name: &str, inode: Inode) -> io::Result<u64> {
        let ino = self.meta.next_id;
        let now = inode.ctime;
        let is_dir = inode.dir().is_some();
        self.link_entry(parent, name, ino, is_dir, now)?;
        self.meta.next_id += 1;
        self.meta_len += inode.encoded_len();
        self.meta.inodes.insert(ino, inode);
        Ok(ino)
    }

    /// Links `name` in directory `parent` to `ino`, counting a subdirectory
    /// in the parent's link count; `ENOSPC` if the parent's cookies ran out.
    fn link_entry(
        &mut self,
        parent: u64,
        name: &str,
        ino: u64,
        is_dir: bool,
        now: Timestamp,
    ) -> io::Result<()> {
        self.edit(parent, |inode| {
            let dir = inode.dir_mut().expect("checked by the caller");
            dir.insert(name, ino, is_dir)?;
            inode.nlink += u32::from(is_dir);
            inode.mtime = now;
            inode.ctime = now;
            Ok(())
        })
    }

    /// Unlinks `name`, which is there, from directory `parent`, and returns
    /// the inode it named.
    fn unlink_entry(&mut self, parent: u64, name: &str, now: Timestamp) -> u64 {
        let ino = self.meta.inodes[&parent]
            .dir()
            .expect("a directory")
            .entries[name]
            .ino;
        let is_dir = self.meta.inodes[&ino].dir().is_some();
        self.edit(parent, |inode| {
            inode.dir_mut().expect("a directory").remove(name, is_dir);
            inode.nlink -= u32::from(is_dir);
            inode.mtime = now;
            inode.ctime = now;
        });
        ino
    }

    /// Counts one name less of `ino`, whose entry was unlinked: a directory
    /// (named once) goes; a file or link whose last name went goes too, or,
    /// a file with live handles, stays as an orphan until the last drops.
    fn drop_link(&mut self, ino: u64, now: Timestamp) {
        let is_dir = self.meta.inodes[&ino].dir().is_some();
        if is_dir {
            self.free_inode(ino);
            return;
        }
        let nlink = self.edit(ino, |inode| {
            inode.nlink -= 1;
            inode.ctime = now;
            inode.nlink
        });
        let open = self.runtime.get(&ino).is_some_and(|file| file.handles > 0);
        if nlink == 0 && !open {
            self.free_inode(ino);
        }
    }

    /// Removes inode `ino`, which no entry names, and frees its blocks; its
    /// handles fail with `ENOENT` from now on.
    pub(super) fn free_inode(&mut self, ino: u64) {
        let Some(mut inode) = self.meta.inodes.remove(&ino) else {
            return;
        };
        self.meta_len -= inode.encoded_len();
        self.dirty = true;
        if let Some(runtime) = self.runtime.remove(&ino) {
            runtime.changes.fetch_or(REMOVED, Ordering::Release);
        }
        if let Some(file) = inode.file_mut() {
            for (phys, len) in file.extents.remove_range(0, u64::MAX) {
                self.space.free(phys, len);
            }
        }
    }

    /// Unlinks every name of file `ino` and frees it, whatever its names and
    /// handles ([`Backend::remove`](crate::Backend::remove)).
    pub(super) fn remove_everywhere(&mut self, ino: u64) -> io::Result<()> {
        let inode = self.inode(ino)?;
        let mut left = inode.nlink;
        let mut names = Vec::new();
        if left > 0 {
            for (&dir_ino, dir) in &self.meta.inodes {
                let Some(dir) = dir.dir() else { continue };
                for (name, entry) in &dir.entries {
                    if entry.ino == ino {
                        names.push((dir_ino, name.clone()));
                        left -= 1;
                    }
                }
                if left == 0 {
                    break;
                }
            }
        }
        let now = Timestamp::now();
        for (dir_ino, name) in names {
            self.unlink_entry(dir_ino, &name, now);
        }
        self.free_inode(ino);
        Ok(())
    }

    /// [`Volume::unlink`] under the mutex.
    pub(super) fn unlink_name(&mut self, parent: u64, name: &str) -> io::Result<()> {
        let ino = self.child(parent, name)?;
        if self.inode(ino)?.dir().is_some() {
            return fail(libc::EISDIR);
        }
        let now = Timestamp::now();
        self.unlink_entry(parent, name, now);
        self.drop_link(ino, now);
        Ok(())
    }

    /// Whether directory `ancestor` is `dir` or one of the directories above it.
    fn is_ancestor(&self, ancestor: u64, mut dir: u64) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT {
                return false;
            }
            dir = self.meta.inodes[&dir].dir().expect("a directory").parent;
        }
    }

    /// Sets the parent of `ino`, if it is a directory.
    fn set_parent(&mut self, ino: u64, parent: u64) {
        if let Some(dir) = self.meta.inodes.get_mut(&ino).and_then(Inode::dir_mut) {
            dir.parent = parent;
        }
    }
}

impl Volume {
    /// The inode number of the root directory: 1.
    pub const ROOT: u64 = ROOT;

    /// The attributes of the inode `name` in directory `parent` names.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | `parent` does not exist or holds no `name` |
    /// | `ENOTDIR` | `parent` is not a directory |
    /// | `EINVAL`, `ENAMETOOLONG` | `name` is not a name (see the module documentation) |
    pub fn lookup(&self, parent: u64, name: &str) -> io::Result<Attr> {
        let state = self.state.lock();
        let ino = state.child(parent, name)?;
        Ok(attr_of(ino, state.inode(ino)?))
    }

    /// The attributes of inode `ino`, a file unlinked while open included.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    pub fn attr(&self, ino: u64) -> io::Result<Attr> {
        let state = self.state.lock();
        Ok(attr_of(ino, state.inode(ino)?))
    }

    /// Sets the attributes `change` holds and the change time, and returns
    /// the new attributes. Permission and owner checks are the caller's.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    /// | `EINVAL` | `change.perm` has bits past `0o7777`, or a time has 10^9 nanoseconds or more |
    pub fn set_attr(&self, ino: u64, change: &SetAttr) -> io::Result<Attr> {
        let mut state = self.state.lock();
        state.inode(ino)?;
        if let Some(perm) = change.perm {
            check_perm(perm)?;
        }
        let times = [change.atime, change.mtime];
        if times
            .into_iter()
            .flatten()
            .any(|time| time.nanos >= 1_000_000_000)
        {
            return fail(libc::EINVAL);
        }
        let now = Timestamp::now();
        if let Some(runtime) = state.runtime.get(&ino) {
            runtime.touched.store(0, Ordering::Relaxed);
        }
        Ok(state.edit(ino, |inode| {
            inode.perm = change.perm.unwrap_or(inode.perm);
            inode.uid = change.uid.unwrap_or(inode.uid);
            inode.gid = change.gid.unwrap_or(inode.gid);
            inode.atime = change.atime.unwrap_or(inode.atime);
            inode.mtime = change.mtime.unwrap_or(inode.mtime);
            inode.ctime = now;
            attr_of(ino, inode)
        }))
    }

    /// Creates an empty regular file `name` in directory `parent` and returns
    /// its attributes and a handle to it.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `EEXIST` | `name` is taken in `parent` |
    /// | `ENOENT` | `parent` does not exist |
    /// | `ENOTDIR` | `parent` is not a directory |
    /// | `EINVAL` | `perm` has bits past `0o7777`, or `name` is not a name |
    /// | `ENAMETOOLONG` | `name` is longer than 255 bytes |
    /// | `ENOSPC` | the metadata area is full, or no inode number or directory cookie is left |
    pub fn create(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<(Attr, VolumeFile)> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        check_perm(perm)?;
        state.check_new_entry(
            parent,
            name,
            FILE_RECORD + ENTRY_RECORD + name.len() as u64,
            true,
        )?;
        let inode = Inode::new(
            Node::File(FileMeta::default()),
            perm,
            uid,
            gid,
            Timestamp::now(),
        );
        let ino = state.add_inode(parent, name, inode)?;
        let attr = attr_of(ino, &state.meta.inodes[&ino]);
        Ok((attr, self.new_handle(state, ino)))
    }

    /// Creates an empty directory `name` in directory `parent`.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `EEXIST` | `name` is taken in `parent` |
    /// | `ENOENT` | `parent` does not exist |
    /// | `ENOTDIR` | `parent` is not a directory |
    /// | `EINVAL` | `perm` has bits past `0o7777`, or `name` is not a name |
    /// | `ENAMETOOLONG` | `name` is longer than 255 bytes |
    /// | `EMLINK` | `parent` has as many subdirectories as a link count holds |
    /// | `ENOSPC` | the metadata area is full, or no inode number or directory cookie is left |
    pub fn mkdir(
        &self,
        parent: u64,
        name: &str,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<Attr> {
        let mut state = self.state.lock();
        check_perm(perm)?;
        state.check_new_entry(
            parent,
            name,
            DIR_RECORD + ENTRY_RECORD + name.len() as u64,
            true,
        )?;
        if state.inode(parent)?.nlink == u32::MAX {
            return fail(libc::EMLINK);
        }
        let inode = Inode::new(
            Node::Dir(DirMeta::new(parent)),
            perm,
            uid,
            gid,
            Timestamp::now(),
        );
        let ino = state.add_inode(parent, name, inode)?;
        Ok(attr_of(ino, &state.meta.inodes[&ino]))
    }

    /// Removes the empty directory `name` from directory `parent`.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | `parent` does not exist or holds no `name` |
    /// | `ENOTDIR` | `parent` or `name` is not a directory |
    /// | `ENOTEMPTY` | `name` has entries |
    /// | `EINVAL`, `ENAMETOOLONG` | `name` is not a name |
    pub fn rmdir(&self, parent: u64, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        let ino = state.child(parent, name)?;
        if !state.dir(ino)?.entries.is_empty() {
            return fail(libc::ENOTEMPTY);
        }
        let now = Timestamp::now();
        state.unlink_entry(parent, name, now);
        state.drop_link(ino, now);
        Ok(())
    }

    /// Creates a symbolic link `name` in directory `parent` pointing at
    /// `target` (kept as given, never resolved here), with permissions 0777.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `EEXIST` | `name` is taken in `parent` |
    /// | `ENOENT` | `parent` does not exist, or `target` is empty |
    /// | `ENOTDIR` | `parent` is not a directory |
    /// | `EINVAL` | `name` is not a name, or `target` holds NUL |
    /// | `ENAMETOOLONG` | `name` is longer than 255 bytes or `target` than 4095 |
    /// | `ENOSPC` | the metadata area is full, or no inode number or directory cookie is left |
    pub fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> io::Result<Attr> {
        let mut state = self.state.lock();
        if target.is_empty() {
            return fail(libc::ENOENT);
        }
        if target.len() > MAX_SYMLINK_LEN {
            return fail(libc::ENAMETOOLONG);
        }
        if target.contains('\0') {
            return fail(libc::EINVAL);
        }
        let bytes = SYMLINK_RECORD + target.len() as u64 + ENTRY_RECORD + name.len() as u64;
        state.check_new_entry(parent, name, bytes, true)?;
        let node = Node::Symlink(target.to_owned());
        let ino = state.add_inode(
            parent,
            name,
            Inode::new(node, 0o777, uid, gid, Timestamp::now()),
        )?;
        Ok(attr_of(ino, &state.meta.inodes[&ino]))
    }

    /// The target of symbolic link `ino`.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    /// | `EINVAL` | `ino` is not a symbolic link |
    pub fn readlink(&self, ino: u64) -> io::Result<String> {
        let state = self.state.lock();
        match &state.inode(ino)?.node {
            Node::Symlink(target) => Ok(target.clone()),
            _ => fail(libc::EINVAL),
        }
    }

    /// Links file or symbolic link `ino` under the name `new_name` in
    /// directory `new_parent` too (a hard link: one more name of the same
    /// inode), and returns its attributes.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` or `new_parent`, or `ino` is a file unlinked while open |
    /// | `ENOTDIR` | `new_parent` is not a directory |
    /// | `EEXIST` | `new_name` is taken in `new_parent` |
    /// | `EPERM` | `ino` is a directory |
    /// | `EMLINK` | `ino` has as many names as a link count holds |
    /// | `EINVAL`, `ENAMETOOLONG` | `new_name` is not a name |
    /// | `ENOSPC` | the metadata area is full, or no directory cookie is left |
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &str) -> io::Result<Attr> {
        let mut state = self.state.lock();
        let inode = state.inode(ino)?;
        let nlink = inode.nlink;
        let is_dir = inode.dir().is_some();
        state.check_new_entry(
            new_parent,
            new_name,
            ENTRY_RECORD + new_name.len() as u64,
            false,
        )?;
        if is_dir {
            return fail(libc::EPERM);
        }
        if nlink == 0 {
            return fail(libc::ENOENT);
        }
        if nlink == u32::MAX {
            return fail(libc::EMLINK);
        }
        let now = Timestamp::now();
        state.link_entry(new_parent, new_name, ino, false, now)?;
        Ok(state.edit(ino, |inode| {
            inode.nlink += 1;
            inode.ctime = now;
            attr_of(ino, inode)
        }))
    }

    /// Removes the name `name` from directory `parent`. A file or link whose
    /// last name goes is freed, unless the file has live [`VolumeFile`]
    /// handles: then it is an orphan, read and written through them as
    /// before, and freed when the last one drops (or, after a crash, at the
    /// next [`Volume::open`], since orphans are never committed).
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | `parent` does not exist or holds no `name` |
    /// | `ENOTDIR` | `parent` is not a directory |
    /// | `EISDIR` | `name` is a directory (see [`Volume::rmdir`]) |
    /// | `EINVAL`, `ENAMETOOLONG` | `name` is not a name |
    pub fn unlink(&self, parent: u64, name: &str) -> io::Result<()> {
        self.state.lock().unlink_name(parent, name)
    }

    /// Renames `name` of directory `parent` to `new_name` of directory
    /// `new_parent`, as Linux's `renameat2` does: an existing target is
    /// replaced (a file or link by anything but a directory, an empty
    /// directory by a directory) unless `flags.no_replace`, and with
    /// `flags.exchange` the two swap. A replaced file that is open becomes an
    /// orphan, as with [`Volume::unlink`]. Renaming an inode onto a name of
    /// the same inode does nothing. The moved entry gets a new cookie; an
    /// exchange keeps both cookies.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `EINVAL` | both flags; a directory moved into itself or below itself; a name is not a name |
    /// | `ENOENT` | a parent does not exist, `name` is not in `parent`, or, with `exchange`, `new_name` is not in `new_parent` |
    /// | `ENOTDIR` | a parent is not a directory, or a directory would replace a non-directory |
    /// | `EISDIR` | a non-directory would replace a directory |
    /// | `ENOTEMPTY` | the directory to replace has entries |
    /// | `EEXIST` | `flags.no_replace` and `new_name` exists |
    /// | `EMLINK` | a directory moves into a parent whose link count is at its largest |
    /// | `ENAMETOOLONG` | a name is longer than 255 bytes |
    /// | `ENOSPC` | the metadata area cannot take the longer name, or no directory cookie is left |
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        flags: RenameFlags,
    ) -> io::Result<()> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if flags.no_replace && flags.exchange {
            return fail(libc::EINVAL);
        }
        let ino = state.child(parent, name)?;
        let target = match state.child(new_parent, new_name) {
            Ok(target) => Some(target),
            Err(error)
                if crate::errno(&error) == Some(libc::ENOENT) && state.dir(new_parent).is_ok() =>
            {
                None
            }
            Err(error) => return Err(error),
        };
        let is_dir = |state: &State, ino| state.meta.inodes[&ino].dir().is_some();
        let now = Timestamp::now();
        if flags.exchange {
            let Some(target) = target else {
                return fail(libc::ENOENT);
            };
            // Each directory lands in the other's parent: not below itself.
            if is_dir(state, ino) && state.is_ancestor(ino, new_parent)
                || is_dir(state, target) && state.is_ancestor(target, parent)
            {
                return fail(libc::EINVAL);
            }
            if ino == target {
                return Ok(());
            }
            let moves = parent != new_parent && is_dir(state, ino) != is_dir(state, target);
            if moves {
                // One directory leaves each parent and none comes in for it.
                let gains = if is_dir(state, ino) {
                    new_parent
                } else {
                    parent
                };
                if state.inode(gains)?.nlink == u32::MAX {
                    return fail(libc::EMLINK);
                }
            }
            let (from_dir, to_dir) = (is_dir(state, ino), is_dir(state, target));
            for (dir, entry_name, new_ino, was_dir, becomes_dir) in [
                (parent, name, target, from_dir, to_dir),
                (new_parent, new_name, ino, to_dir, from_dir),
            ] {
                state.edit(dir, |inode| {
                    let dir = inode.dir_mut().expect("a directory");
                    let entry = dir.remove(entry_name, was_dir);
                    let kept = Entry {
                        ino: new_ino,
                        cookie: entry.cookie,
                    };
                    dir.insert_entry(entry_name, kept, becomes_dir);
                    inode.nlink = inode.nlink + u32::from(becomes_dir) - u32::from(was_dir);
                    inode.mtime = now;
                    inode.ctime = now;
                });
            }
            state.set_parent(ino, new_parent);
            state.set_parent(target, parent);
            for moved in [ino, target] {
                state.edit(moved, |inode| inode.ctime = now);
            }
            return Ok(());
        }
        if let Some(target) = target {
            if flags.no_replace {
                return fail(libc::EEXIST);
            }
            if is_dir(state, ino) && state.is_ancestor(ino, new_parent) {
                return fail(libc::EINVAL);
            }
            if target == ino {
                return Ok(());
            }
            match (is_dir(state, ino), is_dir(state, target)) {
                (true, false) => return fail(libc::ENOTDIR),
                (false, true) => return fail(libc::EISDIR),
                (true, true) if !state.dir(target)?.entries.is_empty() => {
                    return fail(libc::ENOTEMPTY)
                }
                _ => {}
            }
            if state.dir(new_parent)?.next_cookie > super::format::MAX_COOKIE {
                return Err(with_message(
                    libc::ENOSPC,
                    "the directory's entry cookies ran out",
                ));
            }
            // The replaced entry's bytes are freed before the new one is
            // linked: the name is the same.
            state.unlink_entry(new_parent, new_name, now);
            state.drop_link(target, now);
        } else {
            if is_dir(state, ino) && state.is_ancestor(ino, new_parent) {
                return fail(libc::EINVAL);
            }
            state.check_room((new_name.len() as u64).saturating_sub(name.len() as u64))?;
            if is_dir(state, ino)
                && parent != new_parent
                && state.inode(new_parent)?.nlink == u32::MAX
            {
                return fail(libc::EMLINK);
            }
            if state.dir(new_parent)?.next_cookie > super::format::MAX_COOKIE {
                return Err(with_message(
                    libc::ENOSPC,
                    "the directory's entry cookies ran out",
                ));
            }
        }
        let moved_dir = is_dir(state, ino);
        state.unlink_entry(parent, name, now);
        state
            .link_entry(new_parent, new_name, ino, moved_dir, now)
            .expect("the cookie was checked");
        state.set_parent(ino, new_parent);
        state.edit(ino, |inode| inode.ctime = now);
        Ok(())
    }

    /// At most `max` entries of directory `ino` whose cookie is above
    /// `after`, in cookie order: pass 0 to start the listing, and the last
    /// cookie seen to carry on (an empty answer is the end). An entry that stays in the directory is listed exactly
    /// once by a reader that carries on so, whatever is linked or unlinked
    /// meanwhile; entries linked meanwhile may or may not be listed (POSIX
    /// `readdir`). `.` and `..` are not entries: the caller adds them (the
    /// parent is [`Volume::parent`]).
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    /// | `ENOTDIR` | `ino` is not a directory |
    pub fn read_dir(&self, ino: u64, after: u64, max: usize) -> io::Result<Vec<DirEntry>> {
        let state = self.state.lock();
        let dir = state.dir(ino)?;
        Ok(dir
            .by_cookie
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(max)
            .map(|(&cookie, name)| {
                let entry = dir.entries[name];
                DirEntry {
                    name: name.clone(),
                    ino: entry.ino,
                    kind: state.meta.inodes[&entry.ino].kind(),
                    cookie,
                }
            })
            .collect())
    }

    /// The directory that names directory `ino` (its `..`); the root's is
    /// the root.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    /// | `ENOTDIR` | `ino` is not a directory |
    pub fn parent(&self, ino: u64) -> io::Result<u64> {
        Ok(self.state.lock().dir(ino)?.parent)
    }

    /// A handle to regular file `ino`, a file unlinked while open included.
    ///
    /// | errno | when |
    /// |---|---|
    /// | `ENOENT` | no inode `ino` |
    /// | `EISDIR` | `ino` is a directory |
    /// | `ELOOP` | `ino` is a symbolic link |
    pub fn open_ino(self: &Arc<Self>, ino: u64) -> io::Result<VolumeFile> {
        self.open_ino_locked(&mut self.state.lock(), ino)
    }

    /// [`Volume::open_ino`] under the mutex.
    pub(super) fn open_ino_locked(
        self: &Arc<Self>,
        state: &mut State,
        ino: u64,
    ) -> io::Result<VolumeFile> {
        match state.inode(ino)?.node {
            Node::File(_) => Ok(self.new_handle(state, ino)),
            Node::Dir(_) => fail(libc::EISDIR),
            Node::Symlink(_) => fail(libc::ELOOP),
        }
    }

    /// The volume's size and use, as `statvfs` reports them.
    pub fn statfs(&self) -> StatFs {
        let state = self.state.lock();
        let room = state.meta_capacity - state.meta_len - state.meta_reserved;
        let ids_left = u64::MAX - state.meta.next_id;
        let free_files = (room / (FILE_RECORD + ENTRY_RECORD + 1)).min(ids_left);
        StatFs {
            blocks: self.layout.total_blocks - self.layout.data_start(),
            free_blocks: state.space.allocator.available(),
            files: state.meta.inodes.len() as u64 + free_files,
            free_files,
            name_max: MAX_NAME_LEN as u32,
            block_size: super::format::BLOCK_SIZE as u32,
        }
    }
}
