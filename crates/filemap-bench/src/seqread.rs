//! `seqread`: a sequential buffered read of a file that is not cached, against
//! a raw sequential read of the same device, in turns in one process.
//!
//! The device is a temporary image file ([`FileDevice`](filemap::FileDevice)), read two ways:
//! - `device`: `Device::read_exact_at` of `chunk` bytes at a time, from the
//!   first byte of the image to the file's size, the floor of reading it;
//! - the library's default strategy: `read_exact_at` of `chunk` bytes at a time
//!   through a fresh cache over a `Volume` on the image, whose sequential
//!   readahead grows its window from the fill batch up to 2 MiB.
//!
//! The target is set on an image opened with `O_DIRECT`
//! ([`FileDevice::with_direct_io`](filemap::FileDevice::with_direct_io)), so that "raw" means the disk itself: a
//! storage engine with a cache of its own opens its device that way, and the
//! readahead it gets is the cache's. Where the file system refuses `O_DIRECT`
//! the image is opened as is, and a note says so.
//!
//! The same image opened without `O_DIRECT` is measured too, for information
//! (operation `read-host-cached`): there the raw read is the host kernel's own
//! page cache with its readahead (up to the disk's `read_ahead_kb`) and its
//! page insertion, and the cache pays for a second copy of every byte (host
//! cache to the cache's pages) besides its own page insertion, which the
//! kernel's read does not make. Before every run the image is synced and
//! dropped from the host's page cache (`posix_fadvise(DONTNEED)`), so both
//! variants start from the disk.
//!
//! Rows count chunks per second.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use filemap::page::{index_of, PAGE_SIZE};
use filemap::{Backend, Device, PageCache, Strategy, Volume};

use crate::{
    default_strategy, invalid, pattern, temp_image, timed_row, Histogram, Measured, Progress,
    Ratio, Report, RowKey, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "seqread";

/// Settings of the sequential read benchmark.
#[derive(Clone, Debug)]
pub struct SeqReadConfig {
    /// The file's size in bytes (a multiple of the chunk).
    pub file_bytes: u64,
    /// The bytes of one read call.
    pub chunk: usize,
    /// Timed runs of each variant; the median is reported.
    pub runs: usize,
}

impl Default for SeqReadConfig {
    fn default() -> Self {
        SeqReadConfig {
            file_bytes: 128 << 20,
            chunk: 128 << 10,
            runs: 3,
        }
    }
}

/// Checks the settings.
pub fn check(config: &SeqReadConfig) -> io::Result<()> {
    if config.chunk == 0 || config.chunk % PAGE_SIZE != 0 || config.chunk > 64 << 20 {
        return Err(invalid(
            "the read chunk must be a multiple of 4 KiB up to 64 MiB",
        ));
    }
    if config.file_bytes == 0 || config.file_bytes % config.chunk as u64 != 0 {
        return Err(invalid(
            "the file size must be a positive multiple of the chunk",
        ));
    }
    if config.file_bytes > 16 << 30 {
        return Err(invalid("the file must be at most 16 GiB"));
    }
    if config.runs == 0 {
        return Err(invalid("runs must be at least 1"));
    }
    Ok(())
}

/// The measured steps: two variants per run, on each of the two images.
pub fn steps(config: &SeqReadConfig) -> usize {
    4 * config.runs
}

/// How the image is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Image {
    /// With `O_DIRECT`: reads come from the disk (the target's setting).
    Direct,
    /// Through the host's page cache.
    HostCached,
}

impl Image {
    /// The operation its rows are of.
    fn op(self) -> &'static str {
        match self {
            Image::Direct => "read",
            Image::HostCached => "read-host-cached",
        }
    }
}

/// Runs the benchmark.
pub fn run(config: &SeqReadConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let strategy = default_strategy()?;
    let mut report = Report::default();
    for image in [Image::Direct, Image::HostCached] {
        let [device, cache] = measure(config, image, strategy, &mut progress, &mut report)?;
        for (variant, runs) in [("device", &device), (strategy.name(), &cache)] {
            let key = RowKey {
                workload: WORKLOAD,
                strategy: variant,
                op: image.op(),
                threads: 1,
            };
            report.rows.push(timed_row(key, runs));
        }
        let rows = report.rows.len();
        let rate = |row: usize| Ok(report.rows[row].ops_per_s);
        let (what, target) = match image {
            Image::Direct => ("device opened with O_DIRECT", Some(Target::AtLeast(0.9))),
            Image::HostCached => ("device read through the host's page cache", None),
        };
        report.ratios.push(Ratio::between(
            WORKLOAD,
            format!(
                "{} / device, sequential read of an uncached file, {} KiB reads, {what}",
                strategy.name(),
                config.chunk >> 10
            ),
            rate(rows - 1),
            rate(rows - 2),
            target,
        ));
    }
    report.notes.push(format!(
        "seqread: {} MiB read {} KiB at a time, the host's page cache dropped before each run",
        config.file_bytes >> 20,
        config.chunk >> 10
    ));
    Ok(report)
}

/// Writes the file on a fresh image opened as `image` says, then reads it
/// `config.runs` times each way: the device's runs, then the cache's.
fn measure(
    config: &SeqReadConfig,
    image: Image,
    strategy: Strategy,
    progress: &mut impl FnMut(Progress<'_>),
    report: &mut Report,
) -> io::Result<[Vec<Measured>; 2]> {
    progress(Progress::Setup("seqread: writing the file"));
    // Room for the volume's own blocks besides the file's.
    let bytes = config.file_bytes + config.file_bytes / 8 + (16 << 20);
    let (file, device, refused) = temp_image(bytes, image == Image::Direct)?;
    if let Some(refused) = refused {
        report.notes.push(format!(
            "seqread: the file system refused O_DIRECT ({refused}): its target is measured through the host's page cache"
        ));
    }
    let device: Arc<dyn Device> = Arc::new(device);
    let volume = Volume::format(device.clone())?;
    let written = volume.create_file("seq")?;
    let chunk = pattern(1 << 20);
    written.set_len(config.file_bytes)?;
    let mut offset = 0;
    while offset < config.file_bytes {
        let len = chunk.len().min((config.file_bytes - offset) as usize);
        written.write_pages(index_of(offset), &chunk[..len])?;
        offset += len as u64;
    }
    let backend: Arc<dyn Backend> = Arc::new(written);
    let mut runs = [Vec::new(), Vec::new()];
    let mut buf = vec![0u8; config.chunk];
    for run in 0..config.runs {
        for (v, variant) in ["device", strategy.name()].into_iter().enumerate() {
            progress(Progress::Step(&format!(
                "seqread {}, run {}/{}: {variant}",
                image.op(),
                run + 1,
                config.runs
            )));
            filemap::bench_support::drop_host_cache(&file)?;
            let started = Instant::now();
            let latency = if v == 0 {
                read_through(config.file_bytes, &mut buf, |buf, offset| {
                    device.read_exact_at(buf, offset)
                })?
            } else {
                let cache = PageCache::builder()
                    .strategy(strategy)
                    .budget_bytes(config.file_bytes + (16 << 20))
                    .build()?;
                let mapping = cache.open(backend.clone())?;
                read_through(config.file_bytes, &mut buf, |buf, offset| {
                    mapping.read_exact_at(buf, offset)
                })?
            };
            let chunks = (config.file_bytes / config.chunk as u64) as f64;
            let rate = chunks / started.elapsed().as_secs_f64().max(1e-9);
            runs[v].push(Measured::new(rate, latency, 1));
        }
    }
    Ok(runs)
}

/// Reads the first `bytes` bytes `buf.len()` at a time, in order, with `read`,
/// and returns each call's latency.
fn read_through(
    bytes: u64,
    buf: &mut [u8],
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<Histogram> {
    let mut latency = Histogram::new();
    let mut offset = 0;
    while offset < bytes {
        let timed = Instant::now();
        read(buf, offset)?;
        latency.record(timed.elapsed().as_nanos() as u64);
        offset += buf.len() as u64;
    }
    Ok(latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_both_variants_on_both_images_and_the_ratios() {
        let config = SeqReadConfig {
            file_bytes: 4 << 20,
            chunk: 128 << 10,
            runs: 1,
        };
        let report = run(&config, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 4);
        assert!(report.rows.iter().all(|r| r.ops_per_s > 0.0));
        assert_eq!(report.ratios.len(), 2);
        assert!(report
            .ratios
            .iter()
            .all(|r| r.value.is_some_and(|v| v > 0.0)));
        assert!(report.ratios[0].target.is_some() && report.ratios[1].target.is_none());
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            SeqReadConfig {
                chunk: 100,
                ..SeqReadConfig::default()
            },
            SeqReadConfig {
                file_bytes: 100,
                ..SeqReadConfig::default()
            },
            SeqReadConfig {
                runs: 0,
                ..SeqReadConfig::default()
            },
        ] {
            assert!(check(&config).is_err());
        }
    }
}
