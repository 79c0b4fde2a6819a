//! The end of a `filemap mount` server: killed with SIGKILL while writers are
//! writing and syncing through the mount, everything a sync returned for is
//! there after a remount; and a SIGTERM refused because the mount is busy
//! does not keep a later one from ending the server.

mod support;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{is_mounted, run, Image, Rng};

const PAGE: usize = 4096;
/// The writers' header at offset 0: a magic word, the number of records
/// written before it, and that number's complement.
const MAGIC: u64 = 0x6372_6173_6877_7274;
/// Records each writer has synced before the server is killed.
const SYNCED_BEFORE_KILL: u64 = 20;
/// The map writer's file size, set and synced before its first record.
const MAP_FILE: u64 = 32 << 20;
/// How long writers may take to start syncing, or to end once the server
/// is gone, before the test gives up on them (a hang, not a timing check).
const PATIENCE: Duration = Duration::from_secs(60);

/// How a writer writes its records.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `pwrite` of 5000-byte records and the header, then `fsync`.
    Fsync,
    /// The same with `fdatasync`.
    Fdatasync,
    /// `O_DIRECT` writes of 8 KiB records and a 4 KiB header, then
    /// `fdatasync`.
    Direct,
    /// Stores through a shared map of a file sized and synced first, then
    /// `msync(MS_SYNC)`.
    Map,
}

const KINDS: [Kind; 4] = [Kind::Fsync, Kind::Fdatasync, Kind::Direct, Kind::Map];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fsync => "fsync",
            Kind::Fdatasync => "fdatasync",
            Kind::Direct => "direct",
            Kind::Map => "map",
        }
    }

    fn parse(name: &str) -> Kind {
        *KINDS
            .iter()
            .find(|kind| kind.name() == name)
            .unwrap_or_else(|| panic!("no writer kind {name}"))
    }

    /// Where record `i` lies and how long it is.
    fn record(self, i: u64) -> (u64, usize) {
        match self {
            Kind::Direct => ((i + 1) * 8192, 8192),
            _ => (64 + i * 5000, 5000),
        }
    }

    /// Records that fit: unbounded but for the map's fixed size.
    fn capacity(self) -> u64 {
        match self {
            Kind::Map => (MAP_FILE - 64) / 5000,
            _ => u64::MAX,
        }
    }
}

/// Record `i` of writer `k`: bytes none of which is zero.
fn record_bytes(k: usize, i: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    Rng::new((k as u64) << 40 | i).fill_nonzero(&mut bytes);
    bytes
}

fn header(count: u64) -> [u8; 24] {
    let mut header = [0; 24];
    header[..8].copy_from_slice(&MAGIC.to_le_bytes());
    header[8..16].copy_from_slice(&count.to_le_bytes());
    header[16..].copy_from_slice(&(!count).to_le_bytes());
    header
}

/// A buffer whose start is aligned to 4096, for `O_DIRECT`.
fn aligned(bytes: &[u8], len: usize) -> (Vec<u8>, usize) {
    let mut raw = vec![0; len + PAGE];
    let start = raw.as_ptr().align_offset(PAGE);
    raw[start..start + bytes.len()].copy_from_slice(bytes);
    (raw, start)
}

/// The writer process: run by the kill test, not on its own (without its
/// variable it does nothing). It writes records 0, 1, 2, ... and the header,
/// syncs, and appends the number of each record synced to its progress file
/// (on the host's file system), until the mount fails it.
#[test]
#[ignore = "a writer process of the SIGKILL test, started by it"]
fn crash_writer() {
    let Ok(spec) = std::env::var("FILEMAP_CRASH_WRITER") else {
        return;
    };
    let mut parts = spec.splitn(4, '\n');
    let (k, kind, path, progress) = (
        parts.next().unwrap().parse::<usize>().unwrap(),
        Kind::parse(parts.next().unwrap()),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut progress = OpenOptions::new()
        .append(true)
        .open(progress)
        .expect("progress file");
    let report = |progress: &mut File, i: u64| {
        use std::io::Write;
        progress
            .write_all(format!("{i}\n").as_bytes())
            .expect("progress");
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true);
    if kind == Kind::Direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).expect("open");
    let map = match kind {
        Kind::Map => {
            file.set_len(MAP_FILE).expect("ftruncate");
            file.sync_all().expect("fsync");
            // SAFETY: a new shared mapping of an open descriptor, at an
            // address the kernel picks; this process touches it only below,
            // inside the file's size, and never unmaps it (the process ends).
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MAP_FILE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap");
            Some(ptr.cast::<u8>())
        }
        _ => None,
    };
    for i in 0..kind.capacity() {
        let (off, len) = kind.record(i);
        let data = record_bytes(k, i, len);
        match (kind, map) {
            (Kind::Map, Some(map)) => {
                // SAFETY: record and header lie inside the map (the record's
                // end is within the capacity); nothing else in this process
                // uses that memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), map.add(off as usize), len);
                    std::ptr::copy_nonoverlapping(header(i + 1).as_ptr(), map, 24);
                }
                // SAFETY: the whole map, mapped above; msync changes no memory.
                let synced = unsafe { libc::msync(map.cast(), MAP_FILE as usize, libc::MS_SYNC) };
                assert_eq!(synced, 0, "msync: {}", std::io::Error::last_os_error());
            }
            (Kind::Direct, _) => {
                let (raw, start) = aligned(&data, len);
                file.write_all_at(&raw[start..start + len], off)
                    .expect("O_DIRECT pwrite");
                let (raw, start) = aligned(&header(i + 1), PAGE);
                file.write_all_at(&raw[start..start + PAGE], 0)
                    .expect("O_DIRECT pwrite");
                file.sync_data().expect("fdatasync");
            }
            _ => {
                file.write_all_at(&data, off).expect("pwrite");
                file.write_all_at(&header(i + 1), 0).expect("pwrite");
                match kind {
                    Kind::Fdatasync => file.sync_data().expect("fdatasync"),
                    _ => file.sync_all().expect("fsync"),
                }
            }
        }
        report(&mut progress, i);
    }
}

/// A writer process and where it reports.
struct Writer {
    kind: Kind,
    child: Child,
    progress: PathBuf,
    stderr: PathBuf,
}

impl Writer {
    fn start(k: usize, kind: Kind, file: &str, dir: &Path) -> Writer {
        let progress = dir.join(format!("progress-{k}"));
        let stderr = dir.join(format!("stderr-{k}"));
        File::create(&progress).expect("progress file");
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "crash_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "FILEMAP_CRASH_WRITER",
                format!("{k}\n{}\n{file}\n{}", kind.name(), progress.display()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("the writer starts");
        Writer {
            kind,
            child,
            progress,
            stderr,
        }
    }

    /// The last record it reported synced, if any.
    fn synced(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.progress).expect("progress file");
        // A line is whole once its newline is written.
        text.split_inclusive('\n')
            .rfind(|line| line.ends_with('\n'))
            .map(|line| line.trim_end().parse().expect("a record number"))
    }

    fn stderr(&self) -> String {
        let mut text = String::new();
        let _ = File::open(&self.stderr).and_then(|mut f| f.read_to_string(&mut text));
        text
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rounds of writers and a kill, each on new files, the earlier rounds'
/// files checked again after every remount.
const ROUNDS: usize = 3;

#[test]
fn sigkill_of_the_server_mid_write_keeps_everything_synced() {
    let image = Image::new("256M");
    // Every file written so far: its path, its writer and the last record
    // synced before the kill.
    let mut written: Vec<(String, Kind, usize, u64)> = Vec::new();
    for round in 0..ROUNDS {
        let server = image.mount();
        for (path, kind, k, last) in &written {
            check_synced(path, *kind, *k, *last, &format!("after kill {round}"));
        }
        let ks: Vec<usize> = (0..KINDS.len()).map(|i| round * KINDS.len() + i).collect();
        let mut writers: Vec<Writer> = ks
            .iter()
            .zip(KINDS)
            .map(|(&k, kind)| Writer::start(k, kind, &image.at(&format!("w{k}")), image.dir.path()))
            .collect();
        // Every writer in full swing: then the crash, writes in flight.
        let started = Instant::now();
        loop {
            for writer in &mut writers {
                if let Some(status) = writer.child.try_wait().expect("wait") {
                    panic!(
                        "round {round}: the {} writer ended ({status}) before the server was \
                         killed: {}",
                        writer.kind.name(),
                        writer.stderr()
                    );
                }
            }
            if writers
                .iter()
                .all(|w| w.synced().is_some_and(|i| i >= SYNCED_BEFORE_KILL))
            {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "round {round}: the writers did not sync {SYNCED_BEFORE_KILL} records in \
                 {PATIENCE:?}: {:?}",
                writers.iter().map(|w| w.synced()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill();
        // The writers fail on the dead connection (or die of SIGBUS in a
        // map) and end; one that does not is killed.
        for writer in &mut writers {
            let deadline = Instant::now() + PATIENCE;
            while writer.child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for (&k, writer) in ks.iter().zip(&writers) {
            let last = writer.synced().expect("synced before the kill");
            written.push((image.at(&format!("w{k}")), writer.kind, k, last));
        }
        drop(writers);
        assert!(!is_mounted(&image.mnt()), "the dead mount is still there");
    }
    let server = image.mount();
    for (path, kind, k, last) in &written {
        check_synced(path, *kind, *k, *last, &format!("after kill {ROUNDS}"));
    }
    server.stop(None);
}

/// The file of writer `k` of `kind`, whose records `0..=last` were synced
/// before a kill: those exactly, a header counting at least them, and later
/// records each byte as written or zero.
fn check_synced(path: &str, kind: Kind, k: usize, last: u64, when: &str) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|error| panic!("{path}: cannot read {when}: {error}"));
    let what = format!(
        "{when}, the {} writer's file ({} bytes; records 0..={last} were synced)",
        kind.name(),
        bytes.len()
    );
    if kind == Kind::Map {
        assert_eq!(bytes.len() as u64, MAP_FILE, "{what}: its synced size");
    }
    // The header: written after each record, so it counts at least every
    // record synced.
    assert!(bytes.len() >= 24, "{what}: no header");
    let count = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert!(
        u64::from_le_bytes(bytes[..8].try_into().unwrap()) == MAGIC
            && u64::from_le_bytes(bytes[16..24].try_into().unwrap()) == !count,
        "{what}: the header is not one the writer wrote: {:02x?}",
        &bytes[..24]
    );
    assert!(
        count > last,
        "{what}: the header counts {count} records, fewer than were synced"
    );
    // Every record synced, exactly; the later ones each byte written or
    // still zero (never another record's or a stale byte).
    for i in 0.. {
        let (off, len) = kind.record(i);
        let off = off as usize;
        if i > last && off >= bytes.len() {
            break;
        }
        let want = record_bytes(k, i, len);
        let end = (off + len).min(bytes.len());
        let got = &bytes[off..end];
        if i <= last {
            assert!(
                got == &want[..],
                "{what}: synced record {i} at {off}+{len} differs{}",
                match got.len() == len {
                    true => format!(
                        ", first at byte {}",
                        got.iter().zip(&want).position(|(g, w)| g != w).unwrap()
                    ),
                    false => format!(": the file ends {} bytes into it", got.len()),
                }
            );
        } else if let Some(bad) = got.iter().zip(&want).position(|(&g, &w)| g != 0 && g != w) {
            panic!(
                "{what}: unsynced record {i} at {off}+{len} holds {:#04x} at byte {bad}, \
                 neither what was written there nor zero",
                got[bad]
            );
        }
    }
}

/// A SIGTERM that finds the mount busy (a file of it open) cannot unmount;
/// once the file is closed, another SIGTERM must end the server, synced and
/// unmounted, as the first would have.
#[test]
fn sigterm_while_a_file_is_open_does_not_keep_a_later_sigterm_from_unmounting() {
    let image = Image::new("16M");
    let server = image.mount();
    let path = image.at("held");
    std::fs::write(&path, b"held open").expect("write");
    let held = File::open(&path).expect("open");
    run("kill", &["-TERM", &server.pid().to_string()]);
    // The refused unmount, whenever the server tries it, finds the file open.
    std::thread::sleep(Duration::from_millis(500));
    drop(held);
    let started = Instant::now();
    while is_mounted(&image.mnt()) && started.elapsed() < Duration::from_secs(10) {
        run("kill", &["-TERM", &server.pid().to_string()]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !is_mounted(&image.mnt()),
        "still mounted 10 s after the file was closed, with a SIGTERM every 200 ms"
    );
    // Now it ends as a first SIGTERM would have ended it.
    server.stop(Some("TERM"));
    let server = image.mount();
    assert_eq!(std::fs::read(&path).expect("read"), b"held open");
    server.stop(None);
}
