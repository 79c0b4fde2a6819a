//! What both file systems of this crate share: the table of open files, each
//! a [`FileHandle`] of its file's one mapping, and the requests on them (read,
//! write, flush, release, fsync, fallocate, lseek), which
//! [`serve_open_files!`] writes into a `fuser::Filesystem` whose open files
//! are its field `open`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use filemap::{FileHandle, Mapping};
use fuser::{Errno, ReplyEmpty};
use parking_lot::Mutex;

use crate::notify::KernelCache;

/// The open files of a file system, by FUSE file handle.
#[derive(Default)]
pub(crate) struct OpenFiles {
    open: Mutex<HashMap<u64, OpenFile>>,
    next_handle: AtomicU64,
    /// Set when files are opened with the kernel's page cache in front: the
    /// reads and buffered writes it must see (see [`crate::notify`]).
    kernel_cache: OnceLock<Arc<KernelCache>>,
}

struct OpenFile {
    handle: Arc<FileHandle>,
    /// Opened with `O_DIRECT`: reads and writes go to the cache's direct I/O.
    direct: bool,
}

impl OpenFiles {
    /// A new FUSE handle for an opener of `mapping` with `open(2)`'s `flags`.
    pub(crate) fn insert(&self, mapping: &Arc<Mapping>, flags: i32) -> fuser::FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed) + 1;
        let file = OpenFile {
            handle: Arc::new(mapping.handle()),
            direct: flags & libc::O_DIRECT != 0,
        };
        self.open.lock().insert(fh, file);
        fuser::FileHandle(fh)
    }

    /// The handle of `fh`, and whether it was opened with `O_DIRECT`.
    pub(crate) fn get(&self, fh: fuser::FileHandle) -> Result<(Arc<FileHandle>, bool), Errno> {
        let open = self.open.lock();
        let file = open.get(&fh.0).ok_or(Errno::EBADF)?;
        Ok((file.handle.clone(), file.direct))
    }

    /// The mapping `fh` is open on.
    pub(crate) fn mapping(&self, fh: fuser::FileHandle) -> Result<Arc<Mapping>, Errno> {
        Ok(self.get(fh)?.0.mapping().clone())
    }

    /// Forgets `fh`: the mapping's last handle writes back and keeps its pages
    /// cached (see [`filemap::PageCache::open`]).
    pub(crate) fn remove(&self, fh: fuser::FileHandle) {
        let released = self.open.lock().remove(&fh.0);
        drop(released);
    }

    /// Files are opened with the kernel's page cache in front, which
    /// `kernel_cache` keeps coherent.
    pub(crate) fn watch_kernel_cache(&self, kernel_cache: Arc<KernelCache>) {
        let _ = self.kernel_cache.set(kernel_cache);
    }

    /// The kernel's page cache in front, if files are opened so.
    pub(crate) fn kernel_cache(&self) -> Option<&KernelCache> {
        self.kernel_cache.get().map(|kernel| &**kernel)
    }

    /// Forgets every open file (unmounting).
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.open.lock());
        drop(all);
    }
}

/// What the sync at unmount (`destroy`) found, for whoever waits for the
/// unmount: `destroy` answers the kernel nothing, and a failed sync must not
/// pass as a clean unmount.
#[derive(Clone, Default)]
pub(crate) struct UnmountSync(Arc<Mutex<Option<io::Error>>>);

impl UnmountSync {
    /// Keeps the sync's failure, if it failed.
    pub(crate) fn record(&self, synced: io::Result<()>) {
        if let Err(error) = synced {
            *self.0.lock() = Some(error);
        }
    }

    /// The sync's outcome: its failure, once.
    pub(crate) fn outcome(&self) -> io::Result<()> {
        match self.0.lock().take() {
            Some(error) => Err(io::Error::new(
                error.kind(),
                format!("syncing at unmount: {error}"),
            )),
            None => Ok(()),
        }
    }
}

/// A file system that syncs everything at unmount, and keeps the outcome.
pub(crate) trait SyncsAtUnmount {
    /// Where its `destroy` records the outcome of its sync.
    fn unmount_sync(&self) -> UnmountSync;
}

/// The errno of a filemap error, for the kernel.
pub(crate) fn errno(error: &io::Error) -> Errno {
    Errno::from_i32(filemap::errno(error).unwrap_or(libc::EIO))
}

/// `done`'s error as the kernel's errno.
pub(crate) fn or_errno<T>(done: io::Result<T>) -> Result<T, Errno> {
    done.map_err(|error| errno(&error))
}

/// Replies to a request that answers nothing but its outcome.
pub(crate) fn empty(reply: ReplyEmpty, done: Result<(), Errno>) {
    match done {
        Ok(()) => reply.ok(),
        Err(error) => reply.error(error),
    }
}

/// The requests on open files, written into a `fuser::Filesystem` impl whose
/// open files are its field `open` ([`OpenFiles`]).
macro_rules! serve_open_files {
    () => {
        fn read(
            &self,
            _req: &fuser::Request,
            ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            offset: u64,
            size: u32,
            _flags: fuser::OpenFlags,
            _lock_owner: Option<fuser::LockOwner>,
            reply: fuser::ReplyData,
        ) {
            let (handle, direct) = match self.open.get(fh) {
                Ok(opened) => opened,
                Err(error) => return reply.error(error),
            };
            let mapping = handle.mapping();
            if direct {
                let mut buf =
                    filemap::AlignedBuf::new(size as usize, filemap::cache::DIRECT_IO_MEMORY_ALIGN);
                match mapping.read_direct(&mut buf, offset) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(error) => reply.error($crate::open_files::errno(&error)),
                }
                return;
            }
            let end = offset.saturating_add(u64::from(size));
            let noted = self
                .open
                .kernel_cache()
                .map(|kernel| kernel.reading(ino.0, offset..end));
            $crate::open_files::reply_read(mapping, offset, size as usize, reply);
            if let Some(noted) = noted {
                noted.done();
            }
        }

        fn write(
            &self,
            _req: &fuser::Request,
            ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            offset: u64,
            data: &[u8],
            write_flags: fuser::WriteFlags,
            _flags: fuser::OpenFlags,
            _lock_owner: Option<fuser::LockOwner>,
            reply: fuser::ReplyWrite,
        ) {
            $crate::notify::serving_kernel();
            let (handle, direct) = match self.open.get(fh) {
                Ok(opened) => opened,
                Err(error) => return reply.error(error),
            };
            let mapping = handle.mapping();
            // The kernel writing back a shared map's pages (through whatever
            // descriptor, an `O_DIRECT` one too): buffered, whatever its
            // alignment, since the last page is cut at the end of file.
            let from_a_map = write_flags.contains(fuser::WriteFlags::FUSE_WRITE_CACHE);
            let written = if direct && !from_a_map {
                let buf =
                    filemap::AlignedBuf::from_slice(data, filemap::cache::DIRECT_IO_MEMORY_ALIGN);
                mapping.write_direct(&buf, offset)
            } else {
                mapping.write_all_at(data, offset).map(|()| data.len())
            };
            // A buffered write the kernel copied into its own pages first.
            if let (Some(kernel), false, false) = (self.open.kernel_cache(), direct, from_a_map) {
                kernel.written_through(ino.0, offset..offset.saturating_add(data.len() as u64));
            }
            match written {
                Ok(n) => reply.written(n as u32),
                Err(error) => reply.error($crate::open_files::errno(&error)),
            }
        }

        fn flush(
            &self,
            _req: &fuser::Request,
            _ino: fuser::INodeNo,
            _fh: fuser::FileHandle,
            _lock_owner: fuser::LockOwner,
            reply: fuser::ReplyEmpty,
        ) {
            reply.ok();
        }

        fn release(
            &self,
            _req: &fuser::Request,
            _ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            _flags: fuser::OpenFlags,
            _lock_owner: Option<fuser::LockOwner>,
            _flush: bool,
            reply: fuser::ReplyEmpty,
        ) {
            // The mapping's last handle writes back and keeps its pages cached.
            self.open.remove(fh);
            reply.ok();
        }

        fn fsync(
            &self,
            _req: &fuser::Request,
            _ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            _datasync: bool,
            reply: fuser::ReplyEmpty,
        ) {
            // The file's data, then the volume's metadata (its size, its blocks
            // and its names), as an fsync of a new file must make its name last.
            $crate::open_files::empty(
                reply,
                self.open
                    .get(fh)
                    .and_then(|(handle, _)| $crate::open_files::or_errno(handle.sync_all())),
            );
        }

        fn fallocate(
            &self,
            _req: &fuser::Request,
            _ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            offset: u64,
            length: u64,
            mode: i32,
            reply: fuser::ReplyEmpty,
        ) {
            $crate::notify::serving_kernel();
            let mapping = match self.open.mapping(fh) {
                Ok(mapping) => mapping,
                Err(error) => return reply.error(error),
            };
            $crate::open_files::empty(
                reply,
                $crate::open_files::or_errno($crate::open_files::fallocate(
                    &mapping, offset, length, mode,
                )),
            );
        }

        fn copy_file_range(
            &self,
            _req: &fuser::Request,
            _ino_in: fuser::INodeNo,
            fh_in: fuser::FileHandle,
            offset_in: u64,
            _ino_out: fuser::INodeNo,
            fh_out: fuser::FileHandle,
            offset_out: u64,
            len: u64,
            _flags: fuser::CopyFileRangeFlags,
            reply: fuser::ReplyWrite,
        ) {
            $crate::notify::serving_kernel();
            let copied = self.open.mapping(fh_in).and_then(|from| {
                let to = self.open.mapping(fh_out)?;
                $crate::open_files::or_errno($crate::open_files::copy_range(
                    &from, offset_in, &to, offset_out, len,
                ))
            });
            match copied {
                Ok(n) => reply.written(n),
                Err(error) => reply.error(error),
            }
        }

        fn lseek(
            &self,
            _req: &fuser::Request,
            _ino: fuser::INodeNo,
            fh: fuser::FileHandle,
            offset: i64,
            whence: i32,
            reply: fuser::ReplyLseek,
        ) {
            let mapping = match self.open.mapping(fh) {
                Ok(mapping) => mapping,
                Err(error) => return reply.error(error),
            };
            let Ok(from) = u64::try_from(offset) else {
                return reply.error(fuser::Errno::ENXIO);
            };
            let found = match whence {
                libc::SEEK_DATA => mapping.seek_data(from),
                libc::SEEK_HOLE => mapping.seek_hole(from),
                _ => return reply.error(fuser::Errno::EINVAL),
            };
            match found {
                Ok(Some(at)) => reply.offset(at as i64),
                Ok(None) => reply.error(fuser::Errno::ENXIO),
                Err(error) => reply.error($crate::open_files::errno(&error)),
            }
        }
    };
}
pub(crate) use serve_open_files;

/// `fallocate(2)` of `mapping` with the modes FUSE passes on (the kernel
/// refuses collapse and insert itself).
pub(crate) fn fallocate(mapping: &Mapping, offset: u64, length: u64, mode: i32) -> io::Result<()> {
    let end = offset.saturating_add(length);
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let grow = || match keep_size || end <= mapping.len() {
        true => Ok(()),
        false => mapping.set_len(end),
    };
    match mode & !libc::FALLOC_FL_KEEP_SIZE {
        // Blocks are allocated when written: this only sets the size.
        0 => grow(),
        libc::FALLOC_FL_PUNCH_HOLE if keep_size => mapping.punch_hole(offset, length),
        libc::FALLOC_FL_ZERO_RANGE if keep_size => {
            // Only the part inside the file: the size stays.
            let end = end.min(mapping.len());
            match offset < end {
                true => mapping.zero_range(offset, end - offset),
                false => Ok(()),
            }
        }
        libc::FALLOC_FL_ZERO_RANGE => grow().and_then(|()| mapping.zero_range(offset, length)),
        _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    }
}

/// Copies `len` bytes at `offset_in` of `from` to `offset_out` of `to` (or
/// up to the end of `from`), through the cache: `copy_file_range(2)` served
/// in one request instead of a read and a write per chunk. Returns the bytes
/// copied, at most what a FUSE reply counts (the kernel asks for no more).
pub(crate) fn copy_range(
    from: &Mapping,
    offset_in: u64,
    to: &Mapping,
    offset_out: u64,
    len: u64,
) -> io::Result<u32> {
    const CHUNK: usize = 1 << 20;
    let len = len.min(u64::from(u32::MAX) & !(filemap::page::PAGE - 1));
    let mut buf = vec![0; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let read = from.read_at(&mut buf[..want], offset_in + done)?;
        if read == 0 {
            break;
        }
        to.write_all_at(&buf[..read], offset_out + done)?;
        done += read as u64;
    }
    Ok(done as u32)
}

/// The largest reply buffer a server thread keeps between reads: the largest
/// read the kernel sends (`max_pages` of 256 pages at `init`).
const KEPT_REPLY_BUF: usize = 1 << 20;

thread_local! {
    /// A server thread's buffer for read replies, kept between requests: a
    /// fresh zeroed buffer per request cost a `memset` of the whole read (or,
    /// from fresh memory, a page fault per page) before the cache copied into it.
    static REPLY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `reply` with a buffer of `len` bytes whose contents are left over
/// from earlier reads (the caller overwrites what it sends).
pub(crate) fn with_reply_buf<T>(len: usize, reply: impl FnOnce(&mut [u8]) -> T) -> T {
    REPLY_BUF.with(|kept| {
        let Ok(mut kept) = kept.try_borrow_mut() else {
            return reply(&mut vec![0; len]);
        };
        if kept.len() < len {
            if len > KEPT_REPLY_BUF {
                return reply(&mut vec![0; len]);
            }
            kept.resize(len, 0);
        }
        reply(&mut kept[..len])
    })
}

/// Answers a buffered read of `size` bytes at `offset`: with the cache's
/// pages in place when they are one slice of its memory, pinned while the
/// kernel copies the reply out of them (no copy into a reply buffer first);
/// else through a reply buffer.
pub(crate) fn reply_read(mapping: &Mapping, offset: u64, size: usize, reply: fuser::ReplyData) {
    match mapping.pin_range(offset, size) {
        Ok(range) => {
            let mut slices = range.slices();
            match (slices.next(), slices.next()) {
                (None, _) => reply.data(&[]),
                (Some(bytes), None) => reply.data(bytes),
                _ => with_reply_buf(range.len(), |buf| {
                    range.copy_to(buf);
                    reply.data(buf)
                }),
            }
        }
        // More than the budget holds unpinned: read it instead.
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
            with_reply_buf(size, |buf| match read_fully(mapping, offset, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(error) => reply.error(errno(&error)),
            })
        }
        Err(error) => reply.error(errno(&error)),
    }
}

/// Reads `buf.len()` bytes at `offset` into `buf`, or up to the end of file;
/// returns how many.
pub(crate) fn read_fully(mapping: &Mapping, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match mapping.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
