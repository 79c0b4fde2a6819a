//! Changes made through the library reach the shared maps of the mount at
//! once: the kernel keeps the pages of such maps in its own page cache, and
//! the mount tells it to drop them (and write its dirty ones back first).
//! Every test mounts a temporary image in this process, with the kernel's
//! caching of files off and on; one that cannot
//! mount fails with the reason.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use filemap::{Mapping, Volume};
use filemap_fuse::{format, mount, MountOptions, Mounted};

const PAGE: usize = 4096;
const PAGES: usize = 16;

/// A mounted image holding file `f` of `PAGES` pages of `1`s, the mount's
/// shared map of it, and the library's mapping of the same file.
struct Fixture {
    _dir: tempfile::TempDir,
    mounted: Option<Mounted>,
    map: *mut u8,
    library: Arc<Mapping>,
    /// The file's path on the mount.
    path: std::path::PathBuf,
}

impl Fixture {
    fn new(kernel_cache: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (image, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
        std::fs::create_dir(&mnt).unwrap();
        format(&image, 64 << 20).unwrap();
        let options = MountOptions {
            kernel_cache,
            ..MountOptions::default()
        };
        let mounted = mount(&image, &mnt, &options)
            .unwrap_or_else(|error| panic!("cannot mount here: {error}"));
        let path = mnt.join("f");
        std::fs::write(&path, vec![1u8; PAGES * PAGE]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
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
        let volume: &Arc<Volume> = mounted.volume();
        let ino = volume.lookup(Volume::ROOT, "f").unwrap().ino;
        let library = mounted
            .cache()
            .open(Arc::new(volume.open_ino(ino).unwrap()))
            .unwrap();
        Fixture {
            _dir: dir,
            mounted: Some(mounted),
            map: map.cast(),
            library,
            path,
        }
    }

    /// The byte at `at` as the mount's map shows it now.
    fn map_byte(&self, at: usize) -> u8 {
        assert!(at < PAGES * PAGE);
        // SAFETY: inside the map (checked), which lives until `drop`; a
        // volatile read, since the kernel changes the page behind it.
        unsafe { self.map.add(at).read_volatile() }
    }

    fn map_store(&self, at: usize, byte: u8) {
        assert!(at < PAGES * PAGE);
        // SAFETY: as in `map_byte`, and the map is writable.
        unsafe { self.map.add(at).write_volatile(byte) }
    }

    /// Reads every page through the map, so the kernel caches them all.
    fn fault_all_in(&self) {
        for page in 0..PAGES {
            assert_eq!(self.map_byte(page * PAGE), 1);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: the map made in `new`, not used after this.
        unsafe { libc::munmap(self.map.cast(), PAGES * PAGE) };
        if let Some(mounted) = self.mounted.take() {
            mounted.unmount().unwrap();
        }
    }
}

#[test]
fn a_library_punch_reaches_the_mounts_shared_map_at_once() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        let fx = Fixture::new(kernel_cache);
        fx.fault_all_in();
        fx.library.punch_hole(2 * PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(fx.map_byte(2 * PAGE), 0, "the punched page");
        assert_eq!(fx.map_byte(3 * PAGE), 1, "the page after it");
        // And a read through the mount (from the kernel's page cache, when
        // it is in front).
        let read = std::fs::read(&fx.path).unwrap();
        assert!(
            read[2 * PAGE..3 * PAGE].iter().all(|&b| b == 0),
            "read back"
        );
    }
}

#[test]
fn a_library_write_and_truncate_reach_the_mounts_shared_map_at_once() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        let fx = Fixture::new(kernel_cache);
        fx.fault_all_in();
        fx.library
            .write_all_at(&[7; 10], 5 * PAGE as u64 + 3)
            .unwrap();
        assert_eq!(fx.map_byte(5 * PAGE + 3), 7);
        // Shrink to 8 pages and grow back: the pages past 8 read as zeroes.
        fx.library.set_len(8 * PAGE as u64).unwrap();
        fx.library.set_len((PAGES * PAGE) as u64).unwrap();
        assert_eq!(fx.map_byte(9 * PAGE), 0);
        assert_eq!(fx.map_byte(7 * PAGE), 1);
    }
}

#[test]
fn invalidate_range_after_a_backend_change_reaches_the_mounts_shared_map() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        // A distributed store's lease revocation: the bytes changed elsewhere
        // (here, straight in the volume file), and the cache is told to drop
        // the range.
        let fx = Fixture::new(kernel_cache);
        fx.fault_all_in();
        fx.library.sync_all().unwrap();
        let page = vec![9u8; PAGE];
        fx.library.backend().write_pages(4, &page).unwrap();
        fx.library
            .invalidate_range(4 * PAGE as u64, PAGE as u64)
            .unwrap();
        assert_eq!(fx.map_byte(4 * PAGE), 9);
    }
}

#[test]
fn a_store_through_the_mounts_map_lands_before_a_library_punch_not_after() {
    // Files opened with the kernel's caching off, then in front.
    for kernel_cache in [false, true] {
        // The map's dirty page is written back before the punch (and so
        // punched), not after it, where it would bring the old data back.
        let fx = Fixture::new(kernel_cache);
        fx.fault_all_in();
        fx.map_store(6 * PAGE + 1, 5);
        fx.library.punch_hole(6 * PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(fx.map_byte(6 * PAGE + 1), 0);
        let mut back = [1u8; 2];
        fx.library
            .read_exact_at(&mut back, 6 * PAGE as u64)
            .unwrap();
        assert_eq!(back, [0, 0]);
        // And it stays punched once the kernel writes its pages back.
        // SAFETY: the map made in `new`, inside its length.
        let synced = unsafe { libc::msync(fx.map.cast(), PAGES * PAGE, libc::MS_SYNC) };
        assert_eq!(synced, 0);
        fx.library
            .read_exact_at(&mut back, 6 * PAGE as u64)
            .unwrap();
        assert_eq!(back, [0, 0]);
    }
}

#[test]
fn a_mount_truncate_racing_a_library_extension_leaves_no_cut_page_in_the_kernels_cache() {
    // The kernel drops its pages past a truncate's new end only if the size
    // in the reply differs from the one it knew. A library zero range that
    // extends the file back between the server's truncate and its reply made
    // the reply's size the old one, and the kernel kept the cut pages (the
    // mount torture found it, with the kernel's cache in front).
    const CUT: usize = 8;
    const ROUNDS: usize = 10_000;
    use std::os::unix::fs::FileExt;
    for kernel_cache in [false, true] {
        let fx = Fixture::new(kernel_cache);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fx.path)
            .unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..ROUNDS {
            let byte = 2 + (round % 250) as u8;
            let tail = vec![byte; (PAGES - CUT) * PAGE];
            file.write_all_at(&tail, (CUT * PAGE) as u64).unwrap();
            // The kernel caches the tail: the map's faults read it in.
            for page in CUT..PAGES {
                assert_eq!(fx.map_byte(page * PAGE), byte);
            }
            let delay = std::time::Duration::from_micros(rng.u64(0..80));
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    barrier.wait();
                    file.set_len((CUT * PAGE) as u64).unwrap();
                });
                barrier.wait();
                let started = std::time::Instant::now();
                while started.elapsed() < delay {
                    std::hint::spin_loop();
                }
                let last = ((PAGES - 1) * PAGE) as u64;
                fx.library.zero_range(last, PAGE as u64).unwrap();
            });
            // Whatever the order, the cut pages read as zeroes now; grow the
            // file back first, so that the map may touch them.
            file.set_len((PAGES * PAGE) as u64).unwrap();
            for page in CUT..PAGES {
                assert_eq!(
                    fx.map_byte(page * PAGE),
                    0,
                    "round {round}, kernel cache {kernel_cache}: page {page} of the map kept its cut bytes"
                );
            }
        }
    }
}

/// Writes `writes` times a page of the counter through the mount to page 0,
/// each time reading the page back through the mount, while one thread
/// reads it (and the file's size) through the mount and another calls
/// `change` with a count over and over: panics at the first write read back
/// as an earlier one.
fn race_buffered_writes(path: &std::path::Path, writes: u64, change: impl Fn(u64) + Sync) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let reader = std::fs::File::open(path).unwrap();
            let mut page = [0u8; PAGE];
            while !stop.load(Ordering::Relaxed) {
                reader.read_exact_at(&mut page, 0).unwrap();
                // With a size the kernel did not know, it used to drop all
                // its pages of the file.
                reader.metadata().unwrap();
            }
        });
        scope.spawn(|| {
            let mut count = 0;
            while !stop.load(Ordering::Relaxed) {
                change(count);
                count += 1;
            }
        });
        let mut page = [0u8; PAGE];
        let found = (1..=writes).find_map(|n| {
            page[..8].copy_from_slice(&n.to_le_bytes());
            file.write_all_at(&page, 0).unwrap();
            let mut back = [0u8; 8];
            file.read_exact_at(&mut back, 0).unwrap();
            let back = u64::from_le_bytes(back);
            (back != n).then_some((n, back))
        });
        stop.store(true, Ordering::Relaxed);
        if let Some((n, back)) = found {
            panic!("write {n} read back as write {back}");
        }
    });
}

#[test]
fn a_buffered_write_racing_a_library_invalidation_leaves_no_old_page_in_the_kernels_cache() {
    // The kernel copies a buffered write into its pages, marks them up to
    // date and only then sends it; the library's invalidation dropped such
    // a page, a reader read it from the server before the write landed, and
    // the kernel kept that page after the write returned (the mount torture
    // found it, with the kernel's cache in front: about one run in twenty).
    for kernel_cache in [false, true] {
        let fx = Fixture::new(kernel_cache);
        let library = &fx.library;
        race_buffered_writes(&fx.path, 20_000, |_| {
            library.invalidate_range(0, PAGE as u64).unwrap();
        });
        let drops = fx.mounted.as_ref().unwrap().write_through_drops();
        assert_eq!(drops.late, 0, "{drops:?}");
        // The race was run: writes found pages read during them.
        assert_eq!(drops.writes > 0, kernel_cache, "{drops:?}");
    }
}

#[test]
fn a_buffered_write_racing_a_library_size_change_leaves_no_old_page_in_the_kernels_cache() {
    // Seeing a size it did not know, the kernel dropped all its pages of the
    // file, in the same window as above.
    for kernel_cache in [false, true] {
        let fx = Fixture::new(kernel_cache);
        let library = &fx.library;
        race_buffered_writes(&fx.path, 100_000, |count| {
            let far = (512 * PAGE) as u64;
            match count % 2 {
                0 => library.zero_range(far, PAGE as u64).unwrap(),
                _ => library.set_len((PAGES * PAGE) as u64).unwrap(),
            }
        });
        let drops = fx.mounted.as_ref().unwrap().write_through_drops();
        assert_eq!(drops.late, 0, "{drops:?}");
    }
}
