//! Crash safety of the persistent `Volume`: a process that stops at any device
//! write leaves a volume that opens, is consistent (no block in two files, none
//! both free and used), and whose namespace and files are as of its last
//! completed sync, each file page by page as of then or newer (C3 and
//! durability across crashes).
//!
//! Each case is a random sequence of operations (writes, punch, zero, truncate
//! and grow, collapse, insert, create, remove, file and volume syncs; and on
//! the namespace mkdir, rmdir, hard links, unlink, symbolic links, rename and
//! rename exchange, with files whose last name goes while they are open kept
//! and written as orphans until they are closed), run once to count its device
//! writes, then again on a `FaultyDevice` that discards every write from a
//! random n-th on: the process "stops" during the operation that issued write
//! n, and the test stops there too. The volume is then reopened from the
//! memory device below and compared with a model that knows, per page, every
//! value a crash may show:
//!
//! - the last completed commit (a sync, a collapse or an insert that returned
//!   before the crash): its paths, their kinds, symbolic link targets, which
//!   paths name the same file, and file sizes exactly (orphans are gone), and
//!   per page the value it had then or any value written to it since (punch,
//!   zero and truncate count as writing zeroes), or
//! - if the operation the crash hit commits, exactly the state after it (its
//!   superblock may have reached the device).
//!
//! Once per sequence the test carries on from a crashed volume with a new
//! sequence and crashes it again, so the state `Volume::open` rebuilds (which
//! blocks are free, which a crash could bring back) is checked too.
//!
//! `FILEMAP_CRASH_POINTS` sets the number of crash points (default 4,000) and
//! `FILEMAP_CRASH_SEED` the first seed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::{index_of, pages_to_cover, start_of, PAGE, PAGE_SIZE};
use filemap::{
    Backend, Device, FaultRule, FaultyDevice, FileKind, MemDevice, RenameFlags, Volume, VolumeFile,
};

const DEVICE_BYTES: u64 = 4 << 20;
const MAX_PAGES: u64 = 24;
/// The names of files and symbolic links, in any directory.
const NAMES: [&str; 4] = ["f0", "f1", "f2", "f3"];
/// The names of directories, in any directory but at most two deep.
const DIRS: [&str; 2] = ["d0", "d1"];
/// At most this many files live at once, orphans included.
const MAX_FILES: usize = 6;
const CRASHES_PER_SEQUENCE: u64 = 4;

/// One operation; files are numbered in order of creation, paths are
/// relative to the root ("d0/f1").
#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
    },
    /// `Backend::remove`: every name of the file goes, and the file.
    Remove {
        file: usize,
    },
    /// Drops the handle of an orphan, which frees it.
    Close {
        file: usize,
    },
    Write {
        file: usize,
        page: u64,
        pages: u64,
    },
    Punch {
        file: usize,
        offset: u64,
        len: u64,
    },
    Zero {
        file: usize,
        offset: u64,
        len: u64,
    },
    SetLen {
        file: usize,
        len: u64,
    },
    Collapse {
        file: usize,
        page: u64,
        pages: u64,
    },
    Insert {
        file: usize,
        page: u64,
        pages: u64,
    },
    SyncFile {
        file: usize,
    },
    SyncVolume,
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Link {
        file: usize,
        path: String,
    },
    Unlink {
        path: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    Rename {
        from: String,
        to: String,
        exchange: bool,
    },
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

/// What a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(usize),
    Dir,
    Symlink(String),
}

/// The namespace and the files' sizes, as the generator and the model track
/// them.
#[derive(Clone, Debug, Default)]
struct Shape {
    paths: BTreeMap<String, Node>,
    /// Per file: its size, None once it is gone (removed, or closed as an
    /// orphan).
    sizes: Vec<Option<u64>>,
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether `path` is `dir` or below it.
fn within(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

impl Shape {
    fn dirs(&self) -> Vec<String> {
        let mut dirs = vec![String::new()];
        dirs.extend(
            self.paths
                .iter()
                .filter(|(_, node)| **node == Node::Dir)
                .map(|(path, _)| path.clone()),
        );
        dirs
    }

    fn names(&self, file: usize) -> usize {
        self.paths
            .values()
            .filter(|node| **node == Node::File(file))
            .count()
    }

    fn live(&self) -> Vec<usize> {
        (0..self.sizes.len())
            .filter(|&f| self.sizes[f].is_some())
            .collect()
    }

    fn is_empty_dir(&self, path: &str) -> bool {
        self.paths.get(path) == Some(&Node::Dir)
            && !self
                .paths
                .keys()
                .any(|p| p.starts_with(&format!("{path}/")))
    }

    /// The paths `dir` and below, keyed by what follows `dir`.
    fn take_subtree(&mut self, dir: &str) -> Vec<(String, Node)> {
        let keys: Vec<String> = self
            .paths
            .keys()
            .filter(|p| within(p, dir))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|key| {
                let node = self.paths.remove(&key).unwrap();
                (key[dir.len()..].to_owned(), node)
            })
            .collect()
    }

    fn put_subtree(&mut self, dir: &str, subtree: Vec<(String, Node)>) {
        for (suffix, node) in subtree {
            self.paths.insert(format!("{dir}{suffix}"), node);
        }
    }

    /// Applies the namespace side of `op`: paths, new files, sizes of files
    /// that go.
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Create { path } => {
                self.paths
                    .insert(path.clone(), Node::File(self.sizes.len()));
                self.sizes.push(Some(0));
            }
            Op::Remove { file } => {
                self.paths.retain(|_, node| *node != Node::File(*file));
                self.sizes[*file] = None;
            }
            Op::Close { file } => self.sizes[*file] = None,
            Op::Mkdir { path } => {
                self.paths.insert(path.clone(), Node::Dir);
            }
            Op::Rmdir { path } | Op::Unlink { path } => {
                self.paths.remove(path);
            }
            Op::Link { file, path } => {
                self.paths.insert(path.clone(), Node::File(*file));
            }
            Op::Symlink { path, target } => {
                self.paths
                    .insert(path.clone(), Node::Symlink(target.clone()));
            }
            Op::Rename { from, to, exchange } => {
                let same = from == to
                    || matches!((&self.paths[from], self.paths.get(to)),
                        (Node::File(a), Some(Node::File(b))) if a == b);
                if same {
                    return;
                }
                let moved = self.take_subtree(from);
                let replaced = self.take_subtree(to);
                self.put_subtree(to, moved);
                if *exchange {
                    self.put_subtree(from, replaced);
                }
            }
            _ => {}
        }
        // A file's size as the volume will have it.
        match *op {
            Op::SetLen { file, len } => self.sizes[file] = Some(len),
            Op::Collapse { file, pages, .. } => {
                self.sizes[file] = self.sizes[file].map(|size| size - pages * PAGE);
            }
            Op::Insert { file, pages, .. } => {
                self.sizes[file] = self.sizes[file].map(|size| size + pages * PAGE);
            }
            _ => {}
        }
    }

    /// A random valid namespace operation, if one comes up.
    fn namespace_op(&self, rng: &mut fastrand::Rng) -> Option<Op> {
        let dirs = self.dirs();
        let dir = dirs[rng.usize(..dirs.len())].clone();
        let free = |rng: &mut fastrand::Rng, names: &[&str]| -> Option<String> {
            let free: Vec<String> = names
                .iter()
                .map(|name| join(&dir, name))
                .filter(|path| !self.paths.contains_key(path))
                .collect();
            pick(rng, &free)
        };
        let existing: Vec<String> = self.paths.keys().cloned().collect();
        match rng.u32(0..7) {
            0 if dir.matches('/').count() < 1 => free(rng, &DIRS).map(|path| Op::Mkdir { path }),
            1 => {
                let empty: Vec<String> = existing
                    .iter()
                    .filter(|p| self.is_empty_dir(p))
                    .cloned()
                    .collect();
                pick(rng, &empty).map(|path| Op::Rmdir { path })
            }
            2 => {
                let named: Vec<usize> = self
                    .live()
                    .into_iter()
                    .filter(|&f| self.names(f) > 0)
                    .collect();
                let file = pick(rng, &named)?;
                free(rng, &NAMES).map(|path| Op::Link { file, path })
            }
            3 => {
                let path = pick(rng, &existing)?;
                (self.paths[&path] != Node::Dir).then_some(Op::Unlink { path })
            }
            4 => free(rng, &NAMES).map(|path| Op::Symlink {
                path,
                target: format!("../t{}", rng.u32(0..1000)),
            }),
            _ => {
                let from = pick(rng, &existing)?;
                let exchange = rng.u32(0..4) == 0;
                let to = if exchange {
                    pick(rng, &existing)?
                } else {
                    let names = if self.paths[&from] == Node::Dir {
                        &DIRS[..]
                    } else {
                        &NAMES[..]
                    };
                    join(&dir, names[rng.usize(..names.len())])
                };
                let from_dir = self.paths[&from] == Node::Dir;
                let to_node = self.paths.get(&to);
                let to_dir = to_node == Some(&Node::Dir);
                // Never a directory below itself, nor deeper than two.
                if from_dir && within(parent_of(&to), &from) && from != to {
                    return None;
                }
                if to_dir && within(parent_of(&from), &to) && from != to {
                    return None;
                }
                let depth = |path: &str, under: &str| {
                    self.paths
                        .keys()
                        .filter(|p| within(p, path))
                        .map(|p| p[path.len()..].matches('/').count())
                        .max()
                        .unwrap_or(0)
                        + under.matches('/').count()
                        + usize::from(!under.is_empty())
                };
                if from_dir && depth(&from, parent_of(&to)) > 1 {
                    return None;
                }
                if exchange && to_dir && depth(&to, parent_of(&from)) > 1 {
                    return None;
                }
                if !exchange {
                    match to_node {
                        Some(Node::Dir) if !from_dir || !self.is_empty_dir(&to) => return None,
                        Some(_) if from_dir => return None,
                        _ => {}
                    }
                }
                Some(Op::Rename { from, to, exchange })
            }
        }
    }
}

/// A random one of `items`, if there is one.
fn pick<T: Clone>(rng: &mut fastrand::Rng, items: &[T]) -> Option<T> {
    (!items.is_empty()).then(|| items[rng.usize(..items.len())].clone())
}

/// A random valid sequence of 20 to 60 operations on a volume shaped as
/// `initial`.
fn generate(rng: &mut fastrand::Rng, initial: &Shape) -> Vec<Op> {
    let mut shape = initial.clone();
    let mut ops = Vec::new();
    let count = rng.usize(20..=60);
    while ops.len() < count {
        let live = shape.live();
        let kind = rng.u32(0..100);
        let orphans: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&f| shape.names(f) == 0)
            .collect();
        let op = if live.is_empty() || (kind < 6 && live.len() < MAX_FILES) {
            let dirs = shape.dirs();
            let dir = &dirs[rng.usize(..dirs.len())];
            let free: Vec<String> = NAMES
                .iter()
                .map(|name| join(dir, name))
                .filter(|path| !shape.paths.contains_key(path))
                .collect();
            // With every name of the chosen directory taken, unlink or
            // rename something instead.
            match pick(rng, &free) {
                Some(path) => Op::Create { path },
                None => match shape.namespace_op(rng) {
                    Some(op) => op,
                    None => continue,
                },
            }
        } else if kind < 30 {
            match shape.namespace_op(rng) {
                Some(op) => op,
                None => continue,
            }
        } else if kind < 33 && !orphans.is_empty() {
            Op::Close {
                file: orphans[rng.usize(..orphans.len())],
            }
        } else {
            let file = live[rng.usize(..live.len())];
            let size = shape.sizes[file].expect("live");
            let pages = pages_to_cover(size);
            match kind {
                30..=35 => Op::Remove { file },
                36..=55 if pages > 0 => {
                    let page = rng.u64(0..pages);
                    Op::Write {
                        file,
                        page,
                        pages: rng.u64(1..=(pages - page).min(4)),
                    }
                }
                56..=60 => Op::Punch {
                    file,
                    offset: rng.u64(0..=size + PAGE),
                    len: rng.u64(1..=4 * PAGE),
                },
                61..=64 => Op::Zero {
                    file,
                    offset: rng.u64(0..=size + PAGE),
                    len: rng.u64(1..=4 * PAGE),
                },
                65..=72 => {
                    let len = rng.u64(0..=MAX_PAGES * PAGE);
                    Op::SetLen {
                        file,
                        len: if rng.bool() { len / PAGE * PAGE } else { len },
                    }
                }
                73..=76 if pages >= 2 => {
                    // The range must end before the end of file.
                    let page = rng.u64(0..pages - 1);
                    let last = index_of(size - 1);
                    Op::Collapse {
                        file,
                        page,
                        pages: rng.u64(1..=(last - page).min(3)),
                    }
                }
                77..=80 if pages >= 1 && pages + 3 <= MAX_PAGES => Op::Insert {
                    file,
                    page: rng.u64(0..pages),
                    pages: rng.u64(1..=3),
                },
                81..=92 => Op::SyncFile { file },
                93..=99 => Op::SyncVolume,
                _ => Op::SetLen {
                    file,
                    len: rng.u64(1..=MAX_PAGES) * PAGE,
                },
            }
        };
        shape.apply(&op);
        ops.push(op);
    }
    ops
}

/// One file as the model knows it.
struct ModelFile {
    /// The current bytes (the length is the size).
    data: Vec<u8>,
    /// None once the file is gone.
    handle: Option<VolumeFile>,
    /// The size at the last completed commit, if the file was in it.
    committed_size: Option<u64>,
    /// Per page of the committed file: every value a crash may show.
    acceptable: Vec<HashSet<Vec<u8>>>,
}

impl ModelFile {
    fn new(data: Vec<u8>, handle: VolumeFile) -> ModelFile {
        ModelFile {
            data,
            handle: Some(handle),
            committed_size: None,
            acceptable: Vec::new(),
        }
    }

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

/// The parent directory's inode and the name of `path` in `volume`.
fn resolve<'p>(volume: &Volume, path: &'p str) -> (u64, &'p str) {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let mut ino = Volume::ROOT;
    for part in parent.split('/').filter(|part| !part.is_empty()) {
        ino = volume.lookup(ino, part).unwrap().ino;
    }
    (ino, name)
}

/// What `volume` holds at each path: for files their inode, for symbolic
/// links their target.
fn walk(volume: &Volume) -> BTreeMap<String, (FileKind, u64, String)> {
    let mut paths = BTreeMap::new();
    let mut stack = vec![(String::new(), Volume::ROOT)];
    while let Some((dir_path, dir)) = stack.pop() {
        for entry in volume.read_dir(dir, 0, usize::MAX).unwrap() {
            let path = join(&dir_path, &entry.name);
            let target = match entry.kind {
                FileKind::Symlink => volume.readlink(entry.ino).unwrap(),
                FileKind::Dir => {
                    stack.push((path.clone(), entry.ino));
                    String::new()
                }
                FileKind::File => String::new(),
            };
            paths.insert(path, (entry.kind, entry.ino, target));
        }
    }
    paths
}

/// Ok if `volume`'s namespace is `paths`: the same paths, kinds and targets,
/// and paths name the same inode exactly where they name the same model
/// file. Returns the inode of each model file named.
fn same_namespace(
    volume: &Volume,
    paths: &BTreeMap<String, Node>,
) -> Result<BTreeMap<usize, u64>, String> {
    let found = walk(volume);
    let shown = |paths: Vec<&String>| format!("{paths:?}");
    if found.keys().collect::<Vec<_>>() != paths.keys().collect::<Vec<_>>() {
        return Err(format!(
            "paths {}, expected {}",
            shown(found.keys().collect()),
            shown(paths.keys().collect())
        ));
    }
    let mut inodes: BTreeMap<usize, u64> = BTreeMap::new();
    let mut files: HashMap<u64, usize> = HashMap::new();
    for (path, node) in paths {
        let (kind, ino, target) = &found[path];
        match node {
            Node::Dir if *kind == FileKind::Dir => {}
            Node::Symlink(expected) if *kind == FileKind::Symlink && expected == target => {}
            Node::File(file) if *kind == FileKind::File => {
                let same_inode = *inodes.entry(*file).or_insert(*ino) == *ino;
                let same_file = *files.entry(*ino).or_insert(*file) == *file;
                if !same_inode || !same_file {
                    return Err(format!("{path}: inode {ino} is not model file {file}'s"));
                }
            }
            _ => return Err(format!("{path}: {kind:?} {target:?}, expected {node:?}")),
        }
    }
    Ok(inodes)
}

#[derive(Default)]
struct Model {
    files: Vec<ModelFile>,
    shape: Shape,
    /// The namespace at the last completed commit.
    committed: BTreeMap<String, Node>,
    /// Write stamps, so every write has different bytes.
    writes: u64,
}

impl Model {
    /// The model of a volume just opened: its namespace and files as they
    /// are, committed.
    fn adopt(volume: &Arc<Volume>) -> Model {
        let mut model = Model::default();
        let mut files: HashMap<u64, usize> = HashMap::new();
        for (path, (kind, ino, target)) in walk(volume) {
            let node = match kind {
                FileKind::Dir => Node::Dir,
                FileKind::Symlink => Node::Symlink(target),
                FileKind::File => Node::File(*files.entry(ino).or_insert_with(|| {
                    let handle = volume.open_ino(ino).unwrap();
                    let size = handle.len().unwrap();
                    let mut data = vec![0; (size.div_ceil(PAGE) * PAGE) as usize];
                    handle.read_pages(0, &mut data).unwrap();
                    data.truncate(size as usize);
                    model.shape.sizes.push(Some(size));
                    model.files.push(ModelFile::new(data, handle));
                    model.files.len() - 1
                })),
            };
            model.shape.paths.insert(path, node);
        }
        model.commit();
        model
    }

    /// Runs `op` on `volume` and on the model.
    fn apply(&mut self, volume: &Arc<Volume>, op: &Op) {
        let none = RenameFlags::default();
        match op {
            Op::Create { path } => {
                let (parent, name) = resolve(volume, path);
                let (_, handle) = volume.create(parent, name, 0o644, 0, 0).unwrap();
                self.files.push(ModelFile::new(Vec::new(), handle));
            }
            Op::Remove { file } => {
                let handle = self.files[*file].handle.take().expect("live");
                handle.remove().unwrap();
            }
            Op::Close { file } => drop(self.files[*file].handle.take().expect("live")),
            Op::Mkdir { path } => {
                let (parent, name) = resolve(volume, path);
                volume.mkdir(parent, name, 0o755, 0, 0).unwrap();
            }
            Op::Rmdir { path } => {
                let (parent, name) = resolve(volume, path);
                volume.rmdir(parent, name).unwrap();
            }
            Op::Link { file, path } => {
                let (parent, name) = resolve(volume, path);
                let ino = self.files[*file].handle().identity().unwrap().unwrap().file as u64;
                volume.link(ino, parent, name).unwrap();
            }
            Op::Unlink { path } => {
                let (parent, name) = resolve(volume, path);
                volume.unlink(parent, name).unwrap();
            }
            Op::Symlink { path, target } => {
                let (parent, name) = resolve(volume, path);
                volume.symlink(parent, name, target, 0, 0).unwrap();
            }
            Op::Rename { from, to, exchange } => {
                let (from_parent, from_name) = resolve(volume, from);
                let (to_parent, to_name) = resolve(volume, to);
                let flags = RenameFlags {
                    exchange: *exchange,
                    ..none
                };
                volume
                    .rename(from_parent, from_name, to_parent, to_name, flags)
                    .unwrap();
            }
            _ => self.apply_data(volume, op),
        }
        self.shape.apply(op);
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

    /// Runs a data operation on `volume` and on the model.
    fn apply_data(&mut self, volume: &Arc<Volume>, op: &Op) {
        match *op {
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
            _ => unreachable!("a namespace operation: {op:?}"),
        }
    }

    /// The commit of the volume as it is now completed: its namespace, and
    /// the files it names (orphans are not committed).
    fn commit(&mut self) {
        self.committed = self.shape.paths.clone();
        for (index, model) in self.files.iter_mut().enumerate() {
            if model.handle.is_none() || self.shape.names(index) == 0 {
                model.committed_size = None;
                model.acceptable.clear();
                continue;
            }
            let size = model.data.len() as u64;
            model.committed_size = Some(size);
            model.acceptable = (0..pages_to_cover(size))
                .map(|page| HashSet::from([model.image(page)]))
                .collect();
        }
    }

    /// Ok if `volume` holds the last completed commit, each page as it was then
    /// or as any later write of it.
    fn check_committed(&self, volume: &Arc<Volume>) -> Result<(), String> {
        let inodes = same_namespace(volume, &self.committed)?;
        for (&index, &ino) in &inodes {
            let model = &self.files[index];
            let size = model.committed_size.expect("committed");
            let file = volume.open_ino(ino).unwrap();
            let len = file.len().unwrap();
            if len != size {
                return Err(format!("file {index}: size {len}, committed {size}"));
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
                        "file {index} page {page}: read {}, acceptable {:?}",
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

    /// Ok if `volume` holds exactly the model's current namespace, files and
    /// bytes.
    fn check_current(&self, volume: &Arc<Volume>) -> Result<(), String> {
        let inodes = same_namespace(volume, &self.shape.paths)?;
        for (&index, &ino) in &inodes {
            let model = &self.files[index];
            let file = volume.open_ino(ino).unwrap();
            if file.len().unwrap() != model.data.len() as u64 {
                return Err(format!("file {index}: size {}", file.len().unwrap()));
            }
            for page in 0..pages_to_cover(model.data.len() as u64) {
                let mut buf = vec![0xA5; PAGE_SIZE];
                file.read_pages(page, &mut buf).unwrap();
                if buf != model.image(page) {
                    return Err(format!("file {index} page {page}: read {}", describe(&buf)));
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
        /// The reopened volume's namespace and files, as `generate` takes
        /// them.
        files: Shape,
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
                    files: Model::adopt(&reopened).shape,
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
        let ops = generate(&mut rng, &Shape::default());
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
