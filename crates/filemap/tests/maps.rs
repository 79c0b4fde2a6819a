//! Memory maps served through userfaultfd, on both backends: faults fill from
//! the cache or the backend, every invalidating call shows through every map at
//! once (C1, C2), stores through a map are the cache's data and reach the
//! backend, direct I/O whose buffer is a map of the same file neither deadlocks
//! nor fails, and handler threads go away with the last handle.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, Backend, MapAccess, MapRegion, Mapping, PageCache, Strategy};

/// Runs `body` on a thread of its own and fails if it takes more than 120 s:
/// a test of concurrent faults and drops fails instead of hanging when a fault
/// is never answered.
fn within(body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => runner.join().unwrap(),
        // The body panicked: report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(runner.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: no progress in 120 s"),
    }
}

fn page(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

fn map_bytes(map: &MapRegion, at: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    map.read(at, &mut buf).unwrap();
    buf
}

/// A file of `pages` pages, page `i` all bytes `i + 1`, written back and then
/// dropped from the cache, so the first touch of a map reads the backend.
fn file_on(backend: Arc<dyn Backend>, strategy: Strategy, pages: u64) -> Arc<Mapping> {
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache.open(backend).unwrap();
    for i in 0..pages {
        file.write_all_at(&page(i as u8 + 1), i * PAGE).unwrap();
    }
    file.sync_all().unwrap();
    file.invalidate_range(0, pages * PAGE).unwrap();
    assert_eq!(file.cached_pages(), (0, 0));
    file
}

#[test]
fn a_first_touch_fills_from_the_backend_and_caches_the_page() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let file = file_on(backend, strategy, 4);
            let map = file.map(0, 4 * PAGE_SIZE, MapAccess::Read).unwrap();
            assert_eq!(
                map_bytes(&map, 2 * PAGE_SIZE, 10),
                vec![3; 10],
                "{name} {strategy}"
            );
            assert!(
                file.is_page_cached(2),
                "{name} {strategy}: the fault cached the page"
            );
            assert_eq!(map_bytes(&map, 0, PAGE_SIZE), page(1));
        }
    }
}

#[test]
fn every_invalidating_call_shows_through_the_map_at_once() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = file_on(backend, strategy, 8);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::Read).unwrap();
            // Touch every page so each is installed in the map.
            for i in 0..8 {
                assert_eq!(
                    map_bytes(&map, i * PAGE_SIZE, 1),
                    vec![i as u8 + 1],
                    "{what}"
                );
            }
            file.punch_hole(PAGE, PAGE).unwrap();
            assert_eq!(
                map_bytes(&map, PAGE_SIZE, PAGE_SIZE),
                page(0),
                "{what}: punch"
            );
            file.zero_range(2 * PAGE + 100, 10).unwrap();
            assert_eq!(
                map_bytes(&map, 2 * PAGE_SIZE + 100, 10),
                vec![0; 10],
                "{what}: zero"
            );
            assert_eq!(
                map_bytes(&map, 2 * PAGE_SIZE, 100),
                vec![3; 100],
                "{what}: zero edge"
            );
            file.write_at(&[0xAB; 10], 3 * PAGE + 5).unwrap();
            assert_eq!(
                map_bytes(&map, 3 * PAGE_SIZE + 5, 10),
                vec![0xAB; 10],
                "{what}: write"
            );
            let mut direct = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
            direct.as_mut().fill(0xCD);
            file.write_direct(direct.as_mut(), 4 * PAGE).unwrap();
            assert_eq!(
                map_bytes(&map, 4 * PAGE_SIZE, PAGE_SIZE),
                page(0xCD),
                "{what}: direct"
            );
            file.collapse_range(5 * PAGE, PAGE).unwrap();
            assert_eq!(
                map_bytes(&map, 5 * PAGE_SIZE, 1),
                vec![7],
                "{what}: collapse"
            );
            file.insert_range(5 * PAGE, PAGE).unwrap();
            assert_eq!(
                map_bytes(&map, 5 * PAGE_SIZE, PAGE_SIZE),
                page(0),
                "{what}: insert"
            );
            assert_eq!(map_bytes(&map, 6 * PAGE_SIZE, 1), vec![7], "{what}: insert");
            file.set_len(2 * PAGE).unwrap();
            let mut past = [0u8; 1];
            let error = map.read(3 * PAGE_SIZE, &mut past).unwrap_err();
            assert_eq!(
                error.raw_os_error(),
                Some(libc::EFAULT),
                "{what}: past the end"
            );
            file.set_len(3 * PAGE).unwrap();
            assert_eq!(
                map_bytes(&map, 2 * PAGE_SIZE, PAGE_SIZE),
                page(0),
                "{what}: regrown"
            );
        }
    }
}

#[test]
fn stores_through_a_map_are_read_back_and_reach_the_backend() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = file_on(backend.clone(), strategy, 4);
            let map = file.map(0, 4 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            map.write(PAGE_SIZE + 7, b"stored").unwrap();
            let mut buf = [0u8; 6];
            file.read_exact_at(&mut buf, PAGE + 7).unwrap();
            assert_eq!(&buf, b"stored", "{what}: read_at sees the store");
            map.flush().unwrap();
            // The backend has it: a fresh cache reads it from there.
            let fresh = PageCache::builder()
                .build()
                .unwrap()
                .open(backend.clone())
                .unwrap();
            fresh.read_exact_at(&mut buf, PAGE + 7).unwrap();
            assert_eq!(&buf, b"stored", "{what}: the store reached the backend");
            drop(fresh);
            // A store after a flush is tracked again.
            map.write(2 * PAGE_SIZE, b"again").unwrap();
            file.sync_all().unwrap();
            let fresh = PageCache::builder()
                .build()
                .unwrap()
                .open(backend.clone())
                .unwrap();
            let mut again = [0u8; 5];
            fresh.read_exact_at(&mut again, 2 * PAGE).unwrap();
            assert_eq!(
                &again, b"again",
                "{what}: the second store reached the backend"
            );
            let read_only = file.map(0, PAGE_SIZE, MapAccess::Read).unwrap();
            assert_eq!(
                read_only.write(0, b"x").unwrap_err().raw_os_error(),
                Some(libc::EACCES)
            );
        }
    }
}

/// Pages 4..6 of `map` as a buffer of the caller's, for calls on the file the
/// map shows.
#[allow(clippy::mut_from_ref)] // the map's memory, not the region's fields
fn pages_4_to_6(map: &MapRegion) -> &mut [u8] {
    // SAFETY: no other thread touches pages 4..6 of the map while the tests
    // use the slice, each takes it once, and the map outlives it.
    unsafe { std::slice::from_raw_parts_mut(map.as_ptr().add(4 * PAGE_SIZE), 2 * PAGE_SIZE) }
}

#[test]
fn direct_io_through_a_map_of_the_same_file_is_correct_and_never_deadlocks() {
    within(direct_io_through_a_map_of_the_same_file);
}

fn direct_io_through_a_map_of_the_same_file() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = file_on(backend, strategy, 8);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            let buffer = pages_4_to_6(&map);
            // Read pages 0..2 into the map's pages 4..6: the buffer faults into the
            // same mapping while the read would hold Direct.
            assert_eq!(
                file.read_direct(buffer, 0).unwrap(),
                2 * PAGE_SIZE,
                "{what}"
            );
            assert_eq!(map_bytes(&map, 4 * PAGE_SIZE, PAGE_SIZE), page(1), "{what}");
            // Write the map's pages 4..6 (now copies of 0..2) over pages 6..8.
            file.write_direct(buffer, 6 * PAGE).unwrap();
            let mut buf = vec![0; PAGE_SIZE];
            file.read_exact_at(&mut buf, 7 * PAGE).unwrap();
            assert_eq!(buf, page(2), "{what}: direct write from the map");
            // And a buffered write from the map.
            file.write_all_at(&buffer[..PAGE_SIZE], 0).unwrap();
        }
    }
}

#[test]
fn vectored_io_through_a_map_of_the_same_file_is_correct_and_never_deadlocks() {
    within(vectored_io_through_a_map_of_the_same_file);
}

/// Under `file-exclusive` a vectored read holds its mode over the copy, so
/// buffers in a map of the same file are read into a bounce buffer first
/// and scattered after; a vectored write from a map copies before it locks.
fn vectored_io_through_a_map_of_the_same_file() {
    use std::io::{IoSlice, IoSliceMut};
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = file_on(backend, strategy, 8);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            let buffer = pages_4_to_6(&map);
            // Pages 0..2 into the map's pages 4..6, cut inside page 0.
            let (first, second) = buffer.split_at_mut(1000);
            let mut bufs = [IoSliceMut::new(first), IoSliceMut::new(second)];
            assert_eq!(
                file.read_vectored_at(&mut bufs, 0).unwrap(),
                2 * PAGE_SIZE,
                "{what}"
            );
            assert_eq!(map_bytes(&map, 4 * PAGE_SIZE, PAGE_SIZE), page(1), "{what}");
            assert_eq!(map_bytes(&map, 5 * PAGE_SIZE, PAGE_SIZE), page(2), "{what}");
            // The map's pages 4..6 (now copies of 0..2) over pages 6..8.
            let (first, second) = buffer.split_at(3000);
            let bufs = [IoSlice::new(first), IoSlice::new(second)];
            file.write_vectored_at(&bufs, 6 * PAGE).unwrap();
            let mut back = vec![0; 2 * PAGE_SIZE];
            file.read_exact_at(&mut back, 6 * PAGE).unwrap();
            assert_eq!(
                back,
                [page(1), page(2)].concat(),
                "{what}: vectored write from the map"
            );
        }
    }
}

#[test]
fn direct_io_from_maps_survives_concurrent_punches() {
    within(direct_io_from_maps_with_concurrent_punches);
}

fn direct_io_from_maps_with_concurrent_punches() {
    // A file-wide lock and a range lock (where the punches and the direct I/O
    // also run side by side on disjoint pages).
    for (strategy, (backend_name, backend, _keep)) in [Strategy::InvalidateLock, Strategy::Range]
        .into_iter()
        .flat_map(|strategy| common::backends().into_iter().map(move |b| (strategy, b)))
    {
        let name = format!("{backend_name} {strategy}");
        let file = file_on(backend, strategy, 16);
        let map = file.map(0, 16 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    file.punch_hole((i % 8) * PAGE, PAGE).unwrap();
                    i += 1;
                }
            });
            for round in 0..300 {
                let at = 8 + (round % 4) * 2;
                // SAFETY: only this thread touches pages 8..16 through the map.
                let buffer = unsafe {
                    std::slice::from_raw_parts_mut(map.as_ptr().add(at * PAGE_SIZE), 2 * PAGE_SIZE)
                };
                let n = file.read_direct(buffer, (round % 6) as u64 * PAGE).unwrap();
                assert_eq!(n, 2 * PAGE_SIZE, "{name}");
                file.write_direct(buffer, (at as u64) * PAGE).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
}

/// Where the store of value `k` goes in `stores_racing_*`: page `1 + k % 7` of
/// the map, in a band of 64 words of its own below byte 3584 (so a store moved
/// by a page never lands where another store goes), 64 values per page.
fn store_slot(k: usize) -> (usize, usize) {
    let page = 1 + k % 7;
    (page, ((page - 1) * 64 + (k / 7) % 64) * 8)
}

/// Stores `count` values from `first` through `map`, each once to its slot,
/// spending at least `pace` on each, so that a concurrent call lands between
/// some of them.
fn store_values(map: &MapRegion, first: u64, count: usize, pace: Duration) {
    for k in 0..count {
        let started = Instant::now();
        let (page, at) = store_slot(k);
        map.write(page * PAGE_SIZE + at, &(first + k as u64).to_ne_bytes())
            .unwrap();
        while started.elapsed() < pace {
            std::hint::spin_loop();
        }
    }
}

/// The word at byte `at` of `bytes`.
fn word(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The whole file as the backend has it, read through a fresh cache.
fn backend_bytes(backend: &Arc<dyn Backend>) -> Vec<u8> {
    let fresh = PageCache::builder().build().unwrap();
    let file = fresh.open(backend.clone()).unwrap();
    let mut bytes = vec![0; file.len() as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    bytes
}

/// Stores through a read-write map racing `invalidate_range` and buffered
/// writes to the same pages are never lost: each drop holds stores back from
/// the moment it scans for them until the page is gone, and a buffered write
/// to a mapped page keeps the stores made to the rest of it. The storer checks
/// each round of stores with `read_at` while the invalidations go on.
#[test]
fn stores_racing_invalidations_and_writes_are_never_lost() {
    within(|| {
        for (name, backend, _keep) in common::backends() {
            let file = file_on(backend.clone(), Strategy::InvalidateLock, 8);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            let (mut invalidations, mut rounds) = (0, 0);
            std::thread::scope(|scope| {
                let storer = scope.spawn(|| {
                    let started = Instant::now();
                    let mut round = 0;
                    while round < 3 || started.elapsed() < Duration::from_millis(300) {
                        let first = 1 + round * 1000;
                        store_values(&map, first, 7 * 64, Duration::ZERO);
                        for k in 0..7 * 64 {
                            let (page, at) = store_slot(k);
                            let mut got = [0; 8];
                            file.read_exact_at(&mut got, (page * PAGE_SIZE + at) as u64)
                                .unwrap();
                            let got = u64::from_ne_bytes(got);
                            assert_eq!(got, first + k as u64, "{name}: round {round}, store {k}");
                        }
                        round += 1;
                    }
                    round
                });
                let mut i = 0u64;
                while !storer.is_finished() {
                    file.invalidate_range(0, 8 * PAGE).unwrap();
                    // The last 64 bytes of each page: never stored through the map.
                    file.write_all_at(&[0xee; 8], (1 + i % 7) * PAGE + 4032)
                        .unwrap();
                    invalidations += 1;
                    i += 1;
                }
                rounds = storer.join().unwrap();
            });
            file.sync_all().unwrap();
            let backend = backend_bytes(&backend);
            for k in 0..7 * 64 {
                let (page, at) = store_slot(k);
                let expect = 1 + (rounds - 1) * 1000 + k as u64;
                let at = page * PAGE_SIZE + at;
                assert_eq!(
                    word(&backend, at),
                    expect,
                    "{name}: store {k} in the backend"
                );
            }
            println!("{name}: {invalidations} invalidations raced {rounds} rounds of stores");
        }
    });
}

/// Stores through a read-write map racing `insert_range` and `collapse_range`
/// are never lost: each lands either before the shift, and moves with its page
/// (dirty), or after it, at its address. Stores go to map pages 1..8 only, so
/// no store lands in the page a collapse removes.
#[test]
fn stores_racing_inserts_and_collapses_are_never_lost() {
    within(|| {
        for (name, backend, _keep) in common::backends() {
            let file = file_on(backend.clone(), Strategy::InvalidateLock, 16);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            for round in 0..40u64 {
                let insert = round % 2 == 0;
                let first = 1 + round * 1000;
                // About 1.3 ms of stores; the shift comes somewhere in them.
                let pace = Duration::from_micros(3);
                std::thread::scope(|scope| {
                    scope.spawn(|| store_values(&map, first, 7 * 64, pace));
                    std::thread::sleep(Duration::from_micros(100 * (round % 13)));
                    if insert {
                        file.insert_range(0, PAGE).unwrap();
                    } else {
                        file.collapse_range(0, PAGE).unwrap();
                    }
                });
                let mut cached = vec![0; file.len() as usize];
                file.read_exact_at(&mut cached, 0).unwrap();
                file.sync_all().unwrap();
                let backend = backend_bytes(&backend);
                let mut moved_count = 0;
                for k in 0..7 * 64 {
                    let (page, at) = store_slot(k);
                    let (value, here) = (first + k as u64, page * PAGE_SIZE + at);
                    // Before the shift it moved with its page; after, it is here.
                    let moved = if insert {
                        here + PAGE_SIZE
                    } else {
                        here - PAGE_SIZE
                    };
                    moved_count += usize::from(word(&cached, moved) == value);
                    for (what, bytes) in [("cache", &cached), ("backend", &backend)] {
                        let found = [here, moved]
                            .iter()
                            .filter(|&&at| word(bytes, at) == value)
                            .count();
                        assert_eq!(found, 1, "{name} round {round}: store {k} in the {what}");
                    }
                }
                if round < 2 {
                    println!("{name} round {round}: {moved_count} of 448 stores moved");
                }
            }
        }
    });
}

fn thread_alive(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task").unwrap().any(|task| {
        let comm = task.unwrap().path().join("comm");
        std::fs::read_to_string(comm).is_ok_and(|comm| comm.trim() == name)
    })
}

#[test]
fn fault_threads_start_with_the_first_map_and_go_with_the_last_handle() {
    let (_, backend, _keep) = common::backends().remove(0);
    let file = file_on(backend, Strategy::DEFAULT, 2);
    assert!(
        file.fault_thread_names().is_empty(),
        "a cache that was never mapped runs no fault thread"
    );
    let map = file.map(0, 2 * PAGE_SIZE, MapAccess::Read).unwrap();
    let threads = file.fault_thread_names();
    assert!(
        !threads.is_empty(),
        "the first map starts the fault threads"
    );
    // A thread names itself once it runs: give it a moment to appear.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !threads.iter().all(|t| thread_alive(t)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        threads.iter().all(|t| thread_alive(t)),
        "{threads:?} serve the cache's faults"
    );
    drop(file);
    assert_eq!(
        map_bytes(&map, PAGE_SIZE, 1),
        vec![2],
        "the map still works"
    );
    assert_eq!(map.mapping().len(), 2 * PAGE);
    assert!(
        threads.iter().all(|t| thread_alive(t)),
        "the map keeps the mapping, its cache and the fault threads"
    );
    drop(map);
    // The cache stops its threads as it goes. A thread may itself hold the
    // last reference for a moment (it wakes a faulting thread before letting go
    // of the mapping); then it exits on its own, so allow it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads.iter().any(|t| thread_alive(t)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        !threads.iter().any(|t| thread_alive(t)),
        "the fault threads did not exit"
    );
}

#[test]
fn bad_maps_are_refused() {
    let (_, backend, _keep) = common::backends().remove(0);
    let file = file_on(backend, Strategy::DEFAULT, 2);
    // As mmap: a misaligned offset or an empty map is EINVAL, a range past the
    // largest offset of any file EOVERFLOW.
    for (offset, len, errno) in [
        (1, PAGE_SIZE, libc::EINVAL),
        (0, 0, libc::EINVAL),
        (u64::MAX - 4095, PAGE_SIZE, libc::EOVERFLOW),
        (1 << 63, 1, libc::EOVERFLOW),
    ] {
        let error = file.map(offset, len, MapAccess::Read).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(errno), "{offset} {len}");
    }
    // A length is rounded up to whole pages; past this file's largest size
    // is allowed, as past its end.
    assert_eq!(file.map(0, 100, MapAccess::Read).unwrap().len(), PAGE_SIZE);
    let max = file.max_file_size();
    drop(file.map(max, PAGE_SIZE, MapAccess::Read).unwrap());
    // Past the end of file is allowed, as with mmap; reading there is refused.
    let map = file.map(0, 4 * PAGE_SIZE, MapAccess::Read).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        map.read(3 * PAGE_SIZE, &mut buf)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EFAULT)
    );
    assert_eq!(
        map.read(4 * PAGE_SIZE, &mut buf)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EINVAL)
    );
}

/// The first touch of a cached page through a read-write map is one round trip
/// to the handler, which maps that page and up to 15 cached pages after it:
/// a sequential pass over 64 cached pages takes 4 faults; a read-only map
/// takes none (the kernel maps cached pages itself).
#[test]
fn read_write_maps_fault_around_and_read_only_maps_do_not_fault() {
    let (_, backend, _keep) = common::backends().remove(0);
    let cache = PageCache::builder().build().unwrap();
    let file = cache.open(backend).unwrap();
    file.write_all_at(&vec![7; 64 * PAGE_SIZE], 0).unwrap();
    let touch_all = |map: &MapRegion| {
        for i in 0..64 {
            assert_eq!(map_bytes(map, i * PAGE_SIZE, 1), [7]);
        }
    };
    let before = cache.stats().faults;
    touch_all(&file.map(0, 64 * PAGE_SIZE, MapAccess::Read).unwrap());
    assert_eq!(
        cache.stats().faults,
        before,
        "read-only map of cached pages"
    );
    touch_all(&file.map(0, 64 * PAGE_SIZE, MapAccess::ReadWrite).unwrap());
    assert_eq!(cache.stats().faults - before, 4, "16 pages per round trip");
}
