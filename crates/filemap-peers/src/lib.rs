//! The caches a Rust storage engine would reach for instead of filemap, each
//! a read-through page cache keyed by (file, page), written the way its
//! documentation recommends: the loading call that coalesces concurrent
//! misses of one key, and `remove` of every key of a range after the backend
//! changed. filemap's torture runs them under its oracle, and its benchmarks
//! beside its strategies.
//!
//! | peer | version | loading call | removal |
//! |---|---|---|---|
//! | [`Peer::Moka`] | moka 0.12.16 (`moka::sync::Cache`) | `get_with` | `invalidate` |
//! | [`Peer::QuickCache`] | quick_cache 0.7.0 (`quick_cache::sync::Cache`) | `get_or_insert_with` | `remove` |
//! | [`Peer::Foyer`] | foyer-memory 0.22.3 (`foyer_memory::Cache`, foyer's in-memory cache) | `get`, then `get_or_fetch` on a miss | `remove` |
//!
//! foyer's `get_or_fetch` must be called inside a Tokio runtime: each thread
//! that misses enters a current-thread runtime of its own (a hit needs none).
//! The `foyer` crate itself always brings its disk cache along (io_uring,
//! compression); `foyer-memory` is the in-memory cache alone.
//!
//! ```
//! use std::sync::Arc;
//! use filemap_peers::{Page, PageKey, Peer, PageSource};
//!
//! struct Numbered;
//! impl PageSource for Numbered {
//!     fn load(&self, (_file, page): PageKey) -> std::io::Result<Page> {
//!         Ok(Arc::new([page as u8; filemap_peers::PAGE_SIZE]))
//!     }
//! }
//! for peer in Peer::ALL {
//!     let cache = peer.build(64, Arc::new(Numbered));
//!     assert_eq!(cache.get((0, 7))?[0], 7);
//!     cache.remove((0, 7));
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;

/// The bytes of a page.
pub const PAGE_SIZE: usize = 4096;

/// A page of a file: (file, page index).
pub type PageKey = (u32, u64);

/// A cached page: the peers hand out shared references to immutable pages.
pub type Page = Arc<[u8; PAGE_SIZE]>;

/// A new page, its bytes read by `read`.
pub fn read_page(read: impl FnOnce(&mut [u8]) -> io::Result<()>) -> io::Result<Page> {
    let mut page = Arc::new([0u8; PAGE_SIZE]);
    read(Arc::get_mut(&mut page).expect("a page no one else holds yet"))?;
    Ok(page)
}

/// Where a peer loads a page it misses from (a backend's `pread`).
pub trait PageSource: Send + Sync + 'static {
    /// Reads page `key` from the backend.
    fn load(&self, key: PageKey) -> io::Result<Page>;
}

/// A peer cache, as filemap's torture and benchmarks drive it.
pub trait PeerCache: Send + Sync {
    /// Page `key`: the cached one, or loaded from the source, once for all
    /// the concurrent misses of the key.
    fn get(&self, key: PageKey) -> io::Result<Page>;

    /// Removes page `key`, after its backend changed.
    fn remove(&self, key: PageKey);

    /// Removes every page of `file` that bytes `offset..offset + len` touch,
    /// after the backend changed them.
    fn remove_range(&self, file: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let page = PAGE_SIZE as u64;
        for index in offset / page..=(offset + len - 1) / page {
            self.remove((file, index));
        }
    }
}

/// The peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `moka::sync::Cache`.
    Moka,
    /// `quick_cache::sync::Cache`.
    QuickCache,
    /// `foyer_memory::Cache`.
    Foyer,
}

impl Peer {
    /// Every peer.
    pub const ALL: [Peer; 3] = [Peer::Moka, Peer::QuickCache, Peer::Foyer];

    /// The name the command line and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Moka => "moka",
            Peer::QuickCache => "quick_cache",
            Peer::Foyer => "foyer",
        }
    }

    /// The crate and its exact version.
    pub fn version(self) -> &'static str {
        match self {
            Peer::Moka => "moka 0.12.16",
            Peer::QuickCache => "quick_cache 0.7.0",
            Peer::Foyer => "foyer-memory 0.22.3",
        }
    }

    /// The peer named `name`, if one is.
    pub fn from_name(name: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|peer| peer.name() == name)
    }

    /// A cache of at most `capacity` pages, loading from `source`.
    pub fn build(self, capacity: u64, source: Arc<dyn PageSource>) -> Box<dyn PeerCache> {
        match self {
            Peer::Moka => Box::new(Moka {
                cache: moka::sync::Cache::new(capacity),
                source,
            }),
            Peer::QuickCache => Box::new(QuickCache {
                cache: quick_cache::sync::Cache::new(capacity as usize),
                source,
            }),
            Peer::Foyer => Box::new(Foyer {
                cache: foyer_memory::CacheBuilder::new(capacity as usize).build(),
                source,
            }),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

struct Moka {
    cache: moka::sync::Cache<PageKey, Page>,
    source: Arc<dyn PageSource>,
}

impl PeerCache for Moka {
    fn get(&self, key: PageKey) -> io::Result<Page> {
        self.cache
            .try_get_with(key, || self.source.load(key))
            .map_err(|error| io::Error::new(error.kind(), error.to_string()))
    }

    fn remove(&self, key: PageKey) {
        self.cache.invalidate(&key);
    }
}

struct QuickCache {
    cache: quick_cache::sync::Cache<PageKey, Page>,
    source: Arc<dyn PageSource>,
}

impl PeerCache for QuickCache {
    fn get(&self, key: PageKey) -> io::Result<Page> {
        self.cache
            .get_or_insert_with(&key, || self.source.load(key))
    }

    fn remove(&self, key: PageKey) {
        self.cache.remove(&key);
    }
}

struct Foyer {
    cache: foyer_memory::Cache<PageKey, Page>,
    source: Arc<dyn PageSource>,
}

thread_local! {
    /// The runtime foyer's `get_or_fetch` needs, one per thread that misses.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
}

impl PeerCache for Foyer {
    fn get(&self, key: PageKey) -> io::Result<Page> {
        if let Some(entry) = self.cache.get(&key) {
            return Ok(entry.value().clone());
        }
        let source = self.source.clone();
        // Called inside the runtime, not only awaited there: it looks the
        // runtime up when called.
        let entry = RUNTIME.with(|runtime| {
            runtime.block_on(async {
                self.cache
                    .get_or_fetch(&key, move || async move { source.load(key) })
                    .await
            })
        });
        entry
            .map(|entry| entry.value().clone())
            .map_err(|error| io::Error::other(error.to_string()))
    }

    fn remove(&self, key: PageKey) {
        self.cache.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    /// Pages of one byte, `version`, counting its loads; a load takes
    /// `delay`.
    struct Versioned {
        version: AtomicU64,
        loads: AtomicU64,
        delay: Duration,
    }

    impl PageSource for Versioned {
        fn load(&self, _key: PageKey) -> io::Result<Page> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let version = self.version.load(Ordering::SeqCst) as u8;
            std::thread::sleep(self.delay);
            Ok(Arc::new([version; PAGE_SIZE]))
        }
    }

    fn source(delay: Duration) -> Arc<Versioned> {
        Arc::new(Versioned {
            version: AtomicU64::new(1),
            loads: AtomicU64::new(0),
            delay,
        })
    }

    #[test]
    fn each_peer_loads_a_miss_once_for_all_who_wait_on_it_and_reloads_after_a_remove() {
        for peer in Peer::ALL {
            let source = source(Duration::from_millis(50));
            let cache = peer.build(16, source.clone());
            let barrier = Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        barrier.wait();
                        assert_eq!(cache.get((1, 2)).unwrap()[0], 1, "{peer}");
                    });
                }
            });
            assert_eq!(source.loads.load(Ordering::SeqCst), 1, "{peer}");
            source.version.store(2, Ordering::SeqCst);
            assert_eq!(cache.get((1, 2)).unwrap()[0], 1, "{peer}: cached");
            cache.remove((1, 2));
            assert_eq!(cache.get((1, 2)).unwrap()[0], 2, "{peer}: reloaded");
        }
    }

    #[test]
    fn remove_range_removes_exactly_the_pages_its_bytes_touch() {
        for peer in Peer::ALL {
            let source = source(Duration::ZERO);
            let cache = peer.build(64, source.clone());
            for index in 0..8 {
                cache.get((3, index)).unwrap();
                cache.get((4, index)).unwrap();
            }
            source.version.store(2, Ordering::SeqCst);
            // Bytes 4095..8193 touch pages 0, 1 and 2 of file 3; none of 4.
            cache.remove_range(3, 4095, 4098);
            cache.remove_range(3, 6 * PAGE_SIZE as u64, 0);
            for index in 0..8 {
                let reloaded = index <= 2;
                assert_eq!(
                    cache.get((3, index)).unwrap()[0],
                    1 + reloaded as u8,
                    "{peer}: {index}"
                );
                assert_eq!(
                    cache.get((4, index)).unwrap()[0],
                    1,
                    "{peer}: file 4, {index}"
                );
            }
        }
    }

    #[test]
    fn a_load_error_reaches_the_caller_and_caches_nothing() {
        struct Failing;
        impl PageSource for Failing {
            fn load(&self, _key: PageKey) -> io::Result<Page> {
                Err(io::Error::other("the backend failed"))
            }
        }
        for peer in Peer::ALL {
            let cache = peer.build(16, Arc::new(Failing));
            let error = cache.get((0, 0)).unwrap_err();
            assert!(
                error.to_string().contains("the backend failed"),
                "{peer}: {error}"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for peer in Peer::ALL {
            assert_eq!(Peer::from_name(peer.name()), Some(peer));
        }
        assert_eq!(Peer::from_name("range"), None);
    }
}
