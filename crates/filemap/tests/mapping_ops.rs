//! Single-threaded behaviour of every `Mapping` operation on a `Volume` over a
//! `MemDevice`, for each coherence strategy (which must not change what a lone
//! thread sees): reads and writes at unaligned offsets and across the end of
//! file, partial-page punch and zero, truncate and regrow, direct I/O mixed with
//! buffered I/O (C2, C5), invalidation and sync reaching the backend, readahead,
//! removal, a budget-limited cache, and a random operation sequence checked
//! against an in-memory reference model after every step.

use std::sync::Arc;

mod common;

use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
use filemap::page::{index_of, pages_to_cover, start_of, PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, Backend, Mapping, MemDevice, PageCache, Strategy, Volume};

const STRATEGIES: [Strategy; 3] = [Strategy::None, Strategy::InvalidateLock, Strategy::Range];
const NAME: &str = "file";

/// A volume with one empty file, opened through a fresh cache.
struct Fixture {
    volume: Arc<Volume>,
    file: Arc<Mapping>,
}

fn fixture(strategy: Strategy) -> Fixture {
    let volume = Volume::format(Arc::new(MemDevice::new(32 << 20))).unwrap();
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache
        .open(Arc::new(volume.create_file(NAME).unwrap()))
        .unwrap();
    Fixture { volume, file }
}

/// `len` bytes, none of them zero, that differ with `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed as usize * 7) % 251) as u8 + 1)
        .collect()
}

/// Panics with the first differing byte if `actual != expected`.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: got {}, expected {}",
            actual[at], expected[at]
        );
    }
}

/// The whole file as `read_at` returns it (checking that it stops at the size).
fn contents(file: &Mapping) -> Vec<u8> {
    let len = file.len() as usize;
    let mut buf = vec![0xEE; len + 100];
    let n = file.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, len, "read_at of the whole file returns its size");
    buf.truncate(n);
    buf
}

/// The file as a second cache sees it: what reached the backend.
fn backend_contents(volume: &Arc<Volume>) -> Vec<u8> {
    let cache = PageCache::builder().build().unwrap();
    let other = cache
        .open(Arc::new(volume.open_file(NAME).unwrap()))
        .unwrap();
    contents(&other)
}

/// Checks the file reads as `expected` from the cache, then (after `sync_all`)
/// through a second cache, then after `invalidate_range` forced a re-read.
fn assert_file(fx: &Fixture, expected: &[u8], what: &str) {
    let file = &fx.file;
    assert_eq!(file.len(), expected.len() as u64, "{what}: len");
    assert_same(&contents(file), expected, &format!("{what} (cached)"));
    file.sync_all().unwrap();
    assert_eq!(
        file.cached_pages().1,
        0,
        "{what}: sync_all leaves no dirty page"
    );
    assert_same(
        &backend_contents(&fx.volume),
        expected,
        &format!("{what} (backend after sync_all)"),
    );
    file.invalidate_range(0, file.len().max(1)).unwrap();
    assert_eq!(
        file.cached_pages(),
        (0, 0),
        "{what}: invalidate drops every page"
    );
    assert_same(
        &contents(file),
        expected,
        &format!("{what} (re-read after invalidate)"),
    );
}

/// Makes `data` the file's content, either only in the cache (dirty) or synced
/// and dropped from the cache, so that later operations take the backend path.
fn prepare(fx: &Fixture, data: &[u8], in_backend_only: bool) {
    fx.file.write_all_at(data, 0).unwrap();
    if in_backend_only {
        fx.file.sync_all().unwrap();
        fx.file.invalidate_range(0, data.len() as u64).unwrap();
        assert_eq!(fx.file.cached_pages(), (0, 0));
    }
}

#[test]
fn new_file_is_empty_and_reads_nothing() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        assert_eq!(fx.file.strategy(), strategy);
        assert_eq!(fx.file.len(), 0);
        assert!(fx.file.is_empty());
        let mut buf = [7u8; 10];
        assert_eq!(fx.file.read_at(&mut buf, 0).unwrap(), 0);
        assert_eq!(fx.file.read_at(&mut buf, 12345).unwrap(), 0);
        assert_eq!(buf, [7; 10], "a read of nothing leaves the buffer alone");
        assert_eq!(fx.file.cached_pages(), (0, 0));
    }
}

#[test]
fn write_at_then_read_at_round_trips_at_unaligned_offsets() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(1, 3 * PAGE_SIZE + 123);
        assert_eq!(fx.file.write_at(&data, 1000).unwrap(), data.len());
        assert_eq!(fx.file.len(), 1000 + data.len() as u64);
        let mut expected = vec![0; 1000];
        expected.extend_from_slice(&data);
        // Small reads straddling page boundaries.
        for (offset, len) in [(4090, 12), (0, 1), (1000, 1), (8191, 2), (5000, 4096)] {
            let mut buf = vec![0; len];
            assert_eq!(fx.file.read_at(&mut buf, offset).unwrap(), len);
            assert_same(
                &buf,
                &expected[offset as usize..offset as usize + len],
                &format!("{strategy:?}: read {len} at {offset}"),
            );
        }
        // An overwrite inside one page keeps its neighbours.
        fx.file.write_all_at(b"xyz", 4095).unwrap();
        expected[4095..4098].copy_from_slice(b"xyz");
        assert_file(&fx, &expected, &format!("{strategy:?}: overwrite"));
    }
}

#[test]
fn read_at_past_end_returns_zero_bytes_and_across_end_is_short() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(2, 5000);
        fx.file.write_all_at(&data, 0).unwrap();
        for cached in [true, false] {
            if !cached {
                fx.file.invalidate_range(0, 5000).unwrap();
            }
            let mut buf = vec![0xAB; 300];
            assert_eq!(fx.file.read_at(&mut buf, 5000).unwrap(), 0);
            assert_eq!(fx.file.read_at(&mut buf, 1 << 30).unwrap(), 0);
            assert!(buf.iter().all(|&b| b == 0xAB), "nothing copied past EOF");
            assert_eq!(fx.file.read_at(&mut buf, 4900).unwrap(), 100);
            assert_same(&buf[..100], &data[4900..], "short read across EOF");
            assert!(
                buf[100..].iter().all(|&b| b == 0xAB),
                "{strategy:?}: a short read leaves the rest of the buffer alone"
            );
        }
    }
}

#[test]
fn read_exact_at_fills_the_buffer_or_fails_with_unexpected_eof() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(3, 2 * PAGE_SIZE + 10);
        fx.file.write_all_at(&data, 0).unwrap();
        let mut buf = vec![0; PAGE_SIZE + 7];
        fx.file.read_exact_at(&mut buf, 3).unwrap();
        assert_same(&buf, &data[3..3 + PAGE_SIZE + 7], "read_exact_at");
        let error = fx
            .file
            .read_exact_at(&mut buf, data.len() as u64 - 5)
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut empty = [];
        fx.file.read_exact_at(&mut empty, 1 << 40).unwrap();
    }
}

#[test]
fn write_all_at_writes_every_byte_and_extends() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(4, 5 * PAGE_SIZE + 1);
        fx.file.write_all_at(&data, 7).unwrap();
        let mut expected = vec![0; 7];
        expected.extend_from_slice(&data);
        assert_file(&fx, &expected, &format!("{strategy:?}: write_all_at"));
    }
}

#[test]
fn write_far_past_end_leaves_a_hole_of_zeroes() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        fx.file.write_all_at(b"head", 0).unwrap();
        let far = 10 * PAGE + 123;
        fx.file.write_all_at(b"tail", far).unwrap();
        assert_eq!(fx.file.len(), far + 4);
        let mut expected = vec![0; far as usize + 4];
        expected[..4].copy_from_slice(b"head");
        expected[far as usize..].copy_from_slice(b"tail");
        assert_file(&fx, &expected, &format!("{strategy:?}: write past EOF"));
        // Only the written pages took blocks: the gap stayed a hole.
        let backend = fx.volume.open_file(NAME).unwrap();
        assert_eq!(backend.allocated_blocks().unwrap(), 2);
    }
}

#[test]
fn punch_hole_of_partial_pages_keeps_their_other_bytes() {
    for strategy in STRATEGIES {
        for in_backend_only in [false, true] {
            let what = format!("{strategy:?}, backend only {in_backend_only}");
            let fx = fixture(strategy);
            let data = pattern(5, 4 * PAGE_SIZE);
            prepare(&fx, &data, in_backend_only);
            let mut expected = data.clone();
            // Inside one page, then across pages with partial edges.
            for (offset, len) in [(100u64, 50u64), (PAGE + 4000, 2 * PAGE + 10)] {
                fx.file.punch_hole(offset, len).unwrap();
                expected[offset as usize..(offset + len) as usize].fill(0);
                assert_eq!(fx.file.len(), data.len() as u64, "{what}: punch keeps size");
                assert_same(&contents(&fx.file), &expected, &format!("{what}: cached"));
            }
            assert_file(&fx, &expected, &format!("{what}: punch"));
            // The whole page inside the punched range gave its block back.
            let backend = fx.volume.open_file(NAME).unwrap();
            assert_eq!(backend.allocated_blocks().unwrap(), 3, "{what}");
        }
    }
}

#[test]
fn punch_hole_past_end_of_file_does_not_extend_it() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(6, 5000);
        fx.file.write_all_at(&data, 0).unwrap();
        fx.file.punch_hole(4990, 1 << 20).unwrap();
        fx.file.punch_hole(1 << 30, 4096).unwrap();
        let mut expected = data.clone();
        expected[4990..].fill(0);
        assert_file(&fx, &expected, &format!("{strategy:?}: punch past EOF"));
    }
}

#[test]
fn zero_range_of_partial_pages_keeps_their_other_bytes() {
    for strategy in STRATEGIES {
        for in_backend_only in [false, true] {
            let what = format!("{strategy:?}, backend only {in_backend_only}");
            let fx = fixture(strategy);
            let data = pattern(7, 4 * PAGE_SIZE);
            prepare(&fx, &data, in_backend_only);
            let mut expected = data.clone();
            for (offset, len) in [(4097u64, 1u64), (3000, 2 * PAGE + 2000)] {
                fx.file.zero_range(offset, len).unwrap();
                expected[offset as usize..(offset + len) as usize].fill(0);
                assert_eq!(fx.file.len(), data.len() as u64, "{what}: zero keeps size");
                assert_same(&contents(&fx.file), &expected, &format!("{what}: cached"));
            }
            assert_file(&fx, &expected, &format!("{what}: zero_range"));
        }
    }
}

#[test]
fn zero_range_past_end_of_file_extends_it() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(8, 5000);
        fx.file.write_all_at(&data, 0).unwrap();
        fx.file.zero_range(4000, 20_000).unwrap();
        assert_eq!(fx.file.len(), 24_000);
        let mut expected = data.clone();
        expected.resize(24_000, 0);
        expected[4000..].fill(0);
        assert_file(&fx, &expected, &format!("{strategy:?}: zero past EOF"));
        // Entirely past the end of file: only the size changes.
        fx.file.zero_range(30_000, 10).unwrap();
        expected.resize(30_010, 0);
        assert_file(&fx, &expected, &format!("{strategy:?}: zero beyond EOF"));
    }
}

#[test]
fn set_len_inside_a_page_then_grow_reads_zeroes_in_the_tail() {
    for strategy in STRATEGIES {
        for in_backend_only in [false, true] {
            let what = format!("{strategy:?}, backend only {in_backend_only}");
            let fx = fixture(strategy);
            let data = pattern(9, 3 * PAGE_SIZE);
            prepare(&fx, &data, in_backend_only);
            if in_backend_only {
                // Cache the page that will be cut, clean, so the cached tail is checked.
                let mut byte = [0];
                fx.file.read_at(&mut byte, PAGE + 5).unwrap();
                assert!(fx.file.is_page_cached(1));
            }
            fx.file.set_len(PAGE + 100).unwrap();
            assert_eq!(fx.file.len(), PAGE + 100);
            assert_same(
                &contents(&fx.file),
                &data[..PAGE_SIZE + 100],
                &format!("{what}: shrunk"),
            );
            assert!(
                !fx.file.is_page_cached(2),
                "{what}: page past the end dropped"
            );
            fx.file.set_len(3 * PAGE).unwrap();
            let mut expected = data[..PAGE_SIZE + 100].to_vec();
            expected.resize(3 * PAGE_SIZE, 0);
            assert_same(&contents(&fx.file), &expected, &format!("{what}: regrown"));
            assert_file(&fx, &expected, &format!("{what}: truncate and grow"));
            // Shrink to a page boundary and to nothing.
            fx.file.set_len(PAGE).unwrap();
            assert_file(&fx, &expected[..PAGE_SIZE], &format!("{what}: to a page"));
            fx.file.set_len(0).unwrap();
            assert!(fx.file.is_empty());
            fx.file.set_len(10).unwrap();
            assert_file(&fx, &[0; 10], &format!("{what}: to zero and back"));
        }
    }
}

#[test]
fn read_direct_sees_unsynced_buffered_writes() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(10, 2 * PAGE_SIZE + 300);
        fx.file.write_all_at(&data, 0).unwrap();
        assert_eq!(fx.file.cached_pages(), (3, 3));
        let mut buf = AlignedBuf::new(4 * PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
        buf.as_mut().fill(0xEE);
        // C5: the dirty pages are written back before the direct read.
        let n = fx.file.read_direct(buf.as_mut(), 0).unwrap();
        assert_eq!(n, data.len(), "{strategy:?}: direct read stops at EOF");
        assert_same(&buf.as_ref()[..n], &data, "direct read of buffered data");
        assert!(
            buf.as_ref()[n..3 * PAGE_SIZE].iter().all(|&b| b == 0),
            "{strategy:?}: the last page's bytes past EOF read as zero"
        );
        assert_eq!(
            fx.file.cached_pages().1,
            0,
            "written back, so no longer dirty"
        );
        // Past the end of file: nothing.
        assert_eq!(fx.file.read_direct(buf.as_mut(), 4 * PAGE).unwrap(), 0);
        // A later buffered write to one page is seen too.
        fx.file.write_all_at(b"late", PAGE + 10).unwrap();
        let mut one = AlignedBuf::new(PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
        assert_eq!(fx.file.read_direct(one.as_mut(), PAGE).unwrap(), PAGE_SIZE);
        assert_eq!(&one.as_ref()[10..14], b"late");
        assert_same(
            &one.as_ref()[14..],
            &data[PAGE_SIZE + 14..2 * PAGE_SIZE],
            "rest",
        );
    }
}

#[test]
fn write_direct_replaces_cached_pages_for_later_buffered_reads() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let old = pattern(11, 4 * PAGE_SIZE);
        fx.file.write_all_at(&old, 0).unwrap();
        fx.file.sync_all().unwrap();
        let mut buf = vec![0; 4 * PAGE_SIZE];
        fx.file.read_exact_at(&mut buf, 0).unwrap();
        assert!(fx.file.is_page_cached(1) && fx.file.is_page_cached(2));
        // Page 3 dirty with newer buffered data, outside the direct write.
        fx.file.write_all_at(b"dirty", 3 * PAGE + 1).unwrap();
        let new = pattern(12, 2 * PAGE_SIZE);
        let n = fx
            .file
            .write_direct(
                AlignedBuf::from_slice(&new, DIRECT_IO_MEMORY_ALIGN).as_ref(),
                PAGE,
            )
            .unwrap();
        assert_eq!(n, new.len());
        // C2: the pages cached before the write show the new data.
        let mut expected = old.clone();
        expected[PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&new);
        expected[3 * PAGE_SIZE + 1..3 * PAGE_SIZE + 6].copy_from_slice(b"dirty");
        assert_same(
            &contents(&fx.file),
            &expected,
            &format!("{strategy:?}: after"),
        );
        assert_file(&fx, &expected, &format!("{strategy:?}: write_direct"));
    }
}

#[test]
fn write_direct_over_a_dirty_page_wins_and_extends_the_file() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        fx.file.write_all_at(&pattern(13, 100), 50).unwrap();
        assert_eq!(fx.file.cached_pages(), (1, 1));
        let new = pattern(14, 3 * PAGE_SIZE);
        fx.file
            .write_direct(
                AlignedBuf::from_slice(&new, DIRECT_IO_MEMORY_ALIGN).as_ref(),
                0,
            )
            .unwrap();
        assert_eq!(fx.file.len(), 3 * PAGE, "{strategy:?}: extended");
        assert_file(&fx, &new, &format!("{strategy:?}: direct over dirty"));
    }
}

#[test]
fn invalidate_range_writes_dirty_pages_back_before_dropping_them() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(15, 3 * PAGE_SIZE);
        fx.file.write_all_at(&data, 0).unwrap();
        assert_eq!(fx.file.cached_pages(), (3, 3));
        // Touches pages 1 and 2 only.
        fx.file.invalidate_range(PAGE + 10, 2).unwrap();
        fx.file.invalidate_range(2 * PAGE + 4095, 1).unwrap();
        assert!(fx.file.is_page_cached(0));
        assert!(!fx.file.is_page_cached(1) && !fx.file.is_page_cached(2));
        assert_eq!(fx.file.cached_pages(), (1, 1));
        let mut page = vec![0; 2 * PAGE_SIZE];
        fx.file.backend().read_pages(1, &mut page).unwrap();
        assert_same(&page, &data[PAGE_SIZE..], "backend after invalidate");
        assert_same(
            &contents(&fx.file),
            &data,
            &format!("{strategy:?}: re-read"),
        );
        fx.file.invalidate_range(0, 0).unwrap();
        assert!(fx.file.is_page_cached(0), "an empty range drops nothing");
    }
}

#[test]
fn sync_all_and_sync_range_make_data_reach_the_backend() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(16, 3 * PAGE_SIZE + 5);
        fx.file.write_all_at(&data, 0).unwrap();
        let mut page = vec![0; PAGE_SIZE];
        fx.file.backend().read_pages(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "nothing written back yet");
        // sync_range writes back only the pages it touches.
        fx.file.sync_range(2 * PAGE + 1, 1).unwrap();
        assert_eq!(fx.file.cached_pages(), (4, 3));
        fx.file.backend().read_pages(2, &mut page).unwrap();
        assert_same(&page, &data[2 * PAGE_SIZE..3 * PAGE_SIZE], "synced page");
        fx.file.backend().read_pages(1, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "page 1 not written back yet");
        fx.file.sync_all().unwrap();
        assert_eq!(fx.file.cached_pages(), (4, 0));
        assert_same(
            &backend_contents(&fx.volume),
            &data,
            &format!("{strategy:?}"),
        );
    }
}

#[test]
fn readahead_caches_pages_without_changing_their_content() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        let data = pattern(17, 10 * PAGE_SIZE - 1);
        prepare(&fx, &data, true);
        fx.file.readahead(PAGE + 5, 2 * PAGE).unwrap();
        let cached: Vec<u64> = (0..12).filter(|&i| fx.file.is_page_cached(i)).collect();
        assert_eq!(cached, [1, 2, 3], "{strategy:?}: the pages touched");
        assert_eq!(fx.file.cached_pages(), (3, 0));
        // Clipped to the end of file.
        fx.file.readahead(8 * PAGE, 100 * PAGE).unwrap();
        fx.file.readahead(1 << 30, PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (5, 0));
        assert!(fx.file.is_page_cached(9) && !fx.file.is_page_cached(10));
        // Readahead over cached, dirty pages keeps them.
        fx.file.write_all_at(b"new", 2 * PAGE).unwrap();
        fx.file.readahead(0, 10 * PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (10, 1));
        let mut expected = data.clone();
        expected[2 * PAGE_SIZE..2 * PAGE_SIZE + 3].copy_from_slice(b"new");
        assert_file(&fx, &expected, &format!("{strategy:?}: readahead"));
    }
}

#[test]
fn cached_pages_counts_cached_and_dirty_pages() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy);
        assert_eq!(fx.file.cached_pages(), (0, 0));
        fx.file.write_all_at(&[1; 10], PAGE - 5).unwrap();
        assert_eq!(fx.file.cached_pages(), (2, 2));
        fx.file.sync_all().unwrap();
        assert_eq!(fx.file.cached_pages(), (2, 0));
        fx.file.set_len(5 * PAGE).unwrap();
        let mut buf = [0; 1];
        fx.file.read_at(&mut buf, 4 * PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (3, 0));
        fx.file.punch_hole(0, 2 * PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (1, 0));
    }
}

#[test]
fn remove_makes_every_call_fail_with_enoent_and_frees_the_blocks() {
    for strategy in STRATEGIES {
        let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
        let free_before = volume.free_blocks();
        let cache = PageCache::builder().strategy(strategy).build().unwrap();
        let file = cache
            .open(Arc::new(volume.create_file(NAME).unwrap()))
            .unwrap();
        file.write_all_at(&pattern(18, 5 * PAGE_SIZE), 0).unwrap();
        file.sync_all().unwrap();
        file.write_all_at(&[9; 100], 7 * PAGE).unwrap(); // dirty, not yet written back
        assert_eq!(volume.free_blocks(), free_before - 5);
        file.remove().unwrap();
        // Synced blocks are reused only after the next commit (crash safety).
        assert_eq!(
            volume.free_blocks() + volume.pending_blocks(),
            free_before,
            "{strategy:?}: blocks freed"
        );
        volume.sync().unwrap();
        assert_eq!(volume.free_blocks(), free_before);
        assert_eq!(file.cached_pages(), (0, 0), "cached pages dropped");
        assert_eq!(cache.cached_bytes(), 0, "their frames given back");
        assert!(volume.open_file(NAME).is_err(), "the name is gone");

        let enoent = |result: std::io::Result<()>, call: &str| {
            let error = result.expect_err(call);
            assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{call}: {error}");
        };
        let mut buf = vec![0; 100];
        let mut direct = AlignedBuf::new(PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
        enoent(file.read_at(&mut buf, 0).map(drop), "read_at");
        enoent(file.read_exact_at(&mut buf, 0), "read_exact_at");
        enoent(file.write_at(&buf, 0).map(drop), "write_at");
        enoent(file.write_all_at(&buf, 0), "write_all_at");
        enoent(file.readahead(0, PAGE), "readahead");
        enoent(
            file.read_direct(direct.as_mut(), 0).map(drop),
            "read_direct",
        );
        enoent(
            file.write_direct(direct.as_ref(), 0).map(drop),
            "write_direct",
        );
        enoent(file.punch_hole(0, PAGE), "punch_hole");
        enoent(file.zero_range(0, PAGE), "zero_range");
        enoent(file.set_len(0), "set_len");
        enoent(file.invalidate_range(0, PAGE), "invalidate_range");
        enoent(file.sync_all(), "sync_all");
        enoent(file.sync_range(0, PAGE), "sync_range");
        enoent(file.remove(), "a second remove");
        assert_eq!(
            volume.free_blocks(),
            free_before,
            "failed calls allocate nothing"
        );
        assert_eq!(cache.cached_bytes(), 0, "failed calls cache nothing");
    }
}

/// A file of `pages` pages written through the backend, opened through a cache
/// whose budget holds only two pages.
fn small_cache_fixture(strategy: Strategy, data: &[u8]) -> (PageCache, Arc<Mapping>) {
    let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
    let backend = volume.create_file(NAME).unwrap();
    backend.set_len(data.len() as u64).unwrap();
    backend.write_pages(0, data).unwrap();
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(8192)
        .build()
        .unwrap();
    assert_eq!(cache.budget_bytes(), 8192);
    let file = cache.open(Arc::new(backend)).unwrap();
    (cache, file)
}

#[test]
fn budget_limited_cache_serves_reads_of_a_larger_file_uncached() {
    for strategy in STRATEGIES {
        let data = pattern(19, 10 * PAGE_SIZE);
        let (cache, file) = small_cache_fixture(strategy, &data);
        assert_same(
            &contents(&file),
            &data,
            &format!("{strategy:?}: first read"),
        );
        assert_eq!(
            cache.cached_bytes(),
            8192,
            "the budget is full, not exceeded"
        );
        assert_eq!(file.cached_pages(), (2, 0));
        // Unaligned reads of uncached pages, and a second full read.
        let mut buf = vec![0; 5000];
        file.read_exact_at(&mut buf, 6 * PAGE - 17).unwrap();
        assert_same(&buf, &data[6 * PAGE_SIZE - 17..][..5000], "uncached read");
        assert_same(
            &contents(&file),
            &data,
            &format!("{strategy:?}: second read"),
        );
        // Readahead stops quietly when the budget is used up.
        file.readahead(0, 10 * PAGE).unwrap();
        assert!(cache.cached_bytes() <= cache.budget_bytes());
        // Writes to cached pages still work.
        file.write_all_at(b"fits", 10).unwrap();
        let mut expected = data.clone();
        expected[10..14].copy_from_slice(b"fits");
        assert_same(&contents(&file), &expected, "write to a cached page");
    }
}

#[test]
fn budget_limited_cache_evicts_for_new_pages_and_writes_dirty_ones_back_first() {
    for strategy in STRATEGIES {
        let data = pattern(20, 10 * PAGE_SIZE);
        let (cache, file) = small_cache_fixture(strategy, &data);
        let mut buf = vec![0; 2 * PAGE_SIZE];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(cache.cached_bytes(), cache.budget_bytes());
        // A new page evicts a clean one.
        file.write_all_at(&[0xFF; PAGE_SIZE], 5 * PAGE).unwrap();
        let mut expected = data.clone();
        expected[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0xFF);
        assert!(cache.stats().evictions >= 1, "{strategy:?}");
        // Reading the whole file evicts the dirty page too: it is written back
        // first, so the backend has it without any sync.
        assert_same(&contents(&file), &expected, &format!("{strategy:?}: read"));
        assert!(!file.is_page_cached(5), "{strategy:?}: page 5 was evicted");
        let mut backend = vec![0; PAGE_SIZE];
        file.backend().read_pages(5, &mut backend).unwrap();
        assert!(
            backend == vec![0xFF; PAGE_SIZE],
            "{strategy:?}: written back"
        );
        let stats = cache.stats();
        assert!(stats.writebacks >= 1 && stats.evictions >= 2, "{stats:?}");
        assert!(stats.peak_cached_bytes <= stats.budget_bytes, "{stats:?}");
    }
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MODEL_SPAN: u64 = 64 * 1024;

/// Runs `steps` random operations on a file and on a `Vec<u8>` model, checking
/// the size and a random window after every step and the whole file often.
fn run_model(strategy: Strategy, seed: u64, steps: usize) {
    let fx = fixture(strategy);
    let file = &fx.file;
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(seed | 1);
    let mut log: Vec<String> = Vec::new();
    for step in 0..steps {
        let offset = rng.below(MODEL_SPAN);
        let len = match rng.below(4) {
            0 => rng.below(16) + 1,
            1 => rng.below(PAGE) + 1,
            _ => rng.below(3 * PAGE) + 1,
        };
        let end = (offset + len) as usize;
        let op = rng.below(100);
        let description = match op {
            0..=29 => {
                let data = pattern(step as u8, len as usize);
                file.write_all_at(&data, offset).unwrap();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
                format!("write {offset}+{len}")
            }
            30..=39 => {
                file.punch_hole(offset, len).unwrap();
                let stop = end.min(model.len());
                if (offset as usize) < stop {
                    model[offset as usize..stop].fill(0);
                }
                format!("punch {offset}+{len}")
            }
            40..=49 => {
                file.zero_range(offset, len).unwrap();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].fill(0);
                format!("zero {offset}+{len}")
            }
            50..=56 => {
                let new_len = rng.below(MODEL_SPAN);
                file.set_len(new_len).unwrap();
                model.resize(new_len as usize, 0);
                format!("set_len {new_len}")
            }
            57..=69 => {
                file.invalidate_range(offset, len).unwrap();
                format!("invalidate {offset}+{len}")
            }
            70..=72 => {
                file.sync_all().unwrap();
                "sync_all".to_string()
            }
            73..=77 => {
                let first = index_of(offset);
                let pages = pages_to_cover(len) as usize;
                let data = pattern(step as u8 ^ 0x55, pages * PAGE_SIZE);
                file.write_direct(
                    AlignedBuf::from_slice(&data, DIRECT_IO_MEMORY_ALIGN).as_ref(),
                    start_of(first),
                )
                .unwrap();
                let start = (start_of(first)) as usize;
                if model.len() < start + data.len() {
                    model.resize(start + data.len(), 0);
                }
                model[start..start + data.len()].copy_from_slice(&data);
                format!("write_direct page {first} x{pages}")
            }
            78..=82 => {
                let first = index_of(offset);
                let pages = pages_to_cover(len) as usize;
                let mut buf = AlignedBuf::new(pages * PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
                let n = file.read_direct(buf.as_mut(), start_of(first)).unwrap();
                let start = ((start_of(first)) as usize).min(model.len());
                let want = (model.len() - start).min(pages * PAGE_SIZE);
                log.push(format!("read_direct page {first} x{pages}"));
                assert_eq!(n, want, "{strategy:?} seed {seed}: {log:?}");
                assert_same(
                    &buf.as_ref()[..n],
                    &model[start..start + n],
                    &format!("{strategy:?} seed {seed} step {step}: {:?}", &log),
                );
                continue;
            }
            83..=87 => {
                file.readahead(offset, len).unwrap();
                format!("readahead {offset}+{len}")
            }
            _ => {
                let mut buf = vec![0; len as usize];
                let n = file.read_at(&mut buf, offset).unwrap();
                let start = (offset as usize).min(model.len());
                let want = end.min(model.len()) - start;
                log.push(format!("read {offset}+{len}"));
                assert_eq!(n, want, "{strategy:?} seed {seed}: {log:?}");
                assert_same(
                    &buf[..n],
                    &model[start..start + n],
                    &format!("{strategy:?} seed {seed} step {step}: {:?}", &log),
                );
                continue;
            }
        };
        log.push(description);
        if log.len() > 30 {
            log.remove(0);
        }
        let context = format!("{strategy:?} seed {seed} step {step}, last ops {log:?}");
        assert_eq!(file.len(), model.len() as u64, "{context}");
        // A random window every step, the whole file every eighth step.
        let (start, stop) = if step % 8 == 0 {
            (0, model.len())
        } else {
            let start = rng.below(model.len() as u64 + 1) as usize;
            (
                start,
                (start + rng.below(2 * PAGE) as usize).min(model.len()),
            )
        };
        let mut buf = vec![0; stop - start];
        file.read_exact_at(&mut buf, start as u64).unwrap();
        assert_same(&buf, &model[start..stop], &context);
    }
    file.sync_all().unwrap();
    assert_same(&backend_contents(&fx.volume), &model, "backend at the end");
    fx.volume.check_invariants();
}

#[test]
fn random_operations_match_a_reference_model() {
    for strategy in STRATEGIES {
        for seed in [1, 0x9E37_79B9, 42, 2024] {
            run_model(strategy, seed, 2500);
        }
    }
}

#[test]
fn seek_data_and_seek_hole_count_dirty_pages_not_yet_written_back() {
    for (name, backend, _dir) in common::backends() {
        let cache = PageCache::builder().build().unwrap();
        let file = cache.open(backend).unwrap();
        file.set_len(64 * PAGE).unwrap();
        // Dirty in the cache only: pages 10 and 11, and 40.
        file.write_all_at(&[1; 5000], 10 * PAGE + 100).unwrap();
        file.write_all_at(&[2], 40 * PAGE).unwrap();
        let at = |page: u64| Some(page * PAGE);
        assert_eq!(file.seek_data(0).unwrap(), at(10), "{name}");
        assert_eq!(
            file.seek_data(10 * PAGE + 7).unwrap(),
            Some(10 * PAGE + 7),
            "{name}"
        );
        assert_eq!(file.seek_hole(10 * PAGE).unwrap(), at(12), "{name}");
        assert_eq!(file.seek_data(12 * PAGE).unwrap(), at(40), "{name}");
        assert_eq!(file.seek_hole(40 * PAGE).unwrap(), at(41), "{name}");
        // No data after page 40, and the end of file is a hole.
        assert_eq!(file.seek_data(41 * PAGE).unwrap(), None, "{name}");
        assert_eq!(
            file.seek_hole(63 * PAGE).unwrap(),
            Some(63 * PAGE),
            "{name}"
        );
        assert_eq!(file.seek_hole(64 * PAGE).unwrap(), None, "{name}");
        assert_eq!(file.seek_data(64 * PAGE).unwrap(), None, "{name}");
        // A punched page is a hole again.
        file.punch_hole(40 * PAGE, PAGE).unwrap();
        assert_eq!(file.seek_data(12 * PAGE).unwrap(), None, "{name}");
    }
}
