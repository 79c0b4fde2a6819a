//! A device in memory, for tests and the torture.

use std::io;

use parking_lot::RwLock;

use super::Device;
use crate::errno::fail;

/// A zero-filled device held in memory.
///
/// Reads share a reader lock and writes take the writer lock, so every call is
/// atomic with respect to every other call: a read never sees half of a write.
pub struct MemDevice {
    bytes: RwLock<Vec<u8>>,
    len: u64,
}

impl MemDevice {
    /// A device of `len` zero bytes.
    ///
    /// The memory is allocated zeroed, which the allocator can usually satisfy
    /// with untouched pages, so a large sparse device costs little until written.
    ///
    /// # Panics
    /// If `len` does not fit in the address space.
    pub fn new(len: u64) -> Self {
        let size = usize::try_from(len).expect("MemDevice length exceeds the address space");
        Self {
            bytes: RwLock::new(vec![0; size]),
            len,
        }
    }

    /// The byte range `offset..offset + count` as indexes, if it lies inside the
    /// device.
    fn span(&self, offset: u64, count: usize) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(count as u64) {
            // Both ends are <= len, which fits in usize (checked in `new`).
            Some(end) if end <= self.len => Ok(offset as usize..end as usize),
            _ => fail(libc::EIO),
        }
    }
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDevice").field("len", &self.len).finish()
    }
}

impl Device for MemDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let span = self.span(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.read()[span]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let span = self.span(offset, buf.len())?;
        self.bytes.write()[span].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_zeroed_and_round_trips() {
        let device = MemDevice::new(8192);
        assert_eq!(device.len(), 8192);
        let mut buf = [1u8; 100];
        device.read_exact_at(&mut buf, 4000).unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        device.write_all_at(b"hello", 4094).unwrap();
        let mut buf = [0u8; 5];
        device.read_exact_at(&mut buf, 4094).unwrap();
        assert_eq!(&buf, b"hello");
        device.flush().unwrap();
    }

    #[test]
    fn out_of_range_fails_and_transfers_nothing() {
        let device = MemDevice::new(4096);
        assert!(device.write_all_at(&[7; 10], 4090).is_err());
        assert!(device.write_all_at(&[7; 1], u64::MAX).is_err());
        let mut buf = [9u8; 10];
        assert!(device.read_exact_at(&mut buf, 4090).is_err());
        assert_eq!(buf, [9; 10], "a failed read must not touch the buffer");
        assert!(device.read_exact_at(&mut buf, u64::MAX - 3).is_err());

        let mut tail = [1u8; 6];
        device.read_exact_at(&mut tail, 4090).unwrap();
        assert_eq!(tail, [0; 6], "a failed write must not touch the device");
        // An empty transfer at the very end is in range.
        device.read_exact_at(&mut [], 4096).unwrap();
    }

    #[test]
    fn empty_device() {
        let device = MemDevice::new(0);
        assert!(device.is_empty());
        assert!(device.read_exact_at(&mut [0], 0).is_err());
    }
}
