//! A model test of `filemap mount`: random operations through the kernel's
//! file API on files of a mounted image (buffered `pread`/`pwrite`, loads and
//! stores through a shared map, `ftruncate`, `fallocate` punch, zero range and
//! allocate, `O_DIRECT` reads and writes, syncs, closes and reopens), each
//! checked against an in-memory model of every file, as a local file system
//! would answer them: the bytes a read returns, the size, and right after every
//! change the changed range through another descriptor and through the map.
//! At the end the image is unmounted, mounted again and every file compared
//! with the model.
//!
//! A fixed seed and a few thousand operations run with the test suite.
//! `FILEMAP_MOUNT_MODEL_SEEDS` (seeds separated by commas) and
//! `FILEMAP_MOUNT_MODEL_OPS` (operations per seed) make it a long run; a
//! failure names its seed and operation, and lists the operations before it.

mod support;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::map::Map;
use support::{install_sigbus_report, Image, Note, Rng};

const PAGE: u64 = 4096;
/// Files of the model.
const FILES: usize = 3;
/// Offsets are drawn below this; the files stay below `MAP_LEN`.
const SPAN: u64 = 1 << 20;
/// The window every file is mapped with, from offset 0. Only the part inside
/// the file's size is touched (past its last page a touch raises SIGBUS).
const MAP_LEN: usize = 4 << 20;
/// The seed and length of the run in the test suite.
const DEFAULT_SEED: u64 = 0x6d6f_6465_6c31;
const DEFAULT_OPS: u64 = 5000;
/// Every this many operations, one file is compared whole through `pread`
/// and through its map.
const WHOLE_CHECK_EVERY: u64 = 64;
/// Operations listed with a failure.
const HISTORY: usize = 24;
/// A call into the mount that has not returned after this long is taken for a
/// hang: the server is killed, so the call fails and the test reports it.
const HANG: Duration = Duration::from_secs(120);

#[test]
fn random_operations_through_the_mount_match_a_model_and_survive_a_remount() {
    model_runs(&[]);
}

/// The same with the kernel's page cache in front of filemap's
/// (`filemap mount --kernel-cache`).
#[test]
fn random_operations_through_the_kernel_cache_match_a_model_and_survive_a_remount() {
    model_runs(&["--kernel-cache"]);
}

/// The model's runs, over the seeds and operations the environment asks for,
/// on mounts made with `options`.
fn model_runs(options: &[&str]) {
    let seeds = match std::env::var("FILEMAP_MOUNT_MODEL_SEEDS") {
        Ok(seeds) => seeds
            .split(',')
            .map(|seed| {
                let seed = seed.trim();
                match seed.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => seed.parse(),
                }
                .unwrap_or_else(|_| panic!("FILEMAP_MOUNT_MODEL_SEEDS: {seed:?} is not a seed"))
            })
            .collect(),
        Err(_) => vec![DEFAULT_SEED],
    };
    let ops = match std::env::var("FILEMAP_MOUNT_MODEL_OPS") {
        Ok(ops) => ops
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FILEMAP_MOUNT_MODEL_OPS: {ops:?} is not a number")),
        Err(_) => DEFAULT_OPS,
    };
    for seed in seeds {
        run_model(seed, ops, options);
    }
}

/// One seed's run: `ops` random operations on a fresh image, then a remount.
fn run_model(seed: u64, ops: u64, options: &[&str]) {
    install_sigbus_report();
    let image = Image::new("64M");
    let server = image.mount_with(options);
    let watchdog = Watchdog::start(server.pid());
    let mut run = Run {
        seed,
        ops,
        rng: Rng::new(seed),
        files: (0..FILES)
            .map(|i| ModelFile::create(&image.at(&format!("f{i}"))))
            .collect(),
        history: VecDeque::new(),
        note: Note::new(),
    };
    for n in 0..ops {
        let op = run.draw();
        run.begin(n, &op);
        let done = run.apply(&op);
        watchdog.progress();
        if let Err(error) = done {
            run.fail(n, &op, &error);
        }
        if n % WHOLE_CHECK_EVERY == WHOLE_CHECK_EVERY - 1 {
            let op = Op::Whole {
                file: (n / WHOLE_CHECK_EVERY) as usize % FILES,
            };
            run.begin(n, &op);
            if let Err(error) = run.apply(&op) {
                run.fail(n, &op, &error);
            }
        }
    }
    for file in 0..FILES {
        let op = Op::Whole { file };
        run.begin(ops, &op);
        if let Err(error) = run.apply(&op) {
            run.fail(ops, &op, &error);
        }
    }
    // Close everything (the map's stores are written back at its file's
    // last close at the latest), unmount, and read the files afresh.
    let models: Vec<Vec<u8>> = run.files.iter().map(|f| f.model.clone()).collect();
    for file in &mut run.files {
        file.close();
    }
    watchdog.stop();
    server.stop(Some("TERM"));
    let server = image.mount_with(options);
    for (i, model) in models.iter().enumerate() {
        let path = image.at(&format!("f{i}"));
        let read = std::fs::read(&path).unwrap_or_else(|error| {
            panic!("seed {seed:#x}: after the remount, {path} cannot be read: {error}")
        });
        if let Err(error) = compare(model, &read, 0, "after the remount, the file") {
            panic!(
                "seed {seed:#x}: f{i}: {error}\n{}",
                run.history_text(ops, &Op::Whole { file: i })
            );
        }
    }
    server.stop(None);
}

/// One operation of the model. Offsets and lengths are in bytes.
#[derive(Clone, Debug)]
enum Op {
    /// `pwrite` of `len` fresh bytes through the buffered descriptor.
    Write { file: usize, off: u64, len: u64 },
    /// `pread` through the buffered descriptor.
    Read { file: usize, off: u64, len: u64 },
    /// Loads through the map, inside the size.
    MapRead { file: usize, off: u64, len: u64 },
    /// Stores of fresh bytes through the map, inside the size.
    MapWrite { file: usize, off: u64, len: u64 },
    /// `ftruncate` through the buffered or the direct descriptor.
    Truncate {
        file: usize,
        size: u64,
        direct: bool,
    },
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    Punch { file: usize, off: u64, len: u64 },
    /// `fallocate(ZERO_RANGE)`, with `KEEP_SIZE` or without.
    Zero {
        file: usize,
        off: u64,
        len: u64,
        keep: bool,
    },
    /// `fallocate` mode 0 (the size grows to the end) or `KEEP_SIZE`.
    Allocate {
        file: usize,
        off: u64,
        len: u64,
        keep: bool,
    },
    /// `pwrite` through the `O_DIRECT` descriptor: offset, length and memory
    /// aligned to 4096.
    DirectWrite { file: usize, off: u64, len: u64 },
    /// `pread` through the `O_DIRECT` descriptor, aligned.
    DirectRead { file: usize, off: u64, len: u64 },
    /// An `O_DIRECT` read or write whose offset or length is not aligned:
    /// `EINVAL`, and nothing changes.
    Unaligned {
        file: usize,
        write: bool,
        off: u64,
        len: u64,
    },
    /// `fsync` or `fdatasync` of the buffered or the direct descriptor.
    Sync {
        file: usize,
        data: bool,
        direct: bool,
    },
    /// `msync(MS_SYNC)` of the whole map.
    Msync { file: usize },
    /// Close and open again what `what` says.
    Reopen { file: usize, what: Reopen },
    /// `fstat`: the size.
    Stat { file: usize },
    /// The whole file through `pread` and through the map.
    Whole { file: usize },
}

#[derive(Clone, Copy, Debug)]
enum Reopen {
    Buffered,
    Direct,
    /// The map, made again from the buffered descriptor or the direct one.
    Map {
        from_direct: bool,
    },
    /// Every descriptor and the map, so the file is closed in between.
    All {
        from_direct: bool,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |f: &mut fmt::Formatter<'_>, name: &str, file: usize, off: u64, len: u64| {
            write!(f, "f{file} {name} {off}+{len} (to {})", off + len)
        };
        match *self {
            Op::Write { file, off, len } => range(f, "pwrite", file, off, len),
            Op::Read { file, off, len } => range(f, "pread", file, off, len),
            Op::MapRead { file, off, len } => range(f, "map load", file, off, len),
            Op::MapWrite { file, off, len } => range(f, "map store", file, off, len),
            Op::Truncate { file, size, direct } => {
                write!(f, "f{file} ftruncate {size} (direct fd: {direct})")
            }
            Op::Punch { file, off, len } => range(f, "punch hole", file, off, len),
            Op::Zero {
                file,
                off,
                len,
                keep,
            } => {
                range(f, "zero range", file, off, len)?;
                write!(f, " keep size: {keep}")
            }
            Op::Allocate {
                file,
                off,
                len,
                keep,
            } => {
                range(f, "allocate", file, off, len)?;
                write!(f, " keep size: {keep}")
            }
            Op::DirectWrite { file, off, len } => range(f, "O_DIRECT pwrite", file, off, len),
            Op::DirectRead { file, off, len } => range(f, "O_DIRECT pread", file, off, len),
            Op::Unaligned {
                file,
                write,
                off,
                len,
            } => {
                let name = match write {
                    true => "unaligned O_DIRECT pwrite",
                    false => "unaligned O_DIRECT pread",
                };
                range(f, name, file, off, len)
            }
            Op::Sync { file, data, direct } => {
                let name = match data {
                    true => "fdatasync",
                    false => "fsync",
                };
                write!(f, "f{file} {name} (direct fd: {direct})")
            }
            Op::Msync { file } => write!(f, "f{file} msync"),
            Op::Reopen { file, what } => write!(f, "f{file} reopen {what:?}"),
            Op::Stat { file } => write!(f, "f{file} fstat"),
            Op::Whole { file } => write!(f, "f{file} whole file through pread and the map"),
        }
    }
}

/// A file of the mount, its descriptors, its map and its model.
struct ModelFile {
    path: String,
    /// What the file holds; its length is the file's size.
    model: Vec<u8>,
    buffered: Option<File>,
    direct: Option<File>,
    map: Option<Map>,
    /// The map was made from the direct descriptor.
    map_from_direct: bool,
}

impl ModelFile {
    fn create(path: &str) -> ModelFile {
        let mut file = ModelFile {
            path: path.to_owned(),
            model: Vec::new(),
            buffered: None,
            direct: None,
            map: None,
            map_from_direct: false,
        };
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap_or_else(|error| panic!("cannot create {path}: {error}"));
        file.open_all(false)
            .unwrap_or_else(|error| panic!("cannot open {path}: {error}"));
        file
    }

    fn open(&self, direct: bool) -> io::Result<File> {
        let flags = match direct {
            true => libc::O_DIRECT,
            false => 0,
        };
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(&self.path)
    }

    fn open_all(&mut self, map_from_direct: bool) -> io::Result<()> {
        self.buffered = Some(self.open(false)?);
        self.direct = Some(self.open(true)?);
        self.remap(map_from_direct)
    }

    fn remap(&mut self, from_direct: bool) -> io::Result<()> {
        self.map = None;
        let file = match from_direct {
            true => self.direct(),
            false => self.buffered(),
        };
        self.map = Some(Map::new(file, MAP_LEN, true)?);
        self.map_from_direct = from_direct;
        Ok(())
    }

    fn close(&mut self) {
        self.map = None;
        self.buffered = None;
        self.direct = None;
    }

    fn buffered(&self) -> &File {
        self.buffered.as_ref().expect("open")
    }

    fn direct(&self) -> &File {
        self.direct.as_ref().expect("open")
    }

    fn fd(&self, direct: bool) -> &File {
        match direct {
            true => self.direct(),
            false => self.buffered(),
        }
    }

    fn map(&self) -> &Map {
        self.map.as_ref().expect("mapped")
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn map_kind(&self) -> &'static str {
        match self.map_from_direct {
            true => " (made from the O_DIRECT descriptor)",
            false => "",
        }
    }

    /// The model after a size change: cut, or grown with zeroes.
    fn resize(&mut self, size: u64) {
        self.model.resize(size as usize, 0);
    }

    /// The model after zeroing `[off, off + len)`, inside the size.
    fn zero(&mut self, off: u64, len: u64) {
        let size = self.size();
        let (start, end) = (off.min(size), (off + len).min(size));
        self.model[start as usize..end as usize].fill(0);
    }

    /// The model after writing `data` at `off` (grown as needed).
    fn write(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        if end > self.size() {
            self.resize(end);
        }
        self.model[off as usize..end as usize].copy_from_slice(data);
    }

    /// The file's size as `fstat` says, against the model.
    fn check_size(&self) -> Result<(), String> {
        let size = self
            .buffered()
            .metadata()
            .map_err(|error| format!("fstat failed: {error}"))?
            .len();
        match size == self.size() {
            true => Ok(()),
            false => Err(format!(
                "fstat says the size is {size}, the model {}",
                self.size()
            )),
        }
    }

    /// `[start, end)`, cut at the size, through `pread` on the buffered
    /// descriptor and through the map, against the model; and the rest of the
    /// last page past the size reads zero through the map.
    fn check_range(&self, start: u64, end: u64, what: &str) -> Result<(), String> {
        let size = self.size();
        let (start, end) = (start.min(size), end.min(size));
        if start < end {
            let mut buf = vec![0; (end - start) as usize];
            let n = self
                .buffered()
                .read_at(&mut buf, start)
                .map_err(|error| format!("{what}: pread {start}+{} failed: {error}", buf.len()))?;
            compare(
                &self.model[start as usize..end as usize],
                &buf[..n],
                start,
                &format!("{what}: pread"),
            )?;
            let map_end = end.min(MAP_LEN as u64);
            if start < map_end {
                let mut buf = vec![0; (map_end - start) as usize];
                self.map().load(start as usize, &mut buf);
                compare(
                    &self.model[start as usize..map_end as usize],
                    &buf,
                    start,
                    &format!("{what}: the map{}", self.map_kind()),
                )?;
            }
        }
        // The last page's bytes past the size: zero through a map.
        let tail_end = size.next_multiple_of(PAGE).min(MAP_LEN as u64);
        if size < tail_end && end + PAGE >= size {
            let mut buf = vec![0; (tail_end - size) as usize];
            self.map().load(size as usize, &mut buf);
            compare(
                &vec![0; buf.len()],
                &buf,
                size,
                &format!(
                    "{what}: the map{} past the end of file (in its last page)",
                    self.map_kind()
                ),
            )?;
        }
        Ok(())
    }
}

/// `got` (read at `off`) against `want`: the first run of differing bytes,
/// how many differ, and a short count.
fn compare(want: &[u8], got: &[u8], off: u64, what: &str) -> Result<(), String> {
    let Some(first) = want.iter().zip(got).position(|(w, g)| w != g) else {
        return match got.len() == want.len() {
            true => Ok(()),
            false => Err(format!(
                "{what} at {off}: {} bytes where the model has {}",
                got.len(),
                want.len()
            )),
        };
    };
    let run = want[first..]
        .iter()
        .zip(&got[first..])
        .take_while(|(w, g)| w != g)
        .count();
    let differ = want.iter().zip(got).filter(|(w, g)| w != g).count();
    let zeroes = got[first..first + run].iter().all(|&b| b == 0);
    let show = |bytes: &[u8]| {
        bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let at = off + first as u64;
    Err(format!(
        "{what} at {off}+{}: {differ} bytes differ from the model{}; the first run is \
         {at}..{} (page {} offset {}), {run} bytes{}: want [{}], got [{}]",
        want.len(),
        match got.len() == want.len() {
            true => String::new(),
            false => format!(" (and {} bytes came for {})", got.len(), want.len()),
        },
        at + run as u64,
        at / PAGE,
        at % PAGE,
        match zeroes {
            true => ", all read as zero",
            false => "",
        },
        show(&want[first..]),
        show(&got[first..]),
    ))
}

/// A buffer whose start is aligned to 4096, for `O_DIRECT`.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0; len + PAGE as usize];
        let start = raw.as_ptr().align_offset(PAGE as usize);
        Aligned { raw, start, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// `fallocate(2)` on `file`.
fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate reads no memory of ours; the descriptor is open while
    // `file` lives.
    let done = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    match done {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The state of one seed's run.
struct Run {
    seed: u64,
    ops: u64,
    rng: Rng,
    files: Vec<ModelFile>,
    history: VecDeque<(u64, String)>,
    note: Note,
}

impl Run {
    /// An offset: anywhere, at a page boundary give or take a little, near
    /// the end of file, or inside the file.
    fn offset(&mut self, size: u64) -> u64 {
        let rng = &mut self.rng;
        match rng.below(4) {
            0 => rng.below(SPAN),
            1 => (rng.below(SPAN / PAGE) * PAGE + rng.below(129)).saturating_sub(64),
            2 => (size + rng.below(6 * PAGE))
                .saturating_sub(3 * PAGE)
                .min(SPAN),
            _ => rng.below(size.max(1)),
        }
    }

    /// A length: a few bytes, about a page, a few pages, or up to 192 KiB.
    fn length(&mut self) -> u64 {
        let rng = &mut self.rng;
        match rng.below(4) {
            0 => rng.within(1, 64),
            1 => rng.within(PAGE - 64, PAGE + 65),
            2 => rng.within(1, 4 * PAGE),
            _ => rng.within(1, 192 << 10),
        }
    }

    /// A page-aligned offset, anywhere or near the end of file.
    fn aligned_offset(&mut self, size: u64) -> u64 {
        let pages = match self.rng.below(2) {
            0 => self.rng.below(SPAN / PAGE),
            _ => (size / PAGE + self.rng.below(5)).saturating_sub(2),
        };
        pages.min(SPAN / PAGE) * PAGE
    }

    /// An offset and length inside the size (which is not 0).
    fn inside(&mut self, size: u64) -> (u64, u64) {
        let off = match self.rng.below(3) {
            0 => (self.rng.below(size.div_ceil(PAGE)) * PAGE + self.rng.below(129))
                .saturating_sub(64)
                .min(size - 1),
            _ => self.rng.below(size),
        };
        let len = self.length().min(size - off);
        (off, len)
    }

    fn draw(&mut self) -> Op {
        let file = self.rng.below(FILES as u64) as usize;
        let size = self.files[file].size();
        loop {
            let op = match self.rng.below(100) {
                0..14 => Op::Write {
                    file,
                    off: self.offset(size),
                    len: self.length(),
                },
                14..25 => Op::Read {
                    file,
                    off: self.offset(size),
                    len: self.length(),
                },
                25..37 if size > 0 => {
                    let (off, len) = self.inside(size);
                    Op::MapRead { file, off, len }
                }
                37..49 if size > 0 => {
                    let (off, len) = self.inside(size);
                    Op::MapWrite { file, off, len }
                }
                49..55 => Op::Truncate {
                    file,
                    size: match self.rng.below(3) {
                        0 => self.rng.below(size + 1),
                        1 => size + self.rng.below(3 * PAGE),
                        _ => self.rng.below(SPAN + (256 << 10)),
                    },
                    direct: self.rng.one_in(2),
                },
                55..62 => Op::Punch {
                    file,
                    off: self.offset(size),
                    len: self.length(),
                },
                62..68 => Op::Zero {
                    file,
                    off: self.offset(size),
                    len: self.length(),
                    keep: self.rng.one_in(2),
                },
                68..72 => Op::Allocate {
                    file,
                    off: self.offset(size),
                    len: self.length(),
                    keep: self.rng.one_in(2),
                },
                72..79 => Op::DirectWrite {
                    file,
                    off: self.aligned_offset(size),
                    len: self.rng.within(1, 65) * PAGE,
                },
                79..85 => Op::DirectRead {
                    file,
                    off: self.aligned_offset(size),
                    len: self.rng.within(1, 65) * PAGE,
                },
                85..88 => {
                    let write = size == 0 || self.rng.one_in(2);
                    // A read starts inside the file: at or past the end, a
                    // local file system answers 0 before it checks alignment.
                    let limit = match write {
                        true => SPAN,
                        false => size,
                    };
                    let base = self.rng.below(limit.div_ceil(PAGE)) * PAGE;
                    let (off, len) = match self.rng.below(3) {
                        // The offset is not aligned.
                        0 => (
                            (base + self.rng.within(1, PAGE)).min(limit - 1),
                            self.rng.within(1, 17) * PAGE,
                        ),
                        // The length is not; sometimes it is nearly what a
                        // FUSE request carries (1 MiB). A longer call the
                        // kernel splits into requests, and the server sees
                        // only its aligned first part (see
                        // `an_unaligned_o_direct_call_longer_than_a_request_is_checked_per_request`).
                        1 => (base, self.rng.below(17) * PAGE + self.rng.within(1, PAGE)),
                        _ => (
                            base,
                            self.rng.within(200, 255) * PAGE + self.rng.within(1, PAGE),
                        ),
                    };
                    if off % PAGE == 0 && len % PAGE == 0 {
                        continue;
                    }
                    Op::Unaligned {
                        file,
                        write,
                        off,
                        len,
                    }
                }
                88..92 => Op::Sync {
                    file,
                    data: self.rng.one_in(2),
                    direct: self.rng.one_in(2),
                },
                92..94 => Op::Msync { file },
                94..97 => Op::Reopen {
                    file,
                    what: match self.rng.below(4) {
                        0 => Reopen::Buffered,
                        1 => Reopen::Direct,
                        2 => Reopen::Map {
                            from_direct: self.rng.one_in(3),
                        },
                        _ => Reopen::All {
                            from_direct: self.rng.one_in(3),
                        },
                    },
                },
                97..100 => Op::Stat { file },
                _ => continue,
            };
            return op;
        }
    }

    /// Notes `op` as operation `n`: in the history, and for a SIGBUS report.
    fn begin(&mut self, n: u64, op: &Op) {
        self.history.push_back((n, op.to_string()));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let text = format!(
            "mount model: seed {}, operation {n}: {op}\n{}",
            self.seed,
            self.history_text(n, op)
        );
        self.note.set(text);
    }

    /// The last operations and how to replay the run.
    fn history_text(&self, n: u64, op: &Op) -> String {
        let mut text = String::from("the last operations:\n");
        for (i, done) in &self.history {
            text += &format!("  #{i} {done}\n");
        }
        text += &format!(
            "failed at #{n} ({op}); replay with FILEMAP_MOUNT_MODEL_SEEDS={:#x} \
             FILEMAP_MOUNT_MODEL_OPS={} cargo test --release -p filemap-cli --test mount_model\n",
            self.seed,
            (n + 1).min(self.ops)
        );
        text
    }

    fn fail(&self, n: u64, op: &Op, error: &str) -> ! {
        panic!(
            "mount model: seed {:#x}, operation {n}: {op}: {error}\n{}",
            self.seed,
            self.history_text(n, op)
        );
    }

    /// Bytes for a write.
    fn data(&mut self, len: u64) -> Vec<u8> {
        let mut data = vec![0; len as usize];
        self.rng.fill_nonzero(&mut data);
        data
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let failed = |call: &str, error: io::Error| format!("{call} failed: {error}");
        match *op {
            Op::Write { file, off, len } => {
                let data = self.data(len);
                let f = &mut self.files[file];
                let n = f
                    .buffered()
                    .write_at(&data, off)
                    .map_err(|e| failed("pwrite", e))?;
                if n != data.len() {
                    return Err(format!("pwrite wrote {n} bytes of {len}"));
                }
                let old = f.size();
                f.write(off, &data);
                f.check_size()?;
                f.check_range(off.min(old), off + len, "after the pwrite")
            }
            Op::Read { file, off, len } => {
                let f = &self.files[file];
                let mut buf = vec![0; len as usize];
                let n = f
                    .buffered()
                    .read_at(&mut buf, off)
                    .map_err(|e| failed("pread", e))?;
                let (start, end) = (off.min(f.size()), (off + len).min(f.size()));
                compare(
                    &f.model[start as usize..end as usize],
                    &buf[..n],
                    off,
                    "pread",
                )
            }
            Op::MapRead { file, off, len } => {
                let f = &self.files[file];
                let mut buf = vec![0; len as usize];
                f.map().load(off as usize, &mut buf);
                compare(
                    &f.model[off as usize..(off + len) as usize],
                    &buf,
                    off,
                    "map load",
                )
            }
            Op::MapWrite { file, off, len } => {
                let data = self.data(len);
                let f = &mut self.files[file];
                f.map().store(off as usize, &data);
                f.write(off, &data);
                // A read sees a store at once.
                f.check_range(off, off + len, "after the map store")
            }
            Op::Truncate { file, size, direct } => {
                let f = &mut self.files[file];
                let old = f.size();
                f.fd(direct)
                    .set_len(size)
                    .map_err(|e| failed("ftruncate", e))?;
                f.resize(size);
                f.check_size()?;
                // The shrunk or grown part, and the page before it.
                let from = old.min(size).saturating_sub(PAGE);
                f.check_range(from, old.max(size), "after the ftruncate")
            }
            Op::Punch { file, off, len } => {
                let f = &mut self.files[file];
                let fd = f.fd(self.rng.one_in(2));
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                fallocate(fd, mode, off, len).map_err(|e| failed("fallocate", e))?;
                f.zero(off, len);
                f.check_size()?;
                f.check_range(
                    off.saturating_sub(PAGE),
                    off + len + PAGE,
                    "after the punch",
                )
            }
            Op::Zero {
                file,
                off,
                len,
                keep,
            } => {
                let f = &mut self.files[file];
                let fd = f.fd(self.rng.one_in(2));
                let mode = match keep {
                    true => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    false => libc::FALLOC_FL_ZERO_RANGE,
                };
                let old = f.size();
                fallocate(fd, mode, off, len).map_err(|e| failed("fallocate", e))?;
                if !keep && off + len > old {
                    f.resize(off + len);
                }
                f.zero(off, len);
                f.check_size()?;
                let from = off.min(old).saturating_sub(PAGE);
                f.check_range(from, off + len + PAGE, "after the zero range")
            }
            Op::Allocate {
                file,
                off,
                len,
                keep,
            } => {
                let f = &mut self.files[file];
                let fd = f.fd(self.rng.one_in(2));
                let mode = match keep {
                    true => libc::FALLOC_FL_KEEP_SIZE,
                    false => 0,
                };
                let old = f.size();
                fallocate(fd, mode, off, len).map_err(|e| failed("fallocate", e))?;
                if !keep && off + len > old {
                    f.resize(off + len);
                }
                f.check_size()?;
                f.check_range(old.saturating_sub(PAGE), off + len, "after the allocate")
            }
            Op::DirectWrite { file, off, len } => {
                let mut buf = Aligned::new(len as usize);
                self.rng.fill_nonzero(buf.bytes_mut());
                let f = &mut self.files[file];
                let n = f
                    .direct()
                    .write_at(buf.bytes(), off)
                    .map_err(|e| failed("O_DIRECT pwrite", e))?;
                if n as u64 != len {
                    return Err(format!("O_DIRECT pwrite wrote {n} bytes of {len}"));
                }
                let old = f.size();
                f.write(off, buf.bytes());
                f.check_size()?;
                f.check_range(off.min(old), off + len, "after the O_DIRECT pwrite")
            }
            Op::DirectRead { file, off, len } => {
                let f = &self.files[file];
                let mut buf = Aligned::new(len as usize);
                let n = f
                    .direct()
                    .read_at(buf.bytes_mut(), off)
                    .map_err(|e| failed("O_DIRECT pread", e))?;
                let (start, end) = (off.min(f.size()), (off + len).min(f.size()));
                compare(
                    &f.model[start as usize..end as usize],
                    &buf.bytes()[..n],
                    off,
                    "O_DIRECT pread",
                )
            }
            Op::Unaligned {
                file,
                write,
                off,
                len,
            } => {
                let f = &self.files[file];
                // Aligned memory: only the offset or the length is wrong.
                let mut buf = Aligned::new(len as usize);
                let done = match write {
                    true => {
                        buf.bytes_mut().fill(0xee);
                        f.direct().write_at(buf.bytes(), off)
                    }
                    false => f.direct().read_at(buf.bytes_mut(), off),
                };
                match done {
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(error) => {
                        return Err(format!("failed with {error}, not EINVAL"));
                    }
                    Ok(n) => {
                        // What the file holds now, against the unchanged model.
                        let now = f
                            .check_size()
                            .and_then(|()| f.check_range(off, off + len, "then"))
                            .err()
                            .unwrap_or_else(|| "the file is unchanged".to_owned());
                        return Err(format!(
                            "returned {n} instead of failing with EINVAL; {now}"
                        ));
                    }
                }
                f.check_size()?;
                f.check_range(off, off + len, "after the refused O_DIRECT call")
            }
            Op::Sync { file, data, direct } => {
                let fd = self.files[file].fd(direct);
                match data {
                    true => fd.sync_data().map_err(|e| failed("fdatasync", e)),
                    false => fd.sync_all().map_err(|e| failed("fsync", e)),
                }
            }
            Op::Msync { file } => self.files[file]
                .map()
                .sync()
                .map_err(|e| failed("msync", e)),
            Op::Reopen { file, what } => {
                let f = &mut self.files[file];
                match what {
                    // A map made from the closed descriptor keeps its file.
                    Reopen::Buffered => {
                        f.buffered = None;
                        f.buffered = Some(f.open(false).map_err(|e| failed("open", e))?);
                    }
                    Reopen::Direct => {
                        f.direct = None;
                        f.direct = Some(f.open(true).map_err(|e| failed("open O_DIRECT", e))?);
                    }
                    Reopen::Map { from_direct } => {
                        f.remap(from_direct).map_err(|e| failed("mmap", e))?
                    }
                    Reopen::All { from_direct } => {
                        f.close();
                        f.open_all(from_direct)
                            .map_err(|e| failed("open or mmap", e))?;
                    }
                }
                f.check_size()
            }
            Op::Stat { file } => self.files[file].check_size(),
            Op::Whole { file } => {
                let f = &self.files[file];
                f.check_size()?;
                f.check_range(0, f.size(), "the whole file")
            }
        }
    }
}

/// Kills the server if the run makes no progress for `HANG` (a hung call
/// into the mount then fails, and the run reports it with its seed).
struct Watchdog {
    shared: Arc<Watched>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Watched {
    progress: AtomicU64,
    stop: AtomicBool,
    pid: AtomicU32,
    stopped: Mutex<()>,
}

impl Watchdog {
    fn start(pid: u32) -> Watchdog {
        let shared = Arc::new(Watched {
            progress: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            pid: AtomicU32::new(pid),
            stopped: Mutex::new(()),
        });
        let watched = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = u64::MAX;
            let mut still = Duration::ZERO;
            let tick = Duration::from_millis(200);
            while !watched.stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                let now = watched.progress.load(Ordering::Relaxed);
                match now == seen {
                    true => still += tick,
                    false => (seen, still) = (now, Duration::ZERO),
                }
                if still >= HANG {
                    let _held = watched.stopped.lock();
                    if watched.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let pid = watched.pid.load(Ordering::Relaxed);
                    eprintln!(
                        "mount model: no operation finished for {HANG:?}: killing the server \
                         (pid {pid}) so the hung call fails"
                    );
                    // SAFETY: kill(2) on the server's pid, which is our child
                    // and not yet waited for (`stop` is set before it is).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                    return;
                }
            }
        });
        Watchdog {
            shared,
            thread: Some(thread),
        }
    }

    fn progress(&self) {
        self.shared.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        {
            let _held = self.shared.stopped.lock();
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.end();
    }
}

/// A shared map shows at once what another descriptor does to the file: a
/// punch, a zero range, an `O_DIRECT` write, a buffered write, a shrink (the
/// cut part of the last page reads zero) and a grow after it (the regrown part
/// reads zero), each checked through the map right after the call returns.
#[test]
fn a_shared_map_sees_at_once_what_another_descriptor_does() {
    install_sigbus_report();
    let image = Image::new("64M");
    let server = image.mount();
    let mut note = Note::new();
    let path = image.at("seen");
    let mut rng = Rng::new(7);
    let mut model = vec![0; 256 << 10];
    rng.fill_nonzero(&mut model);
    std::fs::write(&path, &model).expect("write the file");
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    let mapped = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let map = Map::new(&mapped, 512 << 10, true).expect("mmap");
    let check = |model: &[u8], note: &mut Note, step: &str| {
        note.set(format!("shared map test: {step}\n"));
        let mut seen = vec![0; model.len()];
        map.load(0, &mut seen);
        if let Err(error) = compare(model, &seen, 0, &format!("{step}: the map")) {
            panic!("{error}");
        }
    };
    // Every page in the kernel's cache first, so each change must drop or
    // update pages the map already shows.
    check(&model, &mut note, "before any change");

    fallocate(
        &writer,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5000,
        13000,
    )
    .expect("punch");
    model[5000..18000].fill(0);
    check(&model, &mut note, "after a punch of 5000+13000");

    fallocate(
        &writer,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        40000,
        100,
    )
    .expect("zero range");
    model[40000..40100].fill(0);
    check(&model, &mut note, "after a zero range of 40000+100");

    let mut data = Aligned::new(3 * PAGE as usize);
    rng.fill_nonzero(data.bytes_mut());
    assert_eq!(
        direct
            .write_at(data.bytes(), 16 * PAGE)
            .expect("O_DIRECT write"),
        data.bytes().len()
    );
    model[16 * PAGE as usize..19 * PAGE as usize].copy_from_slice(data.bytes());
    check(
        &model,
        &mut note,
        "after an O_DIRECT write of 3 pages at page 16",
    );

    let mut data = vec![0; 10000];
    rng.fill_nonzero(&mut data);
    writer.write_at(&data, 70000).expect("pwrite");
    model[70000..80000].copy_from_slice(&data);
    check(&model, &mut note, "after a pwrite of 70000+10000");

    writer.set_len(100_000).expect("shrink");
    model.truncate(100_000);
    // The rest of the last page reads zero.
    let tail = (100_000_u64.next_multiple_of(PAGE) - 100_000) as usize;
    let mut with_tail = model.clone();
    with_tail.resize(model.len() + tail, 0);
    check(&with_tail, &mut note, "after a shrink to 100000");

    writer.set_len(256 << 10).expect("grow");
    model.resize(256 << 10, 0);
    check(&model, &mut note, "after a grow back to 256 KiB");

    drop(map);
    drop((writer, direct, mapped));
    server.stop(None);
}

/// Found by the model: `fallocate(ZERO_RANGE | KEEP_SIZE)` reaching past the
/// end of file grew the file to the range's end.
#[test]
fn zero_range_with_keep_size_past_the_end_of_file_keeps_the_size() {
    let image = Image::new("16M");
    let server = image.mount();
    let path = image.at("kept");
    let mut data = vec![0; 8708];
    Rng::new(1).fill_nonzero(&mut data);
    std::fs::write(&path, &data).expect("write");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let keep = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // Wholly past the end, then from inside the file to past it.
    fallocate(&file, keep, 495_657, 33).expect("zero range past the end");
    assert_eq!(file.metadata().expect("fstat").len(), 8708, "the size");
    fallocate(&file, keep, 8000, 10_000).expect("zero range across the end");
    assert_eq!(file.metadata().expect("fstat").len(), 8708, "the size");
    data[8000..].fill(0);
    assert!(std::fs::read(&path).expect("read") == data, "the bytes");
    drop(file);
    server.stop(None);
}

/// Found by the model, and a limit of FUSE: the kernel splits an `O_DIRECT`
/// call into requests of at most 1 MiB before the server sees it, so an
/// unaligned call longer than that cannot fail whole as on a local file
/// system: its aligned first request is done, and the call returns that
/// part's length (a short count), the unaligned rest failing. What the mount
/// does guarantee, checked here: nothing past the returned count changes,
/// and a call of at most one request fails whole with `EINVAL`.
#[test]
fn an_unaligned_o_direct_call_longer_than_a_request_is_checked_per_request() {
    let image = Image::new("16M");
    let server = image.mount();
    let path = image.at("whole");
    let mut data = vec![0; 3 << 20];
    Rng::new(2).fill_nonzero(&mut data);
    std::fs::write(&path, &data).expect("write");
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    let request = 1 << 20;
    let mut buf = Aligned::new(request + 1);
    buf.bytes_mut().fill(0xee);
    // One request, unaligned: fails whole, changes nothing.
    let einval = |done: std::io::Result<usize>| done.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        einval(direct.write_at(&buf.bytes()[..request - 1], 0)),
        Some(libc::EINVAL)
    );
    assert!(
        std::fs::read(&path).expect("read") == data,
        "a refused write changed the file"
    );
    // Longer: at most the aligned first request, and nothing past it.
    let wrote = direct.write_at(buf.bytes(), 0);
    let done = match wrote {
        Ok(n) => n,
        Err(ref error) if error.raw_os_error() == Some(libc::EINVAL) => 0,
        Err(ref error) => panic!("an unaligned O_DIRECT write failed with {error}"),
    };
    assert!(done == 0 || done == request, "wrote {wrote:?}");
    let after = std::fs::read(&path).expect("read");
    assert!(after[..done].iter().all(|&b| b == 0xee), "the part done");
    assert!(
        after[done..] == data[done..],
        "changed past the count it returned"
    );
    let read = direct.read_at(buf.bytes_mut(), PAGE);
    let as_limited = match &read {
        Ok(n) => *n == request,
        Err(error) => error.raw_os_error() == Some(libc::EINVAL),
    };
    assert!(
        as_limited,
        "an unaligned O_DIRECT read of {} bytes returned {read:?}",
        request + 1
    );
    drop(direct);
    server.stop(None);
}

/// Found by the model: stores through a shared map of a file opened with
/// `O_DIRECT` were lost (the page written back in the end-of-file page is
/// shorter than a page, so the mount's direct write refused it): `msync`
/// failed with `EINVAL` and the file kept its old bytes.
#[test]
fn stores_through_a_map_of_an_o_direct_descriptor_reach_the_file() {
    let image = Image::new("16M");
    let server = image.mount();
    let path = image.at("mapped");
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("create O_DIRECT");
    direct.set_len(5000).expect("ftruncate");
    let map = Map::new(&direct, 2 * PAGE as usize, true).expect("mmap");
    map.store(100, b"first page");
    map.store(4500, b"last page");
    let synced = map.sync();
    drop(map);
    drop(direct);
    let mut want = vec![0; 5000];
    want[100..110].copy_from_slice(b"first page");
    want[4500..4509].copy_from_slice(b"last page");
    let got = std::fs::read(&path).expect("read");
    assert!(
        synced.is_ok() && got == want,
        "msync: {synced:?}; the file {}",
        compare(&want, &got, 0, "read back")
            .err()
            .unwrap_or_else(|| "holds the stores".to_owned())
    );
    server.stop(None);
}
