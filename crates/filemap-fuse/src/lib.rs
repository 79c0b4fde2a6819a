//! filemap's coherent page cache as a FUSE file system.
//!
//! [`mount`] serves a [`Volume`] image at a mount point: every file of it is a
//! [`filemap::Mapping`] of one [`PageCache`], so unmodified programs (`cp`,
//! `dd`, `sqlite3`, programs that map their files) read and write through the
//! cache, and every punch, truncate, zero range and direct write they make is
//! coherent with every read, as the library's contract says.
//!
//! Files are opened with the kernel's caching off (`FOPEN_DIRECT_IO`): filemap
//! is the only cache, and every read and write reaches it. Shared memory maps
//! are allowed (`FUSE_DIRECT_IO_ALLOW_MMAP`); the kernel then keeps their pages
//! itself, writes them back and drops them around the direct writes, punches,
//! truncates and zero ranges it sends through the mount, and is told to do
//! the same for every change made through the library ([`Mounted::cache`]).
//!
//! The namespace is the volume's: directories, hard and symbolic links,
//! rename (with `RENAME_NOREPLACE` and `RENAME_EXCHANGE`), mode, owner and
//! times, files unlinked while open; `statfs` from the allocator. On each
//! file: read, write, `fsync` (each open file with its own writeback-error
//! cursor), `O_DIRECT`, `fallocate` (allocate, `KEEP_SIZE`, `PUNCH_HOLE`,
//! `ZERO_RANGE`), truncate, and `lseek` with `SEEK_DATA` and `SEEK_HOLE`.
//!
//! ```no_run
//! use filemap_fuse::{format, mount, MountOptions};
//!
//! format("disk.img".as_ref(), 1 << 30)?;
//! let mounted = mount("disk.img".as_ref(), "/mnt/filemap".as_ref(), &MountOptions::default())?;
//! // ... programs use /mnt/filemap ...
//! mounted.unmount()?; // syncs everything, then unmounts
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::path::Path;
use std::sync::Arc;

use filemap::{FileDevice, PageCache, Strategy, Volume};

mod fs;
mod notify;
mod open_files;

use notify::KernelCache;

pub use fs::VolumeFs;

/// How a mount runs.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The cache's budget in bytes.
    pub budget_bytes: u64,
    /// The cache's coherence strategy.
    pub strategy: Strategy,
    /// The cache's readahead threads.
    pub readahead_threads: usize,
    /// Threads serving the kernel's requests, so a slow miss never holds up a
    /// hit.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            budget_bytes: 256 << 20,
            strategy: Strategy::DEFAULT,
            readahead_threads: 2,
            threads: 4,
        }
    }
}

/// Writes an empty volume of `size` bytes to a new file `image`. Fails with
/// `EEXIST` if `image` exists, and with the volume's error if `size` is too
/// small (`EINVAL`); nothing is left behind then.
pub fn format(image: &Path, size: u64) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|error| naming(image, error))?;
    let formatted = file
        .set_len(size)
        .and_then(|()| FileDevice::from_file(file))
        .and_then(|device| Volume::format(Arc::new(device)))
        .and_then(|volume| volume.sync());
    if let Err(error) = formatted {
        // Nothing left behind: the file was this call's.
        let _ = std::fs::remove_file(image);
        return Err(naming(image, error));
    }
    Ok(())
}

/// A mounted volume, served by threads of its own until [`Mounted::unmount`]
/// or until something unmounts it from outside (`umount`).
pub struct Mounted {
    session: fuser::BackgroundSession,
    volume: Arc<Volume>,
    cache: Arc<PageCache>,
}

impl Mounted {
    /// Syncs every file and the volume, then unmounts.
    pub fn unmount(self) -> io::Result<()> {
        self.session.umount_and_join()
    }

    /// Waits until the file system is unmounted from outside; it syncs
    /// everything first.
    pub fn join(self) -> io::Result<()> {
        self.session.join()
    }

    /// The mounted volume: its namespace and files, for the library's calls
    /// beside the mount's.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The cache every file of the mount is a mapping of. A change made
    /// through it ([`PageCache::open`] of a file of [`Mounted::volume`], then
    /// a write, a punch or [`filemap::Mapping::invalidate_range`]) reaches
    /// every reader and shared map on the mount before the call returns.
    pub fn cache(&self) -> &Arc<PageCache> {
        &self.cache
    }
}

/// Mounts the volume in `image` at `mountpoint`, served in the background.
///
/// Fails, naming the path, if the image holds no volume (`EINVAL`: format it
/// first), is opened by another volume (`EBUSY`), or the mount point is
/// missing (`ENOENT`), not a directory (`ENOTDIR`), a mount point already
/// (`EBUSY`), a dead mount whose server ended (`ENOTCONN`: `umount` it), or
/// cannot be mounted on (as `mount(2)` says: `EPERM` without the privilege,
/// `ENODEV` without `/dev/fuse`).
pub fn mount(image: &Path, mountpoint: &Path, options: &MountOptions) -> io::Result<Mounted> {
    let (session, volume, cache) = prepare(image, mountpoint, options)?;
    Ok(Mounted {
        session: session.spawn()?,
        volume,
        cache,
    })
}

/// A session of the volume in `image` mounted at `mountpoint`, not yet
/// served: [`fuser::Session::run`] serves it in the foreground, until it is
/// unmounted (see `filemap mount`). Fails as [`mount`] does.
pub fn session(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<fuser::Session<VolumeFs>> {
    Ok(prepare(image, mountpoint, options)?.0)
}

/// The session, the volume and its cache.
fn prepare(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<(fuser::Session<VolumeFs>, Arc<Volume>, Arc<PageCache>)> {
    check_mountpoint(mountpoint)?;
    let device = FileDevice::open(image).map_err(|error| naming(image, error))?;
    let volume = Volume::open(Arc::new(device)).map_err(|error| {
        let hint = match filemap::errno(&error) {
            Some(libc::EBUSY) => "",
            _ => " (is it a volume? `filemap format` makes one)",
        };
        io::Error::new(error.kind(), format!("{}: {error}{hint}", image.display()))
    })?;
    let kernel_cache = Arc::new(KernelCache::default());
    let cache = Arc::new(
        PageCache::builder()
            .budget_bytes(options.budget_bytes)
            .strategy(options.strategy)
            .readahead_threads(options.readahead_threads)
            .change_listener(kernel_cache.clone())
            .build()?,
    );
    let _ = kernel_cache.inode_of.set(Box::new(notify::volume_inode));
    let fs = VolumeFs::new(volume.clone(), cache.clone());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(image.display().to_string()),
        fuser::MountOption::Subtype("filemap".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let session =
        fuser::Session::new(fs, mountpoint, &config).map_err(|error| naming(mountpoint, error))?;
    let _ = kernel_cache.notifier.set(session.notifier());
    Ok((session, volume, cache))
}

/// `mountpoint` is a directory nothing is mounted on.
fn check_mountpoint(mountpoint: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(mountpoint).map_err(|error| {
        if error.raw_os_error() == Some(libc::ENOTCONN) {
            let message = "a dead mount is there (its server ended): `umount` it first";
            return naming(mountpoint, io::Error::new(error.kind(), message));
        }
        naming(mountpoint, error)
    })?;
    if !meta.is_dir() {
        return Err(naming(
            mountpoint,
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let path = std::fs::canonicalize(mountpoint).map_err(|error| naming(mountpoint, error))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // The fifth field is the mount point, with spaces and the like escaped
    // in octal (as `\040`).
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    if mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
    {
        let error = io::Error::new(
            io::ErrorKind::ResourceBusy,
            "something is mounted there already (Device or resource busy)",
        );
        return Err(naming(mountpoint, error));
    }
    Ok(())
}

/// `error`, with `path` in front of its message.
fn naming(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}
