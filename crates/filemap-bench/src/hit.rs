//! `hit`: 4 KiB random `read_at` hits on a file that is wholly in the cache.
//!
//! Every strategy runs, in turns with two baselines, on a file of the same size:
//! - each strategy: `Mapping::read_at` of a random page (a hit: no lock taken,
//!   except under `file-exclusive`, which locks every read);
//! - `kernel`: `pread` of a random page of a host file that is wholly in the
//!   kernel's page cache (read once first);
//! - `memcpy`: a plain `memcpy` of a random page from the same frame memory the
//!   hits copy from, with no lookup or validation (for reference: a plain copy
//!   cannot race soundly);
//! - `copy-<name>`: each racy copy this processor runs (`rep-movsb`, `avx2`,
//!   `avx512`, `neon-pairs`: see `filemap::bench_support::RacyCopy`) of a
//!   random page of the same frame memory, with no lookup or validation; the
//!   fastest of them is the `copy-limit`, the floor of the hit path, which
//!   the hit targets are set against;
//! - `async`: [`filemap::AsyncMapping::read_at`] of a random page, awaited in a
//!   Tokio task (a current-thread runtime per reader), on the headline
//!   strategy's file: the async front's hit, served in the task;
//! - `spawn-blocking`: the same tasks awaiting `tokio::task::spawn_blocking`
//!   around the synchronous `read_at` (with a buffer the call owns): what an
//!   async caller pays without the front;
//! - `overwrite` rows: `Mapping::write_at` of a whole random page of a cached
//!   file (the headline strategy, a cache of its own, so that the read rows'
//!   pages never change), against `pwrite` of a page of a host file the
//!   kernel caches: buffered overwrites, each side's writeback running behind.
//! - the peers (`moka`, `quick_cache`, `foyer`: see [`filemap_peers`]): the
//!   caches a user would pick instead, each holding every page of a file of
//!   the same size; a hit is the peer's loading call on a cached page and a
//!   copy of its bytes into the reader's buffer, as `read_at` copies.
//!
//! One read in 16 is timed for the latencies, so the clock costs a hit next to
//! nothing. Reader `i` is pinned to the `i`-th processor, the same for every
//! variant (see [`crate::pinned`]). Each run builds fresh caches, and the
//! variants measure its slices in turns ([`crate::interleaved`]).

use std::future::Future;
use std::io;
use std::sync::Arc;

use filemap::bench_support::{chosen_racy_copy, RacyCopy};
use filemap::page::{start_of, PAGE, PAGE_SIZE};
use filemap::{AsyncMapping, Mapping};
use filemap_peers::{Page, PageKey, PageSource, Peer, PeerCache};

use crate::kernel::HostFile;
use crate::tasks::{task_page_reads, PageRead};
use crate::{
    cached_file, coherent, figure, headline_strategy, interleaved, page_reads, timed_row, PageBuf,
    Progress, Ratio, Report, Row, RowKey, RunSettings, Target, KERNEL,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "hit";
/// The row of the async front's hits.
pub const ASYNC: &str = "async";
/// The row of `spawn_blocking` around the synchronous read.
pub const SPAWN_BLOCKING: &str = "spawn-blocking";
/// One read in this many is timed.
const TIME_EVERY: u32 = 16;

/// Settings of the hit benchmark.
#[derive(Clone, Debug)]
pub struct HitConfig {
    /// The file's size in bytes (a multiple of 4 KiB).
    pub file_bytes: u64,
    /// The runs, the strategies and the reader thread counts to measure.
    pub settings: RunSettings,
}

impl Default for HitConfig {
    fn default() -> Self {
        HitConfig {
            // Larger than a core's L2 cache, smaller than the L3: at 64 MiB and
            // more, DRAM bandwidth bounds even a plain memcpy below 2x pread.
            file_bytes: 16 << 20,
            settings: RunSettings {
                threads: vec![1, 2],
                ..RunSettings::default()
            },
        }
    }
}

/// What one measurement runs.
#[derive(Clone, Copy)]
enum Variant {
    Strategy(usize),
    Kernel,
    Memcpy,
    Copy(RacyCopy),
    Async,
    SpawnBlocking,
    /// On the strategy of this index.
    Overwrite(usize),
    KernelOverwrite,
    Peer(Peer),
}

/// The operation of the overwrite rows.
const OVERWRITE: &str = "overwrite";

/// The row of a racy copy's page copies.
pub(crate) fn copy_row(copy: RacyCopy) -> &'static str {
    match copy {
        RacyCopy::RepMovsb => "copy-rep-movsb",
        RacyCopy::Avx2 => "copy-avx2",
        RacyCopy::Avx512 => "copy-avx512",
        RacyCopy::NeonPairs => "copy-neon-pairs",
        RacyCopy::AtomicWords => "copy-atomic-words",
    }
}

impl Variant {
    fn name(self, settings: &RunSettings) -> &'static str {
        match self {
            Variant::Strategy(s) => settings.strategies[s].name(),
            Variant::Kernel => KERNEL,
            Variant::Memcpy => "memcpy",
            Variant::Copy(copy) => copy_row(copy),
            Variant::Async => ASYNC,
            Variant::SpawnBlocking => SPAWN_BLOCKING,
            Variant::Overwrite(s) => settings.strategies[s].name(),
            Variant::KernelOverwrite => KERNEL,
            Variant::Peer(peer) => peer.name(),
        }
    }

    fn op(self) -> &'static str {
        match self {
            Variant::Overwrite(_) | Variant::KernelOverwrite => OVERWRITE,
            _ => "read",
        }
    }
}

/// Every measurement, the overwrites on strategy `headline` (an index).
fn variants(config: &HitConfig, headline: usize) -> Vec<Variant> {
    (0..config.settings.strategies.len())
        .map(Variant::Strategy)
        .chain([Variant::Kernel, Variant::Memcpy])
        .chain(RacyCopy::available().into_iter().map(Variant::Copy))
        .chain([
            Variant::Async,
            Variant::SpawnBlocking,
            Variant::Overwrite(headline),
            Variant::KernelOverwrite,
        ])
        .chain(Peer::ALL.map(Variant::Peer))
        .collect()
}

/// The pages the peers hold: page `index` filled with its low byte.
struct Numbered;

impl PageSource for Numbered {
    fn load(&self, (_file, index): PageKey) -> io::Result<Page> {
        Ok(Arc::new([index as u8; PAGE_SIZE]))
    }
}

/// `peer`, holding every one of `pages` pages (room for twice as many, so
/// that no admission policy turns a page away).
fn warm_peer(peer: Peer, pages: u64) -> io::Result<Box<dyn PeerCache>> {
    let cache = peer.build(2 * pages, Arc::new(Numbered));
    for index in 0..pages {
        cache.get((0, index))?;
    }
    Ok(cache)
}

/// The async front's hit, awaited in the task.
struct AsyncHit(AsyncMapping);

impl PageRead for AsyncHit {
    async fn read(&self, index: u64, mut buf: Box<PageBuf>) -> io::Result<Box<PageBuf>> {
        let n = self.0.read_at(&mut buf.0, start_of(index)).await?;
        debug_assert_eq!(n, PAGE_SIZE);
        Ok(buf)
    }
}

/// The synchronous read, handed to the blocking pool and awaited.
struct SpawnBlocking(Arc<Mapping>);

impl PageRead for SpawnBlocking {
    fn read(
        &self,
        index: u64,
        mut buf: Box<PageBuf>,
    ) -> impl Future<Output = io::Result<Box<PageBuf>>> + Send {
        let mapping = self.0.clone();
        let read = tokio::task::spawn_blocking(move || {
            let n = mapping.read_at(&mut buf.0, start_of(index))?;
            debug_assert_eq!(n, PAGE_SIZE);
            Ok(buf)
        });
        async move { read.await.map_err(io::Error::other)? }
    }
}

/// How many measured steps [`run`] announces.
pub fn steps(config: &HitConfig) -> usize {
    let settings = &config.settings;
    // How many does not depend on which strategy the overwrites use.
    settings.runs * settings.threads.len() * variants(config, 0).len()
}

/// Checks the settings without running anything.
pub fn check(config: &HitConfig) -> io::Result<()> {
    crate::check_file_bytes(config.file_bytes)?;
    config.settings.check()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &HitConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    progress(Progress::Setup("hit: filling the kernel's page cache"));
    let pages = config.file_bytes / PAGE;
    let host = HostFile::create(config.file_bytes)?;
    let written_host = HostFile::create(config.file_bytes)?;

    let duration = settings.duration();
    // The async and overwrite rows use the headline strategy.
    let headline = headline_strategy(&settings.strategies)?
        .and_then(|h| settings.strategies.iter().position(|&s| s == h))
        .unwrap_or(0);
    let variants = variants(config, headline);
    let mut runs = vec![vec![Vec::new(); variants.len()]; settings.threads.len()];
    for run in 0..settings.runs {
        // Fresh caches every run: a cache's pages stay where they were first
        // placed in physical memory, and two caches of one strategy, measured
        // in turns, differed by up to 8% for the whole of an invocation. New
        // pages each run let the median mix placements, so that no strategy
        // keeps a lucky (or unlucky) one.
        let caches = settings
            .strategies
            .iter()
            .map(|&strategy| cached_file(config.file_bytes, strategy))
            .collect::<io::Result<Vec<_>>>()?;
        let written = cached_file(config.file_bytes, settings.strategies[headline])?;
        let peers = Peer::ALL
            .map(|peer| warm_peer(peer, pages))
            .into_iter()
            .collect::<io::Result<Vec<_>>>()?;
        for (t, &threads) in settings.threads.iter().enumerate() {
            let measured = interleaved(
                &variants,
                duration,
                |variant| {
                    let name = variant.name(settings);
                    progress(Progress::Step(&format!(
                        "hit, run {}/{}: {name}, {threads} thread(s)",
                        run + 1,
                        settings.runs
                    )));
                },
                |variant, duration| {
                    let measured = match *variant {
                        Variant::Strategy(s) => {
                            let mapping = &caches[s].1;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                let n = mapping.read_at(buf, start_of(index))?;
                                debug_assert_eq!(n, PAGE_SIZE);
                                Ok(())
                            })?
                        }
                        Variant::Kernel => {
                            use std::os::unix::fs::FileExt;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                host.file.read_exact_at(buf, start_of(index))
                            })?
                        }
                        Variant::Memcpy => {
                            let mapping = &caches[0].1;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                // SAFETY: only reads run during the benchmark:
                                // nothing writes, fills or drops pages of this cache.
                                let cached = unsafe { mapping.memcpy_cached_page(index, buf) };
                                debug_assert!(cached);
                                Ok(())
                            })?
                        }
                        Variant::Copy(copy) => {
                            let mapping = &caches[0].1;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                let cached = mapping.racy_copy_cached_page(copy, index, buf);
                                debug_assert!(cached);
                                Ok(())
                            })?
                        }
                        Variant::Async => {
                            let front = AsyncMapping::new(caches[headline].1.clone());
                            task_page_reads(threads, duration, TIME_EVERY, pages, |_| {
                                AsyncHit(front.clone())
                            })?
                        }
                        Variant::SpawnBlocking => {
                            let mapping = &caches[headline].1;
                            task_page_reads(threads, duration, TIME_EVERY, pages, |_| {
                                SpawnBlocking(mapping.clone())
                            })?
                        }
                        Variant::Overwrite(_) => {
                            let mapping = &written.1;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                mapping.write_all_at(buf, start_of(index))
                            })?
                        }
                        Variant::KernelOverwrite => {
                            use std::os::unix::fs::FileExt;
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                written_host.file.write_all_at(buf, start_of(index))
                            })?
                        }
                        Variant::Peer(peer) => {
                            let cache = &peers[Peer::ALL.iter().position(|&p| p == peer).unwrap()];
                            page_reads(threads, duration, TIME_EVERY, pages, |index, buf| {
                                buf.copy_from_slice(&cache.get((0, index))?[..]);
                                Ok(())
                            })?
                        }
                    };
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
        for (v, variant) in variants.iter().enumerate() {
            let strategy = variant.name(settings);
            let key = RowKey {
                workload: WORKLOAD,
                strategy,
                op: variant.op(),
                threads,
            };
            rows.push(timed_row(key, &runs[t][v]));
        }
    }
    let ratios = ratios(&rows, settings)?;
    let copies: Vec<_> = RacyCopy::available().iter().map(|c| c.name()).collect();
    let notes = vec![format!(
        "hit: racy copies this processor runs: {}; the caches copy with {} (the fastest at start-up)",
        copies.join(", "),
        chosen_racy_copy().name()
    )];
    Ok(Report {
        rows,
        ratios,
        notes,
    })
}

/// The ratios the hit targets are set on.
fn ratios(rows: &[Row], settings: &RunSettings) -> io::Result<Vec<Ratio>> {
    let per_thread = |name: &str, threads: usize| {
        figure(rows, WORKLOAD, name, "read", threads, |r| {
            r.per_thread_ops_per_s
        })
    };
    let headline = headline_strategy(&settings.strategies)?;
    let mut ratios = Vec::new();
    for &threads in &settings.threads {
        // The lock must cost nothing on hits: `range` against the best.
        let best = coherent(&settings.strategies)
            .filter_map(|s| per_thread(s.name(), threads).ok().map(|v| (s.name(), v)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let best_figure = best
            .map(|(_, v)| v)
            .ok_or_else(|| "not available: no coherent strategy was measured".to_owned());
        ratios.push(Ratio::between(
            WORKLOAD,
            format!(
                "range / best ({}), {threads} thread(s)",
                best.map_or("none", |(name, _)| name)
            ),
            per_thread("range", threads),
            best_figure,
            Some(Target::AtLeast(0.95)),
        ));
        // The floor of any hit path: the fastest racy copy of a page.
        let limit = RacyCopy::available()
            .into_iter()
            .filter_map(|copy| {
                let name = copy_row(copy);
                per_thread(name, threads).ok().map(|v| (name, v))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let limit_name = limit.map_or("none", |(name, _)| name);
        let limit = limit
            .map(|(_, v)| v)
            .ok_or_else(|| "not available: no racy copy was measured".to_owned());
        // The ceiling of any hit path against the kernel.
        ratios.push(Ratio::between(
            WORKLOAD,
            format!(
                "copy-limit ({limit_name}) / kernel, {threads} thread(s), per thread (ceiling)"
            ),
            limit.clone(),
            per_thread(KERNEL, threads),
            None,
        ));
        if let Some(strategy) = headline {
            let ours = strategy.name();
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours} / copy-limit ({limit_name}), {threads} thread(s), per thread"),
                per_thread(ours, threads),
                limit.clone(),
                Some(Target::AtLeast(0.85)),
            ));
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours} / kernel, {threads} thread(s), per thread"),
                per_thread(ours, threads),
                per_thread(KERNEL, threads),
                // The kernel's promise holds for one reader; two share the
                // memory bandwidth with the kernel's copies too.
                (threads == 1).then_some(Target::AtLeast(2.0)),
            ));
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours} / memcpy, {threads} thread(s), per thread"),
                per_thread(ours, threads),
                per_thread("memcpy", threads),
                None,
            ));
            // The async front: its hits as fast as the synchronous ones, and
            // far faster than handing each to the blocking pool.
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ASYNC} / {ours}, {threads} thread(s), per thread"),
                per_thread(ASYNC, threads),
                per_thread(ours, threads),
                Some(Target::AtLeast(0.8)),
            ));
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ASYNC} / {SPAWN_BLOCKING}, {threads} thread(s), per thread"),
                per_thread(ASYNC, threads),
                per_thread(SPAWN_BLOCKING, threads),
                Some(Target::AtLeast(5.0)),
            ));
            // A hit that writes no shared memory against a hash lookup and
            // a reference count: the fastest cache a user would pick instead.
            // Its ceiling is the copy alone against the peer: no hit that
            // copies the page out goes past it.
            let fastest = Peer::ALL
                .into_iter()
                .filter_map(|peer| per_thread(peer.name(), threads).ok().map(|v| (peer, v)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let fastest_name = fastest.map_or("none", |(peer, _)| peer.name());
            let fastest = fastest
                .map(|(_, v)| v)
                .ok_or_else(|| "not available: no peer was measured".to_owned());
            ratios.push(Ratio::between(
                WORKLOAD,
                format!(
                    "copy-limit ({limit_name}) / fastest peer ({fastest_name}), \
                     {threads} thread(s), per thread (ceiling)"
                ),
                limit.clone(),
                fastest.clone(),
                None,
            ));
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours} / fastest peer ({fastest_name}), {threads} thread(s), per thread"),
                per_thread(ours, threads),
                fastest,
                Some(Target::AtLeast(1.5)),
            ));
        }
    }
    if let Some(strategy) = headline {
        let ours = strategy.name();
        for &threads in &settings.threads {
            let overwrites = |name: &str| {
                figure(rows, WORKLOAD, name, OVERWRITE, threads, |r| {
                    r.per_thread_ops_per_s
                })
            };
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours} / kernel, 4 KiB overwrites of cached pages, {threads} thread(s), per thread"),
                overwrites(ours),
                overwrites(KERNEL),
                None,
            ));
        }
        if settings.threads.contains(&1) && settings.threads.contains(&2) {
            ratios.push(Ratio::between(
                WORKLOAD,
                format!("{ours}: 2 threads / 1 thread, total"),
                per_thread(ours, 2).map(|v| 2.0 * v),
                per_thread(ours, 1),
                Some(Target::AtLeast(1.9)),
            ));
        }
    }
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;
    use filemap::Strategy;

    #[test]
    fn a_tiny_run_reports_every_strategy_baseline_and_ratio() {
        let config = HitConfig {
            file_bytes: 1 << 20,
            settings: RunSettings {
                threads: vec![1, 2],
                runs: 1,
                seconds_per_run: 0.01,
                ..RunSettings::default()
            },
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        let copies = RacyCopy::available().len();
        assert_eq!(
            report.rows.len(),
            2 * (Strategy::ALL.len() + 6 + copies + Peer::ALL.len())
        );
        for peer in Peer::ALL {
            assert!(
                report.find(WORKLOAD, peer.name(), "read", 2).is_some(),
                "{peer}"
            );
        }
        for name in ["range", KERNEL] {
            assert!(
                report.find(WORKLOAD, name, OVERWRITE, 2).is_some(),
                "{name}"
            );
        }
        for copy in RacyCopy::available() {
            assert!(report.find(WORKLOAD, copy_row(copy), "read", 1).is_some());
        }
        for strategy in Strategy::ALL {
            let row = report.find(WORKLOAD, strategy.name(), "read", 1).unwrap();
            assert_eq!(row.coherent, strategy.is_coherent());
        }
        assert!(report
            .rows
            .iter()
            .all(|r| r.ops_per_s > 0.0 && r.p50_us > 0.0 && r.p99_us >= r.p50_us));
        // Per thread count: range/best, the ceiling, three for the headline
        // strategy (copy-limit, kernel, memcpy), two for the async front and
        // two against the fastest peer (its ceiling, the headline's); per
        // thread count, overwrites against the kernel's; and the scaling of
        // the headline strategy.
        assert_eq!(report.ratios.len(), 2 * 9 + 2 + 1);
        let peers: Vec<_> = report
            .ratios
            .iter()
            .filter(|r| r.name.contains("fastest peer"))
            .collect();
        assert_eq!(peers.len(), 4);
        for ratio in peers {
            assert!(ratio.value.is_some(), "{}", ratio.name);
        }
        let limit = report
            .ratios
            .iter()
            .find(|r| r.name.starts_with("range / copy-limit"))
            .unwrap();
        assert!(limit.value.is_some(), "{}", limit.name);
        for name in [ASYNC, SPAWN_BLOCKING] {
            assert!(report.find(WORKLOAD, name, "read", 2).is_some(), "{name}");
        }
        let async_ratios: Vec<_> = report
            .ratios
            .iter()
            .filter(|r| r.name.starts_with(ASYNC))
            .collect();
        assert_eq!(async_ratios.len(), 4);
        assert!(async_ratios.iter().all(|r| r.value.is_some()));
        let range = &report.ratios[0];
        assert_eq!(
            range.value.is_some(),
            crate::strategy_named("range").is_some()
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            HitConfig {
                file_bytes: 100,
                ..HitConfig::default()
            },
            HitConfig {
                settings: RunSettings {
                    runs: 0,
                    ..HitConfig::default().settings
                },
                ..HitConfig::default()
            },
            HitConfig {
                settings: RunSettings {
                    threads: vec![0],
                    ..HitConfig::default().settings
                },
                ..HitConfig::default()
            },
            HitConfig {
                settings: RunSettings {
                    strategies: Vec::new(),
                    ..HitConfig::default().settings
                },
                ..HitConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
