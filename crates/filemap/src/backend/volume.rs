//! A volume: many files on one device, with a block allocator and extent maps,
//! kept on the device and safe against crashes.
//!
//! This is the realistic substrate for the cache: files share a device, and a
//! freed block is handed to the next allocation at once, whichever file asks. A
//! stale block mapping therefore exposes another file's data, exactly as in the
//! kernel bug reports the cache's coherence lock exists to prevent.
//!
//! Metadata (file table, sizes, extent maps, allocator) lives in memory behind one
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
//! - The metadata (in the area of its generation): the next file id (u64), the
//!   number of files (u64), then per file in ascending id order its id (u64),
//!   size (u64), name length (u16), name, number of runs (u64), and per run in
//!   ascending logical order its first logical block, first physical block and
//!   length (3 × u64).
//! - The allocator is not stored: on open, every data block that no file maps
//!   is free.
//!
//! **Limits.** An area holds `m × 4096` bytes: 16 bytes of header, then 26
//! bytes plus the name per file and 24 bytes per run of the extent maps. A 16 MiB
//! device (m = 16) holds about 2,700 runs, 1 GiB (m = 1024) about 175,000, and
//! 16 GiB or more about 2.8 million; files with names of `n` bytes take `26 + n`
//! each (a 16 MiB device holds about 1,560 empty files with 16-byte names). Encoding
//! the snapshot at a commit takes time proportional to the metadata, under the
//! volume's mutex. An operation that could need more fails with
//! `ENOSPC` and changes nothing: `create_file`, a write into holes (it reserves
//! a run per run of fresh blocks it takes; if writers racing on the same holes
//! split its runs further than the area can take, it maps none of them),
//! punch, collapse and insert (one run each).
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
//!   id is positive; ids ascend and are below it; sizes are at most the
//!   largest file size; names are 1 to 255 bytes of UTF-8 without `/` or NUL,
//!   and unique; runs are non-empty, ascend without overlapping, end inside
//!   their file and lie in the data blocks; no block is mapped twice; the
//!   counts fit in the bytes that follow them; and nothing follows the last
//!   file.
//!
//! The error's message names the field and its value. A crash never leaves a
//! block whose checksum holds but whose fields do not, so such a block is
//! corruption, not a torn commit, and open reports it instead of going back a
//! commit in silence. Sums of values from the device are checked, and counts
//! size no allocation before they are checked against the bytes that hold
//! them; a volume at generation 2^63 - 1 takes no further commit
//! (`EOVERFLOW`), and one whose next id is `u64::MAX` no further file
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
//! - Metadata changes (create, remove, sizes, which blocks a file maps) are
//!   durable at the next commit: a sync of *any* file of the volume commits them
//!   all.
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

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::extent::{Extent, ExtentMap};
use super::Backend;
use crate::device::{Device, DeviceClaim};
use crate::errno::{err, errno, fail, with_message};

/// The volume's block size in bytes, equal to the cache's page size so that a page
/// is always exactly one block.
pub const BLOCK_SIZE: usize = 4096;
const _: () = assert!(BLOCK_SIZE == crate::page::PAGE_SIZE);

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The largest file size, 2^44 bytes (16 TiB): logical block numbers then fit in
/// 32 bits (ext4 has the same limit with 4 KiB blocks).
const MAX_FILE_SIZE: u64 = 1 << 44;

/// The longest file name in bytes, as on common Unix file systems.
const MAX_NAME_LEN: usize = 255;

/// The first bytes of every superblock.
const MAGIC: [u8; 8] = *b"FMVOLUME";

/// The version of the on-device format.
const FORMAT_VERSION: u32 = 1;

/// Blocks 0 and 1 hold the superblock's two slots.
const SUPERBLOCK_SLOTS: u64 = 2;

/// The last generation: a commit a microsecond would take 290,000 years to
/// reach it, so a larger one on the device is corruption, and `+ 1` of any
/// accepted generation cannot overflow.
const MAX_GENERATION: u64 = (1 << 63) - 1;

/// The bytes of a superblock its own checksum covers.
const SUPERBLOCK_BODY: usize = 52;

/// Each metadata area gets one block per this many blocks of the device...
const BLOCKS_PER_META_BLOCK: u64 = 256;
/// ...but at least this many...
const MIN_META_BLOCKS: u64 = 2;
/// ...and at most this many (64 MiB).
const MAX_META_BLOCKS: u64 = 16384;

/// Encoded metadata: the header (next id, file count).
const META_HEADER: u64 = 16;
/// Encoded metadata per file besides its name: id, size, name length, run count.
const FILE_RECORD: u64 = 8 + 8 + 2 + 8;
/// Encoded metadata per run: first logical block, first physical block, length.
const RUN_RECORD: u64 = 24;

/// Zeroes to write from, so zeroing a range allocates nothing.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Where the parts of a volume are on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// The device's size in blocks when it was formatted.
    total_blocks: u64,
    /// The size of each of the two metadata areas, in blocks.
    meta_blocks: u64,
}

impl Layout {
    /// The layout `format` gives a device of `total_blocks` blocks; `EINVAL` if
    /// that leaves no data block.
    fn for_device(total_blocks: u64) -> io::Result<Layout> {
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
    fn data_start(self) -> u64 {
        SUPERBLOCK_SLOTS + 2 * self.meta_blocks
    }

    /// The first block of the metadata area of `generation`.
    fn area(self, generation: u64) -> u64 {
        SUPERBLOCK_SLOTS + (generation % 2) * self.meta_blocks
    }

    /// The bytes one metadata area holds.
    fn meta_capacity(self) -> u64 {
        self.meta_blocks * BLOCK
    }
}

/// One copy of the superblock: which generation of the metadata is where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Superblock {
    layout: Layout,
    generation: u64,
    /// The length of the encoded metadata in bytes.
    meta_len: u64,
    /// The CRC-32 of the encoded metadata.
    meta_crc: u32,
}

impl Superblock {
    /// The superblock as one block.
    fn encode(&self) -> Vec<u8> {
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
    /// "Opening" in the module documentation).
    fn decode(block: &[u8], slot: u64, device_blocks: u64) -> io::Result<Option<Superblock>> {
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
fn corrupt(what: impl fmt::Display) -> io::Error {
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

/// Many files sharing one device in 4 KiB blocks, their metadata kept on the
/// device (see the module documentation for the format and what is durable when).
pub struct Volume {
    device: Arc<dyn Device>,
    layout: Layout,
    state: Mutex<State>,
    /// Serialises commits, and holds the generation of the newest durable one.
    generation: Mutex<u64>,
    /// The device's claim: no other volume opens the device while this one
    /// lives.
    _claim: DeviceClaim,
}

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
    /// Live [`VolumeFile`] handles per file id: runtime only, never persisted.
    handles: HashMap<u64, u64>,
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

/// The volume's persistent metadata: the file table and the extent maps.
#[derive(Clone, Debug)]
struct Metadata {
    names: BTreeMap<String, u64>,
    files: BTreeMap<u64, FileMeta>,
    /// Ids are never reused, so a handle of a removed file can never reach a
    /// newer file that happens to get the same id.
    next_id: u64,
}

#[derive(Clone, Debug)]
struct FileMeta {
    name: String,
    size: u64,
    extents: ExtentMap,
}

impl FileMeta {
    /// The bytes the file takes in encoded metadata.
    fn encoded_len(&self) -> u64 {
        FILE_RECORD + self.name.len() as u64 + self.extents.run_count() * RUN_RECORD
    }
}

impl Metadata {
    fn new() -> Self {
        Metadata {
            names: BTreeMap::new(),
            files: BTreeMap::new(),
            next_id: 1,
        }
    }

    /// The metadata in the on-device format (see the module documentation).
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.next_id.to_le_bytes());
        bytes.extend_from_slice(&(self.files.len() as u64).to_le_bytes());
        for (&id, file) in &self.files {
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&file.size.to_le_bytes());
            bytes.extend_from_slice(&(file.name.len() as u16).to_le_bytes());
            bytes.extend_from_slice(file.name.as_bytes());
            bytes.extend_from_slice(&file.extents.run_count().to_le_bytes());
            for (lblk, extent) in file.extents.iter() {
                bytes.extend_from_slice(&lblk.to_le_bytes());
                bytes.extend_from_slice(&extent.phys.to_le_bytes());
                bytes.extend_from_slice(&extent.len.to_le_bytes());
            }
        }
        bytes
    }

    /// Decodes and checks metadata: `EUCLEAN` naming the field unless every
    /// field is in range (see "Opening" in the module documentation) and every
    /// file maps only data blocks of `layout` inside its size. (Blocks shared
    /// between files are caught by [`Space::rebuild`].)
    fn decode(bytes: &[u8], layout: Layout) -> io::Result<Metadata> {
        let mut reader = Reader::new(bytes);
        let mut meta = Metadata::new();
        meta.next_id = reader.u64("the next id")?;
        if meta.next_id == 0 {
            return Err(corrupt("next id 0 (ids start at 1)"));
        }
        let count = reader.u64("the file count")?;
        // Each file takes its record and at least a byte of name.
        let most = reader.remaining() / (FILE_RECORD + 1);
        if count > most {
            return Err(corrupt(format!(
                "file count {count}, but the {} bytes after it hold at most {most} files",
                reader.remaining()
            )));
        }
        let mut previous = 0;
        for _ in 0..count {
            let id = reader.u64("a file id")?;
            if id == 0 {
                return Err(corrupt("file id 0 (ids start at 1)"));
            }
            if id >= meta.next_id {
                return Err(corrupt(format!(
                    "file id {id} is not below the next id {}",
                    meta.next_id
                )));
            }
            if id <= previous {
                return Err(corrupt(format!(
                    "file id {id} after file id {previous} (ids ascend)"
                )));
            }
            previous = id;
            let size = reader.u64("a file size")?;
            if size > MAX_FILE_SIZE {
                return Err(corrupt(format!(
                    "file {id}: size {size} past the largest file size {MAX_FILE_SIZE}"
                )));
            }
            let name_len = reader.u16("a name length")?;
            if name_len == 0 || usize::from(name_len) > MAX_NAME_LEN {
                return Err(corrupt(format!(
                    "file {id}: name length {name_len} out of range 1..={MAX_NAME_LEN}"
                )));
            }
            let name = reader.take(name_len.into(), "a file name")?;
            let name = std::str::from_utf8(name).map_err(|_| {
                corrupt(format!(
                    "file {id}: name {:?} is not UTF-8",
                    String::from_utf8_lossy(name)
                ))
            })?;
            // The rules of a name are `create_file`'s; its length was checked above.
            check_name(name)
                .map_err(|_| corrupt(format!("file {id}: name {name:?} holds '/' or NUL")))?;
            let run_count = reader.u64("a run count")?;
            let most = reader.remaining() / RUN_RECORD;
            if run_count > most {
                return Err(corrupt(format!(
                    "file {id}: run count {run_count}, but the {} bytes after it hold at most {most} runs",
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
                        "file {id}: the run at logical block {lblk} has length 0"
                    )));
                }
                let inside_file = lblk.checked_add(len).is_some_and(|end| end <= blocks);
                if !inside_file {
                    return Err(corrupt(format!(
                        "file {id}: a run of {len} blocks at logical block {lblk} ends past the file's {blocks} blocks"
                    )));
                }
                let inside_data = phys >= layout.data_start()
                    && phys
                        .checked_add(len)
                        .is_some_and(|end| end <= layout.total_blocks);
                if !inside_data {
                    return Err(corrupt(format!(
                        "file {id}: a run of {len} blocks at physical block {phys} is not inside the data blocks {}..{}",
                        layout.data_start(),
                        layout.total_blocks
                    )));
                }
                runs.push((lblk, Extent { phys, len }));
            }
            let extents = ExtentMap::from_runs(runs).ok_or_else(|| {
                corrupt(format!("file {id}: its runs overlap or are out of order"))
            })?;
            if let Some(other) = meta.names.insert(name.to_owned(), id) {
                return Err(corrupt(format!(
                    "file {id}: name {name:?} is taken by file {other}"
                )));
            }
            meta.files.insert(
                id,
                FileMeta {
                    name: name.to_owned(),
                    size,
                    extents,
                },
            );
        }
        if reader.remaining() != 0 {
            return Err(corrupt(format!(
                "{} bytes follow the last file (file count {count})",
                reader.remaining()
            )));
        }
        Ok(meta)
    }

    /// The encoded length, kept up to date incrementally in [`State::meta_len`].
    fn encoded_len(&self) -> u64 {
        META_HEADER + self.files.values().map(FileMeta::encoded_len).sum::<u64>()
    }

    /// Every mapped physical run `(first block, length)` of every file.
    fn mapped_runs(&self) -> Vec<(u64, u64)> {
        self.files
            .values()
            .flat_map(|file| file.extents.iter().map(|(_, e)| (e.phys, e.len)))
            .collect()
    }
}

/// A set of blocks as disjoint, non-adjacent runs: first block to length.
#[derive(Clone, Debug, Default)]
struct RunSet {
    runs: BTreeMap<u64, u64>,
}

impl RunSet {
    /// The union of `runs` `(first block, length)`, which may overlap.
    fn from_runs(mut runs: Vec<(u64, u64)>) -> RunSet {
        runs.sort_unstable();
        let mut set = RunSet::default();
        let mut current: Option<(u64, u64)> = None;
        for (first, len) in runs.into_iter().filter(|&(_, len)| len > 0) {
            let end = first + len;
            current = match current {
                Some((start, current_end)) if first <= current_end => {
                    Some((start, current_end.max(end)))
                }
                _ => {
                    if let Some((start, current_end)) = current {
                        set.runs.insert(start, current_end - start);
                    }
                    Some((first, end))
                }
            };
        }
        if let Some((start, end)) = current {
            set.runs.insert(start, end - start);
        }
        set
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&first, &len)| (first, len))
    }

    fn union(&self, other: &RunSet) -> RunSet {
        RunSet::from_runs(self.iter().chain(other.iter()).collect())
    }

    /// Calls `each(first, len, inside)` for the pieces of `first..first + len`
    /// inside and outside the set, in ascending order.
    fn split(&self, first: u64, len: u64, mut each: impl FnMut(u64, u64, bool)) {
        let end = first + len;
        let mut at = first;
        let before = self.runs.range(..first).next_back();
        for (&start, &run_len) in before.into_iter().chain(self.runs.range(first..end)) {
            let (start, run_end) = (start.max(at), (start + run_len).min(end));
            if run_end <= start {
                continue;
            }
            if start > at {
                each(at, start - at, false);
            }
            each(start, run_end - start, true);
            at = run_end;
        }
        if at < end {
            each(at, end - at, false);
        }
    }
}

/// Where the data blocks stand: the allocator, and the blocks a crash could
/// give back to a file.
#[derive(Debug)]
struct Space {
    allocator: Allocator,
    /// The blocks the newest durable metadata maps, and those a commit in flight
    /// (or one that failed) may have made durable: no allocation may take them.
    committed: RunSet,
    /// Blocks freed while `committed` held them: they go back to the allocator
    /// once a commit that no longer maps them is durable.
    pending: Vec<(u64, u64)>,
    /// The number of blocks in `pending`.
    pending_count: u64,
}

impl Space {
    /// The space of a volume whose files are `meta`: every data block no file
    /// maps is free, and every mapped one is committed. `EUCLEAN` if two runs
    /// map one block (metadata that was never written by a volume).
    fn rebuild(meta: &Metadata, layout: Layout) -> io::Result<Space> {
        let mut runs = meta.mapped_runs();
        runs.sort_unstable();
        let mut gaps = Vec::new();
        let mut next = layout.data_start();
        for &(phys, len) in &runs {
            if phys < next {
                return Err(corrupt(format!("physical block {phys} is mapped twice")));
            }
            if phys > next {
                gaps.push((next, phys - next));
            }
            next = phys + len;
        }
        // The lowest gap on top of the stack: it is taken first.
        gaps.reverse();
        Ok(Space {
            allocator: Allocator {
                free_count: gaps.iter().map(|&(_, len)| len).sum(),
                free: gaps,
                in_flight: 0,
                high_water: next,
                total: layout.total_blocks,
            },
            committed: RunSet::from_runs(runs),
            pending: Vec::new(),
            pending_count: 0,
        })
    }

    /// Frees blocks a file mapped: to the allocator, except those durable
    /// metadata may still map, which wait for the next commit.
    fn free(&mut self, first: u64, len: u64) {
        let Space {
            allocator,
            committed,
            pending,
            pending_count,
        } = self;
        committed.split(first, len, |first, len, is_committed| {
            if is_committed {
                pending.push((first, len));
                *pending_count += len;
            } else {
                allocator.free(first, len);
            }
        });
    }
}

/// The block allocator: a LIFO stack of freed runs, then never-used blocks above
/// a high-water mark.
///
/// LIFO is deliberate: the block freed last is the block allocated next, so a
/// stale mapping of it reads another file's data at once instead of by luck.
#[derive(Clone, Debug)]
struct Allocator {
    /// Freed runs `(first block, length)`; the top of the stack is the last entry.
    free: Vec<(u64, u64)>,
    /// The number of blocks in `free`.
    free_count: u64,
    /// Blocks handed to writes that have not mapped them yet (see
    /// `VolumeFile::write_pages`): neither free nor owned by a file.
    in_flight: u64,
    /// Blocks at or above this have never been allocated (since the volume was
    /// opened).
    high_water: u64,
    /// The device's size in blocks.
    total: u64,
}

impl Allocator {
    fn available(&self) -> u64 {
        self.free_count + (self.total - self.high_water)
    }

    /// The most recently freed block, or else a never-used one.
    fn allocate(&mut self) -> Option<u64> {
        if let Some(top) = self.free.last_mut() {
            let block = top.0;
            top.0 += 1;
            top.1 -= 1;
            if top.1 == 0 {
                self.free.pop();
            }
            self.free_count -= 1;
            return Some(block);
        }
        if self.high_water < self.total {
            self.high_water += 1;
            return Some(self.high_water - 1);
        }
        None
    }

    /// Pushes a run onto the stack, merged with the top when it ends where the
    /// top begins (blocks given back in the reverse order of their allocation
    /// restore the stack as it was).
    fn free(&mut self, first: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.free_count += len;
        match self.free.last_mut() {
            Some(top) if first + len == top.0 => *top = (first, top.1 + len),
            _ => self.free.push((first, len)),
        }
    }
}

/// The number of runs in `fresh` `(logical block, physical block)`, sorted by
/// logical block: the most runs mapping them into holes can add to an extent
/// map.
fn fresh_runs(fresh: &[(u64, u64)]) -> u64 {
    let breaks = fresh
        .windows(2)
        .filter(|pair| pair[1] != (pair[0].0 + 1, pair[0].1 + 1))
        .count();
    (breaks + usize::from(!fresh.is_empty())) as u64
}

/// Which blocks a punch or zero of a byte range touches.
struct RangePlan {
    /// Partial blocks at the edges that are allocated: `(physical block, first
    /// byte, end byte)` inside the block.
    edges: Vec<(u64, u64, u64)>,
    /// The whole blocks, as `first logical block, count`.
    first_whole: u64,
    whole_count: u64,
}

/// Plans `offset..end` of `file`, clamped to its end of file; `None` if that
/// leaves nothing to do.
fn plan_range(file: &FileMeta, offset: u64, end: u64) -> Option<RangePlan> {
    if offset >= end || offset >= file.size {
        return None;
    }
    // The bytes of the last block past the end of file are zero already, so a
    // range reaching the end of file may treat that block as whole.
    let end = if end >= file.size {
        file.size.div_ceil(BLOCK) * BLOCK
    } else {
        end
    };
    let head = offset / BLOCK;
    let tail = (end - 1) / BLOCK;
    let mut partial = Vec::new();
    if head == tail {
        let (from, to) = (offset % BLOCK, end - head * BLOCK);
        if to - from < BLOCK {
            partial.push((head, from, to));
        }
    } else {
        if offset % BLOCK != 0 {
            partial.push((head, offset % BLOCK, BLOCK));
        }
        if end % BLOCK != 0 {
            partial.push((tail, 0, end % BLOCK));
        }
    }
    let first_whole = offset.div_ceil(BLOCK);
    let whole_count = (end / BLOCK).saturating_sub(first_whole);
    let edges = partial
        .into_iter()
        .filter_map(|(lblk, from, to)| Some((file.extents.lookup(lblk)?, from, to)))
        .collect();
    Some(RangePlan {
        edges,
        first_whole,
        whole_count,
    })
}

/// The byte span of `len` bytes of whole pages starting at page `index`.
fn page_span(index: u64, len: usize) -> io::Result<(u64, u64)> {
    if len % BLOCK_SIZE != 0 {
        return fail(libc::EINVAL);
    }
    let start = index.checked_mul(BLOCK).ok_or_else(|| err(libc::EINVAL))?;
    let end = start
        .checked_add(len as u64)
        .ok_or_else(|| err(libc::EINVAL))?;
    Ok((start, end))
}

/// The end of a collapse or insert range, or `EINVAL` unless both `offset` and
/// `len` are multiples of the block size, `len` is positive and the end fits.
fn aligned_range(offset: u64, len: u64) -> io::Result<u64> {
    if offset % BLOCK != 0 || len % BLOCK != 0 || len == 0 {
        return fail(libc::EINVAL);
    }
    offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))
}

/// Splits per-page physical blocks into runs `(first page, page count, first
/// physical block or None for a hole)` that one device call can serve.
fn runs(plan: &[Option<u64>]) -> Vec<(usize, usize, Option<u64>)> {
    let mut runs: Vec<(usize, usize, Option<u64>)> = Vec::new();
    for (page, &phys) in plan.iter().enumerate() {
        if let Some((_, count, run_phys)) = runs.last_mut() {
            let extends = match (*run_phys, phys) {
                (None, None) => true,
                (Some(first), Some(next)) => first + *count as u64 == next,
                _ => false,
            };
            if extends {
                *count += 1;
                continue;
            }
        }
        runs.push((page, 1, phys));
    }
    runs
}

fn check_name(name: &str) -> io::Result<()> {
    if name.len() > MAX_NAME_LEN {
        return fail(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(['/', '\0']) {
        return fail(libc::EINVAL);
    }
    Ok(())
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
                handles: HashMap::new(),
            }),
            generation: Mutex::new(generation),
            _claim: claim,
        }))
    }

    /// Commits the metadata and flushes the device: when it returns, every file,
    /// name, size and completed write of the volume is durable. A
    /// [`Backend::sync`] of any of its files does the same.
    pub fn sync(&self) -> io::Result<()> {
        self.commit()
    }

    /// Makes the metadata as it is now durable (see "Commits" in the module
    /// documentation).
    fn commit(&self) -> io::Result<()> {
        let mut generation = self.generation.lock();
        let snapshot = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            if state.dirty {
                // Refused before the snapshot changes anything.
                let next = generation
                    .checked_add(1)
                    .filter(|&next| next <= MAX_GENERATION)
                    .ok_or_else(|| {
                        with_message(
                            libc::EOVERFLOW,
                            format!(
                                "volume at its last generation {}: no further commit",
                                *generation
                            ),
                        )
                    })?;
                let metadata = state.meta.encode();
                debug_assert_eq!(metadata.len() as u64, state.meta_len);
                let mapped = RunSet::from_runs(state.meta.mapped_runs());
                // From now on a crash may bring this snapshot back.
                state.space.committed = state.space.committed.union(&mapped);
                let released = std::mem::take(&mut state.space.pending);
                state.space.pending_count = 0;
                state.dirty = false;
                Some((next, metadata, mapped, released))
            } else {
                None
            }
        };
        let Some((next, metadata, mapped, released)) = snapshot else {
            return self.device.flush();
        };
        let written = self.write_commit(next, &metadata);
        let mut state = self.state.lock();
        match written {
            Ok(()) => {
                *generation = next;
                // Older commits can no longer come back; blocks freed after the
                // snapshot stay pending (some of them it still maps).
                state.space.committed = mapped;
                for (first, len) in released {
                    state.space.allocator.free(first, len);
                }
                Ok(())
            }
            Err(error) => {
                // The superblock may or may not be on the device: keep
                // protecting both commits, and retry in the same slot.
                for (first, len) in released {
                    state.space.pending.push((first, len));
                    state.space.pending_count += len;
                }
                state.dirty = true;
                Err(error)
            }
        }
    }

    /// Writes commit `generation` of `metadata`: the data it maps, then the
    /// metadata, then the superblock, each made durable before the next.
    fn write_commit(&self, generation: u64, metadata: &[u8]) -> io::Result<()> {
        if metadata.len() as u64 > self.layout.meta_capacity() {
            // Reservations keep this from happening.
            return fail(libc::ENOSPC);
        }
        self.device.flush()?;
        let mut area = metadata.to_vec();
        area.resize(metadata.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
        self.device
            .write_all_at(&area, self.layout.area(generation) * BLOCK)?;
        self.device.flush()?;
        let superblock = Superblock {
            layout: self.layout,
            generation,
            meta_len: metadata.len() as u64,
            meta_crc: crc32fast::hash(metadata),
        };
        self.device.write_all_at(
            &superblock.encode(),
            (generation % SUPERBLOCK_SLOTS) * BLOCK,
        )?;
        self.device.flush()
    }

    /// Creates an empty file and returns a handle to it. The file is durable
    /// from the next commit on.
    ///
    /// Fails with `EEXIST` if the name is taken, `EINVAL` if it is empty or holds
    /// `/` or NUL, `ENAMETOOLONG` if it is longer than 255 bytes, and `ENOSPC` if
    /// the metadata area is full or no file id is left.
    pub fn create_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        check_name(name)?;
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.meta.names.contains_key(name) {
            return fail(libc::EEXIST);
        }
        let file = FileMeta {
            name: name.to_owned(),
            size: 0,
            extents: ExtentMap::new(),
        };
        // The next id came from the device: it may be the last one.
        let next_id = state.meta.next_id.checked_add(1).ok_or_else(|| {
            with_message(libc::ENOSPC, "no file ids left: the next id is the last")
        })?;
        state.reserve_meta(file.encoded_len())?;
        state.meta_reserved -= file.encoded_len();
        state.meta_len += file.encoded_len();
        state.dirty = true;
        let id = state.meta.next_id;
        state.meta.next_id = next_id;
        state.meta.names.insert(name.to_owned(), id);
        state.meta.files.insert(id, file);
        Ok(self.new_handle(state, id))
    }

    /// Opens an existing file; fails with `ENOENT` if there is none of that name.
    pub fn open_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        let mut state = self.state.lock();
        let id = *state
            .meta
            .names
            .get(name)
            .ok_or_else(|| err(libc::ENOENT))?;
        Ok(self.new_handle(&mut state, id))
    }

    /// Removes a file by name and frees its blocks. The removal is durable from
    /// the next commit on; until then a crash brings the file back whole.
    ///
    /// Fails with `ENOENT` if there is no such file and `EBUSY` while any handle
    /// of it is alive (use [`Backend::remove`] on a handle to remove it anyway).
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        let id = *state
            .meta
            .names
            .get(name)
            .ok_or_else(|| err(libc::ENOENT))?;
        if state.handles.get(&id).is_some_and(|&count| count > 0) {
            return fail(libc::EBUSY);
        }
        Self::remove_locked(&mut state, id)
    }

    /// The names of every file, sorted.
    pub fn file_names(&self) -> Vec<String> {
        self.state.lock().meta.names.keys().cloned().collect()
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
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let state = self.state.lock();
        let meta = &state.meta;
        let space = &state.space;
        let alloc = &space.allocator;
        let data_start = self.layout.data_start();
        assert_eq!(meta.names.len(), meta.files.len(), "file table out of sync");
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
        for (&id, file) in &meta.files {
            assert_eq!(meta.names.get(&file.name), Some(&id), "name of file {id}");
            assert!(id < meta.next_id, "file id {id} not below the next id");
            assert!(file.size <= MAX_FILE_SIZE, "file {id} too large");
            file.extents.check_invariants();
            let blocks = file.size.div_ceil(BLOCK);
            for (lblk, extent) in file.extents.iter() {
                assert!(
                    lblk + extent.len <= blocks,
                    "file {} maps block {} past its end",
                    file.name,
                    lblk + extent.len - 1
                );
                assert!(
                    extent.phys >= data_start && extent.phys + extent.len <= alloc.total,
                    "file {} maps blocks {}+{} outside the data blocks",
                    file.name,
                    extent.phys,
                    extent.len
                );
                claims.push((extent.phys, extent.len, format!("file {}", file.name)));
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
        let mapped: u64 = meta.files.values().map(|f| f.extents.mapped_blocks()).sum();
        assert_eq!(
            mapped + free_count + pending_count + data_start + alloc.in_flight,
            alloc.high_water
        );
        assert!(alloc.high_water <= self.layout.total_blocks);
        assert_eq!(state.meta_len, meta.encoded_len(), "metadata size is off");
        assert!(
            state.meta_len + state.meta_reserved <= state.meta_capacity,
            "metadata outgrew its area"
        );
    }

    fn new_handle(self: &Arc<Self>, state: &mut State, id: u64) -> VolumeFile {
        *state.handles.entry(id).or_insert(0) += 1;
        VolumeFile {
            volume: Arc::clone(self),
            id,
        }
    }

    fn remove_locked(state: &mut State, id: u64) -> io::Result<()> {
        let mut file = state
            .meta
            .files
            .remove(&id)
            .ok_or_else(|| err(libc::ENOENT))?;
        state.meta.names.remove(&file.name);
        state.meta_len -= file.encoded_len();
        state.dirty = true;
        for (phys, len) in file.extents.remove_range(0, u64::MAX) {
            state.space.free(phys, len);
        }
        Ok(())
    }

    /// Runs `f` on file `id` under the mutex, to look; `ENOENT` if it was removed.
    fn with_file<R>(&self, id: u64, f: impl FnOnce(&FileMeta) -> io::Result<R>) -> io::Result<R> {
        let state = self.state.lock();
        let file = state.meta.files.get(&id).ok_or_else(|| err(libc::ENOENT))?;
        f(file)
    }

    /// Runs `f` on file `id` under the mutex, to change it: first gives back the
    /// `held` bytes of metadata area this operation reserved earlier, then fails
    /// with `ENOENT` if the file was removed or `ENOSPC` unless `need` more bytes
    /// fit, and afterwards accounts for the runs `f` added or removed.
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
        let file = state
            .meta
            .files
            .get_mut(&id)
            .ok_or_else(|| err(libc::ENOENT))?;
        if state.meta_len + state.meta_reserved + need > state.meta_capacity {
            return fail(libc::ENOSPC);
        }
        let before = file.encoded_len();
        let result = f(file, &mut state.space);
        state.meta_len = state.meta_len - before + file.encoded_len();
        state.dirty = true;
        result
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

/// A handle to one file of a [`Volume`]: cheap to clone, and each clone counts
/// as a handle for [`Volume::remove_file`].
pub struct VolumeFile {
    volume: Arc<Volume>,
    id: u64,
}

impl VolumeFile {
    /// The volume the file lives on.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The number of blocks allocated to the file (like `st_blocks`, in 4 KiB units).
    pub fn allocated_blocks(&self) -> io::Result<u64> {
        self.volume
            .with_file(self.id, |file| Ok(file.extents.mapped_blocks()))
    }

    /// The physical block that page `page` of the file maps to, if any (tests use
    /// it to watch block reuse).
    #[doc(hidden)]
    pub fn physical_block(&self, page: u64) -> Option<u64> {
        self.volume
            .with_file(self.id, |file| Ok(file.extents.lookup(page)))
            .ok()
            .flatten()
    }

    /// Writes whole pages `buf` starting at byte `start` to the planned blocks,
    /// zeroing the bytes of the last page past `size` (the end of file).
    fn write_planned(
        &self,
        start: u64,
        size: u64,
        plan: &[Option<u64>],
        buf: &[u8],
    ) -> io::Result<()> {
        let end = start + buf.len() as u64;
        let (body_plan, last) = if end > size {
            // The last page straddles the end of file: its tail must stay zero on
            // the device, so a later grow reads zeroes there.
            let (body, last) = plan.split_at(plan.len() - 1);
            (body, last[0])
        } else {
            (plan, None)
        };
        for (page, count, phys) in runs(body_plan) {
            let phys = phys.expect("every written page has a block");
            let bytes = &buf[page * BLOCK_SIZE..(page + count) * BLOCK_SIZE];
            self.volume.device.write_all_at(bytes, phys * BLOCK)?;
        }
        if let Some(phys) = last {
            let last_start = end - BLOCK;
            let mut page = buf[buf.len() - BLOCK_SIZE..].to_vec();
            page[(size - last_start) as usize..].fill(0);
            self.volume.device.write_all_at(&page, phys * BLOCK)?;
        }
        Ok(())
    }
}

impl Clone for VolumeFile {
    fn clone(&self) -> Self {
        let mut state = self.volume.state.lock();
        self.volume.new_handle(&mut state, self.id)
    }
}

impl Drop for VolumeFile {
    fn drop(&mut self) {
        let mut state = self.volume.state.lock();
        if let Some(count) = state.handles.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                state.handles.remove(&self.id);
            }
        }
    }
}

impl fmt::Debug for VolumeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeFile").field("id", &self.id).finish()
    }
}

impl Backend for VolumeFile {
    fn len(&self) -> io::Result<u64> {
        self.volume.with_file(self.id, |file| Ok(file.size))
    }

    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look the blocks up under the mutex, then read outside it: see the
        // module documentation for why nothing here stops block reuse.
        let (size, plan) = self.volume.with_file(self.id, |file| {
            let plan: Vec<Option<u64>> = (0..pages as u64)
                .map(|page| {
                    let inside = start + page * BLOCK < file.size;
                    inside.then(|| file.extents.lookup(index + page)).flatten()
                })
                .collect();
            Ok((file.size, plan))
        })?;
        for (page, count, phys) in runs(&plan) {
            let bytes = &mut buf[page * BLOCK_SIZE..(page + count) * BLOCK_SIZE];
            match phys {
                Some(phys) => self.volume.device.read_exact_at(bytes, phys * BLOCK)?,
                None => bytes.fill(0),
            }
        }
        if end > size {
            buf[size.saturating_sub(start) as usize..].fill(0);
        }
        Ok(())
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look up under the mutex, and take fresh blocks for holes without mapping
        // them: a fresh block still holds its previous owner's data, so it is mapped
        // only once this write's data is on it (as ext4 does with unwritten extents).
        // Until then, readers of the hole read zeroes.
        let (size, plan, fresh, held) = {
            let mut guard = self.volume.state.lock();
            let state = &mut *guard;
            let file = state
                .meta
                .files
                .get(&self.id)
                .ok_or_else(|| err(libc::ENOENT))?;
            if pages > 0 && end - BLOCK >= file.size {
                return fail(libc::EINVAL);
            }
            let mut plan: Vec<Option<u64>> = (0..pages as u64)
                .map(|page| file.extents.lookup(index + page))
                .collect();
            let size = file.size;
            let holes = plan.iter().filter(|phys| phys.is_none()).count() as u64;
            // Check space first so that ENOSPC changes nothing.
            if holes > state.space.allocator.available() {
                return fail(libc::ENOSPC);
            }
            let alloc = &mut state.space.allocator;
            let mut fresh = Vec::with_capacity(holes as usize);
            for (page, slot) in (index..).zip(plan.iter_mut()) {
                if slot.is_none() {
                    let phys = alloc.allocate().expect("space checked above");
                    fresh.push((page, phys));
                    *slot = Some(phys);
                }
            }
            // Mapping the fresh blocks adds at most one run per run of them:
            // reserve that much metadata, or give the blocks back (in reverse,
            // which restores the allocator's stack).
            let held = fresh_runs(&fresh) * RUN_RECORD;
            if let Err(error) = state.reserve_meta(held) {
                for &(_, phys) in fresh.iter().rev() {
                    state.space.allocator.free(phys, 1);
                }
                return Err(error);
            }
            state.space.allocator.in_flight += holes;
            (size, plan, fresh, held)
        };
        let written = self.write_planned(start, size, &plan, buf);
        // Map the fresh blocks, or give them back after an error. A hole another
        // writer filled meanwhile keeps that writer's block, and this write's page
        // goes there in place: a fresh block that was never mapped is the only kind
        // that can be freed without a reader possibly holding it (and, never
        // mapped, no commit can hold it either).
        let mut overwrite = Vec::new();
        let mapped = {
            let mut guard = self.volume.state.lock();
            let state = &mut *guard;
            state.meta_reserved -= held;
            let allocator = &mut state.space.allocator;
            allocator.in_flight -= fresh.len() as u64;
            let mut file = state
                .meta
                .files
                .get_mut(&self.id)
                .filter(|_| written.is_ok());
            let before = file.as_ref().map(|file| file.encoded_len());
            let mut inserted = Vec::with_capacity(fresh.len());
            for &(page, phys) in &fresh {
                match file.as_deref_mut() {
                    Some(file) if page * BLOCK < file.size => match file.extents.lookup(page) {
                        None => {
                            file.extents.insert(page, phys);
                            inserted.push(page);
                            continue;
                        }
                        Some(existing) => overwrite.push((page, existing)),
                    },
                    // An error, a removed file, or a page truncated away meanwhile.
                    _ => {}
                }
                allocator.free(phys, 1);
            }
            match (file, before) {
                (Some(file), Some(before)) => {
                    let after = state.meta_len - before + file.encoded_len();
                    // Pages another writer filled meanwhile can split this
                    // write's runs into more than it reserved. If the area
                    // cannot take them, unmap the fresh blocks again: nothing
                    // else maps them, and the file reads as before.
                    if after + state.meta_reserved > state.meta_capacity {
                        for &page in &inserted {
                            for (phys, len) in file.extents.remove_range(page, 1) {
                                allocator.free(phys, len);
                            }
                        }
                        debug_assert_eq!(file.encoded_len(), before);
                        Err(err(libc::ENOSPC))
                    } else {
                        state.meta_len = after;
                        state.dirty = true;
                        Ok(())
                    }
                }
                _ => Ok(()),
            }
        };
        written?;
        mapped?;
        for (page, existing) in overwrite {
            let offset = (page - index) as usize * BLOCK_SIZE;
            let bytes = &buf[offset..offset + BLOCK_SIZE];
            self.write_planned(page * BLOCK, size, &[Some(existing)], bytes)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_FILE_SIZE {
            return fail(libc::EFBIG);
        }
        // Growing only records the size: the bytes past the old end of file are
        // zero on the device already.
        let shrink = self.volume.change_file(self.id, 0, 0, |file, _| {
            if len >= file.size {
                file.size = len;
                return Ok(None);
            }
            let within = len % BLOCK;
            let tail = match within {
                0 => None,
                _ => file.extents.lookup(len / BLOCK).map(|phys| (phys, within)),
            };
            Ok(Some(tail))
        })?;
        let Some(tail) = shrink else {
            return Ok(());
        };
        // Zero the new last block's tail before freeing anything, so a device
        // error leaves the size and the mapping unchanged.
        if let Some((phys, within)) = tail {
            self.volume
                .write_zeros(phys * BLOCK + within, BLOCK - within)?;
        }
        // Cutting the runs at the new end never adds one.
        self.volume.change_file(self.id, 0, 0, |file, space| {
            for (phys, count) in file.extents.remove_range(len.div_ceil(BLOCK), u64::MAX) {
                space.free(phys, count);
            }
            file.size = len;
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        // Punching inside a run splits it in two: reserve room for one more run
        // before zeroing anything, so ENOSPC changes nothing.
        let plan = {
            let mut state = self.volume.state.lock();
            let file = state
                .meta
                .files
                .get(&self.id)
                .ok_or_else(|| err(libc::ENOENT))?;
            let plan = plan_range(file, offset, end);
            if plan.is_some() {
                state.reserve_meta(RUN_RECORD)?;
            }
            plan
        };
        let Some(plan) = plan else {
            return Ok(());
        };
        let zeroed = plan.edges.iter().try_for_each(|&(phys, from, to)| {
            self.volume.write_zeros(phys * BLOCK + from, to - from)
        });
        self.volume
            .change_file(self.id, RUN_RECORD, 0, |file, space| {
                zeroed?;
                for (phys, count) in file
                    .extents
                    .remove_range(plan.first_whole, plan.whole_count)
                {
                    space.free(phys, count);
                }
                Ok(())
            })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        // Holes already read zero, so only allocated blocks are written.
        let plan = self.volume.with_file(self.id, |file| {
            Ok(plan_range(file, offset, end).map(|plan| {
                let whole = file.extents.runs_in(plan.first_whole, plan.whole_count);
                (plan, whole)
            }))
        })?;
        let Some((plan, whole)) = plan else {
            return Ok(());
        };
        for &(phys, from, to) in &plan.edges {
            self.volume.write_zeros(phys * BLOCK + from, to - from)?;
        }
        for (_, extent) in whole {
            self.volume
                .write_zeros(extent.phys * BLOCK, extent.len * BLOCK)?;
        }
        Ok(())
    }

    /// Frees the blocks of the range (most recently freed first, as a punch does)
    /// and re-keys the extents after it, then commits the volume (see the module
    /// documentation): time proportional to the extents moved plus a commit.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and the range ends before the end of file (the kernel's rule:
    /// a collapse may not reach the end of file).
    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = aligned_range(offset, len)?;
        self.volume
            .change_file(self.id, 0, RUN_RECORD, |file, space| {
                if end >= file.size {
                    return fail(libc::EINVAL);
                }
                let (first, count) = (offset / BLOCK, len / BLOCK);
                for (phys, run) in file.extents.remove_range(first, count) {
                    space.free(phys, run);
                }
                file.extents.shift_down(first + count, count);
                file.size -= len;
                Ok(())
            })?;
        self.volume.commit()
    }

    /// Re-keys the extents from `offset` on, then commits the volume (see the
    /// module documentation): time proportional to the extents moved plus a
    /// commit. The inserted range is a hole.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and `offset` is before the end of file; `EFBIG` if the file
    /// would outgrow [`Backend::max_file_size`].
    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        aligned_range(offset, len)?;
        self.volume.change_file(self.id, 0, RUN_RECORD, |file, _| {
            if offset >= file.size {
                return fail(libc::EINVAL);
            }
            let size = file
                .size
                .checked_add(len)
                .filter(|&size| size <= MAX_FILE_SIZE)
                .ok_or_else(|| err(libc::EFBIG))?;
            file.extents.shift_up(offset / BLOCK, len / BLOCK);
            file.size = size;
            Ok(())
        })?;
        self.volume.commit()
    }

    /// Commits the whole volume (see [`Volume::sync`]).
    fn sync(&self) -> io::Result<()> {
        self.volume.with_file(self.id, |_| Ok(()))?;
        self.volume.commit()
    }

    fn remove(&self) -> io::Result<()> {
        let mut state = self.volume.state.lock();
        Volume::remove_locked(&mut state, self.id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::*;
    use crate::device::{Device, DeviceOp, FaultyDevice, MemDevice};
    use crate::fault::{FaultRule, Injection, Trigger};

    const PAGE: usize = BLOCK_SIZE;

    fn volume(blocks: u64) -> Arc<Volume> {
        Volume::format(Arc::new(MemDevice::new(blocks * BLOCK))).unwrap()
    }

    fn errno<T: fmt::Debug>(result: io::Result<T>) -> i32 {
        crate::errno(&result.unwrap_err()).expect("an errno")
    }

    /// A new device holding the bytes of `device`: what a restart after a
    /// crash finds, while the crashed volume (and its claim) is still alive
    /// in the test.
    fn after_crash(device: &dyn Device) -> Arc<dyn Device> {
        let mut image = vec![0; device.len() as usize];
        device.read_exact_at(&mut image, 0).unwrap();
        let copy = MemDevice::new(device.len());
        copy.write_all_at(&image, 0).unwrap();
        Arc::new(copy)
    }

    /// A page whose every byte is `fill`.
    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    fn read(file: &VolumeFile, index: u64, pages: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; pages * PAGE];
        file.read_pages(index, &mut buf).unwrap();
        buf
    }

    /// A file of `pages` pages, page i filled with byte `i + 1`.
    fn filled(volume: &Arc<Volume>, name: &str, pages: u64) -> VolumeFile {
        let file = volume.create_file(name).unwrap();
        file.set_len(pages * BLOCK).unwrap();
        let data: Vec<u8> = (0..pages).flat_map(|i| page(i as u8 + 1)).collect();
        file.write_pages(0, &data).unwrap();
        file
    }

    #[test]
    fn write_read_round_trip() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(4 * BLOCK).unwrap();
        let data: Vec<u8> = (0..4 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        file.write_pages(0, &data).unwrap();
        assert_eq!(read(&file, 0, 4), data);
        assert_eq!(read(&file, 1, 2), &data[PAGE..3 * PAGE]);
        assert_eq!(file.len().unwrap(), 4 * BLOCK);
        assert_eq!(file.allocated_blocks().unwrap(), 4);
        // Fresh allocations are physically contiguous: one run.
        let first = file.physical_block(0).unwrap();
        assert_eq!(file.physical_block(3), Some(first + 3));
        file.sync().unwrap();
        // Another handle sees the same data.
        let again = volume.open_file("a").unwrap();
        assert_eq!(read(&again, 0, 4), data);
        volume.check_invariants();
    }

    #[test]
    fn holes_and_pages_past_eof_read_zero() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(3 * BLOCK).unwrap();
        file.write_pages(0, &page(1)).unwrap();
        file.write_pages(2, &page(3)).unwrap();
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..2 * PAGE], page(0));
        assert_eq!(&data[2 * PAGE..3 * PAGE], page(3));
        assert_eq!(&data[3 * PAGE..], vec![0; 2 * PAGE]);
        assert_eq!(file.physical_block(1), None);
        assert_eq!(read(&file, 1 << 30, 1), page(0));
        volume.check_invariants();
    }

    #[test]
    fn bytes_past_eof_in_the_last_page_stay_zero() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(100).unwrap();
        file.write_pages(0, &page(9)).unwrap();
        let data = read(&file, 0, 1);
        assert_eq!(&data[..100], &[9; 100]);
        assert!(data[100..].iter().all(|&b| b == 0));
        // Growing exposes zeroes, not what the page buffer held past the end.
        file.set_len(BLOCK).unwrap();
        assert!(read(&file, 0, 1)[100..].iter().all(|&b| b == 0));
        volume.check_invariants();
    }

    #[test]
    fn writes_past_eof_and_bad_arguments_are_rejected() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        assert_eq!(errno(file.write_pages(0, &page(1))), libc::EINVAL);
        file.set_len(BLOCK + 1).unwrap();
        assert_eq!(errno(file.write_pages(2, &page(1))), libc::EINVAL);
        let two: Vec<u8> = [page(1), page(2), page(3)].concat();
        assert_eq!(errno(file.write_pages(0, &two)), libc::EINVAL);
        assert_eq!(
            file.allocated_blocks().unwrap(),
            0,
            "a rejected write allocates nothing"
        );
        assert_eq!(errno(file.write_pages(0, &[1; 100])), libc::EINVAL);
        assert_eq!(errno(file.read_pages(0, &mut [0; 100])), libc::EINVAL);
        assert_eq!(errno(file.read_pages(u64::MAX, &mut page(0))), libc::EINVAL);
        assert_eq!(
            errno(file.read_pages(u64::MAX / BLOCK, &mut page(0))),
            libc::EINVAL
        );
        assert_eq!(errno(file.write_pages(u64::MAX, &page(0))), libc::EINVAL);
        assert_eq!(errno(file.punch_hole(u64::MAX, 2)), libc::EINVAL);
        assert_eq!(errno(file.zero_range(2, u64::MAX)), libc::EINVAL);
        assert_eq!(errno(file.set_len(MAX_FILE_SIZE + 1)), libc::EFBIG);
        assert_eq!(errno(file.set_len(u64::MAX)), libc::EFBIG);
        file.set_len(MAX_FILE_SIZE).unwrap();
        assert_eq!(file.max_file_size(), MAX_FILE_SIZE);
        assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
        volume.check_invariants();
    }

    #[test]
    fn punch_whole_and_partial_blocks() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        let free = volume.free_blocks();
        // Whole block 1, plus the last 100 bytes of block 0 and the first 10 of block 2.
        file.punch_hole(BLOCK - 100, BLOCK + 110).unwrap();
        assert_eq!(file.physical_block(1), None);
        assert_eq!(volume.free_blocks(), free + 1);
        let data = read(&file, 0, 4);
        assert_eq!(&data[..PAGE - 100], &page(1)[..PAGE - 100]);
        assert!(data[PAGE - 100..2 * PAGE + 10].iter().all(|&b| b == 0));
        assert_eq!(&data[2 * PAGE + 10..3 * PAGE], &page(3)[10..]);
        assert_eq!(&data[3 * PAGE..], page(4));
        assert_eq!(file.len().unwrap(), 4 * BLOCK, "the size does not change");

        // Inside one block.
        file.punch_hole(3 * BLOCK + 5, 10).unwrap();
        let data = read(&file, 3, 1);
        assert_eq!(&data[..5], &[4; 5]);
        assert_eq!(&data[5..15], &[0; 10]);
        assert_eq!(&data[15..], &page(4)[15..]);
        assert!(file.physical_block(3).is_some());

        // A punch of a hole, of nothing, and past EOF changes nothing.
        file.punch_hole(BLOCK, BLOCK).unwrap();
        file.punch_hole(0, 0).unwrap();
        file.punch_hole(100 * BLOCK, u64::MAX - 100 * BLOCK)
            .unwrap();
        assert_eq!(read(&file, 3, 1), data);
        volume.check_invariants();
    }

    #[test]
    fn punch_to_eof_frees_a_partial_last_block() {
        let volume = volume(64);
        let file = filled(&volume, "a", 2);
        file.set_len(BLOCK + 100).unwrap();
        file.punch_hole(BLOCK, 50).unwrap();
        assert!(
            file.physical_block(1).is_some(),
            "bytes 50..100 are still data"
        );
        file.punch_hole(BLOCK + 10, 1 << 40).unwrap();
        assert!(
            file.physical_block(1).is_some(),
            "bytes 0..10 are still data"
        );
        file.punch_hole(BLOCK, 1 << 40).unwrap();
        assert_eq!(file.physical_block(1), None);
        assert_eq!(read(&file, 1, 1), page(0));
        assert_eq!(read(&file, 0, 1), page(1));
        volume.check_invariants();
    }

    #[test]
    fn huge_punch_of_a_sparse_file_is_instant() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(MAX_FILE_SIZE).unwrap();
        for index in [0, 1 << 20, (MAX_FILE_SIZE / BLOCK) - 1] {
            file.write_pages(index, &page(5)).unwrap();
        }
        let start = Instant::now();
        file.punch_hole(0, MAX_FILE_SIZE).unwrap();
        file.zero_range(0, MAX_FILE_SIZE).unwrap();
        file.set_len(0).unwrap();
        // Generous: a per-block loop over 2^32 blocks would take minutes.
        assert!(start.elapsed().as_secs() < 5);
        assert_eq!(file.allocated_blocks().unwrap(), 0);
        volume.check_invariants();
    }

    #[test]
    fn zero_range_keeps_blocks_and_leaves_holes() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        file.punch_hole(2 * BLOCK, BLOCK).unwrap();
        let blocks: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
        let free = volume.free_blocks();
        // The last 10 bytes of block 0 up to the first 10 bytes of block 3.
        file.zero_range(BLOCK - 10, 2 * BLOCK + 20).unwrap();
        let after: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
        assert_eq!(after, blocks, "zeroing neither frees nor allocates");
        assert_eq!(volume.free_blocks(), free);
        let data = read(&file, 0, 4);
        assert!(data[..PAGE - 10] == page(1)[..PAGE - 10]);
        assert!(data[PAGE - 10..3 * PAGE + 10].iter().all(|&b| b == 0));
        assert!(data[3 * PAGE + 10..] == page(4)[10..]);
        assert_eq!(file.len().unwrap(), 4 * BLOCK);

        // Inside one block; other bytes survive.
        file.zero_range(3 * BLOCK + 20, 2).unwrap();
        let last = read(&file, 3, 1);
        assert_eq!(&last[..10], &[0; 10]);
        assert_eq!(&last[10..20], &[4; 10]);
        assert_eq!(&last[20..22], &[0; 2]);
        assert!(last[22..] == page(4)[22..]);

        // Zeroing to past EOF zeroes the whole last block and keeps it.
        file.zero_range(3 * BLOCK, u64::MAX - 3 * BLOCK).unwrap();
        assert_eq!(file.physical_block(3), blocks[3]);
        assert!(read(&file, 3, 1) == page(0));
        volume.check_invariants();
    }

    #[test]
    fn collapse_removes_blocks_and_shifts_the_rest_down() {
        let volume = volume(64);
        let file = filled(&volume, "a", 6);
        file.set_len(6 * BLOCK - 100).unwrap();
        let freed = [file.physical_block(1), file.physical_block(2)];
        let free = volume.free_blocks();
        file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 4 * BLOCK - 100);
        assert_eq!(volume.free_blocks(), free + 2);
        assert_eq!(file.allocated_blocks().unwrap(), 4);
        let data = read(&file, 0, 5);
        for (i, fill) in [1u8, 4, 5].into_iter().enumerate() {
            assert_eq!(data[i * PAGE..(i + 1) * PAGE], page(fill), "page {i}");
        }
        assert_eq!(&data[3 * PAGE..4 * PAGE - 100], &page(6)[100..]);
        assert!(data[4 * PAGE - 100..].iter().all(|&b| b == 0));
        volume.check_invariants();

        // The freed blocks go to the next allocation, LIFO as after a punch.
        let other = volume.create_file("b").unwrap();
        other.set_len(2 * BLOCK).unwrap();
        other.write_pages(0, &page(9)).unwrap();
        assert!(freed.contains(&other.physical_block(0)));
        volume.check_invariants();
    }

    #[test]
    fn collapse_of_holes_and_a_merge_at_the_seam() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(8 * BLOCK).unwrap();
        file.write_pages(0, &[page(1), page(2)].concat()).unwrap();
        file.write_pages(5, &page(6)).unwrap();
        file.write_pages(2, &page(3)).unwrap();
        // Pages 0, 1, 2 are physically contiguous; page 5 follows them on the device.
        let first = file.physical_block(0).unwrap();
        file.punch_hole(2 * BLOCK, BLOCK).unwrap();
        file.write_pages(5, &page(6)).unwrap();
        file.collapse_range(2 * BLOCK, 3 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 5 * BLOCK);
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..2 * PAGE], page(2));
        assert_eq!(&data[2 * PAGE..3 * PAGE], page(6));
        assert!(data[3 * PAGE..].iter().all(|&b| b == 0));
        assert_eq!(file.physical_block(0), Some(first));
        volume.check_invariants();
    }

    #[test]
    fn insert_shifts_up_and_leaves_a_hole() {
        let volume = volume(64);
        let file = filled(&volume, "a", 3);
        file.set_len(3 * BLOCK - 10).unwrap();
        let blocks: Vec<_> = (0..3).map(|i| file.physical_block(i)).collect();
        let free = volume.free_blocks();
        file.insert_range(BLOCK, 2 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 5 * BLOCK - 10);
        assert_eq!(volume.free_blocks(), free, "an insert allocates nothing");
        let after: Vec<_> = [0, 3, 4].iter().map(|&i| file.physical_block(i)).collect();
        assert_eq!(after, blocks, "the data moved, not copied");
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert!(data[PAGE..3 * PAGE].iter().all(|&b| b == 0));
        assert_eq!(&data[3 * PAGE..4 * PAGE], page(2));
        assert_eq!(&data[4 * PAGE..5 * PAGE - 10], &page(3)[10..]);
        assert!(data[5 * PAGE - 10..].iter().all(|&b| b == 0));
        // The hole takes writes; collapsing it again restores the original.
        file.write_pages(2, &page(7)).unwrap();
        assert_eq!(read(&file, 2, 1), page(7));
        file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
        let data = read(&file, 0, 3);
        assert_eq!(&data[..2 * PAGE], [page(1), page(2)].concat());
        assert_eq!(&data[2 * PAGE..3 * PAGE - 10], &page(3)[..PAGE - 10]);
        assert_eq!(file.allocated_blocks().unwrap(), 3);
        volume.check_invariants();

        // Inserting at block 0 shifts everything.
        file.insert_range(0, BLOCK).unwrap();
        assert_eq!(read(&file, 0, 1), page(0));
        assert_eq!(read(&file, 1, 1), page(1));
        volume.check_invariants();
    }

    #[test]
    fn collapse_and_insert_reject_bad_arguments_and_change_nothing() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        let before = read(&file, 0, 4);
        let size = 4 * BLOCK;
        for (offset, len) in [
            (1, BLOCK),
            (0, BLOCK + 1),
            (0, 0),
            (0, size),
            (BLOCK, 3 * BLOCK),
            (BLOCK, 4 * BLOCK),
            (size, BLOCK),
            (u64::MAX - BLOCK + 1, BLOCK),
            (BLOCK, u64::MAX - BLOCK + 1),
        ] {
            assert_eq!(
                errno(file.collapse_range(offset, len)),
                libc::EINVAL,
                "collapse {offset} {len}"
            );
        }
        for (offset, len) in [
            (1, BLOCK),
            (0, 1),
            (0, 0),
            (size, BLOCK),
            (8 * BLOCK, BLOCK),
            (u64::MAX - BLOCK + 1, BLOCK),
            (BLOCK, u64::MAX - BLOCK + 1),
        ] {
            assert_eq!(
                errno(file.insert_range(offset, len)),
                libc::EINVAL,
                "insert {offset} {len}"
            );
        }
        assert_eq!(
            errno(file.insert_range(0, MAX_FILE_SIZE - size + BLOCK)),
            libc::EFBIG
        );
        assert_eq!(
            errno(file.insert_range(0, u64::MAX - BLOCK * 2 + 1)),
            libc::EFBIG
        );
        assert_eq!(file.len().unwrap(), size);
        assert_eq!(read(&file, 0, 4), before);
        // Exactly the largest size is allowed.
        file.insert_range(0, MAX_FILE_SIZE - size).unwrap();
        assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
        assert_eq!(read(&file, (MAX_FILE_SIZE - size) / BLOCK, 4), before);
        file.remove().unwrap();
        assert_eq!(errno(file.collapse_range(0, BLOCK)), libc::ENOENT);
        assert_eq!(errno(file.insert_range(0, BLOCK)), libc::ENOENT);
        volume.check_invariants();
    }

    #[test]
    fn huge_collapse_and_insert_of_a_sparse_file_are_instant() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(MAX_FILE_SIZE / 2).unwrap();
        let last = MAX_FILE_SIZE / 2 / BLOCK - 1;
        for index in [0, 1 << 20, last] {
            file.write_pages(index, &page(5)).unwrap();
        }
        let start = Instant::now();
        file.insert_range(BLOCK, MAX_FILE_SIZE / 2).unwrap();
        assert_eq!(read(&file, last + MAX_FILE_SIZE / 2 / BLOCK, 1), page(5));
        file.collapse_range(BLOCK, MAX_FILE_SIZE / 2 - BLOCK)
            .unwrap();
        file.collapse_range(0, MAX_FILE_SIZE / 2).unwrap();
        assert!(start.elapsed().as_secs() < 5);
        assert_eq!(file.len().unwrap(), BLOCK);
        assert_eq!(read(&file, 0, 1), page(5));
        assert_eq!(file.allocated_blocks().unwrap(), 1);
        volume.check_invariants();
    }

    #[test]
    fn truncate_inside_a_block_then_grow_reads_zero_tail() {
        let volume = volume(64);
        let file = filled(&volume, "a", 3);
        let free = volume.free_blocks();
        file.set_len(BLOCK + 123).unwrap();
        assert_eq!(file.len().unwrap(), BLOCK + 123);
        assert_eq!(volume.free_blocks(), free + 1);
        assert_eq!(file.physical_block(2), None);
        file.set_len(3 * BLOCK).unwrap();
        let data = read(&file, 0, 3);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..PAGE + 123], &[2; 123]);
        assert!(data[PAGE + 123..].iter().all(|&b| b == 0));
        file.set_len(0).unwrap();
        assert_eq!(file.allocated_blocks().unwrap(), 0);
        volume.check_invariants();
    }

    #[test]
    fn freed_blocks_are_reused_at_once_by_another_file() {
        let volume = volume(64);
        let a = filled(&volume, "a", 4);
        let b = volume.create_file("b").unwrap();
        b.set_len(4 * BLOCK).unwrap();

        let freed = a.physical_block(2).unwrap();
        a.punch_hole(2 * BLOCK, BLOCK).unwrap();
        b.write_pages(0, &page(0xBB)).unwrap();
        assert_eq!(
            b.physical_block(0),
            Some(freed),
            "LIFO: the block freed last comes first"
        );

        // Truncate frees too, and the stale block now holds b's data.
        let freed = a.physical_block(3).unwrap();
        a.set_len(3 * BLOCK).unwrap();
        b.write_pages(1, &page(0xBC)).unwrap();
        assert_eq!(b.physical_block(1), Some(freed));
        let mut raw = page(0);
        volume
            .device()
            .read_exact_at(&mut raw, freed * BLOCK)
            .unwrap();
        assert_eq!(raw, page(0xBC));

        // Removing a file frees all of its blocks.
        let remaining = [a.physical_block(0).unwrap(), a.physical_block(1).unwrap()];
        a.remove().unwrap();
        b.write_pages(2, &[page(1), page(2)].concat()).unwrap();
        let mut reused = [b.physical_block(2).unwrap(), b.physical_block(3).unwrap()];
        reused.sort();
        assert_eq!(reused, remaining);
        volume.check_invariants();
    }

    #[test]
    fn enospc_changes_nothing() {
        // Superblocks and two metadata areas of 2 blocks take 6: 3 usable.
        let volume = volume(9);
        assert_eq!(volume.total_blocks(), 9);
        assert_eq!(volume.free_blocks(), 3);
        let file = volume.create_file("a").unwrap();
        file.set_len(8 * BLOCK).unwrap();
        file.write_pages(0, &page(1)).unwrap();
        let big: Vec<u8> = (0..3).flat_map(|i| page(i + 2)).collect();
        assert_eq!(errno(file.write_pages(1, &big)), libc::ENOSPC);
        assert_eq!(file.allocated_blocks().unwrap(), 1);
        assert_eq!(volume.free_blocks(), 2);
        file.write_pages(1, &big[..2 * PAGE]).unwrap();
        assert_eq!(volume.free_blocks(), 0);
        assert_eq!(errno(file.write_pages(5, &page(1))), libc::ENOSPC);
        // Overwriting allocated blocks needs no space.
        file.write_pages(0, &page(7)).unwrap();
        assert_eq!(read(&file, 0, 1), page(7));
        volume.check_invariants();
    }

    #[test]
    fn a_failed_write_unmaps_the_blocks_it_allocated() {
        let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * BLOCK)), 1));
        let volume = Volume::format(faulty.clone()).unwrap();
        let a = filled(&volume, "a", 1);
        a.remove().unwrap(); // its block, full of 1s, is next in line
        let b = volume.create_file("b").unwrap();
        b.set_len(BLOCK).unwrap();
        faulty.fail_nth(DeviceOp::Write, 1, libc::EIO);
        assert_eq!(errno(b.write_pages(0, &page(2))), libc::EIO);
        assert_eq!(b.physical_block(0), None);
        assert_eq!(read(&b, 0, 1), page(0), "b must not see a's old data");
        volume.check_invariants();
    }

    #[test]
    fn file_table_errors() {
        let volume = volume(16);
        let a = volume.create_file("a").unwrap();
        assert_eq!(errno(volume.create_file("a")), libc::EEXIST);
        assert_eq!(errno(volume.create_file("")), libc::EINVAL);
        assert_eq!(errno(volume.create_file("x/y")), libc::EINVAL);
        assert_eq!(errno(volume.create_file("x\0")), libc::EINVAL);
        assert_eq!(
            errno(volume.create_file(&"n".repeat(256))),
            libc::ENAMETOOLONG
        );
        volume.create_file(&"n".repeat(255)).unwrap();
        assert_eq!(errno(volume.open_file("missing")), libc::ENOENT);
        assert_eq!(errno(volume.remove_file("missing")), libc::ENOENT);

        // Busy while any handle, clone included, is alive.
        let clone = a.clone();
        assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
        drop(a);
        assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
        drop(clone);
        volume.remove_file("a").unwrap();
        assert_eq!(errno(volume.open_file("a")), libc::ENOENT);
        assert_eq!(volume.file_names(), ["n".repeat(255)]);

        // Removing through a handle: every handle of it fails afterwards.
        let b = filled(&volume, "b", 2);
        let other = volume.open_file("b").unwrap();
        let free = volume.free_blocks();
        b.remove().unwrap();
        assert_eq!(volume.free_blocks(), free + 2);
        for handle in [&b, &other] {
            assert_eq!(errno(handle.len()), libc::ENOENT);
            assert_eq!(errno(handle.read_pages(0, &mut page(0))), libc::ENOENT);
            assert_eq!(errno(handle.write_pages(0, &page(0))), libc::ENOENT);
            assert_eq!(errno(handle.set_len(0)), libc::ENOENT);
            assert_eq!(errno(handle.punch_hole(0, 1)), libc::ENOENT);
            assert_eq!(errno(handle.zero_range(0, 1)), libc::ENOENT);
            assert_eq!(errno(handle.sync()), libc::ENOENT);
            assert_eq!(errno(handle.remove()), libc::ENOENT);
        }
        // A new file of the same name is a different file.
        let c = volume.create_file("b").unwrap();
        assert_eq!(c.len().unwrap(), 0);
        assert_eq!(errno(b.len()), libc::ENOENT);
        volume.check_invariants();
    }

    #[test]
    fn format_rejects_a_device_without_data_blocks() {
        for len in [BLOCK - 1, 6 * BLOCK, 7 * BLOCK - 1] {
            let device = Arc::new(MemDevice::new(len));
            assert_eq!(errno(Volume::format(device)), libc::EINVAL, "{len}");
        }
        let volume = volume(7);
        assert_eq!(volume.free_blocks(), 1);
    }

    /// Two files with holes, partial pages and several runs each.
    fn populate(volume: &Arc<Volume>) -> Vec<(String, Vec<u8>)> {
        let a = filled(volume, "a", 6);
        a.punch_hole(2 * BLOCK, BLOCK).unwrap();
        a.set_len(6 * BLOCK - 100).unwrap();
        let b = volume.create_file("b").unwrap();
        b.set_len(20 * BLOCK).unwrap();
        b.write_pages(15, &page(7)).unwrap();
        b.write_pages(3, &[page(8), page(9)].concat()).unwrap();
        volume.create_file("empty").unwrap();
        let gone = filled(volume, "gone", 2);
        gone.remove().unwrap();
        [a, b]
            .iter()
            .map(|file| {
                let pages = file.len().unwrap().div_ceil(BLOCK) as usize;
                (file_name(volume, file), read(file, 0, pages))
            })
            .collect()
    }

    fn file_name(volume: &Volume, file: &VolumeFile) -> String {
        volume.state.lock().meta.files[&file.id].name.clone()
    }

    fn assert_same_files(volume: &Arc<Volume>, expected: &[(String, Vec<u8>)]) {
        assert_eq!(volume.file_names(), ["a", "b", "empty"]);
        for (name, data) in expected {
            let file = volume.open_file(name).unwrap();
            let pages = data.len() / PAGE;
            assert_eq!(read(&file, 0, pages), *data, "file {name}");
        }
        assert_eq!(volume.open_file("empty").unwrap().len().unwrap(), 0);
        volume.check_invariants();
    }

    #[test]
    fn a_synced_volume_reopens_with_the_same_files_and_bytes() {
        let device: Arc<dyn Device> = Arc::new(MemDevice::new(256 * BLOCK));
        let volume = Volume::format(device.clone()).unwrap();
        let expected = populate(&volume);
        let a = volume.open_file("a").unwrap();
        let runs = volume.state.lock().meta.files[&a.id].extents.run_count();
        assert!(runs >= 2, "the test wants several runs");
        let sizes: Vec<u64> = ["a", "b"]
            .iter()
            .map(|name| volume.open_file(name).unwrap().len().unwrap())
            .collect();
        a.sync().unwrap();
        let free = volume.free_blocks() + volume.pending_blocks();
        drop(a);
        drop(volume);

        let volume = Volume::open(device.clone()).unwrap();
        assert_same_files(&volume, &expected);
        for (name, size) in ["a", "b"].iter().zip(sizes) {
            assert_eq!(volume.open_file(name).unwrap().len().unwrap(), size);
        }
        assert_eq!(
            volume.free_blocks(),
            free,
            "every unmapped block is free again"
        );
        // The reopened volume keeps working and reopens again.
        let c = filled(&volume, "c", 3);
        volume.sync().unwrap();
        let data = read(&c, 0, 3);
        drop(c);
        drop(volume);
        let volume = Volume::open(device).unwrap();
        assert_eq!(read(&volume.open_file("c").unwrap(), 0, 3), data);
        volume.check_invariants();
    }

    #[test]
    fn a_volume_on_a_file_device_reopens_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.img");
        let device = Arc::new(crate::device::FileDevice::create(&path, 4 << 20).unwrap());
        let volume = Volume::format(device).unwrap();
        let expected = populate(&volume);
        volume.sync().unwrap();
        drop(volume);
        let device = Arc::new(crate::device::FileDevice::open(&path).unwrap());
        assert_same_files(&Volume::open(device).unwrap(), &expected);
    }

    #[test]
    fn changes_after_the_last_sync_are_not_in_a_reopened_volume() {
        let device: Arc<dyn Device> = Arc::new(MemDevice::new(256 * BLOCK));
        let volume = Volume::format(device.clone()).unwrap();
        let a = filled(&volume, "a", 2);
        volume.sync().unwrap();
        a.set_len(BLOCK).unwrap();
        volume.create_file("new").unwrap();
        drop(a);
        volume.remove_file("a").unwrap();
        let reopened = Volume::open(after_crash(device.as_ref())).unwrap();
        assert_eq!(reopened.file_names(), ["a"]);
        let a = reopened.open_file("a").unwrap();
        assert_eq!(read(&a, 0, 2), [page(1), page(2)].concat());
        reopened.check_invariants();
    }

    #[test]
    fn committed_blocks_freed_wait_for_the_next_commit() {
        let volume = volume(64);
        let a = filled(&volume, "a", 4);
        a.sync().unwrap();
        let b = volume.create_file("b").unwrap();
        b.set_len(4 * BLOCK).unwrap();
        let freed = a.physical_block(1).unwrap();
        a.punch_hole(BLOCK, BLOCK).unwrap();
        assert_eq!(volume.pending_blocks(), 1);
        b.write_pages(0, &page(9)).unwrap();
        assert_ne!(b.physical_block(0), Some(freed), "reused before the commit");
        volume.check_invariants();
        // A block mapped and freed between two commits is reused at once.
        let unsynced = b.physical_block(0).unwrap();
        b.punch_hole(0, BLOCK).unwrap();
        b.write_pages(1, &page(9)).unwrap();
        assert_eq!(b.physical_block(1), Some(unsynced));
        b.sync().unwrap();
        assert_eq!(volume.pending_blocks(), 0);
        b.write_pages(2, &page(9)).unwrap();
        assert_eq!(b.physical_block(2), Some(freed), "released by the commit");
        volume.check_invariants();
    }

    #[test]
    fn open_rejects_devices_without_a_volume() {
        assert_eq!(
            errno(Volume::open(Arc::new(MemDevice::new(BLOCK)))),
            libc::EINVAL
        );
        let blank: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
        assert_eq!(errno(Volume::open(blank.clone())), libc::EINVAL);
        blank.write_all_at(&[0xAB; 2 * PAGE], 0).unwrap();
        assert_eq!(errno(Volume::open(blank)), libc::EINVAL);

        // A volume on a device that shrank.
        let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
        Volume::format(device.clone()).unwrap();
        let mut image = vec![0; 63 * PAGE];
        device.read_exact_at(&mut image, 0).unwrap();
        let smaller: Arc<dyn Device> = Arc::new(MemDevice::new(63 * BLOCK));
        smaller.write_all_at(&image, 0).unwrap();
        assert_eq!(errno(Volume::open(smaller)), libc::EINVAL);
    }

    #[test]
    fn a_corrupt_superblock_or_area_falls_back_to_the_commit_before() {
        let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
        let volume = Volume::format(device.clone()).unwrap(); // generation 1
        let a = filled(&volume, "a", 1);
        a.sync().unwrap(); // 2
        a.write_pages(0, &page(5)).unwrap();
        volume.create_file("b").unwrap();
        a.sync().unwrap(); // 3: slot 1, area 1
        drop(a);
        let layout = volume.layout;
        drop(volume);
        let names = |device: &Arc<dyn Device>| Volume::open(device.clone()).map(|v| v.file_names());
        assert_eq!(names(&device).unwrap(), ["a", "b"]);

        // A flipped byte in the newest area (in file a's size, which would
        // still decode): generation 2 it is.
        let area = layout.area(3) * BLOCK;
        let size_byte = area + META_HEADER + 8 + 1;
        let mut byte = [0u8];
        device.read_exact_at(&mut byte, size_byte).unwrap();
        device.write_all_at(&[byte[0] ^ 1], size_byte).unwrap();
        assert_eq!(names(&device).unwrap(), ["a"]);
        device.write_all_at(&byte, size_byte).unwrap();
        assert_eq!(names(&device).unwrap(), ["a", "b"]);

        // A flipped byte in the newest superblock: the same.
        device.read_exact_at(&mut byte, BLOCK + 30).unwrap();
        device.write_all_at(&[byte[0] ^ 1], BLOCK + 30).unwrap();
        assert_eq!(names(&device).unwrap(), ["a"]);

        // Both superblocks corrupt: no volume.
        device.write_all_at(&[0xFF; 8], 0).unwrap();
        assert_eq!(errno(Volume::open(device.clone())), libc::EINVAL);
    }

    #[test]
    fn a_failed_commit_keeps_its_frees_pending_and_is_retried() {
        let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * BLOCK)), 1));
        let volume = Volume::format(faulty.clone()).unwrap();
        let a = filled(&volume, "a", 2);
        a.sync().unwrap();
        a.set_len(0).unwrap();
        assert_eq!(volume.pending_blocks(), 2);
        // The superblock write (the second write of a commit) fails.
        faulty.fail_nth(DeviceOp::Write, 2, libc::EIO);
        assert_eq!(errno(a.sync()), libc::EIO);
        assert_eq!(volume.pending_blocks(), 2);
        volume.check_invariants();
        a.sync().unwrap();
        assert_eq!(volume.pending_blocks(), 0);
        drop((a, volume));
        let reopened = Volume::open(faulty.inner().clone()).unwrap();
        assert_eq!(reopened.open_file("a").unwrap().len().unwrap(), 0);
        reopened.check_invariants();
    }

    /// Creates files until exactly `room` bytes of metadata area are left.
    fn fill_metadata(volume: &Arc<Volume>, room: u64) {
        let left = |volume: &Volume| {
            let state = volume.state.lock();
            state.meta_capacity - state.meta_len - state.meta_reserved
        };
        let mut serial = 0;
        while left(volume) > room {
            let consume = left(volume) - room;
            assert!(
                consume > FILE_RECORD + 8,
                "cannot leave exactly {room} bytes"
            );
            let mut len = (consume - FILE_RECORD).min(MAX_NAME_LEN as u64);
            if (1..=FILE_RECORD + 8).contains(&(consume - FILE_RECORD - len)) {
                len = 200; // leave enough for one more file
            }
            serial += 1;
            volume
                .create_file(&format!("{serial:0>width$}", width = len as usize))
                .unwrap();
        }
        assert_eq!(left(volume), room);
    }

    #[test]
    fn a_write_into_holes_reserves_a_run_per_run_of_fresh_blocks() {
        let volume = volume(256);
        let file = volume.create_file("f").unwrap();
        file.set_len(64 * BLOCK).unwrap();
        fill_metadata(&volume, RUN_RECORD);
        // 32 fresh blocks in a row are one run.
        let data: Vec<u8> = (0..32).flat_map(|i| page(i + 1)).collect();
        file.write_pages(0, &data).unwrap();
        assert_eq!(read(&file, 0, 32), data);
        // A second run does not fit, and the failed write changes nothing.
        let free = volume.free_blocks();
        assert_eq!(errno(file.write_pages(40, &page(9))), libc::ENOSPC);
        assert_eq!(volume.free_blocks(), free);
        assert_eq!(file.allocated_blocks().unwrap(), 32);
        // Overwriting needs no metadata.
        file.write_pages(0, &page(9)).unwrap();
        volume.check_invariants();
    }

    #[test]
    fn a_write_split_by_a_concurrent_fill_past_its_reservation_maps_nothing() {
        let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * BLOCK)), 1));
        let volume = Volume::format(faulty.clone()).unwrap();
        let file = volume.create_file("f").unwrap();
        file.set_len(8 * BLOCK).unwrap();
        fill_metadata(&volume, 2 * RUN_RECORD);
        // The first write gets the next three blocks (one run, one reserved) and
        // is held in its device write while a second write fills its middle page.
        let first = volume.layout.data_start();
        faulty.add_rule(
            FaultRule::new(
                DeviceOp::Write,
                Trigger::Always,
                Injection::Delay {
                    min: Duration::from_millis(500),
                    max: Duration::from_millis(500),
                },
            )
            .on_bytes(first * BLOCK..(first + 3) * BLOCK),
        );
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || file.write_pages(0, &[page(1), page(1), page(1)].concat()))
        };
        while faulty.injected() == 0 {
            std::thread::yield_now();
        }
        file.write_pages(1, &page(2)).unwrap();
        // Pages 0 and 2 apart from page 1 take two runs more: only one fits.
        assert_eq!(errno(writer.join().unwrap()), libc::ENOSPC);
        assert_eq!(file.physical_block(0), None);
        assert_eq!(file.physical_block(2), None);
        assert_eq!(read(&file, 0, 3), [page(0), page(2), page(0)].concat());
        volume.check_invariants();
    }

    #[test]
    fn a_full_metadata_area_fails_with_enospc_and_changes_nothing() {
        let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
        let volume = Volume::format(device.clone()).unwrap();
        let capacity = volume.layout.meta_capacity();
        let name = |i: usize| format!("{i:0>200}");
        let mut created = 0;
        let error = loop {
            match volume.create_file(&name(created)) {
                Ok(_) => created += 1,
                Err(error) => break error,
            }
        };
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            created as u64,
            (capacity - META_HEADER) / (FILE_RECORD + 200)
        );
        assert_eq!(volume.file_names().len(), created);
        volume.check_invariants();

        // Runs: a file that fills holes every other page needs a run per page.
        volume.remove_file(&name(0)).unwrap();
        volume.remove_file(&name(1)).unwrap();
        let f = volume.create_file("f").unwrap();
        f.set_len(64 * BLOCK).unwrap();
        let mut mapped = 0;
        let error = loop {
            match f.write_pages(2 * mapped, &page(1)) {
                Ok(()) => mapped += 1,
                Err(error) => break error,
            }
        };
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(f.allocated_blocks().unwrap(), mapped);
        assert!(volume.free_blocks() > 0, "the area ran out, not the blocks");
        volume.check_invariants();
        volume.sync().unwrap();
        drop((f, volume));
        let reopened = Volume::open(device).unwrap();
        let f = reopened.open_file("f").unwrap();
        assert_eq!(f.allocated_blocks().unwrap(), mapped);
        reopened.check_invariants();
    }

    #[test]
    fn concurrent_files_never_share_blocks() {
        let volume = volume(256);
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let file = volume.create_file(&format!("f{t}")).unwrap();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t.into());
                    file.set_len(32 * BLOCK).unwrap();
                    for _ in 0..500 {
                        let index = rng.u64(0..32);
                        match rng.u8(0..4) {
                            0 | 1 => {
                                if index * BLOCK < file.len().unwrap() {
                                    file.write_pages(index, &page(t)).unwrap();
                                }
                            }
                            2 => file
                                .punch_hole(index * BLOCK, rng.u64(1..4 * BLOCK))
                                .unwrap(),
                            _ => file.set_len(rng.u64(0..32 * BLOCK)).unwrap(),
                        }
                        // Every block this file maps holds its own pages only.
                        let mut buf = page(0);
                        file.read_pages(index, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b == 0 || b == t));
                        file.volume().check_invariants();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        volume.check_invariants();
    }

    #[derive(Clone, Debug)]
    enum FileOp {
        Write(u64, u8),
        Punch(u64, u64),
        Collapse(u64, u64),
        Insert(u64, u64),
        SetLen(u64),
    }

    fn file_op() -> impl Strategy<Value = FileOp> {
        prop_oneof![
            4 => (0u64..24, 1u8..255).prop_map(|(p, f)| FileOp::Write(p, f)),
            1 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Punch(p, n)),
            2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Collapse(p, n)),
            2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Insert(p, n)),
            1 => (0u64..24).prop_map(FileOp::SetLen),
        ]
    }

    proptest! {
        /// Whole-page operations against a model holding one fill byte per page
        /// (0 for a hole), with a second file sharing the volume so that freed
        /// blocks are reused.
        #[test]
        fn collapse_and_insert_match_a_page_model(ops in proptest::collection::vec(file_op(), 0..60)) {
            let volume = volume(256);
            let file = volume.create_file("a").unwrap();
            let other = volume.create_file("b").unwrap();
            other.set_len(64 * BLOCK).unwrap();
            let mut model: Vec<u8> = vec![0; 8];
            file.set_len(8 * BLOCK).unwrap();
            for (step, op) in ops.into_iter().enumerate() {
                let pages = model.len() as u64;
                let (result, expect_ok) = match op {
                    FileOp::Write(p, fill) => {
                        let ok = p < pages;
                        if ok {
                            model[p as usize] = fill;
                        }
                        (file.write_pages(p, &page(fill)), ok)
                    }
                    FileOp::Punch(p, n) => {
                        for slot in model.iter_mut().skip(p as usize).take(n as usize) {
                            *slot = 0;
                        }
                        (file.punch_hole(p * BLOCK, n * BLOCK), true)
                    }
                    FileOp::Collapse(p, n) => {
                        let ok = p + n < pages;
                        if ok {
                            model.drain(p as usize..(p + n) as usize);
                        }
                        (file.collapse_range(p * BLOCK, n * BLOCK), ok)
                    }
                    FileOp::Insert(p, n) => {
                        let ok = p < pages;
                        if ok {
                            model.splice(p as usize..p as usize, vec![0; n as usize]);
                        }
                        (file.insert_range(p * BLOCK, n * BLOCK), ok)
                    }
                    FileOp::SetLen(p) => {
                        model.resize(p as usize, 0);
                        (file.set_len(p * BLOCK), true)
                    }
                };
                prop_assert_eq!(result.is_ok(), expect_ok, "{:?}", result);
                // Churn the other file so freed blocks are taken at once.
                other.write_pages(step as u64 % 64, &page(0xEE)).unwrap();
                prop_assert_eq!(file.len().unwrap(), model.len() as u64 * BLOCK);
                let data = read(&file, 0, model.len() + 1);
                for (i, &fill) in model.iter().enumerate() {
                    prop_assert!(
                        data[i * PAGE..(i + 1) * PAGE].iter().all(|&b| b == fill),
                        "page {} should be all {}", i, fill
                    );
                }
                prop_assert!(data[model.len() * PAGE..].iter().all(|&b| b == 0));
                prop_assert_eq!(
                    file.allocated_blocks().unwrap(),
                    model.iter().filter(|&&fill| fill != 0).count() as u64
                );
                volume.check_invariants();
            }
        }
    }
}
