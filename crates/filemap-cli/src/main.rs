//! The `filemap` command: proves the page cache coherent under torture.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use filemap::Strategy;
use filemap_torture::{DeviceSpec, TortureConfig, TortureReport, OP_KINDS};
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
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    None,
    InvalidateLock,
}

impl From<StrategyArg> for Strategy {
    fn from(arg: StrategyArg) -> Strategy {
        match arg {
            StrategyArg::None => Strategy::None,
            StrategyArg::InvalidateLock => Strategy::InvalidateLock,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// Many files on one device with a block allocator that reuses freed blocks at once.
    Volume,
}

#[derive(clap::Args)]
struct TortureArgs {
    /// The strategy to run; every strategy in turn if omitted.
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// The backend the files live in.
    #[arg(long, value_enum, default_value = "volume")]
    backend: BackendArg,
    /// `mem` for memory, or the path of an image file or block device (its
    /// contents are overwritten). Default: a temporary image file, removed afterwards.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Torture(args) => torture(args),
    }
}

fn torture(args: TortureArgs) -> ExitCode {
    let BackendArg::Volume = args.backend;
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
    for strategy in strategies {
        let config = TortureConfig {
            strategy,
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
        };
        let bar = progress_bar(show_progress, strategy, args.seconds);
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
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.strategy != Strategy::None.name() && !r.is_clean())
        .map(|r| r.strategy.as_str())
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

fn progress_bar(show: bool, strategy: Strategy, seconds: f64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new((seconds * 1000.0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {elapsed:>4} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(strategy.name());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn print_table(reports: &[TortureReport]) {
    println!(
        "{:<16} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7} {:>10}",
        "strategy", "ops", "checked", "stale", "foreign", "torn", "errors", "ops/s"
    );
    for r in reports {
        println!(
            "{:<16} {:>10} {:>10} {:>8} {:>8} {:>6} {:>7} {:>10.0}",
            r.strategy, r.ops, r.reads_checked, r.stale, r.foreign, r.torn, r.errors, r.ops_per_s
        );
    }
    println!();
    print!("{:<16}", "ops by kind");
    for kind in OP_KINDS {
        print!(" {kind:>12}");
    }
    println!();
    for r in reports {
        print!("{:<16}", r.strategy);
        for kind in OP_KINDS {
            print!(" {:>12}", r.by_kind.get(kind).copied().unwrap_or(0));
        }
        println!();
    }
    for r in reports.iter().filter(|r| !r.examples.is_empty()) {
        println!("\nfirst findings under {}:", r.strategy);
        for example in &r.examples {
            println!("  {example}");
        }
    }
}
