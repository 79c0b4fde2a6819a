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
//! | 9..16 | pins | read pins counted here ([`crate::PinnedPage`] past its thread's hazard entries, writeback's, locked reads', and hazard pins a locker moved here): while any is, no one may lock the page |
//! | 16..64 | version | bumped by every change of the page's data or presence |
//!
//! Most read pins are not in the word: a hazard pin is the slot's address in
//! an entry of the pinning thread's record ([`hazard`]), which `try_lock`
//! scans once it has set `LOCKED`; finding one, it moves it into the count
//! and fails, so from there on it is a counted pin like any other.
//!
//! Pins are a reader count beside the seqlock: a pinned page is present, up
//! to date and not locked, and `try_lock` fails while pins are held, so its
//! bytes cannot change until the last unpin. Pins are no part of what an
//! optimistic reader re-checks (the version, `UPTODATE`, `LOCKED`), so a pin
//! taken or released during a hit's copy does not void it: pins never hold
//! up hits. They are no marks either: a transition computed from a state
//! whose pin count changed meanwhile fails its compare-and-swap, and is
//! computed again.
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
//!
//! As tokio's task state: [`PageState`] is a copy of the word with named
//! predicates (`is_*`) and named transitions, each a pure function returning
//! the next state; [`Slot`] applies them to the word atomically under the
//! matching verb. Callers name what happens to the page and never build bits:
//!
//! | `PageState` | `Slot` | from | to | version |
//! |---|---|---|---|---|
//! | `claimed_for_fill` | `claim_for_fill` | absent | `FILLING` | bumped |
//! | `locked_for_create` | `lock_for_create` | absent | `LOCKED` | bumped |
//! | `locked` | `try_lock`, `lock_fill_claim` | not `LOCKED` | `+LOCKED` | kept |
//! | `published(dirty)` | `publish` | `LOCKED` (a fill's: `FILLING`) | `+PRESENT +UPTODATE +QUEUED` (`+DIRTY`), `-LOCKED -FILLING` | bumped |
//! | `unlocked` | `unlock` | `LOCKED` | `-LOCKED` | kept |
//! | `written` | `unlock_written` | `LOCKED` | `-LOCKED +DIRTY` | bumped |
//! | `changed` | `unlock_changed` | `LOCKED` | `-LOCKED` | bumped |
//! | `emptied` | `empty`, `abandon_fill` | `LOCKED`, or the fill's own claim | absent (`QUEUED` kept) | bumped |
//! | `unqueued` | `unqueue_absent` | absent | `-QUEUED` | kept |
//! | `writeback_done` | `end_writeback(false)` | `WRITEBACK` | `-WRITEBACK` | kept |
//! | `writeback_failed` | `end_writeback(true)` | `WRITEBACK` | `-WRITEBACK +DIRTY` | kept |
//! | `cleaned` | `mark_clean` | `LOCKED`, `DIRTY` | `-DIRTY` | kept |
//! | `dirtied` | `mark_dirty_by_store` | `PRESENT` or `LOCKED` | `+DIRTY` | kept |
//! | `referenced` | `mark_referenced` | readable | `+REFERENCED` | kept |
//! | `pinned` | `try_pin` | readable, pins below the most | pins + 1 | kept |
//! | `unpinned` | `unpin` | pinned | pins - 1 | kept |
//! | (none) | `try_pin_hazard` | readable | unchanged (the thread's entry holds the pin) | kept |
//! | `unpinned` | `unpin_hazard` of a moved pin | pinned | pins - 1 (else only the entry is cleared) | kept |
//! | `unlocked` | `try_lock` finding hazard pins | its own `LOCKED` | `-LOCKED`, pins + those it moved | kept |
//! | `writeback_started_pinned` | `finish_pinned_snapshot` | pinned, `DIRTY`, not `WRITEBACK` | pins - 1, `-DIRTY +WRITEBACK` | kept |
//!
//! A [`Slot`] makes a transition by [`Slot::replace`], which wakes the threads
//! parked on the slot (they re-check what they wait for), and the transitions
//! drop `WAITERS` with it, but for `locked` and `unqueued`, which change one
//! bit only. The plain compare-and-swaps of `try_lock` and `mark_referenced`
//! wake no one, so they keep `WAITERS`.
//!
//! The protocol is model-checked: `page/model.rs` runs a fill racing an
//! invalidation, a hit racing a rewrite, a writeback racing a write, and
//! counted and hazard pins racing writes and locks on a real [`Slot`] under
//! loom and shuttle (see `.ci/run`).

pub(crate) mod hazard;

use super::wait;
use crate::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

const PRESENT: u64 = 1 << 0;
const LOCKED: u64 = 1 << 1;
const UPTODATE: u64 = 1 << 2;
const DIRTY: u64 = 1 << 3;
const WRITEBACK: u64 = 1 << 4;
const FILLING: u64 = 1 << 5;
const WAITERS: u64 = 1 << 6;
const REFERENCED: u64 = 1 << 7;
const QUEUED: u64 = 1 << 8;
const PIN_SHIFT: u32 = 9;
const PIN_ONE: u64 = 1 << PIN_SHIFT;
/// The most pins one page holds at once; a pin beyond waits for an unpin.
pub(crate) const MAX_PINS: u64 = 127;
const PIN_MASK: u64 = MAX_PINS << PIN_SHIFT;
const VERSION_SHIFT: u32 = 16;
const VERSION_ONE: u64 = 1 << VERSION_SHIFT;
const VERSION_MASK: u64 = !(VERSION_ONE - 1);
/// The bits an optimistic reader re-checks: anything else changing (dirty,
/// writeback, waiters, referenced, queued) leaves the bytes it copied valid.
const READ_SIGNATURE: u64 = VERSION_MASK | PRESENT | UPTODATE | LOCKED;
/// Marks a compare-and-swap on the slot tolerates: a waiter arriving or a hit
/// marking the page referenced is no change of the page.
const MARKS: u64 = WAITERS | REFERENCED;

/// A copy of a slot's state word with named predicates and transitions: the
/// bits stay inside this file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageState(u64);

impl std::fmt::Debug for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flag = |bit, name| if self.0 & bit != 0 { name } else { "" };
        write!(
            f,
            "PageState(v{} p{} {}{}{}{}{}{}{}{}{})",
            self.0 >> VERSION_SHIFT,
            self.pins(),
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

// Predicates.
impl PageState {
    /// Whether any of `bits` is set.
    fn has(self, bits: u64) -> bool {
        self.0 & bits != 0
    }

    /// The page is in the page store.
    pub(crate) fn is_present(self) -> bool {
        self.has(PRESENT)
    }

    /// Someone holds the page's lock.
    pub(crate) fn is_locked(self) -> bool {
        self.has(LOCKED)
    }

    /// The stored page holds the page's current data.
    pub(crate) fn is_uptodate(self) -> bool {
        self.has(UPTODATE)
    }

    /// The stored page is newer than the backend.
    pub(crate) fn is_dirty(self) -> bool {
        self.has(DIRTY)
    }

    /// A snapshot of the page is being written to the backend.
    pub(crate) fn is_under_writeback(self) -> bool {
        self.has(WRITEBACK)
    }

    /// A fill claimed the page.
    pub(crate) fn is_filling(self) -> bool {
        self.has(FILLING)
    }

    /// Threads are parked on the slot.
    pub(crate) fn has_waiters(self) -> bool {
        self.has(WAITERS)
    }

    /// A hit read the page since the eviction hand last passed.
    pub(crate) fn is_referenced(self) -> bool {
        self.has(REFERENCED)
    }

    /// The slot has its entry in the eviction queue.
    pub(crate) fn is_queued(self) -> bool {
        self.has(QUEUED)
    }

    /// Neither stored, claimed by a fill, nor being created by a writer: the
    /// page is not cached.
    pub(crate) fn is_absent(self) -> bool {
        self.0 & (PRESENT | FILLING | LOCKED) == 0
    }

    /// Locked, being filled, under writeback or pinned: eviction skips the
    /// page, and a change or a drop of it waits.
    pub(crate) fn is_busy(self) -> bool {
        self.has(LOCKED | FILLING | WRITEBACK | PIN_MASK)
    }

    /// How many read pins are held.
    pub(crate) fn pins(self) -> u64 {
        (self.0 & PIN_MASK) >> PIN_SHIFT
    }

    /// Read pins are held: no one may lock the page.
    pub(crate) fn is_pinned(self) -> bool {
        self.has(PIN_MASK)
    }

    /// Locked or pinned: a locker waits.
    pub(crate) fn is_held(self) -> bool {
        self.has(LOCKED | PIN_MASK)
    }

    /// Locked, pinned or being filled: a locker of a present page waits.
    pub(crate) fn is_held_or_filling(self) -> bool {
        self.has(LOCKED | PIN_MASK | FILLING)
    }

    /// Readable and below the most pins: a pin may be taken.
    pub(crate) fn is_pinnable(self) -> bool {
        self.is_readable() && self.pins() < MAX_PINS
    }

    /// Locked or being filled: its bytes or presence are about to change.
    pub(crate) fn is_locked_or_filling(self) -> bool {
        self.has(LOCKED | FILLING)
    }

    /// Present, or locked (a store through a map can land on a page a fill
    /// installed before it publishes it): a page a store can have changed.
    pub(crate) fn is_present_or_locked(self) -> bool {
        self.has(PRESENT | LOCKED)
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

    /// Whether `later` differs from `self` only in marks (`WAITERS`,
    /// `REFERENCED`), which are no change of the page.
    fn same_but_marks(self, later: PageState) -> bool {
        self.0 & !MARKS == later.0 & !MARKS
    }
}

// Transitions: each returns the next state; `Slot` applies it.
impl PageState {
    /// The absent state that follows this one (version bumped, flags dropped
    /// but `QUEUED`, which belongs to the eviction queue): a drop, an eviction,
    /// a failed install, a fill giving its claim back.
    #[must_use]
    pub(crate) fn emptied(self) -> PageState {
        PageState(self.0.wrapping_add(VERSION_ONE) & (VERSION_MASK | QUEUED))
    }

    /// An absent page claimed by a fill (`FILLING`), version bumped.
    #[must_use]
    pub(crate) fn claimed_for_fill(self) -> PageState {
        self.fresh(FILLING)
    }

    /// An absent page locked by a writer that creates it, version bumped.
    #[must_use]
    pub(crate) fn locked_for_create(self) -> PageState {
        self.fresh(LOCKED)
    }

    /// Locked, nothing else changed: a plain compare-and-swap takes it, so
    /// `WAITERS` stays (no one is woken). A fill's claim never has `WAITERS`
    /// (a claim is a fresh state), so locking it drops none either.
    #[must_use]
    pub(crate) fn locked(self) -> PageState {
        PageState(self.0 | LOCKED)
    }

    /// The installed page made visible: present and up to date (and dirty if
    /// `dirty`), unlocked and no longer being filled, queued for eviction,
    /// version bumped.
    #[must_use]
    pub(crate) fn published(self, dirty: bool) -> PageState {
        let dirty = if dirty { DIRTY } else { 0 };
        self.next(PRESENT | UPTODATE | QUEUED | dirty, LOCKED | FILLING, true)
    }

    /// Unlocked by a holder that changed nothing.
    #[must_use]
    pub(crate) fn unlocked(self) -> PageState {
        self.next(0, LOCKED, false)
    }

    /// Unlocked by a holder that wrote the page: dirty, version bumped.
    #[must_use]
    pub(crate) fn written(self) -> PageState {
        self.next(DIRTY, LOCKED, true)
    }

    /// Unlocked by a holder that changed the bytes to what the backend holds
    /// (or is about to): version bumped, dirtiness unchanged.
    #[must_use]
    pub(crate) fn changed(self) -> PageState {
        self.next(0, LOCKED, true)
    }

    /// The eviction queue's entry of an absent page gone: `QUEUED` cleared,
    /// nothing else (waiters kept).
    #[must_use]
    pub(crate) fn unqueued(self) -> PageState {
        PageState(self.0 & !QUEUED)
    }

    /// The snapshot reached the backend: writeback over.
    #[must_use]
    pub(crate) fn writeback_done(self) -> PageState {
        self.next(0, WRITEBACK, false)
    }

    /// The snapshot did not reach the backend: writeback over, dirty again.
    #[must_use]
    pub(crate) fn writeback_failed(self) -> PageState {
        self.next(DIRTY, WRITEBACK, false)
    }

    /// A locked page written back by its holder: clean (still locked).
    #[must_use]
    pub(crate) fn cleaned(self) -> PageState {
        self.next(0, DIRTY, false)
    }

    /// A page changed by a store through a map: dirty.
    #[must_use]
    pub(crate) fn dirtied(self) -> PageState {
        self.next(DIRTY, 0, false)
    }

    /// Marked read for the eviction hand, nothing else changed (a plain
    /// compare-and-swap takes it, `WAITERS` stays).
    #[must_use]
    pub(crate) fn referenced(self) -> PageState {
        PageState(self.0 | REFERENCED)
    }

    /// One more read pin (a plain compare-and-swap takes it, `WAITERS`
    /// stays: no one waits for a pin to be taken).
    #[must_use]
    pub(crate) fn pinned(self) -> PageState {
        debug_assert!(self.is_pinnable());
        PageState(self.0 + PIN_ONE)
    }

    /// One read pin fewer; the `Slot` wakes the waiters, who re-check.
    #[must_use]
    pub(crate) fn unpinned(self) -> PageState {
        debug_assert!(self.is_pinned());
        PageState(self.0 - PIN_ONE).next(0, 0, false)
    }

    /// A pinned dirty page whose snapshot the pin kept steady: the pin given
    /// back, clean, its snapshot under writeback. A write from now on dirties
    /// it again.
    #[must_use]
    pub(crate) fn writeback_started_pinned(self) -> PageState {
        PageState(self.0 - PIN_ONE).next(WRITEBACK, DIRTY, false)
    }

    /// Marked as having threads parked on it (a plain compare-and-swap).
    #[must_use]
    fn with_waiters(self) -> PageState {
        PageState(self.0 | WAITERS)
    }

    /// Only `flags` set (and `QUEUED` kept), version bumped.
    fn fresh(self, flags: u64) -> PageState {
        PageState((self.0.wrapping_add(VERSION_ONE) & (VERSION_MASK | QUEUED)) | flags)
    }

    /// `set` set and `clear` cleared, version bumped when `bump`, waiters
    /// dropped (the `Slot` wakes them).
    fn next(self, set: u64, clear: u64, bump: bool) -> PageState {
        let word = if bump {
            self.0.wrapping_add(VERSION_ONE)
        } else {
            self.0
        };
        PageState((word | set) & !(clear | WAITERS))
    }
}

/// What one optimistic read of a page found ([`Slot::read_optimistic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OptimisticRead {
    /// The page was not readable: nothing was copied.
    NotReadable,
    /// The page changed during the copy: the copy is void.
    Changed,
    /// The copy is the page's current data.
    Copied,
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
                    if PageState(expected).has_waiters() {
                        wait::wake_all(self.key());
                    }
                    return Ok(());
                }
                Err(actual) if current.same_but_marks(PageState(actual)) => expected = actual,
                Err(actual) => return Err(PageState(actual)),
            }
        }
    }

    /// Sets `LOCKED` on a state without it and without pins; the caller then
    /// owns the page's bytes. Fails while pins are held: counted pins (in
    /// `current`) or hazard pins, which it finds once it holds the lock; it
    /// then moves them into the count and gives the lock back, so the state
    /// it fails with shows the page pinned and the caller waits as for any
    /// pin (see `hazard`).
    pub(crate) fn try_lock(&self, current: PageState) -> Result<(), PageState> {
        debug_assert!(!current.is_locked());
        if current.is_pinned() {
            return Err(current);
        }
        self.0
            .compare_exchange(
                current.0,
                current.locked().0,
                Ordering::Acquire,
                Ordering::Acquire,
            )
            .map_err(PageState)?;
        if self.move_hazard_pins() == 0 {
            return Ok(());
        }
        let before = self.apply(PageState::unlocked);
        Err(before.unlocked())
    }

    /// Moves the hazard pins of this slot into its count, under the lock the
    /// caller just took (while it holds it, no pin is counted but these);
    /// returns how many it moved. Each is counted before its entry is marked,
    /// so its unpin, which finds the mark, never gives back a pin not yet
    /// counted; a pin given back before the mark is counted back out.
    fn move_hazard_pins(&self) -> u64 {
        // Pairs with the pinner's fence between writing its entry and loading
        // the state: one of the two sees the other (see `hazard`).
        fence(Ordering::SeqCst);
        let key = self.key();
        let mut moved = 0;
        for entry in hazard::registry().entries() {
            if moved == MAX_PINS {
                // The rest stay hazard pins; the count shows the page pinned,
                // and the next `try_lock` after the count drops moves them.
                break;
            }
            if entry.load(Ordering::Acquire) != key {
                continue;
            }
            self.0.fetch_add(PIN_ONE, Ordering::Relaxed);
            // Release: the unpin that finds the mark sees the count.
            match entry.compare_exchange(
                key,
                key | hazard::MOVED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => moved += 1,
                // Given back meanwhile: nothing to count. The lock is held,
                // so no one waits on the count going down but for `LOCKED`.
                Err(_) => {
                    self.0.fetch_sub(PIN_ONE, Ordering::Relaxed);
                }
            }
        }
        moved
    }

    /// Takes a hazard pin of the page in `entry`, a free entry of the calling
    /// thread's own record, if the page is readable: writes nothing shared
    /// (but the referenced mark, as a hit). Returns the state the pin holds;
    /// on failure the entry is free again.
    #[inline]
    pub(crate) fn try_pin_hazard(&self, entry: &AtomicUsize) -> Result<PageState, PageState> {
        entry.store(self.key(), Ordering::Relaxed);
        // Pairs with the fence of `move_hazard_pins`: either a locker sees
        // the entry, or this load sees its `LOCKED`.
        fence(Ordering::SeqCst);
        let state = self.load();
        if !state.is_readable() {
            self.unpin_hazard(entry);
            return Err(state);
        }
        self.mark_referenced(state);
        Ok(state)
    }

    /// Gives back the hazard pin in `entry`. If a locker moved it into the
    /// count meanwhile, gives the counted pin back, waking the waiters.
    #[inline]
    pub(crate) fn unpin_hazard(&self, entry: &AtomicUsize) {
        if Slot::clear_hazard(entry) {
            self.unpin_moved();
        }
    }

    /// Clears the hazard entry `entry`; returns whether a locker had moved
    /// its pin into the slot's count, which the caller then gives back with
    /// [`Slot::unpin_moved`]. Touches no slot: an unpin that was not moved
    /// need not even find its slot.
    #[inline]
    pub(crate) fn clear_hazard(entry: &AtomicUsize) -> bool {
        // Release: the page was read before a locker that sees the entry
        // free writes it. Acquire: a mark comes with its pin counted.
        entry.swap(0, Ordering::AcqRel) & hazard::MOVED != 0
    }

    /// Gives back a pin a locker moved from a hazard entry into the count,
    /// waking the waiters.
    pub(crate) fn unpin_moved(&self) {
        self.apply(PageState::unpinned);
    }

    /// Marks the page referenced for the eviction hand, if `seen` (a state a
    /// hit just validated its copy against) is still current and unmarked. Writes
    /// shared memory only for the first hit after the hand cleared the mark.
    #[inline]
    pub(crate) fn mark_referenced(&self, seen: PageState) {
        if !seen.is_referenced() {
            let _ = self.0.compare_exchange(
                seen.0,
                seen.referenced().0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Takes a read pin of the page in state `current`, if it is still that
    /// state and pinnable; the page's bytes then stay as they are until
    /// [`Slot::unpin`].
    #[inline]
    pub(crate) fn try_pin(&self, current: PageState) -> Result<(), PageState> {
        if !current.is_pinnable() {
            return Err(current);
        }
        self.0
            .compare_exchange(
                current.0,
                current.pinned().0,
                Ordering::Acquire,
                Ordering::Acquire,
            )
            .map(drop)
            .map_err(PageState)
    }

    /// Gives a read pin back (marking the page referenced, as a hit does),
    /// waking the threads that wait to lock it.
    #[inline]
    pub(crate) fn unpin(&self) {
        self.apply(|state| PageState(state.unpinned().0 | REFERENCED));
    }

    /// Ends a writeback snapshot taken under the caller's pin: if the page is
    /// still dirty and under no other writeback, it becomes clean and under
    /// writeback (`true`: the caller writes the snapshot); else the pin is
    /// only given back (`false`).
    pub(crate) fn finish_pinned_snapshot(&self) -> bool {
        let before = self.apply(|state| {
            if state.is_dirty() && !state.is_under_writeback() {
                state.writeback_started_pinned()
            } else {
                state.unpinned()
            }
        });
        before.is_dirty() && !before.is_under_writeback()
    }

    /// Clears the referenced mark; returns whether it was set.
    pub(crate) fn take_referenced(&self) -> bool {
        PageState(self.0.fetch_and(!REFERENCED, Ordering::Relaxed)).is_referenced()
    }

    /// Waits while `busy` holds for the slot's state (`PageState::is_busy`,
    /// `PageState::is_locked_or_filling`, ...), returning the first state for
    /// which it does not.
    pub(crate) fn wait_while_state(&self, busy: impl Fn(PageState) -> bool) -> PageState {
        loop {
            let state = self.load();
            if !busy(state) {
                return state;
            }
            if !state.has_waiters()
                && self
                    .0
                    .compare_exchange(
                        state.0,
                        state.with_waiters().0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                continue;
            }
            wait::park(self.key(), || {
                let now = PageState(self.0.load(Ordering::Acquire));
                busy(now) && now.has_waiters()
            });
        }
    }

    fn key(&self) -> usize {
        &self.0 as *const AtomicU64 as usize
    }

    /// Applies `change` to the current state atomically by [`Slot::replace`];
    /// returns the state it replaced.
    fn apply(&self, mut change: impl FnMut(PageState) -> PageState) -> PageState {
        let mut current = self.load();
        loop {
            match self.replace(current, change(current)) {
                Ok(()) => return current,
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves the slot from absent to `claimed(absent)`, whatever other flags it
    /// has or gains meanwhile; returns the state it set, or `None` once the page
    /// is not absent.
    fn claim_absent_as(&self, claimed: impl Fn(PageState) -> PageState) -> Option<PageState> {
        loop {
            let state = self.load();
            if !state.is_absent() {
                return None;
            }
            let claimed = claimed(state);
            if self.replace(state, claimed).is_ok() {
                return Some(claimed);
            }
        }
    }
}

// Named transitions of the slot.
impl Slot {
    /// Claims the absent page for a fill (`FILLING`); returns the claim, which
    /// the fill locks with [`Slot::lock_fill_claim`] once it has read the
    /// backend, or `None` once the page is not absent.
    pub(crate) fn claim_for_fill(&self) -> Option<PageState> {
        self.claim_absent_as(PageState::claimed_for_fill)
    }

    /// Locks the claim `filling` to install the page, if it is still exactly
    /// that claim: a fill whose page was invalidated (and perhaps claimed
    /// again) since it claimed it fails here and installs nothing.
    pub(crate) fn lock_fill_claim(&self, filling: PageState) -> Result<(), PageState> {
        debug_assert!(filling.is_filling() && !filling.is_locked());
        self.replace(filling, filling.locked())
    }

    /// Gives a fill's claim `filling` back (the page becomes absent) if it is
    /// still that claim, whatever marks it gained; else leaves the slot alone.
    pub(crate) fn abandon_fill(&self, filling: PageState) {
        self.apply(|state| {
            if filling.is_same_claim(state) {
                state.emptied()
            } else {
                state
            }
        });
    }

    /// Locks the page `absent` (loaded just before) to create it; fails if the
    /// state changed.
    pub(crate) fn lock_for_create(&self, absent: PageState) -> Result<(), PageState> {
        debug_assert!(absent.is_absent());
        self.replace(absent, absent.locked_for_create())
    }

    /// Publishes the page the caller locked (or claimed and locked) and
    /// installed: present and up to date, dirty if `dirty`. Returns the state
    /// it replaced: if that was not queued, the caller gives the page its
    /// eviction queue entry.
    pub(crate) fn publish(&self, dirty: bool) -> PageState {
        self.apply(|state| state.published(dirty))
    }

    /// Unlocks the page, unchanged.
    pub(crate) fn unlock(&self) {
        self.apply(PageState::unlocked);
    }

    /// Unlocks the page after writing it: dirty, new version.
    pub(crate) fn unlock_written(&self) {
        self.apply(PageState::written);
    }

    /// Unlocks the page after changing its bytes to the backend's: new version.
    pub(crate) fn unlock_changed(&self) {
        self.apply(PageState::changed);
    }

    /// Empties the page the caller holds (locked): absent, new version.
    pub(crate) fn empty(&self) {
        self.apply(PageState::emptied);
    }

    /// Drops the eviction queue's mark of the page `absent` (loaded just
    /// before); fails if the state changed meanwhile (a fill took the page).
    pub(crate) fn unqueue_absent(&self, absent: PageState) -> Result<(), PageState> {
        debug_assert!(absent.is_absent());
        self.replace(absent, absent.unqueued())
    }

    /// Ends the page's writeback; if it `failed`, the page is dirty again.
    pub(crate) fn end_writeback(&self, failed: bool) {
        self.apply(if failed {
            PageState::writeback_failed
        } else {
            PageState::writeback_done
        });
    }

    /// The page the caller locked was written back: clean.
    pub(crate) fn mark_clean(&self) {
        self.apply(PageState::cleaned);
    }

    /// Marks the page dirty after a store through a map changed it, if it is
    /// present or locked (an unlocked fill's claim has nothing to store to);
    /// returns whether this made it dirty.
    pub(crate) fn mark_dirty_by_store(&self) -> bool {
        let before = self.apply(|state| {
            if state.is_present_or_locked() {
                state.dirtied()
            } else {
                state
            }
        });
        before.is_present_or_locked() && !before.is_dirty()
    }

    /// One optimistic read of the page (the seqlock's read side): if the page
    /// is readable, `copy` copies it from the store, and the copy is kept only
    /// if the version and the `UPTODATE`/`LOCKED` bits did not change
    /// meanwhile; a kept copy marks the page referenced. Takes no lock and
    /// writes nothing shared but the first mark after the eviction hand passed.
    #[inline]
    pub(crate) fn read_optimistic(&self, copy: impl FnOnce()) -> OptimisticRead {
        let before = self.load();
        if !before.is_readable() {
            return OptimisticRead::NotReadable;
        }
        copy();
        // Orders the copy before the re-check; pairs with the release fence
        // of writers before their copy into the page (`PageStore::write`).
        fence(Ordering::Acquire);
        let after = self.load();
        if !before.same_contents(after) {
            return OptimisticRead::Changed;
        }
        self.mark_referenced(after);
        OptimisticRead::Copied
    }
}

#[cfg(all(test, any(loom, shuttle)))]
mod model;
