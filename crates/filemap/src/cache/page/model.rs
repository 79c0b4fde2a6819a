//! Models of the slot protocol, run on a real [`Slot`] by loom (every
//! interleaving within a preemption bound, `--cfg loom`) or shuttle (random
//! schedules, `--cfg shuttle`):
//! a fill racing an invalidation, a hit racing a rewrite of the page, a
//! writeback racing a write, a pin racing a write, a hit racing pins, and
//! hazard pins (`hazard.rs`) racing a waiting writer's lock and a
//! non-waiting lock, their unpin racing the writer's park, and records
//! handed back and out again. Each asserts the invariant its race could
//! break.
//!
//! A page's bytes are two words, so that a torn copy shows as two different
//! values. They are copied as the page store copies them: relaxed atomic
//! accesses (what `crate::racy::copy_racy` does), with the release fence of
//! `PageStore::write` before a write; the hit's acquire fence is the one in
//! [`Slot::read_optimistic`]. The waits park in the checkers' parking lot
//! (`cache/wait.rs`), so a waiter no transition wakes is reported as a
//! deadlock.
//!
//! Each model fails when the protocol is broken. Checked by mutation: a
//! `replace` that tolerates a changed version (a stale fill installs), a
//! `written` that does not bump the version or a hit without its acquire
//! fence (a torn copy is kept), a `writeback_done` that clears `DIRTY` or a
//! `writeback_started_pinned` that does not set `WRITEBACK` (a page the backend does
//! not hold is clean), a `replace` that wakes no one (deadlock), a
//! lock that ignores pins (a pinned page changes under its pin, and a
//! writeback's snapshot under a write), and pins counted in the bits an
//! optimistic reader re-checks (a pin voids a hit: caught by shuttle; loom's
//! search, bounded, does not reach that schedule), and a `try_lock` that
//! does not fail on the hazard pins it finds (a page changes under its pin).
//!
//! A plain (non-atomic) copy racing a rewrite is caught as the data race it
//! is (loom only): the reason every copy of a cached page is a racy copy.
//!
//! The hazard protocol's own mutations run here on every check, as
//! `#[should_panic]` tests: a pinner that skips its re-check of the slot
//! after writing its entry, one whose re-check is not fenced after the entry
//! (loom only: shuttle's schedules are sequentially consistent), and an
//! unpin that ignores a pin a locker moved into the count.

use super::hazard::registry;
use super::{OptimisticRead, PageState, Slot};
use crate::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{thread, Arc};

/// A page's bytes, or the backend's copy of them.
#[derive(Default)]
struct Bytes([AtomicU64; 2]);

impl Bytes {
    /// Writes `value` into every word, as `PageStore::write` does a page.
    fn write(&self, value: u64) {
        fence(Ordering::Release);
        for word in &self.0 {
            word.store(value, Ordering::Relaxed);
        }
    }

    /// Copies the words, as `PageStore::read` does a page (racing writers).
    fn read(&self) -> [u64; 2] {
        [
            self.0[0].load(Ordering::Relaxed),
            self.0[1].load(Ordering::Relaxed),
        ]
    }

    /// Writes a snapshot, as a writeback writes the backend.
    fn write_snapshot(&self, snapshot: [u64; 2]) {
        for (word, value) in self.0.iter().zip(snapshot) {
            word.store(value, Ordering::Relaxed);
        }
    }
}

/// Runs `scenario` under every interleaving loom explores, or under shuttle's
/// random schedules.
fn check(scenario: impl Fn() + Send + Sync + 'static) {
    #[cfg(loom)]
    {
        // Four preemptions per execution, unless `LOOM_MAX_PREEMPTIONS` says
        // otherwise: a fraction of a second, where the whole search takes over
        // a minute. Each mutation listed in the module's docs fails with three.
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(4);
        builder.check(scenario);
    }
    #[cfg(all(shuttle, not(loom)))]
    {
        shuttle::check_random(scenario, 2_000);
    }
}

/// Locks a present page to change it, waiting while it is locked, pinned or
/// being filled, as a buffered write does (`write_page`).
fn lock_present(slot: &Slot) {
    loop {
        let state = slot.load();
        assert!(state.is_present() || state.is_locked_or_filling());
        if state.is_held_or_filling() {
            slot.wait_while_state(PageState::is_held_or_filling);
            continue;
        }
        if slot.try_lock(state).is_ok() {
            return;
        }
    }
}

/// A present clean page of 1s, and a writer thread that locks it by `lock`
/// and, if that took the lock, rewrites it to 2s and unlocks it dirty.
fn page_being_rewritten(
    lock: fn(&Slot) -> bool,
) -> (Arc<Slot>, Arc<Bytes>, thread::JoinHandle<()>) {
    let slot = Arc::new(Slot::default());
    let page = Arc::new(Bytes::default());
    create(&slot, &page, 1, false);
    let writer = {
        let (slot, page) = (slot.clone(), page.clone());
        thread::spawn(move || {
            if lock(&slot) {
                page.write(2);
                slot.unlock_written();
            }
        })
    };
    (slot, page, writer)
}

/// Locks the page as a buffered write does ([`lock_present`]): always takes
/// the lock, waiting for it.
fn waiting_lock(slot: &Slot) -> bool {
    lock_present(slot);
    true
}

/// Creates the page with `value`, as a writer creating a page does.
fn create(slot: &Slot, page: &Bytes, value: u64, dirty: bool) {
    slot.lock_for_create(slot.load())
        .expect("the slot is absent");
    page.write(value);
    let before = slot.publish(dirty);
    assert!(!before.is_queued());
}

/// Ends the fill that made `claim` and read `value`, as `read_claimed` does:
/// installs and publishes the page if the claim is still what it was, else
/// gives the claim back.
fn install_fill(slot: &Slot, page: &Bytes, claim: PageState, value: u64) {
    if slot.lock_fill_claim(claim).is_ok() {
        page.write(value);
        slot.publish(false);
    } else {
        slot.abandon_fill(claim);
    }
}

/// A fill claimed the page, then read the backend (value 1); meanwhile an
/// invalidation changed the backend (to 2) and drops the page, taking the
/// fill's claim if the fill has not locked it yet, after which a second fill
/// reads the backend again. The first fill must install its stale bytes only
/// if its claim survived, so that the page ends up holding 2.
///
/// The mapping's invalidations wait for the fills of their range instead of
/// taking claims; the version check that this exercises is the second guard
/// behind that wait (DESIGN.md, "Invalidation").
#[test]
fn a_fill_whose_claim_was_taken_never_installs() {
    check(|| {
        let slot = Arc::new(Slot::default());
        let page = Arc::new(Bytes::default());
        let filling = slot.claim_for_fill().expect("the slot is absent");

        let fill = {
            let (slot, page) = (slot.clone(), page.clone());
            // 1: what it read before the invalidation changed the backend.
            thread::spawn(move || install_fill(&slot, &page, filling, 1))
        };

        // The invalidation: drop whatever the slot holds.
        loop {
            let state = slot.load();
            if state.is_absent() {
                break;
            }
            if state.is_locked() {
                slot.wait_while_state(PageState::is_locked);
                continue;
            }
            if state.is_filling() {
                // The claim is taken: the page becomes absent under the fill.
                if slot.replace(state, state.emptied()).is_ok() {
                    break;
                }
                continue;
            }
            if slot.try_lock(state).is_ok() {
                page.write(0);
                slot.empty();
                break;
            }
        }
        // The next fill, after the backend changed.
        let claim = slot
            .claim_for_fill()
            .expect("the invalidation emptied the slot");
        install_fill(&slot, &page, claim, 2);

        fill.join().unwrap();
        let state = slot.load();
        assert!(
            state.is_present() && state.is_readable() && !state.is_filling(),
            "{state:?}"
        );
        assert_eq!(page.read(), [2, 2], "a stale fill installed: {state:?}");
    });
}

/// A hit copies the page while a writer rewrites it in place (1 to 2) under
/// its lock. A copy the hit keeps must be the page's bytes at one time: all 1
/// or all 2, never torn. The version bump of the writer's unlock is what
/// tells the hit that the bytes changed under it.
#[test]
fn a_hit_never_keeps_bytes_changed_under_it() {
    check(|| {
        let (slot, page, writer) = page_being_rewritten(waiting_lock);

        let mut copy = [0; 2];
        let read = slot.read_optimistic(|| copy = page.read());
        if read == OptimisticRead::Copied {
            assert!(
                copy == [1, 1] || copy == [2, 2],
                "kept a torn copy {copy:?}"
            );
        }

        writer.join().unwrap();
        let state = slot.load();
        assert!(state.is_readable() && state.is_dirty(), "{state:?}");
        assert_eq!(page.read(), [2, 2]);
    });
}

/// Why the copies are racy copies (`crate::racy`): the same hit, copying the
/// page with plain loads as `std::ptr::copy_nonoverlapping` would, races the
/// writer's stores, and that is a data race (undefined behaviour) even though
/// the validation throws the torn copy away. Loom tracks plain accesses and
/// reports the race; shuttle does not, so this runs under loom only.
#[cfg(loom)]
#[test]
#[should_panic(expected = "Causality violation")]
#[allow(unsafe_code)]
fn a_plain_copy_racing_a_rewrite_is_a_data_race() {
    check(|| {
        let (slot, page, writer) = page_being_rewritten(waiting_lock);
        let mut copy = [0; 2];
        let _ = slot.read_optimistic(|| {
            for (word, copied) in page.0.iter().zip(&mut copy) {
                // SAFETY: none, on purpose: this is the plain load a
                // non-atomic copy makes. Loom stops the execution at the race,
                // before a torn value is used.
                *copied = unsafe { word.unsync_load() };
            }
        });
        writer.join().unwrap();
    });
}

/// Writes back the page if it is dirty, as `write_back_page` does: one
/// writeback at a time, the snapshot taken under a pin.
fn write_back(slot: &Slot, page: &Bytes, backend: &Bytes) {
    loop {
        let state = slot.load();
        if !state.is_dirty() {
            return;
        }
        if state.is_locked() || state.is_under_writeback() {
            slot.wait_while_state(|s| s.is_locked() || s.is_under_writeback());
            continue;
        }
        if slot.try_pin(state).is_err() {
            continue;
        }
        let snapshot = page.read();
        if !slot.finish_pinned_snapshot() {
            continue;
        }
        backend.write_snapshot(snapshot);
        slot.end_writeback(false);
        return;
    }
}

/// Pins the page, waiting while it is not readable, as `Mapping::pin` does a
/// cached page.
fn pin(slot: &Slot) {
    loop {
        let state = slot.load();
        if !state.is_pinnable() {
            slot.wait_while_state(|s| !s.is_pinnable());
            continue;
        }
        if slot.try_pin(state).is_ok() {
            return;
        }
    }
}

/// A reader pins the page (1) while a writer rewrites it (2) under its lock.
/// The bytes the pin shows must stay the same from the pin to the unpin, and
/// the write must land once the pin is gone.
#[test]
fn a_pinned_page_never_changes_under_its_pin() {
    // A counted pin: the entry `pinned_reads_race_a_write` claims stays unused.
    check(|| pinned_reads_race_a_write(|slot, _| pin(slot), |slot, _| slot.unpin()));
}

/// Pins are taken and given back while a hit copies the page: they change
/// nothing an optimistic reader re-checks, so the hit keeps its copy.
#[test]
fn pins_never_void_a_hit() {
    check(|| {
        let slot = Arc::new(Slot::default());
        let page = Arc::new(Bytes::default());
        create(&slot, &page, 1, false);

        let pinner = {
            let slot = slot.clone();
            thread::spawn(move || {
                pin(&slot);
                slot.unpin();
            })
        };

        let mut copy = [0; 2];
        let read = slot.read_optimistic(|| copy = page.read());
        assert_eq!(read, OptimisticRead::Copied, "a pin voided a hit");
        assert_eq!(copy, [1, 1]);

        pinner.join().unwrap();
        assert!(!slot.load().is_pinned());
    });
}

/// Writebacks of a dirty page (1) race a write of it (2), one before it
/// and one after. Whatever the order, a page whose bytes the backend does
/// not hold must stay dirty: a write that lands after a writeback's snapshot
/// dirties the page again, ending that writeback must not clean it, and the
/// later writeback's newer snapshot must not be overtaken by the older one.
#[test]
fn a_page_written_during_writeback_stays_dirty() {
    check(|| {
        let slot = Arc::new(Slot::default());
        let page = Arc::new(Bytes::default());
        let backend = Arc::new(Bytes::default());
        create(&slot, &page, 1, true);

        let writeback = {
            let (slot, page, backend) = (slot.clone(), page.clone(), backend.clone());
            thread::spawn(move || write_back(&slot, &page, &backend))
        };

        lock_present(&slot);
        page.write(2);
        slot.unlock_written();
        write_back(&slot, &page, &backend);

        writeback.join().unwrap();
        let state = slot.load();
        assert!(!state.is_busy(), "{state:?}");
        assert!(
            state.is_dirty() || backend.read() == page.read(),
            "a clean page the backend does not hold: page {:?}, backend {:?}, {state:?}",
            page.read(),
            backend.read()
        );
    });
}

/// A free entry of a hazard record claimed for the calling thread, as a
/// mapping's thread claims its record at its first pin.
fn own_entry() -> &'static AtomicUsize {
    let record = registry().claim().expect("a record is free");
    registry().entry(
        registry()
            .free_entry(record)
            .expect("a new record is empty"),
    )
}

/// Takes a hazard pin of the page, waiting while it is not readable, as
/// `Mapping::pin` does with a free entry.
fn hazard_pin(slot: &Slot, entry: &AtomicUsize) {
    while slot.try_pin_hazard(entry).is_err() {
        slot.wait_while_state(|s| !s.is_readable());
    }
}

/// Reads the page twice under a pin taken by `pin` and given back by
/// `unpin`, while a writer rewrites it (1 to 2) under its lock: the pin must
/// show one version of the page, whole, from the pin to the unpin, and the
/// write must land once the pin is gone.
fn pinned_reads_race_a_write(pin: fn(&Slot, &AtomicUsize), unpin: fn(&Slot, &AtomicUsize)) {
    let (slot, page, writer) = page_being_rewritten(waiting_lock);

    let entry = own_entry();
    pin(&slot, entry);
    let first = page.read();
    thread::yield_now();
    let second = page.read();
    unpin(&slot, entry);
    assert!(
        first == [1, 1] || first == [2, 2],
        "torn under its pin: {first:?}"
    );
    assert_eq!(first, second, "the page changed under its pin");

    writer.join().unwrap();
    let state = slot.load();
    assert!(
        state.is_readable() && state.is_dirty() && !state.is_pinned(),
        "{state:?}"
    );
    assert_eq!(page.read(), [2, 2]);
    assert_eq!(entry.load(Ordering::Relaxed), 0, "the entry stayed taken");
}

/// A hazard pin races a writer's lock: either the pinner sees `LOCKED` and
/// waits, or the locker finds the entry, moves the pin into the count and
/// waits (parked on the slot) for the unpin, which must wake it.
#[test]
fn a_hazard_pinned_page_never_changes_under_its_pin() {
    check(|| {
        pinned_reads_race_a_write(hazard_pin, |slot, entry| slot.unpin_hazard(entry));
    });
}

/// The pin is taken before the writer starts: the writer finds it, parks
/// until the unpin (a missed wake is a deadlock), and then writes.
#[test]
fn a_writer_waiting_for_a_hazard_pin_proceeds_after_the_unpin() {
    check(|| {
        let slot = Arc::new(Slot::default());
        let page = Arc::new(Bytes::default());
        create(&slot, &page, 1, false);
        let entry = own_entry();
        hazard_pin(&slot, entry);

        let writer = {
            let (slot, page) = (slot.clone(), page.clone());
            thread::spawn(move || {
                lock_present(&slot);
                page.write(2);
                slot.unlock_written();
            })
        };

        thread::yield_now();
        assert_eq!(page.read(), [1, 1], "the page changed under its pin");
        slot.unpin_hazard(entry);
        writer.join().unwrap();
        let state = slot.load();
        assert!(state.is_readable() && !state.is_pinned(), "{state:?}");
        assert_eq!(page.read(), [2, 2]);
    });
}

/// Mutation: a pinner that trusts the state it loaded before writing its
/// entry, without the re-check after: a locker that scanned before the entry
/// was written changes the page under the pin.
#[test]
#[should_panic(expected = "under its pin")]
fn a_hazard_pin_without_its_recheck_is_caught() {
    check(|| {
        pinned_reads_race_a_write(
            |slot, entry| loop {
                let state = slot.load();
                if state.is_readable() {
                    entry.store(slot.key(), Ordering::Relaxed);
                    fence(Ordering::SeqCst);
                    return;
                }
                slot.wait_while_state(|s| !s.is_readable());
            },
            |slot, entry| slot.unpin_hazard(entry),
        );
    });
}

/// Mutation: the re-check without the fence that orders it after the entry
/// (both accesses relaxed or acquire-release): the locker's scan and the
/// pinner's check may each miss the other's write. Only loom sees this
/// (shuttle runs sequentially consistent).
#[cfg(loom)]
#[test]
#[should_panic(expected = "under its pin")]
fn a_hazard_pin_without_its_fence_is_caught() {
    check(|| {
        pinned_reads_race_a_write(
            |slot, entry| loop {
                entry.store(slot.key(), Ordering::Release);
                let state = slot.load();
                if state.is_readable() {
                    return;
                }
                slot.unpin_hazard(entry);
                slot.wait_while_state(|s| !s.is_readable());
            },
            |slot, entry| slot.unpin_hazard(entry),
        );
    });
}

/// A hazard pin races a locker that never waits (as eviction's): the lock
/// either fails, having moved the pin into the count, or succeeds before
/// the pin and rewrites the page (1 to 2) before the pin shows it. Either
/// way the pin shows one version throughout, and after its unpin no pin is
/// left in the count.
fn hazard_pin_races_a_try_lock(unpin: fn(&Slot, &AtomicUsize)) {
    let (slot, page, locker) = page_being_rewritten(|slot| {
        let state = slot.load();
        !state.is_held() && slot.try_lock(state).is_ok()
    });

    let entry = own_entry();
    hazard_pin(&slot, entry);
    let first = page.read();
    thread::yield_now();
    assert_eq!(page.read(), first, "the page changed under its pin");
    unpin(&slot, entry);

    locker.join().unwrap();
    let state = slot.load();
    assert!(!state.is_pinned(), "a pin outlived its unpin: {state:?}");
}

#[test]
fn a_lock_that_finds_a_hazard_pin_fails_and_counts_it_until_the_unpin() {
    check(|| hazard_pin_races_a_try_lock(|slot, entry| slot.unpin_hazard(entry)));
}

/// Mutation: an unpin that clears its entry without looking whether a
/// locker moved the pin into the count: the count never goes down (and a
/// writer parked on it is never woken).
#[test]
#[should_panic(expected = "a pin outlived its unpin")]
fn an_unpin_that_ignores_a_moved_pin_is_caught() {
    check(|| {
        hazard_pin_races_a_try_lock(|_, entry| {
            entry.store(0, Ordering::Release);
        });
    });
}

/// A record is handed to one thread at a time, and comes back when its
/// thread gives it up with no pin held; one given up with a pin still in an
/// entry (a forgotten guard) stays out, so the pin stays seen.
#[test]
fn a_record_is_reused_only_once_its_pins_are_gone() {
    check(|| {
        let record = registry().claim().expect("a record is free");
        let entry = registry().entry(registry().free_entry(record).expect("empty"));
        let slot = Slot::default();
        let page = Bytes::default();
        create(&slot, &page, 1, false);
        hazard_pin(&slot, entry);
        registry().release(record);
        let other = thread::spawn(|| registry().claim().expect("a record is free"));
        assert_ne!(
            other.join().unwrap(),
            record,
            "a record holding a pin was handed out"
        );
        slot.unpin_hazard(entry);
        registry().release(record);
        let again = thread::spawn(|| registry().claim().expect("a record is free"));
        assert_eq!(
            again.join().unwrap(),
            record,
            "a free record was not reused"
        );
    });
}
