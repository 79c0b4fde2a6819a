//! `fault`: what a memory map costs, on its first touch of a page and after.
//!
//! Three variants run for every strategy, and two baselines once per run, in
//! turns, in one process, on a file of the same size:
//! - `cached-fault`: every page of the file is in the cache; a fresh read-only
//!   [`MapRegion`] of the whole file is touched one byte per page. The kernel
//!   maps cached pages itself (shmem's fault path, which also maps neighbouring
//!   cached pages at once), with no userfaultfd round trip.
//! - `cached-fault-rw`: the same with a read-write map, whose first touch of a
//!   cached page is a MINOR fault served by the mapping's handler (so that a
//!   drop can hold stores back): one round trip maps the page and up to 15
//!   cached pages after it.
//! - `uffd-round-trip`: the baseline, a bare userfaultfd round trip per page: a
//!   handler thread answers each MISSING fault with a 4 KiB `UFFDIO_COPY` and a
//!   wake, nothing else ([`filemap::bench_support::bare_uffd_round_trips`]).
//! - `uncached-fault`: the same touches after `invalidate_range` dropped every
//!   page, so the mapping's handler fills from the backend (up to the cache's
//!   fill batch, 32 pages, per fault). Reported for information.
//! - `map-read`: random 4 KiB [`MapRegion::read`] calls on a map whose pages are
//!   all installed;
//! - `memory-read`: a plain copy of the same 4 KiB from the same map address:
//!   the floor of reading a map;
//! - `copy-<name>`: each racy copy this processor runs, of the same 4 KiB from
//!   the same map address: the floor of reading a map soundly while stores
//!   race (the fastest is the `copy-limit`, as in `hit`).
//!
//! The fault variants count pages touched per second, timing the touches only
//! (creating and dropping maps, dropping pages and setting up the baseline are
//! not timed), and time one touch in 16 for the latencies; the read variants
//! count reads per second on one thread (one in 16 timed), pinned to the first
//! processor for both ([`crate::pinned`]). The baseline round
//! trip is timed in bulk, so its row has no latencies. Only `uncached-fault`
//! takes the coherence lock (Fill, in the handler); the other variants are the
//! same under every strategy, which the rows show.

use std::io;
use std::time::{Duration, Instant};

use filemap::bench_support::RacyCopy;
use filemap::page::PAGE_SIZE;
use filemap::{MapAccess, MapRegion};

use crate::hit::copy_row;
use crate::{
    cached_file, expect_all_cached, figure, headline_strategy, page_reads, timed_row, Histogram,
    Measured, Progress, Ratio, Report, Row, RowKey, RunSettings, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "fault";
/// One touch or read in this many is timed.
const TIME_EVERY: usize = 16;

/// Settings of the fault benchmark.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// The file's size in bytes (a multiple of 4 KiB).
    pub file_bytes: u64,
    /// The runs of every variant and the strategies. A run of a fault variant
    /// takes whole rounds, at least one, so it may outlast `seconds_per_run`.
    /// The thread counts are ignored: every variant runs on one thread.
    pub settings: RunSettings,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            // As for `hit`: larger than a core's L2 cache, smaller than the L3.
            file_bytes: 16 << 20,
            settings: RunSettings::default(),
        }
    }
}

/// The variants run for each strategy, in order.
const STRATEGY_VARIANTS: [&str; 4] = [
    "cached-fault",
    "cached-fault-rw",
    "uncached-fault",
    "map-read",
];
/// The baselines, with the operation their rows are filed under and, for
/// a racy copy's row, the copy: the bare round trip, the plain copy and each
/// racy copy of a map's page.
fn baselines() -> Vec<(&'static str, &'static str, Option<RacyCopy>)> {
    [
        ("uffd-round-trip", "fault", None),
        ("memory-read", "map-read", None),
    ]
    .into_iter()
    .chain(
        RacyCopy::available()
            .into_iter()
            .map(|copy| (copy_row(copy), "map-read", Some(copy))),
    )
    .collect()
}

/// How many measured steps [`run`] announces.
pub fn steps(config: &FaultConfig) -> usize {
    let settings = &config.settings;
    settings.runs * (settings.strategies.len() * STRATEGY_VARIANTS.len() + baselines().len())
}

/// Checks the settings without running anything.
pub fn check(config: &FaultConfig) -> io::Result<()> {
    crate::check_file_bytes(config.file_bytes)?;
    usize::try_from(config.file_bytes).map_err(|_| crate::invalid("the file is too large"))?;
    config.settings.check_ignoring_threads()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &FaultConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    let len = config.file_bytes as usize;
    let pages = len / PAGE_SIZE;
    progress(Progress::Setup("fault: filling the caches"));
    let caches = settings
        .strategies
        .iter()
        .map(|&strategy| cached_file(config.file_bytes, strategy))
        .collect::<io::Result<Vec<_>>>()?;

    let duration = settings.duration();
    let mut strategy_runs =
        vec![vec![Vec::new(); STRATEGY_VARIANTS.len()]; settings.strategies.len()];
    let baselines = baselines();
    let mut baseline_runs = vec![Vec::new(); baselines.len()];
    for run in 0..settings.runs {
        let step = |progress: &mut dyn FnMut(Progress<'_>), what: &str| {
            progress(Progress::Step(&format!(
                "fault, run {}/{}: {what}",
                run + 1,
                settings.runs
            )))
        };
        for (s, strategy) in settings.strategies.iter().enumerate() {
            let mapping = &caches[s].1;
            for (v, variant) in STRATEGY_VARIANTS.iter().enumerate() {
                step(&mut progress, &format!("{strategy}, {variant}"));
                let measured = match *variant {
                    "cached-fault" | "cached-fault-rw" => {
                        // The uncached variant of the run before left pages out.
                        mapping.readahead(0, config.file_bytes)?;
                        expect_all_cached(mapping, pages as u64)?;
                        let access = if *variant == "cached-fault" {
                            MapAccess::Read
                        } else {
                            MapAccess::ReadWrite
                        };
                        touch_rounds(duration, || {
                            let map = mapping.map(0, len, access)?;
                            Ok(touch_every_page(&map))
                        })?
                    }
                    "uncached-fault" => touch_rounds(duration, || {
                        mapping.invalidate_range(0, config.file_bytes)?;
                        let (cached, _) = mapping.cached_pages();
                        if cached != 0 {
                            return Err(io::Error::other(format!(
                                "expected no page cached after invalidation, found {cached}"
                            )));
                        }
                        let map = mapping.map(0, len, MapAccess::Read)?;
                        Ok(touch_every_page(&map))
                    })?,
                    _ => {
                        // Every page installed in this map: the reads never fault.
                        let map = mapping.map(0, len, MapAccess::Read)?;
                        touch_every_page(&map);
                        map_reads(&map, duration)?
                    }
                };
                strategy_runs[s][v].push(measured);
            }
        }
        for (b, &(baseline, _, copy)) in baselines.iter().enumerate() {
            step(&mut progress, baseline);
            let measured = if baseline == "uffd-round-trip" {
                touch_rounds(duration, || {
                    let rate = filemap::bench_support::bare_uffd_round_trips(pages)?;
                    Ok(Touched {
                        pages,
                        took: Duration::from_secs_f64(pages as f64 / rate),
                        latency: Histogram::new(),
                    })
                })?
            } else {
                let mapping = &caches[0].1;
                let map = mapping.map(0, len, MapAccess::Read)?;
                touch_every_page(&map);
                memory_reads(&map, copy, duration)?
            };
            baseline_runs[b].push(measured);
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    for (s, strategy) in settings.strategies.iter().enumerate() {
        for (v, variant) in STRATEGY_VARIANTS.iter().enumerate() {
            let key = RowKey {
                workload: WORKLOAD,
                strategy: strategy.name(),
                op: variant,
                threads: 1,
            };
            rows.push(timed_row(key, &strategy_runs[s][v]));
        }
    }
    for (b, (baseline, op, _)) in baselines.iter().enumerate() {
        let key = RowKey {
            workload: WORKLOAD,
            strategy: baseline,
            op,
            threads: 1,
        };
        rows.push(timed_row(key, &baseline_runs[b]));
    }
    let ratios = ratios(&rows, settings)?;
    Ok(Report {
        rows,
        ratios,
        notes: Vec::new(),
    })
}

/// What one round of touches gave.
struct Touched {
    pages: usize,
    took: Duration,
    latency: Histogram,
}

/// Runs `round` (which returns the pages it touched and the time the touching
/// took) until `duration` of wall clock has passed, at least once, and returns
/// the pages touched per second of touching.
fn touch_rounds(
    duration: Duration,
    mut round: impl FnMut() -> io::Result<Touched>,
) -> io::Result<Measured> {
    let deadline = Instant::now() + duration;
    let (mut pages, mut touching) = (0usize, Duration::ZERO);
    let mut latency = Histogram::new();
    loop {
        let touched = round()?;
        pages += touched.pages;
        touching += touched.took;
        latency.merge(&touched.latency);
        if Instant::now() >= deadline {
            break;
        }
    }
    // A round too fast for the clock still counts as having taken some time.
    let rate = pages as f64 / touching.as_secs_f64().max(1e-9);
    Ok(Measured::new(rate, latency, 1))
}

/// Loads one byte of every page of `map`, in order, and returns how long that
/// took, with the latencies of one touch in 16. A page not mapped in the map
/// yet is a fault.
fn touch_every_page(map: &MapRegion) -> Touched {
    let pages = map.len() / PAGE_SIZE;
    let mut latency = Histogram::new();
    let start = Instant::now();
    let mut sum = 0u64;
    for page in 0..pages {
        // One touch in 16, at a position in its group of 16 that rotates, so
        // the touches that fault (the first of each fill batch) are sampled too.
        let timed = page % TIME_EVERY == (page / TIME_EVERY) % TIME_EVERY;
        let touch_start = timed.then(Instant::now);
        // SAFETY: `map` is borrowed, so it stays mapped during the load, and
        // `page * PAGE_SIZE < map.len()`. Every map here covers the whole file
        // from offset 0 and the file's size is a multiple of the page size, so
        // the page lies inside the file (no `SIGBUS`). Nothing stores to the file
        // while the benchmark runs (nothing stores through maps, and no write or
        // invalidation runs during a touch), so the load races no store.
        let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(page * PAGE_SIZE)) };
        sum += u64::from(byte);
        if let Some(touch_start) = touch_start {
            latency.record(touch_start.elapsed().as_nanos() as u64);
        }
    }
    let took = start.elapsed();
    std::hint::black_box(sum);
    Touched {
        pages,
        took,
        latency,
    }
}

/// Random 4 KiB [`MapRegion::read`] calls per second, on one thread.
fn map_reads(map: &MapRegion, duration: Duration) -> io::Result<Measured> {
    let pages = (map.len() / PAGE_SIZE) as u64;
    page_reads(1, duration, TIME_EVERY as u32, pages, |index, buf| {
        map.read(index as usize * PAGE_SIZE, buf)
    })
}

/// Plain copies (or, with `copy`, racy ones) per second of a random 4 KiB
/// from the map's memory, on one thread, at the offsets [`map_reads`] reads
/// (both use `measure_kinds`' seeded generator).
fn memory_reads(
    map: &MapRegion,
    copy: Option<RacyCopy>,
    duration: Duration,
) -> io::Result<Measured> {
    let pages = (map.len() / PAGE_SIZE) as u64;
    page_reads(1, duration, TIME_EVERY as u32, pages, |index, buf| {
        let at = index as usize * PAGE_SIZE;
        if let Some(copy) = copy {
            // SAFETY: as below, and `copy` is available (it was listed so);
            // a racy copy needs no guarantee that nothing stores meanwhile.
            unsafe { copy.copy(map.as_ptr().add(at), buf.as_mut_ptr(), PAGE_SIZE) };
            return Ok(());
        }
        // SAFETY: `map` is borrowed for the whole measurement, so the source
        // stays mapped; `at + PAGE_SIZE <= map.len()`, and the map covers the
        // whole file, so the source lies inside the file. `buf` is our own
        // allocation, not map memory, so the ranges do not overlap. Nothing
        // writes the file during the benchmark (no write, invalidation or
        // fill runs, and nothing stores through maps), so this plain copy races
        // no store.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(at), buf.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    })
}

/// The ratios the fault targets are set on, for the headline strategy, and the
/// uncached one for information.
fn ratios(rows: &[Row], settings: &RunSettings) -> io::Result<Vec<Ratio>> {
    let Some(strategy) = headline_strategy(&settings.strategies)? else {
        return Ok(Vec::new());
    };
    let ours = strategy.name();
    let rate = |strategy: &str, op: &str| figure(rows, WORKLOAD, strategy, op, 1, |r| r.ops_per_s);
    let mut ratios = Vec::new();
    for (op, baseline, baseline_op, what, target) in [
        (
            "cached-fault",
            "uffd-round-trip",
            "fault",
            "pages per second",
            Some(Target::AtLeast(0.75)),
        ),
        (
            "cached-fault-rw",
            "uffd-round-trip",
            "fault",
            "pages per second",
            Some(Target::AtLeast(0.75)),
        ),
        (
            "uncached-fault",
            "uffd-round-trip",
            "fault",
            "pages per second",
            None,
        ),
        (
            "map-read",
            "memory-read",
            "map-read",
            "1 thread",
            Some(Target::AtLeast(0.9)),
        ),
    ] {
        ratios.push(Ratio::between(
            WORKLOAD,
            format!("{ours} {op} / {baseline}, {what}"),
            rate(ours, op),
            rate(baseline, baseline_op),
            target,
        ));
    }
    // The floor of a sound read of a map: the fastest racy copy of its page
    // (the plain copy above cannot race soundly, and may be faster).
    let limit = RacyCopy::available()
        .into_iter()
        .filter_map(|copy| {
            let name = copy_row(copy);
            rate(name, "map-read").ok().map(|v| (name, v))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    ratios.push(Ratio::between(
        WORKLOAD,
        format!(
            "{ours} map-read / copy-limit ({}), 1 thread",
            limit.map_or("none", |(name, _)| name)
        ),
        rate(ours, "map-read"),
        limit
            .map(|(_, v)| v)
            .ok_or_else(|| "not available: no racy copy was measured".to_owned()),
        None,
    ));
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;
    use filemap::Strategy;

    #[test]
    fn a_tiny_run_reports_every_variant_and_ratio() {
        let config = FaultConfig {
            file_bytes: 1 << 20,
            settings: RunSettings {
                runs: 1,
                seconds_per_run: 0.01,
                ..RunSettings::default()
            },
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        assert_eq!(
            report.rows.len(),
            Strategy::ALL.len() * STRATEGY_VARIANTS.len() + baselines().len()
        );
        for copy in RacyCopy::available() {
            assert!(report
                .find(WORKLOAD, copy_row(copy), "map-read", 1)
                .is_some());
        }
        assert!(report
            .rows
            .iter()
            .all(|r| r.workload == "fault" && r.ops_per_s > 0.0 && r.ops_per_s.is_finite()));
        for strategy in Strategy::ALL {
            for variant in STRATEGY_VARIANTS {
                let row = report.find(WORKLOAD, strategy.name(), variant, 1).unwrap();
                assert!(row.p50_us > 0.0 && row.p99_us >= row.p50_us, "{row:?}");
            }
        }
        assert_eq!(report.ratios.len(), 5);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.value.is_some_and(|v| v > 0.0 && v.is_finite())));
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            FaultConfig {
                file_bytes: 100,
                ..FaultConfig::default()
            },
            FaultConfig {
                settings: RunSettings {
                    runs: 0,
                    ..FaultConfig::default().settings
                },
                ..FaultConfig::default()
            },
            FaultConfig {
                settings: RunSettings {
                    seconds_per_run: 0.0,
                    ..FaultConfig::default().settings
                },
                ..FaultConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
        // The benchmark runs on one thread, whatever the thread counts say.
        let threads_ignored = FaultConfig {
            settings: RunSettings {
                threads: vec![0],
                ..FaultConfig::default().settings
            },
            ..FaultConfig::default()
        };
        assert!(check(&threads_ignored).is_ok());
    }
}
