//! Benchmarks of filemap, each measured against baselines run in the same
//! process, so that the figures are ratios on one machine at one moment rather
//! than absolute numbers from a noisy, shared one.
//!
//! - [`hit`]: 4 KiB random `read_at` hits on a fully cached file, against kernel
//!   `pread` on a warm host file of the same size and against a plain `memcpy`
//!   from the same frame memory.
//! - [`fault`]: first touches of a memory map's pages, cached and not, against
//!   a bare userfaultfd round trip; and reads through a map against a plain
//!   copy of the same memory.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::{Mapping, MemDevice, PageCache, Strategy, Volume, PAGE_SIZE};
use serde::Serialize;

pub mod fault;
pub mod hit;

/// One measured configuration: the median of several timed runs.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The benchmark.
    pub workload: String,
    /// What ran: a filemap strategy, a variant (`cached-fault`, `map-read`), or a
    /// baseline (`kernel-pread`, `memcpy`, `uffd-round-trip`, `memory-read`).
    pub strategy: String,
    /// Threads running it at once.
    pub threads: usize,
    /// Operations per second, all threads together (median run).
    pub ops_per_s: f64,
    /// Operations per second of one thread (median run).
    pub per_thread_ops_per_s: f64,
    /// Nanoseconds per operation on one thread (median run).
    pub ns_per_op: f64,
    /// Operations per second of every run, in order.
    pub runs: Vec<f64>,
}

/// A ratio between two rows of one invocation, the figure a target is set on.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// What is compared, e.g. `filemap / kernel-pread, 1 thread`.
    pub name: String,
    /// The ratio of the medians.
    pub value: f64,
    /// The target, if the project set one.
    pub target: Option<f64>,
}

/// The result of one benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every configuration measured.
    pub rows: Vec<Row>,
    /// The ratios the targets are set on.
    pub ratios: Vec<Ratio>,
}

/// Runs an operation on `threads` threads for `duration` and returns the
/// operations per second of all threads together. `make_op` builds each thread's
/// operation before the clock starts; the operation gets the thread's seeded
/// generator, so every variant pays the same for its random choices.
pub fn measure<M, O>(threads: usize, duration: Duration, make_op: M) -> f64
where
    M: Fn(usize) -> O + Sync,
    O: FnMut(&mut fastrand::Rng),
{
    let stop = AtomicBool::new(false);
    let started = std::sync::Barrier::new(threads + 1);
    let (elapsed, total) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (stop, started, make_op) = (&stop, &started, &make_op);
                scope.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(0x5eed ^ thread as u64);
                    let mut op = make_op(thread);
                    started.wait();
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // The flag is read once per 16 operations: a shared load is
                        // cheap, but not free next to a 4 KiB hit.
                        for _ in 0..16 {
                            op(&mut rng);
                        }
                        count += 16;
                    }
                    count
                })
            })
            .collect();
        started.wait();
        let start = Instant::now();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        let total: u64 = workers
            .into_iter()
            .map(|worker| worker.join().expect("benchmark threads do not panic"))
            .sum();
        (start.elapsed(), total)
    });
    total as f64 / elapsed.as_secs_f64()
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
    expect_all_cached(&mapping, file_bytes / PAGE_SIZE as u64)?;
    Ok((cache, mapping))
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

/// A row from the per-run totals of one configuration.
pub fn row(workload: &str, strategy: &str, threads: usize, runs: Vec<f64>) -> Row {
    let ops_per_s = median(&runs);
    let per_thread = ops_per_s / threads as f64;
    Row {
        workload: workload.to_owned(),
        strategy: strategy.to_owned(),
        threads,
        ops_per_s,
        per_thread_ops_per_s: per_thread,
        ns_per_op: 1e9 / per_thread,
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn measure_counts_operations_on_every_thread() {
        use std::sync::atomic::AtomicU64;
        let per_thread = [AtomicU64::new(0), AtomicU64::new(0)];
        let rate = measure(2, Duration::from_millis(20), |thread| {
            let counter = &per_thread[thread];
            move |_: &mut fastrand::Rng| {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let counted: u64 = per_thread.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert!(per_thread.iter().all(|c| c.load(Ordering::Relaxed) >= 16));
        // The rate is the count over a little more than the requested 20 ms.
        assert!(rate > 0.0 && rate <= counted as f64 / 0.020);
    }
}
