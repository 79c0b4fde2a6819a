//! What every mapping of one cache shares: the budget and the eviction hand
//! that keeps it, the registry of open files, the readahead queue and the
//! background writeback thread.
//!
//! This floor sits below [`super::Mapping`]: it reaches the open files only
//! through [`CachedFile`], so the mapping uses the budget without the budget
//! using the mapping.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::sync::{Condvar, Mutex};

use super::evict::{self, EvictionPolicy, Key, Queue, Visit};
use super::faults::FaultService;
use super::readahead::ReadaheadQueue;
use super::stats::{self, Counters};
use super::store::{Arena, Budget};
use crate::lock::Strategy;

/// What the cache-wide work (the eviction hand, background writeback, the
/// readahead threads, the statistics) asks of one open file.
pub(crate) trait CachedFile: Send + Sync {
    /// What the eviction hand finds at page `index`.
    fn eviction_visit(&self, index: u64) -> Visit;
    /// Evicts page `index` if it is present and not busy.
    fn evict_page(&self, index: u64) -> Eviction;
    /// Writes back every dirty page; failures are kept for the next syncs.
    fn write_back_in_background(&self);
    /// Writes back every dirty page, waits for writeback under way and makes
    /// the file durable, reporting a failure ([`crate::Mapping::sync_all`]).
    fn sync_all(&self) -> std::io::Result<()>;
    /// Reads a readahead window of `pages` pages from `first` into the cache.
    fn fill_ahead(&self, first: u64, pages: u64);
    /// How many of the file's pages are dirty.
    fn dirty_pages(&self) -> u64;
    /// Bytes of the file's page index.
    fn index_bytes(&self) -> usize;
}

/// The settings a [`CacheShared`] is made with (checked by the builder).
pub(crate) struct Settings {
    pub(crate) budget_pages: u64,
    pub(crate) strategy: Strategy,
    pub(crate) fill_batch_pages: usize,
    pub(crate) eviction: EvictionPolicy,
    pub(crate) dirty_background_pages: u64,
    pub(crate) writeback_interval: Duration,
    pub(crate) fault_threads: usize,
    pub(crate) listener: super::listener::Listener,
}

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
    mappings: Mutex<HashMap<u32, Weak<dyn CachedFile>>>,
    /// Pins the cache's own work holds for the length of a copy.
    pub(crate) brief_pins: BriefPins,
    /// Mappings in their last drop (writing back there), which no walk of
    /// `mappings` reaches any more, and their end.
    closing: Mutex<usize>,
    closed: Condvar,
    next_mapping: AtomicU32,
    pub(crate) counters: Counters,
    /// Background writeback: pages dirtied since its last flush, the count that
    /// starts one early, and its period.
    dirtied: AtomicU64,
    dirty_background_pages: u64,
    writeback_interval: Duration,
    /// Windows for the readahead threads.
    pub(crate) readahead: ReadaheadQueue,
    /// The userfaultfd and fault threads of every mapping, from the first map.
    pub(crate) faults: Arc<FaultService>,
    /// The memfd every cached page lives in.
    pub(crate) arena: Arc<Arena>,
    /// Told of every change of a file's bytes, if set.
    pub(crate) listener: super::listener::Listener,
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
    /// Candidates kept because they are pinned: they come free only when
    /// their holders let go, which may be never.
    pub(crate) pinned: usize,
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
    /// The page is pinned: it stays until its pins are given back.
    Pinned,
    /// There was no page to evict.
    Absent,
}

/// that other threads take first.
const OPTIONAL_RECLAIMS: u32 = 16;

/// Pages one reclaim tries to free at once.
const RECLAIM_BATCH: usize = 16;

/// How long [`Need::Wait`] waits for busy pages before it gives up, and
/// [`Need::Required`] before it takes a page beyond the budget.
const RECLAIM_PATIENCE: Duration = Duration::from_secs(60);

impl CacheShared {
    /// A cache with nothing cached, its readahead windows going to `readahead`.
    pub(crate) fn new(settings: Settings, readahead: ReadaheadQueue) -> CacheShared {
        let faults = Arc::new(FaultService::new(settings.fault_threads));
        CacheShared {
            budget: Budget::new(settings.budget_pages),
            strategy: settings.strategy,
            fill_batch_pages: settings.fill_batch_pages,
            eviction: settings.eviction,
            queue: Mutex::new(Queue::new(settings.eviction)),
            mappings: Mutex::new(HashMap::default()),
            brief_pins: BriefPins::default(),
            closing: Mutex::new(0),
            closed: Condvar::new(),
            next_mapping: AtomicU32::new(0),
            counters: Counters::default(),
            dirtied: AtomicU64::new(0),
            dirty_background_pages: settings.dirty_background_pages,
            writeback_interval: settings.writeback_interval,
            readahead,
            arena: Arc::new(Arena::new(faults.clone())),
            faults,
            listener: settings.listener,
        }
    }

    /// Takes one page of the budget, evicting pages to make room if needed.
    pub(crate) fn acquire(&self, need: Need) -> bool {
        if self.budget.try_acquire() {
            return true;
        }
        let started = Instant::now();
        let mut tries = 0;
        loop {
            let brief_pins = self.brief_pins.mark();
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
                // Nothing freed, nothing busy, and writebacks failed or pages
                // pinned: the pages left are dirty and cannot be written, or
                // held for as long as their pins last. (With neither, the
                // budget is held by fills that have not queued their pages
                // yet: they will soon.) Unless the pins may be the cache's
                // own, which last a copy: those pages are busy.
                Need::Wait
                    if reclaimed.freed == 0
                        && reclaimed.busy == 0
                        && reclaimed.failed + reclaimed.pinned > 0
                        && !self.brief_pins.held_since(brief_pins) =>
                {
                    return false;
                }
                _ => {}
            }
            if reclaimed.freed > 0 {
                continue;
            }
            // Only pinned pages are left: they may stay pinned for ever, and a
            // fault cannot wait for them.
            if need == Need::Required && reclaimed.busy == 0 && reclaimed.pinned > 0 {
                self.budget.force_acquire();
                stats::add(&self.counters.budget_overruns, 1);
                return true;
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
            pause();
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
            let mut alive: Vec<Held<'_>> = Vec::new();
            let candidates: Vec<(Held<'_>, u64)> = {
                let mut queue = self.queue.lock();
                let mappings = self.mappings.lock();
                let wanted = want - reclaimed.freed;
                let keys = queue.sweep(wanted, visits_left.min(4 * RECLAIM_BATCH), |key| {
                    visited += 1;
                    let Some(mapping) = mappings.get(&key.mapping()) else {
                        return Visit::Stale;
                    };
                    // A mapping whose last handle is going: it unregisters, or
                    // hands its pages to a closed file under its id.
                    let Some(mapping) = mapping.upgrade() else {
                        return Visit::Keep;
                    };
                    let visit = mapping.eviction_visit(key.index());
                    alive.push(Held::new(self, mapping));
                    visit
                });
                keys.into_iter()
                    .filter_map(|key| {
                        let mapping = mappings.get(&key.mapping()).and_then(Weak::upgrade)?;
                        Some((Held::new(self, mapping), key.index()))
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
                    Eviction::Pinned => reclaimed.pinned += 1,
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
    pub(crate) fn register(&self, id: u32, mapping: Weak<dyn CachedFile>) {
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
    pub(crate) fn mapping(&self, id: u32) -> Option<Held<'_>> {
        let mapping = self.mappings.lock().get(&id).and_then(Weak::upgrade)?;
        Some(Held::new(self, mapping))
    }

    /// Bytes of the eviction queue.
    pub(crate) fn queue_bytes(&self) -> usize {
        self.queue.lock().allocated_bytes()
    }

    /// Runs `visit` on every live mapping, holding one at a time, so that a
    /// mapping whose last handle is dropped meanwhile writes back in that
    /// drop as soon as it can. A mapping whose last holder is the walk itself
    /// still drops on the walk's thread: [`Self::wait_for_closing`] waits for
    /// such drops (see [`Held`]).
    pub(crate) fn for_each_mapping(&self, mut visit: impl FnMut(&dyn CachedFile)) {
        let ids: Vec<u32> = self.mappings.lock().keys().copied().collect();
        for id in ids {
            if let Some(mapping) = self.mapping(id) {
                visit(&*mapping);
            }
        }
    }
}

/// The pins the cache's own work takes for the length of a copy (a
/// writeback's snapshot, a locked read's hit): the eviction hand finds their
/// pages pinned like the user's, which may be held for ever, and a write
/// that needs the budget gives up on those; on these it waits, as on a busy
/// page. A count of the pins held and one of those released, so that a
/// reclaim can tell whether any was held while it ran; in shards by thread,
/// so that locked reads of one file on several threads write no shared line
/// (one counter cost them 13% at 2 threads, `bench hit`).
#[derive(Default)]
pub(crate) struct BriefPins {
    shards: [BriefPinShard; stats::STRIPES],
}

#[derive(Default)]
#[repr(align(128))]
struct BriefPinShard {
    held: AtomicU64,
    released: AtomicU64,
}

/// The sum of [`BriefPins`]' releases when a reclaim began.
#[derive(Clone, Copy)]
pub(crate) struct BriefPinsMark(u64);

impl BriefPins {
    /// A brief pin is about to be taken (before the slot shows it, so that
    /// whoever sees the pin sees this), until the guard is dropped (after
    /// the slot stops showing it).
    pub(crate) fn hold(&self) -> BriefPin<'_> {
        let shard = &self.shards[stats::thread_stripe()];
        shard.held.fetch_add(1, Ordering::SeqCst);
        BriefPin(shard)
    }

    pub(crate) fn mark(&self) -> BriefPinsMark {
        BriefPinsMark(self.released())
    }

    fn released(&self) -> u64 {
        let shards = self.shards.iter();
        shards
            .map(|shard| shard.released.load(Ordering::SeqCst))
            .sum()
    }

    /// Whether a brief pin was held at some time since `mark`: one is held
    /// now, or one was released since. Every `held` is read before any
    /// `released`, and a pin is counted released before it leaves `held`, so
    /// a pin missed by the one is seen by the other.
    pub(crate) fn held_since(&self, mark: BriefPinsMark) -> bool {
        let held: u64 = self
            .shards
            .iter()
            .map(|shard| shard.held.load(Ordering::SeqCst))
            .sum();
        held > 0 || self.released() != mark.0
    }
}

/// A brief pin taken, or about to be (see [`BriefPins::hold`]).
pub(crate) struct BriefPin<'a>(&'a BriefPinShard);

impl Drop for BriefPin<'_> {
    fn drop(&mut self) {
        self.0.released.fetch_add(1, Ordering::SeqCst);
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a mapping that may be in its last drop for as long as it lives
/// (see [`CacheShared::wait_for_closing`]).
pub(crate) struct Closing<'a>(&'a CacheShared);

impl Closing<'_> {
    pub(crate) fn new(cache: &CacheShared) -> Closing<'_> {
        *cache.closing.lock() += 1;
        Closing(cache)
    }
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        let mut closing = self.0.closing.lock();
        *closing -= 1;
        if *closing == 0 {
            self.0.closed.notify_all();
        }
    }
}

/// A mapping the cache's own work holds for a while (a walk of the
/// mappings, the eviction hand, a readahead thread). If the holder turns out
/// to be the last, the mapping's drop and its writeback run where this is
/// dropped: counted as closing from before the mapping can no longer be
/// reached, so that [`CacheShared::wait_for_closing`] cannot miss it.
pub(crate) struct Held<'a> {
    cache: &'a CacheShared,
    mapping: Option<Arc<dyn CachedFile>>,
}

impl Held<'_> {
    fn new(cache: &CacheShared, mapping: Arc<dyn CachedFile>) -> Held<'_> {
        Held {
            cache,
            mapping: Some(mapping),
        }
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = dyn CachedFile;

    fn deref(&self) -> &Self::Target {
        self.mapping.as_deref().expect("held until dropped")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _closing = Closing::new(self.cache);
        drop(self.mapping.take());
    }
}

impl CacheShared {
    /// Waits until no mapping is in its last drop: its writeback is then in
    /// its backend. A walk of the live mappings misses a mapping whose last
    /// holder let go meanwhile (a background writeback, say), whose drop may
    /// still be writing on that holder's thread.
    pub(crate) fn wait_for_closing(&self) {
        let mut closing = self.closing.lock();
        while *closing > 0 {
            self.closed.wait(&mut closing);
        }
    }
}

/// The background writeback thread of a cache: every `interval`, or at the
/// next tick after `dirty_background_pages` pages were dirtied, writes back
/// every dirty page of every mapping (failures are recorded for the mappings'
/// next syncs). It holds the cache only while it works, so it ends within a
/// tick of the cache.
pub(crate) fn background_writeback(cache: Weak<CacheShared>, interval: Duration) {
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
            shared.for_each_mapping(|mapping| mapping.write_back_in_background());
            last_flush = Instant::now();
        }
    }
}

/// Lets busy pages come free: a short sleep, or under a model checker a yield
/// (a real sleep would stop every modelled thread with it).
fn pause() {
    #[cfg(not(any(loom, shuttle)))]
    std::thread::sleep(Duration::from_micros(100));
    #[cfg(any(loom, shuttle))]
    crate::sync::thread::yield_now();
}
