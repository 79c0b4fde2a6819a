//! A device backed by a regular file or a block device.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use parking_lot::Mutex;
use rustix::fs::{flock, FlockOperation};

use super::block_locks::BlockLocks;
use super::{Device, DeviceClaim};
use crate::aligned::AlignedBuf;
use crate::errno::{fail, with_message};

/// The alignment of offsets, lengths and buffers that `O_DIRECT` I/O is given:
/// a page, which is a multiple of every logical block size a disk reports.
const DIRECT_ALIGN: usize = 4096;

/// Whether `O_DIRECT` I/O of `len` bytes at `offset` from or to `buf` meets
/// its alignment: buffer, offset and length all multiples of
/// [`DIRECT_ALIGN`].
fn direct_aligned(buf: *const u8, offset: u64, len: usize) -> bool {
    buf as usize % DIRECT_ALIGN == 0 && offset % DIRECT_ALIGN as u64 == 0 && len % DIRECT_ALIGN == 0
}

/// A regular file or block device accessed with positioned I/O (`pread`/`pwrite`).
///
/// The size is fixed when the device is opened: I/O outside `0..len()` fails
/// instead of extending the file, as it would on a real disk.
///
/// The kernel does not make buffered `pread` atomic against a racing `pwrite` of
/// the same block (ext4 tears a small fraction of such reads), so each call holds
/// the striped locks of the blocks it touches: shared to read, exclusive to write.
///
/// [`FileDevice::with_direct_io`] turns on `O_DIRECT`, so that reads and writes
/// go between the caller's buffer and the disk without passing through the
/// host's page cache, as a storage engine with its own cache opens its device:
/// no second copy of the data in the host's cache, no copy through it.
///
/// [`FileDevice::with_direct_reads`] sends only large aligned reads past the
/// host's page cache, through a second descriptor opened with `O_DIRECT`, and
/// keeps it for everything else: a cache's streaming fills then cost the host
/// no page allocations and no copy, while small reads (metadata, single
/// pages) and every write still find the host's cache.
///
/// [`Device::claim`] takes a non-blocking exclusive `flock` on the file, which
/// excludes every other process, and records the file's identity in the
/// process: `flock` belongs to an open file description, so on its own it
/// would not exclude a second claim through the same or a duplicated
/// descriptor. Two devices on one file (opened twice, through a hard link, or
/// from a duplicated descriptor) therefore exclude each other too, and in one
/// process so do two device nodes of one block device. The lock is advisory:
/// it binds only programs that take it.
///
/// ```
/// use filemap::{Device, FileDevice};
///
/// let dir = tempfile::tempdir()?;
/// let image = dir.path().join("disk.img");
/// let device = FileDevice::create(&image, 1 << 30)?; // sparse: takes no space yet
/// device.write_all_at(b"persistent", 0)?;
/// device.flush()?; // fdatasync
/// drop(device);
/// let device = FileDevice::open(&image)?;
/// assert_eq!(device.len(), 1 << 30);
/// let mut buf = [0; 10];
/// device.read_exact_at(&mut buf, 0)?;
/// assert_eq!(&buf, b"persistent");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    len: u64,
    block_locks: BlockLocks,
    direct: bool,
    direct_reads: Option<DirectReads>,
}

/// The descriptor of [`FileDevice::with_direct_reads`], and the smallest read
/// it takes.
#[derive(Debug)]
struct DirectReads {
    file: File,
    min_len: usize,
}

impl FileDevice {
    /// Opens an existing regular file or block device for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file)
    }

    /// Creates (or truncates) a regular file of `len` bytes. The file is sparse:
    /// it takes no space until written.
    ///
    /// Fails with `EBUSY`, changing nothing, while the file is claimed (a
    /// volume on it is open): truncating it would wipe that volume.
    pub fn create(path: impl AsRef<Path>, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let device = Self::with_len(file, len);
        let claim = device.claim()?;
        device.file.set_len(0)?;
        device.file.set_len(len)?;
        drop(claim);
        Ok(device)
    }

    /// Wraps an open file, which must be readable and writable. Its size is
    /// taken from its metadata, or for a block device by seeking to its end
    /// (block devices report a size of zero in their metadata).
    pub fn from_file(mut file: File) -> io::Result<Self> {
        let metadata = file.metadata()?;
        let len = if metadata.file_type().is_block_device() {
            let len = file.seek(SeekFrom::End(0))?;
            file.seek(SeekFrom::Start(0))?;
            len
        } else {
            metadata.len()
        };
        Ok(Self::with_len(file, len))
    }

    fn with_len(file: File, len: u64) -> Self {
        Self {
            file,
            len,
            block_locks: BlockLocks::new(),
            direct: false,
            direct_reads: None,
        }
    }

    /// Turns on `O_DIRECT` for every later read and write. I/O whose offset,
    /// length or buffer is not a multiple of 4 KiB goes through an aligned
    /// bounce buffer (a write of part of a block reads the rest of it first,
    /// under the block's lock), so callers need not align anything; aligned
    /// I/O reaches the disk without a copy. Fails with `EINVAL`, changing
    /// nothing, if the device's size is not a multiple of 4 KiB or its file
    /// system refuses `O_DIRECT`.
    ///
    /// ```
    /// use filemap::{Device, FileDevice};
    /// let file = tempfile::tempfile()?;
    /// file.set_len(1 << 20)?;
    /// let device = FileDevice::from_file(file)?.with_direct_io()?;
    /// device.write_all_at(b"straight to the disk", 4096 + 3)?;
    /// let mut buf = [0; 20];
    /// device.read_exact_at(&mut buf, 4096 + 3)?;
    /// assert_eq!(&buf, b"straight to the disk");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_direct_io(mut self) -> io::Result<Self> {
        if self.len % DIRECT_ALIGN as u64 != 0 {
            return fail(libc::EINVAL);
        }
        let flags = rustix::fs::fcntl_getfl(&self.file)?;
        rustix::fs::fcntl_setfl(&self.file, flags | rustix::fs::OFlags::DIRECT)?;
        self.direct = true;
        Ok(self)
    }

    /// Whether I/O bypasses the host's page cache ([`FileDevice::with_direct_io`]).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Sends every read of at least `min_len` bytes whose offset, length and
    /// buffer are multiples of 4 KiB past the host's page cache, through a
    /// second descriptor of the file opened with `O_DIRECT`; other reads and
    /// every write keep using the host's cache. For a device under a cache of
    /// its own whose large reads are streams (a sequential read's readahead
    /// windows): the host's cache would hold a second copy of each, and
    /// allocating and filling its pages is then most of the cost of a read.
    ///
    /// Coherent: before an `O_DIRECT` read the kernel writes back and waits
    /// on the dirty cached pages of its range, so a direct read returns every
    /// write that completed before it (and the device's block locks keep
    /// writes of its blocks out while it runs); and since no write bypasses
    /// the host's cache, no cached page is ever older than the disk.
    ///
    /// Fails, changing nothing, with `EINVAL` if `min_len` is 0 or the file's
    /// file system refuses `O_DIRECT`, or with the error of opening the
    /// second descriptor (through `/proc/self/fd`).
    ///
    /// ```
    /// use filemap::{AlignedBuf, Device, FileDevice};
    /// let file = tempfile::tempfile()?;
    /// file.set_len(1 << 20)?;
    /// let device = FileDevice::from_file(file)?.with_direct_reads(128 << 10)?;
    /// device.write_all_at(&[7; 256 << 10], 0)?; // through the host's cache
    /// let mut window = AlignedBuf::new(256 << 10, 4096);
    /// device.read_exact_at(&mut window, 0)?; // past it, and up to date
    /// assert!(window.iter().all(|&b| b == 7));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_direct_reads(mut self, min_len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        if min_len == 0 {
            return fail(libc::EINVAL);
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))?;
        self.direct_reads = Some(DirectReads { file, min_len });
        Ok(self)
    }

    /// Whether large reads bypass the host's page cache
    /// ([`FileDevice::with_direct_reads`]).
    pub fn has_direct_reads(&self) -> bool {
        self.direct_reads.is_some()
    }

    /// The descriptor of [`FileDevice::with_direct_reads`] if it takes a read
    /// of `len` bytes at `offset` into `buf`.
    fn direct_read_file(&self, buf: *const u8, offset: u64, len: usize) -> Option<&File> {
        let direct = self.direct_reads.as_ref()?;
        (direct_aligned(buf, offset, len) && len >= direct.min_len).then_some(&direct.file)
    }

    /// Whether `O_DIRECT` I/O of `len` bytes at `offset` from or to `buf` must
    /// go through a bounce buffer.
    fn needs_bounce(&self, buf: *const u8, offset: u64, len: usize) -> bool {
        self.direct && !direct_aligned(buf, offset, len)
    }

    /// An aligned buffer covering the whole blocks of `len` bytes at `offset`,
    /// and the offset of its first byte.
    fn bounce_for(&self, offset: u64, len: usize) -> (u64, AlignedBuf) {
        let align = DIRECT_ALIGN as u64;
        let start = offset / align * align;
        let end = (offset + len as u64).next_multiple_of(align);
        (start, AlignedBuf::new((end - start) as usize, DIRECT_ALIGN))
    }

    /// The file's identity in this process's table of claims.
    fn identity(&self) -> io::Result<Identity> {
        let metadata = self.file.metadata()?;
        Ok(if metadata.file_type().is_block_device() {
            // Two device nodes of one disk are two inodes: key by the disk.
            Identity::Disk(metadata.rdev())
        } else {
            Identity::Inode(metadata.dev(), metadata.ino())
        })
    }

    /// Fails unless `offset..offset + count` lies inside the device.
    fn check(&self, offset: u64, count: usize) -> io::Result<()> {
        match offset.checked_add(count as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => fail(libc::EIO),
        }
    }
}

impl Device for FileDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let _blocks = self.block_locks.shared(offset, buf.len() as u64);
        if let Some(direct) = self.direct_read_file(buf.as_ptr(), offset, buf.len()) {
            return direct.read_exact_at(buf, offset);
        }
        if !self.needs_bounce(buf.as_ptr(), offset, buf.len()) {
            return self.file.read_exact_at(buf, offset);
        }
        let (start, mut bounce) = self.bounce_for(offset, buf.len());
        self.file.read_exact_at(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        if !self.needs_bounce(buf.as_ptr(), offset, buf.len()) {
            let _blocks = self.block_locks.exclusive(offset, buf.len() as u64);
            return self.file.write_all_at(buf, offset);
        }
        let (start, mut bounce) = self.bounce_for(offset, buf.len());
        // Every block the bounce covers is rewritten whole: lock them all.
        let _blocks = self.block_locks.exclusive(start, bounce.len() as u64);
        let skip = (offset - start) as usize;
        if skip != 0 || buf.len() != bounce.len() {
            // Part of a block: keep the bytes around the write.
            self.file.read_exact_at(&mut bounce, start)?;
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn claim(&self) -> io::Result<DeviceClaim> {
        let identity = self.identity()?;
        let mut claimed = CLAIMED.lock();
        if claimed.contains(&identity) {
            return Err(in_use("another device of this process holds its claim"));
        }
        // The claim locks through a descriptor of its own (a duplicate: the
        // lock is the open file description's), so it needs no borrow of the
        // device and lasts exactly as long as the claim.
        let lock = self.file.try_clone()?;
        match flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(in_use("another open file holds an exclusive lock on it"))
            }
            Err(error) => return Err(error.into()),
        }
        claimed.insert(identity);
        Ok(DeviceClaim::new(FileClaim { lock, identity }))
    }
}

/// Which file a claim is on: the device and inode of a regular file, the
/// device number of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Identity {
    Inode(u64, u64),
    Disk(u64),
}

/// The files this process holds claims on.
static CLAIMED: Mutex<BTreeSet<Identity>> = Mutex::new(BTreeSet::new());

/// The hold of a claim on a [`FileDevice`]: its lock, and its entry in
/// [`CLAIMED`].
struct FileClaim {
    lock: File,
    identity: Identity,
}

impl Drop for FileClaim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED.lock();
        // Unlocked before the entry goes, so that no claim of this process can
        // find the entry gone but the file still locked. Explicitly: the
        // device's own descriptor shares the open file description, so
        // closing this one would not release the lock. Unlocking a lock the
        // description holds does not fail.
        let _ = flock(&self.lock, FlockOperation::Unlock);
        claimed.remove(&self.identity);
    }
}

/// The `EBUSY` of a claimed file, saying why.
fn in_use(why: &str) -> io::Error {
    with_message(libc::EBUSY, format!("the device file is in use: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_read_never_sees_half_a_write() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 * 4096).unwrap();
        let device = FileDevice::from_file(file).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..20_000u32 {
                    device
                        .write_all_at(&[(i % 251) as u8 + 1; 4096], 4096)
                        .unwrap();
                }
            });
            let mut buf = [0u8; 4096];
            for _ in 0..20_000 {
                device.read_exact_at(&mut buf, 4096).unwrap();
                assert!(buf.iter().all(|&b| b == buf[0]), "torn block read");
            }
        });
    }

    #[test]
    fn create_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        let device = FileDevice::create(&path, 1 << 20).unwrap();
        assert_eq!(device.len(), 1 << 20);

        let mut buf = [1u8; 64];
        device.read_exact_at(&mut buf, 5000).unwrap();
        assert_eq!(buf, [0; 64], "a new device reads zeroes");

        device.write_all_at(b"block data", 4096 * 3 + 10).unwrap();
        device.flush().unwrap();
        drop(device);

        let device = FileDevice::open(&path).unwrap();
        assert_eq!(device.len(), 1 << 20);
        let mut buf = [0u8; 10];
        device.read_exact_at(&mut buf, 4096 * 3 + 10).unwrap();
        assert_eq!(&buf, b"block data");
    }

    #[test]
    fn out_of_range_fails_and_does_not_extend() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let device = FileDevice::from_file(file).unwrap();
        assert!(device.write_all_at(&[7; 8], 4092).is_err());
        assert!(device.write_all_at(&[7; 8], u64::MAX - 2).is_err());
        let mut buf = [9u8; 8];
        assert!(device.read_exact_at(&mut buf, 4092).is_err());
        assert_eq!(buf, [9; 8]);
        assert_eq!(device.file.metadata().unwrap().len(), 4096);

        let mut tail = [1u8; 4];
        device.read_exact_at(&mut tail, 4092).unwrap();
        assert_eq!(tail, [0; 4], "a failed write must not touch the device");
    }

    /// Aligned and unaligned I/O through `O_DIRECT` reads back what was
    /// written and keeps the bytes around a partial write.
    #[test]
    fn direct_io_round_trips_aligned_and_unaligned_io() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8 * 4096).unwrap();
        let device = FileDevice::from_file(file)
            .unwrap()
            .with_direct_io()
            .unwrap();
        assert!(device.is_direct());
        let flags = rustix::fs::fcntl_getfl(&device.file).unwrap();
        assert!(flags.contains(rustix::fs::OFlags::DIRECT));

        let block = AlignedBuf::from_slice(&[5; 2 * 4096], DIRECT_ALIGN);
        device.write_all_at(&block, 4096).unwrap();
        // Unaligned buffer, offset and length: a read-modify-write of block 1.
        device.write_all_at(&[9; 10], 4096 + 100).unwrap();
        let mut whole = AlignedBuf::new(3 * 4096, DIRECT_ALIGN);
        device.read_exact_at(&mut whole, 0).unwrap();
        assert!(whole[..4096].iter().all(|&b| b == 0));
        assert!(whole[4096..4196].iter().all(|&b| b == 5));
        assert!(whole[4196..4206].iter().all(|&b| b == 9));
        assert!(whole[4206..].iter().all(|&b| b == 5));
        let mut odd = vec![0u8; 4097];
        device.read_exact_at(&mut odd[1..], 4096).unwrap();
        assert_eq!(&odd[1..], &whole[4096..8192]);
        let mut tail = [1u8; 3];
        device.read_exact_at(&mut tail, 8 * 4096 - 3).unwrap();
        assert_eq!(tail, [0; 3]);
    }

    #[test]
    fn direct_io_refuses_a_size_that_is_not_whole_blocks() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096 + 512).unwrap();
        let error = FileDevice::from_file(file)
            .unwrap()
            .with_direct_io()
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    }

    /// How many pages of `len` bytes at `offset` of `file` the host's page
    /// cache holds.
    fn host_cached_pages(file: &File, offset: u64, len: usize) -> usize {
        crate::bench_support::host_cached_pages(file, offset, len).unwrap()
    }

    /// Syncs `file` and drops it from the host's page cache; fails loudly on
    /// a file system that keeps its pages anyway (tmpfs), where the test that
    /// calls it would prove nothing.
    fn drop_host_cache(file: &File, len: usize) {
        crate::bench_support::drop_host_cache(file).unwrap();
        assert_eq!(
            host_cached_pages(file, 0, len),
            0,
            "the temporary directory's file system keeps dropped pages cached \
             (tmpfs?): set TMPDIR to a disk's file system"
        );
    }

    /// The pages a large aligned read fills stay out of the host's page cache
    /// with direct reads, and come into it without; a small read still
    /// caches its page.
    #[test]
    fn direct_reads_leave_large_reads_out_of_the_host_cache() {
        const LEN: usize = 1 << 20;
        const LARGE: usize = 256 << 10;
        for direct in [false, true] {
            let file = tempfile::tempfile().unwrap();
            file.set_len(LEN as u64).unwrap();
            file.write_all_at(&[3; LEN], 0).unwrap();
            drop_host_cache(&file, LEN);
            let mut device = FileDevice::from_file(file.try_clone().unwrap()).unwrap();
            if direct {
                device = device.with_direct_reads(LARGE).unwrap();
                assert!(device.has_direct_reads());
            }
            let mut window = AlignedBuf::new(LARGE, DIRECT_ALIGN);
            device.read_exact_at(&mut window, 0).unwrap();
            assert!(window.iter().all(|&b| b == 3));
            let cached = host_cached_pages(&file, 0, LARGE);
            if direct {
                assert_eq!(cached, 0, "a direct read of {LARGE} bytes cached pages");
            } else {
                assert_eq!(
                    cached,
                    LARGE / DIRECT_ALIGN,
                    "a buffered read left pages out"
                );
            }
            // Below the threshold, and unaligned: through the host's cache.
            let mut small = [0u8; 100];
            device
                .read_exact_at(&mut small, (LEN / 2) as u64 + 7)
                .unwrap();
            assert_eq!(small, [3; 100]);
            assert_eq!(host_cached_pages(&file, (LEN / 2) as u64, DIRECT_ALIGN), 1);
        }
    }

    /// A direct read returns the buffered write just before it, not yet
    /// written back: the kernel writes a direct read's range back first.
    #[test]
    fn a_direct_read_returns_the_buffered_write_before_it() {
        const LEN: usize = 128 << 10;
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 * LEN as u64).unwrap();
        let device = FileDevice::from_file(file)
            .unwrap()
            .with_direct_reads(LEN)
            .unwrap();
        let mut read = AlignedBuf::new(LEN, DIRECT_ALIGN);
        assert!(device
            .direct_read_file(read.as_ptr(), LEN as u64, LEN)
            .is_some());
        for round in 0..200u32 {
            let byte = (round % 251) as u8 + 1;
            // Part of a page and whole pages: both dirty in the host's cache.
            device.write_all_at(&[byte; 10], LEN as u64 + 5).unwrap();
            device
                .write_all_at(&vec![byte; LEN - 4096], LEN as u64 + 4096)
                .unwrap();
            device.read_exact_at(&mut read, LEN as u64).unwrap();
            assert!(
                read[5..15].iter().chain(&read[4096..]).all(|&b| b == byte),
                "round {round}: a direct read missed the write before it"
            );
        }
    }

    #[test]
    fn direct_reads_refuse_a_threshold_of_zero() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let error = FileDevice::from_file(file)
            .unwrap()
            .with_direct_reads(0)
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    }

    fn assert_busy(result: io::Result<DeviceClaim>) {
        let error = result.unwrap_err();
        assert_eq!(crate::errno(&error), Some(libc::EBUSY), "{error}");
        assert!(error.to_string().contains("in use"), "{error}");
    }

    #[test]
    fn claims_exclude_every_device_on_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        let device = FileDevice::create(&path, 1 << 20).unwrap();
        let again = FileDevice::open(&path).unwrap();
        let dup = FileDevice::from_file(device.file.try_clone().unwrap()).unwrap();
        std::fs::hard_link(&path, dir.path().join("link")).unwrap();
        let link = FileDevice::open(dir.path().join("link")).unwrap();
        let claim = device.claim().unwrap();
        for other in [&device, &again, &dup, &link] {
            assert_busy(other.claim());
        }
        drop(claim);
        let claim = link.claim().unwrap();
        assert_busy(device.claim());
        drop(claim);
        drop(again.claim().unwrap());
    }

    /// Another open file description of the file (as another process would
    /// hold) finds the file locked while a claim is held, and free after.
    #[test]
    fn a_claim_locks_the_file_for_other_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        let device = FileDevice::create(&path, 1 << 20).unwrap();
        let other = File::open(&path).unwrap();
        let claim = device.claim().unwrap();
        let locked = flock(&other, FlockOperation::NonBlockingLockShared);
        assert_eq!(locked, Err(rustix::io::Errno::WOULDBLOCK));
        drop(claim);
        flock(&other, FlockOperation::NonBlockingLockShared).unwrap();
        // Now the other open file holds a lock: a claim fails.
        assert_busy(device.claim());
        drop(other);
        drop(device.claim().unwrap());
    }

    #[test]
    fn create_refuses_a_claimed_file_and_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        let device = FileDevice::create(&path, 1 << 20).unwrap();
        device.write_all_at(b"volume", 0).unwrap();
        let claim = device.claim().unwrap();
        let error = FileDevice::create(&path, 4096).unwrap_err();
        assert_eq!(crate::errno(&error), Some(libc::EBUSY));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let mut buf = [0; 6];
        device.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"volume");
        drop(claim);
        let device = FileDevice::create(&path, 4096).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        device.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 6], "create truncates");
    }

    #[test]
    fn open_missing_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let error = FileDevice::open(dir.path().join("missing")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
