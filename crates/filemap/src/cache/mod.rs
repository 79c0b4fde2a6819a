//! The page cache: frame memory shared by every [`Mapping`], under one budget.

use std::io;
use std::sync::Arc;

use crate::backend::Backend;
use crate::lock::Strategy;

mod mapping;
pub(crate) mod page;
mod store;
mod tree;
mod wait;

pub use mapping::Mapping;

use store::Budget;

/// The size of a page: the unit of caching, filling and invalidation.
pub const PAGE_SIZE: usize = 4096;

/// The alignment of buffer addresses for direct I/O (a logical sector). Offsets
/// and lengths of direct I/O must be multiples of [`PAGE_SIZE`].
pub const DIRECT_IO_MEMORY_ALIGN: usize = 512;

/// What every mapping of one cache shares.
pub(crate) struct CacheShared {
    pub(crate) budget: Budget,
    pub(crate) strategy: Strategy,
    pub(crate) fill_batch_pages: usize,
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
}

impl Default for PageCacheBuilder {
    fn default() -> Self {
        PageCacheBuilder {
            budget_bytes: 256 << 20,
            strategy: Strategy::DEFAULT,
            fill_batch_pages: 32,
        }
    }
}

impl PageCacheBuilder {
    /// The most frame memory the cache may hold, in bytes (rounded down to whole
    /// pages; at least one page). Default 256 MiB. Until eviction exists, a miss
    /// that finds the budget used up is served uncached, and a buffered write
    /// fails with `ErrorKind::OutOfMemory`.
    pub fn budget_bytes(mut self, bytes: u64) -> Self {
        self.budget_bytes = bytes;
        self
    }

    /// How the coherence lock is enforced. Default [`Strategy::Range`]
    /// ([`Strategy::DEFAULT`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The most pages one miss or readahead reads from the backend at once
    /// (default 32, at least 1).
    pub fn fill_batch_pages(mut self, pages: usize) -> Self {
        self.fill_batch_pages = pages;
        self
    }

    /// Builds the cache. Fails with `EINVAL` for a budget under one page or over
    /// 2^32 pages, or a zero batch.
    pub fn build(self) -> io::Result<PageCache> {
        let pages = self.budget_bytes / PAGE_SIZE as u64;
        if pages == 0 || pages > u32::MAX as u64 || self.fill_batch_pages == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "page cache budget must be 1 to 2^32 pages of {PAGE_SIZE} bytes and the fill batch at least 1 (got {} bytes, batch {})",
                    self.budget_bytes, self.fill_batch_pages
                ),
            ));
        }
        Ok(PageCache {
            shared: Arc::new(CacheShared {
                budget: Budget::new(pages),
                strategy: self.strategy,
                fill_batch_pages: self.fill_batch_pages,
            }),
        })
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
}
