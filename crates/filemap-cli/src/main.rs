//! The `filemap` command: proves the page cache coherent under torture.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use filemap::Strategy;
use filemap_torture::{BackendKind, DeviceSpec, Scenario, TortureConfig, TortureReport, OP_KINDS};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// `none` had no stale, foreign or torn page and no I/O error, 1 otherwise.
    Torture(TortureArgs),
    /// Measure filemap against baselines run in the same invocation, and print
    /// the ratios the project's targets are set on.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// 4 KiB random read_at hits on a fully cached file, against kernel pread of
    /// a warm host file and a plain memcpy from the same frame memory.
    Hit(HitArgs),
    /// First touches of a memory map's pages (cached, and dropped from the
    /// cache) against a bare userfaultfd round trip, and 4 KiB reads through a
    /// map against a plain copy of the same memory.
    Fault(FaultArgs),
}

#[derive(clap::Args)]
struct FaultArgs {
    /// The file's size in MiB.
    #[arg(long, default_value_t = 16)]
    file_mib: u64,
    /// Timed runs of every variant (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of one timed run.
    #[arg(long, default_value_t = 0.5)]
    seconds_per_run: f64,
    /// The cache's coherence strategy.
    #[arg(long, value_enum, default_value = "range")]
    strategy: StrategyArg,
    /// Print one JSON object per row and per ratio, one per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct HitArgs {
    /// The file's size in MiB.
    #[arg(long, default_value_t = 16)]
    file_mib: u64,
    /// Thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed runs of every configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of one timed run.
    #[arg(long, default_value_t = 0.5)]
    seconds_per_run: f64,
    /// The cache's coherence strategy.
    #[arg(long, value_enum, default_value = "range")]
    strategy: StrategyArg,
    /// Print one JSON object per row and per ratio, one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    /// No lock: the pre-5.15 kernel race (must be caught).
    None,
    /// Reads serialised against writers and invalidations (XFS before 5.15).
    FileExclusive,
    /// Linux 5.15's invalidate_lock: a file-wide reader-writer lock.
    InvalidateLock,
    /// bcachefs's two-state lock: adds and direct I/O exclude each other.
    TwoState,
    /// invalidate-lock's modes per byte range: only overlapping pages exclude
    /// each other (the library's default).
    Range,
}

impl From<StrategyArg> for Strategy {
    fn from(arg: StrategyArg) -> Strategy {
        match arg {
            StrategyArg::None => Strategy::None,
            StrategyArg::FileExclusive => Strategy::FileExclusive,
            StrategyArg::InvalidateLock => Strategy::InvalidateLock,
            StrategyArg::TwoState => Strategy::TwoState,
            StrategyArg::Range => Strategy::Range,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// Many files on one device with a block allocator that reuses freed blocks at once.
    Volume,
    /// One host file per mapping: pread/pwrite, fallocate, O_DIRECT.
    Hostfile,
    /// Both, one after the other.
    All,
}

#[derive(clap::Args)]
struct TortureArgs {
    /// The strategy to run; every strategy in turn if omitted.
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// The backend the files live in.
    #[arg(long, value_enum, default_value = "volume")]
    backend: BackendArg,
    /// Volume: `mem` for memory, or the path of an image file or block device
    /// (its contents are overwritten). Host files: the directory to create them
    /// in. Default: a temporary image file or directory, removed afterwards.
    #[arg(long, value_name = "mem|PATH")]
    device: Option<String>,
    /// Seconds to run each strategy.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Worker threads.
    #[arg(long, default_value_t = 6)]
    threads: usize,
    /// Files sharing the volume.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Pages of each file.
    #[arg(long, default_value_t = 64)]
    pages: u64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Percentage of device reads and writes delayed to widen race windows
    /// (0 turns delays off).
    #[arg(long, default_value_t = 20)]
    delay_percent: u32,
    /// The longest injected delay, in microseconds (the shortest is a tenth of it).
    #[arg(long, default_value_t = 200)]
    max_delay_us: u64,
    /// The page cache budget in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    cache_bytes: u64,
    /// Print one JSON object per strategy, one per line, instead of the table.
    #[arg(long)]
    json: bool,
    /// Leave stores through memory maps (`map_write`) out of the mix.
    #[arg(long)]
    no_map_writes: bool,
    /// `mixed`: every operation from every thread. `self-map-dio`: three threads
    /// do direct I/O through maps of each other's files while a fourth punches
    /// (ignores --threads and --files).
    #[arg(long, value_enum, default_value = "mixed")]
    scenario: ScenarioArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScenarioArg {
    Mixed,
    SelfMapDio,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Torture(args) => torture(args),
        Command::Bench(BenchCommand::Hit(args)) => bench_hit(args),
        Command::Bench(BenchCommand::Fault(args)) => bench_fault(args),
    }
}

fn bench_hit(args: HitArgs) -> ExitCode {
    let config = filemap_bench::hit::HitConfig {
        file_bytes: args.file_mib << 20,
        threads: args.threads,
        runs: args.runs,
        seconds_per_run: args.seconds_per_run,
        strategy: args.strategy.into(),
    };
    let result = with_spinner(|progress| filemap_bench::hit::run(&config, progress));
    finish_bench(
        "hit",
        result,
        args.json,
        args.runs,
        args.seconds_per_run,
        None,
    )
}

fn bench_fault(args: FaultArgs) -> ExitCode {
    let config = filemap_bench::fault::FaultConfig {
        file_bytes: args.file_mib << 20,
        runs: args.runs,
        seconds_per_run: args.seconds_per_run,
        strategy: args.strategy.into(),
    };
    let result = with_spinner(|progress| filemap_bench::fault::run(&config, progress));
    let footer = "fault rows count pages first touched per second (the touching alone); \
                  read rows count 4 KiB reads per second";
    finish_bench(
        "fault",
        result,
        args.json,
        args.runs,
        args.seconds_per_run,
        Some(footer),
    )
}

/// Runs a benchmark with a spinner on a terminal that says what is measured.
fn with_spinner<T>(run: impl FnOnce(&mut dyn FnMut(&str)) -> T) -> T {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        ProgressBar::hidden()
    };
    let result = run(&mut |what: &str| bar.set_message(what.to_owned()));
    bar.finish_and_clear();
    result
}

/// Prints a benchmark's report (or its error, exit 2), with an optional footer
/// under the table.
fn finish_bench(
    name: &str,
    result: std::io::Result<filemap_bench::Report>,
    json: bool,
    runs: usize,
    seconds: f64,
    footer: Option<&str>,
) -> ExitCode {
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("filemap bench {name}: {error}");
            return ExitCode::from(2);
        }
    };
    print_bench_report(&report, json, runs, seconds);
    if let (Some(footer), false) = (footer, json) {
        println!("\n{footer}");
    }
    ExitCode::SUCCESS
}

/// Prints a benchmark's rows and ratios: a table, or one JSON object per line.
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
        return;
    }
    println!(
        "{:<8} {:<16} {:>7} {:>14} {:>18} {:>9}",
        "workload", "strategy", "threads", "ops/s", "ops/s per thread", "ns/op"
    );
    for r in &report.rows {
        println!(
            "{:<8} {:<16} {:>7} {:>14.0} {:>18.0} {:>9.1}",
            r.workload, r.strategy, r.threads, r.ops_per_s, r.per_thread_ops_per_s, r.ns_per_op
        );
    }
    println!("\nmedians of {runs} runs of {seconds} s each");
    for ratio in &report.ratios {
        let verdict = match ratio.target {
            Some(target) if ratio.value >= target => format!("(target >= {target}: met)"),
            Some(target) => format!("(target >= {target}: NOT met)"),
            None => String::new(),
        };
        println!("{:<66} {:>6.2}x {verdict}", ratio.name, ratio.value);
    }
}

fn torture(args: TortureArgs) -> ExitCode {
    let backends = match args.backend {
        BackendArg::Volume => vec![BackendKind::Volume],
        BackendArg::Hostfile => vec![BackendKind::HostFile],
        BackendArg::All => vec![BackendKind::Volume, BackendKind::HostFile],
    };
    let device = match args.device.as_deref() {
        None => DeviceSpec::TempFile,
        Some("mem") => DeviceSpec::Mem,
        Some(path) => DeviceSpec::Path(PathBuf::from(path)),
    };
    let strategies: Vec<Strategy> = match args.strategy {
        Some(strategy) => vec![strategy.into()],
        None => Strategy::ALL.to_vec(),
    };
    let show_progress = std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    for (backend, strategy) in backends
        .iter()
        .flat_map(|&backend| strategies.iter().map(move |&strategy| (backend, strategy)))
    {
        let config = TortureConfig {
            strategy,
            backend,
            device: device.clone(),
            seconds: args.seconds,
            threads: args.threads,
            files: args.files,
            pages_per_file: args.pages,
            seed: args.seed,
            delay_percent: args.delay_percent,
            max_delay_us: args.max_delay_us,
            cache_bytes: args.cache_bytes,
            stop_on_violation: false,
            map_writes: !args.no_map_writes,
            scenario: match args.scenario {
                ScenarioArg::Mixed => Scenario::Mixed,
                ScenarioArg::SelfMapDio => Scenario::SelfMapDio,
            },
        };
        let bar = progress_bar(show_progress, backend, strategy, args.seconds);
        let result = filemap_torture::run(&config, |progress| {
            bar.set_position((progress.elapsed * 1000.0) as u64);
            bar.set_message(format!(
                "{} ops, {} violations",
                progress.ops, progress.violations
            ));
        });
        bar.finish_and_clear();
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                eprintln!("filemap torture: {error}");
                return ExitCode::from(2);
            }
        };
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
        .filter(|r| r.strategy != Strategy::None.name() && !r.is_clean())
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

fn progress_bar(show: bool, backend: BackendKind, strategy: Strategy, seconds: f64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new((seconds * 1000.0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>25} [{bar:30}] {elapsed:>4} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{}", backend.name(), strategy.name()));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
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
    for kind in OP_KINDS {
        print!(" {kind:>12}");
    }
    println!();
    for r in reports {
        print!("{:<26}", format!("{}/{}", r.strategy, r.backend));
        for kind in OP_KINDS {
            print!(" {:>12}", r.by_kind.get(kind).copied().unwrap_or(0));
        }
        println!();
    }
    for r in reports.iter().filter(|r| !r.examples.is_empty()) {
        println!("\nfirst findings under {}/{}:", r.strategy, r.backend);
        for example in &r.examples {
            println!("  {example}");
        }
    }
}
