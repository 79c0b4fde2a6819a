//! A volume: a tree of directories, files and symbolic links on one device,
//! with a block allocator and extent maps, kept on the device and safe against
//! crashes.
//!
//! This is the realistic substrate for the cache: files share a device, and a
//! freed block is handed to the next allocation at once, whichever file asks. A
//! stale block mapping therefore exposes another file's data, exactly as in the
//! kernel bug reports the cache's coherence lock exists to prevent.
//!
//! Metadata (inodes, directories, sizes, extent maps, allocator) lives in memory behind one
//! mutex and reaches the device only when it is committed. Device I/O is always
//! done outside that mutex: the backend deliberately does not serialise its I/O
//! against block reuse, because preventing a read of a freed-and-reused block is
//! the page cache's job, and a backend that hid such races would hide the bugs
//! the torture looks for.
//!
//! # On-device format
//!
//! ```text
//! block 0                 superblock slot 0 (even generations)
//! block 1                 superblock slot 1 (odd generations)
//! 2 .. 2 + m              metadata area 0 (even generations)
//! 2 + m .. 2 + 2m         metadata area 1 (odd generations)
//! 2 + 2m .. total         data blocks
//! ```
//!
//! `m`, the size of each metadata area in blocks, is the device's size in blocks
//! divided by 256, at least 2 and at most 16384 (64 MiB): 0.8% of the device
//! for both areas, room for a run of extents every 43 blocks (files punched
//! page by page fragment that much). All numbers are little-endian.
//!
//! - A superblock (the first 56 bytes of its block): the magic `FMVOLUME`, the
//!   format version (u32), the block size (u32), the device's size in blocks
//!   (u64), `m` (u64), the generation (u64, from 1 to 2^63 - 1, even in slot
//!   0 and odd in slot 1), the length of the metadata in bytes (u64), the
//!   CRC-32 of the metadata (u32), and the CRC-32 of the 52 bytes before it
//!   (u32).
//! - The metadata (in the area of its generation), format version 2: the next
//!   inode number (u64), the number of inodes (u64), then per inode in
//!   ascending number order (61 bytes): its number (u64), kind (u8: 1 regular
//!   file, 2 directory, 3 symbolic link), permission bits (u32), uid, gid and
//!   link count (3 × u32), and access, modification and change times (each
//!   seconds as i64 and nanoseconds as u32); then by kind:
//!   - a file: its size (u64), number of runs (u64), and per run in ascending
//!     logical order its first logical block, first physical block and length
//!     (3 × u64);
//!   - a directory: its next cookie (u64), number of entries (u64), and per
//!     entry in ascending cookie order its cookie (u64), inode number (u64),
//!     name length (u16) and name;
//!   - a symbolic link: its target's length (u16) and target.
//! - The allocator is not stored: on open, every data block that no file maps
//!   is free. Nor are files unlinked while open (orphans): a crash frees them.
//! - Version 1 (a flat file table) is not read: `open` refuses it with
//!   `EINVAL`, saying so.
//!
//! **Limits.** An area holds `m × 4096` bytes: 16 bytes of header, then 77
//! bytes per file or directory, 63 plus the target per symbolic link, 18 plus
//! the name per directory entry, and 24 bytes per run of the extent maps. A
//! 16 MiB device (m = 16) holds about 2,700 runs, 1 GiB (m = 1024) about
//! 175,000, and 16 GiB or more about 2.8 million; an empty file with a name of
//! `n` bytes takes `95 + n` (a 16 MiB device holds about 590 with 16-byte
//! names). Encoding the snapshot at a commit takes time proportional to the
//! metadata, under the volume's mutex. An operation that could need more fails
//! with `ENOSPC` and changes nothing: `create`, `mkdir`, `symlink`, `link`, a
//! rename to a longer name, a write into holes (it reserves a run per run of
//! fresh blocks it takes; if writers racing on the same holes split its runs
//! further than the area can take, it maps none of them), punch, collapse and
//! insert (one run each).
//!
//! # Namespace
//!
//! Every file, directory and symbolic link is an inode with a number that is
//! never reused; the root directory is [`Volume::ROOT`] (1), and a
//! [`VolumeFile`]'s identity is its file's inode. [`Volume::lookup`],
//! [`Volume::create`], [`Volume::mkdir`], [`Volume::symlink`],
//! [`Volume::link`], [`Volume::unlink`], [`Volume::rmdir`],
//! [`Volume::rename`] (with `renameat2`'s flags), [`Volume::read_dir`],
//! [`Volume::attr`] and [`Volume::set_attr`] answer as Linux does, errno for
//! errno (each call's documentation has its table). The flat calls
//! (`create_file`, `open_file`, `remove_file`, `file_names`) act on the root.
//!
//! - Each directory entry carries a *cookie* from a per-directory counter,
//!   given when the entry is linked and stored with it: a listing resumed
//!   after a cookie neither skips nor repeats an entry that stayed, whatever
//!   came and went meanwhile (POSIX `readdir`).
//! - A file whose last name goes while a handle of it lives is an orphan: its
//!   handles read and write it, and the last to drop frees it. Orphans are
//!   never encoded, so after a crash `open` finds their blocks free.
//!   [`Backend::remove`] of a handle unlinks every name of the file and frees
//!   it at once.
//! - Data changes through a handle move the file's modification and change
//!   times; attribute and link changes the change time; reads no time
//!   (`noatime`). Times, like everything else, are durable at the next commit.
//!
//! # Opening
//!
//! A volume is its device's only owner while it lives: [`Volume::format`] and
//! [`Volume::open`] first take the device's [`DeviceClaim`], and fail with
//! `EBUSY` ("volume in use") while another volume holds it, in this process
//! or, on a [`FileDevice`](crate::FileDevice), in any (an exclusive `flock`).
//! Two live volumes on one device would each run an allocator, hand out the
//! same free block, and give one file the other's data. The claim goes when
//! the volume does, and every [`VolumeFile`] (so every mapping of one) keeps
//! its volume alive.
//!
//! The device could hold anything, so every field is range-checked before it
//! is used, and a failed open writes nothing:
//!
//! - A superblock whose magic or checksum does not hold is not a commit (a
//!   torn or rotten block): open falls back to the other slot, and to the
//!   commit before when the newest metadata's checksum does not hold.
//! - A superblock whose checksum holds is refused with `EINVAL` if this build
//!   cannot read it (another format version or block size) or the device is
//!   smaller than the volume, and with `EUCLEAN` if `m` is not the one the
//!   volume's size gives (or leaves no data block), the generation is outside
//!   1 to 2^63 - 1 or in the other parity's slot, or the metadata length is
//!   outside 16 bytes to the area's size.
//! - Metadata whose checksum holds is refused with `EUCLEAN` unless the next
//!   inode number is above the root's; numbers ascend and are below it; kinds
//!   are known; permissions are at most `0o7777`; nanoseconds are below 10^9;
//!   sizes are at most the largest file size; runs are non-empty, ascend
//!   without overlapping, end inside their file and lie in the data blocks; no
//!   block is mapped twice; cookies ascend from 1 below their directory's next
//!   cookie, which is at most 2^63; names are 1 to 255 bytes of UTF-8 without
//!   `/` or NUL, neither `.` nor `..`, and unique in their directory; symbolic
//!   link targets are 1 to 4095 bytes of UTF-8 without NUL; the counts fit in
//!   the bytes that follow them; nothing follows the last inode; and the
//!   entries make one tree: the root is a directory no entry names, every
//!   entry names an inode that is there, every other directory is named once
//!   and reached from the root, and every link count is what the entries make
//!   it (the names of a file or link, at least one; 2 plus the subdirectories
//!   of a directory).
//!
//! The error's message names the field and its value. A crash never leaves a
//! block whose checksum holds but whose fields do not, so such a block is
//! corruption, not a torn commit, and open reports it instead of going back a
//! commit in silence. Sums of values from the device are checked, and counts
//! size no allocation before they are checked against the bytes that hold
//! them; a volume at generation 2^63 - 1 takes no further commit
//! (`EOVERFLOW`), one whose next inode number is `u64::MAX` no further inode
//! (`ENOSPC`), and a directory whose next cookie is 2^63 no further entry
//! (`ENOSPC`).
//!
//! # Commits
//!
//! A commit ([`Backend::sync`] of any file of the volume, [`Volume::sync`],
//! `collapse_range`, `insert_range`, `format`) of generation `g + 1`:
//!
//! 1. encodes the metadata under the mutex (the snapshot), and adds the blocks it
//!    maps to the *committed* blocks (below);
//! 2. flushes the device: every data block the snapshot maps was written before
//!    it was mapped, so its data is durable before any metadata points at it;
//! 3. writes the snapshot into area `(g + 1) % 2`, which only generation `g - 1`
//!    used, and flushes;
//! 4. writes superblock `g + 1` into slot `(g + 1) % 2` (one aligned 4 KiB write,
//!    atomic by the [`Device`] contract), and flushes;
//! 5. gives the blocks freed before the snapshot back to the allocator.
//!
//! A crash at any write leaves either superblock `g` and its area untouched, or
//! superblock `g + 1` with its area complete. [`Volume::open`] takes the
//! superblock of the highest generation whose own checksum and whose metadata's
//! checksum hold, so a torn area falls back to the generation before. A commit
//! with nothing changed since the last one only flushes the device. Commits are
//! serialised; a failed one is retried in the same slots by the next.
//!
//! # What is durable when
//!
//! - Metadata changes (the namespace, attributes and times, sizes, which blocks
//!   a file maps) are durable at the next commit: a sync of *any* file of the
//!   volume, or [`Volume::sync`] (what a directory's `fsync` calls), commits
//!   them all.
//! - A write to a page that already has a block overwrites that block in place:
//!   after a crash the page reads as of the last commit or as any later write of
//!   it (never torn: block writes are atomic). A write into a hole goes to a fresh
//!   block, which the file maps (durably) from the next commit on; punch, zero and
//!   truncate zero partial blocks in place.
//! - `collapse_range` and `insert_range` commit before they return. They move
//!   blocks to other file offsets, and an in-place write of a moved block before
//!   the move is durable would, after a crash, land at the block's old offset.
//!   (If that commit fails, the error is returned and the move stays in memory.)
//!
//! # No foreign data across crashes (C3)
//!
//! The metadata a crash could bring back is the newest durable commit, or one
//! in flight. A block either of them maps is *committed*; when a file frees a
//! committed block (punch, truncate, collapse, remove), the block waits in a
//! pending list and is reused only after a commit that no longer maps it is
//! durable: reused earlier, another file's data would overwrite it while the
//! durable metadata still gives it to the first file. A block that was mapped
//! and freed between two commits was never durable anywhere and is reused at
//! once (LIFO, as before), so the cache's tests still see immediate reuse. A
//! fresh block is still mapped only after its data is written (a reader of the
//! hole meanwhile reads zeroes), and step 2 of a commit makes that data durable
//! before the metadata that maps it.
//!
//! [`Backend::sync`]: crate::Backend::sync

use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::{Device, DeviceClaim};
use crate::errno::{err, errno, fail, with_message};

mod commit;
mod file;
mod format;
mod namespace;
mod space;
#[cfg(test)]
mod tests;

pub use file::VolumeFile;
pub use format::BLOCK_SIZE;
pub use namespace::{Attr, DirEntry, FileKind, RenameFlags, SetAttr, StatFs, Timestamp};

use format::{FileMeta, Layout, Metadata, Superblock, BLOCK, SUPERBLOCK_SLOTS};
use namespace::ROOT;
use space::Space;
// Only `check_invariants` (and the tests) bound sizes by it here.
#[cfg(any(test, feature = "testing"))]
use format::MAX_FILE_SIZE;

/// Zeroes to write from, so zeroing a range allocates nothing.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A tree of files, directories and symbolic links sharing one device in 4 KiB
/// blocks, their metadata kept on the device (see the module documentation for
/// the format, the namespace and what is durable when).
///
/// ```
/// use std::sync::Arc;
/// use filemap::{Backend, FileDevice, Volume};
///
/// let dir = tempfile::tempdir()?;
/// let image = dir.path().join("volume.img");
/// let volume = Volume::format(Arc::new(FileDevice::create(&image, 16 << 20)?))?;
/// let file = volume.create_file("a")?;
/// file.set_len(4096)?;
/// file.write_pages(0, &[9; 4096])?;
/// volume.sync()?; // names, sizes, block maps and data are durable now
///
/// // One volume per device at a time, in any process.
/// let second = Volume::open(Arc::new(FileDevice::open(&image)?));
/// let busy = second.err().and_then(|error| filemap::errno(&error));
/// assert_eq!(busy, Some(libc::EBUSY));
///
/// drop((file, volume)); // the device's claim goes with the volume
/// let volume = Volume::open(Arc::new(FileDevice::open(&image)?))?;
/// assert_eq!(volume.file_names(), ["a"]);
/// let mut page = [0; 4096];
/// volume.open_file("a")?.read_pages(0, &mut page)?;
/// assert_eq!(page, [9; 4096]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Volume {
    device: Arc<dyn Device>,
    layout: Layout,
    state: Mutex<State>,
    /// Serialises commits, and holds the generation of the newest durable one.
    generation: Mutex<u64>,
    /// The device's claim: no other volume opens the device while this one
    /// lives.
    _claim: DeviceClaim,
    /// This volume's number in the process: the first half of its files'
    /// [`FileIdentity`](crate::FileIdentity).
    serial: u64,
}

/// What the volume knows of a file while it runs.
#[derive(Default)]
struct Runtime {
    /// Live [`VolumeFile`] handles.
    handles: u64,
    /// How many times the file was changed through its handles, shared with
    /// them: the version of its [`FileIdentity`](crate::FileIdentity); with
    /// [`REMOVED`] set once the file is removed.
    changes: Arc<AtomicU64>,
    /// The millisecond of the last [`Backend::touch`](crate::Backend::touch)
    /// through the file's handles, shared with them; 0 after its times are
    /// set, so the next touch moves them again.
    touched: Arc<AtomicU64>,
}

/// Set in [`Runtime::changes`] when the file is removed.
const REMOVED: u64 = 1 << 63;

/// The number of the next volume opened or formatted in this process.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(0);

/// Everything behind the volume's mutex.
struct State {
    meta: Metadata,
    space: Space,
    /// The length of `meta` encoded, in bytes.
    meta_len: u64,
    /// Bytes of metadata area reserved by operations between planning a change
    /// and making it (a write between taking fresh blocks and mapping them).
    meta_reserved: u64,
    /// The bytes a metadata area holds.
    meta_capacity: u64,
    /// Whether `meta` changed since the last commit took its snapshot.
    dirty: bool,
    /// What the volume knows of each file opened since it was opened, by
    /// file id: runtime only, never persisted.
    runtime: HashMap<u64, Runtime>,
}

impl State {
    /// Reserves `bytes` of metadata area; `ENOSPC` if they do not fit beside
    /// what is used and reserved already.
    fn reserve_meta(&mut self, bytes: u64) -> io::Result<()> {
        if self.meta_len + self.meta_reserved + bytes > self.meta_capacity {
            return fail(libc::ENOSPC);
        }
        self.meta_reserved += bytes;
        Ok(())
    }
}

/// Claims `device` for a volume: `EBUSY`, saying the volume is in use, while
/// another owner holds it.
fn claim(device: &dyn Device) -> io::Result<DeviceClaim> {
    device.claim().map_err(|error| {
        if errno(&error) == Some(libc::EBUSY) {
            with_message(libc::EBUSY, format!("volume in use: {error}"))
        } else {
            error
        }
    })
}

impl Volume {
    /// Makes an empty volume on `device`, using every whole block of it, and
    /// commits it: [`Volume::open`] finds it from now on. Whatever the device
    /// held before is lost (a crash during `format` may leave no volume).
    ///
    /// Fails with `EBUSY`, writing nothing, while a volume on the device is
    /// alive (see "Opening" in the module documentation), and with `EINVAL` if
    /// the device is too small to hold the superblocks, the metadata areas and
    /// one data block.
    pub fn format(device: Arc<dyn Device>) -> io::Result<Arc<Volume>> {
        let claim = claim(device.as_ref())?;
        let layout = Layout::for_device(device.len() / BLOCK)?;
        // No superblock of an older volume may survive beside the new one.
        device.write_all_at(&ZEROS[..(SUPERBLOCK_SLOTS * BLOCK) as usize], 0)?;
        let volume = Volume::assemble(device, claim, layout, Metadata::new(), 0)?;
        volume.state.lock().dirty = true;
        volume.commit()?;
        Ok(volume)
    }

    /// Opens the volume on `device`, as of its newest durable commit, and
    /// claims the device while the volume lives.
    ///
    /// Takes the superblock of the highest generation whose checksum and whose
    /// metadata's checksum hold, so a crash at any point of a commit opens the
    /// commit before it or the new one. Fails with `EBUSY` while another volume
    /// on the device is alive; with `EINVAL` if the device holds no volume
    /// (both superblocks lack the magic or a valid checksum), one this build
    /// cannot read, or one larger than the device; and with `EUCLEAN` if a
    /// superblock or the metadata has a valid checksum but a field out of
    /// range. The error says which field and value; a failed open writes
    /// nothing (see "Opening" in the module documentation). Device errors are
    /// returned as they are.
    pub fn open(device: Arc<dyn Device>) -> io::Result<Arc<Volume>> {
        let claim = claim(device.as_ref())?;
        let device_blocks = device.len() / BLOCK;
        if device_blocks < SUPERBLOCK_SLOTS {
            return fail(libc::EINVAL);
        }
        let mut found = Vec::new();
        for slot in 0..SUPERBLOCK_SLOTS {
            let mut block = vec![0; BLOCK_SIZE];
            device.read_exact_at(&mut block, slot * BLOCK)?;
            found.extend(Superblock::decode(&block, slot, device_blocks)?);
        }
        found.sort_by_key(|superblock| Reverse(superblock.generation));
        for superblock in found {
            // `None`: the metadata's checksum does not hold, so the commit is
            // torn: try the one before.
            if let Some(meta) = Self::load(device.as_ref(), &superblock)? {
                return Volume::assemble(
                    device,
                    claim,
                    superblock.layout,
                    meta,
                    superblock.generation,
                );
            }
        }
        fail(libc::EINVAL)
    }

    /// Reads and checks the metadata `superblock` points at; `None` if its
    /// checksum does not hold.
    fn load(device: &dyn Device, superblock: &Superblock) -> io::Result<Option<Metadata>> {
        // At most an area (64 MiB): `Superblock::decode` checked it.
        let mut bytes = vec![0; superblock.meta_len as usize];
        let area = superblock.layout.area(superblock.generation);
        device.read_exact_at(&mut bytes, area * BLOCK)?;
        if crc32fast::hash(&bytes) != superblock.meta_crc {
            return Ok(None);
        }
        Metadata::decode(&bytes, superblock.layout).map(Some)
    }

    /// A volume of files `meta`, committed as `generation`, in memory, holding
    /// the device's `claim`.
    fn assemble(
        device: Arc<dyn Device>,
        claim: DeviceClaim,
        layout: Layout,
        meta: Metadata,
        generation: u64,
    ) -> io::Result<Arc<Volume>> {
        let space = Space::rebuild(&meta, layout)?;
        Ok(Arc::new(Volume {
            device,
            layout,
            state: Mutex::new(State {
                meta_len: meta.encoded_len(),
                meta,
                space,
                meta_reserved: 0,
                meta_capacity: layout.meta_capacity(),
                dirty: false,
                runtime: HashMap::default(),
            }),
            generation: Mutex::new(generation),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            _claim: claim,
        }))
    }

    /// Creates an empty regular file `name` in the root directory, with
    /// permissions 0644 and owner 0:0, and returns a handle to it: as
    /// [`Volume::create`] of [`Volume::ROOT`]. The file is durable from the
    /// next commit on.
    ///
    /// Fails with `EEXIST` if the name is taken, `EINVAL` if it is empty, `.`,
    /// `..`, or holds `/` or NUL, `ENAMETOOLONG` if it is longer than 255
    /// bytes, and `ENOSPC` if the metadata area is full or no inode number is
    /// left.
    pub fn create_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        self.create(ROOT, name, 0o644, 0, 0).map(|(_, file)| file)
    }

    /// Opens the regular file `name` of the root directory; fails with
    /// `ENOENT` if there is none of that name, `EISDIR` if it is a directory
    /// and `ELOOP` if it is a symbolic link.
    pub fn open_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        // One lock for the name and the handle: a small file's open is
        // mostly this.
        let mut state = self.state.lock();
        let ino = state.child(ROOT, name)?;
        self.open_ino_locked(&mut state, ino)
    }

    /// Removes the name `name` from the root directory, as [`Volume::unlink`]
    /// does, but only while the file has no handle: its blocks are freed
    /// unless it has other names. The removal is durable from the next commit
    /// on; until then a crash brings the file back whole.
    ///
    /// Fails with `ENOENT` if there is no such name, `EISDIR` if it names a
    /// directory, and `EBUSY` while any handle of the file is alive (use
    /// [`Volume::unlink`] to make it an orphan, or [`Backend::remove`] on a
    /// handle to remove it anyway).
    ///
    /// [`Backend::remove`]: crate::Backend::remove
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        let ino = state.child(ROOT, name)?;
        if state.inode(ino)?.dir().is_some() {
            return fail(libc::EISDIR);
        }
        if state.runtime.get(&ino).is_some_and(|file| file.handles > 0) {
            return fail(libc::EBUSY);
        }
        state.unlink_name(ROOT, name)
    }

    /// The names of the regular files of the root directory, sorted.
    pub fn file_names(&self) -> Vec<String> {
        let state = self.state.lock();
        let root = state.meta.inodes[&ROOT]
            .dir()
            .expect("the root is a directory");
        root.entries
            .iter()
            .filter(|(_, entry)| state.meta.file(entry.ino).is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The device's size in blocks, superblocks and metadata areas included.
    pub fn total_blocks(&self) -> u64 {
        self.layout.total_blocks
    }

    /// The number of blocks that can be allocated now.
    pub fn free_blocks(&self) -> u64 {
        self.state.lock().space.allocator.available()
    }

    /// The number of freed blocks that wait for the next commit before they can
    /// be allocated (durable metadata still maps them).
    pub fn pending_blocks(&self) -> u64 {
        self.state.lock().space.pending_count
    }

    /// The device the volume lives on.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// Asserts that every block below the allocator's high-water mark is exactly
    /// one of: superblock or metadata area, free, pending, in flight, or
    /// allocated to exactly one file; that every file's blocks lie inside the
    /// device; that no free block is committed (a crash could give it back to a
    /// file while another one reuses it); that no file maps blocks past its end
    /// of file; and that the file table and the metadata size are consistent.
    /// (A test hook: only with the `testing` feature.)
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let state = self.state.lock();
        let meta = &state.meta;
        let space = &state.space;
        let alloc = &space.allocator;
        let data_start = self.layout.data_start();
        // (first block, length, owner) for every block below the high-water mark.
        let mut claims: Vec<(u64, u64, String)> = vec![(0, data_start, "metadata".into())];
        let mut free_count = 0;
        for &(first, len) in &alloc.free {
            assert!(len > 0, "empty free run at {first}");
            claims.push((first, len, "free list".into()));
            free_count += len;
            space
                .committed
                .split(first, len, |first, len, is_committed| {
                    assert!(
                        !is_committed,
                        "free blocks {first}+{len} are committed: a crash could give them back"
                    );
                });
        }
        assert_eq!(free_count, alloc.free_count, "free block count is off");
        let mut pending_count = 0;
        for &(first, len) in &space.pending {
            assert!(len > 0, "empty pending run at {first}");
            claims.push((first, len, "pending".into()));
            pending_count += len;
        }
        assert_eq!(pending_count, space.pending_count, "pending count is off");
        for (&id, inode) in &meta.inodes {
            assert!(id < meta.next_id, "inode {id} not below the next id");
            if inode.is_orphan() {
                let open = state.runtime.get(&id).is_some_and(|file| file.handles > 0);
                assert!(open, "orphan {id} has no handle left to free it");
            }
            let Some(file) = inode.file() else { continue };
            assert!(file.size <= MAX_FILE_SIZE, "file {id} too large");
            file.extents.check_invariants();
            let blocks = file.size.div_ceil(BLOCK);
            for (lblk, extent) in file.extents.iter() {
                assert!(
                    lblk + extent.len <= blocks,
                    "file {id} maps block {} past its end",
                    lblk + extent.len - 1
                );
                assert!(
                    extent.phys >= data_start && extent.phys + extent.len <= alloc.total,
                    "file {id} maps blocks {}+{} outside the data blocks",
                    extent.phys,
                    extent.len
                );
                claims.push((extent.phys, extent.len, format!("file {id}")));
            }
        }
        claims.sort();
        let mut next = 0;
        for (first, len, owner) in &claims {
            assert!(
                *first >= next,
                "block {first} ({owner}) is claimed twice: {claims:?}"
            );
            next = first + len;
        }
        assert!(
            next <= alloc.high_water,
            "a claimed block is above the high-water mark"
        );
        let claimed: u64 = claims.iter().map(|(_, len, _)| len).sum();
        assert_eq!(
            claimed + alloc.in_flight,
            alloc.high_water,
            "blocks leaked below the high-water mark"
        );
        let mapped: u64 = meta
            .inodes
            .values()
            .filter_map(|inode| inode.file())
            .map(|file| file.extents.mapped_blocks())
            .sum();
        assert_eq!(
            mapped + free_count + pending_count + data_start + alloc.in_flight,
            alloc.high_water
        );
        assert!(alloc.high_water <= self.layout.total_blocks);
        assert_eq!(state.meta_len, meta.encoded_len(), "metadata size is off");
        // The namespace as committed would be: it decodes, with the parents
        // and subdirectory counts kept in memory.
        let decoded = Metadata::decode(&meta.encode(), self.layout)
            .unwrap_or_else(|error| panic!("the namespace does not decode: {error}"));
        for (ino, inode) in &meta.inodes {
            if let Some(dir) = inode.dir() {
                let on_disk = decoded.inodes[ino].dir().expect("a directory");
                assert_eq!(dir.parent, on_disk.parent, "parent of directory {ino}");
                assert_eq!(dir.subdirs, on_disk.subdirs, "subdirectories of {ino}");
            }
        }
        assert!(
            state.meta_len + state.meta_reserved <= state.meta_capacity,
            "metadata outgrew its area"
        );
    }

    /// Removes file `id` whatever its names and handles.
    fn remove_locked(state: &mut State, id: u64) -> io::Result<()> {
        state.remove_everywhere(id)
    }

    /// Runs `f` on file `id` under the mutex, to look; `ENOENT` if it was removed.
    fn with_file<R>(&self, id: u64, f: impl FnOnce(&FileMeta) -> io::Result<R>) -> io::Result<R> {
        let state = self.state.lock();
        let file = state.meta.file(id).ok_or_else(|| err(libc::ENOENT))?;
        f(file)
    }

    /// Runs `f` on file `id` under the mutex, to change it: first gives back the
    /// `held` bytes of metadata area this operation reserved earlier, then fails
    /// with `ENOENT` if the file was removed or `ENOSPC` unless `need` more bytes
    /// fit, and afterwards accounts for the runs `f` added or removed and moves
    /// the file's modification and change times.
    fn change_file<R>(
        &self,
        id: u64,
        held: u64,
        need: u64,
        f: impl FnOnce(&mut FileMeta, &mut Space) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        state.meta_reserved -= held;
        state.meta.file(id).ok_or_else(|| err(libc::ENOENT))?;
        if state.meta_len + state.meta_reserved + need > state.meta_capacity {
            return fail(libc::ENOSPC);
        }
        let inode = state.meta.inodes.get_mut(&id).expect("checked above");
        let before = inode.encoded_len();
        let result = f(inode.file_mut().expect("checked above"), &mut state.space);
        let now = Timestamp::now();
        inode.mtime = now;
        inode.ctime = now;
        state.meta_len = state.meta_len - before + inode.encoded_len();
        state.dirty = true;
        result
    }

    /// Moves the modification and change times of file `id`, if it is
    /// still there, after a change of its data.
    fn touch_data(&self, id: u64) {
        let mut state = self.state.lock();
        if let Some(inode) = state.meta.inodes.get_mut(&id) {
            let now = Timestamp::now();
            inode.mtime = now;
            inode.ctime = now;
            state.dirty = true;
        }
    }

    /// Writes `len` zero bytes at device byte `offset`.
    fn write_zeros(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let chunk = len.min(ZEROS.len() as u64);
            self.device.write_all_at(&ZEROS[..chunk as usize], offset)?;
            offset += chunk;
            len -= chunk;
        }
        Ok(())
    }
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("device", &self.device)
            .field("total_blocks", &self.layout.total_blocks)
            .field("meta_blocks", &self.layout.meta_blocks)
            .finish_non_exhaustive()
    }
}
