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
//! | `invalidate-lock` | - | shared A | shared A | shared A | exclusive |
//! | `two-state` | - | shared A | shared A | shared B | exclusive B |
//!
//! (Shared holders of one class coexist; classes A and B exclude each other.)
//!
//! - [`Strategy::None`]: no lock. This is the pre-5.15 ext4 race, kept so the
//!   torture can prove its checker has teeth.
//! - [`Strategy::FileExclusive`]: XFS before 5.15, `i_rwsem` around every read:
//!   reads and fills, hits included, are serialised against every buffered
//!   writer and every invalidation of the file.
//! - [`Strategy::InvalidateLock`]: Linux 5.15's `mapping->invalidate_lock`, a
//!   reader-writer lock: Fill and Direct are shared (with each other too, as in the
//!   kernel, where direct I/O does not take the lock), Invalidate is exclusive.
//!   Direct writes stay coherent because they invalidate before and after the
//!   write, and a fill claimed before the second invalidation cannot publish.
//! - [`Strategy::TwoState`]: bcachefs's `pagecache_add_lock`, a two-state shared
//!   lock: an "add" state shared by fills and buffered writes, a "block" state
//!   shared by direct I/O, the two mutually exclusive. Invalidations take the
//!   block state exclusively (bcachefs serialises them with the inode lock).
//!
//! A thread must not take a second mode of the same mapping while it holds one:
//! the lock is fair, so the second request would queue behind a waiting
//! Invalidate that waits for the first.
//!
//! Every strategy takes its raw lock through [`RawFairLock`], which serves
//! conflicting requests in arrival order, so neither side can starve the other.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

mod fair;

pub use fair::{Access, RawFairLock};

/// A coherence mode: what the holder is about to do to the page cache.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// No lock at all (the pre-5.15 kernel race; incorrect on purpose).
    None,
    /// Reads serialised against writers and invalidations (XFS before 5.15).
    FileExclusive,
    /// A file-wide reader-writer lock: Fill and Direct shared, Invalidate exclusive.
    InvalidateLock,
    /// bcachefs's two-state lock: adds and direct I/O exclude each other.
    TwoState,
}

impl Strategy {
    /// Every strategy, in the order the torture runs them.
    pub const ALL: [Strategy; 4] = [
        Strategy::None,
        Strategy::FileExclusive,
        Strategy::InvalidateLock,
        Strategy::TwoState,
    ];

    /// The strategy's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::FileExclusive => "file-exclusive",
            Strategy::InvalidateLock => "invalidate-lock",
            Strategy::TwoState => "two-state",
        }
    }

    /// Whether this strategy is meant to keep the cache coherent (all but `none`).
    pub fn is_coherent(self) -> bool {
        self != Strategy::None
    }

    /// The raw access a mode takes under this strategy, or `None` for no lock.
    /// Class 0 is the "add" side (readers), class 1 the side that excludes it.
    fn access(self, mode: Mode) -> Option<Access> {
        use Mode::*;
        match (self, mode) {
            (Strategy::None, _) => None,
            (Strategy::FileExclusive, Read | Fill | Direct) => Some(Access::shared(0)),
            (Strategy::FileExclusive, Write | Invalidate) => Some(Access::exclusive(1)),
            (Strategy::InvalidateLock | Strategy::TwoState, Read) => None,
            (Strategy::InvalidateLock, Fill | Write | Direct) => Some(Access::shared(0)),
            (Strategy::TwoState, Fill | Write) => Some(Access::shared(0)),
            (Strategy::TwoState, Direct) => Some(Access::shared(1)),
            (Strategy::InvalidateLock | Strategy::TwoState, Invalidate) => {
                Some(Access::exclusive(1))
            }
        }
    }

    /// Whether holders of `a` and `b` exclude each other under this strategy.
    pub fn conflicts(self, a: Mode, b: Mode) -> bool {
        match (self.access(a), self.access(b)) {
            (Some(a), Some(b)) => !a.is_compatible_with(b),
            _ => false,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown strategy name.
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

/// The coherence lock of one mapping.
#[derive(Debug)]
pub struct CoherenceLock {
    strategy: Strategy,
    raw: RawFairLock,
}

/// Proof that a coherence mode is held; released on drop.
#[must_use = "the mode is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct CoherenceGuard<'a> {
    lock: &'a CoherenceLock,
    access: Option<Access>,
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
        self.access.is_some()
    }
}

impl CoherenceLock {
    /// A lock enforcing `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        CoherenceLock {
            strategy,
            raw: RawFairLock::new(),
        }
    }

    /// The strategy this lock enforces.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Takes `mode` over the byte range `range`, waiting for conflicting holders.
    /// File-wide strategies ignore the range.
    pub fn lock(&self, mode: Mode, range: Range<u64>) -> CoherenceGuard<'_> {
        let _ = range;
        let access = self.strategy.access(mode);
        if let Some(access) = access {
            self.raw.lock(access);
        }
        CoherenceGuard {
            lock: self,
            access,
            mode,
        }
    }

    /// Takes `mode` over `range` if that needs no waiting.
    pub fn try_lock(&self, mode: Mode, range: Range<u64>) -> Option<CoherenceGuard<'_>> {
        let _ = range;
        let access = self.strategy.access(mode);
        if let Some(access) = access {
            if !self.raw.try_lock(access) {
                return None;
            }
        }
        Some(CoherenceGuard {
            lock: self,
            access,
            mode,
        })
    }
}

impl Drop for CoherenceGuard<'_> {
    fn drop(&mut self) {
        if let Some(access) = self.access {
            self.lock.raw.unlock(access);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip_and_unknown_names_list_the_choices() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>().unwrap(), strategy);
        }
        let error = "bogus".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            error.contains("none, file-exclusive, invalidate-lock, two-state"),
            "{error}"
        );
    }

    #[test]
    fn invalidate_excludes_fill_and_direct_shares_with_fill() {
        let lock = CoherenceLock::new(Strategy::InvalidateLock);
        let fill = lock.lock(Mode::Fill, 0..10);
        assert!(lock.try_lock(Mode::Direct, 0..10).is_some());
        assert!(lock.try_lock(Mode::Invalidate, 100..200).is_none());
        drop(fill);
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
        assert!(!il.conflicts(Fill, Direct) && il.conflicts(Write, Invalidate));
        for a in [Read, Fill, Write, Direct, Invalidate] {
            for b in [Read, Fill, Write, Direct, Invalidate] {
                assert!(!Strategy::None.conflicts(a, b));
                for strategy in Strategy::ALL {
                    assert_eq!(strategy.conflicts(a, b), strategy.conflicts(b, a));
                }
            }
        }
    }

    /// Every conflict the strategies declare is enforced by the lock.
    #[test]
    fn declared_conflicts_are_enforced_and_compatible_modes_share() {
        use Mode::*;
        let modes = [Read, Fill, Write, Direct, Invalidate];
        for strategy in Strategy::ALL {
            for a in modes {
                for b in modes {
                    let lock = CoherenceLock::new(strategy);
                    let _held = lock.lock(a, 0..1);
                    let granted = lock.try_lock(b, 0..1).is_some();
                    assert_eq!(granted, !strategy.conflicts(a, b), "{strategy} {a:?} {b:?}");
                }
            }
        }
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
