//! `fault`: what a memory map costs, on its first touch of a page and after.
//!
//! Five variants run in one process, in turns, on one file:
//! - `cached-fault`: every page of the file is in the cache; a fresh
//!   [`MapRegion`] of the whole file is touched one byte per page. The kernel
//!   maps cached pages itself (shmem's fault path, which also maps neighbouring
//!   cached pages at once), with no userfaultfd round trip.
//! - `uffd-round-trip`: the baseline, a bare userfaultfd round trip per page: a
//!   handler thread answers each MISSING fault with a 4 KiB `UFFDIO_COPY` and a
//!   wake, nothing else ([`filemap::bench_support::bare_uffd_round_trips`]).
//! - `uncached-fault`: the same touches after `invalidate_range` dropped every
//!   page, so the mapping's handler fills from the backend (up to the cache's
//!   fill batch, 32 pages, per fault). Reported for information.
//! - `map-read`: random 4 KiB [`MapRegion::read`] calls on a map whose pages are
//!   all installed;
//! - `memory-read`: a plain copy of the same 4 KiB from the same map address:
//!   the floor of reading a map.
//!
//! The fault variants count pages touched per second, timing the touches only
//! (creating and dropping maps, dropping pages and setting up the baseline are
//! not timed); the read variants count reads per second on one thread.

use std::io;
use std::time::{Duration, Instant};

use filemap::{MapAccess, MapRegion, Strategy, PAGE_SIZE};

use crate::{cached_file, expect_all_cached, measure, row, PageBuf, Ratio, Report, Row};

const PAGE: u64 = PAGE_SIZE as u64;

/// Settings of the fault benchmark.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// The file's size in bytes (a multiple of 4 KiB).
    pub file_bytes: u64,
    /// Timed runs of every variant; the median is reported.
    pub runs: usize,
    /// Length of one run of a variant (wall clock; fault variants run whole
    /// rounds, at least one).
    pub seconds_per_run: f64,
    /// The coherence strategy of the cache.
    pub strategy: Strategy,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            // As for `hit`: larger than a core's L2 cache, smaller than the L3.
            file_bytes: 16 << 20,
            runs: 5,
            seconds_per_run: 0.5,
            strategy: Strategy::DEFAULT,
        }
    }
}

/// The variants, in the order each run measures them.
const VARIANTS: [&str; 5] = [
    "cached-fault",
    "uffd-round-trip",
    "uncached-fault",
    "map-read",
    "memory-read",
];

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &FaultConfig, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    if config.file_bytes < PAGE || config.file_bytes % PAGE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the file size must be a positive multiple of 4096 bytes",
        ));
    }
    if config.runs == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "runs must be at least 1",
        ));
    }
    if !(config.seconds_per_run.is_finite() && config.seconds_per_run > 0.0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "seconds per run must be positive",
        ));
    }
    let len = usize::try_from(config.file_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the file is too large"))?;
    let pages = len / PAGE_SIZE;
    progress("filling the cache");
    let (_cache, mapping) = cached_file(config.file_bytes, config.strategy)?;

    let duration = Duration::from_secs_f64(config.seconds_per_run);
    let mut runs = vec![Vec::new(); VARIANTS.len()];
    for run in 0..config.runs {
        for (v, variant) in VARIANTS.iter().enumerate() {
            progress(&format!("run {}/{}: {variant}", run + 1, config.runs));
            let rate = match *variant {
                "cached-fault" => {
                    expect_all_cached(&mapping, pages as u64)?;
                    touch_rounds(duration, || {
                        let map = mapping.map(0, len, MapAccess::Read)?;
                        Ok((pages, touch_every_page(&map)))
                    })?
                }
                "uffd-round-trip" => touch_rounds(duration, || {
                    let rate = filemap::bench_support::bare_uffd_round_trips(pages)?;
                    Ok((pages, Duration::from_secs_f64(pages as f64 / rate)))
                })?,
                "uncached-fault" => touch_rounds(duration, || {
                    mapping.invalidate_range(0, config.file_bytes)?;
                    let (cached, _) = mapping.cached_pages();
                    if cached != 0 {
                        return Err(io::Error::other(format!(
                            "expected no page cached after invalidation, found {cached}"
                        )));
                    }
                    let map = mapping.map(0, len, MapAccess::Read)?;
                    Ok((pages, touch_every_page(&map)))
                })?,
                "map-read" | "memory-read" => {
                    // Every page installed in this map: the reads never fault.
                    let map = mapping.map(0, len, MapAccess::Read)?;
                    touch_every_page(&map);
                    if *variant == "map-read" {
                        map_reads(&map, duration)
                    } else {
                        memory_reads(&map, duration)
                    }
                }
                _ => unreachable!("every variant is measured above"),
            };
            runs[v].push(rate);
        }
    }

    let rows: Vec<Row> = VARIANTS
        .iter()
        .zip(runs)
        .map(|(variant, runs)| row("fault", variant, 1, runs))
        .collect();
    let ratios = ratios(&rows);
    Ok(Report { rows, ratios })
}

/// Runs `round` (which returns the pages it touched and the time the touching
/// took) until `duration` of wall clock has passed, at least once, and returns
/// the pages touched per second of touching.
fn touch_rounds(
    duration: Duration,
    mut round: impl FnMut() -> io::Result<(usize, Duration)>,
) -> io::Result<f64> {
    let deadline = Instant::now() + duration;
    let (mut pages, mut touching) = (0usize, Duration::ZERO);
    loop {
        let (touched, took) = round()?;
        pages += touched;
        touching += took;
        if Instant::now() >= deadline {
            break;
        }
    }
    // A round too fast for the clock still counts as having taken some time.
    Ok(pages as f64 / touching.as_secs_f64().max(1e-9))
}

/// Loads one byte of every page of `map`, in order, and returns how long that
/// took. A page not mapped in the map yet is a fault.
fn touch_every_page(map: &MapRegion) -> Duration {
    let pages = map.len() / PAGE_SIZE;
    let start = Instant::now();
    let mut sum = 0u64;
    for page in 0..pages {
        // SAFETY: `map` is borrowed, so it stays mapped during the load, and
        // `page * PAGE_SIZE < map.len()`. Every map here covers the whole file
        // from offset 0 and the file's size is a multiple of the page size, so
        // the page lies inside the file (no `SIGBUS`). Nothing stores to the file
        // while the benchmark runs (maps are read-only, and no write or
        // invalidation runs during a touch), so the load races no store.
        let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(page * PAGE_SIZE)) };
        sum += u64::from(byte);
    }
    let elapsed = start.elapsed();
    std::hint::black_box(sum);
    elapsed
}

/// Random 4 KiB [`MapRegion::read`] calls per second, on one thread.
fn map_reads(map: &MapRegion, duration: Duration) -> f64 {
    let pages = map.len() / PAGE_SIZE;
    measure(1, duration, |_| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        move |rng: &mut fastrand::Rng| {
            let at = rng.usize(..pages) * PAGE_SIZE;
            map.read(at, &mut buf.0).expect("a read inside the map");
            std::hint::black_box(&buf);
        }
    })
}

/// Plain copies per second of a random 4 KiB from the map's memory, on one
/// thread, at the offsets [`map_reads`] reads (both use `measure`'s seeded
/// generator).
fn memory_reads(map: &MapRegion, duration: Duration) -> f64 {
    let pages = map.len() / PAGE_SIZE;
    measure(1, duration, |_| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        move |rng: &mut fastrand::Rng| {
            let at = rng.usize(..pages) * PAGE_SIZE;
            // SAFETY: `map` is borrowed for the whole measurement, so the source
            // stays mapped; `at + PAGE_SIZE <= map.len()`, and the map covers the
            // whole file, so the source lies inside the file. `buf` is our own
            // allocation, not map memory, so the ranges do not overlap. Nothing
            // writes the file during the benchmark (no write, invalidation or
            // fill runs, and the map is read-only), so this plain copy races no
            // store.
            unsafe {
                std::ptr::copy_nonoverlapping(map.as_ptr().add(at), buf.0.as_mut_ptr(), PAGE_SIZE)
            };
            std::hint::black_box(&buf);
        }
    })
}

/// The ratios the fault targets are set on, and the uncached one for information.
fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let rate = |name: &str| {
        rows.iter()
            .find(|r| r.strategy == name)
            .map(|r| r.ops_per_s)
    };
    let mut ratios = Vec::new();
    for (ours, baseline, what, target) in [
        (
            "cached-fault",
            "uffd-round-trip",
            "pages per second",
            Some(0.75),
        ),
        (
            "uncached-fault",
            "uffd-round-trip",
            "pages per second",
            None,
        ),
        ("map-read", "memory-read", "1 thread", Some(0.9)),
    ] {
        if let (Some(ours_rate), Some(baseline_rate)) = (rate(ours), rate(baseline)) {
            ratios.push(Ratio {
                name: format!("{ours} / {baseline}, {what}"),
                value: ours_rate / baseline_rate,
                target,
            });
        }
    }
    ratios
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_variant_and_ratio() {
        let config = FaultConfig {
            file_bytes: 1 << 20,
            runs: 1,
            seconds_per_run: 0.01,
            ..FaultConfig::default()
        };
        let report = run(&config, |_| {}).unwrap();
        let names: Vec<&str> = report.rows.iter().map(|r| r.strategy.as_str()).collect();
        assert_eq!(names, VARIANTS);
        assert!(report
            .rows
            .iter()
            .all(|r| r.workload == "fault" && r.ops_per_s > 0.0 && r.ops_per_s.is_finite()));
        assert_eq!(report.ratios.len(), 3);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.value > 0.0 && r.value.is_finite()));
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            FaultConfig {
                file_bytes: 100,
                ..FaultConfig::default()
            },
            FaultConfig {
                runs: 0,
                ..FaultConfig::default()
            },
            FaultConfig {
                seconds_per_run: 0.0,
                ..FaultConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
