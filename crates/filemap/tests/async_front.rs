//! The async front ([`AsyncMapping`], the `tokio` feature): hits served in the
//! caller's task with no thread, misses on the blocking pool while the
//! runtime's thread goes on, and futures dropped at any point leaving the
//! cache coherent.
#![cfg(feature = "tokio")]

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use filemap::backend::{BackendOp, FaultyBackend};
use filemap::device::DeviceOp;
use filemap::fault::{Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{
    AsyncMapping, Device, DeviceClaim, FaultRule, FaultyDevice, Mapping, MemDevice, PageCache,
    Strategy, Volume,
};
use parking_lot::{Condvar, Mutex};

/// A current-thread runtime that counts the threads it starts: its only
/// threads are those of the blocking pool, so any hand-off shows.
fn counting_runtime() -> (tokio::runtime::Runtime, Arc<AtomicUsize>) {
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .on_thread_start(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    (runtime, started)
}

/// A file of `pages` pages on a volume over `device`, page `i` all bytes
/// `i + 1`, written back.
fn file_on(device: Arc<dyn Device>, strategy: Strategy, pages: u64) -> Arc<Mapping> {
    file_in(device, strategy, pages).1
}

/// [`file_on`], with its cache.
fn file_in(device: Arc<dyn Device>, strategy: Strategy, pages: u64) -> (PageCache, Arc<Mapping>) {
    let volume = Volume::format(device).unwrap();
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    for i in 0..pages {
        file.write_all_at(&vec![i as u8 + 1; PAGE_SIZE], i * PAGE)
            .unwrap();
    }
    file.sync_all().unwrap();
    (cache, file)
}

#[test]
fn cached_reads_and_writes_complete_in_the_callers_task_without_a_thread() {
    for strategy in Strategy::ALL {
        let (cache, file) = file_in(Arc::new(MemDevice::new(8 << 20)), strategy, 16);
        let front = AsyncMapping::new(file.clone());
        let (runtime, threads) = counting_runtime();
        let before = hits_and_misses(&cache);
        let pages = runtime.block_on(async {
            let mut rng = fastrand::Rng::with_seed(1);
            let mut buf = vec![0u8; 2 * PAGE_SIZE];
            let mut pages = 0;
            for _ in 0..1000 {
                let page = rng.u64(..14);
                let at = page * PAGE + rng.u64(..PAGE);
                pages += if at % PAGE == 0 { 2 } else { 3 };
                assert_eq!(front.read_at(&mut buf, at).await.unwrap(), buf.len());
                assert_eq!(buf[0], page as u8 + 1, "{strategy}");
            }
            // A write into cached pages inside the file stays in the task too.
            front.write_all_at(&[9; 100], 10).await.unwrap();
            pages
        });
        assert_eq!(
            threads.load(Ordering::SeqCst),
            0,
            "{strategy}: a thread was started"
        );
        assert_eq!(front.in_pool(), 0);
        let after = hits_and_misses(&cache);
        assert_eq!(after.0 - before.0, pages, "{strategy}: hits");
        assert_eq!(after.1, before.1, "{strategy}: misses");

        // The same runtime sees the hand-off of a miss.
        file.invalidate_range(0, PAGE).unwrap();
        runtime.block_on(async {
            let mut buf = vec![0u8; PAGE_SIZE];
            assert_eq!(front.read_at(&mut buf, 0).await.unwrap(), PAGE_SIZE);
            assert_eq!(&buf[..10], &[1; 10]);
            assert_eq!(&buf[10..110], &[9; 100]);
        });
        assert!(
            threads.load(Ordering::SeqCst) > 0,
            "{strategy}: no thread for a miss"
        );
    }
}

fn hits_and_misses(cache: &PageCache) -> (u64, u64) {
    let stats = cache.stats();
    (stats.hits, stats.misses)
}

/// A device whose reads wait at a gate while it is closed, counting those
/// waiting; one that waits a minute without the gate opening goes on and
/// records it.
#[derive(Debug)]
struct GatedDevice {
    inner: MemDevice,
    closed: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicUsize,
    gave_up: AtomicBool,
}

impl GatedDevice {
    fn new(len: u64) -> Arc<GatedDevice> {
        Arc::new(GatedDevice {
            inner: MemDevice::new(len),
            closed: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicUsize::new(0),
            gave_up: AtomicBool::new(false),
        })
    }

    fn set_closed(&self, closed: bool) {
        *self.closed.lock() = closed;
        self.opened.notify_all();
    }
}

impl Device for GatedDevice {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut closed = self.closed.lock();
        if *closed {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            // Long enough that only a gate nobody can open runs out.
            let timeout =
                self.opened
                    .wait_while_for(&mut closed, |closed| *closed, Duration::from_secs(60));
            if timeout.timed_out() {
                self.gave_up.store(true, Ordering::SeqCst);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        drop(closed);
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn claim(&self) -> io::Result<DeviceClaim> {
        self.inner.claim()
    }
}

#[test]
fn a_miss_waits_on_the_pool_while_the_runtimes_only_thread_goes_on() {
    for strategy in Strategy::ALL {
        let device = GatedDevice::new(8 << 20);
        let file = file_on(device.clone(), strategy, 4);
        file.invalidate_range(0, 4 * PAGE).unwrap();
        let front = AsyncMapping::new(file);
        device.set_closed(true);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let read_done = AtomicBool::new(false);
        let (read, opened_by_other_task) = runtime.block_on(async {
            let read = async {
                let mut buf = vec![0u8; 2 * PAGE_SIZE];
                let n = front.read_at(&mut buf, PAGE).await;
                read_done.store(true, Ordering::SeqCst);
                n.map(|n| (n, buf))
            };
            // The other task opens the gate once the read waits at it: if the
            // read blocked this thread, it would never run before the read ends.
            let other = async {
                while !read_done.load(Ordering::SeqCst) {
                    if device.waiting.load(Ordering::SeqCst) > 0 {
                        device.set_closed(false);
                        return true;
                    }
                    tokio::task::yield_now().await;
                }
                false
            };
            tokio::join!(read, other)
        });
        let (n, buf) = read.unwrap();
        assert_eq!(n, 2 * PAGE_SIZE);
        assert_eq!((buf[0], buf[PAGE_SIZE]), (2, 3), "{strategy}");
        assert!(
            opened_by_other_task,
            "{strategy}: the miss blocked the runtime's thread"
        );
        assert!(!device.gave_up.load(Ordering::SeqCst), "{strategy}");
    }
}

#[test]
fn a_dropped_read_publishes_its_fill_or_discards_it_and_a_dropped_write_lands_whole() {
    for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
        let device = GatedDevice::new(8 << 20);
        let file = file_on(device.clone(), strategy, 4);
        file.invalidate_range(0, 4 * PAGE).unwrap();
        let front = AsyncMapping::new(file.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A read of pages 0 and 1 polled once (its fill waits at the gate)
            // and dropped: the fill goes on and publishes.
            device.set_closed(true);
            let mut buf = vec![0u8; 2 * PAGE_SIZE];
            let read = front.read_at(&mut buf, 0);
            assert!(poll_once(read).await.is_pending());
            assert_eq!(front.in_pool(), 1);
            device.set_closed(false);
            front.settled().await;
            assert!(
                file.is_page_cached(0) && file.is_page_cached(1),
                "{strategy}"
            );
            assert_eq!(file.read_at_nowait(&mut buf, 0).unwrap(), 2 * PAGE_SIZE);
            assert_eq!((buf[0], buf[PAGE_SIZE]), (1, 2));

            // The same for pages 2 and 3 (which the first fill may have read
            // ahead: dropped first), with a punch of page 2 that starts while
            // the fill waits: after both, page 2 reads zeroes, from the cache
            // or not; the fill's stale copy was discarded.
            front.invalidate_range(2 * PAGE, 2 * PAGE).await.unwrap();
            device.set_closed(true);
            let read = front.read_at(&mut buf, 2 * PAGE);
            assert!(poll_once(read).await.is_pending());
            while device.waiting.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let punch = {
                let front = front.clone();
                tokio::spawn(async move { front.punch_hole(2 * PAGE, PAGE).await })
            };
            device.set_closed(false);
            punch.await.unwrap().unwrap();
            front.settled().await;
            let mut page = vec![1u8; PAGE_SIZE];
            front.read_exact_at(&mut page, 2 * PAGE).await.unwrap();
            assert!(page.iter().all(|&b| b == 0), "{strategy}: a stale fill");
            front.read_exact_at(&mut page, 3 * PAGE).await.unwrap();
            assert!(page.iter().all(|&b| b == 4), "{strategy}");

            // A write from the middle of page 3 (not cached: it must be read
            // first, at the closed gate) to past the end of file goes to the
            // pool; it is dropped after one poll and still lands, whole.
            front.invalidate_range(0, 4 * PAGE).await.unwrap();
            device.set_closed(true);
            let data: Vec<u8> = (0..8 * PAGE_SIZE)
                .map(|i| (i / PAGE_SIZE) as u8 + 50)
                .collect();
            let at = 3 * PAGE + 100;
            let write = front.write_all_at(&data, at);
            assert!(poll_once(write).await.is_pending());
            device.set_closed(false);
            front.settled().await;
            assert_eq!(file.len(), at + data.len() as u64);
            let mut back = vec![0u8; data.len() + 100];
            front.read_exact_at(&mut back, 3 * PAGE).await.unwrap();
            assert_eq!(&back[..100], &[4; 100][..]);
            assert!(
                back[100..] == data,
                "{strategy}: the dropped write did not land whole"
            );

            // A future never polled does nothing.
            drop(front.write_all_at(&[7; 10], 20 * PAGE));
            drop(front.set_len(0));
            assert_eq!(front.in_pool(), 0);
            assert_eq!(file.len(), at + data.len() as u64);
        });
    }
}

/// Polls `future` once and drops it: `Pending` if it had not completed.
async fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

/// Page `index` stamped with `stamp` in every word (0 is a hole).
fn stamped(stamp: u64) -> Vec<u8> {
    stamp.to_le_bytes().repeat(PAGE_SIZE / 8)
}

/// The stamp of a page all of whose words are one stamp, or `None` if torn.
fn stamp_of(page: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(page[..8].try_into().unwrap());
    page.chunks_exact(8)
        .all(|word| u64::from_le_bytes(word.try_into().unwrap()) == first)
        .then_some(first)
}

/// Tasks on a multi-threaded runtime read, write, punch and zero through the
/// front, each future dropped at a random point by a timeout of a few
/// microseconds, while plain threads write, punch and invalidate the same
/// pages. Punches and zeroes are delayed at random on their way to the backend
/// (after the cache dropped the range), and so are device reads, to widen the
/// windows. Returns the pages found wrong:
/// - pages of a completed read that mix versions;
/// - once the dropped work settled: pages whose cached copy differs from what
///   the backend holds (after a writeback);
/// - then, rounds of reads dropped at random racing a punch of the whole file:
///   pages not zero once the punch returned and the dropped reads settled. A
///   fill that read the backend before the punch and published after it would
///   show there.
fn drop_futures_under_races(strategy: Strategy, seed: u64) -> usize {
    const PAGES: u64 = 32;
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(8 << 20)), seed));
    let volume = Volume::format(faulty.clone()).unwrap();
    let backend = Arc::new(FaultyBackend::new(
        Arc::new(volume.create_file("f").unwrap()),
        seed,
    ));
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache.open(backend.clone()).unwrap();
    file.set_len(PAGES * PAGE).unwrap();
    let delay = |percent: f64, max_us: u64| {
        (
            Trigger::Probability(percent),
            Injection::Delay {
                min: Duration::from_micros(max_us / 10),
                max: Duration::from_micros(max_us),
            },
        )
    };
    let (trigger, injection) = delay(0.3, 300);
    faulty.add_rule(FaultRule::new(DeviceOp::Read, trigger, injection));
    let (trigger, injection) = delay(0.8, 1000);
    for op in [BackendOp::PunchHole, BackendOp::ZeroRange] {
        backend.add_rule(FaultRule::new(op, trigger, injection));
    }
    let front = AsyncMapping::new(file.clone());
    let stamps = Arc::new(AtomicU64::new(1));
    let torn = Arc::new(AtomicUsize::new(0));
    let stop = AtomicBool::new(false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    // Reads at random points of the file, each dropped after a random time
    // (perhaps before it was polled at all); whole pages returned are checked.
    let reads = |rng: &mut fastrand::Rng, front: &AsyncMapping, count: usize| {
        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
        let (front, torn) = (front.clone(), torn.clone());
        async move {
            for _ in 0..count {
                let page = rng.u64(..PAGES - 1);
                let mut buf = vec![0u8; (rng.u64(1..=2) * PAGE) as usize];
                let limit = Duration::from_micros(rng.u64(0..200));
                let read = front.read_at(&mut buf, page * PAGE);
                if let Ok(result) = tokio::time::timeout(limit, read).await {
                    let n = result.unwrap();
                    for page in buf[..n].chunks_exact(PAGE_SIZE) {
                        if stamp_of(page).is_none() {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    std::thread::scope(|scope| {
        // Plain threads changing the same pages.
        for thread in 0..2 {
            let (file, stop, stamps) = (&file, &stop, &stamps);
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed ^ (100 + thread));
                while !stop.load(Ordering::Relaxed) {
                    let page = rng.u64(..PAGES);
                    match rng.u8(..4) {
                        0 => file.punch_hole(page * PAGE, PAGE).unwrap(),
                        1 => file.invalidate_range(page * PAGE, PAGE).unwrap(),
                        _ => {
                            let stamp = stamps.fetch_add(1, Ordering::Relaxed);
                            file.write_all_at(&stamped(stamp), page * PAGE).unwrap();
                        }
                    }
                }
            });
        }
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for task in 0..8 {
                tasks.push(tokio::spawn(reads(&mut rng, &front, 100)));
                let (front, stamps) = (front.clone(), stamps.clone());
                let mut rng = fastrand::Rng::with_seed(seed ^ task);
                tasks.push(tokio::spawn(async move {
                    for _ in 0..100 {
                        let page = rng.u64(..PAGES - 1);
                        let count = rng.u64(1..=2);
                        let (offset, len) = (page * PAGE, count * PAGE);
                        let limit = Duration::from_micros(rng.u64(0..200));
                        let _ = match rng.u8(..3) {
                            0 => {
                                let mut data = Vec::new();
                                for _ in 0..count {
                                    let stamp = stamps.fetch_add(1, Ordering::Relaxed);
                                    data.extend(stamped(stamp));
                                }
                                let write = front.write_all_at(&data, offset);
                                tokio::time::timeout(limit, write).await
                            }
                            1 => tokio::time::timeout(limit, front.punch_hole(offset, len)).await,
                            _ => tokio::time::timeout(limit, front.zero_range(offset, len)).await,
                        };
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            front.settled().await;
        });
        stop.store(true, Ordering::Relaxed);
    });
    // What the cache holds (the pages it has), against what the backend holds
    // once every dirty page is written back and the cache dropped.
    file.sync_all().unwrap();
    let mut cached = vec![None; PAGES as usize];
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, seen) in cached.iter_mut().enumerate() {
        if file.read_at_nowait(&mut page, i as u64 * PAGE).is_ok() {
            *seen = Some(page.clone());
        }
    }
    file.invalidate_range(0, PAGES * PAGE).unwrap();
    let mut wrong = 0;
    for (i, seen) in cached.iter().enumerate() {
        file.read_exact_at(&mut page, i as u64 * PAGE).unwrap();
        wrong += usize::from(stamp_of(&page).is_none());
        wrong += usize::from(seen.as_ref().is_some_and(|seen| *seen != page));
    }

    // Rounds of dropped reads racing a punch of the whole file.
    for _ in 0..10 {
        for i in 0..PAGES {
            let stamp = stamps.fetch_add(1, Ordering::Relaxed);
            file.write_all_at(&stamped(stamp), i * PAGE).unwrap();
        }
        file.invalidate_range(0, PAGES * PAGE).unwrap();
        runtime.block_on(async {
            let readers: Vec<_> = (0..4)
                .map(|_| tokio::spawn(reads(&mut rng, &front, 20)))
                .collect();
            tokio::task::yield_now().await;
            front.punch_hole(0, PAGES * PAGE).await.unwrap();
            for reader in readers {
                reader.await.unwrap();
            }
            front.settled().await;
        });
        for i in 0..PAGES {
            file.read_exact_at(&mut page, i * PAGE).unwrap();
            wrong += usize::from(page.iter().any(|&b| b != 0));
        }
    }
    wrong + torn.load(Ordering::Relaxed)
}

#[test]
fn futures_dropped_at_random_points_leave_the_cache_coherent() {
    for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
        for seed in 1..=2 {
            assert_eq!(
                drop_futures_under_races(strategy, seed),
                0,
                "{strategy}, seed {seed}"
            );
        }
    }
}

/// The check has teeth: without the coherence lock, fills that read the
/// backend before a punch publish after it.
#[test]
fn the_same_races_catch_the_none_strategy() {
    let wrong: usize = (1..=3)
        .map(|seed| drop_futures_under_races(Strategy::None, seed))
        .sum();
    assert!(wrong > 0, "none was not caught");
}
