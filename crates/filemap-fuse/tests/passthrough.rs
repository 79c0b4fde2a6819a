//! The pass-through mount in this process: a host file's mapping is found
//! by the kernel cache's notifications, its kept pages are dropped when the
//! host file changed while closed, and a file the host lets this process
//! only read is served read-only. Every test mounts a temporary directory;
//! one that cannot mount fails with the reason.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use filemap::{HostFile, PageCache};
use filemap_fuse::{mount_passthrough, MountOptions, Mounted};

const PAGE: usize = 4096;
const PAGES: usize = 16;

/// A host directory `src` passed through at `mnt`.
struct PassedThrough {
    dir: tempfile::TempDir,
    mounted: Option<Mounted<PathBuf>>,
}

impl PassedThrough {
    /// `src` holds what `fill` puts there before the mount; files are opened
    /// with the kernel's caching in front if `kernel_cache`, else off.
    fn new(kernel_cache: bool, fill: impl FnOnce(&Path)) -> PassedThrough {
        let dir = tempfile::tempdir().unwrap();
        let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        fill(&src);
        let options = MountOptions {
            kernel_cache,
            ..MountOptions::default()
        };
        let mounted = mount_passthrough(&src, &mnt, &options)
            .unwrap_or_else(|error| panic!("cannot mount here: {error}"));
        PassedThrough {
            dir,
            mounted: Some(mounted),
        }
    }

    fn src(&self, name: &str) -> PathBuf {
        self.dir.path().join("src").join(name)
    }

    fn mnt(&self, name: &str) -> PathBuf {
        self.dir.path().join("mnt").join(name)
    }

    fn cache(&self) -> &Arc<PageCache> {
        self.mounted.as_ref().unwrap().cache()
    }

    /// Waits until the cache keeps `files` closed files: the server has
    /// taken the kernel's release of the last close (which the kernel sends
    /// without waiting) and its mapping wrote back and kept its pages.
    fn wait_closed_files(&self, files: u64) {
        let started = Instant::now();
        while self.cache().stats().closed_files != files {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no {files} closed files after 20 s: {:?}",
                self.cache().stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PassedThrough {
    fn drop(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            mounted.unmount().unwrap();
        }
    }
}

/// A shared map of `PAGES` pages of `file`.
struct SharedMap(*mut u8);

impl SharedMap {
    fn new(file: &std::fs::File) -> SharedMap {
        // SAFETY: a new shared map of a file this test owns, of its size;
        // it is only read and written inside those bytes, and unmapped in
        // `drop` after its last use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        SharedMap(map.cast())
    }

    fn byte(&self, at: usize) -> u8 {
        assert!(at < PAGES * PAGE);
        // SAFETY: inside the map (checked), which lives until `drop`; a
        // volatile read, since the kernel changes the page behind it.
        unsafe { self.0.add(at).read_volatile() }
    }

    fn store(&self, at: usize, byte: u8) {
        assert!(at < PAGES * PAGE);
        // SAFETY: as in `byte`, and the map is writable.
        unsafe { self.0.add(at).write_volatile(byte) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the map made in `new`, not used after this.
        unsafe { libc::munmap(self.0.cast(), PAGES * PAGE) };
    }
}

fn open_rw(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

#[test]
fn a_library_punch_of_a_host_file_reaches_the_mounts_shared_map_at_once() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        let fx = PassedThrough::new(kernel_cache, |src| {
            std::fs::write(src.join("f"), [1u8; PAGES * PAGE]).unwrap()
        });
        let file = open_rw(&fx.mnt("f"));
        let map = SharedMap::new(&file);
        for page in 0..PAGES {
            assert_eq!(map.byte(page * PAGE), 1);
        }
        // The library's open of the host file shares the mount's mapping.
        let library = fx
            .cache()
            .open(Arc::new(HostFile::open(fx.src("f")).unwrap()))
            .unwrap();
        library.punch_hole(2 * PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(map.byte(2 * PAGE), 0, "the punched page");
        assert_eq!(map.byte(3 * PAGE), 1, "the page after it");
        // A store through the map lands before a library punch, not after it.
        map.store(6 * PAGE + 1, 5);
        library.punch_hole(6 * PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(map.byte(6 * PAGE + 1), 0);
        // SAFETY: the map made above, inside its length.
        let synced = unsafe { libc::msync(map.0.cast(), PAGES * PAGE, libc::MS_SYNC) };
        assert_eq!(synced, 0);
        library.sync_all().unwrap();
        let mut back = [1u8; 2];
        std::fs::File::open(fx.src("f"))
            .unwrap()
            .read_exact_at(&mut back, 6 * PAGE as u64)
            .unwrap();
        assert_eq!(back, [0, 0], "the host file stays punched");
    }
}

#[test]
fn a_host_file_changed_while_closed_is_read_fresh_not_from_the_kept_pages() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        let fx = PassedThrough::new(kernel_cache, |_| {});
        let read_through_mount = || std::fs::read(fx.mnt("f")).unwrap();
        for round in 0..20u8 {
            // Written through the mount, read back (cached), closed: the cache
            // keeps the pages of the closed file.
            let old = vec![round.wrapping_mul(2) | 1; 3 * PAGE + 100];
            std::fs::File::create(fx.mnt("f"))
                .unwrap()
                .write_all(&old)
                .unwrap();
            assert_eq!(read_through_mount(), old);
            fx.wait_closed_files(1);
            // Unchanged on the host: the next open takes the kept pages.
            let reopened = fx.cache().stats().reopened;
            assert_eq!(read_through_mount(), old);
            assert_eq!(fx.cache().stats().reopened, reopened + 1, "round {round}");
            fx.wait_closed_files(1);
            // Changed on the host (same size, at once): the next open must read
            // the host file, not the kept pages.
            let new = vec![round.wrapping_mul(2).wrapping_add(2); old.len()];
            open_rw(&fx.src("f")).write_all_at(&new, 0).unwrap();
            let reopened = fx.cache().stats().reopened;
            assert_eq!(read_through_mount(), new, "round {round}: stale pages");
            assert_eq!(fx.cache().stats().reopened, reopened, "round {round}");
            fx.wait_closed_files(1);
        }
    }
}

/// `chattr FLAG path`, which must work here (an immutable file is one the
/// host refuses to write even to root).
fn chattr(flag: &str, path: &Path) {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .unwrap_or_else(|error| panic!("chattr cannot run here: {error}"));
    assert!(
        out.status.success(),
        "chattr {flag} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Takes the immutable flag off again, so the directory can be removed.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: PathBuf) -> Immutable {
        chattr("+i", &path);
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

#[test]
fn a_file_the_host_lets_only_be_read_is_read_and_refuses_writes_with_the_hosts_errno() {
    let fx = PassedThrough::new(false, |src| {
        std::fs::write(src.join("ro"), b"read only").unwrap()
    });
    let immutable = Immutable::set(fx.src("ro"));
    let mut reader = std::fs::File::open(fx.mnt("ro")).unwrap();
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(text, "read only");
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.mnt("ro"))
        .unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    let cut = Command::new("truncate")
        .args(["-s", "0"])
        .arg(fx.mnt("ro"))
        .output()
        .unwrap();
    assert!(!cut.status.success(), "truncated an immutable file");
    // Once the host allows it, a writer's open succeeds, and its write
    // reaches the file the reader still has open.
    chattr("-i", &fx.src("ro"));
    drop(immutable);
    open_rw(&fx.mnt("ro")).write_all_at(b"READ", 0).unwrap();
    let mut back = [0u8; 9];
    reader.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"READ only");
    drop(reader);
    fx.wait_closed_files(1);
    assert_eq!(std::fs::read(fx.src("ro")).unwrap(), b"READ only");
}

#[test]
fn an_unmount_while_the_kernel_sends_releases_ends_cleanly() {
    // The kernel shuts the connection down at unmount; a server thread that
    // was reading a request just then (a file's release, say) gets
    // `ECONNABORTED` instead of `ENODEV`. The session ended with that error,
    // and the unmount failed though everything was synced (a CI run found
    // it, in `a_library_punch_of_a_host_file_reaches_the_mounts_shared_map_at_once`).
    for round in 0..200 {
        let fx = PassedThrough::new(round % 2 == 1, |src| {
            for i in 0..8 {
                std::fs::write(src.join(format!("f{i}")), [1u8; PAGE]).unwrap();
            }
        });
        for i in 0..8 {
            let mut file = open_rw(&fx.mnt(&format!("f{i}")));
            file.write_all(&[2u8; 16]).unwrap();
        }
        // Unmounts, and fails on any error.
        drop(fx);
    }
}
