//! Vectored reads and writes (`Mapping::read_vectored_at`,
//! `write_vectored_at`): the same bytes as the plain calls, however the
//! buffers are cut; one coherence-mode acquisition for the whole call, so no
//! punch falls between two buffers of one write; each page copied in one
//! step even when the buffers split it; bad input refused with nothing
//! changed.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use filemap::{Mapping, MemDevice, PageCache, Strategy as LockStrategy, Volume, PAGE_SIZE};
use proptest::prelude::*;

const PAGE: u64 = PAGE_SIZE as u64;

/// A new empty file on a volume in memory, under `strategy` (the cache is
/// returned to keep it).
fn new_file(strategy: LockStrategy) -> (PageCache, Arc<Mapping>) {
    let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).unwrap();
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(64 * PAGE)
        .build()
        .unwrap();
    let file = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    (cache, file)
}

/// `bytes` cut at `cuts` (sorted, each at most `bytes.len()`): the pieces,
/// some perhaps empty.
fn pieces_mut<'a>(mut bytes: &'a mut [u8], cuts: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for &cut in cuts {
        let (piece, rest) = bytes.split_at_mut(cut - at);
        pieces.push(IoSliceMut::new(piece));
        bytes = rest;
        at = cut;
    }
    pieces.push(IoSliceMut::new(bytes));
    pieces
}

fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<IoSlice<'a>> {
    let mut at = 0;
    let mut pieces: Vec<_> = cuts
        .iter()
        .map(|&cut| {
            let piece = IoSlice::new(&bytes[at..cut]);
            at = cut;
            piece
        })
        .collect();
    pieces.push(IoSlice::new(&bytes[at..]));
    pieces
}

/// A vectored call: where in the file, how many bytes, and where its buffers
/// are cut (fractions of the length, so that cuts land anywhere, page
/// boundaries and empty buffers included).
#[derive(Clone, Debug)]
struct Call {
    write: bool,
    offset: u64,
    len: usize,
    cuts: Vec<f64>,
    fill: u8,
}

fn call() -> impl Strategy<Value = Call> {
    (
        any::<bool>(),
        0..12 * PAGE,
        0..4 * PAGE_SIZE,
        prop::collection::vec(0.0..=1.0f64, 0..5),
        any::<u8>(),
    )
        .prop_map(|(write, offset, len, cuts, fill)| Call {
            write,
            offset,
            len,
            cuts,
            fill,
        })
}

impl Call {
    fn cuts(&self) -> Vec<usize> {
        let mut cuts: Vec<usize> = self
            .cuts
            .iter()
            .map(|&at| (at * self.len as f64) as usize)
            .collect();
        cuts.sort_unstable();
        cuts
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Against a byte vector: what the vectored calls leave and return is
    /// what plain `pwrite`/`pread` semantics give.
    #[test]
    fn vectored_calls_match_a_model(calls in prop::collection::vec(call(), 1..24)) {
        let (_cache, file) = new_file(LockStrategy::Range);
        let mut model: Vec<u8> = Vec::new();
        for call in &calls {
            let cuts = call.cuts();
            let offset = call.offset as usize;
            if call.write {
                // Every byte different, so a piece put in the wrong place shows.
                let data: Vec<u8> = (0..call.len).map(|i| call.fill.wrapping_add(i as u8)).collect();
                let written = file.write_vectored_at(&pieces(&data, &cuts), call.offset).unwrap();
                prop_assert_eq!(written, call.len);
                if call.len > 0 {
                    if model.len() < offset + call.len {
                        model.resize(offset + call.len, 0);
                    }
                    model[offset..offset + call.len].copy_from_slice(&data);
                }
            } else {
                let mut got = vec![0xee; call.len];
                let n = file.read_vectored_at(&mut pieces_mut(&mut got, &cuts), call.offset).unwrap();
                let expected = model.get(offset..).map_or(&[][..], |rest| &rest[..rest.len().min(call.len)]);
                prop_assert_eq!(n, expected.len());
                prop_assert_eq!(&got[..n], expected);
            }
            prop_assert_eq!(file.len(), model.len() as u64);
        }
        // And a plain read of everything agrees.
        let mut all = vec![0; model.len()];
        file.read_exact_at(&mut all, 0).unwrap();
        prop_assert_eq!(all, model);
    }
}

#[test]
fn a_read_past_the_end_of_file_stops_there() {
    let (_cache, file) = new_file(LockStrategy::Range);
    file.write_all_at(&[7; 5000], 0).unwrap();
    let (mut a, mut b) = ([0u8; 4000], [0u8; 4000]);
    let n = file
        .read_vectored_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 100)
        .unwrap();
    assert_eq!(n, 4900);
    assert_eq!(a, [7; 4000]);
    assert_eq!(b[..900], [7; 900]);
    assert_eq!(
        b[900..],
        [0; 3100],
        "nothing past the end of file is written"
    );
    let n = file
        .read_vectored_at(&mut [IoSliceMut::new(&mut a)], 5000)
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let (cache, file) = new_file(LockStrategy::Range);
    file.write_all_at(&[1; 100], 0).unwrap();
    let data = [2u8; 10];
    let bufs = [IoSlice::new(&data), IoSlice::new(&data)];
    // Past the largest offset: EINVAL, as pwritev.
    let error = file.write_vectored_at(&bufs, u64::MAX - 5).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
    let error = file
        .write_vectored_at(&bufs, file.max_file_size())
        .unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EFBIG));
    let mut buf = [0u8; 10];
    let error = file
        .read_vectored_at(&mut [IoSliceMut::new(&mut buf)], u64::MAX - 5)
        .unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
    assert_eq!(file.len(), 100);
    let mut back = [0u8; 100];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [1; 100]);
    // No buffers, or only empty ones: nothing to do.
    assert_eq!(file.write_vectored_at(&[], 0).unwrap(), 0);
    assert_eq!(file.write_vectored_at(&[IoSlice::new(&[])], 0).unwrap(), 0);
    assert_eq!(file.read_vectored_at(&mut [], 0).unwrap(), 0);
    assert_eq!(cache.stats().dirty_bytes, PAGE);
}

#[test]
fn a_write_over_the_callers_own_pin_is_refused_with_edeadlk() {
    let (_cache, file) = new_file(LockStrategy::Range);
    file.write_all_at(&[1; 3 * PAGE_SIZE], 0).unwrap();
    let pin = file.pin(1).unwrap();
    let data = [2u8; PAGE_SIZE];
    let bufs = [IoSlice::new(&data), IoSlice::new(&data)];
    let error = file.write_vectored_at(&bufs, 100).unwrap_err();
    assert_eq!(filemap::errno(&error), Some(libc::EDEADLK));
    assert_eq!(pin[..], [1; PAGE_SIZE]);
    drop(pin);
    let mut back = vec![0u8; 3 * PAGE_SIZE];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&byte| byte == 1), "nothing was written");
}

/// Two threads in lock step for `rounds` rounds: `a` and `b` run together
/// each round, then `check` looks at the result alone.
fn race(
    rounds: usize,
    a: impl Fn(usize) + Send + Sync,
    b: impl Fn(usize) + Send + Sync,
    mut check: impl FnMut(usize),
) {
    let start = Barrier::new(3);
    let end = Barrier::new(3);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for side in [&a as &(dyn Fn(usize) + Send + Sync), &b] {
            let (start, end, done) = (&start, &end, &done);
            scope.spawn(move || {
                let mut round = 0;
                loop {
                    start.wait();
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    side(round);
                    end.wait();
                    round += 1;
                }
            });
        }
        for round in 0..rounds {
            start.wait();
            end.wait();
            check(round);
        }
        done.store(true, Ordering::Relaxed);
        start.wait();
    });
}

/// The file's first `pages` pages, each reduced to its one byte value (or
/// `None` if a page holds more than one).
fn page_values(file: &Mapping, pages: usize) -> Vec<Option<u8>> {
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    let n = file.read_at(&mut bytes, 0).unwrap();
    bytes[n..].fill(0);
    bytes
        .chunks(PAGE_SIZE)
        .map(|page| page.iter().all(|&b| b == page[0]).then_some(page[0]))
        .collect()
}

#[test]
fn a_punch_never_falls_between_the_buffers_of_one_write() {
    // With the mode taken per buffer, a punch of the range could land
    // between two buffers: the file would then end with the pages of the
    // buffers after it written and those before it a hole.
    const PAGES: usize = 32;
    let (_cache, file) = new_file(LockStrategy::Range);
    file.write_all_at(&[0; PAGES * PAGE_SIZE], 0).unwrap();
    let mut mixed = 0;
    let value = |round: usize| (round % 250) as u8 + 1;
    race(
        2000,
        |round| {
            let page = [value(round); PAGE_SIZE];
            let bufs = [IoSlice::new(&page); PAGES];
            file.write_vectored_at(&bufs, 0).unwrap();
        },
        |_| file.punch_hole(0, PAGES as u64 * PAGE).unwrap(),
        |round| {
            let values = page_values(&file, PAGES);
            if values != [Some(value(round)); PAGES] && values != [Some(0); PAGES] {
                mixed += 1;
            }
        },
    );
    assert_eq!(mixed, 0, "rounds that ended half punched, half written");
}

/// Whether `read` of page 0 ever returns a page of more than one byte value
/// (over 200,000 reads) while another thread rewrites the page whole with
/// `write(value)`, one value after another.
fn a_read_sees_a_torn_page(
    file: &Mapping,
    write: impl Fn(&Mapping, u8) + Sync,
    mut read: impl FnMut(&Mapping, &mut [u8; PAGE_SIZE]),
) -> bool {
    file.write_all_at(&[0; PAGE_SIZE], 0).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut value = 0u8;
            while !stop.load(Ordering::Relaxed) {
                value = value.wrapping_add(1);
                write(file, value);
            }
        });
        let mut page = [0u8; PAGE_SIZE];
        let torn = (0..200_000).any(|_| {
            read(file, &mut page);
            page.iter().any(|&byte| byte != page[0])
        });
        stop.store(true, Ordering::Relaxed);
        torn
    })
}

#[test]
fn a_page_split_across_buffers_is_read_in_one_version() {
    // A reader whose buffers cut page 0 in two copies the page whole once;
    // copied as two pieces, the halves could come from two writes.
    let (_cache, file) = new_file(LockStrategy::Range);
    let torn = a_read_sees_a_torn_page(
        &file,
        |file, value| file.write_all_at(&[value; PAGE_SIZE], 0).unwrap(),
        |file, page| {
            let n = file
                .read_vectored_at(&mut pieces_mut(page, &[1000]), 0)
                .unwrap();
            assert_eq!(n, PAGE_SIZE);
        },
    );
    assert!(!torn, "a read saw two versions of one page");
}

#[test]
fn a_page_split_across_buffers_is_written_in_one_step() {
    let (_cache, file) = new_file(LockStrategy::Range);
    let torn = a_read_sees_a_torn_page(
        &file,
        |file, value| {
            let page = [value; PAGE_SIZE];
            file.write_vectored_at(&pieces(&page, &[1000, 3000]), 0)
                .unwrap();
        },
        |file, page| file.read_exact_at(page, 0).unwrap(),
    );
    assert!(!torn, "a reader saw a page half written");
}
