//! The on-device format: where the superblocks and metadata areas lie, and
//! the codec of superblocks and metadata with its checks of every field read
//! from the device (see "On-device format" and "Opening" in the volume's
//! documentation).

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use rustc_hash::FxHashMap as HashMap;

use super::namespace::{FileKind, Timestamp, ROOT};
use crate::backend::extent::{Extent, ExtentMap};
use crate::errno::{fail, with_message};

/// The volume's block size in bytes, equal to the cache's page size so that a page
/// is always exactly one block.
pub const BLOCK_SIZE: usize = 4096;
const _: () = assert!(BLOCK_SIZE == crate::page::PAGE_SIZE);

pub(super) const BLOCK: u64 = BLOCK_SIZE as u64;

/// The largest file size, 2^44 bytes (16 TiB): logical block numbers then fit in
/// 32 bits (ext4 has the same limit with 4 KiB blocks).
pub(super) const MAX_FILE_SIZE: u64 = 1 << 44;

/// The longest file name in bytes, as on common Unix file systems.
pub(super) const MAX_NAME_LEN: usize = 255;

/// The first bytes of every superblock.
const MAGIC: [u8; 8] = *b"FMVOLUME";

/// The version of the on-device format: 2 since the metadata holds a
/// namespace of inodes and directories (version 1 held a flat file table).
const FORMAT_VERSION: u32 = 2;

/// Blocks 0 and 1 hold the superblock's two slots.
pub(super) const SUPERBLOCK_SLOTS: u64 = 2;

/// The last generation: a commit a microsecond would take 290,000 years to
/// reach it, so a larger one on the device is corruption, and `+ 1` of any
/// accepted generation cannot overflow.
pub(super) const MAX_GENERATION: u64 = (1 << 63) - 1;

/// The bytes of a superblock its own checksum covers.
const SUPERBLOCK_BODY: usize = 52;

/// Each metadata area gets one block per this many blocks of the device...
const BLOCKS_PER_META_BLOCK: u64 = 256;
/// ...but at least this many...
const MIN_META_BLOCKS: u64 = 2;
/// ...and at most this many (64 MiB).
const MAX_META_BLOCKS: u64 = 16384;

/// Encoded metadata: the header (next inode number, inode count).
pub(super) const META_HEADER: u64 = 16;
/// Encoded metadata per inode before its kind's fields: number, kind,
/// permissions, uid, gid, link count, and three times of 12 bytes each.
pub(super) const INODE_RECORD: u64 = 8 + 1 + 4 + 4 + 4 + 4 + 3 * 12;
/// Encoded metadata per regular file: the inode, size, run count.
pub(super) const FILE_RECORD: u64 = INODE_RECORD + 8 + 8;
/// Encoded metadata per run: first logical block, first physical block, length.
pub(super) const RUN_RECORD: u64 = 24;
/// Encoded metadata per directory: the inode, next cookie, entry count.
pub(super) const DIR_RECORD: u64 = INODE_RECORD + 8 + 8;
/// Encoded metadata per directory entry besides its name: cookie, inode
/// number, name length.
pub(super) const ENTRY_RECORD: u64 = 8 + 8 + 2;
/// Encoded metadata per symbolic link besides its target: the inode, target
/// length.
pub(super) const SYMLINK_RECORD: u64 = INODE_RECORD + 2;
/// The fewest bytes an inode takes (a symbolic link to a 1-byte target).
const MIN_INODE_RECORD: u64 = SYMLINK_RECORD + 1;

/// The longest symbolic link target in bytes (Linux's `PATH_MAX` less its NUL).
pub(super) const MAX_SYMLINK_LEN: usize = 4095;

/// The largest directory cookie, so that cookies fit in an `off_t`.
pub(super) const MAX_COOKIE: u64 = i64::MAX as u64;

/// The encoded kinds of inode.
const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;

/// Where the parts of a volume are on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// The device's size in blocks when it was formatted.
    pub(super) total_blocks: u64,
    /// The size of each of the two metadata areas, in blocks.
    pub(super) meta_blocks: u64,
}

impl Layout {
    /// The layout `format` gives a device of `total_blocks` blocks; `EINVAL` if
    /// that leaves no data block.
    pub(super) fn for_device(total_blocks: u64) -> io::Result<Layout> {
        let layout = Layout::of(total_blocks);
        if !layout.has_data() {
            return fail(libc::EINVAL);
        }
        Ok(layout)
    }

    /// The layout of a volume of `total_blocks` blocks, data blocks or not.
    fn of(total_blocks: u64) -> Layout {
        Layout {
            total_blocks,
            meta_blocks: (total_blocks / BLOCKS_PER_META_BLOCK)
                .clamp(MIN_META_BLOCKS, MAX_META_BLOCKS),
        }
    }

    /// Whether at least one data block remains.
    fn has_data(self) -> bool {
        self.data_start() < self.total_blocks
    }

    /// The first data block.
    pub(super) fn data_start(self) -> u64 {
        SUPERBLOCK_SLOTS + 2 * self.meta_blocks
    }

    /// The first block of the metadata area of `generation`.
    pub(super) fn area(self, generation: u64) -> u64 {
        SUPERBLOCK_SLOTS + (generation % 2) * self.meta_blocks
    }

    /// The bytes one metadata area holds.
    pub(super) fn meta_capacity(self) -> u64 {
        self.meta_blocks * BLOCK
    }
}

/// One copy of the superblock: which generation of the metadata is where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Superblock {
    pub(super) layout: Layout,
    pub(super) generation: u64,
    /// The length of the encoded metadata in bytes.
    pub(super) meta_len: u64,
    /// The CRC-32 of the encoded metadata.
    pub(super) meta_crc: u32,
}

impl Superblock {
    /// The superblock as one block.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut block = Vec::with_capacity(BLOCK_SIZE);
        block.extend_from_slice(&MAGIC);
        block.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        block.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        block.extend_from_slice(&self.layout.total_blocks.to_le_bytes());
        block.extend_from_slice(&self.layout.meta_blocks.to_le_bytes());
        block.extend_from_slice(&self.generation.to_le_bytes());
        block.extend_from_slice(&self.meta_len.to_le_bytes());
        block.extend_from_slice(&self.meta_crc.to_le_bytes());
        debug_assert_eq!(block.len(), SUPERBLOCK_BODY);
        let crc = crc32fast::hash(&block);
        block.extend_from_slice(&crc.to_le_bytes());
        block.resize(BLOCK_SIZE, 0);
        block
    }

    /// The superblock in `block`, read from `slot` of a device of
    /// `device_blocks` blocks. `None` if the block has no magic or its
    /// checksum does not hold (no volume, or a torn or rotten block); an error
    /// naming the field if the checksum holds but a field is out of range (see
    /// "Opening" in the volume's documentation).
    pub(super) fn decode(
        block: &[u8],
        slot: u64,
        device_blocks: u64,
    ) -> io::Result<Option<Superblock>> {
        let Some((body, crc)) = block
            .get(..SUPERBLOCK_BODY + 4)
            .map(|bytes| bytes.split_at(SUPERBLOCK_BODY))
        else {
            return Ok(None);
        };
        if body[..MAGIC.len()] != MAGIC
            || Reader::new(crc).u32("the superblock checksum")? != crc32fast::hash(body)
        {
            return Ok(None);
        }
        let mut reader = Reader::new(&body[MAGIC.len()..]);
        let version = reader.u32("the format version")?;
        let block_size = reader.u32("the block size")?;
        let total_blocks = reader.u64("the total blocks")?;
        let meta_blocks = reader.u64("the metadata blocks")?;
        let generation = reader.u64("the generation")?;
        let meta_len = reader.u64("the metadata length")?;
        let meta_crc = reader.u32("the metadata checksum")?;
        let unreadable = |what: String| {
            Err(with_message(
                libc::EINVAL,
                format!("volume not readable: superblock {slot}: {what}"),
            ))
        };
        let corrupt = |what: String| Err(corrupt(format!("superblock {slot}: {what}")));
        if version == 1 {
            return unreadable(format!(
                "format version 1, a flat file table without directories (this build \
                 reads version {FORMAT_VERSION} only, and does not convert)"
            ));
        }
        if version != FORMAT_VERSION {
            return unreadable(format!(
                "format version {version} (this build reads version {FORMAT_VERSION})"
            ));
        }
        if block_size != BLOCK_SIZE as u32 {
            return unreadable(format!(
                "block size {block_size} (this build uses {BLOCK_SIZE})"
            ));
        }
        if total_blocks > device_blocks {
            return unreadable(format!(
                "total blocks {total_blocks}, but the device holds {device_blocks}"
            ));
        }
        let layout = Layout::of(total_blocks);
        if !layout.has_data() {
            return corrupt(format!("total blocks {total_blocks} leave no data block"));
        }
        if meta_blocks != layout.meta_blocks {
            return corrupt(format!(
                "metadata blocks {meta_blocks}, but a volume of {total_blocks} blocks has {}",
                layout.meta_blocks
            ));
        }
        if !(1..=MAX_GENERATION).contains(&generation) {
            return corrupt(format!(
                "generation {generation} out of range 1..={MAX_GENERATION}"
            ));
        }
        if generation % SUPERBLOCK_SLOTS != slot {
            return corrupt(format!(
                "generation {generation} belongs in slot {}, not slot {slot}",
                generation % SUPERBLOCK_SLOTS
            ));
        }
        if !(META_HEADER..=layout.meta_capacity()).contains(&meta_len) {
            return corrupt(format!(
                "metadata length {meta_len} out of range {META_HEADER}..={}",
                layout.meta_capacity()
            ));
        }
        Ok(Some(Superblock {
            layout,
            generation,
            meta_len,
            meta_crc,
        }))
    }
}

/// The `EUCLEAN` of a volume whose fields are out of range, saying which.
pub(super) fn corrupt(what: impl fmt::Display) -> io::Error {
    with_message(libc::EUCLEAN, format!("corrupt volume: {what}"))
}

/// Reads little-endian fields from encoded metadata; running out is `EUCLEAN`
/// naming the field.
struct Reader<'a> {
    bytes: &'a [u8],
    /// The bytes read so far.
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, offset: 0 }
    }

    /// The bytes not read yet.
    fn remaining(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn take(&mut self, count: usize, field: &str) -> io::Result<&'a [u8]> {
        if count > self.bytes.len() {
            return Err(corrupt(format!(
                "the metadata ends inside {field} (at byte {} of {})",
                self.offset,
                self.offset + self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        self.offset += count;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> io::Result<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u8(&mut self, field: &str) -> io::Result<u8> {
        self.array(field).map(u8::from_le_bytes)
    }

    fn i64(&mut self, field: &str) -> io::Result<i64> {
        self.array(field).map(i64::from_le_bytes)
    }

    fn u16(&mut self, field: &str) -> io::Result<u16> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &str) -> io::Result<u32> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> io::Result<u64> {
        self.array(field).map(u64::from_le_bytes)
    }
}

/// The volume's persistent metadata: the inodes (files with their extent
/// maps, directories with their entries, symbolic links) and, in memory only,
/// the files unlinked while open.
#[derive(Clone, Debug)]
pub(super) struct Metadata {
    pub(super) inodes: BTreeMap<u64, Inode>,
    /// Inode numbers are never reused, so a handle of a removed file can never
    /// reach a newer file that happens to get the same number.
    pub(super) next_id: u64,
}

/// One inode: what every kind has, and its kind's own fields.
#[derive(Clone, Debug)]
pub(super) struct Inode {
    pub(super) node: Node,
    /// Permission bits, at most `0o7777`.
    pub(super) perm: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Entries naming a file or link; 2 plus its subdirectories for a
    /// directory. A file at 0 is an orphan: unlinked while a handle keeps it,
    /// never encoded.
    pub(super) nlink: u32,
    pub(super) atime: Timestamp,
    pub(super) mtime: Timestamp,
    pub(super) ctime: Timestamp,
}

#[derive(Clone, Debug)]
pub(super) enum Node {
    File(FileMeta),
    Dir(DirMeta),
    Symlink(String),
}

#[derive(Clone, Debug, Default)]
pub(super) struct FileMeta {
    pub(super) size: u64,
    pub(super) extents: ExtentMap,
}

/// One entry of a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) ino: u64,
    /// Where the entry stands in the directory's listing: given when the
    /// entry is linked, from a per-directory counter, and never changed.
    pub(super) cookie: u64,
}

#[derive(Clone, Debug)]
pub(super) struct DirMeta {
    pub(super) entries: BTreeMap<String, Entry>,
    /// The entries' names by cookie: the listing's order.
    pub(super) by_cookie: BTreeMap<u64, String>,
    /// The cookie of the next entry linked.
    pub(super) next_cookie: u64,
    /// The directory naming this one (the root names itself); not encoded,
    /// rebuilt from the entries on open.
    pub(super) parent: u64,
    /// The subdirectories among the entries; not encoded.
    pub(super) subdirs: u32,
    /// The sum of the entries' name lengths, for the encoded length.
    pub(super) names_len: u64,
}

impl DirMeta {
    pub(super) fn new(parent: u64) -> DirMeta {
        DirMeta {
            entries: BTreeMap::new(),
            by_cookie: BTreeMap::new(),
            next_cookie: 1,
            parent,
            subdirs: 0,
            names_len: 0,
        }
    }

    /// Links `name` to `ino` under the next cookie; `ENOSPC` if the cookies
    /// ran out. The caller checked that the name is free.
    pub(super) fn insert(&mut self, name: &str, ino: u64, is_dir: bool) -> io::Result<()> {
        if self.next_cookie > MAX_COOKIE {
            return Err(with_message(
                libc::ENOSPC,
                "the directory's entry cookies ran out",
            ));
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.insert_entry(name, Entry { ino, cookie }, is_dir);
        Ok(())
    }

    pub(super) fn insert_entry(&mut self, name: &str, entry: Entry, is_dir: bool) {
        debug_assert!(!self.entries.contains_key(name));
        self.entries.insert(name.to_owned(), entry);
        self.by_cookie.insert(entry.cookie, name.to_owned());
        self.names_len += name.len() as u64;
        self.subdirs += u32::from(is_dir);
    }

    /// Unlinks `name`, which must be there.
    pub(super) fn remove(&mut self, name: &str, is_dir: bool) -> Entry {
        let entry = self.entries.remove(name).expect("the entry exists");
        self.by_cookie.remove(&entry.cookie);
        self.names_len -= name.len() as u64;
        self.subdirs -= u32::from(is_dir);
        entry
    }

    /// The bytes the directory's kind fields and entries take encoded.
    fn encoded_len(&self) -> u64 {
        8 + 8 + self.entries.len() as u64 * ENTRY_RECORD + self.names_len
    }
}

impl FileMeta {
    /// The bytes the file's kind fields and runs take encoded.
    fn encoded_len(&self) -> u64 {
        8 + 8 + self.extents.run_count() * RUN_RECORD
    }
}

impl Inode {
    /// A new inode of `node`, every time `now`.
    pub(super) fn new(node: Node, perm: u32, uid: u32, gid: u32, now: Timestamp) -> Inode {
        Inode {
            nlink: if matches!(node, Node::Dir(_)) { 2 } else { 1 },
            node,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    pub(super) fn kind(&self) -> FileKind {
        match self.node {
            Node::File(_) => FileKind::File,
            Node::Dir(_) => FileKind::Dir,
            Node::Symlink(_) => FileKind::Symlink,
        }
    }

    /// Whether the inode is a file unlinked while open, kept for its handles
    /// and not encoded.
    pub(super) fn is_orphan(&self) -> bool {
        self.nlink == 0
    }

    /// The bytes the inode takes in encoded metadata: none for an orphan.
    pub(super) fn encoded_len(&self) -> u64 {
        if self.is_orphan() {
            return 0;
        }
        INODE_RECORD
            + match &self.node {
                Node::File(file) => file.encoded_len(),
                Node::Dir(dir) => dir.encoded_len(),
                Node::Symlink(target) => 2 + target.len() as u64,
            }
    }

    pub(super) fn file(&self) -> Option<&FileMeta> {
        match &self.node {
            Node::File(file) => Some(file),
            _ => None,
        }
    }

    pub(super) fn file_mut(&mut self) -> Option<&mut FileMeta> {
        match &mut self.node {
            Node::File(file) => Some(file),
            _ => None,
        }
    }

    pub(super) fn dir(&self) -> Option<&DirMeta> {
        match &self.node {
            Node::Dir(dir) => Some(dir),
            _ => None,
        }
    }

    pub(super) fn dir_mut(&mut self) -> Option<&mut DirMeta> {
        match &mut self.node {
            Node::Dir(dir) => Some(dir),
            _ => None,
        }
    }
}

fn put_time(bytes: &mut Vec<u8>, time: Timestamp) {
    bytes.extend_from_slice(&time.secs.to_le_bytes());
    bytes.extend_from_slice(&time.nanos.to_le_bytes());
}

impl Reader<'_> {
    /// A time of inode `ino`: nanoseconds below 10^9.
    fn time(&mut self, field: &str, ino: u64) -> io::Result<Timestamp> {
        let secs = self.i64(field)?;
        let nanos = self.u32(field)?;
        if nanos >= 1_000_000_000 {
            return Err(corrupt(format!(
                "inode {ino}: {field} has {nanos} nanoseconds (at most 999999999)"
            )));
        }
        Ok(Timestamp { secs, nanos })
    }

    /// A name of `len` bytes, as `check_name` allows; `what` says whose.
    fn name(&mut self, len: u16, field: &str, what: &str) -> io::Result<String> {
        if len == 0 || usize::from(len) > MAX_NAME_LEN {
            return Err(corrupt(format!(
                "{what}: name length {len} out of range 1..={MAX_NAME_LEN}"
            )));
        }
        let name = self.take(len.into(), field)?;
        let name = std::str::from_utf8(name).map_err(|_| {
            corrupt(format!(
                "{what}: name {:?} is not UTF-8",
                String::from_utf8_lossy(name)
            ))
        })?;
        // The rules of a name are `check_name`'s; its length was checked above.
        check_name(name).map_err(|_| {
            corrupt(format!(
                "{what}: name {name:?} is \".\" or \"..\" or holds '/' or NUL"
            ))
        })?;
        Ok(name.to_owned())
    }
}

impl Metadata {
    /// An empty namespace: the root directory, owned by root, mode 0755.
    pub(super) fn new() -> Self {
        let root = Inode::new(Node::Dir(DirMeta::new(ROOT)), 0o755, 0, 0, Timestamp::now());
        Metadata {
            inodes: BTreeMap::from([(ROOT, root)]),
            next_id: ROOT + 1,
        }
    }

    /// The file `ino`, orphans included; `None` if there is none.
    pub(super) fn file(&self, ino: u64) -> Option<&FileMeta> {
        self.inodes.get(&ino).and_then(Inode::file)
    }

    /// The metadata in the on-device format (see the volume's documentation).
    /// Orphans are left out: a crash frees them.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let linked = || self.inodes.iter().filter(|(_, inode)| !inode.is_orphan());
        bytes.extend_from_slice(&self.next_id.to_le_bytes());
        bytes.extend_from_slice(&(linked().count() as u64).to_le_bytes());
        for (&ino, inode) in linked() {
            bytes.extend_from_slice(&ino.to_le_bytes());
            let kind = match inode.node {
                Node::File(_) => KIND_FILE,
                Node::Dir(_) => KIND_DIR,
                Node::Symlink(_) => KIND_SYMLINK,
            };
            bytes.push(kind);
            for field in [inode.perm, inode.uid, inode.gid, inode.nlink] {
                bytes.extend_from_slice(&field.to_le_bytes());
            }
            for time in [inode.atime, inode.mtime, inode.ctime] {
                put_time(&mut bytes, time);
            }
            match &inode.node {
                Node::File(file) => {
                    bytes.extend_from_slice(&file.size.to_le_bytes());
                    bytes.extend_from_slice(&file.extents.run_count().to_le_bytes());
                    for (lblk, extent) in file.extents.iter() {
                        bytes.extend_from_slice(&lblk.to_le_bytes());
                        bytes.extend_from_slice(&extent.phys.to_le_bytes());
                        bytes.extend_from_slice(&extent.len.to_le_bytes());
                    }
                }
                Node::Dir(dir) => {
                    bytes.extend_from_slice(&dir.next_cookie.to_le_bytes());
                    bytes.extend_from_slice(&(dir.entries.len() as u64).to_le_bytes());
                    for (&cookie, name) in &dir.by_cookie {
                        bytes.extend_from_slice(&cookie.to_le_bytes());
                        bytes.extend_from_slice(&dir.entries[name].ino.to_le_bytes());
                        bytes.extend_from_slice(&(name.len() as u16).to_le_bytes());
                        bytes.extend_from_slice(name.as_bytes());
                    }
                }
                Node::Symlink(target) => {
                    bytes.extend_from_slice(&(target.len() as u16).to_le_bytes());
                    bytes.extend_from_slice(target.as_bytes());
                }
            }
        }
        bytes
    }

    /// Decodes and checks metadata: `EUCLEAN` naming the field unless every
    /// field is in range (see "Opening" in the volume's documentation), every
    /// file maps only data blocks of `layout` inside its size, and the
    /// directories make one tree from the root that names every inode as
    /// often as its link count says. (Blocks shared between files are caught
    /// by [`Space::rebuild`].)
    ///
    /// [`Space::rebuild`]: super::space::Space::rebuild
    pub(super) fn decode(bytes: &[u8], layout: Layout) -> io::Result<Metadata> {
        let mut reader = Reader::new(bytes);
        let next_id = reader.u64("the next inode number")?;
        if next_id <= ROOT {
            return Err(corrupt(format!(
                "next inode number {next_id} (the root is inode {ROOT}, so it is above)"
            )));
        }
        let count = reader.u64("the inode count")?;
        let most = reader.remaining() / MIN_INODE_RECORD;
        if count > most {
            return Err(corrupt(format!(
                "inode count {count}, but the {} bytes after it hold at most {most} inodes",
                reader.remaining()
            )));
        }
        let mut meta = Metadata {
            inodes: BTreeMap::new(),
            next_id,
        };
        let mut previous = 0;
        for _ in 0..count {
            let ino = reader.u64("an inode number")?;
            if ino == 0 {
                return Err(corrupt("inode number 0 (numbers start at 1)"));
            }
            if ino >= next_id {
                return Err(corrupt(format!(
                    "inode number {ino} is not below the next inode number {next_id}"
                )));
            }
            if ino <= previous {
                return Err(corrupt(format!(
                    "inode number {ino} after inode number {previous} (numbers ascend)"
                )));
            }
            previous = ino;
            let kind = reader.u8("an inode kind")?;
            let perm = reader.u32("a permission")?;
            if perm > 0o7777 {
                return Err(corrupt(format!(
                    "inode {ino}: permission {perm:#o} past 0o7777"
                )));
            }
            let uid = reader.u32("a uid")?;
            let gid = reader.u32("a gid")?;
            let nlink = reader.u32("a link count")?;
            let atime = reader.time("the access time", ino)?;
            let mtime = reader.time("the modification time", ino)?;
            let ctime = reader.time("the change time", ino)?;
            let node = match kind {
                KIND_FILE => Node::File(decode_file(&mut reader, ino, layout)?),
                KIND_DIR => Node::Dir(decode_dir(&mut reader, ino)?),
                KIND_SYMLINK => Node::Symlink(decode_symlink(&mut reader, ino)?),
                other => {
                    return Err(corrupt(format!(
                        "inode {ino}: kind {other} (1 file, 2 directory, 3 symbolic link)"
                    )))
                }
            };
            let inode = Inode {
                node,
                perm,
                uid,
                gid,
                nlink,
                atime,
                mtime,
                ctime,
            };
            meta.inodes.insert(ino, inode);
        }
        if reader.remaining() != 0 {
            return Err(corrupt(format!(
                "{} bytes follow the last inode (inode count {count})",
                reader.remaining()
            )));
        }
        meta.link_tree()?;
        Ok(meta)
    }

    /// Checks that the entries make one tree of directories from the root and
    /// name every other inode as often as its link count says, and sets each
    /// directory's parent and subdirectory count: `EUCLEAN` naming the inode
    /// otherwise.
    fn link_tree(&mut self) -> io::Result<()> {
        match self.inodes.get(&ROOT) {
            Some(root) if root.dir().is_some() => {}
            Some(_) => {
                return Err(corrupt(format!(
                    "the root, inode {ROOT}, is not a directory"
                )))
            }
            None => return Err(corrupt(format!("no root directory (inode {ROOT})"))),
        }
        // Per inode: the entries naming it, and the last directory that did.
        let mut named: HashMap<u64, (u64, u64)> = HashMap::default();
        for (&dir_ino, inode) in &self.inodes {
            let Some(dir) = inode.dir() else { continue };
            for (name, entry) in &dir.entries {
                let Some(target) = self.inodes.get(&entry.ino) else {
                    return Err(corrupt(format!(
                        "directory {dir_ino}: entry {name:?} names inode {}, which is not there",
                        entry.ino
                    )));
                };
                if entry.ino == ROOT {
                    return Err(corrupt(format!(
                        "directory {dir_ino}: entry {name:?} names the root"
                    )));
                }
                let count = named.entry(entry.ino).or_insert((0, dir_ino));
                count.0 += 1;
                count.1 = dir_ino;
                if target.dir().is_some() && count.0 > 1 {
                    return Err(corrupt(format!(
                        "directory {} is named twice (entry {name:?} of directory {dir_ino})",
                        entry.ino
                    )));
                }
            }
        }
        let mut parents = Vec::new();
        for (&ino, inode) in &self.inodes {
            let (count, parent) = named.get(&ino).copied().unwrap_or((0, 0));
            if ino != ROOT && count == 0 {
                return Err(corrupt(format!("inode {ino} is named by no directory")));
            }
            let expected = match inode.dir() {
                Some(dir) => {
                    parents.push((ino, if ino == ROOT { ROOT } else { parent }));
                    let subdirs = dir
                        .entries
                        .values()
                        .filter(|entry| self.inodes[&entry.ino].dir().is_some())
                        .count() as u64;
                    2 + subdirs
                }
                None => count,
            };
            if u64::from(inode.nlink) != expected {
                return Err(corrupt(format!(
                    "inode {ino}: link count {}, but its entries make it {expected}",
                    inode.nlink
                )));
            }
        }
        for (ino, parent) in parents {
            let inode = self.inodes.get_mut(&ino).expect("listed above");
            let subdirs = inode.nlink - 2;
            let dir = inode.dir_mut().expect("a directory");
            dir.parent = parent;
            dir.subdirs = subdirs;
        }
        // Each directory is named once and the root never: a walk from the
        // root that reaches every directory proves they make one tree.
        let mut reached = std::collections::BTreeSet::from([ROOT]);
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            let dir = self.inodes[&ino]
                .dir()
                .expect("only directories are pushed");
            for entry in dir.entries.values() {
                if self.inodes[&entry.ino].dir().is_some() {
                    reached.insert(entry.ino);
                    stack.push(entry.ino);
                }
            }
        }
        if let Some((&ino, _)) = self
            .inodes
            .iter()
            .find(|(ino, inode)| inode.dir().is_some() && !reached.contains(ino))
        {
            return Err(corrupt(format!(
                "directory {ino} is not reachable from the root (a cycle)"
            )));
        }
        Ok(())
    }

    /// The encoded length, kept up to date incrementally in [`State::meta_len`].
    ///
    /// [`State::meta_len`]: super::State::meta_len
    pub(super) fn encoded_len(&self) -> u64 {
        META_HEADER + self.inodes.values().map(Inode::encoded_len).sum::<u64>()
    }

    /// Every physical run `(first block, length)` the encoded metadata maps:
    /// those of every file but the orphans.
    pub(super) fn mapped_runs(&self) -> Vec<(u64, u64)> {
        self.inodes
            .values()
            .filter(|inode| !inode.is_orphan())
            .filter_map(Inode::file)
            .flat_map(|file| file.extents.iter().map(|(_, e)| (e.phys, e.len)))
            .collect()
    }
}

/// A file's kind fields and runs.
fn decode_file(reader: &mut Reader<'_>, ino: u64, layout: Layout) -> io::Result<FileMeta> {
    let size = reader.u64("a file size")?;
    if size > MAX_FILE_SIZE {
        return Err(corrupt(format!(
            "file {ino}: size {size} past the largest file size {MAX_FILE_SIZE}"
        )));
    }
    let run_count = reader.u64("a run count")?;
    let most = reader.remaining() / RUN_RECORD;
    if run_count > most {
        return Err(corrupt(format!(
            "file {ino}: run count {run_count}, but the {} bytes after it hold at most {most} runs",
            reader.remaining()
        )));
    }
    let blocks = size.div_ceil(BLOCK);
    // At most `most`: checked against the bytes above.
    let mut runs = Vec::with_capacity(run_count as usize);
    for _ in 0..run_count {
        let lblk = reader.u64("a run's logical block")?;
        let phys = reader.u64("a run's physical block")?;
        let len = reader.u64("a run length")?;
        if len == 0 {
            return Err(corrupt(format!(
                "file {ino}: the run at logical block {lblk} has length 0"
            )));
        }
        let inside_file = lblk.checked_add(len).is_some_and(|end| end <= blocks);
        if !inside_file {
            return Err(corrupt(format!(
                "file {ino}: a run of {len} blocks at logical block {lblk} ends past the file's {blocks} blocks"
            )));
        }
        let inside_data = phys >= layout.data_start()
            && phys
                .checked_add(len)
                .is_some_and(|end| end <= layout.total_blocks);
        if !inside_data {
            return Err(corrupt(format!(
                "file {ino}: a run of {len} blocks at physical block {phys} is not inside the data blocks {}..{}",
                layout.data_start(),
                layout.total_blocks
            )));
        }
        runs.push((lblk, Extent { phys, len }));
    }
    let extents = ExtentMap::from_runs(runs)
        .ok_or_else(|| corrupt(format!("file {ino}: its runs overlap or are out of order")))?;
    Ok(FileMeta { size, extents })
}

/// A directory's kind fields and entries; its parent is set later.
fn decode_dir(reader: &mut Reader<'_>, ino: u64) -> io::Result<DirMeta> {
    let mut dir = DirMeta::new(0);
    dir.next_cookie = reader.u64("a next cookie")?;
    if !(1..=MAX_COOKIE + 1).contains(&dir.next_cookie) {
        return Err(corrupt(format!(
            "directory {ino}: next cookie {} out of range 1..={}",
            dir.next_cookie,
            MAX_COOKIE + 1
        )));
    }
    let count = reader.u64("an entry count")?;
    // Each entry takes its record and at least a byte of name.
    let most = reader.remaining() / (ENTRY_RECORD + 1);
    if count > most {
        return Err(corrupt(format!(
            "directory {ino}: entry count {count}, but the {} bytes after it hold at most {most} entries",
            reader.remaining()
        )));
    }
    let mut previous = 0;
    for _ in 0..count {
        let cookie = reader.u64("an entry cookie")?;
        if cookie <= previous || cookie >= dir.next_cookie {
            return Err(corrupt(format!(
                "directory {ino}: entry cookie {cookie} after cookie {previous} (cookies ascend \
                 from 1 and stay below the next cookie {})",
                dir.next_cookie
            )));
        }
        previous = cookie;
        let target = reader.u64("an entry's inode number")?;
        let name_len = reader.u16("a name length")?;
        let name = reader.name(
            name_len,
            "an entry name",
            &format!("directory {ino}, cookie {cookie}"),
        )?;
        if dir.entries.contains_key(&name) {
            return Err(corrupt(format!(
                "directory {ino}: name {name:?} is taken twice"
            )));
        }
        // Subdirectories are counted once every inode is known.
        dir.insert_entry(
            &name,
            Entry {
                ino: target,
                cookie,
            },
            false,
        );
    }
    Ok(dir)
}

/// A symbolic link's target.
fn decode_symlink(reader: &mut Reader<'_>, ino: u64) -> io::Result<String> {
    let len = reader.u16("a target length")?;
    if len == 0 || usize::from(len) > MAX_SYMLINK_LEN {
        return Err(corrupt(format!(
            "symbolic link {ino}: target length {len} out of range 1..={MAX_SYMLINK_LEN}"
        )));
    }
    let target = reader.take(len.into(), "a symbolic link target")?;
    let target = std::str::from_utf8(target).map_err(|_| {
        corrupt(format!(
            "symbolic link {ino}: target {:?} is not UTF-8",
            String::from_utf8_lossy(target)
        ))
    })?;
    if target.contains('\0') {
        return Err(corrupt(format!(
            "symbolic link {ino}: target {target:?} holds NUL"
        )));
    }
    Ok(target.to_owned())
}

/// `EINVAL` for a name that is empty, `.`, `..`, or holds `/` or NUL;
/// `ENAMETOOLONG` for one longer than 255 bytes.
pub(super) fn check_name(name: &str) -> io::Result<()> {
    if name.len() > MAX_NAME_LEN {
        return fail(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return fail(libc::EINVAL);
    }
    Ok(())
}
