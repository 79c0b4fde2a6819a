//! A device wrapper that injects delays and I/O errors into chosen calls.
//!
//! Delays widen race windows (a read held between its block lookup and its device
//! read is exactly the window the seeds' stale-data bugs live in); errors exercise
//! the error paths of everything above the device. The rules are a
//! [`crate::fault::FaultPlan`] of [`DeviceOp`]s.

use std::io;

use super::{Device, DeviceClaim, DeviceOp};
use crate::fault::{span, Faulty};

/// Wraps a device and injects delays and errors into the calls chosen by its rules.
///
/// The rules form a [`FaultPlan`](crate::fault::FaultPlan): checked in the order
/// they were added, each matching rule counts the call; every delay that fires is applied before the
/// call is forwarded, and the first error that fires fails the call without
/// forwarding it; a discard that fires (and no error) reports success without
/// forwarding, which simulates a crash: later writes never reach the device. A read or write touches the device bytes it transfers; a flush
/// touches none. With a given seed the injections are deterministic for a given
/// order of calls.
///
/// [`Device::claim`] claims the wrapped device (no rule applies to it): the
/// wrapper and the device below it are one storage, which only one owner may
/// allocate.
///
/// ```
/// use std::sync::Arc;
/// use filemap::device::{DeviceOp, Injection, Trigger};
/// use filemap::{Device, FaultRule, FaultyDevice, MemDevice};
///
/// // A crash after the first write: the second never reaches the memory below.
/// let memory = Arc::new(MemDevice::new(1 << 20));
/// let device = FaultyDevice::new(memory.clone(), 1);
/// device.add_rule(FaultRule::new(DeviceOp::Write, Trigger::FromNth(2), Injection::Discard));
/// device.write_all_at(b"first", 0)?;
/// device.write_all_at(b"second", 4096)?; // reports success, but is lost
/// let mut buf = [0; 6];
/// memory.read_exact_at(&mut buf[..5], 0)?;
/// assert_eq!(&buf[..5], b"first");
/// memory.read_exact_at(&mut buf, 4096)?;
/// assert_eq!(buf, [0; 6]);
/// assert_eq!(device.injected(), 1);
/// # Ok::<(), std::io::Error>(())
/// ```
pub type FaultyDevice = Faulty<dyn Device, DeviceOp>;

impl Device for Faulty<dyn Device, DeviceOp> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.forward(DeviceOp::Read, span(offset, buf), |inner| {
            inner.read_exact_at(buf, offset)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.forward(DeviceOp::Write, span(offset, buf), |inner| {
            inner.write_all_at(buf, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.forward(DeviceOp::Flush, None, |inner| inner.flush())
    }

    fn claim(&self) -> io::Result<DeviceClaim> {
        self.inner.claim()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::device::MemDevice;
    use crate::fault::{FaultRule, Injection, Trigger};
    use std::sync::Arc;

    fn device(seed: u64) -> FaultyDevice {
        FaultyDevice::new(Arc::new(MemDevice::new(16384)), seed)
    }

    fn read_at(device: &FaultyDevice, offset: u64) -> io::Result<[u8; 4]> {
        let mut buf = [0u8; 4];
        device.read_exact_at(&mut buf, offset).map(|()| buf)
    }

    #[test]
    fn nth_error_fires_once_on_the_right_call_and_forwards_nothing() {
        let device = device(1);
        device.write_all_at(b"old!", 100).unwrap(); // before the rule: not counted
        device.fail_nth(DeviceOp::Write, 2, libc::ENOSPC);
        device.write_all_at(b"one!", 0).unwrap();
        let error = device.write_all_at(b"new!", 100).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            &read_at(&device, 100).unwrap(),
            b"old!",
            "the failed write was forwarded"
        );
        for _ in 0..10 {
            device.write_all_at(b"ok!!", 200).unwrap();
        }
        assert_eq!(device.injected(), 1);
        // Reads were never matched by the write rule.
        assert_eq!(&read_at(&device, 0).unwrap(), b"one!");
    }

    #[test]
    fn nth_read_error_leaves_the_buffer_alone() {
        let device = device(1);
        device.write_all_at(b"data", 0).unwrap();
        device.fail_nth(DeviceOp::Read, 1, libc::EIO);
        let mut buf = [7u8; 4];
        let error = device.read_exact_at(&mut buf, 0).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EIO));
        assert_eq!(buf, [7; 4]);
        assert_eq!(&read_at(&device, 0).unwrap(), b"data");
    }

    #[test]
    fn every_nth_and_flush() {
        let device = device(1);
        device.add_rule(FaultRule::new(
            DeviceOp::Flush,
            Trigger::EveryNth(3),
            Injection::Error(libc::EIO),
        ));
        let failed: Vec<bool> = (0..9).map(|_| device.flush().is_err()).collect();
        assert_eq!(
            failed,
            [false, false, true, false, false, true, false, false, true]
        );
        assert_eq!(device.injected(), 3);
    }

    #[test]
    fn probability_zero_and_one() {
        let device = device(7);
        let never = device.add_rule(FaultRule::new(
            DeviceOp::Read,
            Trigger::Probability(0.0),
            Injection::Error(libc::EIO),
        ));
        assert!((0..1000).all(|_| read_at(&device, 0).is_ok()));
        assert_eq!(device.injected(), 0);
        device.remove_rule(never);
        device.add_rule(FaultRule::new(
            DeviceOp::Read,
            Trigger::Probability(1.0),
            Injection::Error(libc::EIO),
        ));
        assert!((0..1000).all(|_| read_at(&device, 0).is_err()));
        assert_eq!(device.injected(), 1000);
    }

    #[test]
    fn probability_is_deterministic_for_a_seed() {
        let pattern = |seed| {
            let device = device(seed);
            device.add_rule(FaultRule::new(
                DeviceOp::Read,
                Trigger::Probability(0.5),
                Injection::Error(libc::EIO),
            ));
            (0..200)
                .map(|_| read_at(&device, 0).is_err())
                .collect::<Vec<_>>()
        };
        let first = pattern(42);
        assert_eq!(first, pattern(42));
        let failures = first.iter().filter(|&&failed| failed).count();
        assert!((40..160).contains(&failures), "{failures} of 200 failed");
    }

    #[test]
    fn byte_range_selects_calls() {
        let device = device(1);
        device.add_rule(
            FaultRule::new(DeviceOp::Read, Trigger::Always, Injection::Error(libc::EIO))
                .on_bytes(4096..8192),
        );
        assert!(read_at(&device, 0).is_ok());
        assert!(
            read_at(&device, 4092).is_ok(),
            "ends right before the range"
        );
        assert!(read_at(&device, 4094).is_err(), "overlaps the first byte");
        assert!(read_at(&device, 8190).is_err(), "overlaps the last byte");
        assert!(read_at(&device, 8192).is_ok());
    }

    #[test]
    fn delays_delay_and_precede_errors() {
        let device = device(3);
        let min = Duration::from_millis(20);
        device.add_rule(FaultRule::new(
            DeviceOp::Read,
            Trigger::Always,
            Injection::Delay {
                min,
                max: Duration::from_millis(30),
            },
        ));
        let start = Instant::now();
        read_at(&device, 0).unwrap();
        assert!(start.elapsed() >= min);

        device.fail_nth(DeviceOp::Read, 2, libc::EIO);
        read_at(&device, 0).unwrap();
        let start = Instant::now();
        assert!(read_at(&device, 0).is_err());
        assert!(start.elapsed() >= min, "the delay applies before the error");
        assert_eq!(device.injected(), 4);
    }

    #[test]
    fn clear_removes_every_rule() {
        let device = device(1);
        device.add_rule(FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Error(libc::EROFS),
        ));
        assert!(device.write_all_at(b"x", 0).is_err());
        device.clear();
        device.write_all_at(b"x", 0).unwrap();
        assert_eq!(device.injected(), 1);
    }

    #[test]
    fn a_claim_is_the_wrapped_devices() {
        let memory: Arc<dyn Device> = Arc::new(MemDevice::new(4096));
        let device = FaultyDevice::new(memory.clone(), 1);
        let claim = device.claim().unwrap();
        let busy = memory.claim().unwrap_err();
        assert_eq!(crate::errno(&busy), Some(libc::EBUSY));
        drop(claim);
        let claim = memory.claim().unwrap();
        assert_eq!(
            crate::errno(&device.claim().unwrap_err()),
            Some(libc::EBUSY)
        );
        drop(claim);
        drop(device.claim().unwrap());
    }

    #[test]
    fn discarded_writes_never_reach_the_device() {
        let device = device(1);
        device.write_all_at(b"old!", 0).unwrap();
        device.add_rule(FaultRule::new(
            DeviceOp::Write,
            Trigger::FromNth(2),
            Injection::Discard,
        ));
        device.write_all_at(b"one!", 100).unwrap();
        device.write_all_at(b"new!", 0).unwrap();
        device.write_all_at(b"two!", 100).unwrap();
        assert_eq!(&read_at(&device, 0).unwrap(), b"old!");
        assert_eq!(&read_at(&device, 100).unwrap(), b"one!");
        assert_eq!(device.injected(), 2);
    }
}
