//! `evict`: the eviction policies side by side on the same accesses, and what
//! a cached page costs the cache in bookkeeping.
//!
//! Three traces of page numbers, made from a fixed seed so every policy and
//! every run sees the same accesses, in a cache of `cache_pages` pages:
//! - `uniform`: random pages of a working set twice the cache (the `hit`
//!   workload once the file outgrows the budget);
//! - `zipf`: pages of eight times the cache, drawn with Zipf skew 0.9;
//! - `scan-polluted`: random pages of a hot set half the cache, with a one-time
//!   sequential scan of a cache's worth of new pages after every 4 cache's
//!   worth of hot reads.
//!
//! Each policy ([`EvictionPolicy::ALL`]) is measured two ways: the trace run
//! through [`filemap::cache::simulate_eviction`] (the cache's rules without
//! the cache), and the trace replayed as 4 KiB `read_at` calls on a real
//! cache of that budget over a file on a `MemDevice`, whose hit ratio comes from
//! [`filemap::PageCache::stats`] (readahead included: the scans are sequential).
//! The rows give the replay's reads per second; the ratios compare hit ratios.
//! The bookkeeping per cached page is the cache's `metadata_bytes` over its
//! cached pages at the end of the `uniform` replay under the default policy.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use filemap::cache::simulate_eviction;
use filemap::page::{start_of, PAGE, PAGE_SIZE};
use filemap::{EvictionPolicy, MemDevice, PageCache, Volume};

use crate::{invalid, Histogram, Measured, PageBuf, Progress, Ratio, Report, RowKey, Target};

/// The workload's name in reports.
pub const WORKLOAD: &str = "evict";

/// Settings of the eviction benchmark.
#[derive(Clone, Debug)]
pub struct EvictConfig {
    /// The cache's budget in pages.
    pub cache_pages: usize,
    /// Accesses per trace.
    pub accesses: usize,
}

impl Default for EvictConfig {
    fn default() -> Self {
        EvictConfig {
            cache_pages: 4096,
            accesses: 200_000,
        }
    }
}

/// The traces, in the order they run.
pub const TRACES: [&str; 3] = ["uniform", "zipf", "scan-polluted"];

/// Checks the settings.
pub fn check(config: &EvictConfig) -> io::Result<()> {
    if config.cache_pages < 16 || config.cache_pages > 1 << 20 {
        return Err(invalid("the eviction cache must be 16 to 2^20 pages"));
    }
    if config.accesses == 0 || config.accesses > 100_000_000 {
        return Err(invalid("accesses must be 1 to 10^8"));
    }
    Ok(())
}

/// The measured steps: one replay per trace and policy.
pub fn steps(_config: &EvictConfig) -> usize {
    TRACES.len() * EvictionPolicy::ALL.len()
}

/// The trace `name`: page numbers.
pub fn trace(name: &str, cache_pages: usize, accesses: usize) -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let cache = cache_pages as u64;
    match name {
        "uniform" => (0..accesses).map(|_| rng.u64(..2 * cache)).collect(),
        "zipf" => {
            let n = 8 * cache_pages;
            let mut cumulative = Vec::with_capacity(n);
            let mut total = 0.0;
            for rank in 1..=n {
                total += 1.0 / (rank as f64).powf(0.9);
                cumulative.push(total);
            }
            // Ranks are spread over the pages so hot pages are not neighbours.
            let spread = |rank: usize| (rank as u64 * 7919) % n as u64;
            (0..accesses)
                .map(|_| {
                    let x = rng.f64() * total;
                    spread(cumulative.partition_point(|&c| c < x).min(n - 1))
                })
                .collect()
        }
        _ => {
            let hot = cache / 2;
            let mut next_scan = hot;
            let mut out = Vec::with_capacity(accesses);
            while out.len() < accesses {
                for _ in 0..4 * cache {
                    out.push(rng.u64(..hot));
                }
                for _ in 0..cache {
                    out.push(next_scan);
                    next_scan += 1;
                }
            }
            out.truncate(accesses);
            out
        }
    }
}

/// Runs the benchmark.
pub fn run(config: &EvictConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let default = PageCache::builder().budget_bytes(PAGE).build()?.eviction();
    let mut report = Report::default();
    let mut hit_ratios = Vec::new();
    let mut metadata = None;
    for name in TRACES {
        progress(Progress::Setup(&format!("evict: making the {name} trace")));
        let trace = trace(name, config.cache_pages, config.accesses);
        for policy in EvictionPolicy::ALL {
            progress(Progress::Step(&format!("evict, {name}: {}", policy.name())));
            let simulated = simulate_eviction(policy, config.cache_pages, &trace);
            let (measured, replayed, bytes_per_page) = replay(config, policy, &trace)?;
            if name == "uniform" && policy == default {
                metadata = Some(bytes_per_page);
            }
            let key = RowKey {
                workload: WORKLOAD,
                strategy: policy.name(),
                op: name,
                threads: 1,
            };
            report.rows.push(crate::timed_row(key, &[measured]));
            hit_ratios.push((name, policy, simulated, replayed));
        }
    }
    for name in TRACES {
        let ratio = |policy: EvictionPolicy, simulated: bool| {
            hit_ratios
                .iter()
                .find(|(n, p, _, _)| *n == name && *p == policy)
                .map(|&(_, _, s, r)| if simulated { s } else { r })
                .ok_or_else(|| format!("no {} run", policy.name()))
        };
        for simulated in [true, false] {
            let how = if simulated { "simulated" } else { "cache" };
            report.ratios.push(Ratio::between(
                WORKLOAD,
                format!("sieve / clock hit ratio, {name} ({how})"),
                ratio(EvictionPolicy::Sieve, simulated),
                ratio(EvictionPolicy::Clock, simulated),
                None,
            ));
        }
    }
    report.ratios.push(Ratio::absolute(
        WORKLOAD,
        format!(
            "bookkeeping bytes per cached page ({}, uniform)",
            default.name()
        ),
        metadata.ok_or_else(|| "no uniform run".to_owned()),
        Some(Target::AtMost(64.0)),
    ));
    for (name, policy, simulated, replayed) in &hit_ratios {
        report.notes.push(format!(
            "evict: {name}, {}: hit ratio {simulated:.3} simulated, {replayed:.3} in the cache{}",
            policy.name(),
            if *policy == default { " (default)" } else { "" }
        ));
    }
    Ok(report)
}

/// Replays `trace` as 4 KiB reads on a cache of the configured budget under
/// `policy`: the reads per second, the cache's hit ratio, and its bookkeeping
/// bytes per cached page at the end.
fn replay(
    config: &EvictConfig,
    policy: EvictionPolicy,
    trace: &[u64],
) -> io::Result<(Measured, f64, f64)> {
    let pages = trace.iter().max().map_or(1, |&max| max + 1);
    let volume = Volume::format(Arc::new(MemDevice::new((pages + 256) * PAGE)))?;
    let file = volume.create_file("trace")?;
    let cache = PageCache::builder()
        .budget_bytes(config.cache_pages as u64 * PAGE)
        .eviction(policy)
        .build()?;
    let mapping = cache.open(Arc::new(file))?;
    mapping.set_len(pages * PAGE)?;
    let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
    let mut latency = Histogram::new();
    let started = Instant::now();
    for (i, &page) in trace.iter().enumerate() {
        let timed = (i % 16 == 0).then(Instant::now);
        mapping.read_exact_at(&mut buf.0, start_of(page))?;
        if let Some(start) = timed {
            latency.record(start.elapsed().as_nanos() as u64);
        }
    }
    let ops_per_s = trace.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let stats = cache.stats();
    let hit_ratio = stats.hits as f64 / (stats.hits + stats.misses).max(1) as f64;
    let cached_pages = (stats.cached_bytes / PAGE).max(1);
    let per_page = stats.metadata_bytes as f64 / cached_pages as f64;
    Ok((Measured::new(ops_per_s, latency, 1), hit_ratio, per_page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_trace_policy_and_ratio() {
        let config = EvictConfig {
            cache_pages: 64,
            accesses: 4000,
        };
        let report = run(&config, |_| {}).unwrap();
        assert_eq!(report.rows.len(), steps(&config));
        assert_eq!(report.ratios.len(), 2 * TRACES.len() + 1);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.value.is_some_and(|v| v > 0.0 && v.is_finite())));
        assert_eq!(report.notes.len(), steps(&config));
    }

    #[test]
    fn traces_are_the_same_for_every_run() {
        for name in TRACES {
            assert_eq!(trace(name, 64, 1000), trace(name, 64, 1000));
            assert_eq!(trace(name, 64, 1000).len(), 1000);
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            EvictConfig {
                cache_pages: 1,
                ..EvictConfig::default()
            },
            EvictConfig {
                accesses: 0,
                ..EvictConfig::default()
            },
        ] {
            assert!(check(&config).is_err());
        }
    }
}
