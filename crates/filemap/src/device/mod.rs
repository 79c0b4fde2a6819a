//! Block devices: the bottom layer, positioned reads and writes of bytes.
//!
//! [`FileDevice`] is a regular file or block device, [`MemDevice`] is memory (tests,
//! the torture), and [`FaultyDevice`] wraps either to inject delays and I/O errors
//! into chosen calls, which widens race windows and exercises error paths.

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
}
