//! The inodes the kernel knows, as libfuse's `passthrough_ll` keeps them:
//! each holds an `O_PATH` descriptor of its host file, so it stays the same
//! file whatever is renamed or removed on the host meanwhile, and is entered
//! under the host's device and inode number, so every name of one file is
//! one inode. FUSE numbers are a counter (the tree may span devices, whose
//! inode numbers overlap), never reused; the root is 1.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use fuser::{Errno, FileType};
use parking_lot::Mutex;

/// The root's FUSE number.
pub(super) const ROOT: u64 = 1;

/// A host file the kernel knows.
pub(super) struct Inode {
    /// `O_PATH | O_NOFOLLOW`: names nothing, keeps the file.
    pub(super) fd: OwnedFd,
    /// Its device and inode number (see [`super::backend::file_key`]).
    pub(super) key: u128,
    /// Its type, which never changes.
    pub(super) kind: FileType,
}

/// The known inodes, by FUSE number and by host key.
pub(super) struct Inodes {
    table: Mutex<Table>,
}

struct Table {
    by_number: HashMap<u64, Known>,
    by_key: HashMap<u128, u64>,
    next: u64,
}

struct Known {
    inode: Arc<Inode>,
    /// Lookups the kernel holds: each reply that hands it the inode counts
    /// one, and `forget` takes them back.
    lookups: u64,
}

impl Inodes {
    /// A table of `root` alone, known for good.
    pub(super) fn new(root: Inode) -> Inodes {
        let key = root.key;
        let known = Known {
            inode: Arc::new(root),
            lookups: 1,
        };
        Inodes {
            table: Mutex::new(Table {
                by_number: HashMap::from([(ROOT, known)]),
                by_key: HashMap::from([(key, ROOT)]),
                next: ROOT + 1,
            }),
        }
    }

    /// The inode of FUSE number `number`. `ESTALE` if the kernel forgot it
    /// (it asks only of inodes it holds, so that is not expected).
    pub(super) fn get(&self, number: u64) -> Result<Arc<Inode>, Errno> {
        let table = self.table.lock();
        let known = table.by_number.get(&number).ok_or(Errno::ESTALE)?;
        Ok(known.inode.clone())
    }

    /// The FUSE number of the host file `key`, if the kernel knows it.
    pub(super) fn number_of(&self, key: u128) -> Option<u64> {
        self.table.lock().by_key.get(&key).copied()
    }

    /// One more lookup of the file of `fd`, which is `key` of type `kind`:
    /// the number of its inode, entered now if the kernel did not know it
    /// (then `fd` becomes its descriptor; otherwise it is closed).
    pub(super) fn look_up(&self, fd: OwnedFd, key: u128, kind: FileType) -> u64 {
        let mut table = self.table.lock();
        if let Some(&number) = table.by_key.get(&key) {
            let known = table.by_number.get_mut(&number).expect("both maps agree");
            known.lookups += 1;
            drop(table);
            drop(fd);
            return number;
        }
        let number = table.next;
        table.next += 1;
        let inode = Arc::new(Inode { fd, key, kind });
        table.by_number.insert(number, Known { inode, lookups: 1 });
        table.by_key.insert(key, number);
        number
    }

    /// The kernel forgets `lookups` lookups of `number`; at none left, the
    /// inode goes (its descriptor closes when no request holds it). The
    /// root stays.
    pub(super) fn forget(&self, number: u64, lookups: u64) {
        if number == ROOT {
            return;
        }
        let mut table = self.table.lock();
        let Some(known) = table.by_number.get_mut(&number) else {
            return;
        };
        known.lookups = known.lookups.saturating_sub(lookups);
        if known.lookups > 0 {
            return;
        }
        let gone = table.by_number.remove(&number).expect("just seen");
        table.by_key.remove(&gone.inode.key);
        drop(table);
        drop(gone);
    }
}
