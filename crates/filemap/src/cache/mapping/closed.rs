//! Files by identity: one mapping per open file, and the pages of closed
//! files kept for their next open, as the kernel's page cache outlives a
//! `close`.
//!
//! A backend with a [`FileIdentity`](crate::FileIdentity) is entered in its
//! cache's [`OpenFiles`] under the identity's `file`: every open of the same
//! file gets the same mapping while it is open. When its last handle goes,
//! the mapping writes its dirty pages back and, if that worked and pages are
//! left, hands them to a [`ClosedFile`] under the same id in the eviction
//! queue, with the version the backend reports then. The next open of the
//! file takes them over if the version is unchanged, or drops them. A closed
//! file's pages are all clean, so evicting one never writes; its last
//! eviction gives its regions back and takes it out of the table.
//!
//! Locks: the table's, then the registry's (`CacheShared::register`). A
//! closed file's `kept` is a leaf: nothing else is locked while it is held,
//! because the eviction hand locks it under the queue's and the registry's.

use rustc_hash::FxHashMap as HashMap;
use std::io;
use std::sync::{Arc, Weak};

use super::drop::visit_page;
use super::Mapping;
use crate::backend::Backend;
use crate::cache::evict::Visit;
use crate::cache::shared::{CacheShared, CachedFile, Eviction};
use crate::cache::stats;
use crate::cache::store::PageStore;
use crate::cache::tree::PageTree;
use crate::sync::Mutex;

/// A cache's files by the `file` of their identity.
#[derive(Default)]
pub(in crate::cache) struct OpenFiles {
    table: Mutex<HashMap<u128, Entry>>,
}

enum Entry {
    /// Open: every open of the file gets this mapping. A dead one is going
    /// away: its entry changes when it has written back and kept its pages.
    Open(Weak<Mapping>),
    /// Closed, with the pages it kept.
    Closed(Arc<ClosedFile>),
}

/// The pages a mapping left when its last handle went, where they lie, and
/// its id in the eviction queue, which they keep.
pub(super) struct Kept {
    pub(super) id: u32,
    /// The file's size then: still its size while the version is the same.
    pub(super) size: u64,
    pub(super) pages: PageTree,
    pub(super) store: PageStore,
    /// Pages of the budget held: one per present page.
    pub(super) held: u64,
    /// The file's version when they were kept.
    pub(super) version: u128,
}

/// A closed file's kept pages, evictable like any others, until its next open
/// takes them.
pub(super) struct ClosedFile {
    cache: Arc<CacheShared>,
    files: Weak<OpenFiles>,
    file: u128,
    /// `None` once taken by an open, or emptied by eviction.
    kept: Mutex<Option<Kept>>,
}

impl OpenFiles {
    /// The mapping of `backend`'s file in `cache` (see [`crate::PageCache::open`]).
    pub(in crate::cache) fn open(
        self: &Arc<Self>,
        cache: &Arc<CacheShared>,
        backend: Arc<dyn Backend>,
    ) -> io::Result<Arc<Mapping>> {
        let Some(identity) = backend.identity()? else {
            let size = backend.len()?;
            return Ok(Mapping::new(cache, self, backend, size, None, None));
        };
        loop {
            let mut table = self.table.lock();
            let kept = match table.get(&identity.file) {
                Some(Entry::Open(mapping)) => match mapping.upgrade() {
                    Some(mapping) => return Ok(mapping),
                    None => {
                        // Its last handle is going: wait until its dirty pages
                        // are written back, so this open reads what they wrote.
                        drop(table);
                        pause();
                        continue;
                    }
                },
                Some(Entry::Closed(_)) => match table.remove(&identity.file) {
                    Some(Entry::Closed(closed)) => closed.take(identity.version),
                    _ => unreachable!("just seen closed"),
                },
                None => None,
            };
            let size = match &kept {
                Some(kept) => {
                    stats::add(&cache.counters.reopened, 1);
                    kept.size
                }
                None => backend.len()?,
            };
            let mapping = Mapping::new(cache, self, backend, size, Some(identity.file), kept);
            table.insert(identity.file, Entry::Open(Arc::downgrade(&mapping)));
            return Ok(mapping);
        }
    }

    /// The mapping of `backend`'s file while it is open (see
    /// [`crate::PageCache::find`]).
    pub(in crate::cache) fn find(&self, backend: &dyn Backend) -> io::Result<Option<Arc<Mapping>>> {
        let Some(identity) = backend.identity()? else {
            return Ok(None);
        };
        Ok(match self.table.lock().get(&identity.file) {
            Some(Entry::Open(mapping)) => mapping.upgrade(),
            _ => None,
        })
    }

    /// Called by `mapping`, going away or removed: its entry goes, or becomes
    /// `closed` if its pages are kept.
    pub(super) fn closed(
        &self,
        file: u128,
        mapping: *const Mapping,
        closed: Option<Arc<ClosedFile>>,
    ) {
        let mut table = self.table.lock();
        let ours = matches!(table.get(&file), Some(Entry::Open(open)) if open.as_ptr() == mapping);
        if !ours {
            return;
        }
        match closed {
            Some(closed) => table.insert(file, Entry::Closed(closed)),
            None => table.remove(&file),
        };
    }

    /// How many closed files keep pages.
    pub(in crate::cache) fn closed_files(&self) -> u64 {
        let table = self.table.lock();
        table
            .values()
            .filter(|entry| matches!(entry, Entry::Closed(_)))
            .count() as u64
    }

    /// Takes `closed` out of the table if it is there (it kept nothing more).
    fn forget(&self, closed: &ClosedFile) {
        let mut table = self.table.lock();
        let ours =
            matches!(table.get(&closed.file), Some(Entry::Closed(c)) if std::ptr::eq(&**c, closed));
        if ours {
            table.remove(&closed.file);
        }
    }
}

impl ClosedFile {
    /// A closed file of `file` keeping `kept`, registered in the eviction
    /// queue under the id of its mapping, which is going away.
    pub(super) fn new(
        cache: &Arc<CacheShared>,
        files: &Arc<OpenFiles>,
        file: u128,
        kept: Kept,
    ) -> Arc<ClosedFile> {
        let id = kept.id;
        let closed = Arc::new(ClosedFile {
            cache: cache.clone(),
            files: Arc::downgrade(files),
            file,
            kept: Mutex::new(Some(kept)),
        });
        cache.register(id, Arc::downgrade(&closed) as Weak<dyn CachedFile>);
        closed
    }

    /// The kept pages, for an open of the file at `version`; dropped if the
    /// file changed since.
    fn take(&self, version: u128) -> Option<Kept> {
        let kept = self.kept.lock().take()?;
        if version == kept.version {
            return Some(kept);
        }
        self.discard(kept);
        None
    }

    /// Gives `kept`'s pages and regions back, and its id.
    fn discard(&self, kept: Kept) {
        self.cache.budget.release_pages(kept.held);
        self.cache.unregister(kept.id);
        // Its store gives the regions back as it drops.
    }
}

impl Drop for ClosedFile {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.get_mut().take() {
            self.discard(kept);
        }
    }
}

/// The eviction hand reaches a closed file's pages through this; the rest of
/// the cache-wide work has nothing to do there.
impl CachedFile for ClosedFile {
    fn eviction_visit(&self, index: u64) -> Visit {
        match &*self.kept.lock() {
            Some(kept) => visit_page(&kept.pages, index),
            // Being handed its pages, or just emptied.
            None => Visit::Keep,
        }
    }

    fn evict_page(&self, index: u64) -> Eviction {
        let mut guard = self.kept.lock();
        let Some(kept) = guard.as_mut() else {
            return Eviction::Absent;
        };
        let Some(slot) = kept.pages.get(index) else {
            return Eviction::Absent;
        };
        let state = slot.load();
        if !state.is_present() {
            return Eviction::Absent;
        }
        if state.is_busy() || slot.try_lock(state).is_err() {
            return Eviction::Busy;
        }
        debug_assert!(!state.is_dirty(), "a closed file's pages are clean");
        if kept.store.remove(index, 1).is_err() {
            slot.unlock();
            return Eviction::Failed;
        }
        slot.empty();
        self.cache.budget.release();
        kept.held -= 1;
        stats::add(&self.cache.counters.evictions, 1);
        if kept.held == 0 {
            let emptied = guard.take().expect("just seen");
            drop(guard);
            self.cache.unregister(emptied.id);
            drop(emptied);
            if let Some(files) = self.files.upgrade() {
                files.forget(self);
            }
        }
        Eviction::Evicted
    }

    fn write_back_in_background(&self) {}

    fn sync_all(&self) -> std::io::Result<()> {
        Ok(()) // a closed file's pages are clean
    }

    fn fill_ahead(&self, _first: u64, _pages: u64) {}

    fn dirty_pages(&self) -> u64 {
        0
    }

    fn index_bytes(&self) -> usize {
        self.kept
            .lock()
            .as_ref()
            .map_or(0, |kept| kept.pages.allocated_bytes())
    }
}

/// Lets a mapping whose last handle is going finish: a short sleep, or under
/// a model checker a yield.
fn pause() {
    #[cfg(not(any(loom, shuttle)))]
    std::thread::sleep(std::time::Duration::from_micros(50));
    #[cfg(any(loom, shuttle))]
    crate::sync::thread::yield_now();
}
