//! The kernel's own race between `fallocate` through FUSE and stores through
//! a shared map, shown on the bench's plain pass-through file system and on
//! filemap's mount side by side (root and `/dev/fuse` needed):
//!
//! ```text
//! cargo run --release -p filemap-bench --example fallocate_map_race -- [SECONDS]
//! ```
//!
//! prints, for each file system, the stores made, the punches, the checks
//! and how many read back an earlier store; each runs `SECONDS` (20), its
//! server in a process of its own:
//!
//! ```text
//! 60 s per mount; a store read back as an earlier one is the kernel's race
//! passthrough  stores ...
//! ```
//!
//! FUSE's `fallocate` writes the kernel's dirty pages of the range back,
//! sends the punch to the server, and drops its pages of the range after the
//! reply, with no lock against page faults meanwhile (only DAX files take
//! one). So a store through a map made during the call dirties the page
//! again; a direct read of the range writes it back, after the server's
//! punch; a later store dirties the page once more; and the drop discards
//! that later store. The file then holds the earlier store, which no order
//! of the three calls gives. A thread stores 1, 2, 3, ... into the first
//! word of a shared map of page 0 while one punches the page and one reads it
//! directly; after each punch the storer reads its word back: its last store,
//! or zero, is right; an earlier store is a lost one. The torture counts such
//! pages apart (`map_stores_lost_by_kernel_fallocate`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::FallocateFlags;

/// What one run over one mount found.
struct Found {
    stores: u64,
    punches: u64,
    checks: u64,
    lost: u64,
}

/// Races stores through a map of `path`'s first page against punches and
/// direct reads of it for `seconds`.
fn race(path: &Path, seconds: u64) -> io::Result<Found> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(8192)?;
    let map = Map::new(&file, 8192)?;
    let (stop, punches) = (AtomicBool::new(false), AtomicU64::new(0));
    let punch_hole = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    std::thread::scope(|scope| {
        let puncher = scope.spawn(|| -> io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::fallocate(&file, punch_hole, 0, 4096)?;
                punches.fetch_add(1, Ordering::Release);
            }
            Ok(())
        });
        let reader = scope.spawn(|| -> io::Result<()> {
            let mut page = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                file.read_at(&mut page, 0)?;
            }
            Ok(())
        });
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut found = Found {
            stores: 0,
            punches: 0,
            checks: 0,
            lost: 0,
        };
        let mut seen = 0;
        // The clock is read once in 4096 stores: the race needs a store in
        // a short window, and reading it each time would make stores rare.
        while found.stores % 4096 != 0 || Instant::now() < end {
            found.stores += 1;
            map.store(found.stores);
            let done = punches.load(Ordering::Acquire);
            if done != seen {
                seen = done;
                found.checks += 1;
                let back = map.load();
                if back != found.stores && back != 0 {
                    eprintln!("stored {}, read back {back}", found.stores);
                    found.lost += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        puncher.join().expect("the puncher")?;
        reader.join().expect("the reader")?;
        found.punches = punches.load(Ordering::Relaxed);
        Ok(found)
    })
}

/// A shared read-write map of a file.
struct Map {
    addr: *mut u64,
    len: usize,
}

impl Map {
    fn new(file: &File, len: usize) -> io::Result<Map> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a new map at an address the kernel picks overlaps nothing
        // of ours; it is unmapped in `drop`, and only `store` and `load`
        // touch it, with volatile accesses (the kernel changes it too).
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                file,
                0,
            )?
        };
        Ok(Map {
            addr: addr.cast(),
            len,
        })
    }

    fn store(&self, value: u64) {
        // SAFETY: the first word of the live map (at least a page long),
        // aligned; volatile, as memory the kernel changes under us.
        unsafe { self.addr.write_volatile(value) }
    }

    fn load(&self) -> u64 {
        // SAFETY: as in `store`.
        unsafe { self.addr.read_volatile() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the map `new` made, unmapped once; nothing uses it after.
        let _ = unsafe { rustix::mm::munmap(self.addr.cast(), self.len) };
    }
}

/// Serves `what` (`passthrough` over directory `source`, or `filemap` over
/// image `source`) at `mountpoint` in a process of its own, as a file system
/// server runs (its threads then compete with the race as with any client's):
/// this program again, with `serve WHAT SOURCE MOUNTPOINT`. It is served
/// once the mount shows in the mount table, and ends when it is unmounted.
fn serve_in_a_process(what: &str, source: &Path, mountpoint: &Path) -> io::Result<Child> {
    let mut server = Command::new(std::env::current_exe()?)
        .args(["serve", what])
        .arg(source)
        .arg(mountpoint)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(mountpoint)? {
        if let Some(status) = server.try_wait()? {
            return Err(io::Error::other(format!(
                "the {what} server ended: {status}"
            )));
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            return Err(io::Error::other(format!("the {what} server did not mount")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

fn is_mounted(mountpoint: &Path) -> io::Result<bool> {
    Ok(filemap_bench::mount::mount_points()?
        .iter()
        .any(|point| point == mountpoint))
}

/// Unmounts `mountpoint` and waits for its server to end.
fn unmount(mountpoint: &Path, mut server: Child) -> io::Result<()> {
    let status = Command::new("umount").arg(mountpoint).status()?;
    let ended = server.wait()?;
    match status.success() && ended.success() {
        true => Ok(()),
        false => Err(io::Error::other(format!(
            "{}: umount {status}, server {ended}",
            mountpoint.display()
        ))),
    }
}

/// The server of `serve_in_a_process`, in the foreground.
fn serve(what: &str, source: &Path, mountpoint: &Path) -> io::Result<()> {
    match what {
        "passthrough" => filemap_fuse::session_ended(
            filemap_bench::passthrough::mount(source, mountpoint, 4)?.join(),
        ),
        _ => {
            filemap_fuse::session(source, mountpoint, &filemap_fuse::MountOptions::default())?.run()
        }
    }
}

fn report(name: &str, found: &Found) {
    println!(
        "{name:<12} stores {:>12}  punches {:>8}  checks {:>8}  earlier store back {:>4}",
        found.stores, found.punches, found.checks, found.lost
    );
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [serve_arg, what, source, mountpoint] = &args[..] {
        if serve_arg == "serve" {
            return serve(what, Path::new(source), Path::new(mountpoint));
        }
    }
    let seconds = match args.first() {
        Some(arg) => arg
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "SECONDS: a number"))?,
        None => 20,
    };
    let dir = tempfile::tempdir()?;
    let (host, plain, image, ours) = (
        dir.path().join("host"),
        dir.path().join("passthrough"),
        dir.path().join("volume.img"),
        dir.path().join("filemap"),
    );
    for path in [&host, &plain, &ours] {
        std::fs::create_dir(path)?;
    }
    filemap_fuse::format(&image, 64 << 20)?;
    println!("{seconds} s per mount; a store read back as an earlier one is the kernel's race");
    for (name, source, mountpoint) in [("passthrough", &host, &plain), ("filemap", &image, &ours)] {
        let server = serve_in_a_process(name, source, mountpoint)?;
        let found = race(&mountpoint.join("f"), seconds);
        unmount(mountpoint, server)?;
        report(name, &found?);
    }
    Ok(())
}
