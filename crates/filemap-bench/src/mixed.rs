//! `mixed`: readers, a writer and a puncher on one file, against the same calls
//! on a host file (`kernel`).
//!
//! The file (64 MiB by default) has three regions: the readers' half, the first
//! half; the writer's quarter; and the punch quarter. Reader threads read random
//! 4 KiB pages of their half with `read_at`; one writer thread overwrites random
//! 64 KiB clusters of its quarter with `write_at`; one puncher punches random
//! 64 KiB ranges with `punch_hole`, continuously, with no pause: the storm a
//! file-wide lock fears, and the same for every strategy. Two variants:
//!
//! - `mixed-disjoint`: the punches land in the punch quarter, which the readers
//!   never read. Only a lock that serialises unrelated ranges slows the readers.
//! - `mixed-overlap`: the punches land in the readers' half. Every strategy must
//!   serialise them against the readers' fills of the same pages; the figure
//!   shows what each pays for that.
//!
//! **What makes the lock the thing measured.** A lock that hits do not take
//! can only slow readers when they miss. So the cache's budget (`cache_bytes`;
//! by default 31/32 of the readers' half) is used up before the clock starts,
//! and from then on some of the readers' reads miss and fill under Fill, as
//! reads of a working set larger than the cache do: each miss evicts another
//! page, and the writer's pages compete for the budget too (a note reports the
//! share of reads that missed). Reader misses that wait for a punch are what
//! the strategies differ in (and under `file-exclusive`, every read waits for
//! every write and punch).
//!
//! **What a punch costs.** The file is a host file (the `HostFile` backend),
//! behind a `FaultyBackend` that sleeps [`PUNCH_IO`] (200 µs) in every punch:
//! the time a file system's punch spends in its journal, or a remote store's
//! delete, during which the puncher holds Invalidate. On this machine's ext4
//! the kernel's own punch of written data takes 0.7 to 2 ms at the median (the
//! `kernel` row of `mixed-overlap`), so 200 µs is on the short side; the host
//! file's punch of pages just written (`mixed-disjoint`) takes microseconds,
//! which would make the lock's hold, and the comparison, vanish.
//!
//! The punch quarter is never cached: pages the punches freed would go to the
//! readers' misses, which would soon cache their whole half and stop missing.
//! So that each disjoint punch still frees real blocks (not a hole punched
//! again), the puncher first writes its 64 KiB straight to the backend, as if
//! written long ago: untimed, outside the cache and its lock, the same for
//! every strategy; it only slows the punch rate. The kernel's puncher does the
//! same with a `pwrite`. In `mixed-overlap` the punches drop the readers'
//! cached pages, which their next reads fill again.
//!
//! On a machine with fewer cores than threads (the readers, the writer and
//! the puncher), a thread preempted while it holds a mode makes every
//! conflicting request wait for its next time slice: the p99 and maximum
//! latencies show it, under the strategies whose modes conflict more.
//!
//! `kernel` runs the same calls as `pread`, `pwrite` and
//! `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a host file that the kernel caches
//! whole (it has no budget to hold to), so its reads miss only on punched
//! pages: it is there for scale, not for a ratio.
//!
//! The peers (`moka`, `quick_cache`, `foyer`: see [`filemap_peers`]) run the
//! same calls as a read-through page cache of the same budget over the same
//! backend: a read is the peer's loading call and a copy; a write and a punch
//! change the backend, then remove the keys of their pages. They take no
//! lock, and pay for it in stale pages (`filemap torture --strategy moka`),
//! not here.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::backend::{BackendOp, FaultyBackend};
use filemap::fault::{Injection, Trigger};
use filemap::page::{index_of, PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, Backend, FaultRule, Mapping, PageCache, Strategy};
use filemap_peers::{Page, PageKey, PageSource, Peer, PeerCache};

use crate::kernel::HostFile;
use crate::{
    figure, measure_kinds, pattern, timed_row, Measured, PageBuf, Progress, Ratio, Report, Row,
    RowKey, RunSettings, Target, KERNEL,
};

/// The size of one punch.
pub const PUNCH_BYTES: u64 = 64 << 10;
/// What one punch spends in the backend besides the host file's own punch
/// (see the module documentation).
pub const PUNCH_IO: Duration = Duration::from_micros(200);
/// The size of one write: a cluster of pages, as a database's writer or a log
/// writes them.
pub const WRITE_BYTES: u64 = 64 << 10;

/// Where the punches land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punches {
    /// On a region the readers never read.
    Disjoint,
    /// On the readers' region.
    Overlap,
}

impl Punches {
    /// The workload's name in reports.
    pub fn workload(self) -> &'static str {
        match self {
            Punches::Disjoint => "mixed-disjoint",
            Punches::Overlap => "mixed-overlap",
        }
    }
}

/// Settings of the mixed benchmark.
#[derive(Clone, Debug)]
pub struct MixedConfig {
    /// The file's size in bytes (a multiple of 1 MiB, at least 4 MiB).
    pub file_bytes: u64,
    /// The cache budget in bytes; `None` for the default, 31/32 of the
    /// readers' half.
    pub cache_bytes: Option<u64>,
    /// The runs, the strategies and the reader thread counts to measure (each
    /// beside one writer and one puncher).
    pub settings: RunSettings,
    /// The variants to run.
    pub variants: Vec<Punches>,
}

impl Default for MixedConfig {
    fn default() -> Self {
        MixedConfig {
            file_bytes: 64 << 20,
            cache_bytes: None,
            settings: RunSettings {
                threads: vec![2],
                ..RunSettings::default()
            },
            variants: vec![Punches::Disjoint, Punches::Overlap],
        }
    }
}

/// The file's regions, in bytes.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// The readers' half: `0..readers`.
    readers: u64,
    /// The writer's quarter: `readers..writer_end`.
    writer_end: u64,
    /// The punch quarter: `writer_end..file`.
    file: u64,
}

impl Layout {
    fn of(file_bytes: u64) -> Layout {
        Layout {
            readers: file_bytes / 2,
            writer_end: file_bytes / 4 * 3,
            file: file_bytes,
        }
    }

    fn writer_bytes(&self) -> u64 {
        self.writer_end - self.readers
    }

    /// Where the punches of `punches` land.
    fn punch_range(&self, punches: Punches) -> (u64, u64) {
        match punches {
            Punches::Disjoint => (self.writer_end, self.file),
            Punches::Overlap => (0, self.readers),
        }
    }
}

impl MixedConfig {
    /// The budget the cache gets.
    pub fn budget(&self) -> u64 {
        self.cache_bytes.unwrap_or_else(|| {
            let layout = Layout::of(self.file_bytes);
            layout.readers / 32 * 31
        })
    }
}

/// The kinds of operations, in the order of `measure_kinds`' results.
const OPS: [&str; 3] = ["read", "write", "punch"];

/// How many measured steps [`run`] announces.
pub fn steps(config: &MixedConfig) -> usize {
    let settings = &config.settings;
    // Each strategy, each peer and the kernel.
    let candidates = settings.strategies.len() + Peer::ALL.len() + 1;
    settings.runs * config.variants.len() * settings.threads.len() * candidates
}

/// Checks the settings without running anything.
pub fn check(config: &MixedConfig) -> io::Result<()> {
    if config.file_bytes < (4 << 20) || config.file_bytes % (1 << 20) != 0 {
        return Err(crate::invalid(
            "the mixed file size must be a multiple of 1 MiB, at least 4 MiB",
        ));
    }
    if config.budget() < WRITE_BYTES {
        return Err(crate::invalid(format!(
            "the mixed cache budget must hold one write of {} KiB (got {} bytes)",
            WRITE_BYTES >> 10,
            config.budget()
        )));
    }
    if config.variants.is_empty() {
        return Err(crate::invalid(
            "at least one mixed variant must be selected",
        ));
    }
    config.settings.check()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &MixedConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    let layout = Layout::of(config.file_bytes);
    let duration = settings.duration();
    let candidates: Vec<Candidate> = settings
        .strategies
        .iter()
        .copied()
        .map(Candidate::Filemap)
        .chain(Peer::ALL.map(Candidate::Peer))
        .chain([Candidate::Kernel])
        .collect();
    // runs[variant][threads][candidate]: one Vec<Measured> (per run) per op.
    let mut runs =
        vec![
            vec![vec![vec![Vec::new(); OPS.len()]; candidates.len()]; settings.threads.len()];
            config.variants.len()
        ];
    // The share of reads that missed, per (variant, strategy), in the last run.
    let mut missed: Vec<(&str, &str, f64)> = Vec::new();
    for run in 0..settings.runs {
        for (v, &punches) in config.variants.iter().enumerate() {
            for (t, &readers) in settings.threads.iter().enumerate() {
                for (c, candidate) in candidates.iter().enumerate() {
                    let name = candidate.name();
                    progress(Progress::Step(&format!(
                        "{}, run {}/{}: {name}, {readers} reader(s)",
                        punches.workload(),
                        run + 1,
                        settings.runs
                    )));
                    let measured = match *candidate {
                        Candidate::Filemap(strategy) => {
                            let (_dir, cache, mapping) = setup(config, layout, strategy)?;
                            let before = cache.stats();
                            let measured =
                                measure(mapping.as_ref(), layout, punches, readers, duration)?;
                            let after = cache.stats();
                            if run + 1 == settings.runs {
                                let misses = after.misses - before.misses;
                                let reads = misses + after.hits - before.hits;
                                let share = misses as f64 / reads.max(1) as f64;
                                missed.push((punches.workload(), strategy.name(), share));
                            }
                            measured
                        }
                        Candidate::Peer(peer) => {
                            let (_dir, peer) = setup_peer(config, layout, peer)?;
                            measure(&peer, layout, punches, readers, duration)?
                        }
                        Candidate::Kernel => {
                            let host = HostFile::create(layout.file)?;
                            measure(&host, layout, punches, readers, duration)?
                        }
                    };
                    for (o, m) in measured.into_iter().enumerate() {
                        runs[v][t][c][o].push(m);
                    }
                }
            }
        }
    }

    let mut report = Report::default();
    for (v, &punches) in config.variants.iter().enumerate() {
        for (t, &readers) in settings.threads.iter().enumerate() {
            for (c, candidate) in candidates.iter().enumerate() {
                for (o, op) in OPS.iter().enumerate() {
                    let key = RowKey {
                        workload: punches.workload(),
                        strategy: candidate.name(),
                        op,
                        threads: readers,
                    };
                    report.rows.push(timed_row(key, &runs[v][t][c][o]));
                }
            }
            report.ratios.extend(ratios(&report.rows, punches, readers));
        }
    }
    for (v, &punches) in config.variants.iter().enumerate() {
        let shares: Vec<String> = missed
            .iter()
            .filter(|(workload, _, _)| *workload == punches.workload())
            .map(|(_, strategy, share)| format!("{strategy} {:.1}%", share * 100.0))
            .collect();
        if v == 0 || !shares.is_empty() {
            report.notes.push(format!(
                "{}: with a {} MiB budget, the share of reads that missed (last run): {}",
                punches.workload(),
                config.budget() >> 20,
                shares.join(", ")
            ));
        }
    }
    Ok(report)
}

/// What a step runs on.
#[derive(Clone, Copy)]
enum Candidate {
    Filemap(Strategy),
    Peer(Peer),
    Kernel,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Filemap(strategy) => strategy.name(),
            Candidate::Peer(peer) => peer.name(),
            Candidate::Kernel => KERNEL,
        }
    }
}

/// A fresh file for one step: the readers' half and the punch quarter on the
/// device only, the writer's quarter cached, then the readers' half read once
/// so that as much of it is cached as the budget allows.
fn setup(
    config: &MixedConfig,
    layout: Layout,
    strategy: Strategy,
) -> io::Result<(tempfile::TempDir, PageCache, Arc<Mapping>)> {
    let dir = tempfile::tempdir()?;
    let file = filemap::HostFile::create(dir.path().join("mixed"))?;
    let backend = Arc::new(FaultyBackend::new(Arc::new(file), 1));
    // No readahead threads: the readers read at random, and the sequential
    // warm-up below must leave the budget full of the readers' pages, which a
    // window read ahead past their half (on a thread, after the warm-up
    // returned) would not.
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(config.budget())
        .readahead_threads(0)
        .build()?;
    let mapping = cache.open(backend.clone())?;
    let chunk = AlignedBuf::from_slice(&pattern(1 << 20), PAGE_SIZE);
    let mut offset = 0;
    while offset < layout.file {
        if (layout.readers..layout.writer_end).contains(&offset) {
            mapping.write_all_at(&chunk, offset)?;
        } else {
            mapping.write_direct(&chunk, offset)?;
        }
        offset += chunk.len() as u64;
    }
    mapping.sync_all()?;
    let mut buf = vec![0; 1 << 20];
    let mut offset = 0;
    while offset < layout.readers {
        mapping.read_exact_at(&mut buf, offset)?;
        offset += buf.len() as u64;
    }
    delay_punches(&backend);
    // The readers miss only if the budget is used up by now (or caches their
    // whole half): anything else would measure a different workload. Eviction
    // frees a few pages at a time, so a full budget may have a few free.
    let want = config.budget().min(layout.writer_bytes() + layout.readers) / PAGE;
    let (cached, _) = mapping.cached_pages();
    if cached > want || cached < want - want / 100 {
        return Err(io::Error::other(format!(
            "mixed: expected {want} pages cached after warming up, found {cached}"
        )));
    }
    Ok((dir, cache, mapping))
}

/// The backend of a peer's step, as its source of pages.
struct Source(Arc<FaultyBackend>);

impl PageSource for Source {
    fn load(&self, (_file, index): PageKey) -> io::Result<Page> {
        filemap_peers::read_page(|bytes| self.0.read_pages(index, bytes))
    }
}

/// A peer cache of the budget's pages over the step's backend.
struct PeerFile {
    cache: Box<dyn PeerCache>,
    backend: Arc<FaultyBackend>,
}

/// [`setup`] for a peer: the same file, written straight to the backend,
/// and the readers' half read once through the peer.
fn setup_peer(
    config: &MixedConfig,
    layout: Layout,
    peer: Peer,
) -> io::Result<(tempfile::TempDir, PeerFile)> {
    let dir = tempfile::tempdir()?;
    let file = filemap::HostFile::create(dir.path().join("mixed"))?;
    let backend = Arc::new(FaultyBackend::new(Arc::new(file), 1));
    backend.set_len(layout.file)?;
    let chunk = pattern(1 << 20);
    let mut offset = 0;
    while offset < layout.file {
        backend.write_pages(index_of(offset), &chunk)?;
        offset += chunk.len() as u64;
    }
    let cache = peer.build(config.budget() / PAGE, Arc::new(Source(backend.clone())));
    for index in 0..layout.readers / PAGE {
        cache.get((0, index))?;
    }
    delay_punches(&backend);
    Ok((dir, PeerFile { cache, backend }))
}

/// From now on every punch spends [`PUNCH_IO`] in `backend` (see the module
/// documentation).
fn delay_punches(backend: &FaultyBackend) {
    backend.add_rule(FaultRule::new(
        BackendOp::PunchHole,
        Trigger::Always,
        Injection::Delay {
            min: PUNCH_IO,
            max: PUNCH_IO,
        },
    ));
}

impl MixedCalls for PeerFile {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.copy_from_slice(&self.cache.get((0, index_of(offset)))?[..]);
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.backend.write_pages(index_of(offset), buf)?;
        self.cache.remove_range(0, offset, buf.len() as u64);
        Ok(())
    }

    fn refill(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.backend.write_pages(index_of(offset), buf)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.backend.punch_hole(offset, len)?;
        self.cache.remove_range(0, offset, len);
        Ok(())
    }
}

/// The calls a run makes, on a filemap mapping or, for the kernel baseline,
/// on a host file.
trait MixedCalls: Sync {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes data for a punch to free, as if written long ago: for filemap,
    /// straight to the backend, which is coherent only because the cache never
    /// holds a page of the punch quarter.
    fn refill(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
}

impl MixedCalls for Mapping {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn refill(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.backend().write_pages(index_of(offset), buf)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }
}

impl MixedCalls for HostFile {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn refill(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }
}

/// One timed run of readers, a writer and a puncher making `calls`.
fn measure(
    calls: &impl MixedCalls,
    layout: Layout,
    punches: Punches,
    readers: usize,
    duration: Duration,
) -> io::Result<Vec<Measured>> {
    let (punch_start, punch_end) = layout.punch_range(punches);
    let punch_slots = (punch_end - punch_start) / PUNCH_BYTES;
    measure_kinds(readers + 2, OPS.len(), duration, 1, |thread| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        let page = pattern(WRITE_BYTES as usize);
        let kind = role(thread, readers);
        let refill = pattern(PUNCH_BYTES as usize);
        let op = move |rng: &mut fastrand::Rng| -> io::Result<Duration> {
            let mut untimed = Duration::ZERO;
            match kind {
                0 => {
                    let offset = rng.u64(..layout.readers / PAGE) * PAGE;
                    calls.read(&mut buf.0, offset)?;
                    std::hint::black_box(&buf);
                }
                1 => {
                    let slots = layout.writer_bytes() / WRITE_BYTES;
                    let offset = layout.readers + rng.u64(..slots) * WRITE_BYTES;
                    calls.write(&page, offset)?;
                }
                _ => {
                    let offset = punch_start + rng.u64(..punch_slots) * PUNCH_BYTES;
                    if punches == Punches::Disjoint {
                        // Data for the punch to free, untimed.
                        let start = Instant::now();
                        calls.refill(&refill, offset)?;
                        untimed = start.elapsed();
                    }
                    calls.punch(offset, PUNCH_BYTES)?;
                }
            }
            Ok(untimed)
        };
        (kind, op)
    })
}

/// The kind of operation thread `thread` runs: the first `readers` threads
/// read, the next writes, the last punches.
fn role(thread: usize, readers: usize) -> usize {
    if thread < readers {
        0
    } else if thread == readers {
        1
    } else {
        2
    }
}

/// The ratios of read throughput: targets for `mixed-disjoint`, information
/// for `mixed-overlap`.
fn ratios(rows: &[Row], punches: Punches, readers: usize) -> Vec<Ratio> {
    let workload = punches.workload();
    let reads = |strategy: &str| figure(rows, workload, strategy, "read", readers, |r| r.ops_per_s);
    let disjoint = punches == Punches::Disjoint;
    let targets = [
        ("range", "invalidate-lock", Some(1.5)),
        ("invalidate-lock", "file-exclusive", Some(5.0)),
    ];
    // The peers, for what a lock-free (and incoherent) cache reads meanwhile.
    let peers = Peer::ALL.map(|peer| ("range", peer.name(), None));
    targets
        .into_iter()
        .chain(peers)
        .map(|(ours, theirs, target)| {
            Ratio::between(
                workload,
                format!("{ours} / {theirs}, read ops/s, {readers} reader(s)"),
                reads(ours),
                reads(theirs),
                target.filter(|_| disjoint).map(Target::AtLeast),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_row_and_ratio() {
        let config = MixedConfig {
            file_bytes: 8 << 20,
            settings: RunSettings {
                threads: vec![1],
                runs: 1,
                seconds_per_run: 0.05,
                ..RunSettings::default()
            },
            ..MixedConfig::default()
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        assert_eq!(
            report.rows.len(),
            2 * (Strategy::ALL.len() + Peer::ALL.len() + 1) * OPS.len()
        );
        for punches in [Punches::Disjoint, Punches::Overlap] {
            for strategy in Strategy::ALL
                .map(Strategy::name)
                .into_iter()
                .chain(Peer::ALL.map(Peer::name))
                .chain([KERNEL])
            {
                for op in OPS {
                    let row = report.find(punches.workload(), strategy, op, 1).unwrap();
                    assert!(
                        row.ops_per_s > 0.0 && row.p50_us > 0.0 && row.p99_us >= row.p50_us,
                        "{row:?}"
                    );
                }
            }
        }
        // Per variant: two with targets, one per peer.
        assert_eq!(report.ratios.len(), 2 * (2 + Peer::ALL.len()));
        assert!(report
            .ratios
            .iter()
            .filter(|r| r.name.contains("moka"))
            .all(|r| r.value.is_some_and(|v| v > 0.0) && r.target.is_none()));
        let available = crate::strategy_named("range").is_some();
        assert_eq!(report.ratios[0].value.is_some(), available);
        assert!(report.ratios[1].value.is_some_and(|v| v > 0.0));
        assert!(report.ratios[0].target.is_some() && report.ratios[2].target.is_none());
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            MixedConfig {
                file_bytes: 100,
                ..MixedConfig::default()
            },
            MixedConfig {
                cache_bytes: Some(WRITE_BYTES - 1),
                ..MixedConfig::default()
            },
            MixedConfig {
                settings: RunSettings {
                    threads: vec![0],
                    ..MixedConfig::default().settings
                },
                ..MixedConfig::default()
            },
            MixedConfig {
                variants: Vec::new(),
                ..MixedConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
