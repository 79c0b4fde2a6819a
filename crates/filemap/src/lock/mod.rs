//! The coherence lock: one per [`crate::Mapping`], three coherence modes.
//!
//! | mode | held by | shares with |
//! |---|---|---|
//! | [`Mode::Fill`] | cache misses of read and readahead; buffered writes ([`Mode::Write`]) | Fill |
//! | [`Mode::Direct`] | `read_direct` / `write_direct` for the whole I/O | Direct |
//! | [`Mode::Invalidate`] | punch, zero, truncate, collapse, insert, `invalidate_range` | nothing |
//!
//! Two more modes name what a caller does, so that strategies from before the
//! kernel had these modes can be expressed: [`Mode::Read`], a whole buffered read
//! (hits included), and [`Mode::Write`], a buffered write. Cache hits take no lock
//! under every strategy but `file-exclusive`. A [`Strategy`] decides how modes map
//! onto the raw lock, so that the kernel's history can be compared behind one
//! interface:
//!
//! | strategy | Read | Fill | Write | Direct | Invalidate |
//! |---|---|---|---|---|---|
//! | `none` | - | - | - | - | - |
//! | `file-exclusive` | shared | shared | exclusive | shared | exclusive |
//! | `invalidate-lock` | - | shared A | shared A | exclusive | exclusive |
//! | `two-state` | - | shared A | shared A | shared B | exclusive B |
//! | `range` (default) | - | shared A | shared A | shared B | exclusive |
//!
//! (Shared holders of one class coexist; classes A and B exclude each other.
//! Under `range` a mode covers its byte range, widened to whole pages, and
//! holders of disjoint pages never exclude each other.)
//!
//! - [`Strategy::None`]: no lock. This is the pre-5.15 ext4 race, kept so the
//!   torture can prove its checker has teeth.
//! - [`Strategy::FileExclusive`]: XFS before 5.15, `i_rwsem` around every read:
//!   reads and fills, hits included, are serialised against every buffered
//!   writer and every invalidation of the file.
//! - [`Strategy::InvalidateLock`]: Linux 5.15's `mapping->invalidate_lock`, a
//!   reader-writer lock: Fill is the shared side, Invalidate the exclusive one.
//!   A reader-writer lock has no third mode, so Direct, which must not share
//!   with Fill, takes the exclusive side too: direct writes serialise with each
//!   other and with every fill of the file. (The kernel's direct I/O does not
//!   take the lock at all and relies on invalidating before and after the write,
//!   which leaves fills racing it to the page generation alone; DESIGN keeps the
//!   generation as a second guard, not the first.)
//! - [`Strategy::TwoState`]: bcachefs's `pagecache_add_lock`, a two-state shared
//!   lock: an "add" state shared by fills and buffered writes, a "block" state
//!   shared by direct I/O, the two mutually exclusive. Invalidations take the
//!   block state exclusively (bcachefs serialises them with the inode lock,
//!   which direct I/O takes to enter). Like bcachefs's, the lock is unfair
//!   ([`RawTwoStateLock`]): a request joins holders of its state whoever waits
//!   for the other, so a stream of either side starves the other.
//! - [`Strategy::Range`] (the default): the founding design's three modes per
//!   byte range, in the spirit of Jan Kara's mapping range lock: Fill (and
//!   buffered writes) share with Fill, Direct with Direct, Invalidate with
//!   nothing, and only holders of overlapping pages exclude each other. A punch
//!   of one part of a file waits only for fills, writes and direct I/O of its
//!   own pages, and they only for it; a fill of a page a direct write covers
//!   waits for it instead of reading what the write replaces and being thrown
//!   away.
//!
//! The cache never takes a second mode of the same mapping while it holds one:
//! under a fair lock the second request would queue behind a waiting
//! Invalidate that waits for the first. (Under `range` a thread re-entering the
//! mode it holds is let past waiters, but the rule stays: work handed to
//! another thread, as a page fault is, gets no such pass.)
//!
//! `file-exclusive` and `invalidate-lock` take their raw lock through
//! [`RawFairLock`], `range` through [`RawRangeLock`]; both serve conflicting
//! requests in arrival order, so neither side can starve the other. `two-state`
//! takes [`RawTwoStateLock`], which keeps bcachefs's unfairness so that the
//! benchmarks show what it costs.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

mod fair;
mod range;
mod two_state;

pub use fair::{Access, RawFairLock};
pub use range::{ranges_overlap, RangeGrant, RawRangeLock};
pub use two_state::RawTwoStateLock;

use crate::page::PAGE;

/// A coherence mode: what the holder is about to do to the page cache.
///
/// ```
/// use filemap::{Mode, Strategy};
///
/// // Under `range`, fills share with fills, direct I/O with direct I/O...
/// assert!(!Strategy::Range.conflicts(Mode::Fill, Mode::Fill));
/// assert!(Strategy::Range.conflicts(Mode::Fill, Mode::Direct));
/// // ...and only holders of overlapping pages exclude each other.
/// assert!(!Strategy::Range.conflicts_over(Mode::Fill, 0..4096, Mode::Invalidate, 4096..8192));
/// assert!(Strategy::InvalidateLock.conflicts_over(Mode::Fill, 0..4096, Mode::Invalidate, 4096..8192));
/// // Cache hits take no lock but under `file-exclusive`.
/// assert!(!Strategy::Range.conflicts(Mode::Read, Mode::Invalidate));
/// assert!(Strategy::FileExclusive.conflicts(Mode::Read, Mode::Invalidate));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A whole buffered read, hits included. Only `file-exclusive` locks it; the
    /// other strategies leave hits lock-free and take Fill for misses.
    Read,
    /// Adds pages to the cache: fills of reads and readahead.
    Fill,
    /// A buffered write: adds pages like Fill, except under `file-exclusive`,
    /// where writers exclude readers.
    Write,
    /// Direct I/O, which writes back and invalidates the range around itself.
    Direct,
    /// Removes pages and changes the backend's mapping of the range under them.
    Invalidate,
}

/// How the coherence modes are enforced. Chosen when the cache is built.
///
/// ```
/// use filemap::{PageCache, Strategy};
///
/// let strategy: Strategy = "invalidate-lock".parse().expect("a strategy's name");
/// assert_eq!(strategy, Strategy::InvalidateLock);
/// assert_eq!(Strategy::DEFAULT.name(), "range");
/// assert!(!Strategy::None.is_coherent());
/// let cache = PageCache::builder().strategy(strategy).build()?;
/// assert_eq!(cache.strategy(), Strategy::InvalidateLock);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// No lock at all (the pre-5.15 kernel race; incorrect on purpose).
    None,
    /// Reads serialised against writers and invalidations (XFS before 5.15).
    FileExclusive,
    /// A file-wide reader-writer lock: Fill shared, Direct and Invalidate exclusive.
    InvalidateLock,
    /// bcachefs's two-state lock: adds and direct I/O exclude each other, and
    /// either may starve the other, as in bcachefs.
    TwoState,
    /// The three modes per byte range (whole pages): Fill with Fill, Direct
    /// with Direct; only overlapping holders exclude each other. The default.
    Range,
}

impl Strategy {
    /// Every strategy, in the order the torture runs them.
    pub const ALL: [Strategy; 5] = [
        Strategy::None,
        Strategy::FileExclusive,
        Strategy::InvalidateLock,
        Strategy::TwoState,
        Strategy::Range,
    ];

    /// The strategy a [`crate::PageCache`] uses unless told otherwise.
    pub const DEFAULT: Strategy = Strategy::Range;

    /// The strategy's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::FileExclusive => "file-exclusive",
            Strategy::InvalidateLock => "invalidate-lock",
            Strategy::TwoState => "two-state",
            Strategy::Range => "range",
        }
    }

    /// What the strategy is, in one line (for `--help` and reports).
    pub fn summary(self) -> &'static str {
        match self {
            Strategy::None => "No lock: the pre-5.15 kernel race (must be caught)",
            Strategy::FileExclusive => {
                "Reads serialised against writers and invalidations (XFS before 5.15)"
            }
            Strategy::InvalidateLock => {
                "Linux 5.15's invalidate_lock: a file-wide reader-writer lock"
            }
            Strategy::TwoState => {
                "bcachefs's two-state lock: adds and direct I/O exclude each other (unfair)"
            }
            Strategy::Range => {
                "The three modes per byte range: only overlapping pages exclude each other (the default)"
            }
        }
    }

    /// Whether this strategy is meant to keep the cache coherent (all but `none`).
    pub fn is_coherent(self) -> bool {
        self != Strategy::None
    }

    /// Whether modes lock only their byte range (`range`) rather than the file.
    pub fn is_range_granular(self) -> bool {
        self == Strategy::Range
    }

    /// The raw access a mode takes under this strategy, or `None` for no lock.
    /// Class 0 is the "add" side (readers), class 1 the side that excludes it.
    fn access(self, mode: Mode) -> Option<Access> {
        use Mode::*;
        match (self, mode) {
            (Strategy::None, _) => None,
            (Strategy::FileExclusive, Read | Fill | Direct) => Some(Access::shared(0)),
            (Strategy::FileExclusive, Write | Invalidate) => Some(Access::exclusive(1)),
            (Strategy::InvalidateLock | Strategy::TwoState | Strategy::Range, Read) => None,
            (Strategy::InvalidateLock, Fill | Write) => Some(Access::shared(0)),
            (Strategy::InvalidateLock, Direct) => Some(Access::exclusive(1)),
            (Strategy::TwoState | Strategy::Range, Fill | Write) => Some(Access::shared(0)),
            (Strategy::TwoState | Strategy::Range, Direct) => Some(Access::shared(1)),
            (Strategy::InvalidateLock | Strategy::TwoState | Strategy::Range, Invalidate) => {
                Some(Access::exclusive(1))
            }
        }
    }

    /// Whether holders of `a` and `b` over overlapping ranges exclude each other
    /// under this strategy.
    pub fn conflicts(self, a: Mode, b: Mode) -> bool {
        match (self.access(a), self.access(b)) {
            (Some(a), Some(b)) => !a.is_compatible_with(b),
            _ => false,
        }
    }

    /// Whether a holder of `a` over `a_range` and one of `b` over `b_range`
    /// exclude each other: [`Strategy::conflicts`], and under `range` only if
    /// the ranges share a page.
    pub fn conflicts_over(
        self,
        a: Mode,
        a_range: Range<u64>,
        b: Mode,
        b_range: Range<u64>,
    ) -> bool {
        self.conflicts(a, b)
            && (!self.is_range_granular()
                || ranges_overlap(&whole_pages(a_range), &whole_pages(b_range)))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown strategy name.
///
/// ```
/// use filemap::Strategy;
///
/// let error = "bogus".parse::<Strategy>().unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     r#"unknown strategy "bogus" (expected one of: none, file-exclusive, invalidate-lock, two-state, range)"#
/// );
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[error("unknown strategy {0:?} (expected one of: {names})", names = Strategy::ALL.map(Strategy::name).join(", "))]
pub struct UnknownStrategy(String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// `range` widened to whole pages: the cache fills, zeroes and drops whole
/// pages, so two byte ranges that share a page must conflict (a fill of bytes
/// 0..100 reads the page that a punch of bytes 200..300 zeroes). An empty range
/// stays empty.
fn whole_pages(range: Range<u64>) -> Range<u64> {
    if range.is_empty() {
        return range;
    }
    let end = range.end.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX);
    range.start / PAGE * PAGE..end
}

/// The coherence lock of one mapping.
///
/// ```
/// use filemap::lock::CoherenceLock;
/// use filemap::{Mode, Strategy};
///
/// let lock = CoherenceLock::new(Strategy::Range);
/// let punch = lock.lock(Mode::Invalidate, 0..4096);
/// assert!(lock.try_lock(Mode::Fill, 100..200).is_none()); // same page: waits
/// let fill = lock.try_lock(Mode::Fill, 4096..8192).expect("another page");
/// drop((punch, fill));
/// assert!(lock.try_lock(Mode::Fill, 100..200).is_some());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct CoherenceLock {
    strategy: Strategy,
    raw: RawLock,
}

/// The raw lock a strategy takes.
#[derive(Debug)]
enum RawLock {
    /// The file-wide strategies: modes ignore their range.
    File(Box<dyn FileWideLock>),
    /// `range`: modes lock the pages of their range.
    Range(RawRangeLock),
}

/// A file-wide raw lock: [`RawFairLock`], or `two-state`'s [`RawTwoStateLock`].
trait FileWideLock: fmt::Debug + Send + Sync {
    fn lock(&self, access: Access);
    fn try_lock(&self, access: Access) -> bool;
    fn unlock(&self, access: Access);
}

/// Implements [`FileWideLock`] by the lock's own methods of the same names.
macro_rules! file_wide_lock {
    ($($lock:ty),*) => {$(
        impl FileWideLock for $lock {
            fn lock(&self, access: Access) {
                <$lock>::lock(self, access)
            }
            fn try_lock(&self, access: Access) -> bool {
                <$lock>::try_lock(self, access)
            }
            fn unlock(&self, access: Access) {
                <$lock>::unlock(self, access)
            }
        }
    )*};
}
file_wide_lock!(RawFairLock, RawTwoStateLock);

/// What a guard holds of its lock's [`RawLock`].
#[derive(Debug)]
enum Held {
    File(Access),
    Range(RangeGrant),
}

/// Proof that a coherence mode is held; released on drop.
///
/// ```
/// use filemap::lock::CoherenceLock;
/// use filemap::{Mode, Strategy};
///
/// let lock = CoherenceLock::new(Strategy::Range);
/// let read = lock.lock(Mode::Read, 0..4096);
/// assert_eq!(read.mode(), Mode::Read);
/// assert!(!read.is_locking()); // hits take no lock under `range`
/// let direct = lock.lock(Mode::Direct, 0..4096);
/// assert!(direct.is_locking());
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "the mode is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct CoherenceGuard<'a> {
    lock: &'a CoherenceLock,
    /// `None` when the strategy takes no lock for the mode.
    held: Option<Held>,
    mode: Mode,
}

impl CoherenceGuard<'_> {
    /// The mode this guard holds.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the guard holds the raw lock (false when the strategy takes no
    /// lock for its mode).
    pub fn is_locking(&self) -> bool {
        self.held.is_some()
    }
}

impl CoherenceLock {
    /// A lock enforcing `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        let raw = match strategy {
            Strategy::Range => RawLock::Range(RawRangeLock::new()),
            Strategy::TwoState => RawLock::File(Box::new(RawTwoStateLock::new())),
            _ => RawLock::File(Box::new(RawFairLock::new())),
        };
        CoherenceLock { strategy, raw }
    }

    /// The strategy this lock enforces.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Takes `mode` over the byte range `range` (`u64::MAX` as the end: to the
    /// end of the file), waiting for conflicting holders and for conflicting
    /// requests that came first. File-wide strategies ignore the range; `range`
    /// widens it to whole pages.
    pub fn lock(&self, mode: Mode, range: Range<u64>) -> CoherenceGuard<'_> {
        let held = self.strategy.access(mode).map(|access| match &self.raw {
            RawLock::File(raw) => {
                raw.lock(access);
                Held::File(access)
            }
            RawLock::Range(raw) => Held::Range(raw.lock(access, whole_pages(range))),
        });
        CoherenceGuard {
            lock: self,
            held,
            mode,
        }
    }

    /// Takes `mode` over `range` if that needs no waiting: no holder conflicts
    /// and no conflicting request is queued that it would overtake.
    pub fn try_lock(&self, mode: Mode, range: Range<u64>) -> Option<CoherenceGuard<'_>> {
        let held = match (self.strategy.access(mode), &self.raw) {
            (None, _) => None,
            (Some(access), RawLock::File(raw)) => {
                if !raw.try_lock(access) {
                    return None;
                }
                Some(Held::File(access))
            }
            (Some(access), RawLock::Range(raw)) => {
                Some(Held::Range(raw.try_lock(access, whole_pages(range))?))
            }
        };
        Some(CoherenceGuard {
            lock: self,
            held,
            mode,
        })
    }
}

impl Drop for CoherenceGuard<'_> {
    fn drop(&mut self) {
        match (self.held.take(), &self.lock.raw) {
            (None, _) => {}
            (Some(Held::File(access)), RawLock::File(raw)) => raw.unlock(access),
            (Some(Held::Range(grant)), RawLock::Range(raw)) => raw.unlock(grant),
            (Some(held), raw) => unreachable!("{held:?} taken from {raw:?}"),
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip_and_unknown_names_list_the_choices() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>().unwrap(), strategy);
        }
        let error = "bogus".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            error.contains("none, file-exclusive, invalidate-lock, two-state, range"),
            "{error}"
        );
    }

    #[test]
    fn invalidate_lock_shares_fills_and_excludes_direct_and_invalidate() {
        let lock = CoherenceLock::new(Strategy::InvalidateLock);
        let fill = lock.lock(Mode::Fill, 0..10);
        assert!(lock.try_lock(Mode::Fill, 100..200).is_some());
        assert!(lock.try_lock(Mode::Direct, 100..200).is_none());
        assert!(lock.try_lock(Mode::Invalidate, 100..200).is_none());
        drop(fill);
        let direct = lock.lock(Mode::Direct, 0..10);
        assert!(lock.try_lock(Mode::Direct, 100..200).is_none());
        assert!(lock.try_lock(Mode::Fill, 100..200).is_none());
        drop(direct);
        let invalidate = lock.lock(Mode::Invalidate, 0..10);
        assert!(lock.try_lock(Mode::Fill, 0..10).is_none());
        drop(invalidate);
        assert!(lock.try_lock(Mode::Fill, 0..10).is_some());
    }

    #[test]
    fn the_strategies_conflict_as_their_table_says() {
        use Mode::*;
        let fe = Strategy::FileExclusive;
        assert!(fe.conflicts(Read, Write) && fe.conflicts(Fill, Invalidate));
        assert!(!fe.conflicts(Read, Fill) && !fe.conflicts(Read, Direct));
        let ts = Strategy::TwoState;
        assert!(ts.conflicts(Fill, Direct) && ts.conflicts(Write, Direct));
        assert!(!ts.conflicts(Direct, Direct) && !ts.conflicts(Fill, Write));
        assert!(ts.conflicts(Direct, Invalidate) && ts.conflicts(Invalidate, Invalidate));
        assert!(!ts.conflicts(Read, Invalidate), "hits take no lock");
        let il = Strategy::InvalidateLock;
        assert!(il.conflicts(Fill, Direct) && il.conflicts(Write, Invalidate));
        assert!(il.conflicts(Direct, Direct) && !il.conflicts(Fill, Write));
        let range = Strategy::Range;
        for mode in [Fill, Write, Direct] {
            assert_eq!(
                range.conflicts(mode, Invalidate),
                il.conflicts(mode, Invalidate)
            );
            assert!(range.conflicts_over(mode, 0..1, Invalidate, 4095..4097));
            assert!(!range.conflicts_over(mode, 0..4096, Invalidate, 4096..8192));
            assert!(il.conflicts_over(mode, 0..1, Invalidate, 1 << 40..u64::MAX));
        }
        assert!(!range.conflicts(Read, Invalidate), "hits take no lock");
        assert!(
            range.conflicts_over(Invalidate, 5..6, Invalidate, 100..u64::MAX),
            "same page"
        );
        for a in [Read, Fill, Write, Direct, Invalidate] {
            for b in [Read, Fill, Write, Direct, Invalidate] {
                assert!(!Strategy::None.conflicts(a, b));
                for strategy in Strategy::ALL {
                    assert_eq!(strategy.conflicts(a, b), strategy.conflicts(b, a));
                }
            }
        }
    }

    /// Every conflict the strategies declare is enforced by the lock, over
    /// ranges that share a page and over disjoint pages. The second request
    /// comes from another thread: under `range` a thread's own shared mode
    /// re-enters.
    #[test]
    fn declared_conflicts_are_enforced_and_compatible_modes_share() {
        use Mode::*;
        let modes = [Read, Fill, Write, Direct, Invalidate];
        let (near, far) = (4095..4096, 4096..8192);
        for strategy in Strategy::ALL {
            for a in modes {
                for b in modes {
                    for other in [0..1, near.clone(), far.clone()] {
                        let lock = CoherenceLock::new(strategy);
                        let _held = lock.lock(a, 0..1);
                        let granted = std::thread::scope(|scope| {
                            let other = other.clone();
                            scope
                                .spawn(|| lock.try_lock(b, other).is_some())
                                .join()
                                .unwrap()
                        });
                        assert_eq!(
                            granted,
                            !strategy.conflicts_over(a, 0..1, b, other.clone()),
                            "{strategy} {a:?} {b:?} over {other:?}"
                        );
                    }
                    if strategy.is_range_granular() {
                        assert!(!strategy.conflicts_over(a, 0..1, b, far.clone()));
                    }
                }
            }
        }
    }

    /// Under `range`, a punch queued behind a fill holds back later fills of its
    /// pages but not of others, and the holder's own thread re-enters its mode.
    #[test]
    fn range_queues_only_overlapping_requests_and_lets_the_holder_reenter() {
        let lock = CoherenceLock::new(Strategy::Range);
        let fill = lock.lock(Mode::Fill, 0..4096);
        std::thread::scope(|scope| {
            let punch = scope.spawn(|| drop(lock.lock(Mode::Invalidate, 100..200)));
            let RawLock::Range(raw) = &lock.raw else {
                unreachable!("range takes a range lock")
            };
            range::tests::wait_until("the punch is queued", || raw.queued() == 1);
            scope
                .spawn(|| {
                    assert!(lock.try_lock(Mode::Fill, 4000..4001).is_none());
                    assert!(lock.try_lock(Mode::Direct, 4096..4097).is_some());
                    assert!(lock.try_lock(Mode::Read, 0..1).is_some(), "no lock");
                })
                .join()
                .unwrap();
            let nested = lock.try_lock(Mode::Write, 1..2).expect("re-entry");
            drop(nested);
            drop(fill);
            punch.join().unwrap();
        });
        assert!(lock.try_lock(Mode::Invalidate, 0..u64::MAX).is_some());
    }

    #[test]
    fn none_never_blocks() {
        let lock = CoherenceLock::new(Strategy::None);
        let _invalidate = lock.lock(Mode::Invalidate, 0..10);
        assert!(lock.try_lock(Mode::Invalidate, 0..10).is_some());
    }
}

/// Loom models: under every strategy, two threads taking conflicting modes are
/// never inside together, whatever the interleaving.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::atomic::{AtomicBool, Ordering};
    use crate::sync::Arc;

    fn check_exclusion(strategy: Strategy, a: Mode, b: Mode) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(move || {
            let lock = Arc::new(CoherenceLock::new(strategy));
            let inside = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let other = {
                let (lock, inside) = (lock.clone(), inside.clone());
                loom::thread::spawn(move || {
                    let _guard = lock.lock(b, 0..1);
                    inside[1].store(true, Ordering::SeqCst);
                    assert!(
                        !inside[0].load(Ordering::SeqCst),
                        "{strategy} {a:?} with {b:?}"
                    );
                    inside[1].store(false, Ordering::SeqCst);
                })
            };
            {
                let _guard = lock.lock(a, 0..1);
                inside[0].store(true, Ordering::SeqCst);
                assert!(
                    !inside[1].load(Ordering::SeqCst),
                    "{strategy} {a:?} with {b:?}"
                );
                inside[0].store(false, Ordering::SeqCst);
            }
            other.join().unwrap();
        });
    }

    /// Under `range`, a holder of any mode over one page never blocks any mode
    /// over another page: the second thread finishes while the first holds
    /// (otherwise joining it deadlocks, which loom reports).
    #[test]
    fn range_modes_over_disjoint_pages_never_block() {
        use Mode::*;
        for a in [Fill, Direct, Invalidate] {
            for b in [Fill, Write, Invalidate] {
                let mut builder = loom::model::Builder::new();
                builder.preemption_bound = Some(2);
                builder.check(move || {
                    let lock = Arc::new(CoherenceLock::new(Strategy::Range));
                    let held = lock.lock(a, 0..1);
                    let other = {
                        let lock = lock.clone();
                        loom::thread::spawn(move || drop(lock.lock(b, 4096..4097)))
                    };
                    other.join().unwrap();
                    drop(held);
                });
            }
        }
    }

    #[test]
    fn conflicting_modes_exclude_under_every_strategy() {
        use Mode::*;
        let modes = [Read, Fill, Write, Direct, Invalidate];
        for strategy in Strategy::ALL {
            for (i, &a) in modes.iter().enumerate() {
                for &b in &modes[i..] {
                    if strategy.conflicts(a, b) {
                        check_exclusion(strategy, a, b);
                    }
                }
            }
        }
    }
}
