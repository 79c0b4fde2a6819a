//! `seqread`: a sequential buffered read of a file that is not cached, against
//! a raw sequential read of the same device, in turns in one process.
//!
//! The device is a temporary image file on the host file system
//! ([`FileDevice`]), opened twice: as is, and with `O_DIRECT`
//! ([`FileDevice::with_direct_io`]), as a storage engine with its own cache
//! opens its device. Before every run the image is synced and dropped from the
//! host's page cache (`posix_fadvise(DONTNEED)`), so every variant reads the
//! host's disk:
//! - `device`: `Device::read_exact_at` of `chunk` bytes at a time, from the
//!   first byte of the image to the file's size, the floor of reading it;
//! - the library's default strategy: `read_exact_at` of `chunk` bytes at a time
//!   through a fresh cache over a `Volume` on the image, whose sequential
//!   readahead grows its window from the fill batch up to 2 MiB.
//!
//! Each runs on both descriptors: op `buffered` (the host's readahead, and a
//! copy out of the host's cache) and `o-direct` (the disk straight into the
//! caller's buffer). The target compares the cache on the `O_DIRECT` device with
//! the faster of the two raw reads. Rows count chunks per second.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use filemap::{AlignedBuf, Backend, Device, FileDevice, PageCache, Volume, PAGE_SIZE};

use crate::{
    default_strategy, invalid, pattern, timed_row, Histogram, Measured, Progress, Ratio, Report,
    RowKey, Target,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "seqread";
const PAGE: u64 = PAGE_SIZE as u64;

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

/// The measured steps: four variants per run.
pub fn steps(config: &SeqReadConfig) -> usize {
    VARIANTS.len() * config.runs
}

/// Who reads, and through which descriptor of the image: the raw device or
/// the cache over a volume on it; buffered or `O_DIRECT`.
const VARIANTS: [(Reader, Descriptor); 4] = [
    (Reader::Device, Descriptor::Buffered),
    (Reader::Device, Descriptor::Direct),
    (Reader::Cache, Descriptor::Buffered),
    (Reader::Cache, Descriptor::Direct),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Device,
    Cache,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Descriptor {
    Buffered,
    Direct,
}

impl Descriptor {
    fn op(self) -> &'static str {
        match self {
            Descriptor::Buffered => "buffered",
            Descriptor::Direct => "o-direct",
        }
    }
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &SeqReadConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    progress(Progress::Setup("seqread: writing the file"));
    let image = tempfile::NamedTempFile::new()?;
    // Room for the volume's own blocks besides the file's.
    image
        .as_file()
        .set_len(config.file_bytes + config.file_bytes / 8 + (16 << 20))?;
    let buffered: Arc<dyn Device> = Arc::new(FileDevice::open(image.path())?);
    let direct: Arc<dyn Device> = Arc::new(FileDevice::open(image.path())?.with_direct_io()?);
    let file = Volume::format(buffered.clone())?.create_file("seq")?;
    let chunk = pattern(1 << 20);
    file.set_len(config.file_bytes)?;
    let mut offset = 0;
    while offset < config.file_bytes {
        let len = chunk.len().min((config.file_bytes - offset) as usize);
        file.write_pages(offset / PAGE, &chunk[..len])?;
        offset += len as u64;
    }
    file.sync()?;
    drop(file);
    let strategy = default_strategy()?;
    let name = |reader: Reader| match reader {
        Reader::Device => "device",
        Reader::Cache => strategy.name(),
    };
    let mut runs = vec![Vec::new(); VARIANTS.len()];
    let mut buf = AlignedBuf::new(config.chunk, PAGE_SIZE);
    for run in 0..config.runs {
        for (v, &(reader, descriptor)) in VARIANTS.iter().enumerate() {
            progress(Progress::Step(&format!(
                "seqread, run {}/{}: {}, {}",
                run + 1,
                config.runs,
                name(reader),
                descriptor.op()
            )));
            drop_host_cache(image.as_file())?;
            let device = match descriptor {
                Descriptor::Buffered => &buffered,
                Descriptor::Direct => &direct,
            };
            let mut latency = Histogram::new();
            let started = Instant::now();
            let mut offset = 0;
            match reader {
                Reader::Device => {
                    while offset < config.file_bytes {
                        let timed = Instant::now();
                        device.read_exact_at(&mut buf, offset)?;
                        latency.record(timed.elapsed().as_nanos() as u64);
                        offset += config.chunk as u64;
                    }
                }
                Reader::Cache => {
                    let file: Arc<dyn Backend> =
                        Arc::new(Volume::open(device.clone())?.open_file("seq")?);
                    let cache = PageCache::builder()
                        .strategy(strategy)
                        .budget_bytes(config.file_bytes + (16 << 20))
                        .build()?;
                    let mapping = cache.open(file)?;
                    while offset < config.file_bytes {
                        let timed = Instant::now();
                        mapping.read_exact_at(&mut buf, offset)?;
                        latency.record(timed.elapsed().as_nanos() as u64);
                        offset += config.chunk as u64;
                    }
                }
            }
            let chunks = (config.file_bytes / config.chunk as u64) as f64;
            let rate = chunks / started.elapsed().as_secs_f64().max(1e-9);
            runs[v].push(Measured::new(rate, latency, 1));
        }
    }
    let mut report = Report::default();
    for (v, &(reader, descriptor)) in VARIANTS.iter().enumerate() {
        let key = RowKey {
            workload: WORKLOAD,
            strategy: name(reader),
            op: descriptor.op(),
            threads: 1,
        };
        report.rows.push(timed_row(key, &runs[v]));
    }
    let rate = |v: usize| report.rows[v].ops_per_s;
    let (raw, raw_op) = if rate(0) >= rate(1) {
        (rate(0), "buffered")
    } else {
        (rate(1), "o-direct")
    };
    report.ratios.push(Ratio::between(
        WORKLOAD,
        format!(
            "{} (o-direct) / device ({raw_op}, the faster), sequential read of an uncached file, {} KiB reads",
            strategy.name(),
            config.chunk >> 10
        ),
        Ok(rate(3)),
        Ok(raw),
        Some(Target::AtLeast(0.9)),
    ));
    report.ratios.push(Ratio::between(
        WORKLOAD,
        format!(
            "{} / device, both buffered, sequential read of an uncached file",
            strategy.name()
        ),
        Ok(rate(2)),
        Ok(rate(0)),
        None,
    ));
    report.notes.push(format!(
        "seqread: {} MiB read {} KiB at a time, the host's page cache dropped before each run",
        config.file_bytes >> 20,
        config.chunk >> 10
    ));
    Ok(report)
}

/// Syncs `image` and drops it from the host's page cache, so the next reads
/// come from the disk.
fn drop_host_cache(image: &File) -> io::Result<()> {
    image.sync_all()?;
    rustix::fs::fadvise(image, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_every_variant_and_the_ratios() {
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
