//! Pinned ranges (`Mapping::pin_range`): the bytes of a read in place, filled
//! as a read fills them, unchanged while the guard lives (every change waits
//! for it), cut at the end of file, one slice per chunk of the cache's
//! memory, and refused rather than hung when the budget cannot hold them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use filemap::{Mapping, PageCache, PinnedRange, PAGE_SIZE};

mod common;

const PAGE: u64 = PAGE_SIZE as u64;

/// The byte at `pos` of every file here.
fn byte_at(pos: u64) -> u8 {
    (pos % 251) as u8
}

/// A file of `pages` pages of [`byte_at`], none of them cached, in a cache of
/// `budget_pages` pages.
fn file(pages: u64, budget_pages: u64) -> (Arc<PageCache>, Arc<Mapping>) {
    let bytes: Vec<u8> = (0..pages * PAGE).map(byte_at).collect();
    let (cache, mapping) = common::cached_file(&bytes, budget_pages);
    mapping.sync_all().unwrap();
    mapping.invalidate_range(0, pages * PAGE).unwrap();
    (cache, mapping)
}

/// The range's bytes, joined.
fn joined(range: &PinnedRange<'_>) -> Vec<u8> {
    let mut bytes = vec![0; range.len()];
    range.copy_to(&mut bytes);
    assert_eq!(
        bytes,
        range.slices().collect::<Vec<_>>().concat(),
        "copy_to and slices differ"
    );
    bytes
}

#[test]
fn a_pinned_range_shows_the_files_bytes_filled_as_a_read_fills_them() {
    let (cache, mapping) = file(16, 256);
    let (offset, len) = (100, 10 * PAGE_SIZE);
    let range = mapping.pin_range(offset, len).unwrap();
    assert_eq!(range.len(), len);
    let expected: Vec<u8> = (offset..offset + len as u64).map(byte_at).collect();
    assert_eq!(joined(&range), expected);
    // Eleven pages of one chunk: one slice, in place.
    assert_eq!(range.slices().count(), 1);
    assert_eq!(range.io_slices().len(), 1);
    let stats = cache.stats();
    assert_eq!(stats.pins_held, 11);
    assert!(stats.misses >= 1, "the range was not filled");
    drop(range);
    assert_eq!(cache.stats().pins_held, 0, "a pin of the range stayed");
}

#[test]
fn every_change_to_a_pinned_range_waits_for_the_guard() {
    let (_cache, mapping) = file(8, 256);
    type Change = fn(&Mapping) -> std::io::Result<()>;
    let changes: [(&str, Change); 4] = [
        ("a buffered write", |m| {
            m.write_all_at(&[0xEE; 10], 3 * PAGE)
        }),
        ("a punch", |m| m.punch_hole(4 * PAGE, PAGE)),
        ("a truncate", |m| m.set_len(2 * PAGE + 10)),
        ("an invalidation", |m| m.invalidate_range(0, 8 * PAGE)),
    ];
    for (what, change) in changes {
        mapping.set_len(8 * PAGE).unwrap();
        let bytes: Vec<u8> = (0..8 * PAGE).map(byte_at).collect();
        mapping.write_all_at(&bytes, 0).unwrap();
        let range = mapping.pin_range(PAGE, 5 * PAGE_SIZE).unwrap();
        let before = joined(&range);
        let done = Arc::new(AtomicBool::new(false));
        let changer = {
            let (mapping, done) = (mapping.clone(), done.clone());
            std::thread::spawn(move || {
                change(&mapping).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            assert!(!done.load(Ordering::SeqCst), "{what} did not wait");
            assert_eq!(joined(&range), before, "{what} changed the pinned bytes");
        }
        drop(range);
        changer.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }
}

#[test]
fn a_pinned_range_is_cut_at_the_end_of_file_and_empty_past_it() {
    let (_cache, mapping) = file(3, 256);
    mapping.set_len(2 * PAGE + 100).unwrap();
    let range = mapping.pin_range(PAGE + 7, 1 << 20).unwrap();
    assert_eq!(range.len(), PAGE_SIZE + 93);
    let expected: Vec<u8> = (PAGE + 7..2 * PAGE + 100).map(byte_at).collect();
    assert_eq!(joined(&range), expected);
    drop(range);
    for offset in [2 * PAGE + 100, 5 * PAGE] {
        let range = mapping.pin_range(offset, 10).unwrap();
        assert!(range.is_empty());
        assert_eq!(range.slices().count(), 0);
    }
    // A bad range is refused as a read refuses it.
    let error = mapping.pin_range(u64::MAX, 10).map(drop).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
}

/// Caught: a range of no bytes at offset 0 took its last page as the one
/// before page 0 (`u64::MAX` wrapped) and asked for room to pin 2^52 pages;
/// the process aborted.
#[test]
fn a_pinned_range_of_no_bytes_is_empty_wherever_it_starts() {
    let (cache, mapping) = file(3, 256);
    for offset in [0, 7, PAGE, 2 * PAGE + 5, 9 * PAGE] {
        let range = mapping.pin_range(offset, 0).unwrap();
        assert!(range.is_empty(), "at {offset}");
        assert_eq!(range.slices().count(), 0, "at {offset}");
    }
    assert_eq!(cache.stats().misses, 0, "nothing filled");
}

#[test]
fn a_pinned_range_across_chunks_is_one_slice_per_chunk() {
    // Chunk 0 holds pages 0..512.
    let (_cache, mapping) = file(520, 1024);
    let (offset, len) = (510 * PAGE + 9, 5 * PAGE_SIZE);
    let range = mapping.pin_range(offset, len).unwrap();
    let slices: Vec<usize> = range.slices().map(<[u8]>::len).collect();
    assert_eq!(slices, vec![2 * PAGE_SIZE - 9, 3 * PAGE_SIZE + 9]);
    let expected: Vec<u8> = (offset..offset + len as u64).map(byte_at).collect();
    assert_eq!(joined(&range), expected);
}

#[test]
fn a_pinned_range_longer_than_the_budget_is_refused_and_holds_nothing() {
    let (cache, mapping) = file(32, 8);
    let error = mapping.pin_range(0, 32 * PAGE_SIZE).map(drop).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "{error}");
    assert_eq!(cache.stats().pins_held, 0);
    // A range the budget holds is pinned.
    let range = mapping.pin_range(PAGE, 2 * PAGE_SIZE).unwrap();
    assert_eq!(range.len(), 2 * PAGE_SIZE);
}

#[test]
fn a_pinned_range_over_the_callers_write_pin_fails_with_edeadlk() {
    let (_cache, mapping) = file(4, 256);
    let _write = mapping.pin_mut(2).unwrap();
    let error = mapping.pin_range(0, 4 * PAGE_SIZE).map(drop).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EDEADLK));
    // A range beside it is pinned.
    assert_eq!(
        mapping.pin_range(0, 2 * PAGE_SIZE).unwrap().len(),
        2 * PAGE_SIZE
    );
}

#[test]
fn sequential_pinned_ranges_read_ahead_as_sequential_reads_do() {
    let (cache, mapping) = file(1024, 2048);
    let mut offset = 0;
    while offset < 1024 * PAGE {
        let range = mapping.pin_range(offset, 64 << 10).unwrap();
        let expected: Vec<u8> = (offset..offset + (64 << 10)).map(byte_at).collect();
        assert_eq!(joined(&range), expected);
        offset += 64 << 10;
    }
    let stats = cache.stats();
    assert!(
        stats.readahead_pages > 0,
        "no page was read ahead: {stats:?}"
    );
    assert!(
        stats.misses < 1024 / 16,
        "{} misses for 64 KiB ranges read in order",
        stats.misses
    );
}

/// Caught (the torture through the mount hung): a pinned range that met an
/// absent page waited for Fill while holding the pins of the pages before
/// it, and a punch over the range held its mode waiting for those pins.
#[test]
fn pinned_ranges_racing_punches_never_deadlock() {
    let (_cache, mapping) = file(32, 1024);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let puncher = {
        let mapping = mapping.clone();
        std::thread::spawn(move || {
            for round in 0..100_000u64 {
                let first = round * 7 % 30;
                mapping.punch_hole(first * PAGE, 2 * PAGE).unwrap();
            }
        })
    };
    let pinner = {
        let mapping = mapping.clone();
        std::thread::spawn(move || {
            for round in 0..100_000u64 {
                let offset = round * 5 % 16 * PAGE;
                match mapping.pin_range(offset, 16 * PAGE_SIZE) {
                    Ok(range) => assert_eq!(range.len(), 16 * PAGE_SIZE),
                    Err(error) => {
                        assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "{error}")
                    }
                }
            }
            done_tx.send(()).unwrap();
        })
    };
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a pinned range and a punch deadlocked");
    pinner.join().unwrap();
    puncher.join().unwrap();
}
