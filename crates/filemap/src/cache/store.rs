//! Where a mapping's cached pages live, and the budget they are counted in.
//!
//! Each mapping keeps its pages in a memfd of its own, page `i` at byte
//! `i * PAGE_SIZE`: the user's memory maps are `MAP_SHARED` views of the same
//! memfd, so a page is one physical page whether it is read with `read_at`,
//! written with `write_at` or touched through any map, and a hole punched in the
//! memfd zaps it from every map at once (the kernel's `unmap_mapping_range`).
//!
//! The cache reads and writes the memfd through views of its own, one per chunk
//! of file offsets, created on first use.
//!
//! Until the file is first mapped, no userfaultfd is involved: pages enter the
//! memfd by `pwrite` (no map can see one half written, and optimistic readers
//! read only published pages). An optimistic reader that races a punch may
//! then touch the hole through the cache's view, which allocates a zero page
//! there; its copy is discarded by validation, and the reader gives the stray
//! page back (see `Mapping::read_hit`); a later install overwrites it anyway.
//!
//! From the first map on ([`PageStore::trap_faults`]), every view, the cache's
//! included, is registered with the cache's userfaultfd for MISSING faults:
//! touching an absent page never allocates a zero page behind the cache's back
//! (which would hide the page from MISSING faults, and a map would read zeroes
//! for data); it faults into the cache's fault service, which fills the page
//! under the coherence lock. Pages then enter the memfd only by `UFFDIO_COPY`,
//! which installs a whole page atomically, so no map sees one half written.
//!
//! The memfd is sized to the file's largest possible size once and never shrunk,
//! so the cache's views can never raise `SIGBUS`: an optimistic reader that
//! loaded a page's state before a truncate may touch the page after it. The
//! mapping serves that fault with a cached page of zeroes, the file's content
//! past its end (the reader's copy is discarded by validation anyway).
//!
//! # Safety
//! Copies in and out of the views race by design (optimistic readers, stores
//! through user maps), so they go through [`crate::racy`]. View memory stays
//! mapped for the store's whole life, so every address computed here is valid to
//! access; a page that is absent when it is touched is served by the fault
//! handler, not by a signal.
#![allow(unsafe_code)]

use std::io;
use std::sync::Arc;

use super::faults::{FaultService, ServesFaults};
use crate::map::memfd::{Memfd, View};
use crate::map::uffd::Userfaultfd;
use crate::page::{PAGE, PAGE_SIZE};
use crate::racy::copy_racy;
use crate::sync::atomic::{fence, AtomicU64, Ordering};
use crate::sync::{Mutex, OnceLock};
use std::sync::Weak;

/// File bytes one cache view covers: address space only, until pages are present.
const CHUNK_BYTES: u64 = 1 << 36;

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
        let before = self.used.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "budget released more often than taken");
    }
}

/// One mapping's pages: a memfd and the cache's views of it.
pub(crate) struct PageStore {
    memfd: Memfd,
    chunks: Box<[OnceLock<View>]>,
    /// Set from the file's first map on: its views fault into the service.
    faults: OnceLock<TrappedFaults>,
    /// Serialises the creation of views and the start of fault trapping (both
    /// rare; reads take no lock).
    creating: Mutex<()>,
}

/// Where the faults of a store's views go.
struct TrappedFaults {
    uffd: Arc<Userfaultfd>,
    service: Arc<FaultService>,
    owner: Weak<dyn ServesFaults>,
}

impl TrappedFaults {
    /// Registers `view` MISSING and routes its faults to the owner.
    fn trap(&self, view: &View) -> io::Result<()> {
        self.uffd.register(view.addr(), view.len(), false)?;
        self.service
            .route(view.addr(), view.len(), self.owner.clone());
        Ok(())
    }
}

impl PageStore {
    /// A store for a file that may grow to `max_size` bytes.
    pub(crate) fn new(max_size: u64) -> io::Result<Self> {
        let chunks = max_size.div_ceil(CHUNK_BYTES).max(1);
        let memfd = Memfd::new("filemap")?;
        // Sparse: a size costs nothing until pages are present.
        memfd.set_len(max_size)?;
        Ok(PageStore {
            memfd,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            faults: OnceLock::new(),
            creating: Mutex::new(()),
        })
    }

    /// From now on, the store's views fault into `service` (whose userfaultfd
    /// is `uffd`), which sends the faults to `owner`. The caller keeps pages
    /// from being installed meanwhile (it holds Invalidate over the whole file
    /// and waited for fills), then gives back the zero pages that optimistic
    /// readers left in holes before ([`PageStore::stray_pages`]).
    pub(crate) fn trap_faults(
        &self,
        uffd: &Arc<Userfaultfd>,
        service: &Arc<FaultService>,
        owner: Weak<dyn ServesFaults>,
    ) -> io::Result<()> {
        let _creating = self.creating.lock();
        if self.faults.get().is_some() {
            return Ok(());
        }
        let faults = TrappedFaults {
            uffd: uffd.clone(),
            service: service.clone(),
            owner,
        };
        for view in self.chunks.iter().filter_map(OnceLock::get) {
            faults.trap(view)?;
        }
        let _ = self.faults.set(faults);
        Ok(())
    }

    /// Whether the store's views fault into a fault service.
    pub(crate) fn traps_faults(&self) -> bool {
        self.faults.get().is_some()
    }

    /// Whether the memfd holds page `index` (`SEEK_DATA`): after
    /// [`PageStore::trap_faults`], a held page the cache does not count present
    /// is a zero page a reader left in a hole, to be removed.
    pub(crate) fn holds(&self, index: u64) -> io::Result<bool> {
        self.memfd.page_present(index * PAGE)
    }

    /// The memfd the pages live in (user maps are views of it).
    pub(crate) fn memfd(&self) -> &Memfd {
        &self.memfd
    }

    /// The page index an address of one of the cache's views holds, if any.
    pub(crate) fn page_at(&self, addr: usize) -> Option<u64> {
        self.chunks.iter().enumerate().find_map(|(chunk, cell)| {
            let view = cell.get()?;
            let offset = addr.checked_sub(view.addr()).filter(|&o| o < view.len())?;
            Some((chunk as u64 * CHUNK_BYTES + offset as u64) / PAGE)
        })
    }

    /// The cache's view holding page `index`, created and registered if needed.
    fn view(&self, index: u64) -> io::Result<&View> {
        let cell = &self.chunks[(index * PAGE / CHUNK_BYTES) as usize];
        if let Some(view) = cell.get() {
            return Ok(view);
        }
        let _creating = self.creating.lock();
        if cell.get().is_none() {
            let start = index * PAGE / CHUNK_BYTES * CHUNK_BYTES;
            let view = View::new(&self.memfd, start, CHUNK_BYTES as usize, true)?;
            if let Some(faults) = self.faults.get() {
                faults.trap(&view)?;
            }
            let _ = cell.set(view);
        }
        Ok(cell.get().expect("just created"))
    }

    /// The address of byte `offset` of page `index` in the cache's views, after
    /// checking that `len` bytes from there stay inside the page. Only pages that
    /// were installed are accessed, and installing created their view.
    fn addr(&self, index: u64, offset: usize, len: usize) -> usize {
        assert!(
            offset <= PAGE_SIZE && len <= PAGE_SIZE - offset,
            "access outside a page"
        );
        let view = self.chunks[(index * PAGE / CHUNK_BYTES) as usize]
            .get()
            .expect("a stored page's view exists");
        view.addr() + (index * PAGE % CHUNK_BYTES) as usize + offset
    }

    /// Copies `dst.len()` bytes from `offset` in page `index`. The bytes may be
    /// torn by a concurrent writer: callers validate them against the page state.
    #[inline]
    #[cfg(not(any(loom, shuttle)))]
    pub(crate) fn read(&self, index: u64, offset: usize, dst: &mut [u8]) {
        let src = self.addr(index, offset, dst.len()) as *const u8;
        // SAFETY: `src..src + len` lies inside one page of a view that lives as long
        // as `self` (`addr`); `dst` is an exclusive buffer that is not view memory
        // of this store (callers copy through their own buffers). Racing writers
        // are sound: see the module's `# Safety`.
        unsafe { copy_racy(src, dst.as_mut_ptr(), dst.len()) }
    }

    /// Under a model checker: the same copy by `pread`, which reads a page the
    /// store lacks as zeroes instead of faulting. A fault would block the
    /// thread in the kernel until the fault thread served it, and no fault
    /// thread runs under a checker (which could not schedule it anyway). The
    /// validation of the copy is the same.
    #[cfg(any(loom, shuttle))]
    pub(crate) fn read(&self, index: u64, offset: usize, dst: &mut [u8]) {
        let at = crate::page::start_of(index) + offset as u64;
        let _ = self.memfd.read_at(dst, at);
    }

    /// Copies `src` into page `index` at `offset`. The page must be present and
    /// the caller must own its bytes (page locked).
    pub(crate) fn write(&self, index: u64, offset: usize, src: &[u8]) {
        // Pairs with the acquire fence of optimistic readers: a reader that sees any
        // of these bytes also sees the lock taken before them, and discards its copy.
        fence(Ordering::Release);
        let dst = self.addr(index, offset, src.len()) as *mut u8;
        // SAFETY: `dst..dst + len` lies inside one page of a live view (`addr`), and
        // `src` is a buffer outside this store's views; only optimistic readers and
        // stores through maps race this copy, which is sound: see `# Safety`.
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
        let Some(faults) = self.faults.get() else {
            // No map can see the page yet: a plain write, which also replaces
            // a zero page a reader may have left in the hole.
            self.view(index + (data.len() / PAGE_SIZE) as u64 - 1)?;
            self.view(index)?;
            return self.memfd.write_all_at(data, index * PAGE);
        };
        let mut done = 0;
        while done < data.len() {
            let page = index + (done / PAGE_SIZE) as u64;
            // One copy per chunk: a copy must stay inside one registered view.
            let chunk_end = (page * PAGE / CHUNK_BYTES + 1) * CHUNK_BYTES;
            let len = (data.len() - done).min((chunk_end - page * PAGE) as usize);
            let dst = self.view(page)?.addr() + (page * PAGE % CHUNK_BYTES) as usize;
            // SAFETY: `data[done..done + len]` is readable for the whole call.
            let copied = unsafe {
                faults
                    .uffd
                    .copy(dst, data[done..].as_ptr(), len, false, true)
            };
            match copied {
                Ok(n) => done += n,
                // A pending event (a fork or remap elsewhere): try again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes pages `first..first + count` from the memfd, zapping them from
    /// every view. The caller holds them locked.
    pub(crate) fn remove(&self, first: u64, count: u64) -> io::Result<()> {
        self.memfd.punch(first * PAGE, count * PAGE)
    }

    /// A plain `memcpy` of page `index`, for benchmarks that compare the hit path
    /// with the cost of the copy alone.
    ///
    /// # Safety
    /// The page must be present, and no thread may write it during the call.
    #[cfg(feature = "bench")]
    pub(crate) unsafe fn memcpy_page(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) {
        let src = self.addr(index, 0, PAGE_SIZE) as *const u8;
        // SAFETY: the page lies inside a live view (`addr`), `dst` is a distinct
        // exclusive buffer of a page, and the caller guarantees no concurrent
        // writer, so this plain copy races with nothing.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) }
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        // Before the views are unmapped: a new view at one of their addresses
        // must not be sent to this store's owner.
        if let Some(faults) = self.faults.get() {
            for view in self.chunks.iter().filter_map(OnceLock::get) {
                faults.service.unroute(view.addr());
            }
        }
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
}
