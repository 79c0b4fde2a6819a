//! A differential test of filemap against the Linux kernel.
//!
//! The same random sequence of calls goes to (a) a [`Mapping`] over one of
//! four backends and (b) a regular file of the host file system, through the
//! kernel's own calls:
//!
//! | filemap | kernel |
//! |---|---|
//! | `read_at`, `read_exact_at` | `pread` (std's `read_exact_at`) |
//! | `write_at`, `write_all_at` | `pwrite` (std's `write_all_at`) |
//! | `read_direct`, `write_direct` | `pread`/`pwrite` on an `O_DIRECT` descriptor (buffered, and `fdatasync` after writes, where the file system refuses `O_DIRECT`) |
//! | `punch_hole` | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` |
//! | `zero_range` | `fallocate(ZERO_RANGE)` |
//! | `set_len` | `ftruncate` |
//! | `collapse_range`, `insert_range` | `fallocate(COLLAPSE_RANGE)`, `fallocate(INSERT_RANGE)` |
//! | `readahead` | `readahead(2)` |
//! | `sync_range` | `sync_file_range(WAIT_BEFORE \| WRITE \| WAIT_AFTER)` |
//! | `sync_all` | `fsync` |
//! | `invalidate_range` | `fsync`, then `posix_fadvise(DONTNEED)` |
//! | `map`, `MapRegion::read`/`write`/`flush`, dropping a map | `mmap(MAP_SHARED)`, a copy from or to the map, `msync(MS_SYNC)`, `munmap` |
//!
//! After every call it compares what both returned (`Ok` or `Err`, the errno,
//! the count, the bytes read), the file's length, and the bytes of the range
//! the call touched, read back from both sides; now and then, and at the end,
//! the whole file (when it is at most [`DifferentialConfig::max_compare_bytes`];
//! a larger one is compared at its head and tail). Each sequence ends by
//! syncing, dropping every handle and opening the file again through a fresh
//! cache, which must still read as the kernel's file does: what the backend
//! holds is checked, not only what the cache shows.
//!
//! **What is generated.** Offsets and lengths are mostly small and unaligned
//! (sub-page, straddling pages, past the end of file, zero), often
//! page-aligned, and rarely hostile: at or above 2^63, near `u64::MAX`, and
//! near the largest file size. The two sides' largest sizes differ (filemap's
//! [`Mapping::max_file_size`], the host file system's `s_maxbytes`, found at
//! start by a binary search with one-byte writes), so such a position is
//! written `max-k` and resolved on each side; a file that grows that far is
//! compared by its distance from that side's largest size. Each sequence draws
//! its cache settings: a budget from one page to 64 MiB (mostly 1 to 32
//! pages, which is where eviction bugs live), the strategy of its row, either
//! eviction policy, a fill batch of 1 to 32 pages, 0 to 2 readahead threads,
//! and default or fast (10 ms) writeback. Memory maps of 1 to 16 pages are
//! created and dropped; loads and stores through them stay inside the end of
//! file (the kernel raises `SIGBUS` past it), and where a map reaches past the
//! end of file filemap's own `EFAULT` is checked alone. `reopen` syncs, drops
//! the cache, the mapping, every map and (on a volume) the [`Volume`], opens
//! it again from its device, and builds a cache with new settings. `close and
//! open` drops every map and the mapping without a sync and opens the file
//! again in the same cache, which finds the pages the close kept.
//!
//! **Known, deliberate difference.** Direct I/O in filemap needs offsets and
//! lengths that are multiples of 4096 and a buffer at a multiple of 512; the
//! kernel may accept 512-aligned I/O. Direct I/O that filemap's rule refuses
//! where the kernel would go on to do I/O is not sent to the kernel: filemap
//! must fail it with `EINVAL` and change nothing (the touched range is
//! compared afterwards). Everything the kernel checks before alignment goes
//! to both sides: empty calls (`Ok(0)`), ranges past 2^63 - 1 (`EINVAL`), and
//! writes at or past the largest size (`EFBIG`) or across it (cut short there,
//! which may leave an aligned write). `invalidate_range` has no kernel
//! counterpart with errors of its own: it must succeed (`EINVAL` only for a
//! range past 2^63 - 1) and change no byte. Such checks of filemap's own
//! documented rules are reported as `contract` divergences.
//!
//! **Divergences.** The first difference ends a sequence. It is classified
//! (errno mismatch, short write, short read, content mismatch, length
//! mismatch, contract, hang, panic), and the sequence is shrunk by delta
//! debugging (dropping chunks of calls down to single calls, simplifying
//! arguments and cache settings, over again while anything changes) for as
//! long as it still diverges the same way (same kind, call and, for errno
//! mismatches, results); the reproducer is printed as a list of calls with
//! both sides' results, the cache settings and the backend. A divergence
//! already reported, of a call that changes no byte (reads, readahead, syncs,
//! map creation and loads), does not end later sequences: it is counted and
//! the sequence goes on, so that a frequent one does not hide the rarer ones
//! behind it. Each sequence runs on a worker thread under a watchdog: a call
//! that makes no progress for [`DifferentialConfig::stall_seconds`] is
//! reported as a hang (the thread is left behind), and a panic as a panic.
//!
//! ```no_run
//! use filemap_torture::differential::{run, DifferentialConfig};
//! let config = DifferentialConfig { seconds: 5.0, ..DifferentialConfig::default() };
//! let report = run(&config, |_| {})?;
//! for divergence in &report.divergences {
//!     println!("{}", divergence.reproducer);
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{
    AlignedBuf, Backend, Device, EvictionPolicy, FileDevice, HostFile, MapAccess, MapRegion,
    Mapping, MemDevice, PageCache, Strategy, Volume,
};
use parking_lot::Mutex;
use serde::Serialize;

/// Memory maps alive at once, per side.
const MAP_SLOTS: usize = 2;
/// The size of every volume's device: far more than a sequence writes, so
/// that `ENOSPC` never shows up as a false divergence.
const DEVICE_BYTES: u64 = 64 << 20;
/// The most bytes read back from each side for one range a call touched.
const WINDOW_CAP: u64 = 1 << 20;
/// The head and tail compared of a file too large to compare whole.
const EDGE_BYTES: u64 = 2 << 20;
/// The name of the file on a volume.
const FILE_NAME: &str = "file";
/// How long a dropped volume may take to go (its last handle may be held a
/// moment by a cache thread).
const VOLUME_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Settings and report

/// What a [`Mapping`] of the differential test sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiffBackend {
    /// A [`Volume`] on a [`MemDevice`].
    VolumeMem,
    /// A [`Volume`] on an image file ([`FileDevice::create`]).
    VolumeFile,
    /// A [`Volume`] on an image file opened with `O_DIRECT`
    /// ([`FileDevice::with_direct_io`]).
    VolumeDirect,
    /// A [`HostFile`] on the host file system.
    HostFile,
}

impl DiffBackend {
    /// Every backend, in the order rows are reported.
    pub const ALL: [DiffBackend; 4] = [
        DiffBackend::VolumeMem,
        DiffBackend::VolumeFile,
        DiffBackend::VolumeDirect,
        DiffBackend::HostFile,
    ];

    /// The backend's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DiffBackend::VolumeMem => "volume-mem",
            DiffBackend::VolumeFile => "volume-file",
            DiffBackend::VolumeDirect => "volume-direct",
            DiffBackend::HostFile => "hostfile",
        }
    }

    /// The backend of this name, if any.
    pub fn from_name(name: &str) -> Option<DiffBackend> {
        DiffBackend::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Wraps each backend before the cache opens it (tests use it to break one
/// operation on purpose and check that the differential test notices).
pub type BackendWrapper = Arc<dyn Fn(Arc<dyn Backend>) -> Arc<dyn Backend> + Send + Sync>;

/// Selects divergences by kind and by the name of the call that showed them
/// (as in [`Divergence::op`]).
pub type DivergenceFilter = Arc<dyn Fn(DivergenceKind, &str) -> bool + Send + Sync>;

/// The settings of a differential run.
#[derive(Clone)]
pub struct DifferentialConfig {
    /// How long to generate and run sequences, shared round-robin by every
    /// (backend, strategy) pair; each pair runs at least one sequence.
    /// Shrinking comes on top.
    pub seconds: f64,
    /// The seed every sequence is drawn from (sequence `i` from a hash of the
    /// seed and `i`).
    pub seed: u64,
    /// The backends to cover.
    pub backends: Vec<DiffBackend>,
    /// The strategies to cover.
    pub strategies: Vec<Strategy>,
    /// The most calls in one sequence (each draws between a quarter of this
    /// and this many).
    pub ops_per_sequence: usize,
    /// Where the kernel's files, the host files and the image files go: a
    /// directory of the file system to compare with (a temporary directory if
    /// `None`). It must support `fallocate`'s punch, zero, collapse and insert.
    pub dir: Option<PathBuf>,
    /// A call that makes no progress for this long is a hang.
    pub stall_seconds: f64,
    /// How long shrinking one divergence may take.
    pub shrink_seconds: f64,
    /// How many distinct divergences to shrink (the rest are reported as
    /// found, unshrunk).
    pub max_shrunk: usize,
    /// Files up to this size are compared whole.
    pub max_compare_bytes: u64,
    /// Stop at the first divergence.
    pub stop_at_first: bool,
    /// If set, only the divergences it accepts are shrunk, and the run stops
    /// at the first of them.
    pub watch: Option<DivergenceFilter>,
    /// If set, every filemap backend goes through it.
    pub wrap_backend: Option<BackendWrapper>,
    /// Stop after this many sequences.
    pub max_sequences: Option<u64>,
}

impl Default for DifferentialConfig {
    fn default() -> Self {
        DifferentialConfig {
            seconds: 10.0,
            seed: 1,
            backends: DiffBackend::ALL.to_vec(),
            strategies: Strategy::ALL.to_vec(),
            ops_per_sequence: 120,
            dir: None,
            stall_seconds: 20.0,
            shrink_seconds: 30.0,
            max_shrunk: 16,
            max_compare_bytes: 16 << 20,
            stop_at_first: false,
            watch: None,
            wrap_backend: None,
            max_sequences: None,
        }
    }
}

impl fmt::Debug for DifferentialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DifferentialConfig")
            .field("seconds", &self.seconds)
            .field("seed", &self.seed)
            .field("backends", &self.backends)
            .field("strategies", &self.strategies)
            .field("ops_per_sequence", &self.ops_per_sequence)
            .field("dir", &self.dir)
            .field("stall_seconds", &self.stall_seconds)
            .field("shrink_seconds", &self.shrink_seconds)
            .field("max_shrunk", &self.max_shrunk)
            .field("max_compare_bytes", &self.max_compare_bytes)
            .field("stop_at_first", &self.stop_at_first)
            .field("watch", &self.watch.is_some())
            .field("wrap_backend", &self.wrap_backend.is_some())
            .field("max_sequences", &self.max_sequences)
            .finish()
    }
}

/// How filemap and the kernel differed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DivergenceKind {
    /// One side failed and the other did not, or both failed with different
    /// errnos.
    ErrnoMismatch,
    /// Both wrote, but a different number of bytes.
    ShortWrite,
    /// Both read, but a different number of bytes.
    ShortRead,
    /// Bytes read, or read back after a call, differ.
    ContentMismatch,
    /// The file's length differs after a call.
    LengthMismatch,
    /// filemap broke a rule of its own documentation where the kernel has no
    /// counterpart to compare with (misaligned direct I/O, `invalidate_range`,
    /// `EFAULT` of a map access past the end of file).
    Contract,
    /// A call made no progress within the stall timeout.
    Hang,
    /// A call panicked.
    Panic,
    /// The harness itself failed (a file could not be created): not a
    /// finding about filemap, reported so that it is seen.
    Setup,
}

impl DivergenceKind {
    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            DivergenceKind::ErrnoMismatch => "errno mismatch",
            DivergenceKind::ShortWrite => "short write",
            DivergenceKind::ShortRead => "short read",
            DivergenceKind::ContentMismatch => "content mismatch",
            DivergenceKind::LengthMismatch => "length mismatch",
            DivergenceKind::Contract => "contract",
            DivergenceKind::Hang => "hang",
            DivergenceKind::Panic => "panic",
            DivergenceKind::Setup => "setup",
        }
    }
}

/// One distinct divergence: the first sequence that showed it, shrunk.
#[derive(Clone, Debug, Serialize)]
pub struct Divergence {
    /// What kind of difference.
    pub kind: DivergenceKind,
    /// The call that showed it (`read_at`, `zero_range`, `map read`,
    /// `reopen`, `compare`, `final check`, ...).
    pub op: String,
    /// What differed, for the call of the shrunk reproducer.
    pub summary: String,
    /// What makes two divergences the same one in this report: the kind, the
    /// call, and for errno mismatches both results.
    pub signature: String,
    /// The backend of the first sequence that showed it.
    pub backend: String,
    /// The strategy of that sequence.
    pub strategy: String,
    /// Every `backend/strategy` where it was seen.
    pub seen_under: Vec<String>,
    /// How many sequences showed it.
    pub occurrences: u64,
    /// Calls applied in the whole run before the one that showed it first.
    pub ops_before: u64,
    /// Seconds from the start of the run until it was first seen.
    pub seconds_before: f64,
    /// The seed of the sequence that showed it first.
    pub sequence_seed: u64,
    /// Calls in that sequence up to the divergence.
    pub original_calls: usize,
    /// Calls in the shrunk reproducer.
    pub shrunk_calls: usize,
    /// Sequences run while shrinking.
    pub shrink_runs: usize,
    /// Whether the shrunk sequence was seen to diverge again (false when the
    /// divergence depends on timing and did not come back, or when it was not
    /// shrunk).
    pub reproduced: bool,
    /// The reproducer: backend, cache settings and the calls with both sides'
    /// results, the diverging one marked.
    pub reproducer: String,
}

/// One (backend, strategy) row of a report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiffRow {
    /// The backend's name.
    pub backend: String,
    /// The strategy's name.
    pub strategy: String,
    /// The scenario's name, `differential`.
    pub scenario: String,
    /// Sequences run.
    pub sequences: u64,
    /// Calls applied to both sides.
    pub ops: u64,
    /// Sequences that diverged.
    pub divergences: u64,
    /// Seconds spent running this row's sequences (shrinking not included).
    pub seconds: f64,
    /// Calls per second.
    pub ops_per_s: f64,
}

/// What the kernel side found at start.
#[derive(Clone, Debug, Serialize)]
pub struct KernelInfo {
    /// The host file system's largest file size (`s_maxbytes`).
    pub max_file_size: u64,
    /// Whether the directory's file system accepts `O_DIRECT` (otherwise the
    /// kernel side's direct calls are buffered, followed by `fdatasync`, and
    /// `volume-direct` images are opened without it).
    pub direct_io: bool,
}

/// The outcome of a differential run.
#[derive(Clone, Debug, Serialize)]
pub struct DifferentialReport {
    /// The run's seed.
    pub seed: u64,
    /// Calls applied to both sides, in every row.
    pub ops: u64,
    /// Sequences run.
    pub sequences: u64,
    /// Seconds running sequences.
    pub seconds: f64,
    /// Seconds shrinking divergences.
    pub shrink_seconds: f64,
    /// Calls per second while running sequences.
    pub ops_per_s: f64,
    /// What the kernel side found.
    pub kernel: KernelInfo,
    /// One row per (backend, strategy).
    pub rows: Vec<DiffRow>,
    /// Each distinct divergence, in the order found.
    pub divergences: Vec<Divergence>,
    /// Notes on the run (for instance, direct I/O falling back to buffered).
    pub notes: Vec<String>,
}

impl DifferentialReport {
    /// Sequences that diverged, in every row.
    pub fn diverged_sequences(&self) -> u64 {
        self.rows.iter().map(|r| r.divergences).sum()
    }

    /// Whether no sequence diverged.
    pub fn is_clean(&self) -> bool {
        self.diverged_sequences() == 0
    }
}

/// What the progress callback is told, a few times a second.
#[derive(Clone, Copy, Debug)]
pub struct DiffProgress {
    /// Seconds since the run started.
    pub elapsed: f64,
    /// Calls applied so far.
    pub ops: u64,
    /// Sequences run so far.
    pub sequences: u64,
    /// Sequences that diverged so far.
    pub divergences: u64,
    /// The backend of the sequence running now.
    pub backend: DiffBackend,
    /// Its strategy.
    pub strategy: Strategy,
    /// Whether a divergence is being shrunk.
    pub shrinking: bool,
}

// ---------------------------------------------------------------------------
// Positions, cache settings and calls

/// A file position or length: absolute, or relative to the side's largest
/// file size (`Max(-4096)` is 4096 below it), resolved on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pos {
    At(u64),
    Max(i64),
}

impl Pos {
    fn resolve(self, max: u64) -> u64 {
        match self {
            Pos::At(n) => n,
            Pos::Max(delta) => max.saturating_add_signed(delta),
        }
    }

    /// The position `delta` bytes away (saturating).
    fn moved(self, delta: i64) -> Pos {
        match self {
            Pos::At(n) => Pos::At(n.saturating_add_signed(delta)),
            Pos::Max(d) => Pos::Max(d.saturating_add(delta)),
        }
    }

    /// Simpler positions to try while shrinking.
    fn simpler(self) -> Vec<Pos> {
        match self {
            Pos::At(0) => vec![],
            Pos::At(n) if n >= 1 << 62 => vec![],
            Pos::At(n) => {
                let mut out = vec![
                    Pos::At(0),
                    Pos::At(n / 2 / PAGE * PAGE),
                    Pos::At(n / PAGE * PAGE),
                ];
                if n % PAGE != 0 && n > PAGE {
                    out.push(Pos::At(n % PAGE + PAGE));
                }
                out.retain(|&p| p != self);
                out
            }
            Pos::Max(0) => vec![],
            Pos::Max(d) => {
                let mut out = vec![Pos::Max(0), Pos::Max(d / PAGE as i64 * PAGE as i64)];
                out.retain(|&p| p != self);
                out
            }
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pos::At(n) => f.write_str(&show_u64(n)),
            Pos::Max(0) => f.write_str("max"),
            Pos::Max(d) if d < 0 => write!(f, "max-{}", d.unsigned_abs()),
            Pos::Max(d) => write!(f, "max+{d}"),
        }
    }
}

/// `n`, written relative to 2^62, 2^63 or `u64::MAX` when it is near one.
fn show_u64(n: u64) -> String {
    const NEAR: u64 = 1 << 24;
    if n >= u64::MAX - NEAR {
        return match u64::MAX - n {
            0 => "u64::MAX".to_owned(),
            k => format!("u64::MAX-{k}"),
        };
    }
    for (power, name) in [(63u32, "2^63"), (62, "2^62")] {
        let base = 1u64 << power;
        if n.abs_diff(base) <= NEAR {
            return match n.cmp(&base) {
                std::cmp::Ordering::Equal => name.to_owned(),
                std::cmp::Ordering::Greater => format!("{name}+{}", n - base),
                std::cmp::Ordering::Less => format!("{name}-{}", base - n),
            };
        }
    }
    n.to_string()
}

/// When background writeback runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writeback {
    /// The defaults (every 5 s, or after a tenth of the budget was dirtied).
    Default,
    /// Every 10 ms, or after this many bytes were dirtied.
    Fast { dirty_background_bytes: u64 },
}

/// The settings of one cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CacheSettings {
    strategy: Strategy,
    budget_bytes: u64,
    eviction: EvictionPolicy,
    fill_batch_pages: usize,
    readahead_threads: usize,
    writeback: Writeback,
}

impl CacheSettings {
    /// The library's defaults, under `strategy`.
    fn defaults(strategy: Strategy) -> CacheSettings {
        CacheSettings {
            strategy,
            budget_bytes: 256 << 20,
            eviction: EvictionPolicy::Sieve,
            fill_batch_pages: 32,
            readahead_threads: 2,
            writeback: Writeback::Default,
        }
    }

    fn build(&self) -> io::Result<PageCache> {
        let builder = PageCache::builder()
            .strategy(self.strategy)
            .budget_bytes(self.budget_bytes)
            .eviction(self.eviction)
            .fill_batch_pages(self.fill_batch_pages)
            .readahead_threads(self.readahead_threads);
        let builder = match self.writeback {
            Writeback::Default => builder,
            Writeback::Fast {
                dirty_background_bytes,
            } => builder
                .writeback_interval(Duration::from_millis(10))
                .dirty_background_bytes(dirty_background_bytes),
        };
        builder.build()
    }

    /// The same settings, one of them closer to the defaults, for shrinking.
    fn simpler(&self) -> Vec<CacheSettings> {
        let mut out = Vec::new();
        if self.readahead_threads != 0 {
            out.push(CacheSettings {
                readahead_threads: 0,
                ..*self
            });
        }
        if self.writeback != Writeback::Default {
            out.push(CacheSettings {
                writeback: Writeback::Default,
                ..*self
            });
        }
        if self.eviction != EvictionPolicy::Sieve {
            out.push(CacheSettings {
                eviction: EvictionPolicy::Sieve,
                ..*self
            });
        }
        if self.fill_batch_pages != 1 {
            out.push(CacheSettings {
                fill_batch_pages: 1,
                ..*self
            });
        }
        if self.budget_bytes != 256 << 20 {
            out.push(CacheSettings {
                budget_bytes: 256 << 20,
                ..*self
            });
        }
        out
    }
}

impl fmt::Display for CacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "strategy {}, budget_bytes {} ({} pages), eviction {}, fill_batch_pages {}, readahead_threads {}, ",
            self.strategy.name(),
            self.budget_bytes,
            self.budget_bytes / PAGE,
            self.eviction.name(),
            self.fill_batch_pages,
            self.readahead_threads,
        )?;
        match self.writeback {
            Writeback::Default => write!(f, "writeback default"),
            Writeback::Fast {
                dirty_background_bytes,
            } => write!(
                f,
                "writeback_interval 10 ms, dirty_background_bytes {dirty_background_bytes}"
            ),
        }
    }
}

/// One call, made on both sides. `seed` picks the bytes written; `misalign`
/// is how far past a multiple of 4096 a direct I/O buffer starts; map calls
/// name a slot, and their `at`/`len` are wrapped into the part of the map
/// inside the end of file when they run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Read {
        at: Pos,
        len: usize,
    },
    ReadExact {
        at: Pos,
        len: usize,
    },
    Write {
        at: Pos,
        len: usize,
        seed: u8,
    },
    WriteAll {
        at: Pos,
        len: usize,
        seed: u8,
    },
    ReadDirect {
        at: Pos,
        len: usize,
        misalign: usize,
    },
    WriteDirect {
        at: Pos,
        len: usize,
        misalign: usize,
        seed: u8,
    },
    PunchHole {
        at: Pos,
        len: Pos,
    },
    ZeroRange {
        at: Pos,
        len: Pos,
    },
    SetLen {
        len: Pos,
    },
    CollapseRange {
        at: Pos,
        len: Pos,
    },
    InsertRange {
        at: Pos,
        len: Pos,
    },
    InvalidateRange {
        at: Pos,
        len: Pos,
    },
    Readahead {
        at: Pos,
        len: Pos,
    },
    SyncRange {
        at: Pos,
        len: Pos,
    },
    SyncAll,
    Map {
        slot: usize,
        at: Pos,
        len: usize,
        write: bool,
    },
    DropMap {
        slot: usize,
    },
    MapRead {
        slot: usize,
        at: usize,
        len: usize,
        past_eof: bool,
    },
    MapWrite {
        slot: usize,
        at: usize,
        len: usize,
        seed: u8,
        past_eof: bool,
    },
    MapFlush {
        slot: usize,
    },
    Reopen {
        settings: CacheSettings,
    },
    CloseOpen,
    Compare,
}

impl Op {
    /// The call's name in reports and signatures.
    fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read_at",
            Op::ReadExact { .. } => "read_exact_at",
            Op::Write { .. } => "write_at",
            Op::WriteAll { .. } => "write_all_at",
            Op::ReadDirect { .. } => "read_direct",
            Op::WriteDirect { .. } => "write_direct",
            Op::PunchHole { .. } => "punch_hole",
            Op::ZeroRange { .. } => "zero_range",
            Op::SetLen { .. } => "set_len",
            Op::CollapseRange { .. } => "collapse_range",
            Op::InsertRange { .. } => "insert_range",
            Op::InvalidateRange { .. } => "invalidate_range",
            Op::Readahead { .. } => "readahead",
            Op::SyncRange { .. } => "sync_range",
            Op::SyncAll => "sync_all",
            Op::Map { .. } => "map",
            Op::DropMap { .. } => "drop map",
            Op::MapRead { .. } => "map read",
            Op::MapWrite { .. } => "map write",
            Op::MapFlush { .. } => "map flush",
            Op::Reopen { .. } => "reopen",
            Op::CloseOpen => "close and open",
            Op::Compare => "compare",
        }
    }

    /// Variants of this call with simpler arguments, for shrinking.
    fn simpler(&self) -> Vec<Op> {
        let lens = |len: usize| -> Vec<usize> {
            let mut out = vec![1, len / 2, len / PAGE_SIZE * PAGE_SIZE];
            out.retain(|&l| l < len && l > 0);
            out.dedup();
            out
        };
        let mut out = Vec::new();
        match *self {
            Op::Read { at, len } | Op::ReadExact { at, len } => {
                let make = |at, len| match self {
                    Op::Read { .. } => Op::Read { at, len },
                    _ => Op::ReadExact { at, len },
                };
                out.extend(at.simpler().into_iter().map(|at| make(at, len)));
                out.extend(lens(len).into_iter().map(|len| make(at, len)));
            }
            Op::Write { at, len, seed } | Op::WriteAll { at, len, seed } => {
                let make = |at, len| match self {
                    Op::Write { .. } => Op::Write { at, len, seed },
                    _ => Op::WriteAll { at, len, seed },
                };
                out.extend(at.simpler().into_iter().map(|at| make(at, len)));
                out.extend(lens(len).into_iter().map(|len| make(at, len)));
            }
            Op::ReadDirect { at, len, misalign } => {
                out.extend(
                    at.simpler()
                        .into_iter()
                        .map(|at| Op::ReadDirect { at, len, misalign }),
                );
                out.extend(
                    lens(len)
                        .into_iter()
                        .map(|len| Op::ReadDirect { at, len, misalign }),
                );
                if misalign != 0 {
                    out.push(Op::ReadDirect {
                        at,
                        len,
                        misalign: 0,
                    });
                }
            }
            Op::WriteDirect {
                at,
                len,
                misalign,
                seed,
            } => {
                let make = |at, len, misalign| Op::WriteDirect {
                    at,
                    len,
                    misalign,
                    seed,
                };
                out.extend(at.simpler().into_iter().map(|at| make(at, len, misalign)));
                out.extend(lens(len).into_iter().map(|len| make(at, len, misalign)));
                if misalign != 0 {
                    out.push(make(at, len, 0));
                }
            }
            Op::PunchHole { at, len }
            | Op::ZeroRange { at, len }
            | Op::CollapseRange { at, len }
            | Op::InsertRange { at, len }
            | Op::InvalidateRange { at, len }
            | Op::Readahead { at, len }
            | Op::SyncRange { at, len } => {
                let make = |at, len| match self {
                    Op::PunchHole { .. } => Op::PunchHole { at, len },
                    Op::ZeroRange { .. } => Op::ZeroRange { at, len },
                    Op::CollapseRange { .. } => Op::CollapseRange { at, len },
                    Op::InsertRange { .. } => Op::InsertRange { at, len },
                    Op::InvalidateRange { .. } => Op::InvalidateRange { at, len },
                    Op::Readahead { .. } => Op::Readahead { at, len },
                    _ => Op::SyncRange { at, len },
                };
                out.extend(at.simpler().into_iter().map(|at| make(at, len)));
                let shorter = match len {
                    Pos::At(n) if n > 0 && n < 1 << 62 => {
                        let mut l = vec![1, n / 2, n / PAGE * PAGE, PAGE];
                        l.retain(|&l| l < n && l > 0);
                        l.into_iter().map(Pos::At).collect()
                    }
                    _ => len.simpler(),
                };
                out.extend(shorter.into_iter().map(|len| make(at, len)));
            }
            Op::SetLen { len } => {
                out.extend(len.simpler().into_iter().map(|len| Op::SetLen { len }));
            }
            Op::Map {
                slot,
                at,
                len,
                write,
            } => {
                out.extend(at.simpler().into_iter().map(|at| Op::Map {
                    slot,
                    at,
                    len,
                    write,
                }));
                out.extend(lens(len).into_iter().map(|len| Op::Map {
                    slot,
                    at,
                    len,
                    write,
                }));
                if slot != 0 {
                    out.push(Op::Map {
                        slot: 0,
                        at,
                        len,
                        write,
                    });
                }
            }
            Op::MapRead {
                slot,
                at,
                len,
                past_eof,
            } => {
                let mut ats = vec![0, at / 2];
                ats.retain(|&a| a < at);
                out.extend(ats.into_iter().map(|at| Op::MapRead {
                    slot,
                    at,
                    len,
                    past_eof,
                }));
                out.extend(lens(len).into_iter().map(|len| Op::MapRead {
                    slot,
                    at,
                    len,
                    past_eof,
                }));
            }
            Op::MapWrite {
                slot,
                at,
                len,
                seed,
                past_eof,
            } => {
                let mut ats = vec![0, at / 2];
                ats.retain(|&a| a < at);
                out.extend(ats.into_iter().map(|at| Op::MapWrite {
                    slot,
                    at,
                    len,
                    seed,
                    past_eof,
                }));
                out.extend(lens(len).into_iter().map(|len| Op::MapWrite {
                    slot,
                    at,
                    len,
                    seed,
                    past_eof,
                }));
            }
            Op::Reopen { settings } => {
                out.extend(
                    settings
                        .simpler()
                        .into_iter()
                        .map(|settings| Op::Reopen { settings }),
                );
            }
            Op::SyncAll
            | Op::DropMap { .. }
            | Op::MapFlush { .. }
            | Op::CloseOpen
            | Op::Compare => {}
        }
        out.retain(|op| op != self);
        out
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Read { at, len } => write!(f, "read_at(buf of {len}, {at})"),
            Op::ReadExact { at, len } => write!(f, "read_exact_at(buf of {len}, {at})"),
            Op::Write { at, len, seed } => {
                write!(f, "write_at(pattern(seed {seed}, len {len}), {at})")
            }
            Op::WriteAll { at, len, seed } => {
                write!(f, "write_all_at(pattern(seed {seed}, len {len}), {at})")
            }
            Op::ReadDirect { at, len, misalign } => write!(
                f,
                "read_direct(buf of {len} at page+{misalign}, {at})"
            ),
            Op::WriteDirect {
                at,
                len,
                misalign,
                seed,
            } => write!(
                f,
                "write_direct(pattern(seed {seed}, len {len}) at page+{misalign}, {at})"
            ),
            Op::PunchHole { at, len } => write!(f, "punch_hole({at}, {len})"),
            Op::ZeroRange { at, len } => write!(f, "zero_range({at}, {len})"),
            Op::SetLen { len } => write!(f, "set_len({len})"),
            Op::CollapseRange { at, len } => write!(f, "collapse_range({at}, {len})"),
            Op::InsertRange { at, len } => write!(f, "insert_range({at}, {len})"),
            Op::InvalidateRange { at, len } => write!(f, "invalidate_range({at}, {len})"),
            Op::Readahead { at, len } => write!(f, "readahead({at}, {len})"),
            Op::SyncRange { at, len } => write!(f, "sync_range({at}, {len})"),
            Op::SyncAll => write!(f, "sync_all()"),
            Op::Map {
                slot,
                at,
                len,
                write,
            } => write!(
                f,
                "map[{slot}] = map({at}, {len}, {})",
                if *write { "ReadWrite" } else { "Read" }
            ),
            Op::DropMap { slot } => write!(f, "drop(map[{slot}])"),
            Op::MapRead { slot, at, len, .. } => write!(f, "map[{slot}].read({at}, buf of {len})"),
            Op::MapWrite {
                slot, at, len, seed, ..
            } => write!(f, "map[{slot}].write({at}, pattern(seed {seed}, len {len}))"),
            Op::MapFlush { slot } => write!(f, "map[{slot}].flush()"),
            Op::Reopen { settings } => write!(
                f,
                "reopen: sync_all, drop every map, the mapping, the cache (and the volume), open again with {settings}"
            ),
            Op::CloseOpen => write!(
                f,
                "close and open: drop every map and the mapping (no sync), open the file again in the same cache"
            ),
            Op::Compare => write!(f, "compare the whole file"),
        }
    }
}

/// One generated sequence: where it runs, its first cache's settings and its
/// calls.
#[derive(Clone, Debug)]
struct Sequence {
    backend: DiffBackend,
    settings: CacheSettings,
    seed: u64,
    ops: Vec<Op>,
}

// ---------------------------------------------------------------------------
// Generation

/// Draws sequences of calls.
struct Generator {
    rng: fastrand::Rng,
    /// Most offsets and lengths fall below this.
    span: u64,
}

impl Generator {
    fn weighted<T: Copy>(&mut self, choices: &[(u32, T)]) -> T {
        let total: u32 = choices.iter().map(|&(w, _)| w).sum();
        let mut roll = self.rng.u32(..total);
        for &(weight, value) in choices {
            if roll < weight {
                return value;
            }
            roll -= weight;
        }
        unreachable!("the roll is below the sum of the weights")
    }

    fn settings(&mut self, strategy: Strategy) -> CacheSettings {
        let pages = match self.rng.u32(..4) {
            0 | 1 => self.rng.u64(1..=32),
            2 => self.rng.u64(33..=1024),
            _ => self.rng.u64(1025..=(64 << 20) / PAGE),
        };
        // Now and then a budget that is not a whole number of pages.
        let budget_bytes = pages * PAGE
            + if self.rng.u32(..8) == 0 {
                self.rng.u64(1..PAGE)
            } else {
                0
            };
        let writeback = if self.rng.bool() {
            Writeback::Default
        } else {
            // One page up to the budget, as the builder accepts.
            Writeback::Fast {
                dirty_background_bytes: self.rng.u64(1..=pages.min(16)) * PAGE,
            }
        };
        CacheSettings {
            strategy,
            budget_bytes,
            eviction: EvictionPolicy::ALL[self.rng.usize(..EvictionPolicy::ALL.len())],
            fill_batch_pages: self.rng.usize(1..=32),
            readahead_threads: self.rng.usize(0..=2),
            writeback,
        }
    }

    /// Within two bytes of a page boundary below the span.
    fn near_page_edge(&mut self) -> u64 {
        (self.rng.u64(0..=self.span / PAGE) * PAGE).saturating_add_signed(self.rng.i64(-2..=2))
    }

    fn aligned(&mut self, most_pages: u64) -> u64 {
        self.rng.u64(0..=most_pages) * PAGE
    }

    /// An offset at or past 2^63, near `u64::MAX`, or near the largest file size.
    fn hostile_offset(&mut self) -> Pos {
        let small = self.rng.u64(0..2 * PAGE);
        match self.rng.u32(..7) {
            0 => Pos::At((1 << 63) + small),
            1 => Pos::At((1 << 63) - 1 - small),
            2 => Pos::At(u64::MAX - small),
            3 => Pos::At((u64::MAX / PAGE - self.rng.u64(0..4)) * PAGE),
            4 => Pos::Max(-(self.rng.i64(0..=3) * PAGE as i64)),
            5 => Pos::Max(self.rng.i64(-3 * PAGE as i64..=PAGE as i64)),
            _ => Pos::At(1 << 62),
        }
    }

    /// A length near `u64::MAX`, 2^63 or 2^62, or near the largest file size;
    /// `fits`: lengths up to the largest size are allowed (not for zero
    /// range, which would have the kernel allocate all of it).
    fn hostile_len(&mut self, fits: bool) -> Pos {
        let small = self.rng.u64(0..2 * PAGE);
        match self.rng.u32(..6) {
            0 => Pos::At(u64::MAX - small),
            1 => Pos::At((1 << 63) - small),
            2 => Pos::At((1 << 63) + small),
            3 => Pos::At(1 << 62),
            4 if fits => Pos::Max(-(self.rng.i64(0..=2) * PAGE as i64)),
            _ => Pos::Max(self.rng.i64(1..=2 * PAGE as i64)),
        }
    }

    fn offset(&mut self) -> Pos {
        match self.weighted(&[(8, 0), (3, 1), (3, 2), (1, 3)]) {
            0 => Pos::At(self.rng.u64(0..self.span)),
            1 => Pos::At(self.near_page_edge()),
            2 => Pos::At(self.aligned(self.span / PAGE)),
            _ => self.hostile_offset(),
        }
    }

    fn buffer_len(&mut self) -> usize {
        let len = match self.weighted(&[(1, 0), (6, 1), (2, 2), (2, 3), (2, 4), (1, 5)]) {
            0 => 0,
            1 => self.rng.u64(1..3 * PAGE),
            2 => self.rng.u64(0..self.span.min(256 << 10)),
            3 => self.near_page_edge().min(256 << 10),
            4 => self.aligned(8),
            _ => self.aligned(64),
        };
        len as usize
    }

    /// `(offset, length)` of a buffered read or write, including ranges that
    /// end exactly at a page boundary.
    fn buffer_range(&mut self) -> (Pos, usize) {
        if self.rng.u32(..8) < 2 {
            let at = self.rng.u64(0..self.span);
            let len = (at / PAGE + 1 + self.rng.u64(0..4)) * PAGE - at;
            (Pos::At(at), len as usize)
        } else {
            (self.offset(), self.buffer_len())
        }
    }

    /// `(offset, length)` of a range call; `fits` as for [`Generator::hostile_len`].
    fn range(&mut self, fits: bool) -> (Pos, Pos) {
        match self.rng.u32(..10) {
            0 => (self.offset(), self.hostile_len(fits)),
            1 => (
                Pos::At(self.aligned(self.span / PAGE)),
                self.hostile_len(fits),
            ),
            _ => {
                let (at, len) = self.buffer_range();
                (at, Pos::At(len as u64))
            }
        }
    }

    /// `(offset, length)` of collapse and insert: mostly page-aligned (and so
    /// mostly valid), sometimes not, rarely huge.
    fn shift_range(&mut self) -> (Pos, Pos) {
        match self.weighted(&[(6, 0), (2, 1), (1, 2)]) {
            0 => (
                Pos::At(self.aligned(self.span / PAGE)),
                Pos::At(self.rng.u64(1..=8) * PAGE),
            ),
            1 => self.range(true),
            _ => (
                Pos::At(self.aligned(self.span / PAGE)),
                self.hostile_len(true),
            ),
        }
    }

    /// `(offset, length, buffer misalignment)` of direct I/O: mostly aligned
    /// as filemap wants, sometimes aligned only to 512 bytes (which the kernel
    /// may take and filemap refuses), sometimes not at all.
    fn direct(&mut self) -> (Pos, usize, usize) {
        let misalign = match self.rng.u32(..10) {
            0 => self.rng.usize(1..512),
            1 => self.rng.usize(1..8) * 512,
            _ => 0,
        };
        let (at, len) = match self.weighted(&[(7, 0), (1, 1), (1, 2), (1, 3), (1, 4)]) {
            0 => (
                Pos::At(self.aligned(self.span / PAGE)),
                self.aligned(8) as usize,
            ),
            1 => (
                Pos::At(self.rng.u64(0..self.span / 512) * 512),
                self.rng.usize(0..16) * 512,
            ),
            2 => self.buffer_range(),
            3 => (Pos::At(self.aligned(self.span / PAGE)), 0),
            _ => {
                let at = match self.hostile_offset() {
                    Pos::At(n) => Pos::At(n / PAGE * PAGE),
                    Pos::Max(d) => Pos::Max(d / PAGE as i64 * PAGE as i64),
                };
                (at, self.aligned(4) as usize)
            }
        };
        (at, len, misalign)
    }

    fn map(&mut self) -> Op {
        let slot = self.rng.usize(..MAP_SLOTS);
        let write = self.rng.u32(..4) != 0;
        let (at, len) = match self.rng.u32(..20) {
            0 => (Pos::At(self.rng.u64(1..PAGE)), PAGE_SIZE),
            1 => (Pos::At(self.aligned(4)), 0),
            2 => (Pos::At(self.aligned(4)), self.rng.usize(1..3 * PAGE_SIZE)),
            3 => (Pos::Max(-(self.rng.i64(0..=2) * PAGE as i64)), PAGE_SIZE),
            4 => (
                Pos::At((u64::MAX / PAGE - self.rng.u64(0..2)) * PAGE),
                PAGE_SIZE,
            ),
            _ => (
                Pos::At(self.aligned(self.span / PAGE)),
                self.rng.usize(1..=16) * PAGE_SIZE,
            ),
        };
        Op::Map {
            slot,
            at,
            len,
            write,
        }
    }

    fn op(&mut self, strategy: Strategy) -> Op {
        let seed = self.rng.u8(..);
        let slot = self.rng.usize(..MAP_SLOTS);
        match self.weighted(&[
            (12, 0),
            (2, 1),
            (10, 2),
            (3, 3),
            (4, 4),
            (4, 5),
            (5, 6),
            (5, 7),
            (4, 8),
            (3, 9),
            (3, 10),
            (3, 11),
            (2, 12),
            (2, 13),
            (1, 14),
            (3, 15),
            (1, 16),
            (6, 17),
            (5, 18),
            (1, 19),
            (1, 20),
            (2, 21),
        ]) {
            0 => {
                let (at, len) = self.buffer_range();
                Op::Write { at, len, seed }
            }
            1 => {
                let (at, len) = self.buffer_range();
                Op::WriteAll { at, len, seed }
            }
            2 => {
                let (at, len) = self.buffer_range();
                Op::Read { at, len }
            }
            3 => {
                let (at, len) = self.buffer_range();
                Op::ReadExact { at, len }
            }
            4 => {
                let (at, len, misalign) = self.direct();
                Op::ReadDirect { at, len, misalign }
            }
            5 => {
                let (at, len, misalign) = self.direct();
                Op::WriteDirect {
                    at,
                    len,
                    misalign,
                    seed,
                }
            }
            6 => {
                let (at, len) = self.range(true);
                Op::PunchHole { at, len }
            }
            7 => {
                let (at, len) = self.range(false);
                Op::ZeroRange { at, len }
            }
            8 => Op::SetLen {
                len: match self.weighted(&[(5, 0), (2, 1), (2, 2), (1, 3)]) {
                    0 => Pos::At(self.rng.u64(0..self.span)),
                    1 => Pos::At(self.aligned(self.span / PAGE)),
                    2 => Pos::At(self.near_page_edge()),
                    _ => self.hostile_offset(),
                },
            },
            9 => {
                let (at, len) = self.shift_range();
                Op::CollapseRange { at, len }
            }
            10 => {
                let (at, len) = self.shift_range();
                Op::InsertRange { at, len }
            }
            11 => {
                let (at, len) = self.range(true);
                Op::InvalidateRange { at, len }
            }
            12 => {
                let (at, len) = self.range(true);
                Op::Readahead { at, len }
            }
            13 => {
                let (at, len) = self.range(true);
                Op::SyncRange { at, len }
            }
            14 => Op::SyncAll,
            15 => self.map(),
            16 => Op::DropMap { slot },
            17 => Op::MapRead {
                slot,
                at: self.rng.usize(..16 * PAGE_SIZE),
                len: self.rng.usize(1..=2 * PAGE_SIZE),
                past_eof: self.rng.u32(..8) == 0,
            },
            18 => Op::MapWrite {
                slot,
                at: self.rng.usize(..16 * PAGE_SIZE),
                len: self.rng.usize(1..=2 * PAGE_SIZE),
                seed,
                past_eof: self.rng.u32(..8) == 0,
            },
            19 => Op::MapFlush { slot },
            21 => Op::CloseOpen,
            _ => Op::Reopen {
                settings: self.settings(strategy),
            },
        }
    }
}

/// Sequence `index` of a run seeded `seed`.
fn generate(seed: u64, backend: DiffBackend, strategy: Strategy, most_ops: usize) -> Sequence {
    let mut gen = Generator {
        rng: fastrand::Rng::with_seed(seed),
        span: 0,
    };
    gen.span = gen.weighted(&[(2, 16 << 10), (4, 64 << 10), (3, 256 << 10), (1, 1 << 20)]);
    let settings = gen.settings(strategy);
    let count = gen.rng.usize(most_ops.div_ceil(4).max(1)..=most_ops.max(1));
    let mut ops = Vec::with_capacity(count + count / 16);
    for i in 0..count {
        ops.push(gen.op(strategy));
        if i % 20 == 19 {
            ops.push(Op::Compare);
        }
    }
    Sequence {
        backend,
        settings,
        seed,
        ops,
    }
}

/// A well-mixed 64-bit hash (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `len` bytes, none of them zero, that differ with `seed` and do not repeat
/// every page (so data shifted by whole pages reads differently).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed as usize * 7) % 251) as u8 + 1)
        .collect()
}

// ---------------------------------------------------------------------------
// Results

/// What a call returned, on either side. Errors compare by errno (or by
/// kind, for the few without one), not by message.
#[derive(Clone)]
enum Outcome {
    /// `Ok(())`.
    Done,
    /// `Ok(n)` of a write.
    Count(usize),
    /// The bytes a read returned.
    Bytes(Vec<u8>),
    /// An error with this errno, and its message if it carries one.
    Errno(i32, Option<String>),
    /// An error without an errno (`UnexpectedEof` and `WriteZero`, as `std`
    /// makes them), and its message.
    Kind(io::ErrorKind, String),
}

impl PartialEq for Outcome {
    fn eq(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Done, Outcome::Done) => true,
            (Outcome::Count(a), Outcome::Count(b)) => a == b,
            (Outcome::Bytes(a), Outcome::Bytes(b)) => a == b,
            (Outcome::Errno(a, _), Outcome::Errno(b, _)) => a == b,
            (Outcome::Kind(a, _), Outcome::Kind(b, _)) => a == b,
            _ => false,
        }
    }
}

impl Outcome {
    fn of_error(error: &io::Error) -> Outcome {
        match (error.raw_os_error(), filemap::errno(error)) {
            (Some(errno), _) => Outcome::Errno(errno, None),
            (None, Some(errno)) => Outcome::Errno(errno, Some(error.to_string())),
            (None, None) => Outcome::Kind(error.kind(), error.to_string()),
        }
    }

    fn errno(errno: i32) -> Outcome {
        Outcome::Errno(errno, None)
    }

    fn done(result: io::Result<()>) -> Outcome {
        result.map_or_else(|e| Outcome::of_error(&e), |()| Outcome::Done)
    }

    fn count(result: io::Result<usize>) -> Outcome {
        result.map_or_else(|e| Outcome::of_error(&e), Outcome::Count)
    }

    fn bytes(result: io::Result<usize>, mut buf: Vec<u8>) -> Outcome {
        match result {
            Ok(n) => {
                buf.truncate(n);
                Outcome::Bytes(buf)
            }
            Err(e) => Outcome::of_error(&e),
        }
    }

    /// The outcome without its counts, for signatures.
    fn class(&self) -> String {
        match self {
            Outcome::Done => "Ok(())".to_owned(),
            Outcome::Count(_) => "Ok(n)".to_owned(),
            Outcome::Bytes(_) => "Ok(bytes)".to_owned(),
            Outcome::Errno(errno, _) => format!("Err({})", errno_name(*errno)),
            Outcome::Kind(kind, _) => format!("Err({kind:?})"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done => write!(f, "Ok(())"),
            Outcome::Count(n) => write!(f, "Ok({n})"),
            Outcome::Bytes(bytes) => write!(f, "Ok({} bytes)", bytes.len()),
            Outcome::Errno(errno, None) => write!(f, "Err({})", errno_name(*errno)),
            Outcome::Errno(errno, Some(message)) => {
                write!(f, "Err({}: {message})", errno_name(*errno))
            }
            Outcome::Kind(kind, message) => write!(f, "Err({kind:?}: {message})"),
        }
    }
}

/// The symbolic name of an errno.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

/// A divergence as the harness finds it.
#[derive(Clone, Debug)]
struct Found {
    /// The index of the call (the sequence's length for the final check).
    step: usize,
    kind: DivergenceKind,
    op: String,
    summary: String,
    /// Both results of an errno mismatch, for the signature.
    detail: String,
}

impl Found {
    fn signature(&self) -> String {
        match self.kind {
            DivergenceKind::ErrnoMismatch
            | DivergenceKind::Contract
            | DivergenceKind::Panic
            | DivergenceKind::Setup => {
                format!("{}: {}: {}", self.kind.name(), self.op, self.detail)
            }
            _ => format!("{}: {}", self.kind.name(), self.op),
        }
    }
}

// ---------------------------------------------------------------------------
// The kernel side

/// What the harness needs from the host, found once per run.
struct Env {
    dir: PathBuf,
    kernel: KernelInfo,
    wrap: Option<BackendWrapper>,
    max_compare_bytes: u64,
    /// Numbers the files of each sequence.
    next_file: AtomicU64,
}

/// Turns a `-1`-style return into the last OS error, retrying on `EINTR`.
fn syscall(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

fn k_pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call;
    // the offset is passed as the kernel's signed `off_t` on purpose (one at
    // or past 2^63 is the kernel's to refuse).
    syscall(|| unsafe {
        libc::pread(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

fn k_pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
    syscall(|| unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) })
}

fn k_fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: a plain system call on a descriptor we own; no memory is passed.
    syscall(|| unsafe {
        libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) as isize
    })
    .map(drop)
}

fn k_ftruncate(file: &File, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: a plain system call on a descriptor we own.
    syscall(|| unsafe { libc::ftruncate(fd, len as libc::off_t) as isize }).map(drop)
}

fn k_fsync(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: a plain system call on a descriptor we own.
    syscall(|| unsafe { libc::fsync(fd) as isize }).map(drop)
}

fn k_readahead(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: a plain system call on a descriptor we own.
    syscall(|| unsafe { libc::readahead(fd, offset as libc::off64_t, len as usize) }).map(drop)
}

fn k_sync_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain system call on a descriptor we own.
    syscall(|| unsafe {
        libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, flags) as isize
    })
    .map(drop)
}

fn k_drop_cache(file: &File) -> io::Result<()> {
    // SAFETY: a plain system call on a descriptor we own.
    let errno = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(errno))
    }
}

fn k_len(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.len())
}

/// A `MAP_SHARED` map of the kernel's file.
struct KernelMap {
    addr: *mut u8,
    len: usize,
    offset: u64,
    writable: bool,
}

impl KernelMap {
    fn new(file: &File, offset: u64, len: usize, writable: bool) -> io::Result<KernelMap> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new mapping at an address the kernel picks: it overlaps no
        // memory of ours. The offset is passed as the kernel's `off_t`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(KernelMap {
            addr: addr.cast(),
            // The kernel maps whole pages.
            len: len.next_multiple_of(PAGE_SIZE),
            offset,
            writable,
        })
    }

    /// Copies `buf.len()` bytes at `at` (relative to the map) out of the map.
    /// The caller keeps the range inside the map and inside the end of file
    /// (past it the kernel raises `SIGBUS`).
    fn read(&self, at: usize, buf: &mut [u8]) {
        assert!(
            at + buf.len() <= self.len,
            "a kernel map read outside the map"
        );
        // SAFETY: `at..at + buf.len()` lies inside the mapping (asserted), which
        // stays mapped while `self` lives, and inside the end of file (the
        // caller's promise), so no page past it is touched. Nothing else
        // changes the map during the copy: this thread is the only user of the
        // file, and `buf` is ordinary memory outside the map.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(at), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `buf` into the map at `at`, under the rules of [`KernelMap::read`];
    /// the map must be writable.
    fn write(&self, at: usize, buf: &[u8]) {
        assert!(self.writable, "a store into a read-only kernel map");
        assert!(
            at + buf.len() <= self.len,
            "a kernel map write outside the map"
        );
        // SAFETY: as in `read`, and the map is writable (asserted).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.addr.add(at), buf.len()) }
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our mapping.
        syscall(|| unsafe { libc::msync(self.addr.cast(), self.len, libc::MS_SYNC) as isize })
            .map(drop)
    }
}

impl Drop for KernelMap {
    fn drop(&mut self) {
        // SAFETY: the range is exactly the mapping made in `new`, which no
        // reference outlives (the map is only accessed through copies).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// The kernel's file: a buffered descriptor, an `O_DIRECT` one where the file
/// system allows, and its maps.
struct KernelSide {
    file: File,
    direct: Option<File>,
    maps: [Option<KernelMap>; MAP_SLOTS],
    path: PathBuf,
    max: u64,
}

impl KernelSide {
    fn create(path: PathBuf, env: &Env) -> io::Result<KernelSide> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let direct = if env.kernel.direct_io {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)?,
            )
        } else {
            None
        };
        Ok(KernelSide {
            file,
            direct,
            maps: Default::default(),
            path,
            max: env.kernel.max_file_size,
        })
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.direct {
            Some(direct) => k_pread(direct, buf, offset),
            None => k_pread(&self.file, buf, offset),
        }
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match &self.direct {
            Some(direct) => k_pwrite(direct, buf, offset),
            None => {
                let n = k_pwrite(&self.file, buf, offset)?;
                self.file.sync_data()?;
                Ok(n)
            }
        }
    }
}

/// The host file system's largest file size, found by a binary search with
/// one-byte writes on a scratch file, and whether it takes `O_DIRECT`.
pub fn probe_kernel(dir: &Path) -> io::Result<KernelInfo> {
    let path = dir.join(format!("probe-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let probed = (|| {
        // A write at `lo` succeeds, one at `hi` does not.
        let (mut lo, mut hi) = (0u64, 1u64 << 63);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match k_pwrite(&file, b"x", mid) {
                Ok(_) => lo = mid,
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => hi = mid,
                Err(e) => return Err(e),
            }
            k_ftruncate(&file, 0)?;
        }
        let max_file_size = hi;
        // The shifting and zeroing calls the comparison needs.
        k_pwrite(&file, &[1; 3 * PAGE_SIZE], 0)?;
        for (mode, what) in [
            (
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                "punch hole",
            ),
            (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
            (libc::FALLOC_FL_COLLAPSE_RANGE, "collapse range"),
            (libc::FALLOC_FL_INSERT_RANGE, "insert range"),
        ] {
            k_fallocate(&file, mode, 0, PAGE).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "the differential test needs a file system with fallocate {what} \
                         (ext4, XFS) for its directory: {e}"
                    ),
                )
            })?;
        }
        let direct_io = (|| {
            let direct = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .ok()?;
            let mut buf = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
            k_pwrite(&direct, &buf, 0).ok()?;
            k_pread(&direct, &mut buf, 0).ok()
        })()
        .is_some();
        Ok(KernelInfo {
            max_file_size,
            direct_io,
        })
    })();
    drop(file);
    let _ = std::fs::remove_file(&path);
    probed
}

// ---------------------------------------------------------------------------
// The filemap side

/// Where a filemap file lives, to open it again.
enum Storage {
    Volume {
        device: Arc<dyn Device>,
        /// The open volume, to wait for it to go before opening it again.
        volume: Weak<Volume>,
        image: Option<PathBuf>,
    },
    Host {
        path: PathBuf,
    },
}

struct FilemapSide {
    maps: [Option<MapRegion>; MAP_SLOTS],
    mapping: Option<Arc<Mapping>>,
    cache: Option<PageCache>,
    storage: Storage,
    max: u64,
}

impl FilemapSide {
    fn create(
        backend: DiffBackend,
        settings: &CacheSettings,
        env: &Env,
        number: u64,
    ) -> io::Result<FilemapSide> {
        let storage = match backend {
            DiffBackend::VolumeMem => Storage::Volume {
                device: Arc::new(MemDevice::new(DEVICE_BYTES)),
                volume: Weak::new(),
                image: None,
            },
            DiffBackend::VolumeFile | DiffBackend::VolumeDirect => {
                let image = env.dir.join(format!("image-{number}"));
                let mut device = FileDevice::create(&image, DEVICE_BYTES)?;
                if backend == DiffBackend::VolumeDirect && env.kernel.direct_io {
                    device = device.with_direct_io()?;
                }
                Storage::Volume {
                    device: Arc::new(device),
                    volume: Weak::new(),
                    image: Some(image),
                }
            }
            DiffBackend::HostFile => {
                let path = env.dir.join(format!("host-{number}"));
                HostFile::create(&path)?;
                Storage::Host { path }
            }
        };
        if let Storage::Volume { device, .. } = &storage {
            let volume = Volume::format(device.clone())?;
            volume.create_file(FILE_NAME)?;
            volume.sync()?;
        }
        let mut side = FilemapSide {
            maps: Default::default(),
            mapping: None,
            cache: None,
            storage,
            max: 0,
        };
        side.open(settings, env)?;
        Ok(side)
    }

    /// Opens the file through a new cache of `settings`.
    fn open(&mut self, settings: &CacheSettings, env: &Env) -> io::Result<()> {
        let volume = match &mut self.storage {
            Storage::Volume { device, volume, .. } => {
                let opened = Volume::open(device.clone())?;
                *volume = Arc::downgrade(&opened);
                Some(opened)
            }
            Storage::Host { .. } => None,
        };
        let backend = self.backend(volume.as_ref(), env)?;
        let cache = settings.build()?;
        let mapping = cache.open(backend)?;
        self.max = mapping.max_file_size();
        self.mapping = Some(mapping);
        self.cache = Some(cache);
        Ok(())
    }

    /// A backend of the file: on `volume` if it is on one, wrapped as `env`
    /// says.
    fn backend(&self, volume: Option<&Arc<Volume>>, env: &Env) -> io::Result<Arc<dyn Backend>> {
        let backend: Arc<dyn Backend> = match (&self.storage, volume) {
            (Storage::Volume { .. }, Some(volume)) => Arc::new(volume.open_file(FILE_NAME)?),
            (Storage::Host { path }, _) => Arc::new(HostFile::open(path)?),
            (Storage::Volume { .. }, None) => {
                return Err(io::Error::other("the volume is not open"));
            }
        };
        Ok(match &env.wrap {
            Some(wrap) => wrap(backend),
            None => backend,
        })
    }

    /// Drops every map and the mapping, without syncing (the close writes
    /// back), and opens the file again in the same cache, which may have
    /// kept its pages (on the same volume, which the drop must not take).
    fn close_and_open(&mut self, env: &Env) -> io::Result<()> {
        self.maps = Default::default();
        let volume = match &self.storage {
            Storage::Volume { volume, .. } => volume.upgrade(),
            Storage::Host { .. } => None,
        };
        self.mapping = None;
        let backend = self.backend(volume.as_ref(), env)?;
        let cache = self.cache.as_ref().expect("the file is open");
        self.mapping = Some(cache.open(backend)?);
        Ok(())
    }

    /// Drops every map, the mapping and the cache, and waits for the volume
    /// (if any) to go, so that it can be opened again.
    fn close(&mut self) -> io::Result<()> {
        self.maps = Default::default();
        self.mapping = None;
        self.cache = None;
        if let Storage::Volume { volume, .. } = &self.storage {
            if !crate::wait_until_dropped(volume, VOLUME_RELEASE_TIMEOUT) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the volume was still referenced 10 s after its cache and mapping were dropped",
                ));
            }
        }
        Ok(())
    }

    fn mapping(&self) -> &Arc<Mapping> {
        self.mapping
            .as_ref()
            .expect("the file is open between calls")
    }
}

// ---------------------------------------------------------------------------
// Running a sequence

/// What the worker running a sequence shares with its watchdog.
#[derive(Default)]
struct Shared {
    /// Bumped at every step: the watchdog's sign of progress.
    steps: AtomicU64,
    /// Calls applied so far.
    ops: AtomicU64,
    transcript: Mutex<Vec<String>>,
    /// Known divergences the sequence went past (see [`TOLERABLE_OPS`]).
    tolerated: Mutex<Vec<String>>,
}

/// Calls that change no byte of the file: a divergence of their results
/// that is already known does not end a sequence (it is counted, and the
/// sequence goes on), so that a frequent one does not hide rarer ones behind
/// it. What they leave behind is still compared.
const TOLERABLE_OPS: [&str; 10] = [
    "read_at",
    "read_exact_at",
    "read_direct",
    "readahead",
    "sync_range",
    "sync_all",
    "invalidate_range",
    "map",
    "map read",
    "map flush",
];

/// What running a sequence gave.
struct Verdict {
    ops: u64,
    transcript: Vec<String>,
    found: Option<Found>,
    /// The signatures of known divergences it went past.
    tolerated: Vec<String>,
}

/// A byte range read back from both sides after a call: from `at`, `len`
/// bytes (clipped to each side's end of file).
#[derive(Clone, Copy)]
struct Window {
    at: Pos,
    len: u64,
}

struct Harness<'a> {
    env: &'a Env,
    strategy: Strategy,
    shared: &'a Shared,
    /// Signatures of known divergences that do not end the sequence.
    tolerated: &'a HashSet<String>,
    fm: FilemapSide,
    k: KernelSide,
    /// Where each map was made, to compare the bytes it touches on both sides.
    map_at: [Pos; MAP_SLOTS],
    step: usize,
}

impl Drop for Harness<'_> {
    fn drop(&mut self) {
        let _ = self.fm.close();
        self.k.maps = Default::default();
        let _ = std::fs::remove_file(&self.k.path);
        match &self.fm.storage {
            Storage::Volume {
                image: Some(image), ..
            } => {
                let _ = std::fs::remove_file(image);
            }
            Storage::Host { path } => {
                let _ = std::fs::remove_file(path);
            }
            Storage::Volume { image: None, .. } => {}
        }
    }
}

/// Runs `seq` on both sides until the first divergence.
fn execute(
    seq: &Sequence,
    env: &Env,
    shared: &Shared,
    tolerated: &HashSet<String>,
) -> Option<Found> {
    let number = env.next_file.fetch_add(1, Ordering::Relaxed);
    let setup = |what: &str, error: io::Error| Found {
        step: 0,
        kind: DivergenceKind::Setup,
        op: what.to_owned(),
        summary: format!("{what} failed: {error}"),
        detail: error.to_string(),
    };
    let k = match KernelSide::create(env.dir.join(format!("kernel-{number}")), env) {
        Ok(k) => k,
        Err(error) => return Some(setup("creating the kernel's file", error)),
    };
    let fm = match FilemapSide::create(seq.backend, &seq.settings, env, number) {
        Ok(fm) => fm,
        Err(error) => {
            let _ = std::fs::remove_file(&k.path);
            return Some(setup("creating the filemap file", error));
        }
    };
    let mut harness = Harness {
        env,
        strategy: seq.settings.strategy,
        shared,
        tolerated,
        fm,
        k,
        map_at: [Pos::At(0); MAP_SLOTS],
        step: 0,
    };
    for (step, op) in seq.ops.iter().enumerate() {
        harness.step = step;
        shared.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(found) = harness.apply(op) {
            return Some(found);
        }
        shared.ops.fetch_add(1, Ordering::Relaxed);
    }
    harness.step = seq.ops.len();
    shared.steps.fetch_add(1, Ordering::Relaxed);
    harness.final_check().err()
}

/// Runs `seq` on a worker thread under a watchdog: a hang (no step for
/// `stall`) or a panic is a divergence too. `tick` is called a few times a
/// second with the calls applied so far.
fn run_guarded(
    seq: &Arc<Sequence>,
    env: &Arc<Env>,
    tolerated: &Arc<HashSet<String>>,
    stall: Duration,
    tick: &mut dyn FnMut(u64),
) -> Verdict {
    let shared = Arc::new(Shared::default());
    let (done, result) = mpsc::channel();
    let worker = {
        let (seq, env, shared, tolerated) =
            (seq.clone(), env.clone(), shared.clone(), tolerated.clone());
        std::thread::Builder::new()
            .name("fm-differential".into())
            .spawn(move || {
                let found = execute(&seq, &env, &shared, &tolerated);
                let _ = done.send(found);
            })
    };
    let worker = match worker {
        Ok(worker) => worker,
        Err(error) => {
            return Verdict {
                ops: 0,
                transcript: Vec::new(),
                found: Some(Found {
                    step: 0,
                    kind: DivergenceKind::Setup,
                    op: "spawning the worker".into(),
                    summary: format!("spawning the worker failed: {error}"),
                    detail: error.to_string(),
                }),
                tolerated: Vec::new(),
            }
        }
    };
    let mut last_step = 0;
    let mut last_change = Instant::now();
    let found = loop {
        match result.recv_timeout(Duration::from_millis(100)) {
            Ok(found) => {
                let _ = worker.join();
                break found;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tick(shared.ops.load(Ordering::Relaxed));
                let step = shared.steps.load(Ordering::Relaxed);
                if step != last_step {
                    last_step = step;
                    last_change = Instant::now();
                } else if last_change.elapsed() >= stall {
                    // The worker is stuck inside a call: leave it behind.
                    let step = step.saturating_sub(1) as usize;
                    let op = seq
                        .ops
                        .get(step)
                        .map_or("final check", |op| op.name())
                        .to_owned();
                    break Some(Found {
                        step,
                        kind: DivergenceKind::Hang,
                        summary: format!(
                            "{op} made no progress for {:.0} s (the thread is left behind)",
                            stall.as_secs_f64()
                        ),
                        op,
                        detail: String::new(),
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let message = match worker.join() {
                    Err(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".into()),
                    Ok(()) => "the worker ended without an answer".into(),
                };
                let step = shared.steps.load(Ordering::Relaxed).saturating_sub(1) as usize;
                let op = seq
                    .ops
                    .get(step)
                    .map_or("final check", |op| op.name())
                    .to_owned();
                // The location varies with the build; the message names the bug.
                let detail = message.lines().next().unwrap_or_default().to_owned();
                break Some(Found {
                    step,
                    kind: DivergenceKind::Panic,
                    summary: format!("{op} panicked: {message}"),
                    op,
                    detail,
                });
            }
        }
    };
    let transcript = shared.transcript.lock().clone();
    let tolerated = shared.tolerated.lock().clone();
    Verdict {
        ops: shared.ops.load(Ordering::Relaxed),
        transcript,
        found,
        tolerated,
    }
}

/// A file length as compared: exact while it is below half the side's
/// largest size, and as the distance from it above.
fn normalized(len: u64, max: u64) -> (bool, u64) {
    if len > max / 2 {
        (true, max - len.min(max))
    } else {
        (false, len)
    }
}

/// Where two byte strings first differ, if they do.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then_some(a.len().min(b.len())))
}

impl Harness<'_> {
    fn mapping(&self) -> &Arc<Mapping> {
        self.fm.mapping()
    }

    /// Both sides' values of `pos`.
    fn both(&self, pos: Pos) -> (u64, u64) {
        (pos.resolve(self.fm.max), pos.resolve(self.k.max))
    }

    fn record(&self, line: String) {
        self.shared.transcript.lock().push(line);
    }

    fn found(&self, kind: DivergenceKind, op: &str, summary: String, detail: String) -> Found {
        self.record(format!("     ^ DIVERGES ({}): {summary}", kind.name()));
        Found {
            step: self.step,
            kind,
            op: op.to_owned(),
            summary,
            detail,
        }
    }

    /// A divergence of a call's result: ends the sequence, unless it is a
    /// known one of a call that changes no byte (see [`TOLERABLE_OPS`]).
    fn result_differs(
        &self,
        kind: DivergenceKind,
        op: &str,
        summary: String,
        detail: String,
    ) -> Result<(), Found> {
        let found = Found {
            step: self.step,
            kind,
            op: op.to_owned(),
            summary,
            detail,
        };
        let signature = found.signature();
        if TOLERABLE_OPS.contains(&op) && self.tolerated.contains(&signature) {
            self.record(format!("     (a known divergence, gone past: {signature})"));
            self.shared.tolerated.lock().push(signature);
            return Ok(());
        }
        Err(self.found(found.kind, op, found.summary, found.detail))
    }

    /// Records the call and both results, and compares the results.
    fn compare(&self, op: &str, call: &str, fm: &Outcome, k: &Outcome) -> Result<(), Found> {
        self.record(format!(
            "{:>4}. {call} -> filemap {fm} | kernel {k}",
            self.step + 1
        ));
        if fm == k {
            return Ok(());
        }
        let kind = match (fm, k) {
            (Outcome::Count(_), Outcome::Count(_)) => DivergenceKind::ShortWrite,
            (Outcome::Bytes(a), Outcome::Bytes(b)) if a.len() != b.len() => {
                DivergenceKind::ShortRead
            }
            (Outcome::Bytes(_), Outcome::Bytes(_)) => DivergenceKind::ContentMismatch,
            _ => DivergenceKind::ErrnoMismatch,
        };
        let summary = match (fm, k) {
            (Outcome::Bytes(a), Outcome::Bytes(b)) if a.len() == b.len() => {
                let at = first_difference(a, b).unwrap_or(0);
                format!(
                    "{op} returned different bytes: first at byte {at} of {}: filemap {:#04x}, kernel {:#04x}",
                    a.len(),
                    a[at],
                    b[at]
                )
            }
            _ => format!("{op}: filemap {fm}, kernel {k}"),
        };
        let detail = format!("filemap {} vs kernel {}", fm.class(), k.class());
        self.result_differs(kind, op, summary, detail)
    }

    /// Records a call only filemap makes, checking it against filemap's own
    /// rule (`expected` describes it).
    fn check_contract(
        &self,
        op: &str,
        call: &str,
        fm: &Outcome,
        ok: bool,
        expected: &str,
    ) -> Result<(), Found> {
        self.record(format!(
            "{:>4}. {call} -> filemap {fm} (filemap only: expected {expected})",
            self.step + 1
        ));
        if ok {
            return Ok(());
        }
        self.result_differs(
            DivergenceKind::Contract,
            op,
            format!("{op}: filemap {fm}, expected {expected}"),
            format!("filemap {} vs expected {expected}", fm.class()),
        )
    }

    fn lens(&self) -> Result<(u64, u64), Found> {
        let k = k_len(&self.k.file).map_err(|e| {
            self.found(
                DivergenceKind::Setup,
                "fstat",
                format!("fstat of the kernel's file failed: {e}"),
                e.to_string(),
            )
        })?;
        Ok((self.mapping().len(), k))
    }

    fn compare_len(&self, op: &str) -> Result<(), Found> {
        let (fm, k) = self.lens()?;
        if normalized(fm, self.fm.max) == normalized(k, self.k.max) {
            return Ok(());
        }
        Err(self.found(
            DivergenceKind::LengthMismatch,
            op,
            format!(
                "after {op}, the file's length is {fm} in filemap (largest {}) and {k} in the kernel (largest {})",
                self.fm.max, self.k.max
            ),
            String::new(),
        ))
    }

    /// Reads `at..at + len` (clipped to the end of file) from both sides and
    /// compares the bytes.
    fn compare_window(&self, op: &str, window: Window) -> Result<(), Found> {
        let (fm_len, k_len) = self.lens()?;
        let (fm_at, k_at) = self.both(window.at);
        let clip = |at: u64, size: u64| {
            if at >= size {
                0
            } else {
                window.len.min(size - at).min(WINDOW_CAP)
            }
        };
        let (fm_n, k_n) = (clip(fm_at, fm_len), clip(k_at, k_len));
        let mut fm_buf = vec![0xEE; fm_n as usize];
        let mut k_buf = vec![0xDD; k_n as usize];
        if fm_n > 0 {
            // Part of the sequence: these reads fill the cache.
            self.record(format!(
                "        read back {fm_n} bytes at {} (read_at | pread)",
                window.at
            ));
            match self.mapping().read_at(&mut fm_buf, fm_at) {
                Ok(n) => fm_buf.truncate(n),
                Err(e) => {
                    return Err(self.found(
                        DivergenceKind::ErrnoMismatch,
                        op,
                        format!(
                        "after {op}, reading back {fm_n} bytes at {fm_at} failed in filemap: {e}"
                    ),
                        format!("read back: filemap {}", Outcome::of_error(&e)),
                    ))
                }
            }
        }
        if k_n > 0 {
            let n = k_pread(&self.k.file, &mut k_buf, k_at).map_err(|e| {
                self.found(
                    DivergenceKind::Setup,
                    op,
                    format!("reading back the kernel's file failed: {e}"),
                    e.to_string(),
                )
            })?;
            k_buf.truncate(n);
        }
        let Some(at) = first_difference(&fm_buf, &k_buf) else {
            return Ok(());
        };
        let show = |buf: &[u8]| {
            buf.get(at)
                .map_or("end of data".to_owned(), |b| format!("{b:#04x}"))
        };
        Err(self.found(
            DivergenceKind::ContentMismatch,
            op,
            format!(
                "after {op}, the bytes from {} differ: first at +{at} (filemap {}, kernel {}; {} and {} bytes read back)",
                window.at,
                show(&fm_buf),
                show(&k_buf),
                fm_buf.len(),
                k_buf.len()
            ),
            String::new(),
        ))
    }

    /// Compares the whole file when it is small enough, else its head and
    /// tail.
    fn compare_all(&self, op: &str) -> Result<(), Found> {
        self.compare_len(op)?;
        let (fm_len, k_len) = self.lens()?;
        let size = fm_len.max(k_len);
        let windows: Vec<Window> = if size <= self.env.max_compare_bytes {
            (0..size.div_ceil(WINDOW_CAP))
                .map(|i| Window {
                    at: Pos::At(i * WINDOW_CAP),
                    len: WINDOW_CAP,
                })
                .collect()
        } else {
            let (high, distance) = normalized(fm_len, self.fm.max);
            let tail = if high {
                Pos::Max(-((distance + EDGE_BYTES) as i64))
            } else {
                Pos::At(fm_len.saturating_sub(EDGE_BYTES))
            };
            let head = (0..EDGE_BYTES / WINDOW_CAP).map(|i| Window {
                at: Pos::At(i * WINDOW_CAP),
                len: WINDOW_CAP,
            });
            let tail = (0..EDGE_BYTES / WINDOW_CAP).map(|i| Window {
                at: tail.moved((i * WINDOW_CAP) as i64),
                len: WINDOW_CAP,
            });
            head.chain(tail).collect()
        };
        for window in windows {
            self.compare_window(op, window)?;
        }
        Ok(())
    }

    /// Applies `op` to both sides and compares.
    fn apply(&mut self, op: &Op) -> Result<(), Found> {
        let name = op.name();
        let call = op.to_string();
        let mut windows: Vec<Window> = Vec::new();
        match *op {
            Op::Read { at, len } | Op::ReadExact { at, len } => {
                let (fa, ka) = self.both(at);
                let exact = matches!(op, Op::ReadExact { .. });
                let (mut fb, mut kb) = (vec![0xEE; len], vec![0xDD; len]);
                let (fm, k) = if exact {
                    let fm = self.mapping().read_exact_at(&mut fb, fa).map(|()| len);
                    let k = self.k.file.read_exact_at(&mut kb, ka).map(|()| len);
                    (Outcome::bytes(fm, fb), Outcome::bytes(k, kb))
                } else {
                    let fm = self.mapping().read_at(&mut fb, fa);
                    let k = k_pread(&self.k.file, &mut kb, ka);
                    (Outcome::bytes(fm, fb), Outcome::bytes(k, kb))
                };
                self.compare(name, &call, &fm, &k)?;
            }
            Op::Write { at, len, seed } | Op::WriteAll { at, len, seed } => {
                let (fa, ka) = self.both(at);
                let data = pattern(seed, len);
                let (fm, k) = if matches!(op, Op::WriteAll { .. }) {
                    (
                        Outcome::done(self.mapping().write_all_at(&data, fa)),
                        Outcome::done(self.k.file.write_all_at(&data, ka)),
                    )
                } else {
                    (
                        Outcome::count(self.mapping().write_at(&data, fa)),
                        Outcome::count(k_pwrite(&self.k.file, &data, ka)),
                    )
                };
                self.compare(name, &call, &fm, &k)?;
                windows.push(Window {
                    at,
                    len: len as u64,
                });
            }
            Op::ReadDirect { at, len, misalign } => {
                let (fa, ka) = self.both(at);
                let mut storage = AlignedBuf::new(len + misalign, PAGE_SIZE);
                storage.fill(0xEE);
                let buf = &mut storage[misalign..];
                let fm = self.mapping().read_direct(buf, fa);
                let fm = Outcome::bytes(fm, buf.to_vec());
                if refused_by_alignment(fa, len, misalign, None) {
                    self.check_contract(
                        name,
                        &call,
                        &fm,
                        fm == Outcome::errno(libc::EINVAL),
                        "Err(EINVAL) for misaligned direct I/O, nothing sent to the kernel",
                    )?;
                } else {
                    // The kernel's buffer is page-aligned whatever filemap's
                    // is: the address is filemap's rule, not the data's.
                    let mut kbuf = AlignedBuf::new(len.max(1), PAGE_SIZE);
                    kbuf.fill(0xDD);
                    let kbuf = &mut kbuf[..len];
                    let k = self.k.read_direct(kbuf, ka);
                    let k = Outcome::bytes(k, kbuf.to_vec());
                    self.compare(name, &call, &fm, &k)?;
                }
                windows.push(Window {
                    at,
                    len: len as u64,
                });
            }
            Op::WriteDirect {
                at,
                len,
                misalign,
                seed,
            } => {
                let (fa, ka) = self.both(at);
                let data = pattern(seed, len);
                let mut storage = AlignedBuf::new(len + misalign, PAGE_SIZE);
                storage[misalign..].copy_from_slice(&data);
                let fm = Outcome::count(self.mapping().write_direct(&storage[misalign..], fa));
                if refused_by_alignment(fa, len, misalign, Some(self.fm.max)) {
                    self.check_contract(
                        name,
                        &call,
                        &fm,
                        fm == Outcome::errno(libc::EINVAL),
                        "Err(EINVAL) for misaligned direct I/O, nothing sent to the kernel",
                    )?;
                } else {
                    let kbuf = AlignedBuf::from_slice(&data, PAGE_SIZE);
                    let k = Outcome::count(self.k.write_direct(&kbuf, ka));
                    self.compare(name, &call, &fm, &k)?;
                }
                windows.push(Window {
                    at,
                    len: len as u64,
                });
            }
            Op::PunchHole { at, len }
            | Op::ZeroRange { at, len }
            | Op::CollapseRange { at, len }
            | Op::InsertRange { at, len } => {
                let (fa, ka) = self.both(at);
                let (fl, kl) = self.both(len);
                let (fm, mode) = match op {
                    Op::PunchHole { .. } => (
                        self.mapping().punch_hole(fa, fl),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    ),
                    Op::ZeroRange { .. } => (
                        self.mapping().zero_range(fa, fl),
                        libc::FALLOC_FL_ZERO_RANGE,
                    ),
                    Op::CollapseRange { .. } => (
                        self.mapping().collapse_range(fa, fl),
                        libc::FALLOC_FL_COLLAPSE_RANGE,
                    ),
                    _ => (
                        self.mapping().insert_range(fa, fl),
                        libc::FALLOC_FL_INSERT_RANGE,
                    ),
                };
                let k = k_fallocate(&self.k.file, mode, ka, kl);
                self.compare(name, &call, &Outcome::done(fm), &Outcome::done(k))?;
                windows.push(Window {
                    at: at.moved(-(PAGE as i64)),
                    len: len.resolve(self.fm.max).saturating_add(2 * PAGE),
                });
                if matches!(op, Op::CollapseRange { .. } | Op::InsertRange { .. }) {
                    windows.push(Window {
                        at,
                        len: WINDOW_CAP,
                    });
                }
            }
            Op::SetLen { len } => {
                let (fl, kl) = self.both(len);
                let fm = Outcome::done(self.mapping().set_len(fl));
                let k = Outcome::done(k_ftruncate(&self.k.file, kl));
                self.compare(name, &call, &fm, &k)?;
                windows.push(Window {
                    at: len.moved(-2 * PAGE as i64),
                    len: 4 * PAGE,
                });
            }
            Op::Readahead { at, len } | Op::SyncRange { at, len } => {
                let (fa, ka) = self.both(at);
                let (fl, kl) = self.both(len);
                let (fm, k) = if matches!(op, Op::Readahead { .. }) {
                    (
                        self.mapping().readahead(fa, fl),
                        k_readahead(&self.k.file, ka, kl),
                    )
                } else {
                    (
                        self.mapping().sync_range(fa, fl),
                        k_sync_file_range(&self.k.file, ka, kl),
                    )
                };
                self.compare(name, &call, &Outcome::done(fm), &Outcome::done(k))?;
                windows.push(Window {
                    at,
                    len: len.resolve(self.fm.max),
                });
            }
            Op::InvalidateRange { at, len } => {
                let (fa, fl) = (at.resolve(self.fm.max), len.resolve(self.fm.max));
                let fm = Outcome::done(self.mapping().invalidate_range(fa, fl));
                // Ranges past 2^63 - 1 (the kernel's `loff_t`) are EINVAL.
                let overflows = fa.checked_add(fl).is_none_or(|end| end > i64::MAX as u64);
                let expected = if overflows {
                    Outcome::errno(libc::EINVAL)
                } else {
                    Outcome::Done
                };
                // The kernel's counterpart only drops clean pages: what the
                // file reads must not change on either side.
                let _ = k_fsync(&self.k.file).and_then(|()| k_drop_cache(&self.k.file));
                self.check_contract(
                    name,
                    &call,
                    &fm,
                    fm == expected,
                    if overflows {
                        "Err(EINVAL): the range ends past 2^63 - 1"
                    } else {
                        "Ok(())"
                    },
                )?;
                windows.push(Window {
                    at: at.moved(-(PAGE as i64)),
                    len: fl.saturating_add(2 * PAGE),
                });
            }
            Op::SyncAll => {
                let fm = Outcome::done(self.mapping().sync_all());
                let k = Outcome::done(k_fsync(&self.k.file));
                self.compare(name, &call, &fm, &k)?;
            }
            Op::Map {
                slot,
                at,
                len,
                write,
            } => {
                let (fa, ka) = self.both(at);
                self.fm.maps[slot] = None;
                self.k.maps[slot] = None;
                let access = if write {
                    MapAccess::ReadWrite
                } else {
                    MapAccess::Read
                };
                let fm = self.mapping().map(fa, len, access);
                let k = KernelMap::new(&self.k.file, ka, len, write);
                let outcomes = (
                    Outcome::done(fm.as_ref().map(drop).map_err(clone_error)),
                    Outcome::done(k.as_ref().map(drop).map_err(clone_error)),
                );
                self.fm.maps[slot] = fm.ok();
                self.k.maps[slot] = k.ok();
                self.map_at[slot] = at;
                self.compare(name, &call, &outcomes.0, &outcomes.1)?;
                if let Some(map) = &self.fm.maps[slot] {
                    windows.push(Window {
                        at,
                        len: map.len() as u64,
                    });
                }
            }
            Op::DropMap { slot } => {
                let window = self.fm.maps[slot].as_ref().map(|map| Window {
                    at: self.map_at[slot],
                    len: map.len() as u64,
                });
                self.fm.maps[slot] = None;
                self.k.maps[slot] = None;
                self.record(format!("{:>4}. {call}", self.step + 1));
                windows.extend(window);
            }
            Op::MapRead {
                slot,
                at,
                len,
                past_eof,
            } => windows.extend(self.map_access(slot, at, len, None, past_eof)?),
            Op::MapWrite {
                slot,
                at,
                len,
                seed,
                past_eof,
            } => windows.extend(self.map_access(slot, at, len, Some(seed), past_eof)?),
            Op::MapFlush { slot } => match (&self.fm.maps[slot], &self.k.maps[slot]) {
                (Some(fm_map), Some(k_map)) => {
                    let fm = Outcome::done(fm_map.flush());
                    let k = Outcome::done(k_map.flush());
                    self.compare(name, &call, &fm, &k)?;
                }
                _ => self.record(format!("{:>4}. {call} -> no map, skipped", self.step + 1)),
            },
            Op::Reopen { settings } => {
                let settings = CacheSettings {
                    strategy: self.strategy,
                    ..settings
                };
                self.reopen(name, &call, &settings)?;
                self.compare_all(name)?;
            }
            Op::CloseOpen => {
                self.record(format!("{:>4}. {call}", self.step + 1));
                self.k.maps = Default::default();
                if let Err(error) = self.fm.close_and_open(self.env) {
                    return Err(self.open_failed(
                        name,
                        "opening the file again in its cache",
                        &error,
                    ));
                }
                self.compare_all(name)?;
            }
            Op::Compare => {
                self.record(format!("{:>4}. {call}", self.step + 1));
                self.compare_all(name)?;
            }
        }
        self.compare_len(name)?;
        for window in windows {
            self.compare_window(name, window)?;
        }
        Ok(())
    }

    /// A load or store through map `slot`, wrapped into the part of the map
    /// inside the end of file on both sides; with `past_eof`, instead checks
    /// that filemap refuses an access reaching past the last page of the file
    /// with `EFAULT` (the kernel would raise `SIGBUS`).
    fn map_access(
        &self,
        slot: usize,
        at: usize,
        len: usize,
        store: Option<u8>,
        past_eof: bool,
    ) -> Result<Option<Window>, Found> {
        let (name, verb) = match store {
            Some(_) => ("map write", "write"),
            None => ("map read", "read"),
        };
        let (Some(fm_map), Some(k_map)) = (&self.fm.maps[slot], &self.k.maps[slot]) else {
            self.record(format!(
                "{:>4}. map[{slot}].{verb}(..) -> no map, skipped",
                self.step + 1
            ));
            return Ok(None);
        };
        let (fm_len, k_len) = self.lens()?;
        let map_len = fm_map.len() as u64;
        if past_eof {
            // The first byte past the file's last page, if the map reaches it.
            let eof_page = fm_len.next_multiple_of(PAGE);
            if fm_map.offset() + map_len <= eof_page {
                self.record(format!(
                    "{:>4}. map[{slot}].{verb}(..) past the end of file -> the map ends before it, skipped",
                    self.step + 1
                ));
                return Ok(None);
            }
            let start = eof_page.saturating_sub(fm_map.offset()).saturating_sub(1) as usize;
            let n = (len.min(map_len as usize - start))
                .max(2)
                .min(map_len as usize - start);
            let call =
                format!("map[{slot}].{verb}({start}, {n} bytes) reaching past the end of file");
            let fm = match store {
                Some(seed) => Outcome::done(fm_map.write(start, &pattern(seed, n))),
                None => {
                    let mut buf = vec![0; n];
                    Outcome::done(fm_map.read(start, &mut buf))
                }
            };
            let refused = if fm_map.access() == MapAccess::Read && store.is_some() {
                Outcome::errno(libc::EACCES)
            } else {
                Outcome::errno(libc::EFAULT)
            };
            let expected = refused.to_string();
            self.check_contract(name, &call, &fm, fm == refused, &expected)?;
            return Ok(None);
        }
        // Each side's bytes of the map inside its end of file.
        let inside = |offset: u64, size: u64| size.saturating_sub(offset).min(map_len);
        let limit = inside(fm_map.offset(), fm_len).min(inside(k_map.offset, k_len)) as usize;
        if limit == 0 {
            self.record(format!(
                "{:>4}. map[{slot}].{verb}(..) -> the map lies past the end of file, skipped",
                self.step + 1
            ));
            return Ok(None);
        }
        let at = at % limit;
        let n = len.min(limit - at);
        let window = Window {
            at: self.map_at[slot].moved(at as i64),
            len: n as u64,
        };
        match store {
            None => {
                let call = format!("map[{slot}].read({at}, buf of {n})");
                let mut fm_buf = vec![0xEE; n];
                let fm = Outcome::bytes(fm_map.read(at, &mut fm_buf).map(|()| n), fm_buf);
                let mut k_buf = vec![0xDD; n];
                k_map.read(at, &mut k_buf);
                self.compare(name, &call, &fm, &Outcome::Bytes(k_buf))?;
                Ok(None)
            }
            Some(seed) => {
                let call = format!("map[{slot}].write({at}, pattern(seed {seed}, len {n}))");
                let data = pattern(seed, n);
                let fm = Outcome::done(fm_map.write(at, &data));
                if k_map.writable {
                    k_map.write(at, &data);
                    self.compare(name, &call, &fm, &Outcome::Done)?;
                } else {
                    // The kernel would raise SIGSEGV: filemap's EACCES is its rule.
                    self.check_contract(
                        name,
                        &call,
                        &fm,
                        fm == Outcome::errno(libc::EACCES),
                        "Err(EACCES) for a store through a read-only map",
                    )?;
                }
                Ok(Some(window))
            }
        }
    }

    /// Syncs both sides, drops every handle of filemap's file and opens it
    /// again through a cache of `settings`; the kernel's maps go too.
    fn reopen(&mut self, name: &str, call: &str, settings: &CacheSettings) -> Result<(), Found> {
        let fm = Outcome::done(self.mapping().sync_all());
        let k = Outcome::done(k_fsync(&self.k.file));
        self.compare(name, &format!("{call}: sync_all()"), &fm, &k)?;
        self.k.maps = Default::default();
        let reopened = self
            .fm
            .close()
            .and_then(|()| self.fm.open(settings, self.env));
        if let Err(error) = reopened {
            return Err(self.open_failed(name, "opening the file again", &error));
        }
        Ok(())
    }

    /// The divergence of an open of filemap's file that failed (`what`),
    /// where the kernel's file stays open.
    fn open_failed(&mut self, name: &str, what: &str, error: &io::Error) -> Found {
        let fm = Outcome::of_error(error);
        self.found(
            DivergenceKind::ErrnoMismatch,
            name,
            format!("{what} failed: {error}"),
            format!("filemap {} vs kernel Ok(())", fm.class()),
        )
    }

    /// The end of every sequence: the whole file, then the same after syncing
    /// and opening it again through a fresh cache of default settings (what
    /// the backend holds).
    fn final_check(&mut self) -> Result<(), Found> {
        let name = "final check";
        self.record(format!("{:>4}. compare the whole file", self.step + 1));
        self.compare_all(name)?;
        let settings = CacheSettings::defaults(self.strategy);
        let call = format!("reopen with {settings}");
        self.reopen(name, &call, &settings)?;
        self.compare_all(name)
    }
}

/// Whether filemap's direct I/O rule (4096-aligned offset and length,
/// 512-aligned buffer) refuses a call that the kernel would go on to do: the
/// kernel checks the range (past 2^63 - 1: `EINVAL`) and, for a write, the
/// largest size (at or past it: `EFBIG`; across it: cut short there) before
/// alignment, and filemap in the same order, so only what is left is
/// filemap's own. `write_max`: the largest file size, for a write. Empty
/// calls are never refused (both sides: `Ok(0)`).
fn refused_by_alignment(offset: u64, len: usize, misalign: usize, write_max: Option<u64>) -> bool {
    if len == 0
        || offset
            .checked_add(len as u64)
            .is_none_or(|end| end > i64::MAX as u64)
    {
        return false;
    }
    let len = match write_max {
        Some(max) if offset >= max => return false,
        Some(max) => (len as u64).min(max - offset),
        None => len as u64,
    };
    offset % PAGE != 0 || len % PAGE != 0 || misalign % 512 != 0
}

/// A copy of an error: its errno, or its kind and message.
fn clone_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Shrinking

/// Shrinks `seq`, which diverged with `found`, to a shorter and simpler
/// sequence that diverges the same way (same signature), within `budget`.
/// Returns it, its verdict, how many sequences ran, and whether it reproduced.
fn shrink(
    seq: &Sequence,
    found: &Found,
    env: &Arc<Env>,
    known: &HashSet<String>,
    stall: Duration,
    budget: Duration,
    tick: &mut dyn FnMut(u64),
) -> (Sequence, Option<Verdict>, usize) {
    let started = Instant::now();
    let signature = found.signature();
    // Other known divergences of calls that change nothing are gone past, so
    // that the shrunk sequence shows this one.
    let mut tolerated = known.clone();
    tolerated.remove(&signature);
    let tolerated = Arc::new(tolerated);
    let mut runs = 0;
    // A hang costs a whole stall timeout per run: try fewer candidates.
    let stall = if found.kind == DivergenceKind::Hang {
        stall.min(Duration::from_secs(5))
    } else {
        stall
    };
    let mut attempt = |candidate: &Sequence, runs: &mut usize| -> Option<Verdict> {
        if started.elapsed() >= budget {
            return None;
        }
        *runs += 1;
        let verdict = run_guarded(&Arc::new(candidate.clone()), env, &tolerated, stall, tick);
        match &verdict.found {
            Some(f) if f.signature() == signature => Some(verdict),
            _ => None,
        }
    };

    // The calls after the divergence play no part.
    let mut best = seq.clone();
    best.ops.truncate((found.step + 1).min(seq.ops.len()));
    let mut best_verdict = attempt(&best, &mut runs);
    if best_verdict.is_none() {
        // Timing-dependent: try once more as it was.
        best = seq.clone();
        best_verdict = attempt(&best, &mut runs);
        if best_verdict.is_none() {
            return (best, None, runs);
        }
    }
    let out_of_time = |started: Instant| started.elapsed() >= budget;

    // Until nothing changes: drop chunks of calls, halving the chunk size
    // (delta debugging), then simplify each call's arguments, then the cache
    // settings. A change may let calls dropped before go now.
    let mut changed = true;
    while changed && !out_of_time(started) {
        changed = false;
        let mut chunk = best.ops.len().div_ceil(2).max(1);
        loop {
            let mut start = 0;
            while start < best.ops.len() && !out_of_time(started) {
                let mut candidate = best.clone();
                let end = (start + chunk).min(candidate.ops.len());
                candidate.ops.drain(start..end);
                if let Some(verdict) = attempt(&candidate, &mut runs) {
                    best = candidate;
                    keep_to_divergence(&mut best, &verdict);
                    best_verdict = Some(verdict);
                    changed = true;
                } else {
                    start += chunk;
                }
            }
            if chunk == 1 || out_of_time(started) {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
        for i in 0..best.ops.len() {
            for simpler in best.ops.get(i).map(Op::simpler).unwrap_or_default() {
                let mut candidate = best.clone();
                candidate.ops[i] = simpler;
                if let Some(verdict) = attempt(&candidate, &mut runs) {
                    best = candidate;
                    keep_to_divergence(&mut best, &verdict);
                    best_verdict = Some(verdict);
                    changed = true;
                    break;
                }
            }
        }
        for settings in best.settings.simpler() {
            let candidate = Sequence {
                settings,
                ..best.clone()
            };
            if let Some(verdict) = attempt(&candidate, &mut runs) {
                best = candidate;
                keep_to_divergence(&mut best, &verdict);
                best_verdict = Some(verdict);
                changed = true;
            }
        }
    }
    (best, best_verdict, runs)
}

/// Drops the calls after the one that diverged in `verdict`.
fn keep_to_divergence(seq: &mut Sequence, verdict: &Verdict) {
    if let Some(found) = &verdict.found {
        seq.ops.truncate((found.step + 1).min(seq.ops.len()));
    }
}

/// The reproducer of a divergence: backend, cache settings, the largest
/// sizes, and the calls with both sides' results.
fn reproducer(seq: &Sequence, verdict: &Verdict, env: &Env, fm_max: u64) -> String {
    let mut text = format!(
        "backend {}; sequence seed {:#x}; cache: {}\nmax (largest file size): filemap {}, kernel {}; kernel direct I/O: {}\n",
        seq.backend.name(),
        seq.seed,
        seq.settings,
        fm_max,
        env.kernel.max_file_size,
        if env.kernel.direct_io {
            "O_DIRECT"
        } else {
            "buffered + fdatasync (O_DIRECT refused)"
        },
    );
    text.push_str(
        "calls (filemap on the left, the kernel's file on the right; \"read back\" lines are \
         the harness's own read_at of what a call touched, which fill the cache too):\n",
    );
    for line in &verdict.transcript {
        text.push_str(line);
        text.push('\n');
    }
    if let Some(found) = &verdict.found {
        if !verdict
            .transcript
            .iter()
            .any(|line| line.contains("^ DIVERGES"))
        {
            let call = seq
                .ops
                .get(found.step)
                .map_or("the final check".to_owned(), |op| op.to_string());
            text.push_str(&format!(
                "{:>4}. {call}\n     ^ DIVERGES ({}): {}\n",
                found.step + 1,
                found.kind.name(),
                found.summary
            ));
        }
    }
    text
}

/// The largest file size filemap gives a backend (the same for every file
/// of a kind; asked of a scratch file).
fn filemap_max(backend: DiffBackend, env: &Env) -> u64 {
    let probe = || -> io::Result<u64> {
        Ok(match backend {
            DiffBackend::HostFile => {
                let path = env.dir.join(format!("max-probe-{}", std::process::id()));
                let size = HostFile::create(&path)?.max_file_size();
                let _ = std::fs::remove_file(&path);
                size
            }
            _ => {
                let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
                volume.create_file(FILE_NAME)?.max_file_size()
            }
        })
    };
    probe().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The run

/// Runs sequences round-robin over every (backend, strategy) pair of
/// `config` until its time is up, shrinking each new divergence, and calls
/// `progress` a few times a second. Fails only if the run cannot be set up
/// (bad settings, a directory whose file system lacks what the comparison
/// needs).
pub fn run(
    config: &DifferentialConfig,
    mut progress: impl FnMut(&DiffProgress),
) -> io::Result<DifferentialReport> {
    let invalid = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
    if config.backends.is_empty() || config.strategies.is_empty() {
        return invalid("the differential test needs at least one backend and one strategy");
    }
    if !(config.seconds.is_finite() && config.seconds >= 0.0) {
        return invalid("--seconds must be a number of seconds");
    }
    if !(config.shrink_seconds.is_finite() && config.shrink_seconds >= 0.0) {
        return invalid("--shrink-seconds must be a number of seconds");
    }
    if !(config.stall_seconds.is_finite() && config.stall_seconds > 0.0) {
        return invalid("the stall timeout must be a positive number of seconds");
    }
    if config.ops_per_sequence == 0 {
        return invalid("a sequence needs at least one call");
    }
    let temp = match &config.dir {
        Some(_) => None,
        None => Some(tempfile::tempdir().map_err(crate::naming(format!(
            "a temporary directory in {}",
            std::env::temp_dir().display()
        )))?),
    };
    let dir = match (&config.dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temp)) => temp.path().to_owned(),
        (None, None) => unreachable!("a temporary directory is made when none is given"),
    };
    let kernel = probe_kernel(&dir).map_err(crate::naming(dir.display()))?;
    let mut notes = Vec::new();
    if !kernel.direct_io {
        notes.push(
            "the file system refuses O_DIRECT: the kernel side's direct calls are buffered \
             pread/pwrite followed by fdatasync, and volume-direct images are opened without it"
                .to_owned(),
        );
    }
    let env = Arc::new(Env {
        dir,
        kernel: kernel.clone(),
        wrap: config.wrap_backend.clone(),
        max_compare_bytes: config.max_compare_bytes,
        next_file: AtomicU64::new(0),
    });
    let pairs: Vec<(DiffBackend, Strategy)> = config
        .backends
        .iter()
        .flat_map(|&b| config.strategies.iter().map(move |&s| (b, s)))
        .collect();
    let mut rows: Vec<DiffRow> = pairs
        .iter()
        .map(|&(backend, strategy)| DiffRow {
            backend: backend.name().to_owned(),
            strategy: strategy.name().to_owned(),
            scenario: "differential".to_owned(),
            ..DiffRow::default()
        })
        .collect();
    let stall = Duration::from_secs_f64(config.stall_seconds);
    let deadline = Duration::from_secs_f64(config.seconds);
    let started = Instant::now();
    let mut shrinking = Duration::ZERO;
    let mut divergences: Vec<Divergence> = Vec::new();
    // The signatures of `divergences`, gone past where they cannot hide others.
    let mut known: Arc<HashSet<String>> = Arc::new(HashSet::new());
    let mut shrunk = 0;
    let (mut total_ops, mut sequences, mut diverged) = (0u64, 0u64, 0u64);
    let mut last_tick = Instant::now();
    let mut report = |status: DiffProgress| {
        if last_tick.elapsed() >= Duration::from_millis(200) {
            last_tick = Instant::now();
            progress(&status);
        }
    };
    let mut index = 0u64;
    loop {
        let testing = started.elapsed().saturating_sub(shrinking);
        if (testing >= deadline && index >= pairs.len() as u64)
            || config.max_sequences.is_some_and(|most| index >= most)
        {
            break;
        }
        let pair = (index % pairs.len() as u64) as usize;
        let (backend, strategy) = pairs[pair];
        let seed = mix(config.seed ^ mix(index));
        let seq = Arc::new(generate(seed, backend, strategy, config.ops_per_sequence));
        let before = Instant::now();
        let status = DiffProgress {
            elapsed: 0.0,
            ops: total_ops,
            sequences,
            divergences: diverged,
            backend,
            strategy,
            shrinking: false,
        };
        let verdict = run_guarded(&seq, &env, &known, stall, &mut |ops| {
            report(DiffProgress {
                elapsed: started.elapsed().as_secs_f64(),
                ops: status.ops + ops,
                ..status
            })
        });
        let row = &mut rows[pair];
        row.sequences += 1;
        row.ops += verdict.ops;
        row.seconds += before.elapsed().as_secs_f64();
        sequences += 1;
        index += 1;
        let ops_before = total_ops + verdict.ops;
        total_ops += verdict.ops;
        if verdict.found.is_some() || !verdict.tolerated.is_empty() {
            row.divergences += 1;
            diverged += 1;
        }
        let where_seen = format!("{}/{}", backend.name(), strategy.name());
        let mut seen_again =
            |signature: &str| match divergences.iter_mut().find(|d| d.signature == signature) {
                Some(known) => {
                    known.occurrences += 1;
                    if !known.seen_under.contains(&where_seen) {
                        known.seen_under.push(where_seen.clone());
                    }
                    true
                }
                None => false,
            };
        for signature in &verdict.tolerated {
            seen_again(signature);
        }
        let Some(found) = verdict.found else {
            continue;
        };
        let signature = found.signature();
        if seen_again(&signature) {
            continue;
        }
        let watched = config
            .watch
            .as_ref()
            .is_none_or(|watch| watch(found.kind, &found.op));
        let seconds_before = started.elapsed().as_secs_f64();
        let fm_max = filemap_max(backend, &env);
        let original_calls = (found.step + 1).min(seq.ops.len());
        let shrink_started = Instant::now();
        let (best, best_verdict, shrink_runs) =
            if watched && shrunk < config.max_shrunk && config.shrink_seconds > 0.0 {
                shrunk += 1;
                shrink(
                    &seq,
                    &found,
                    &env,
                    &known,
                    stall,
                    Duration::from_secs_f64(config.shrink_seconds),
                    &mut |ops| {
                        report(DiffProgress {
                            elapsed: started.elapsed().as_secs_f64(),
                            ops: status.ops + ops,
                            shrinking: true,
                            ..status
                        })
                    },
                )
            } else {
                ((*seq).clone(), None, 0)
            };
        shrinking += shrink_started.elapsed();
        let reproduced = best_verdict.is_some();
        let (best, shown) = match best_verdict {
            Some(shown) => (best, shown),
            None => (
                Sequence {
                    ops: seq.ops[..original_calls].to_vec(),
                    ..(*seq).clone()
                },
                Verdict {
                    ops: verdict.ops,
                    transcript: verdict.transcript,
                    found: Some(found.clone()),
                    tolerated: verdict.tolerated,
                },
            ),
        };
        let final_found = shown.found.clone().unwrap_or_else(|| found.clone());
        divergences.push(Divergence {
            kind: final_found.kind,
            op: final_found.op.clone(),
            summary: final_found.summary.clone(),
            signature,
            backend: backend.name().to_owned(),
            strategy: strategy.name().to_owned(),
            seen_under: vec![where_seen],
            occurrences: 1,
            ops_before,
            seconds_before,
            sequence_seed: seed,
            original_calls,
            shrunk_calls: best.ops.len(),
            shrink_runs,
            reproduced,
            reproducer: reproducer(&best, &shown, &env, fm_max),
        });
        known = Arc::new(divergences.iter().map(|d| d.signature.clone()).collect());
        if config.stop_at_first || (config.watch.is_some() && watched) {
            break;
        }
    }
    let seconds = started.elapsed().saturating_sub(shrinking).as_secs_f64();
    for row in &mut rows {
        row.ops_per_s = if row.seconds > 0.0 {
            row.ops as f64 / row.seconds
        } else {
            0.0
        };
    }
    drop(temp);
    Ok(DifferentialReport {
        seed: config.seed,
        ops: total_ops,
        sequences,
        seconds,
        shrink_seconds: shrinking.as_secs_f64(),
        ops_per_s: if seconds > 0.0 {
            total_ops as f64 / seconds
        } else {
            0.0
        },
        kernel,
        rows,
        divergences,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_resolve_per_side_and_print_readably() {
        assert_eq!(Pos::Max(-4096).resolve(1 << 44), (1 << 44) - 4096);
        assert_eq!(Pos::Max(5).resolve(u64::MAX - 2), u64::MAX);
        assert_eq!(Pos::At(7).resolve(1), 7);
        assert_eq!(Pos::Max(-4096).to_string(), "max-4096");
        assert_eq!(Pos::At(u64::MAX - 3).to_string(), "u64::MAX-3");
        assert_eq!(Pos::At((1 << 63) + 2).to_string(), "2^63+2");
        assert_eq!(Pos::At(100).to_string(), "100");
    }

    #[test]
    fn lengths_near_the_largest_size_compare_by_distance() {
        assert_eq!(normalized(100, 1 << 44), (false, 100));
        assert_eq!(
            normalized((1 << 44) - 10, 1 << 44),
            normalized((1 << 44) - 4096 - 10, (1 << 44) - 4096)
        );
    }

    #[test]
    fn generation_is_deterministic_given_the_seed() {
        let a = generate(42, DiffBackend::VolumeMem, Strategy::Range, 100);
        let b = generate(42, DiffBackend::VolumeMem, Strategy::Range, 100);
        assert_eq!(a.ops, b.ops);
        assert_eq!(a.settings, b.settings);
        let c = generate(43, DiffBackend::VolumeMem, Strategy::Range, 100);
        assert_ne!(a.ops, c.ops);
    }

    #[test]
    fn simpler_calls_are_different_calls() {
        let op = Op::Write {
            at: Pos::At(5000),
            len: 9000,
            seed: 3,
        };
        let simpler = op.simpler();
        assert!(!simpler.is_empty());
        assert!(simpler.iter().all(|s| *s != op));
    }
}
