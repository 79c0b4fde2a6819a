//! Pinned pages: a cached page's bytes in place, for as long as a guard
//! lives, as a database's buffer manager pins a frame.
//!
//! A read pin ([`PinnedPage`]) is, when it can be, a hazard pin: the slot's
//! address in an entry of the pinning thread's own record (see
//! `cache/page/hazard.rs`), so that taking and giving it back writes no
//! memory another thread writes, and pins scale across threads as hits do.
//! Every lock of a page scans the records once it has set `LOCKED`, and a
//! locker that finds a hazard pin moves it into the slot's pin count and
//! gives the lock back: from then on it is a counted pin, which waiters
//! park on as before, and its unpin gives back the count and wakes them. A
//! thread's pins past the entries of its record (seven), or of a thread that
//! found every record held, are counted in the slot from the start.
//!
//! Either way, while a pin is
//! held the page cannot be locked, so no buffered write, direct write,
//! punch, zero, truncate, collapse, insert, invalidation or eviction changes
//! or drops it (each waits for the last unpin), and stores through the
//! file's read-write maps wait in their fault (a pin unmaps the page there,
//! since the kernel's write tracking cannot let loads through but hold
//! stores back). Hits are not held up: pins are no part of what an
//! optimistic reader re-checks. Writeback snapshots a pinned page under a
//! pin of its own.
//!
//! A write pin ([`PinnedPageMut`]) holds the page's lock: readers of the page
//! wait for it as for a buffered write, and its release makes the page dirty.
//! Its writes land in place: a read-only map of the file shows them as they
//! land, as a shared map shows another process's `write(2)` (a buffered write
//! replaces a mapped page whole instead).
//!
//! No wait for one's own pins: a thread that holds a pin of a page and calls
//! an operation that would wait for it gets `EDEADLK` at once (each thread
//! keeps a list of the pins it holds). The one exception is a store through
//! a read-write map of the file to a page the same thread holds pinned: it
//! waits in its fault like any other store, for an unpin that cannot come.

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::ops::{Deref, Range};

use super::fill::{Fill, FillBudget};
use super::Mapping;
use crate::cache::page::hazard::{self, EntryId};
use crate::cache::page::{PageState, Slot, MAX_PINS};
use crate::cache::stats;
use crate::errno::{fail, with_message};
use crate::lock::Mode;
use crate::page::{start_of, PAGE_SIZE};

thread_local! {
    /// The pins this thread holds: the mapping's address, the page, and
    /// whether the pin is for writing.
    static HELD: RefCell<Vec<(usize, u64, bool)>> = const { RefCell::new(Vec::new()) };

    /// This thread's record of hazard pins: claimed at its first read pin,
    /// given back when it exits.
    static OWN_RECORD: OwnRecord = const { OwnRecord(Cell::new(Claim::NotYet)) };
}

/// A thread's claim of a hazard record.
#[derive(Clone, Copy)]
enum Claim {
    /// The thread has taken no read pin yet.
    NotYet,
    /// The record of this number.
    Held(usize),
    /// Every record was held when the thread first pinned: its pins are
    /// counted in the slots.
    Refused,
}

/// Gives the thread's hazard record back when the thread exits.
struct OwnRecord(Cell<Claim>);

impl Drop for OwnRecord {
    fn drop(&mut self) {
        if let Claim::Held(record) = self.0.get() {
            hazard::registry().release(record);
        }
    }
}

/// The calling thread's hazard record, claimed now if this is its first pin;
/// `None` if every record is held, or while the thread exits.
#[cfg(not(any(loom, shuttle)))]
#[inline]
fn own_record() -> Option<usize> {
    OWN_RECORD
        .try_with(|own| match own.0.get() {
            Claim::Held(record) => Some(record),
            Claim::Refused => None,
            Claim::NotYet => {
                let claimed = hazard::registry().claim();
                own.0.set(claimed.map_or(Claim::Refused, Claim::Held));
                claimed
            }
        })
        .ok()
        .flatten()
}

/// Under a model checker every checked thread runs on one thread of the
/// process, so they would share one record: mappings take counted pins
/// there (the page models drive hazard pins on slots directly).
#[cfg(any(loom, shuttle))]
fn own_record() -> Option<usize> {
    let _ = &OWN_RECORD;
    None
}

/// A read pin of one cached page: dereferences to its bytes, which stay as
/// they are until the guard is dropped. See [`Mapping::pin`].
///
/// The guard belongs to the thread that took it (it is not `Send`): the
/// thread's list of held pins is what lets its own calls fail with `EDEADLK`
/// instead of waiting for it.
pub struct PinnedPage<'a> {
    pub(super) mapping: &'a Mapping,
    pub(super) index: u64,
    /// The page's address (page-aligned), plus the number of the hazard
    /// entry that holds the pin, or 0 for a pin counted in the slot.
    pub(super) bytes_and_entry: usize,
    /// Keeps the guard on its thread, whose pin list (and hazard record)
    /// holds it.
    pub(super) not_send: PhantomData<*const [u8; PAGE_SIZE]>,
}

impl PinnedPage<'_> {
    /// The hazard entry that holds the pin, or `None` for a counted pin.
    fn hazard(&self) -> Option<EntryId> {
        Some(self.bytes_and_entry % PAGE_SIZE).filter(|&id| id != 0)
    }
}

impl PinnedPage<'_> {
    /// The page's index in its file.
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl Deref for PinnedPage<'_> {
    type Target = [u8; PAGE_SIZE];

    #[allow(unsafe_code)] // the page in place: what a pin is for
    fn deref(&self) -> &[u8; PAGE_SIZE] {
        // SAFETY: the page is present and pinned while `self` lives (counted
        // in its slot, or in a hazard entry that every `try_lock` scans for
        // after setting `LOCKED`, failing if it finds one): it is
        // not removed from the store (every drop locks it first, and a lock
        // waits for the pins), so its region stays and the view maps it; no
        // one writes it (buffered and direct writes lock it; stores through
        // the file's read-write maps were unmapped from it when the pin was
        // taken and wait in their fault), so shared references are sound.
        // The address is the page's, as `try_pin_cached` got it from the
        // store (page-aligned), with the entry's number masked off.
        unsafe { &*((self.bytes_and_entry & !(PAGE_SIZE - 1)) as *const [u8; PAGE_SIZE]) }
    }
}

impl Drop for PinnedPage<'_> {
    fn drop(&mut self) {
        let slot = || {
            self.mapping
                .pages
                .get(self.index)
                .expect("a pinned page has a slot")
        };
        match self.hazard() {
            // The slot is looked up only if a locker moved the pin there.
            Some(id) => {
                if Slot::clear_hazard(hazard::registry().entry(id)) {
                    slot().unpin_moved();
                }
            }
            None => slot().unpin(),
        }
        self.mapping.cache.counters.unpins.add();
        forget_held(self.mapping, self.index, false);
    }
}

/// A write pin of one cached page: its bytes in place, changed by
/// [`PinnedPageMut::write`]; the page is dirty once the guard is dropped. See
/// [`Mapping::pin_mut`].
///
/// There is no `&mut` to the bytes: an optimistic reader of another thread
/// that began its copy before the page was locked may still be copying, and a
/// plain store racing its copy would be a data race (the copy it makes is
/// discarded, but the race itself is not allowed); `write` stores as the
/// cache's own writes do.
pub struct PinnedPageMut<'a> {
    mapping: &'a Mapping,
    index: u64,
    bytes: *const [u8; PAGE_SIZE],
}

impl PinnedPageMut<'_> {
    /// The page's index in its file.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Copies `data` into the page at `offset`.
    ///
    /// # Panics
    /// If `offset + data.len()` is past the end of the page.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        assert!(
            offset <= PAGE_SIZE && data.len() <= PAGE_SIZE - offset,
            "a write outside the page"
        );
        self.mapping.store.write(self.index, offset, data);
    }
}

impl Deref for PinnedPageMut<'_> {
    type Target = [u8; PAGE_SIZE];

    #[allow(unsafe_code)] // the page in place: what a pin is for
    fn deref(&self) -> &[u8; PAGE_SIZE] {
        // SAFETY: as for `PinnedPage`, with the page locked by this guard:
        // only this guard's `write` changes it, and `write` takes `&mut self`,
        // so no reference from here lives across it.
        unsafe { &*self.bytes }
    }
}

impl Drop for PinnedPageMut<'_> {
    fn drop(&mut self) {
        let mapping = self.mapping;
        let slot = mapping
            .pages
            .get(self.index)
            .expect("a pinned page has a slot");
        mapping.cache.dirtied();
        slot.unlock_written();
        mapping.cache.counters.unpins.add();
        forget_held(mapping, self.index, true);
        mapping.touch_backend();
        if let Some(listener) = mapping.cache.listener.0.as_ref() {
            listener.after_change(mapping, page_range(self.index));
        }
    }
}

/// The bytes of page `index`.
fn page_range(index: u64) -> Range<u64> {
    start_of(index)..start_of(index + 1)
}

/// The key of `mapping` in the thread's list of held pins.
fn key(mapping: &Mapping) -> usize {
    mapping as *const Mapping as usize
}

fn remember_held(mapping: &Mapping, index: u64, for_writing: bool) {
    HELD.with(|held| held.borrow_mut().push((key(mapping), index, for_writing)));
}

fn forget_held(mapping: &Mapping, index: u64, for_writing: bool) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        let entry = (key(mapping), index, for_writing);
        if let Some(at) = held.iter().rposition(|&pin| pin == entry) {
            held.swap_remove(at);
        }
    });
}

/// `WouldBlock`, for a pin of page `index`, absent, that no page of the
/// budget can be freed for: every one is pinned.
pub(super) fn budget_all_pinned(index: u64) -> io::Error {
    with_message(
        libc::EWOULDBLOCK,
        format!("page {index} is not cached and every page of the cache's budget is pinned"),
    )
}

/// `EDEADLK`, for a call that would wait for the caller's own pin.
fn would_deadlock(index: u64) -> io::Error {
    with_message(
        libc::EDEADLK,
        format!("this thread holds a pin of page {index}, which the call would wait for"),
    )
}

impl Mapping {
    /// Fails with `EDEADLK` if this thread holds a pin of a page of `pages`
    /// (write pins only, if `writes_only`): the call would wait for it.
    pub(super) fn check_own_pins(&self, pages: Range<u64>, writes_only: bool) -> io::Result<()> {
        let me = key(self);
        let found = HELD.with(|held| {
            held.borrow()
                .iter()
                .find(|&&(mapping, index, for_writing)| {
                    mapping == me && pages.contains(&index) && (for_writing || !writes_only)
                })
                .map(|&(_, index, _)| index)
        });
        match found {
            Some(index) => Err(would_deadlock(index)),
            None => Ok(()),
        }
    }

    /// Waits while `busy` holds for `slot`'s state, counting the waits that
    /// pins caused.
    pub(super) fn wait_for_page(&self, slot: &Slot, busy: fn(PageState) -> bool) -> PageState {
        let state = slot.load();
        if busy(state) && state.is_pinned() && !state.is_locked() {
            stats::add(&self.cache.counters.pin_waits, 1);
        }
        slot.wait_while_state(busy)
    }

    /// Pins page `index` for reading, filling it first if it is not cached:
    /// the guard dereferences to the page's 4096 bytes, which no write, store,
    /// punch, truncate, zero range, collapse, insert, direct write,
    /// invalidation or eviction changes until it is dropped (those wait for
    /// it). Bytes past the end of file read as zeroes. Other threads' reads
    /// and pins of the page go on meanwhile.
    ///
    /// Fails with `EINVAL` for a page wholly past the end of file, `EDEADLK`
    /// if this thread holds a write pin of the page, and `WouldBlock` if the
    /// page is not cached and every page of the budget is pinned.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("table")?))?;
    /// file.write_all_at(b"row 1", 0)?;
    /// let page = file.pin(0)?;
    /// assert_eq!(&page[..5], b"row 1"); // in place: no copy
    /// // The caller's own punch would wait for its pin: refused instead.
    /// let error = file.punch_hole(0, 4096).unwrap_err();
    /// assert_eq!(filemap::errno(&error), Some(libc::EDEADLK));
    /// drop(page);
    /// file.punch_hole(0, 4096)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn pin(&self, index: u64) -> io::Result<PinnedPage<'_>> {
        self.check_live()?;
        self.check_own_pins(index..index + 1, true)?;
        loop {
            match self.try_pin_cached(index)? {
                Some(bytes_and_entry) => {
                    return Ok(PinnedPage {
                        mapping: self,
                        index,
                        bytes_and_entry,
                        not_send: PhantomData,
                    })
                }
                None => self.make_pinnable(index, PageState::is_locked_or_filling)?,
            }
        }
    }

    /// [`Mapping::pin`] that never waits: fails with `WouldBlock` if the page
    /// is not cached or is busy (being filled, written or dropped).
    pub fn try_pin(&self, index: u64) -> io::Result<PinnedPage<'_>> {
        self.check_live()?;
        match self.try_pin_cached(index)? {
            Some(bytes_and_entry) => Ok(PinnedPage {
                mapping: self,
                index,
                bytes_and_entry,
                not_send: PhantomData,
            }),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Pins page `index` for writing, filling it first if it is not cached:
    /// the guard holds the page's lock, shows its bytes and changes them in
    /// place ([`PinnedPageMut::write`]); the page is dirty once the guard is
    /// dropped. Readers of the page wait for it, as for a buffered write.
    ///
    /// Fails with `EINVAL` for a page wholly past the end of file, `EDEADLK`
    /// if this thread holds a pin of the page, and `WouldBlock` if the page
    /// is not cached and every page of the budget is pinned.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use filemap::{MemDevice, PageCache, Volume};
    ///
    /// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
    /// let cache = PageCache::builder().build()?;
    /// let file = cache.open(Arc::new(volume.create_file("table")?))?;
    /// file.set_len(4096)?;
    /// let mut page = file.pin_mut(0)?;
    /// page.write(100, b"tuple");
    /// assert_eq!(&page[100..105], b"tuple");
    /// drop(page); // dirty now
    /// let mut back = [0; 5];
    /// file.read_exact_at(&mut back, 100)?;
    /// assert_eq!(&back, b"tuple");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn pin_mut(&self, index: u64) -> io::Result<PinnedPageMut<'_>> {
        self.check_live()?;
        self.check_own_pins(index..index + 1, false)?;
        let range = page_range(index);
        if let Some(listener) = self.cache.listener.0.as_ref() {
            listener.before_change(self, range.clone());
        }
        let locked = self.lock_for_pin_mut(index);
        if locked.is_err() {
            if let Some(listener) = self.cache.listener.0.as_ref() {
                listener.after_change(self, range);
            }
        }
        let bytes = locked?;
        self.cache.counters.pins.add();
        remember_held(self, index, true);
        Ok(PinnedPageMut {
            mapping: self,
            index,
            bytes,
        })
    }

    /// Locks page `index` (filling it if needed) with stores through maps
    /// held back; returns its bytes.
    fn lock_for_pin_mut(&self, index: u64) -> io::Result<*const [u8; PAGE_SIZE]> {
        loop {
            let slot = self.pages.get_or_create(index);
            let state = slot.load();
            if state.is_readable() && !state.is_held() {
                if slot.try_lock(state).is_err() {
                    continue;
                }
                // A page locked for a write: stores through maps wait in
                // their fault until it is unlocked.
                self.trap_stores(&[index]);
                return Ok(self.page_bytes(index));
            }
            self.make_pinnable(index, PageState::is_held_or_filling)?;
        }
    }

    /// A read pin of page `index` if it is cached and not busy (`None`
    /// otherwise); fails for a page wholly past the end of file. A hazard pin
    /// if the thread's record has a free entry, else a pin counted in the
    /// slot.
    ///
    /// Returns the page's address plus the hazard entry's number (0 for a
    /// counted pin), as `PinnedPage` keeps them.
    pub(super) fn try_pin_cached(&self, index: u64) -> io::Result<Option<usize>> {
        if start_of(index) >= self.len() {
            return fail(libc::EINVAL);
        }
        let Some(slot) = self.pages.get(index) else {
            return Ok(None);
        };
        let hazard = own_record().and_then(|record| hazard::registry().free_entry(record));
        match hazard {
            Some(id) => {
                if slot.try_pin_hazard(hazard::registry().entry(id)).is_err() {
                    return Ok(None);
                }
            }
            None => loop {
                let state = slot.load();
                if !state.is_pinnable() {
                    return Ok(None);
                }
                if slot.try_pin(state).is_ok() {
                    break;
                }
            },
        }
        // Stores through the file's read-write maps must not change the page
        // under the pin: unmapped there, they fault and wait for the unpin.
        // Every pinner unmaps it, so no pin is handed out before the stores
        // are held back, whoever took the page's first pin.
        if self.store.traps_faults() {
            self.trap_stores(&[index]);
        }
        self.cache.counters.pins.add();
        remember_held(self, index, false);
        let bytes = self.page_bytes(index) as usize;
        debug_assert_eq!(bytes % PAGE_SIZE, 0);
        Ok(Some(bytes | hazard.unwrap_or(0)))
    }

    /// Brings page `index` to a state a pin can take: fills it if it is
    /// absent, else waits while `busy` holds. Fails for a page wholly past
    /// the end of file, and with `WouldBlock` if the budget is all pinned.
    fn make_pinnable(&self, index: u64, busy: fn(PageState) -> bool) -> io::Result<()> {
        if start_of(index) >= self.len() {
            return fail(libc::EINVAL);
        }
        let slot = self.pages.get_or_create(index);
        let state = slot.load();
        if state.is_absent() {
            let fill = self.lock_mode(Mode::Fill, page_range(index));
            return match self.fill(index, 1, FillBudget::Wait, Some(fill))? {
                Fill::CacheFull => Err(budget_all_pinned(index)),
                Fill::BeyondEof => fail(libc::EINVAL),
                Fill::Read { .. } | Fill::NotAbsent => Ok(()),
            };
        }
        if state.pins() == MAX_PINS {
            std::thread::yield_now();
            return Ok(());
        }
        self.wait_for_page(slot, busy);
        Ok(())
    }

    /// The bytes of page `index`, present (the caller pinned or locked it).
    fn page_bytes(&self, index: u64) -> *const [u8; PAGE_SIZE] {
        self.store.page(index).cast()
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::own_record;

    /// Threads that pinned and exited give their records back: many more of
    /// them one after another than the registry holds all get one.
    #[test]
    fn records_of_exited_threads_are_reused() {
        for _ in 0..1000 {
            let claimed = std::thread::spawn(|| own_record().is_some())
                .join()
                .unwrap();
            assert!(claimed, "a record of an exited thread was not given back");
        }
    }
}
