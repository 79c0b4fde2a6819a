//! Striped locks over aligned 4 KiB blocks, for storage the kernel does not make
//! block-atomic.
//!
//! A buffered `pread` racing a `pwrite` of the same block on a host file system
//! can return a mix of both (ext4 tears a small fraction of such reads), and so
//! can `O_DIRECT` racing buffered I/O. Holding these locks, shared to read and
//! exclusive to change bytes, makes every aligned block read or written whole.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::ATOMIC_BLOCK;

/// The number of stripes: block `b` is guarded by stripe `b % STRIPES`. At most
/// 64, so a set of stripes fits in a `u64`.
const STRIPES: usize = 64;

/// A set of lock stripes, one bit per stripe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stripes(u64);

impl Stripes {
    /// The stripes of the blocks that `len` bytes at `offset` touch (the block of
    /// `offset` when `len` is zero), saturating at the end of the address space.
    pub(crate) fn of(offset: u64, len: u64) -> Self {
        let block = ATOMIC_BLOCK as u64;
        let first = offset / block;
        let last = offset.saturating_add(len.max(1) - 1) / block;
        if last - first + 1 >= STRIPES as u64 {
            return Self(u64::MAX);
        }
        let mut mask = 0;
        for b in first..=last {
            mask |= 1 << (b % STRIPES as u64);
        }
        Self(mask)
    }

    /// The stripes in either set.
    pub(crate) fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The stripe indices, ascending: every caller takes them in this order, so
    /// two calls never wait for each other in a cycle.
    fn indices(self) -> impl Iterator<Item = usize> {
        (0..STRIPES).filter(move |&i| self.0 & (1 << i) != 0)
    }
}

/// Striped reader-writer locks over the blocks of one file or device.
pub(crate) struct BlockLocks {
    stripes: Box<[RwLock<()>]>,
}

/// Shared holds on block stripes; released on drop.
#[must_use = "the blocks are unlocked when this is dropped"]
pub(crate) struct SharedBlocks<'a> {
    _guards: Vec<RwLockReadGuard<'a, ()>>,
}

/// Exclusive holds on block stripes; released on drop.
#[must_use = "the blocks are unlocked when this is dropped"]
pub(crate) struct ExclusiveBlocks<'a> {
    _guards: Vec<RwLockWriteGuard<'a, ()>>,
}

impl BlockLocks {
    /// Unlocked stripes.
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// Locks the blocks of `len` bytes at `offset` shared, for reading them.
    pub(crate) fn shared(&self, offset: u64, len: u64) -> SharedBlocks<'_> {
        SharedBlocks {
            _guards: Stripes::of(offset, len)
                .indices()
                .map(|i| self.stripes[i].read())
                .collect(),
        }
    }

    /// Locks the blocks of `len` bytes at `offset` exclusively, for changing them.
    pub(crate) fn exclusive(&self, offset: u64, len: u64) -> ExclusiveBlocks<'_> {
        self.exclusive_stripes(Stripes::of(offset, len))
    }

    /// Locks a set of stripes exclusively (several separate blocks in one go).
    pub(crate) fn exclusive_stripes(&self, stripes: Stripes) -> ExclusiveBlocks<'_> {
        ExclusiveBlocks {
            _guards: stripes.indices().map(|i| self.stripes[i].write()).collect(),
        }
    }
}

impl std::fmt::Debug for BlockLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockLocks")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indices(stripes: Stripes) -> Vec<usize> {
        stripes.indices().collect()
    }

    #[test]
    fn stripes_are_sorted_and_cover_the_range() {
        assert_eq!(indices(Stripes::of(0, 4096)), [0]);
        assert_eq!(indices(Stripes::of(100, 0)), [0]);
        assert_eq!(indices(Stripes::of(4095, 2)), [0, 1]);
        assert_eq!(indices(Stripes::of(63 * 4096, 8192)), [0, 63]);
        assert_eq!(indices(Stripes::of(0, 1 << 30)).len(), STRIPES);
        assert_eq!(indices(Stripes::of(u64::MAX - 1, u64::MAX)).len(), 1);
        let edges = Stripes::of(4096 + 1, 1).union(Stripes::of(10 * 4096, 1));
        assert_eq!(indices(edges), [1, 10]);
    }

    #[test]
    fn shared_holds_share_and_exclusive_ones_exclude() {
        let locks = BlockLocks::new();
        let first = locks.shared(0, 8192);
        let second = locks.shared(4096, 4096);
        let other = locks.exclusive(2 * 4096, 4096);
        assert!(locks.stripes[1].try_write().is_none());
        assert!(locks.stripes[2].try_read().is_none());
        drop((first, second, other));
        assert!(locks.stripes.iter().all(|s| s.try_write().is_some()));
    }
}
