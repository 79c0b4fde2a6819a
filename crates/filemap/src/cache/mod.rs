//! The page cache: frame memory shared by every [`Mapping`], under one budget.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::errno::with_message;
use crate::lock::Strategy;

pub(crate) mod evict;
mod faults;
mod listener;
mod mapping;
pub(crate) mod page;
mod readahead;
mod shared;
#[cfg(all(test, shuttle, not(loom)))]
mod shuttle_tests;
mod stats;
mod store;
mod tree;
mod wait;

pub use evict::{simulate as simulate_eviction, EvictionPolicy};
pub use listener::ChangeListener;
pub use mapping::direct::DIRECT_IO_MEMORY_ALIGN;
pub use mapping::pin::{PinnedPage, PinnedPageMut};
pub use mapping::pin_range::{PinnedRange, PinnedSlices};
pub use mapping::region::{MapAccess, MapRegion};
pub use mapping::writeback::FileHandle;
pub use mapping::Mapping;
pub use stats::{CacheStats, LockWaits};

use mapping::closed::OpenFiles;
pub use readahead::ReadaheadMode;
use readahead::{readahead_queue, DEFAULT_READAHEAD_THREADS, MAX_WINDOW_PAGES};
use shared::{background_writeback, CacheShared, Settings};

pub use crate::page::PAGE_SIZE;

/// Fault threads per cache by default.
const DEFAULT_FAULT_THREADS: usize = 2;

/// The most fault threads a cache may have.
const MAX_FAULT_THREADS: usize = 64;

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

/// A page cache: frame memory under a byte budget, shared by the [`Mapping`]s
/// opened from it. Cloning is cheap and shares the cache.
///
/// When the budget is used up, pages are evicted to make room (see
/// [`PageCacheBuilder::budget_bytes`]), so a file of any size is read through
/// a cache of any budget:
///
/// ```
/// use std::sync::Arc;
/// use filemap::{Backend, MemDevice, PageCache, Volume, PAGE_SIZE};
///
/// // A file of 64 pages, and a cache that holds 16 of them.
/// let volume = Volume::format(Arc::new(MemDevice::new(4 << 20)))?;
/// let table = volume.create_file("table")?;
/// table.set_len(64 * PAGE_SIZE as u64)?;
/// table.write_pages(0, &vec![3; 64 * PAGE_SIZE])?;
/// let cache = PageCache::builder().budget_bytes(16 * PAGE_SIZE as u64).build()?;
/// let file = cache.open(Arc::new(table))?;
///
/// let mut page = [0; PAGE_SIZE];
/// for offset in (0..64).map(|index| index * PAGE_SIZE as u64) {
///     file.read_exact_at(&mut page, offset)?;
///     assert_eq!(page, [3; PAGE_SIZE]);
/// }
/// let stats = cache.stats();
/// assert!(stats.fills >= 64); // every page was read into the cache...
/// assert!(stats.evictions >= 48); // ...and most were evicted again
/// assert!(cache.cached_bytes() <= cache.budget_bytes());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct PageCache {
    shared: Arc<CacheShared>,
    /// The files with an identity, open and closed.
    files: Arc<OpenFiles>,
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
///
/// Every setting has a default; [`PageCacheBuilder::build`] checks them all
/// and refuses one out of its range with `EINVAL`.
///
/// ```
/// use std::io::ErrorKind;
/// use std::time::Duration;
/// use filemap::{EvictionPolicy, PageCache, ReadaheadMode, Strategy};
///
/// let cache = PageCache::builder()
///     .budget_bytes(64 << 20) // frame memory, in bytes
///     .strategy(Strategy::Range) // how the coherence lock is enforced
///     .eviction(EvictionPolicy::Sieve) // which pages go when the budget is used up
///     .fill_batch_pages(64) // pages per backend read of a miss or a fault
///     .readahead_threads(2)
///     .readahead_mode(ReadaheadMode::BackendBound) // when the threads read ahead
///     .fault_threads(1) // serve the faults of memory maps
///     .writeback_interval(Duration::from_secs(1))
///     .dirty_background_bytes(8 << 20) // dirtied bytes that start writeback early
///     .build()?;
/// assert_eq!(cache.budget_bytes(), 64 << 20);
/// assert_eq!(cache.strategy(), Strategy::Range);
/// assert_eq!(cache.eviction(), EvictionPolicy::Sieve);
///
/// // A setting out of its range is refused when the cache is built.
/// let error = PageCache::builder().fill_batch_pages(0).build().unwrap_err();
/// assert_eq!(error.kind(), ErrorKind::InvalidInput);
/// assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
/// assert_eq!(error.to_string(), "fill_batch_pages must be 1 to 512 pages (got 0)");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PageCacheBuilder {
    budget_bytes: u64,
    strategy: Strategy,
    fill_batch_pages: usize,
    eviction: EvictionPolicy,
    writeback_interval: Duration,
    dirty_background_bytes: Option<u64>,
    readahead_threads: usize,
    readahead_mode: ReadaheadMode,
    fault_threads: usize,
    listener: listener::Listener,
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
            readahead_mode: ReadaheadMode::BackendBound,
            fault_threads: DEFAULT_FAULT_THREADS,
            listener: listener::Listener::default(),
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
    /// By default they read ahead only for a backend slower to read a window
    /// than the cache is to install it, such as a device opened with
    /// `O_DIRECT`: there the next window's read overlaps the reader's copies
    /// and the previous window's install. A backend the host kernel caches is
    /// read synchronously, unless [`PageCacheBuilder::readahead_mode`] says
    /// always.
    pub fn readahead_threads(mut self, threads: usize) -> Self {
        self.readahead_threads = threads;
        self
    }

    /// When the readahead threads read a stream's next window. Default
    /// [`ReadaheadMode::BackendBound`]: only while the backend is the slower
    /// part, since a reader that only copies out of the cache gains nothing
    /// from a thread that installs while it copies (`filemap bench seqread`
    /// measured 10 to 30% less). [`ReadaheadMode::Always`] suits a reader with
    /// its own work between reads, such as a file system server: through
    /// `filemap mount`, sequential reads of an uncached file went faster with
    /// it (`filemap bench mount`). A window read ahead grows to 2 MiB per
    /// readahead thread, up to four, and the threads read its pieces side by
    /// side.
    pub fn readahead_mode(mut self, mode: ReadaheadMode) -> Self {
        self.readahead_mode = mode;
        self
    }

    /// Threads that serve the page faults of memory maps, for every mapping
    /// of the cache together: 1 to 64, default 2. They start with the cache's
    /// first map, as does its userfaultfd; a cache that is never mapped runs
    /// none and needs no privilege.
    ///
    /// ```
    /// use filemap::PageCache;
    ///
    /// let cache = PageCache::builder()
    ///     .budget_bytes(64 << 20)
    ///     .readahead_threads(0)
    ///     .fault_threads(1)
    ///     .build()?;
    /// assert_eq!(cache.budget_bytes(), 64 << 20);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn fault_threads(mut self, threads: usize) -> Self {
        self.fault_threads = threads;
        self
    }

    /// A [`ChangeListener`] told of every change the cache's mappings make
    /// to their files' bytes, before and after it, so that a cache in front
    /// of this one (the kernel's, under a FUSE mount) drops what it holds.
    /// Default: none.
    pub fn change_listener(mut self, listener: Arc<dyn ChangeListener>) -> Self {
        self.listener = listener::Listener(Some(listener));
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
            "fault_threads",
            self.fault_threads as u64,
            1..=MAX_FAULT_THREADS as u64,
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
        // Chosen here rather than at the first hit, which would pay for it.
        crate::racy::select();
        let (readahead, requests) = readahead_queue(self.readahead_threads, self.readahead_mode);
        let settings = Settings {
            budget_pages: pages,
            strategy: self.strategy,
            fill_batch_pages: self.fill_batch_pages,
            eviction: self.eviction,
            dirty_background_pages,
            writeback_interval: self.writeback_interval,
            fault_threads: self.fault_threads,
            listener: self.listener,
        };
        let cache = PageCache {
            shared: Arc::new(CacheShared::new(settings, readahead)),
            files: Arc::default(),
        };
        let shared = Arc::downgrade(&cache.shared);
        requests.serve(move |id, first, pages| {
            let Some(cache) = shared.upgrade() else {
                return;
            };
            if let Some(mapping) = cache.mapping(id) {
                mapping.fill_ahead(first, pages);
            };
        })?;
        // Under a model checker the cache runs no thread of its own: the
        // checker cannot schedule a thread it did not start.
        #[cfg(not(any(loom, shuttle)))]
        {
            let (shared, interval) = (Arc::downgrade(&cache.shared), self.writeback_interval);
            std::thread::Builder::new()
                .name("fm-writeback".into())
                .stack_size(256 << 10)
                .spawn(move || background_writeback(shared, interval))?;
        }
        Ok(cache)
    }
}

impl PageCache {
    /// Settings for a new cache.
    pub fn builder() -> PageCacheBuilder {
        PageCacheBuilder::default()
    }

    /// Opens a mapping of the file behind `backend`: its cached pages, coherence
    /// lock and size.
    ///
    /// A backend with a [`FileIdentity`](crate::FileIdentity) (volume files
    /// and host files have one) gets the mapping its file already has in this
    /// cache, if it is open: every open of one file shares one mapping, and
    /// the first backend serves them all. If the file was open before and its
    /// pages are still cached, and it has not changed since (its version is
    /// the same), the new mapping starts with them: reopening a file costs no
    /// read. A backend without one gets a mapping of its own, whose pages go
    /// when it does: open such a file once and share the returned `Arc`, since
    /// two mappings of one file would be two caches that do not see each other.
    ///
    /// Opening costs no descriptor, view or thread: a mapping takes room in the
    /// cache's one memfd with its first cached page, and gives it back when its
    /// last page goes and no memory map of it exists. No userfaultfd or
    /// thread is involved until the cache's first map (see
    /// [`PageCacheBuilder::fault_threads`]).
    pub fn open(&self, backend: Arc<dyn Backend>) -> io::Result<Arc<Mapping>> {
        self.files.open(&self.shared, backend)
    }

    /// The mapping `backend`'s file has in this cache while it is open (see
    /// [`PageCache::open`]), without opening it: `None` if the file is not
    /// open or the backend has no [`FileIdentity`](crate::FileIdentity). A
    /// file system asks it for a file's size, which an open mapping knows
    /// before its backend does.
    pub fn find(&self, backend: &dyn Backend) -> io::Result<Option<Arc<Mapping>>> {
        self.files.find(backend)
    }

    /// Writes back every dirty page of every file of the cache, waits for
    /// writeback already under way, and makes each file durable in its
    /// backend, as [`Mapping::sync_all`] does for one: what a file system
    /// calls at unmount before it commits its volume. A mapping writes back
    /// when its last handle is dropped, but another thread may hold it for a
    /// moment then (a background writeback), and the drop then happens there,
    /// later; this call does not depend on who drops last: it syncs every file
    /// still open, and waits for the drops under way on other threads (their
    /// data is then in their backends, which the caller's commit or `syncfs`
    /// makes durable). Every file is synced even if one fails; the first
    /// failure is returned.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("log")?))?;
    /// file.write_all_at(b"entry", 0)?;
    /// cache.sync_all()?; // the data is in the volume...
    /// volume.sync()?; // ...and committed with its metadata
    /// assert_eq!(file.cached_pages(), (1, 0)); // cached, none dirty
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn sync_all(&self) -> io::Result<()> {
        let mut outcome = Ok(());
        self.shared.for_each_mapping(|mapping| {
            let synced = mapping.sync_all();
            if outcome.is_ok() {
                outcome = synced;
            }
        });
        self.shared.wait_for_closing();
        outcome
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
        let (mut dirty_pages, mut index_bytes) = (0, 0);
        shared.for_each_mapping(|mapping| {
            dirty_pages += mapping.dirty_pages();
            index_bytes += mapping.index_bytes();
        });
        let metadata_bytes = shared.queue_bytes() + index_bytes;
        let page = PAGE_SIZE as u64;
        // Unpins summed after pins: a pin given back between the two sums is
        // then not counted as held, while one taken between is not counted.
        let pins = counters.pins.sum();
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
            store_views: shared.arena.views() as u64,
            closed_files: self.files.closed_files(),
            reopened: load(&counters.reopened),
            pins_held: pins.saturating_sub(counters.unpins.sum()),
            pins,
            pin_waits: load(&counters.pin_waits),
        }
    }
}
