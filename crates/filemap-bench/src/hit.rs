//! `hit`: 4 KiB random `read_at` hits on a file that is wholly in the cache.
//!
//! Three variants run in one process, in turns, on a file of the same size:
//! - `filemap`: `Mapping::read_at` of a random page (a hit: no lock taken);
//! - `kernel-pread`: `pread` of a random page of a host file that is wholly in
//!   the kernel's page cache (read once first);
//! - `memcpy`: a plain `memcpy` of a random page from the same frame memory the
//!   hits copy from, with no lookup or validation: the floor of the hit path.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use filemap::{Strategy, PAGE_SIZE};

use crate::{cached_file, measure, pattern, row, PageBuf, Ratio, Report, Row};

const PAGE: u64 = PAGE_SIZE as u64;

/// Settings of the hit benchmark.
#[derive(Clone, Debug)]
pub struct HitConfig {
    /// The file's size in bytes (a multiple of 4 KiB).
    pub file_bytes: u64,
    /// Thread counts to measure.
    pub threads: Vec<usize>,
    /// Timed runs of every configuration; the median is reported.
    pub runs: usize,
    /// Length of one timed run.
    pub seconds_per_run: f64,
    /// The coherence strategy of the cache.
    pub strategy: Strategy,
}

impl Default for HitConfig {
    fn default() -> Self {
        HitConfig {
            // Larger than a core's L2 cache, smaller than the L3: at 64 MiB and
            // more, DRAM bandwidth bounds even a plain memcpy below 2x pread.
            file_bytes: 16 << 20,
            threads: vec![1, 2],
            runs: 5,
            seconds_per_run: 0.5,
            strategy: Strategy::DEFAULT,
        }
    }
}

/// The variants, in the order each round runs them.
const VARIANTS: [&str; 3] = ["filemap", "kernel-pread", "memcpy"];

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &HitConfig, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    if config.file_bytes < PAGE || config.file_bytes % PAGE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the file size must be a positive multiple of 4096 bytes",
        ));
    }
    if config.runs == 0 || config.threads.contains(&0) || config.threads.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "runs and thread counts must be at least 1",
        ));
    }
    progress("filling the cache and the kernel's page cache");
    let pages = config.file_bytes / PAGE;
    let (_cache, mapping) = cached_file(config.file_bytes, config.strategy)?;
    let host = warm_host_file(config.file_bytes)?;

    let duration = Duration::from_secs_f64(config.seconds_per_run);
    let mut runs = vec![vec![Vec::new(); VARIANTS.len()]; config.threads.len()];
    for run in 0..config.runs {
        for (t, &threads) in config.threads.iter().enumerate() {
            for (v, variant) in VARIANTS.iter().enumerate() {
                progress(&format!(
                    "run {}/{}: {variant}, {threads} thread(s)",
                    run + 1,
                    config.runs
                ));
                let rate = match *variant {
                    "filemap" => measure(threads, duration, |_| {
                        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
                        let mapping = &mapping;
                        move |rng: &mut fastrand::Rng| {
                            let offset = rng.u64(..pages) * PAGE;
                            let n = mapping.read_at(&mut buf.0, offset).expect("a hit");
                            debug_assert_eq!(n, PAGE_SIZE);
                            std::hint::black_box(&buf);
                        }
                    }),
                    "kernel-pread" => measure(threads, duration, |_| {
                        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
                        let host = &host;
                        move |rng: &mut fastrand::Rng| {
                            let offset = rng.u64(..pages) * PAGE;
                            host.read_exact_at(&mut buf.0, offset)
                                .expect("a warm pread");
                            std::hint::black_box(&buf);
                        }
                    }),
                    _ => measure(threads, duration, |_| {
                        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
                        let mapping = &mapping;
                        move |rng: &mut fastrand::Rng| {
                            let index = rng.u64(..pages);
                            // SAFETY: only reads run during the benchmark: nothing
                            // writes, fills or drops pages of this cache.
                            let cached = unsafe { mapping.memcpy_cached_page(index, &mut buf.0) };
                            debug_assert!(cached);
                            std::hint::black_box(&buf);
                        }
                    }),
                };
                runs[t][v].push(rate);
            }
        }
    }

    let mut rows = Vec::new();
    for (t, &threads) in config.threads.iter().enumerate() {
        for (v, variant) in VARIANTS.iter().enumerate() {
            let name = if *variant == "filemap" {
                config.strategy.name()
            } else {
                variant
            };
            rows.push(row("hit", name, threads, runs[t][v].clone()));
        }
    }
    let ratios = ratios(&rows, config.strategy);
    Ok(Report { rows, ratios })
}

/// A host file of `len` bytes, read once so the kernel caches all of it.
fn warm_host_file(len: u64) -> io::Result<File> {
    let mut file = tempfile::tempfile()?;
    let chunk = pattern(1 << 20);
    let mut written = 0;
    while written < len {
        let n = chunk.len().min((len - written) as usize);
        file.write_all(&chunk[..n])?;
        written += n as u64;
    }
    file.sync_all()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let n = buf.len().min((len - offset) as usize);
        file.read_exact_at(&mut buf[..n], offset)?;
        offset += n as u64;
    }
    Ok(file)
}

/// The ratios the hit targets are set on.
fn ratios(rows: &[Row], strategy: Strategy) -> Vec<Ratio> {
    let per_thread = |name: &str, threads: usize| {
        rows.iter()
            .find(|r| r.strategy == name && r.threads == threads)
            .map(|r| r.per_thread_ops_per_s)
    };
    let filemap = strategy.name();
    let mut ratios = Vec::new();
    let mut thread_counts: Vec<usize> = rows.iter().map(|r| r.threads).collect();
    thread_counts.dedup();
    for &threads in &thread_counts {
        // The ceiling of any hit path: a bare copy against the kernel.
        if let (Some(copy), Some(kernel)) = (
            per_thread("memcpy", threads),
            per_thread("kernel-pread", threads),
        ) {
            ratios.push(Ratio {
                name: format!("memcpy / kernel-pread, {threads} thread(s), per thread (ceiling)"),
                value: copy / kernel,
                target: None,
            });
        }
        for (baseline, target) in [("kernel-pread", 2.0), ("memcpy", 0.85)] {
            if let (Some(ours), Some(theirs)) =
                (per_thread(filemap, threads), per_thread(baseline, threads))
            {
                ratios.push(Ratio {
                    name: format!("{filemap} / {baseline}, {threads} thread(s), per thread"),
                    value: ours / theirs,
                    target: Some(target),
                });
            }
        }
    }
    if let (Some(one), Some(two)) = (per_thread(filemap, 1), per_thread(filemap, 2)) {
        ratios.push(Ratio {
            name: format!("{filemap}: 2 threads / 1 thread, total"),
            value: 2.0 * two / one,
            target: Some(1.8),
        });
    }
    ratios
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_variant_and_ratio() {
        let config = HitConfig {
            file_bytes: 1 << 20,
            threads: vec![1, 2],
            runs: 1,
            seconds_per_run: 0.01,
            ..HitConfig::default()
        };
        let report = run(&config, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 6);
        assert!(report.rows.iter().all(|r| r.ops_per_s > 0.0));
        assert_eq!(report.ratios.len(), 7);
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            HitConfig {
                file_bytes: 100,
                ..HitConfig::default()
            },
            HitConfig {
                runs: 0,
                ..HitConfig::default()
            },
            HitConfig {
                threads: vec![0],
                ..HitConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
