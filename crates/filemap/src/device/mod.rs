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
