//! The page slot: one `AtomicU64` state word per cached page index.
//!
//! | bit(s) | name | invariant |
//! |---|---|---|
//! | 0 | `PRESENT` | the page is in the mapping's page store (and counted against the budget) |
//! | 1 | `LOCKED` | the holder may change the page's bytes, presence and flags; no one else may |
//! | 2 | `UPTODATE` | the stored page holds the page's current data; optimistic readers may copy it |
//! | 3 | `DIRTY` | the stored page is newer than the backend (implies `UPTODATE`) |
//! | 4 | `WRITEBACK` | a snapshot of the page is being written to the backend |
//! | 5 | `FILLING` | a fill claimed the page and is reading the backend; it holds the page's budget |
//! | 6 | `WAITERS` | threads are parked on this slot; whoever clears a waited-on bit wakes them |
//! | 7 | `REFERENCED` | read since the eviction hand last passed (set by hits only when clear) |
//! | 8 | `QUEUED` | the slot has its one entry in the eviction queue; survives the page going |
//! | 9..64 | version | bumped by every change of the page's data or presence |
//!
//! A slot with none of `PRESENT`, `FILLING` and `LOCKED` has no flags but
//! `WAITERS`: the page is absent. `UPTODATE` implies `PRESENT`. A writer creating
//! a page locks the absent slot, installs the page, then sets `PRESENT`.
//!
//! The version is the page generation of the design: an optimistic reader copies
//! the page between two loads of the state and keeps the copy only if the
//! version and the `UPTODATE`/`LOCKED` bits did not change; a fill records the
//! state when it claims the page and installs only after locking exactly that
//! state, so a fill whose page was invalidated meanwhile never installs.

use std::sync::atomic::{AtomicU64, Ordering};

use super::wait;

pub(crate) const PRESENT: u64 = 1 << 0;
pub(crate) const LOCKED: u64 = 1 << 1;
pub(crate) const UPTODATE: u64 = 1 << 2;
pub(crate) const DIRTY: u64 = 1 << 3;
pub(crate) const WRITEBACK: u64 = 1 << 4;
pub(crate) const FILLING: u64 = 1 << 5;
pub(crate) const WAITERS: u64 = 1 << 6;
pub(crate) const REFERENCED: u64 = 1 << 7;
pub(crate) const QUEUED: u64 = 1 << 8;
const VERSION_SHIFT: u32 = 9;
const VERSION_ONE: u64 = 1 << VERSION_SHIFT;
const VERSION_MASK: u64 = !(VERSION_ONE - 1);
/// The bits an optimistic reader re-checks: anything else changing (dirty,
/// writeback, waiters, referenced, queued) leaves the bytes it copied valid.
const READ_SIGNATURE: u64 = VERSION_MASK | PRESENT | UPTODATE | LOCKED;

/// A copy of a slot's state word with named predicates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageState(pub(crate) u64);

impl std::fmt::Debug for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flag = |bit, name| if self.0 & bit != 0 { name } else { "" };
        write!(
            f,
            "PageState(v{} {}{}{}{}{}{}{}{}{})",
            self.0 >> VERSION_SHIFT,
            flag(PRESENT, "P"),
            flag(LOCKED, "L"),
            flag(UPTODATE, "U"),
            flag(DIRTY, "D"),
            flag(WRITEBACK, "W"),
            flag(FILLING, "F"),
            flag(WAITERS, "w"),
            flag(REFERENCED, "r"),
            flag(QUEUED, "q"),
        )
    }
}

impl PageState {
    pub(crate) fn has(self, bits: u64) -> bool {
        self.0 & bits != 0
    }

    /// Neither stored, claimed by a fill, nor being created by a writer: the
    /// page is not cached.
    pub(crate) fn is_absent(self) -> bool {
        self.0 & (PRESENT | FILLING | LOCKED) == 0
    }

    /// An optimistic reader may copy the stored page.
    pub(crate) fn is_readable(self) -> bool {
        self.0 & (UPTODATE | LOCKED) == UPTODATE
    }

    /// Whether `later` is still the fill claim `self` (same version, `FILLING`),
    /// whatever other flags (dirty, waiters) were added to it.
    pub(crate) fn is_same_claim(self, later: PageState) -> bool {
        later.has(FILLING) && self.0 & VERSION_MASK == later.0 & VERSION_MASK
    }

    /// Whether a copy made between `self` and `later` is valid.
    pub(crate) fn same_contents(self, later: PageState) -> bool {
        self.0 & READ_SIGNATURE == later.0 & READ_SIGNATURE
    }

    /// The absent state that follows this one (version bumped, flags dropped
    /// but `QUEUED`, which belongs to the eviction queue).
    pub(crate) fn emptied(self) -> PageState {
        PageState(self.0.wrapping_add(VERSION_ONE) & (VERSION_MASK | QUEUED))
    }

    /// Only `flags` set (and `QUEUED` kept), version bumped.
    pub(crate) fn with_flags(self, flags: u64) -> PageState {
        PageState((self.0.wrapping_add(VERSION_ONE) & (VERSION_MASK | QUEUED)) | flags)
    }

    /// The same state with `flags` set and `clear` cleared, version bumped when
    /// `bump` (the data changed), waiters dropped.
    pub(crate) fn transition(self, set: u64, clear: u64, bump: bool) -> PageState {
        let word = if bump {
            self.0.wrapping_add(VERSION_ONE)
        } else {
            self.0
        };
        PageState((word | set) & !(clear | WAITERS))
    }
}

/// One page index's slot.
pub(crate) struct Slot(AtomicU64);

impl Default for Slot {
    fn default() -> Self {
        Slot(AtomicU64::new(0))
    }
}

impl Slot {
    #[inline]
    pub(crate) fn load(&self) -> PageState {
        PageState(self.0.load(Ordering::Acquire))
    }

    /// Replaces `current` with `new`, waking parked threads if there were any
    /// (every transition clears `WAITERS`, so they re-check what they wait for).
    /// A waiter arriving or a hit marking the page referenced meanwhile does not
    /// make it fail (the mark is then dropped): only a real change does.
    pub(crate) fn replace(&self, current: PageState, new: PageState) -> Result<(), PageState> {
        let mut expected = current.0;
        loop {
            match self
                .0
                .compare_exchange(expected, new.0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if expected & WAITERS != 0 {
                        wait::wake_all(self.key());
                    }
                    return Ok(());
                }
                Err(actual)
                    if actual & !(WAITERS | REFERENCED) == current.0 & !(WAITERS | REFERENCED) =>
                {
                    expected = actual
                }
                Err(actual) => return Err(PageState(actual)),
            }
        }
    }

    /// Sets `flag` (`FILLING` or `LOCKED`) on the slot if the page is absent,
    /// whatever other flags it has or gains meanwhile; returns the state it
    /// set, or `None` once the page is not absent.
    pub(crate) fn claim_absent(&self, flag: u64) -> Option<PageState> {
        loop {
            let state = self.load();
            if !state.is_absent() {
                return None;
            }
            let claimed = state.with_flags(flag);
            if self.replace(state, claimed).is_ok() {
                return Some(claimed);
            }
        }
    }

    /// Sets `LOCKED` on a state without it; the caller then owns the page's bytes.
    pub(crate) fn try_lock(&self, current: PageState) -> Result<(), PageState> {
        debug_assert!(!current.has(LOCKED));
        self.0
            .compare_exchange(
                current.0,
                current.0 | LOCKED,
                Ordering::Acquire,
                Ordering::Acquire,
            )
            .map(drop)
            .map_err(PageState)
    }

    /// Applies `change` to the current state atomically (it must keep `LOCKED`
    /// owners' rules), waking waiters if the old state had any.
    pub(crate) fn update(&self, mut change: impl FnMut(PageState) -> PageState) -> PageState {
        let mut current = self.load();
        loop {
            match self.replace(current, change(current)) {
                Ok(()) => return current,
                Err(actual) => current = actual,
            }
        }
    }

    /// Marks the page referenced for the eviction hand, if `seen` (a state a
    /// hit just validated its copy against) is still current and unmarked. Writes
    /// shared memory only for the first hit after the hand cleared the mark.
    #[inline]
    pub(crate) fn mark_referenced(&self, seen: PageState) {
        if !seen.has(REFERENCED) {
            let _ = self.0.compare_exchange(
                seen.0,
                seen.0 | REFERENCED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Clears the referenced mark; returns whether it was set.
    pub(crate) fn take_referenced(&self) -> bool {
        self.0.fetch_and(!REFERENCED, Ordering::Relaxed) & REFERENCED != 0
    }

    /// Waits until none of `bits` is set, returning the state seen last.
    pub(crate) fn wait_while(&self, bits: u64) -> PageState {
        loop {
            let state = self.load();
            if !state.has(bits) {
                return state;
            }
            if !state.has(WAITERS)
                && self
                    .0
                    .compare_exchange(
                        state.0,
                        state.0 | WAITERS,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                continue;
            }
            wait::park(self.key(), || {
                let now = PageState(self.0.load(Ordering::Acquire));
                now.has(bits) && now.has(WAITERS)
            });
        }
    }

    fn key(&self) -> usize {
        &self.0 as *const AtomicU64 as usize
    }
}
