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

/// A regular file's fields after the inode's, as stored.
#[derive(Clone, Debug)]
struct FileBody {
    size: u64,
    run_count: u64,
    /// `(first logical block, first physical block, length)`.
    runs: Vec<(u64, u64, u64)>,
}

/// One directory entry, as stored.
#[derive(Clone, Debug)]
struct EntryRecord {
    cookie: u64,
    ino: u64,
    name_len: u16,
    name: Vec<u8>,
}

/// A directory's fields after the inode's, as stored.
#[derive(Clone, Debug)]
struct DirBody {
    next_cookie: u64,
    entry_count: u64,
    entries: Vec<EntryRecord>,
}

/// What follows an inode's common fields, by its kind.
#[derive(Clone, Debug)]
enum Body {
    File(FileBody),
    Dir(DirBody),
    Symlink { target_len: u16, target: Vec<u8> },
}

/// One inode of the metadata, every field as stored.
#[derive(Clone, Debug)]
struct InodeRecord {
    ino: u64,
    kind: u8,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    /// Access, modification and change times: seconds and nanoseconds.
    times: [(i64, u32); 3],
    body: Body,
}

/// The metadata, every field as stored.
#[derive(Clone, Debug)]
struct Metadata {
    next_id: u64,
    inode_count: u64,
    inodes: Vec<InodeRecord>,
    /// Bytes after the last inode.
    trailing: Vec<u8>,
}

/// Reads the fields of encoded metadata in order.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn take(&mut self, len: usize) -> &[u8] {
        self.at += len;
        &self.bytes[self.at - len..self.at]
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
}

impl Metadata {
    fn parse(bytes: &[u8]) -> Metadata {
        let mut fields = Fields { bytes, at: 0 };
        let next_id = fields.u64();
        let inode_count = fields.u64();
        let mut inodes = Vec::new();
        for _ in 0..inode_count {
            let ino = fields.u64();
            let kind = fields.u8();
            let perm = fields.u32();
            let uid = fields.u32();
            let gid = fields.u32();
            let nlink = fields.u32();
            let times = [(); 3].map(|()| (fields.u64() as i64, fields.u32()));
            let body = match kind {
                1 => {
                    let size = fields.u64();
                    let run_count = fields.u64();
                    let runs = (0..run_count)
                        .map(|_| (fields.u64(), fields.u64(), fields.u64()))
                        .collect();
                    Body::File(FileBody {
                        size,
                        run_count,
                        runs,
                    })
                }
                2 => {
                    let next_cookie = fields.u64();
                    let entry_count = fields.u64();
                    let entries = (0..entry_count)
                        .map(|_| {
                            let cookie = fields.u64();
                            let ino = fields.u64();
                            let name_len = fields.u16();
                            let name = fields.take(name_len.into()).to_vec();
                            EntryRecord {
                                cookie,
                                ino,
                                name_len,
                                name,
                            }
                        })
                        .collect();
                    Body::Dir(DirBody {
                        next_cookie,
                        entry_count,
                        entries,
                    })
                }
                3 => {
                    let target_len = fields.u16();
                    let target = fields.take(target_len.into()).to_vec();
                    Body::Symlink { target_len, target }
                }
                other => panic!("kind {other}"),
            };
            inodes.push(InodeRecord {
                ino,
                kind,
                perm,
                uid,
                gid,
                nlink,
                times,
                body,
            });
        }
        Metadata {
            next_id,
            inode_count,
            inodes,
            trailing: bytes[fields.at..].to_vec(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.next_id.to_le_bytes());
        bytes.extend_from_slice(&self.inode_count.to_le_bytes());
        for inode in &self.inodes {
            bytes.extend_from_slice(&inode.ino.to_le_bytes());
            bytes.push(inode.kind);
            for field in [inode.perm, inode.uid, inode.gid, inode.nlink] {
                bytes.extend_from_slice(&field.to_le_bytes());
            }
            for (secs, nanos) in inode.times {
                bytes.extend_from_slice(&secs.to_le_bytes());
                bytes.extend_from_slice(&nanos.to_le_bytes());
            }
            match &inode.body {
                Body::File(file) => {
                    bytes.extend_from_slice(&file.size.to_le_bytes());
                    bytes.extend_from_slice(&file.run_count.to_le_bytes());
                    for &(lblk, phys, len) in &file.runs {
                        for field in [lblk, phys, len] {
                            bytes.extend_from_slice(&field.to_le_bytes());
                        }
                    }
                }
                Body::Dir(dir) => {
                    bytes.extend_from_slice(&dir.next_cookie.to_le_bytes());
                    bytes.extend_from_slice(&dir.entry_count.to_le_bytes());
                    for entry in &dir.entries {
                        bytes.extend_from_slice(&entry.cookie.to_le_bytes());
                        bytes.extend_from_slice(&entry.ino.to_le_bytes());
                        bytes.extend_from_slice(&entry.name_len.to_le_bytes());
                        bytes.extend_from_slice(&entry.name);
                    }
                }
                Body::Symlink { target_len, target } => {
                    bytes.extend_from_slice(&target_len.to_le_bytes());
                    bytes.extend_from_slice(target);
                }
            }
        }
        bytes.extend_from_slice(&self.trailing);
        bytes
    }

    /// The record of inode `ino`.
    fn inode(&mut self, ino: u64) -> &mut InodeRecord {
        self.inodes
            .iter_mut()
            .find(|i| i.ino == ino)
            .expect("an inode")
    }

    /// The file fields of inode `ino`.
    fn file(&mut self, ino: u64) -> &mut FileBody {
        match &mut self.inode(ino).body {
            Body::File(file) => file,
            body => panic!("inode {ino} is {body:?}"),
        }
    }

    /// The directory fields of inode `ino`.
    fn dir(&mut self, ino: u64) -> &mut DirBody {
        match &mut self.inode(ino).body {
            Body::Dir(dir) => dir,
            body => panic!("inode {ino} is {body:?}"),
        }
    }

    /// Entry `index` of directory `ino`.
    fn entry(&mut self, ino: u64, index: usize) -> &mut EntryRecord {
        &mut self.dir(ino).entries[index]
    }

    /// Sets the name of entry `index` of directory `ino`, length included.
    fn rename_entry(&mut self, ino: u64, index: usize, name: &[u8]) {
        let entry = self.entry(ino, index);
        entry.name = name.to_vec();
        entry.name_len = name.len() as u16;
    }

    /// Appends an entry naming `target` to directory `ino` under the next
    /// cookie.
    fn add_entry(&mut self, ino: u64, name: &[u8], target: u64) {
        let dir = self.dir(ino);
        dir.entries.push(EntryRecord {
            cookie: dir.next_cookie,
            ino: target,
            name_len: name.len() as u16,
            name: name.to_vec(),
        });
        dir.next_cookie += 1;
        dir.entry_count += 1;
    }
}

/// The sample's inodes.
const ROOT: u64 = 1;
const A: u64 = 2;
const B: u64 = 3;
const EMPTY: u64 = 4;
const D: u64 = 5;
const LINK: u64 = 6;

/// A synced volume, dropped: in the root, file `a` of 3 blocks in one run,
/// `b` of 2 blocks and 100 bytes, `empty`, and directory `d` holding a
/// symbolic link `l` to `../a` and a hard link `a2` of `a`. Inodes 1 to 6 in
/// that order (root, a, b, empty, d, l); generation 2 (slot 0) is the newest.
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
            let d = volume.mkdir(Volume::ROOT, "d", 0o755, 0, 0).unwrap();
            volume.symlink(d.ino, "l", "../a", 0, 0).unwrap();
            let a_ino = volume.lookup(Volume::ROOT, "a").unwrap().ino;
            volume.link(a_ino, d.ino, "a2").unwrap();
            volume.sync().unwrap();
            drop((a, b, volume));
            let image = image(device.as_ref());
            let sample = device_with(&image);
            assert_eq!(newest(sample.as_ref()).1.generation, 2);
            let mut meta = Metadata::parse(&newest_metadata(sample.as_ref()));
            let inos: Vec<u64> = meta.inodes.iter().map(|i| i.ino).collect();
            assert_eq!(inos, [ROOT, A, B, EMPTY, D, LINK]);
            assert_eq!(meta.file(A).runs.len(), 1);
            assert_eq!(meta.dir(ROOT).entries.len(), 4);
            assert_eq!(meta.dir(D).entries.len(), 2);
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
            "version 3",
            |sb| sb.version = 3,
            libc::EINVAL,
            vec!["format version", "3"],
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
        (
            "next id zero",
            |m| m.next_id = 0,
            vec!["next inode number", "0"],
        ),
        (
            "next id the root's",
            |m| m.next_id = 1,
            vec!["next inode number", "1"],
        ),
        (
            "next id not above every inode",
            |m| m.next_id = 3,
            vec!["inode number", "3"],
        ),
        (
            "inode count max",
            |m| m.inode_count = u64::MAX,
            vec!["inode count", &max],
        ),
        (
            "entry count past the metadata",
            // 106 bytes follow it: at most 5 entries of 19 bytes.
            |m| m.dir(D).entry_count = 6,
            vec!["directory 5", "entry count 6"],
        ),
        (
            "inode count past the inodes",
            |m| m.inode_count = 7,
            vec!["inode", "ends"],
        ),
        (
            "inode count short of the inodes",
            |m| m.inode_count = 5,
            vec!["inode count", "5", "bytes"],
        ),
        (
            "inode number zero",
            |m| m.inodes[0].ino = 0,
            vec!["inode number", "0"],
        ),
        (
            "inode number max",
            |m| m.inodes[5].ino = u64::MAX,
            vec!["inode number", &max],
        ),
        (
            "inode numbers out of order",
            |m| m.inodes.swap(1, 2),
            vec!["inode number", "2"],
        ),
        (
            "inode numbers repeated",
            |m| m.inodes[2].ino = A,
            vec!["inode number", "2"],
        ),
        ("kind zero", |m| m.inode(B).kind = 0, vec!["kind", "0"]),
        (
            "kind max",
            |m| m.inode(B).kind = u8::MAX,
            vec!["kind", "255"],
        ),
        (
            "permission past 0o7777",
            |m| m.inode(A).perm = 0o10000,
            vec!["permission", "0o10000"],
        ),
        (
            "permission max",
            |m| m.inode(ROOT).perm = u32::MAX,
            vec!["permission", "0o37777777777"],
        ),
        (
            "access time nanoseconds",
            |m| m.inode(A).times[0].1 = 1_000_000_000,
            vec!["access time", "1000000000"],
        ),
        (
            "modification time nanoseconds max",
            |m| m.inode(D).times[1].1 = u32::MAX,
            vec!["modification time", "4294967295"],
        ),
        (
            "change time nanoseconds",
            |m| m.inode(LINK).times[2].1 = 1_000_000_000,
            vec!["change time", "1000000000"],
        ),
        (
            "file link count short of its names",
            |m| m.inode(A).nlink = 1,
            vec!["inode 2", "link count 1", "2"],
        ),
        (
            "file link count zero",
            |m| m.inode(B).nlink = 0,
            vec!["inode 3", "link count 0"],
        ),
        (
            "file link count max",
            |m| m.inode(EMPTY).nlink = u32::MAX,
            vec!["inode 4", "link count 4294967295"],
        ),
        (
            "directory link count without its subdirectory",
            |m| m.inode(ROOT).nlink = 2,
            vec!["inode 1", "link count 2", "3"],
        ),
        (
            "symbolic link count",
            |m| m.inode(LINK).nlink = 2,
            vec!["inode 6", "link count 2"],
        ),
        (
            "size past the largest file",
            |m| m.file(EMPTY).size = MAX_FILE_SIZE + 1,
            vec!["size", &too_big],
        ),
        (
            "size max",
            |m| m.file(EMPTY).size = u64::MAX,
            vec!["size", &max],
        ),
        (
            "size short of the runs",
            |m| m.file(A).size = BLOCK,
            vec!["logical block", "3"],
        ),
        (
            "a file read as a directory",
            |m| m.inode(EMPTY).kind = 2,
            vec!["next cookie", "0"],
        ),
        (
            "name length zero",
            |m| m.rename_entry(ROOT, 0, b""),
            vec!["name length", "0"],
        ),
        (
            "name length 256",
            |m| m.rename_entry(ROOT, 0, &[b'n'; 256]),
            vec!["name length", "256"],
        ),
        (
            "name length max",
            |m| m.entry(D, 1).name_len = u16::MAX,
            vec!["name length", "65535"],
        ),
        (
            "name with a slash",
            |m| m.rename_entry(ROOT, 0, b"/"),
            vec!["name", "/"],
        ),
        (
            "name with a NUL",
            |m| m.rename_entry(ROOT, 0, b"\0"),
            vec!["name"],
        ),
        (
            "name dot",
            |m| m.rename_entry(ROOT, 0, b"."),
            vec!["name", "\".\""],
        ),
        (
            "name dot dot",
            |m| m.rename_entry(D, 0, b".."),
            vec!["name", "\"..\""],
        ),
        (
            "name not UTF-8",
            |m| m.rename_entry(ROOT, 0, &[0xFF]),
            vec!["name", "UTF-8"],
        ),
        (
            "name taken",
            |m| m.rename_entry(ROOT, 1, b"a"),
            vec!["name", "\"a\""],
        ),
        (
            "entry count max",
            |m| m.dir(D).entry_count = u64::MAX,
            vec!["entry count", &max],
        ),
        (
            "entry count past the entries",
            // The next inode's number reads as a third cookie.
            |m| m.dir(D).entry_count = 3,
            vec!["directory 5", "entry cookie 6"],
        ),
        (
            "next cookie zero",
            |m| m.dir(D).next_cookie = 0,
            vec!["next cookie", "0"],
        ),
        (
            "next cookie past an off_t",
            |m| m.dir(D).next_cookie = u64::MAX,
            vec!["next cookie", &max],
        ),
        (
            "next cookie not above every cookie",
            |m| m.dir(ROOT).next_cookie = 4,
            vec!["cookie 4", "next cookie 4"],
        ),
        (
            "cookie zero",
            |m| m.entry(ROOT, 0).cookie = 0,
            vec!["cookie 0"],
        ),
        (
            "cookies out of order",
            |m| m.dir(D).entries.swap(0, 1),
            vec!["cookie 1", "after cookie 2"],
        ),
        (
            "cookies repeated",
            |m| m.entry(ROOT, 1).cookie = 1,
            vec!["cookie 1", "after cookie 1"],
        ),
        (
            "an entry of a missing inode",
            |m| m.entry(ROOT, 1).ino = 99,
            vec!["\"b\"", "inode 99", "not there"],
        ),
        (
            "an entry of the root",
            |m| m.entry(D, 0).ino = ROOT,
            vec!["\"l\"", "root"],
        ),
        (
            "a directory named twice",
            |m| m.add_entry(ROOT, b"d2", D),
            vec!["directory 5", "named twice"],
        ),
        (
            "an inode named by no directory",
            |m| {
                m.dir(ROOT).entries.remove(2);
                m.dir(ROOT).entry_count = 3;
            },
            vec!["inode 4", "named by no directory"],
        ),
        (
            "a cycle cut off from the root",
            |m| {
                // d leaves the root and names itself.
                m.dir(ROOT).entries.remove(3);
                m.dir(ROOT).entry_count = 3;
                m.inode(ROOT).nlink = 2;
                m.add_entry(D, b"self", D);
                m.inode(D).nlink = 3;
            },
            vec!["directory 5", "not reachable"],
        ),
        (
            "no root",
            |m| {
                m.inodes.remove(0);
                m.inode_count -= 1;
            },
            vec!["no root directory"],
        ),
        (
            "a root that is not a directory",
            |m| {
                m.inodes[0].kind = 3;
                m.inodes[0].body = Body::Symlink {
                    target_len: 1,
                    target: b"x".to_vec(),
                };
            },
            vec!["root", "not a directory"],
        ),
        (
            "target length zero",
            |m| {
                m.inode(LINK).body = Body::Symlink {
                    target_len: 0,
                    target: Vec::new(),
                }
            },
            vec!["target length", "0"],
        ),
        (
            "target length 4096",
            |m| {
                m.inode(LINK).body = Body::Symlink {
                    target_len: 4096,
                    target: vec![b'x'; 4096],
                }
            },
            vec!["target length", "4096"],
        ),
        (
            "target length max",
            |m| {
                m.inode(LINK).body = Body::Symlink {
                    target_len: u16::MAX,
                    target: b"../a".to_vec(),
                }
            },
            vec!["target length", "65535"],
        ),
        (
            "target not UTF-8",
            |m| {
                m.inode(LINK).body = Body::Symlink {
                    target_len: 1,
                    target: vec![0xFF],
                }
            },
            vec!["target", "UTF-8"],
        ),
        (
            "target with a NUL",
            |m| {
                m.inode(LINK).body = Body::Symlink {
                    target_len: 2,
                    target: b"a\0".to_vec(),
                }
            },
            vec!["target", "NUL"],
        ),
        (
            "run count max",
            |m| m.file(A).run_count = u64::MAX,
            vec!["run count", &max],
        ),
        (
            "run count past the runs",
            // 183 bytes follow it: at most 7 runs.
            |m| m.file(EMPTY).run_count = 8,
            vec!["file 4", "run count 8"],
        ),
        (
            "run length zero",
            |m| m.file(A).runs[0].2 = 0,
            vec!["length", "0"],
        ),
        (
            "run length max",
            |m| m.file(A).runs[0].2 = u64::MAX,
            vec!["logical block", &max],
        ),
        (
            "run logical block max",
            |m| m.file(A).runs[0].0 = u64::MAX,
            vec!["logical block", &max],
        ),
        (
            "run in the superblocks",
            |m| m.file(A).runs[0].1 = 0,
            vec!["physical block", "0"],
        ),
        (
            "run in a metadata area",
            |m| m.file(A).runs[0].1 = DATA_START - 1,
            vec!["physical block", "5"],
        ),
        (
            "run past the device",
            |m| m.file(A).runs[0].1 = DEVICE_BLOCKS - 2,
            vec!["physical block", "254"],
        ),
        (
            "run physical block max",
            |m| m.file(A).runs[0].1 = u64::MAX,
            vec!["physical block", &max],
        ),
        (
            "runs overlapping",
            |m| {
                let a = m.file(A);
                a.run_count = 2;
                a.runs.push((1, 100, 1));
            },
            vec!["runs", "overlap"],
        ),
        (
            "a block mapped twice",
            |m| m.file(B).runs[0].1 = m.file(A).runs[0].1 + 2,
            vec!["physical block", "twice"],
        ),
        (
            "bytes after the last inode",
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

/// A volume of format version 1 (a flat file table) is refused, saying so.
#[test]
fn a_volume_of_format_version_1_is_refused_as_predating_directories() {
    let device = device_with(&sample_image());
    let (slot, mut sb) = newest(device.as_ref());
    sb.version = 1;
    sb.write(device.as_ref(), slot);
    // The older slot too, or open would fall back to it.
    let mut older = Superblock::read(device.as_ref(), 1 - slot).unwrap();
    older.version = 1;
    older.write(device.as_ref(), 1 - slot);
    assert_open_fails(
        device,
        libc::EINVAL,
        &["format version 1", "directories", "version 2"],
        "version 1",
    );
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
