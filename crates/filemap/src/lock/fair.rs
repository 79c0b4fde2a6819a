//! A fair (phase-fair) lock with classes of shared and exclusive access.
//!
//! One primitive covers the fair file-wide coherence strategies: with class 0
//! shared and class 1 exclusive it is a reader-writer lock; with class 0 shared
//! and class 1 shared it is a fair two-state lock (the `two-state` strategy
//! takes bcachefs's unfair one instead, [`super::RawTwoStateLock`]); a single
//! exclusive class is a mutex. Two accesses are compatible iff they have the
//! same class and neither is exclusive ([`Access::is_compatible_with`], the
//! only place that rule lives).
//!
//! # Algorithm
//!
//! A ticket lock over a mutex-protected state that serves the queue in
//! phases, in the spirit of Brandenburg and Anderson's phase-fair
//! reader-writer locks (with the queue kept under a mutex instead of being
//! lock-free):
//!
//! - A request is granted on arrival only if it is compatible with the current
//!   holders **and** nobody is waiting. Otherwise it takes the next ticket, joins
//!   the back of the queue and sleeps on the condition variable.
//! - Only a release grants queued requests. Once the holders allow the head of
//!   the queue in, the releasing thread grants it, and if it is shared, every
//!   queued request of its access: one phase of that class, made of requests
//!   that all arrived before the phase began. Then it wakes the sleepers. A
//!   granted request is a holder from the moment it is granted, before its
//!   thread even wakes, so nobody can barge in between the grant and the
//!   wake-up.
//!
//! Strict FIFO would serve two classes that arrive interleaved (a fill, a
//! direct write, a fill, ...) one request at a time, so that two direct
//! writers never overlap however many queue; a phase lets every waiter of the
//! class in at once, and costs the waiters of the other class at most one
//! phase.
//!
//! # State
//!
//! Everything lives in one `State` behind the mutex:
//!
//! | field | invariant |
//! |---|---|
//! | `held` | the access every current holder has; `None` iff `count == 0` |
//! | `count` | number of holders; `1` whenever `held` is exclusive |
//! | `queue` | the tickets and accesses of waiting requests, oldest first; its head is *not* compatible with `held` (otherwise it would have been granted) |
//! | `next_ticket` | the ticket the next queued request gets; a queued ticket is granted iff it has left the queue |
//!
//! All holders share one access because compatibility is "same class, both
//! shared": a second holder is only ever admitted next to shared holders of its
//! own class, with an equal access.
//!
//! # Why no request starves
//!
//! Assume every holder eventually releases. Nothing joins the holders except
//! the head of the queue and the phase granted with it (or, when the queue is
//! empty, a new arrival), and a phase takes only requests already queued, so
//! while a request waits, the set of holders only shrinks, apart from grants
//! of phases whose head is *ahead* of it in the queue. Once every holder that
//! was present when the head of the queue became the head has released,
//! `held` is `None`, and the release that emptied it grants the head. Every
//! phase removes the head, so by induction over queue positions a request
//! with `k` tickets ahead of it is granted after at most `k + 1` phases. In
//! particular a stream of Fill holders cannot starve an Invalidate (later
//! Fills queue behind it), and a stream of Invalidates cannot starve Fills
//! (each Invalidate queued before a Fill is served once, and the ones after it
//! wait).
//!
//! # Cost
//!
//! An uncontended `lock` or `unlock` is one mutex round trip and touches no
//! condition variable. A release that grants wakes *every* sleeper with
//! `notify_all`; each checks its own ticket and all but the granted ones sleep
//! again. That is `O(waiters)` wake-ups per grant, which is cheap for the short
//! queues a file lock sees and needs neither per-waiter allocation nor a wait
//! queue of our own. If long queues show up in profiles, targeted wake-ups
//! (`parking_lot_core::unpark_filter` keyed by ticket) are the next step.

use std::collections::VecDeque;

use crate::sync::{Condvar, Mutex};

/// One kind of access to a [`RawFairLock`]: a class, shared or exclusive.
///
/// ```
/// use filemap::lock::Access;
///
/// assert!(Access::shared(0).is_compatible_with(Access::shared(0)));
/// assert!(!Access::shared(0).is_compatible_with(Access::shared(1)));
/// assert!(!Access::exclusive(1).is_compatible_with(Access::exclusive(1)));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// The class of the access. Shared holders coexist only within one class.
    pub class: u8,
    /// Whether the holder excludes everyone else, even of its own class.
    pub exclusive: bool,
}

impl Access {
    /// Every access of classes 0 and 1, for the tests that take them at random.
    #[cfg(test)]
    pub(crate) const EVERY_OF_TWO_CLASSES: [Access; 4] = [
        Access::shared(0),
        Access::shared(1),
        Access::exclusive(0),
        Access::exclusive(1),
    ];

    /// Shared access of `class`: coexists with other shared holders of `class`.
    pub const fn shared(class: u8) -> Self {
        Access {
            class,
            exclusive: false,
        }
    }

    /// Exclusive access of `class`: coexists with nobody.
    pub const fn exclusive(class: u8) -> Self {
        Access {
            class,
            exclusive: true,
        }
    }

    /// Whether a holder of `self` and a holder of `other` may hold the lock at
    /// the same time: iff they have the same class and neither is exclusive.
    #[inline]
    pub fn is_compatible_with(self, other: Access) -> bool {
        self.class == other.class && !self.exclusive && !other.exclusive
    }
}

/// A fair lock with shared and exclusive access in classes.
///
/// Conflicting requests are served in arrival order: a request is granted on
/// arrival only if it is compatible with every holder and nobody waits, and a
/// release grants the oldest waiter together with every waiter of its shared
/// access (a phase). See the module documentation for the algorithm and why
/// nobody starves.
///
/// This is a raw lock: it does not know who holds it. [`RawFairLock::unlock`]
/// checks that the access it releases is held, but cannot tell whether the
/// caller is the thread that took it; the guard API on top keeps that straight.
///
/// ```
/// use filemap::lock::{Access, RawFairLock};
///
/// let lock = RawFairLock::new();
/// lock.lock(Access::shared(0));
/// assert!(lock.try_lock(Access::shared(0))); // the same class shares
/// assert!(!lock.try_lock(Access::exclusive(1)));
/// lock.unlock(Access::shared(0));
/// lock.unlock(Access::shared(0));
/// assert!(lock.try_lock(Access::exclusive(1)));
/// lock.unlock(Access::exclusive(1));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct RawFairLock {
    state: Mutex<State>,
    /// Where queued requests sleep until a release grants their ticket.
    granted: Condvar,
}

/// The lock's state; the invariants are tabled in the module documentation.
#[derive(Debug, Default)]
struct State {
    held: Option<Access>,
    count: usize,
    queue: VecDeque<(u64, Access)>,
    next_ticket: u64,
}

impl State {
    /// Whether `access` could join the current holders (ignoring the queue).
    fn admits_holder(&self, access: Access) -> bool {
        match self.held {
            None => true,
            Some(held) => held.is_compatible_with(access),
        }
    }

    /// Whether a new request for `access` may be granted without waiting: it is
    /// compatible with the holders and would overtake nobody.
    fn grants_on_arrival(&self, access: Access) -> bool {
        self.queue.is_empty() && self.admits_holder(access)
    }

    /// Adds a holder of `access`, which the caller checked is admitted.
    fn add_holder(&mut self, access: Access) {
        debug_assert!(self.admits_holder(access));
        self.held = Some(access);
        self.count += 1;
    }

    /// Removes a holder of `access`.
    ///
    /// # Panics
    /// If no holder of `access` exists; the state is left unchanged.
    fn remove_holder(&mut self, access: Access) {
        assert!(
            self.held == Some(access),
            "RawFairLock::unlock({access:?}) but the lock is held as {:?}",
            self.held
        );
        self.count -= 1;
        if self.count == 0 {
            self.held = None;
        }
    }

    /// Takes a ticket for `access` at the back of the queue.
    fn enqueue(&mut self, access: Access) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queue.push_back((ticket, access));
        ticket
    }

    /// Whether `ticket` has been granted: only a grant takes it off the queue.
    fn is_served(&self, ticket: u64) -> bool {
        !self.queue.iter().any(|&(queued, _)| queued == ticket)
    }

    /// Grants the head of the queue if the holders admit it, and with it every
    /// queued request they then admit: a phase of the head's class. Repeats
    /// while the new head is admitted. Returns how many were granted.
    #[must_use = "granted waiters must be woken"]
    fn grant_queued(&mut self) -> usize {
        let before = self.queue.len();
        while let Some(&(_, head)) = self.queue.front() {
            if !self.admits_holder(head) {
                break;
            }
            self.queue.pop_front();
            self.add_holder(head);
            // The phase: every queued request compatible with the head, which
            // has the head's very access (same class, shared).
            let queued = self.queue.len();
            self.queue
                .retain(|&(_, access)| !head.is_compatible_with(access));
            for _ in self.queue.len()..queued {
                self.add_holder(head);
            }
        }
        before - self.queue.len()
    }
}

impl RawFairLock {
    /// An unlocked lock with nobody waiting.
    pub fn new() -> Self {
        RawFairLock {
            state: Mutex::new(State::default()),
            granted: Condvar::new(),
        }
    }

    /// Takes `access`, sleeping until it is compatible with every holder and
    /// every earlier conflicting request has been served (or it joins the
    /// phase of an earlier request of its access).
    #[inline]
    pub fn lock(&self, access: Access) {
        let mut state = self.state.lock();
        if state.grants_on_arrival(access) {
            state.add_holder(access);
            return;
        }
        // Slow path: queue up, then sleep until a release grants our ticket.
        // Granting happens entirely on the releasing side, so on wake-up there
        // is nothing to do but check the ticket (notify_all also wakes others).
        let ticket = state.enqueue(access);
        while !state.is_served(ticket) {
            self.granted.wait(&mut state);
        }
    }

    /// Takes `access` if that needs no waiting: it is compatible with every
    /// holder and no request is queued (which this would overtake). Returns
    /// whether it was taken.
    #[inline]
    pub fn try_lock(&self, access: Access) -> bool {
        let mut state = self.state.lock();
        let granted = state.grants_on_arrival(access);
        if granted {
            state.add_holder(access);
        }
        granted
    }

    /// Releases one holder of `access`, granting queued requests that can now
    /// run.
    ///
    /// # Panics
    /// If the lock is not held as `access` (unheld, or held with another class
    /// or exclusivity). This is a bug in the caller; the lock is left unchanged.
    #[inline]
    pub fn unlock(&self, access: Access) {
        let mut state = self.state.lock();
        state.remove_holder(access);
        if state.grant_queued() > 0 {
            // Wake after the state is updated; the sleepers recheck their ticket
            // under the mutex, so waking while still holding it is fine.
            self.granted.notify_all();
        }
    }

    /// How many requests are queued (for tests that need a waiter in place).
    #[cfg(test)]
    #[cfg_attr(shuttle, allow(dead_code))] // the shuttle test covers the range lock only
    fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::Duration;

    use super::{Access, RawFairLock};

    /// Long enough that a healthy test never hits it, short enough to fail fast.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Waits until `n` requests are queued on `lock`.
    fn wait_queued(lock: &RawFairLock, n: usize) {
        while lock.queued() < n {
            thread::yield_now();
        }
    }

    #[test]
    fn compatibility_rule() {
        let (s0, s1, x0, x1) = (
            Access::shared(0),
            Access::shared(1),
            Access::exclusive(0),
            Access::exclusive(1),
        );
        assert!(s0.is_compatible_with(s0));
        assert!(s1.is_compatible_with(s1));
        assert!(!s0.is_compatible_with(s1));
        for x in [x0, x1] {
            for other in [s0, s1, x0, x1] {
                assert!(!x.is_compatible_with(other));
                assert!(!other.is_compatible_with(x));
            }
        }
    }

    #[test]
    fn try_lock_semantics() {
        let lock = RawFairLock::new();
        assert!(lock.try_lock(Access::shared(0)));
        assert!(lock.try_lock(Access::shared(0)), "same-class shared shares");
        assert!(!lock.try_lock(Access::shared(1)), "other class is excluded");
        assert!(!lock.try_lock(Access::exclusive(0)));
        assert!(!lock.try_lock(Access::exclusive(1)));
        lock.unlock(Access::shared(0));
        lock.unlock(Access::shared(0));

        assert!(lock.try_lock(Access::exclusive(1)));
        assert!(
            !lock.try_lock(Access::exclusive(1)),
            "exclusive excludes itself"
        );
        assert!(!lock.try_lock(Access::shared(1)));
        assert!(!lock.try_lock(Access::shared(0)));
        lock.unlock(Access::exclusive(1));

        // Two-state lock: both classes shared, each excluding the other.
        assert!(lock.try_lock(Access::shared(1)));
        assert!(lock.try_lock(Access::shared(1)));
        assert!(!lock.try_lock(Access::shared(0)));
        lock.unlock(Access::shared(1));
        lock.unlock(Access::shared(1));
        assert!(lock.try_lock(Access::shared(0)));
        lock.unlock(Access::shared(0));
    }

    #[test]
    fn try_lock_does_not_overtake_a_waiter() {
        let lock = Arc::new(RawFairLock::new());
        lock.lock(Access::shared(0));
        let writer = {
            let lock = Arc::clone(&lock);
            thread::spawn(move || {
                lock.lock(Access::exclusive(1));
                lock.unlock(Access::exclusive(1));
            })
        };
        wait_queued(&lock, 1);
        // Compatible with the holder, but the queued writer came first.
        assert!(!lock.try_lock(Access::shared(0)));
        lock.unlock(Access::shared(0));
        writer.join().unwrap();
        assert!(lock.try_lock(Access::shared(0)));
        lock.unlock(Access::shared(0));
    }

    #[test]
    fn shared_holders_run_concurrently() {
        for class in [0, 1] {
            let lock = Arc::new(RawFairLock::new());
            let access = Access::shared(class);
            lock.lock(access);
            let (held, held_rx) = mpsc::channel();
            let (release, release_rx) = mpsc::channel::<()>();
            let second = {
                let lock = Arc::clone(&lock);
                thread::spawn(move || {
                    lock.lock(access);
                    held.send(()).unwrap();
                    release_rx.recv().unwrap();
                    lock.unlock(access);
                })
            };
            held_rx
                .recv_timeout(PATIENCE)
                .expect("a second shared holder was kept out");
            // Both hold it now; release in the order they did not take it.
            lock.unlock(access);
            release.send(()).unwrap();
            second.join().unwrap();
        }
    }

    /// Exclusive holders do an unprotected read-modify-write with a yield in the
    /// middle, and shared holders check nobody exclusive is inside with them:
    /// any overlap loses an update or trips an assertion.
    #[test]
    fn incompatible_accesses_exclude_each_other() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 500;
        let lock = Arc::new(RawFairLock::new());
        let total = Arc::new(AtomicUsize::new(0));
        let writers_inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let (lock, total, writers_inside) = (
                    Arc::clone(&lock),
                    Arc::clone(&total),
                    Arc::clone(&writers_inside),
                );
                thread::spawn(move || {
                    for round in 0..ROUNDS {
                        if (i + round) % 2 == 0 {
                            lock.lock(Access::exclusive(1));
                            assert_eq!(writers_inside.fetch_add(1, Ordering::Relaxed), 0);
                            let seen = total.load(Ordering::Relaxed);
                            thread::yield_now();
                            total.store(seen + 1, Ordering::Relaxed);
                            writers_inside.fetch_sub(1, Ordering::Relaxed);
                            lock.unlock(Access::exclusive(1));
                        } else {
                            lock.lock(Access::shared(0));
                            assert_eq!(writers_inside.load(Ordering::Relaxed), 0);
                            thread::yield_now();
                            assert_eq!(writers_inside.load(Ordering::Relaxed), 0);
                            lock.unlock(Access::shared(0));
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), THREADS * ROUNDS / 2);
    }

    /// A writer queued behind a reader makes later readers wait, and the order
    /// of service is the order of arrival.
    #[test]
    fn exclusive_waiter_blocks_later_shared() {
        let lock = Arc::new(RawFairLock::new());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        lock.lock(Access::shared(0));
        let spawn = |name: &'static str, access: Access| {
            let (lock, log) = (Arc::clone(&lock), Arc::clone(&log));
            thread::spawn(move || {
                lock.lock(access);
                log.lock().push(name);
                lock.unlock(access);
            })
        };
        let writer = spawn("writer", Access::exclusive(1));
        wait_queued(&lock, 1);
        assert!(!lock.try_lock(Access::shared(0)));
        let reader = spawn("reader", Access::shared(0));
        wait_queued(&lock, 2);
        // The later reader is compatible with the holder, yet it waits.
        thread::sleep(Duration::from_millis(20));
        assert!(log.lock().is_empty());
        lock.unlock(Access::shared(0));
        writer.join().unwrap();
        reader.join().unwrap();
        assert_eq!(*log.lock(), ["writer", "reader"]);
    }

    /// Compatible waiters at the head of the queue are granted together, and
    /// the conflicting waiter behind them waits for both.
    #[test]
    fn compatible_waiters_are_granted_together() {
        let lock = Arc::new(RawFairLock::new());
        let both_inside = Arc::new(Barrier::new(2));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        lock.lock(Access::exclusive(1));
        let mut threads = Vec::new();
        for name in ["reader a", "reader b"] {
            let (held, both_inside, log) = (
                Arc::clone(&lock),
                Arc::clone(&both_inside),
                Arc::clone(&log),
            );
            threads.push(thread::spawn(move || {
                held.lock(Access::shared(0));
                // Passes only if both readers hold the lock at once.
                both_inside.wait();
                log.lock().push(name);
                held.unlock(Access::shared(0));
            }));
            wait_queued(&lock, threads.len());
        }
        let writer = {
            let (lock, log) = (Arc::clone(&lock), Arc::clone(&log));
            thread::spawn(move || {
                lock.lock(Access::exclusive(1));
                log.lock().push("writer");
                lock.unlock(Access::exclusive(1));
            })
        };
        wait_queued(&lock, 3);
        lock.unlock(Access::exclusive(1));
        for thread in threads {
            thread.join().unwrap();
        }
        writer.join().unwrap();
        assert_eq!(log.lock().last(), Some(&"writer"));
    }

    /// A phase: when the head of the queue is granted, so is every queued
    /// request of its shared access, even one behind a conflicting request,
    /// which then waits for the whole phase.
    #[test]
    fn a_phase_admits_every_queued_request_of_its_class() {
        let lock = Arc::new(RawFairLock::new());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let directs_inside = Arc::new(AtomicUsize::new(0));
        lock.lock(Access::exclusive(1));
        let mut threads = Vec::new();
        for (name, access) in [
            ("direct a", Access::shared(1)),
            ("fill", Access::shared(0)),
            ("direct b", Access::shared(1)),
        ] {
            let (held, log, directs_inside) = (
                Arc::clone(&lock),
                Arc::clone(&log),
                Arc::clone(&directs_inside),
            );
            threads.push(thread::spawn(move || {
                held.lock(access);
                if access.class == 1 {
                    // Passes only if both direct requests hold the lock at once.
                    directs_inside.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + PATIENCE;
                    while directs_inside.load(Ordering::SeqCst) < 2 {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the second direct request was not let in with the first"
                        );
                        thread::yield_now();
                    }
                }
                log.lock().push(name);
                held.unlock(access);
            }));
            wait_queued(&lock, threads.len());
        }
        lock.unlock(Access::exclusive(1));
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(log.lock().last(), Some(&"fill"));
    }

    /// Overlapping readers that always keep the lock held would starve a writer
    /// under a reader-preferring lock; here the writer gets in.
    #[test]
    fn reader_stream_does_not_starve_a_writer() {
        const READERS: usize = 3;
        let lock = Arc::new(RawFairLock::new());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (lock, stop) = (Arc::clone(&lock), Arc::clone(&stop));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        lock.lock(Access::shared(0));
                        thread::yield_now();
                        lock.unlock(Access::shared(0));
                    }
                })
            })
            .collect();
        let (done, done_rx) = mpsc::channel();
        let writer = {
            let lock = Arc::clone(&lock);
            thread::spawn(move || {
                for _ in 0..100 {
                    lock.lock(Access::exclusive(1));
                    lock.unlock(Access::exclusive(1));
                }
                done.send(()).unwrap();
            })
        };
        let finished = done_rx.recv_timeout(PATIENCE);
        stop.store(true, Ordering::Relaxed);
        finished.expect("the writer starved");
        writer.join().unwrap();
        for reader in readers {
            reader.join().unwrap();
        }
    }

    #[test]
    #[should_panic(expected = "held as None")]
    fn unlock_of_unheld_lock_panics() {
        RawFairLock::new().unlock(Access::shared(0));
    }

    #[test]
    #[should_panic(expected = "RawFairLock::unlock")]
    fn unlock_of_other_class_panics() {
        let lock = RawFairLock::new();
        lock.lock(Access::shared(0));
        lock.unlock(Access::shared(1));
    }

    #[test]
    #[should_panic(expected = "RawFairLock::unlock")]
    fn unlock_of_other_exclusivity_panics() {
        let lock = RawFairLock::new();
        lock.lock(Access::exclusive(1));
        lock.unlock(Access::shared(1));
    }

    /// Random accesses, taken blocking or with `try_lock`, checked against a
    /// record of the current holders.
    #[test]
    fn stress_random_accesses() {
        const THREADS: u64 = 4;
        const ROUNDS: usize = 2_000;
        const ACCESSES: [Access; 4] = Access::EVERY_OF_TWO_CLASSES;
        let lock = Arc::new(RawFairLock::new());
        let holders = Arc::new(parking_lot::Mutex::new(Vec::<Access>::new()));
        let threads: Vec<_> = (0..THREADS)
            .map(|seed| {
                let (lock, holders) = (Arc::clone(&lock), Arc::clone(&holders));
                thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed);
                    for _ in 0..ROUNDS {
                        let access = ACCESSES[rng.usize(..ACCESSES.len())];
                        if rng.bool() {
                            lock.lock(access);
                        } else if !lock.try_lock(access) {
                            continue;
                        }
                        {
                            let mut holders = holders.lock();
                            for &other in holders.iter() {
                                assert!(
                                    access.is_compatible_with(other),
                                    "{access:?} with {other:?}"
                                );
                            }
                            holders.push(access);
                        }
                        if rng.u8(..4) == 0 {
                            thread::yield_now();
                        }
                        {
                            let mut holders = holders.lock();
                            let at = holders.iter().position(|&a| a == access).unwrap();
                            holders.swap_remove(at);
                        }
                        lock.unlock(access);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Everything was released: the strongest request gets in at once.
        assert!(lock.try_lock(Access::exclusive(0)));
        lock.unlock(Access::exclusive(0));
        assert_eq!(lock.queued(), 0);
    }
}

/// Loom models: every interleaving (up to a preemption bound) of small scenarios.
#[cfg(all(test, loom))]
mod loom_tests {
    use loom::model::Builder;

    use super::{Access, RawFairLock};
    use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use crate::sync::{thread, Arc};

    /// Bit set in [`Occupancy`] while an exclusive holder is inside.
    const EXCLUSIVE: usize = 1 << 16;

    /// Who is inside the critical section. Every update is a read-modify-write
    /// of one location, which always sees the latest value, so an overlap of
    /// incompatible holders is caught whatever the memory ordering.
    #[derive(Default)]
    struct Occupancy(AtomicUsize);

    impl Occupancy {
        fn enter(&self, access: Access) {
            if access.exclusive {
                assert_eq!(self.0.fetch_or(EXCLUSIVE, Ordering::Relaxed), 0);
            } else {
                let before = self.0.fetch_add(1, Ordering::Relaxed);
                assert_eq!(before & EXCLUSIVE, 0, "shared entered beside exclusive");
            }
        }

        fn leave(&self, access: Access) {
            if access.exclusive {
                self.0.fetch_and(!EXCLUSIVE, Ordering::Relaxed);
            } else {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    /// A reader and a writer exclude each other, and the lock orders their
    /// memory: a reader that sees the writer's flag sees its data too.
    #[test]
    fn shared_and_exclusive_exclude() {
        model(|| {
            let lock = Arc::new(RawFairLock::new());
            let inside = Arc::new(Occupancy::default());
            let data = Arc::new(AtomicUsize::new(0));
            let written = Arc::new(AtomicBool::new(false));
            let writer = {
                let (lock, inside, data, written) = (
                    Arc::clone(&lock),
                    Arc::clone(&inside),
                    Arc::clone(&data),
                    Arc::clone(&written),
                );
                thread::spawn(move || {
                    let access = Access::exclusive(1);
                    lock.lock(access);
                    inside.enter(access);
                    // Relaxed on purpose: only the lock may order these.
                    data.store(42, Ordering::Relaxed);
                    written.store(true, Ordering::Relaxed);
                    inside.leave(access);
                    lock.unlock(access);
                })
            };
            let access = Access::shared(0);
            lock.lock(access);
            inside.enter(access);
            if written.load(Ordering::Relaxed) {
                assert_eq!(data.load(Ordering::Relaxed), 42);
            }
            inside.leave(access);
            lock.unlock(access);
            writer.join().unwrap();
        });
    }

    /// Two readers and a writer: no deadlock, exclusion holds, and everything
    /// is released at the end.
    #[test]
    fn two_shared_one_exclusive() {
        model(|| {
            let lock = Arc::new(RawFairLock::new());
            let inside = Arc::new(Occupancy::default());
            let spawn = |access: Access| {
                let (lock, inside) = (Arc::clone(&lock), Arc::clone(&inside));
                thread::spawn(move || {
                    lock.lock(access);
                    inside.enter(access);
                    inside.leave(access);
                    lock.unlock(access);
                })
            };
            let readers = [spawn(Access::shared(0)), spawn(Access::shared(0))];
            let access = Access::exclusive(1);
            lock.lock(access);
            inside.enter(access);
            inside.leave(access);
            lock.unlock(access);
            for reader in readers {
                reader.join().unwrap();
            }
            assert!(lock.try_lock(Access::exclusive(0)));
            lock.unlock(Access::exclusive(0));
        });
    }

    /// Two-state use: two shared classes. Holders of different classes never
    /// overlap, whatever the order the three requests queue in behind an
    /// exclusive holder, and every request is served.
    #[test]
    fn phases_of_two_shared_classes_exclude_each_other() {
        model(|| {
            let lock = Arc::new(RawFairLock::new());
            // Holders of class c count in byte c.
            let inside = Arc::new(AtomicUsize::new(0));
            lock.lock(Access::exclusive(1));
            let spawn = |class: u8| {
                let (lock, inside) = (Arc::clone(&lock), Arc::clone(&inside));
                thread::spawn(move || {
                    let access = Access::shared(class);
                    lock.lock(access);
                    let mine = 1 << (8 * class);
                    let before = inside.fetch_add(mine, Ordering::Relaxed);
                    assert_eq!(before & !(0xff << (8 * class)), 0, "classes overlapped");
                    inside.fetch_sub(mine, Ordering::Relaxed);
                    lock.unlock(access);
                })
            };
            let threads = [spawn(1), spawn(0), spawn(1)];
            lock.unlock(Access::exclusive(1));
            for thread in threads {
                thread.join().unwrap();
            }
            assert!(lock.try_lock(Access::exclusive(0)));
            lock.unlock(Access::exclusive(0));
        });
    }

    /// A queued writer blocks a later reader even though the reader is
    /// compatible with the current holder, and is served first.
    #[test]
    fn exclusive_waiter_blocks_later_shared() {
        model(|| {
            let lock = Arc::new(RawFairLock::new());
            let order = Arc::new(AtomicUsize::new(0));
            lock.lock(Access::shared(0));
            let writer = {
                let (lock, order) = (Arc::clone(&lock), Arc::clone(&order));
                thread::spawn(move || {
                    lock.lock(Access::exclusive(1));
                    let turn = order.fetch_add(1, Ordering::Relaxed);
                    lock.unlock(Access::exclusive(1));
                    turn
                })
            };
            while lock.queued() == 0 {
                thread::yield_now();
            }
            assert!(!lock.try_lock(Access::shared(0)));
            let reader = {
                let (lock, order) = (Arc::clone(&lock), Arc::clone(&order));
                thread::spawn(move || {
                    lock.lock(Access::shared(0));
                    let turn = order.fetch_add(1, Ordering::Relaxed);
                    lock.unlock(Access::shared(0));
                    turn
                })
            };
            lock.unlock(Access::shared(0));
            assert_eq!(writer.join().unwrap(), 0, "the writer came first");
            assert_eq!(reader.join().unwrap(), 1);
        });
    }
}
