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
