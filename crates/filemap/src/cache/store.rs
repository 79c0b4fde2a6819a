//! Where the cached pages live, and the budget they are counted in.
//!
//! All the pages of one cache live in one memfd, the arena. Each mapping's
//! pages lie in regions of it, one per chunk of file offsets: chunk 0 and
//! chunk 1 hold 2 MiB of the file each, and every chunk after holds twice the
//! one before, so a file of any size needs at most a few dozen regions and a
//! small file one. Inside a region, pages lie at their offset in the chunk.
//! The user's memory maps are `MAP_SHARED` views of the regions, laid side by
//! side in file order, so a page is one physical page whether it is read with
//! `read_at`, written with `write_at` or touched through any map, and a hole
//! punched in the arena zaps it from every map at once (the kernel's
//! `unmap_mapping_range`).
//!
//! The cache reaches the arena through views of its own: one per gigabyte
//! slab, from which regions of a gigabyte or less are cut (buddy style), and
//! one per larger region. So the whole cache costs one descriptor and a few
//! views, however many files are open: a mapping takes its first region with
//! its first page, and gives every region back when its last page goes and no
//! map of it exists ([`PageStore::release_if_empty`]).
//!
//! The arena's views are never unmapped while the cache lives: an optimistic
//! reader that loaded a page's state before the page was dropped and its region
//! given back may still touch it, and must find memory there. Its copy is
//! discarded by validation; at worst it leaves a zero page in a region that is
//! free or now another mapping's, where it is harmless (below).
//!
//! Until the file is first mapped, no userfaultfd is involved: pages enter the
//! arena by `pwrite` (no map can see one half written, and optimistic readers
//! read only published pages). An optimistic reader that races a drop may then
//! touch the hole, which allocates a zero page there; the reader gives it back
//! (see `Mapping::read_hit`), a later install overwrites it anyway, and a region
//! is emptied whenever it is given out or back.
//!
//! From the cache's first map on ([`Arena::trap_faults`]), every view of the
//! arena is registered with the cache's userfaultfd for MISSING faults:
//! touching an absent page never allocates a zero page behind the cache's back
//! (which would hide the page from MISSING faults, and a map would read zeroes
//! for data); it faults into the cache's fault service, which sends it to the
//! region's owner, which fills the page under the coherence lock (a touch of a
//! free region gets zeroes, see `cache/faults.rs`). From a file's first map on
//! ([`PageStore::trap_faults`]), its pages enter the arena only by
//! `UFFDIO_COPY`, which installs a whole page atomically, so no map sees one
//! half written.
//!
//! The arena is sized far past every region, so the cache's views can never
//! raise `SIGBUS`: an optimistic reader that loaded a page's state before a
//! truncate may touch the page after it. The mapping serves that fault with a
//! cached page of zeroes, the file's content past its end (the reader's copy
//! is discarded by validation anyway).
//!
//! # Safety
//! Copies in and out of the views race by design (optimistic readers, stores
//! through user maps), so they go through [`crate::racy`]. The arena's views
//! stay mapped for the cache's whole life, and every region address a store
//! hands out lies in one of them, so every address computed here is valid to
//! access; a page that is absent when it is touched is served by the fault
//! service, not by a signal.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Weak};

use super::faults::{FaultService, ServesFaults};
use crate::map::memfd::{Memfd, View};
use crate::map::uffd::Userfaultfd;
use crate::page::{PAGE, PAGE_SIZE};
use crate::racy::copy_racy;
use crate::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Mutex, OnceLock, RwLock};

/// Pages of chunks 0 and 1 (2 MiB); chunk `k > 1` holds twice chunk `k - 1`.
const FIRST_CHUNK_SHIFT: u32 = 9;
const FIRST_CHUNK_PAGES: u64 = 1 << FIRST_CHUNK_SHIFT;
/// Chunks a file of [`MAX_PAGES`](super::tree::MAX_PAGES) pages needs.
pub(crate) const MAX_CHUNKS: usize = chunk_of(super::tree::MAX_PAGES - 1) + 1;

/// The chunk that holds page `index`.
#[inline]
pub(crate) const fn chunk_of(index: u64) -> usize {
    let high = index >> FIRST_CHUNK_SHIFT;
    (u64::BITS - high.leading_zeros()) as usize
}

/// The first page of chunk `chunk`.
#[inline]
const fn chunk_first(chunk: usize) -> u64 {
    if chunk == 0 {
        0
    } else {
        FIRST_CHUNK_PAGES << (chunk - 1)
    }
}

/// The size of chunk `chunk`'s region, as a power of two times 2 MiB.
const fn chunk_order(chunk: usize) -> u32 {
    chunk.saturating_sub(1) as u32
}

/// Bytes from the start of its chunk's region to page `index`.
#[inline]
const fn offset_in_chunk(index: u64) -> u64 {
    (index - chunk_first(chunk_of(index))) * PAGE
}

/// The pages of chunk `chunk`.
const fn chunk_pages(chunk: usize) -> u64 {
    FIRST_CHUNK_PAGES << chunk_order(chunk)
}

/// The last page of the chunk that holds page `index`: the user's maps are
/// views of one region per chunk, and a single `UFFDIO_COPY` or
/// `UFFDIO_CONTINUE` stays inside one view.
pub(crate) fn chunk_last(index: u64) -> u64 {
    let chunk = chunk_of(index);
    chunk_first(chunk) + chunk_pages(chunk) - 1
}

/// The end of the chunk that holds page `pages - 1`: a file of `pages` pages
/// has regions for pages below it.
pub(crate) fn chunks_end(pages: u64) -> u64 {
    pages.checked_sub(1).map_or(0, |last| chunk_last(last) + 1)
}

/// Bytes of a region of `order`.
const fn order_bytes(order: u32) -> u64 {
    (FIRST_CHUNK_PAGES * PAGE) << order
}

/// Regions up to a slab's size are cut from slabs: 1 GiB of the arena, with
/// one view of the cache's.
const SLAB_ORDER: u32 = 9;
const SLAB_BYTES: u64 = order_bytes(SLAB_ORDER);
/// Where in the arena the larger regions lie, each with a view of its own.
const LARGE_BASE: u64 = 1 << 52;
/// The arena's size, past every region: a map's pages past the largest file
/// lie past it, where a touch raises `SIGBUS` as past the end of a file.
pub(crate) const ARENA_BYTES: u64 = 1 << 60;

/// The number of pages every mapping of one cache may hold together.
pub(crate) struct Budget {
    capacity: u64,
    used: AtomicU64,
    /// The most pages ever used at once.
    peak: AtomicU64,
}

impl Budget {
    pub(crate) fn new(capacity: u64) -> Self {
        Budget {
            capacity,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Takes one page of the budget, or returns `false` if it is used up.
    pub(crate) fn try_acquire(&self) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < self.capacity).then_some(used + 1)
            });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + 1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes one page even beyond the budget (the last resort of a fault that
    /// found no page to evict for a long time).
    pub(crate) fn force_acquire(&self) {
        let before = self.used.fetch_add(1, Ordering::Relaxed);
        self.peak.fetch_max(before + 1, Ordering::Relaxed);
    }

    /// Gives one page back.
    pub(crate) fn release(&self) {
        self.release_pages(1);
    }

    /// Gives `pages` pages back at once.
    pub(crate) fn release_pages(&self, pages: u64) {
        let before = self.used.fetch_sub(pages, Ordering::Relaxed);
        debug_assert!(before >= pages, "budget released more often than taken");
    }
}

/// A region of the arena: where it lies in the arena, how big it is, and the
/// address of its first page in the cache's views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    offset: u64,
    order: u32,
    addr: usize,
}

impl Region {
    fn len(&self) -> u64 {
        order_bytes(self.order)
    }
}

/// The memfd every page of one cache lives in, and the cache's views of it.
pub(crate) struct Arena {
    memfd: OnceLock<Memfd>,
    inner: Mutex<ArenaInner>,
    faults: Arc<FaultService>,
}

#[derive(Default)]
struct ArenaInner {
    /// The views of the slabs, in arena order (slab `i` at `i * SLAB_BYTES`).
    slabs: Vec<View>,
    /// The views of the larger regions, given out or free.
    large: Vec<View>,
    /// Free regions by order: of slabs (orders up to `SLAB_ORDER`, by arena
    /// offset), and larger ones (with their view's address).
    free: Vec<BTreeSet<(u64, usize)>>,
    /// The arena offset of the next larger region.
    next_large: u64,
    /// Set from the cache's first map on: every view is registered with the
    /// fault service's userfaultfd.
    trapped: bool,
}

impl Arena {
    /// An arena whose regions route their faults through `faults`. Nothing is
    /// created until the first region is taken.
    pub(crate) fn new(faults: Arc<FaultService>) -> Self {
        Arena {
            memfd: OnceLock::new(),
            inner: Mutex::new(ArenaInner {
                free: (0..=chunk_order(MAX_CHUNKS - 1))
                    .map(|_| BTreeSet::new())
                    .collect(),
                next_large: LARGE_BASE,
                ..ArenaInner::default()
            }),
            faults,
        }
    }

    /// The arena's memfd, created on first use.
    pub(crate) fn memfd(&self) -> io::Result<&Memfd> {
        if let Some(memfd) = self.memfd.get() {
            return Ok(memfd);
        }
        let inner = self.inner.lock();
        self.memfd_locked(&inner)
    }

    /// As [`Arena::memfd`], for a caller that holds `inner`.
    fn memfd_locked(&self, _inner: &ArenaInner) -> io::Result<&Memfd> {
        if let Some(memfd) = self.memfd.get() {
            return Ok(memfd);
        }
        let memfd = Memfd::new("filemap")?;
        // Sparse: a size costs nothing until pages are present.
        memfd.set_len(ARENA_BYTES)?;
        // Callers hold `inner`: no other memfd was set meanwhile.
        let _ = self.memfd.set(memfd);
        Ok(self.memfd.get().expect("just set"))
    }

    /// The arena's memfd if a page was ever stored.
    pub(crate) fn memfd_if_created(&self) -> Option<&Memfd> {
        self.memfd.get()
    }

    /// How many views of the arena the cache holds.
    pub(crate) fn views(&self) -> usize {
        let inner = self.inner.lock();
        inner.slabs.len() + inner.large.len()
    }

    /// A region of `order`, emptied, whose faults go to `owner`.
    fn take(&self, order: u32, owner: &Weak<dyn ServesFaults>) -> io::Result<Region> {
        let mut inner = self.inner.lock();
        let memfd = self.memfd_locked(&inner)?;
        let region = if order <= SLAB_ORDER {
            self.take_from_slabs(&mut inner, memfd, order)?
        } else if let Some((offset, addr)) = inner.free[order as usize].pop_first() {
            Region {
                offset,
                order,
                addr,
            }
        } else {
            let offset = inner.next_large;
            let view = self.new_view(&inner, memfd, offset, order_bytes(order))?;
            let addr = view.addr();
            inner.large.push(view);
            inner.next_large += order_bytes(order);
            Region {
                offset,
                order,
                addr,
            }
        };
        // A zero page a late reader left in the region goes before its new
        // owner sees it (see the module docs).
        let routed =
            self.faults
                .route_cleared(region.addr, region.len() as usize, owner.clone(), || {
                    memfd.punch(region.offset, region.len())
                });
        if let Err(error) = routed {
            self.put_back(&mut inner, region);
            return Err(error);
        }
        Ok(region)
    }

    /// A region of `order` cut from the slabs (buddy style), with a new slab
    /// if none has room.
    fn take_from_slabs(
        &self,
        inner: &mut ArenaInner,
        memfd: &Memfd,
        order: u32,
    ) -> io::Result<Region> {
        let from = (order..=SLAB_ORDER).find(|&o| !inner.free[o as usize].is_empty());
        let (offset, mut have) = match from {
            Some(o) => (inner.free[o as usize].pop_first().expect("not empty").0, o),
            None => {
                let offset = inner.slabs.len() as u64 * SLAB_BYTES;
                let view = self.new_view(inner, memfd, offset, SLAB_BYTES)?;
                inner.slabs.push(view);
                (offset, SLAB_ORDER)
            }
        };
        // Split: keep the lower half, free the upper.
        while have > order {
            have -= 1;
            inner.free[have as usize].insert((offset + order_bytes(have), 0));
        }
        Ok(Region {
            offset,
            order,
            addr: slab_addr(inner, offset),
        })
    }

    /// Gives `region` back, emptied; its faults go nowhere from now on.
    fn give_back(&self, region: Region) {
        self.faults.unroute(region.addr);
        if let Some(memfd) = self.memfd.get() {
            // A failed punch leaves pages that the next owner's clear removes.
            let _ = memfd.punch(region.offset, region.len());
        }
        let mut inner = self.inner.lock();
        self.put_back(&mut inner, region);
    }

    /// Enters `region` among the free ones, merged with its free buddies.
    fn put_back(&self, inner: &mut ArenaInner, region: Region) {
        if region.order > SLAB_ORDER {
            inner.free[region.order as usize].insert((region.offset, region.addr));
            return;
        }
        let (mut offset, mut order) = (region.offset, region.order);
        while order < SLAB_ORDER {
            let buddy = offset ^ order_bytes(order);
            if !inner.free[order as usize].remove(&(buddy, 0)) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        inner.free[order as usize].insert((offset, 0));
    }

    /// A new view of the arena, registered if the cache is mapped.
    fn new_view(
        &self,
        inner: &ArenaInner,
        memfd: &Memfd,
        offset: u64,
        len: u64,
    ) -> io::Result<View> {
        let view = View::new(memfd, offset, len as usize, true)?;
        if inner.trapped {
            let uffd = self.faults.uffd().expect("trapping started the service");
            uffd.register(view.addr(), view.len(), false)?;
        }
        self.faults.add_store_view(view.addr(), view.len());
        Ok(view)
    }

    /// From now on, every view of the arena faults into the cache's fault
    /// service, whose userfaultfd is `uffd` (the cache's first map).
    pub(crate) fn trap_faults(&self, uffd: &Userfaultfd) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if inner.trapped {
            return Ok(());
        }
        for view in inner.slabs.iter().chain(&inner.large) {
            uffd.register(view.addr(), view.len(), false)?;
        }
        inner.trapped = true;
        Ok(())
    }
}

/// The address of arena offset `offset` in the slab views.
fn slab_addr(inner: &ArenaInner, offset: u64) -> usize {
    let slab = &inner.slabs[(offset / SLAB_BYTES) as usize];
    slab.addr() + (offset % SLAB_BYTES) as usize
}

/// One mapping's pages: its regions of the arena.
pub(crate) struct PageStore {
    arena: Arc<Arena>,
    /// The mapping, whom its regions' faults go to.
    owner: Weak<dyn ServesFaults>,
    /// The address of each chunk's region in the arena's views, 0 while it
    /// has none: all a hit reads.
    addrs: [AtomicUsize; MAX_CHUNKS],
    /// The regions by chunk (changed under `gate` shared and this lock, or
    /// under `gate` exclusive).
    regions: Mutex<Vec<(usize, Region)>>,
    /// Held shared by every call that adds or removes pages (so the region it
    /// works in stays the mapping's), exclusively to give the regions back.
    gate: RwLock<()>,
    /// Set from the file's first map on: pages are installed by `UFFDIO_COPY`.
    mapped: AtomicBool,
}

/// A part of a run of pages that lies in one region.
struct Part {
    /// The run's first page in this part, and how many.
    first: u64,
    pages: u64,
    region: Region,
}

impl Part {
    /// Where the part's first page lies in the arena.
    fn offset(&self) -> u64 {
        self.region.offset + offset_in_chunk(self.first)
    }

    /// The address of the part's first page in the cache's views.
    fn addr(&self) -> usize {
        self.region.addr + offset_in_chunk(self.first) as usize
    }

    fn len(&self) -> usize {
        (self.pages * PAGE) as usize
    }
}

impl PageStore {
    /// An empty store in `arena` for `owner`: no region, no memory.
    pub(crate) fn new(arena: Arc<Arena>, owner: Weak<dyn ServesFaults>) -> Self {
        PageStore {
            arena,
            owner,
            addrs: std::array::from_fn(|_| AtomicUsize::new(0)),
            regions: Mutex::new(Vec::new()),
            gate: RwLock::new(()),
            mapped: AtomicBool::new(false),
        }
    }

    /// Sends the faults of the store's regions to `owner` from now on: the
    /// mapping that takes over a closed file's pages. Until the file is
    /// mapped, the routes of the regions it has are left to its first map
    /// ([`PageStore::trap_faults`]): a fault there until then comes from an
    /// optimistic reader's touch, whose copy validation discards, and the zero
    /// page the fault service leaves for it is removed at the first map.
    pub(crate) fn set_owner(&mut self, owner: Weak<dyn ServesFaults>) {
        self.owner = owner;
        if self.traps_faults() {
            self.route_regions();
        }
    }

    /// Routes the faults of every region to the owner.
    fn route_regions(&self) {
        for (_, region) in self.regions.lock().iter() {
            let len = region.len() as usize;
            self.arena
                .faults
                .route(region.addr, len, self.owner.clone());
        }
    }

    /// The arena the pages live in.
    pub(crate) fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// How many regions the store holds.
    #[cfg(test)]
    pub(crate) fn regions(&self) -> usize {
        self.regions.lock().len()
    }

    /// The region of chunk `chunk`, taken if it has none and `take`. The
    /// caller holds `gate` shared.
    fn region(&self, chunk: usize, take: bool) -> io::Result<Option<Region>> {
        let mut regions = self.regions.lock();
        if let Some((_, region)) = regions.iter().find(|(c, _)| *c == chunk) {
            return Ok(Some(*region));
        }
        if !take {
            return Ok(None);
        }
        let region = self.arena.take(chunk_order(chunk), &self.owner)?;
        regions.push((chunk, region));
        // Before any page of it is published (which releases it to readers).
        self.addrs[chunk].store(region.addr, Ordering::Relaxed);
        Ok(Some(region))
    }

    /// The parts of pages `first..first + count` in their regions, taking the
    /// regions that are missing if `take`, else leaving out the pages that
    /// have none. The caller holds `gate` shared.
    fn parts(&self, first: u64, count: u64, take: bool) -> io::Result<Vec<Part>> {
        let mut parts = Vec::new();
        let end = first + count;
        let mut page = first;
        while page < end {
            let chunk = chunk_of(page);
            let pages = (chunk_first(chunk) + chunk_pages(chunk)).min(end) - page;
            if let Some(region) = self.region(chunk, take)? {
                parts.push(Part {
                    first: page,
                    pages,
                    region,
                });
            }
            page += pages;
        }
        Ok(parts)
    }

    /// The arena offsets of pages `first..first + count` (page-aligned,
    /// `len` bytes each), taking the regions that are missing: what the
    /// user's maps are views of. The caller holds
    /// [`PageStore::keep_regions`] until the map is entered.
    pub(crate) fn arena_ranges(&self, first: u64, count: u64) -> io::Result<Vec<(u64, usize)>> {
        let parts = self.parts(first, count, true)?;
        Ok(parts
            .iter()
            .map(|part| (part.offset(), part.len()))
            .collect())
    }

    /// Keeps the store's regions until the guard goes, as a call that adds
    /// pages does: for [`PageStore::arena_ranges`].
    pub(crate) fn keep_regions(&self) -> impl Sized + '_ {
        self.gate.read()
    }

    /// Gives every region back if `empty()` still holds with no call adding
    /// pages under way (and none can start until this returns): the caller
    /// says when the mapping holds no page and no map. Does nothing if a call
    /// is under way; it finds the store full when it ends.
    pub(crate) fn release_if_empty(&self, empty: impl FnOnce() -> bool) {
        let Some(_gate) = self.gate.try_write() else {
            return;
        };
        if !empty() {
            return;
        }
        self.release_regions();
    }

    /// Gives every region back. The caller holds `gate` exclusively, or the
    /// store is being dropped.
    fn release_regions(&self) {
        let regions = std::mem::take(&mut *self.regions.lock());
        for (chunk, region) in regions {
            // A reader that loaded the address already reads the arena's
            // views, which stay; its copy fails validation.
            self.addrs[chunk].store(0, Ordering::Relaxed);
            self.arena.give_back(region);
        }
    }

    /// From now on, the store's pages enter the arena by `UFFDIO_COPY` (the
    /// arena traps faults: [`Arena::trap_faults`]). The caller keeps pages
    /// from being installed meanwhile (it holds Invalidate over the whole file
    /// and waited for fills), then gives back the zero pages that optimistic
    /// readers left in holes before ([`PageStore::held_pages`]).
    pub(crate) fn trap_faults(&self) {
        self.route_regions();
        self.mapped.store(true, Ordering::Release);
    }

    /// Whether the file was ever mapped (see [`PageStore::trap_faults`]).
    pub(crate) fn traps_faults(&self) -> bool {
        self.mapped.load(Ordering::Acquire)
    }

    /// The pages the arena holds for this store (`SEEK_DATA`): a held page the
    /// cache does not count present is a zero page a reader left in a hole,
    /// to be removed.
    pub(crate) fn held_pages(&self) -> io::Result<Vec<u64>> {
        let _gate = self.gate.read();
        let Some(memfd) = self.arena.memfd_if_created() else {
            return Ok(Vec::new());
        };
        let regions = self.regions.lock().clone();
        let mut held = Vec::new();
        for (chunk, region) in regions {
            for range in memfd.data_ranges(region.offset..region.offset + region.len())? {
                let first = chunk_first(chunk) + (range.start - region.offset) / PAGE;
                held.extend(first..first + (range.end - range.start).div_ceil(PAGE));
            }
        }
        Ok(held)
    }

    /// The page index an address of the arena's views holds for this store.
    pub(crate) fn page_at(&self, addr: usize) -> Option<u64> {
        self.addrs.iter().enumerate().find_map(|(chunk, base)| {
            let base = base.load(Ordering::Relaxed);
            let len = (chunk_pages(chunk) * PAGE) as usize;
            let at = addr.checked_sub(base).filter(|&at| base != 0 && at < len)?;
            Some(chunk_first(chunk) + (at / PAGE_SIZE) as u64)
        })
    }

    /// The address of byte `offset` of page `index` in the arena's views, after
    /// checking that `len` bytes from there stay inside the page; 0 if the
    /// page has no region (it was dropped and the region given back: a reader
    /// that raced it reads nothing, and validation discards its copy).
    #[inline]
    fn addr(&self, index: u64, offset: usize, len: usize) -> usize {
        assert!(
            offset <= PAGE_SIZE && len <= PAGE_SIZE - offset,
            "access outside a page"
        );
        let base = self.addrs[chunk_of(index)].load(Ordering::Relaxed);
        if base == 0 {
            return 0;
        }
        base + offset_in_chunk(index) as usize + offset
    }

    /// Copies `dst.len()` bytes from `offset` in page `index`. The bytes may be
    /// torn by a concurrent writer: callers validate them against the page state.
    #[inline]
    #[cfg(not(any(loom, shuttle)))]
    pub(crate) fn read(&self, index: u64, offset: usize, dst: &mut [u8]) {
        self.read_with(crate::racy::chosen(), index, offset, dst);
    }

    /// [`PageStore::read`] with `copy`, which must be available (the chosen
    /// copy, or for the benchmarks' `copy-limit` each copy in turn).
    #[inline]
    #[cfg(not(any(loom, shuttle)))]
    pub(crate) fn read_with(
        &self,
        copy: crate::racy::RacyCopy,
        index: u64,
        offset: usize,
        dst: &mut [u8],
    ) {
        let src = self.addr(index, offset, dst.len()) as *const u8;
        if src.is_null() {
            return;
        }
        // SAFETY: `src..src + len` lies inside one page of a view of the arena,
        // which lives as long as the cache and so as `self` (`addr`); `dst` is
        // an exclusive buffer that is not view memory of the arena (callers
        // copy through their own buffers). Racing writers are sound: see the
        // module's `# Safety`. `copy` is available (the caller's duty).
        unsafe { copy.copy(src, dst.as_mut_ptr(), dst.len()) }
    }

    /// Under a model checker: the same copy by `pread`, which reads a page the
    /// arena lacks as zeroes instead of faulting. A fault would block the
    /// thread in the kernel until the fault thread served it, and no fault
    /// thread runs under a checker (which could not schedule it anyway). The
    /// validation of the copy is the same.
    #[cfg(any(loom, shuttle))]
    pub(crate) fn read(&self, index: u64, offset: usize, dst: &mut [u8]) {
        let (Some(memfd), Ok(Some(region))) = (
            self.arena.memfd_if_created(),
            self.region(chunk_of(index), false),
        ) else {
            return;
        };
        let part = Part {
            first: index,
            pages: 1,
            region,
        };
        let _ = memfd.read_at(dst, part.offset() + offset as u64);
    }

    /// The address of page `index`, which must be present (its region stays
    /// while it is).
    pub(crate) fn page(&self, index: u64) -> *const u8 {
        let addr = self.addr(index, 0, PAGE_SIZE) as *const u8;
        assert!(!addr.is_null(), "a present page has a region");
        addr
    }

    /// Copies `src` into page `index` at `offset`. The page must be present and
    /// the caller must own its bytes (page locked): a present page keeps its
    /// region.
    pub(crate) fn write(&self, index: u64, offset: usize, src: &[u8]) {
        // Pairs with the acquire fence of optimistic readers: a reader that sees any
        // of these bytes also sees the lock taken before them, and discards its copy.
        fence(Ordering::Release);
        let dst = self.addr(index, offset, src.len()) as *mut u8;
        assert!(!dst.is_null(), "a present page has a region");
        // SAFETY: `dst..dst + len` lies inside one page of a view of the arena
        // (`addr`), and `src` is a buffer outside the arena's views; only
        // optimistic readers and stores through maps race this copy, which is
        // sound: see `# Safety`.
        unsafe { copy_racy(src.as_ptr(), dst, src.len()) }
    }

    /// Zeroes `len` bytes of page `index` from `offset`; as for `write`.
    pub(crate) fn zero(&self, index: u64, offset: usize, len: usize) {
        const ZEROES: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.write(index, offset, &ZEROES[..len]);
    }

    /// Installs whole pages `data` from page `index` on, atomically per page for
    /// maps, where they are absent. The caller holds them (claimed and locked).
    pub(crate) fn install(&self, index: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() % PAGE_SIZE == 0);
        let _gate = self.gate.read();
        let parts = self.parts(index, (data.len() / PAGE_SIZE) as u64, true)?;
        let memfd = self
            .arena
            .memfd_if_created()
            .expect("taking a region made it");
        let uffd = self.traps_faults().then(|| {
            let uffd = self.arena.faults.uffd();
            uffd.expect("the file's first map started the fault service")
        });
        for part in parts {
            let from = ((part.first - index) * PAGE) as usize;
            let bytes = &data[from..from + part.len()];
            match uffd {
                // No map can see the page yet: a plain write, which also
                // replaces a zero page a reader may have left in the hole.
                None => memfd.write_all_at(bytes, part.offset())?,
                Some(uffd) => copy_into(uffd, memfd, &part, bytes)?,
            }
        }
        Ok(())
    }

    /// Removes pages `first..first + count` from the arena, zapping them from
    /// every view. The caller holds them locked.
    pub(crate) fn remove(&self, first: u64, count: u64) -> io::Result<()> {
        let _gate = self.gate.read();
        let Some(memfd) = self.arena.memfd_if_created() else {
            return Ok(());
        };
        for part in self.parts(first, count, false)? {
            memfd.punch(part.offset(), part.len() as u64)?;
        }
        Ok(())
    }

    /// Writes `data` into page `index` of the arena behind the cache's back, as
    /// an optimistic reader's touch of a hole does (with zeroes): for tests.
    #[cfg(test)]
    pub(crate) fn plant(&self, index: u64, data: &[u8]) -> io::Result<()> {
        let _gate = self.gate.read();
        let part = self.parts(index, 1, true)?.remove(0);
        let memfd = self
            .arena
            .memfd_if_created()
            .expect("taking a region made it");
        memfd.write_all_at(data, part.offset())
    }

    /// A plain `memcpy` of page `index`, for benchmarks that compare the hit path
    /// with the cost of the copy alone.
    ///
    /// # Safety
    /// The page must be present, and no thread may write it during the call.
    #[cfg(feature = "bench")]
    pub(crate) unsafe fn memcpy_page(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) {
        let src = self.addr(index, 0, PAGE_SIZE) as *const u8;
        assert!(!src.is_null(), "a present page has a region");
        // SAFETY: the page lies inside a live view (`addr`), `dst` is a distinct
        // exclusive buffer of a page, and the caller guarantees no concurrent
        // writer, so this plain copy races with nothing.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) }
    }
}

/// Installs `bytes` as the pages of `part` by `UFFDIO_COPY`, whole pages
/// atomically. A zero page a reader left there before the file was mapped
/// (`EEXIST`: the caller holds the page, so nothing else is there) is
/// removed and the copy tried again.
fn copy_into(uffd: &Userfaultfd, memfd: &Memfd, part: &Part, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: `bytes[done..]` is readable for the whole call.
        let copied = unsafe {
            uffd.copy(
                part.addr() + done,
                bytes[done..].as_ptr(),
                bytes.len() - done,
                false,
                true,
            )
        };
        match copied {
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                memfd.punch(part.offset() + done as u64, PAGE)?;
            }
            // A pending event (a fork or remap elsewhere): try again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for PageStore {
    fn drop(&mut self) {
        self.release_regions();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_never_exceeded() {
        let budget = Budget::new(2);
        assert!(budget.try_acquire() && budget.try_acquire());
        assert!(!budget.try_acquire(), "budget exceeded");
        budget.release();
        assert!(budget.try_acquire());
        assert_eq!(budget.used(), 2);
    }

    #[test]
    fn chunks_double_after_the_first_two() {
        assert_eq!((chunk_of(0), chunk_of(511)), (0, 0));
        assert_eq!((chunk_of(512), chunk_of(1023)), (1, 1));
        assert_eq!((chunk_of(1024), chunk_of(2047)), (2, 2));
        for chunk in 0..MAX_CHUNKS {
            let first = chunk_first(chunk);
            let last = first + chunk_pages(chunk) - 1;
            assert_eq!((chunk_of(first), chunk_of(last)), (chunk, chunk));
            assert_eq!(chunk_last(first), last);
        }
        assert_eq!(
            chunk_first(MAX_CHUNKS - 1) + chunk_pages(MAX_CHUNKS - 1),
            super::super::tree::MAX_PAGES
        );
    }

    /// Regions cut from slabs never overlap, and those given back merge again
    /// into whole slabs, so a churn of files needs no new slab.
    #[test]
    fn regions_never_overlap_and_merge_back() {
        let arena = Arena::new(Arc::new(FaultService::new(1)));
        let owner: Weak<dyn ServesFaults> = Weak::<Nobody>::new();
        let mut taken = Vec::new();
        for order in [0, 3, 0, 1, 9, 2, 0, 10] {
            taken.push(arena.take(order, &owner).expect("a region"));
        }
        let mut spans: Vec<(u64, u64)> = taken
            .iter()
            .map(|r| (r.offset, r.offset + r.len()))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "regions overlap: {pair:?}");
        }
        for region in &taken {
            assert_eq!(region.offset % region.len(), 0, "misaligned {region:?}");
        }
        let views = arena.views();
        for region in taken.drain(..) {
            arena.give_back(region);
        }
        for _ in 0..3 {
            for order in [0, 3, 0, 1, 9, 2, 0, 10] {
                taken.push(arena.take(order, &owner).expect("a region"));
            }
            for region in taken.drain(..) {
                arena.give_back(region);
            }
        }
        assert_eq!(arena.views(), views, "churn took new views");
        // The small regions merged back into their whole slab: two slabs'
        // worth fit in the two slabs there are.
        for order in [SLAB_ORDER, SLAB_ORDER, 10] {
            taken.push(arena.take(order, &owner).expect("a region"));
        }
        assert_eq!(arena.views(), views, "given-back regions did not merge");
    }

    struct Nobody;
    impl ServesFaults for Nobody {
        fn serve_fault(&self, _: usize, _: u32) {}
    }
}
