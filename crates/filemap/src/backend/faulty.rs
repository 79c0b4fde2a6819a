//! A backend wrapper that injects delays and errors into chosen calls.
//!
//! Its purpose is the window of the kernel's stale-data bug. An invalidating call
//! (punch, zero, set_len, collapse, insert) reaches the backend after the cache
//! dropped the range; a fill that slips in between reads the data about to be
//! removed and can cache it for good. A delay injected BEFORE forwarding such a
//! call widens exactly that window, which lets the torture and the tests hit it
//! with backends that have no device underneath to slow down, such as
//! [`crate::backend::HostFile`]. Delays before reads and writes widen the windows
//! of fills and writeback; errors exercise every error path above the backend.
//!
//! Each call's byte range, which [`FaultRule::on_bytes`] selects on, is the range
//! of file bytes the call reads, writes or changes:
//!
//! | op | bytes |
//! |---|---|
//! | `ReadPages`, `WritePages` | the pages transferred |
//! | `ReadDirect`, `WriteDirect`, `PunchHole`, `ZeroRange` | `offset..offset + len` |
//! | `SetLen` | `len..`: whatever a shrink removes or a grow adds |
//! | `CollapseRange`, `InsertRange` | `offset..`: every byte from `offset` on moves |
//! | `Sync`, `Remove` | none: byte ranges are ignored |
//!
//! [`FaultRule::on_bytes`]: crate::fault::FaultRule::on_bytes

use std::io;
use std::ops::Range;

use super::{Backend, BackendOp};
use crate::fault::{span, touched, Faulty};
use crate::page::PAGE;

/// Wraps a backend and injects delays and errors into the calls chosen by its
/// rules, a [`FaultPlan`](crate::fault::FaultPlan) of [`BackendOp`]s.
///
/// Rules are checked in the order they were added, and each matching rule counts
/// the call. Every delay that fires is applied before the call is forwarded; the
/// first error that fires fails the call without forwarding it, so nothing
/// changes; a discard that fires (and no error) reports success without
/// forwarding (a read then leaves its buffer as it was). With a given seed the injections are deterministic for a given order
/// of calls.
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
/// use filemap::backend::BackendOp;
/// use filemap::fault::{Injection, Trigger};
/// use filemap::{FaultRule, FaultyBackend, HostFile, PageCache};
///
/// // Widen the window between the cache dropping a range and the backend
/// // punching it, where an incoherent cache would let a fill in.
/// let host = HostFile::from_file(tempfile::tempfile()?)?;
/// let backend = Arc::new(FaultyBackend::new(Arc::new(host), 7));
/// let delay = Duration::from_millis(5);
/// backend.add_rule(FaultRule::new(
///     BackendOp::PunchHole,
///     Trigger::Always,
///     Injection::Delay { min: delay, max: delay },
/// ));
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(backend.clone())?;
/// file.write_all_at(&[1; 8192], 0)?;
/// let start = Instant::now();
/// file.punch_hole(0, 4096)?;
/// assert!(start.elapsed() >= delay);
/// assert_eq!(backend.injected(), 1);
/// # Ok::<(), std::io::Error>(())
/// ```
pub type FaultyBackend = Faulty<dyn Backend, BackendOp>;

/// The bytes of `len` bytes of pages starting at page `index`, saturating.
fn pages(index: u64, len: usize) -> Option<Range<u64>> {
    touched(index.saturating_mul(PAGE), len as u64)
}

/// Every byte from `offset` on.
fn from(offset: u64) -> Option<Range<u64>> {
    Some(offset..u64::MAX)
}

impl Backend for Faulty<dyn Backend, BackendOp> {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.forward(BackendOp::ReadPages, pages(index, buf.len()), |inner| {
            inner.read_pages(index, buf)
        })
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.forward(BackendOp::WritePages, pages(index, buf.len()), |inner| {
            inner.write_pages(index, buf)
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.forward(BackendOp::SetLen, from(len), |inner| inner.set_len(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forward(BackendOp::PunchHole, touched(offset, len), |inner| {
            inner.punch_hole(offset, len)
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forward(BackendOp::ZeroRange, touched(offset, len), |inner| {
            inner.zero_range(offset, len)
        })
    }

    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forward(BackendOp::CollapseRange, from(offset), |inner| {
            inner.collapse_range(offset, len)
        })
    }

    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forward(BackendOp::InsertRange, from(offset), |inner| {
            inner.insert_range(offset, len)
        })
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.forward(BackendOp::ReadDirect, span(offset, buf), |inner| {
            inner.read_direct(offset, buf)
        })
    }

    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.forward(BackendOp::WriteDirect, span(offset, buf), |inner| {
            inner.write_direct(offset, buf)
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.forward(BackendOp::Sync, None, |inner| inner.sync())
    }

    fn remove(&self) -> io::Result<()> {
        self.forward(BackendOp::Remove, None, |inner| inner.remove())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::backend::{HostFile, Volume};
    use crate::device::MemDevice;
    use crate::fault::{FaultRule, Injection, Trigger};
    use crate::page::PAGE_SIZE;
    use std::fmt;
    use std::sync::Arc;

    /// A faulty backend over a volume file of `pages` pages, page i filled with
    /// byte `i + 1`.
    fn backend(pages: u64) -> FaultyBackend {
        let volume = Volume::format(Arc::new(MemDevice::new(64 * PAGE))).unwrap();
        let file = volume.create_file("a").unwrap();
        file.set_len(pages * PAGE).unwrap();
        let data: Vec<u8> = (0..pages).flat_map(|i| [i as u8 + 1; PAGE_SIZE]).collect();
        file.write_pages(0, &data).unwrap();
        FaultyBackend::new(Arc::new(file), 1)
    }

    fn read(backend: &dyn Backend, index: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0xAA; PAGE_SIZE];
        backend.read_pages(index, &mut buf).map(|()| buf)
    }

    fn errno<T: fmt::Debug>(result: io::Result<T>) -> i32 {
        result.unwrap_err().raw_os_error().expect("an errno")
    }

    #[test]
    fn an_error_fails_the_call_and_forwards_nothing() {
        let backend = backend(4);
        backend.fail_nth(BackendOp::PunchHole, 2, libc::EIO);
        backend.punch_hole(0, PAGE).unwrap();
        assert_eq!(errno(backend.punch_hole(PAGE, PAGE)), libc::EIO);
        assert_eq!(
            read(&backend, 1).unwrap(),
            [2; PAGE_SIZE],
            "the punch was forwarded"
        );
        backend.punch_hole(PAGE, PAGE).unwrap();
        assert_eq!(read(&backend, 1).unwrap(), [0; PAGE_SIZE]);
        assert_eq!(backend.injected(), 1);
    }

    #[test]
    fn every_call_can_fail_without_changing_anything() {
        let backend = backend(4);
        let ops = [
            BackendOp::ReadPages,
            BackendOp::WritePages,
            BackendOp::SetLen,
            BackendOp::PunchHole,
            BackendOp::ZeroRange,
            BackendOp::CollapseRange,
            BackendOp::InsertRange,
            BackendOp::ReadDirect,
            BackendOp::WriteDirect,
            BackendOp::Sync,
            BackendOp::Remove,
        ];
        for op in ops {
            backend.add_rule(FaultRule::new(
                op,
                Trigger::Always,
                Injection::Error(libc::EROFS),
            ));
        }
        let mut buf = vec![0; PAGE_SIZE];
        let results = [
            backend.read_pages(0, &mut buf),
            backend.write_pages(0, &[9; PAGE_SIZE]),
            backend.set_len(0),
            backend.punch_hole(0, PAGE),
            backend.zero_range(0, PAGE),
            backend.collapse_range(0, PAGE),
            backend.insert_range(0, PAGE),
            backend.read_direct(0, &mut buf),
            backend.write_direct(0, &[9; PAGE_SIZE]),
            backend.sync(),
            backend.remove(),
        ];
        for (op, result) in ops.iter().zip(results) {
            assert_eq!(errno(result), libc::EROFS, "{op:?}");
        }
        assert_eq!(backend.injected(), ops.len() as u64);
        assert_eq!(buf, [0; PAGE_SIZE], "a failed read leaves the buffer alone");
        backend.clear();
        assert_eq!(backend.len().unwrap(), 4 * PAGE);
        for index in 0..4 {
            assert_eq!(read(&backend, index).unwrap(), [index as u8 + 1; PAGE_SIZE]);
        }
    }

    #[test]
    fn byte_ranges_follow_each_call() {
        let backend = backend(4);
        let rule = |op| FaultRule::new(op, Trigger::Always, Injection::Error(libc::EIO));
        let reads = backend.add_rule(rule(BackendOp::ReadPages).on_bytes(2 * PAGE..3 * PAGE));
        assert!(read(&backend, 1).is_ok());
        assert!(read(&backend, 3).is_ok());
        assert!(read(&backend, 2).is_err());
        backend.remove_rule(reads);

        // Growing adds bytes past page 3 and shrinking back removes them: no
        // match. A shrink into page 3 removes part of it: a match.
        backend.add_rule(rule(BackendOp::SetLen).on_bytes(3 * PAGE..4 * PAGE));
        assert!(backend.set_len(5 * PAGE).is_ok());
        assert!(backend.set_len(4 * PAGE).is_ok());
        assert!(backend.set_len(3 * PAGE + 1).is_err());
        backend.clear();

        // A collapse moves every byte after its offset.
        backend.add_rule(rule(BackendOp::CollapseRange).on_bytes(3 * PAGE..4 * PAGE));
        assert!(backend.collapse_range(0, PAGE).is_err());
        backend.add_rule(rule(BackendOp::PunchHole).on_bytes(3 * PAGE..4 * PAGE));
        assert!(backend.punch_hole(0, PAGE).is_ok());
        assert!(backend.punch_hole(0, 3 * PAGE + 1).is_err());

        // Direct reads are their own kind of call.
        backend.add_rule(rule(BackendOp::ReadPages));
        let mut buf = vec![0; PAGE_SIZE];
        backend.read_direct(PAGE, &mut buf).unwrap();
        assert_eq!(buf, [2; PAGE_SIZE]);
    }

    #[test]
    fn a_delay_before_a_punch_holds_the_old_data_in_place() {
        let backend = backend(2);
        let delay = Duration::from_millis(100);
        let hold = Injection::Delay {
            min: delay,
            max: delay,
        };
        backend.add_rule(FaultRule::new(BackendOp::PunchHole, Trigger::Always, hold));
        let start = Instant::now();
        std::thread::scope(|scope| {
            let punch = scope.spawn(|| backend.punch_hole(0, PAGE));
            std::thread::sleep(delay / 4);
            // The window: the punch has been called, the backend still holds the data.
            assert_eq!(read(backend.inner().as_ref(), 0).unwrap(), [1; PAGE_SIZE]);
            punch.join().unwrap().unwrap();
        });
        assert!(start.elapsed() >= delay);
        assert_eq!(read(&backend, 0).unwrap(), [0; PAGE_SIZE]);
        assert_eq!(backend.injected(), 1);
    }

    #[test]
    fn wraps_a_host_file() {
        let file = HostFile::from_file(tempfile::tempfile().unwrap()).unwrap();
        let backend = FaultyBackend::new(Arc::new(file), 1);
        backend.set_len(3 * PAGE).unwrap();
        for index in 0..3 {
            backend
                .write_pages(index, &[index as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        backend.fail_nth(BackendOp::CollapseRange, 1, libc::EIO);
        assert_eq!(errno(backend.collapse_range(0, PAGE)), libc::EIO);
        assert_eq!(backend.len().unwrap(), 3 * PAGE);
        backend.collapse_range(0, PAGE).unwrap();
        assert_eq!(backend.len().unwrap(), 2 * PAGE);
        assert_eq!(read(&backend, 0).unwrap(), [2; PAGE_SIZE]);
        assert_eq!(backend.max_file_size(), backend.inner().max_file_size());
        assert!(format!("{backend:?}").contains("HostFile"));
    }
}
