//! Random sequences of every `Mapping` operation, checked against an in-memory
//! reference model of a file (its bytes; the size is their count).
//!
//! The model implements the documented semantics of each call: `pwrite` extends,
//! punch keeps the size, zero range extends it, `set_len` truncates or grows,
//! collapse and insert shift the rest of the file by whole pages, direct I/O
//! needs page-aligned offsets and lengths and a 512-aligned buffer, and a call
//! that fails its argument checks (`EINVAL`, `EFBIG`) changes nothing. A backend
//! that cannot shift ranges must fail collapse and insert with `EOPNOTSUPP` once
//! the arguments pass, again changing nothing.
//!
//! For every step the test compares the call's result (the count and bytes of a
//! read, the count of a write, or the errno of a failure) and then `len()`. At
//! the end of each case it reads the whole file back, runs `sync_all`, and opens
//! the same file through a fresh `PageCache` to check that the backend holds
//! exactly the model's bytes.
//!
//! Arguments are mostly small and unaligned (crossing page boundaries, ending at
//! page edges, starting past the end of file), sometimes page-aligned (so that
//! collapse, insert and direct I/O both succeed and fail their alignment checks),
//! and rarely near `u64::MAX` (overflow and `EFBIG`). One test runs the cases on
//! a `Volume` file over a `MemDevice`, another runs cases of the same generator
//! on a `HostFile` in a temporary directory; the model does not depend on the
//! backend. Each case also picks the coherence strategy and fill batch: a lone
//! thread must see the same behaviour under every strategy.

use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};

use filemap::backend::HostFile;
use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
use filemap::page::{start_of, PAGE};
use filemap::{Backend, Mapping, MemDevice, PageCache, Volume};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Most offsets and lengths fall below this.
const SPAN: u64 = 80 * 1024;
/// Cases per backend; `cargo test --workspace --release` runs both backends.
const CASES_PER_BACKEND: u32 = 5_000;
const FILE_NAME: &str = "file";

// ---------------------------------------------------------------------------
// Operations and their generation

/// One call on a `Mapping`. `at` is the byte offset, `len` the byte length,
/// `seed` picks the bytes written, `misalign` how far past a multiple of
/// `DIRECT_IO_MEMORY_ALIGN` the buffer starts.
#[derive(Clone, Debug)]
enum Op {
    Write {
        at: u64,
        len: usize,
        seed: u8,
    },
    WriteAll {
        at: u64,
        len: usize,
        seed: u8,
    },
    Read {
        at: u64,
        len: usize,
    },
    ReadExact {
        at: u64,
        len: usize,
    },
    Readahead {
        at: u64,
        len: u64,
    },
    ReadDirect {
        at: u64,
        len: usize,
    },
    WriteDirect {
        at: u64,
        len: usize,
        seed: u8,
    },
    ReadDirectMisaligned {
        at: u64,
        len: usize,
        misalign: usize,
    },
    WriteDirectMisaligned {
        at: u64,
        len: usize,
        misalign: usize,
        seed: u8,
    },
    PunchHole {
        at: u64,
        len: u64,
    },
    ZeroRange {
        at: u64,
        len: u64,
    },
    SetLen {
        len: u64,
    },
    CollapseRange {
        at: u64,
        len: u64,
    },
    InsertRange {
        at: u64,
        len: u64,
    },
    InvalidateRange {
        at: u64,
        len: u64,
    },
    SyncRange {
        at: u64,
        len: u64,
    },
    SyncAll,
}

/// One generated case: the cache's settings and the calls to make.
#[derive(Clone, Debug)]
struct Case {
    strategy: filemap::Strategy,
    fill_batch_pages: usize,
    ops: Vec<Op>,
}

/// Values near `u64::MAX` or past every backend's largest file size.
fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..2 * PAGE).prop_map(|below| u64::MAX - below),
        (0..2 * PAGE).prop_map(|past| (1 << 63) + past),
        (0..4u64).prop_map(|pages| (u64::MAX / PAGE - pages) * PAGE),
    ]
}

/// A page-aligned offset or length of up to `pages` pages.
fn aligned(pages: u64) -> impl Strategy<Value = u64> {
    (0..=pages).prop_map(|n| n * PAGE)
}

/// Within two bytes of a page boundary below `SPAN`.
fn near_page_edge() -> impl Strategy<Value = u64> {
    (0..=SPAN / PAGE, -2i64..=2)
        .prop_map(|(page, delta)| start_of(page).saturating_add_signed(delta))
}

/// An offset: mostly small and unaligned, sometimes at or near a page boundary,
/// rarely huge.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0..SPAN,
        3 => near_page_edge(),
        3 => aligned(SPAN / PAGE),
        1 => huge(),
    ]
}

/// A length for a buffer (so never huge).
fn buffer_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..3 * PAGE,
        2 => 0..SPAN,
        2 => near_page_edge(),
        2 => aligned(8),
    ]
}

/// `(offset, length)` of a buffered read or write: includes ranges that end
/// exactly at a page boundary.
fn buffer_range() -> impl Strategy<Value = (u64, usize)> {
    prop_oneof![
        6 => (offset(), buffer_len()),
        2 => (0..SPAN, 0..4u64).prop_map(|(at, pages)| (at, (at / PAGE + 1 + pages) * PAGE - at)),
    ]
    .prop_map(|(at, len)| (at, len as usize))
}

/// `(offset, length)` of a range operation: the buffer ranges plus huge
/// lengths.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        8 => buffer_range().prop_map(|(at, len)| (at, len as u64)),
        1 => (offset(), huge()),
    ]
}

/// `(offset, length)` of collapse and insert: mostly page-aligned (and so
/// mostly valid), sometimes not, rarely huge.
fn shift_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        6 => (aligned(20), aligned(6)),
        2 => range(),
        1 => (aligned(20), huge()),
    ]
}

/// `(offset, length)` of direct I/O: mostly page-aligned, sometimes not, rarely
/// at a huge offset. Lengths stay small enough to allocate.
fn direct_range() -> impl Strategy<Value = (u64, usize)> {
    prop_oneof![
        6 => (aligned(24), aligned(8)),
        2 => buffer_range().prop_map(|(at, len)| (at, len as u64)),
        1 => (huge(), aligned(4)),
    ]
    .prop_map(|(at, len)| (at, len as usize))
}

fn op() -> impl Strategy<Value = Op> {
    let seed = any::<u8>;
    let misalign = || 1..DIRECT_IO_MEMORY_ALIGN;
    prop_oneof![
        8 => (buffer_range(), seed()).prop_map(|((at, len), seed)| Op::Write { at, len, seed }),
        2 => (buffer_range(), seed()).prop_map(|((at, len), seed)| Op::WriteAll { at, len, seed }),
        8 => buffer_range().prop_map(|(at, len)| Op::Read { at, len }),
        3 => buffer_range().prop_map(|(at, len)| Op::ReadExact { at, len }),
        2 => range().prop_map(|(at, len)| Op::Readahead { at, len }),
        3 => direct_range().prop_map(|(at, len)| Op::ReadDirect { at, len }),
        3 => (direct_range(), seed())
            .prop_map(|((at, len), seed)| Op::WriteDirect { at, len, seed }),
        1 => (direct_range(), misalign())
            .prop_map(|((at, len), misalign)| Op::ReadDirectMisaligned { at, len, misalign }),
        1 => (direct_range(), misalign(), seed()).prop_map(|((at, len), misalign, seed)| {
            Op::WriteDirectMisaligned { at, len, misalign, seed }
        }),
        4 => range().prop_map(|(at, len)| Op::PunchHole { at, len }),
        4 => range().prop_map(|(at, len)| Op::ZeroRange { at, len }),
        3 => prop_oneof![
            5 => 0..SPAN,
            2 => aligned(SPAN / PAGE),
            2 => near_page_edge(),
            1 => huge(),
        ]
        .prop_map(|len| Op::SetLen { len }),
        3 => shift_range().prop_map(|(at, len)| Op::CollapseRange { at, len }),
        3 => shift_range().prop_map(|(at, len)| Op::InsertRange { at, len }),
        3 => range().prop_map(|(at, len)| Op::InvalidateRange { at, len }),
        2 => range().prop_map(|(at, len)| Op::SyncRange { at, len }),
        1 => Just(Op::SyncAll),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..filemap::Strategy::ALL.len(),
        prop_oneof![Just(32usize), Just(1), Just(3)],
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(strategy, fill_batch_pages, ops)| Case {
            strategy: filemap::Strategy::ALL[strategy],
            fill_batch_pages,
            ops,
        })
}

// ---------------------------------------------------------------------------
// Results

/// What a call returned, in a form the model can predict.
#[derive(PartialEq, Eq)]
enum Outcome {
    /// `Ok(())`.
    Done,
    /// `Ok(n)` of a write.
    Wrote(usize),
    /// The bytes a read returned (`Ok(n)`: the first `n` bytes of its buffer).
    Bytes(Vec<u8>),
    /// An error with this errno.
    Errno(i32),
    /// `ErrorKind::UnexpectedEof` of `read_exact_at`.
    UnexpectedEof,
    /// Any other error (never predicted).
    Unexpected(String),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done => write!(f, "Ok(())"),
            Outcome::Wrote(n) => write!(f, "Ok({n})"),
            Outcome::Bytes(bytes) => write!(f, "Ok({} bytes)", bytes.len()),
            Outcome::Errno(errno) => write!(f, "Err({})", io::Error::from_raw_os_error(*errno)),
            Outcome::UnexpectedEof => write!(f, "Err(UnexpectedEof)"),
            Outcome::Unexpected(error) => write!(f, "Err({error})"),
        }
    }
}

impl Outcome {
    fn of_error(error: io::Error) -> Outcome {
        match (error.raw_os_error(), error.kind()) {
            (Some(errno), _) => Outcome::Errno(errno),
            (None, io::ErrorKind::UnexpectedEof) => Outcome::UnexpectedEof,
            (None, _) => Outcome::Unexpected(format!("{error:?}")),
        }
    }

    fn of<T>(result: io::Result<T>, ok: impl FnOnce(T) -> Outcome) -> Outcome {
        result.map_or_else(Outcome::of_error, ok)
    }
}

/// Where two byte strings of equal length first differ.
fn first_difference(actual: &[u8], expected: &[u8]) -> Option<usize> {
    actual.iter().zip(expected).position(|(a, b)| a != b)
}

/// Fails unless `actual == expected`, describing the first differing byte.
fn check_bytes(actual: &[u8], expected: &[u8], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(actual.len(), expected.len(), "{}: byte count", what);
    if let Some(at) = first_difference(actual, expected) {
        return Err(TestCaseError::fail(format!(
            "{what}: byte {at} is {}, expected {} ({} bytes compared)",
            actual[at],
            expected[at],
            actual.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The reference model

/// `len` bytes, none of them zero, that differ with `seed` and do not repeat
/// every page (so data shifted by whole pages reads differently).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed as usize * 7) % 251) as u8 + 1)
        .collect()
}

/// The file as the documentation says it must be: its bytes, the size being
/// their count.
struct Model {
    bytes: Vec<u8>,
    max_file_size: u64,
    /// Whether the backend implements collapse and insert.
    shifts_ranges: bool,
}

const EINVAL: Outcome = Outcome::Errno(libc::EINVAL);
const EFBIG: Outcome = Outcome::Errno(libc::EFBIG);

impl Model {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Grows the file with zeroes to at least `end` bytes.
    fn extend(&mut self, end: u64) {
        if end > self.size() {
            self.bytes.resize(end as usize, 0);
        }
    }

    /// The bytes of `at..at + len` inside the file.
    fn read(&self, at: u64, len: u64) -> Vec<u8> {
        let size = self.size();
        if at >= size {
            return Vec::new();
        }
        self.bytes[at as usize..at.saturating_add(len).min(size) as usize].to_vec()
    }

    fn write(&mut self, at: u64, data: &[u8]) {
        self.extend(at + data.len() as u64);
        self.bytes[at as usize..at as usize + data.len()].copy_from_slice(data);
    }

    /// The result of `op`, applying it if it succeeds. The checks follow the
    /// kernel's order: the range (`rw_verify_area`, `vfs_fallocate`), then the
    /// largest file size, then alignment and the call's own rules.
    fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Write { at, len, seed } | Op::WriteAll { at, len, seed } => {
                let all = matches!(op, Op::WriteAll { .. });
                // `write_all_at` of nothing calls nothing, as std's does.
                if all && len == 0 {
                    return Outcome::Done;
                }
                if io_end(at, len as u64).is_none() {
                    return EINVAL;
                }
                if len == 0 {
                    return Outcome::Wrote(0);
                }
                if at >= self.max_file_size {
                    return EFBIG;
                }
                // Cut short at the largest size; `write_all_at` then tries the
                // rest there and fails.
                let n = len.min((self.max_file_size - at) as usize);
                self.write(at, &pattern(seed, len)[..n]);
                match (all, n == len) {
                    (false, _) => Outcome::Wrote(n),
                    (true, true) => Outcome::Done,
                    (true, false) => EFBIG,
                }
            }
            Op::Read { at, len } => match io_end(at, len as u64) {
                None => EINVAL,
                Some(_) => Outcome::Bytes(self.read(at, len as u64)),
            },
            Op::ReadExact { at, len } => match io_end(at, len as u64) {
                _ if len == 0 => Outcome::Bytes(Vec::new()),
                None => EINVAL,
                Some(end) if end > self.size() => Outcome::UnexpectedEof,
                Some(_) => Outcome::Bytes(self.read(at, len as u64)),
            },
            // As `readahead(2)`: any offset, and only a length past 2^63 - 1 fails.
            Op::Readahead { len, .. } if len > MAX_OFFSET => EINVAL,
            Op::Readahead { .. } => Outcome::Done,
            Op::InvalidateRange { at, len } | Op::SyncRange { at, len } => match io_end(at, len) {
                None => EINVAL,
                Some(_) => Outcome::Done,
            },
            Op::ReadDirect { at, len } | Op::ReadDirectMisaligned { at, len, .. } => {
                if io_end(at, len as u64).is_none() {
                    return EINVAL;
                }
                if len == 0 {
                    return Outcome::Bytes(Vec::new());
                }
                if matches!(op, Op::ReadDirectMisaligned { .. })
                    || at % PAGE != 0
                    || len as u64 % PAGE != 0
                {
                    return EINVAL;
                }
                Outcome::Bytes(self.read(at, len as u64))
            }
            Op::WriteDirect { at, len, seed } | Op::WriteDirectMisaligned { at, len, seed, .. } => {
                if io_end(at, len as u64).is_none() {
                    return EINVAL;
                }
                if len == 0 {
                    return Outcome::Wrote(0);
                }
                if at >= self.max_file_size {
                    return EFBIG;
                }
                let n = len.min((self.max_file_size - at) as usize);
                if matches!(op, Op::WriteDirectMisaligned { .. })
                    || at % PAGE != 0
                    || n as u64 % PAGE != 0
                {
                    return EINVAL;
                }
                self.write(at, &pattern(seed, len)[..n]);
                Outcome::Wrote(n)
            }
            Op::PunchHole { at, len } => {
                let end = match self.fallocate_end(at, len) {
                    Ok(end) => end,
                    Err(outcome) => return outcome,
                };
                let size = self.size();
                if at < size {
                    self.bytes[at as usize..end.min(size) as usize].fill(0);
                }
                Outcome::Done
            }
            Op::ZeroRange { at, len } => {
                let end = match self.fallocate_end(at, len) {
                    Ok(end) => end,
                    Err(outcome) => return outcome,
                };
                self.extend(end);
                self.bytes[at as usize..end as usize].fill(0);
                Outcome::Done
            }
            Op::SetLen { len } => {
                if len > MAX_OFFSET {
                    return EINVAL;
                }
                if len > self.max_file_size {
                    return EFBIG;
                }
                self.bytes.resize(len as usize, 0);
                Outcome::Done
            }
            Op::CollapseRange { at, len } => {
                let end = match self.fallocate_end(at, len) {
                    Ok(end) => end,
                    Err(outcome) => return outcome,
                };
                if at % PAGE != 0 || len % PAGE != 0 || end >= self.size() {
                    return EINVAL;
                }
                if !self.shifts_ranges {
                    return Outcome::Errno(libc::EOPNOTSUPP);
                }
                self.bytes.drain(at as usize..end as usize);
                Outcome::Done
            }
            Op::InsertRange { at, len } => {
                if let Err(outcome) = self.fallocate_end(at, len) {
                    return outcome;
                }
                if at % PAGE != 0 || len % PAGE != 0 {
                    return EINVAL;
                }
                if self.size() + len > self.max_file_size {
                    return EFBIG;
                }
                if at >= self.size() {
                    return EINVAL;
                }
                if !self.shifts_ranges {
                    return Outcome::Errno(libc::EOPNOTSUPP);
                }
                let at = at as usize;
                self.bytes
                    .splice(at..at, std::iter::repeat_n(0, len as usize));
                Outcome::Done
            }
            Op::SyncAll => Outcome::Done,
        }
    }

    /// The end of a `fallocate` range, or its error: `EINVAL` for an offset
    /// or length past 2^63 - 1 or a length of 0, `EFBIG` for an end past the
    /// largest file size.
    fn fallocate_end(&self, at: u64, len: u64) -> Result<u64, Outcome> {
        if at > MAX_OFFSET || len == 0 || len > MAX_OFFSET {
            return Err(EINVAL);
        }
        at.checked_add(len)
            .filter(|&end| end <= self.max_file_size)
            .ok_or(EFBIG)
    }
}

/// The largest file offset: the kernel's `loff_t` is signed.
const MAX_OFFSET: u64 = i64::MAX as u64;

/// The end of a read or write range, `None` past [`MAX_OFFSET`].
fn io_end(at: u64, len: u64) -> Option<u64> {
    at.checked_add(len).filter(|&end| end <= MAX_OFFSET)
}

// ---------------------------------------------------------------------------
// The mapping under test

/// A buffer whose slice starts `misalign` bytes past a multiple of
/// `DIRECT_IO_MEMORY_ALIGN`.
struct DirectBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl DirectBuffer {
    fn new(len: usize, misalign: usize) -> Self {
        let storage = vec![0; len + 2 * DIRECT_IO_MEMORY_ALIGN];
        let address = storage.as_ptr() as usize;
        let start = (DIRECT_IO_MEMORY_ALIGN - address % DIRECT_IO_MEMORY_ALIGN)
            % DIRECT_IO_MEMORY_ALIGN
            + misalign;
        DirectBuffer {
            storage,
            start,
            len,
        }
    }

    fn holding(data: &[u8], misalign: usize) -> Self {
        let mut buf = DirectBuffer::new(data.len(), misalign);
        buf.as_mut().copy_from_slice(data);
        buf
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Makes the call `op` on `file`.
fn call(file: &Mapping, op: &Op) -> Outcome {
    let read_into = |mut buf: Vec<u8>, result: io::Result<usize>| {
        Outcome::of(result, |n| {
            buf.truncate(n);
            Outcome::Bytes(buf)
        })
    };
    let done = |result: io::Result<()>| Outcome::of(result, |()| Outcome::Done);
    match *op {
        Op::Write { at, len, seed } => {
            Outcome::of(file.write_at(&pattern(seed, len), at), Outcome::Wrote)
        }
        Op::WriteAll { at, len, seed } => done(file.write_all_at(&pattern(seed, len), at)),
        Op::Read { at, len } => {
            let mut buf = vec![0xEE; len];
            let result = file.read_at(&mut buf, at);
            read_into(buf, result)
        }
        Op::ReadExact { at, len } => {
            let mut buf = vec![0xEE; len];
            Outcome::of(file.read_exact_at(&mut buf, at), |()| Outcome::Bytes(buf))
        }
        Op::Readahead { at, len } => done(file.readahead(at, len)),
        Op::ReadDirect { at, len } => {
            let mut buf = DirectBuffer::new(len, 0);
            let result = file.read_direct(buf.as_mut(), at);
            read_into(buf.as_ref().to_vec(), result)
        }
        Op::ReadDirectMisaligned { at, len, misalign } => {
            let mut buf = DirectBuffer::new(len, misalign);
            let result = file.read_direct(buf.as_mut(), at);
            read_into(buf.as_ref().to_vec(), result)
        }
        Op::WriteDirect { at, len, seed } => {
            let buf = DirectBuffer::holding(&pattern(seed, len), 0);
            Outcome::of(file.write_direct(buf.as_ref(), at), Outcome::Wrote)
        }
        Op::WriteDirectMisaligned {
            at,
            len,
            misalign,
            seed,
        } => {
            let buf = DirectBuffer::holding(&pattern(seed, len), misalign);
            Outcome::of(file.write_direct(buf.as_ref(), at), Outcome::Wrote)
        }
        Op::PunchHole { at, len } => done(file.punch_hole(at, len)),
        Op::ZeroRange { at, len } => done(file.zero_range(at, len)),
        Op::SetLen { len } => done(file.set_len(len)),
        Op::CollapseRange { at, len } => done(file.collapse_range(at, len)),
        Op::InsertRange { at, len } => done(file.insert_range(at, len)),
        Op::InvalidateRange { at, len } => done(file.invalidate_range(at, len)),
        Op::SyncRange { at, len } => done(file.sync_range(at, len)),
        Op::SyncAll => done(file.sync_all()),
    }
}

/// The whole file as `read_at` returns it, checking that it stops at `len()`.
fn whole_file(file: &Mapping, what: &str) -> Result<Vec<u8>, TestCaseError> {
    let len = file.len() as usize;
    let mut buf = vec![0xEE; len + 100];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|error| TestCaseError::fail(format!("{what}: read_at failed: {error}")))?;
    prop_assert_eq!(n, len, "{}: read_at of the whole file returns len()", what);
    buf.truncate(n);
    Ok(buf)
}

/// A file to run a case on, and a way to open it again.
trait TestFile {
    /// The file's backend, for the mapping under test.
    fn backend(&self) -> Arc<dyn Backend>;
    /// A second handle on the same file, for a fresh cache.
    fn reopen(&self) -> Arc<dyn Backend>;
}

/// A file on a `Volume` over a `MemDevice`.
struct VolumeTestFile {
    volume: Arc<Volume>,
}

impl VolumeTestFile {
    fn new() -> Self {
        let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).unwrap();
        volume.create_file(FILE_NAME).unwrap();
        VolumeTestFile { volume }
    }
}

impl TestFile for VolumeTestFile {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.volume.open_file(FILE_NAME).unwrap())
    }

    fn reopen(&self) -> Arc<dyn Backend> {
        self.backend()
    }
}

/// A host file in a temporary directory of its own, removed with it.
struct HostTestFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl HostTestFile {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        HostFile::create(&path).unwrap();
        HostTestFile { _dir: dir, path }
    }
}

impl TestFile for HostTestFile {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(HostFile::open(&self.path).unwrap())
    }

    fn reopen(&self) -> Arc<dyn Backend> {
        self.backend()
    }
}

/// Whether a backend implements collapse and insert, asked of a scratch file.
fn shifts_ranges(scratch: &dyn Backend) -> bool {
    scratch.set_len(2 * PAGE).unwrap();
    match scratch.collapse_range(0, PAGE) {
        Ok(()) => true,
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        Err(error) => panic!("collapse_range of a two-page scratch file failed: {error}"),
    }
}

/// Runs `case` on a file from `new_file`, against the model.
fn check_case<F: TestFile>(
    case: &Case,
    new_file: impl FnOnce() -> F,
    shifts_ranges: bool,
) -> Result<(), TestCaseError> {
    let test_file = new_file();
    let cache = PageCache::builder()
        .strategy(case.strategy)
        .fill_batch_pages(case.fill_batch_pages)
        .budget_bytes(64 << 20)
        .build()
        .unwrap();
    let file = cache.open(test_file.backend()).unwrap();
    prop_assert_eq!(file.len(), 0, "a new file is empty");
    let mut model = Model {
        bytes: Vec::new(),
        max_file_size: file.max_file_size(),
        shifts_ranges,
    };
    for (step, op) in case.ops.iter().enumerate() {
        let expected = model.apply(op);
        let actual = call(&file, op);
        let what = format!("step {step}, {op:?}");
        match (&actual, &expected) {
            (Outcome::Bytes(actual), Outcome::Bytes(expected)) => {
                check_bytes(actual, expected, &what)?;
            }
            _ => prop_assert_eq!(actual, expected, "{}: result", what),
        }
        prop_assert_eq!(file.len(), model.size(), "{}: len() afterwards", what);
    }

    check_bytes(
        &whole_file(&file, "at the end")?,
        &model.bytes,
        "file at the end",
    )?;
    prop_assert_eq!(
        Outcome::of(file.sync_all(), |()| Outcome::Done),
        Outcome::Done
    );
    let fresh_cache = PageCache::builder().build().unwrap();
    let fresh = fresh_cache.open(test_file.reopen()).unwrap();
    prop_assert_eq!(fresh.len(), model.size(), "len() through a fresh cache");
    check_bytes(
        &whole_file(&fresh, "through a fresh cache")?,
        &model.bytes,
        "backend after sync_all",
    )?;
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES_PER_BACKEND,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn volume_shifts_ranges() -> bool {
    static SHIFTS: OnceLock<bool> = OnceLock::new();
    *SHIFTS.get_or_init(|| shifts_ranges(&*VolumeTestFile::new().backend()))
}

fn host_shifts_ranges() -> bool {
    static SHIFTS: OnceLock<bool> = OnceLock::new();
    *SHIFTS.get_or_init(|| shifts_ranges(&*HostTestFile::new().backend()))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn volume_file_matches_the_reference_model(case in case()) {
        check_case(&case, VolumeTestFile::new, volume_shifts_ranges())?;
    }

    #[test]
    fn host_file_matches_the_reference_model(case in case()) {
        check_case(&case, HostTestFile::new, host_shifts_ranges())?;
    }
}
