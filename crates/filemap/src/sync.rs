//! The crate's concurrency primitives, switched to a model checker's under
//! `--cfg loom` ([loom], exhaustive) or `--cfg shuttle` ([shuttle], randomized
//! schedules) so that the locks built on them can be model-checked.
//!
//! Code in this crate takes atomics, `Arc`, `Mutex`, `Condvar` and threads from
//! here, never from `std` or `parking_lot` directly; otherwise the checker cannot
//! see the operation and silently explores too few interleavings.
//!
//! Normal builds use `parking_lot`'s `Mutex` and `Condvar` (no poisoning,
//! `lock()` returns the guard, `Condvar::wait(&mut guard)`). Under a checker the
//! same API is provided by thin newtypes over its `std`-like types, so call sites
//! compile unchanged every way. Only the API the crate uses is mirrored. Loom wins
//! if both cfgs are set. Each checker is a dependency only under its cfg, which
//! is meant for `cargo test --lib` (see `.ci/run`).
//!
//! [loom]: https://docs.rs/loom
//! [shuttle]: https://docs.rs/shuttle

// Not every primitive is used by every build (some only by tests or by the
// models), and the set must stay identical under every configuration.
#![allow(unused_imports, dead_code)]

/// The model checker whose primitives replace the real ones.
#[cfg(loom)]
use loom as model;
#[cfg(all(shuttle, not(loom)))]
use shuttle as model;

#[cfg(not(any(loom, shuttle)))]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
#[cfg(not(any(loom, shuttle)))]
pub(crate) use std::sync::Arc;

#[cfg(any(loom, shuttle))]
pub(crate) use self::model_compat::{Condvar, Mutex, MutexGuard, RwLock};
#[cfg(any(loom, shuttle))]
pub(crate) use model::sync::Arc;

/// Statics a model checker creates afresh for every execution it explores.
#[cfg(any(loom, shuttle))]
pub(crate) use model::lazy_static;

/// A cell written once, `std`'s in every build: neither checker has one. Its
/// `get` is an acquire load and `get_or_init` serialises initialisers with a
/// lock of its own, neither of which a model sees; the models drive page slots
/// directly rather than through the page tree's cells.
pub(crate) use std::sync::OnceLock;

/// Atomic integers, flags and fences.
pub(crate) mod atomic {
    #[cfg(any(loom, shuttle))]
    pub(crate) use super::model::sync::atomic::{
        fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
    #[cfg(not(any(loom, shuttle)))]
    pub(crate) use std::sync::atomic::{
        fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
}

/// Spawning threads, yielding the processor and naming the current thread.
pub(crate) mod thread {
    #[cfg(any(loom, shuttle))]
    pub(crate) use super::model::thread::{current, spawn, yield_now, JoinHandle, ThreadId};
    #[cfg(not(any(loom, shuttle)))]
    pub(crate) use std::thread::{current, spawn, yield_now, JoinHandle, ThreadId};
}

/// `parking_lot`-shaped wrappers around the checker's `Mutex` and `Condvar`.
#[cfg(any(loom, shuttle))]
mod model_compat {
    use std::fmt;
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;

    use super::model;

    /// A mutex whose `lock` returns the guard directly, like `parking_lot`'s.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(model::sync::Mutex<T>);

    /// The guard of a [`Mutex`].
    pub(crate) struct MutexGuard<'a, T> {
        // `None` only while `Condvar::wait` has lent the guard to the checker, which
        // takes it by value; holding an `Option` avoids moving out of `&mut`.
        inner: Option<model::sync::MutexGuard<'a, T>>,
    }

    /// A condition variable that waits on `&mut MutexGuard`, like `parking_lot`'s.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(model::sync::Condvar);

    impl<T> Mutex<T> {
        /// A new unlocked mutex holding `value`.
        pub(crate) fn new(value: T) -> Self {
            Mutex(model::sync::Mutex::new(value))
        }

        /// Blocks until the mutex is acquired.
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            // parking_lot has no poisoning; mirror that so tests behave alike.
            let inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            MutexGuard { inner: Some(inner) }
        }

        /// The value, through the only reference to the mutex.
        pub(crate) fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// A reader-writer lock whose `read` and `write` return the guards
    /// directly, like `parking_lot`'s.
    #[derive(Debug, Default)]
    pub(crate) struct RwLock<T>(model::sync::RwLock<T>);

    impl<T> RwLock<T> {
        /// A new unlocked lock holding `value`.
        pub(crate) fn new(value: T) -> Self {
            RwLock(model::sync::RwLock::new(value))
        }

        /// Blocks until shared access is granted.
        pub(crate) fn read(&self) -> model::sync::RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(PoisonError::into_inner)
        }

        /// Blocks until exclusive access is granted.
        pub(crate) fn write(&self) -> model::sync::RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(PoisonError::into_inner)
        }

        /// Exclusive access if it is free now.
        pub(crate) fn try_write(&self) -> Option<model::sync::RwLockWriteGuard<'_, T>> {
            match self.0.try_write() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.inner
                .as_deref()
                .expect("guard used during its own wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.inner
                .as_deref_mut()
                .expect("guard used during its own wait")
        }
    }

    impl<T: fmt::Debug> fmt::Debug for MutexGuard<'_, T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Debug::fmt(&self.inner, f)
        }
    }

    impl Condvar {
        /// A new condition variable.
        pub(crate) fn new() -> Self {
            Condvar(model::sync::Condvar::new())
        }

        /// Releases the guard's mutex, blocks until notified, then reacquires it.
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.inner.take().expect("guard used during its own wait");
            let inner = self.0.wait(inner).unwrap_or_else(PoisonError::into_inner);
            guard.inner = Some(inner);
        }

        /// Wakes one waiting thread.
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        /// Wakes every waiting thread.
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}
