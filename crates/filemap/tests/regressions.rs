//! Regression tests, each named after what it caught: a broken promise of the
//! contract (DESIGN.md, C3 and C6 to C8) that a differential run against the
//! kernel, or bad input, found.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{
    Backend, FaultRule, FaultyDevice, MapAccess, MemDevice, PageCache, Strategy, Volume,
};

/// Runs `body` on a thread of its own and fails if it has not returned within
/// `seconds`: a hang is a failure of the test, never a test that never ends.
fn within<T: Send + 'static>(
    seconds: u64,
    what: &str,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = done.send(body());
    });
    match result.recv_timeout(Duration::from_secs(seconds)) {
        Ok(value) => value,
        // The body panicked: pass its panic on.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body returned without an answer"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {seconds} s (a hang)")
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

/// A budget of 16 pages with a fill batch of 16: a store through a map faults
/// in a batch of 16 pages, which the fault thread keeps locked for a moment
/// after the toucher goes on; a buffered write then found every page busy and
/// failed with `OutOfMemory` instead of waiting (ext4: the whole write). The
/// race is lost about every other time, so the sequence runs 100 times.
#[test]
fn small_budget_buffered_write_after_fault_batch_writes_everything() {
    within(120, "small budget write", || {
        for round in 0..100 {
            let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
            let cache = PageCache::builder()
                .budget_bytes(65536)
                .fill_batch_pages(16)
                .readahead_threads(0)
                .strategy(Strategy::Range)
                .build()
                .unwrap();
            let file = cache
                .open(Arc::new(volume.create_file("f").unwrap()))
                .unwrap();
            let map = file
                .map(258048, 21 * PAGE_SIZE, MapAccess::ReadWrite)
                .unwrap();
            file.set_len(552742).unwrap();
            map.write(16826, &pattern(4211, 1)).unwrap();
            file.zero_range(155645, 378).unwrap();
            let first = file.write_at(&pattern(4107, 2), 487423);
            assert_eq!(first.unwrap(), 4107, "round {round}");
            let mut buf = vec![0; 9553];
            assert_eq!(file.read_at(&mut buf, 163840).unwrap(), 9553);
            let data = pattern(11156, 3);
            assert_eq!(
                file.write_at(&data, 335871).unwrap(),
                11156,
                "round {round}"
            );
            let mut back = vec![0; data.len()];
            file.read_exact_at(&mut back, 335871).unwrap();
            assert!(back == data, "round {round}: the write did not read back");
        }
    });
}

/// A read of a file twice the budget leaves its first pages evicted, each
/// slot still holding its eviction queue entry. A write of one byte there
/// then made room, and the eviction hand, unqueueing the page's absent slot,
/// changed the very state the write was about to claim: the claim failed and
/// the write reported `ENOMEM` with nothing dirty (ext4: 1 byte written).
#[test]
fn a_write_whose_slot_the_eviction_hand_unqueued_claims_it_instead_of_failing() {
    let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
    let cache = PageCache::builder()
        .budget_bytes(16 * PAGE)
        .build()
        .unwrap();
    let file = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    file.set_len(32 * PAGE).unwrap();
    let mut whole = vec![0; 32 * PAGE_SIZE];
    assert_eq!(file.read_at(&mut whole, 0).unwrap(), whole.len());
    assert_eq!(file.write_at(&[1], 0).unwrap(), 1);
    assert_eq!(
        file.write_all_at(&[2; 10], 4 * PAGE + 7).map(drop).unwrap(),
        ()
    );
}

/// Every budget from one page up, every fill batch up to 32, with and without
/// readahead threads: a buffered write of many pages over a file larger than
/// the budget is never short and never fails while clean or dirty pages can go.
/// With every racy copy the processor runs: a vector loop whose 32-byte store
/// crossed a page boundary of a map hung here with a one-page budget (each
/// fault evicted the other page the store needed).
#[test]
fn tiny_budgets_never_make_buffered_writes_short_or_fail() {
    for copy in filemap::racy::RacyCopy::available() {
        filemap::racy::force(copy).unwrap();
        tiny_budgets_with_the_chosen_copy(copy.name());
    }
}

fn tiny_budgets_with_the_chosen_copy(copy: &'static str) {
    within(120, &format!("tiny budgets, copy {copy}"), || {
        for budget_pages in [1u64, 2, 3, 4, 8, 16] {
            for batch in [1usize, 2, 16, 32] {
                for threads in [0usize, 2] {
                    let what =
                        format!("budget {budget_pages} pages, batch {batch}, threads {threads}");
                    let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
                    let cache = PageCache::builder()
                        .budget_bytes(budget_pages * PAGE)
                        .fill_batch_pages(batch)
                        .readahead_threads(threads)
                        .build()
                        .unwrap();
                    let file = cache
                        .open(Arc::new(volume.create_file("f").unwrap()))
                        .unwrap();
                    let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
                    file.set_len(40 * PAGE + 7).unwrap();
                    map.write(100, &pattern(3 * PAGE_SIZE, 4)).unwrap();
                    let mut buf = vec![0; 9 * PAGE_SIZE + 5];
                    file.read_exact_at(&mut buf, 3 * PAGE + 11).unwrap();
                    for (at, len, seed) in [
                        (5 * PAGE + 3, 11156, 5u8),
                        (20 * PAGE - 1, 3698, 6),
                        (1, 24579, 7),
                    ] {
                        let data = pattern(len, seed);
                        assert_eq!(
                            file.write_at(&data, at).unwrap(),
                            len,
                            "{what}: write at {at}"
                        );
                        let mut back = vec![0; len];
                        file.read_exact_at(&mut back, at).unwrap();
                        assert!(back == data, "{what}: the write at {at} did not read back");
                    }
                    drop(map);
                    file.sync_all().unwrap();
                }
            }
        }
    });
}

/// A map of a file that was removed: touching it hung for ever, the fault
/// thread waking the toucher without installing a page. On Linux a map of an
/// unlinked file stays readable and writable until it is unmapped, and so it
/// does here: stores made before and after the removal read back, untouched
/// pages read as the file was.
#[test]
fn touching_a_map_of_a_removed_file_does_not_hang() {
    for (name, backend, _dir) in common::backends() {
        let (before, untouched, after) = within(30, name, move || {
            let cache = PageCache::builder().build().unwrap();
            let file = cache.open(backend).unwrap();
            file.set_len(8 * PAGE).unwrap();
            file.write_all_at(&[0x33; 8], 6 * PAGE).unwrap();
            file.sync_all().unwrap();
            file.invalidate_range(0, 8 * PAGE).unwrap();
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            map.write(0, &[0x5A; 64]).unwrap();
            file.remove().unwrap();
            let mut before = [0; 64];
            map.read(0, &mut before).unwrap();
            let mut untouched = [0; 8];
            map.read(6 * PAGE_SIZE, &mut untouched).unwrap();
            map.write(3 * PAGE_SIZE, &[7; 8]).unwrap();
            let mut after = [0; 8];
            map.read(3 * PAGE_SIZE, &mut after).unwrap();
            assert_eq!(
                file.read_at(&mut [0; 8], 0).unwrap_err().raw_os_error(),
                Some(libc::ENOENT),
                "{name}: a call on the removed file"
            );
            // The storage stays while the map does, and goes with it.
            assert_eq!(file.backend().len().unwrap(), 8 * PAGE, "{name}");
            drop(map);
            let gone = file.backend().len().unwrap_err();
            assert_eq!(
                gone.raw_os_error(),
                Some(libc::ENOENT),
                "{name}: storage kept"
            );
            (before, untouched, after)
        });
        assert_eq!(before, [0x5A; 64], "{name}: the map lost a store");
        assert_eq!(
            untouched, [0x33; 8],
            "{name}: a page faulted after the removal"
        );
        assert_eq!(after, [7; 8], "{name}: a store after the removal");
    }
}

/// The child's half of the test below: touches a map whose backend cannot be
/// read, which must kill it. Only the parent runs it.
#[test]
#[ignore = "a child process of a_map_whose_page_cannot_be_read_raises_sigbus_instead_of_hanging"]
fn map_read_error_child() {
    assert!(
        std::env::var_os(SIGBUS_CHILD).is_some(),
        "run by its parent test only"
    );
    let device = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(8 << 20)), 1));
    let volume = Volume::format(device.clone()).unwrap();
    let backend = volume.create_file("f").unwrap();
    backend.set_len(4 * PAGE).unwrap();
    backend.write_pages(0, &[9; 4 * PAGE_SIZE]).unwrap();
    let cache = PageCache::builder().build().unwrap();
    let file = cache.open(Arc::new(backend)).unwrap();
    let map = file.map(0, 4 * PAGE_SIZE, MapAccess::Read).unwrap();
    device.add_rule(FaultRule::new(
        DeviceOp::Read,
        Trigger::Always,
        Injection::Error(libc::EIO),
    ));
    // SAFETY: the first byte of a live map of a page inside the file; a load
    // races nothing that makes it unsound (see `MapRegion::as_ptr`).
    let byte = unsafe { std::ptr::read_volatile(map.as_ptr()) };
    println!("read {byte} through a map whose page cannot be read");
}

const SIGBUS_CHILD: &str = "FILEMAP_TEST_SIGBUS_CHILD";

/// A fault whose page the backend could not read woke the toucher without a
/// page, and the toucher faulted again for ever. The kernel's answer for a
/// file map is SIGBUS; the test runs the touch in a child process and
/// expects it to die of SIGBUS.
#[test]
fn a_map_whose_page_cannot_be_read_raises_sigbus_instead_of_hanging() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "map_read_error_child",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .env(SIGBUS_CHILD, "1")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the touch of an unreadable page hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}
