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
//! itself and drops them on the punches, truncates and zero ranges it sends
//! through the mount.
//!
//! What this first version serves: one directory (the volume's files), and on
//! each file read, write, `fsync` (each open file with its own writeback-error
//! cursor), `O_DIRECT`, `fallocate` (allocate, `KEEP_SIZE`, `PUNCH_HOLE`,
//! `ZERO_RANGE`), truncate, create and unlink; `statfs` from the allocator.
//! Not yet: subdirectories, rename, links, symlinks, and changes of mode,
//! owner or times (refused with `EOPNOTSUPP`).
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
}

/// Mounts the volume in `image` at `mountpoint`, served in the background.
///
/// Fails, naming the path, if the image holds no volume (`EINVAL`: format it
/// first), is opened by another volume (`EBUSY`), or the mount point is not a
/// directory (`ENOTDIR`) or cannot be mounted on (as `mount(2)` says: `EPERM`
/// without the privilege, `ENODEV` without `/dev/fuse`).
pub fn mount(image: &Path, mountpoint: &Path, options: &MountOptions) -> io::Result<Mounted> {
    let session = session(image, mountpoint, options)?;
    Ok(Mounted {
        session: session.spawn()?,
    })
}

/// A session of the volume in `image` mounted at `mountpoint`, not yet
/// served: [`fuser::Session::run`] serves it in the foreground, until it is
/// unmounted (see `filemap mount`).
pub fn session(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<fuser::Session<VolumeFs>> {
    if !mountpoint.is_dir() {
        let error = match mountpoint.exists() {
            true => io::Error::from_raw_os_error(libc::ENOTDIR),
            false => io::Error::from_raw_os_error(libc::ENOENT),
        };
        return Err(naming(mountpoint, error));
    }
    let device = FileDevice::open(image).map_err(|error| naming(image, error))?;
    let volume = Volume::open(Arc::new(device)).map_err(|error| {
        let hint = match filemap::errno(&error) {
            Some(libc::EBUSY) => "",
            _ => " (is it a volume? `filemap format` makes one)",
        };
        io::Error::new(error.kind(), format!("{}: {error}{hint}", image.display()))
    })?;
    let cache = PageCache::builder()
        .budget_bytes(options.budget_bytes)
        .strategy(options.strategy)
        .readahead_threads(options.readahead_threads)
        .build()?;
    let fs = VolumeFs::new(volume, cache)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(image.display().to_string()),
        fuser::MountOption::Subtype("filemap".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    fuser::Session::new(fs, mountpoint, &config).map_err(|error| naming(mountpoint, error))
}

/// `error`, with `path` in front of its message.
fn naming(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}
