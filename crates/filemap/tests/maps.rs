//! Memory maps served through userfaultfd, on both backends: faults fill from
//! the cache or the backend, every invalidating call shows through every map at
//! once (C1, C2), stores through a map are the cache's data and reach the
//! backend, direct I/O whose buffer is a map of the same file neither deadlocks
//! nor fails, and handler threads go away with the last handle.

mod common;

use std::sync::Arc;

use filemap::{AlignedBuf, Backend, MapAccess, MapRegion, Mapping, PageCache, Strategy, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

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

#[test]
fn direct_io_through_a_map_of_the_same_file_is_correct_and_never_deadlocks() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let what = format!("{name} {strategy}");
            let file = file_on(backend, strategy, 8);
            let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
            // SAFETY: no other thread touches pages 4..6 of the map during these
            // calls, and the map outlives the slice.
            let buffer = unsafe {
                std::slice::from_raw_parts_mut(map.as_ptr().add(4 * PAGE_SIZE), 2 * PAGE_SIZE)
            };
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
fn direct_io_from_maps_survives_concurrent_punches() {
    // A file-wide lock and a range lock (where the punches and the direct I/O
    // also run side by side on disjoint pages).
    for (strategy, (backend_name, backend, _keep)) in [Strategy::InvalidateLock, Strategy::Range]
        .into_iter()
        .flat_map(|strategy| common::backends().into_iter().map(move |b| (strategy, b)))
    {
        let name = format!("{backend_name} {strategy}");
        let file = file_on(backend, strategy, 16);
        let map = file.map(0, 16 * PAGE_SIZE, MapAccess::ReadWrite).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

fn thread_alive(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task").unwrap().any(|task| {
        let comm = task.unwrap().path().join("comm");
        std::fs::read_to_string(comm).is_ok_and(|comm| comm.trim() == name)
    })
}

#[test]
fn a_map_keeps_its_mapping_alive_and_the_handler_goes_with_the_last_handle() {
    let (_, backend, _keep) = common::backends().remove(0);
    let file = file_on(backend, Strategy::DEFAULT, 2);
    let thread = file.fault_thread_name();
    // A thread names itself once it runs: give it a moment to appear.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !thread_alive(&thread) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        thread_alive(&thread),
        "{thread} serves the mapping's faults"
    );
    let map = file.map(0, 2 * PAGE_SIZE, MapAccess::Read).unwrap();
    drop(file);
    assert_eq!(
        map_bytes(&map, PAGE_SIZE, 1),
        vec![2],
        "the map still works"
    );
    assert_eq!(map.mapping().len(), 2 * PAGE);
    assert!(
        thread_alive(&thread),
        "the map keeps the mapping and its handler"
    );
    drop(map);
    // The mapping stops its handler as it goes. The handler may itself hold the
    // last reference for a moment (it wakes a faulting thread before letting go
    // of the mapping); then it exits on its own, so allow it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while thread_alive(&thread) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(!thread_alive(&thread), "the handler thread did not exit");
}

#[test]
fn bad_maps_are_refused() {
    let (_, backend, _keep) = common::backends().remove(0);
    let file = file_on(backend, Strategy::DEFAULT, 2);
    for (offset, len) in [
        (1, PAGE_SIZE),
        (0, 100),
        (0, 0),
        (u64::MAX - 4095, PAGE_SIZE),
    ] {
        let error = file.map(offset, len, MapAccess::Read).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL), "{offset} {len}");
    }
    let max = file.max_file_size();
    let error = file.map(max, PAGE_SIZE, MapAccess::Read).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EOVERFLOW));
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
