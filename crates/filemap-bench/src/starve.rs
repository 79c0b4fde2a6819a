//! `starve`: how long a punch takes while a storm of reads and map faults hits
//! its range, against the same punches with no storm.
//!
//! One puncher punches random 64 KiB ranges of a 1 MiB range of the file,
//! pausing 100 µs after each: a puncher that never paused would outrun any
//! refill and punch ranges the storm has not filled again yet, which costs
//! nothing and measures nothing. In the stormed runs, storm threads hit the
//! same range, each reading random 4 KiB pages with `read_at` and through a
//! read-only memory map of the range of its own ([`MapRegion::read`]), in
//! turns. Each punch drops pages and zaps them from the maps, so the
//! storm keeps missing and faulting, and keeps taking Fill: a lock that lets a
//! stream of Fill holders overtake a waiting Invalidate starves the punch (C6).
//!
//! In the quiet runs the maps exist but nobody touches them, and the puncher
//! reads its next range ahead into the cache before each punch (not timed), so
//! a quiet punch drops as many cached pages as a stormed one usually does: the
//! ratio of the two p99 latencies is the wait the storm adds, not a difference
//! in work. Every punch is timed.
//!
//! A third kind of run reports what pins add (no target): the same storm,
//! its first thread also pinning random pages of the range in turn with its
//! reads and map reads, holding each pin up to [`PIN_HOLD`] (a buffer
//! manager looking at a page); a punch waits for the pins of its range. Its
//! rows' ops end in `+pin`, and `pin` times taking a pin.
//!
//! The device is a temporary image file, as for [`crate::mixed`]. There is no
//! kernel baseline: the storm's faults go through filemap's own maps, which a
//! host file has no counterpart of in this process.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use filemap::page::{start_of, PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, MapAccess, MapRegion, Mapping, PageCache, Strategy};

use crate::{
    coherent, figure, pattern, temp_volume, timed_row, Histogram, Measured, PageBuf, Progress,
    Ratio, Report, Row, RowKey, RunSettings, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "starve";
/// The size of one punch.
pub const PUNCH_BYTES: u64 = 64 << 10;
/// The puncher's pause after each punch, so the storm refills the range.
const PUNCH_PAUSE: Duration = Duration::from_micros(100);
/// The longest a pinning storm thread holds a pin.
pub const PIN_HOLD: Duration = Duration::from_micros(20);
/// The ops of a storm run's rows: without pins, and with a pinning thread.
const OPS: [&str; 4] = ["punch", "read", "map-read", "pin"];
const PINNED_OPS: [&str; 4] = ["punch+pin", "read+pin", "map-read+pin", "pin"];

/// The storm of one run: its threads, and whether the first also pins.
#[derive(Clone, Copy)]
struct Storm {
    threads: usize,
    pinning: bool,
}

/// Settings of the starve benchmark.
#[derive(Clone, Debug)]
pub struct StarveConfig {
    /// The range the punches and the storm share, in bytes (a multiple of
    /// 64 KiB); the file is four times as large.
    pub range_bytes: u64,
    /// The cache budget in bytes; `None` for the file's size.
    pub cache_bytes: Option<u64>,
    /// The runs, the strategies and the storm thread counts to measure (each
    /// beside runs with no storm).
    pub settings: RunSettings,
}

impl Default for StarveConfig {
    fn default() -> Self {
        StarveConfig {
            range_bytes: 1 << 20,
            cache_bytes: None,
            settings: RunSettings {
                threads: vec![default_storm_threads()],
                ..RunSettings::default()
            },
        }
    }
}

impl StarveConfig {
    fn file_bytes(&self) -> u64 {
        self.range_bytes * 4
    }
}

/// How many measured steps [`run`] announces.
pub fn steps(config: &StarveConfig) -> usize {
    let settings = &config.settings;
    settings.runs * settings.strategies.len() * (1 + 2 * settings.threads.len())
}

/// Checks the settings without running anything.
pub fn check(config: &StarveConfig) -> io::Result<()> {
    if config.range_bytes < PUNCH_BYTES
        || config.range_bytes % PUNCH_BYTES != 0
        || config.range_bytes > (1 << 30)
    {
        return Err(crate::invalid(
            "the starve range must be a multiple of 64 KiB, at most 1 GiB",
        ));
    }
    if config.cache_bytes.is_some_and(|b| b < config.range_bytes) {
        return Err(crate::invalid(format!(
            "the cache budget must hold the starve range of {} KiB",
            config.range_bytes >> 10
        )));
    }
    config.settings.check()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &StarveConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    let duration = settings.duration();
    // Storms: none (quiet) first, then each thread count, then each with
    // a pinning thread.
    let storms: Vec<Storm> = [(0, false)]
        .into_iter()
        .chain(settings.threads.iter().map(|&t| (t, false)))
        .chain(settings.threads.iter().map(|&t| (t, true)))
        .map(|(threads, pinning)| Storm { threads, pinning })
        .collect();
    // runs[strategy][storm][op], ops as in `OPS`.
    let mut runs = vec![vec![vec![Vec::new(); OPS.len()]; storms.len()]; settings.strategies.len()];
    for run in 0..settings.runs {
        for (s, &strategy) in settings.strategies.iter().enumerate() {
            for (t, &storm) in storms.iter().enumerate() {
                let what = match storm {
                    Storm { threads: 0, .. } => "no storm".to_owned(),
                    Storm {
                        threads,
                        pinning: false,
                    } => format!("{threads} storm thread(s)"),
                    Storm {
                        threads,
                        pinning: true,
                    } => {
                        format!("{threads} storm thread(s), one pinning")
                    }
                };
                progress(Progress::Step(&format!(
                    "starve, run {}/{}: {strategy}, {what}",
                    run + 1,
                    settings.runs
                )));
                let (_cache, mapping) = setup(config, strategy)?;
                let measured = measure(&mapping, config.range_bytes, storm, duration)?;
                for (o, m) in measured.into_iter().enumerate() {
                    runs[s][t][o].push(m);
                }
            }
        }
    }

    let mut report = Report::default();
    for (s, strategy) in settings.strategies.iter().enumerate() {
        for (t, &storm) in storms.iter().enumerate() {
            let ops = if storm.pinning { PINNED_OPS } else { OPS };
            for (o, op) in ops.into_iter().enumerate() {
                let measured = &runs[s][t][o];
                if measured.iter().all(|m| m.workers == 0) {
                    continue;
                }
                let key = RowKey {
                    workload: WORKLOAD,
                    strategy: strategy.name(),
                    op,
                    threads: storm.threads,
                };
                report.rows.push(timed_row(key, measured));
            }
        }
    }
    for &storm in &settings.threads {
        let rows = report.rows.clone();
        report
            .ratios
            .extend(ratios(&rows, &settings.strategies, storm));
    }
    Ok(report)
}

/// A fresh file for one step, four times the range, written directly and read
/// ahead into the cache.
fn setup(config: &StarveConfig, strategy: Strategy) -> io::Result<(PageCache, Arc<Mapping>)> {
    let file_bytes = config.file_bytes();
    let volume = temp_volume(file_bytes + (8 << 20))?;
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(config.cache_bytes.unwrap_or(file_bytes))
        .build()?;
    let mapping = cache.open(Arc::new(volume.create_file("starve")?))?;
    let chunk = AlignedBuf::from_slice(&pattern(PUNCH_BYTES as usize), PAGE_SIZE);
    let mut offset = 0;
    while offset < file_bytes {
        mapping.write_direct(&chunk, offset)?;
        offset += chunk.len() as u64;
    }
    mapping.readahead(0, file_bytes)?;
    Ok((cache, mapping))
}

/// The default storm: one thread per processor but the puncher's (at least
/// one). More storm threads than free processors measure the scheduler's time
/// slices (a puncher that waits for a processor, not for the lock), and its
/// p99 is then a slice, whatever the lock.
pub fn default_storm_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// One timed run: the puncher on this thread, the storm's threads beside it.
/// Returns the punches, the storm's reads, its map reads and its pins.
fn measure(
    mapping: &Arc<Mapping>,
    range_bytes: u64,
    Storm {
        threads: storm,
        pinning,
    }: Storm,
    duration: Duration,
) -> io::Result<[Measured; 4]> {
    let maps = (0..storm.max(1))
        .map(|_| mapping.map(0, range_bytes as usize, MapAccess::Read))
        .collect::<io::Result<Vec<MapRegion>>>()?;
    let pages = range_bytes / PAGE;
    let slots = range_bytes / PUNCH_BYTES;
    let stop = AtomicBool::new(false);
    let started = Barrier::new(storm + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..storm)
            .map(|thread| {
                let (stop, started, maps) = (&stop, &started, &maps);
                type Kind = (u64, Histogram);
                scope.spawn(move || -> io::Result<[Kind; 3]> {
                    let mut rng = fastrand::Rng::with_seed(0x5eed ^ thread as u64);
                    let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
                    // Reads, map reads and pins.
                    let mut kinds: [Kind; 3] = std::array::from_fn(|_| (0, Histogram::new()));
                    let turns = if pinning && thread == 0 { 3 } else { 2 };
                    started.wait();
                    let mut storm = || -> io::Result<()> {
                        let mut turn = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let page = rng.u64(..pages);
                            let start = Instant::now();
                            // Reads, map reads (and pins) in turns; a pin is
                            // timed until it is taken, not while it is held.
                            let kind = turn % turns;
                            let took = match kind {
                                0 => {
                                    mapping.read_exact_at(&mut buf.0, start_of(page))?;
                                    start.elapsed()
                                }
                                1 => {
                                    maps[thread].read(start_of(page) as usize, &mut buf.0)?;
                                    start.elapsed()
                                }
                                _ => {
                                    let pinned = mapping.pin(page)?;
                                    let took = start.elapsed();
                                    let hold = PIN_HOLD.mul_f64(rng.f64());
                                    while start.elapsed() < took + hold {
                                        std::hint::black_box(&pinned[..]);
                                    }
                                    took
                                }
                            };
                            kinds[kind].1.record(took.as_nanos() as u64);
                            kinds[kind].0 += 1;
                            turn += 1;
                            std::hint::black_box(&buf);
                        }
                        Ok(())
                    };
                    let result = storm();
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result.map(|()| kinds)
                })
            })
            .collect();
        started.wait();
        let punched = punch_for(mapping, slots, storm == 0, duration, &stop);
        stop.store(true, Ordering::Relaxed);
        let elapsed = punched
            .as_ref()
            .map_or(duration, |(elapsed, _, _)| *elapsed);
        let mut kinds: [(u64, Histogram); 3] = std::array::from_fn(|_| (0, Histogram::new()));
        for worker in workers {
            let thread_kinds = worker.join().expect("storm threads do not panic")?;
            for (into, from) in kinds.iter_mut().zip(thread_kinds) {
                into.0 += from.0;
                into.1.merge(&from.1);
            }
        }
        let (_, punches, punch_latency) = punched?;
        let rate = |count: u64| count as f64 / elapsed.as_secs_f64();
        let [reads, map_reads, pins] = kinds;
        Ok([
            Measured::new(rate(punches), punch_latency, 1),
            Measured::new(rate(reads.0), reads.1, storm),
            Measured::new(rate(map_reads.0), map_reads.1, storm),
            Measured::new(rate(pins.0), pins.1, usize::from(pinning && storm > 0)),
        ])
    })
}

/// Punches random 64 KiB ranges of the first `slots` for `duration` (or until
/// `stop`), timing each and pausing after each; `read_ahead` first brings each
/// range into the cache, untimed. Returns the time taken, the punches (whose
/// rate is bounded by the pauses: the latencies are the figure) and their
/// latencies.
fn punch_for(
    mapping: &Mapping,
    slots: u64,
    read_ahead: bool,
    duration: Duration,
    stop: &AtomicBool,
) -> io::Result<(Duration, u64, Histogram)> {
    let mut rng = fastrand::Rng::with_seed(0x9e3779b9);
    let mut latency = Histogram::new();
    let mut punches = 0;
    let start = Instant::now();
    while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        let offset = rng.u64(..slots) * PUNCH_BYTES;
        if read_ahead {
            mapping.readahead(offset, PUNCH_BYTES)?;
        }
        let punch_start = Instant::now();
        mapping.punch_hole(offset, PUNCH_BYTES)?;
        let took = punch_start.elapsed();
        latency.record(took.as_nanos() as u64);
        punches += 1;
        std::thread::sleep(PUNCH_PAUSE);
    }
    Ok((start.elapsed(), punches, latency))
}

/// Stormed p99 over quiet p99 of the punches, for every coherent strategy;
/// the target is set on `range`.
fn ratios(rows: &[Row], strategies: &[Strategy], storm: usize) -> Vec<Ratio> {
    let p99 = |strategy: &str, threads: usize| {
        figure(rows, WORKLOAD, strategy, "punch", threads, |r| r.p99_us)
    };
    let mut names: Vec<&str> = vec!["range"];
    names.extend(
        coherent(strategies)
            .map(Strategy::name)
            .filter(|&name| name != "range"),
    );
    let mut ratios: Vec<Ratio> = names
        .into_iter()
        .map(|name| {
            Ratio::between(
                WORKLOAD,
                format!("{name}: punch p99 with {storm} storm thread(s) / with none"),
                p99(name, storm),
                p99(name, 0),
                (name == "range").then_some(Target::AtMost(10.0)),
            )
        })
        .collect();
    // What a thread that holds pins in the storm adds, reported.
    ratios.push(Ratio::between(
        WORKLOAD,
        format!("range: punch p99 with {storm} storm thread(s), one pinning / with none"),
        figure(rows, WORKLOAD, "range", "punch+pin", storm, |r| r.p99_us),
        p99("range", 0),
        None,
    ));
    ratios
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_row_and_ratio() {
        let config = StarveConfig {
            range_bytes: 256 << 10,
            settings: RunSettings {
                threads: vec![2],
                runs: 1,
                seconds_per_run: 0.05,
                ..RunSettings::default()
            },
            ..StarveConfig::default()
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        // Per strategy: quiet punches; stormed punches, reads and map reads;
        // the same with a pinning thread, and its pins.
        assert_eq!(report.rows.len(), Strategy::ALL.len() * 8);
        for strategy in Strategy::ALL.map(Strategy::name) {
            let stormed = ["punch", "read", "map-read"].into_iter().chain(PINNED_OPS);
            for (op, threads) in [("punch", 0)].into_iter().chain(stormed.map(|op| (op, 2))) {
                let row = report.find(WORKLOAD, strategy, op, threads).unwrap();
                assert!(
                    row.ops_per_s > 0.0 && row.p50_us > 0.0 && row.p99_us >= row.p50_us,
                    "{row:?}"
                );
            }
        }
        // `range` (first, available or not) and every other coherent
        // strategy, then `range` with a pinning thread.
        let coherent = Strategy::ALL.iter().filter(|s| s.is_coherent()).count();
        let range_exists = crate::strategy_named("range").is_some();
        assert_eq!(
            report.ratios.len(),
            coherent + usize::from(!range_exists) + 1
        );
        assert_eq!(report.ratios[0].value.is_some(), range_exists);
        let (pinned, others) = report.ratios[1..].split_last().unwrap();
        assert!(others
            .iter()
            .all(|r| r.value.is_some_and(|v| v > 0.0) && r.target.is_none()));
        assert!(pinned.name.contains("one pinning") && pinned.target.is_none());
        assert_eq!(pinned.value.is_some(), range_exists);
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            StarveConfig {
                range_bytes: 1000,
                ..StarveConfig::default()
            },
            StarveConfig {
                cache_bytes: Some(4096),
                ..StarveConfig::default()
            },
            StarveConfig {
                settings: RunSettings {
                    threads: Vec::new(),
                    ..StarveConfig::default().settings
                },
                ..StarveConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
