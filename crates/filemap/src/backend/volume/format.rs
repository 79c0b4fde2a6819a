//! The on-device format: where the superblocks and metadata areas lie, and
//! the codec of superblocks and metadata with its checks of every field read
//! from the device (see "On-device format" and "Opening" in the volume's
//! documentation).

use std::collections::BTreeMap;
use std::fmt;
use std::io;

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

/// The version of the on-device format.
const FORMAT_VERSION: u32 = 1;

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

/// Encoded metadata: the header (next id, file count).
pub(super) const META_HEADER: u64 = 16;
/// Encoded metadata per file besides its name: id, size, name length, run count.
pub(super) const FILE_RECORD: u64 = 8 + 8 + 2 + 8;
/// Encoded metadata per run: first logical block, first physical block, length.
pub(super) const RUN_RECORD: u64 = 24;

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

/// The volume's persistent metadata: the file table and the extent maps.
#[derive(Clone, Debug)]
pub(super) struct Metadata {
    pub(super) names: BTreeMap<String, u64>,
    pub(super) files: BTreeMap<u64, FileMeta>,
    /// Ids are never reused, so a handle of a removed file can never reach a
    /// newer file that happens to get the same id.
    pub(super) next_id: u64,
}

#[derive(Clone, Debug)]
pub(super) struct FileMeta {
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) extents: ExtentMap,
}

impl FileMeta {
    /// The bytes the file takes in encoded metadata.
    pub(super) fn encoded_len(&self) -> u64 {
        FILE_RECORD + self.name.len() as u64 + self.extents.run_count() * RUN_RECORD
    }
}

impl Metadata {
    pub(super) fn new() -> Self {
        Metadata {
            names: BTreeMap::new(),
            files: BTreeMap::new(),
            next_id: 1,
        }
    }

    /// The metadata in the on-device format (see the volume's documentation).
    pub(super) fn encode(&self) -> Vec<u8> {
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
    /// field is in range (see "Opening" in the volume's documentation) and every
    /// file maps only data blocks of `layout` inside its size. (Blocks shared
    /// between files are caught by [`Space::rebuild`].)
    ///
    /// [`Space::rebuild`]: super::space::Space::rebuild
    pub(super) fn decode(bytes: &[u8], layout: Layout) -> io::Result<Metadata> {
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
    ///
    /// [`State::meta_len`]: super::State::meta_len
    pub(super) fn encoded_len(&self) -> u64 {
        META_HEADER + self.files.values().map(FileMeta::encoded_len).sum::<u64>()
    }

    /// Every mapped physical run `(first block, length)` of every file.
    pub(super) fn mapped_runs(&self) -> Vec<(u64, u64)> {
        self.files
            .values()
            .flat_map(|file| file.extents.iter().map(|(_, e)| (e.phys, e.len)))
            .collect()
    }
}

pub(super) fn check_name(name: &str) -> io::Result<()> {
    if name.len() > MAX_NAME_LEN {
        return fail(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(['/', '\0']) {
        return fail(libc::EINVAL);
    }
    Ok(())
}
