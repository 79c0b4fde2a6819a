//! Hazard pins: read pins that write only the pinning thread's own memory.
//!
//! A pin counted in the slot word ([`Slot::try_pin`]) writes the slot's cache
//! line twice per pin, and two threads pinning pages whose slots share lines
//! pass those lines between their cores on every pin and unpin. A hazard pin
//! instead writes the slot's address into an entry of the pinning thread's
//! own [`Record`] (one cache line) and then re-checks the slot; the unpin
//! clears the entry. Only lockers read the records: [`Slot::try_lock`] scans
//! them after setting `LOCKED`.
//!
//! Why the two cannot miss each other (the Dekker pattern): the pinner writes
//! its entry, then a `SeqCst` fence, then loads the slot; the locker sets
//! `LOCKED`, then a `SeqCst` fence, then loads the entries. The fences are
//! ordered one way or the other: if the pinner's is first, the locker sees the
//! entry; if the locker's is first, the pinner sees `LOCKED` and backs off.
//! (Fences rather than `SeqCst` accesses: loom models the fences exactly and
//! weakens `SeqCst` accesses to acquire-release.)
//!
//! A locker that finds hazard pins does not wait for them itself: it moves
//! them into the slot's pin count (count first, then marks the entry
//! [`MOVED`] by a compare-and-swap, and takes the count back if the pin went
//! first), and gives the lock back. From then on they are ordinary counted
//! pins: the page shows as pinned to everyone, waiters park on the slot as
//! they do for counted pins, and the unpin of a moved entry (which finds the
//! mark when it clears the entry) gives the counted pin back through
//! [`Slot::unpin_moved`], a transition, which wakes them. So nothing parks on
//! a hazard entry, and no wake can be lost between an entry and a waiter. An
//! unpin that finds no mark touches nothing but its entry: not even the
//! slot, whose lookup in the page tree cost the pin path a fifth of its time.
//!
//! What lockers pay: a fence and, per record ever claimed (threads that pin
//! at once, at most), one cache line of seven compares: about 3 ns a record
//! on top of a lock's compare-and-swap.
//!
//! [`Slot::try_pin`]: super::Slot::try_pin
//! [`Slot::try_lock`]: super::Slot::try_lock
//! [`Slot::unpin_moved`]: super::Slot::unpin_moved

use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Entries of one record: with the owner flag, one cache line. A thread
/// holding more read pins at once takes counted pins for the rest. (Under a
/// checker, fewer: each entry a locker loads is a step the checker explores.)
#[cfg(not(any(loom, shuttle)))]
pub(crate) const ENTRIES: usize = 7;
#[cfg(any(loom, shuttle))]
pub(crate) const ENTRIES: usize = 2;

/// Records in the registry: threads beyond this many holding a record at
/// once take counted pins.
#[cfg(not(any(loom, shuttle)))]
const RECORDS: usize = 256;
#[cfg(any(loom, shuttle))]
const RECORDS: usize = 3;

/// The mark of an entry whose pin a locker moved into the slot's count (slot
/// addresses are 8-aligned, so the low bit is free).
pub(crate) const MOVED: usize = 1;

/// One thread's hazard entries: each is 0 (free), a slot's address (a pin of
/// that slot) or the address with [`MOVED`] (a pin now counted in the slot).
/// Only the owner makes an entry non-zero or clears it; lockers only mark it.
#[repr(align(64))]
pub(crate) struct Record {
    entries: [AtomicUsize; ENTRIES],
    /// A thread holds the record.
    owned: AtomicBool,
}

/// An entry's number in the registry, from 1 (0 is no entry): small enough
/// for the 12 low bits of a page's address, which a read pin's guard carries
/// it in (a guard of three words is returned in registers' reach; one more
/// word slowed pins by a third).
pub(crate) type EntryId = usize;

/// The most entries, all numbered below the size of a page.
const _: () = assert!(RECORDS * ENTRIES < 4096);

impl Record {
    #[cfg(not(any(loom, shuttle)))]
    #[allow(clippy::declare_interior_mutable_const)] // only the static's initialiser
    const FREE: Record = Record {
        entries: [const { AtomicUsize::new(0) }; ENTRIES],
        owned: AtomicBool::new(false),
    };

    #[cfg(any(loom, shuttle))]
    fn free() -> Record {
        Record {
            entries: std::array::from_fn(|_| AtomicUsize::new(0)),
            owned: AtomicBool::new(false),
        }
    }
}

/// Every thread's record, for lockers to scan.
pub(crate) struct Registry {
    /// How many records were ever claimed: lockers scan no further.
    high: AtomicUsize,
    records: [Record; RECORDS],
}

#[cfg(not(any(loom, shuttle)))]
static REGISTRY: Registry = Registry {
    high: AtomicUsize::new(0),
    records: [Record::FREE; RECORDS],
};

#[cfg(any(loom, shuttle))]
crate::sync::lazy_static! {
    /// Afresh for every execution a checker explores.
    static ref REGISTRY: Registry = Registry {
        high: AtomicUsize::new(0),
        records: std::array::from_fn(|_| Record::free()),
    };
}

/// The process's registry of hazard records.
#[inline]
pub(crate) fn registry() -> &'static Registry {
    &REGISTRY
}

impl Registry {
    /// A free entry of record `record` (its number from [`Registry::claim`]),
    /// if any. Only the record's owner may call this: it alone makes entries
    /// non-zero.
    #[inline]
    pub(crate) fn free_entry(&self, record: usize) -> Option<EntryId> {
        self.records[record]
            .entries
            .iter()
            .position(|entry| entry.load(Ordering::Relaxed) == 0)
            .map(|at| record * ENTRIES + at + 1)
    }

    /// The entry numbered `id`.
    #[inline]
    pub(crate) fn entry(&self, id: EntryId) -> &AtomicUsize {
        let at = id - 1;
        &self.records[at / ENTRIES].entries[at % ENTRIES]
    }

    /// Claims a free record for the calling thread and returns its number,
    /// or `None` if every one is held.
    pub(crate) fn claim(&self) -> Option<usize> {
        for (at, record) in self.records.iter().enumerate() {
            if !record.owned.load(Ordering::Relaxed)
                && record
                    .owned
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // Raised before the owner writes any entry, so a locker whose
                // fence follows the owner's pin fence sees the record counted.
                self.high.fetch_max(at + 1, Ordering::Release);
                return Some(at);
            }
        }
        None
    }

    /// Gives `record` back when its thread exits. A record that still has an
    /// entry (a guard forgotten rather than dropped) stays claimed, so that its
    /// pin stays seen.
    pub(crate) fn release(&self, record: usize) {
        let record = &self.records[record];
        if record
            .entries
            .iter()
            .all(|entry| entry.load(Ordering::Acquire) == 0)
        {
            record.owned.store(false, Ordering::Release);
        }
    }

    /// The entries of every record ever claimed, for a locker to scan after
    /// its fence.
    #[inline]
    pub(crate) fn entries(&self) -> impl Iterator<Item = &AtomicUsize> {
        let high = self.high.load(Ordering::Acquire);
        self.records[..high]
            .iter()
            .flat_map(|record| record.entries.iter())
    }
}
