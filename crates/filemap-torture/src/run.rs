//! The torture's workers: random operations on shared files, every read checked.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use filemap::backend::{BackendOp, FaultyBackend, HostFile};
use filemap::device::DeviceOp;
use filemap::fault::{Injection, Trigger};
use filemap::page::{start_of, PAGE, PAGE_SIZE};
use filemap::{
    AlignedBuf, Backend, Device, FaultRule, FaultyDevice, FileDevice, MapAccess, MapRegion,
    Mapping, MemDevice, PageCache, Volume,
};
use parking_lot::Mutex;

use crate::async_ops::AsyncLibrary;
use crate::mount::{Mount, MountSettings};
use crate::oracle::{
    classify, fill_page, mixed_values, Clock, History, Observed, Value, MAX_FILES, MAX_PAGES,
};
use crate::peer::{PeerFiles, PeerOps};
use crate::vectored::{cut, cut_mut, random_cuts};
use crate::{
    naming, BackendKind, DeviceSpec, OpKind, Progress, Scenario, TortureConfig, TortureReport,
};

/// The most pages one operation touches.
pub(crate) const MAX_OP_PAGES: u64 = 4;
/// Pages past the checked ones that the self-map scenario uses as buffers.
const SCRATCH_PAGES: u64 = 2 * MAX_OP_PAGES;
/// How many violations and errors a report describes.
const MAX_EXAMPLES: usize = 10;

/// How many kinds of operation a worker counts.
const KINDS: usize = OpKind::ALL.len();

/// The operation mix: each kind's relative weight.
const fn weight(kind: OpKind) -> u32 {
    match kind {
        OpKind::Read => 24,
        OpKind::Write => 18,
        OpKind::Readahead => 5,
        OpKind::Punch => 8,
        OpKind::Zero => 6,
        OpKind::Truncate => 3,
        OpKind::ReadDirect => 9,
        OpKind::WriteDirect => 9,
        OpKind::Sync => 8,
        OpKind::Invalidate => 4,
        OpKind::MapRead => 14,
        OpKind::MapWrite => 6,
        OpKind::Pin => 6,
        OpKind::ReadVectored => 8,
        OpKind::WriteVectored => 6,
    }
}

/// Picks an operation kind at random by [`weight`], among those `allowed`.
fn pick(rng: &mut fastrand::Rng, allowed: impl Fn(OpKind) -> bool) -> OpKind {
    let weight_here = |kind: OpKind| match allowed(kind) {
        true => weight(kind),
        false => 0,
    };
    let total: u32 = OpKind::ALL.into_iter().map(weight_here).sum();
    let mut roll = rng.u32(..total);
    for kind in OpKind::ALL {
        if roll < weight_here(kind) {
            return kind;
        }
        roll -= weight_here(kind);
    }
    unreachable!("the roll is below the sum of the weights")
}

/// What every worker shares.
struct Shared {
    config: TortureConfig,
    files: Vec<Arc<Mapping>>,
    /// A read-write map of the first half of each file, which truncates never
    /// cut (so the maps never touch past the end of file).
    maps: Vec<MapRegion>,
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
    mixed_during_map_store: AtomicU64,
    mixed_in_kernel_cache: AtomicU64,
    map_stores_lost_by_kernel_fallocate: AtomicU64,
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
    config.check()?;
    let config = &config.effective();
    let files = open_backends(config)?;
    let mount = match &config.mount {
        Some(settings) => {
            let volume = files.volume.upgrade().expect("the files hold their volume");
            Some(Mount::new(volume, config, settings)?)
        }
        None => None,
    };
    let cache = match &mount {
        Some(mount) => mount.cache(),
        None => Arc::new(
            PageCache::builder()
                .strategy(config.strategy)
                .budget_bytes(config.cache_bytes)
                .build()
                .map_err(naming(format!("--cache-bytes {}", config.cache_bytes)))?,
        ),
    };
    let mappings = files
        .backends
        .iter()
        .map(|backend| {
            let mapping = cache.open(backend.clone())?;
            let scratch = match config.scenario {
                Scenario::Mixed | Scenario::Async => 0,
                Scenario::SelfMapDio => SCRATCH_PAGES,
            };
            mapping.set_len((config.pages_per_file + scratch) * PAGE)?;
            if config.peer.is_some() {
                // The size reaches the backend the peer reads; the mapping
                // caches nothing from here on.
                mapping.sync_all()?;
            }
            Ok(mapping)
        })
        .collect::<io::Result<Vec<_>>>()?;

    // Through a mount, each worker process maps the files itself.
    let maps = mappings
        .iter()
        .filter(|_| config.mount.is_none())
        .map(|mapping| match config.scenario {
            Scenario::Mixed | Scenario::Async => {
                let half = (config.pages_per_file / 2 * PAGE) as usize;
                mapping.map(0, half, MapAccess::ReadWrite)
            }
            // The scratch pages past the checked ones: the direct I/O buffers.
            Scenario::SelfMapDio => mapping.map(
                start_of(config.pages_per_file),
                SCRATCH_PAGES as usize * PAGE_SIZE,
                MapAccess::ReadWrite,
            ),
        })
        .collect::<io::Result<Vec<_>>>()?;
    let shared = Shared {
        config: config.clone(),
        files: mappings,
        maps,
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
        mixed_during_map_store: AtomicU64::new(0),
        mixed_in_kernel_cache: AtomicU64::new(0),
        map_stores_lost_by_kernel_fallocate: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        examples: Mutex::new(Vec::new()),
    };

    let peer = config.peer.map(|peer| {
        PeerFiles::new(
            peer,
            config.cache_bytes,
            &files.backends,
            config.pages_per_file,
        )
    });
    let mut processes = match (&mount, &config.mount) {
        (Some(mount), Some(settings)) => (0..config.threads)
            .map(|_| mount.worker(config, settings, &shared.files).map(Some))
            .collect::<io::Result<Vec<_>>>()?,
        _ => (0..config.threads).map(|_| None).collect(),
    };
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(config.seconds);
    let by_kind = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..config.threads)
            .zip(processes.iter_mut())
            .map(|(worker, process)| {
                let (shared, peer) = (&shared, &peer);
                scope.spawn(move || match (shared.config.scenario, process.take()) {
                    (Scenario::Mixed, Some(mut process)) => shared.work(worker, &mut process),
                    (Scenario::Mixed, None) => match peer {
                        Some(peer) => shared.work(worker, &mut PeerOps(peer)),
                        None => shared.work(worker, &mut Library::new(shared)),
                    },
                    (Scenario::SelfMapDio, _) => shared.work_self_map_dio(worker),
                    (Scenario::Async, _) => shared.work(
                        worker,
                        &mut AsyncLibrary::new(
                            &shared.files,
                            &shared.maps,
                            shared.config.seed ^ worker as u64,
                        ),
                    ),
                })
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
        let mut by_kind = [0u64; KINDS];
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
    let report = TortureReport {
        strategy: match config.peer {
            Some(peer) => peer.name(),
            None => config.strategy.name(),
        }
        .to_owned(),
        backend: config.backend.name().to_owned(),
        scenario: config.scenario.name().to_owned(),
        through: config
            .mount
            .as_ref()
            .map_or("library", MountSettings::name)
            .to_owned(),
        ops,
        reads_checked: shared.reads_checked.load(Ordering::Relaxed),
        stale: shared.stale.load(Ordering::Relaxed),
        foreign: shared.foreign.load(Ordering::Relaxed),
        torn: shared.torn.load(Ordering::Relaxed),
        mixed_during_map_store: shared.mixed_during_map_store.load(Ordering::Relaxed),
        mixed_in_kernel_cache: shared.mixed_in_kernel_cache.load(Ordering::Relaxed),
        map_stores_lost_by_kernel_fallocate: shared
            .map_stores_lost_by_kernel_fallocate
            .load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        ops_per_s: ops as f64 / seconds,
        seconds,
        by_kind: OpKind::ALL
            .into_iter()
            .zip(by_kind)
            .map(|(kind, count)| (kind.name().to_owned(), count))
            .collect(),
        injected: (files.injected)(),
        cache: cache.stats(),
        examples: std::mem::take(&mut *shared.examples.lock()),
    };
    // Wait for the volume to go, so that the next run can claim the same
    // device (if it does not, that claim fails loudly with EBUSY).
    let volume = files.volume.clone();
    if let Some(mount) = mount {
        // Every worker process has ended with its thread.
        mount
            .unmount()
            .map_err(naming("unmounting the run's volume"))?;
    }
    drop(shared);
    drop(files);
    drop(cache);
    crate::wait_until_dropped(&volume, Duration::from_secs(10));
    Ok(report)
}

/// The threads and files of the self-map scenario, whatever the settings say.
const SELF_MAP_DIO_THREADS: usize = 4;
const SELF_MAP_DIO_FILES: usize = 3;

impl TortureConfig {
    /// The settings the scenario runs with: the self-map scenario has its own
    /// threads and files.
    fn effective(&self) -> TortureConfig {
        match self.scenario {
            Scenario::Mixed | Scenario::Async => self.clone(),
            Scenario::SelfMapDio => TortureConfig {
                files: SELF_MAP_DIO_FILES,
                threads: SELF_MAP_DIO_THREADS,
                ..self.clone()
            },
        }
    }

    /// The smallest page cache budget the torture runs on: room for the pages
    /// of every worker's largest operation (`MAX_OP_PAGES`) at once. The
    /// cache makes progress on a single page, but below this its operations
    /// queue for pages of the budget instead of racing each other, which is
    /// what the torture is there for.
    pub fn min_cache_bytes(&self) -> u64 {
        (self.effective().threads as u64).saturating_mul(MAX_OP_PAGES * PAGE)
    }

    /// Checks the settings without running anything; [`run`] checks them
    /// first too. The error (`InvalidInput`) names the setting as the command
    /// line spells it, and what it accepts.
    pub fn check(&self) -> io::Result<()> {
        let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if self.threads == 0 {
            return invalid("--threads must be at least 1".into());
        }
        if self.files == 0 || self.files > MAX_FILES {
            return invalid(format!("--files must be 1 to {MAX_FILES}"));
        }
        if self.pages_per_file < 2 || self.pages_per_file > MAX_PAGES {
            return invalid(format!("--pages must be 2 to {MAX_PAGES}"));
        }
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return invalid("--seconds must be a number of seconds".into());
        }
        if self.delay_percent > 100 {
            return invalid("--delay-percent must be 0 to 100".into());
        }
        let min_cache_bytes = self.min_cache_bytes();
        if self.cache_bytes < min_cache_bytes {
            return invalid(format!(
                "--cache-bytes must be at least {min_cache_bytes} with {threads} threads \
                 (room for {MAX_OP_PAGES} pages, the largest operation, per thread); got {}",
                self.cache_bytes,
                threads = self.effective().threads,
            ));
        }
        if self.mount.is_some() && self.backend != BackendKind::Volume {
            return invalid("--mount mounts a volume: it needs --backend volume".into());
        }
        if self.mount.is_some() && self.scenario != Scenario::Mixed {
            return invalid(format!(
                "--mount runs the mixed scenario, not {}",
                self.scenario.name()
            ));
        }
        if self.peer.is_some() && (self.mount.is_some() || self.scenario != Scenario::Mixed) {
            return invalid(format!(
                "a peer cache runs the mixed scenario through the library, not {}",
                match self.mount {
                    Some(_) => "--mount".to_owned(),
                    None => format!("--scenario {}", self.scenario.name()),
                }
            ));
        }
        if self.backend == BackendKind::HostFile && self.device == DeviceSpec::Mem {
            return invalid(
                "--device mem is for the volume backend; host files need a directory".into(),
            );
        }
        Ok(())
    }
}

/// The files of a run, and how to count what was injected into them.
struct Files {
    backends: Vec<Arc<dyn Backend>>,
    injected: Box<dyn Fn() -> u64>,
    /// The volume the files live in (none for host files).
    volume: Weak<Volume>,
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
            let device = open_device(config).map_err(naming(device_name(&config.device)))?;
            let faulty = Arc::new(FaultyDevice::new(device, config.seed));
            if config.delay_percent > 0 {
                for op in [DeviceOp::Read, DeviceOp::Write] {
                    faulty.add_rule(FaultRule::new(op, trigger, injection));
                }
            }
            let volume =
                Volume::format(faulty.clone()).map_err(naming(device_name(&config.device)))?;
            let backends = (0..config.files)
                .map(|i| {
                    let file = volume.create_file(&format!("file{i}"))?;
                    Ok(Arc::new(file) as Arc<dyn Backend>)
                })
                .collect::<io::Result<_>>()?;
            Ok(Files {
                backends,
                injected: Box::new(move || faulty.injected()),
                volume: Arc::downgrade(&volume),
                _dir: None,
            })
        }
        BackendKind::HostFile => {
            let (dir, path) = match &config.device {
                DeviceSpec::TempFile => {
                    let dir = tempfile::tempdir().map_err(naming(device_name(&config.device)))?;
                    let path = dir.path().to_owned();
                    (Some(dir), path)
                }
                DeviceSpec::Path(path) => (None, path.clone()),
                DeviceSpec::Mem => unreachable!("refused by TortureConfig::check"),
            };
            let mut faulty = Vec::new();
            for i in 0..config.files {
                let path = path.join(format!("file{i}"));
                let file = HostFile::create(&path).map_err(naming(path.display()))?;
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
                volume: Weak::new(),
                _dir: dir,
            })
        }
    }
}

/// What an error in setting up `device` names: its path, or what stands for it.
fn device_name(device: &DeviceSpec) -> String {
    match device {
        DeviceSpec::Path(path) => path.display().to_string(),
        DeviceSpec::TempFile => format!("a temporary file in {}", std::env::temp_dir().display()),
        DeviceSpec::Mem => "a volume in memory".to_owned(),
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
                        format!("it holds {} bytes; the torture needs {len}", device.len()),
                    ));
                }
                Arc::new(device)
            } else {
                Arc::new(FileDevice::create(path, len)?)
            }
        }
    })
}

/// What a worker's operations go through: the library in this process
/// ([`Library`]), or a process of its own using the files through a mount
/// ([`crate::mount::ThroughMount`]). Offsets and lengths are in bytes; the
/// maps cover the first half of each file.
pub(crate) trait Ops {
    /// Reads at `offset` of `file` into `buf`, directly if `direct`.
    fn read(&mut self, file: usize, offset: u64, buf: &mut [u8], direct: bool)
        -> io::Result<usize>;
    /// Writes all of `data` at `offset` of `file`, directly if `direct`.
    fn write(&mut self, file: usize, offset: u64, data: &[u8], direct: bool) -> io::Result<()>;
    /// Reads at `offset` of `file` into `buf` cut at `cuts` (see
    /// [`crate::vectored::cut_mut`]), in one vectored call.
    fn read_vectored(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        cuts: &[usize],
    ) -> io::Result<usize>;
    /// Writes all of `data`, cut at `cuts`, at `offset` of `file` in one
    /// vectored call.
    fn write_vectored(
        &mut self,
        file: usize,
        offset: u64,
        data: &[u8],
        cuts: &[usize],
    ) -> io::Result<()>;
    /// Punches a hole (`punch`) or zeroes a range, keeping the size.
    fn zero(&mut self, file: usize, offset: u64, len: u64, punch: bool) -> io::Result<()>;
    /// Whether the next [`Ops::zero`] is the kernel's `fallocate` through a
    /// mount (see [`crate::oracle::PageHistory::begin_kernel_fallocate`]).
    fn next_zero_is_kernel_fallocate(&self) -> bool {
        false
    }
    /// Truncates (or extends) `file` to `len` bytes.
    fn set_len(&mut self, file: usize, len: u64) -> io::Result<()>;
    /// Starts reading a range ahead.
    fn readahead(&mut self, file: usize, offset: u64, len: u64) -> io::Result<()>;
    /// Syncs a range (`offset`, `len`), or the whole file.
    fn sync(&mut self, file: usize, range: Option<(u64, u64)>) -> io::Result<()>;
    /// Loads `buf` from the map of `file` at `offset`.
    fn map_read(&mut self, file: usize, offset: usize, buf: &mut [u8]) -> io::Result<()>;
    /// Stores `data` through the map of `file` at `offset`.
    fn map_write(&mut self, file: usize, offset: usize, data: &[u8]) -> io::Result<()>;
    /// Whether [`Ops::map_read`] validates what it loads against the page's
    /// state, as `MapRegion::read` does (so a page it returns is one
    /// version); plain loads from a map of the kernel's are not.
    fn map_loads_are_validated(&self) -> bool {
        true
    }

    /// How [`Ops::read`] and [`Ops::read_vectored`] copy what they return
    /// (direct reads are always [`Copied::Atomically`]).
    fn buffered_reads_copied(&self) -> Copied {
        Copied::Atomically
    }

    /// Whether operations of `kind` are in the mix.
    fn makes(&self, kind: OpKind) -> bool {
        let _ = kind;
        true
    }

    /// Drops what is cached of a range of `file`, changing nothing; by
    /// default the library's `invalidate_range` (through a mount too: there
    /// it is the change the kernel did not make, and must be told of).
    fn invalidate(
        &mut self,
        file: usize,
        library: &Mapping,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let _ = file;
        library.invalidate_range(offset, len)
    }

    /// Whether nothing reaches the files through these operations any more
    /// (a worker process that ended): the worker stops.
    fn is_lost(&self) -> bool {
        false
    }
}

/// How the bytes a read returned were copied: it says which pages mixing
/// versions are no violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copied {
    /// Each page as one version (by the library, or by the kernel from the
    /// library), unless a store through a map overlapped the read.
    Atomically,
    /// By plain loads from a map of the kernel's: no change of a page is
    /// atomic against them.
    MapLoads,
    /// By the kernel from its own page cache, which a buffered write copies
    /// into meanwhile, with no lock between the two (ext4's reads tear the
    /// same way): a page may mix versions that were each current during the
    /// read.
    KernelCache,
}

/// A worker's operations through the library, on the run's mappings.
struct Library<'a> {
    files: &'a [Arc<Mapping>],
    maps: &'a [MapRegion],
    /// The buffer of direct reads and writes, aligned as they need.
    direct: AlignedBuf,
}

impl<'a> Library<'a> {
    fn new(shared: &'a Shared) -> Library<'a> {
        Library {
            files: &shared.files,
            maps: &shared.maps,
            direct: AlignedBuf::new(MAX_OP_PAGES as usize * PAGE_SIZE, PAGE_SIZE),
        }
    }
}

impl Ops for Library<'_> {
    fn read(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> io::Result<usize> {
        let mapping = &self.files[file];
        if !direct {
            return mapping.read_at(buf, offset);
        }
        let aligned = &mut self.direct[..buf.len()];
        let n = mapping.read_direct(aligned, offset)?;
        buf[..n].copy_from_slice(&aligned[..n]);
        Ok(n)
    }

    fn write(&mut self, file: usize, offset: u64, data: &[u8], direct: bool) -> io::Result<()> {
        let mapping = &self.files[file];
        if !direct {
            return mapping.write_all_at(data, offset);
        }
        let aligned = &mut self.direct[..data.len()];
        aligned.copy_from_slice(data);
        mapping.write_direct(aligned, offset).map(drop)
    }

    fn read_vectored(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        cuts: &[usize],
    ) -> io::Result<usize> {
        self.files[file].read_vectored_at(&mut cut_mut(buf, cuts), offset)
    }

    fn write_vectored(
        &mut self,
        file: usize,
        offset: u64,
        data: &[u8],
        cuts: &[usize],
    ) -> io::Result<()> {
        write_all_vectored(&self.files[file], offset, data, cuts)
    }

    fn zero(&mut self, file: usize, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        match punch {
            true => self.files[file].punch_hole(offset, len),
            false => self.files[file].zero_range(offset, len),
        }
    }

    fn set_len(&mut self, file: usize, len: u64) -> io::Result<()> {
        self.files[file].set_len(len)
    }

    fn readahead(&mut self, file: usize, offset: u64, len: u64) -> io::Result<()> {
        self.files[file].readahead(offset, len)
    }

    fn sync(&mut self, file: usize, range: Option<(u64, u64)>) -> io::Result<()> {
        match range {
            Some((offset, len)) => self.files[file].sync_range(offset, len),
            None => self.files[file].sync_all(),
        }
    }

    fn map_read(&mut self, file: usize, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.maps[file].read(offset, buf)
    }

    fn map_write(&mut self, file: usize, offset: usize, data: &[u8]) -> io::Result<()> {
        self.maps[file].write(offset, data)
    }
}

/// Writes all of `data`, cut at `cuts`, at `offset` of `mapping` by
/// `write_vectored_at`, calling again for what a short write left.
pub(crate) fn write_all_vectored(
    mapping: &Mapping,
    offset: u64,
    data: &[u8],
    cuts: &[usize],
) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let rest: Vec<usize> = cuts
            .iter()
            .filter(|&&c| c > done)
            .map(|&c| c - done)
            .collect();
        match mapping.write_vectored_at(&cut(&data[done..], &rest), offset + done as u64)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

/// Pins page `index` of `mapping`, copies its bytes into `first`, holds the
/// pin for `hold`, copies them into `second`, and unpins.
fn pin_and_hold(
    mapping: &Mapping,
    index: u64,
    first: &mut [u8],
    second: &mut [u8],
    hold: Duration,
) -> io::Result<()> {
    let page = mapping.pin(index)?;
    first.copy_from_slice(&page[..]);
    let started = Instant::now();
    while started.elapsed() < hold {
        std::hint::spin_loop();
    }
    second.copy_from_slice(&page[..]);
    Ok(())
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

    /// Like `begin_changes`, for stamps stored through a memory map.
    fn begin_map_stores(&self, file: usize, pages: std::ops::Range<u64>, start: u64) {
        for page in pages {
            let mut history = self.history.page(file, page).lock();
            history.begin_map_store(Value::Seq(start), start);
        }
    }

    /// Like `begin_changes` to zeroes, by the kernel's `fallocate`.
    fn begin_kernel_fallocate(&self, file: usize, pages: std::ops::Range<u64>, start: u64) {
        for page in pages {
            self.history
                .page(file, page)
                .lock()
                .begin_kernel_fallocate(start);
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
        self.check_pages(file, first, data, start..end, kind, Copied::Atomically);
    }

    /// [`Shared::check`] of bytes copied as `copied` says: where no change
    /// of a page was atomic against the copy, a page mixing versions that
    /// are each allowed over the read is no violation (counted apart).
    fn check_pages(
        &self,
        file: usize,
        first: u64,
        data: &[u8],
        ticks: std::ops::Range<u64>,
        kind: &str,
        copied: Copied,
    ) {
        let (start, end) = (ticks.start, ticks.end);
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let index = first + i as u64;
            self.reads_checked.fetch_add(1, Ordering::Relaxed);
            let counter = match classify(page, file, index) {
                Observed::Value(value) => {
                    let history = self.history.page(file, index).lock();
                    if history.allows(value, start, end) {
                        continue;
                    }
                    if history.allows_kernel_fallocate_loss(value, start, end) {
                        self.map_stores_lost_by_kernel_fallocate
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    self.example(format!(
                        "stale: {kind} of file {file} page {index} over ticks {start}..{end} returned {value:?}, replaced before the read began (history: {})",
                        history.describe()
                    ));
                    &self.stale
                }
                Observed::Torn => {
                    let history = self.history.page(file, index).lock();
                    let values = mixed_values(page, file, index);
                    // Where no change is atomic against the copy (a map store
                    // overlapping the read, loads from a map, the kernel's
                    // copy out of its cache), even words may be torn: each
                    // byte must come from an allowed version.
                    let byte_mix = || history.allows_byte_mix(page, file, index, start, end);
                    let during_map_store = values
                        .as_ref()
                        .is_some_and(|values| history.allows_mix(values, start, end))
                        || (copied == Copied::MapLoads || history.map_store_overlaps(start, end))
                            && byte_mix();
                    let in_kernel_cache = copied == Copied::KernelCache && byte_mix();
                    drop(history);
                    if during_map_store {
                        self.mixed_during_map_store.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if in_kernel_cache {
                        self.mixed_in_kernel_cache.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let history = self.history.page(file, index).lock().describe();
                    self.example(format!(
                        "torn: {kind} of file {file} page {index} over ticks {start}..{end} mixed {values:?} (history: {history})"
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

    /// A worker of the self-map scenario. Workers 0 to 2 do direct I/O on their
    /// own file through a buffer that is the next file's map (its scratch pages,
    /// which only this worker touches and nothing punches); worker 3 punches
    /// holes in the checked pages of all three files.
    fn work_self_map_dio(&self, worker: usize) -> [u64; KINDS] {
        let config = &self.config;
        let mut rng = fastrand::Rng::with_seed(
            config.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ worker as u64,
        );
        let mut counts = [0u64; KINDS];
        while !self.stop.load(Ordering::Relaxed) {
            let first = rng.u64(..config.pages_per_file);
            let count = rng.u64(1..=MAX_OP_PAGES).min(config.pages_per_file - first);
            let pages = first..first + count;
            let (offset, len) = (start_of(first), (count * PAGE) as usize);
            let start = self.begin(worker);
            let (op, file, result) = if worker == 3 {
                let file = rng.usize(..3);
                self.begin_changes(file, pages.clone(), true, start);
                let result = self.files[file].punch_hole(offset, len as u64);
                self.end_changes(file, pages, start);
                (OpKind::Punch, file, result)
            } else {
                let map = &self.maps[(worker + 1) % 3];
                // SAFETY: the map outlives this loop (it lives in `self`); its
                // scratch pages are touched by this worker only (one worker per
                // map), never punched or truncated, and lie inside the file, so
                // for the length of this iteration nothing else writes them and no
                // access raises SIGBUS.
                let buf = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), len) };
                let mapping = &self.files[worker];
                if rng.bool() {
                    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        fill_page(page, worker, first + i as u64, start);
                    }
                    self.begin_changes(worker, pages.clone(), false, start);
                    let result = mapping.write_direct(buf, offset).map(drop);
                    self.end_changes(worker, pages, start);
                    (OpKind::WriteDirect, worker, result)
                } else {
                    let result = mapping.read_direct(buf, offset).map(|n| {
                        let end = self.clock.tick();
                        self.check(worker, first, &buf[..n], start, end, "read_direct");
                    });
                    (OpKind::ReadDirect, worker, result)
                }
            };
            self.finish(worker);
            if let Err(error) = result {
                self.error(op.name(), file, error);
            }
            counts[op as usize] += 1;
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
        counts
    }

    /// One worker's loop, its operations made through `ops`; returns how
    /// many operations of each kind it completed. `invalidate` always goes
    /// to the library: through a mount, it is the change the kernel did not
    /// make and must be told of.
    pub(crate) fn work(&self, worker: usize, ops: &mut impl Ops) -> [u64; KINDS] {
        let config = &self.config;
        let mut rng = fastrand::Rng::with_seed(
            config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ worker as u64,
        );
        let mut counts = [0u64; KINDS];
        let mut buffer = vec![0u8; MAX_OP_PAGES as usize * PAGE_SIZE];
        // Where this worker's last read ended: half its reads go on from there,
        // so that sequential readahead (its windows, and the windows it hands to
        // the readahead threads) races the other operations too.
        let mut stream: Option<(usize, u64)> = None;
        while !self.stop.load(Ordering::Relaxed) && !ops.is_lost() {
            let op = pick(&mut rng, |kind| {
                ops.makes(kind) && (kind != OpKind::MapWrite || config.map_writes)
            });
            let (file, first) = match stream {
                Some((file, next))
                    if op == OpKind::Read && next < config.pages_per_file && rng.bool() =>
                {
                    (file, next)
                }
                _ => (rng.usize(..config.files), rng.u64(..config.pages_per_file)),
            };
            let count = rng.u64(1..=MAX_OP_PAGES).min(config.pages_per_file - first);
            if op == OpKind::Read {
                stream = Some((file, first + count));
            }
            let pages = first..first + count;
            let (offset, len) = (start_of(first), count * PAGE);
            let kind = op.name();
            let start = self.begin(worker);
            let result = match op {
                OpKind::ReadVectored => {
                    let buf = &mut buffer[..len as usize];
                    let cuts = random_cuts(&mut rng, buf.len());
                    let copied = ops.buffered_reads_copied();
                    ops.read_vectored(file, offset, buf, &cuts).map(|n| {
                        let end = self.clock.tick();
                        self.check_pages(file, first, &buf[..n], start..end, kind, copied);
                    })
                }
                OpKind::WriteVectored => {
                    let buf = &mut buffer[..len as usize];
                    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        fill_page(page, file, first + i as u64, start);
                    }
                    let cuts = random_cuts(&mut rng, buf.len());
                    self.begin_changes(file, pages.clone(), false, start);
                    let result = ops.write_vectored(file, offset, buf, &cuts);
                    self.end_changes(file, pages, start);
                    result
                }
                OpKind::Read | OpKind::ReadDirect => {
                    let buf = &mut buffer[..len as usize];
                    let copied = match op {
                        OpKind::ReadDirect => Copied::Atomically,
                        _ => ops.buffered_reads_copied(),
                    };
                    ops.read(file, offset, buf, op == OpKind::ReadDirect)
                        .map(|n| {
                            let end = self.clock.tick();
                            self.check_pages(file, first, &buf[..n], start..end, kind, copied);
                        })
                }
                OpKind::Write | OpKind::WriteDirect => {
                    let buf = &mut buffer[..len as usize];
                    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        fill_page(page, file, first + i as u64, start);
                    }
                    self.begin_changes(file, pages.clone(), false, start);
                    let result = ops.write(file, offset, buf, op == OpKind::WriteDirect);
                    self.end_changes(file, pages, start);
                    result
                }
                OpKind::Punch | OpKind::Zero => {
                    if ops.next_zero_is_kernel_fallocate() {
                        self.begin_kernel_fallocate(file, pages.clone(), start);
                    } else {
                        self.begin_changes(file, pages.clone(), true, start);
                    }
                    let result = ops.zero(file, offset, len, op == OpKind::Punch);
                    self.end_changes(file, pages, start);
                    result
                }
                OpKind::Truncate => {
                    let keep = rng.u64(config.pages_per_file / 2..=config.pages_per_file);
                    let gone = keep..config.pages_per_file;
                    self.begin_changes(file, gone.clone(), true, start);
                    let result = ops.set_len(file, keep * PAGE);
                    self.end_changes(file, gone, start);
                    result
                }
                OpKind::MapRead | OpKind::MapWrite => {
                    // The maps cover the first half of each file.
                    let half = config.pages_per_file / 2;
                    let first = first % half;
                    let count = count.min(half - first);
                    let (offset, len) = (start_of(first) as usize, (count * PAGE) as usize);
                    let buf = &mut buffer[..len];
                    if op == OpKind::MapRead {
                        let copied = match ops.map_loads_are_validated() {
                            true => Copied::Atomically,
                            false => Copied::MapLoads,
                        };
                        ops.map_read(file, offset, buf).map(|()| {
                            let end = self.clock.tick();
                            self.check_pages(file, first, buf, start..end, kind, copied);
                        })
                    } else {
                        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                            fill_page(page, file, first + i as u64, start);
                        }
                        let pages = first..first + count;
                        self.begin_map_stores(file, pages.clone(), start);
                        let result = ops.map_write(file, offset, buf);
                        self.end_changes(file, pages, start);
                        result
                    }
                }
                OpKind::Pin => {
                    // A page of the first half, which truncates never cut.
                    let index = first % (config.pages_per_file / 2);
                    let mut second = [0u8; PAGE_SIZE];
                    let page = &mut buffer[..PAGE_SIZE];
                    let hold = Duration::from_micros(rng.u64(..=config.max_delay_us));
                    // Through the library whatever `ops` are: a pin has no
                    // async form (its guard belongs to its thread), and the
                    // mount has none (the mix through a mount leaves pins out).
                    pin_and_hold(&self.files[file], index, page, &mut second, hold).map(|()| {
                        let end = self.clock.tick();
                        self.check(file, index, page, start, end, kind);
                        if page[..] != second[..] {
                            self.torn.fetch_add(1, Ordering::Relaxed);
                            self.example(format!(
                                "torn: page {index} of file {file} changed under its pin over ticks {start}..{end}"
                            ));
                            if self.config.stop_on_violation {
                                self.stop.store(true, Ordering::Relaxed);
                            }
                        }
                    })
                }
                OpKind::Readahead => ops.readahead(file, offset, len),
                // Writes back and drops: the content must not change, stores
                // through maps racing it included.
                OpKind::Invalidate => ops.invalidate(file, &self.files[file], offset, len),
                OpKind::Sync => {
                    let range = (rng.u8(..4) != 0).then_some((offset, len));
                    ops.sync(file, range)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_must_hold_the_largest_operation_of_every_worker() {
        let config = TortureConfig {
            threads: 3,
            cache_bytes: 3 * MAX_OP_PAGES * PAGE,
            ..TortureConfig::default()
        };
        assert_eq!(config.min_cache_bytes(), 49152);
        config.check().unwrap();
        let too_small = TortureConfig {
            cache_bytes: 49151,
            ..config.clone()
        };
        let error = too_small.check().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(
            error
                .to_string()
                .contains("--cache-bytes must be at least 49152"),
            "{error}"
        );
        // The self-map scenario runs its own four threads, whatever the setting.
        let self_map = TortureConfig {
            scenario: Scenario::SelfMapDio,
            threads: 100,
            ..config
        };
        assert_eq!(self_map.min_cache_bytes(), 4 * MAX_OP_PAGES * PAGE);
    }
}
