//! The life of a mapping: opening it, removing its file, and dropping it.

use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::io;
use std::sync::{Arc, Weak};

use crate::sync::{Mutex, RwLock};

use super::drop::DirtyPages;
use super::Mapping;
use crate::backend::Backend;
use crate::cache::evict::Visit;
use crate::cache::readahead::Readahead;
use crate::cache::shared::{CacheShared, CachedFile, Eviction};
use crate::cache::store::PageStore;
use crate::cache::tree::{PageTree, MAX_PAGES};
use crate::errno::fail;
use crate::lock::{CoherenceLock, Mode};
use crate::page::PAGE;

impl Mapping {
    /// Opens a mapping of `backend`'s file in `cache` (see
    /// [`crate::PageCache::open`]).
    pub(in crate::cache) fn new(
        cache: Arc<CacheShared>,
        backend: Arc<dyn Backend>,
    ) -> io::Result<Arc<Self>> {
        let size = backend.len()?;
        let max_size = backend.max_file_size().min(MAX_PAGES * PAGE);
        let strategy = cache.strategy;
        let store = PageStore::new(max_size)?;
        let id = cache.new_mapping_id();
        let mapping = Arc::new(Mapping {
            cache,
            id,
            backend,
            pages: PageTree::default(),
            store,
            maps: RwLock::new(Vec::new()),
            scanning: Mutex::new(()),
            lock: CoherenceLock::new(strategy),
            size: AtomicU64::new(size),
            size_lock: Mutex::new(()),
            max_size,
            removed: AtomicBool::new(false),
            storage_released: AtomicBool::new(false),
            wb_err: AtomicU64::new(0),
            sync_seen: AtomicU64::new(0),
            readahead: Readahead::default(),
        });
        let cached_file: Weak<dyn CachedFile> = Arc::downgrade(&mapping) as _;
        mapping.cache.register(id, cached_file);
        Ok(mapping)
    }

    /// The names of the threads that serve the faults of this mapping's cache
    /// (none before its first map; tests watch them come and go).
    #[doc(hidden)]
    pub fn fault_thread_names(&self) -> Vec<String> {
        self.cache.faults.thread_names()
    }

    /// Removes the file from its backend: its cached pages are dropped, its
    /// storage freed, and every later call on this mapping fails with `ENOENT`.
    ///
    /// As with a file unlinked on Linux, the maps of a removed file keep
    /// working until they go: the pages they show stay cached, and the file's
    /// storage (on a volume, its name too) stays until the last map is
    /// dropped, so a map reads what it read before and its stores land.
    pub fn remove(&self) -> io::Result<()> {
        self.check_live()?;
        let _invalidate = self.lock_mode(Mode::Invalidate, 0..u64::MAX);
        if self.removed.swap(true, Ordering::AcqRel) {
            return fail(libc::ENOENT);
        }
        self.drop_pages_where(0, MAX_PAGES - 1, DirtyPages::Discard, |index| {
            !self.page_is_mapped(index)
        })?;
        // A map that goes after the check above finds `removed` set, and
        // releases the storage itself.
        if self.maps.read().is_empty() {
            self.release_storage()
        } else {
            Ok(())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Dropping the mapping drops its pages: write back what is dirty (call
        // `sync_all` first to see errors), and give the budget back.
        self.cache.unregister(self.id);
        if self.removed.load(Ordering::Acquire) {
            let _ = self.release_storage();
        } else {
            let _ = self.write_back_range(0, MAX_PAGES - 1);
        }
        let _ = self.drop_pages(0, MAX_PAGES - 1, DirtyPages::Discard);
    }
}

/// The cache-wide work reaches the mapping through this (see
/// [`CachedFile`]), so the cache's floor needs nothing of the mapping's.
impl CachedFile for Mapping {
    fn eviction_visit(&self, index: u64) -> Visit {
        Mapping::eviction_visit(self, index)
    }

    fn evict_page(&self, index: u64) -> Eviction {
        Mapping::evict_page(self, index)
    }

    fn write_back_in_background(&self) {
        Mapping::write_back_in_background(self);
    }

    fn fill_ahead(&self, first: u64, pages: u64) {
        Mapping::fill_ahead(self, first, pages);
    }

    fn dirty_pages(&self) -> u64 {
        Mapping::dirty_pages(self)
    }

    fn index_bytes(&self) -> usize {
        Mapping::index_bytes(self)
    }
}
