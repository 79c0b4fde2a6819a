//! Device errors injected with `FaultyDevice` come back from the call that hit
//! them (contract C8), and leave no trace in the cache: a failed fill caches
//! nothing (no page is marked up to date with data that was never read), a failed
//! writeback keeps the page dirty so nothing acknowledged is lost, and once the
//! fault is cleared a retry returns or stores the right data.

use std::io;
use std::sync::Arc;

use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::{index_of, PAGE, PAGE_SIZE};
use filemap::{
    AlignedBuf, Backend, FaultRule, FaultyDevice, Mapping, MemDevice, PageCache, Strategy, Volume,
    VolumeFile,
};

const STRATEGIES: [Strategy; 3] = [Strategy::None, Strategy::InvalidateLock, Strategy::Range];
const NAME: &str = "file";

struct Fixture {
    device: Arc<FaultyDevice>,
    volume: Arc<Volume>,
    backend: VolumeFile,
    file: Arc<Mapping>,
}

/// A file whose `data` is on the device (allocated blocks), with nothing cached.
fn fixture(strategy: Strategy, data: &[u8], batch: usize) -> Fixture {
    let device = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(8 << 20)), 7));
    let volume = Volume::format(device.clone()).unwrap();
    let backend = volume.create_file(NAME).unwrap();
    let cache = PageCache::builder()
        .strategy(strategy)
        .fill_batch_pages(batch)
        .build()
        .unwrap();
    let file = cache.open(Arc::new(backend.clone())).unwrap();
    if !data.is_empty() {
        file.write_all_at(data, 0).unwrap();
        file.sync_all().unwrap();
        file.invalidate_range(0, data.len() as u64).unwrap();
    }
    assert_eq!(file.cached_pages(), (0, 0));
    Fixture {
        device,
        volume,
        backend,
        file,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 13 + seed as usize * 29) % 249) as u8 + 1)
        .collect()
}

/// The device bytes of page `page` of the file (the page must be allocated).
fn device_bytes(backend: &VolumeFile, page: u64) -> std::ops::Range<u64> {
    let block = backend.physical_block(page).expect("an allocated page");
    block * PAGE..(block + 1) * PAGE
}

fn assert_eio<T: std::fmt::Debug>(result: std::io::Result<T>, call: &str) {
    let error = result.expect_err(call);
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{call}: got {error}");
}

fn read_all(file: &Mapping) -> Vec<u8> {
    let mut buf = vec![0; file.len() as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// What the backend holds for pages `first..first + pages`.
fn backend_pages(file: &Mapping, first: u64, pages: usize) -> Vec<u8> {
    let mut buf = vec![0; pages * PAGE_SIZE];
    file.backend().read_pages(first, &mut buf).unwrap();
    buf
}

#[test]
fn failed_read_miss_returns_the_error_and_caches_nothing() {
    for strategy in STRATEGIES {
        let data = pattern(1, 3 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        fx.device.add_rule(FaultRule::new(
            DeviceOp::Read,
            Trigger::Nth(1),
            Injection::Error(libc::EIO),
        ));
        let mut buf = vec![0xAB; 100];
        assert_eio(fx.file.read_at(&mut buf, PAGE + 10), "read_at");
        assert!(
            buf.iter().all(|&b| b == 0xAB),
            "the failed read copied data"
        );
        assert!(
            !fx.file.is_page_cached(1),
            "{strategy:?}: the failed page is cached"
        );
        assert_eq!(fx.file.cached_pages(), (0, 0));
        // The rule fired once; a retry reads the device again and gets the data.
        fx.device.clear();
        assert_eq!(fx.file.read_at(&mut buf, PAGE + 10).unwrap(), 100);
        assert_eq!(buf, data[PAGE_SIZE + 10..PAGE_SIZE + 110]);
        assert!(fx.file.is_page_cached(1));
        assert_eq!(read_all(&fx.file), data);
    }
}

#[test]
fn failed_batch_read_caches_none_of_the_batch() {
    for strategy in STRATEGIES {
        let data = pattern(2, 8 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        // Only page 5's block fails; the miss reads pages 0-7 in one batch.
        let bytes = device_bytes(&fx.backend, 5);
        fx.device.add_rule(
            FaultRule::new(DeviceOp::Read, Trigger::Always, Injection::Error(libc::EIO))
                .on_bytes(bytes),
        );
        let mut buf = vec![0; data.len()];
        assert_eio(fx.file.read_exact_at(&mut buf, 0), "read_exact_at");
        assert_eq!(fx.file.cached_pages(), (0, 0), "{strategy:?}");
        // Pages the batch did not read from the failing block can still be read.
        let mut page = vec![0; PAGE_SIZE];
        fx.file.read_exact_at(&mut page, 7 * PAGE).unwrap();
        assert_eq!(page, data[7 * PAGE_SIZE..]);
        fx.device.clear();
        assert_eq!(read_all(&fx.file), data);
    }
}

#[test]
fn failed_readahead_returns_the_error_and_caches_nothing_of_the_failed_batch() {
    for strategy in STRATEGIES {
        let data = pattern(3, 8 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 4);
        // Batches of four pages: 0-3 succeed, 4-7 fail at page 5's block.
        let bytes = device_bytes(&fx.backend, 5);
        fx.device.add_rule(
            FaultRule::new(DeviceOp::Read, Trigger::Always, Injection::Error(libc::EIO))
                .on_bytes(bytes),
        );
        assert_eio(fx.file.readahead(0, 8 * PAGE), "readahead");
        let cached: Vec<u64> = (0..8).filter(|&i| fx.file.is_page_cached(i)).collect();
        assert_eq!(cached, [0, 1, 2, 3], "{strategy:?}: only the good batch");
        assert_eq!(fx.file.cached_pages(), (4, 0));
        fx.device.clear();
        fx.file.readahead(0, 8 * PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (8, 0));
        assert_eq!(read_all(&fx.file), data);
    }
}

#[test]
fn failed_read_of_a_partial_page_write_returns_the_error_and_changes_nothing() {
    for strategy in STRATEGIES {
        let data = pattern(4, 2 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        fx.device.fail_nth(DeviceOp::Read, 1, libc::EIO);
        // A partial-page write must read the page first; that read fails.
        assert_eio(fx.file.write_at(b"new", PAGE + 1), "write_at");
        assert_eq!(fx.file.cached_pages(), (0, 0), "{strategy:?}");
        assert_eq!(fx.file.len(), data.len() as u64);
        assert_eq!(read_all(&fx.file), data);
        fx.file.write_all_at(b"new", PAGE + 1).unwrap();
        let mut expected = data.clone();
        expected[PAGE_SIZE + 1..PAGE_SIZE + 4].copy_from_slice(b"new");
        assert_eq!(read_all(&fx.file), expected);
    }
}

#[test]
fn failed_read_direct_returns_the_error() {
    for strategy in STRATEGIES {
        let data = pattern(5, 2 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        fx.device.fail_nth(DeviceOp::Read, 1, libc::EIO);
        let mut buf = AlignedBuf::from_slice(&[0xAB; 2 * PAGE_SIZE], DIRECT_IO_MEMORY_ALIGN);
        assert_eio(fx.file.read_direct(buf.as_mut(), 0), "read_direct");
        assert_eq!(fx.file.cached_pages(), (0, 0), "direct reads cache nothing");
        assert_eq!(fx.file.read_direct(buf.as_mut(), 0).unwrap(), data.len());
        assert_eq!(buf.as_ref(), data, "{strategy:?}: the retry reads the data");
    }
}

#[test]
fn failed_writeback_before_read_direct_returns_the_error_and_keeps_the_page_dirty() {
    for strategy in STRATEGIES {
        let data = pattern(6, 2 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        fx.file.write_all_at(b"dirty", 10).unwrap();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        let mut buf = AlignedBuf::from_slice(&[0; PAGE_SIZE], DIRECT_IO_MEMORY_ALIGN);
        assert_eio(fx.file.read_direct(buf.as_mut(), 0), "read_direct");
        assert_eq!(fx.file.cached_pages(), (1, 1), "{strategy:?}: still dirty");
        // C5 once the device works again: the direct read sees the buffered write.
        fx.device.clear();
        fx.file.read_direct(buf.as_mut(), 0).unwrap();
        assert_eq!(&buf.as_ref()[10..15], b"dirty");
        assert_eq!(fx.file.cached_pages(), (1, 0));
    }
}

#[test]
fn failed_write_direct_returns_the_error_and_later_reads_see_the_old_data() {
    // A direct write of one allocated page is one device write; when the device
    // rejects it nothing is written, the range's cached pages have been dropped,
    // so a buffered read afterwards reads the old data from the device (and never
    // data of the failed write from the cache).
    for strategy in STRATEGIES {
        let data = pattern(7, 3 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        read_all(&fx.file);
        assert!(fx.file.is_page_cached(1));
        let free = fx.volume.free_blocks();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        let new = AlignedBuf::from_slice(&pattern(8, PAGE_SIZE), DIRECT_IO_MEMORY_ALIGN);
        assert_eio(fx.file.write_direct(new.as_ref(), PAGE), "write_direct");
        assert!(!fx.file.is_page_cached(1), "{strategy:?}: range dropped");
        assert_eq!(read_all(&fx.file), data, "{strategy:?}: old data");
        assert_eq!(
            backend_pages(&fx.file, 1, 1),
            data[PAGE_SIZE..2 * PAGE_SIZE]
        );
        assert_eq!(fx.volume.free_blocks(), free);
        // The retry lands and a buffered read sees it.
        fx.file.write_direct(new.as_ref(), PAGE).unwrap();
        let mut expected = data.clone();
        expected[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(new.as_ref());
        assert_eq!(read_all(&fx.file), expected);
    }
}

#[test]
fn failed_write_direct_into_a_hole_allocates_nothing_and_reads_zeroes() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy, &[], 32);
        fx.file.set_len(2 * PAGE).unwrap();
        let free = fx.volume.free_blocks();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        let new = AlignedBuf::from_slice(&pattern(9, PAGE_SIZE), DIRECT_IO_MEMORY_ALIGN);
        assert_eio(fx.file.write_direct(new.as_ref(), PAGE), "write_direct");
        assert_eq!(
            fx.volume.free_blocks(),
            free,
            "{strategy:?}: block given back"
        );
        assert_eq!(fx.backend.allocated_blocks().unwrap(), 0);
        assert_eq!(read_all(&fx.file), vec![0; 2 * PAGE_SIZE]);
    }
}

#[test]
fn failed_writeback_before_write_direct_keeps_the_dirty_data() {
    for strategy in STRATEGIES {
        let data = pattern(10, 2 * PAGE_SIZE);
        let fx = fixture(strategy, &data, 32);
        // Page 0 is dirty and inside the direct write's range, so it is written
        // back before the direct write, and that writeback fails.
        fx.file.write_all_at(b"dirty", 20).unwrap();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        let new = AlignedBuf::from_slice(&pattern(11, PAGE_SIZE), DIRECT_IO_MEMORY_ALIGN);
        assert_eio(fx.file.write_direct(new.as_ref(), 0), "write_direct");
        // The acknowledged buffered write is not lost.
        assert_eq!(fx.file.cached_pages(), (1, 1), "{strategy:?}: still dirty");
        let mut expected = data.clone();
        expected[20..25].copy_from_slice(b"dirty");
        assert_eq!(read_all(&fx.file), expected);
        fx.device.clear();
        // The next sync writes the page back, and reports the earlier failure
        // once (errseq: `write_direct` is not a sync).
        assert_eio(fx.file.sync_all(), "sync_all after the failure");
        assert_eq!(backend_pages(&fx.file, 0, 2), expected);
        fx.file.sync_all().unwrap();
    }
}

#[test]
fn failed_sync_all_keeps_the_page_dirty_and_a_later_sync_all_stores_it() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy, &[], 32);
        let free = fx.volume.free_blocks();
        let data = pattern(12, PAGE_SIZE + 100);
        fx.file.write_all_at(&data, 0).unwrap();
        assert_eq!(fx.file.cached_pages(), (2, 2));
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        assert_eio(fx.file.sync_all(), "sync_all");
        let (cached, dirty) = fx.file.cached_pages();
        assert_eq!(cached, 2);
        assert!(dirty > 0, "{strategy:?}: the failed page must stay dirty");
        assert_eq!(read_all(&fx.file), data, "the cache still has the data");
        fx.device.clear();
        fx.file.sync_all().unwrap();
        assert_eq!(fx.file.cached_pages(), (2, 0));
        assert_eq!(fx.volume.free_blocks(), free - 2);
        // A second cache over the same file sees the data on the device.
        let cache = PageCache::builder().build().unwrap();
        let other = cache
            .open(Arc::new(fx.volume.open_file(NAME).unwrap()))
            .unwrap();
        assert_eq!(
            read_all(&other),
            data,
            "{strategy:?}: data reached the device"
        );
        fx.volume.check_invariants();
    }
}

#[test]
fn failed_flush_fails_sync_all_and_a_retry_succeeds() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy, &[], 32);
        fx.file.write_all_at(b"abc", 0).unwrap();
        fx.device.fail_nth(DeviceOp::Flush, 1, libc::EIO);
        assert_eio(fx.file.sync_all(), "sync_all");
        fx.device.fail_nth(DeviceOp::Flush, 1, libc::EIO);
        assert_eio(fx.file.sync_range(0, 1), "sync_range");
        fx.file.sync_all().unwrap();
        assert_eq!(&backend_pages(&fx.file, 0, 1)[..3], b"abc", "{strategy:?}");
    }
}

#[test]
fn failed_writeback_of_invalidate_range_keeps_the_page_cached_and_dirty() {
    for strategy in STRATEGIES {
        let fx = fixture(strategy, &[], 32);
        let data = pattern(13, 2 * PAGE_SIZE);
        fx.file.write_all_at(&data, 0).unwrap();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        assert_eio(fx.file.invalidate_range(0, 2 * PAGE), "invalidate_range");
        let (_, dirty) = fx.file.cached_pages();
        assert!(
            dirty >= 1,
            "{strategy:?}: a page whose writeback failed was dropped"
        );
        assert_eq!(read_all(&fx.file), data, "no acknowledged data lost");
        fx.device.clear();
        fx.file.invalidate_range(0, 2 * PAGE).unwrap();
        assert_eq!(fx.file.cached_pages(), (0, 0));
        assert_eq!(read_all(&fx.file), data);
        assert_eq!(backend_pages(&fx.file, 0, 2), data);
    }
}

/// A file of `data` on a faulty device, in a cache of `budget_pages` pages.
fn small_fixture(strategy: Strategy, data: &[u8], budget_pages: u64) -> Fixture {
    let device = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(8 << 20)), 7));
    let volume = Volume::format(device.clone()).unwrap();
    let backend = volume.create_file(NAME).unwrap();
    let mut pages = data.to_vec();
    pages.resize(data.len().next_multiple_of(PAGE_SIZE), 0);
    backend.set_len(pages.len() as u64).unwrap();
    backend.write_pages(0, &pages).unwrap();
    backend.set_len(data.len() as u64).unwrap();
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(budget_pages * PAGE)
        .build()
        .unwrap();
    let file = cache.open(Arc::new(backend.clone())).unwrap();
    Fixture {
        device,
        volume,
        backend,
        file,
    }
}

/// With every cached page dirty and every device write failing, nothing can
/// be evicted: a write needing a new page fails with `OutOfMemory` and changes
/// nothing, and the failed writebacks are reported by the next sync.
#[test]
fn a_cache_full_of_unwritable_dirty_pages_fails_new_writes_and_changes_nothing() {
    for strategy in STRATEGIES {
        let data = pattern(20, 10 * PAGE_SIZE);
        let fx = small_fixture(strategy, &data, 2);
        fx.file.write_all_at(b"first", 10).unwrap();
        fx.file.write_all_at(b"second", PAGE + 10).unwrap();
        let mut expected = data.clone();
        expected[10..15].copy_from_slice(b"first");
        expected[PAGE_SIZE + 10..PAGE_SIZE + 16].copy_from_slice(b"second");
        fx.device.add_rule(FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Error(libc::EIO),
        ));
        // A whole page (no read needed), a partial page (read needed), and past
        // the end of file (a failed write must not grow the file).
        for (offset, len) in [
            (5 * PAGE, PAGE_SIZE),
            (7 * PAGE + 3, 10),
            (10 * PAGE + 100, 10),
            (100 * PAGE, PAGE_SIZE),
        ] {
            let error = fx.file.write_at(&vec![0xFF; len], offset).unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::OutOfMemory,
                "{strategy:?}: {error}"
            );
            assert_eq!(filemap::errno(&error), Some(libc::ENOMEM), "{error}");
            assert_eq!(fx.file.len(), data.len() as u64);
            assert_eq!(fx.file.cached_pages(), (2, 2), "{strategy:?}: still dirty");
            assert!(!fx.file.is_page_cached(index_of(offset)));
            assert_eq!(read_all(&fx.file), expected, "{strategy:?}: unchanged");
        }
        fx.device.clear();
        // The evictions' failed writebacks are reported once, and the data
        // reaches the backend.
        assert_eio(fx.file.sync_all(), "sync_all after failed evictions");
        fx.file.sync_all().unwrap();
        assert_eq!(backend_pages(&fx.file, 0, 10), expected);
    }
}

#[test]
fn a_short_write_grows_the_file_only_as_far_as_it_wrote() {
    for strategy in STRATEGIES {
        let data = pattern(21, 2 * PAGE_SIZE - 100);
        let fx = small_fixture(strategy, &data, 2);
        // Both pages cached and dirty, and no writeback can succeed: nothing
        // can be evicted.
        fx.file.write_all_at(&data, 0).unwrap();
        fx.device.add_rule(FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Error(libc::EIO),
        ));
        // The first 50 bytes land in the cached last page and grow the file to
        // its end; the next page needs a frame the budget does not have.
        assert_eq!(
            fx.file.write_at(&[0xEE; 100], 2 * PAGE - 50).unwrap(),
            50,
            "{strategy:?}"
        );
        assert_eq!(fx.file.len(), 2 * PAGE, "{strategy:?}");
        let mut tail = [0u8; 100];
        assert_eq!(fx.file.read_at(&mut tail, 2 * PAGE - 100).unwrap(), 100);
        assert_eq!(&tail[..50], &[0; 50], "the old tail past the end read zero");
        assert_eq!(&tail[50..], &[0xEE; 50]);
        fx.device.clear();
    }
}

/// C8: a writeback failure, wherever it happens, is reported by the next sync
/// of every handle open on the mapping, once each, and the data stays dirty
/// until a writeback succeeds.
#[test]
fn a_writeback_failure_is_reported_once_to_every_handle() {
    for strategy in STRATEGIES {
        let data = pattern(30, 8 * PAGE_SIZE);
        let fx = small_fixture(strategy, &data, 2);
        let (wal, checkpoint) = (fx.file.handle(), fx.file.handle());
        wal.write_all_at(&[0xAA; PAGE_SIZE], 0).unwrap();
        let failing = fx.device.add_rule(FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Error(libc::EIO),
        ));
        // Eviction needs page 0's frame: its writeback fails, so it stays dirty
        // and the read of page 5 is served uncached or from the other frame.
        let mut buf = vec![0; PAGE_SIZE];
        checkpoint.read_exact_at(&mut buf, 5 * PAGE).unwrap();
        checkpoint.read_exact_at(&mut buf, 6 * PAGE).unwrap();
        assert!(
            fx.file.is_page_cached(0),
            "{strategy:?}: the dirty page stays"
        );
        assert_eq!(fx.file.cached_pages().1, 1, "{strategy:?}: still dirty");
        // A handle opened now, while nobody has reported the error, sees it too.
        let late = fx.file.handle();
        fx.device.remove_rule(failing);
        for (name, handle) in [("wal", &wal), ("checkpoint", &checkpoint), ("late", &late)] {
            assert_eio(
                handle.sync_all(),
                &format!("{strategy:?}: {name} learns of it"),
            );
            handle.sync_all().unwrap();
        }
        // Reported to everyone: a handle opened after that starts clean.
        fx.file.handle().sync_all().unwrap();
        assert_eq!(backend_pages(&fx.file, 0, 1), vec![0xAA; PAGE_SIZE]);
        // A sync that fails itself reports its failure to its caller once, and
        // to the other handles at their next sync.
        wal.write_all_at(&[0xBB; PAGE_SIZE], 0).unwrap();
        fx.device.fail_nth(DeviceOp::Write, 1, libc::EIO);
        assert_eio(wal.sync_all(), "wal's own failed sync");
        wal.sync_all().unwrap();
        assert_eio(
            checkpoint.sync_range(0, PAGE),
            "checkpoint after wal's failure",
        );
        checkpoint.sync_range(0, PAGE).unwrap();
        assert_eq!(backend_pages(&fx.file, 0, 1), vec![0xBB; PAGE_SIZE]);
    }
}
