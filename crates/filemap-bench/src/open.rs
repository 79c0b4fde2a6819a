//! `open`: what a mapping costs to open, and to hold open.
//!
//! Two measurements, in one process:
//!
//! - `open-read-close`: `files` small files (4 to 16 KiB, sizes from a fixed
//!   seed) are opened, read and closed one at a time, in random order, for
//!   `seconds_per_run`: under each strategy, [`Volume::open_file`] and
//!   [`PageCache::open`], a 4 KiB `read_exact_at` at offset 0 and the drop of
//!   the mapping, on a volume over a temporary image file ([`crate::temp_volume`],
//!   the device of the workloads that fill from their device: a fill is a
//!   `pread` of the host's page cache, as the baseline's read is); `kernel`:
//!   `File::open`, `pread` of the first 4 KiB and `close` of host files of the
//!   same sizes in a temporary directory, written, synced (so that no writeback
//!   runs during the timed loop) and read once, so they are warm in the
//!   kernel's page cache; each cache likewise opens, reads and closes every
//!   file once before it is timed, and a closed file's pages stay cached for
//!   its next open (see `FileIdentity`), so both sides time warm reopens, as
//!   a server that opens the same files again and again sees. Every strategy runs,
//!   because the loop is cheap and the coherence lock is built per mapping;
//!   the target is set on the headline strategy ([`crate::headline_strategy`]).
//! - resources: `mappings` files of one page each on one [`Volume`] over a
//!   [`MemDevice`] (only every 100th file, the hot ones, has its page written:
//!   the others are never read, and holes keep the device small); in one
//!   cache of the headline strategy, the process's threads, open descriptors,
//!   memory map areas (VMAs) and resident bytes are read from `/proc/self`
//!   (a) with no mapping open, (d) with a tenth of them open, (b) with all of
//!   them open and none read, and (c) after the first page of every 100th was
//!   read. The targets: the threads and descriptors the cache holds do not
//!   grow with the number of files, so (b) - (a) per 10,000 mappings is at
//!   most 1 (a thread or descriptor taken once, at the first mapping, is a
//!   tenth at 100,000 mappings; one per mapping is 10,000); at most 2,000
//!   VMAs in the process at (c); at most 1 KiB resident per idle open mapping,
//!   ((b) - (a)) / mappings, which counts the caller's 8-byte handle in its
//!   `Vec` too. If opening runs out of descriptors (`EMFILE`) or memory, the
//!   mappings opened so far are measured, and a note gives the error and the
//!   descriptor limit.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{Backend, MemDevice, PageCache, Strategy, Volume};

use crate::{
    figure, headline_strategy, interleaved, invalid, measure_kinds, pattern, temp_volume,
    timed_row, Measured, PageBuf, Progress, Ratio, Report, RowKey, RunSettings, Target, KERNEL,
};

/// The workload's name in reports.
pub const WORKLOAD: &str = "open";
/// The operation of the rows: open, read the first 4 KiB, close.
pub const OP: &str = "open-read-close";
/// One mapping in this many is read in the resource count: the hot ones.
pub const HOT_EVERY: usize = 100;
/// The smallest and largest small file, in bytes.
const FILE_BYTES: std::ops::RangeInclusive<usize> = 4096..=16384;
/// The most files either measurement takes: bounds the temporary directory,
/// and the memory the volume in memory reserves for its metadata.
const MAX_FILES: usize = 200_000;

/// Settings of the open benchmark.
#[derive(Clone, Debug)]
pub struct OpenConfig {
    /// Small files opened, read and closed in turns.
    pub files: usize,
    /// Mappings held open at once in the resource count (at least
    /// [`HOT_EVERY`]).
    pub mappings: usize,
    /// The runs of `open-read-close` and the strategies it measures (the
    /// resource count runs once, under the headline strategy). The thread
    /// counts are ignored: one thread opens.
    pub settings: RunSettings,
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            files: 2_000,
            mappings: 100_000,
            settings: RunSettings::default(),
        }
    }
}

/// Checks the settings without running anything.
pub fn check(config: &OpenConfig) -> io::Result<()> {
    if config.files == 0 || config.files > MAX_FILES {
        return Err(invalid(format!(
            "the open workload's files must be 1 to {MAX_FILES}"
        )));
    }
    if config.mappings < HOT_EVERY || config.mappings > MAX_FILES {
        return Err(invalid(format!(
            "the open workload's mappings must be {HOT_EVERY} to {MAX_FILES}"
        )));
    }
    config.settings.check_ignoring_threads()
}

/// How many measured steps [`run`] announces: one per variant and run, and the
/// resource count.
pub fn steps(config: &OpenConfig) -> usize {
    let settings = &config.settings;
    settings.runs * (settings.strategies.len() + 1) + 1
}

/// What one measurement of `open-read-close` runs.
#[derive(Clone, Copy)]
enum Variant {
    Strategy(usize),
    Kernel,
}

/// Runs the benchmark; `progress` is told what is being measured.
pub fn run(config: &OpenConfig, mut progress: impl FnMut(Progress<'_>)) -> io::Result<Report> {
    check(config)?;
    let headline = headline_strategy(&config.settings.strategies)?
        .ok_or_else(|| invalid("at least one strategy must be selected"))?;
    let mut report = open_read_close(config, headline, &mut progress)?;
    report.append(resources(config.mappings, headline, &mut progress)?);
    Ok(report)
}

/// The small files' sizes, the same for every variant and run.
fn file_sizes(files: usize) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    (0..files).map(|_| rng.usize(FILE_BYTES)).collect()
}

/// The `open-read-close` rows, and the ratio of the headline strategy to the
/// kernel.
fn open_read_close(
    config: &OpenConfig,
    headline: Strategy,
    progress: &mut impl FnMut(Progress<'_>),
) -> io::Result<Report> {
    let settings = &config.settings;
    let sizes = file_sizes(config.files);
    progress(Progress::Setup(&format!(
        "open: writing {} small files on a volume and on the host",
        config.files
    )));
    let (volume, names) = small_files_volume(&sizes)?;
    let host = HostFiles::create(&sizes)?;

    let variants: Vec<Variant> = (0..settings.strategies.len())
        .map(Variant::Strategy)
        .chain([Variant::Kernel])
        .collect();
    let name = |variant: &Variant| match *variant {
        Variant::Strategy(s) => settings.strategies[s].name(),
        Variant::Kernel => KERNEL,
    };
    let files = config.files;
    let mut runs = vec![Vec::new(); variants.len()];
    for run in 0..settings.runs {
        let caches = settings
            .strategies
            .iter()
            .map(|&strategy| PageCache::builder().strategy(strategy).build())
            .collect::<io::Result<Vec<_>>>()?;
        // Warm, as the kernel's files are.
        let mut buf = PageBuf([0; PAGE_SIZE]);
        for cache in &caches {
            for name in &names {
                let mapping = cache.open(Arc::new(volume.open_file(name)?))?;
                mapping.read_exact_at(&mut buf.0, 0)?;
            }
        }
        let measured = interleaved(
            &variants,
            settings.duration(),
            |variant| {
                progress(Progress::Step(&format!(
                    "open, run {}/{}: {}",
                    run + 1,
                    settings.runs,
                    name(variant)
                )));
            },
            |variant, duration| {
                let measured = match *variant {
                    Variant::Strategy(s) => {
                        let cache = &caches[s];
                        one_at_a_time(files, duration, |file, buf| {
                            let backend = Arc::new(volume.open_file(&names[file])?);
                            let mapping = cache.open(backend)?;
                            mapping.read_exact_at(buf, 0)
                            // The mapping is dropped here: the close.
                        })?
                    }
                    Variant::Kernel => one_at_a_time(files, duration, |file, buf| {
                        File::open(&host.paths[file])?.read_exact_at(buf, 0)
                    })?,
                };
                Ok(vec![measured])
            },
        )?;
        for (v, mut kinds) in measured.into_iter().enumerate() {
            runs[v].push(kinds.remove(0));
        }
    }

    let mut report = Report::default();
    for (v, variant) in variants.iter().enumerate() {
        let key = RowKey {
            workload: WORKLOAD,
            strategy: name(variant),
            op: OP,
            threads: 1,
        };
        report.rows.push(timed_row(key, &runs[v]));
    }
    let rate = |strategy: &str| figure(&report.rows, WORKLOAD, strategy, OP, 1, |r| r.ops_per_s);
    // `none` takes no lock: its figures stay out of every ratio.
    if headline.is_coherent() {
        report.ratios.push(Ratio::between(
            WORKLOAD,
            format!("{} / kernel, open-read-close ops/s", headline.name()),
            rate(headline.name()),
            rate(KERNEL),
            Some(Target::AtLeast(1.0)),
        ));
    }
    report.notes.push(format!(
        "open: open-read-close: {} files of {} to {} KiB opened, read (the first 4 KiB) \
         and closed in random order; filemap: a volume over an image file, its closed \
         files' pages kept by the cache; kernel: host files; both warm",
        thousands(config.files),
        FILE_BYTES.start() >> 10,
        FILE_BYTES.end() >> 10
    ));
    Ok(report)
}

/// Runs `op(file, buffer)` on random files of `files`, one at a time on one
/// thread, for `duration`, timing each call.
fn one_at_a_time<O>(files: usize, duration: Duration, op: O) -> io::Result<Measured>
where
    O: Fn(usize, &mut [u8; PAGE_SIZE]) -> io::Result<()> + Sync,
{
    let op = &op;
    let measured = measure_kinds(1, 1, duration, 1, |_| {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        (0, move |rng: &mut fastrand::Rng| {
            op(rng.usize(..files), &mut buf.0)?;
            std::hint::black_box(&buf);
            Ok(Duration::ZERO)
        })
    })?;
    Ok(measured.into_iter().next().expect("one kind"))
}

/// The bytes of a volume for `files` files with names of up to `name_len`
/// bytes, `runs` runs of extents in all, and `data_pages` pages of data: the
/// metadata area grows with the device (a 256th of it, see the volume's
/// format), so a volume of many small files needs a device much larger than
/// their data.
fn volume_bytes(files: usize, name_len: usize, runs: u64, data_pages: u64) -> u64 {
    // The volume's format: a 16-byte header and the root directory's 77-byte
    // inode; per file a 77-byte inode and an 18-byte entry with its name; 24
    // bytes per run.
    let meta = 16 + 77 + files as u64 * (95 + name_len as u64) + 24 * runs;
    // A quarter more, for the areas' rounding and the reservations of writes.
    let area_blocks = meta.div_ceil(PAGE) * 5 / 4 + 2;
    let blocks = (area_blocks * 256).max(2 + 2 * area_blocks + data_pages + data_pages / 8 + 256);
    blocks * PAGE
}

/// A volume over a temporary image file holding a file of each size (named
/// by its index, filled with the pattern), committed; and the files' names.
fn small_files_volume(sizes: &[usize]) -> io::Result<(Arc<Volume>, Vec<String>)> {
    let names: Vec<String> = (0..sizes.len()).map(|i| i.to_string()).collect();
    let data_pages: u64 = sizes.iter().map(|&s| (s as u64).div_ceil(PAGE)).sum();
    let name_len = names.last().map_or(1, String::len);
    // Each file is written at once on a fresh volume: one run.
    let runs = sizes.len() as u64;
    let volume = temp_volume(volume_bytes(sizes.len(), name_len, runs, data_pages))?;
    let data = pattern(*FILE_BYTES.end());
    for (name, &size) in names.iter().zip(sizes) {
        // Straight to the backend, whole pages (zeroes past the end of the
        // file), and one commit for all: a sync per file would flush the
        // image once per file.
        let mut pages = vec![0; size.next_multiple_of(PAGE_SIZE)];
        pages[..size].copy_from_slice(&data[..size]);
        let file = volume.create_file(name)?;
        file.set_len(size as u64)?;
        file.write_pages(0, &pages)?;
    }
    volume.sync()?;
    Ok((volume, names))
}

/// Host files in a temporary directory, removed with it when dropped.
struct HostFiles {
    paths: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl HostFiles {
    /// A file of each size (filled with the pattern), synced and then read
    /// once, so that all of them are clean and in the kernel's page cache.
    fn create(sizes: &[usize]) -> io::Result<HostFiles> {
        let dir = tempfile::Builder::new()
            .prefix("filemap-bench-open")
            .tempdir()?;
        let data = pattern(*FILE_BYTES.end());
        let paths: Vec<PathBuf> = (0..sizes.len())
            .map(|i| dir.path().join(i.to_string()))
            .collect();
        for (path, &size) in paths.iter().zip(sizes) {
            std::fs::write(path, &data[..size])?;
        }
        // One sync of the file system rather than one per file: the point is
        // that no writeback runs during the timed loop.
        rustix::fs::syncfs(File::open(dir.path())?)?;
        let mut buf = vec![0; *FILE_BYTES.end()];
        for (path, &size) in paths.iter().zip(sizes) {
            File::open(path)?.read_exact_at(&mut buf[..size], 0)?;
        }
        Ok(HostFiles { paths, _dir: dir })
    }
}

/// What the process holds at one moment, from `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Threads (`Threads:` of `/proc/self/status`).
    pub threads: u64,
    /// Open descriptors (entries of `/proc/self/fd`), less the ones the
    /// reading itself holds open.
    pub descriptors: u64,
    /// Memory map areas (lines of `/proc/self/maps`).
    pub vmas: u64,
    /// Resident bytes (`VmRSS:` of `/proc/self/status`).
    pub resident_bytes: u64,
}

/// The fields of `/proc/self/status` [`Holdings`] takes: its threads and its
/// resident bytes. `None` if either is missing or unreadable.
pub fn parse_status(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let threads = field("Threads")?.parse().ok()?;
    let kib: u64 = field("VmRSS")?.strip_suffix("kB")?.trim().parse().ok()?;
    Some((threads, kib * 1024))
}

/// `/proc/self/status`, `/proc/self/maps` and `/proc/self/fd`, opened once and
/// read again for each [`Holdings`]: a process that has run out of descriptors
/// can still be measured, and the three descriptors are the same at every
/// reading (and are not counted).
struct ProcSelf {
    status: File,
    maps: File,
    fds: rustix::fs::Dir,
}

/// The descriptors a [`ProcSelf`] holds open.
const PROC_SELF_DESCRIPTORS: u64 = 3;

impl ProcSelf {
    fn open() -> io::Result<ProcSelf> {
        use rustix::fs::{Mode, OFlags};
        let fds = rustix::fs::open(
            "/proc/self/fd",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ProcSelf {
            status: File::open("/proc/self/status")?,
            maps: File::open("/proc/self/maps")?,
            fds: rustix::fs::Dir::new(fds)?,
        })
    }

    /// What the process holds now.
    fn read(&mut self) -> io::Result<Holdings> {
        let status = read_again(&mut self.status)?;
        let (threads, resident_bytes) = parse_status(&status)
            .ok_or_else(|| io::Error::other("/proc/self/status has no Threads or VmRSS field"))?;
        let vmas = read_again(&mut self.maps)?.lines().count() as u64;
        self.fds.rewind();
        let mut entries = 0u64;
        for entry in &mut self.fds {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                entries += 1;
            }
        }
        Ok(Holdings {
            threads,
            descriptors: entries.saturating_sub(PROC_SELF_DESCRIPTORS),
            vmas,
            resident_bytes,
        })
    }
}

/// The whole of a `/proc` file, read from its start again.
fn read_again(file: &mut File) -> io::Result<String> {
    file.rewind()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Waits, up to about two seconds, until the thread count holds still for a
/// quarter of a second: the threads of caches dropped just before (by an
/// earlier workload) end only when they next wake, and one ending between two
/// readings would be taken for one the mappings gave back.
fn settle_threads(proc: &mut ProcSelf) -> io::Result<()> {
    let mut last = proc.read()?.threads;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        let now = proc.read()?.threads;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(())
}

/// Whether `error` says a limit of the process or the system was reached
/// (descriptors, memory, map areas), which the resource count reports rather
/// than fails on.
fn out_of_resources(error: &io::Error) -> bool {
    matches!(
        filemap::errno(error),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// `12345` as `12,345`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The resource count: see the module's documentation.
fn resources(
    mappings: usize,
    strategy: Strategy,
    progress: &mut impl FnMut(Progress<'_>),
) -> io::Result<Report> {
    let total = thousands(mappings);
    let names: Vec<String> = (0..mappings).map(|i| i.to_string()).collect();
    let hot_files = mappings.div_ceil(HOT_EVERY) as u64;
    let name_len = names.last().map_or(1, String::len);
    // The device is allocated zeroed, so the pages nothing writes cost no
    // memory: about a gigabyte of it for 100,000 files, nearly all metadata
    // area that stays untouched.
    let device = MemDevice::new(volume_bytes(mappings, name_len, hot_files, hot_files));
    let volume = Volume::format(Arc::new(device))?;
    let page = pattern(PAGE_SIZE);
    for (i, name) in names.iter().enumerate() {
        if i % 10_000 == 0 {
            progress(Progress::Setup(&format!(
                "open: creating files on a volume in memory, {} of {total}",
                thousands(i)
            )));
        }
        let file = volume.create_file(name)?;
        file.set_len(PAGE)?;
        if i % HOT_EVERY == 0 {
            file.write_pages(0, &page)?;
        }
    }
    progress(Progress::Step(&format!(
        "open: holding {total} mappings open ({})",
        strategy.name()
    )));
    let mut report = Report::default();
    let mut proc = ProcSelf::open()?;
    let cache = PageCache::builder().strategy(strategy).build()?;
    settle_threads(&mut proc)?;
    let before = proc.read()?;

    let tenth = mappings / 10;
    let mut at_tenth = None;
    let mut stopped = None;
    let mut open = Vec::with_capacity(mappings);
    for (i, name) in names.iter().enumerate() {
        if i == tenth {
            at_tenth = Some(proc.read()?);
        }
        if i % 10_000 == 0 && i > 0 {
            progress(Progress::Setup(&format!(
                "open: {} of {total} mappings open",
                thousands(i)
            )));
        }
        match volume
            .open_file(name)
            .and_then(|file| cache.open(Arc::new(file)))
        {
            Ok(mapping) => open.push(mapping),
            Err(error) if out_of_resources(&error) => {
                stopped = Some(error);
                break;
            }
            Err(error) => return Err(error),
        }
    }
    let opened = open.len();
    let idle = proc.read()?;

    let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
    let mut read = 0;
    let mut read_failed = None;
    for mapping in open.iter().step_by(HOT_EVERY) {
        match mapping.read_exact_at(&mut buf.0, 0) {
            Ok(()) => read += 1,
            Err(error) if out_of_resources(&error) => {
                read_failed = Some(error);
                break;
            }
            Err(error) => return Err(error),
        }
    }
    let hot = proc.read()?;
    progress(Progress::Setup(&format!(
        "open: closing {} mappings",
        thousands(opened)
    )));
    drop(open);

    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let shown = |limit: Option<u64>| limit.map_or("unlimited".to_owned(), |l| l.to_string());
    report.notes.push(format!(
        "open: resources under {}, on a volume in memory; descriptor limit {} (soft), {} (hard)",
        strategy.name(),
        shown(limit.current),
        shown(limit.maximum)
    ));
    if let Some(error) = &stopped {
        report.notes.push(format!(
            "open: opening mapping {} of {total} failed ({error}): the figures are of the {} opened",
            thousands(opened + 1),
            thousands(opened)
        ));
    }
    if let Some(error) = &read_failed {
        report.notes.push(format!(
            "open: reading hot mapping {} failed ({error}): {} were read",
            thousands(read + 1),
            thousands(read)
        ));
    }
    let mut points = vec![("(a) no mapping open".to_owned(), before)];
    if let Some(at_tenth) = at_tenth {
        points.push((format!("(d) {} mappings open", thousands(tenth)), at_tenth));
    }
    points.push((
        format!("(b) {} mappings open, none read", thousands(opened)),
        idle,
    ));
    points.push((
        format!("(c) the first page of {} of them read", thousands(read)),
        hot,
    ));
    for (what, held) in &points {
        report.notes.push(format!(
            "open: {what}: {} threads, {} descriptors, {} VMAs, {:.1} MiB resident",
            held.threads,
            thousands(held.descriptors as usize),
            thousands(held.vmas as usize),
            held.resident_bytes as f64 / f64::from(1 << 20)
        ));
    }

    let per_mapping = |difference: f64, per: f64| {
        if opened == 0 {
            Err("not available: no mapping could be opened".to_owned())
        } else {
            Ok(difference * per / opened as f64)
        }
    };
    let added = |of: fn(&Holdings) -> u64| of(&idle) as f64 - of(&before) as f64;
    let at = thousands(opened);
    // Per 10,000 mappings, with a slack of 1: see the module's documentation.
    report.ratios.push(Ratio::absolute(
        WORKLOAD,
        format!("threads added per 10,000 idle mappings, {at} open"),
        per_mapping(added(|h| h.threads), 10_000.0),
        Some(Target::AtMost(1.0)),
    ));
    report.ratios.push(Ratio::absolute(
        WORKLOAD,
        format!("descriptors added per 10,000 idle mappings, {at} open"),
        per_mapping(added(|h| h.descriptors), 10_000.0),
        Some(Target::AtMost(1.0)),
    ));
    report.ratios.push(Ratio::absolute(
        WORKLOAD,
        format!(
            "process VMAs, {at} mappings open, {} of them read",
            thousands(read)
        ),
        Ok(hot.vmas as f64),
        Some(Target::AtMost(2000.0)),
    ));
    report.ratios.push(Ratio::absolute(
        WORKLOAD,
        format!("resident bytes per idle open mapping, {at} open"),
        per_mapping(added(|h| h.resident_bytes), 1.0),
        Some(Target::AtMost(1024.0)),
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_fields_are_read_from_a_sample() {
        let status = "Name:\tfilemap\nUmask:\t0022\nState:\tR (running)\n\
                      VmPeak:\t  123456 kB\nVmRSS:\t    5120 kB\nRssAnon:\t    4096 kB\n\
                      Threads:\t7\nSigQ:\t0/63421\n";
        assert_eq!(parse_status(status), Some((7, 5120 * 1024)));
        assert_eq!(parse_status("Threads:\t7\n"), None);
        assert_eq!(parse_status("VmRSS:\t5 MB\nThreads:\t7\n"), None);
    }

    #[test]
    fn this_process_is_read_from_proc_self() {
        let mut proc = ProcSelf::open().unwrap();
        let first = proc.read().unwrap();
        assert!(first.threads >= 1 && first.vmas > 0 && first.resident_bytes > 0);
        // Descriptors 0, 1 and 2 at least. (Tests run beside each other in
        // one process, so the counts are not compared between readings.)
        assert!(first.descriptors >= 3, "{first:?}");
        assert!(proc.read().unwrap().vmas > 0);
    }

    #[test]
    fn a_tiny_run_reports_every_variant_and_figure() {
        let config = OpenConfig {
            files: 50,
            mappings: 2_000,
            settings: RunSettings {
                runs: 1,
                seconds_per_run: 0.02,
                ..RunSettings::default()
            },
        };
        let (report, steps_seen) = crate::run_counting_steps(|progress| run(&config, progress));
        assert_eq!(steps_seen, steps(&config));
        assert_eq!(report.rows.len(), Strategy::ALL.len() + 1);
        assert!(report.rows.iter().all(|r| r.op == OP && r.ops_per_s > 0.0));
        assert!(report.find(WORKLOAD, KERNEL, OP, 1).is_some());
        // The kernel ratio, then threads, descriptors, VMAs and resident bytes.
        assert_eq!(report.ratios.len(), 5);
        assert!(report.ratios[0].value.is_some_and(|v| v > 0.0));
        let vmas = &report.ratios[3];
        assert!(vmas.name.contains("of them read"), "{}", vmas.name);
        assert!(vmas.value.is_some_and(|v| v > 0.0));
        assert!(report.ratios[1..].iter().all(|r| r.absolute));
        assert!(report.notes.iter().any(|n| n.contains("descriptor limit")));
    }

    #[test]
    fn volumes_are_large_enough_for_their_files() {
        let names = 100_000usize.to_string().len();
        let bytes = volume_bytes(100_000, names, 1_000, 1_000);
        // The metadata area is a 256th of the device.
        assert!(bytes / 256 >= 16 + 77 + 100_000 * (95 + names as u64) + 1_000 * 24);
        // Most of it is never written, and a `MemDevice`'s untouched bytes
        // take no memory.
        assert!(bytes < 4 << 30, "{bytes}");
        assert!(volume_bytes(10, 2, 10, 1 << 20) >= (1 << 20) * PAGE);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            OpenConfig {
                files: 0,
                ..OpenConfig::default()
            },
            OpenConfig {
                mappings: 10,
                ..OpenConfig::default()
            },
            OpenConfig {
                mappings: MAX_FILES + 1,
                ..OpenConfig::default()
            },
            OpenConfig {
                settings: RunSettings {
                    runs: 0,
                    ..RunSettings::default()
                },
                ..OpenConfig::default()
            },
        ] {
            assert!(check(&config).is_err());
        }
    }
}
