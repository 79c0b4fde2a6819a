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
//!
//! With the kernel's page cache in front of filemap's, telling it of a change
//! is not enough on its own, because of the kernel's write-through race. A
//! buffered write through FUSE copies the new bytes into the kernel's pages,
//! marks them up to date and unlocks them, and only then sends the write to
//! the server (holding the inode's lock, which readers do not take). If
//! anything drops such a page in between (our notification, the kernel's
//! own invalidation when it sees the size change, reclaim), a reader reads
//! the page from the server, which has not applied the write yet, and the
//! kernel keeps that old page after the write returns. Upstream knows it
//! (the 2025 thread "fuse: Fix race condition in writethrough path") and has
//! not fixed it. Two things here close it for the mount:
//! - the file systems ask for `FUSE_EXPLICIT_INVAL_DATA`, so the kernel
//!   never drops its pages on a size change it did not make (every change
//!   it did not make, this listener tells it of);
//! - [`WritesThrough`] notes each read the server answers after one of our
//!   notifications, and a buffered write through the mount that overlaps
//!   one drops those pages again once the write is in the cache, before the
//!   kernel hears that it is done.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use filemap::lock::ranges_overlap;
use filemap::{ChangeListener, FileIdentity, Mapping};
use fuser::{INodeNo, Notifier};
use parking_lot::Mutex;

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
    /// The reads and notifications of each inode since its last buffered
    /// write through the mount.
    writes_through: WritesThrough,
}

/// How long a write's answer waits for the kernel to drop the pages read
/// during it. The kernel drops an unlocked page at once; it waits for a
/// page whose read another server thread is answering. It could wait for
/// ever only on a page the kernel dropped and allocated again behind the
/// server's back and then locked for this very write, so the answer goes
/// out after this long, and the lateness is counted.
const WRITE_THROUGH_WAIT: Duration = Duration::from_secs(1);

impl KernelCache {
    /// A read of `range` of `ino` (not `O_DIRECT`) is being answered, and
    /// its bytes may stay in the kernel's page cache: call
    /// [`ReadNoted::done`] once it is answered.
    pub(crate) fn reading(&self, ino: u64, range: Range<u64>) -> ReadNoted<'_> {
        let id = self.writes_through.reading(ino, range);
        ReadNoted {
            kernel: self,
            ino,
            id,
        }
    }

    /// A buffered write of `range` of `ino` through the mount is in the
    /// cache and about to be answered: drops the kernel's pages of the range
    /// that a read answered after one of our notifications since the last
    /// such write, and waits (up to [`WRITE_THROUGH_WAIT`]) until they are
    /// gone.
    pub(crate) fn written_through(&self, ino: u64, range: Range<u64>) {
        let Some(stale) = self.writes_through.written(ino, range) else {
            return;
        };
        let Some(notifier) = self.notifier.get().cloned() else {
            return;
        };
        let (done, gone) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = notifier.inval_inode(INodeNo(ino), stale.start as i64, stale_len(&stale));
            let _ = done.send(());
        });
        self.writes_through.dropped.fetch_add(1, Ordering::Relaxed);
        if gone.recv_timeout(WRITE_THROUGH_WAIT).is_err() {
            self.writes_through.late.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often a buffered write through the mount dropped pages read
    /// during it, and how often its answer went out before they were gone.
    pub(crate) fn write_through_drops(&self) -> (u64, u64) {
        let counts = &self.writes_through;
        (
            counts.dropped.load(Ordering::Relaxed),
            counts.late.load(Ordering::Relaxed),
        )
    }

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
        // Before the kernel drops anything, so a read that refills a page
        // after the drop is noted as one after the notification.
        self.writes_through.told(ino, range.clone());
        // `ENOENT`: the kernel holds nothing of the inode.
        let _ = notifier.inval_inode(INodeNo(ino), offset, stale_len(&range));
    }
}

/// The length of a notification of `range`: 0 runs to the end of file.
fn stale_len(range: &Range<u64>) -> i64 {
    match range.end {
        u64::MAX => 0,
        end => i64::try_from(end - range.start).unwrap_or(0),
    }
}

/// A read noted by [`KernelCache::reading`].
pub(crate) struct ReadNoted<'a> {
    kernel: &'a KernelCache,
    ino: u64,
    id: u64,
}

impl ReadNoted<'_> {
    /// The read is answered (or failed).
    pub(crate) fn done(self) {
        self.kernel.writes_through.read_done(self.ino, self.id);
    }
}

/// What the server saw of each inode since its last buffered write through
/// the mount (the kernel sends those one at a time per inode, under the
/// inode's lock, so a write's pages were filled after the previous one was
/// answered). Only inodes with a notification or a read under way since
/// then have an entry.
#[derive(Default)]
struct WritesThrough {
    inodes: Mutex<HashMap<u64, Since>>,
    next_read: AtomicU64,
    /// Writes that dropped pages read during them.
    dropped: AtomicU64,
    /// Of those, the ones answered before the drop was done.
    late: AtomicU64,
}

/// One inode's entry in [`WritesThrough`].
#[derive(Default)]
struct Since {
    /// The bytes from the first to the last that notifications since the
    /// last write named, if any did.
    told: Option<Range<u64>>,
    /// Reads being answered, and reads answered that overlap `told`.
    reads: Vec<NotedRead>,
}

impl Since {
    /// Whether a notification since the last write named bytes of `range`,
    /// so the kernel may have dropped its pages and read them again.
    fn told_of(&self, range: &Range<u64>) -> bool {
        self.told
            .as_ref()
            .is_some_and(|told| ranges_overlap(told, range))
    }
}

struct NotedRead {
    id: u64,
    range: Range<u64>,
    /// Answered (after a notification of its bytes, or it would not be kept).
    done: bool,
}

/// The bytes from the first to the last of `a` and `b`.
fn hull(a: Option<Range<u64>>, b: &Range<u64>) -> Range<u64> {
    match a {
        None => b.clone(),
        Some(a) => a.start.min(b.start)..a.end.max(b.end),
    }
}

/// Reads kept per inode before they are merged into one: a bound on the
/// memory of an inode read often and notified often but never written.
const MAX_NOTED_READS: usize = 64;

impl WritesThrough {
    fn told(&self, ino: u64, range: Range<u64>) {
        let mut inodes = self.inodes.lock();
        let since = inodes.entry(ino).or_default();
        since.told = Some(hull(since.told.take(), &range));
    }

    fn reading(&self, ino: u64, range: Range<u64>) -> u64 {
        let id = self.next_read.fetch_add(1, Ordering::Relaxed);
        let mut inodes = self.inodes.lock();
        let since = inodes.entry(ino).or_default();
        if since.reads.len() >= MAX_NOTED_READS {
            // Merge the answered ones into one that covers them all.
            let answered = since.reads.iter().filter(|read| read.done);
            let cover = answered.fold(None, |cover, read| Some(hull(cover, &read.range)));
            since.reads.retain(|read| !read.done);
            if let Some(range) = cover {
                since.reads.push(NotedRead {
                    id: u64::MAX,
                    range,
                    done: true,
                });
            }
        }
        since.reads.push(NotedRead {
            id,
            range,
            done: false,
        });
        id
    }

    fn read_done(&self, ino: u64, id: u64) {
        let mut inodes = self.inodes.lock();
        let Some(since) = inodes.get_mut(&ino) else {
            return;
        };
        let Some(at) = since.reads.iter().position(|read| read.id == id) else {
            return;
        };
        // Answered before any notification of its bytes since the last
        // write: that notification, or a later one, drops what it read.
        if since.told_of(&since.reads[at].range) {
            since.reads[at].done = true;
        } else {
            since.reads.swap_remove(at);
        }
        if since.told.is_none() && since.reads.is_empty() {
            inodes.remove(&ino);
        }
    }

    /// The write of `range` is in the cache: the part of `range` the kernel
    /// may hold as read before it, and a fresh start for the next write.
    fn written(&self, ino: u64, range: Range<u64>) -> Option<Range<u64>> {
        let mut inodes = self.inodes.lock();
        let since = inodes.get_mut(&ino)?;
        // A read under way counts once a notification of its bytes came: it
        // may answer from before the write, after the notification dropped
        // the page.
        let overlapping = since.reads.iter().filter(|read| {
            (read.done || since.told_of(&read.range)) && ranges_overlap(&read.range, &range)
        });
        let stale = overlapping.fold(None, |stale, read| {
            let part = read.range.start.max(range.start)..read.range.end.min(range.end);
            Some(hull(stale, &part))
        });
        since.told = None;
        since.reads.retain(|read| !read.done);
        if since.reads.is_empty() {
            inodes.remove(&ino);
        }
        stale
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
