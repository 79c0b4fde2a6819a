//! The torture's workers: random operations on shared files, every read checked.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::backend::{BackendOp, FaultyBackend, HostFile};
use filemap::device::DeviceOp;
use filemap::fault::{Injection, Trigger};
use filemap::{
    Backend, Device, FaultRule, FaultyDevice, FileDevice, Mapping, MemDevice, PageCache, Volume,
    PAGE_SIZE,
};
use parking_lot::Mutex;

use crate::oracle::{classify, fill_page, Clock, History, Observed, Value, MAX_FILES, MAX_PAGES};
use crate::{BackendKind, DeviceSpec, Progress, TortureConfig, TortureReport, OP_KINDS};

const PAGE: u64 = PAGE_SIZE as u64;
/// The most pages one operation touches.
const MAX_OP_PAGES: u64 = 4;
/// How many violations and errors a report describes.
const MAX_EXAMPLES: usize = 10;

/// The operation mix: relative weights, in [`OP_KINDS`] order.
const WEIGHTS: [u32; OP_KINDS.len()] = [28, 20, 5, 8, 6, 3, 10, 10, 10];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Readahead,
    Punch,
    Zero,
    Truncate,
    ReadDirect,
    WriteDirect,
    Sync,
}

impl Op {
    const ALL: [Op; OP_KINDS.len()] = [
        Op::Read,
        Op::Write,
        Op::Readahead,
        Op::Punch,
        Op::Zero,
        Op::Truncate,
        Op::ReadDirect,
        Op::WriteDirect,
        Op::Sync,
    ];

    fn pick(rng: &mut fastrand::Rng) -> Op {
        let total: u32 = WEIGHTS.iter().sum();
        let mut roll = rng.u32(..total);
        for (op, weight) in Op::ALL.into_iter().zip(WEIGHTS) {
            if roll < weight {
                return op;
            }
            roll -= weight;
        }
        unreachable!("the roll is below the sum of the weights")
    }
}

/// What every worker shares.
struct Shared {
    config: TortureConfig,
    files: Vec<Arc<Mapping>>,
    history: History,
    clock: Clock,
    stop: AtomicBool,
    /// A lower bound of the start tick of each worker's operation in flight
    /// (`u64::MAX` when idle): history older than all of them can be forgotten.
    in_flight: Vec<AtomicU64>,
    ops: AtomicU64,
    reads_checked: AtomicU64,
    stale: AtomicU64,
    foreign: AtomicU64,
    torn: AtomicU64,
    errors: AtomicU64,
    examples: Mutex<Vec<String>>,
}

/// Runs the torture described by `config`, calling `progress` a few times a
/// second, and returns what the oracle found. Fails only if the run cannot be
/// set up (bad settings, a device that cannot be created).
pub fn run(
    config: &TortureConfig,
    mut progress: impl FnMut(&Progress),
) -> io::Result<TortureReport> {
    check_config(config)?;
    let files = open_backends(config)?;
    let cache = PageCache::builder()
        .strategy(config.strategy)
        .budget_bytes(config.cache_bytes)
        .build()?;
    let mappings = files
        .backends
        .iter()
        .map(|backend| {
            let mapping = cache.open(backend.clone())?;
            mapping.set_len(config.pages_per_file * PAGE)?;
            Ok(mapping)
        })
        .collect::<io::Result<Vec<_>>>()?;

    let shared = Shared {
        config: config.clone(),
        files: mappings,
        history: History::new(config.files, config.pages_per_file),
        clock: Clock::default(),
        stop: AtomicBool::new(false),
        in_flight: (0..config.threads)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        ops: AtomicU64::new(0),
        reads_checked: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        torn: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        examples: Mutex::new(Vec::new()),
    };

    let started = Instant::now();
    let deadline = Duration::from_secs_f64(config.seconds);
    let by_kind = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..config.threads)
            .map(|worker| {
                let shared = &shared;
                scope.spawn(move || shared.work(worker))
            })
            .collect();
        while !shared.stop.load(Ordering::Relaxed) {
            let elapsed = started.elapsed();
            if elapsed >= deadline {
                break;
            }
            std::thread::sleep((deadline - elapsed).min(Duration::from_millis(100)));
            progress(&Progress {
                elapsed: started.elapsed().as_secs_f64(),
                ops: shared.ops.load(Ordering::Relaxed),
                violations: shared.violations(),
            });
        }
        shared.stop.store(true, Ordering::Relaxed);
        let mut by_kind = [0u64; OP_KINDS.len()];
        for worker in workers {
            let counts = worker.join().expect("torture workers do not panic");
            for (total, count) in by_kind.iter_mut().zip(counts) {
                *total += count;
            }
        }
        by_kind
    });
    let seconds = started.elapsed().as_secs_f64();
    let ops = by_kind.iter().sum();
    Ok(TortureReport {
        strategy: config.strategy.name().to_owned(),
        backend: config.backend.name().to_owned(),
        ops,
        reads_checked: shared.reads_checked.load(Ordering::Relaxed),
        stale: shared.stale.load(Ordering::Relaxed),
        foreign: shared.foreign.load(Ordering::Relaxed),
        torn: shared.torn.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        ops_per_s: ops as f64 / seconds,
        seconds,
        by_kind: OP_KINDS
            .iter()
            .zip(by_kind)
            .map(|(kind, count)| (kind.to_string(), count))
            .collect(),
        injected: (files.injected)(),
        examples: shared.examples.into_inner(),
    })
}

fn check_config(config: &TortureConfig) -> io::Result<()> {
    let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    if config.threads == 0 {
        return invalid("--threads must be at least 1".into());
    }
    if config.files == 0 || config.files > MAX_FILES {
        return invalid(format!("--files must be 1 to {MAX_FILES}"));
    }
    if config.pages_per_file < 2 || config.pages_per_file > MAX_PAGES {
        return invalid(format!("--pages must be 2 to {MAX_PAGES}"));
    }
    if !(config.seconds.is_finite() && config.seconds >= 0.0) {
        return invalid("--seconds must be a number of seconds".into());
    }
    if config.delay_percent > 100 {
        return invalid("--delay-percent must be 0 to 100".into());
    }
    Ok(())
}

/// The files of a run, and how to count what was injected into them.
struct Files {
    backends: Vec<Arc<dyn Backend>>,
    injected: Box<dyn Fn() -> u64>,
    /// Keeps a temporary directory of host files alive for the run.
    _dir: Option<tempfile::TempDir>,
}

/// The delay the torture injects, when it fires.
fn delay(config: &TortureConfig) -> (Trigger, Injection) {
    (
        Trigger::Probability(config.delay_percent as f64 / 100.0),
        Injection::Delay {
            min: Duration::from_micros(config.max_delay_us / 10),
            max: Duration::from_micros(config.max_delay_us),
        },
    )
}

fn open_backends(config: &TortureConfig) -> io::Result<Files> {
    let (trigger, injection) = delay(config);
    match config.backend {
        BackendKind::Volume => {
            let faulty = Arc::new(FaultyDevice::new(open_device(config)?, config.seed));
            if config.delay_percent > 0 {
                for op in [DeviceOp::Read, DeviceOp::Write] {
                    faulty.add_rule(FaultRule::new(op, trigger, injection));
                }
            }
            let volume = Volume::format(faulty.clone())?;
            let backends = (0..config.files)
                .map(|i| {
                    let file = volume.create_file(&format!("file{i}"))?;
                    Ok(Arc::new(file) as Arc<dyn Backend>)
                })
                .collect::<io::Result<_>>()?;
            Ok(Files {
                backends,
                injected: Box::new(move || faulty.injected()),
                _dir: None,
            })
        }
        BackendKind::HostFile => {
            let (dir, path) = match &config.device {
                DeviceSpec::TempFile => {
                    let dir = tempfile::tempdir()?;
                    let path = dir.path().to_owned();
                    (Some(dir), path)
                }
                DeviceSpec::Path(path) => (None, path.clone()),
                DeviceSpec::Mem => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "--device mem is for the volume backend; host files need a directory",
                    ))
                }
            };
            let mut faulty = Vec::new();
            for i in 0..config.files {
                let file = HostFile::create(path.join(format!("file{i}")))?;
                let backend = Arc::new(FaultyBackend::new(Arc::new(file), config.seed ^ i as u64));
                if config.delay_percent > 0 {
                    for op in [
                        BackendOp::PunchHole,
                        BackendOp::ZeroRange,
                        BackendOp::SetLen,
                    ] {
                        backend.add_rule(FaultRule::new(op, trigger, injection));
                    }
                }
                faulty.push(backend);
            }
            let backends = faulty
                .iter()
                .map(|backend| backend.clone() as Arc<dyn Backend>)
                .collect();
            Ok(Files {
                backends,
                injected: Box::new(move || faulty.iter().map(|backend| backend.injected()).sum()),
                _dir: dir,
            })
        }
    }
}

fn open_device(config: &TortureConfig) -> io::Result<Arc<dyn Device>> {
    // Room for every page of every file twice over, plus the reserved block.
    let len = (config.files as u64 * config.pages_per_file * PAGE * 2 + (1 << 20)).max(16 << 20);
    Ok(match &config.device {
        DeviceSpec::Mem => Arc::new(MemDevice::new(len)),
        DeviceSpec::TempFile => {
            // Unlinked at once: the image disappears when the run ends, however it ends.
            let file = tempfile::tempfile()?;
            file.set_len(len)?;
            Arc::new(FileDevice::from_file(file)?)
        }
        DeviceSpec::Path(path) => {
            use std::os::unix::fs::FileTypeExt;
            let is_block_device =
                std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
            if is_block_device {
                let device = FileDevice::open(path)?;
                if device.len() < len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{} holds {} bytes; the torture needs {len}",
                            path.display(),
                            device.len()
                        ),
                    ));
                }
                Arc::new(device)
            } else {
                Arc::new(FileDevice::create(path, len)?)
            }
        }
    })
}

/// A buffer whose start is aligned for direct I/O.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + PAGE_SIZE];
        let start = bytes.as_ptr().align_offset(PAGE_SIZE);
        AlignedBuf { bytes, start }
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

impl Shared {
    fn violations(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
            + self.foreign.load(Ordering::Relaxed)
            + self.torn.load(Ordering::Relaxed)
    }

    fn example(&self, text: String) {
        let mut examples = self.examples.lock();
        if examples.len() < MAX_EXAMPLES {
            examples.push(text);
        }
    }

    /// The oldest tick a read in flight may have started at.
    fn horizon(&self) -> u64 {
        // Read the clock before the slots: a worker whose slot is still idle here
        // will publish a tick at least this large before it starts.
        let now = self.clock.tick();
        self.in_flight
            .iter()
            .map(|slot| slot.load(Ordering::SeqCst))
            .fold(now, u64::min)
    }

    /// Marks `worker` busy and returns its operation's start tick.
    fn begin(&self, worker: usize) -> u64 {
        let floor = self.clock.tick();
        self.in_flight[worker].store(floor, Ordering::SeqCst);
        self.clock.tick()
    }

    fn finish(&self, worker: usize) {
        self.in_flight[worker].store(u64::MAX, Ordering::SeqCst);
    }

    /// Records that the operation starting at `start` sets pages `pages` of
    /// `file` to `value` (`None`: each page its own stamp of `start`).
    fn begin_changes(&self, file: usize, pages: std::ops::Range<u64>, zero: bool, start: u64) {
        let value = if zero { Value::Zero } else { Value::Seq(start) };
        for page in pages {
            self.history.page(file, page).lock().begin(value, start);
        }
    }

    fn end_changes(&self, file: usize, pages: std::ops::Range<u64>, start: u64) {
        let end = self.clock.tick();
        let horizon = self.horizon();
        for page in pages {
            self.history
                .page(file, page)
                .lock()
                .end(start, end, horizon);
        }
    }

    /// Checks every whole page of `data`, read from page `first` of `file` over
    /// ticks `start..end`.
    fn check(&self, file: usize, first: u64, data: &[u8], start: u64, end: u64, kind: &str) {
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let index = first + i as u64;
            self.reads_checked.fetch_add(1, Ordering::Relaxed);
            let counter = match classify(page, file, index) {
                Observed::Value(value) => {
                    if self
                        .history
                        .page(file, index)
                        .lock()
                        .allows(value, start, end)
                    {
                        continue;
                    }
                    self.example(format!(
                        "stale: {kind} of file {file} page {index} over ticks {start}..{end} returned {value:?}, replaced before the read began"
                    ));
                    &self.stale
                }
                Observed::Torn => {
                    self.example(format!(
                        "torn: {kind} of file {file} page {index} mixed versions"
                    ));
                    &self.torn
                }
                Observed::Foreign { file: other, page } => {
                    self.example(format!(
                        "foreign: {kind} of file {file} page {index} returned data of file {other:?} page {page}"
                    ));
                    &self.foreign
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if self.config.stop_on_violation {
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }

    fn error(&self, kind: &str, file: usize, error: io::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.example(format!("error: {kind} of file {file}: {error}"));
    }

    /// One worker's loop; returns how many operations of each kind it completed.
    fn work(&self, worker: usize) -> [u64; OP_KINDS.len()] {
        let config = &self.config;
        let mut rng = fastrand::Rng::with_seed(
            config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ worker as u64,
        );
        let mut counts = [0u64; OP_KINDS.len()];
        let mut direct = AlignedBuf::new(MAX_OP_PAGES as usize * PAGE_SIZE);
        let mut buffer = vec![0u8; MAX_OP_PAGES as usize * PAGE_SIZE];
        while !self.stop.load(Ordering::Relaxed) {
            let op = Op::pick(&mut rng);
            let file = rng.usize(..config.files);
            let first = rng.u64(..config.pages_per_file);
            let count = rng.u64(1..=MAX_OP_PAGES).min(config.pages_per_file - first);
            let pages = first..first + count;
            let (offset, len) = (first * PAGE, count * PAGE);
            let mapping = &self.files[file];
            let kind = OP_KINDS[op as usize];
            let start = self.begin(worker);
            let result = match op {
                Op::Read => {
                    let buf = &mut buffer[..len as usize];
                    mapping.read_at(buf, offset).map(|n| {
                        let end = self.clock.tick();
                        self.check(file, first, &buf[..n], start, end, kind);
                    })
                }
                Op::ReadDirect => {
                    let buf = direct.slice(len as usize);
                    mapping.read_direct(buf, offset).map(|n| {
                        let end = self.clock.tick();
                        self.check(file, first, &buf[..n], start, end, kind);
                    })
                }
                Op::Write | Op::WriteDirect => {
                    let buf = if op == Op::Write {
                        &mut buffer[..len as usize]
                    } else {
                        direct.slice(len as usize)
                    };
                    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        fill_page(page, file, first + i as u64, start);
                    }
                    self.begin_changes(file, pages.clone(), false, start);
                    let result = if op == Op::Write {
                        mapping.write_all_at(buf, offset)
                    } else {
                        mapping.write_direct(buf, offset).map(drop)
                    };
                    self.end_changes(file, pages, start);
                    result
                }
                Op::Punch | Op::Zero => {
                    self.begin_changes(file, pages.clone(), true, start);
                    let result = if op == Op::Punch {
                        mapping.punch_hole(offset, len)
                    } else {
                        mapping.zero_range(offset, len)
                    };
                    self.end_changes(file, pages, start);
                    result
                }
                Op::Truncate => {
                    let keep = rng.u64(config.pages_per_file / 2..=config.pages_per_file);
                    let gone = keep..config.pages_per_file;
                    self.begin_changes(file, gone.clone(), true, start);
                    let result = mapping.set_len(keep * PAGE);
                    self.end_changes(file, gone, start);
                    result
                }
                Op::Readahead => mapping.readahead(offset, len),
                Op::Sync => {
                    if rng.u8(..4) == 0 {
                        mapping.sync_all()
                    } else {
                        mapping.sync_range(offset, len)
                    }
                }
            };
            self.finish(worker);
            if let Err(error) = result {
                self.error(kind, file, error);
            }
            counts[op as usize] += 1;
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
        counts
    }
}
