//! Files by identity: opens of one file share one mapping, and a closed
//! file's pages stay cached for its next open, unless the file changed
//! meanwhile (see `FileIdentity`).

use std::sync::Arc;
use std::time::Duration;

use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{
    Backend, FaultRule, FaultyBackend, FaultyDevice, HostFile, MapAccess, Mapping, MemDevice,
    PageCache, Volume,
};

fn volume() -> Arc<Volume> {
    Volume::format(Arc::new(MemDevice::new(64 << 20))).expect("format")
}

/// A cache that writes back only when told to, so the tests see what the
/// close itself does.
fn cache(budget_pages: u64) -> PageCache {
    PageCache::builder()
        .budget_bytes(budget_pages * PAGE)
        .writeback_interval(std::time::Duration::from_secs(3600))
        .readahead_threads(0)
        .build()
        .expect("cache")
}

/// Page `i` of a test file holds `tag + i` in every byte.
fn fill(file: &Mapping, pages: u64, tag: u8) {
    for i in 0..pages {
        file.write_all_at(&[tag.wrapping_add(i as u8); PAGE_SIZE], i * PAGE)
            .expect("write");
    }
}

/// The byte every byte of page `index` holds, or a note of the first that
/// differs (so a failure prints a line, not a page).
fn page(file: &Mapping, index: u64) -> Result<u8, String> {
    let mut buf = vec![0; PAGE_SIZE];
    file.read_exact_at(&mut buf, index * PAGE).expect("read");
    uniform(&buf)
}

fn uniform(buf: &[u8]) -> Result<u8, String> {
    match buf.iter().position(|&b| b != buf[0]) {
        None => Ok(buf[0]),
        Some(at) => Err(format!("byte 0 is {}, byte {at} is {}", buf[0], buf[at])),
    }
}

/// File `name`, created on `volume` with 4 pages tagged 10 through `cache`,
/// closed: its pages kept.
fn closed_file(volume: &Arc<Volume>, cache: &PageCache, name: &str) {
    let file = cache
        .open(Arc::new(volume.create_file(name).expect("create")))
        .expect("open");
    // Dirty at the close: written back by it, and kept.
    fill(&file, 4, 10);
    drop(file);
    assert_eq!(cache.stats().closed_files, 1);
}

fn expect_pages(file: &Mapping, pages: u64, tag: u8, what: &str) {
    for i in 0..pages {
        assert_eq!(
            page(file, i),
            Ok(tag.wrapping_add(i as u8)),
            "{what}: page {i}"
        );
    }
}

#[test]
fn two_opens_of_one_file_share_one_mapping() {
    let volume = volume();
    let cache = cache(1024);
    let a = cache
        .open(Arc::new(volume.create_file("a").expect("create")))
        .expect("open");
    let again = cache
        .open(Arc::new(volume.open_file("a").expect("open file")))
        .expect("open");
    assert!(Arc::ptr_eq(&a, &again), "a volume file: one mapping");
    fill(&a, 2, 1);
    expect_pages(&again, 2, 1, "the other open");

    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("host");
    let host = cache
        .open(Arc::new(HostFile::create(&path).expect("create")))
        .expect("open");
    let host_again = cache
        .open(Arc::new(HostFile::open(&path).expect("open file")))
        .expect("open");
    assert!(Arc::ptr_eq(&host, &host_again), "a host file: one mapping");

    // A backend without an identity gets a mapping of its own.
    let faulty = |file| Arc::new(FaultyBackend::new(Arc::new(file), 1)) as Arc<dyn Backend>;
    let plain = volume.open_file("a").expect("open file");
    let own = cache.open(faulty(plain)).expect("open");
    assert!(!Arc::ptr_eq(&a, &own));
}

#[test]
fn a_closed_file_keeps_its_pages_for_its_next_open() {
    let volume = volume();
    let cache = cache(1024);
    closed_file(&volume, &cache, "a");
    let stats = cache.stats();
    assert_eq!(stats.dirty_bytes, 0);
    assert_eq!(stats.cached_bytes, 4 * PAGE, "the pages stay cached");
    let raw = volume.open_file("a").expect("open file");
    let mut on_volume = vec![0; PAGE_SIZE];
    raw.read_pages(3, &mut on_volume).expect("read");
    assert_eq!(uniform(&on_volume), Ok(13), "the close wrote back");

    let file = cache.open(Arc::new(raw)).expect("reopen");
    expect_pages(&file, 4, 10, "reopened");
    let after = cache.stats();
    assert_eq!(after.reopened, 1);
    assert_eq!(after.closed_files, 0, "open again");
    assert_eq!(after.fills, stats.fills, "no page read again");
    assert_eq!(after.misses, stats.misses);
    assert_eq!(after.hits, stats.hits + 4);
}

#[test]
fn a_volume_file_changed_while_closed_is_read_afresh() {
    let volume = volume();
    let cache = cache(1024);
    closed_file(&volume, &cache, "a");

    // Changed through a handle of its own, outside the cache.
    let raw = volume.open_file("a").expect("open file");
    raw.write_pages(1, &[99; PAGE_SIZE]).expect("write");
    let file = cache.open(Arc::new(raw)).expect("reopen");
    assert_eq!(page(&file, 1), Ok(99));
    assert_eq!(page(&file, 2), Ok(12));
    assert_eq!(cache.stats().reopened, 0, "the kept pages were dropped");
    drop(file);

    // Its size, then: the kept pages past the new end must not come back.
    volume
        .open_file("a")
        .expect("open file")
        .set_len(PAGE)
        .expect("shrink");
    let raw = volume.open_file("a").expect("open file");
    raw.set_len(4 * PAGE).expect("grow");
    let file = cache.open(Arc::new(raw)).expect("reopen");
    assert_eq!(file.len(), 4 * PAGE);
    assert_eq!(page(&file, 0), Ok(10));
    assert_eq!(page(&file, 2), Ok(0), "truncated while closed");
}

#[test]
fn a_host_file_changed_while_closed_is_read_afresh() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("f");
    let cache = cache(1024);
    let file = cache
        .open(Arc::new(HostFile::create(&path).expect("create")))
        .expect("open");
    fill(&file, 2, 10);
    drop(file);
    assert_eq!(cache.stats().closed_files, 1);
    let file = cache
        .open(Arc::new(HostFile::open(&path).expect("open")))
        .expect("reopen");
    assert_eq!(cache.stats().reopened, 1, "unchanged: kept");
    expect_pages(&file, 2, 10, "kept");
    drop(file);

    // Another writer, with the file closed in the cache.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[PAGE_SIZE..].fill(77);
    std::fs::write(&path, &bytes).expect("write");
    let file = cache
        .open(Arc::new(HostFile::open(&path).expect("open")))
        .expect("reopen");
    assert_eq!(page(&file, 1), Ok(77));
    drop(file);

    // A new file in its place, of the same size: it may get the same inode.
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(&path, vec![55; 2 * PAGE_SIZE]).expect("write");
    let file = cache
        .open(Arc::new(HostFile::open(&path).expect("open")))
        .expect("reopen");
    assert_eq!(page(&file, 0), Ok(55));
    assert_eq!(
        cache.stats().reopened,
        1,
        "only the unchanged reopen kept pages"
    );
}

#[test]
fn closed_files_are_evicted_under_the_budget() {
    let volume = volume();
    let budget = 64;
    let cache = cache(budget);
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let file = cache
            .open(Arc::new(volume.create_file(name).expect("create")))
            .expect("open");
        fill(&file, 4, i as u8);
        file.sync_all().expect("sync");
    }
    let stats = cache.stats();
    assert!(stats.cached_bytes <= budget * PAGE);
    assert!(stats.evictions >= 50 * 4 - budget, "{stats:?}");
    assert!(
        stats.closed_files <= budget / 4,
        "emptied closed files go: {stats:?}"
    );
    assert!(stats.closed_files > 0);
    for (i, name) in names.iter().enumerate() {
        let file = cache
            .open(Arc::new(volume.open_file(name).expect("open file")))
            .expect("open");
        expect_pages(&file, 4, i as u8, name);
    }
    assert!(cache.stats().cached_bytes <= budget * PAGE);
}

/// An open that finds the mapping's last handle going must wait for its
/// writeback: reading the backend before it would read the old bytes. The
/// volume's device writes slowly, so the second open comes while the first
/// mapping's close is writing back.
#[test]
fn an_open_racing_the_last_close_reads_what_the_close_wrote() {
    let device = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 << 20)), 1));
    let volume = Volume::format(device.clone()).expect("format");
    device.add_rule(FaultRule::new(
        DeviceOp::Write,
        Trigger::Always,
        Injection::Delay {
            min: Duration::from_millis(4),
            max: Duration::from_millis(4),
        },
    ));
    let cache = cache(1024);
    volume.create_file("a").expect("create");
    for round in 0..40u8 {
        let tag = round + 1;
        let file = cache
            .open(Arc::new(volume.open_file("a").expect("open file")))
            .expect("open");
        file.write_all_at(&[tag; PAGE_SIZE], 0).expect("write");
        let closer = std::thread::spawn(move || drop(file));
        std::thread::sleep(Duration::from_millis(1));
        let reopened = cache
            .open(Arc::new(volume.open_file("a").expect("open file")))
            .expect("open");
        // Whether it found the mapping open or closed: the bytes written.
        assert_eq!(page(&reopened, 0), Ok(tag), "round {round}");
        closer.join().expect("closer");
        // The next round's reopen must read the volume.
        reopened.invalidate_range(0, PAGE).expect("invalidate");
    }
}

#[test]
fn a_removed_file_is_not_shared_with_later_opens() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("f");
    let cache = cache(1024);
    let old = cache
        .open(Arc::new(HostFile::create(&path).expect("create")))
        .expect("open");
    fill(&old, 1, 1);
    old.remove().expect("remove");
    std::fs::write(&path, vec![9; PAGE_SIZE]).expect("write");
    let new = cache
        .open(Arc::new(HostFile::open(&path).expect("open")))
        .expect("open");
    assert!(!Arc::ptr_eq(&old, &new));
    assert_eq!(page(&new, 0), Ok(9));
}

/// Drops `file`'s handle and waits until no other holds it: a fault thread
/// that served the file's map may hold it a moment longer, and an open
/// meanwhile shares the live mapping instead of reopening the file.
fn close(file: Arc<Mapping>) {
    let weak = Arc::downgrade(&file);
    drop(file);
    while weak.strong_count() > 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Reads page `index` of `file` through a new map of its first `pages`.
fn map_read(file: &Arc<Mapping>, pages: u64, index: u64) -> Result<u8, String> {
    let map = file
        .map(0, (pages * PAGE) as usize, MapAccess::Read)
        .expect("map");
    let mut buf = vec![0; PAGE_SIZE];
    map.read(index as usize * PAGE_SIZE, &mut buf)
        .expect("map read");
    uniform(&buf)
}

/// A reopened file's kept pages keep their place in the memory the cache's
/// maps show, and the faults of its pages that were not kept reach the new
/// mapping: a map must read the file's data there, not zeroes.
#[test]
fn maps_of_a_reopened_file_fault_its_data() {
    let volume = volume();
    let cache = cache(1024);
    let reopen = |name: &str| {
        cache
            .open(Arc::new(volume.open_file(name).expect("open file")))
            .expect("open")
    };
    for name in ["mapped", "other"] {
        let file = cache
            .open(Arc::new(volume.create_file(name).expect("create")))
            .expect("open");
        fill(&file, 8, 20);
        file.sync_all().expect("sync");
        file.invalidate_range(0, 8 * PAGE).expect("invalidate");
    }

    // A file mapped before its close: its pages enter by the fault path.
    let file = reopen("mapped");
    assert_eq!(map_read(&file, 8, 1), Ok(21));
    close(file);
    let file = reopen("mapped");
    assert_eq!(cache.stats().reopened, 1);
    assert_eq!(map_read(&file, 8, 1), Ok(21), "kept");
    assert_eq!(map_read(&file, 8, 6), Ok(26), "faulted");
    close(file);

    // A file first mapped after its reopen, in a cache mapped already.
    let file = reopen("other");
    assert_eq!(page(&file, 0), Ok(20));
    close(file);
    let file = reopen("other");
    assert_eq!(cache.stats().reopened, 2);
    assert_eq!(map_read(&file, 8, 0), Ok(20), "kept");
    assert_eq!(map_read(&file, 8, 5), Ok(25), "faulted");
}
