//! [`ChangeListener`]: a cache in front of this one told of every change,
//! so it can drop what it holds.
//!
//! The case it is made for: a FUSE file system whose files are mappings of
//! this cache, with the kernel's page cache in front of it for shared memory
//! maps of the mount. The kernel sees the changes made through the mount; a
//! change made through the library (a write, a punch, `invalidate_range` when
//! a lease is revoked) it does not, and a listener tells it
//! (`notify_inval_inode`) before the call returns.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::Mapping;

/// Told of every change a mapping of the cache makes to its file's bytes
/// (see [`PageCacheBuilder::change_listener`](crate::PageCacheBuilder::change_listener)).
///
/// Both calls run on the thread that changes the file, with no lock of the
/// mapping held, so they may call back into it (a cache in front that writes
/// its own dirty copy back through the mapping, say); the change waits for
/// them. The calls: [`Mapping::write_at`], [`Mapping::write_at_nowait`],
/// [`Mapping::write_direct`], [`Mapping::punch_hole`],
/// [`Mapping::zero_range`], [`Mapping::set_len`],
/// [`Mapping::collapse_range`], [`Mapping::insert_range`],
/// [`Mapping::invalidate_range`] and [`MapRegion::write`](crate::MapRegion::write).
/// Stores through a raw pointer of a map are not seen, and a call whose
/// range is empty is not told.
pub trait ChangeListener: Send + Sync {
    /// The bytes of `range` of `mapping`'s file are about to change (a range
    /// ending at `u64::MAX` runs to the end of file): a cache in front writes
    /// back what it holds of them, so that nothing it wrote earlier lands
    /// after the change. Default: nothing.
    fn before_change(&self, mapping: &Mapping, range: Range<u64>) {
        let _ = (mapping, range);
    }

    /// The bytes of `range` changed (or the change failed part way): a cache
    /// in front drops what it holds of them.
    fn after_change(&self, mapping: &Mapping, range: Range<u64>);
}

/// A cache's listener, if it has one.
#[derive(Clone, Default)]
pub(crate) struct Listener(pub(crate) Option<Arc<dyn ChangeListener>>);

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
