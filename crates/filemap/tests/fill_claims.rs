//! A fill holds its coherence mode only while it claims pages, and reads the
//! backend under the claims alone. Every call that changes the backend must
//! therefore wait for the claims of its range before it does: otherwise the fill
//! reads the changed backend and installs it where the change does not expect
//! it (a page moved by collapse or insert, a page a punch already dropped).
//!
//! Each test slows one fill's backend read down, so that the change starts while
//! the fill is between its claim and its read, and then checks every page of the
//! file through the cache against what the change leaves.

mod common;

use std::sync::Arc;
use std::time::Duration;

use filemap::backend::{BackendOp, FaultyBackend};
use filemap::fault::{Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, Backend, FaultRule, Mapping, PageCache, Strategy};

/// The file's pages.
const PAGES: u64 = 12;
/// The page whose fill is slowed down (not page 0, so the miss reads no more
/// than its own page: it is not sequential).
const FILLED: u64 = 5;

/// The byte every byte of page `i` holds before the change.
fn old(i: u64) -> u8 {
    i as u8 + 1
}

/// A change under test, and what it leaves: the file's size in pages and the
/// byte of each page (0 for a hole).
struct Change {
    name: &'static str,
    apply: fn(&Mapping),
    pages_after: u64,
    byte_after: fn(u64) -> u8,
}

const NEW: u8 = 0xee;

fn changes() -> Vec<Change> {
    vec![
        Change {
            name: "punch_hole",
            apply: |file| file.punch_hole(FILLED * PAGE, PAGE).unwrap(),
            pages_after: PAGES,
            byte_after: |i| if i == FILLED { 0 } else { old(i) },
        },
        Change {
            name: "zero_range",
            apply: |file| file.zero_range(FILLED * PAGE, PAGE).unwrap(),
            pages_after: PAGES,
            byte_after: |i| if i == FILLED { 0 } else { old(i) },
        },
        Change {
            name: "set_len",
            apply: |file| file.set_len(FILLED * PAGE).unwrap(),
            pages_after: FILLED,
            byte_after: old,
        },
        Change {
            name: "collapse_range",
            apply: |file| file.collapse_range(0, PAGE).unwrap(),
            pages_after: PAGES - 1,
            byte_after: |i| old(i + 1),
        },
        Change {
            name: "insert_range",
            apply: |file| file.insert_range(0, PAGE).unwrap(),
            pages_after: PAGES + 1,
            byte_after: |i| if i == 0 { 0 } else { old(i - 1) },
        },
        Change {
            name: "write_direct",
            apply: |file| {
                let data = AlignedBuf::from_slice(&[NEW; PAGE_SIZE], PAGE_SIZE);
                file.write_direct(&data, FILLED * PAGE).unwrap();
            },
            pages_after: PAGES,
            byte_after: |i| if i == FILLED { NEW } else { old(i) },
        },
    ]
}

/// A file of [`PAGES`] pages, page `i` all bytes `old(i)`, written to the
/// backend and not cached.
fn uncached_file(backend: Arc<dyn Backend>, strategy: Strategy) -> Arc<Mapping> {
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache.open(backend).unwrap();
    for i in 0..PAGES {
        file.write_all_at(&vec![old(i); PAGE_SIZE], i * PAGE)
            .unwrap();
    }
    file.invalidate_range(0, PAGES * PAGE).unwrap();
    file
}

#[test]
fn changes_wait_for_fills_claimed_before_them() {
    for change in changes() {
        for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
            for (name, inner, _keep) in common::backends() {
                let what = format!("{} under {strategy} on {name}", change.name);
                let faulty = Arc::new(FaultyBackend::new(inner, 1));
                let file = uncached_file(faulty.clone(), strategy);
                faulty.add_rule(
                    FaultRule::new(
                        BackendOp::ReadPages,
                        Trigger::Nth(1),
                        Injection::Delay {
                            min: Duration::from_millis(100),
                            max: Duration::from_millis(100),
                        },
                    )
                    .on_bytes(FILLED * PAGE..(FILLED + 1) * PAGE),
                );
                let read = std::thread::scope(|scope| {
                    let reader = scope.spawn(|| {
                        let mut page = vec![0u8; PAGE_SIZE];
                        file.read_exact_at(&mut page, FILLED * PAGE).map(|()| page)
                    });
                    // The fill has claimed its page and sleeps before its read.
                    while faulty.injected() == 0 {
                        std::thread::yield_now();
                    }
                    (change.apply)(&file);
                    reader.join().unwrap()
                });
                faulty.clear();

                // The read saw the page before or after the change, whole.
                let before = old(FILLED);
                let after = (FILLED < change.pages_after).then(|| (change.byte_after)(FILLED));
                match read {
                    Ok(page) => {
                        let byte = page[0];
                        assert!(
                            page.iter().all(|&b| b == byte)
                                && (byte == before || Some(byte) == after),
                            "{what}: the racing read returned {byte:#x}"
                        );
                    }
                    Err(error) => assert_eq!(
                        error.kind(),
                        std::io::ErrorKind::UnexpectedEof,
                        "{what}: {error}"
                    ),
                }

                // What the cache holds now is what the change left, page by page.
                assert_eq!(file.len(), change.pages_after * PAGE, "{what}: size");
                let mut page = vec![0u8; PAGE_SIZE];
                for i in 0..change.pages_after {
                    file.read_exact_at(&mut page, i * PAGE).unwrap();
                    let want = (change.byte_after)(i);
                    assert!(
                        page.iter().all(|&b| b == want),
                        "{what}: page {i} holds {:#x}, not {want:#x}",
                        page[0]
                    );
                }
            }
        }
    }
}
