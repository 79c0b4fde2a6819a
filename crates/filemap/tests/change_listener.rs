//! `ChangeListener`: told before and after every call that changes a file's
//! bytes, with the range, on the changing thread with no lock of the mapping
//! held (it may call back into the mapping).

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use filemap::{ChangeListener, MapAccess, Mapping, MemDevice, PageCache, Volume};

const PAGE: u64 = 4096;

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(&'static str, Range<u64>)>>,
    /// Bytes read back through the mapping from inside the calls.
    seen: OnceLock<()>,
}

impl ChangeListener for Recorder {
    fn before_change(&self, mapping: &Mapping, range: Range<u64>) {
        // Calling back in must not deadlock: no lock of the mapping is held.
        let mut byte = [0];
        mapping.read_at(&mut byte, range.start).unwrap();
        mapping.write_at(&[], range.start).unwrap();
        let _ = self.seen.set(());
        self.calls.lock().unwrap().push(("before", range));
    }

    fn after_change(&self, mapping: &Mapping, range: Range<u64>) {
        let mut byte = [0];
        mapping.read_at(&mut byte, range.start).unwrap();
        self.calls.lock().unwrap().push(("after", range));
    }
}

/// A new empty file on a volume in memory, opened through a cache whose
/// listener is the returned recorder (the cache is returned to keep it).
fn listened_file() -> (Arc<Recorder>, PageCache, Arc<Mapping>) {
    let recorder = Arc::new(Recorder::default());
    let cache = PageCache::builder()
        .change_listener(recorder.clone())
        .build()
        .unwrap();
    let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).unwrap();
    let file = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    (recorder, cache, file)
}

#[test]
fn every_changing_call_is_told_before_and_after_with_its_range() {
    let (recorder, _cache, file) = listened_file();
    let take = || std::mem::take(&mut *recorder.calls.lock().unwrap());
    let both = |range: Range<u64>| vec![("before", range.clone()), ("after", range)];

    file.write_at(&[1; 100], 10).unwrap();
    assert_eq!(take(), both(10..110), "write_at");
    file.write_at_nowait(&[2; 10], 20).unwrap();
    assert_eq!(take(), both(20..30), "write_at_nowait");
    // One call for all the buffers of a vectored write, with their whole range.
    let bufs = [&[3u8; 5000][..], &[], &[4; 100]].map(std::io::IoSlice::new);
    file.write_vectored_at(&bufs, 50).unwrap();
    assert_eq!(take(), both(50..5150), "write_vectored_at");
    file.set_len(16 * PAGE).unwrap();
    assert_eq!(take(), both(5150..u64::MAX), "set_len growing");
    file.punch_hole(PAGE, PAGE).unwrap();
    assert_eq!(take(), both(PAGE..2 * PAGE), "punch_hole");
    file.zero_range(2 * PAGE, 10).unwrap();
    assert_eq!(take(), both(2 * PAGE..2 * PAGE + 10), "zero_range");
    let aligned = filemap::AlignedBuf::from_slice(&[3; 4096], 4096);
    file.write_direct(&aligned, 3 * PAGE).unwrap();
    assert_eq!(take(), both(3 * PAGE..4 * PAGE), "write_direct");
    file.collapse_range(4 * PAGE, PAGE).unwrap();
    assert_eq!(take(), both(4 * PAGE..u64::MAX), "collapse_range");
    file.insert_range(4 * PAGE, PAGE).unwrap();
    assert_eq!(take(), both(4 * PAGE..u64::MAX), "insert_range");
    file.invalidate_range(0, PAGE).unwrap();
    assert_eq!(take(), both(0..PAGE), "invalidate_range");
    file.set_len(PAGE).unwrap();
    assert_eq!(take(), both(PAGE..u64::MAX), "set_len shrinking");
    // Reads, syncs and readahead change nothing.
    let mut buf = [0; 64];
    file.read_at(&mut buf, 0).unwrap();
    let (mut one, mut two) = ([0; 10], [0; 5000]);
    let mut bufs = [
        std::io::IoSliceMut::new(&mut one),
        std::io::IoSliceMut::new(&mut two),
    ];
    file.read_vectored_at(&mut bufs, 0).unwrap();
    file.sync_all().unwrap();
    file.readahead(0, PAGE).unwrap();
    assert_eq!(take(), vec![], "reads and syncs");
    assert!(recorder.seen.get().is_some());
}

#[test]
fn a_store_through_a_map_region_is_told() {
    let (recorder, _cache, file) = listened_file();
    file.set_len(4 * PAGE).unwrap();
    recorder.calls.lock().unwrap().clear();
    let region = match file.map(PAGE, 2 * PAGE as usize, MapAccess::ReadWrite) {
        Ok(region) => region,
        Err(error) => panic!("cannot map here (userfaultfd): {error}"),
    };
    region.write(100, &[5; 8]).unwrap();
    let calls = std::mem::take(&mut *recorder.calls.lock().unwrap());
    let range = PAGE + 100..PAGE + 108;
    assert_eq!(calls, vec![("before", range.clone()), ("after", range)]);
}
