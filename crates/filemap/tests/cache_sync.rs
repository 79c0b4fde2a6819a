//! `PageCache::sync_all`: every dirty page of every file of the cache reaches
//! its backend, whoever holds the file's mapping when the call is made, and a
//! failing file neither hides the failure nor keeps the others from syncing.

use std::sync::Arc;

use filemap::backend::BackendOp;
use filemap::{Backend, FaultyBackend, MemDevice, PageCache, Volume, PAGE_SIZE};

/// The first page of `name` as its backend holds it, read past the cache.
fn in_the_volume(volume: &Arc<Volume>, name: &str) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    volume
        .open_file(name)
        .unwrap()
        .read_pages(0, &mut page)
        .unwrap();
    page
}

/// A volume, and a cache whose background writeback stays out of the test.
fn volume_and_cache() -> (Arc<Volume>, PageCache) {
    let volume = Volume::format(Arc::new(MemDevice::new(4 << 20))).unwrap();
    let cache = PageCache::builder()
        .writeback_interval(std::time::Duration::from_secs(3600))
        .build()
        .unwrap();
    (volume, cache)
}

#[test]
fn sync_all_writes_back_a_file_another_thread_still_holds() {
    let (volume, cache) = volume_and_cache();
    let file = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    file.write_all_at(&[5; PAGE_SIZE], 0).unwrap();
    // Another holder (a background writeback, a request in flight) keeps the
    // mapping alive after its user lets go: the drop writes back nothing yet.
    let held = file.clone();
    drop(file);
    assert_eq!(in_the_volume(&volume, "f"), vec![0; PAGE_SIZE]);
    cache.sync_all().unwrap();
    assert_eq!(in_the_volume(&volume, "f"), vec![5; PAGE_SIZE]);
    assert_eq!(held.cached_pages(), (1, 0), "the page stays cached, clean");
}

#[test]
fn sync_all_syncs_every_file_and_reports_a_failing_ones_error() {
    let (volume, cache) = volume_and_cache();
    let failing = Arc::new(FaultyBackend::new(
        Arc::new(volume.create_file("bad").unwrap()),
        1,
    ));
    let bad = cache.open(failing.clone()).unwrap();
    let good = cache
        .open(Arc::new(volume.create_file("good").unwrap()))
        .unwrap();
    bad.write_all_at(&[1; PAGE_SIZE], 0).unwrap();
    good.write_all_at(&[2; PAGE_SIZE], 0).unwrap();
    failing.fail_nth(BackendOp::WritePages, 1, libc::EIO);
    let error = cache.sync_all().unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    assert_eq!(in_the_volume(&volume, "good"), vec![2; PAGE_SIZE]);
    // The failed page stayed dirty: the next sync writes it.
    assert_eq!(bad.cached_pages(), (1, 1));
    cache.sync_all().unwrap();
    assert_eq!(in_the_volume(&volume, "bad"), vec![1; PAGE_SIZE]);
}

/// Caught: an unmount lost a file's tail now and then (CI, 1 run in 10 of
/// `an_unmount_right_after_a_large_write_keeps_every_byte`). A background
/// writeback's walk held the file's mapping when the file system let go of
/// it, so the walk's thread ran the last drop and its writeback; the
/// unmount's `sync_all` found no live mapping, returned, and the volume
/// committed while that drop was still writing.
#[test]
fn sync_all_waits_for_a_last_drop_writing_back_on_another_thread() {
    let (volume, cache) = volume_and_cache();
    const PAGES: usize = 8;
    let slow = Arc::new(FaultyBackend::new(
        Arc::new(volume.create_file("f").unwrap()),
        1,
    ));
    let delay = std::time::Duration::from_millis(20);
    slow.add_rule(filemap::FaultRule::new(
        BackendOp::WritePages,
        filemap::fault::Trigger::Always,
        filemap::fault::Injection::Delay {
            min: delay,
            max: delay,
        },
    ));
    let file = cache.open(slow.clone()).unwrap();
    file.write_all_at(&[7; PAGES * PAGE_SIZE], 0).unwrap();
    // The last holder drops it on a thread of its own: its writeback of the
    // 8 pages takes 160 ms there.
    let dropper = std::thread::spawn(move || drop(file));
    while slow.injected() == 0 {
        std::thread::yield_now();
    }
    cache.sync_all().unwrap();
    let mut back = vec![0; PAGES * PAGE_SIZE];
    volume
        .open_file("f")
        .unwrap()
        .read_pages(0, &mut back)
        .unwrap();
    assert!(
        back == vec![7; PAGES * PAGE_SIZE],
        "sync_all returned with {} of {PAGES} pages written back",
        back.chunks(PAGE_SIZE).filter(|page| page[0] == 7).count()
    );
    dropper.join().unwrap();
}
