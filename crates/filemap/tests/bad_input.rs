//! Bad arguments get a clear error and change nothing (contract C8), with the
//! errno ext4 gives for the same call: ranges past 2^63 - 1 (`EINVAL`), empty
//! `fallocate` ranges (`EINVAL`), sizes past `max_file_size` (`EFBIG`, or a
//! write cut short there), misaligned direct I/O (`EINVAL`, filemap's own
//! stricter rule), calls on a removed file (`ENOENT`) and cache settings out of
//! range (`EINVAL` naming the setting). After each rejected call the file's
//! content, size and cached/dirty page counts are checked to be as before.

use std::io;
use std::sync::Arc;

use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{Mapping, MemDevice, PageCache, Strategy, Volume};

const STRATEGIES: [Strategy; 3] = [Strategy::None, Strategy::InvalidateLock, Strategy::Range];

/// A file of three and a half pages: pages 0-1 synced and cached clean, pages
/// 2-3 cached dirty.
fn fixture(strategy: Strategy) -> (Arc<Volume>, Arc<Mapping>, Vec<u8>) {
    let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
    let cache = PageCache::builder().strategy(strategy).build().unwrap();
    let file = cache
        .open(Arc::new(volume.create_file("file").unwrap()))
        .unwrap();
    let data: Vec<u8> = (0..3 * PAGE_SIZE + 2000)
        .map(|i| (i % 253) as u8 + 1)
        .collect();
    file.write_all_at(&data, 0).unwrap();
    file.sync_range(0, 2 * PAGE).unwrap();
    assert_eq!(file.cached_pages(), (4, 2));
    (volume, file, data)
}

/// Asserts the file still reads as `data`, with the same size and pages.
fn assert_unchanged(file: &Mapping, data: &[u8], call: &str) {
    assert_eq!(file.len(), data.len() as u64, "{call}: size changed");
    assert_eq!(file.cached_pages(), (4, 2), "{call}: cached pages changed");
    let mut buf = vec![0; data.len()];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data, "{call}: content changed");
    // The dirty pages were not written back either.
    let mut backend = vec![0; PAGE_SIZE];
    file.backend().read_pages(2, &mut backend).unwrap();
    assert!(
        backend.iter().all(|&b| b == 0),
        "{call}: dirty data reached the backend"
    );
}

fn assert_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, call: &str) {
    let error = result.expect_err(call);
    assert_eq!(error.raw_os_error(), Some(errno), "{call}: got {error}");
}

/// A buffer whose slice starts `misalign` bytes past a multiple of
/// `DIRECT_IO_MEMORY_ALIGN`.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, misalign: usize, fill: u8) -> Self {
        let storage = vec![fill; len + 2 * DIRECT_IO_MEMORY_ALIGN];
        let address = storage.as_ptr() as usize;
        let start = (DIRECT_IO_MEMORY_ALIGN - address % DIRECT_IO_MEMORY_ALIGN)
            % DIRECT_IO_MEMORY_ALIGN
            + misalign;
        let buf = Aligned {
            storage,
            start,
            len,
        };
        assert_eq!(
            buf.as_ref().as_ptr() as usize % DIRECT_IO_MEMORY_ALIGN,
            misalign
        );
        buf
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[test]
fn ranges_overflowing_u64_fail_with_einval_and_change_nothing() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let near_end = u64::MAX - 8;
        let mut buf = vec![0xAB; 16];
        assert_errno(file.read_at(&mut buf, near_end), libc::EINVAL, "read_at");
        assert!(buf.iter().all(|&b| b == 0xAB), "read_at filled the buffer");
        assert_errno(
            file.read_exact_at(&mut buf, near_end),
            libc::EINVAL,
            "read_exact_at",
        );
        assert_errno(file.write_at(&buf, near_end), libc::EINVAL, "write_at");
        assert_errno(
            file.write_all_at(&buf, near_end),
            libc::EINVAL,
            "write_all_at",
        );
        for (offset, len) in [(near_end, 16), (1, u64::MAX), (u64::MAX, 1)] {
            let what = format!("{strategy:?} at {offset} len {len}");
            assert_errno(
                file.punch_hole(offset, len),
                libc::EINVAL,
                &format!("punch_hole {what}"),
            );
            assert_errno(
                file.zero_range(offset, len),
                libc::EINVAL,
                &format!("zero_range {what}"),
            );
            assert_errno(
                file.invalidate_range(offset, len),
                libc::EINVAL,
                &format!("invalidate_range {what}"),
            );
            assert_errno(
                file.sync_range(offset, len),
                libc::EINVAL,
                &format!("sync_range {what}"),
            );
            // `readahead(2)` takes any offset and fails only a length past
            // 2^63 - 1.
            let readahead = file.readahead(offset, len);
            if len > i64::MAX as u64 {
                assert_errno(readahead, libc::EINVAL, &format!("readahead {what}"));
            } else {
                readahead.unwrap();
            }
            assert_unchanged(&file, &data, &what);
        }
        // Direct I/O with an aligned offset whose end overflows.
        let aligned_near_end = u64::MAX - (PAGE - 1);
        let mut direct = Aligned::new(2 * PAGE_SIZE, 0, 0xCD);
        assert_errno(
            file.read_direct(direct.as_mut(), aligned_near_end),
            libc::EINVAL,
            "read_direct",
        );
        assert!(direct.as_ref().iter().all(|&b| b == 0xCD));
        assert_errno(
            file.write_direct(direct.as_ref(), aligned_near_end),
            libc::EINVAL,
            "write_direct",
        );
        assert_unchanged(&file, &data, &format!("{strategy:?}: overflow"));
    }
}

#[test]
fn sizes_past_max_file_size_fail_with_efbig_and_change_nothing() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let max = file.max_file_size();
        assert!(max > 0 && max % PAGE == 0, "max_file_size {max}");
        let calls: [(&str, io::Result<()>); 8] = [
            ("write_at at max", file.write_at(b"x", max).map(drop)),
            ("write_all_at past max", file.write_all_at(b"x", max + 10)),
            ("punch_hole across max", file.punch_hole(max - 1, 2)),
            ("punch_hole past max", file.punch_hole(max, 1)),
            ("zero_range across max", file.zero_range(max - 1, 2)),
            ("zero_range past max", file.zero_range(max, 1)),
            ("set_len past max", file.set_len(max + 1)),
            (
                "write_direct at max",
                file.write_direct(Aligned::new(PAGE_SIZE, 0, 1).as_ref(), max)
                    .map(drop),
            ),
        ];
        for (call, result) in calls {
            assert_errno(result, libc::EFBIG, &format!("{strategy:?}: {call}"));
            assert_unchanged(&file, &data, call);
        }
    }
}

#[test]
fn the_largest_file_size_itself_is_allowed() {
    for strategy in STRATEGIES {
        let (_volume, file, _data) = fixture(strategy);
        let max = file.max_file_size();
        file.write_all_at(b"z", max - 1).unwrap();
        assert_eq!(file.len(), max);
        let mut byte = [0];
        file.read_exact_at(&mut byte, max - 1).unwrap();
        assert_eq!(byte, *b"z");
        file.set_len(max).unwrap();
        file.zero_range(max - 1, 1).unwrap();
        file.read_exact_at(&mut byte, max - 1).unwrap();
        assert_eq!(byte, [0]);
        file.sync_all().unwrap();
    }
}

#[test]
fn misaligned_direct_io_fails_with_einval_and_changes_nothing() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        // (offset, length, address misalignment)
        let cases = [
            (512, PAGE_SIZE, 0),
            (PAGE + 1, PAGE_SIZE, 0),
            (0, PAGE_SIZE - 1, 0),
            (0, 512, 0),
            (PAGE, PAGE_SIZE + 512, 0),
            (0, PAGE_SIZE, 1),
            (0, PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN / 2),
        ];
        for (offset, len, misalign) in cases {
            let what = format!("{strategy:?}: offset {offset} len {len} address +{misalign}");
            let mut buf = Aligned::new(len, misalign, 0xEE);
            assert_errno(
                file.read_direct(buf.as_mut(), offset),
                libc::EINVAL,
                &format!("read_direct {what}"),
            );
            assert!(
                buf.as_ref().iter().all(|&b| b == 0xEE),
                "read_direct {what} wrote into the buffer"
            );
            assert_errno(
                file.write_direct(buf.as_ref(), offset),
                libc::EINVAL,
                &format!("write_direct {what}"),
            );
            // Not even the dirty pages of the range were written back.
            assert_unchanged(&file, &data, &what);
        }
        // Far past the end of file, misaligned still fails rather than extending.
        let buf = Aligned::new(PAGE_SIZE, 0, 1);
        assert_errno(
            file.write_direct(buf.as_ref(), 100 * PAGE + 512),
            libc::EINVAL,
            "write_direct past EOF",
        );
        assert_unchanged(&file, &data, "write_direct past EOF");
    }
}

#[test]
fn every_call_on_a_removed_file_fails_with_enoent() {
    for strategy in STRATEGIES {
        let (volume, file, _data) = fixture(strategy);
        let free_before_remove = volume.free_blocks();
        file.remove().unwrap();
        // The synced blocks wait for the next commit before they are reused: a
        // crash before it brings the file back.
        assert_eq!(volume.pending_blocks(), 2, "synced blocks freed");
        assert_eq!(volume.free_blocks(), free_before_remove);
        volume.sync().unwrap();
        let free_after_remove = volume.free_blocks();
        assert_eq!(free_after_remove, free_before_remove + 2);
        let len = file.len();
        let mut buf = vec![0xAB; 100];
        let mut direct = Aligned::new(PAGE_SIZE, 0, 0xAB);
        let results: [(&str, io::Result<()>); 15] = [
            ("read_at", file.read_at(&mut buf, 0).map(drop)),
            ("read_exact_at", file.read_exact_at(&mut buf, 0)),
            ("write_at", file.write_at(b"x", 0).map(drop)),
            ("write_all_at", file.write_all_at(b"x", 1 << 20)),
            ("readahead", file.readahead(0, PAGE)),
            (
                "read_direct",
                file.read_direct(direct.as_mut(), 0).map(drop),
            ),
            (
                "write_direct",
                file.write_direct(direct.as_ref(), 0).map(drop),
            ),
            ("punch_hole", file.punch_hole(0, PAGE)),
            ("zero_range", file.zero_range(0, 10 * PAGE)),
            ("set_len", file.set_len(0)),
            ("set_len grow", file.set_len(1 << 30)),
            ("invalidate_range", file.invalidate_range(0, PAGE)),
            ("sync_range", file.sync_range(0, PAGE)),
            ("sync_all", file.sync_all()),
            ("second remove", file.remove()),
        ];
        for (call, result) in results {
            assert_errno(result, libc::ENOENT, &format!("{strategy:?}: {call}"));
        }
        assert!(buf.iter().all(|&b| b == 0xAB), "a read filled the buffer");
        assert!(direct.as_ref().iter().all(|&b| b == 0xAB));
        assert_eq!(file.len(), len, "size changed after remove");
        assert_eq!(file.cached_pages(), (0, 0), "pages came back");
        assert_eq!(volume.free_blocks(), free_after_remove, "blocks allocated");
        assert!(volume.file_names().is_empty());
    }
}

#[test]
fn empty_fallocate_ranges_fail_with_einval_like_ext4() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let calls: [(&str, io::Result<()>); 4] = [
            ("punch_hole", file.punch_hole(PAGE, 0)),
            ("zero_range", file.zero_range(100, 0)),
            ("collapse_range", file.collapse_range(0, 0)),
            ("insert_range", file.insert_range(PAGE, 0)),
        ];
        for (call, result) in calls {
            assert_errno(result, libc::EINVAL, &format!("{strategy:?}: {call}"));
            assert_unchanged(&file, &data, call);
        }
    }
}

#[test]
fn empty_direct_io_returns_zero_whatever_its_alignment() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let mut buf = Aligned::new(PAGE_SIZE, 3, 0xEE);
        for offset in [0, 1, 513, PAGE + 7, 100 * PAGE + 1] {
            let what = format!("{strategy:?} at {offset}");
            assert_eq!(
                file.read_direct(&mut buf.as_mut()[..0], offset).unwrap(),
                0,
                "{what}"
            );
            assert_eq!(
                file.write_direct(&buf.as_ref()[..0], offset).unwrap(),
                0,
                "{what}"
            );
            assert_unchanged(&file, &data, &what);
        }
    }
}

#[test]
fn offsets_past_2_63_fail_with_einval_like_ext4() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let past = 1u64 << 63;
        let mut buf = vec![0xAB; 16];
        let mut direct = Aligned::new(PAGE_SIZE, 0, 0xCD);
        let calls: [(&str, io::Result<()>); 10] = [
            ("read_at", file.read_at(&mut buf, past).map(drop)),
            ("empty read_at", file.read_at(&mut [], past).map(drop)),
            (
                "read_at ending past",
                file.read_at(&mut buf, past - 8).map(drop),
            ),
            ("write_at", file.write_at(b"x", past).map(drop)),
            ("empty write_at", file.write_at(&[], past).map(drop)),
            (
                "read_direct",
                file.read_direct(direct.as_mut(), past).map(drop),
            ),
            (
                "empty read_direct",
                file.read_direct(&mut direct.as_mut()[..0], past).map(drop),
            ),
            (
                "write_direct",
                file.write_direct(direct.as_ref(), past).map(drop),
            ),
            ("set_len u64::MAX", file.set_len(u64::MAX)),
            ("set_len 2^63", file.set_len(past)),
        ];
        for (call, result) in calls {
            assert_errno(result, libc::EINVAL, &format!("{strategy:?}: {call}"));
            assert_unchanged(&file, &data, call);
        }
        assert!(buf.iter().all(|&b| b == 0xAB), "a read filled the buffer");
    }
}

#[test]
fn fallocate_ranges_past_the_largest_size_fail_with_efbig_like_ext4() {
    for strategy in STRATEGIES {
        let (_volume, file, data) = fixture(strategy);
        let max = file.max_file_size();
        let huge = 1u64 << 62;
        let calls: [(&str, io::Result<()>); 5] = [
            ("punch_hole", file.punch_hole(PAGE, huge)),
            ("zero_range", file.zero_range(0, huge)),
            ("collapse_range, aligned", file.collapse_range(0, huge)),
            ("collapse_range, misaligned", file.collapse_range(1, huge)),
            ("insert_range", file.insert_range(0, huge)),
        ];
        for (call, result) in calls {
            assert_errno(result, libc::EFBIG, &format!("{strategy:?}: {call}"));
            assert_unchanged(&file, &data, call);
        }
        // The end past 2^63 - 1 (overflowing `loff_t`) is EFBIG too; an offset
        // or length past it is EINVAL.
        assert_errno(
            file.punch_hole(max, i64::MAX as u64),
            libc::EFBIG,
            "punch_hole overflow",
        );
        assert_errno(
            file.punch_hole(0, u64::MAX),
            libc::EINVAL,
            "punch_hole length",
        );
        assert_unchanged(&file, &data, "overflow");
    }
}

#[test]
fn a_write_across_the_largest_size_is_cut_short_there() {
    for strategy in STRATEGIES {
        let (_volume, file, _data) = fixture(strategy);
        let max = file.max_file_size();
        assert_eq!(file.write_at(b"xy", max - 1).unwrap(), 1, "{strategy:?}");
        assert_eq!(file.len(), max);
        let mut byte = [0];
        file.read_exact_at(&mut byte, max - 1).unwrap();
        assert_eq!(byte, *b"x");
        let two_pages = Aligned::new(2 * PAGE_SIZE, 0, 7);
        assert_eq!(
            file.write_direct(two_pages.as_ref(), max - PAGE).unwrap(),
            PAGE_SIZE,
            "{strategy:?}"
        );
        file.read_exact_at(&mut byte, max - 1).unwrap();
        assert_eq!(byte, [7]);
        file.sync_all().unwrap();
    }
}

#[test]
fn every_cache_setting_out_of_range_fails_with_einval_naming_it() {
    use std::time::Duration;
    let cases = [
        ("budget_bytes", PageCache::builder().budget_bytes(0)),
        ("budget_bytes", PageCache::builder().budget_bytes(PAGE - 1)),
        (
            "budget_bytes",
            PageCache::builder().budget_bytes((1 << 32) * PAGE + PAGE),
        ),
        ("fill_batch_pages", PageCache::builder().fill_batch_pages(0)),
        (
            "fill_batch_pages",
            PageCache::builder().fill_batch_pages(513),
        ),
        (
            "fill_batch_pages",
            PageCache::builder().fill_batch_pages(usize::MAX),
        ),
        (
            "readahead_threads",
            PageCache::builder().readahead_threads(65),
        ),
        (
            "readahead_threads",
            PageCache::builder().readahead_threads(usize::MAX),
        ),
        (
            "writeback_interval",
            PageCache::builder().writeback_interval(Duration::from_millis(1)),
        ),
        (
            "writeback_interval",
            PageCache::builder().writeback_interval(Duration::MAX),
        ),
        (
            "dirty_background_bytes",
            PageCache::builder().dirty_background_bytes(0),
        ),
        (
            "dirty_background_bytes",
            PageCache::builder()
                .budget_bytes(16 * PAGE)
                .dirty_background_bytes(17 * PAGE),
        ),
    ];
    for (setting, builder) in cases {
        let error = builder.build().expect_err(setting);
        assert_eq!(
            error.kind(),
            io::ErrorKind::InvalidInput,
            "{setting}: {error}"
        );
        assert_eq!(
            filemap::errno(&error),
            Some(libc::EINVAL),
            "{setting}: {error}"
        );
        assert!(
            error.to_string().contains(setting),
            "the message does not name {setting}: {error}"
        );
    }
    // The smallest valid cache works, and rounds its budget down to pages; so
    // do the edges of every range.
    let cache = PageCache::builder()
        .budget_bytes(PAGE + 100)
        .fill_batch_pages(1)
        .build()
        .unwrap();
    assert_eq!(cache.budget_bytes(), PAGE);
    PageCache::builder()
        .fill_batch_pages(512)
        .readahead_threads(64)
        .writeback_interval(Duration::from_millis(10))
        .dirty_background_bytes(PAGE)
        .build()
        .unwrap();
}
