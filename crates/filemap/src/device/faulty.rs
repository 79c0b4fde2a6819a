//! A device wrapper that injects delays and I/O errors into chosen calls.
//!
//! Delays widen race windows (a read held between its block lookup and its device
//! read is exactly the window the seeds' stale-data bugs live in); errors exercise
//! the error paths of everything above the device.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Device, DeviceOp};
use crate::errno::err;

/// When a rule fires, counted over the calls the rule matches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// On every matching call.
    Always,
    /// Only on the n-th matching call (1-based), once. `Nth(0)` never fires.
    Nth(u64),
    /// On every n-th matching call: the n-th, 2n-th, ... `EveryNth(0)` never fires.
    EveryNth(u64),
    /// On each matching call independently with this probability (0.0 never,
    /// 1.0 always), drawn from the device's seeded generator.
    Probability(f64),
}

/// What a rule does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// Sleeps for a duration drawn uniformly from `min..=max`, then forwards the call.
    Delay {
        /// The shortest sleep.
        min: Duration,
        /// The longest sleep (taken as `min` if smaller than `min`).
        max: Duration,
    },
    /// Fails the call with this errno (as `io::Error::from_raw_os_error`) without
    /// forwarding it: nothing is read or written.
    Error(i32),
}

/// One fault rule: which calls it matches, when it fires, and what it injects.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    /// The kind of call the rule matches.
    pub op: DeviceOp,
    /// When the rule fires, counted over matching calls.
    pub trigger: Trigger,
    /// What the rule does when it fires.
    pub injection: Injection,
    /// If set, the rule matches only reads and writes whose byte range overlaps
    /// these device byte offsets (not block numbers, so the rule is independent of
    /// any block size). Flushes touch no bytes and ignore this field.
    pub blocks: Option<Range<u64>>,
}

impl FaultRule {
    /// A rule matching every call of kind `op`.
    pub fn new(op: DeviceOp, trigger: Trigger, injection: Injection) -> Self {
        Self {
            op,
            trigger,
            injection,
            blocks: None,
        }
    }

    /// Restricts the rule to calls overlapping the device bytes `bytes`.
    pub fn on_bytes(mut self, bytes: Range<u64>) -> Self {
        self.blocks = Some(bytes);
        self
    }
}

/// Identifies a rule added to a [`FaultyDevice`], for [`FaultyDevice::remove_rule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// Wraps a device and injects delays and errors into the calls chosen by its rules.
///
/// Rules are checked in the order they were added, and each matching rule counts
/// the call. Every delay that fires is applied (they add up) before the call is
/// forwarded; if any error fires, the first one is returned after the delays and
/// the call is not forwarded. With a given seed the injections are deterministic
/// for a given order of calls.
pub struct FaultyDevice {
    inner: Arc<dyn Device>,
    /// Whether any rule exists: lets calls skip the mutex when there are none.
    any_rules: AtomicBool,
    injected: AtomicU64,
    rules: Mutex<Rules>,
}

struct Rules {
    active: Vec<ActiveRule>,
    next_id: u64,
    rng: fastrand::Rng,
}

struct ActiveRule {
    id: RuleId,
    rule: FaultRule,
    /// Matching calls seen so far.
    matched: u64,
}

/// The injections chosen for one call.
struct Verdict {
    delay: Duration,
    error: Option<i32>,
}

impl FaultyDevice {
    /// Wraps `inner` with no rules; `seed` seeds the generator used by delays and
    /// [`Trigger::Probability`].
    pub fn new(inner: Arc<dyn Device>, seed: u64) -> Self {
        Self {
            inner,
            any_rules: AtomicBool::new(false),
            injected: AtomicU64::new(0),
            rules: Mutex::new(Rules {
                active: Vec::new(),
                next_id: 0,
                rng: fastrand::Rng::with_seed(seed),
            }),
        }
    }

    /// Adds a rule after the existing ones.
    pub fn add_rule(&self, rule: FaultRule) -> RuleId {
        let mut rules = self.rules.lock();
        let id = RuleId(rules.next_id);
        rules.next_id += 1;
        rules.active.push(ActiveRule {
            id,
            rule,
            matched: 0,
        });
        self.any_rules.store(true, Ordering::Relaxed);
        id
    }

    /// Fails the `n`-th call of kind `op` (1-based, counted from now) with `errno`.
    pub fn fail_nth(&self, op: DeviceOp, n: u64, errno: i32) -> RuleId {
        self.add_rule(FaultRule::new(op, Trigger::Nth(n), Injection::Error(errno)))
    }

    /// Removes a rule; unknown or already removed ids are ignored.
    pub fn remove_rule(&self, id: RuleId) {
        let mut rules = self.rules.lock();
        rules.active.retain(|active| active.id != id);
        self.any_rules
            .store(!rules.active.is_empty(), Ordering::Relaxed);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        let mut rules = self.rules.lock();
        rules.active.clear();
        self.any_rules.store(false, Ordering::Relaxed);
    }

    /// How many injections (delays and errors) have happened so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn Device> {
        &self.inner
    }

    /// Decides the injections for one call touching `bytes` (None for a flush).
    fn judge(&self, op: DeviceOp, bytes: Option<Range<u64>>) -> Verdict {
        let mut verdict = Verdict {
            delay: Duration::ZERO,
            error: None,
        };
        if !self.any_rules.load(Ordering::Relaxed) {
            return verdict;
        }
        let mut rules = self.rules.lock();
        let Rules { active, rng, .. } = &mut *rules;
        let mut fired = 0;
        for active in active.iter_mut() {
            let rule = &active.rule;
            if rule.op != op {
                continue;
            }
            if let (Some(wanted), Some(touched)) = (&rule.blocks, &bytes) {
                if !(touched.start < wanted.end && wanted.start < touched.end) {
                    continue;
                }
            }
            active.matched = active.matched.saturating_add(1);
            let fires = match rule.trigger {
                Trigger::Always => true,
                Trigger::Nth(n) => active.matched == n,
                Trigger::EveryNth(n) => n != 0 && active.matched % n == 0,
                Trigger::Probability(p) => rng.f64() < p,
            };
            if !fires {
                continue;
            }
            match rule.injection {
                Injection::Delay { min, max } => {
                    let min_ns = u64::try_from(min.as_nanos()).unwrap_or(u64::MAX);
                    let max_ns = u64::try_from(max.as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(min_ns);
                    let ns = rng.u64(min_ns..=max_ns);
                    verdict.delay = verdict.delay.saturating_add(Duration::from_nanos(ns));
                    fired += 1;
                }
                Injection::Error(errno) if verdict.error.is_none() => {
                    verdict.error = Some(errno);
                    fired += 1;
                }
                // A later error is shadowed by the first one: not injected.
                Injection::Error(_) => {}
            }
        }
        drop(rules);
        if fired > 0 {
            self.injected.fetch_add(fired, Ordering::Relaxed);
        }
        verdict
    }

    /// Applies the verdict for a call: sleeps, then fails or lets it through.
    fn intercept(&self, op: DeviceOp, bytes: Option<Range<u64>>) -> io::Result<()> {
        let verdict = self.judge(op, bytes);
        if !verdict.delay.is_zero() {
            std::thread::sleep(verdict.delay);
        }
        match verdict.error {
            Some(errno) => Err(err(errno)),
            None => Ok(()),
        }
    }
}

/// The bytes a call of `len` bytes at `offset` touches, saturating at the end of
/// the address space (the inner device rejects such calls anyway).
fn touched(offset: u64, len: usize) -> Option<Range<u64>> {
    Some(offset..offset.saturating_add(len as u64))
}

impl std::fmt::Debug for FaultyDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDevice")
            .field("inner", &self.inner)
            .field("rules", &self.rules.lock().active.len())
            .field("injected", &self.injected())
            .finish()
    }
}

impl Device for FaultyDevice {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.intercept(DeviceOp::Read, touched(offset, buf.len()))?;
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.intercept(DeviceOp::Write, touched(offset, buf.len()))?;
        self.inner.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.intercept(DeviceOp::Flush, None)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::device::MemDevice;

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
}
