//! The stale-data oracle: page stamps, the history of every page, and the rule
//! that decides whether a read may return what it returned.
//!
//! Writers write whole pages whose every 8-byte word is the same stamp (file,
//! page index, write sequence); zeroes mean "hole". A global clock stamps the
//! start and end of every operation. For a page P, a read over `[rs, re]` may
//! return the value written by change `c` only if `c` started before `re` and no
//! change `d` of P started after `c` ended and ended before `rs`. Anything else is
//! stale. A page mixing stamps, or stamps and zeroes, is torn; a stamp of another
//! file or page index is foreign.
//!
//! One exception: a store through a memory map is a store into shared memory,
//! which no reader sees atomically (on Linux neither), and which a concurrent
//! write of the same page can leave mixed with it. A page whose every version is
//! one the read may return, at least one of them stored through a map, is
//! reported apart, not as torn ([`PageHistory::allows_mix`]).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

const SEQ_BITS: u32 = 36;
const PAGE_BITS: u32 = 20;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const PAGE_MASK: u64 = (1 << PAGE_BITS) - 1;
/// The most files a stamp can name.
pub const MAX_FILES: usize = 255;
/// The most pages per file a stamp can name.
pub const MAX_PAGES: u64 = 1 << PAGE_BITS;

/// What one page can hold in the torture: zeroes, or one writer's stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    /// A hole, or zeroes written by punch, zero range or truncate.
    Zero,
    /// The stamp of the write whose sequence number this is.
    Seq(u64),
}

/// The 8-byte word a write of `seq` puts in every word of page `page` of `file`.
/// Never zero: the file field is stored plus one.
pub fn stamp(file: usize, page: u64, seq: u64) -> u64 {
    debug_assert!(file < MAX_FILES && page < MAX_PAGES && seq <= SEQ_MASK);
    ((file as u64 + 1) << (SEQ_BITS + PAGE_BITS)) | (page << SEQ_BITS) | (seq & SEQ_MASK)
}

/// Fills `page` with the stamp of (`file`, `index`, `seq`).
pub fn fill_page(page: &mut [u8], file: usize, index: u64, seq: u64) {
    let word = stamp(file, index, seq).to_ne_bytes();
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&word);
    }
}

/// What a read found in one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A value that belongs to this file and page.
    Value(Value),
    /// Words that differ: two versions mixed.
    Torn,
    /// A stamp of another file or another page index, or no stamp at all.
    Foreign {
        /// The file the stamp names, if it names one.
        file: Option<usize>,
        /// The page index the stamp names.
        page: u64,
    },
}

/// Classifies the bytes a read returned for page `index` of `file`.
pub fn classify(page: &[u8], file: usize, index: u64) -> Observed {
    let word = |chunk: &[u8]| u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    let mut words = page.chunks_exact(8).map(word);
    let first = words.next().unwrap_or(0);
    if !words.all(|w| w == first) {
        return Observed::Torn;
    }
    if first == 0 {
        return Observed::Value(Value::Zero);
    }
    let stamp_file = (first >> (SEQ_BITS + PAGE_BITS)) as usize;
    let stamp_page = (first >> SEQ_BITS) & PAGE_MASK;
    if stamp_file == file + 1 && stamp_page == index {
        Observed::Value(Value::Seq(first & SEQ_MASK))
    } else {
        Observed::Foreign {
            file: stamp_file.checked_sub(1),
            page: stamp_page,
        }
    }
}

/// The distinct values of the words of a mixed page of `file`, page `index`, in
/// order of appearance; `None` if a word belongs to no value of that page.
pub fn mixed_values(page: &[u8], file: usize, index: u64) -> Option<Vec<Value>> {
    let mut values = Vec::new();
    for chunk in page.chunks_exact(8) {
        let value = match classify(chunk, file, index) {
            Observed::Value(value) => value,
            _ => return None,
        };
        if !values.contains(&value) {
            values.push(value);
        }
    }
    Some(values)
}

/// Whether every byte of `page` equals the same byte of one of `values` as
/// stamped on page `index` of `file`: a byte-by-byte mix of those versions, which
/// is what a copy racing a store through a map may see (shared memory gives no
/// word atomicity).
pub fn bytes_mix_of(page: &[u8], file: usize, index: u64, values: &[Value]) -> bool {
    let words: Vec<[u8; 8]> = values
        .iter()
        .map(|value| match *value {
            Value::Zero => [0; 8],
            Value::Seq(seq) => stamp(file, index, seq).to_ne_bytes(),
        })
        .collect();
    page.chunks_exact(8)
        .all(|word| (0..8).all(|i| words.iter().any(|candidate| candidate[i] == word[i])))
}

/// The global clock: every operation takes a tick before it starts and after it
/// ends. Ticks are unique, so a start tick also names the operation.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// A new, strictly larger tick.
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// A change of one page: a write, or zeroes.
#[derive(Clone, Copy, Debug)]
struct Change {
    value: Value,
    start: u64,
    /// `u64::MAX` while the operation is still running.
    end: u64,
    /// Stored through a memory map, so readers may see it partly.
    through_map: bool,
    /// A punch or zero range by the kernel's `fallocate` through a mount (see
    /// [`PageHistory::begin_kernel_fallocate`]).
    kernel_fallocate: bool,
}

/// Every change of one page that a read in flight could still observe.
#[derive(Debug)]
pub struct PageHistory {
    changes: Vec<Change>,
}

impl Default for PageHistory {
    fn default() -> Self {
        // Every page starts as zeroes, written "before time".
        PageHistory {
            changes: vec![Change {
                value: Value::Zero,
                start: 0,
                end: 0,
                through_map: false,
                kernel_fallocate: false,
            }],
        }
    }
}

impl PageHistory {
    /// Records that an operation starting at `start` is about to make the page
    /// `value`. Call before the operation starts.
    pub fn begin(&mut self, value: Value, start: u64) {
        self.changes.push(Change {
            value,
            start,
            end: u64::MAX,
            through_map: false,
            kernel_fallocate: false,
        });
    }

    /// Like [`PageHistory::begin`], for a store through a memory map.
    pub fn begin_map_store(&mut self, value: Value, start: u64) {
        self.begin(value, start);
        self.changes.last_mut().expect("just pushed").through_map = true;
    }

    /// Like [`PageHistory::begin`] for zeroes, by a punch or zero range that
    /// the kernel's `fallocate` makes through a mount. The kernel writes its
    /// pages of the range back, sends the request, and drops its pages after
    /// the reply, with no lock against faults meanwhile (only DAX files get
    /// one). A store through a map made during the call dirties a page again:
    /// if that page is written back after the server's change (a direct read
    /// of the range writes it back first), and a later store during the call
    /// dirties it once more, the drop discards the later store and the
    /// earlier one is what the file keeps. The earlier change may be a write
    /// as well, through the mount during the call. No order makes that
    /// outcome, but it is the kernel's, not the server's:
    /// [`PageHistory::allows_kernel_fallocate_loss`] allows it.
    pub fn begin_kernel_fallocate(&mut self, start: u64) {
        self.begin(Value::Zero, start);
        self.changes
            .last_mut()
            .expect("just pushed")
            .kernel_fallocate = true;
    }

    /// Whether a store through a map to this page overlapped `[rs, re]`: a read
    /// then may see the page partly stored.
    pub fn map_store_overlaps(&self, rs: u64, re: u64) -> bool {
        self.changes
            .iter()
            .any(|c| c.through_map && c.start < re && c.end > rs)
    }

    /// Every value a read over `[rs, re]` may return.
    pub fn allowed_values(&self, rs: u64, re: u64) -> Vec<Value> {
        let mut values: Vec<Value> = Vec::new();
        for change in &self.changes {
            if !values.contains(&change.value) && self.allows(change.value, rs, re) {
                values.push(change.value);
            }
        }
        values
    }

    /// Whether a page mixing `values` may be what a read over `[rs, re]`
    /// returned: each value on its own is allowed, and a store through a map
    /// made one of them or overlapped the read.
    pub fn allows_mix(&self, values: &[Value], rs: u64, re: u64) -> bool {
        values.iter().all(|&v| self.allows(v, rs, re))
            && (self.map_store_overlaps(rs, re)
                || values
                    .iter()
                    .any(|&v| self.changes.iter().any(|c| c.through_map && c.value == v)))
    }

    /// Whether every byte of `page` (page `index` of `file`) comes from a
    /// version a read over `[rs, re]` may return: what a copy that no change
    /// of the page is atomic against may see (the kernel's copy out of its
    /// page cache racing a write's copy into it, loads from a map). Such a
    /// copy tears words too, so a word may read as a stamp no one wrote (the
    /// high bytes of one version, the low byte of another): judging the
    /// page's words as whole stamps would call that stale.
    pub fn allows_byte_mix(&self, page: &[u8], file: usize, index: u64, rs: u64, re: u64) -> bool {
        bytes_mix_of(page, file, index, &self.allowed_values(rs, re))
    }

    /// Records that the operation that started at `start` ended at `end`, then
    /// forgets changes that no read in flight can observe: those overwritten by a
    /// change that ended before `horizon`, the start of the oldest read in flight.
    pub fn end(&mut self, start: u64, end: u64, horizon: u64) {
        if let Some(change) = self.changes.iter_mut().find(|c| c.start == start) {
            change.end = end;
        }
        // A store the kernel may have kept in place of a later one stays.
        let keep: Vec<Change> = self
            .changes
            .iter()
            .filter(|c| {
                !self
                    .changes
                    .iter()
                    .any(|d| d.end < horizon && self.replaces(d, c, true))
            })
            .copied()
            .collect();
        self.changes = keep;
    }

    /// Whether a read that ran over `[rs, re]` may have returned `value`.
    pub fn allows(&self, value: Value, rs: u64, re: u64) -> bool {
        self.allows_if(value, rs, re, false)
    }

    /// Whether a read over `[rs, re]` may have returned `value` if the kernel
    /// lost a store through a map to a punch or zero range through a mount,
    /// as [`PageHistory::begin_kernel_fallocate`] says it may. Only for
    /// values [`PageHistory::allows`] refuses: the read is then counted
    /// apart, not as stale.
    pub fn allows_kernel_fallocate_loss(&self, value: Value, rs: u64, re: u64) -> bool {
        self.allows_if(value, rs, re, true)
    }

    fn allows_if(&self, value: Value, rs: u64, re: u64, kernel_loss: bool) -> bool {
        self.changes.iter().any(|c| {
            c.value == value
                && c.start < re
                && !self
                    .changes
                    .iter()
                    .any(|d| d.end < rs && self.replaces(d, c, kernel_loss))
        })
    }

    /// Whether change `later` replaced `earlier` for good: it started after
    /// `earlier` ended, unless (with `kernel_loss`) `later` is a store
    /// through a map made during a kernel `fallocate` that `earlier` had not
    /// ended before: the kernel may have discarded `later`, and `earlier`
    /// reached the server after the `fallocate`'s change.
    fn replaces(&self, later: &Change, earlier: &Change, kernel_loss: bool) -> bool {
        later.start > earlier.end
            && !(kernel_loss
                && later.through_map
                && self
                    .changes
                    .iter()
                    .any(|z| z.kernel_fallocate && z.start < earlier.end && later.start < z.end))
    }

    /// The remembered changes, for reports: `value [start, end]`, `m` for a
    /// store through a map.
    pub fn describe(&self) -> String {
        let change = |c: &Change| {
            let end = if c.end == u64::MAX {
                "..".to_owned()
            } else {
                c.end.to_string()
            };
            let map = if c.through_map { "m" } else { "" };
            format!("{:?}{map}[{}, {end}]", c.value, c.start)
        };
        self.changes
            .iter()
            .map(change)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// How many changes are remembered (for tests of the pruning).
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether nothing is remembered (never: the initial zeroes stay until
    /// overwritten).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The histories of every page of every file of a run.
#[derive(Debug)]
pub struct History {
    pages_per_file: u64,
    pages: Vec<Mutex<PageHistory>>,
}

impl History {
    /// Histories for `files` files of `pages_per_file` pages, all zeroes.
    pub fn new(files: usize, pages_per_file: u64) -> Self {
        History {
            pages_per_file,
            pages: (0..files as u64 * pages_per_file)
                .map(|_| Mutex::new(PageHistory::default()))
                .collect(),
        }
    }

    /// The history of page `page` of `file`.
    pub fn page(&self, file: usize, page: u64) -> &Mutex<PageHistory> {
        &self.pages[(file as u64 * self.pages_per_file + page) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_mixes_are_torn() {
        let mut page = vec![0u8; 4096];
        assert_eq!(classify(&page, 3, 7), Observed::Value(Value::Zero));
        fill_page(&mut page, 3, 7, 42);
        assert_eq!(classify(&page, 3, 7), Observed::Value(Value::Seq(42)));
        assert_eq!(
            classify(&page, 2, 7),
            Observed::Foreign {
                file: Some(3),
                page: 7
            }
        );
        assert_eq!(
            classify(&page, 3, 8),
            Observed::Foreign {
                file: Some(3),
                page: 7
            }
        );
        page[4095] = 0;
        assert_eq!(classify(&page, 3, 7), Observed::Torn);
        let mut half = vec![0u8; 4096];
        fill_page(&mut half[..2048], 3, 7, 42);
        assert_eq!(classify(&half, 3, 7), Observed::Torn);
    }

    #[test]
    fn reads_may_see_concurrent_values_but_not_overwritten_ones() {
        let mut page = PageHistory::default();
        // Write 1 over [10, 20], punch over [30, 40], write 2 over [50, 60].
        page.begin(Value::Seq(10), 10);
        page.end(10, 20, 0);
        page.begin(Value::Zero, 30);
        page.end(30, 40, 0);
        // A read over [45, 48] must see the punch's zeroes.
        assert!(page.allows(Value::Zero, 45, 48));
        assert!(
            !page.allows(Value::Seq(10), 45, 48),
            "stale: overwritten by the punch"
        );
        // A read over [35, 48] overlaps the punch: old data is still allowed.
        assert!(page.allows(Value::Seq(10), 35, 48));
        // A read over [5, 8] ended before write 1 started: it cannot see it.
        assert!(!page.allows(Value::Seq(10), 5, 8));
        // Write 2 in flight: reads overlapping it may see it or the zeroes.
        page.begin(Value::Seq(50), 50);
        assert!(page.allows(Value::Seq(50), 45, 55));
        assert!(page.allows(Value::Zero, 45, 55));
        page.end(50, 60, 0);
        assert!(
            !page.allows(Value::Zero, 61, 62),
            "stale: overwritten by write 2"
        );
        // A value nobody wrote is never allowed.
        assert!(!page.allows(Value::Seq(11), 0, 100));
    }

    #[test]
    fn a_mix_is_excused_only_with_allowed_versions_one_stored_through_a_map() {
        let mut page = PageHistory::default();
        page.begin(Value::Seq(10), 10);
        page.end(10, 20, 0);
        page.begin(Value::Seq(30), 30);
        page.end(30, 40, 0);
        // Two API writes never mix.
        assert!(!page.allows_mix(&[Value::Seq(10), Value::Seq(30)], 35, 50));
        page.begin_map_store(Value::Seq(33), 33);
        page.end(33, 38, 0);
        // The map store and the write overlapped: a later read may see them mixed.
        assert!(page.allows_mix(&[Value::Seq(30), Value::Seq(33)], 50, 60));
        // But not with a version overwritten before the read began.
        assert!(!page.allows_mix(&[Value::Seq(10), Value::Seq(33)], 50, 60));
        let mut mixed = vec![0u8; 4096];
        fill_page(&mut mixed[..2048], 1, 2, 30);
        fill_page(&mut mixed[2048..], 1, 2, 33);
        assert_eq!(
            mixed_values(&mixed, 1, 2),
            Some(vec![Value::Seq(30), Value::Seq(33)])
        );
        fill_page(&mut mixed[..8], 0, 2, 30);
        assert_eq!(mixed_values(&mixed, 1, 2), None, "a foreign word");
        // A word torn byte by byte between two versions is a byte mix of them.
        let (a, b) = (stamp(1, 2, 30).to_ne_bytes(), stamp(1, 2, 33).to_ne_bytes());
        let mut word = a;
        word[0] = b[0] ^ 0xff;
        let mut page_bytes = Vec::new();
        page_bytes.extend_from_slice(&[a[0], b[1], a[2], b[3], a[4], b[5], a[6], b[7]]);
        assert!(bytes_mix_of(
            &page_bytes,
            1,
            2,
            &[Value::Seq(30), Value::Seq(33)]
        ));
        assert!(
            !bytes_mix_of(&word, 1, 2, &[Value::Seq(30), Value::Seq(33)]),
            "a byte of neither"
        );
    }

    /// Found as a false "torn" through a mount with the kernel's cache in
    /// front: a read mixed two allowed versions, 256295 and 253231, one word
    /// byte by byte, which read as 256303 (0x3E92F: 0x3E927's high bytes,
    /// 0x3DD2F's low byte), a stamp no one wrote.
    #[test]
    fn a_copy_racing_a_write_may_tear_words_between_allowed_versions() {
        let mut page = PageHistory::default();
        page.begin(Value::Seq(253231), 253231);
        page.end(253231, 253242, 0);
        page.begin(Value::Seq(256295), 256295);
        let (old, new) = (
            stamp(2, 14, 253231).to_ne_bytes(),
            stamp(2, 14, 256295).to_ne_bytes(),
        );
        let mut torn_word = new;
        torn_word[0] = old[0];
        assert_eq!(u64::from_ne_bytes(torn_word), stamp(2, 14, 256303));
        let mut read = vec![0u8; 4096];
        fill_page(&mut read[..1024], 2, 14, 256295);
        fill_page(&mut read[1024..], 2, 14, 253231);
        read[2048..2056].copy_from_slice(&torn_word);
        // As whole words: a value no change made, so not allowed.
        let values = mixed_values(&read, 2, 14).unwrap();
        assert!(values.contains(&Value::Seq(256303)));
        assert!(!page.allows(Value::Seq(256303), 256307, 256312));
        // As bytes: each from a version the read may return.
        assert!(page.allows_byte_mix(&read, 2, 14, 256307, 256312));
        // Once the new write has ended before the read, the old version is
        // stale, and so is a page holding any byte of it.
        page.end(256295, 256300, 0);
        assert!(!page.allows_byte_mix(&read, 2, 14, 256307, 256312));
        let mut current = vec![0u8; 4096];
        fill_page(&mut current, 2, 14, 256295);
        assert!(page.allows_byte_mix(&current, 2, 14, 256307, 256312));
    }

    #[test]
    fn only_map_stores_overlapping_a_read_excuse_a_mixed_page() {
        let mut page = PageHistory::default();
        page.begin(Value::Seq(10), 10);
        page.end(10, 20, 0);
        assert!(
            !page.map_store_overlaps(15, 18),
            "a write through the API is atomic"
        );
        page.begin_map_store(Value::Seq(30), 30);
        assert!(page.map_store_overlaps(35, 36), "in flight");
        page.end(30, 40, 0);
        assert!(page.map_store_overlaps(35, 45));
        assert!(
            !page.map_store_overlaps(41, 45),
            "ended before the read began"
        );
        assert!(
            !page.map_store_overlaps(5, 29),
            "started after the read ended"
        );
    }

    /// A change of a test's page history, by what made it.
    #[derive(Clone, Copy)]
    enum Made {
        Write,
        MapStore,
        LibraryPunch,
        KernelPunch,
    }

    /// The history of changes `(made, start, end)`, each with value
    /// `Seq(start)` (punches: zeroes), begun and ended in the order of their
    /// ticks, nothing pruned.
    fn history_of(changes: &[(Made, u64, u64)]) -> PageHistory {
        let mut ticks: Vec<(u64, Option<Made>, u64)> = Vec::new();
        for &(made, start, end) in changes {
            ticks.push((start, Some(made), start));
            ticks.push((end, None, start));
        }
        ticks.sort_by_key(|&(tick, _, _)| tick);
        let mut page = PageHistory::default();
        for (tick, begins, start) in ticks {
            match begins {
                Some(Made::Write) => page.begin(Value::Seq(start), start),
                Some(Made::MapStore) => page.begin_map_store(Value::Seq(start), start),
                Some(Made::LibraryPunch) => page.begin(Value::Zero, start),
                Some(Made::KernelPunch) => page.begin_kernel_fallocate(start),
                None => page.end(start, tick, 0),
            }
        }
        page
    }

    #[test]
    fn a_map_store_lost_to_a_kernel_fallocate_is_allowed_only_so() {
        use Made::*;
        // A kernel punch over [10, 50]; map stores over [20, 22] and [30, 32]
        // during it; a read over [60, 61] returns the first.
        let stores = |punch| history_of(&[(punch, 10, 50), (MapStore, 20, 22), (MapStore, 30, 32)]);
        let page = stores(KernelPunch);
        assert!(!page.allows(Value::Seq(20), 60, 61), "stale by the order");
        assert!(page.allows_kernel_fallocate_loss(Value::Seq(20), 60, 61));
        assert!(page.allows(Value::Seq(30), 60, 61) && page.allows(Value::Zero, 60, 61));
        // A punch the library made drops no store so.
        let page = stores(LibraryPunch);
        assert!(!page.allows_kernel_fallocate_loss(Value::Seq(20), 60, 61));
        // What the file keeps may be a write during the punch too...
        let page = history_of(&[(KernelPunch, 10, 50), (Write, 20, 22), (MapStore, 30, 32)]);
        assert!(page.allows_kernel_fallocate_loss(Value::Seq(20), 60, 61));
        // ...but only a store through a map is lost so,
        let page = history_of(&[(KernelPunch, 10, 50), (MapStore, 20, 22), (Write, 30, 32)]);
        assert!(!page.allows_kernel_fallocate_loss(Value::Seq(20), 60, 61));
        // ...only one made during the punch,
        let page = history_of(&[
            (KernelPunch, 10, 25),
            (MapStore, 20, 22),
            (MapStore, 30, 32),
        ]);
        assert!(!page.allows_kernel_fallocate_loss(Value::Seq(20), 60, 61));
        // ...and a version ended before the punch began was punched.
        let page = history_of(&[(Write, 5, 8), (KernelPunch, 10, 50), (MapStore, 30, 32)]);
        assert!(!page.allows_kernel_fallocate_loss(Value::Seq(5), 60, 61));
        // A write after the punch replaces the kept store for good, and
        // pruning then forgets it.
        let mut page = stores(KernelPunch);
        page.begin(Value::Seq(70), 70);
        page.end(70, 72, 80);
        assert!(!page.allows_kernel_fallocate_loss(Value::Seq(20), 90, 91));
        assert!(!page.describe().contains("Seq(20)"), "{}", page.describe());
    }

    #[test]
    fn pruning_keeps_what_reads_in_flight_can_see() {
        let mut page = PageHistory::default();
        for start in (10..100).step_by(10) {
            page.begin(Value::Seq(start), start);
            // The oldest read in flight started at 26.
            page.end(start, start + 5, 26);
        }
        // Changes overwritten before 26 are gone; a read from 26 on can still see
        // the write of [20, 25] and everything after.
        assert!(page.allows(Value::Seq(20), 26, 200));
        assert!(!page.allows(Value::Seq(10), 26, 200));
        assert_eq!(page.len(), 8);
    }
}
