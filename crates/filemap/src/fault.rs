//! Fault plans: rules that inject delays and errors into chosen calls of a layer.
//!
//! One engine serves every layer that injects faults: [`crate::FaultyDevice`]
//! judges device calls ([`crate::device::DeviceOp`]) and
//! [`crate::backend::FaultyBackend`] judges backend calls
//! ([`crate::backend::BackendOp`]). A wrapper asks its plan about each call with
//! [`FaultPlan::intercept`] before it forwards the call.
//!
//! Delays widen race windows (a read held between its block lookup and its device
//! read is exactly the window the seeds' stale-data bugs live in); errors exercise
//! the error paths of everything above the faulty layer.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::errno::err;

/// When a rule fires, counted over the calls the rule matches.
///
/// ```
/// use filemap::device::DeviceOp;
/// use filemap::fault::{FaultPlan, FaultRule, Injection, Trigger};
///
/// let plan = FaultPlan::new(1);
/// plan.add_rule(FaultRule::new(DeviceOp::Write, Trigger::EveryNth(3), Injection::Error(libc::EIO)));
/// let failed: Vec<bool> = (0..6).map(|_| plan.intercept(DeviceOp::Write, None).is_err()).collect();
/// assert_eq!(failed, [false, false, true, false, false, true]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// On every matching call.
    Always,
    /// Only on the n-th matching call (1-based), once. `Nth(0)` never fires.
    Nth(u64),
    /// On every n-th matching call: the n-th, 2n-th, ... `EveryNth(0)` never fires.
    EveryNth(u64),
    /// On the n-th matching call (1-based) and every one after it. `FromNth(0)`
    /// never fires. With [`Injection::Discard`] on device writes this simulates
    /// the process stopping after write n - 1.
    FromNth(u64),
    /// On each matching call independently with this probability (0.0 never,
    /// 1.0 always), drawn from the plan's seeded generator.
    Probability(f64),
}

/// What a rule does when it fires.
///
/// ```
/// use filemap::device::DeviceOp;
/// use filemap::fault::{Delivery, FaultPlan, FaultRule, Injection, Trigger};
///
/// let plan = FaultPlan::new(1);
/// plan.add_rule(FaultRule::new(DeviceOp::Write, Trigger::FromNth(2), Injection::Discard));
/// plan.add_rule(FaultRule::new(DeviceOp::Read, Trigger::Nth(1), Injection::Error(libc::EIO)));
/// assert_eq!(plan.intercept(DeviceOp::Write, None)?, Delivery::Forward);
/// assert_eq!(plan.intercept(DeviceOp::Write, None)?, Delivery::Discard);
/// assert_eq!(plan.intercept(DeviceOp::Read, None).unwrap_err().raw_os_error(), Some(libc::EIO));
/// assert_eq!(plan.injected(), 2);
/// # Ok::<(), std::io::Error>(())
/// ```
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
    /// forwarding it: nothing is read, written or changed.
    Error(i32),
    /// Reports success without forwarding the call: a write that never reaches
    /// the layer below, as when the process stops before issuing it (a read
    /// leaves its buffer as it was). An error that fires too takes precedence.
    Discard,
}

/// What a wrapper does with a call its plan did not fail.
///
/// ```
/// use std::io;
/// use filemap::fault::{Delivery, FaultPlan, FaultRule, Injection, Trigger};
///
/// /// The calls of a store of one's own, and a wrapper that injects faults into them.
/// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// enum StoreOp {
///     Put,
/// }
///
/// struct FaultyStore {
///     plan: FaultPlan<StoreOp>,
///     puts: Vec<u32>,
/// }
///
/// impl FaultyStore {
///     fn put(&mut self, value: u32) -> io::Result<()> {
///         match self.plan.intercept(StoreOp::Put, None)? {
///             Delivery::Forward => self.puts.push(value),
///             Delivery::Discard => {} // lost on the way, reported done
///         }
///         Ok(())
///     }
/// }
///
/// let mut store = FaultyStore { plan: FaultPlan::new(1), puts: Vec::new() };
/// store.plan.add_rule(FaultRule::new(StoreOp::Put, Trigger::Nth(2), Injection::Discard));
/// for value in 1..=3 {
///     store.put(value)?;
/// }
/// assert_eq!(store.puts, [1, 3]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Delivery {
    /// Forward the call to the wrapped layer.
    Forward,
    /// Return success without forwarding: an [`Injection::Discard`] fired.
    Discard,
}

/// One fault rule: which calls it matches, when it fires, and what it injects.
///
/// `Op` is the kind of call of the layer the rule is for, such as
/// [`crate::device::DeviceOp`] or [`crate::backend::BackendOp`].
///
/// ```
/// use std::sync::Arc;
/// use filemap::device::{DeviceOp, Injection, Trigger};
/// use filemap::{Device, FaultRule, FaultyDevice, MemDevice};
///
/// let device = FaultyDevice::new(Arc::new(MemDevice::new(1 << 20)), 1);
/// // Only writes that touch the second 4 KiB block fail.
/// device.add_rule(
///     FaultRule::new(DeviceOp::Write, Trigger::Always, Injection::Error(libc::EIO)).on_bytes(4096..8192),
/// );
/// device.write_all_at(&[1; 4096], 0)?;
/// assert!(device.write_all_at(&[1; 10], 8190).is_err()); // overlaps 4096..8192
/// device.write_all_at(&[1; 4096], 8192)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule<Op> {
    /// The kind of call the rule matches.
    pub op: Op,
    /// When the rule fires, counted over matching calls.
    pub trigger: Trigger,
    /// What the rule does when it fires.
    pub injection: Injection,
    /// If set, the rule matches only calls whose byte range overlaps these byte
    /// offsets (bytes, not blocks, so the rule is independent of any block size).
    /// Each layer documents the byte range of each kind of call; calls that touch
    /// no bytes (flush, sync, remove) ignore this field.
    pub bytes: Option<Range<u64>>,
}

impl<Op> FaultRule<Op> {
    /// A rule matching every call of kind `op`.
    pub fn new(op: Op, trigger: Trigger, injection: Injection) -> Self {
        Self {
            op,
            trigger,
            injection,
            bytes: None,
        }
    }

    /// Restricts the rule to calls whose byte range overlaps `bytes`.
    pub fn on_bytes(mut self, bytes: Range<u64>) -> Self {
        self.bytes = Some(bytes);
        self
    }
}

/// Identifies a rule added to a [`FaultPlan`], for [`FaultPlan::remove_rule`].
///
/// ```
/// use std::sync::Arc;
/// use filemap::device::{DeviceOp, Injection, Trigger};
/// use filemap::{Device, FaultRule, FaultyDevice, MemDevice};
///
/// let device = FaultyDevice::new(Arc::new(MemDevice::new(1 << 20)), 1);
/// let id = device.add_rule(FaultRule::new(DeviceOp::Read, Trigger::Always, Injection::Error(libc::EIO)));
/// let mut buf = [0; 8];
/// assert!(device.read_exact_at(&mut buf, 0).is_err());
/// device.remove_rule(id);
/// device.read_exact_at(&mut buf, 0)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// An ordered list of fault rules with a seeded generator, judging calls of kind
/// `Op`.
///
/// Rules are checked in the order they were added, and each matching rule counts
/// the call. Every delay that fires is applied (they add up) before the call is
/// forwarded; if any error fires, the first one is returned after the delays and
/// the call must not be forwarded. With a given seed the injections are
/// deterministic for a given order of calls.
///
/// ```
/// use std::time::{Duration, Instant};
/// use filemap::fault::{FaultPlan, FaultRule, Injection, Trigger};
///
/// // A plan judges calls of any kind that is `Copy + Eq + Debug`.
/// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// enum Op {
///     Get,
///     Put,
/// }
///
/// let plan = FaultPlan::new(42);
/// let pause = Duration::from_millis(2);
/// plan.add_rule(FaultRule::new(Op::Put, Trigger::Always, Injection::Delay { min: pause, max: pause }));
/// plan.add_rule(FaultRule::new(Op::Put, Trigger::Nth(1), Injection::Error(libc::ENOSPC)));
/// plan.add_rule(FaultRule::new(Op::Put, Trigger::Nth(1), Injection::Error(libc::EIO)));
/// let start = Instant::now();
/// // The delay is applied, then the first error that fired is returned.
/// let error = plan.intercept(Op::Put, None).unwrap_err();
/// assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
/// assert!(start.elapsed() >= pause);
/// plan.intercept(Op::Get, None)?; // no rule for gets
/// assert_eq!(plan.rule_count(), 3);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct FaultPlan<Op> {
    /// Whether any rule exists: lets calls skip the mutex when there are none.
    any_rules: AtomicBool,
    injected: AtomicU64,
    rules: Mutex<Rules<Op>>,
}

struct Rules<Op> {
    active: Vec<ActiveRule<Op>>,
    next_id: u64,
    rng: fastrand::Rng,
}

struct ActiveRule<Op> {
    id: RuleId,
    rule: FaultRule<Op>,
    /// Matching calls seen so far.
    matched: u64,
}

/// The injections chosen for one call.
struct Verdict {
    delay: Duration,
    error: Option<i32>,
    discard: bool,
}

impl<Op: Copy + Eq + fmt::Debug> FaultPlan<Op> {
    /// A plan with no rules; `seed` seeds the generator used by delays and
    /// [`Trigger::Probability`].
    pub fn new(seed: u64) -> Self {
        Self {
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
    pub fn add_rule(&self, rule: FaultRule<Op>) -> RuleId {
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
    pub fn fail_nth(&self, op: Op, n: u64, errno: i32) -> RuleId {
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

    /// How many injections (delays, errors and discards) have happened so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The number of rules in the plan.
    pub fn rule_count(&self) -> usize {
        self.rules.lock().active.len()
    }

    /// Judges one call of kind `op` touching `bytes` (`None` for calls that touch
    /// no bytes): sleeps for the delays that fire, then returns the first error
    /// that fires, in which case the caller must not forward the call, or else
    /// whether to forward it.
    pub fn intercept(&self, op: Op, bytes: Option<Range<u64>>) -> io::Result<Delivery> {
        let verdict = self.judge(op, bytes);
        if !verdict.delay.is_zero() {
            std::thread::sleep(verdict.delay);
        }
        match verdict.error {
            Some(errno) => Err(err(errno)),
            None if verdict.discard => Ok(Delivery::Discard),
            None => Ok(Delivery::Forward),
        }
    }

    /// Decides the injections for one call, counting it in every matching rule.
    fn judge(&self, op: Op, bytes: Option<Range<u64>>) -> Verdict {
        let mut verdict = Verdict {
            delay: Duration::ZERO,
            error: None,
            discard: false,
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
            if let (Some(wanted), Some(touched)) = (&rule.bytes, &bytes) {
                if !(touched.start < wanted.end && wanted.start < touched.end) {
                    continue;
                }
            }
            active.matched = active.matched.saturating_add(1);
            let fires = match rule.trigger {
                Trigger::Always => true,
                Trigger::Nth(n) => active.matched == n,
                Trigger::EveryNth(n) => n != 0 && active.matched % n == 0,
                Trigger::FromNth(n) => n != 0 && active.matched >= n,
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
                Injection::Discard => {
                    verdict.discard = true;
                    fired += 1;
                }
            }
        }
        drop(rules);
        if fired > 0 {
            self.injected.fetch_add(fired, Ordering::Relaxed);
        }
        verdict
    }
}

impl<Op> fmt::Debug for FaultPlan<Op> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultPlan")
            .field("rules", &self.rules.lock().active.len())
            .field("injected", &self.injected.load(Ordering::Relaxed))
            .finish()
    }
}

/// A wrapper that forwards every call to `inner` after injecting what its plan
/// of rules chooses. [`crate::FaultyDevice`] and [`crate::FaultyBackend`] are
/// this wrapper around a device and around a backend.
///
/// ```
/// use std::sync::Arc;
/// use filemap::device::{DeviceOp, Injection, Trigger};
/// use filemap::{Device, FaultRule, FaultyDevice, MemDevice};
///
/// let memory = Arc::new(MemDevice::new(1 << 20));
/// let device: FaultyDevice = FaultyDevice::new(memory.clone(), 1);
/// device.add_rule(FaultRule::new(DeviceOp::Write, Trigger::Always, Injection::Discard));
/// device.write_all_at(b"dropped", 0)?;
/// device.clear(); // no rules from now on
/// device.write_all_at(b"kept", 8)?;
/// assert_eq!(device.injected(), 1);
/// let mut buf = [0; 12];
/// device.inner().read_exact_at(&mut buf, 0)?; // the device below, unwrapped
/// assert_eq!(&buf, b"\0\0\0\0\0\0\0\0kept");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Faulty<T: ?Sized, Op> {
    pub(crate) inner: Arc<T>,
    pub(crate) plan: FaultPlan<Op>,
}

impl<T: ?Sized, Op: Copy + Eq + fmt::Debug> Faulty<T, Op> {
    /// Wraps `inner` with no rules; `seed` seeds the generator used by delays and
    /// [`Trigger::Probability`].
    pub fn new(inner: Arc<T>, seed: u64) -> Self {
        Faulty {
            inner,
            plan: FaultPlan::new(seed),
        }
    }

    /// Adds a rule after the existing ones.
    pub fn add_rule(&self, rule: FaultRule<Op>) -> RuleId {
        self.plan.add_rule(rule)
    }

    /// Fails the `n`-th call of kind `op` (1-based, counted from now) with `errno`.
    pub fn fail_nth(&self, op: Op, n: u64, errno: i32) -> RuleId {
        self.plan.fail_nth(op, n, errno)
    }

    /// Removes a rule; unknown or already removed ids are ignored.
    pub fn remove_rule(&self, id: RuleId) {
        self.plan.remove_rule(id);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.plan.clear();
    }

    /// How many injections (delays, errors and discards) have happened so far.
    pub fn injected(&self) -> u64 {
        self.plan.injected()
    }

    /// The wrapped object.
    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }

    /// Judges a call of kind `op` touching `bytes` with [`FaultPlan::intercept`],
    /// then lets `call` forward it to the wrapped object unless an error failed
    /// it or a discard reports success without it.
    pub(crate) fn forward(
        &self,
        op: Op,
        bytes: Option<Range<u64>>,
        call: impl FnOnce(&T) -> io::Result<()>,
    ) -> io::Result<()> {
        match self.plan.intercept(op, bytes)? {
            Delivery::Forward => call(&self.inner),
            Delivery::Discard => Ok(()),
        }
    }
}

impl<T: ?Sized + fmt::Debug, Op> fmt::Debug for Faulty<T, Op> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .field("plan", &self.plan)
            .finish()
    }
}

/// The bytes a call of `len` bytes at `offset` touches, saturating at the end of
/// the address space (the wrapped layer rejects such calls anyway).
pub(crate) fn touched(offset: u64, len: u64) -> Option<Range<u64>> {
    Some(offset..offset.saturating_add(len))
}

/// The bytes `buf` spans when it is read or written at `offset`, saturating.
pub(crate) fn span(offset: u64, buf: &[u8]) -> Option<Range<u64>> {
    touched(offset, buf.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        A,
        B,
    }

    #[test]
    fn rules_match_their_op_and_bytes_only() {
        let plan = FaultPlan::new(1);
        plan.add_rule(
            FaultRule::new(Op::A, Trigger::Always, Injection::Error(libc::EIO)).on_bytes(10..20),
        );
        assert!(plan.intercept(Op::B, touched(10, 5)).is_ok());
        assert_eq!(
            plan.intercept(Op::A, touched(0, 10)).unwrap(),
            Delivery::Forward
        );
        assert!(plan.intercept(Op::A, touched(0, 10)).is_ok());
        assert!(plan.intercept(Op::A, touched(20, 10)).is_ok());
        let error = plan.intercept(Op::A, touched(19, 1)).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EIO));
        assert!(
            plan.intercept(Op::A, None).is_err(),
            "no bytes: range ignored"
        );
        assert!(plan.intercept(Op::A, touched(u64::MAX - 1, 5)).is_ok());
        assert_eq!(plan.injected(), 2);
    }

    #[test]
    fn first_error_wins_and_later_ones_are_not_counted() {
        let plan = FaultPlan::new(1);
        plan.fail_nth(Op::A, 1, libc::ENOSPC);
        let second = plan.fail_nth(Op::A, 1, libc::EIO);
        let error = plan.intercept(Op::A, None).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(plan.injected(), 1);
        assert_eq!(plan.rule_count(), 2);
        plan.remove_rule(second);
        plan.remove_rule(second);
        assert_eq!(plan.rule_count(), 1);
        plan.clear();
        assert_eq!(plan.rule_count(), 0);
        assert!(plan.intercept(Op::A, None).is_ok());
    }

    #[test]
    fn nth_zero_and_every_nth_zero_never_fire() {
        let plan = FaultPlan::new(1);
        plan.add_rule(FaultRule::new(
            Op::A,
            Trigger::Nth(0),
            Injection::Error(libc::EIO),
        ));
        plan.add_rule(FaultRule::new(
            Op::A,
            Trigger::EveryNth(0),
            Injection::Error(libc::EIO),
        ));
        assert!((0..100).all(|_| plan.intercept(Op::A, None).is_ok()));
        assert_eq!(plan.injected(), 0);
    }

    #[test]
    fn an_inverted_delay_range_sleeps_min() {
        let plan = FaultPlan::new(1);
        let min = Duration::from_millis(5);
        plan.add_rule(FaultRule::new(
            Op::B,
            Trigger::Always,
            Injection::Delay {
                min,
                max: Duration::ZERO,
            },
        ));
        let start = std::time::Instant::now();
        assert_eq!(plan.intercept(Op::B, None).unwrap(), Delivery::Forward);
        assert!(start.elapsed() >= min);
        assert!(format!("{plan:?}").contains("injected: 1"));
    }

    #[test]
    fn from_nth_discards_that_call_and_every_later_one() {
        use Delivery::{Discard, Forward};
        let plan = FaultPlan::new(1);
        plan.add_rule(FaultRule::new(
            Op::A,
            Trigger::FromNth(3),
            Injection::Discard,
        ));
        plan.add_rule(FaultRule::new(
            Op::B,
            Trigger::FromNth(0),
            Injection::Discard,
        ));
        let deliveries: Vec<Delivery> = (0..5)
            .map(|_| plan.intercept(Op::A, None).unwrap())
            .collect();
        assert_eq!(deliveries, [Forward, Forward, Discard, Discard, Discard]);
        assert_eq!(plan.intercept(Op::B, None).unwrap(), Forward);
        assert_eq!(plan.injected(), 3);
        // An error that fires beside a discard wins.
        plan.fail_nth(Op::A, 1, libc::EIO);
        assert!(plan.intercept(Op::A, None).is_err());
        assert_eq!(plan.intercept(Op::A, None).unwrap(), Discard);
    }
}
