//! Block devices: the bottom layer, positioned reads and writes of bytes.
//!
//! [`FileDevice`] is a regular file or block device, [`MemDevice`] is memory (tests,
//! the torture), and [`FaultyDevice`] wraps either to inject delays and I/O errors
//! into chosen calls, which widens race windows and exercises error paths.
//!
//! A device has at most one owner that allocates its blocks at a time: the
//! owner holds a [`DeviceClaim`] from [`Device::claim`], and a second claim
//! fails with `EBUSY` until the first is dropped.

use std::fmt;
use std::io;

pub(crate) mod block_locks;
mod faulty;
mod file;
mod mem;

pub use crate::fault::{Delivery, FaultRule, Injection, RuleId, Trigger};
pub use faulty::FaultyDevice;
pub use file::FileDevice;
pub use mem::MemDevice;

/// The kind of a device call, as fault rules select them.
///
/// ```
/// use std::sync::Arc;
/// use filemap::device::DeviceOp;
/// use filemap::{Device, FaultyDevice, MemDevice};
///
/// let device = FaultyDevice::new(Arc::new(MemDevice::new(1 << 20)), 1);
/// device.fail_nth(DeviceOp::Flush, 1, libc::EIO);
/// device.write_all_at(b"data", 0)?; // writes are not selected
/// assert_eq!(device.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
/// device.flush()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceOp {
    /// [`Device::read_exact_at`].
    Read,
    /// [`Device::write_all_at`].
    Write,
    /// [`Device::flush`].
    Flush,
}

/// The unit a [`Device`] reads and writes atomically.
pub const ATOMIC_BLOCK: usize = 4096;

/// Byte-addressed block storage shared by many threads.
///
/// Calls are positioned and independent: concurrent calls on disjoint ranges never
/// affect each other, and each aligned [`ATOMIC_BLOCK`] is read and written
/// atomically: a read returns a block as it was before or after a concurrent
/// write of it, never a mix (page atomicity, C4, rests on this). A call on a range
/// outside `0..len()` fails with `EIO` and transfers nothing.
///
/// ```
/// use filemap::{Device, MemDevice};
///
/// let device = MemDevice::new(1 << 20);
/// assert_eq!(device.len(), 1 << 20);
/// device.write_all_at(b"block", 4096)?;
/// let mut buf = [0; 5];
/// device.read_exact_at(&mut buf, 4096)?;
/// assert_eq!(&buf, b"block");
/// device.flush()?;
/// // Outside the device: EIO, and nothing is transferred.
/// let error = device.write_all_at(b"past the end", (1 << 20) - 4).unwrap_err();
/// assert_eq!(error.raw_os_error(), Some(libc::EIO));
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait Device: Send + Sync + fmt::Debug {
    /// The device's size in bytes.
    fn len(&self) -> u64;

    /// Whether the device holds no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`. Fails if the range is not inside the device.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`. Fails if the range is not inside the device.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Claims the device for one owner until the returned claim is dropped.
    ///
    /// An owner that allocates the device's blocks (a
    /// [`Volume`](crate::Volume)) holds a claim while it lives: two owners
    /// would each hand out the same free block, and one's file would read the
    /// other's data. Fails with `EBUSY`, with a message, while another claim on
    /// the same storage is held (by any device on it, wrapped or not, and for a
    /// [`FileDevice`] by any process).
    fn claim(&self) -> io::Result<DeviceClaim>;
}

/// An exclusive claim on a device's storage, from [`Device::claim`]: released
/// when dropped.
///
/// ```
/// use filemap::{Device, MemDevice};
///
/// let device = MemDevice::new(1 << 20);
/// let claim = device.claim()?;
/// let error = device.claim().unwrap_err();
/// assert_eq!(filemap::errno(&error), Some(libc::EBUSY));
/// drop(claim);
/// let _claim = device.claim()?; // free again
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "the device is released when the claim is dropped"]
pub struct DeviceClaim {
    _hold: Box<dyn Send + Sync>,
}

impl DeviceClaim {
    /// A claim that lasts as long as `hold`, whose `Drop` releases it.
    pub fn new(hold: impl Send + Sync + 'static) -> Self {
        Self {
            _hold: Box::new(hold),
        }
    }
}

impl fmt::Debug for DeviceClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceClaim").finish_non_exhaustive()
    }
}
