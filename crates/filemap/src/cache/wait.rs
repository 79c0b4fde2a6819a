//! Parking threads on a page slot's address, with `parking_lot_core`.
//!
//! Under a model checker (`--cfg loom` or `--cfg shuttle`) the parking lot is
//! out of the checker's sight, so parking goes through the checker's own
//! `Mutex` and `Condvar` instead, with the same contract: the wait condition
//! is checked under the lock that a wake takes too, so a wake cannot fall
//! between the check and the sleep. One lock serves every slot (a model has
//! few), and a thread woken for another slot only re-checks. The slot's own
//! code (`Slot::wait_while_state`, `Slot::replace`) runs unchanged, and a
//! transition that forgot to wake a waiter leaves it asleep, which loom
//! reports as a deadlock.
//!
//! # Safety
//! `parking_lot_core::park` and `unpark_all` are `unsafe` only because their
//! callbacks run while the parking lot's bucket is locked: a callback must not
//! park, unpark or panic. Ours only load an atomic.
#![allow(unsafe_code)]

#[cfg(not(any(loom, shuttle)))]
use parking_lot_core::{ParkToken, UnparkToken, DEFAULT_PARK_TOKEN, DEFAULT_UNPARK_TOKEN};

/// Parks the calling thread on `key` if `still_waiting()` holds when checked
/// under the parking lot's lock; returns when woken (or at once if not waiting).
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn park(key: usize, still_waiting: impl FnOnce() -> bool) {
    const TOKEN: ParkToken = DEFAULT_PARK_TOKEN;
    // SAFETY: `still_waiting` only loads an atomic: it neither parks, unparks nor
    // panics; `before_sleep` and `timed_out` do nothing, and there is no timeout.
    unsafe {
        parking_lot_core::park(key, still_waiting, || {}, |_, _| {}, TOKEN, None);
    }
}

/// Wakes every thread parked on `key`.
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn wake_all(key: usize) {
    const TOKEN: UnparkToken = DEFAULT_UNPARK_TOKEN;
    // SAFETY: no callback is involved; unparking is always allowed outside one.
    unsafe {
        parking_lot_core::unpark_all(key, TOKEN);
    }
}

#[cfg(any(loom, shuttle))]
pub(crate) use self::checked::{park, wake_all};

/// The parking lot of the model checkers.
#[cfg(any(loom, shuttle))]
mod checked {
    use crate::sync::{lazy_static, Condvar, Mutex};

    lazy_static! {
        /// The lock a park checks its condition under, and where it sleeps.
        static ref LOT: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }

    /// Sleeps until a wake if `still_waiting()` holds under the lot's lock.
    pub(crate) fn park(_key: usize, still_waiting: impl FnOnce() -> bool) {
        let (lock, sleepers) = &*LOT;
        let mut guard = lock.lock();
        if still_waiting() {
            sleepers.wait(&mut guard);
        }
    }

    /// Wakes every sleeper (of any slot: each re-checks its own).
    pub(crate) fn wake_all(_key: usize) {
        let (lock, sleepers) = &*LOT;
        let _guard = lock.lock();
        sleepers.notify_all();
    }
}
