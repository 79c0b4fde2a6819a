//! The coherence lock: one per [`crate::Mapping`], three modes.
//!
//! | mode | held by | shares with |
//! |---|---|---|
//! | [`Mode::Fill`] | cache misses of read and readahead, buffered writes | Fill |
//! | [`Mode::Direct`] | `read_direct` / `write_direct` for the whole I/O | Direct |
//! | [`Mode::Invalidate`] | punch, zero, truncate, `invalidate_range` | nothing |
//!
//! Cache hits take no lock at all. A [`Strategy`] decides how the modes map onto
//! the raw lock, so that the strategies of the kernel's history can be compared
//! behind one interface:
//!
//! - [`Strategy::None`]: no lock. This is the pre-5.15 ext4 race, kept so the
//!   torture can prove its checker has teeth.
//! - [`Strategy::InvalidateLock`]: Linux 5.15's `mapping->invalidate_lock`, a
//!   reader-writer lock: Fill and Direct are shared (with each other too, as in the
//!   kernel, where direct I/O does not take the lock), Invalidate is exclusive.
//!   Direct writes stay coherent because they invalidate before and after the
//!   write, and a fill claimed before the second invalidation cannot publish.
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
    /// Adds pages to the cache: fills of reads and readahead, buffered writes.
    Fill,
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
    /// A file-wide reader-writer lock: Fill and Direct shared, Invalidate exclusive.
    InvalidateLock,
}

impl Strategy {
    /// Every strategy, in the order the torture runs them.
    pub const ALL: [Strategy; 2] = [Strategy::None, Strategy::InvalidateLock];

    /// The strategy's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::InvalidateLock => "invalidate-lock",
        }
    }

    /// Whether this strategy is meant to keep the cache coherent (all but `none`).
    pub fn is_coherent(self) -> bool {
        self != Strategy::None
    }

    /// The raw access a mode takes under this strategy, or `None` for no lock.
    fn access(self, mode: Mode) -> Option<Access> {
        match self {
            Strategy::None => None,
            Strategy::InvalidateLock => Some(match mode {
                Mode::Fill | Mode::Direct => Access::shared(0),
                Mode::Invalidate => Access::exclusive(1),
            }),
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
        assert!(error.contains("none, invalidate-lock"), "{error}");
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
    fn none_never_blocks() {
        let lock = CoherenceLock::new(Strategy::None);
        let _invalidate = lock.lock(Mode::Invalidate, 0..10);
        assert!(lock.try_lock(Mode::Invalidate, 0..10).is_some());
    }
}
