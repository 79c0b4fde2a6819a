//! What the cache counts, and [`CacheStats`], the snapshot users read.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::lock::Mode;

/// Stripes of the hit counter: a hit adds to its thread's stripe, so hits on
/// different threads write different cache lines.
pub(crate) const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

/// A counter for the hit path, striped by thread.
#[derive(Default)]
pub(crate) struct StripedCounter([Stripe; STRIPES]);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_STRIPE: AtomicU64 = AtomicU64::new(0);

/// This thread's stripe, below [`STRIPES`], dealt out in turn to threads as
/// they first ask. Which stripe a thread has is only a spread (any is
/// correct), so the counter that deals them is `std`'s, unseen by the model
/// checkers.
#[inline]
pub(crate) fn thread_stripe() -> usize {
    STRIPE.with(|stripe| {
        if stripe.get() == usize::MAX {
            stripe.set(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) as usize % STRIPES);
        }
        stripe.get()
    })
}

impl StripedCounter {
    /// Adds one to this thread's stripe: a plain load and store, no locked
    /// instruction (two threads sharing a stripe may rarely lose a count).
    #[inline]
    pub(crate) fn add(&self) {
        let counter = &self.0[thread_stripe()].0;
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// The cache's counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: StripedCounter,
    /// Pins taken and given back (read and write): the difference is held.
    pub(crate) pins: StripedCounter,
    pub(crate) unpins: StripedCounter,
    /// Waits of a change, a drop or a fault for a page's pins.
    pub(crate) pin_waits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) fills: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) writebacks: AtomicU64,
    pub(crate) writeback_errors: AtomicU64,
    pub(crate) readahead_pages: AtomicU64,
    pub(crate) readahead_thread_pages: AtomicU64,
    pub(crate) budget_overruns: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) reopened: AtomicU64,
    /// Waits for a coherence mode, by [`Mode`] (in `Mode` declaration order).
    pub(crate) lock_waits: [AtomicU64; 5],
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn mode_slot(mode: Mode) -> usize {
    match mode {
        Mode::Read => 0,
        Mode::Fill => 1,
        Mode::Write => 2,
        Mode::Direct => 3,
        Mode::Invalidate => 4,
    }
}

/// Waits for each coherence mode: how often a caller found the mode it needed
/// held in a conflicting way and had to wait.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("a")?))?;
/// file.write_all_at(b"alone", 0)?;
/// let waits = cache.stats().lock_waits;
/// assert_eq!(waits.fill + waits.write + waits.direct + waits.invalidate, 0); // no one to wait for
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LockWaits {
    /// Whole reads (only `file-exclusive` locks them).
    pub read: u64,
    /// Fills of read misses, readahead and faults.
    pub fill: u64,
    /// Buffered writes.
    pub write: u64,
    /// Direct I/O.
    pub direct: u64,
    /// Punch, zero, truncate, collapse, insert, invalidate.
    pub invalidate: u64,
}

impl LockWaits {
    pub(crate) fn from_counters(waits: &[AtomicU64; 5]) -> Self {
        let at = |mode| waits[mode_slot(mode)].load(Ordering::Relaxed);
        LockWaits {
            read: at(Mode::Read),
            fill: at(Mode::Fill),
            write: at(Mode::Write),
            direct: at(Mode::Direct),
            invalidate: at(Mode::Invalidate),
        }
    }
}

/// A snapshot of what a [`crate::PageCache`] did and holds; see
/// [`crate::PageCache::stats`]. Counts are since the cache was built.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder()
///     .budget_bytes(1 << 20)
///     .writeback_interval(Duration::from_secs(3600)) // only syncs write back here
///     .build()?;
/// let file = cache.open(Arc::new(volume.create_file("a")?))?;
/// file.write_all_at(&[1; 8192], 0)?;
/// let mut buf = [0; 8192];
/// file.read_exact_at(&mut buf, 0)?;
/// let stats = cache.stats();
/// assert_eq!(stats.hits, 2); // both pages were cached by the write
/// assert_eq!(stats.dirty_bytes, 8192);
/// file.sync_all()?;
/// let stats = cache.stats();
/// assert_eq!((stats.dirty_bytes, stats.writebacks), (0, 2));
/// assert_eq!(stats.budget_bytes, 1 << 20);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CacheStats {
    /// Pages copied from the cache without waiting (buffered reads).
    pub hits: u64,
    /// Pages a buffered read did not find readable in the cache.
    pub misses: u64,
    /// Page faults of memory maps (and of the cache's own views) served by
    /// the mappings' handler threads: one per round trip, whatever it mapped.
    pub faults: u64,
    /// Pages read from backends into the cache (misses, readahead, faults).
    pub fills: u64,
    /// Pages read ahead of a sequential reader, beyond what it asked for.
    pub readahead_pages: u64,
    /// Of `readahead_pages`, those read by the cache's readahead threads
    /// (windows of a backend slower than the cache's install).
    pub readahead_thread_pages: u64,
    /// Pages evicted to make room under the budget.
    pub evictions: u64,
    /// Dirty pages written to backends (syncs, eviction, background writeback).
    pub writebacks: u64,
    /// Writebacks that failed (the pages stay dirty; see `sync_all`).
    pub writeback_errors: u64,
    /// Times a fault could not find room for a minute's worth of tries and
    /// took a page beyond the budget (0 unless every page stays busy or dirty
    /// with failing writeback).
    pub budget_overruns: u64,
    /// Bytes of pages cached now.
    pub cached_bytes: u64,
    /// The most bytes cached at once.
    pub peak_cached_bytes: u64,
    /// Bytes of dirty pages now.
    pub dirty_bytes: u64,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// Waits for each coherence mode.
    pub lock_waits: LockWaits,
    /// Bytes of the cache's own bookkeeping: the mappings' page indexes and the
    /// eviction queue (not the kernel's, which keeps its own descriptor for
    /// every page of every memfd, as for any page cache).
    pub metadata_bytes: u64,
    /// Views of the memory the cached pages live in that the cache holds (one
    /// per gigabyte of it, and one per region over a gigabyte): the cache's
    /// share of the process's memory maps, whatever the number of open files.
    pub store_views: u64,
    /// Closed files whose clean pages the cache keeps for their next open
    /// (see [`FileIdentity`](crate::FileIdentity)).
    pub closed_files: u64,
    /// Opens that found the pages their file kept when it was last closed.
    pub reopened: u64,
    /// Page pins ([`Mapping::pin`](crate::Mapping::pin), `pin_mut`) held now.
    pub pins_held: u64,
    /// Pins taken so far.
    pub pins: u64,
    /// Times a change, a drop or a map's fault waited for a page's pins.
    pub pin_waits: u64,
}
