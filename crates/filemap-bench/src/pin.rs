//! `pin`: what a buffer manager pays to look at a cached page in place.
//!
//! On a file wholly in the cache, under the headline strategy, in turns:
//! - `pin`: [`filemap::Mapping::pin`] of a random page, a read of 64 bytes
//!   from it, and the unpin (the guard dropped): a pin and an unpin are two
//!   compare-and-swaps on the page's slot;
//! - `read-64`: `read_at` of the same 64 bytes (a hit that copies 64 bytes);
//! - `read-4k`: `read_at` of the whole page (the hit of `hit`).
//!
//! The target: a pin, its 64-byte read and its unpin at least 3 times as
//! many per second as the 4 KiB hit. Reader `i` is pinned to processor `i`,
//! one read in 16 is timed, and each run builds a fresh cache, as in `hit`.

use std::io;

use filemap::page::{start_of, PAGE};

use crate::{
    cached_file, figure, headline_strategy, interleaved, page_reads, timed_row, Progress, Ratio,
    Report, RowKey, RunSettings, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "pin";
/// One read in this many is timed.
const TIME_EVERY: u32 = 16;
/// The bytes a pinned read looks at.
const LOOK: usize = 64;

/// The rows, in the order they are measured.
const VARIANTS: [&str; 3] = ["pin", "read-64", "read-4k"];

/// Settings of the pin benchmark.
#[derive(Clone, Debug)]
pub struct PinConfig {
    /// The file's size in bytes (a multiple of 4 KiB).
    pub file_bytes: u64,
    /// The runs, the strategies (the headline one is measured) and the
    /// reader thread counts.
    pub settings: RunSettings,
}

impl Default for PinConfig {
    fn default() -> Self {
        PinConfig {
            file_bytes: 16 << 20,
            settings: RunSettings {
                threads: vec![1, 2],
                ..RunSettings::default()
            },
        }
    }
}

/// How many measured steps [`run`] announces.
pub fn steps(config: &PinConfig) -> usize {
    let settings = &config.settings;
    settings.runs * settings.threads.len() * VARIANTS.len()
}

/// Checks the settings without running anything.
pub fn check(config: &PinConfig) -> io::Result<()> {
    crate::check_file_bytes(config.file_bytes)?;
    config.settings.check()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &PinConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    let strategy = headline_strategy(&settings.strategies)?.unwrap_or(settings.strategies[0]);
    let pages = config.file_bytes / PAGE;
    let duration = settings.duration();
    let mut runs = vec![vec![Vec::new(); VARIANTS.len()]; settings.threads.len()];
    for run in 0..settings.runs {
        let (_cache, mapping) = cached_file(config.file_bytes, strategy)?;
        for (t, &threads) in settings.threads.iter().enumerate() {
            let measured = interleaved(
                &VARIANTS,
                duration,
                |name| {
                    progress(Progress::Step(&format!(
                        "pin, run {}/{}: {name}, {threads} thread(s)",
                        run + 1,
                        settings.runs
                    )))
                },
                |&name, duration| {
                    let measured =
                        page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                            match name {
                                "pin" => {
                                    let page = mapping.pin(index)?;
                                    buf[..LOOK].copy_from_slice(&page[..LOOK]);
                                }
                                "read-64" => {
                                    mapping.read_exact_at(&mut buf[..LOOK], start_of(index))?;
                                }
                                _ => mapping.read_exact_at(buf, start_of(index))?,
                            }
                            Ok(())
                        })?;
                    Ok(vec![measured])
                },
            )?;
            for (v, mut kinds) in measured.into_iter().enumerate() {
                runs[t][v].push(kinds.remove(0));
            }
        }
    }

    let mut rows = Vec::new();
    for (t, &threads) in settings.threads.iter().enumerate() {
        for (v, &name) in VARIANTS.iter().enumerate() {
            let key = RowKey {
                workload: WORKLOAD,
                strategy: name,
                op: "read",
                threads,
            };
            rows.push(timed_row(key, &runs[t][v]));
        }
    }
    let per_thread = |name: &str, threads: usize| {
        figure(&rows, WORKLOAD, name, "read", threads, |r| {
            r.per_thread_ops_per_s
        })
    };
    let mut ratios = Vec::new();
    for &threads in &settings.threads {
        ratios.push(Ratio::between(
            WORKLOAD,
            format!("pin + 64 B + unpin / 4 KiB read_at, {threads} thread(s), per thread"),
            per_thread("pin", threads),
            per_thread("read-4k", threads),
            Some(Target::AtLeast(3.0)),
        ));
        ratios.push(Ratio::between(
            WORKLOAD,
            format!("pin + 64 B + unpin / 64 B read_at, {threads} thread(s), per thread"),
            per_thread("pin", threads),
            per_thread("read-64", threads),
            None,
        ));
    }
    Ok(Report {
        rows,
        ratios,
        notes: vec![format!(
            "pin: {} MiB file wholly cached, {} strategy; pin: Mapping::pin of a random page, \
             {LOOK} bytes read from the guard, unpin",
            config.file_bytes >> 20,
            strategy.name()
        )],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_row_and_ratio() {
        let config = PinConfig {
            file_bytes: 1 << 20,
            settings: RunSettings {
                runs: 1,
                seconds_per_run: 0.02,
                threads: vec![1],
                ..RunSettings::default()
            },
        };
        let report = run(&config, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 3);
        assert!(
            report.rows.iter().all(|row| row.ops_per_s > 0.0),
            "{:?}",
            report.rows
        );
        assert_eq!(report.ratios.len(), 2);
        assert!(
            report.ratios.iter().all(|r| r.value.is_some()),
            "{:?}",
            report.ratios
        );
    }
}
