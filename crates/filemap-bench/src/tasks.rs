//! Page reads from Tokio tasks: the async rows of `hit`.
//!
//! Like [`crate::page_reads`], with each reader's loop a task of a
//! current-thread runtime of its own on the reader's thread (pinned as the
//! others are), so that the reads are made, and timed, the way an async
//! caller makes them: one `.await` each.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use filemap::page::PAGE_SIZE;

use crate::histogram::Histogram;
use crate::{pin_to_processor, Measured, PageBuf};

/// A way to read one page from a task.
pub trait PageRead: Send + 'static {
    /// Reads page `index` into `buf` and gives `buf` back (a read handed to
    /// another thread needs a buffer it owns).
    fn read(
        &self,
        index: u64,
        buf: Box<PageBuf>,
    ) -> impl Future<Output = io::Result<Box<PageBuf>>> + Send;
}

/// Runs `threads` readers for `duration`, reader `t` awaiting
/// `make_reader(t).read(index, buf)` for random pages `index < pages`, in a
/// task of a current-thread runtime on its own thread. One read in `every` is
/// timed. The first error stops the run and is returned.
pub fn task_page_reads<M, R>(
    threads: usize,
    duration: Duration,
    every: u32,
    pages: u64,
    make_reader: M,
) -> io::Result<Measured>
where
    M: Fn(usize) -> R + Sync,
    R: PageRead,
{
    let every = every.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Barrier::new(threads + 1);
    let (elapsed, results) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (stop, started, make_reader) = (stop.clone(), &started, &make_reader);
                scope.spawn(move || {
                    pin_to_processor(thread);
                    let runtime = tokio::runtime::Builder::new_current_thread().build();
                    let reader = make_reader(thread);
                    started.wait();
                    let runtime = runtime?;
                    let stopped = stop.clone();
                    let reads = async move {
                        let stop = stopped;
                        let mut rng = fastrand::Rng::with_seed(0x5eed ^ thread as u64);
                        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
                        let (mut count, mut latency) = (0u64, Histogram::new());
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 1..every {
                                buf = reader.read(rng.u64(..pages), buf).await?;
                            }
                            let start = Instant::now();
                            buf = reader.read(rng.u64(..pages), buf).await?;
                            latency.record(start.elapsed().as_nanos() as u64);
                            count += u64::from(every);
                        }
                        std::hint::black_box(&buf);
                        Ok::<_, io::Error>((count, latency))
                    };
                    let result = runtime
                        .block_on(runtime.spawn(reads))
                        .map_err(io::Error::other)
                        .and_then(|result| result);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        started.wait();
        let start = Instant::now();
        // Sleep in slices, so a reader that failed ends the run early.
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
    let (mut total, mut histogram) = (0, Histogram::new());
    for result in results {
        let (count, latency) = result?;
        total += count;
        histogram.merge(&latency);
    }
    Ok(Measured {
        ops_per_s: total as f64 / elapsed.as_secs_f64(),
        latency: histogram,
        workers: threads,
    })
}
