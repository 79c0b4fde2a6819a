//! The page cache: frame memory shared by every [`Mapping`], under one budget.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::errno::with_message;
use crate::lock::Strategy;

pub(crate) mod evict;
mod mapping;
pub(crate) mod page;
mod readahead;
mod stats;
mod store;
mod tree;
mod wait;

pub use evict::{simulate as simulate_eviction, EvictionPolicy};
pub use mapping::{FileHandle, Mapping};
pub use stats::{CacheStats, LockWaits};

use evict::{Key, Queue, Visit};
use readahead::{readahead_queue, ReadaheadQueue, DEFAULT_READAHEAD_THREADS, MAX_WINDOW_PAGES};
use stats::Counters;
use store::Budget;

pub use crate::page::PAGE_SIZE;

/// The alignment of buffer addresses for direct I/O (a logical sector). Offsets
/// and lengths of direct I/O must be multiples of [`PAGE_SIZE`].
pub const DIRECT_IO_MEMORY_ALIGN: usize = 512;

/// What every mapping of one cache shares.
pub(crate) struct CacheShared {
    pub(crate) budget: Budget,
    pub(crate) strategy: Strategy,
    pub(crate) fill_batch_pages: usize,
    pub(crate) eviction: EvictionPolicy,
    /// One entry per page that has been present, in the policy's order. Taken
    /// before `mappings` when both are needed.
    queue: Mutex<Queue>,
    /// The live mappings by id, for the eviction hand.
    mappings: Mutex<HashMap<u32, Weak<Mapping>>>,
    next_mapping: AtomicU32,
    pub(crate) counters: Counters,
    /// Background writeback: pages dirtied since its last flush, the count that
    /// starts one early, and its period.
    dirtied: AtomicU64,
    dirty_background_pages: u64,
    writeback_interval: Duration,
    /// Windows for the readahead threads.
    pub(crate) readahead: ReadaheadQueue,
}

/// How hard [`CacheShared::acquire`] tries for a page of the budget.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Need {
    /// Evict if the budget is used up; give up when nothing could be evicted
    /// (a fill's pages past its first, readahead), or after
    /// [`OPTIONAL_RECLAIMS`] reclaims whose pages other threads took.
    Optional,
    /// Evict, and wait for busy pages (locked, being filled, under writeback)
    /// to come free: give up only when no page of the budget can be freed,
    /// because every one is dirty and its writeback fails (a buffered write's
    /// page, which then fails with `OutOfMemory`).
    Wait,
    /// Keep evicting until a page is free (a fault, which cannot be refused).
    Required,
}

/// What one reclaim found.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Reclaimed {
    /// Pages evicted.
    pub(crate) freed: usize,
    /// Candidates skipped because they were busy (locked, being filled, under
    /// writeback): they come free soon.
    pub(crate) busy: usize,
    /// Candidates kept because they are dirty and their writeback failed.
    pub(crate) failed: usize,
}

/// What evicting one page did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Eviction {
    /// The page is gone and its budget given back.
    Evicted,
    /// The page is locked, being filled or under writeback: try later.
    Busy,
    /// The page stays, dirty: its writeback failed (or its removal from the
    /// store did).
    Failed,
    /// There was no page to evict.
    Absent,
}

/// The most readahead threads a cache may have.
const MAX_READAHEAD_THREADS: usize = 64;

/// The largest budget, in pages: page counts of the budget fit in 32 bits.
const MAX_BUDGET_PAGES: u64 = u32::MAX as u64;

/// The range of [`PageCacheBuilder::writeback_interval`].
const MIN_WRITEBACK_INTERVAL: Duration = Duration::from_millis(10);
const MAX_WRITEBACK_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// `EINVAL` with a message naming the setting and its range unless `value`
/// lies in `range`.
fn check_setting(
    name: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> io::Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(with_message(
        libc::EINVAL,
        format!(
            "{name} must be {} to {} {unit} (got {value})",
            range.start(),
            range.end()
        ),
    ))
}

/// Reclaims an optional page of the budget may take while each frees pages
/// that other threads take first.
const OPTIONAL_RECLAIMS: u32 = 16;

/// Pages one reclaim tries to free at once.
const RECLAIM_BATCH: usize = 16;

/// How long [`Need::Wait`] waits for busy pages before it gives up, and
/// [`Need::Required`] before it takes a page beyond the budget.
const RECLAIM_PATIENCE: Duration = Duration::from_secs(60);

impl CacheShared {
    /// Takes one page of the budget, evicting pages to make room if needed.
    pub(crate) fn acquire(&self, need: Need) -> bool {
        if self.budget.try_acquire() {
            return true;
        }
        let started = Instant::now();
        let mut tries = 0;
        loop {
            let reclaimed = self.reclaim(RECLAIM_BATCH);
            if self.budget.try_acquire() {
                return true;
            }
            // Pages this reclaim freed may have gone to other threads first (fills
            // claim many at once): that is no reason to fail a write or stop a
            // fill while pages can still be evicted.
            tries += 1;
            match need {
                Need::Optional if reclaimed.freed == 0 || tries >= OPTIONAL_RECLAIMS => {
                    return false;
                }
                // Nothing freed, nothing busy, and writebacks failed: the pages
                // left are dirty and cannot be written. (With no failure either,
                // the budget is held by fills that have not queued their pages
                // yet: they will soon.)
                Need::Wait
                    if reclaimed.freed == 0 && reclaimed.busy == 0 && reclaimed.failed > 0 =>
                {
                    return false;
                }
                _ => {}
            }
            if reclaimed.freed > 0 {
                continue;
            }
            // Every evictable page is busy (locked, filling, under writeback) or
            // dirty with a failing writeback. Busy pages come free soon.
            if started.elapsed() > RECLAIM_PATIENCE {
                if need != Need::Required {
                    return false;
                }
                self.budget.force_acquire();
                stats::add(&self.counters.budget_overruns, 1);
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Moves the eviction hand until `want` pages were evicted or it went twice
    /// round the queue; returns how many were, and how many were busy.
    pub(crate) fn reclaim(&self, want: usize) -> Reclaimed {
        let mut visits_left = 2 * self.queue.lock().len() + 2 * want;
        let mut reclaimed = Reclaimed::default();
        while reclaimed.freed < want && visits_left > 0 {
            let mut visited = 0;
            // Mappings upgraded under the locks are dropped after them: the last
            // handle of a mapping going away unregisters it.
            let mut alive: Vec<Arc<Mapping>> = Vec::new();
            let candidates: Vec<(Arc<Mapping>, u64)> = {
                let mut queue = self.queue.lock();
                let mappings = self.mappings.lock();
                let wanted = want - reclaimed.freed;
                let keys = queue.sweep(wanted, visits_left.min(4 * RECLAIM_BATCH), |key| {
                    visited += 1;
                    let Some(mapping) = mappings.get(&key.mapping()).and_then(Weak::upgrade) else {
                        return Visit::Stale;
                    };
                    let visit = mapping.eviction_visit(key.index());
                    alive.push(mapping);
                    visit
                });
                keys.into_iter()
                    .filter_map(|key| {
                        let mapping = mappings.get(&key.mapping()).and_then(Weak::upgrade)?;
                        Some((mapping, key.index()))
                    })
                    .collect()
            };
            drop(alive);
            visits_left = visits_left.saturating_sub(visited);
            if visited == 0 {
                break;
            }
            for (mapping, index) in candidates {
                match mapping.evict_page(index) {
                    Eviction::Evicted => reclaimed.freed += 1,
                    Eviction::Busy => reclaimed.busy += 1,
                    Eviction::Failed => reclaimed.failed += 1,
                    Eviction::Absent => {}
                }
            }
        }
        reclaimed
    }

    /// Gives a page that just became present its queue entry.
    pub(crate) fn enqueue(&self, mapping: u32, index: u64) {
        self.queue.lock().push(Key::new(mapping, index));
    }

    /// An id for a new mapping: one no live mapping has (ids wrap at
    /// 2^[`evict::MAPPING_BITS`]; stale queue entries of a dead mapping that
    /// had it then point at the new one's pages, which only costs a visit).
    pub(crate) fn new_mapping_id(&self) -> u32 {
        let mappings = self.mappings.lock();
        loop {
            let id = self.next_mapping.fetch_add(1, Ordering::Relaxed) % (1 << evict::MAPPING_BITS);
            if !mappings.contains_key(&id) {
                return id;
            }
        }
    }

    /// Registers mapping `id` for the eviction hand.
    pub(crate) fn register(&self, id: u32, mapping: Weak<Mapping>) {
        self.mappings.lock().insert(id, mapping);
    }

    /// Forgets a mapping that is going away (its entries go stale).
    pub(crate) fn unregister(&self, id: u32) {
        self.mappings.lock().remove(&id);
    }

    /// Counts a page made dirty, for background writeback's threshold.
    pub(crate) fn dirtied(&self) {
        self.dirtied.fetch_add(1, Ordering::Relaxed);
    }

    /// The live mapping with this id, if any.
    fn mapping(&self, id: u32) -> Option<Arc<Mapping>> {
        self.mappings.lock().get(&id).and_then(Weak::upgrade)
    }

    fn live_mappings(&self) -> Vec<Arc<Mapping>> {
        let mappings = self.mappings.lock();
        mappings.values().filter_map(Weak::upgrade).collect()
    }
}

/// A page cache: frame memory under a byte budget, shared by the [`Mapping`]s
/// opened from it. Cloning is cheap and shares the cache.
#[derive(Clone)]
pub struct PageCache {
    shared: Arc<CacheShared>,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("strategy", &self.shared.strategy)
            .field("budget_bytes", &self.budget_bytes())
            .field("cached_bytes", &self.cached_bytes())
            .finish()
    }
}

/// Settings of a [`PageCache`]; see [`PageCache::builder`].
#[derive(Clone, Debug)]
pub struct PageCacheBuilder {
    budget_bytes: u64,
    strategy: Strategy,
    fill_batch_pages: usize,
    eviction: EvictionPolicy,
    writeback_interval: Duration,
    dirty_background_bytes: Option<u64>,
    readahead_threads: usize,
}

impl Default for PageCacheBuilder {
    fn default() -> Self {
        PageCacheBuilder {
            budget_bytes: 256 << 20,
            strategy: Strategy::DEFAULT,
            fill_batch_pages: 32,
            eviction: EvictionPolicy::Sieve,
            writeback_interval: Duration::from_secs(5),
            dirty_background_bytes: None,
            readahead_threads: DEFAULT_READAHEAD_THREADS,
        }
    }
}

/// The background writeback thread of a cache: every `interval`, or at the
/// next tick after `dirty_background_pages` pages were dirtied, writes back
/// every dirty page of every mapping (failures are recorded for the mappings'
/// next syncs). It holds the cache only while it works, so it ends within a
/// tick of the cache.
fn background_writeback(cache: Weak<CacheShared>, interval: Duration) {
    let tick = interval.min(Duration::from_millis(100));
    let mut last_flush = Instant::now();
    loop {
        std::thread::sleep(tick);
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let due = last_flush.elapsed() >= shared.writeback_interval
            || shared.dirtied.load(Ordering::Relaxed) >= shared.dirty_background_pages;
        if due {
            shared.dirtied.store(0, Ordering::Relaxed);
            for mapping in shared.live_mappings() {
                mapping.write_back_in_background();
            }
            last_flush = Instant::now();
        }
    }
}

impl PageCacheBuilder {
    /// The most frame memory the cache may hold, in bytes, rounded down to
    /// whole pages: one page to 2^32 - 1 pages. Default 256 MiB. When it is used
    /// up, pages are evicted (see [`PageCacheBuilder::eviction`]); a call that
    /// needs a page waits for busy ones to come free, so every budget accepted
    /// makes progress, even one page. A fill or readahead window reads at most
    /// a quarter of the budget at once, so a budget below 128 pages (512 KiB)
    /// also caps the fill batch. If no page can be evicted because every one
    /// is dirty and its writeback fails, a miss is served uncached and a
    /// buffered write that needs a new page fails with `ENOMEM`
    /// (`ErrorKind::OutOfMemory`).
    pub fn budget_bytes(mut self, bytes: u64) -> Self {
        self.budget_bytes = bytes;
        self
    }

    /// How often background writeback writes every dirty page back (like
    /// `dirty_writeback_centisecs`): 10 ms to one day. Default 5 s.
    pub fn writeback_interval(mut self, interval: Duration) -> Self {
        self.writeback_interval = interval;
        self
    }

    /// How many bytes dirtied since the last background flush start one
    /// early (like `dirty_background_bytes`): one page up to the budget.
    /// Default a tenth of the budget.
    pub fn dirty_background_bytes(mut self, bytes: u64) -> Self {
        self.dirty_background_bytes = Some(bytes);
        self
    }

    /// Which pages go when the budget is used up. Default
    /// [`EvictionPolicy::Sieve`], which kept more hits than CLOCK on the
    /// scan-polluted traces of `filemap bench evict`.
    pub fn eviction(mut self, policy: EvictionPolicy) -> Self {
        self.eviction = policy;
        self
    }

    /// How the coherence lock is enforced. Default [`Strategy::Range`]
    /// ([`Strategy::DEFAULT`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The pages a fault, an explicit readahead and the first sequential read
    /// miss read from the backend at once: 1 to 512, default 32. Sequential
    /// read misses double it up to 512 pages; random ones read only what they
    /// ask for.
    pub fn fill_batch_pages(mut self, pages: usize) -> Self {
        self.fill_batch_pages = pages;
        self
    }

    /// Threads that read sequential windows ahead of their readers: 0 to 64,
    /// default 2 (0 reads every window synchronously, in the reader's miss).
    /// They read ahead only for a backend slower to read a window than the
    /// cache is to install it, such as a device opened with `O_DIRECT`: there
    /// the next window's read overlaps the reader's copies and the previous
    /// window's install. A backend the host kernel caches is read
    /// synchronously anyway.
    pub fn readahead_threads(mut self, threads: usize) -> Self {
        self.readahead_threads = threads;
        self
    }

    /// Builds the cache. A setting out of its range fails with `EINVAL`
    /// (`ErrorKind::InvalidInput`, see [`crate::errno`]), with a message that
    /// names the setting and its range.
    pub fn build(self) -> io::Result<PageCache> {
        let pages = self.budget_bytes / PAGE_SIZE as u64;
        check_setting(
            "budget_bytes",
            self.budget_bytes,
            PAGE_SIZE as u64..=MAX_BUDGET_PAGES * PAGE_SIZE as u64 + (PAGE_SIZE as u64 - 1),
            "bytes (one page to 2^32 - 1 pages)",
        )?;
        check_setting(
            "fill_batch_pages",
            self.fill_batch_pages as u64,
            1..=MAX_WINDOW_PAGES,
            "pages",
        )?;
        check_setting(
            "readahead_threads",
            self.readahead_threads as u64,
            0..=MAX_READAHEAD_THREADS as u64,
            "threads",
        )?;
        check_setting(
            "writeback_interval",
            self.writeback_interval
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            MIN_WRITEBACK_INTERVAL.as_millis() as u64..=MAX_WRITEBACK_INTERVAL.as_millis() as u64,
            "ms",
        )?;
        if let Some(bytes) = self.dirty_background_bytes {
            check_setting(
                "dirty_background_bytes",
                bytes,
                PAGE_SIZE as u64..=pages * PAGE_SIZE as u64,
                "bytes (one page up to the budget)",
            )?;
        }
        let dirty_background_pages = match self.dirty_background_bytes {
            Some(bytes) => bytes / PAGE_SIZE as u64,
            None => (pages / 10).max(1),
        };
        let (readahead, requests) = readahead_queue(self.readahead_threads);
        let cache = PageCache {
            shared: Arc::new(CacheShared {
                budget: Budget::new(pages),
                strategy: self.strategy,
                fill_batch_pages: self.fill_batch_pages,
                eviction: self.eviction,
                queue: Mutex::new(Queue::new(self.eviction)),
                mappings: Mutex::new(HashMap::new()),
                next_mapping: AtomicU32::new(0),
                counters: Counters::default(),
                dirtied: AtomicU64::new(0),
                dirty_background_pages,
                writeback_interval: self.writeback_interval,
                readahead,
            }),
        };
        requests.serve(Arc::downgrade(&cache.shared))?;
        let (shared, interval) = (Arc::downgrade(&cache.shared), self.writeback_interval);
        std::thread::Builder::new()
            .name("fm-writeback".into())
            .stack_size(256 << 10)
            .spawn(move || background_writeback(shared, interval))?;
        Ok(cache)
    }
}

impl PageCache {
    /// Settings for a new cache.
    pub fn builder() -> PageCacheBuilder {
        PageCacheBuilder::default()
    }

    /// Opens a mapping of the file behind `backend`: its cached pages, coherence
    /// lock and size. Open each file once and share the returned `Arc`; two
    /// mappings of one file would be two caches that do not see each other.
    ///
    /// Each mapping keeps its pages in a memfd of its own and runs one thread
    /// that serves the page faults of its views; both go when the last handle
    /// (or memory map) of the mapping does.
    pub fn open(&self, backend: Arc<dyn Backend>) -> io::Result<Arc<Mapping>> {
        Mapping::new(self.shared.clone(), backend)
    }

    /// The strategy of every mapping of this cache.
    pub fn strategy(&self) -> Strategy {
        self.shared.strategy
    }

    /// The frame memory budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.shared.budget.capacity() * PAGE_SIZE as u64
    }

    /// Bytes of frame memory holding pages now.
    pub fn cached_bytes(&self) -> u64 {
        self.shared.budget.used() * PAGE_SIZE as u64
    }

    /// The eviction policy.
    pub fn eviction(&self) -> EvictionPolicy {
        self.shared.eviction
    }

    /// What the cache did and holds. Counting dirty bytes walks the mappings'
    /// page indexes, so call it now and then, not per operation.
    pub fn stats(&self) -> CacheStats {
        let shared = &self.shared;
        let counters = &shared.counters;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mappings = shared.live_mappings();
        let dirty_pages: u64 = mappings.iter().map(|mapping| mapping.dirty_pages()).sum();
        let metadata_bytes = shared.queue.lock().allocated_bytes()
            + mappings
                .iter()
                .map(|mapping| mapping.index_bytes())
                .sum::<usize>();
        let page = PAGE_SIZE as u64;
        CacheStats {
            hits: counters.hits.sum(),
            misses: load(&counters.misses),
            fills: load(&counters.fills),
            readahead_pages: load(&counters.readahead_pages),
            readahead_thread_pages: load(&counters.readahead_thread_pages),
            evictions: load(&counters.evictions),
            writebacks: load(&counters.writebacks),
            writeback_errors: load(&counters.writeback_errors),
            budget_overruns: load(&counters.budget_overruns),
            faults: load(&counters.faults),
            cached_bytes: shared.budget.used() * page,
            peak_cached_bytes: shared.budget.peak() * page,
            dirty_bytes: dirty_pages * page,
            budget_bytes: shared.budget.capacity() * page,
            lock_waits: LockWaits::from_counters(&counters.lock_waits),
            metadata_bytes: metadata_bytes as u64,
        }
    }
}
