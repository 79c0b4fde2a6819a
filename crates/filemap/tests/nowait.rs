//! The `_nowait` calls: they copy or write what the cache holds at once and
//! fail with `ErrorKind::WouldBlock`, changing nothing, where `read_at` or
//! `write_at` would wait for a backend read, a busy page or a coherence mode
//! held by someone else.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use filemap::backend::{BackendOp, FaultyBackend};
use filemap::fault::{Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{Backend, FaultRule, Mapping, Mode, PageCache, Strategy};

/// A file of `pages` pages, page `i` all bytes `i + 1`, all cached and clean.
fn cached_file(backend: Arc<dyn Backend>, strategy: Strategy, pages: u64) -> Arc<Mapping> {
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache.open(backend).unwrap();
    for i in 0..pages {
        file.write_all_at(&vec![i as u8 + 1; PAGE_SIZE], i * PAGE)
            .unwrap();
    }
    file.sync_all().unwrap();
    file
}

fn assert_would_block<T: std::fmt::Debug>(result: std::io::Result<T>, what: &str) {
    assert_eq!(result.unwrap_err().kind(), ErrorKind::WouldBlock, "{what}");
}

#[test]
fn nowait_reads_copy_cached_pages_only_and_never_fill() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = cached_file(backend, strategy, 3);
            file.invalidate_range(PAGE, PAGE).unwrap();
            let mut buf = vec![0u8; 3 * PAGE_SIZE];
            assert_eq!(
                file.read_at_nowait(&mut buf, 10).unwrap(),
                PAGE_SIZE - 10,
                "{what}: stops at the uncached page"
            );
            assert!(buf[..PAGE_SIZE - 10].iter().all(|&b| b == 1), "{what}");
            assert_would_block(file.read_at_nowait(&mut buf, PAGE), &what);
            assert!(!file.is_page_cached(1), "{what}: a nowait read filled");
            assert_eq!(file.read_at_nowait(&mut buf, 2 * PAGE).unwrap(), PAGE_SIZE);
            assert!(buf[..PAGE_SIZE].iter().all(|&b| b == 3), "{what}");
            assert_eq!(
                file.read_at_nowait(&mut buf, 3 * PAGE).unwrap(),
                0,
                "{what}: EOF"
            );
            // The blocking read fills; then the nowait read hits.
            assert_eq!(
                file.read_at(&mut buf[..PAGE_SIZE], PAGE).unwrap(),
                PAGE_SIZE
            );
            assert_eq!(file.read_at_nowait(&mut buf, PAGE).unwrap(), 2 * PAGE_SIZE);
        }
    }
}

#[test]
fn nowait_writes_go_into_cached_pages_only() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = cached_file(backend, strategy, 3);
            file.invalidate_range(PAGE, PAGE).unwrap();
            // From inside page 0 across the uncached page 1: page 0's part only.
            assert_eq!(
                file.write_at_nowait(&[9; 200], PAGE - 100).unwrap(),
                100,
                "{what}"
            );
            let mut buf = vec![0u8; PAGE_SIZE];
            file.read_exact_at(&mut buf, 0).unwrap();
            assert!(buf[PAGE_SIZE - 100..].iter().all(|&b| b == 9), "{what}");
            assert_would_block(file.write_at_nowait(&[9; 10], PAGE), &what);
            assert!(!file.is_page_cached(1), "{what}");
            // Past the end of file: the file would grow. Up to it: a short write.
            assert_would_block(file.write_at_nowait(&[9; 10], 3 * PAGE), &what);
            assert_eq!(file.write_at_nowait(&[3; 10], 3 * PAGE - 5).unwrap(), 5);
            assert_eq!(file.len(), 3 * PAGE, "{what}");
            file.read_exact_at(&mut buf, PAGE).unwrap();
            assert!(buf.iter().all(|&b| b == 2), "{what}: page 1 unchanged");
            file.read_exact_at(&mut buf, 2 * PAGE).unwrap();
            assert!(buf.iter().all(|&b| b == 3), "{what}: page 2 unchanged");
            // What a nowait write wrote is dirty: it reaches the backend.
            let backend = file.backend().clone();
            file.sync_all().unwrap();
            let fresh = PageCache::builder().build().unwrap().open(backend).unwrap();
            fresh.read_exact_at(&mut buf, 0).unwrap();
            assert!(buf[PAGE_SIZE - 100..].iter().all(|&b| b == 9), "{what}");
        }
    }
}

/// While a punch holds Invalidate (its backend call is slowed down), a nowait
/// write to its range fails at once instead of waiting, and so does a nowait
/// read under `file-exclusive`, where whole reads take the lock.
#[test]
fn nowait_calls_do_not_wait_for_a_punch() {
    for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
        let (_, inner, _keep) = common::backends().remove(0);
        let faulty = Arc::new(FaultyBackend::new(inner, 1));
        let file = cached_file(faulty.clone(), strategy, 8);
        faulty.add_rule(FaultRule::new(
            BackendOp::PunchHole,
            Trigger::Always,
            Injection::Delay {
                min: Duration::from_millis(500),
                max: Duration::from_millis(500),
            },
        ));
        std::thread::scope(|scope| {
            let punch = scope.spawn(|| file.punch_hole(4 * PAGE, PAGE).unwrap());
            // The punch has dropped page 4 and sleeps in the backend, holding
            // Invalidate, once page 4 is gone from the cache.
            while file.is_page_cached(4) {
                std::thread::yield_now();
            }
            let mut buf = [0u8; 16];
            assert_would_block(
                file.write_at_nowait(&[7; 16], 4 * PAGE + 8),
                &format!("{strategy}: write in the punched range"),
            );
            if strategy.conflicts(Mode::Read, Mode::Invalidate) {
                assert_would_block(
                    file.read_at_nowait(&mut buf, 0),
                    &format!("{strategy}: read while the file is locked"),
                );
            } else {
                assert_eq!(file.read_at_nowait(&mut buf, 0).unwrap(), 16);
            }
            if strategy.name() == "range" {
                // Range-granular: another range does not wait for the punch.
                assert_eq!(file.write_at_nowait(&[7; 16], 0).unwrap(), 16);
            }
            assert!(
                !punch.is_finished(),
                "{strategy}: checked while the punch ran"
            );
            punch.join().unwrap();
        });
        faulty.clear();
        let mut buf = [0u8; 16];
        file.read_exact_at(&mut buf, 4 * PAGE + 8).unwrap();
        assert_eq!(
            buf, [0; 16],
            "{strategy}: the punch won, the nowait write wrote nothing"
        );
    }
}
