//! Crash safety of the persistent `Volume`: a process that stops at any device
//! write leaves a volume that opens, is consistent (no block in two files, none
//! both free and used), and in which every file reads, page by page, as of its
//! last completed sync or newer (C3 and durability across crashes).
//!
//! Each case is a random sequence of operations on a few files (writes, punch,
//! zero, truncate and grow, collapse, insert, create, remove, file and volume
//! syncs), run once to count its device writes, then again on a `FaultyDevice`
//! that discards every write from a random n-th on: the process "stops" during
//! the operation that issued write n, and the test stops there too. The volume is
//! then reopened from the memory device below and compared with a model that
//! knows, per page, every value a crash may show:
//!
//! - the last completed commit (a sync, a collapse or an insert that returned
//!   before the crash): its file names and sizes exactly, and per page the value
//!   it had then or any value written to it since (punch, zero and truncate
//!   count as writing zeroes), or
//! - if the operation the crash hit commits, exactly the state after it (its
//!   superblock may have reached the device).
//!
//! Once per sequence the test carries on from a crashed volume with a new
//! sequence and crashes it again, so the state `Volume::open` rebuilds (which
//! blocks are free, which a crash could bring back) is checked too.
//!
//! `FILEMAP_CRASH_POINTS` sets the number of crash points (default 4,000) and
//! `FILEMAP_CRASH_SEED` the first seed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::{index_of, pages_to_cover, start_of, PAGE, PAGE_SIZE};
use filemap::{Backend, Device, FaultRule, FaultyDevice, MemDevice, Volume, VolumeFile};

const DEVICE_BYTES: u64 = 4 << 20;
const MAX_PAGES: u64 = 24;
const NAMES: [&str; 4] = ["f0", "f1", "f2", "f3"];
const CRASHES_PER_SEQUENCE: u64 = 4;

/// One operation; files are numbered in order of creation.
#[derive(Clone, Debug)]
enum Op {
    Create { name: usize },
    Remove { file: usize },
    Write { file: usize, page: u64, pages: u64 },
    Punch { file: usize, offset: u64, len: u64 },
    Zero { file: usize, offset: u64, len: u64 },
    SetLen { file: usize, len: u64 },
    Collapse { file: usize, page: u64, pages: u64 },
    Insert { file: usize, page: u64, pages: u64 },
    SyncFile { file: usize },
    SyncVolume,
}

impl Op {
    /// Whether the operation commits the volume's metadata.
    fn commits(&self) -> bool {
        matches!(
            self,
            Op::SyncFile { .. } | Op::SyncVolume | Op::Collapse { .. } | Op::Insert { .. }
        )
    }
}

/// A random valid sequence of 20 to 60 operations on a volume that holds the
/// files `initial` (name, size), numbered in that order.
fn generate(rng: &mut fastrand::Rng, initial: &[(usize, u64)]) -> Vec<Op> {
    // Per file created so far: its name and its size, None once removed.
    let mut files: Vec<(usize, Option<u64>)> = initial
        .iter()
        .map(|&(name, size)| (name, Some(size)))
        .collect();
    let mut ops = Vec::new();
    let count = rng.usize(20..=60);
    while ops.len() < count {
        let live: Vec<usize> = (0..files.len()).filter(|&f| files[f].1.is_some()).collect();
        let kind = rng.u32(0..100);
        if live.is_empty() || (kind < 6 && live.len() < NAMES.len()) {
            let taken: BTreeSet<usize> = live.iter().map(|&f| files[f].0).collect();
            let free: Vec<usize> = (0..NAMES.len()).filter(|n| !taken.contains(n)).collect();
            let name = free[rng.usize(..free.len())];
            files.push((name, Some(0)));
            ops.push(Op::Create { name });
            continue;
        }
        let file = live[rng.usize(..live.len())];
        let size = files[file].1.expect("live");
        let pages = pages_to_cover(size);
        let op = match kind {
            0..=9 => Op::Remove { file },
            10..=44 if pages > 0 => {
                let page = rng.u64(0..pages);
                Op::Write {
                    file,
                    page,
                    pages: rng.u64(1..=(pages - page).min(4)),
                }
            }
            45..=52 => Op::Punch {
                file,
                offset: rng.u64(0..=size + PAGE),
                len: rng.u64(1..=4 * PAGE),
            },
            53..=58 => Op::Zero {
                file,
                offset: rng.u64(0..=size + PAGE),
                len: rng.u64(1..=4 * PAGE),
            },
            59..=68 => {
                let len = rng.u64(0..=MAX_PAGES * PAGE);
                Op::SetLen {
                    file,
                    len: if rng.bool() { len / PAGE * PAGE } else { len },
                }
            }
            69..=73 if pages >= 2 => {
                // The range must end before the end of file.
                let page = rng.u64(0..pages - 1);
                let last = index_of(size - 1);
                Op::Collapse {
                    file,
                    page,
                    pages: rng.u64(1..=(last - page).min(3)),
                }
            }
            74..=78 if pages >= 1 && pages + 3 <= MAX_PAGES => Op::Insert {
                file,
                page: rng.u64(0..pages),
                pages: rng.u64(1..=3),
            },
            79..=92 => Op::SyncFile { file },
            93..=99 => Op::SyncVolume,
            _ => Op::SetLen {
                file,
                len: rng.u64(1..=MAX_PAGES) * PAGE,
            },
        };
        // Track sizes as the volume will.
        let slot = &mut files[file].1;
        match op {
            Op::Remove { .. } => *slot = None,
            Op::SetLen { len, .. } => *slot = Some(len),
            Op::Collapse { pages, .. } => *slot = Some(size - pages * PAGE),
            Op::Insert { pages, .. } => *slot = Some(size + pages * PAGE),
            _ => {}
        }
        ops.push(op);
    }
    ops
}

/// One file as the model knows it.
struct ModelFile {
    name: String,
    /// The current bytes (the length is the size).
    data: Vec<u8>,
    /// None once removed.
    handle: Option<VolumeFile>,
    /// The size at the last completed commit, if the file was in it.
    committed_size: Option<u64>,
    /// Per page of the committed file: every value a crash may show.
    acceptable: Vec<HashSet<Vec<u8>>>,
}

impl ModelFile {
    /// Page `page` as the device holds it: zeroes past the end of file.
    fn image(&self, page: u64) -> Vec<u8> {
        let start = (start_of(page) as usize).min(self.data.len());
        let end = (start_of(page + 1) as usize).min(self.data.len());
        let mut image = self.data[start..end].to_vec();
        image.resize(PAGE_SIZE, 0);
        image
    }

    fn handle(&self) -> &VolumeFile {
        self.handle.as_ref().expect("operations name live files")
    }
}

#[derive(Default)]
struct Model {
    files: Vec<ModelFile>,
    /// The names at the last completed commit, and the file each named.
    committed_names: BTreeMap<String, usize>,
    /// Write stamps, so every write has different bytes.
    writes: u64,
}

impl Model {
    /// The model of a volume just opened: its files as they are, committed.
    fn adopt(volume: &Arc<Volume>) -> Model {
        let mut model = Model::default();
        for name in volume.file_names() {
            let handle = volume.open_file(&name).unwrap();
            let size = handle.len().unwrap();
            let mut data = vec![0; (size.div_ceil(PAGE) * PAGE) as usize];
            handle.read_pages(0, &mut data).unwrap();
            data.truncate(size as usize);
            model.files.push(ModelFile {
                name,
                data,
                handle: Some(handle),
                committed_size: None,
                acceptable: Vec::new(),
            });
        }
        model.commit();
        model
    }

    /// The live files as `generate` takes them: name index and size.
    fn files(&self) -> Vec<(usize, u64)> {
        self.files
            .iter()
            .filter(|m| m.handle.is_some())
            .map(|m| {
                let name = NAMES
                    .iter()
                    .position(|&n| n == m.name)
                    .expect("a known name");
                (name, m.data.len() as u64)
            })
            .collect()
    }

    /// Runs `op` on `volume` and on the model.
    fn apply(&mut self, volume: &Arc<Volume>, op: &Op) {
        match *op {
            Op::Create { name } => {
                let handle = volume.create_file(NAMES[name]).unwrap();
                self.files.push(ModelFile {
                    name: NAMES[name].to_owned(),
                    data: Vec::new(),
                    handle: Some(handle),
                    committed_size: None,
                    acceptable: Vec::new(),
                });
            }
            Op::Remove { file } => {
                let handle = self.files[file].handle.take().expect("live");
                handle.remove().unwrap();
            }
            Op::Write { file, page, pages } => {
                self.writes += 1;
                let stamp = (file as u64) << 48 | self.writes << 16;
                let buf: Vec<u8> = (page..page + pages)
                    .flat_map(|p| {
                        let word = (stamp | p).to_le_bytes();
                        word.repeat(PAGE_SIZE / 8)
                    })
                    .collect();
                let model = &mut self.files[file];
                model.handle().write_pages(page, &buf).unwrap();
                let start = start_of(page) as usize;
                let end = (start + buf.len()).min(model.data.len());
                model.data[start..end].copy_from_slice(&buf[..end - start]);
            }
            Op::Punch { file, offset, len } | Op::Zero { file, offset, len } => {
                let model = &mut self.files[file];
                if matches!(op, Op::Punch { .. }) {
                    model.handle().punch_hole(offset, len).unwrap();
                } else {
                    model.handle().zero_range(offset, len).unwrap();
                }
                let size = model.data.len() as u64;
                let (start, end) = (offset.min(size), (offset + len).min(size));
                model.data[start as usize..end as usize].fill(0);
            }
            Op::SetLen { file, len } => {
                let model = &mut self.files[file];
                model.handle().set_len(len).unwrap();
                model.data.resize(len as usize, 0);
            }
            Op::Collapse { file, page, pages } => {
                let model = &mut self.files[file];
                model
                    .handle()
                    .collapse_range(start_of(page), pages * PAGE)
                    .unwrap();
                model
                    .data
                    .drain(start_of(page) as usize..start_of(page + pages) as usize);
            }
            Op::Insert { file, page, pages } => {
                let model = &mut self.files[file];
                model
                    .handle()
                    .insert_range(start_of(page), pages * PAGE)
                    .unwrap();
                let at = start_of(page) as usize;
                model
                    .data
                    .splice(at..at, std::iter::repeat_n(0, (pages * PAGE) as usize));
            }
            Op::SyncFile { file } => self.files[file].handle().sync().unwrap(),
            Op::SyncVolume => volume.sync().unwrap(),
        }
        // Whatever a live file holds now may be on the device for its committed
        // pages: in-place overwrites and zeroing reach the committed blocks.
        for model in self.files.iter_mut().filter(|m| m.handle.is_some()) {
            if let Some(size) = model.committed_size {
                for page in 0..pages_to_cover(size) {
                    let image = model.image(page);
                    model.acceptable[page as usize].insert(image);
                }
            }
        }
    }

    /// The commit of the volume as it is now completed.
    fn commit(&mut self) {
        self.committed_names.clear();
        for (index, model) in self.files.iter_mut().enumerate() {
            if model.handle.is_none() {
                model.committed_size = None;
                model.acceptable.clear();
                continue;
            }
            let size = model.data.len() as u64;
            model.committed_size = Some(size);
            model.acceptable = (0..pages_to_cover(size))
                .map(|page| HashSet::from([model.image(page)]))
                .collect();
            self.committed_names.insert(model.name.clone(), index);
        }
    }

    /// Ok if `volume` holds the last completed commit, each page as it was then
    /// or as any later write of it.
    fn check_committed(&self, volume: &Arc<Volume>) -> Result<(), String> {
        let names: Vec<&String> = self.committed_names.keys().collect();
        if volume.file_names().iter().collect::<Vec<_>>() != names {
            return Err(format!(
                "names {:?}, committed {names:?}",
                volume.file_names()
            ));
        }
        for (name, &index) in &self.committed_names {
            let model = &self.files[index];
            let size = model.committed_size.expect("committed");
            let file = volume.open_file(name).unwrap();
            let len = file.len().unwrap();
            if len != size {
                return Err(format!("{name}: size {len}, committed {size}"));
            }
            for page in 0..pages_to_cover(size) {
                let mut buf = vec![0xA5; PAGE_SIZE];
                file.read_pages(page, &mut buf).unwrap();
                // Bytes past the committed end of file read as zero.
                let valid = (size - start_of(page)).min(PAGE) as usize;
                let fits = model.acceptable[page as usize].iter().any(|image| {
                    image[..valid] == buf[..valid] && buf[valid..].iter().all(|&b| b == 0)
                });
                if !fits {
                    return Err(format!(
                        "{name} page {page}: read {}, acceptable {:?}",
                        describe(&buf),
                        model.acceptable[page as usize]
                            .iter()
                            .map(|image| describe(image))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ok if `volume` holds exactly the model's current files and bytes.
    fn check_current(&self, volume: &Arc<Volume>) -> Result<(), String> {
        let live: BTreeMap<&String, &ModelFile> = self
            .files
            .iter()
            .filter(|m| m.handle.is_some())
            .map(|m| (&m.name, m))
            .collect();
        if volume.file_names().iter().collect::<Vec<_>>()
            != live.keys().copied().collect::<Vec<_>>()
        {
            return Err(format!("names {:?}", volume.file_names()));
        }
        for (name, model) in live {
            let file = volume.open_file(name).unwrap();
            if file.len().unwrap() != model.data.len() as u64 {
                return Err(format!("{name}: size {}", file.len().unwrap()));
            }
            for page in 0..pages_to_cover(model.data.len() as u64) {
                let mut buf = vec![0xA5; PAGE_SIZE];
                file.read_pages(page, &mut buf).unwrap();
                if buf != model.image(page) {
                    return Err(format!("{name} page {page}: read {}", describe(&buf)));
                }
            }
        }
        Ok(())
    }
}

/// A page in a few words: its distinct 8-byte stamps.
fn describe(page: &[u8]) -> String {
    let stamps: BTreeSet<u64> = page
        .chunks(8)
        .map(|word| u64::from_le_bytes(word.try_into().unwrap()))
        .collect();
    let shown: Vec<String> = stamps.iter().take(4).map(|s| format!("{s:#x}")).collect();
    format!("[{}]", shown.join(" "))
}

/// How a crash run ended.
enum Crash {
    /// The device writes the sequence issued, when run without a crash.
    NotReached(u64),
    /// The volume reopened as the last completed commit (`new_commit`: or as
    /// the commit the crash interrupted, which had reached the device).
    Survived {
        new_commit: bool,
        /// Whether the crash hit an operation that commits.
        during_commit: bool,
        /// The device after the crash.
        image: Vec<u8>,
        /// The reopened volume's files, as `generate` takes them.
        files: Vec<(usize, u64)>,
    },
}

/// Runs `ops` on a new volume, or on the volume in the device image `start`,
/// crashing at device write `crash_at` if given, and checks the reopened volume.
fn run(start: Option<&[u8]>, ops: &[Op], crash_at: Option<u64>, seed: u64) -> Crash {
    let memory = Arc::new(MemDevice::new(DEVICE_BYTES));
    let faulty = Arc::new(FaultyDevice::new(memory.clone(), seed));
    let (volume, mut model) = match start {
        None => {
            let mut model = Model::default();
            model.commit(); // format commits an empty volume
            (Volume::format(faulty.clone()).unwrap(), model)
        }
        Some(image) => {
            memory.write_all_at(image, 0).unwrap();
            let volume = Volume::open(faulty.clone()).unwrap();
            let model = Model::adopt(&volume);
            (volume, model)
        }
    };
    faulty.add_rule(match crash_at {
        Some(n) => FaultRule::new(DeviceOp::Write, Trigger::FromNth(n), Injection::Discard),
        // A delay of nothing counts every write.
        None => FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Delay {
                min: Duration::ZERO,
                max: Duration::ZERO,
            },
        ),
    });
    for (step, op) in ops.iter().enumerate() {
        model.apply(&volume, op);
        let crashed = crash_at.is_some() && faulty.injected() > 0;
        if !crashed {
            if op.commits() {
                model.commit();
            }
            continue;
        }
        // A restart finds only the device's bytes: the crashed volume, still
        // alive here, holds the device's claim, so reopen a copy of them.
        let mut image = vec![0; DEVICE_BYTES as usize];
        memory.read_exact_at(&mut image, 0).unwrap();
        let restarted = Arc::new(MemDevice::new(DEVICE_BYTES));
        restarted.write_all_at(&image, 0).unwrap();
        let reopened = Volume::open(restarted).unwrap_or_else(|error| {
            panic!("seed {seed} crash at write {crash_at:?} in step {step} {op:?}: open: {error}")
        });
        reopened.check_invariants();
        let outcome = match model.check_committed(&reopened) {
            Ok(()) => Ok(false),
            Err(old) if op.commits() => model
                .check_current(&reopened)
                .map(|()| true)
                .map_err(|new| format!("not the last commit: {old}; nor the new one: {new}")),
            Err(old) => Err(old),
        };
        return match outcome {
            Ok(new_commit) => {
                Crash::Survived {
                    new_commit,
                    during_commit: op.commits(),
                    image,
                    files: Model::adopt(&reopened).files(),
                }
            }
            Err(why) => panic!(
                "seed {seed}, crash at write {crash_at:?} during step {step} {op:?}: {why}\nops: {:#?}",
                &ops[..=step]
            ),
        };
    }
    assert!(
        crash_at.is_none(),
        "seed {seed}: write {crash_at:?} never came"
    );
    Crash::NotReached(faulty.injected())
}

#[test]
fn every_crash_point_reopens_consistent_and_as_of_the_last_sync_or_newer() {
    let points: u64 = std::env::var("FILEMAP_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let first_seed: u64 = std::env::var("FILEMAP_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let start = Instant::now();
    let (mut crashes, mut second_crashes) = (0u64, 0u64);
    let (mut in_commits, mut new_commits) = (0u64, 0u64);
    let mut seed = first_seed;
    while crashes < points {
        let mut rng = fastrand::Rng::with_seed(seed);
        let ops = generate(&mut rng, &[]);
        let Crash::NotReached(writes) = run(None, &ops, None, seed) else {
            unreachable!("no crash without a crash point")
        };
        for round in 0..CRASHES_PER_SEQUENCE {
            if writes == 0 || crashes >= points {
                break;
            }
            let crash_at = rng.u64(1..=writes);
            let Crash::Survived {
                new_commit,
                during_commit,
                image,
                files,
            } = run(None, &ops, Some(crash_at), seed)
            else {
                unreachable!("the crash point is reached")
            };
            crashes += 1;
            new_commits += u64::from(new_commit);
            in_commits += u64::from(during_commit);
            // Once per sequence, carry on from the crashed volume and crash
            // again: the reopened volume must protect its blocks as well.
            if round > 0 || crashes >= points {
                continue;
            }
            let again = generate(&mut rng, &files);
            let Crash::NotReached(writes) = run(Some(&image), &again, None, seed) else {
                unreachable!("no crash without a crash point")
            };
            if writes > 0 {
                let crash_at = rng.u64(1..=writes);
                if let Crash::Survived { during_commit, .. } =
                    run(Some(&image), &again, Some(crash_at), seed)
                {
                    in_commits += u64::from(during_commit);
                }
                crashes += 1;
                second_crashes += 1;
            }
        }
        seed += 1;
    }
    eprintln!(
        "{crashes} crash points ({second_crashes} in a reopened volume, {in_commits} during \
         a sync, collapse or insert) over seeds {first_seed}..{seed} in {:.1?}; \
         {new_commits} reopened as the commit the crash interrupted",
        start.elapsed()
    );
}
