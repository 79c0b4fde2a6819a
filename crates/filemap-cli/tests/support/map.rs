//! A shared map of a mounted file, for the tests that load and store
//! through one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A shared map of a file from offset 0.
pub struct Map {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

impl Map {
    /// Maps the first `len` bytes of `file`; for stores too if `writable`
    /// (then `file` must be open for writing).
    pub fn new(file: &File, len: usize, writable: bool) -> io::Result<Map> {
        let protection = match writable {
            true => libc::PROT_READ | libc::PROT_WRITE,
            false => libc::PROT_READ,
        };
        // SAFETY: a new shared mapping of an open descriptor at an address the
        // kernel picks, so it overlaps no memory this process uses; it is
        // unmapped only by `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap gives no null map");
        Ok(Map { ptr, len, writable })
    }

    /// Loads `buf.len()` bytes at `off`. The caller keeps them inside the
    /// file's last page (past it a load raises SIGBUS, which the tests
    /// report). The kernel or another process may change the file meanwhile,
    /// so each byte is a volatile load.
    pub fn load(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len, "a load outside the map");
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: `off + i` lies inside the map (asserted), mapped while
            // `self` lives; a volatile load of a byte is a plain load of
            // memory the kernel or another process may change at any time.
            *byte = unsafe { self.ptr.as_ptr().add(off + i).read_volatile() };
        }
    }

    /// Stores `data` at `off`, inside the file's size, a byte at a time.
    pub fn store(&self, off: usize, data: &[u8]) {
        assert!(self.writable, "a store through a read-only map");
        assert!(off + data.len() <= self.len, "a store outside the map");
        for (i, &byte) in data.iter().enumerate() {
            // SAFETY: as in `load`; the map is writable (asserted).
            unsafe { self.ptr.as_ptr().add(off + i).write_volatile(byte) };
        }
    }

    /// `msync(MS_SYNC)` of the whole map.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this map, which is mapped while `self`
        // lives; msync only writes back, it changes no memory.
        let done = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        match done {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the map made by `new`, unmapped once; no reference into it
        // outlives `self` (loads and stores copy).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
