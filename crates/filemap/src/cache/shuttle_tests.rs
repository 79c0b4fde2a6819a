//! Shuttle: random schedules of a whole small cache, real `Mapping` code and
//! all: two readers against one thread that writes, writes direct and punches
//! pages of a six-page file, on a budget of four pages so that fills, evictions
//! and writebacks run among them. Every read must see a page whole (one value
//! in all its bytes) and no older than the last change completed before the
//! read began (C1, C2). A second scenario opens and closes the file around
//! every call, so that those reads meet closes that write back and keep
//! pages, reopens that take them, and evictions of a closed file's pages.
//! Run with `--cfg shuttle`.
//!
//! Under a checker no thread may block in the kernel, where the checker could
//! not run the others: the cache then starts no fault thread and no background
//! writeback thread, and its store reads pages with `pread` (see
//! `cache/store.rs`), so this covers everything but memory maps.

use std::io;
use std::sync::Arc;

use shuttle::rand::{thread_rng, Rng};

use crate::aligned::AlignedBuf;
use crate::backend::{Backend, FileIdentity};
use crate::cache::{PageCache, DIRECT_IO_MEMORY_ALIGN};
use crate::lock::Strategy;
use crate::page::{start_of, PAGE, PAGE_SIZE};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{thread, Mutex};

const PAGES: u64 = 6;
const BUDGET_PAGES: u64 = 4;
const READS: usize = 6;
const CHANGES: usize = 6;

/// A file in memory whose every call is a scheduling point (its lock), as a
/// device's I/O would be; with an identity if `named`, whose version counts
/// its changes.
#[derive(Debug, Default)]
struct MemFile {
    data: Mutex<Vec<u8>>,
    named: bool,
    changes: AtomicUsize,
}

impl MemFile {
    fn named() -> MemFile {
        MemFile {
            named: true,
            ..MemFile::default()
        }
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    fn zero(&self, offset: u64, len: u64) {
        self.changed();
        let mut data = self.data.lock();
        let end = (offset + len).min(data.len() as u64) as usize;
        let start = (offset as usize).min(end);
        data[start..end].fill(0);
    }
}

impl Backend for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().len() as u64)
    }

    fn max_file_size(&self) -> u64 {
        start_of(PAGES)
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock();
        let start = (start_of(index) as usize).min(data.len());
        let end = (start + buf.len()).min(data.len());
        buf[..end - start].copy_from_slice(&data[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.changed();
        let mut data = self.data.lock();
        let start = start_of(index) as usize;
        let end = start + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.changed();
        self.data.lock().resize(len as usize, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn remove(&self) -> io::Result<()> {
        Ok(())
    }

    fn identity(&self) -> io::Result<Option<FileIdentity>> {
        Ok(self.named.then(|| FileIdentity {
            file: 1,
            version: self.changes.load(Ordering::SeqCst) as u128,
        }))
    }
}

/// What the changing thread did to each page, for the readers' checks: the
/// value of every change in order (a punch is 0), how many were started and
/// how many completed.
#[derive(Default)]
struct History {
    values: Mutex<Vec<Vec<u8>>>,
    started: [AtomicUsize; PAGES as usize],
    completed: [AtomicUsize; PAGES as usize],
}

impl History {
    fn new(initial: &[u8]) -> History {
        let history = History::default();
        *history.values.lock() = initial.iter().map(|&value| vec![value]).collect();
        for page in 0..PAGES as usize {
            history.started[page].store(1, Ordering::SeqCst);
            history.completed[page].store(1, Ordering::SeqCst);
        }
        history
    }

    fn start(&self, page: usize, value: u8) {
        self.values.lock()[page].push(value);
        self.started[page].fetch_add(1, Ordering::SeqCst);
    }

    fn complete(&self, page: usize) {
        self.completed[page].fetch_add(1, Ordering::SeqCst);
    }
}

/// Reads page `page` whole and checks it against what was done to it.
fn read_and_check(file: &crate::Mapping, history: &History, page: usize) {
    let floor = history.completed[page].load(Ordering::SeqCst) - 1;
    let mut buf = vec![0xee; PAGE_SIZE];
    let n = file.read_at(&mut buf, start_of(page as u64)).unwrap();
    let ceiling = history.started[page].load(Ordering::SeqCst);
    assert_eq!(n, PAGE_SIZE, "page {page} read short");
    let value = buf[0];
    assert!(
        buf.iter().all(|&byte| byte == value),
        "page {page} read torn: starts with {value}, holds {:?}",
        buf.iter().find(|&&byte| byte != value)
    );
    let values = history.values.lock();
    let allowed = &values[page][floor..ceiling];
    assert!(
        allowed.contains(&value),
        "page {page} read stale: {value}, but the last change completed before the \
         read wrote {} (history {:?})",
        values[page][floor],
        values[page]
    );
}

/// A file of [`PAGES`] pages, page `i` holding `initial[i]`, and a small
/// cache under `strategy`.
fn file_and_cache(
    strategy: Strategy,
    backend: MemFile,
    initial: &[u8],
) -> (Arc<MemFile>, PageCache) {
    let backend = Arc::new(backend);
    for (page, &value) in initial.iter().enumerate() {
        backend
            .write_pages(page as u64, &[value; PAGE_SIZE])
            .unwrap();
    }
    let cache = PageCache::builder()
        .budget_bytes(BUDGET_PAGES * PAGE)
        .fill_batch_pages(2)
        .readahead_threads(0)
        .strategy(strategy)
        .build()
        .unwrap();
    (backend, cache)
}

/// One random schedule of the scenario under `strategy`.
fn scenario(strategy: Strategy) {
    let initial: Vec<u8> = (1..=PAGES as u8).collect();
    let (backend, cache) = file_and_cache(strategy, MemFile::default(), &initial);
    let file = cache.open(backend).unwrap();
    let history = Arc::new(History::new(&initial));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let (file, history) = (file.clone(), history.clone());
        threads.push(thread::spawn(move || {
            for _ in 0..READS {
                let page = thread_rng().gen_range(0..PAGES as usize);
                read_and_check(&file, &history, page);
            }
        }));
    }
    {
        let (file, history) = (file.clone(), history.clone());
        threads.push(thread::spawn(move || {
            let mut next_value = PAGES as u8 + 1;
            for _ in 0..CHANGES {
                let page = thread_rng().gen_range(0..PAGES as usize);
                let offset = start_of(page as u64);
                let value = match thread_rng().gen_range(0..3) {
                    0 => 0,
                    _ => {
                        next_value += 1;
                        next_value
                    }
                };
                history.start(page, value);
                match (value, thread_rng().gen_bool(0.5)) {
                    (0, _) => file.punch_hole(offset, PAGE).unwrap(),
                    (_, true) => {
                        let page_data =
                            AlignedBuf::from_slice(&[value; PAGE_SIZE], DIRECT_IO_MEMORY_ALIGN);
                        file.write_direct(&page_data, offset).unwrap();
                    }
                    (_, false) => file.write_all_at(&[value; PAGE_SIZE], offset).unwrap(),
                }
                history.complete(page);
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    for page in 0..PAGES as usize {
        read_and_check(&file, &history, page);
    }
}

/// One random schedule of the open and close scenario: a reader and a writer
/// each open the file for every call and close it after, a third thread
/// fills another file (whose pages evict the first's, closed or not); at
/// the end nothing is dirty and the budget was kept.
fn open_close_scenario() {
    let initial: Vec<u8> = (1..=PAGES as u8).collect();
    let (backend, cache) = file_and_cache(Strategy::Range, MemFile::named(), &initial);
    let cache = Arc::new(cache);
    let history = Arc::new(History::new(&initial));
    let mut threads = Vec::new();
    {
        let (cache, backend, history) = (cache.clone(), backend.clone(), history.clone());
        threads.push(thread::spawn(move || {
            for _ in 0..READS {
                let page = thread_rng().gen_range(0..PAGES as usize);
                let file = cache.open(backend.clone()).unwrap();
                read_and_check(&file, &history, page);
            }
        }));
    }
    {
        let (cache, backend, history) = (cache.clone(), backend.clone(), history.clone());
        threads.push(thread::spawn(move || {
            for value in PAGES as u8 + 1..PAGES as u8 + 1 + CHANGES as u8 {
                let page = thread_rng().gen_range(0..PAGES as usize);
                history.start(page, value);
                let file = cache.open(backend.clone()).unwrap();
                file.write_all_at(&[value; PAGE_SIZE], start_of(page as u64))
                    .unwrap();
                drop(file);
                history.complete(page);
            }
        }));
    }
    {
        let cache = cache.clone();
        threads.push(thread::spawn(move || {
            let other = cache.open(Arc::new(MemFile::default())).unwrap();
            other.set_len(PAGES * PAGE).unwrap();
            let mut buf = vec![0; PAGE_SIZE];
            for page in 0..PAGES {
                other.read_exact_at(&mut buf, start_of(page)).unwrap();
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    let file = cache.open(backend).unwrap();
    for page in 0..PAGES as usize {
        read_and_check(&file, &history, page);
    }
    drop(file);
    let stats = cache.stats();
    assert!(stats.cached_bytes <= BUDGET_PAGES * PAGE, "{stats:?}");
    assert_eq!(stats.dirty_bytes, 0, "closes write back: {stats:?}");
}

/// One random schedule of a write of three pages on a budget of one, each
/// page's budget evicted from the one before, while another thread writes
/// the file back. Its snapshot pins the page for a moment; the write took
/// such a page for one held by the user's pins, gave up on the budget and
/// came up short (the differential found it, with a budget of one page and a
/// writeback every 10 ms).
fn write_beside_writeback_scenario() {
    let cache = PageCache::builder()
        .budget_bytes(PAGE)
        .readahead_threads(0)
        .build()
        .unwrap();
    let file = cache.open(Arc::new(MemFile::default())).unwrap();
    let syncer = {
        let file = file.clone();
        thread::spawn(move || {
            for _ in 0..3 {
                file.sync_all().unwrap();
            }
        })
    };
    for value in 2..4 {
        let written = file.write_at(&[value; 3 * PAGE_SIZE], 0).unwrap();
        assert_eq!(
            written,
            3 * PAGE_SIZE,
            "a write of 3 pages on a budget of 1"
        );
    }
    syncer.join().unwrap();
}

#[test]
fn a_write_on_a_full_budget_waits_for_a_writebacks_pin() {
    shuttle::check_pct(write_beside_writeback_scenario, 20_000, 3);
}

#[test]
fn closes_and_reopens_never_return_a_torn_or_stale_page() {
    shuttle::check_random(open_close_scenario, 5_000);
}

#[test]
fn a_small_cache_never_returns_a_torn_or_stale_page() {
    shuttle::check_random(|| scenario(Strategy::Range), 10_000);
}

/// The check can fail: without a coherence lock (the pre-5.15 kernel), a fill
/// that read a page before a punch or a direct write installs it after, and
/// a later read returns it.
#[test]
#[should_panic(expected = "stale")]
fn without_a_lock_a_stale_page_is_caught() {
    shuttle::check_random(|| scenario(Strategy::None), 20_000);
}
