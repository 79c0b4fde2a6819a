//! Schedule noise: seeded random yields, spins and sleeps at the cache's
//! interleaving points, off unless a test turns it on (with the `testing`
//! feature, which makes `set_noise` public).
//!
//! The cache's slow paths (claiming, filling and publishing pages, dropping
//! them, changing the backend, writing back) call `point` between their
//! steps. With noise on, each call may yield, spin or sleep for a few
//! microseconds, drawn from a per-thread generator seeded from the process-wide
//! seed, so that each seed drives the threads through other interleavings. The
//! randomized-schedule test of the whole cache (the torture crate's
//! `schedules` test) runs the torture's oracle under many seeds. Loom and
//! shuttle cannot run the whole cache: its pages live in a memfd served by a
//! userfaultfd handler thread, and its waits are futexes and faults that their
//! schedulers do not see.
//!
//! Off, a point costs one relaxed load of a global that is never written, on
//! paths that are about to take a lock or make a system call. The hit path has
//! no point: it must write nothing shared, and it is validated, not locked.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The noise seed; 0 when off.
static SEED: AtomicU64 = AtomicU64::new(0);
/// Numbers threads as they first meet a point under a seed.
static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's generator and the seed it was made for.
    static RNG: RefCell<Option<(u64, fastrand::Rng)>> = const { RefCell::new(None) };
}

/// An interleaving point: with noise on, maybe yield, spin or sleep.
#[inline]
pub(crate) fn point() {
    let seed = SEED.load(Ordering::Relaxed);
    if seed != 0 {
        perturb(seed);
    }
}

#[cold]
fn perturb(seed: u64) {
    let roll = RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        let rng = match &mut *rng {
            Some((made_for, rng)) if *made_for == seed => rng,
            slot => {
                let thread = THREADS.fetch_add(1, Ordering::Relaxed);
                &mut slot
                    .insert((
                        seed,
                        fastrand::Rng::with_seed(seed ^ thread.rotate_left(32)),
                    ))
                    .1
            }
        };
        (rng.u32(..32), rng.u64(1..=50), rng.u64(10..=200))
    });
    match roll {
        (0..=7, _, _) => std::thread::yield_now(),
        (8..=11, spin_us, _) => {
            let until = Instant::now() + Duration::from_micros(spin_us);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        (12..=13, _, sleep_us) => std::thread::sleep(Duration::from_micros(sleep_us)),
        _ => {}
    }
}

/// Turns schedule noise on for the whole process with `seed` (`Some(0)` is
/// taken as 1), or off with `None`. For randomized-schedule tests only.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub fn set_noise(seed: Option<u64>) {
    SEED.store(seed.map_or(0, |seed| seed.max(1)), Ordering::Relaxed);
}
