//! The page slot: one `AtomicU64` state word per cached page index.
//!
//! | bits | name | invariant |
//! |---|---|---|
//! | 0..32 | frame + 1 | 0: no frame. A frame is owned by exactly one slot, or by one fill. |
//! | 32 | `LOCKED` | the holder may change the frame's bytes and the flags; no one else may |
//! | 33 | `UPTODATE` | the frame holds the page's current data; optimistic readers may copy it |
//! | 34 | `DIRTY` | the frame is newer than the backend (implies `UPTODATE`) |
//! | 35 | `WRITEBACK` | a snapshot of the page is being written to the backend |
//! | 36 | `FILLING` | a fill owns the frame and is reading the backend (never with `UPTODATE`) |
//! | 37 | `WAITERS` | threads are parked on this slot; whoever clears a waited-on bit wakes them |
//! | 38..64 | version | bumped by every change of the frame's data or identity |
//!
//! A slot with no frame has no flags but `WAITERS`: the page is absent.
//!
//! The version is the page generation of the design: an optimistic reader copies
//! the frame between two loads of the state and keeps the copy only if the
//! version, frame and `UPTODATE`/`LOCKED` bits did not change; a fill records the
//! state when it claims the page and publishes with a compare-and-swap against it,
//! so a fill whose page was invalidated meanwhile never publishes.

use std::sync::atomic::{AtomicU64, Ordering};

use super::frame::FrameId;
use super::wait;

pub(crate) const FRAME_MASK: u64 = (1 << 32) - 1;
pub(crate) const LOCKED: u64 = 1 << 32;
pub(crate) const UPTODATE: u64 = 1 << 33;
pub(crate) const DIRTY: u64 = 1 << 34;
pub(crate) const WRITEBACK: u64 = 1 << 35;
pub(crate) const FILLING: u64 = 1 << 36;
pub(crate) const WAITERS: u64 = 1 << 37;
const VERSION_SHIFT: u32 = 38;
const VERSION_ONE: u64 = 1 << VERSION_SHIFT;
const VERSION_MASK: u64 = !(VERSION_ONE - 1);
/// The bits an optimistic reader re-checks: anything else changing (dirty,
/// writeback, waiters) leaves the bytes it copied valid.
const READ_SIGNATURE: u64 = VERSION_MASK | FRAME_MASK | UPTODATE | LOCKED;

/// A copy of a slot's state word with named predicates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageState(pub(crate) u64);

impl std::fmt::Debug for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flag = |bit, name| if self.0 & bit != 0 { name } else { "" };
        write!(
            f,
            "PageState(frame {:?} v{} {}{}{}{}{}{})",
            self.frame().map(|frame| frame.0),
            self.0 >> VERSION_SHIFT,
            flag(LOCKED, "L"),
            flag(UPTODATE, "U"),
            flag(DIRTY, "D"),
            flag(WRITEBACK, "W"),
            flag(FILLING, "F"),
            flag(WAITERS, "w"),
        )
    }
}

impl PageState {
    pub(crate) fn frame(self) -> Option<FrameId> {
        match self.0 & FRAME_MASK {
            0 => None,
            id => Some(FrameId((id - 1) as u32)),
        }
    }

    pub(crate) fn has(self, bits: u64) -> bool {
        self.0 & bits != 0
    }

    /// No frame: the page is not cached.
    pub(crate) fn is_absent(self) -> bool {
        self.0 & FRAME_MASK == 0
    }

    /// An optimistic reader may copy the frame.
    pub(crate) fn is_readable(self) -> bool {
        self.0 & (UPTODATE | LOCKED) == UPTODATE
    }

    /// Whether a copy made between `self` and `later` is valid.
    pub(crate) fn same_contents(self, later: PageState) -> bool {
        self.0 & READ_SIGNATURE == later.0 & READ_SIGNATURE
    }

    /// The absent state that follows this one (version bumped, waiters dropped).
    pub(crate) fn emptied(self) -> PageState {
        PageState(self.0.wrapping_add(VERSION_ONE) & VERSION_MASK)
    }

    /// `frame` installed with `flags`, version bumped, waiters dropped.
    pub(crate) fn with_frame(self, frame: FrameId, flags: u64) -> PageState {
        let version = self.0.wrapping_add(VERSION_ONE) & VERSION_MASK;
        PageState(version | (frame.0 as u64 + 1) | flags)
    }

    /// The same frame with `flags` set and `clear` cleared, version bumped when
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
    /// A waiter arriving meanwhile does not make it fail: only a real change does.
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
                Err(actual) if actual & !WAITERS == current.0 & !WAITERS => expected = actual,
                Err(actual) => return Err(PageState(actual)),
            }
        }
    }

    /// Sets `LOCKED` on a state without it; the caller then owns the frame's bytes.
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
