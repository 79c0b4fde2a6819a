//! A device in memory, for tests and the torture.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::{Device, DeviceClaim};
use crate::errno::{fail, with_message};

/// A zero-filled device held in memory.
///
/// Reads share a reader lock and writes take the writer lock, so every call is
/// atomic with respect to every other call: a read never sees half of a write.
///
/// [`Device::claim`] is a flag in the device: one claim at a time.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{MemDevice, PageCache, Volume};
///
/// // A volume in memory: for tests, and for anything that needs no durability.
/// let volume = Volume::format(Arc::new(MemDevice::new(16 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("scratch")?))?;
/// file.write_all_at(b"in memory", 0)?;
/// assert_eq!(file.len(), 9);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct MemDevice {
    bytes: RwLock<Vec<u8>>,
    len: u64,
    /// Whether a [`DeviceClaim`] is held; shared with the claim, which clears
    /// it when dropped.
    claimed: Arc<AtomicBool>,
}

/// The hold of a claim on a [`MemDevice`].
struct MemClaim(Arc<AtomicBool>);

impl Drop for MemClaim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
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
            claimed: Arc::new(AtomicBool::new(false)),
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

    fn claim(&self) -> io::Result<DeviceClaim> {
        if self
            .claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(with_message(
                libc::EBUSY,
                "the memory device is in use: another owner holds its claim",
            ));
        }
        Ok(DeviceClaim::new(MemClaim(self.claimed.clone())))
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
    fn one_claim_at_a_time() {
        let device = MemDevice::new(4096);
        let claim = device.claim().unwrap();
        let error = device.claim().unwrap_err();
        assert_eq!(crate::errno(&error), Some(libc::EBUSY));
        assert!(error.to_string().contains("in use"), "{error}");
        drop(claim);
        drop(device.claim().unwrap());
        // Released by the drop just above: free again.
        let _claim = device.claim().unwrap();
    }

    #[test]
    fn empty_device() {
        let device = MemDevice::new(0);
        assert!(device.is_empty());
        assert!(device.read_exact_at(&mut [0], 0).is_err());
    }
}
