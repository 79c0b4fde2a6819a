//! Opening a `Volume`: one owner per device, and every field read from the
//! device range-checked.
//!
//! - A second `Volume::open` or `Volume::format` of a device whose volume is
//!   still alive fails with `EBUSY`: two live volumes on one device would each
//!   run an allocator of their own, hand out the same block, and give one
//!   file another file's data.
//! - A superblock or metadata whose checksum holds but whose fields are out of
//!   range fails `open` with `EUCLEAN` (or `EINVAL` for a volume this build
//!   cannot read, or one larger than its device), naming the field and its
//!   value, and changes nothing on the device: no field from the device
//!   reaches an overflowing sum or an allocation unchecked.
//!
//! The tests write superblocks and metadata by hand, as the on-device format in
//! the module documentation of `src/backend/volume.rs` lays them out.

use std::io;
use std::sync::Arc;

use filemap::{Backend, Device, FaultyDevice, FileDevice, MemDevice, PageCache, Volume};
use proptest::prelude::*;

const BLOCK: u64 = 4096;
/// The sample device: 256 blocks, so each metadata area has 2 blocks and the
/// data blocks start at block 6.
const DEVICE_BLOCKS: u64 = 256;
const META_BLOCKS: u64 = 2;
const DATA_START: u64 = 2 + 2 * META_BLOCKS;
const MAX_FILE_SIZE: u64 = 1 << 44;
/// The largest generation a superblock may hold: 2^63 - 1.
const MAX_GENERATION: u64 = (1 << 63) - 1;
const MAGIC: &[u8; 8] = b"FMVOLUME";

/// Fails unless `result` is an error with `errno` whose message names every
/// one of `words`.
fn assert_fails<T>(result: io::Result<T>, errno: i32, words: &[&str], what: &str) {
    let Err(error) = result else {
        panic!("{what}: succeeded");
    };
    assert_eq!(filemap::errno(&error), Some(errno), "{what}: {error}");
    let message = error.to_string();
    for word in words {
        assert!(message.contains(word), "{what}: {message:?} lacks {word:?}");
    }
}

/// The bytes of `device`.
fn image(device: &dyn Device) -> Vec<u8> {
    let mut bytes = vec![0; device.len() as usize];
    device.read_exact_at(&mut bytes, 0).unwrap();
    bytes
}

/// A new memory device holding `bytes`.
fn device_with(bytes: &[u8]) -> Arc<MemDevice> {
    let device = MemDevice::new(bytes.len() as u64);
    device.write_all_at(bytes, 0).unwrap();
    Arc::new(device)
}

// ---------------------------------------------------------------------------
// One owner at a time.
// ---------------------------------------------------------------------------

/// Fails unless `result` is the `EBUSY` of a volume in use.
fn assert_busy<T>(result: io::Result<T>, what: &str) {
    assert_fails(result, libc::EBUSY, &["in use"], what);
}

/// The scenario the claim exists for, if a second volume opens: a file
/// created through each volume, both synced, read through the first. Returns
/// what `fa` reads.
fn files_through_two_volumes(first: &Arc<Volume>, second: &Arc<Volume>) -> Vec<u8> {
    let fa = first.create_file("fa").unwrap();
    let fb = second.create_file("fb").unwrap();
    fa.set_len(BLOCK).unwrap();
    fb.set_len(BLOCK).unwrap();
    fa.write_pages(0, &[0xAA; BLOCK as usize]).unwrap();
    fb.write_pages(0, &[0xBB; BLOCK as usize]).unwrap();
    fa.sync().unwrap();
    fb.sync().unwrap();
    let mut read = vec![0; BLOCK as usize];
    fa.read_pages(0, &mut read).unwrap();
    read
}

#[test]
fn two_live_volumes_on_one_device_would_give_a_file_foreign_data() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
    let first = Volume::format(device.clone()).unwrap();
    let second = Volume::open(device.clone());
    if let Ok(second) = &second {
        let read = files_through_two_volumes(&first, second);
        assert!(
            read.iter().all(|&b| b == 0xAA),
            "fa reads fb's data: both volumes allocated the same block"
        );
    }
    assert_busy(second, "open beside a live volume");
    let second = Volume::format(device.clone());
    if let Ok(second) = &second {
        let read = files_through_two_volumes(&first, second);
        assert!(read.iter().all(|&b| b == 0xAA), "fa reads fb's data");
    }
    assert_busy(second, "format beside a live volume");
}

#[test]
fn format_then_open_of_a_memory_device_fails_with_ebusy_until_the_volume_is_dropped() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let file = volume.create_file("kept").unwrap();
    volume.sync().unwrap();
    assert_busy(Volume::open(device.clone()), "open after format");
    // The volume's own device handle is the same device.
    assert_busy(
        Volume::open(volume.device().clone()),
        "open of volume.device()",
    );
    drop((volume, file));
    let volume = Volume::open(device.clone()).unwrap();
    assert_eq!(volume.file_names(), ["kept"]);
    assert_busy(Volume::open(device.clone()), "open after open");
    drop(volume);
    Volume::open(device).unwrap();
}

#[test]
fn format_of_a_device_in_use_fails_with_ebusy_and_changes_nothing() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let file = volume.create_file("a").unwrap();
    file.set_len(BLOCK).unwrap();
    file.write_pages(0, &[7; BLOCK as usize]).unwrap();
    volume.sync().unwrap();
    let before = image(device.as_ref());
    assert_busy(Volume::format(device.clone()), "format while open");
    assert!(image(device.as_ref()) == before, "a refused format wrote");
    // The volume in use keeps working, and reopens as it was.
    file.sync().unwrap();
    drop((volume, file));
    let volume = Volume::open(device.clone()).unwrap();
    let mut read = vec![0; BLOCK as usize];
    volume
        .open_file("a")
        .unwrap()
        .read_pages(0, &mut read)
        .unwrap();
    assert!(read.iter().all(|&b| b == 7));
}

#[test]
fn two_file_devices_on_one_image_cannot_both_hold_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.img");
    let first: Arc<dyn Device> =
        Arc::new(FileDevice::create(&path, DEVICE_BLOCKS * BLOCK).unwrap());
    let volume = Volume::format(first.clone()).unwrap();
    volume.create_file("a").unwrap();
    volume.sync().unwrap();
    let second: Arc<dyn Device> = Arc::new(FileDevice::open(&path).unwrap());
    let before = image(second.as_ref());
    assert_busy(
        Volume::open(second.clone()),
        "open through a second FileDevice",
    );
    assert_busy(
        Volume::format(second.clone()),
        "format through a second FileDevice",
    );
    assert_busy(
        FileDevice::create(&path, DEVICE_BLOCKS * BLOCK),
        "create over an image in use",
    );
    assert!(image(second.as_ref()) == before, "a refused call wrote");
    // Another process finds the image locked (another open file of it
    // stands in for one), until the volume goes.
    let other = std::fs::File::open(&path).unwrap();
    let lock = |file| rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockShared);
    assert_eq!(lock(&other), Err(rustix::io::Errno::WOULDBLOCK));
    drop(volume);
    lock(&other).unwrap();
    drop(other);
    let volume = Volume::open(second.clone()).unwrap();
    assert_eq!(volume.file_names(), ["a"]);
    assert_busy(
        Volume::open(first.clone()),
        "open through the first FileDevice",
    );
    drop(volume);
    Volume::open(first).unwrap();
}

#[test]
fn file_devices_on_duplicated_descriptors_exclude_each_other_too() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(DEVICE_BLOCKS * BLOCK).unwrap();
    let first: Arc<dyn Device> =
        Arc::new(FileDevice::from_file(file.try_clone().unwrap()).unwrap());
    let second: Arc<dyn Device> = Arc::new(FileDevice::from_file(file).unwrap());
    let volume = Volume::format(first).unwrap();
    assert_busy(Volume::open(second.clone()), "open through a dup");
    drop(volume);
    Volume::open(second).unwrap();
}

#[test]
fn a_faulty_device_claims_the_device_it_wraps() {
    let memory: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
    let faulty: Arc<dyn Device> = Arc::new(FaultyDevice::new(memory.clone(), 1));
    let volume = Volume::format(faulty.clone()).unwrap();
    assert_busy(Volume::open(memory.clone()), "open of the wrapped device");
    assert_busy(Volume::open(faulty.clone()), "open of the wrapper");
    drop(volume);
    drop(Volume::open(memory).unwrap());
    Volume::open(faulty).unwrap();
}

#[test]
fn file_handles_and_mappings_keep_the_volume_and_its_claim_alive() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let file = volume.create_file("a").unwrap();
    let mapped = volume.create_file("b").unwrap();
    let cache = PageCache::builder().build().unwrap();
    let mapping = cache.open(Arc::new(mapped)).unwrap();
    volume.sync().unwrap();
    drop(volume);
    assert_busy(Volume::open(device.clone()), "open while a handle lives");
    drop(file);
    assert_busy(Volume::open(device.clone()), "open while a mapping lives");
    drop(mapping);
    drop(cache);
    let volume = Volume::open(device).unwrap();
    assert_eq!(volume.file_names(), ["a", "b"]);
}

// ---------------------------------------------------------------------------
// Range checks on open.
// ---------------------------------------------------------------------------

/// A superblock, as the module documentation lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Superblock {
    version: u32,
    block_size: u32,
    total_blocks: u64,
    meta_blocks: u64,
    generation: u64,
    meta_len: u64,
    meta_crc: u32,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

impl Superblock {
    /// The superblock in `slot`, if it has the magic and a valid checksum.
    fn read(device: &dyn Device, slot: u64) -> Option<Superblock> {
        let mut block = [0u8; 56];
        device.read_exact_at(&mut block, slot * BLOCK).unwrap();
        if &block[..8] != MAGIC || crc32fast::hash(&block[..52]) != u32_at(&block, 52) {
            return None;
        }
        Some(Superblock {
            version: u32_at(&block, 8),
            block_size: u32_at(&block, 12),
            total_blocks: u64_at(&block, 16),
            meta_blocks: u64_at(&block, 24),
            generation: u64_at(&block, 32),
            meta_len: u64_at(&block, 40),
            meta_crc: u32_at(&block, 48),
        })
    }

    /// The 52 bytes the superblock's checksum covers.
    fn body(&self) -> Vec<u8> {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&self.version.to_le_bytes());
        body.extend_from_slice(&self.block_size.to_le_bytes());
        body.extend_from_slice(&self.total_blocks.to_le_bytes());
        body.extend_from_slice(&self.meta_blocks.to_le_bytes());
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&self.meta_len.to_le_bytes());
        body.extend_from_slice(&self.meta_crc.to_le_bytes());
        body
    }

    /// Writes `body` (52 bytes) into `slot` with its checksum.
    fn write_body(device: &dyn Device, slot: u64, body: &[u8]) {
        let mut bytes = body.to_vec();
        bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        device.write_all_at(&bytes, slot * BLOCK).unwrap();
    }

    /// Writes the superblock into `slot` with a valid checksum.
    fn write(&self, device: &dyn Device, slot: u64) {
        Self::write_body(device, slot, &self.body());
    }
}

/// The slot and superblock of the newest generation.
fn newest(device: &dyn Device) -> (u64, Superblock) {
    (0..2)
        .filter_map(|slot| Superblock::read(device, slot).map(|sb| (slot, sb)))
        .max_by_key(|(_, sb)| sb.generation)
        .expect("a volume")
}

/// The first byte of the metadata area of `generation`.
fn area(generation: u64) -> u64 {
    (2 + (generation % 2) * META_BLOCKS) * BLOCK
}

/// The newest metadata, as encoded.
fn newest_metadata(device: &dyn Device) -> Vec<u8> {
    let (_, sb) = newest(device);
    let mut bytes = vec![0; sb.meta_len as usize];
    device
        .read_exact_at(&mut bytes, area(sb.generation))
        .unwrap();
    bytes
}

/// Replaces the newest metadata with `bytes`, and points the newest
/// superblock at them with valid checksums.
fn write_metadata(device: &dyn Device, bytes: &[u8]) {
    let (slot, mut sb) = newest(device);
    assert!(bytes.len() as u64 <= META_BLOCKS * BLOCK);
    device.write_all_at(bytes, area(sb.generation)).unwrap();
    sb.meta_len = bytes.len() as u64;
    sb.meta_crc = crc32fast::hash(bytes);
    sb.write(device, slot);
}

/// One file of the metadata, every field as stored.
#[derive(Clone, Debug)]
struct FileRecord {
    id: u64,
    size: u64,
    name_len: u16,
    name: Vec<u8>,
    run_count: u64,
    /// `(first logical block, first physical block, length)`.
    runs: Vec<(u64, u64, u64)>,
}

/// The metadata, every field as stored.
#[derive(Clone, Debug)]
struct Metadata {
    next_id: u64,
    file_count: u64,
    files: Vec<FileRecord>,
    /// Bytes after the last file.
    trailing: Vec<u8>,
}

impl Metadata {
    fn parse(bytes: &[u8]) -> Metadata {
        let mut at = 0;
        let mut u64_field = |bytes: &[u8]| {
            at += 8;
            u64_at(bytes, at - 8)
        };
        let next_id = u64_field(bytes);
        let file_count = u64_field(bytes);
        let mut files = Vec::new();
        for _ in 0..file_count {
            let id = u64_at(bytes, at);
            let size = u64_at(bytes, at + 8);
            let name_len = u16::from_le_bytes(bytes[at + 16..at + 18].try_into().unwrap());
            at += 18;
            let name = bytes[at..at + name_len as usize].to_vec();
            at += name_len as usize;
            let run_count = u64_at(bytes, at);
            at += 8;
            let runs = (0..run_count)
                .map(|i| {
                    let run = at + 24 * i as usize;
                    (
                        u64_at(bytes, run),
                        u64_at(bytes, run + 8),
                        u64_at(bytes, run + 16),
                    )
                })
                .collect();
            at += 24 * run_count as usize;
            files.push(FileRecord {
                id,
                size,
                name_len,
                name,
                run_count,
                runs,
            });
        }
        Metadata {
            next_id,
            file_count,
            files,
            trailing: bytes[at..].to_vec(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.next_id.to_le_bytes());
        bytes.extend_from_slice(&self.file_count.to_le_bytes());
        for file in &self.files {
            bytes.extend_from_slice(&file.id.to_le_bytes());
            bytes.extend_from_slice(&file.size.to_le_bytes());
            bytes.extend_from_slice(&file.name_len.to_le_bytes());
            bytes.extend_from_slice(&file.name);
            bytes.extend_from_slice(&file.run_count.to_le_bytes());
            for &(lblk, phys, len) in &file.runs {
                for field in [lblk, phys, len] {
                    bytes.extend_from_slice(&field.to_le_bytes());
                }
            }
        }
        bytes.extend_from_slice(&self.trailing);
        bytes
    }
}

/// A synced volume, dropped: file `a` of 3 blocks in one run, `b` of 2 blocks
/// and 100 bytes, `empty`. Generation 2 (slot 0) is the newest.
fn sample_image() -> Vec<u8> {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let device: Arc<dyn Device> = Arc::new(MemDevice::new(DEVICE_BLOCKS * BLOCK));
            let volume = Volume::format(device.clone()).unwrap();
            let a = volume.create_file("a").unwrap();
            a.set_len(3 * BLOCK).unwrap();
            a.write_pages(0, &[1; 3 * BLOCK as usize]).unwrap();
            let b = volume.create_file("b").unwrap();
            b.set_len(2 * BLOCK + 100).unwrap();
            b.write_pages(0, &[2; 3 * BLOCK as usize]).unwrap();
            volume.create_file("empty").unwrap();
            volume.sync().unwrap();
            drop((a, b, volume));
            let image = image(device.as_ref());
            let sample = device_with(&image);
            assert_eq!(newest(sample.as_ref()).1.generation, 2);
            let meta = Metadata::parse(&newest_metadata(sample.as_ref()));
            assert_eq!(meta.files.len(), 3);
            assert_eq!(meta.files[0].runs.len(), 1);
            assert_eq!(meta.encode(), newest_metadata(sample.as_ref()));
            image
        })
        .clone()
}

/// Fails unless `Volume::open` of `device` fails with `errno`, naming every
/// one of `words`, and leaves the device as it was.
fn assert_open_fails(device: Arc<MemDevice>, errno: i32, words: &[&str], what: &str) {
    let before = image(device.as_ref());
    assert_fails(Volume::open(device.clone()), errno, words, what);
    assert!(
        image(device.as_ref()) == before,
        "{what}: a failed open wrote"
    );
}

#[test]
fn a_superblock_generation_of_u64_max_is_refused() {
    let device = device_with(&sample_image());
    // u64::MAX is odd: its slot is 1. Copy the newest superblock there.
    let (_, mut sb) = newest(device.as_ref());
    let meta = newest_metadata(device.as_ref());
    sb.generation = u64::MAX;
    device.write_all_at(&meta, area(sb.generation)).unwrap();
    sb.write(device.as_ref(), 1);
    let generation = u64::MAX.to_string();
    assert_open_fails(
        device,
        libc::EUCLEAN,
        &["generation", &generation],
        "generation u64::MAX",
    );
}

#[test]
fn the_last_generation_opens_but_refuses_a_commit_past_it() {
    let device = device_with(&sample_image());
    let (_, mut sb) = newest(device.as_ref());
    let meta = newest_metadata(device.as_ref());
    sb.generation = MAX_GENERATION; // odd: slot 1
    device.write_all_at(&meta, area(sb.generation)).unwrap();
    sb.write(device.as_ref(), 1);
    let volume = Volume::open(device.clone()).unwrap();
    volume.check_invariants();
    volume.create_file("new").unwrap();
    let before = image(device.as_ref());
    assert_fails(volume.sync(), libc::EOVERFLOW, &["generation"], "commit");
    assert!(image(device.as_ref()) == before, "a refused commit wrote");
    drop(volume);
    let volume = Volume::open(device).unwrap();
    assert_eq!(volume.file_names(), ["a", "b", "empty"]);
}

#[test]
fn the_last_file_id_opens_but_refuses_a_new_file() {
    let device = device_with(&sample_image());
    let mut meta = Metadata::parse(&newest_metadata(device.as_ref()));
    meta.next_id = u64::MAX;
    write_metadata(device.as_ref(), &meta.encode());
    let volume = Volume::open(device).unwrap();
    volume.check_invariants();
    assert_fails(volume.create_file("new"), libc::ENOSPC, &["id"], "create");
    assert_eq!(volume.file_names(), ["a", "b", "empty"]);
    volume.check_invariants();
}

/// A change of one field of the newest superblock.
type SuperblockEdit = fn(&mut Superblock);
/// A change of one field of the newest metadata.
type MetadataEdit = fn(&mut Metadata);

#[test]
fn every_out_of_range_superblock_field_fails_open_cleanly() {
    let max = u64::MAX.to_string();
    let rows: Vec<(&str, SuperblockEdit, i32, Vec<&str>)> = vec![
        (
            "version 2",
            |sb| sb.version = 2,
            libc::EINVAL,
            vec!["format version", "2"],
        ),
        (
            "version 0",
            |sb| sb.version = 0,
            libc::EINVAL,
            vec!["format version", "0"],
        ),
        (
            "block size 512",
            |sb| sb.block_size = 512,
            libc::EINVAL,
            vec!["block size", "512"],
        ),
        (
            "block size max",
            |sb| sb.block_size = u32::MAX,
            libc::EINVAL,
            vec!["block size", "4294967295"],
        ),
        (
            "total blocks past the device",
            |sb| sb.total_blocks = 257,
            libc::EINVAL,
            vec!["total blocks", "257"],
        ),
        (
            "total blocks max",
            |sb| sb.total_blocks = u64::MAX,
            libc::EINVAL,
            vec!["total blocks", &max],
        ),
        (
            "total blocks too few",
            |sb| sb.total_blocks = 6,
            libc::EUCLEAN,
            vec!["total blocks", "6"],
        ),
        (
            "total blocks zero",
            |sb| sb.total_blocks = 0,
            libc::EUCLEAN,
            vec!["total blocks", "0"],
        ),
        (
            "meta blocks zero",
            |sb| sb.meta_blocks = 0,
            libc::EUCLEAN,
            vec!["metadata blocks", "0"],
        ),
        (
            "meta blocks other",
            |sb| sb.meta_blocks = 3,
            libc::EUCLEAN,
            vec!["metadata blocks", "3"],
        ),
        (
            "meta blocks max",
            |sb| sb.meta_blocks = u64::MAX,
            libc::EUCLEAN,
            vec!["metadata blocks", &max],
        ),
        (
            "generation zero",
            |sb| sb.generation = 0,
            libc::EUCLEAN,
            vec!["generation", "0"],
        ),
        (
            "generation past the last",
            |sb| sb.generation = u64::MAX - 1,
            libc::EUCLEAN,
            vec!["generation", "18446744073709551614"],
        ),
        (
            "generation in the wrong slot",
            |sb| sb.generation = 3,
            libc::EUCLEAN,
            vec!["generation", "3", "slot"],
        ),
        (
            "meta len zero",
            |sb| sb.meta_len = 0,
            libc::EUCLEAN,
            vec!["metadata length", "0"],
        ),
        (
            "meta len under the header",
            |sb| sb.meta_len = 15,
            libc::EUCLEAN,
            vec!["metadata length", "15"],
        ),
        (
            "meta len past the area",
            |sb| sb.meta_len = 2 * BLOCK + 1,
            libc::EUCLEAN,
            vec!["metadata length", "8193"],
        ),
        (
            "meta len max",
            |sb| sb.meta_len = u64::MAX,
            libc::EUCLEAN,
            vec!["metadata length", &max],
        ),
    ];
    let sample = sample_image();
    for (what, edit, errno, words) in rows {
        let device = device_with(&sample);
        let (slot, mut sb) = newest(device.as_ref());
        edit(&mut sb);
        sb.write(device.as_ref(), slot);
        assert_open_fails(device, errno, &words, what);
    }
    // The older superblock is checked too.
    let device = device_with(&sample);
    let mut older = Superblock::read(device.as_ref(), 1).unwrap();
    older.meta_len = u64::MAX;
    older.write(device.as_ref(), 1);
    assert_open_fails(
        device,
        libc::EUCLEAN,
        &["metadata length", &max],
        "older superblock",
    );
}

#[test]
fn every_out_of_range_metadata_field_fails_open_cleanly() {
    let max = u64::MAX.to_string();
    let too_big = (MAX_FILE_SIZE + 1).to_string();
    let rows: Vec<(&str, MetadataEdit, Vec<&str>)> = vec![
        ("next id zero", |m| m.next_id = 0, vec!["next id", "0"]),
        (
            "next id not above every id",
            |m| m.next_id = 3,
            vec!["file id", "3"],
        ),
        (
            "file count max",
            |m| m.file_count = u64::MAX,
            vec!["file count", &max],
        ),
        (
            "file count past the files",
            |m| m.file_count = 4,
            vec!["file", "ends"],
        ),
        (
            "file count short of the files",
            |m| m.file_count = 2,
            vec!["file count", "2", "bytes"],
        ),
        ("file id zero", |m| m.files[0].id = 0, vec!["file id", "0"]),
        (
            "file id max",
            |m| m.files[2].id = u64::MAX,
            vec!["file id", &max],
        ),
        (
            "file ids out of order",
            |m| m.files.swap(0, 1),
            vec!["file id", "1"],
        ),
        (
            "file ids repeated",
            |m| m.files[1].id = 1,
            vec!["file id", "1"],
        ),
        (
            "size past the largest file",
            |m| m.files[2].size = MAX_FILE_SIZE + 1,
            vec!["size", &too_big],
        ),
        (
            "size max",
            |m| m.files[2].size = u64::MAX,
            vec!["size", &max],
        ),
        (
            "size short of the runs",
            |m| m.files[0].size = BLOCK,
            vec!["logical block", "3"],
        ),
        (
            "name length zero",
            |m| {
                m.files[0].name_len = 0;
                m.files[0].name.clear();
            },
            vec!["name length", "0"],
        ),
        (
            "name length 256",
            |m| {
                m.files[0].name_len = 256;
                m.files[0].name = vec![b'n'; 256];
            },
            vec!["name length", "256"],
        ),
        (
            "name length max",
            |m| m.files[2].name_len = u16::MAX,
            vec!["name length", "65535"],
        ),
        (
            "name with a slash",
            |m| m.files[0].name = b"/".to_vec(),
            vec!["name", "/"],
        ),
        (
            "name with a NUL",
            |m| m.files[0].name = b"\0".to_vec(),
            vec!["name"],
        ),
        (
            "name not UTF-8",
            |m| m.files[0].name = vec![0xFF],
            vec!["name", "UTF-8"],
        ),
        (
            "name taken",
            |m| m.files[1].name = b"a".to_vec(),
            vec!["name", "\"a\""],
        ),
        (
            "run count max",
            |m| m.files[0].run_count = u64::MAX,
            vec!["run count", &max],
        ),
        (
            "run count past the runs",
            |m| m.files[2].run_count = 1,
            vec!["run count", "1"],
        ),
        (
            "run length zero",
            |m| m.files[0].runs[0].2 = 0,
            vec!["length", "0"],
        ),
        (
            "run length max",
            |m| m.files[0].runs[0].2 = u64::MAX,
            vec!["logical block", &max],
        ),
        (
            "run logical block max",
            |m| m.files[0].runs[0].0 = u64::MAX,
            vec!["logical block", &max],
        ),
        (
            "run in the superblocks",
            |m| m.files[0].runs[0].1 = 0,
            vec!["physical block", "0"],
        ),
        (
            "run in a metadata area",
            |m| m.files[0].runs[0].1 = DATA_START - 1,
            vec!["physical block", "5"],
        ),
        (
            "run past the device",
            |m| m.files[0].runs[0].1 = DEVICE_BLOCKS - 2,
            vec!["physical block", "254"],
        ),
        (
            "run physical block max",
            |m| m.files[0].runs[0].1 = u64::MAX,
            vec!["physical block", &max],
        ),
        (
            "runs overlapping",
            |m| {
                m.files[0].run_count = 2;
                m.files[0].runs.push((1, 100, 1));
            },
            vec!["runs", "overlap"],
        ),
        (
            "a block mapped twice",
            |m| m.files[1].runs[0].1 = m.files[0].runs[0].1 + 2,
            vec!["physical block", "twice"],
        ),
        (
            "bytes after the last file",
            |m| m.trailing = vec![0; 8],
            vec!["8", "bytes"],
        ),
    ];
    let sample = sample_image();
    for (what, edit, words) in rows {
        let device = device_with(&sample);
        let mut meta = Metadata::parse(&newest_metadata(device.as_ref()));
        edit(&mut meta);
        write_metadata(device.as_ref(), &meta.encode());
        assert_open_fails(device, libc::EUCLEAN, &words, what);
    }
}

#[test]
fn a_flipped_byte_without_a_valid_checksum_still_falls_back_to_the_commit_before() {
    let device = device_with(&sample_image());
    let (slot, sb) = newest(device.as_ref());
    let mut body = sb.body();
    body[35] ^= 1;
    // Written without recomputing the checksum: a torn or rotten superblock.
    device.write_all_at(&body, slot * BLOCK).unwrap();
    let volume = Volume::open(device).unwrap();
    assert!(volume.file_names().is_empty(), "generation 1 is empty");
    volume.check_invariants();
}

/// What a proptest case overwrites, always with valid checksums.
#[derive(Clone, Debug)]
struct Corruption {
    /// Bytes of the newest metadata to set (offsets taken modulo its length).
    meta_edits: Vec<(usize, u8)>,
    /// A new length of the metadata, cut or padded.
    meta_len: Option<usize>,
    /// Fields of the newest superblock to set: version, block size, total
    /// blocks, metadata blocks, generation, metadata length (index modulo 6).
    super_fields: Vec<(usize, u64)>,
    /// Bytes of the superblock's fields to set (offsets 8..52).
    super_bytes: Vec<(usize, u8)>,
}

impl Corruption {
    /// Applies the corruption to `device`. The metadata goes into the area of
    /// the superblock's (new) generation, and the superblock into that
    /// generation's slot.
    fn apply(&self, device: &dyn Device) {
        let mut meta = newest_metadata(device);
        for &(at, byte) in &self.meta_edits {
            let at = at % meta.len();
            meta[at] = byte;
        }
        if let Some(len) = self.meta_len {
            meta.resize(len, 0x5A);
        }
        let (_, mut sb) = newest(device);
        sb.meta_len = meta.len() as u64;
        sb.meta_crc = crc32fast::hash(&meta);
        for &(field, value) in &self.super_fields {
            match field % 6 {
                0 => sb.version = value as u32,
                1 => sb.block_size = value as u32,
                2 => sb.total_blocks = value,
                3 => sb.meta_blocks = value,
                4 => sb.generation = value,
                _ => sb.meta_len = value,
            }
        }
        device.write_all_at(&meta, area(sb.generation)).unwrap();
        let mut body = sb.body();
        for &(at, byte) in &self.super_bytes {
            body[8 + at % 44] = byte;
        }
        Superblock::write_body(device, sb.generation % 2, &body);
    }
}

fn corruption() -> impl Strategy<Value = Corruption> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(3),
        Just(DEVICE_BLOCKS),
        Just(MAX_GENERATION),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
    ];
    // Each kind of damage alone often enough that the others do not always
    // mask it.
    (
        prop_oneof![
            2 => Just(Vec::new()),
            1 => proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12),
        ],
        proptest::option::weighted(0.2, 0usize..400),
        proptest::collection::vec((any::<usize>(), value), 0..3),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec((any::<usize>(), any::<u8>()), 1..3),
        ],
    )
        .prop_map(
            |(meta_edits, meta_len, super_fields, super_bytes)| Corruption {
                meta_edits,
                meta_len,
                super_fields,
                super_bytes,
            },
        )
}

/// Opens `device`: an error is fine, and so is a volume that holds its
/// invariants, reads its files, and takes a commit that a reopen finds.
fn open_survives(device: Arc<MemDevice>) -> Result<(), TestCaseError> {
    let Ok(volume) = Volume::open(device.clone()) else {
        return Ok(());
    };
    volume.check_invariants();
    for name in volume.file_names() {
        let file = volume.open_file(&name).unwrap();
        let pages = file.len().unwrap().div_ceil(BLOCK).min(4) as usize;
        let mut buf = vec![0; pages * BLOCK as usize];
        file.read_pages(0, &mut buf).unwrap();
    }
    let Ok(file) = volume.create_file("proptest") else {
        return Ok(());
    };
    file.set_len(BLOCK).unwrap();
    let _ = file.write_pages(0, &[3; BLOCK as usize]);
    let synced = volume.sync();
    volume.check_invariants();
    drop((file, volume));
    if synced.is_ok() {
        let volume = Volume::open(device).map_err(|error| {
            TestCaseError::fail(format!("a synced volume does not reopen: {error}"))
        })?;
        prop_assert!(
            volume.open_file("proptest").is_ok(),
            "a synced file is missing after a reopen"
        );
        volume.check_invariants();
    }
    Ok(())
}

proptest! {
    // Cheap cases: enough of them that a generation of u64::MAX alone
    // (which passes every other check) comes up.
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes over the metadata and the superblock, with valid
    /// checksums: `open` fails or opens a consistent volume, never panics.
    #[test]
    fn open_of_random_fields_with_valid_checksums_never_panics(corruption in corruption()) {
        let device = device_with(&sample_image());
        corruption.apply(device.as_ref());
        open_survives(device)?;
    }

    /// Metadata of random bytes, with valid checksums.
    #[test]
    fn open_of_random_metadata_with_valid_checksums_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        header in proptest::option::of((1u64..8, 0u64..4)),
    ) {
        let device = device_with(&sample_image());
        let mut meta = bytes;
        if let Some((next_id, count)) = header {
            // A plausible header, so the files after it are decoded too.
            meta.splice(0..meta.len().min(16), [next_id.to_le_bytes(), count.to_le_bytes()].concat());
        }
        write_metadata(device.as_ref(), &meta);
        open_survives(device)?;
    }
}
