//! `direct`: two direct writers beside buffered readers on one file, against
//! `O_DIRECT` `pwrite` and buffered `pread` on a host file (`kernel`).
//!
//! Two writer threads write 4 to 64 KiB (a random whole number of pages) at
//! random page-aligned offsets with `write_direct` from an [`AlignedBuf`];
//! reader threads read random 4 KiB pages with `read_at`. The file (64 MiB) is
//! cached whole before the clock starts (the default budget holds it), so a
//! read misses exactly when a direct write dropped its page: the misses, and
//! the coherence modes they take, come from the direct writes, as in a
//! database that writes its pages directly and reads them through the cache.
//! The figures are the total operations per second of all threads, and each
//! kind's own rate and latencies.
//!
//! The device is a temporary image file opened with `O_DIRECT` (see
//! [`crate::temp_direct_volume`]), as a storage engine with a cache of its own
//! opens its device: the direct writes reach the disk, as direct I/O does, and
//! so do the fills of the pages they dropped. (Served from the host's page
//! cache instead, a direct write is a memory copy that competes with the
//! readers for the processors rather than for the lock.) The kernel baseline
//! writes through an `O_DIRECT` descriptor of a host file in the system's
//! temporary directory and reads through a buffered one, whose misses the
//! kernel reads ahead. Where the file system refuses `O_DIRECT`, the baseline is
//! reported unavailable and filemap's image is opened as is (a note says so).
//!
//! Under `invalidate-lock` direct writes take the exclusive side, so they run
//! one at a time and take turns with the fills, in arrival order. Under
//! `two-state` (bcachefs's lock, which is unfair) a direct write joins the
//! other writer whoever waits, so the two writers keep the block side held and
//! the readers' fills wait until both happen to be between writes: writes
//! gain, reads starve. `range` lets writes and fills of other pages run beside
//! each other. The target is set on all operations together, and the reads'
//! own ratio is reported beside it, with no target, so that a strategy cannot
//! meet the first by starving its readers unseen.
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, Mapping, PageCache, Strategy};

use crate::kernel::HostFile;
use crate::{
    figure, measure_kinds, pattern, temp_direct_volume, timed_row, Histogram, Measured, PageBuf,
    Progress, Ratio, Report, Row, RowKey, RunSettings, Target, KERNEL,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "direct";
/// The largest direct write, in pages.
const MAX_WRITE_PAGES: u64 = 16;

/// Settings of the direct benchmark.
#[derive(Clone, Debug)]
pub struct DirectConfig {
    /// The file's size in bytes (a multiple of 1 MiB).
    pub file_bytes: u64,
    /// The cache budget in bytes; `None` for the file's size.
    pub cache_bytes: Option<u64>,
    /// Direct writer threads.
    pub writers: usize,
    /// The runs, the strategies and the reader thread counts to measure.
    pub settings: RunSettings,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            file_bytes: 64 << 20,
            cache_bytes: None,
            writers: 2,
            settings: RunSettings {
                threads: vec![2],
                ..RunSettings::default()
            },
        }
    }
}

/// The kinds of operations, in the order of `measure_kinds`' results, and the
/// row of them all.
const OPS: [&str; 2] = ["read", "write_direct"];
const ALL: &str = "all";

/// How many measured steps [`run`] announces.
pub fn steps(config: &DirectConfig) -> usize {
    let settings = &config.settings;
    settings.runs * settings.threads.len() * (settings.strategies.len() + 1)
}

/// Checks the settings without running anything.
pub fn check(config: &DirectConfig) -> io::Result<()> {
    if config.file_bytes < (1 << 20) || config.file_bytes % (1 << 20) != 0 {
        return Err(crate::invalid(
            "the direct file size must be a positive multiple of 1 MiB",
        ));
    }
    if config.cache_bytes.is_some_and(|b| b < PAGE) {
        return Err(crate::invalid("the cache budget must be at least one page"));
    }
    if config.writers == 0 {
        return Err(crate::invalid("there must be at least one direct writer"));
    }
    config.settings.check()
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &DirectConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let settings = &config.settings;
    let duration = settings.duration();
    let candidates: Vec<Option<Strategy>> = settings
        .strategies
        .iter()
        .copied()
        .map(Some)
        .chain([None])
        .collect();
    let mut report = Report::default();
    let mut kernel_refused = None;
    let mut image_refused = None;
    // runs[threads][candidate][op], one Measured per run; op 2 is "all".
    let mut runs =
        vec![vec![vec![Vec::new(); OPS.len() + 1]; candidates.len()]; settings.threads.len()];
    for run in 0..settings.runs {
        for (t, &readers) in settings.threads.iter().enumerate() {
            for (c, candidate) in candidates.iter().enumerate() {
                let name = candidate.map_or(KERNEL, Strategy::name);
                progress(Progress::Step(&format!(
                    "direct, run {}/{}: {name}, {readers} reader(s), {} direct writer(s)",
                    run + 1,
                    settings.runs,
                    config.writers
                )));
                let measured = match candidate {
                    Some(strategy) => {
                        let (_cache, mapping, refused) = setup(config, *strategy)?;
                        image_refused = image_refused.or(refused);
                        measure(mapping.as_ref(), config, readers, duration)?
                    }
                    None => {
                        let host = HostFile::create(config.file_bytes)?;
                        match &host.direct {
                            Ok(direct) => {
                                let files = KernelFiles {
                                    buffered: &host.file,
                                    direct,
                                };
                                measure(&files, config, readers, duration)?
                            }
                            Err(error) => {
                                kernel_refused = Some(error.to_string());
                                continue;
                            }
                        }
                    }
                };
                let all = total(&measured);
                for (o, m) in measured.into_iter().chain([all]).enumerate() {
                    runs[t][c][o].push(m);
                }
            }
        }
    }

    for (t, &readers) in settings.threads.iter().enumerate() {
        for (c, candidate) in candidates.iter().enumerate() {
            for (o, op) in OPS.iter().chain([&ALL]).enumerate() {
                if runs[t][c][o].is_empty() {
                    continue;
                }
                let key = RowKey {
                    workload: WORKLOAD,
                    strategy: candidate.map_or(KERNEL, Strategy::name),
                    op,
                    threads: readers,
                };
                report.rows.push(timed_row(key, &runs[t][c][o]));
            }
        }
        let rows = report.rows.clone();
        report.ratios.extend(ratios(&rows, config.writers, readers));
    }
    if let Some(error) = image_refused {
        report.notes.push(format!(
            "direct: the image was opened without O_DIRECT, which its file system refused ({error}): filemap's direct writes land in the host's page cache"
        ));
    }
    if let Some(error) = kernel_refused {
        report.notes.push(format!(
            "direct: kernel baseline unavailable: the temporary directory's file system refused O_DIRECT ({error})"
        ));
    }
    Ok(report)
}

/// Every kind together: the sum of the rates, all latencies.
fn total(measured: &[Measured]) -> Measured {
    let mut latency = Histogram::new();
    for m in measured {
        latency.merge(&m.latency);
    }
    Measured::new(
        measured.iter().map(|m| m.ops_per_s).sum(),
        latency,
        measured.iter().map(|m| m.workers).sum(),
    )
}

/// A fresh file for one step: written directly, then read ahead into the cache
/// as far as the budget allows.
fn setup(
    config: &DirectConfig,
    strategy: Strategy,
) -> io::Result<(PageCache, Arc<Mapping>, Option<io::Error>)> {
    let (volume, refused) = temp_direct_volume(config.file_bytes + (8 << 20))?;
    let cache = PageCache::builder()
        .strategy(strategy)
        .budget_bytes(config.cache_bytes.unwrap_or(config.file_bytes))
        .build()?;
    let mapping = cache.open(Arc::new(volume.create_file("direct")?))?;
    let chunk = AlignedBuf::from_slice(&pattern(1 << 20), PAGE_SIZE);
    let mut offset = 0;
    while offset < config.file_bytes {
        mapping.write_direct(&chunk, offset)?;
        offset += chunk.len() as u64;
    }
    mapping.readahead(0, config.file_bytes)?;
    Ok((cache, mapping, refused))
}

/// A random direct write: its offset and length, page-aligned, inside the file.
fn direct_write_at(rng: &mut fastrand::Rng, file_pages: u64) -> (u64, usize) {
    let pages = rng.u64(1..=MAX_WRITE_PAGES);
    let first = rng.u64(..=file_pages - pages);
    (first * PAGE, (pages * PAGE) as usize)
}

/// The calls a run makes, on a filemap mapping or, for the kernel baseline,
/// on a host file's buffered and `O_DIRECT` descriptors.
trait DirectCalls: Sync {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl DirectCalls for Mapping {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Mapping::write_direct(self, buf, offset).map(drop)
    }
}

/// A host file's buffered descriptor and its `O_DIRECT` one.
struct KernelFiles<'a> {
    buffered: &'a std::fs::File,
    direct: &'a std::fs::File,
}

impl DirectCalls for KernelFiles<'_> {
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.buffered.read_exact_at(buf, offset)
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.direct.write_all_at(buf, offset)
    }
}

/// One timed run of readers and direct writers making `calls`.
fn measure(
    calls: &impl DirectCalls,
    config: &DirectConfig,
    readers: usize,
    duration: Duration,
) -> io::Result<Vec<Measured>> {
    let file_pages = config.file_bytes / PAGE;
    measure_kinds(readers + config.writers, OPS.len(), duration, 1, |thread| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        let data = AlignedBuf::from_slice(&pattern((MAX_WRITE_PAGES * PAGE) as usize), PAGE_SIZE);
        let kind = usize::from(thread >= readers);
        let op = move |rng: &mut fastrand::Rng| -> io::Result<Duration> {
            if kind == 0 {
                let offset = rng.u64(..file_pages) * PAGE;
                calls.read(&mut buf.0, offset)?;
                std::hint::black_box(&buf);
            } else {
                let (offset, len) = direct_write_at(rng, file_pages);
                calls.write_direct(&data[..len], offset)?;
            }
            Ok(Duration::ZERO)
        };
        (kind, op)
    })
}

/// The ratios the direct targets are set on (total throughput against
/// `invalidate-lock`), each followed by the same ratio of the reads alone,
/// for information.
fn ratios(rows: &[Row], writers: usize, readers: usize) -> Vec<Ratio> {
    let rate =
        |strategy: &str, op: &str| figure(rows, WORKLOAD, strategy, op, readers, |r| r.ops_per_s);
    ["range", "two-state"]
        .into_iter()
        .flat_map(|ours| {
            [(ALL, "total ops/s"), ("read", "read ops/s")].map(|(op, what)| {
                Ratio::between(
                    WORKLOAD,
                    format!(
                        "{ours} / invalidate-lock, {what}, {writers} direct writer(s), {readers} reader(s)"
                    ),
                    rate(ours, op),
                    rate("invalidate-lock", op),
                    (op == ALL && writers == 2).then_some(Target::AtLeast(1.3)),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_row_and_ratio() {
        let config = DirectConfig {
            file_bytes: 4 << 20,
            settings: RunSettings {
                threads: vec![1],
                runs: 1,
                seconds_per_run: 0.05,
                ..RunSettings::default()
            },
            ..DirectConfig::default()
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        let kernel = !report
            .notes
            .iter()
            .any(|note| note.contains("kernel baseline unavailable"));
        let candidates = Strategy::ALL.len() + usize::from(kernel);
        assert_eq!(report.rows.len(), candidates * 3);
        for strategy in Strategy::ALL.map(Strategy::name) {
            for op in ["read", "write_direct", ALL] {
                let row = report.find(WORKLOAD, strategy, op, 1).unwrap();
                assert!(
                    row.ops_per_s > 0.0 && row.p50_us > 0.0 && row.p99_us >= row.p50_us,
                    "{row:?}"
                );
            }
            let all = report.find(WORKLOAD, strategy, ALL, 1).unwrap();
            assert_eq!(all.workers, 3);
        }
        assert_eq!(report.ratios.len(), 4);
        let available = crate::strategy_named("range").is_some();
        for (ratio, targeted) in report.ratios.iter().zip([true, false, true, false]) {
            assert_eq!(ratio.target.is_some(), targeted, "{ratio:?}");
            if ratio.name.starts_with("two-state") || available {
                assert!(ratio.value.is_some_and(|v| v > 0.0), "{ratio:?}");
            }
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            DirectConfig {
                file_bytes: 100,
                ..DirectConfig::default()
            },
            DirectConfig {
                writers: 0,
                ..DirectConfig::default()
            },
            DirectConfig {
                settings: RunSettings {
                    seconds_per_run: -1.0,
                    ..DirectConfig::default().settings
                },
                ..DirectConfig::default()
            },
        ] {
            assert!(run(&config, |_| {}).is_err());
        }
    }
}
