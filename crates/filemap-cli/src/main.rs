//! The `filemap` command: proves the page cache coherent under torture.

mod progress;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use filemap::Strategy;
use filemap_torture::{
    BackendKind, DeviceSpec, OpKind, Peer, Scenario, TortureConfig, TortureReport,
};
use progress::{Length, Progress};

mod mount;

#[derive(Parser)]
#[command(
    name = "filemap",
    version,
    about = "A page cache that stays coherent under hole punch, truncate and direct I/O"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Race every cache operation over files sharing one volume and check every
    /// page read against the stale-data oracle. Exits 0 when every strategy but
    /// `none` (and every peer cache, there to be measured) had no stale,
    /// foreign or torn page and no I/O error, 1 otherwise
    /// (`--scenario differential`: 0 when no sequence, under any strategy,
    /// diverged from the kernel).
    Torture(TortureArgs),
    /// Measure every strategy (and a kernel or memory baseline where one makes
    /// sense) on the given workloads, all in one invocation, and print the
    /// ratios the project's targets are set on (medians of several runs).
    Bench(BenchArgs),
    /// Create a volume image, to mount with `filemap mount`.
    Format(mount::FormatArgs),
    /// A worker process of `filemap torture --mount` (started by it).
    #[command(name = "torture-worker", hide = true)]
    TortureWorker(TortureWorkerArgs),
    /// Serve a volume image (or, with --passthrough, a host directory) as a
    /// file system (FUSE) whose every file is a mapping of one coherent
    /// cache, in the foreground until Ctrl-C, SIGTERM or `umount`, which sync
    /// everything first. Exits 0 then, 2 if it cannot mount.
    Mount(mount::MountArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Workloads to run (default: all). hit: 4 KiB read_at hits on a cached
    /// file, against kernel pread and memcpy. mixed: readers, a writer and a
    /// puncher on one file, punches on other ranges (mixed-disjoint) and on the
    /// readers' (mixed-overlap). direct: 2 direct writers beside buffered
    /// readers. starve: punch latency under a storm of reads and map faults on
    /// its range, against no storm. fault: memory map faults and map reads.
    /// evict: the eviction policies' hit ratios on the same traces, and the
    /// bookkeeping per cached page. pin: a pin, a 64-byte read in place and the
    /// unpin of a cached page, against read_at of 64 bytes and of the page.
    /// seqread: a sequential read of an uncached
    /// file against a raw read of its device. open: open, first 4 KiB read and
    /// close of small files, against the kernel; and the threads, descriptors,
    /// VMAs and resident bytes of 100,000 open mappings, 1,000 of them read.
    /// mount: cached random reads, uncached sequential reads and random writes
    /// with fsync through a mounted volume image (FUSE), against a pass-through
    /// FUSE file system and the host file system (needs the right to mount).
    #[arg(value_enum)]
    workloads: Vec<WorkloadArg>,
    /// Timed runs of every configuration (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = whole_number::<usize>)]
    runs: usize,
    /// Seconds of one timed run.
    #[arg(long, visible_alias = "seconds-per-run", default_value_t = 0.5, value_parser = positive_seconds)]
    seconds: f64,
    /// Thread counts to measure, comma-separated: hit readers (default 1,2),
    /// mixed and direct reader threads (default 2, beside their writers and
    /// puncher), starve storm threads (default one per processor but the
    /// puncher's), mount cached readers (default 1,2). Not used by fault,
    /// evict, seqread and open.
    #[arg(long, value_delimiter = ',', value_parser = whole_number::<usize>)]
    threads: Option<Vec<usize>>,
    /// Strategies to measure, comma-separated (default: every strategy).
    #[arg(long, value_delimiter = ',', value_parser = strategy_parser())]
    strategy: Vec<Strategy>,
    /// hit and fault: the file's size in MiB (default 16); mount: the size of
    /// its file on each target (default 256).
    #[arg(long, value_parser = whole_number::<u64>)]
    file_mib: Option<u64>,
    /// mixed, direct and starve: the page cache budget in bytes (default: mixed
    /// is 31/32 of its readers' region; direct and starve
    /// their whole file). hit and fault always cache their whole file. mount:
    /// the mounted cache's budget (default 536870912, 512 MiB; at least the
    /// file).
    #[arg(long, visible_alias = "budget", value_parser = whole_number::<u64>)]
    cache_bytes: Option<u64>,
    /// open: the small files opened, read and closed in turns (default 2000).
    #[arg(long, value_parser = whole_number::<usize>)]
    files: Option<usize>,
    /// open: the mappings held open at once in the resource count (default
    /// 100000; every 100th is read).
    #[arg(long, value_parser = whole_number::<usize>)]
    mappings: Option<usize>,
    /// mount: filemap's mount keeps the kernel's page cache in front of
    /// filemap's (as `filemap mount --kernel-cache`).
    #[arg(long)]
    kernel_cache: bool,
    /// mount: when filemap's mounted cache reads ahead (as `filemap mount
    /// --readahead`).
    #[arg(long, value_enum, default_value_t = mount::ReadaheadArg::Always)]
    readahead: mount::ReadaheadArg,
    /// mount: filemap's mount reads its image through the host's page cache
    /// even for large reads (as `filemap mount --no-direct-reads`).
    #[arg(long)]
    no_direct_reads: bool,
    /// mount: the threads serving each FUSE server, filemap's and the
    /// pass-through's (as `filemap mount --threads`; default one per
    /// processor, at least 2, at most 16).
    #[arg(long, value_parser = whole_number::<usize>)]
    server_threads: Option<usize>,
    /// Print one JSON object per row, per ratio and per note, one per line.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart comparing the strategies to FILE, one panel per workload.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkloadArg {
    Hit,
    Mixed,
    Direct,
    Starve,
    Fault,
    Evict,
    Pin,
    Seqread,
    Open,
    Mount,
    All,
}

/// The workloads, in the order `all` runs them.
const WORKLOADS: [WorkloadArg; 10] = [
    WorkloadArg::Hit,
    WorkloadArg::Mixed,
    WorkloadArg::Direct,
    WorkloadArg::Starve,
    WorkloadArg::Fault,
    WorkloadArg::Evict,
    WorkloadArg::Pin,
    WorkloadArg::Seqread,
    WorkloadArg::Open,
    WorkloadArg::Mount,
];

/// Strategy names as the library parses them (`Strategy::from_str`), with
/// the names `--help` and a bad value's error list.
fn strategy_parser() -> impl clap::builder::TypedValueParser<Value = Strategy> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(strategy_values()).map(|name| {
        name.parse::<Strategy>()
            .expect("every possible value is a strategy's name")
    })
}

/// What `filemap torture` runs: a strategy of filemap, or a peer cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Filemap(Strategy),
    Peer(Peer),
}

/// Each strategy's name, with its summary for `--help`.
fn strategy_values() -> [clap::builder::PossibleValue; Strategy::ALL.len()] {
    Strategy::ALL
        .map(|strategy| clap::builder::PossibleValue::new(strategy.name()).help(strategy.summary()))
}

/// Strategy names, then the peers' (`moka`, `quick_cache`, `foyer`).
fn subject_parser() -> impl clap::builder::TypedValueParser<Value = Subject> {
    use clap::builder::TypedValueParser;
    let peers = Peer::ALL.map(|peer| {
        clap::builder::PossibleValue::new(peer.name()).help(format!(
            "{}, as a read-through page cache (a peer: its violations do not fail the run)",
            peer.version()
        ))
    });
    let names = strategy_values().into_iter().chain(peers);
    clap::builder::PossibleValuesParser::new(names).map(|name| match Peer::from_name(&name) {
        Some(peer) => Subject::Peer(peer),
        None => Subject::Filemap(
            name.parse::<Strategy>()
                .expect("every possible value is a strategy's or a peer's name"),
        ),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    /// Many files on one device with a block allocator that reuses freed blocks
    /// at once (differential: the volume on memory, on an image file, and on an
    /// image file opened with O_DIRECT).
    Volume,
    /// One host file per mapping: pread/pwrite, fallocate, O_DIRECT.
    Hostfile,
    /// differential only: a volume on memory.
    VolumeMem,
    /// differential only: a volume on an image file.
    VolumeFile,
    /// differential only: a volume on an image file opened with O_DIRECT.
    VolumeDirect,
    /// Every backend, one after the other (the default of `differential`).
    All,
}

#[derive(clap::Args)]
struct TortureArgs {
    /// The strategy to run, every strategy in turn if omitted; or a peer
    /// cache (`moka`, `quick_cache`, `foyer`) over the same backends, under
    /// the same oracle, without maps and pins.
    #[arg(long, value_parser = subject_parser())]
    strategy: Option<Subject>,
    /// The backend the files live in (default: `volume`; `all` for
    /// `--scenario differential`).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Volume: `mem` for memory, or the path of an image file or block device
    /// (its contents are overwritten). Host files: the directory to create them
    /// in. Default: a temporary image file or directory, removed afterwards.
    /// `differential`: the directory of the kernel's files, host files and
    /// images (its file system is the one compared with).
    #[arg(long, value_name = "mem|PATH")]
    device: Option<String>,
    /// Seconds to run each strategy (`differential`: the whole run, shared
    /// round-robin by every backend and strategy; shrinking comes on top).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Worker threads.
    #[arg(long, default_value_t = 6, value_parser = whole_number::<usize>)]
    threads: usize,
    /// Files sharing the volume.
    #[arg(long, default_value_t = 4, value_parser = whole_number::<usize>)]
    files: usize,
    /// Pages of each file (by default 4 files of 2048 pages: 32 MiB, four
    /// times the default budget, so that pages are evicted all the time).
    /// With --mount the default is 64: each call there is a round trip
    /// through the kernel, so races meet only on fewer pages.
    #[arg(long, value_parser = whole_number::<u64>)]
    pages: Option<u64>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1, value_parser = whole_number::<u64>)]
    seed: u64,
    /// Percentage of device reads and writes delayed to widen race windows
    /// (0 turns delays off).
    #[arg(long, default_value_t = 20, value_parser = whole_number::<u32>)]
    delay_percent: u32,
    /// The longest injected delay, in microseconds (the shortest is a tenth of it).
    #[arg(long, default_value_t = 200, value_parser = whole_number::<u64>)]
    max_delay_us: u64,
    /// The page cache budget in bytes: by default a quarter of the files, so
    /// that eviction races every operation too. At least 16 KiB per thread
    /// (room for each thread's largest operation).
    #[arg(long, default_value_t = DEFAULT_TORTURE_CACHE_BYTES, value_parser = whole_number::<u64>)]
    cache_bytes: u64,
    /// Print one JSON object per strategy, one per line, instead of the table.
    #[arg(long)]
    json: bool,
    /// Leave stores through memory maps (`map_write`) out of the mix.
    #[arg(long)]
    no_map_writes: bool,
    /// `mixed`: every operation from every thread. `self-map-dio`: three threads
    /// do direct I/O through maps of each other's files while a fourth punches
    /// (ignores --threads and --files). `async`: the mixed workload through
    /// the async front (a Tokio runtime per worker), one future in four
    /// dropped at a random point. `differential`: random sequences of
    /// every call on one thread, applied to filemap and to a file of the host
    /// through the kernel, compared after every call; each divergence is shrunk
    /// to a reproducer (uses --seconds, --seed, --backend, --strategy, --device,
    /// --json, --shrink-seconds).
    #[arg(long, value_enum, default_value = "mixed")]
    scenario: ScenarioArg,
    /// Make every operation through a FUSE mount of the volume (`filemap
    /// mount`'s file system, served in this process by the cache under
    /// test), each worker a process of its own using the kernel's file API:
    /// pread, pwrite, O_DIRECT, fallocate, ftruncate, fsync and shared maps.
    /// Invalidations go through the library, beside the mount.
    #[arg(long)]
    mount: bool,
    /// With --mount: the kernel's page cache in front of filemap's.
    #[arg(long, requires = "mount")]
    kernel_cache: bool,
    /// With --mount: when the mounted cache's readahead threads read a
    /// sequential stream's next window (as `filemap mount --readahead`).
    #[arg(long, value_enum, requires = "mount", default_value_t = mount::ReadaheadArg::Always)]
    readahead: mount::ReadaheadArg,
    /// `differential`: the most seconds spent shrinking each divergence.
    #[arg(long, default_value_t = 30.0, value_parser = seconds_or_zero)]
    shrink_seconds: f64,
}

#[derive(clap::Args)]
struct TortureWorkerArgs {
    /// The mount point.
    dir: PathBuf,
    /// The run's files, `file0` on.
    files: usize,
    /// Pages of each file.
    pages: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScenarioArg {
    Mixed,
    SelfMapDio,
    Async,
    Differential,
}

/// The torture's default budget: a quarter of its default files (4 of 2048
/// pages), so that the default run evicts.
const DEFAULT_TORTURE_CACHE_BYTES: u64 = 8 << 20;

/// The torture's pages per file, by default.
const DEFAULT_TORTURE_PAGES: u64 = 2048;

/// The same through a mount: fewer, so that the workers' calls, each a round
/// trip through the kernel, still meet on the same pages often (`none`
/// shows stale pages within seconds).
const DEFAULT_MOUNT_TORTURE_PAGES: u64 = 64;

/// A number of seconds above zero.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err("must be a positive number of seconds, such as 10 or 0.5".to_owned()),
    }
}

/// A number of seconds, zero included.
fn seconds_or_zero(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err("must be a number of seconds, 0 or more".to_owned()),
    }
}

/// A whole number, with a message that says so.
fn whole_number<T: FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| "must be a whole number, 0 or more".to_owned())
}

/// Rust ignores SIGPIPE, so that a write to a pipe whose reader has gone
/// fails with `EPIPE`, on which `println!` panics. A Unix tool is killed by
/// the signal instead, quietly (exit status 141 in a shell), as `cat` and
/// `seq` are under `| head -1`: restore the default action.
fn die_quietly_on_closed_pipes() {
    // SAFETY: `signal` only sets the process's disposition of SIGPIPE to the
    // default (terminate): no handler is installed, so no code of ours ever
    // runs in signal context, and nothing in this program relies on SIGPIPE
    // being ignored (it writes to no pipe or socket but stdout and stderr).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The command line, where a negative number is the value of the option
/// before it: `--seconds -1` is refused by the option's parser, with a
/// message that says what it takes, rather than taken for an unknown option.
fn command_line() -> clap::Command {
    Cli::command().mut_subcommands(|subcommand| {
        subcommand.mut_args(|arg| {
            let takes_values = arg.get_action().takes_values();
            arg.allow_negative_numbers(takes_values)
        })
    })
}

fn main() -> ExitCode {
    die_quietly_on_closed_pipes();
    let cli = Cli::from_arg_matches(&command_line().get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Torture(args) => torture(args),
        Command::Bench(args) => bench(args),
        Command::Format(args) => mount::format(args),
        Command::Mount(args) => mount::mount(args),
        Command::TortureWorker(args) => torture_worker(args),
    }
}

/// One workload's settings, ready to run.
enum BenchConfig {
    Hit(filemap_bench::hit::HitConfig),
    Mixed(filemap_bench::mixed::MixedConfig),
    Direct(filemap_bench::direct::DirectConfig),
    Starve(filemap_bench::starve::StarveConfig),
    Fault(filemap_bench::fault::FaultConfig),
    Evict(filemap_bench::evict::EvictConfig),
    Pin(filemap_bench::pin::PinConfig),
    Seqread(filemap_bench::seqread::SeqReadConfig),
    Open(filemap_bench::open::OpenConfig),
    Mount(filemap_bench::mount::MountConfig),
}

impl BenchConfig {
    fn check(&self) -> std::io::Result<()> {
        match self {
            BenchConfig::Hit(c) => filemap_bench::hit::check(c),
            BenchConfig::Mixed(c) => filemap_bench::mixed::check(c),
            BenchConfig::Direct(c) => filemap_bench::direct::check(c),
            BenchConfig::Starve(c) => filemap_bench::starve::check(c),
            BenchConfig::Fault(c) => filemap_bench::fault::check(c),
            BenchConfig::Evict(c) => filemap_bench::evict::check(c),
            BenchConfig::Pin(c) => filemap_bench::pin::check(c),
            BenchConfig::Seqread(c) => filemap_bench::seqread::check(c),
            BenchConfig::Open(c) => filemap_bench::open::check(c),
            BenchConfig::Mount(c) => filemap_bench::mount::check(c),
        }
    }

    fn steps(&self) -> usize {
        match self {
            BenchConfig::Hit(c) => filemap_bench::hit::steps(c),
            BenchConfig::Mixed(c) => filemap_bench::mixed::steps(c),
            BenchConfig::Direct(c) => filemap_bench::direct::steps(c),
            BenchConfig::Starve(c) => filemap_bench::starve::steps(c),
            BenchConfig::Fault(c) => filemap_bench::fault::steps(c),
            BenchConfig::Evict(c) => filemap_bench::evict::steps(c),
            BenchConfig::Pin(c) => filemap_bench::pin::steps(c),
            BenchConfig::Seqread(c) => filemap_bench::seqread::steps(c),
            BenchConfig::Open(c) => filemap_bench::open::steps(c),
            BenchConfig::Mount(c) => filemap_bench::mount::steps(c),
        }
    }

    fn run(
        &self,
        progress: &mut dyn FnMut(filemap_bench::Progress<'_>),
    ) -> std::io::Result<filemap_bench::Report> {
        match self {
            BenchConfig::Hit(c) => filemap_bench::hit::run(c, progress),
            BenchConfig::Mixed(c) => filemap_bench::mixed::run(c, progress),
            BenchConfig::Direct(c) => filemap_bench::direct::run(c, progress),
            BenchConfig::Starve(c) => filemap_bench::starve::run(c, progress),
            BenchConfig::Fault(c) => filemap_bench::fault::run(c, progress),
            BenchConfig::Evict(c) => filemap_bench::evict::run(c, progress),
            BenchConfig::Pin(c) => filemap_bench::pin::run(c, progress),
            BenchConfig::Seqread(c) => filemap_bench::seqread::run(c, progress),
            BenchConfig::Open(c) => filemap_bench::open::run(c, progress),
            BenchConfig::Mount(c) => filemap_bench::mount::run(c, progress),
        }
    }
}

/// The settings of every workload selected, in the order they run, checked.
fn bench_configs(args: &BenchArgs) -> Result<Vec<BenchConfig>, String> {
    let all = args.workloads.is_empty() || args.workloads.contains(&WorkloadArg::All);
    let strategies = if args.strategy.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        args.strategy.clone()
    };
    let file_mib = |default: u64| match args.file_mib {
        Some(mib) => mib
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("--file-mib {mib} is too large")),
        None => Ok(default << 20),
    };
    let file_bytes = file_mib(16)?;
    let settings = filemap_bench::RunSettings {
        runs: args.runs,
        seconds_per_run: args.seconds,
        strategies,
        ..Default::default()
    };
    // What a thread does differs by workload, and so does the default count.
    let with_threads = |default: &[usize]| filemap_bench::RunSettings {
        threads: args.threads.clone().unwrap_or_else(|| default.to_vec()),
        ..settings.clone()
    };
    let mut configs = Vec::new();
    for workload in WORKLOADS {
        if !all && !args.workloads.contains(&workload) {
            continue;
        }
        configs.push(match workload {
            WorkloadArg::Hit => BenchConfig::Hit(filemap_bench::hit::HitConfig {
                file_bytes,
                settings: with_threads(&[1, 2]),
            }),
            WorkloadArg::Mixed => BenchConfig::Mixed(filemap_bench::mixed::MixedConfig {
                cache_bytes: args.cache_bytes,
                settings: with_threads(&[2]),
                ..Default::default()
            }),
            WorkloadArg::Direct => BenchConfig::Direct(filemap_bench::direct::DirectConfig {
                cache_bytes: args.cache_bytes,
                settings: with_threads(&[2]),
                ..Default::default()
            }),
            WorkloadArg::Starve => BenchConfig::Starve(filemap_bench::starve::StarveConfig {
                cache_bytes: args.cache_bytes,
                settings: with_threads(&[filemap_bench::starve::default_storm_threads()]),
                ..Default::default()
            }),
            WorkloadArg::Fault => BenchConfig::Fault(filemap_bench::fault::FaultConfig {
                file_bytes,
                // Fault runs on one thread: `--threads` is not for it.
                settings: settings.clone(),
            }),
            WorkloadArg::Evict => BenchConfig::Evict(filemap_bench::evict::EvictConfig::default()),
            WorkloadArg::Pin => BenchConfig::Pin(filemap_bench::pin::PinConfig {
                file_bytes,
                settings: with_threads(&[1, 2]),
            }),
            WorkloadArg::Seqread => BenchConfig::Seqread(filemap_bench::seqread::SeqReadConfig {
                runs: args.runs,
                ..Default::default()
            }),
            WorkloadArg::Open => {
                let defaults = filemap_bench::open::OpenConfig::default();
                BenchConfig::Open(filemap_bench::open::OpenConfig {
                    files: args.files.unwrap_or(defaults.files),
                    mappings: args.mappings.unwrap_or(defaults.mappings),
                    // One thread opens: `--threads` is not for it.
                    settings: settings.clone(),
                })
            }
            WorkloadArg::Mount => {
                let defaults = filemap_bench::mount::MountConfig::default();
                BenchConfig::Mount(filemap_bench::mount::MountConfig {
                    file_bytes: file_mib(defaults.file_bytes >> 20)?,
                    budget_bytes: args.cache_bytes.unwrap_or(defaults.budget_bytes),
                    settings: with_threads(&defaults.settings.threads),
                    dir: None,
                    kernel_cache: args.kernel_cache,
                    readahead: args.readahead.mode(),
                    direct_reads: !args.no_direct_reads,
                    server_threads: args.server_threads.unwrap_or(defaults.server_threads),
                })
            }
            WorkloadArg::All => unreachable!("`all` is not in WORKLOADS"),
        });
    }
    for config in &configs {
        config.check().map_err(|e| e.to_string())?;
    }
    if let Some(plot) = &args.plot {
        let parent = plot.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|dir| !dir.is_dir()) {
            return Err(format!(
                "--plot {}: the directory does not exist",
                plot.display()
            ));
        }
    }
    Ok(configs)
}

fn bench(args: BenchArgs) -> ExitCode {
    let configs = match bench_configs(&args) {
        Ok(configs) => configs,
        Err(error) => {
            eprintln!("filemap bench: {error}");
            return ExitCode::from(2);
        }
    };
    let total: usize = configs.iter().map(BenchConfig::steps).sum();
    let began = Instant::now();
    let mut shown = Progress::new("filemap bench", "", Length::Steps(total as u64));
    let mut started = 0u64;
    let mut report = filemap_bench::Report::default();
    for config in &configs {
        let result = config.run(&mut |progress| match progress {
            filemap_bench::Progress::Setup(what) => shown.update(started as f64, what),
            filemap_bench::Progress::Step(what) => {
                shown.update(started as f64, what);
                started += 1;
            }
        });
        match result {
            Ok(part) => report.append(part),
            Err(error) => return shown.failed(&error, 1),
        }
    }
    shown.finish(&format!(
        "done, {total} steps in {:.1} s",
        began.elapsed().as_secs_f64()
    ));
    print_bench_report(&report, args.json, args.runs, args.seconds);
    if let Some(path) = &args.plot {
        if let Err(error) = filemap_bench::plot::write_svg(&report, path) {
            eprintln!("filemap bench: --plot {}: {error}", path.display());
            return ExitCode::from(1);
        }
        if !args.json {
            println!("\nchart written to {}", path.display());
        }
    }
    ExitCode::SUCCESS
}

/// Prints a report's rows, ratios and notes: tables, or one JSON object per line.
fn print_bench_report(report: &filemap_bench::Report, json: bool, runs: usize, seconds: f64) {
    if json {
        for row in &report.rows {
            println!("{}", serde_json::to_string(row).expect("rows serialise"));
        }
        for ratio in &report.ratios {
            println!(
                "{}",
                serde_json::to_string(ratio).expect("ratios serialise")
            );
        }
        for note in &report.notes {
            println!("{}", serde_json::json!({ "note": note }));
        }
        return;
    }
    println!(
        "{:<15} {:<16} {:<14} {:>7} {:>12} {:>12} {:>9} {:>9} {:>9}",
        "workload",
        "strategy",
        "op",
        "threads",
        "ops/s",
        "ops/s/thread",
        "p50 us",
        "p99 us",
        "max us"
    );
    let mut incoherent = false;
    let mut last_workload = None;
    for r in &report.rows {
        if last_workload.is_some_and(|w| w != r.workload.as_str()) {
            println!();
        }
        last_workload = Some(r.workload.as_str());
        let strategy = if r.coherent {
            r.strategy.clone()
        } else {
            incoherent = true;
            format!("{}*", r.strategy)
        };
        println!(
            "{:<15} {:<16} {:<14} {:>7} {:>12.0} {:>12.0} {:>9} {:>9} {:>9}",
            r.workload,
            strategy,
            r.op,
            r.threads,
            r.ops_per_s,
            r.per_thread_ops_per_s,
            micros(r.p50_us),
            micros(r.p99_us),
            micros(r.max_us)
        );
    }
    println!("\nmedians of {runs} runs of {seconds} s each");
    if incoherent {
        println!("* takes no coherence lock (incoherent): for reference only, in no ratio");
    }
    if let Some(table) = filemap_bench::mount::table(report) {
        println!("\n{table}");
    }
    if report.rows.iter().any(|r| r.workload == "fault") {
        println!(
            "fault: fault rows count pages first touched per second (the touching alone); \
             read rows count 4 KiB reads per second"
        );
    }
    println!();
    for ratio in &report.ratios {
        // A count or a size, not a ratio, has no `x`, and a whole count no
        // decimals.
        let unit = if ratio.absolute { " " } else { "x" };
        let value = match ratio.value {
            Some(value) if ratio.absolute && value.fract() == 0.0 => format!("{value:>8.0}{unit}"),
            // Two decimals, or three significant digits below 0.1, so that a
            // strategy that starves an operation does not read as zero.
            Some(value) if value != 0.0 && value.abs() < 0.1 => {
                let decimals = (-value.abs().log10().floor()) as usize + 2;
                format!("{value:>8.decimals$}{unit}")
            }
            Some(value) => format!("{value:>8.2}{unit}"),
            None => format!("{:>9}", "n/a"),
        };
        let note = ratio
            .note
            .as_deref()
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default();
        println!(
            "{:<15} {:<78} {value} {}{note}",
            ratio.workload,
            ratio.name,
            ratio.verdict()
        );
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}

/// A latency for the table: blank when none was taken.
fn micros(us: f64) -> String {
    if us.is_finite() && us < 1.0 {
        format!("{us:.2}")
    } else if us.is_finite() {
        format!("{us:.1}")
    } else {
        "-".to_owned()
    }
}

fn torture_worker(args: TortureWorkerArgs) -> ExitCode {
    match filemap_torture::mount::serve_worker(&args.dir, args.files, args.pages) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("filemap torture-worker: {error}");
            ExitCode::from(2)
        }
    }
}

fn torture(args: TortureArgs) -> ExitCode {
    if args.scenario == ScenarioArg::Differential && args.mount {
        eprintln!("filemap torture: --mount runs the mixed scenario, not differential");
        return ExitCode::from(2);
    }
    if args.scenario == ScenarioArg::Differential {
        return differential(args);
    }
    let backends = match args.backend.unwrap_or(BackendArg::Volume) {
        BackendArg::Volume => vec![BackendKind::Volume],
        BackendArg::Hostfile => vec![BackendKind::HostFile],
        BackendArg::All => vec![BackendKind::Volume, BackendKind::HostFile],
        BackendArg::VolumeMem | BackendArg::VolumeFile | BackendArg::VolumeDirect => {
            eprintln!(
                "filemap torture: --backend volume-mem, volume-file and volume-direct are for \
                 --scenario differential (use --device mem for a volume in memory)"
            );
            return ExitCode::from(2);
        }
    };
    let device = match args.device.as_deref() {
        None => DeviceSpec::TempFile,
        Some("mem") => DeviceSpec::Mem,
        Some(path) => DeviceSpec::Path(PathBuf::from(path)),
    };
    let subjects: Vec<Subject> = match args.strategy {
        Some(subject) => vec![subject],
        None => Strategy::ALL.map(Subject::Filemap).to_vec(),
    };
    let mount = match args.mount {
        true => match std::env::current_exe() {
            Ok(worker) => Some(filemap_torture::mount::MountSettings {
                worker,
                kernel_cache: args.kernel_cache,
                readahead: args.readahead.mode(),
            }),
            Err(error) => {
                eprintln!("filemap torture: --mount: this program's path: {error}");
                return ExitCode::from(2);
            }
        },
        false => None,
    };
    let configs: Vec<TortureConfig> = backends
        .iter()
        .flat_map(|&backend| subjects.iter().map(move |&subject| (backend, subject)))
        .map(|(backend, subject)| TortureConfig {
            strategy: match subject {
                Subject::Filemap(strategy) => strategy,
                Subject::Peer(_) => Strategy::DEFAULT,
            },
            peer: match subject {
                Subject::Filemap(_) => None,
                Subject::Peer(peer) => Some(peer),
            },
            backend,
            device: device.clone(),
            seconds: args.seconds,
            threads: args.threads,
            files: args.files,
            pages_per_file: args.pages.unwrap_or(match args.mount {
                true => DEFAULT_MOUNT_TORTURE_PAGES,
                false => DEFAULT_TORTURE_PAGES,
            }),
            seed: args.seed,
            delay_percent: args.delay_percent,
            max_delay_us: args.max_delay_us,
            cache_bytes: args.cache_bytes,
            stop_on_violation: false,
            map_writes: !args.no_map_writes,
            mount: mount.clone(),
            scenario: match args.scenario {
                ScenarioArg::Mixed => Scenario::Mixed,
                ScenarioArg::SelfMapDio => Scenario::SelfMapDio,
                ScenarioArg::Async => Scenario::Async,
                ScenarioArg::Differential => unreachable!("handled by `differential`"),
            },
        })
        .collect();
    // Settings that cannot work are bad usage, refused before anything runs.
    if let Some(error) = configs.iter().find_map(|config| config.check().err()) {
        eprintln!("filemap torture: {error}");
        return ExitCode::from(2);
    }
    let mut reports = Vec::new();
    for config in &configs {
        let through = match &config.mount {
            Some(settings) => format!(" through the {}", settings.name()),
            None => String::new(),
        };
        let subject = config.peer.map_or(config.strategy.name(), Peer::name);
        let label = format!("{}/{subject}{through}", config.backend.name());
        let mut shown = Progress::new("filemap torture", label, Length::Seconds(args.seconds));
        let result = filemap_torture::run(config, |progress| {
            let message = format!("{} ops, {} violations", progress.ops, progress.violations);
            shown.update(progress.elapsed, &message);
        });
        let report = match result {
            Ok(report) => report,
            Err(error) => return shown.failed(&error, 2),
        };
        shown.finish(&format!(
            "done in {:.1} s, {} ops, {} violations, {} errors",
            report.seconds,
            report.ops,
            report.violations(),
            report.errors
        ));
        if args.json {
            let line = serde_json::to_string(&report).expect("reports serialise");
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
        reports.push(report);
    }
    if !args.json {
        print_table(&reports);
    }
    let failed: Vec<String> = reports
        .iter()
        // `none` and the peers are there to be caught: their findings are
        // the measurement, not a failure (a peer's I/O errors still are).
        .filter(|r| match Peer::from_name(&r.strategy) {
            Some(_) => r.errors > 0,
            None => r.strategy != Strategy::None.name() && !r.is_clean(),
        })
        .map(|r| format!("{}/{}", r.backend, r.strategy))
        .collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "filemap torture: violations or errors under: {}",
            failed.join(", ")
        );
        ExitCode::from(1)
    }
}

fn print_table(reports: &[TortureReport]) {
    println!(
        "{:<16} {:<9} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7} {:>10}",
        "strategy", "backend", "ops", "checked", "stale", "foreign", "torn", "errors", "ops/s"
    );
    for r in reports {
        println!(
            "{:<16} {:<9} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7} {:>10.0}",
            r.strategy,
            r.backend,
            r.ops,
            r.reads_checked,
            r.stale,
            r.foreign,
            r.torn,
            r.errors,
            r.ops_per_s
        );
    }
    println!();
    print!("{:<26}", "ops by kind");
    for kind in OpKind::ALL {
        print!(" {kind:>12}");
    }
    println!();
    for r in reports {
        print!("{:<26}", format!("{}/{}", r.strategy, r.backend));
        for kind in OpKind::ALL {
            print!(" {:>12}", r.by_kind.get(kind.name()).copied().unwrap_or(0));
        }
        println!();
    }
    println!();
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "cache", "hits", "misses", "fills", "evictions", "writebacks", "peak bytes", "budget"
    );
    for r in reports {
        let c = &r.cache;
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            format!("{}/{}", r.strategy, r.backend),
            c.hits,
            c.misses,
            c.fills,
            c.evictions,
            c.writebacks,
            c.peak_cached_bytes,
            c.budget_bytes
        );
    }
    // Not violations, but said, so that no one takes them for nothing.
    for r in reports.iter().filter(|r| r.mixed_in_kernel_cache > 0) {
        println!(
            "\n{}/{}: {} pages mixed a write copying into the kernel's cache during the read (as ext4's reads may; not violations)",
            r.strategy, r.backend, r.mixed_in_kernel_cache
        );
    }
    for r in reports
        .iter()
        .filter(|r| r.map_stores_lost_by_kernel_fallocate > 0)
    {
        println!(
            "\n{}/{}: {} pages kept a version in place of a later store through a map made during a punch or zero range through the mount (the kernel's fallocate drops its pages after the server's change, with no lock against faults; not violations)",
            r.strategy, r.backend, r.map_stores_lost_by_kernel_fallocate
        );
    }
    for r in reports.iter().filter(|r| !r.examples.is_empty()) {
        println!("\nfirst findings under {}/{}:", r.strategy, r.backend);
        for example in &r.examples {
            println!("  {example}");
        }
    }
}

/// `filemap torture --scenario differential`: filemap against the kernel,
/// every backend and strategy chosen, round-robin for `--seconds`.
fn differential(args: TortureArgs) -> ExitCode {
    use filemap_torture::differential::{self, DiffBackend, DifferentialConfig};

    let backends = match args.backend.unwrap_or(BackendArg::All) {
        BackendArg::Volume => vec![
            DiffBackend::VolumeMem,
            DiffBackend::VolumeFile,
            DiffBackend::VolumeDirect,
        ],
        BackendArg::Hostfile => vec![DiffBackend::HostFile],
        BackendArg::VolumeMem => vec![DiffBackend::VolumeMem],
        BackendArg::VolumeFile => vec![DiffBackend::VolumeFile],
        BackendArg::VolumeDirect => vec![DiffBackend::VolumeDirect],
        BackendArg::All => DiffBackend::ALL.to_vec(),
    };
    let dir = match args.device.as_deref() {
        None => None,
        Some(path) if std::path::Path::new(path).is_dir() => Some(PathBuf::from(path)),
        Some(path) => {
            eprintln!(
                "filemap torture: --scenario differential needs --device to be a directory \
                 of the file system to compare with (got {path})"
            );
            return ExitCode::from(2);
        }
    };
    let strategies: Vec<Strategy> = match args.strategy {
        Some(Subject::Filemap(strategy)) => vec![strategy],
        Some(Subject::Peer(peer)) => {
            eprintln!(
                "filemap torture: --scenario differential compares filemap with the kernel;                  {peer} is a peer cache, for the mixed scenario"
            );
            return ExitCode::from(2);
        }
        None => Strategy::ALL.to_vec(),
    };
    let config = DifferentialConfig {
        seconds: args.seconds,
        seed: args.seed,
        backends,
        strategies,
        dir,
        shrink_seconds: args.shrink_seconds,
        ..DifferentialConfig::default()
    };
    let mut shown = Progress::new(
        "filemap torture",
        "differential",
        Length::Seconds(args.seconds),
    );
    let result = differential::run(&config, |progress| {
        let message = format!(
            "{} calls, {} sequences, {} diverged; {}/{}{}",
            progress.ops,
            progress.sequences,
            progress.divergences,
            progress.backend.name(),
            progress.strategy.name(),
            if progress.shrinking {
                " (shrinking)"
            } else {
                ""
            }
        );
        shown.update(progress.elapsed, &message);
    });
    let report = match result {
        Ok(report) => report,
        Err(error) => return shown.failed(&error, 2),
    };
    shown.finish(&format!(
        "done in {:.1} s, {} calls in {} sequences, {} diverged",
        report.seconds,
        report.ops,
        report.sequences,
        report.diverged_sequences()
    ));
    if args.json {
        for row in &report.rows {
            println!("{}", serde_json::to_string(row).expect("rows serialise"));
        }
        for divergence in &report.divergences {
            println!(
                "{}",
                serde_json::to_string(divergence).expect("divergences serialise")
            );
        }
    } else {
        print_differential(&report);
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "filemap torture: {} sequences diverged from the kernel ({} distinct divergences)",
            report.diverged_sequences(),
            report.divergences.len()
        );
        ExitCode::from(1)
    }
}

fn print_differential(report: &filemap_torture::differential::DifferentialReport) {
    println!(
        "{:<14} {:<16} {:>10} {:>10} {:>9} {:>10}",
        "backend", "strategy", "sequences", "ops", "diverged", "ops/s"
    );
    for r in &report.rows {
        println!(
            "{:<14} {:<16} {:>10} {:>10} {:>9} {:>10.0}",
            r.backend, r.strategy, r.sequences, r.ops, r.divergences, r.ops_per_s
        );
    }
    println!(
        "\n{} calls in {} sequences, {:.1} s ({:.0} calls/s), seed {}; {:.1} s shrinking",
        report.ops,
        report.sequences,
        report.seconds,
        report.ops_per_s,
        report.seed,
        report.shrink_seconds
    );
    println!(
        "kernel: largest file size {}, direct I/O {}",
        report.kernel.max_file_size,
        if report.kernel.direct_io {
            "O_DIRECT"
        } else {
            "buffered (O_DIRECT refused)"
        }
    );
    for note in &report.notes {
        println!("note: {note}");
    }
    for (i, d) in report.divergences.iter().enumerate() {
        let under = match d.seen_under.len() {
            n if n > 4 => format!("{}, and {} more", d.seen_under[..3].join(", "), n - 3),
            _ => d.seen_under.join(", "),
        };
        println!(
            "\ndivergence {} of {}: {} in {} (seen {} times, under {under})",
            i + 1,
            report.divergences.len(),
            d.kind.name(),
            d.op,
            d.occurrences,
        );
        println!("  {}", d.summary);
        println!(
            "  first found after {} calls, {:.1} s; {}",
            d.ops_before,
            d.seconds_before,
            if d.reproduced {
                format!(
                    "shrunk from {} to {} calls in {} runs",
                    d.original_calls, d.shrunk_calls, d.shrink_runs
                )
            } else if d.shrink_runs > 0 {
                format!(
                    "did not diverge again in {} runs (timing-dependent?): the calls as first run",
                    d.shrink_runs
                )
            } else {
                "not shrunk".to_owned()
            }
        );
        for line in d.reproducer.lines() {
            println!("  {line}");
        }
    }
}
