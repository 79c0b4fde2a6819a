//! [`KernelCache`]: tells the kernel to drop its pages of a file that the
//! library changed behind the mount's back.
//!
//! Files are opened with the kernel's caching off, but shared memory maps of
//! them are served from the kernel's page cache. The kernel keeps those pages
//! coherent with what goes through the mount itself (it writes them back
//! before a direct read or write, a punch or a truncate, and drops them
//! after). A change made through the library in the same process, such as a
//! [`Mapping::invalidate_range`] on a lease revocation, it does not see: this
//! listener tells it, before the change (the kernel writes its dirty pages of
//! the range back through the mount, so none lands after the change) and
//! after (it drops the pages, so the next access of a map reads the change).
//!
//! Each file system says which of its inodes a mapping's file is, from the
//! file's [`FileIdentity`]: a volume file's inode number is the low half of
//! it; a host file's FUSE inode is the pass-through's own number for the
//! host's device and inode.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use filemap::{ChangeListener, FileIdentity, Mapping};
use fuser::{INodeNo, Notifier};

thread_local! {
    /// Whether this thread serves the kernel's requests: the kernel made the
    /// changes it serves and keeps its own pages coherent with them (and a
    /// notification from inside a request could wait on that request).
    static SERVES_KERNEL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one that serves the kernel's requests.
pub(crate) fn serving_kernel() {
    SERVES_KERNEL.with(|serves| serves.set(true));
}

/// The FUSE inode of the file a [`FileIdentity`] names, if the kernel may
/// know it.
pub(crate) type InodeOf = dyn Fn(&FileIdentity) -> Option<u64> + Send + Sync;

/// A volume file's inode: the low half of its identity.
pub(crate) fn volume_inode(identity: &FileIdentity) -> Option<u64> {
    Some(identity.file as u64)
}

/// The listener of a mount's cache.
#[derive(Default)]
pub(crate) struct KernelCache {
    /// Set once the session exists (the cache is built before it).
    pub(crate) notifier: OnceLock<Notifier>,
    /// Set once the file system exists (it is built with the cache).
    pub(crate) inode_of: OnceLock<Box<InodeOf>>,
}

impl KernelCache {
    fn invalidate(&self, mapping: &Mapping, range: Range<u64>) {
        if range.is_empty() || SERVES_KERNEL.with(Cell::get) {
            return;
        }
        let (Some(notifier), Some(inode_of)) = (self.notifier.get(), self.inode_of.get()) else {
            return;
        };
        let Ok(Some(identity)) = mapping.backend().identity() else {
            return;
        };
        // `None`: the kernel never looked the file up, so holds none of it.
        let Some(ino) = inode_of(&identity) else {
            return;
        };
        let Ok(offset) = i64::try_from(range.start) else {
            return;
        };
        // A length of 0 runs to the end of file.
        let len = match range.end {
            u64::MAX => 0,
            end => i64::try_from(end - range.start).unwrap_or(0),
        };
        // `ENOENT`: the kernel holds nothing of the inode.
        let _ = notifier.inval_inode(INodeNo(ino), offset, len);
    }
}

impl ChangeListener for KernelCache {
    fn before_change(&self, mapping: &Mapping, range: Range<u64>) {
        self.invalidate(mapping, range);
    }

    fn after_change(&self, mapping: &Mapping, range: Range<u64>) {
        self.invalidate(mapping, range);
    }
}
