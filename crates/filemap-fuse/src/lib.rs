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
//! `ZERO_RANGE`), truncate, `lseek` with `SEEK_DATA` and `SEEK_HOLE`, and
//! `copy_file_range`.
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
//!
//! [`mount_passthrough`] serves a host directory the same way: its namespace
//! is the directory's own, and every regular file is a [`filemap::HostFile`]
//! of the mount's one cache, a coherent caching layer over a slow or remote
//! directory.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use filemap::{FileDevice, PageCache, ReadaheadMode, Strategy, Volume};

mod fs;
mod notify;
mod open_files;
mod passthrough;

use notify::KernelCache;
use open_files::{SyncsAtUnmount, UnmountSync};

pub use fs::VolumeFs;
pub use passthrough::PassthroughFs;

/// How a mount runs.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The cache's budget in bytes.
    pub budget_bytes: u64,
    /// The cache's coherence strategy.
    pub strategy: Strategy,
    /// The cache's readahead threads: 4 by default, since with
    /// [`MountOptions::direct_reads`] each thread mostly waits for the disk,
    /// and the threads' reads in flight are what keeps it busy (uncached
    /// sequential reads through the mount, `filemap bench mount --runs 3`:
    /// 0.40-0.48x the pass-through with 1 thread, 0.65-0.77x with 2,
    /// 0.82-1.56x with 4, median 1.23x of nine invocations).
    pub readahead_threads: usize,
    /// When they read ahead: [`ReadaheadMode::Always`] by default, since
    /// each read of the mount is a round trip through the kernel during
    /// which the threads fill the next window (uncached sequential reads
    /// through the mount, on a slower disk and with the image read through
    /// the host's page cache: 0.99-1.09x the pass-through against
    /// 0.70-0.79x with [`ReadaheadMode::BackendBound`], `filemap bench
    /// mount`).
    pub readahead_mode: ReadaheadMode,
    /// Reads of the image of [`DIRECT_READ_MIN`] or more (a sequential
    /// stream's windows) bypass the host's page cache
    /// ([`FileDevice::with_direct_reads`]); smaller reads and every write go
    /// through it. filemap caches what it reads, so the host's cache would
    /// hold a second copy of every streamed page, and allocating and filling
    /// that copy is most of a fill's cost on a fast disk. On by default;
    /// where the image's file system refuses `O_DIRECT`, the mount reads
    /// through the host's cache. Only for [`mount`] and [`session`], which
    /// open the image.
    pub direct_reads: bool,
    /// Threads serving the kernel's requests: [`default_server_threads`] by
    /// default, one per processor and at least 2, so a slow miss never holds
    /// up a hit.
    pub threads: usize,
    /// The kernel's page cache in front of filemap's: reads of cached pages
    /// never reach the server. Coherent all the same: the kernel drops its
    /// pages on the changes made through the mount, and is told of those made
    /// through the library. Off by default (`FOPEN_DIRECT_IO`: filemap is the
    /// only cache).
    pub kernel_cache: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            budget_bytes: 256 << 20,
            strategy: Strategy::DEFAULT,
            readahead_threads: 4,
            readahead_mode: ReadaheadMode::Always,
            direct_reads: true,
            threads: default_server_threads(),
            kernel_cache: false,
        }
    }
}

/// The threads serving a mount's requests by default: one per processor, at
/// least 2 (so one slow miss or fsync leaves a thread for the hits) and at
/// most 16 (each holds a receive buffer of a 1 MiB write).
///
/// Not more than the processors: every thread waits on the connection's one
/// request queue, so a thread with no processor to run on only adds
/// wake-ups and switches to each request. On 2 processors, with 2 threads
/// reading cached 4 KiB pages at random (`filemap bench mount --runs 3
/// --server-threads 2`, then `4`, three times in turns), 2 server threads
/// answered 113,000-125,000 reads/s through filemap's mount and
/// 101,000-117,000 through the pass-through, against 62,000-85,000 and
/// 61,000-84,000 with 4; the uncached sequential read and the writes with
/// fsync did as well with 2 as with 4. Nor did slow requests hold up hits:
/// with four `fio` jobs beside, each writing 4 KiB pages with an fsync
/// after each, a reader of cached pages got 33,600-34,300 reads/s with 2
/// server threads (`filemap mount --threads 2`) and 31,000-31,700 with 4,
/// the writers about 1,300 writes/s in all either way.
pub fn default_server_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 16))
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

/// A mounted volume (or, as `Mounted<PathBuf>`, a host directory passed
/// through), served by threads of its own until [`Mounted::unmount`] or
/// until something unmounts it from outside (`umount`).
pub struct Mounted<Source = Arc<Volume>> {
    session: fuser::BackgroundSession,
    synced: UnmountSync,
    source: Source,
    cache: Arc<PageCache>,
    kernel_cache: Arc<KernelCache>,
}

/// What buffered writes through a mount with the kernel's page cache in
/// front ([`MountOptions::kernel_cache`]) did about the kernel's
/// write-through race: a write that a read of its pages overlapped after
/// the library told the kernel of a change drops those pages before it is
/// answered (see [`Mounted::write_through_drops`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteThroughDrops {
    /// Writes that dropped pages of the kernel's cache before their answer.
    pub writes: u64,
    /// Of those, writes answered before the kernel had dropped the pages,
    /// after waiting a second: it waits that long only for a page locked by
    /// the write itself, which it dropped and read again behind the server's
    /// back meanwhile (reclaim). Each may have left a page from before the
    /// write in the kernel's cache.
    pub late: u64,
}

impl<Source> Mounted<Source> {
    /// What buffered writes through the mount did about the kernel's
    /// write-through race, so far (all zero with the kernel's caching off).
    pub fn write_through_drops(&self) -> WriteThroughDrops {
        let (writes, late) = self.kernel_cache.write_through_drops();
        WriteThroughDrops { writes, late }
    }

    /// Unmounts, then syncs every file (and the volume); fails if the sync
    /// did.
    pub fn unmount(self) -> io::Result<()> {
        session_ended(self.session.umount_and_join())?;
        self.synced.outcome()
    }

    /// Waits until the file system is unmounted from outside, and for the
    /// sync of every file (and the volume) that follows; fails if the sync
    /// did.
    pub fn join(self) -> io::Result<()> {
        session_ended(self.session.join())?;
        self.synced.outcome()
    }

    /// The cache every file of the mount is a mapping of. A change made
    /// through it ([`PageCache::open`] of a file of [`Mounted::volume`], or
    /// of a [`filemap::HostFile`] of [`Mounted::dir`], then a write, a punch
    /// or [`filemap::Mapping::invalidate_range`]) reaches every reader and
    /// shared map on the mount before the call returns.
    pub fn cache(&self) -> &Arc<PageCache> {
        &self.cache
    }
}

impl Mounted {
    /// The mounted volume: its namespace and files, for the library's calls
    /// beside the mount's.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.source
    }
}

impl Mounted<PathBuf> {
    /// The host directory passed through.
    pub fn dir(&self) -> &Path {
        &self.source
    }
}

/// A mounted file system not yet served (of a volume, or as
/// `Session<PassthroughFs>` of a host directory): [`Session::run`] serves it
/// in the foreground until it is unmounted.
pub struct Session<Fs: fuser::Filesystem> {
    session: fuser::Session<Fs>,
    synced: UnmountSync,
    kernel_cache: Arc<KernelCache>,
}

impl<Fs: fuser::Filesystem + Send + Sync + 'static> Session<Fs> {
    /// Serves the mount until it is unmounted (`umount`, or a signal the
    /// caller turns into one), then syncs every file (and the volume); fails
    /// if serving or the sync did.
    pub fn run(self) -> io::Result<()> {
        session_ended(self.session.run())?;
        self.synced.outcome()
    }

    /// Serves it in the background.
    fn spawn<Source>(self, source: Source, cache: Arc<PageCache>) -> io::Result<Mounted<Source>> {
        Ok(Mounted {
            session: self.session.spawn()?,
            synced: self.synced,
            source,
            cache,
            kernel_cache: self.kernel_cache,
        })
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
    session.spawn(volume, cache)
}

/// A session of the volume in `image` mounted at `mountpoint`, not yet
/// served: [`Session::run`] serves it in the foreground, until it is
/// unmounted (see `filemap mount`). Fails as [`mount`] does.
pub fn session(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<Session<VolumeFs>> {
    Ok(prepare(image, mountpoint, options)?.0)
}

/// The session, the volume and its cache.
fn prepare(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<(Session<VolumeFs>, Arc<Volume>, Arc<PageCache>)> {
    check_mountpoint(mountpoint)?;
    let device = open_image(image, options).map_err(|error| naming(image, error))?;
    let volume = Volume::open(Arc::new(device)).map_err(|error| {
        let hint = match filemap::errno(&error) {
            Some(libc::EBUSY) => "",
            _ => " (is it a volume? `filemap format` makes one)",
        };
        io::Error::new(error.kind(), format!("{}: {error}{hint}", image.display()))
    })?;
    volume_session(volume, image, mountpoint, options)
}

/// The smallest read of the image that bypasses the host's page cache with
/// [`MountOptions::direct_reads`]: a sequential stream's first window (the
/// cache's fill batch of 32 pages), so that every window of a stream does,
/// while a random read of a page or a few, and the volume's metadata, keep
/// the host's cache behind filemap's.
pub const DIRECT_READ_MIN: usize = 128 << 10;

/// The device of the volume image `image`, with
/// [`MountOptions::direct_reads`] where its file system takes them.
fn open_image(image: &Path, options: &MountOptions) -> io::Result<FileDevice> {
    let device = FileDevice::open(image)?;
    if !options.direct_reads {
        return Ok(device);
    }
    // Refused (a file system without `O_DIRECT`, no /proc): read through
    // the host's cache, as with the option off.
    device
        .with_direct_reads(DIRECT_READ_MIN)
        .or_else(|_| FileDevice::open(image))
}

/// Mounts `volume`, open in this process already, at `mountpoint`, served in
/// the background; the mount table names `source` as what is mounted. A
/// program that builds its volume itself (over a device of its own, say)
/// mounts it so, and keeps using it through the library beside the mount.
/// Fails as [`mount`] does for the mount point.
pub fn mount_volume(
    volume: Arc<Volume>,
    source: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<Mounted> {
    check_mountpoint(mountpoint)?;
    let (session, volume, cache) = volume_session(volume, source, mountpoint, options)?;
    session.spawn(volume, cache)
}

/// The session of `volume`, and its cache.
fn volume_session(
    volume: Arc<Volume>,
    source: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<(Session<VolumeFs>, Arc<Volume>, Arc<PageCache>)> {
    let (cache, kernel_cache) = build_cache(options)?;
    let _ = kernel_cache.inode_of.set(Box::new(notify::volume_inode));
    let fs = VolumeFs::new(volume.clone(), cache.clone(), options.kernel_cache);
    if options.kernel_cache {
        fs.open.watch_kernel_cache(kernel_cache.clone());
    }
    let session = new_session(fs, source, mountpoint, options, &kernel_cache)?;
    Ok((session, volume, cache))
}

/// Mounts the host directory `dir` at `mountpoint`, served in the background:
/// its namespace is the directory's own, and every regular file is a
/// [`filemap::HostFile`] of one cache ([`Mounted::cache`]).
///
/// Fails, naming the path, if `dir` is missing (`ENOENT`) or not a directory
/// (`ENOTDIR`), if the mount point lies inside it (`EINVAL`: the server would
/// serve its own mount), or as [`mount`] does for the mount point.
pub fn mount_passthrough(
    dir: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<Mounted<PathBuf>> {
    let (session, cache) = prepare_passthrough(dir, mountpoint, options)?;
    session.spawn(dir.to_path_buf(), cache)
}

/// A session of the host directory `dir` passed through at `mountpoint`,
/// not yet served: [`Session::run`] serves it in the foreground
/// (see `filemap mount --passthrough`). Fails as [`mount_passthrough`] does.
pub fn session_passthrough(
    dir: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<Session<PassthroughFs>> {
    Ok(prepare_passthrough(dir, mountpoint, options)?.0)
}

/// The pass-through's session and its cache.
fn prepare_passthrough(
    dir: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<(Session<PassthroughFs>, Arc<PageCache>)> {
    let meta = std::fs::metadata(dir).map_err(|error| naming(dir, error))?;
    if !meta.is_dir() {
        return Err(naming(dir, io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    check_mountpoint(mountpoint)?;
    let (source, target) = (canonical(dir)?, canonical(mountpoint)?);
    if target.starts_with(&source) {
        let error = io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inside {}, the directory it would serve", dir.display()),
        );
        return Err(naming(mountpoint, error));
    }
    // An inode the kernel knows holds a descriptor: as many as it caches.
    raise_open_file_limit();
    let (cache, kernel_cache) = build_cache(options)?;
    let fs = PassthroughFs::new(dir, cache.clone(), options.kernel_cache)
        .map_err(|error| naming(dir, error))?;
    let _ = kernel_cache.inode_of.set(fs.inode_of());
    if options.kernel_cache {
        fs.open.watch_kernel_cache(kernel_cache.clone());
    }
    let session = new_session(fs, dir, mountpoint, options, &kernel_cache)?;
    Ok((session, cache))
}

/// A mount's cache, and the listener that keeps the kernel's pages of shared
/// maps coherent with it.
fn build_cache(options: &MountOptions) -> io::Result<(Arc<PageCache>, Arc<KernelCache>)> {
    let kernel_cache = Arc::new(KernelCache::default());
    let cache = Arc::new(
        PageCache::builder()
            .budget_bytes(options.budget_bytes)
            .strategy(options.strategy)
            .readahead_threads(options.readahead_threads)
            .readahead_mode(options.readahead_mode)
            .change_listener(kernel_cache.clone())
            .build()?,
    );
    Ok((cache, kernel_cache))
}

/// The end of a `fuser` session's serving threads (`run`, `join`,
/// `umount_and_join`), as its outcome: the kernel shuts the connection down
/// at unmount, and a thread reading a request just then (a file's release,
/// say) gets `ECONNABORTED` where the others get `ENODEV`. The file system
/// ended all the same, and its `destroy` ran after the threads: a clean end.
/// (A file system served with `fuser` directly, as the bench's pass-through
/// is, needs the same.)
pub fn session_ended(ended: io::Result<()>) -> io::Result<()> {
    match ended {
        Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        ended => ended,
    }
}

/// The session of `fs`, serving `source` at `mountpoint`.
fn new_session<Fs: fuser::Filesystem + SyncsAtUnmount>(
    fs: Fs,
    source: &Path,
    mountpoint: &Path,
    options: &MountOptions,
    kernel_cache: &Arc<KernelCache>,
) -> io::Result<Session<Fs>> {
    let synced = fs.unmount_sync();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(source.display().to_string()),
        fuser::MountOption::Subtype("filemap".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let session =
        fuser::Session::new(fs, mountpoint, &config).map_err(|error| naming(mountpoint, error))?;
    let _ = kernel_cache.notifier.set(session.notifier());
    Ok(Session {
        session,
        synced,
        kernel_cache: kernel_cache.clone(),
    })
}

/// Raises this process's soft limit of open files to its hard limit (which
/// needs no privilege; a failure leaves the limit as it was).
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// `path` made absolute with every link resolved, or an error naming it.
fn canonical(path: &Path) -> io::Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|error| naming(path, error))
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
    let path = canonical(mountpoint)?;
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
