//! A fair lock over byte ranges, with the access classes of [`RawFairLock`].
//!
//! Each request names an [`Access`] and a half-open byte range (`u64::MAX` as the
//! end means "to the end of the file"; an empty range overlaps nothing). Two
//! requests *conflict* iff their ranges overlap **and** their accesses are not
//! compatible ([`Access::is_compatible_with`]: same class, both shared). Requests
//! that do not conflict never wait for each other.
//!
//! # Algorithm
//!
//! One mutex guards a list of holders and a queue of waiting requests in
//! arrival order:
//!
//! - A request is *admissible* if it conflicts with no holder and with no
//!   request queued before it (unless it re-enters, below). A new request is
//!   granted on arrival if it is admissible behind the whole queue; otherwise it
//!   joins the back of the queue and sleeps on the condition variable.
//!   [`RawRangeLock::try_lock`] fails instead of queueing.
//! - Only a release grants queued requests. The releasing thread walks the queue
//!   in arrival order and grants every request that is admissible behind the
//!   requests *still* queued before it, then wakes the sleepers. A granted
//!   request is a holder from the moment it is granted, before its thread wakes,
//!   so nobody can barge in between the grant and the wake-up. One walk is
//!   enough: a grant turns a queued request into a holder with the same access
//!   and range, which blocks exactly what it blocked while queued.
//!
//! So conflicting requests are served in arrival order (FIFO), while a request
//! overtakes every earlier one it does not conflict with: a fill of pages 20..30
//! does not wait for a punch queued on pages 0..10, even though that punch waits
//! for a fill of pages 0..10.
//!
//! # Why no request starves
//!
//! Assume every holder eventually releases. Take a queued request `w`. A holder
//! that conflicts with `w` can only appear by being granted ahead of it, and a
//! grant needs admissibility, which rules out conflicting with `w` while `w` is
//! queued before it. So only requests queued before `w` (finitely many) or
//! re-entries (below, bounded by their thread's outer hold) can add holders that
//! conflict with `w`; the rest only release. By induction over queue positions,
//! the holders and earlier waiters conflicting with `w` all go, and the release
//! of the last of them grants `w` in its walk. A storm of fills on a punched
//! range cannot starve the punch (fills that arrive after it queue behind it),
//! and a stream of punches cannot starve a fill (each punch queued before the
//! fill is served once; later ones wait for the fill).
//!
//! # Re-entry
//!
//! A thread that holds an access and asks for a compatible access again (the
//! same shared class) is granted as soon as no *holder* conflicts, without
//! queueing behind waiters. Otherwise a thread holding Fill, with a punch queued
//! behind it, that takes Fill again would wait for the punch, which waits for
//! the thread: a deadlock. The rule looks at every access the thread holds in
//! this lock, not only overlapping ones: a nested request over a disjoint range
//! deadlocks just the same when a queued punch spans both ranges. It cannot
//! starve anyone for long, since it only applies while the thread's outer hold
//! lasts. The owner is the thread that made the request
//! (`crate::sync::thread::current`, so the model checkers see it too).
//!
//! Re-entry is per thread and for compatible accesses only: an exclusive access
//! is never re-entered, a thread that asks for a conflicting access over a range
//! it holds waits for itself, and a request that must wait for another
//! thread's holder still waits. Work a thread hands to another thread (a page
//! fault served by a mapping's fault handler) is not covered either, which is
//! why the cache still never touches its own maps while it holds a mode (see
//! DESIGN.md).
//!
//! # Cost, and why one mutex
//!
//! Holders and waiters are plain lists: an arrival checks `O(holders + queue)`
//! pairs, a release `O(queue * (holders + queue))`. One mutex guards both, as
//! one spinlock guards the interval tree of the kernel's range-lock proposals
//! (Jan Kara's mapping range lock, Davidlohr Bueso's range reader-writer lock).
//! Kogan, Dice and Issa (EuroSys 2020) found that spinlock to be the bottleneck
//! under heavy use, but this lock is taken only on cache misses and
//! invalidations, never on hits, so its traffic is that of a file-wide lock's
//! slow path. Sharding it, or a lock-less list as theirs, is future work for
//! when measurement shows contention. As in [`RawFairLock`], a release that
//! grants wakes every sleeper (`notify_all`); each rechecks whether it is still
//! queued.
//!
//! [`RawFairLock`]: super::RawFairLock

use std::collections::VecDeque;
use std::ops::Range;

use super::fair::Access;
use crate::sync::thread::{self, ThreadId};
use crate::sync::{Condvar, Mutex};

/// Whether two half-open byte ranges share a byte (empty ranges share none).
///
/// ```
/// use filemap::lock::ranges_overlap;
///
/// assert!(ranges_overlap(&(0..4096), &(4095..8192)));
/// assert!(!ranges_overlap(&(0..4096), &(4096..8192))); // they only touch
/// assert!(!ranges_overlap(&(100..100), &(0..4096))); // empty
/// ```
#[inline]
pub fn ranges_overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start.max(b.start) < a.end.min(b.end)
}

/// Proof that a request of a [`RawRangeLock`] was granted; hand it back to
/// [`RawRangeLock::unlock`] to release it.
///
/// ```
/// use filemap::lock::{Access, RawRangeLock};
///
/// let lock = RawRangeLock::new();
/// let grant = lock.lock(Access::exclusive(1), 0..10);
/// assert!(lock.try_lock(Access::exclusive(1), 5..6).is_none());
/// lock.unlock(grant); // the grant is the only way to release it
/// let grant = lock.try_lock(Access::exclusive(1), 5..6).expect("released");
/// lock.unlock(grant);
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "the range stays locked until the grant is given back to unlock"]
#[derive(Debug, PartialEq, Eq)]
pub struct RangeGrant {
    /// The request's number, unique within its lock.
    id: u64,
}

/// A fair lock over byte ranges with shared and exclusive access in classes.
///
/// Requests that conflict (overlapping ranges, incompatible accesses) are
/// served in arrival order; others never wait for each other; a thread that
/// holds an access re-enters it without queueing. See the module documentation
/// for the algorithm and why nobody starves.
///
/// ```
/// use filemap::lock::{Access, RawRangeLock};
///
/// let lock = RawRangeLock::new();
/// let punch = lock.lock(Access::exclusive(1), 0..10);
/// assert!(lock.try_lock(Access::shared(0), 5..15).is_none()); // overlaps
/// let fill = lock.try_lock(Access::shared(0), 10..20).expect("disjoint");
/// lock.unlock(punch);
/// lock.unlock(fill);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct RawRangeLock {
    state: Mutex<State>,
    /// Where queued requests sleep until a release grants them.
    granted: Condvar,
}

/// A request, granted (a holder) or queued.
#[derive(Debug)]
struct Request {
    id: u64,
    access: Access,
    range: Range<u64>,
    /// The thread that made the request, for re-entry.
    owner: ThreadId,
}

impl Request {
    /// Whether `self` and `other` may not be held at the same time.
    fn conflicts_with(&self, other: &Request) -> bool {
        ranges_overlap(&self.range, &other.range) && !self.access.is_compatible_with(other.access)
    }
}

/// The lock's state: holders in no particular order, waiters oldest first.
/// Every request is in at most one of the two; a queued request conflicts with
/// a holder or with a request queued before it (otherwise it would have been
/// granted), unless it re-enters.
#[derive(Debug, Default)]
struct State {
    holders: Vec<Request>,
    queue: VecDeque<Request>,
    next_id: u64,
}

impl State {
    /// A new request for `access` over `range` by the current thread.
    fn request(&mut self, access: Access, range: Range<u64>) -> Request {
        let id = self.next_id;
        self.next_id += 1;
        Request {
            id,
            access,
            range,
            owner: thread::current().id(),
        }
    }

    /// Whether `request`'s thread already holds an access compatible with it,
    /// so that it must not queue behind waiters (see "Re-entry").
    fn reenters(&self, request: &Request) -> bool {
        self.holders.iter().any(|held| {
            held.owner == request.owner && held.access.is_compatible_with(request.access)
        })
    }

    /// Whether `request` may be granted now, if the first `ahead` queued
    /// requests came before it.
    fn admits(&self, request: &Request, ahead: usize) -> bool {
        if self.holders.iter().any(|held| held.conflicts_with(request)) {
            return false;
        }
        self.reenters(request)
            || !self
                .queue
                .iter()
                .take(ahead)
                .any(|earlier| earlier.conflicts_with(request))
    }

    /// Grants, in arrival order, every queued request that is admissible behind
    /// the requests still queued before it. Returns how many were granted.
    #[must_use = "granted waiters must be woken"]
    fn grant_queued(&mut self) -> usize {
        let mut granted = 0;
        let mut at = 0;
        while at < self.queue.len() {
            if self.admits(&self.queue[at], at) {
                let request = self.queue.remove(at).expect("`at` is in the queue");
                self.holders.push(request);
                granted += 1;
            } else {
                at += 1;
            }
        }
        granted
    }

    /// Whether request `id` is still waiting.
    fn is_queued(&self, id: u64) -> bool {
        self.queue.iter().any(|request| request.id == id)
    }
}

impl RawRangeLock {
    /// An unlocked lock with nobody waiting.
    pub fn new() -> Self {
        RawRangeLock {
            state: Mutex::new(State::default()),
            granted: Condvar::new(),
        }
    }

    /// Takes `access` over `range`, sleeping until no holder conflicts with it
    /// and every earlier conflicting request has been served (a re-entry does
    /// not wait for the latter).
    pub fn lock(&self, access: Access, range: Range<u64>) -> RangeGrant {
        let mut state = self.state.lock();
        let request = state.request(access, range);
        let id = request.id;
        let ahead = state.queue.len();
        if state.admits(&request, ahead) {
            state.holders.push(request);
            return self.grant(id);
        }
        // Slow path: queue up, then sleep until a release grants us. Granting
        // happens entirely on the releasing side (notify_all wakes others too).
        state.queue.push_back(request);
        while state.is_queued(id) {
            self.granted.wait(&mut state);
        }
        self.grant(id)
    }

    /// Takes `access` over `range` if that needs no waiting: no holder conflicts
    /// with it and it would overtake no conflicting waiter (unless it re-enters).
    pub fn try_lock(&self, access: Access, range: Range<u64>) -> Option<RangeGrant> {
        let mut state = self.state.lock();
        let request = state.request(access, range);
        let id = request.id;
        let ahead = state.queue.len();
        if !state.admits(&request, ahead) {
            return None;
        }
        state.holders.push(request);
        Some(self.grant(id))
    }

    /// The proof that request `id` of this lock is held.
    fn grant(&self, id: u64) -> RangeGrant {
        RangeGrant { id }
    }

    /// Releases a granted request, granting queued requests that can now run.
    /// Any thread may release a grant.
    ///
    /// # Panics
    /// If this lock holds no request with `grant`'s number; the lock is left
    /// unchanged. (Grants carry no name of their lock: a grant of another lock
    /// is a caller bug this may not catch. The guards on top pair them.)
    pub fn unlock(&self, grant: RangeGrant) {
        let mut state = self.state.lock();
        let at = state
            .holders
            .iter()
            .position(|held| held.id == grant.id)
            .unwrap_or_else(|| {
                panic!("RawRangeLock::unlock({grant:?}) of a grant this lock does not hold")
            });
        state.holders.swap_remove(at);
        if state.grant_queued() > 0 {
            // The sleepers recheck under the mutex, so waking them while still
            // holding it is fine.
            self.granted.notify_all();
        }
    }

    /// How many requests are queued (for tests that need a waiter in place).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// How many requests are held (for tests that check everything was released).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.state.lock().holders.len()
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
pub(super) mod tests {
    use std::ops::Range;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{ranges_overlap, Access, RawRangeLock};

    /// Long enough that a healthy test never hits it, short enough to fail fast.
    const PATIENCE: Duration = Duration::from_secs(10);
    const FILL: Access = Access::shared(0);
    const PUNCH: Access = Access::exclusive(1);

    /// Waits until `done` holds, failing the test (rather than hanging it) if
    /// that takes longer than [`PATIENCE`].
    pub(in crate::lock) fn wait_until(what: &str, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < PATIENCE, "gave up waiting until {what}");
            thread::yield_now();
        }
    }

    /// Waits until `n` requests are queued on `lock`.
    fn wait_queued(lock: &RawRangeLock, n: usize) {
        wait_until(&format!("{n} requests are queued"), || lock.queued() >= n);
    }

    /// Runs `f` on a thread of its own that holds nothing, and returns its result.
    fn elsewhere<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        thread::spawn(f).join().unwrap()
    }

    /// Spawns a thread that takes `access` over `range`, reports, and releases
    /// once told to (the sender) or at once (dropped sender).
    fn holder(
        lock: &Arc<RawRangeLock>,
        access: Access,
        range: Range<u64>,
    ) -> (mpsc::Receiver<()>, mpsc::Sender<()>, thread::JoinHandle<()>) {
        let (held, held_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let lock = Arc::clone(lock);
        let thread = thread::spawn(move || {
            let grant = lock.lock(access, range);
            // Either end may have been dropped: nobody listens, or release at once.
            let _ = held.send(());
            let _ = release_rx.recv();
            lock.unlock(grant);
        });
        (held_rx, release, thread)
    }

    #[test]
    fn ranges_overlap_when_they_share_a_byte() {
        assert!(ranges_overlap(&(0..10), &(9..20)));
        assert!(!ranges_overlap(&(0..10), &(10..20)), "half-open");
        assert!(ranges_overlap(&(5..u64::MAX), &(100..101)), "to the end");
        assert!(
            !ranges_overlap(&(5..5), &(0..10)),
            "an empty range shares nothing"
        );
        assert!(!ranges_overlap(&(0..10), &(7..7)));
    }

    #[test]
    fn try_lock_semantics() {
        let lock = Arc::new(RawRangeLock::new());
        let fill = lock.try_lock(FILL, 0..10).unwrap();
        let held = Arc::clone(&lock);
        elsewhere(move || {
            let shared = held.try_lock(FILL, 5..15).expect("shared holders share");
            assert!(held.try_lock(PUNCH, 9..20).is_none(), "overlap excludes");
            assert!(
                held.try_lock(Access::shared(1), 0..1).is_none(),
                "other class"
            );
            let beside = held.try_lock(PUNCH, 15..u64::MAX).expect("disjoint");
            assert!(held.try_lock(FILL, 1000..1001).is_none(), "to the end");
            held.unlock(beside);
            held.unlock(shared);
        });
        lock.unlock(fill);
        let punch = lock.try_lock(PUNCH, 0..10).unwrap();
        assert!(
            lock.try_lock(FILL, 0..1).is_none(),
            "no re-entry of exclusive"
        );
        let empty = lock
            .try_lock(PUNCH, 5..5)
            .expect("an empty range conflicts with nothing");
        lock.unlock(empty);
        lock.unlock(punch);
        assert_eq!((lock.held(), lock.queued()), (0, 0));
    }

    /// A punch queued on 0..10 holds back a later overlapping fill from another
    /// thread, but not a fill of a disjoint range.
    #[test]
    fn a_queued_waiter_blocks_only_what_overlaps_it() {
        let lock = Arc::new(RawRangeLock::new());
        let fill = lock.lock(FILL, 0..10);
        let (_, _, punch) = holder(&lock, PUNCH, 0..10);
        wait_queued(&lock, 1);
        let held = Arc::clone(&lock);
        elsewhere(move || {
            assert!(
                held.try_lock(FILL, 5..15).is_none(),
                "would overtake the punch"
            );
            let disjoint = held
                .try_lock(FILL, 20..30)
                .expect("disjoint from the punch");
            held.unlock(disjoint);
            // A blocking request too: it must not queue.
            let disjoint = held.lock(PUNCH, 10..20);
            held.unlock(disjoint);
        });
        lock.unlock(fill);
        punch.join().unwrap();
    }

    /// Conflicting requests are served in arrival order.
    #[test]
    fn conflicting_requests_are_served_in_arrival_order() {
        let lock = Arc::new(RawRangeLock::new());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let fill = lock.lock(FILL, 0..10);
        let spawn = |name: &'static str, access: Access, range: Range<u64>| {
            let (lock, log) = (Arc::clone(&lock), Arc::clone(&log));
            thread::spawn(move || {
                let grant = lock.lock(access, range);
                log.lock().push(name);
                lock.unlock(grant);
            })
        };
        let punch = spawn("punch", PUNCH, 0..10);
        wait_queued(&lock, 1);
        let later_fill = spawn("fill", FILL, 5..15);
        wait_queued(&lock, 2);
        // The later fill is compatible with the holder, yet it waits.
        thread::sleep(Duration::from_millis(20));
        assert!(log.lock().is_empty());
        lock.unlock(fill);
        punch.join().unwrap();
        later_fill.join().unwrap();
        assert_eq!(*log.lock(), ["punch", "fill"]);
    }

    /// A release grants every waiter that is admissible behind the waiters
    /// still queued before it, and only those.
    #[test]
    fn a_release_grants_every_admissible_waiter() {
        let lock = Arc::new(RawRangeLock::new());
        let all = lock.lock(PUNCH, 0..100);
        let mut threads = Vec::new();
        // a: granted; b: conflicts with a; c: beside everything; d: behind b.
        for (access, range) in [(FILL, 0..10), (PUNCH, 5..15), (FILL, 50..60), (FILL, 8..9)] {
            threads.push(holder(&lock, access, range));
            wait_queued(&lock, threads.len());
        }
        lock.unlock(all);
        for at in [0, 2] {
            threads[at]
                .0
                .recv_timeout(PATIENCE)
                .expect("admissible waiter granted");
        }
        assert_eq!((lock.held(), lock.queued()), (2, 2));
        assert!(threads[1].0.try_recv().is_err() && threads[3].0.try_recv().is_err());
        for (_, release, thread) in threads {
            drop(release);
            thread.join().unwrap();
        }
        assert_eq!((lock.held(), lock.queued()), (0, 0));
    }

    /// A thread holding a fill takes more fills, over the same or a disjoint
    /// range, while a punch spanning both is queued behind it.
    #[test]
    fn a_thread_reenters_a_shared_access_past_a_queued_waiter() {
        let lock = Arc::new(RawRangeLock::new());
        let (done, done_rx) = mpsc::channel();
        let (queued, queued_rx) = mpsc::channel::<()>();
        let nested = {
            let lock = Arc::clone(&lock);
            thread::spawn(move || {
                let outer = lock.lock(FILL, 0..10);
                queued_rx.recv().unwrap();
                let overlapping = lock.lock(FILL, 5..15);
                let disjoint = lock.lock(FILL, 20..30);
                done.send(()).unwrap();
                lock.unlock(disjoint);
                lock.unlock(overlapping);
                lock.unlock(outer);
            })
        };
        wait_until("the outer fill is held", || lock.held() == 1);
        let (_, _, punch) = holder(&lock, PUNCH, 0..30);
        wait_queued(&lock, 1);
        queued.send(()).unwrap();
        done_rx
            .recv_timeout(PATIENCE)
            .expect("the nested fill deadlocked");
        nested.join().unwrap();
        punch.join().unwrap();
    }

    /// A re-entry still waits for a conflicting holder, and once that is gone it
    /// is granted past the waiters queued before it.
    #[test]
    fn a_queued_reentry_waits_for_holders_only() {
        let lock = Arc::new(RawRangeLock::new());
        let (punch_held, punch_release, punch) = holder(&lock, PUNCH, 15..20);
        punch_held.recv().unwrap();
        let (done, done_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let nested = {
            let lock = Arc::clone(&lock);
            thread::spawn(move || {
                let outer = lock.lock(FILL, 0..10);
                go_rx.recv().unwrap();
                assert!(
                    lock.try_lock(FILL, 5..20).is_none(),
                    "the punch holds 15..20"
                );
                let inner = lock.lock(FILL, 5..20);
                done.send(()).unwrap();
                lock.unlock(inner);
                lock.unlock(outer);
            })
        };
        wait_until("the outer fill is held", || lock.held() == 2);
        // Waits for both the punch and the outer fill.
        let (_, _, spanning) = holder(&lock, PUNCH, 0..30);
        wait_queued(&lock, 1);
        go.send(()).unwrap();
        wait_queued(&lock, 2);
        drop(punch_release);
        punch.join().unwrap();
        done_rx
            .recv_timeout(PATIENCE)
            .expect("the queued re-entry deadlocked");
        nested.join().unwrap();
        spanning.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "RawRangeLock::unlock")]
    fn unlock_of_a_grant_not_held_panics() {
        let other = RawRangeLock::new();
        let _first = other.lock(FILL, 0..1);
        let second = other.lock(FILL, 0..1);
        RawRangeLock::new().unlock(second);
    }

    /// Random accesses over random small ranges, blocking, tried or nested,
    /// checked against a table of who is inside; every thread finishes (the
    /// 4-thread stress of the model checkers is in the shuttle test).
    #[test]
    fn stress_random_ranges() {
        const THREADS: u64 = 4;
        const ROUNDS: usize = 2_000;
        const ACCESSES: [Access; 4] = Access::EVERY_OF_TWO_CLASSES;
        let lock = Arc::new(RawRangeLock::new());
        let inside = Arc::new(parking_lot::Mutex::new(Vec::<(Access, Range<u64>)>::new()));
        let threads: Vec<_> = (0..THREADS)
            .map(|seed| {
                let (lock, inside) = (Arc::clone(&lock), Arc::clone(&inside));
                thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed);
                    let enter = |access: Access, range: &Range<u64>| {
                        let mut inside = inside.lock();
                        for (other, other_range) in inside.iter() {
                            assert!(
                                !ranges_overlap(range, other_range)
                                    || access.is_compatible_with(*other),
                                "{access:?} {range:?} with {other:?} {other_range:?}"
                            );
                        }
                        inside.push((access, range.clone()));
                    };
                    let leave = |access: Access, range: &Range<u64>| {
                        let mut inside = inside.lock();
                        let at = inside
                            .iter()
                            .position(|(a, r)| *a == access && r == range)
                            .unwrap();
                        inside.swap_remove(at);
                    };
                    for _ in 0..ROUNDS {
                        let access = ACCESSES[rng.usize(..ACCESSES.len())];
                        let start = rng.u64(..16);
                        let range = start..start + rng.u64(1..6);
                        let grant = if rng.bool() {
                            lock.lock(access, range.clone())
                        } else {
                            match lock.try_lock(access, range.clone()) {
                                Some(grant) => grant,
                                None => continue,
                            }
                        };
                        enter(access, &range);
                        // Only class 0 nests: a holder of another class that
                        // nested could wait for us while we wait for it.
                        if access == FILL && rng.u8(..4) == 0 {
                            let start = rng.u64(..16);
                            let nested_range = start..start + rng.u64(1..6);
                            let nested = lock.lock(access, nested_range.clone());
                            enter(access, &nested_range);
                            leave(access, &nested_range);
                            lock.unlock(nested);
                        }
                        if rng.u8(..4) == 0 {
                            thread::yield_now();
                        }
                        leave(access, &range);
                        lock.unlock(grant);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!((lock.held(), lock.queued()), (0, 0));
    }
}

/// Loom models: every interleaving (up to a preemption bound) of small scenarios.
#[cfg(all(test, loom))]
mod loom_tests {
    use std::ops::Range;

    use loom::model::Builder;

    use super::{Access, RawRangeLock};
    use crate::sync::atomic::{AtomicUsize, Ordering};
    use crate::sync::{thread, Arc};

    const FILL: Access = Access::shared(0);
    const PUNCH: Access = Access::exclusive(1);
    /// Bit set in a cell while an exclusive holder is inside.
    const EXCLUSIVE: usize = 1 << 16;
    /// Bytes per cell of [`Cells`].
    const CELL: u64 = 5;

    /// Who is inside each 5-byte cell of 0..20. Every update is a
    /// read-modify-write of one location, which always sees the latest value,
    /// so an overlap of conflicting holders is caught whatever the ordering.
    #[derive(Default)]
    struct Cells([AtomicUsize; 4]);

    impl Cells {
        fn covered(&self, range: &Range<u64>) -> impl Iterator<Item = &AtomicUsize> {
            let (first, end) = (range.start / CELL, range.end.div_ceil(CELL));
            self.0[first as usize..end as usize].iter()
        }

        fn enter(&self, access: Access, range: &Range<u64>) {
            for cell in self.covered(range) {
                if access.exclusive {
                    let before = cell.fetch_or(EXCLUSIVE, Ordering::Relaxed);
                    assert_eq!(before, 0, "{access:?} {range:?} entered beside others");
                } else {
                    let before = cell.fetch_add(1, Ordering::Relaxed);
                    assert_eq!(before & EXCLUSIVE, 0, "shared {range:?} beside exclusive");
                }
            }
        }

        fn leave(&self, access: Access, range: &Range<u64>) {
            for cell in self.covered(range) {
                if access.exclusive {
                    cell.fetch_and(!EXCLUSIVE, Ordering::Relaxed);
                } else {
                    cell.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(f);
    }

    /// Takes `access` over `range` on a new thread, inside `cells` while held.
    fn spawn_holder(
        lock: &Arc<RawRangeLock>,
        cells: &Arc<Cells>,
        access: Access,
        range: Range<u64>,
    ) -> thread::JoinHandle<()> {
        let (lock, cells) = (Arc::clone(lock), Arc::clone(cells));
        thread::spawn(move || {
            let grant = lock.lock(access, range.clone());
            cells.enter(access, &range);
            cells.leave(access, &range);
            lock.unlock(grant);
        })
    }

    /// Takes `access` over `range` (and releases it) on a new thread, and
    /// returns once that request is queued.
    fn spawn_queued(
        lock: &Arc<RawRangeLock>,
        access: Access,
        range: Range<u64>,
    ) -> thread::JoinHandle<()> {
        let queued = lock.queued();
        let waiter = {
            let lock = Arc::clone(lock);
            thread::spawn(move || lock.unlock(lock.lock(access, range)))
        };
        while lock.queued() == queued {
            thread::yield_now();
        }
        waiter
    }

    /// A fill overlapping two punches that do not overlap each other: the fill
    /// excludes both, the punches may share, nobody deadlocks.
    #[test]
    fn overlapping_conflicts_exclude() {
        model(|| {
            let lock = Arc::new(RawRangeLock::new());
            let cells = Arc::new(Cells::default());
            let fill = spawn_holder(&lock, &cells, FILL, 5..15);
            let punch = spawn_holder(&lock, &cells, PUNCH, 12..20);
            let grant = lock.lock(PUNCH, 0..10);
            cells.enter(PUNCH, &(0..10));
            cells.leave(PUNCH, &(0..10));
            lock.unlock(grant);
            fill.join().unwrap();
            punch.join().unwrap();
            assert_eq!((lock.held(), lock.queued()), (0, 0));
        });
    }

    /// A fill of 20..30 gets in while a fill holds 0..10 and a punch of 0..10
    /// is queued behind it: queued requests hold back only what they overlap.
    #[test]
    fn a_queued_conflict_elsewhere_does_not_block() {
        model(|| {
            let lock = Arc::new(RawRangeLock::new());
            let fill = lock.lock(FILL, 0..10);
            let punch = spawn_queued(&lock, PUNCH, 0..10);
            let far_fill = {
                let lock = Arc::clone(&lock);
                thread::spawn(move || lock.unlock(lock.lock(FILL, 20..30)))
            };
            // Joined while the fill holds: a wait would deadlock.
            far_fill.join().unwrap();
            lock.unlock(fill);
            punch.join().unwrap();
        });
    }

    /// A punch of 0..10 and a fill of 20..30 both get in while the other holds.
    #[test]
    fn disjoint_ranges_never_wait_for_each_other() {
        for (held, other) in [
            ((PUNCH, 0..10), (FILL, 20..30)),
            ((FILL, 20..30), (PUNCH, 0..10)),
        ] {
            model(move || {
                let lock = Arc::new(RawRangeLock::new());
                let grant = lock.lock(held.0, held.1.clone());
                let other = {
                    let (lock, other) = (Arc::clone(&lock), other.clone());
                    thread::spawn(move || lock.unlock(lock.lock(other.0, other.1)))
                };
                // Joined while holding: a wait would deadlock.
                other.join().unwrap();
                lock.unlock(grant);
            });
        }
    }

    /// A queued punch is not overtaken by a later overlapping fill, although the
    /// fill is compatible with the holder.
    #[test]
    fn a_queued_punch_is_not_overtaken() {
        model(|| {
            let lock = Arc::new(RawRangeLock::new());
            let order = Arc::new(AtomicUsize::new(0));
            let fill = lock.lock(FILL, 0..10);
            let spawn = |access: Access, range: Range<u64>| {
                let (lock, order) = (Arc::clone(&lock), Arc::clone(&order));
                thread::spawn(move || {
                    let grant = lock.lock(access, range);
                    let turn = order.fetch_add(1, Ordering::Relaxed);
                    lock.unlock(grant);
                    turn
                })
            };
            let punch = spawn(PUNCH, 0..10);
            while lock.queued() == 0 {
                thread::yield_now();
            }
            let later_fill = spawn(FILL, 5..15);
            lock.unlock(fill);
            assert_eq!(punch.join().unwrap(), 0, "the punch came first");
            assert_eq!(later_fill.join().unwrap(), 1);
        });
    }

    /// A thread holding a fill takes fills again, over an overlapping and a
    /// disjoint range, while a punch spanning both waits for it.
    #[test]
    fn a_holder_reenters_past_a_queued_punch() {
        model(|| {
            let lock = Arc::new(RawRangeLock::new());
            let outer = lock.lock(FILL, 0..10);
            let punch = spawn_queued(&lock, PUNCH, 0..30);
            let overlapping = lock.lock(FILL, 5..15);
            let disjoint = lock.lock(FILL, 20..30);
            lock.unlock(disjoint);
            lock.unlock(overlapping);
            lock.unlock(outer);
            punch.join().unwrap();
        });
    }
}

/// Shuttle: random schedules of four threads taking random accesses over random
/// small ranges, one of them nesting fills. Run with `--cfg shuttle`.
#[cfg(all(test, shuttle, not(loom)))]
mod shuttle_tests {
    use std::ops::Range;

    use shuttle::rand::{thread_rng, Rng};

    use super::{ranges_overlap, Access, RawRangeLock};
    use crate::sync::atomic::{AtomicUsize, Ordering};
    use crate::sync::{thread, Arc, Mutex};

    const ACCESSES: [Access; 4] = Access::EVERY_OF_TWO_CLASSES;
    const FILL: Access = ACCESSES[0];
    /// Random ranges start below this.
    const SPAN: u64 = 12;
    const ROUNDS: usize = 4;

    /// Who is inside, and over which range.
    type Inside = Mutex<Vec<(Access, Range<u64>)>>;

    fn random_range() -> Range<u64> {
        let start = thread_rng().gen_range(0..SPAN);
        start..start + thread_rng().gen_range(1..5)
    }

    /// Records `access` over `range` as inside, checking it conflicts with
    /// nobody inside.
    fn enter(inside: &Inside, access: Access, range: &Range<u64>) {
        let mut inside = inside.lock();
        for (other, other_range) in inside.iter() {
            assert!(
                !ranges_overlap(range, other_range) || access.is_compatible_with(*other),
                "{access:?} {range:?} inside with {other:?} {other_range:?}"
            );
        }
        inside.push((access, range.clone()));
    }

    fn leave(inside: &Inside, access: Access, range: &Range<u64>) {
        let mut inside = inside.lock();
        let at = inside
            .iter()
            .position(|(a, r)| *a == access && r == range)
            .expect("left without entering");
        inside.swap_remove(at);
    }

    /// Holds `access` over `range` for a moment, checked against `inside`.
    fn hold(lock: &RawRangeLock, inside: &Inside, access: Access, range: Range<u64>) {
        let grant = lock.lock(access, range.clone());
        enter(inside, access, &range);
        thread::yield_now();
        leave(inside, access, &range);
        lock.unlock(grant);
    }

    #[test]
    fn random_ranges_exclude_and_finish() {
        shuttle::check_random(
            || {
                let lock = Arc::new(RawRangeLock::new());
                let inside = Arc::new(Inside::default());
                let finished = Arc::new(AtomicUsize::new(0));
                let mut threads = Vec::new();
                for _ in 0..3 {
                    let (lock, inside, finished) = (
                        Arc::clone(&lock),
                        Arc::clone(&inside),
                        Arc::clone(&finished),
                    );
                    threads.push(thread::spawn(move || {
                        for _ in 0..ROUNDS {
                            let access = ACCESSES[thread_rng().gen_range(0..ACCESSES.len())];
                            let range = random_range();
                            if thread_rng().gen_bool(0.25) {
                                if let Some(grant) = lock.try_lock(access, range.clone()) {
                                    enter(&inside, access, &range);
                                    leave(&inside, access, &range);
                                    lock.unlock(grant);
                                }
                            } else {
                                hold(&lock, &inside, access, range);
                            }
                        }
                        finished.fetch_add(1, Ordering::Relaxed);
                    }));
                }
                // The nesting thread: a fill, then more fills inside it.
                {
                    let (lock, inside, finished) = (
                        Arc::clone(&lock),
                        Arc::clone(&inside),
                        Arc::clone(&finished),
                    );
                    threads.push(thread::spawn(move || {
                        for _ in 0..ROUNDS / 2 {
                            let outer_range = random_range();
                            let outer = lock.lock(FILL, outer_range.clone());
                            enter(&inside, FILL, &outer_range);
                            thread::yield_now();
                            hold(&lock, &inside, FILL, random_range());
                            hold(&lock, &inside, FILL, outer_range.clone());
                            leave(&inside, FILL, &outer_range);
                            lock.unlock(outer);
                        }
                        finished.fetch_add(1, Ordering::Relaxed);
                    }));
                }
                for thread in threads {
                    thread.join().unwrap();
                }
                assert_eq!(finished.load(Ordering::Relaxed), 4);
                assert_eq!((lock.held(), lock.queued()), (0, 0));
            },
            20_000,
        );
    }
}
