//! The torture test of filemap: many threads race every operation of the page
//! cache over several files that share one [`filemap::Volume`], and an oracle
//! checks every page every read returns (see [`oracle`]).
//!
//! Writers stamp whole pages; a read is `stale` if it returned a page that an
//! operation which ended before the read began had already replaced, `foreign`
//! if it returned another file's or another page's stamp, and `torn` if one page
//! mixed two versions.
//!
//! By default delays are injected to widen race windows (see
//! [`TortureConfig::delay_percent`]), so that the `none` strategy fails within
//! seconds. On the volume, the device delays a share of its reads and writes: a
//! fill that has looked up its block and is held before reading it is exactly
//! the window of the kernel's stale-data bug. Host files have no device under
//! them, so each sits behind a [`filemap::backend::FaultyBackend`] that delays a
//! share of invalidating calls (punch, zero, truncate) before they reach the
//! file: the window between the cache dropping a range and the backend changing
//! it.
//!
//! ```
//! use filemap_torture::{run, TortureConfig};
//! let config = TortureConfig { seconds: 0.2, ..TortureConfig::default() };
//! let report = run(&config, |_| {})?;
//! assert_eq!(report.stale + report.foreign + report.torn, 0);
//! # Ok::<(), std::io::Error>(())
//! ```

mod async_ops;
pub mod differential;
pub mod mount;
pub mod oracle;
mod peer;
mod run;
mod vectored;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use filemap::{CacheStats, Strategy};
use serde::Serialize;

pub use filemap_peers::Peer;
pub use run::run;

/// Waits until nothing holds `shared` any more, for at most `timeout`;
/// returns whether it went. A volume outlives its cache by a moment when a
/// readahead thread still holds one of its mappings, and the next volume on
/// the same device can claim it only once it is gone.
pub(crate) fn wait_until_dropped<T>(
    shared: &std::sync::Weak<T>,
    timeout: std::time::Duration,
) -> bool {
    let started = std::time::Instant::now();
    while shared.strong_count() > 0 {
        if started.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// Prefixes an error's message with what it concerns, a path or a setting,
/// keeping its kind: `/dev/sdz: No such file or directory (os error 2)`.
pub(crate) fn naming(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |error| std::io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// A kind of operation the torture mixes: the keys of
/// [`TortureReport::by_kind`] and the columns of the command line's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// A buffered read, checked page by page.
    Read,
    /// A buffered write of whole stamped pages.
    Write,
    /// Readahead of a range.
    Readahead,
    /// A hole punched.
    Punch,
    /// A range zeroed.
    Zero,
    /// The file truncated to between half and all of its pages.
    Truncate,
    /// A direct read, checked page by page.
    ReadDirect,
    /// A direct write of whole stamped pages.
    WriteDirect,
    /// A sync of a range or of the whole file.
    Sync,
    /// A range written back and dropped from the cache.
    Invalidate,
    /// A read through a memory map, checked page by page.
    MapRead,
    /// Stores of whole stamped pages through a memory map.
    MapWrite,
    /// A page pinned for a while: read at once, and read again before the
    /// unpin; the two must match.
    Pin,
    /// A buffered read into several buffers at once (`read_vectored_at`,
    /// `preadv` through a mount), checked page by page.
    ReadVectored,
    /// A buffered write of whole stamped pages from several buffers at once
    /// (`write_vectored_at`, `pwritev` through a mount).
    WriteVectored,
}

impl OpKind {
    /// Every kind, in report order (the order of the declaration, so that
    /// `kind as usize` indexes per-kind arrays).
    pub const ALL: [OpKind; 15] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Readahead,
        OpKind::Punch,
        OpKind::Zero,
        OpKind::Truncate,
        OpKind::ReadDirect,
        OpKind::WriteDirect,
        OpKind::Sync,
        OpKind::Invalidate,
        OpKind::MapRead,
        OpKind::MapWrite,
        OpKind::Pin,
        OpKind::ReadVectored,
        OpKind::WriteVectored,
    ];

    /// The kind's name in reports and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Readahead => "readahead",
            OpKind::Punch => "punch",
            OpKind::Zero => "zero",
            OpKind::Truncate => "truncate",
            OpKind::ReadDirect => "read_direct",
            OpKind::WriteDirect => "write_direct",
            OpKind::Sync => "sync",
            OpKind::Invalidate => "invalidate",
            OpKind::MapRead => "map_read",
            OpKind::MapWrite => "map_write",
            OpKind::Pin => "pin",
            OpKind::ReadVectored => "read_vectored",
            OpKind::WriteVectored => "write_vectored",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that tables can align it with a width.
        f.pad(self.name())
    }
}

/// The error of parsing an unknown operation kind name.
#[derive(Debug, thiserror::Error)]
#[error("unknown operation kind {0:?} (expected one of: {names})", names = OpKind::ALL.map(OpKind::name).join(", "))]
pub struct UnknownOpKind(String);

impl FromStr for OpKind {
    type Err = UnknownOpKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OpKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownOpKind(s.to_owned()))
    }
}

/// Which workload the torture runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scenario {
    /// Every operation at random from every thread.
    #[default]
    Mixed,
    /// In the spirit of bcachefs's test: three threads do direct I/O on their
    /// own files, each with a buffer that is a memory map of the next thread's
    /// file, while a fourth punches holes in all three. Ignores `threads` and
    /// `files` (4 and 3).
    SelfMapDio,
    /// The mixed workload with every call but the map accesses and
    /// `invalidate` made through [`filemap::AsyncMapping`] from a Tokio
    /// runtime per worker, and one future in four dropped at a random point
    /// (after its first poll, after a random few microseconds, or before it
    /// was polled). A dropped read is not checked; a dropped change is
    /// recorded as in flight until the work it handed to the blocking pool
    /// has ended.
    Async,
}

impl Scenario {
    /// The scenario's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Mixed => "mixed",
            Scenario::SelfMapDio => "self-map-dio",
            Scenario::Async => "async",
        }
    }
}

/// What the files live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Files sharing one [`filemap::Volume`], whose allocator reuses freed
    /// blocks at once: stale block mappings show up as foreign data.
    Volume,
    /// One host file per mapping ([`filemap::backend::HostFile`]).
    HostFile,
}

impl BackendKind {
    /// The backend's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Volume => "volume",
            BackendKind::HostFile => "hostfile",
        }
    }
}

/// Where the data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Temporary: an image file for the volume, a directory for host files;
    /// removed afterwards.
    TempFile,
    /// Memory (the volume backend only).
    Mem,
    /// The volume's image file or block device (its contents are overwritten),
    /// or the directory the host files are created in.
    Path(PathBuf),
}

/// The settings of one torture run of one strategy.
#[derive(Clone, Debug)]
pub struct TortureConfig {
    /// The coherence strategy under test.
    pub strategy: Strategy,
    /// What the files live in.
    pub backend: BackendKind,
    /// Which workload runs.
    pub scenario: Scenario,
    /// Where the volume lives.
    pub device: DeviceSpec,
    /// How long to run.
    pub seconds: f64,
    /// Worker threads.
    pub threads: usize,
    /// Files sharing the volume.
    pub files: usize,
    /// Pages each file spans (at most; truncates shrink files to at least half).
    pub pages_per_file: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Percentage of device reads and writes delayed, to widen race windows
    /// (0 disables delays).
    pub delay_percent: u32,
    /// The longest injected delay, in microseconds.
    pub max_delay_us: u64,
    /// The page cache budget in bytes.
    pub cache_bytes: u64,
    /// Stop as soon as a violation is found (tests that only need one).
    pub stop_on_violation: bool,
    /// Mix stores through memory maps (`map_write`) into the operations (on by
    /// default), racing every other kind, `invalidate` included.
    pub map_writes: bool,
    /// Make the operations through a mount of the volume, each worker a
    /// process of its own (see [`mount`]); `None`: through the library.
    pub mount: Option<mount::MountSettings>,
    /// Run a peer cache over the same backends instead of filemap (the
    /// strategy is then unused): a read-through page cache of moka,
    /// quick_cache or foyer, without maps and pins (see [`filemap_peers`]).
    pub peer: Option<Peer>,
}

impl Default for TortureConfig {
    fn default() -> Self {
        TortureConfig {
            strategy: Strategy::DEFAULT,
            backend: BackendKind::Volume,
            scenario: Scenario::Mixed,
            device: DeviceSpec::Mem,
            seconds: 10.0,
            threads: 6,
            files: 4,
            pages_per_file: 2048,
            seed: 1,
            delay_percent: 20,
            max_delay_us: 200,
            cache_bytes: 64 << 20,
            stop_on_violation: false,
            map_writes: true,
            mount: None,
            peer: None,
        }
    }
}

/// The outcome of one run, one JSON object per strategy on the command line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TortureReport {
    /// The strategy's name.
    pub strategy: String,
    /// The backend's name.
    pub backend: String,
    /// The scenario's name.
    pub scenario: String,
    /// What the operations went through: `library`, `mount` or
    /// `mount+kernel-cache`.
    pub through: String,
    /// Operations completed.
    pub ops: u64,
    /// Pages returned by reads and checked by the oracle.
    pub reads_checked: u64,
    /// Pages a read returned after an operation that ended before it replaced them.
    pub stale: u64,
    /// Pages holding another file's or another page's data.
    pub foreign: u64,
    /// Pages mixing two versions.
    pub torn: u64,
    /// Pages that mixed versions while a store through a memory map to them
    /// overlapped the read: shared memory, which no reader sees atomically (not
    /// a violation; counted so that it is seen). Through a mount, also pages
    /// that the workers' plain loads from their maps found mixing versions
    /// that were each current during the load: no change of a page is atomic
    /// against such loads.
    pub mixed_during_map_store: u64,
    /// Pages that reads through a mount with the kernel's page cache in
    /// front found mixing versions that were each current during the read,
    /// byte by byte: the kernel copies a page out to a reader while a write
    /// copies into it, with no lock between them (ext4's reads tear the same
    /// way), and neither copy is atomic per word. Not a violation; counted
    /// so that it is seen. A byte of a version replaced before the read
    /// began is still stale.
    pub mixed_in_kernel_cache: u64,
    /// Pages that reads through a mount returned holding a version (a write,
    /// or a store through a map) that a later store through a map, made
    /// during a punch or zero range the kernel's `fallocate` made through the
    /// mount, should have replaced:
    /// the kernel drops its pages of the range after the server's change
    /// with no lock against faults meanwhile, and so may discard the later
    /// store after writing the earlier back (see
    /// [`oracle::PageHistory::begin_kernel_fallocate`]). Not a violation of
    /// the server's; counted so that it is seen.
    pub map_stores_lost_by_kernel_fallocate: u64,
    /// Operations that failed with an I/O error.
    pub errors: u64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// How long the run took.
    pub seconds: f64,
    /// Operations completed, by kind ([`OpKind::name`]).
    pub by_kind: BTreeMap<String, u64>,
    /// Delays and errors the device injected.
    pub injected: u64,
    /// What the page cache counted during the run.
    pub cache: CacheStats,
    /// The first few violations and errors, described.
    pub examples: Vec<String>,
}

impl TortureReport {
    /// Stale, foreign and torn pages together.
    pub fn violations(&self) -> u64 {
        self.stale + self.foreign + self.torn
    }

    /// Whether the run found nothing wrong: no violation and no error.
    pub fn is_clean(&self) -> bool {
        self.violations() == 0 && self.errors == 0
    }
}

/// What the progress callback is told, a few times a second.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Seconds since the run started.
    pub elapsed: f64,
    /// Operations completed so far.
    pub ops: u64,
    /// Violations found so far.
    pub violations: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_kinds_are_listed_in_declaration_order_and_parse_back_from_their_names() {
        for (index, kind) in OpKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index);
            assert_eq!(kind.name().parse::<OpKind>().unwrap(), kind);
            assert_eq!(format!("{kind:>12}"), format!("{:>12}", kind.name()));
        }
        assert!("read-direct".parse::<OpKind>().is_err());
    }
}
