//! `collapse_range` and `insert_range` on both backends, under every strategy:
//! the kernel's argument rules (a refused call changes nothing), the content
//! after the shift (cache, and backend after sync), and cached pages that move
//! with their data instead of being dropped and read again.

mod common;

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{Mapping, PageCache, Strategy};

/// Page `index` of the test files: every byte says which page it came from.
fn page(index: u64) -> Vec<u8> {
    vec![index as u8 + 1; PAGE_SIZE]
}

fn contents(file: &Mapping) -> Vec<u8> {
    let mut buf = vec![0; file.len() as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// `pages` pages numbered 0.., plus `tail` bytes of one more page, all cached
/// and clean, except page 5 which is rewritten (dirty) with byte 0xD5.
fn eight_and_a_bit(file: &Mapping, pages: u64, tail: usize) -> Vec<u8> {
    let mut model = Vec::new();
    for index in 0..pages {
        model.extend(page(index));
    }
    model.extend(&page(pages)[..tail]);
    file.write_all_at(&model, 0).unwrap();
    file.sync_all().unwrap();
    file.write_all_at(&[0xD5; PAGE_SIZE], 5 * PAGE).unwrap();
    model[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0xD5);
    assert_eq!(file.cached_pages(), (pages + 1, 1));
    model
}

/// The backend's bytes after a sync, read around the cache.
fn backend_bytes(file: &Mapping) -> Vec<u8> {
    file.sync_all().unwrap();
    let len = file.len() as usize;
    let mut buf = vec![0; len.div_ceil(PAGE_SIZE) * PAGE_SIZE];
    file.backend().read_pages(0, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

#[test]
fn collapse_moves_cached_pages_down_with_their_data() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let cache = PageCache::builder().strategy(strategy).build().unwrap();
            let file = cache.open(backend).unwrap();
            let mut model = eight_and_a_bit(&file, 8, 100);
            file.collapse_range(2 * PAGE, 2 * PAGE).unwrap();
            model.drain(2 * PAGE_SIZE..4 * PAGE_SIZE);
            let what = format!("{name} {strategy}");
            assert_eq!(file.len(), model.len() as u64, "{what}");
            // Old pages 4..=8 now sit at 2..=6, still cached: moved, not re-read.
            for index in 0..7 {
                assert!(
                    file.is_page_cached(index),
                    "{what}: page {index} was dropped"
                );
            }
            assert!(
                !file.is_page_cached(7),
                "{what}: nothing is cached past the end"
            );
            assert_eq!(
                file.cached_pages(),
                (7, 0),
                "{what}: dirty page written back first"
            );
            assert_eq!(contents(&file), model, "{what}: cache");
            assert_eq!(backend_bytes(&file), model, "{what}: backend");
        }
    }
}

#[test]
fn insert_moves_cached_pages_up_and_leaves_a_hole() {
    for strategy in Strategy::ALL {
        for (name, backend, _keep) in common::backends() {
            let cache = PageCache::builder().strategy(strategy).build().unwrap();
            let file = cache.open(backend).unwrap();
            let mut model = eight_and_a_bit(&file, 8, 100);
            file.insert_range(3 * PAGE, 2 * PAGE).unwrap();
            model.splice(3 * PAGE_SIZE..3 * PAGE_SIZE, vec![0; 2 * PAGE_SIZE]);
            let what = format!("{name} {strategy}");
            assert_eq!(file.len(), model.len() as u64, "{what}");
            for index in (0..3).chain(5..11) {
                assert!(
                    file.is_page_cached(index),
                    "{what}: page {index} was dropped"
                );
            }
            assert!(
                !file.is_page_cached(3) && !file.is_page_cached(4),
                "{what}: the hole"
            );
            assert_eq!(contents(&file), model, "{what}: cache");
            assert_eq!(backend_bytes(&file), model, "{what}: backend");
        }
    }
}

#[test]
fn refused_shifts_change_nothing() {
    for (name, backend, _keep) in common::backends() {
        let cache = PageCache::builder().build().unwrap();
        let file = cache.open(backend).unwrap();
        let model = eight_and_a_bit(&file, 8, 100);
        let size = file.len();
        let einval = [
            file.collapse_range(PAGE + 1, PAGE),        // unaligned offset
            file.collapse_range(PAGE, 100),             // unaligned length
            file.collapse_range(PAGE, 0),               // empty
            file.collapse_range(0, 8 * PAGE + 4096),    // reaches the end of file
            file.collapse_range(PAGE, u64::MAX - 4095), // overflows
            file.insert_range(PAGE + 1, PAGE),
            file.insert_range(PAGE, 100),
            file.insert_range(PAGE, 0),
            file.insert_range(size.next_multiple_of(PAGE), PAGE), // at or past the end
        ];
        for (i, result) in einval.into_iter().enumerate() {
            let error = result.expect_err(&format!("{name}: call {i} must fail"));
            assert_eq!(error.raw_os_error(), Some(libc::EINVAL), "{name}: call {i}");
        }
        let efbig = file.insert_range(0, file.max_file_size().next_multiple_of(PAGE));
        assert_eq!(
            efbig.unwrap_err().raw_os_error(),
            Some(libc::EFBIG),
            "{name}"
        );
        assert_eq!(file.len(), size, "{name}");
        assert_eq!(file.cached_pages(), (9, 1), "{name}");
        assert_eq!(contents(&file), model, "{name}");
    }
}
