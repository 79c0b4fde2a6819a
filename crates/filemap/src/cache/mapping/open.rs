//! The life of a mapping: opening it, removing its file, and dropping it.

use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::io;
use std::sync::{Arc, Weak};

use crate::sync::{Mutex, RwLock};

use super::closed::{ClosedFile, Kept, OpenFiles};
use super::drop::DirtyPages;
use super::Mapping;
use crate::backend::Backend;
use crate::cache::evict::Visit;
use crate::cache::faults::ServesFaults;
use crate::cache::readahead::Readahead;
use crate::cache::shared::{CacheShared, CachedFile, Closing, Eviction};
use crate::cache::store::PageStore;
use crate::cache::tree::{PageTree, MAX_PAGES};
use crate::errno::fail;
use crate::lock::{CoherenceLock, Mode};
use crate::page::PAGE;

impl Mapping {
    /// A mapping of `backend`'s file, of `size` bytes, in `cache`, entered in
    /// `files` by the caller if the file has an identity (`file`), starting
    /// with the pages `kept` when it was last closed.
    pub(super) fn new(
        cache: &Arc<CacheShared>,
        files: &Arc<OpenFiles>,
        backend: Arc<dyn Backend>,
        size: u64,
        file: Option<u128>,
        kept: Option<Kept>,
    ) -> Arc<Self> {
        let max_size = backend.max_file_size().min(MAX_PAGES * PAGE);
        let strategy = cache.strategy;
        let (id, pages, store, held) = match kept {
            Some(kept) => (kept.id, kept.pages, Some(kept.store), kept.held),
            None => (cache.new_mapping_id(), PageTree::default(), None, 0),
        };
        let mapping = Arc::new_cyclic(|me| {
            let owner = me.clone() as Weak<dyn ServesFaults>;
            Mapping {
                store: match store {
                    Some(mut store) => {
                        store.set_owner(owner);
                        store
                    }
                    None => PageStore::new(cache.arena.clone(), owner),
                },
                cache: cache.clone(),
                id,
                backend,
                file,
                files: files.clone(),
                pages,
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
                held: AtomicU64::new(held),
            }
        });
        let cached_file: Weak<dyn CachedFile> = Arc::downgrade(&mapping) as _;
        mapping.cache.register(id, cached_file);
        mapping
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
        // Later opens of the file get a mapping of their own.
        if let Some(file) = self.file {
            self.files.closed(file, self, None);
        }
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
        // The last handle is going: write back what is dirty (call `sync_all`
        // first to see errors), then keep the clean pages for the file's next
        // open if it has an identity, or drop them and give the budget back.
        // Until the eviction queue's entry changes, the eviction hand keeps
        // this mapping's pages in the queue (see `CacheShared::reclaim`).
        let cache = self.cache.clone();
        let _closing = Closing::new(&cache);
        let closed = if self.removed.load(Ordering::Acquire) {
            let _ = self.release_storage();
            None
        } else {
            let written = self.write_back_range(0, MAX_PAGES - 1);
            written.ok().and_then(|()| self.keep_pages())
        };
        if closed.is_none() {
            self.cache.unregister(self.id);
            let _ = self.drop_pages(0, MAX_PAGES - 1, DirtyPages::Discard);
        }
        if let Some(file) = self.file {
            self.files.closed(file, self, closed);
        }
    }
}

impl Mapping {
    /// Hands the pages to a closed file of the backend's file (registered
    /// under this mapping's id), if it has an identity, pages are cached and
    /// all of them were written back. Only while the mapping drops: no other
    /// thread can reach it.
    fn keep_pages(&mut self) -> Option<Arc<ClosedFile>> {
        let file = self.file?;
        let held = self.held.load(Ordering::Relaxed);
        if held == 0 {
            return None;
        }
        // No map is left to dirty a page since the writeback.
        debug_assert_eq!(self.dirty_pages(), 0, "written back");
        // Read after the writeback: the version the pages match.
        let identity = self.backend.identity().ok().flatten()?;
        if identity.file != file {
            return None;
        }
        let detached = PageStore::new(self.cache.arena.clone(), Weak::<Mapping>::new());
        self.held.store(0, Ordering::Relaxed);
        let kept = Kept {
            id: self.id,
            size: self.size.load(Ordering::Relaxed),
            pages: std::mem::take(&mut self.pages),
            store: std::mem::replace(&mut self.store, detached),
            held,
            version: identity.version,
        };
        Some(ClosedFile::new(&self.cache, &self.files, file, kept))
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

    fn sync_all(&self) -> io::Result<()> {
        Mapping::sync_all(self)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::page::{PAGE, PAGE_SIZE};
    use crate::{MapAccess, Mapping, MemDevice, PageCache, Volume};

    /// A cache and a synced file of `pages` pages, page `i` filled with `i + 1`.
    fn cached_file(pages: u64) -> (PageCache, Arc<Mapping>) {
        let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).expect("format");
        let cache = PageCache::builder().build().expect("cache");
        let file = cache
            .open(Arc::new(volume.create_file("f").expect("create")))
            .expect("open");
        for i in 0..pages {
            file.write_all_at(&[i as u8 + 1; PAGE_SIZE], i * PAGE)
                .expect("write");
        }
        file.sync_all().expect("sync");
        (cache, file)
    }

    fn page(file: &Mapping, index: u64) -> Vec<u8> {
        let mut buf = vec![0; PAGE_SIZE];
        file.read_exact_at(&mut buf, index * PAGE).expect("read");
        buf
    }

    /// An idle open file costs no region; one whose pages all went gives its
    /// regions back, unless a map still shows them.
    #[test]
    fn regions_go_with_the_last_page_and_the_last_map() {
        let (cache, file) = cached_file(8);
        let views = cache.stats().store_views;
        assert_eq!(file.store.regions(), 1);
        file.invalidate_range(0, 8 * PAGE).expect("invalidate");
        assert_eq!(file.store.regions(), 0, "no page left, no map: regions go");
        assert_eq!(page(&file, 3), vec![4; PAGE_SIZE], "filled again afresh");
        assert_eq!(file.store.regions(), 1);

        let map = file.map(0, 8 * PAGE_SIZE, MapAccess::Read).expect("map");
        file.invalidate_range(0, 8 * PAGE).expect("invalidate");
        assert_eq!(file.store.regions(), 1, "a map keeps its regions");
        let mut buf = vec![0; PAGE_SIZE];
        map.read(5 * PAGE_SIZE, &mut buf).expect("map read");
        assert_eq!(buf, vec![6; PAGE_SIZE]);
        drop(map);
        file.invalidate_range(0, 8 * PAGE).expect("invalidate");
        assert_eq!(file.store.regions(), 0, "the last map gone: regions go");
        assert_eq!(
            cache.stats().store_views,
            views,
            "regions reused, no new view"
        );

        // A mapping of its own: a backend with no identity shares none.
        let own = crate::FaultyBackend::new(file.backend().clone(), 1);
        let idle = cache.open(Arc::new(own)).expect("second mapping");
        assert_eq!(idle.store.regions(), 0, "opening takes no region");
    }

    /// A page the arena holds in a hole of the file before its first map (a
    /// zero page an optimistic reader's touch left there) must go at the first
    /// map: otherwise the map would read it instead of faulting the file's data.
    #[test]
    #[allow(unsafe_code)]
    fn a_page_left_in_a_hole_before_the_first_map_is_removed() {
        let (_cache, file) = cached_file(8);
        file.invalidate_range(2 * PAGE, 2 * PAGE)
            .expect("invalidate");
        file.store
            .plant(3, &[0xee; PAGE_SIZE])
            .expect("plant a stray page");
        let map = file.map(0, 8 * PAGE_SIZE, MapAccess::Read).expect("map");
        // A plain load, as a program reads its map (`MapRegion::read` would
        // wait for ever for the page the stray hides from faults).
        // SAFETY: page 3 lies inside the live map, inside the file; a touch of
        // an absent page faults into the cache, which fills it.
        let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(3 * PAGE_SIZE)) };
        assert_eq!(byte, 4, "the map read the stray page");
        assert_eq!(page(&file, 3), vec![4; PAGE_SIZE]);
    }

    /// The regions a reopened file takes over from its closed self must send
    /// their faults to the new mapping: a touch of a hole through the cache's
    /// own view (as an optimistic reader's) then fills the page. Sent to the
    /// closed mapping, it would get a zero page, which a map reads as data.
    /// Two ways in: a file mapped before its close (its regions are routed
    /// when it is reopened), and one first mapped after its reopen, in a cache
    /// whose faults are trapped already (routed at that first map).
    #[test]
    #[allow(unsafe_code)]
    fn a_reopened_files_regions_fault_into_the_new_mapping() {
        let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).expect("format");
        let cache = PageCache::builder().build().expect("cache");
        let open = |name: &str| {
            let file = volume.open_file(name).expect("open file");
            cache.open(Arc::new(file)).expect("open")
        };
        for name in ["mapped before", "mapped after"] {
            let file = cache
                .open(Arc::new(volume.create_file(name).expect("create")))
                .expect("open");
            for i in 0..8 {
                file.write_all_at(&[i as u8 + 1; PAGE_SIZE], i * PAGE)
                    .expect("write");
            }
        }
        let file = open("mapped before");
        drop(file.map(0, 8 * PAGE_SIZE, MapAccess::Read).expect("map"));
        // A fault thread may hold the mapping a moment longer: wait, so that
        // the next open reopens it.
        let weak = Arc::downgrade(&file);
        drop(file);
        while weak.strong_count() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let file = open("mapped after");
        drop(file);
        for name in ["mapped before", "mapped after"] {
            let reopened = cache.stats().reopened;
            let file = open(name);
            assert_eq!(cache.stats().reopened, reopened + 1, "{name}: pages kept");
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::Read).expect("map");
            file.invalidate_range(6 * PAGE, PAGE).expect("invalidate");
            let mut touched = vec![0; PAGE_SIZE];
            file.store.read(6, 0, &mut touched);
            // SAFETY: page 6 lies inside the live map, inside the file; a
            // touch of an absent page faults into the cache, which fills it.
            let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(6 * PAGE_SIZE)) };
            assert_eq!(byte, 7, "{name}: the map read a zero page the touch left");
        }
    }
}
