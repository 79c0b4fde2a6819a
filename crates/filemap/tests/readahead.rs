//! Sequential readahead through `read_at`: windows grow on sequential reads,
//! stop on a random one, and, for a backend slower than the cache's install,
//! the next window is read on the cache's readahead thread while the reader is
//! elsewhere.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::backend::{BackendOp, FaultyBackend};
use filemap::fault::{Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{FaultRule, Mapping, PageCache};

/// The file's pages.
const PAGES: u64 = 1024;
/// The reads' size: 32 pages, the default fill batch.
const CHUNK: usize = 128 << 10;

/// The byte every byte of page `i` holds.
fn byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A file of [`PAGES`] pages, written and not cached, in a cache with
/// `threads` readahead threads, behind a backend whose every read takes
/// `read_delay` more.
fn file(
    threads: usize,
    read_delay: Duration,
) -> (Arc<Mapping>, PageCache, Option<tempfile::TempDir>) {
    let (_, inner, keep) = common::backends().remove(0);
    let faulty = Arc::new(FaultyBackend::new(inner, 1));
    let cache = PageCache::builder()
        .readahead_threads(threads)
        .build()
        .unwrap();
    let file = cache.open(faulty.clone()).unwrap();
    for i in 0..PAGES {
        file.write_all_at(&[byte(i); PAGE_SIZE], i * PAGE).unwrap();
    }
    file.invalidate_range(0, PAGES * PAGE).unwrap();
    faulty.add_rule(FaultRule::new(
        BackendOp::ReadPages,
        Trigger::Always,
        Injection::Delay {
            min: read_delay,
            max: read_delay,
        },
    ));
    (file, cache, keep)
}

/// Reads chunk `n` and checks its bytes.
fn read_chunk(file: &Mapping, n: u64) {
    let mut buf = vec![0u8; CHUNK];
    file.read_exact_at(&mut buf, n * CHUNK as u64).unwrap();
    for (p, page) in buf.chunks(PAGE_SIZE).enumerate() {
        let index = n * (CHUNK / PAGE_SIZE) as u64 + p as u64;
        assert!(page.iter().all(|&b| b == byte(index)), "page {index}");
    }
}

#[test]
fn a_slow_backend_is_read_ahead_on_the_readahead_thread() {
    let (file, cache, _keep) = file(2, Duration::from_millis(5));
    // Chunk 0 misses at page 0 (32 pages), chunk 1 at page 32 (a window of 64,
    // which marks page 64), chunk 2 reaches the mark: the next window, pages
    // 96..224, goes to the readahead thread.
    for n in 0..3 {
        read_chunk(&file, n);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(96..224).all(|i| file.is_page_cached(i)) {
        assert!(
            Instant::now() < deadline,
            "the window after the mark was not read ahead"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = cache.stats();
    assert!(stats.readahead_thread_pages >= 128, "{stats:?}");
    assert!(stats.readahead_pages >= stats.readahead_thread_pages + 32);
    // The reader goes on through what was read ahead and on, and reads it right.
    for n in 3..PAGES / 32 {
        read_chunk(&file, n);
    }
}

#[test]
fn windows_grow_on_sequential_reads_and_a_random_read_stops_them() {
    let (file, _cache, _keep) = file(0, Duration::ZERO);
    let mut buf = vec![0u8; PAGE_SIZE];
    // Page by page: misses at 0, 32, 96, 224 read 32, 64, 128 and 256 pages,
    // all synchronously (no readahead threads).
    for i in 0..=224 {
        file.read_exact_at(&mut buf, i * PAGE).unwrap();
    }
    assert!(
        file.is_page_cached(479),
        "the fourth window reaches page 479"
    );
    assert!(!file.is_page_cached(480));
    // A random read reads what it asks for, and ends the stream.
    file.read_exact_at(&mut buf, 700 * PAGE).unwrap();
    assert!(file.is_page_cached(700) && !file.is_page_cached(701));
    file.read_exact_at(&mut buf, 480 * PAGE).unwrap();
    assert!(
        !file.is_page_cached(481),
        "the stream ended at the random read"
    );
}

#[test]
fn more_readahead_threads_than_allowed_are_refused() {
    let error = PageCache::builder()
        .readahead_threads(65)
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}
