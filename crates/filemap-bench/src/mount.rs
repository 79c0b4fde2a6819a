//! `mount`: file I/O through a mounted filemap volume, against a minimal
//! pass-through FUSE file system and against the host file system itself.
//!
//! Three targets, set up once in a temporary directory and measured in one
//! invocation, each holding one file of `file_bytes` (256 MiB by default):
//!
//! - `filemap`: a volume image ([`filemap_fuse::format`]) on the host file
//!   system, mounted with [`filemap_fuse::mount`] (the headline strategy,
//!   [`crate::headline_strategy`], a budget of `budget_bytes`, 512 MiB by
//!   default, so the whole file fits);
//! - `passthrough`: the files of a host directory beside it, served by
//!   [`crate::passthrough`]: every request forwarded to the host file with
//!   `pread`, `pwrite` and `fsync` by a server built as `filemap_fuse`'s is
//!   (the same `fuser`, mount options, server threads and descriptors, every
//!   file opened with `FOPEN_DIRECT_IO`, replies valid for no time): the
//!   baseline a user-space file system author starts from;
//! - `host`: a file in a third directory beside them, read and written with
//!   no FUSE between, for scale.
//!
//! filemap's image is an ordinary host file. The host's page cache holds
//! what filemap writes to it and its small reads, as it holds the
//! pass-through's file; filemap's large reads of it (128 KiB or more, a
//! sequential stream's windows) bypass it ([`MountOptions::direct_reads`]),
//! since filemap caches what they read. `uncached-read` empties both caches.
//!
//! Operations, each through each target (the program's calls are the same:
//! `pread`, `read`, `pwrite` and `fsync` on a descriptor of the target's file):
//!
//! - `cached-read`: 4 KiB `pread`s at random page-aligned offsets, by 1 and
//!   2 threads (`threads`), the file read whole just before: filemap's reads
//!   hit its cache, the pass-through's and the host's the host's page cache.
//!   Rows count all threads' reads per second, and one thread's.
//! - `uncached-read`: 1 MiB `read`s from the first byte of the file to the
//!   last, once per run, with nothing of the file cached: for filemap the
//!   image is unmounted (which syncs everything), synced and dropped from the
//!   host's page cache (`posix_fadvise(DONTNEED)`), and mounted again, so its
//!   cache starts empty and its fills read the disk (its readahead threads'
//!   windows with `O_DIRECT`); the pass-through's host file and the host's
//!   file are synced and dropped from the host's page cache alike, and read
//!   through the host's readahead. All three read from the disk (whose own
//!   cache, on a virtual machine its host's page cache, may still hold the
//!   data). Rows count 1 MiB reads per second: MiB/s.
//! - `write-fsync`: 4 KiB `pwrite`s at random page-aligned offsets, one
//!   thread, an `fsync` after every 64th; each slice of a run ends with an
//!   untimed `fsync`, so no target leaves dirty pages to the next. The file is
//!   written whole at setup, so every write overwrites allocated blocks.
//!
//! `cached-read` and `write-fsync` run `seconds_per_run` per run, the targets
//! measuring its slices in turns ([`crate::interleaved`]); `uncached-read`
//! reads the file once per target per run, the targets taking turns every
//! 8 MiB (the disk's speed drifts; turns give each target the same disk). Reader threads are not pinned:
//! each read is a round trip to a server thread the scheduler places.
//!
//! The targets are set on two ratios: cached reads (each thread count) and
//! uncached sequential reads, filemap at least as fast as the pass-through.
//! Every mount is unmounted on every way out of [`run`], an error or a panic
//! included: a guard unmounts each when dropped, and detaches a mount a file
//! still holds.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{ReadaheadMode, Strategy};
use filemap_fuse::MountOptions;

use crate::{
    folios, headline_strategy, interleaved, invalid, measure_kinds, pattern, timed_row, Histogram,
    Measured, PageBuf, Progress, Ratio, Report, Row, RowKey, RunSettings, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "mount";
/// The operation of random 4 KiB reads of a cached file.
pub const CACHED_READ: &str = "cached-read";
/// The operation of sequential 1 MiB reads of an uncached file.
pub const UNCACHED_READ: &str = "uncached-read";
/// The operation of random 4 KiB writes with an `fsync` every 64.
pub const WRITE_FSYNC: &str = "write-fsync";
/// The bytes of one sequential read.
pub const SEQ_CHUNK: usize = 1 << 20;
/// The sequential reads take turns at the files this many chunks at a time.
const TURN_CHUNKS: u64 = 8;
/// An `fsync` after this many writes.
pub const FSYNC_EVERY: u64 = 64;
/// One cached read in this many is timed: a host `pread` of a cached page
/// takes about a microsecond, on which two clock reads would weigh.
const TIME_EVERY: u32 = 16;
/// The file's name on every target.
const FILE_NAME: &str = "bench";

/// Who serves the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A volume image mounted with `filemap_fuse`.
    Filemap,
    /// The pass-through FUSE file system over a host directory.
    Passthrough,
    /// The host file system, no FUSE between.
    Host,
}

impl TargetKind {
    /// Every target, in the order of the rows.
    pub const ALL: [TargetKind; 3] = [
        TargetKind::Filemap,
        TargetKind::Passthrough,
        TargetKind::Host,
    ];

    /// Its place in [`TargetKind::ALL`].
    fn index(self) -> usize {
        match self {
            TargetKind::Filemap => 0,
            TargetKind::Passthrough => 1,
            TargetKind::Host => 2,
        }
    }

    /// Its name in reports (the rows' `strategy`).
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Filemap => "filemap",
            TargetKind::Passthrough => "passthrough",
            TargetKind::Host => "host",
        }
    }
}

/// Settings of the mount benchmark.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// The file's size in bytes (a multiple of 1 MiB).
    pub file_bytes: u64,
    /// The budget of filemap's cache (at least the file's size, so that the
    /// file stays cached).
    pub budget_bytes: u64,
    /// The runs, their length, the reader thread counts of `cached-read`, and
    /// the strategies, of which the headline one is mounted.
    pub settings: RunSettings,
    /// Where the temporary directory of the image, the mount points and the
    /// host files is made; the system's temporary directory if `None`.
    pub dir: Option<PathBuf>,
    /// Mount filemap with the kernel's page cache in front
    /// ([`MountOptions::kernel_cache`]).
    pub kernel_cache: bool,
    /// When filemap's mounted cache reads ahead
    /// ([`MountOptions::readahead_mode`]).
    pub readahead: ReadaheadMode,
    /// filemap's large reads of its image bypass the host's page cache
    /// ([`MountOptions::direct_reads`]).
    pub direct_reads: bool,
    /// The threads serving each FUSE server's requests, filemap's and the
    /// pass-through's alike ([`MountOptions::threads`]).
    pub server_threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            file_bytes: 256 << 20,
            budget_bytes: 512 << 20,
            settings: RunSettings {
                threads: vec![1, 2],
                ..RunSettings::default()
            },
            dir: None,
            kernel_cache: false,
            readahead: filemap_fuse::MountOptions::default().readahead_mode,
            direct_reads: filemap_fuse::MountOptions::default().direct_reads,
            server_threads: filemap_fuse::MountOptions::default().threads,
        }
    }
}

/// Checks the settings without running anything.
pub fn check(config: &MountConfig) -> io::Result<()> {
    let bytes = config.file_bytes;
    if bytes == 0 || bytes % SEQ_CHUNK as u64 != 0 || bytes > 16 << 30 {
        return Err(invalid(
            "the mount workload's file must be a whole number of MiB, 1 MiB to 16 GiB",
        ));
    }
    if config.server_threads == 0 {
        return Err(invalid(
            "the mount workload needs at least one server thread",
        ));
    }
    if config.budget_bytes < bytes {
        return Err(invalid(format!(
            "the mount workload's budget ({} bytes) must hold its file ({bytes} bytes): \
             its cached reads would miss",
            config.budget_bytes
        )));
    }
    config.settings.check()
}

/// How many measured steps [`run`] announces: each target once per run for
/// every cached-read thread count, for the writes and for the sequential read.
pub fn steps(config: &MountConfig) -> usize {
    let settings = &config.settings;
    // Per run: each target's cached reads per thread count and its writes,
    // then one step of sequential reads, the targets in turns.
    settings.runs * (TargetKind::ALL.len() * (settings.threads.len() + 1) + 1)
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &MountConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let strategy = headline_strategy(&config.settings.strategies)?
        .ok_or_else(|| invalid("at least one strategy must be selected"))?;
    with_targets(config, strategy, &mut progress, |targets, progress| {
        measure(config, strategy, targets, progress)
    })
}

/// Sets the three targets up, runs `body` on them, and takes them down again
/// (unmounted, removed) whether `body` succeeds, fails or panics.
fn with_targets<T>(
    config: &MountConfig,
    strategy: Strategy,
    progress: &mut dyn FnMut(Progress<'_>),
    body: impl FnOnce(&mut Targets, &mut dyn FnMut(Progress<'_>)) -> io::Result<T>,
) -> io::Result<T> {
    progress(Progress::Setup(
        "mount: formatting and mounting a volume image, mounting the pass-through",
    ));
    let mut targets = Targets::set_up(config, strategy)?;
    for kind in TargetKind::ALL {
        progress(Progress::Setup(&format!(
            "mount: writing the {} MiB file through {}",
            config.file_bytes >> 20,
            kind.name()
        )));
        write_file(&targets.path(kind), config.file_bytes)?;
    }
    let result = body(&mut targets, progress)?;
    // The way out that reports a failed unmount; the other ways leave it to
    // the guards.
    targets.take_down()?;
    Ok(result)
}

/// Every measurement of every run, and the report.
fn measure(
    config: &MountConfig,
    strategy: Strategy,
    targets: &mut Targets,
    progress: &mut dyn FnMut(Progress<'_>),
) -> io::Result<Report> {
    let settings = &config.settings;
    let pages = config.file_bytes / PAGE;
    let kinds = TargetKind::ALL;
    let duration = settings.duration();
    let mut cached = vec![vec![Vec::new(); kinds.len()]; settings.threads.len()];
    let mut uncached = vec![Vec::new(); kinds.len()];
    let mut writes = vec![Vec::new(); kinds.len()];
    // With the kernel's cache in front, filemap's cached reads and the
    // host's both copy out of the kernel's page cache: in folios of which
    // sizes, after the first warm-up read.
    let mut folios = None;
    for run in 0..settings.runs {
        let step = |what: &str, kind: &TargetKind| {
            format!(
                "mount, run {}/{}: {what}, {}",
                run + 1,
                settings.runs,
                kind.name()
            )
        };
        {
            // Opened for this run's reads and writes, and closed before the
            // sequential reads unmount filemap's image.
            let mut files = Vec::new();
            for kind in kinds {
                progress(Progress::Setup(&format!(
                    "mount: reading the file through {} before its cached reads",
                    kind.name()
                )));
                let path = targets.path(kind);
                read_in_turns(std::slice::from_ref(&path), config.file_bytes)?;
                files.push(OpenOptions::new().read(true).write(true).open(&path)?);
            }
            if config.kernel_cache && folios.is_none() {
                let share =
                    |kind| folios::large_folio_share(&targets.path(kind), config.file_bytes);
                folios = Some((share(TargetKind::Filemap)?, share(TargetKind::Host)?));
            }
            for (t, &threads) in settings.threads.iter().enumerate() {
                let measured = interleaved(
                    &kinds,
                    duration,
                    |kind| {
                        progress(Progress::Step(&step(
                            &format!("{CACHED_READ}, {threads} thread(s)"),
                            kind,
                        )))
                    },
                    |kind, duration| {
                        let file = &files[kind.index()];
                        Ok(vec![random_reads(file, threads, pages, duration)?])
                    },
                )?;
                for (k, mut measured) in measured.into_iter().enumerate() {
                    cached[t][k].push(measured.remove(0));
                }
            }
            let measured = interleaved(
                &kinds,
                duration,
                |kind| progress(Progress::Step(&step(WRITE_FSYNC, kind))),
                |kind, duration| {
                    let file = &files[kind.index()];
                    Ok(vec![random_writes(file, pages, duration)?])
                },
            )?;
            for (k, mut measured) in measured.into_iter().enumerate() {
                writes[k].push(measured.remove(0));
            }
        }
        for kind in &kinds {
            targets.drop_cached(*kind)?;
        }
        progress(Progress::Step(&format!(
            "mount, run {}/{}: {UNCACHED_READ}, every target in turns",
            run + 1,
            settings.runs
        )));
        let paths = kinds.map(|kind| targets.path(kind));
        for (k, measured) in read_in_turns(&paths, config.file_bytes)?
            .into_iter()
            .enumerate()
        {
            uncached[k].push(measured);
        }
    }

    let mut report = Report::default();
    let mut row = |op: &str, threads: usize, runs: &[Measured], kind: TargetKind| {
        let key = RowKey {
            workload: WORKLOAD,
            strategy: kind.name(),
            op,
            threads,
        };
        let mut row = timed_row(key, runs);
        row.coherent = kind != TargetKind::Filemap || strategy.is_coherent();
        report.rows.push(row);
    };
    for (t, &threads) in settings.threads.iter().enumerate() {
        for (k, &kind) in kinds.iter().enumerate() {
            row(CACHED_READ, threads, &cached[t][k], kind);
        }
    }
    for (k, &kind) in kinds.iter().enumerate() {
        row(UNCACHED_READ, 1, &uncached[k], kind);
    }
    for (k, &kind) in kinds.iter().enumerate() {
        row(WRITE_FSYNC, 1, &writes[k], kind);
    }
    report.ratios = ratios(&report.rows, strategy, &settings.threads);
    report.notes = notes(config, strategy);
    if let Some((filemap, host)) = folios {
        report.notes.push(format!(
            "mount: cached-read: the kernel's page cache held {:.0}% of filemap's first 16 MiB \
             and {:.0}% of the host file's in large folios after the warm-up read \
             (/proc/kpageflags): a 4 KiB read hit finds its page faster in a large folio",
            filemap * 100.0,
            host * 100.0
        ));
    }
    Ok(report)
}

/// The ratios: filemap against the pass-through (the targets) and against the
/// host (for scale), for every operation and thread count.
fn ratios(rows: &[Row], strategy: Strategy, threads: &[usize]) -> Vec<Ratio> {
    let rate = |kind: TargetKind, op: &str, threads: usize| {
        let row = crate::find_row(rows, WORKLOAD, kind.name(), op, threads);
        match row {
            Some(row) if row.coherent => Ok(row.ops_per_s),
            Some(_) => Err(format!(
                "not available: {} takes no coherence lock",
                strategy.name()
            )),
            None => Err(format!("not available: {} was not measured", kind.name())),
        }
    };
    let mut figures: Vec<(&str, usize, String, Option<Target>)> = threads
        .iter()
        .map(|&t| {
            let threads = if t == 1 {
                "1 thread".to_owned()
            } else {
                format!("{t} threads")
            };
            (
                CACHED_READ,
                t,
                format!("cached 4 KiB random reads/s, {threads}"),
                Some(Target::AtLeast(1.0)),
            )
        })
        .collect();
    figures.push((
        UNCACHED_READ,
        1,
        "uncached sequential 1 MiB reads, MiB/s".to_owned(),
        Some(Target::AtLeast(1.0)),
    ));
    figures.push((
        WRITE_FSYNC,
        1,
        format!("random 4 KiB writes/s, fsync every {FSYNC_EVERY}"),
        None,
    ));
    let mut ratios = Vec::new();
    for (op, threads, what, target) in figures {
        for (against, target) in [(TargetKind::Passthrough, target), (TargetKind::Host, None)] {
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("filemap / {}, {what}", against.name()),
                rate(TargetKind::Filemap, op, threads),
                rate(against, op, threads),
                target,
            ));
        }
    }
    ratios
}

/// What each target and operation is, for the report.
fn notes(config: &MountConfig, strategy: Strategy) -> Vec<String> {
    let server_threads = config.server_threads;
    vec![
        format!(
            "mount: a {} MiB file on each target; filemap: a volume image on the host file \
             system mounted with filemap_fuse ({}, budget {} MiB, {} readahead threads, \
             readahead {}, {}); passthrough: a host \
             directory beside it, every request forwarded with pread/pwrite/fsync; both \
             served by {server_threads} threads, files opened with {}; host: a \
             file beside them, no FUSE",
            config.file_bytes >> 20,
            strategy.name(),
            config.budget_bytes >> 20,
            MountOptions::default().readahead_threads,
            match config.readahead {
                ReadaheadMode::BackendBound => "backend-bound",
                ReadaheadMode::Always => "always",
            },
            match config.direct_reads {
                true => format!(
                    "reads of {} KiB or more past the host's page cache",
                    filemap_fuse::DIRECT_READ_MIN >> 10
                ),
                false => "every read through the host's page cache".to_owned(),
            },
            match config.kernel_cache {
                true =>
                    "FOPEN_DIRECT_IO but filemap's with FOPEN_KEEP_CACHE (--kernel-cache: \
                         the kernel's page cache in front of filemap's)",
                false => "FOPEN_DIRECT_IO",
            }
        ),
        "mount: cached-read: the file read whole before each run's reads: filemap's reads \
         hit its cache, the others' the host's page cache"
            .to_owned(),
        "mount: uncached-read: before each run's reads, filemap's image is unmounted, \
         synced, dropped from the host's page cache (fadvise DONTNEED) and mounted again (an \
         empty cache); the other two files are synced and dropped alike and read through \
         the host's readahead: all three read the disk (a virtual disk's host may still \
         cache what it serves), taking turns every 8 MiB"
            .to_owned(),
        format!(
            "mount: write-fsync: 4 KiB pwrites at random pages of the written file, fsync \
             every {FSYNC_EVERY}, an untimed fsync at the end of each slice"
        ),
    ]
}

/// `threads` threads `pread`ing random pages of `file` for `duration`.
fn random_reads(
    file: &File,
    threads: usize,
    pages: u64,
    duration: Duration,
) -> io::Result<Measured> {
    let measured = measure_kinds(threads, 1, duration, TIME_EVERY, |_| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        (0, move |rng: &mut fastrand::Rng| {
            file.read_exact_at(&mut buf.0, rng.u64(..pages) * PAGE)?;
            std::hint::black_box(&buf);
            Ok(Duration::ZERO)
        })
    })?;
    Ok(measured.into_iter().next().expect("one kind"))
}

/// One thread `pwrite`ing random pages of `file` for `duration`, with an
/// `fsync` after every [`FSYNC_EVERY`] writes, then an untimed `fsync`.
fn random_writes(file: &File, pages: u64, duration: Duration) -> io::Result<Measured> {
    let measured = measure_kinds(1, 1, duration, 1, |_| {
        let mut page = Box::new(PageBuf([0; PAGE_SIZE]));
        page.0.copy_from_slice(&pattern(PAGE_SIZE));
        let mut written = 0u64;
        (0, move |rng: &mut fastrand::Rng| {
            file.write_all_at(&page.0, rng.u64(..pages) * PAGE)?;
            written += 1;
            if written % FSYNC_EVERY == 0 {
                file.sync_all()?;
            }
            Ok(Duration::ZERO)
        })
    })?;
    file.sync_all()?;
    Ok(measured.into_iter().next().expect("one kind"))
}

/// Reads each file of `paths` from its first byte to its last, [`SEQ_CHUNK`]
/// at a time, [`TURN_CHUNKS`] chunks of one file, then of the next: the
/// files share one disk, whose speed drifts (a virtual disk's more than
/// twofold between two reads of a file, on the machine these figures come
/// from), and turns this short give each file the same disk. The first file
/// of a turn is a different one each turn. Each file's rate counts its own
/// reads' time only.
fn read_in_turns(paths: &[PathBuf], bytes: u64) -> io::Result<Vec<Measured>> {
    let mut files = paths
        .iter()
        .map(File::open)
        .collect::<io::Result<Vec<_>>>()?;
    let mut buf = vec![0u8; SEQ_CHUNK];
    let mut latency: Vec<_> = paths.iter().map(|_| Histogram::new()).collect();
    let mut spent = vec![Duration::ZERO; paths.len()];
    let chunks = bytes / SEQ_CHUNK as u64;
    for turn in 0..chunks.div_ceil(TURN_CHUNKS) {
        let first = turn as usize % paths.len();
        let in_turn = TURN_CHUNKS.min(chunks - turn * TURN_CHUNKS);
        for f in (first..paths.len()).chain(0..first) {
            for _ in 0..in_turn {
                let timed = Instant::now();
                files[f].read_exact(&mut buf)?;
                let took = timed.elapsed();
                latency[f].record(took.as_nanos() as u64);
                spent[f] += took;
            }
        }
    }
    for (file, path) in files.iter_mut().zip(paths) {
        if file.read(&mut buf[..1])? != 0 {
            return Err(io::Error::other(format!(
                "{}: longer than the {bytes} bytes written",
                path.display()
            )));
        }
    }
    Ok(latency
        .into_iter()
        .zip(spent)
        .map(|(latency, spent)| {
            Measured::new(chunks as f64 / spent.as_secs_f64().max(1e-9), latency, 1)
        })
        .collect())
}

/// Writes `bytes` of the pattern to a new file at `path`, [`SEQ_CHUNK`] at a
/// time, and syncs it.
fn write_file(path: &Path, bytes: u64) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))?;
    let chunk = pattern(SEQ_CHUNK);
    for _ in 0..bytes / SEQ_CHUNK as u64 {
        file.write_all(&chunk)?;
    }
    file.sync_all()
}

/// The three targets in a temporary directory: `volume.img` mounted at
/// `filemap/`, `passthrough-files/` mounted at `passthrough/`, and `host/`.
struct Targets {
    // Unmounted before the directory goes: fields drop in this order.
    filemap: MountGuard,
    passthrough: MountGuard,
    scratch: tempfile::TempDir,
    options: MountOptions,
}

impl Targets {
    fn set_up(config: &MountConfig, strategy: Strategy) -> io::Result<Targets> {
        let mut scratch = tempfile::Builder::new();
        scratch.prefix("filemap-bench-mount");
        let scratch = match &config.dir {
            Some(dir) => scratch.tempdir_in(dir),
            None => scratch.tempdir(),
        }?;
        let dir = scratch.path();
        for sub in ["filemap", "passthrough", "passthrough-files", "host"] {
            std::fs::create_dir(dir.join(sub))?;
        }
        // The file, the volume's metadata (a 256th of the image) and room
        // to spare.
        let image_bytes = config.file_bytes + config.file_bytes / 8 + (64 << 20);
        filemap_fuse::format(&dir.join("volume.img"), image_bytes)?;
        let options = MountOptions {
            budget_bytes: config.budget_bytes,
            strategy,
            kernel_cache: config.kernel_cache,
            readahead_mode: config.readahead,
            direct_reads: config.direct_reads,
            threads: config.server_threads,
            ..MountOptions::default()
        };
        let filemap = MountGuard::filemap(&dir.join("volume.img"), &dir.join("filemap"), &options)?;
        let passthrough = MountGuard::passthrough(
            &dir.join("passthrough-files"),
            &dir.join("passthrough"),
            options.threads,
        )?;
        Ok(Targets {
            filemap,
            passthrough,
            scratch,
            options,
        })
    }

    /// The path of the file on target `kind`.
    fn path(&self, kind: TargetKind) -> PathBuf {
        let dir = match kind {
            TargetKind::Filemap => "filemap",
            TargetKind::Passthrough => "passthrough",
            TargetKind::Host => "host",
        };
        self.scratch.path().join(dir).join(FILE_NAME)
    }

    /// The host file the target's reads come from in the end.
    fn backing_file(&self, kind: TargetKind) -> PathBuf {
        let dir = self.scratch.path();
        match kind {
            TargetKind::Filemap => dir.join("volume.img"),
            TargetKind::Passthrough => dir.join("passthrough-files").join(FILE_NAME),
            TargetKind::Host => dir.join("host").join(FILE_NAME),
        }
    }

    /// Leaves nothing of the target's file cached: filemap's image unmounted,
    /// dropped from the host's page cache and mounted again (a fresh cache);
    /// the other files dropped from the host's page cache. No file of the
    /// target may be open.
    fn drop_cached(&mut self, kind: TargetKind) -> io::Result<()> {
        if kind == TargetKind::Filemap {
            self.filemap.unmount()?;
        }
        filemap::bench_support::drop_host_cache(&File::open(self.backing_file(kind))?)?;
        if kind == TargetKind::Filemap {
            let dir = self.scratch.path();
            self.filemap =
                MountGuard::filemap(&dir.join("volume.img"), &dir.join("filemap"), &self.options)?;
        }
        Ok(())
    }

    /// Unmounts both file systems, reporting the first failure.
    fn take_down(mut self) -> io::Result<()> {
        let filemap = self.filemap.unmount();
        let passthrough = self.passthrough.unmount();
        filemap.and(passthrough)
    }
}

/// A FUSE file system mounted for the benchmark, unmounted by
/// [`MountGuard::unmount`] or when dropped, so that an error or a panic
/// leaves no mount behind. Where the unmount fails (a file still open on
/// it: `EBUSY`), the mount is detached (`umount2(MNT_DETACH)`): gone from the
/// tree at once, and from the kernel when its last file is closed.
pub(crate) struct MountGuard {
    mountpoint: PathBuf,
    session: Option<Session>,
}

enum Session {
    Filemap(filemap_fuse::Mounted),
    Passthrough(fuser::BackgroundSession),
}

impl MountGuard {
    /// The volume in `image`, mounted at `mountpoint`.
    pub(crate) fn filemap(
        image: &Path,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> io::Result<MountGuard> {
        let mountpoint = mountpoint.canonicalize()?;
        let mounted = filemap_fuse::mount(image, &mountpoint, options).map_err(mounting)?;
        Ok(MountGuard {
            mountpoint,
            session: Some(Session::Filemap(mounted)),
        })
    }

    /// The files of `root` passed through at `mountpoint`.
    pub(crate) fn passthrough(
        root: &Path,
        mountpoint: &Path,
        threads: usize,
    ) -> io::Result<MountGuard> {
        let mountpoint = mountpoint.canonicalize()?;
        let session = crate::passthrough::mount(root, &mountpoint, threads).map_err(mounting)?;
        Ok(MountGuard {
            mountpoint,
            session: Some(Session::Passthrough(session)),
        })
    }

    /// Unmounts (filemap's syncs everything first) and waits for the server
    /// to end; detaches the mount if that fails, and returns the failure.
    /// Does nothing the second time.
    pub(crate) fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let unmounted = match session {
            Session::Filemap(mounted) => mounted.unmount(),
            Session::Passthrough(session) => filemap_fuse::session_ended(session.umount_and_join()),
        };
        let Err(error) = unmounted else {
            return Ok(());
        };
        let mountpoint = &self.mountpoint;
        let mounted = mount_points().map_or(true, |points| points.contains(mountpoint));
        let detached = match mounted {
            true => match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH) {
                Ok(()) => "detached".to_owned(),
                Err(detach) => format!("detaching it failed too: {detach}"),
            },
            false => "not mounted any more".to_owned(),
        };
        Err(io::Error::new(
            error.kind(),
            format!("unmounting {}: {error} ({detached})", mountpoint.display()),
        ))
    }
}

/// A failed mount's error, with what it takes where the kernel refused
/// (`EPERM`, `EACCES`, `ENODEV`; `filemap_fuse` names the path in a message
/// of its own, which keeps the kind but not the errno).
fn mounting(error: io::Error) -> io::Error {
    let refused = error.kind() == io::ErrorKind::PermissionDenied
        || matches!(error.raw_os_error(), Some(libc::EPERM | libc::ENODEV));
    if !refused {
        return error;
    }
    io::Error::new(
        error.kind(),
        format!(
            "{error} (the mount workload mounts FUSE file systems: it needs root, or the \
             right to open /dev/fuse and to mount)"
        ),
    )
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// The mount points of this process's mount namespace, from
/// `/proc/self/mountinfo`.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo.lines().filter_map(mount_point_of).collect())
}

/// The mount point of a line of `/proc/self/mountinfo`: its fifth field, in
/// which the kernel writes space, tab, newline and backslash as `\` and three
/// octal digits.
fn mount_point_of(line: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let field = line.split(' ').nth(4)?.as_bytes();
    let mut path = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (field[i], octal) {
            (b'\\', Some(byte)) => {
                path.push(byte);
                i += 4;
            }
            (byte, _) => {
                path.push(byte);
                i += 1;
            }
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(path)))
}

/// The table of the report's `mount` rows: a row per target, a column per
/// operation (and per cached-read thread count, with one thread's rate
/// beside the total where there are several), then filemap's ratios to the
/// other two. `None` if the report has no `mount` row.
pub fn table(report: &Report) -> Option<String> {
    let rows: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.workload == WORKLOAD)
        .collect();
    if rows.is_empty() {
        return None;
    }
    let mut threads: Vec<usize> = rows
        .iter()
        .filter(|r| r.op == CACHED_READ)
        .map(|r| r.threads)
        .collect();
    threads.sort_unstable();
    threads.dedup();
    let mut columns: Vec<Column> = Vec::new();
    for &t in &threads {
        let total = Column {
            op: CACHED_READ,
            unit: format!("reads/s, {t}t"),
            threads: t,
            figure: |r| r.ops_per_s,
        };
        columns.push(total);
        if t > 1 {
            columns.push(Column {
                op: CACHED_READ,
                unit: format!("per thread, {t}t"),
                threads: t,
                figure: |r| r.per_thread_ops_per_s,
            });
        }
    }
    columns.push(Column {
        op: UNCACHED_READ,
        unit: "MiB/s".to_owned(),
        threads: 1,
        figure: |r| r.ops_per_s,
    });
    columns.push(Column {
        op: WRITE_FSYNC,
        unit: "writes/s".to_owned(),
        threads: 1,
        figure: |r| r.ops_per_s,
    });
    let figure = |kind: TargetKind, column: &Column| {
        rows.iter()
            .find(|r| r.strategy == kind.name() && r.op == column.op && r.threads == column.threads)
            .map(|r| (column.figure)(r))
    };

    const FIRST: usize = 22;
    const WIDTH: usize = 16;
    let mut lines = [format!("{WORKLOAD:<FIRST$}"), format!("{:<FIRST$}", "")];
    for column in &columns {
        lines[0] += &format!(" {:>WIDTH$}", column.op);
        lines[1] += &format!(" {:>WIDTH$}", column.unit);
    }
    let mut out = lines.join("\n") + "\n";
    for kind in TargetKind::ALL {
        out += &format!("{:<FIRST$}", kind.name());
        for column in &columns {
            match figure(kind, column) {
                Some(value) => out += &format!(" {value:>WIDTH$.0}"),
                None => out += &format!(" {:>WIDTH$}", "-"),
            }
        }
        out.push('\n');
    }
    for against in [TargetKind::Passthrough, TargetKind::Host] {
        out += &format!("{:<FIRST$}", format!("filemap / {}", against.name()));
        for column in &columns {
            let ratio = match (figure(TargetKind::Filemap, column), figure(against, column)) {
                (Some(ours), Some(theirs)) if theirs > 0.0 => format!("{:.2}x", ours / theirs),
                _ => "-".to_owned(),
            };
            out += &format!(" {ratio:>WIDTH$}");
        }
        out.push('\n');
    }
    Some(out)
}

/// A column of [`table`]: a figure of the rows of one operation and thread
/// count.
struct Column {
    op: &'static str,
    unit: String,
    threads: usize,
    figure: fn(&Row) -> f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No mount point at or under `dir` is left in this process's namespace.
    fn mounted_under(dir: &Path) -> Vec<PathBuf> {
        let dir = dir.canonicalize().unwrap();
        mount_points()
            .unwrap()
            .into_iter()
            .filter(|point| point.starts_with(&dir))
            .collect()
    }

    fn tiny(dir: &Path) -> MountConfig {
        MountConfig {
            file_bytes: 4 << 20,
            budget_bytes: 8 << 20,
            settings: RunSettings {
                threads: vec![1, 2],
                runs: 1,
                seconds_per_run: 0.05,
                ..RunSettings::default()
            },
            dir: Some(dir.to_owned()),
            kernel_cache: false,
            readahead: filemap_fuse::MountOptions::default().readahead_mode,
            direct_reads: true,
            server_threads: 2,
        }
    }

    #[test]
    fn a_tiny_run_reports_every_target_operation_and_ratio_and_leaves_no_mount() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny(dir.path());
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        // Cached reads at 1 and 2 threads, the sequential read, the writes.
        assert_eq!(report.rows.len(), 3 * 4);
        for kind in TargetKind::ALL {
            for (op, threads) in [
                (CACHED_READ, 1),
                (CACHED_READ, 2),
                (UNCACHED_READ, 1),
                (WRITE_FSYNC, 1),
            ] {
                let row = report.find(WORKLOAD, kind.name(), op, threads);
                let row = row.unwrap_or_else(|| panic!("no {op} row of {}", kind.name()));
                assert!(row.ops_per_s > 0.0 && row.coherent, "{row:?}");
            }
        }
        assert_eq!(report.ratios.len(), 2 * 4);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.value.is_some_and(|v| v > 0.0)));
        let targeted: Vec<&str> = report
            .ratios
            .iter()
            .filter(|r| r.target.is_some())
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(targeted.len(), 3, "{targeted:?}");
        assert!(targeted
            .iter()
            .all(|n| n.starts_with("filemap / passthrough")));
        let table = table(&report).unwrap();
        for line in [
            "filemap ",
            "passthrough ",
            "host ",
            "filemap / passthrough",
            "filemap / host",
        ] {
            assert!(
                table.lines().any(|l| l.starts_with(line)),
                "{line}: {table}"
            );
        }
        assert_eq!(mounted_under(dir.path()), Vec::<PathBuf>::new());
        // The scratch directory is gone too.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_failing_measurement_leaves_no_mount() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny(dir.path());
        let failed = with_targets(&config, Strategy::DEFAULT, &mut |_| {}, |targets, _| {
            // Mounted, with a file open on each mount, when the error comes.
            let _open = [
                File::open(targets.path(TargetKind::Filemap))?,
                File::open(targets.path(TargetKind::Passthrough))?,
            ];
            assert_eq!(mounted_under(dir.path()).len(), 2);
            Err::<(), _>(io::Error::other("injected"))
        });
        assert_eq!(failed.unwrap_err().to_string(), "injected");
        assert_eq!(mounted_under(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_panic_leaves_no_mount() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny(dir.path());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_targets(
                &config,
                Strategy::DEFAULT,
                &mut |_| {},
                |_, _| -> io::Result<()> { panic!("injected") },
            )
        }));
        assert!(panicked.is_err());
        assert_eq!(mounted_under(dir.path()), Vec::<PathBuf>::new());
    }

    /// A file left open keeps `umount` from succeeding: the guard says so,
    /// and detaches the mount anyway.
    #[test]
    fn a_guard_detaches_a_busy_mount_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let (root, mnt) = (dir.path().join("files"), dir.path().join("mnt"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        std::fs::write(root.join("f"), b"kept").unwrap();
        let mut guard = MountGuard::passthrough(&root, &mnt, 2).unwrap();
        let open = File::open(mnt.join("f")).unwrap();
        let error = guard.unmount().unwrap_err();
        assert!(error.to_string().starts_with("unmounting "), "{error}");
        assert_eq!(mounted_under(dir.path()), Vec::<PathBuf>::new());
        // The detached file system serves its open file until it is closed.
        let mut read = [0; 4];
        open.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read, b"kept");
        drop(open);
        assert!(guard.unmount().is_ok(), "the second time does nothing");
    }

    /// What the pass-through forwards reaches the host file, and back.
    #[test]
    fn the_passthrough_forwards_create_write_read_size_and_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let (root, mnt) = (dir.path().join("files"), dir.path().join("mnt"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let mut guard = MountGuard::passthrough(&root, &mnt, 2).unwrap();
        {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(mnt.join("f"))
                .unwrap();
            let data = pattern(3 * PAGE_SIZE);
            file.write_all_at(&data, 100).unwrap();
            file.sync_all().unwrap();
            assert_eq!(std::fs::read(root.join("f")).unwrap()[100..], data[..]);
            let mut back = vec![0; data.len()];
            file.read_exact_at(&mut back, 100).unwrap();
            assert_eq!(back, data);
            file.set_len(10).unwrap();
            assert_eq!(file.metadata().unwrap().len(), 10);
            assert_eq!(std::fs::metadata(root.join("f")).unwrap().len(), 10);
            // A read past the end of file returns what there is.
            let mut short = [0; 64];
            assert_eq!(file.read_at(&mut short, 0).unwrap(), 10);
            let host = std::fs::read(root.join("f")).unwrap();
            assert_eq!(&short[..10], &host[..]);
        }
        assert_eq!(
            File::open(mnt.join("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        guard.unmount().unwrap();
        assert_eq!(mounted_under(dir.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn mount_points_are_decoded_from_mountinfo() {
        let line =
            "36 35 98:0 /mnt1 /mnt/with\\040space\\134x rw,noatime master:1 - ext3 /dev/root rw";
        assert_eq!(
            mount_point_of(line),
            Some(PathBuf::from("/mnt/with space\\x"))
        );
        assert_eq!(
            mount_point_of("1 2 3:4 / /proc rw - proc proc rw"),
            Some("/proc".into())
        );
        assert_eq!(mount_point_of("short line"), None);
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }

    #[test]
    fn a_refused_mount_says_what_it_takes() {
        let named = io::Error::new(io::ErrorKind::PermissionDenied, "/mnt: Permission denied");
        for refused in [named, io::Error::from_raw_os_error(libc::EPERM)] {
            let error = mounting(refused);
            assert!(error.to_string().contains("it needs root"), "{error}");
        }
        let busy = mounting(io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
    }

    #[test]
    fn targets_know_their_place() {
        for (i, kind) in TargetKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            MountConfig {
                file_bytes: 0,
                ..MountConfig::default()
            },
            MountConfig {
                file_bytes: 3 * PAGE,
                ..MountConfig::default()
            },
            MountConfig {
                budget_bytes: 128 << 20,
                ..MountConfig::default()
            },
            MountConfig {
                server_threads: 0,
                ..MountConfig::default()
            },
            MountConfig {
                settings: RunSettings {
                    threads: vec![0],
                    ..RunSettings::default()
                },
                ..MountConfig::default()
            },
        ] {
            assert!(check(&config).is_err(), "{config:?}");
        }
        assert!(check(&MountConfig::default()).is_ok());
    }
}
