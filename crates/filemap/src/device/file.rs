//! A device backed by a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use super::block_locks::BlockLocks;
use super::Device;
use crate::errno::fail;

/// A regular file or block device accessed with positioned I/O (`pread`/`pwrite`).
///
/// The size is fixed when the device is opened: I/O outside `0..len()` fails
/// instead of extending the file, as it would on a real disk.
///
/// The kernel does not make buffered `pread` atomic against a racing `pwrite` of
/// the same block (ext4 tears a small fraction of such reads), so each call holds
/// the striped locks of the blocks it touches: shared to read, exclusive to write.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    len: u64,
    block_locks: BlockLocks,
}

impl FileDevice {
    /// Opens an existing regular file or block device for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file)
    }

    /// Creates (or truncates) a regular file of `len` bytes. The file is sparse:
    /// it takes no space until written.
    pub fn create(path: impl AsRef<Path>, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(len)?;
        Ok(Self::with_len(file, len))
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
        }
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
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let _blocks = self.block_locks.exclusive(offset, buf.len() as u64);
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
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

    #[test]
    fn open_missing_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let error = FileDevice::open(dir.path().join("missing")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
