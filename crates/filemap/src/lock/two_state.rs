//! bcachefs's two-state lock as bcachefs has it: unfair.
//!
//! bcachefs guards its page cache with `pagecache_add_lock`, a
//! `two_state_lock_t`: an "add" state, shared by buffered reads, faults and
//! buffered writes, and a "block" state, shared by direct I/O and held by
//! truncate and fallocate, the two excluding each other. Taking a state is a
//! compare-and-swap that succeeds whenever no holder of the other state is
//! present; a request that fails sleeps until the holders of the other state
//! have all left (`wake_up_all` when the count reaches zero) and tries again.
//! There is no queue: a request is let in next to holders of its own state
//! whoever waits for the other one, so a steady stream of either state starves
//! the other. That is the weakness the `range` strategy exists to remove, and
//! the `direct` and `starve` benchmarks show it, so the `two-state` strategy
//! keeps it instead of running bcachefs's modes over [`super::RawFairLock`].
//!
//! bcachefs also serialises the block side with the inode lock, and this lock
//! models that part too, as a flag in the same state:
//!
//! - direct I/O takes the inode lock, then the block state, then drops the
//!   inode lock (`bch2_direct_write` drops it once the write is not extending
//!   the file): direct writes run side by side, but each enters alone;
//! - truncate and fallocate (an exclusive access here) take the inode lock,
//!   wait for the direct I/O in flight to finish (`inode_dio_wait`) and for
//!   the adds to leave, and hold both until they are done: nothing else of the
//!   block side enters meanwhile, and no add.
//!
//! | access | waits while | then holds |
//! |---|---|---|
//! | shared class 0 (add) | a block holder is present | one add |
//! | shared class 1 (block) | the inode lock is held; then while adds are present | one block |
//! | exclusive (either class) | the inode lock is held; then while anyone holds | the inode lock and one block |
//!
//! Waiters sleep on one condition variable, woken whenever a count reaches
//! zero or the inode lock is dropped, and check their condition again. The
//! state lives behind a mutex rather than in one atomic word, as in
//! [`super::RawFairLock`], so that the two locks cost the same uncontended and
//! the benchmarks compare their policies, not their implementations.

use crate::sync::{Condvar, Mutex};

use super::Access;

/// bcachefs's two-state lock, unfair, with the inode lock that orders its
/// block side. See the module documentation.
///
/// ```
/// use filemap::lock::{Access, RawTwoStateLock};
///
/// let lock = RawTwoStateLock::new();
/// lock.lock(Access::shared(0)); // an add (fill, buffered write)
/// assert!(lock.try_lock(Access::shared(0)));
/// assert!(!lock.try_lock(Access::shared(1))); // a block (direct I/O) waits
/// lock.unlock(Access::shared(0));
/// lock.unlock(Access::shared(0));
/// assert!(lock.try_lock(Access::shared(1)));
/// lock.unlock(Access::shared(1));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct RawTwoStateLock {
    state: Mutex<State>,
    /// Where waiters sleep until a count reaches zero or the inode lock is
    /// dropped.
    changed: Condvar,
}

/// The lock's state.
///
/// Invariants: `adds == 0 || blocks == 0`; `exclusive` implies `inode` and
/// `blocks == 1`.
#[derive(Debug, Default)]
struct State {
    /// Holders of the add state.
    adds: usize,
    /// Holders of the block state, an exclusive holder included.
    blocks: usize,
    /// Whether the inode lock is held: by an exclusive holder, or by a direct
    /// request while it waits for the adds to leave.
    inode: bool,
    /// Whether the block holder is exclusive.
    exclusive: bool,
}

impl State {
    /// Takes `access` if that needs no waiting; returns whether it did.
    fn try_take(&mut self, access: Access) -> bool {
        if access.exclusive {
            if self.inode || self.adds > 0 || self.blocks > 0 {
                return false;
            }
            self.inode = true;
            self.exclusive = true;
            self.blocks = 1;
        } else if access.class == 0 {
            if self.blocks > 0 {
                return false;
            }
            self.adds += 1;
        } else {
            if self.inode || self.adds > 0 {
                return false;
            }
            self.blocks += 1;
        }
        true
    }
}

impl RawTwoStateLock {
    /// An unlocked lock.
    pub fn new() -> Self {
        RawTwoStateLock::default()
    }

    /// Takes `access`, sleeping while the other state is held (and, for the
    /// block side, while the inode lock is). Requests that arrive later may
    /// be let in first.
    pub fn lock(&self, access: Access) {
        let mut state = self.state.lock();
        if state.try_take(access) {
            return;
        }
        if access.exclusive || access.class != 0 {
            // Block side: take the inode lock first, as bcachefs does.
            while state.inode {
                self.changed.wait(&mut state);
            }
            state.inode = true;
            let idle = |s: &State| s.adds == 0 && (!access.exclusive || s.blocks == 0);
            while !idle(&state) {
                self.changed.wait(&mut state);
            }
            state.blocks += 1;
            if access.exclusive {
                state.exclusive = true;
            } else {
                // Direct I/O drops the inode lock once it holds the block state.
                state.inode = false;
                self.changed.notify_all();
            }
        } else {
            // bcachefs's `wait_event(trylock)`.
            while !state.try_take(access) {
                self.changed.wait(&mut state);
            }
        }
    }

    /// Takes `access` if that needs no waiting. Returns whether it was taken.
    pub fn try_lock(&self, access: Access) -> bool {
        self.state.lock().try_take(access)
    }

    /// Releases one holder of `access`, waking the waiters if it was the last
    /// of its state or held the inode lock.
    ///
    /// # Panics
    /// If the lock is not held as `access`; the state is left unchanged.
    pub fn unlock(&self, access: Access) {
        let mut state = self.state.lock();
        let held = if access.exclusive {
            state.exclusive
        } else if access.class == 0 {
            state.adds > 0
        } else {
            state.blocks > 0 && !state.exclusive
        };
        assert!(
            held,
            "RawTwoStateLock::unlock({access:?}) but the lock is held as {state:?}"
        );
        let woke = if access.exclusive {
            state.exclusive = false;
            state.inode = false;
            state.blocks = 0;
            true
        } else if access.class == 0 {
            state.adds -= 1;
            state.adds == 0
        } else {
            state.blocks -= 1;
            state.blocks == 0
        };
        if woke {
            self.changed.notify_all();
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{Access, RawTwoStateLock};

    const ADD: Access = Access::shared(0);
    const BLOCK: Access = Access::shared(1);
    const EXCLUSIVE: Access = Access::exclusive(1);

    /// Long enough that a healthy test never hits it, short enough to fail fast.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::yield_now();
        }
    }

    #[test]
    fn states_share_within_and_exclude_across() {
        let lock = RawTwoStateLock::new();
        assert!(lock.try_lock(ADD) && lock.try_lock(ADD));
        assert!(!lock.try_lock(BLOCK) && !lock.try_lock(EXCLUSIVE));
        lock.unlock(ADD);
        lock.unlock(ADD);
        assert!(lock.try_lock(BLOCK) && lock.try_lock(BLOCK));
        assert!(!lock.try_lock(ADD) && !lock.try_lock(EXCLUSIVE));
        lock.unlock(BLOCK);
        lock.unlock(BLOCK);
        assert!(lock.try_lock(EXCLUSIVE));
        for access in [ADD, BLOCK, EXCLUSIVE] {
            assert!(!lock.try_lock(access), "{access:?} next to an exclusive");
        }
        lock.unlock(EXCLUSIVE);
        assert!(lock.try_lock(ADD));
        lock.unlock(ADD);
    }

    #[test]
    #[should_panic(expected = "but the lock is held as")]
    fn releasing_what_is_not_held_panics() {
        let lock = RawTwoStateLock::new();
        assert!(lock.try_lock(BLOCK));
        lock.unlock(EXCLUSIVE);
    }

    /// The unfairness bcachefs has: a direct request waiting for the adds to
    /// leave does not hold back new adds, which go in ahead of it; it enters
    /// once the last add has left.
    #[test]
    fn a_waiting_direct_request_lets_later_adds_in_ahead_of_it() {
        let lock = Arc::new(RawTwoStateLock::new());
        lock.lock(ADD);
        let entered = Arc::new(AtomicBool::new(false));
        let direct = {
            let (lock, entered) = (lock.clone(), entered.clone());
            thread::spawn(move || {
                lock.lock(BLOCK);
                entered.store(true, Ordering::SeqCst);
                lock.unlock(BLOCK);
            })
        };
        wait_until("the direct request holds the inode lock", || {
            lock.state.lock().inode
        });
        // A later add goes in at once, as it would not under the fair lock.
        assert!(lock.try_lock(ADD), "a later add was held back");
        // While it waits with the inode lock, a punch cannot even start.
        assert!(!lock.try_lock(EXCLUSIVE));
        lock.unlock(ADD);
        thread::sleep(Duration::from_millis(20));
        assert!(!entered.load(Ordering::SeqCst), "entered next to an add");
        lock.unlock(ADD);
        direct.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    /// A punch waits for the direct I/O in flight and keeps later direct
    /// requests out until it is done.
    #[test]
    fn an_exclusive_request_drains_the_block_side_and_keeps_it_out() {
        let lock = Arc::new(RawTwoStateLock::new());
        lock.lock(BLOCK);
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let spawn = |name: &'static str, access: Access| {
            let (lock, log) = (lock.clone(), log.clone());
            thread::spawn(move || {
                lock.lock(access);
                log.lock().push(name);
                lock.unlock(access);
            })
        };
        let punch = spawn("punch", EXCLUSIVE);
        wait_until("the punch holds the inode lock", || lock.state.lock().inode);
        assert!(
            !lock.try_lock(BLOCK),
            "a direct request passed the inode lock"
        );
        let direct = spawn("direct", BLOCK);
        thread::sleep(Duration::from_millis(20));
        assert!(log.lock().is_empty());
        lock.unlock(BLOCK);
        punch.join().unwrap();
        direct.join().unwrap();
        assert_eq!(*log.lock(), ["punch", "direct"]);
    }

    /// Holders that must exclude each other never overlap, and every request
    /// finishes: adds, direct requests and punches from several threads.
    #[test]
    fn conflicting_holders_never_overlap_and_every_request_finishes() {
        const ROUNDS: usize = 2000;
        let lock = Arc::new(RawTwoStateLock::new());
        // Holders inside now: adds, blocks, exclusive.
        let inside: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
        // Overlaps seen, counted rather than asserted inside the lock: a
        // thread that panicked there would leave the others waiting for ever.
        let overlaps = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (lock, inside, overlaps) = (lock.clone(), inside.clone(), overlaps.clone());
                thread::spawn(move || {
                    for round in 0..ROUNDS {
                        let kind = (t + round) % 3;
                        let access = [ADD, BLOCK, EXCLUSIVE][kind];
                        lock.lock(access);
                        inside[kind].fetch_add(1, Ordering::SeqCst);
                        let [adds, blocks, exclusive] =
                            [0, 1, 2].map(|k| inside[k].load(Ordering::SeqCst));
                        let add_with_block = adds > 0 && blocks + exclusive > 0;
                        let exclusive_shared = exclusive > 0 && adds + blocks + exclusive > 1;
                        if add_with_block || exclusive_shared {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        thread::yield_now();
                        inside[kind].fetch_sub(1, Ordering::SeqCst);
                        lock.unlock(access);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(
            overlaps.load(Ordering::SeqCst),
            0,
            "conflicting holders overlapped"
        );
    }
}

/// Loom models of the lock alone: conflicting accesses never overlap, and no
/// waiter misses the wake-up that lets it in (loom reports a waiter left
/// asleep as a deadlock).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::{Access, RawTwoStateLock};
    use crate::sync::atomic::{AtomicUsize, Ordering};
    use crate::sync::Arc;

    const ADD: Access = Access::shared(0);
    const BLOCK: Access = Access::shared(1);
    const EXCLUSIVE: Access = Access::exclusive(1);

    /// Runs one thread per access, each taking it once; every pair that must
    /// exclude each other is checked through a count of holders inside.
    fn model(accesses: [Access; 3]) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(move || {
            let lock = Arc::new(RawTwoStateLock::new());
            // Holders inside: adds, blocks (exclusive ones included).
            let inside = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
            let exclusive_inside = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = accesses
                .into_iter()
                .map(|access| {
                    let (lock, inside, exclusive_inside) =
                        (lock.clone(), inside.clone(), exclusive_inside.clone());
                    loom::thread::spawn(move || {
                        lock.lock(access);
                        let side = usize::from(access.exclusive || access.class == 1);
                        inside[side].fetch_add(1, Ordering::SeqCst);
                        if access.exclusive {
                            exclusive_inside.fetch_add(1, Ordering::SeqCst);
                        }
                        assert_eq!(inside[1 - side].load(Ordering::SeqCst), 0);
                        let alone = inside[side].load(Ordering::SeqCst) == 1;
                        let exclusive = exclusive_inside.load(Ordering::SeqCst);
                        assert!(exclusive == 0 || (exclusive == 1 && alone));
                        if access.exclusive {
                            exclusive_inside.fetch_sub(1, Ordering::SeqCst);
                        }
                        inside[side].fetch_sub(1, Ordering::SeqCst);
                        lock.unlock(access);
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
        });
    }

    #[test]
    fn an_add_two_direct_requests() {
        model([ADD, BLOCK, BLOCK]);
    }

    #[test]
    fn an_add_a_direct_request_and_a_punch() {
        model([ADD, BLOCK, EXCLUSIVE]);
    }

    #[test]
    fn two_adds_and_a_punch() {
        model([ADD, ADD, EXCLUSIVE]);
    }
}
