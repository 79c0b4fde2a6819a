//! Parking threads on a page slot's address, with `parking_lot_core`.
//!
//! # Safety
//! `parking_lot_core::park` and `unpark_all` are `unsafe` only because their
//! callbacks run while the parking lot's bucket is locked: a callback must not
//! park, unpark or panic. Ours only load an atomic.
#![allow(unsafe_code)]

use parking_lot_core::{ParkToken, UnparkToken, DEFAULT_PARK_TOKEN, DEFAULT_UNPARK_TOKEN};

/// Parks the calling thread on `key` if `still_waiting()` holds when checked
/// under the parking lot's lock; returns when woken (or at once if not waiting).
pub(crate) fn park(key: usize, still_waiting: impl FnOnce() -> bool) {
    const TOKEN: ParkToken = DEFAULT_PARK_TOKEN;
    // SAFETY: `still_waiting` only loads an atomic: it neither parks, unparks nor
    // panics; `before_sleep` and `timed_out` do nothing, and there is no timeout.
    unsafe {
        parking_lot_core::park(key, still_waiting, || {}, |_, _| {}, TOKEN, None);
    }
}

/// Wakes every thread parked on `key`.
pub(crate) fn wake_all(key: usize) {
    const TOKEN: UnparkToken = DEFAULT_UNPARK_TOKEN;
    // SAFETY: no callback is involved; unparking is always allowed outside one.
    unsafe {
        parking_lot_core::unpark_all(key, TOKEN);
    }
}
