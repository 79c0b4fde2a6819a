//! Benchmarks of filemap, each measured against baselines run in the same
//! process, so that the figures are ratios on one machine at one moment rather
//! than absolute numbers from a noisy, shared one.
//!
//! Every workload runs every strategy it is given (by default
//! [`Strategy::ALL`]), `none` included but marked incoherent and left out of
//! the ratios, and a baseline where one makes sense:
//!
//! - [`hit`]: 4 KiB random `read_at` hits on a fully cached file, against kernel
//!   `pread` on a warm host file of the same size and against a plain `memcpy`
//!   from the same frame memory.
//! - [`mixed`]: readers, a writer and a puncher on one file, the punches on
//!   ranges the readers never read (`mixed-disjoint`) or on theirs
//!   (`mixed-overlap`), against the same calls on a host file.
//! - [`direct`]: two direct writers beside buffered readers, against `O_DIRECT`
//!   `pwrite` and `pread` on a host file.
//! - [`starve`]: the latency of punches under a storm of reads and map faults on
//!   their range, against the same punches with no storm.
//! - [`fault`]: first touches of a memory map's pages, cached and not, against
//!   a bare userfaultfd round trip; and reads through a map against a plain
//!   copy of the same memory.
//! - [`evict`]: the eviction policies' hit ratios on the same traces, simulated
//!   and on a real cache, and the cache's bookkeeping per cached page.
//! - [`pin`]: a pinned page's 64 bytes read in place, against `read_at` of
//!   64 bytes and of the whole page.
//! - [`seqread`]: a sequential read of an uncached file, against a raw read of
//!   its device.
//! - [`open`]: open, first 4 KiB read and close of many small files, against
//!   the same on host files; and the threads, descriptors, memory map areas
//!   and resident bytes of 100,000 open mappings, 1,000 of them read.
//!
//! [`plot`] draws a report as an SVG chart, one panel per workload.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{FileDevice, Mapping, MemDevice, PageCache, Strategy, Volume};
use serde::Serialize;

pub mod direct;
pub mod evict;
pub mod fault;
pub mod folios;
mod histogram;
pub mod hit;
pub mod kernel;
pub mod mixed;
pub mod mount;
pub mod open;
pub mod passthrough;
pub mod pin;
pub mod plot;
pub mod seqread;
pub mod starve;
mod tasks;

pub use histogram::Histogram;

/// The name baselines of host-file system calls go by in reports.
pub const KERNEL: &str = "kernel";

/// One measured configuration: medians of several timed runs.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The benchmark: `hit`, `mixed-disjoint`, `mixed-overlap`, `direct`,
    /// `starve` or `fault`.
    pub workload: String,
    /// What ran: a filemap strategy, or a baseline (`kernel`, `memcpy`,
    /// `uffd-round-trip`, `memory-read`).
    pub strategy: String,
    /// False for strategies that do not keep the cache coherent (`none`): their
    /// figures are for reference only and stay out of every ratio.
    pub coherent: bool,
    /// What the figures count: `read`, `write`, `punch`, `write_direct`, `all`
    /// (every operation of the workload), `cached-fault`, ...
    pub op: String,
    /// The workload's thread setting: hit readers, `mixed` and `direct` reader
    /// threads (beside their writers and puncher), `starve` storm threads (0:
    /// the punches alone), 1 for `fault`.
    pub threads: usize,
    /// Threads that ran this operation.
    pub workers: usize,
    /// Operations per second, all its threads together (median run).
    pub ops_per_s: f64,
    /// Median latency of one operation in microseconds (median run).
    pub p50_us: f64,
    /// 99th percentile latency in microseconds (median run).
    pub p99_us: f64,
    /// The longest latency in microseconds (median run): stalls too rare for
    /// the p99 still show here, and in the rate.
    pub max_us: f64,
    /// Operations per second of one thread (median run).
    pub per_thread_ops_per_s: f64,
    /// Nanoseconds per operation on one thread (median run).
    pub ns_per_op: f64,
    /// Operations per second of every run, in order.
    pub runs: Vec<f64>,
}

/// How a ratio is held to its target.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Target {
    /// The ratio must be at least this.
    #[serde(rename = ">=")]
    AtLeast(f64),
    /// The ratio must be at most this.
    #[serde(rename = "<=")]
    AtMost(f64),
}

/// A ratio between two rows of one invocation, the figure a target is set on.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The workload of the rows compared.
    pub workload: String,
    /// What is compared, e.g. `range / invalidate-lock, read ops/s`.
    pub name: String,
    /// The ratio of the medians; `None` when a row it needs does not exist (a
    /// strategy that is not built yet, or was not selected).
    pub value: Option<f64>,
    /// The target, if the project set one.
    pub target: Option<f64>,
    /// How `value` is held to `target`: `">="` or `"<="`.
    pub comparison: Option<&'static str>,
    /// Whether the target is met; `None` without a target or a value.
    pub met: Option<bool>,
    /// Why the value is missing.
    pub note: Option<String>,
    /// True for a figure that is no ratio (a count, bytes), made by
    /// [`Ratio::absolute`]: it is printed without the `x`.
    pub absolute: bool,
}

impl Ratio {
    /// `numerator / denominator`, each a figure or the reason it is missing.
    pub fn between(
        workload: &str,
        name: String,
        numerator: Result<f64, String>,
        denominator: Result<f64, String>,
        target: Option<Target>,
    ) -> Ratio {
        let (value, note) = match (numerator, denominator) {
            (Ok(n), Ok(d)) => (Some(n / d), None),
            (Err(why), _) | (_, Err(why)) => (None, Some(why)),
        };
        let (target_value, comparison) = match target {
            Some(Target::AtLeast(t)) => (Some(t), Some(">=")),
            Some(Target::AtMost(t)) => (Some(t), Some("<=")),
            None => (None, None),
        };
        let met = match (value, target) {
            (Some(v), Some(Target::AtLeast(t))) => Some(v >= t),
            (Some(v), Some(Target::AtMost(t))) => Some(v <= t),
            _ => None,
        };
        Ratio {
            workload: workload.to_owned(),
            name,
            value,
            target: target_value,
            comparison,
            met,
            note,
            absolute: false,
        }
    }

    /// A figure that is no ratio (a count, bytes per something), held to a
    /// target like a ratio; `value` is the figure or why it is missing.
    pub fn absolute(
        workload: &str,
        name: String,
        value: Result<f64, String>,
        target: Option<Target>,
    ) -> Ratio {
        Ratio {
            absolute: true,
            ..Ratio::between(workload, name, value, Ok(1.0), target)
        }
    }

    /// The verdict printed beside the ratio: `(target >= 1.5: met)`.
    pub fn verdict(&self) -> String {
        match (self.comparison, self.target, self.met) {
            (Some(cmp), Some(target), Some(met)) => {
                let met = if met { "met" } else { "NOT met" };
                format!("(target {cmp} {target}: {met})")
            }
            (Some(cmp), Some(target), None) => format!("(target {cmp} {target}: not available)"),
            _ => String::new(),
        }
    }
}

/// The result of one or more benchmarks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Every configuration measured.
    pub rows: Vec<Row>,
    /// The ratios the targets are set on.
    pub ratios: Vec<Ratio>,
    /// Remarks on the measurement, e.g. a baseline that could not run.
    pub notes: Vec<String>,
}

impl Report {
    /// Appends everything `other` holds.
    pub fn append(&mut self, other: Report) {
        self.rows.extend(other.rows);
        self.ratios.extend(other.ratios);
        self.notes.extend(other.notes);
    }

    /// The row of `workload`, `strategy`, `op` and `threads`, if measured.
    pub fn find(&self, workload: &str, strategy: &str, op: &str, threads: usize) -> Option<&Row> {
        find_row(&self.rows, workload, strategy, op, threads)
    }
}

/// The row of `workload`, `strategy`, `op` and `threads` in `rows`, if any.
pub fn find_row<'a>(
    rows: &'a [Row],
    workload: &str,
    strategy: &str,
    op: &str,
    threads: usize,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.workload == workload && r.strategy == strategy && r.op == op && r.threads == threads
    })
}

/// A figure of a row found by name, or why it is missing: looking strategies up
/// by name lets ratios name strategies that do not exist yet.
pub fn figure(
    rows: &[Row],
    workload: &str,
    strategy: &str,
    op: &str,
    threads: usize,
    get: impl Fn(&Row) -> f64,
) -> Result<f64, String> {
    match find_row(rows, workload, strategy, op, threads) {
        Some(row) => Ok(get(row)),
        None if strategy_named(strategy).is_none() && !is_baseline(strategy) => {
            Err(format!("not available: no strategy named {strategy}"))
        }
        None => Err(format!("not available: {strategy} was not measured")),
    }
}

/// The strategy called `name`, if the library has one.
pub fn strategy_named(name: &str) -> Option<Strategy> {
    name.parse().ok()
}

fn is_baseline(name: &str) -> bool {
    matches!(
        name,
        KERNEL | "memcpy" | "uffd-round-trip" | "memory-read" | hit::ASYNC | hit::SPAWN_BLOCKING
    )
}

/// The library's default strategy: the one the older single-strategy targets
/// (`hit`, `fault`) are reported for when every strategy runs.
pub fn default_strategy() -> io::Result<Strategy> {
    Ok(PageCache::builder().budget_bytes(PAGE).build()?.strategy())
}

/// The strategy the single-strategy targets are reported for: the only one
/// selected, else the library's default if selected, else the first coherent.
pub fn headline_strategy(strategies: &[Strategy]) -> io::Result<Option<Strategy>> {
    if let [only] = strategies {
        return Ok(Some(*only));
    }
    let default = default_strategy()?;
    Ok(if strategies.contains(&default) {
        Some(default)
    } else {
        coherent(strategies).next()
    })
}

/// What a benchmark tells its caller as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// Preparation, not a measured step.
    Setup(&'a str),
    /// A measured step (one strategy or baseline, one run) starts; a benchmark
    /// announces exactly as many as its `steps` function says.
    Step(&'a str),
}

/// What one timed run of one kind of operation gave.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Operations per second, all threads of this kind together.
    pub ops_per_s: f64,
    /// Latencies of the operations timed (all, or one in `every`).
    pub latency: Histogram,
    /// Threads that ran this kind.
    pub workers: usize,
}

impl Measured {
    /// A measurement made elsewhere (a single thread timing its own loop).
    pub fn new(ops_per_s: f64, latency: Histogram, workers: usize) -> Self {
        Measured {
            ops_per_s,
            latency,
            workers,
        }
    }

    /// One measurement of several slices of equal length: the mean rate, all
    /// the latencies.
    ///
    /// # Panics
    /// If `slices` is empty.
    pub fn of_slices(slices: &[Measured]) -> Self {
        assert!(!slices.is_empty(), "a measurement needs a slice");
        let mut latency = Histogram::new();
        for slice in slices {
            latency.merge(&slice.latency);
        }
        Measured::new(
            slices.iter().map(|m| m.ops_per_s).sum::<f64>() / slices.len() as f64,
            latency,
            slices[0].workers,
        )
    }
}

/// How many slices [`interleaved`] cuts a run into.
pub const SLICES: u32 = 5;

/// One run of every candidate, cut into [`SLICES`] slices that the candidates
/// measure in turns (`measure(candidate, slice length)` returns one
/// [`Measured`] per kind of operation), so that a burst of noise on a shared
/// machine, or a drift over the run, lands on all of them rather than on
/// whichever ran through it. Returns, per candidate and kind, the mean of its
/// slices ([`Measured::of_slices`]). `announce(candidate)` is called once per
/// candidate, before its first slice.
pub fn interleaved<C>(
    candidates: &[C],
    duration: Duration,
    mut announce: impl FnMut(&C),
    mut measure: impl FnMut(&C, Duration) -> io::Result<Vec<Measured>>,
) -> io::Result<Vec<Vec<Measured>>> {
    let mut slices: Vec<Vec<Vec<Measured>>> = vec![Vec::new(); candidates.len()];
    for slice in 0..SLICES {
        for (c, candidate) in candidates.iter().enumerate() {
            if slice == 0 {
                announce(candidate);
            }
            for (kind, m) in measure(candidate, duration / SLICES)?
                .into_iter()
                .enumerate()
            {
                if slices[c].len() <= kind {
                    slices[c].push(Vec::new());
                }
                slices[c][kind].push(m);
            }
        }
    }
    Ok(slices
        .iter()
        .map(|kinds| kinds.iter().map(|k| Measured::of_slices(k)).collect())
        .collect())
}

/// One timed run of `threads` workers, each pinned ([`pinned`]), reading random
/// pages of `pages` with `read(page index, buffer)` into a page-aligned buffer
/// of its own; one read in `every` is timed. The hit and map-read workloads
/// compare such runs across variants that differ in `read` alone.
pub fn page_reads<R>(
    threads: usize,
    duration: Duration,
    every: u32,
    pages: u64,
    read: R,
) -> io::Result<Measured>
where
    R: Fn(u64, &mut [u8; PAGE_SIZE]) -> io::Result<()> + Sync,
{
    let read = &read;
    let measured = measure_kinds(
        threads,
        1,
        duration,
        every,
        pinned(|_| {
            let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
            (0, move |rng: &mut fastrand::Rng| {
                read(rng.u64(..pages), &mut buf.0)?;
                std::hint::black_box(&buf);
                Ok(Duration::ZERO)
            })
        }),
    )?;
    Ok(measured.into_iter().next().expect("one kind"))
}

/// `make_op` for [`measure_kinds`], with worker `i` first pinned to the `i`-th
/// processor the process may run on (round robin), for workloads that compare
/// one thread's speed at copying from memory across variants (`hit`, `fault`'s
/// reads). Left to the scheduler, a thread lands on either processor and may
/// move: four caches of one strategy measured in turns came out up to 7%
/// apart, alternating with the order they ran in. Where pinning is refused the
/// workers run unpinned.
pub fn pinned<M, O>(make_op: M) -> impl Fn(usize) -> (usize, O) + Sync
where
    M: Fn(usize) -> (usize, O) + Sync,
{
    move |thread| {
        pin_to_processor(thread);
        make_op(thread)
    }
}

/// Pins the calling thread to the `index`-th processor of its affinity mask
/// (round robin); does nothing where the mask cannot be read or set.
fn pin_to_processor(index: usize) {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let Ok(allowed) = sched_getaffinity(None) else {
        return;
    };
    let processors: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&cpu| allowed.is_set(cpu))
        .collect();
    if processors.is_empty() {
        return;
    }
    let mut one = CpuSet::new();
    one.set(processors[index % processors.len()]);
    // Best effort: an unpinned run is noisier, not wrong.
    let _ = sched_setaffinity(None, &one);
}

/// Runs `threads` threads for `duration`; thread `t` runs the operation
/// `make_op(t)` returns, of kind `k < kinds`, over and over. Returns for each
/// kind the operations per second of its threads together and a histogram of
/// latencies. One operation in `every` is timed (1: all of them): two clock
/// reads cost tens of nanoseconds, which would weigh on a 4 KiB hit but not on
/// an operation that takes microseconds. The stop flag is read once per `every`
/// operations too. `make_op` runs before the clock starts, and each operation
/// gets the thread's seeded generator, so every variant pays the same for its
/// random choices. The first error of any operation stops the run and is
/// returned.
///
/// An operation returns how long it spent on preparation that is not part of
/// what is measured (`Duration::ZERO` for none): that time is taken off its
/// latency, though not off the run (it is time the thread did not spend on
/// the measured calls, which its rate shows).
pub fn measure_kinds<M, O>(
    threads: usize,
    kinds: usize,
    duration: Duration,
    every: u32,
    make_op: M,
) -> io::Result<Vec<Measured>>
where
    M: Fn(usize) -> (usize, O) + Sync,
    O: FnMut(&mut fastrand::Rng) -> io::Result<Duration>,
{
    let every = every.max(1);
    let stop = AtomicBool::new(false);
    let started = std::sync::Barrier::new(threads + 1);
    let (elapsed, results) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (stop, started, make_op) = (&stop, &started, &make_op);
                scope.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(0x5eed ^ thread as u64);
                    let (kind, mut op) = make_op(thread);
                    let mut latency = Histogram::new();
                    started.wait();
                    let mut count = 0u64;
                    let mut run = || -> io::Result<()> {
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 1..every {
                                op(&mut rng)?;
                            }
                            let start = Instant::now();
                            let untimed = op(&mut rng)?;
                            let took = start.elapsed().saturating_sub(untimed);
                            latency.record(took.as_nanos() as u64);
                            count += u64::from(every);
                        }
                        Ok(())
                    };
                    let result = run();
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result.map(|()| (kind, count, latency))
                })
            })
            .collect();
        started.wait();
        let start = Instant::now();
        // Sleep in slices, so a thread that failed ends the run early.
        while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((duration - start.elapsed()).min(Duration::from_millis(10)));
        }
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = workers
            .into_iter()
            .map(|worker| worker.join().expect("benchmark threads do not panic"))
            .collect();
        (start.elapsed(), results)
    });
    let mut out: Vec<(u64, Histogram, usize)> =
        (0..kinds).map(|_| (0, Histogram::new(), 0)).collect();
    for result in results {
        let (kind, count, latency) = result?;
        let (total, histogram, workers) = &mut out[kind];
        *total += count;
        histogram.merge(&latency);
        *workers += 1;
    }
    Ok(out
        .into_iter()
        .map(|(count, latency, workers)| Measured {
            ops_per_s: count as f64 / elapsed.as_secs_f64(),
            latency,
            workers,
        })
        .collect())
}

/// A page-aligned buffer, so every variant copies into the same alignment.
#[repr(align(4096))]
pub struct PageBuf(pub [u8; PAGE_SIZE]);

/// `len` bytes of a pattern that is not all zeroes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A cache holding every page of a `file_bytes`-byte file, all clean, on a
/// volume in memory.
pub fn cached_file(file_bytes: u64, strategy: Strategy) -> io::Result<(PageCache, Arc<Mapping>)> {
    let volume = Volume::format(Arc::new(MemDevice::new(
        file_bytes + file_bytes / 256 + (1 << 20),
    )))?;
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(file_bytes)
        .build()?;
    let mapping = cache.open(Arc::new(volume.create_file("bench")?))?;
    let chunk = pattern(1 << 20);
    let mut offset = 0;
    while offset < file_bytes {
        let len = chunk.len().min((file_bytes - offset) as usize);
        mapping.write_all_at(&chunk[..len], offset)?;
        offset += len as u64;
    }
    mapping.sync_all()?;
    expect_all_cached(&mapping, file_bytes / PAGE)?;
    Ok((cache, mapping))
}

/// A volume of `bytes` on a temporary image file (gone when the volume is).
/// The workloads that race fills against writes and punches use it rather than
/// a [`MemDevice`], whose single device-wide reader-writer lock would make every
/// device write wait for every device read: the benchmark would measure that
/// lock instead of the coherence lock. A [`FileDevice`] locks only the blocks a
/// call touches, as a disk queue serves unrelated blocks independently; its
/// reads come from the host's page cache, so a fill costs a system call, not a
/// disk access.
pub fn temp_volume(bytes: u64) -> io::Result<Arc<Volume>> {
    let (_, device, _) = temp_image(bytes, false)?;
    Volume::format(Arc::new(device))
}

/// [`temp_volume`] on an image opened with `O_DIRECT`, so that the volume's
/// reads and writes reach the disk, as direct I/O does. Where the file system
/// refuses `O_DIRECT`, the image is opened as is and the error is returned
/// beside the volume, for a note.
pub fn temp_direct_volume(bytes: u64) -> io::Result<(Arc<Volume>, Option<io::Error>)> {
    let (_, device, refused) = temp_image(bytes, true)?;
    Ok((Volume::format(Arc::new(device))?, refused))
}

/// A temporary image file of `bytes` bytes (rounded up to whole pages) and a
/// device on it, opened with `O_DIRECT` if `direct`. Where the file system
/// refuses `O_DIRECT`, the device is opened as is and the error is returned
/// beside it, for a note. The file comes too, for a caller that drops it from
/// the host's page cache; the image is gone when both are.
pub fn temp_image(bytes: u64, direct: bool) -> io::Result<(File, FileDevice, Option<io::Error>)> {
    let file = tempfile::tempfile()?;
    file.set_len(bytes.next_multiple_of(PAGE))?;
    let device = FileDevice::from_file(file.try_clone()?)?;
    if !direct {
        return Ok((file, device, None));
    }
    match device.with_direct_io() {
        Ok(device) => Ok((file, device, None)),
        Err(refused) => {
            let device = FileDevice::from_file(file.try_clone()?)?;
            Ok((file, device, Some(refused)))
        }
    }
}

/// Fails unless all `pages` pages of the file are cached and clean: a variant
/// meant to measure hits would otherwise measure fills.
pub fn expect_all_cached(mapping: &Mapping, pages: u64) -> io::Result<()> {
    let (cached, dirty) = mapping.cached_pages();
    if cached != pages || dirty != 0 {
        return Err(io::Error::other(format!(
            "expected all {pages} pages cached and clean, found {cached} cached and {dirty} dirty"
        )));
    }
    Ok(())
}

/// The median of `values` (which must not be empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// What a row is of: the workload, who ran it, the operation and the thread
/// setting.
#[derive(Clone, Copy, Debug)]
pub struct RowKey<'a> {
    /// The workload.
    pub workload: &'a str,
    /// A strategy's name, or a baseline's.
    pub strategy: &'a str,
    /// The operation counted.
    pub op: &'a str,
    /// The workload's thread setting.
    pub threads: usize,
}

/// A row from the runs of one configuration: the median run's throughput, and
/// the medians over runs of each run's p50 and p99.
pub fn timed_row(key: RowKey<'_>, runs: &[Measured]) -> Row {
    let rates: Vec<f64> = runs.iter().map(|m| m.ops_per_s).collect();
    let quantile = |q: f64| {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|m| m.latency.quantile(q))
            .map(|ns| ns / 1000.0)
            .collect();
        if values.is_empty() {
            f64::NAN
        } else {
            median(&values)
        }
    };
    let workers = runs.first().map_or(1, |m| m.workers).max(1);
    let ops_per_s = median(&rates);
    let per_thread = ops_per_s / workers as f64;
    Row {
        workload: key.workload.to_owned(),
        strategy: key.strategy.to_owned(),
        coherent: strategy_named(key.strategy).is_none_or(Strategy::is_coherent),
        op: key.op.to_owned(),
        threads: key.threads,
        workers,
        ops_per_s,
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        max_us: quantile(1.0),
        per_thread_ops_per_s: per_thread,
        ns_per_op: 1e9 / per_thread,
        runs: rates,
    }
}

/// The error of a setting a benchmark refuses.
pub fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// Checks a workload's file size: a positive multiple of 4 KiB.
pub(crate) fn check_file_bytes(file_bytes: u64) -> io::Result<()> {
    if file_bytes < PAGE || file_bytes % PAGE != 0 {
        return Err(invalid(
            "the file size must be a positive multiple of 4096 bytes",
        ));
    }
    Ok(())
}

/// The settings of a comparison of strategies over timed runs, which every
/// workload but `evict` and `seqread` shares; each workload's config holds one,
/// with its own default thread counts.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Thread counts to measure, one configuration each; what the threads do is
    /// the workload's (see its config). `fault` runs on one thread and ignores
    /// them.
    pub threads: Vec<usize>,
    /// Timed runs of every configuration; the median is reported.
    pub runs: usize,
    /// Length of one timed run, in seconds.
    pub seconds_per_run: f64,
    /// The coherence strategies to measure.
    pub strategies: Vec<Strategy>,
}

impl Default for RunSettings {
    /// One thread, five runs of half a second, every strategy.
    fn default() -> Self {
        RunSettings {
            threads: vec![1],
            runs: 5,
            seconds_per_run: 0.5,
            strategies: Strategy::ALL.to_vec(),
        }
    }
}

impl RunSettings {
    /// Checks the settings, the thread counts included.
    pub fn check(&self) -> io::Result<()> {
        self.check_with(true)
    }

    /// Checks the settings but the thread counts, for a workload that ignores
    /// them.
    pub fn check_ignoring_threads(&self) -> io::Result<()> {
        self.check_with(false)
    }

    /// Checks the settings, the thread counts only if `threads`.
    fn check_with(&self, threads: bool) -> io::Result<()> {
        if self.runs == 0 {
            return Err(invalid("runs must be at least 1"));
        }
        let seconds = self.seconds_per_run;
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
            return Err(invalid(
                "seconds per run must be positive (and at most an hour)",
            ));
        }
        if threads {
            if self.threads.is_empty() || self.threads.contains(&0) {
                return Err(invalid("thread counts must be at least 1"));
            }
            if self.threads.iter().any(|&t| t > 256) {
                return Err(invalid("thread counts must be at most 256"));
            }
        }
        if self.strategies.is_empty() {
            return Err(invalid("at least one strategy must be selected"));
        }
        Ok(())
    }

    /// The duration of one timed run.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds_per_run)
    }
}

/// Runs a benchmark through `run`, counting the measured steps it announces,
/// for tests that hold them to the benchmark's `steps`.
#[cfg(test)]
pub(crate) fn run_counting_steps(
    run: impl FnOnce(&mut dyn FnMut(Progress<'_>)) -> io::Result<Report>,
) -> (Report, usize) {
    let mut steps = 0;
    let report = run(&mut |progress| {
        if let Progress::Step(_) = progress {
            steps += 1;
        }
    })
    .expect("a tiny run succeeds");
    (report, steps)
}

/// The coherent strategies of `strategies`: the ones ratios may name.
pub fn coherent(strategies: &[Strategy]) -> impl Iterator<Item = Strategy> + '_ {
    strategies.iter().copied().filter(|s| s.is_coherent())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The candidates measure the slices in turns, each announced once before
    /// its first slice, and each gets the mean of its slices per kind.
    #[test]
    fn interleaved_takes_turns_and_averages_the_slices() {
        let log = std::cell::RefCell::new(Vec::new());
        let measured = interleaved(
            &["a", "b"],
            Duration::from_millis(50),
            |c| log.borrow_mut().push(format!("announce {c}")),
            |c, slice| {
                assert_eq!(slice, Duration::from_millis(10));
                let n = log.borrow().len() as f64;
                log.borrow_mut().push(format!("measure {c}"));
                let mut latency = Histogram::new();
                latency.record(1000);
                // Two kinds: the call's position, and a constant.
                Ok(vec![
                    Measured::new(n, latency.clone(), 1),
                    Measured::new(7.0, latency, 1),
                ])
            },
        )
        .unwrap();
        let log = log.into_inner();
        assert_eq!(
            log[..4],
            ["announce a", "measure a", "announce b", "measure b"]
        );
        assert_eq!(log.len(), 2 + 2 * SLICES as usize);
        assert!(log[4..]
            .chunks(2)
            .all(|turn| turn == ["measure a", "measure b"]));
        // "a" measured at log positions 1, 4, 6, 8, 10; "b" at 3, 5, 7, 9, 11.
        assert_eq!(measured[0][0].ops_per_s, 29.0 / 5.0);
        assert_eq!(measured[1][0].ops_per_s, 35.0 / 5.0);
        assert!(measured.iter().all(|kinds| kinds[1].ops_per_s == 7.0));
        assert_eq!(measured[0][0].latency.count(), SLICES as u64);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn measure_kinds_counts_operations_on_every_thread() {
        use std::sync::atomic::AtomicU64;
        let per_thread = [AtomicU64::new(0), AtomicU64::new(0)];
        let measured = measure_kinds(2, 1, Duration::from_millis(20), 16, |thread| {
            let counter = &per_thread[thread];
            (0, move |_: &mut fastrand::Rng| {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(Duration::ZERO)
            })
        })
        .unwrap();
        let counted: u64 = per_thread.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert!(per_thread.iter().all(|c| c.load(Ordering::Relaxed) >= 16));
        // The rate is the count over a little more than the requested 20 ms;
        // one operation in 16 was timed.
        let rate = measured[0].ops_per_s;
        assert!(rate > 0.0 && rate <= counted as f64 / 0.020);
        assert_eq!(measured[0].latency.count() * 16, counted);
    }

    #[test]
    fn measure_kinds_separates_kinds_and_stops_on_errors() {
        let measured = measure_kinds(3, 2, Duration::from_millis(20), 1, |thread| {
            (thread % 2, move |_: &mut fastrand::Rng| {
                std::thread::sleep(Duration::from_micros(50));
                Ok(Duration::ZERO)
            })
        })
        .unwrap();
        assert_eq!(measured.len(), 2);
        assert_eq!((measured[0].workers, measured[1].workers), (2, 1));
        assert!(measured.iter().all(|m| m.ops_per_s > 0.0));
        let p50 = measured[0].latency.quantile(0.5).unwrap();
        assert!(p50 >= 50_000.0, "{p50}");

        let failed = measure_kinds(1, 1, Duration::from_secs(60), 1, |_| {
            (0, |_: &mut fastrand::Rng| Err(io::Error::other("boom")))
        });
        assert!(failed.is_err());
    }

    #[test]
    fn ratios_say_why_they_are_missing_and_whether_targets_are_met() {
        let rows = vec![timed_row(
            RowKey {
                workload: "w",
                strategy: "invalidate-lock",
                op: "read",
                threads: 1,
            },
            &[Measured::new(10.0, Histogram::new(), 1)],
        )];
        let have = figure(&rows, "w", "invalidate-lock", "read", 1, |r| r.ops_per_s);
        assert_eq!(have, Ok(10.0));
        let missing = figure(&rows, "w", "no-such-strategy", "read", 1, |r| r.ops_per_s);
        assert!(missing.clone().unwrap_err().contains("no strategy named"));
        let ratio = Ratio::between(
            "w",
            "x".into(),
            Ok(3.0),
            Ok(2.0),
            Some(Target::AtLeast(1.5)),
        );
        assert_eq!((ratio.value, ratio.met), (Some(1.5), Some(true)));
        let ratio = Ratio::between(
            "w",
            "x".into(),
            Ok(30.0),
            Ok(2.0),
            Some(Target::AtMost(10.0)),
        );
        assert_eq!(ratio.met, Some(false));
        assert!(ratio.verdict().contains("NOT met"));
        let ratio = Ratio::between(
            "w",
            "x".into(),
            missing,
            Ok(2.0),
            Some(Target::AtLeast(1.5)),
        );
        assert_eq!((ratio.value, ratio.met), (None, None));
        assert!(ratio.verdict().contains("not available"));
    }
}
