//! Pinned pages (`Mapping::pin`, `pin_mut`): a pinned page's bytes do not
//! change until it is unpinned, whatever other threads do to it meanwhile;
//! its own thread's calls that would wait for a pin fail with `EDEADLK`;
//! other threads' reads go on; a budget held by pins refuses new pins
//! instead of hanging.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use filemap::{MapAccess, Mapping, PageCache, PAGE_SIZE};

mod common;

const PAGE: u64 = PAGE_SIZE as u64;

/// A file of `pages` pages of `fill`, in a cache of `budget_pages` pages.
fn file(pages: u64, fill: u8, budget_pages: u64) -> (Arc<PageCache>, Arc<Mapping>) {
    common::cached_file(&vec![fill; (pages * PAGE) as usize], budget_pages)
}

/// Runs `change` on another thread while page 0 is pinned: it must not
/// complete, and the pinned bytes must not change, until the pin is gone;
/// then it completes. Returns the file's page 0 afterwards.
fn change_waits_for_the_pin(
    what: &str,
    change: impl FnOnce(&Arc<Mapping>) -> std::io::Result<()> + Send + 'static,
) -> Vec<u8> {
    let (cache, mapping) = file(4, 7, 64);
    let pin = mapping.pin(0).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let changer = {
        let (mapping, done) = (mapping.clone(), done.clone());
        std::thread::spawn(move || {
            change(&mapping).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    // Long enough for an unpinned change to be over many times.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            pin.iter().all(|&b| b == 7),
            "{what}: the pinned bytes changed"
        );
        assert!(
            !done.load(Ordering::SeqCst),
            "{what} did not wait for the pin"
        );
    }
    assert!(
        cache.stats().pin_waits > 0 || what == "a store through a map",
        "{what}"
    );
    drop(pin);
    changer.join().unwrap();
    let mut page = vec![0; PAGE_SIZE];
    let n = mapping.read_at(&mut page, 0).unwrap();
    page.truncate(n);
    page
}

#[test]
fn every_change_of_a_pinned_page_waits_for_its_unpin() {
    let page = change_waits_for_the_pin("a buffered write", |m| m.write_all_at(&[1; 10], 0));
    assert_eq!(&page[..11], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7]);
    let page = change_waits_for_the_pin("a write pin", |m| {
        m.pin_mut(0).map(|mut page| page.write(0, &[3]))
    });
    assert_eq!(&page[..2], &[3, 7]);
    let page = change_waits_for_the_pin("a punch", |m| m.punch_hole(0, PAGE));
    assert!(page.iter().all(|&b| b == 0));
    let page = change_waits_for_the_pin("a zero range", |m| m.zero_range(100, 100));
    assert_eq!((page[99], page[100], page[199], page[200]), (7, 0, 0, 7));
    let page = change_waits_for_the_pin("a truncate", |m| m.set_len(10));
    assert_eq!(page, vec![7; 10]);
    let page = change_waits_for_the_pin("a direct write", |m| {
        let buf = filemap::AlignedBuf::from_slice(&[3; PAGE_SIZE], PAGE_SIZE);
        m.write_direct(&buf, 0).map(drop)
    });
    assert!(page.iter().all(|&b| b == 3));
    let page = change_waits_for_the_pin("an invalidation", |m| m.invalidate_range(0, PAGE));
    assert!(page.iter().all(|&b| b == 7));
    let page = change_waits_for_the_pin("a collapse", |m| m.collapse_range(0, PAGE));
    assert_eq!(page.len(), PAGE_SIZE);
    let page = change_waits_for_the_pin("a store through a map", |m| {
        let region = m.map(0, PAGE_SIZE, MapAccess::ReadWrite)?;
        region.write(5, &[9])
    });
    assert_eq!(&page[4..7], &[7, 9, 7]);
}

#[test]
fn a_store_through_a_map_made_before_the_pin_waits_too() {
    // The map's page is mapped writable before the pin: the pin must take it
    // out of the map so that the next store faults and waits.
    let (_cache, mapping) = file(2, 7, 64);
    let region = Arc::new(mapping.map(0, 2 * PAGE_SIZE, MapAccess::ReadWrite).unwrap());
    region.write(0, &[8]).unwrap();
    let pin = mapping.pin(0).unwrap();
    assert_eq!(pin[0], 8);
    let done = Arc::new(AtomicBool::new(false));
    let storer = {
        let (region, done) = (region.clone(), done.clone());
        std::thread::spawn(move || {
            region.write(1, &[9]).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(pin[1], 7, "a store landed under the pin");
        assert!(!done.load(Ordering::SeqCst), "the store did not wait");
    }
    drop(pin);
    storer.join().unwrap();
    let mut back = [0; 2];
    mapping.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [8, 9]);
}

#[test]
fn other_threads_read_and_pin_a_pinned_page_without_waiting() {
    let (cache, mapping) = file(2, 5, 64);
    let pin = mapping.pin(0).unwrap();
    let (sent, received) = mpsc::channel();
    {
        let mapping = mapping.clone();
        std::thread::spawn(move || {
            let mut buf = [0; PAGE_SIZE];
            let read = mapping.read_at(&mut buf, 0).unwrap();
            let other = mapping.pin(0).unwrap()[0];
            sent.send((read, buf[0], other)).unwrap();
        });
    }
    let seen = received
        .recv_timeout(Duration::from_secs(20))
        .expect("a read or a pin of another thread waited for the pin");
    assert_eq!(seen, (PAGE_SIZE, 5, 5));
    assert_eq!(cache.stats().pins_held, 1);
    drop(pin);
    assert_eq!(cache.stats().pins_held, 0);
    assert_eq!(cache.stats().pins, 2);
}

#[test]
fn a_call_that_would_wait_for_the_callers_own_pin_fails_with_edeadlk() {
    let (_cache, mapping) = file(4, 1, 64);
    let edeadlk = |result: std::io::Result<()>, what: &str| {
        let error = result.expect_err(what);
        assert_eq!(
            filemap::errno(&error),
            Some(libc::EDEADLK),
            "{what}: {error}"
        );
    };
    {
        let _pin = mapping.pin(1).unwrap();
        edeadlk(mapping.write_all_at(&[2], PAGE + 5), "a write");
        edeadlk(mapping.punch_hole(0, 3 * PAGE), "a punch");
        edeadlk(mapping.set_len(PAGE), "a truncate");
        edeadlk(mapping.invalidate_range(PAGE, 1), "an invalidation");
        edeadlk(mapping.pin_mut(1).map(drop), "a write pin");
        // Calls that do not wait for a read pin go on.
        mapping.write_all_at(&[2], 0).unwrap();
        mapping.sync_all().unwrap();
        let mut buf = [0; 8];
        mapping.read_exact_at(&mut buf, PAGE).unwrap();
        let again = mapping.pin(1).unwrap();
        assert_eq!(again[0], 1);
    }
    {
        let mut page = mapping.pin_mut(2).unwrap();
        page.write(0, &[4]);
        edeadlk(mapping.pin(2).map(drop), "a read pin of one's write pin");
        edeadlk(mapping.read_exact_at(&mut [0; 1], 2 * PAGE), "a read");
        edeadlk(mapping.sync_range(2 * PAGE, 1), "a sync");
        // Another page is another matter.
        mapping.write_all_at(&[6], 3 * PAGE).unwrap();
    }
    // Unpinned: everything goes.
    mapping.punch_hole(0, PAGE).unwrap();
    let mut back = [9; 1];
    mapping.read_exact_at(&mut back, 2 * PAGE).unwrap();
    assert_eq!(back, [4]);
}

#[test]
fn a_write_pin_dirties_the_page_and_reaches_the_backend() {
    let (cache, mapping) = file(2, 0, 64);
    mapping.sync_all().unwrap();
    {
        let mut page = mapping.pin_mut(1).unwrap();
        page.write(10, b"tuple");
        assert_eq!(&page[10..15], b"tuple");
    }
    assert!(cache.stats().dirty_bytes >= PAGE);
    mapping.sync_all().unwrap();
    mapping.invalidate_range(0, 2 * PAGE).unwrap();
    let mut back = [0; 5];
    mapping.read_exact_at(&mut back, PAGE + 10).unwrap();
    assert_eq!(&back, b"tuple");
}

#[test]
fn a_budget_held_by_pins_refuses_new_pins_and_never_hangs() {
    // Four pages of budget, all pinned.
    let (cache, mapping) = file(8, 1, 4);
    mapping.invalidate_range(0, 8 * PAGE).unwrap();
    let pins: Vec<_> = (0..4).map(|i| mapping.pin(i).unwrap()).collect();
    let (sent, received) = mpsc::channel();
    {
        let mapping = mapping.clone();
        std::thread::spawn(move || {
            let pin = mapping.pin(5).map(drop);
            let mut buf = [0; PAGE_SIZE];
            let read = mapping.read_at(&mut buf, 6 * PAGE);
            sent.send((pin, read.map(|n| (n, buf[0])))).unwrap();
        });
    }
    let (pin, read) = received
        .recv_timeout(Duration::from_secs(50))
        .expect("a pin or a read hung on a budget held by pins");
    let error = pin.expect_err("a fifth pin in a budget of four");
    assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "{error}");
    // A read is served uncached.
    assert_eq!(read.unwrap(), (PAGE_SIZE, 1));
    assert_eq!(cache.stats().pins_held, 4);
    drop(pins);
    assert_eq!(mapping.pin(5).unwrap()[0], 1);
}

#[test]
fn a_pin_past_the_end_of_file_is_refused() {
    let (_cache, mapping) = file(1, 1, 64);
    let error = mapping.pin(1).map(drop).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
    let error = mapping.pin_mut(9).map(drop).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
}

/// More read pins on one thread than its record of hazard pins has entries
/// (seven): the rest are counted in their slots. Each holds its page against
/// another thread's write, `pins_held` counts them all, and once they are
/// dropped no page stays pinned (a pin a lock attempt moved into its slot's
/// count is given back there).
#[test]
fn pins_beyond_a_threads_hazard_record_hold_and_are_all_given_back() {
    const PINS: u64 = 20;
    let (cache, mapping) = file(PINS, 3, 64);
    let pins: Vec<_> = (0..PINS).map(|i| mapping.pin(i).unwrap()).collect();
    assert_eq!(cache.stats().pins_held, PINS);
    let try_writes = |value: u8| {
        let mapping = mapping.clone();
        std::thread::spawn(move || {
            (0..PINS)
                .filter(|&i| mapping.write_at_nowait(&[value], i * PAGE).is_ok())
                .count()
        })
        .join()
        .unwrap()
    };
    assert_eq!(try_writes(9), 0, "a write changed a pinned page");
    // Twice: the first attempt moved the hazard pins into the counts.
    assert_eq!(try_writes(9), 0, "a write changed a pinned page");
    assert!(pins.iter().all(|pin| pin.iter().all(|&b| b == 3)));
    assert_eq!(cache.stats().pins_held, PINS);
    drop(pins);
    assert_eq!(cache.stats().pins_held, 0);
    assert_eq!(try_writes(8) as u64, PINS, "a page stayed pinned");
}

/// Pins of two threads, hazard and counted, come and go while a third
/// thread writes the pages: every pin sees one whole version of its page,
/// and `pins_held` is exact once they are done.
#[test]
fn pins_of_several_threads_see_whole_pages_under_writes() {
    const PAGES: u64 = 4;
    let (cache, mapping) = file(PAGES, 0, 64);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mapping, stop) = (mapping.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut value = 0u8;
            while !stop.load(Ordering::SeqCst) {
                value = value.wrapping_add(1);
                for i in 0..PAGES {
                    mapping
                        .write_all_at(&vec![value; PAGE_SIZE], i * PAGE)
                        .unwrap();
                }
            }
        })
    };
    let pinners: Vec<_> = (0..2)
        .map(|_| {
            let mapping = mapping.clone();
            std::thread::spawn(move || {
                for round in 0..2000 {
                    // Up to ten at once: past seven, counted in the slots.
                    let pins: Vec<_> = (0..(round % 10) + 1)
                        .map(|n| mapping.pin(n % PAGES).unwrap())
                        .collect();
                    for pin in &pins {
                        let first = pin[0];
                        assert!(pin.iter().all(|&b| b == first), "a torn page under a pin");
                    }
                }
            })
        })
        .collect();
    for pinner in pinners {
        pinner.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(cache.stats().pins_held, 0);
}

/// Eviction passes over a pinned page: reads of other pages through a
/// budget of four pages evict everything else, while the pinned page's
/// bytes stay in place.
#[test]
fn eviction_skips_a_pinned_page() {
    let (cache, mapping) = file(16, 4, 4);
    let pin = mapping.pin(0).unwrap();
    let evictions = cache.stats().evictions;
    let mut buf = [0; PAGE_SIZE];
    for _ in 0..3 {
        for i in 1..16 {
            mapping.read_exact_at(&mut buf, i * PAGE).unwrap();
            assert_eq!(buf[0], 4);
        }
    }
    assert!(cache.stats().evictions > evictions, "nothing was evicted");
    assert!(pin.iter().all(|&b| b == 4), "the pinned page was evicted");
    drop(pin);
    mapping.punch_hole(0, PAGE).unwrap();
}
