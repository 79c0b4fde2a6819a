//! The kernel baselines: the workloads' calls as plain system calls on a host
//! file (`pread`, `pwrite`, `fallocate`, `O_DIRECT`), with no filemap between.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::pattern;

/// A temporary host file (in the system's temporary directory) filled with the
/// benchmarks' pattern, with an `O_DIRECT` descriptor when the file system
/// allows one. Removed when dropped.
pub struct HostFile {
    /// The buffered descriptor.
    pub file: File,
    /// The `O_DIRECT` descriptor, or why the file system refused it.
    pub direct: Result<File, io::Error>,
    _path: tempfile::TempPath,
}

impl HostFile {
    /// A host file of `len` bytes of the pattern, written back to the file
    /// system and then read once, so it starts wholly in the kernel's page cache.
    pub fn create(len: u64) -> io::Result<HostFile> {
        let named = tempfile::NamedTempFile::new()?;
        let (mut file, path) = named.into_parts();
        let chunk = pattern(1 << 20);
        let mut written = 0;
        while written < len {
            let n = chunk.len().min((len - written) as usize);
            file.write_all(&chunk[..n])?;
            written += n as u64;
        }
        file.sync_all()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < len {
            let n = buf.len().min((len - offset) as usize);
            file.read_exact_at(&mut buf[..n], offset)?;
            offset += n as u64;
        }
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        Ok(HostFile {
            file,
            direct,
            _path: path,
        })
    }

    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` of `len` bytes
    /// at `offset`.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(offset), Ok(len)) => (offset, len),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        // SAFETY: `fallocate` reads no memory of ours; the descriptor is open
        // for as long as `self` lives.
        let result = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_punched_range_reads_zeroes_and_the_rest_survives() {
        let host = HostFile::create(1 << 20).unwrap();
        host.punch_hole(65536, 65536).unwrap();
        let mut buf = vec![1u8; 4096];
        host.file.read_exact_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        host.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(4096));
        assert_eq!(host.file.metadata().unwrap().len(), 1 << 20);
    }
}
