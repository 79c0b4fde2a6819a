//! `filemap format` and `filemap mount`: a volume image (or a host
//! directory, passed through) as a file system.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use filemap::{ReadaheadMode, Strategy};
use filemap_fuse::MountOptions;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::{strategy_parser, whole_number};

/// The size of the image `filemap mount` makes when given none.
const DEFAULT_IMAGE_BYTES: u64 = 1 << 30;

#[derive(clap::Args)]
pub struct FormatArgs {
    /// The image file to create (it must not exist).
    image: PathBuf,
    /// Its size: bytes, or with a suffix K, M, G or T (powers of 1024).
    #[arg(long, value_parser = size)]
    size: u64,
}

#[derive(clap::Args)]
pub struct MountArgs {
    /// The volume image (made by `filemap format`); a temporary 1 GiB image,
    /// removed at the end, if omitted. With --passthrough, the host
    /// directory to serve (then required).
    #[arg(value_name = "IMAGE|DIR", required_if_eq("passthrough", "true"))]
    image: Option<PathBuf>,
    /// The directory to mount it on; a temporary one, printed, if omitted
    /// (required with --passthrough).
    #[arg(required_if_eq("passthrough", "true"))]
    mountpoint: Option<PathBuf>,
    /// Serve the host directory DIR instead of an image: its own namespace,
    /// every regular file a host file cached by the one coherent cache.
    #[arg(long)]
    passthrough: bool,
    /// The cache's budget: bytes, or with a suffix K, M, G or T.
    #[arg(long, default_value = "256M", value_parser = size)]
    budget: u64,
    /// The cache's coherence strategy.
    #[arg(long, default_value = "range", value_parser = strategy_parser())]
    strategy: Strategy,
    /// The cache's readahead threads.
    #[arg(long, default_value_t = MountOptions::default().readahead_threads, value_parser = whole_number::<usize>)]
    readahead_threads: usize,
    /// When the readahead threads read a sequential stream's next window:
    /// always (the default: each read is a round trip through the kernel,
    /// and they fill meanwhile), or only while the backend is slower to read
    /// than the cache is to install.
    #[arg(long, value_enum, default_value_t = ReadaheadArg::Always)]
    readahead: ReadaheadArg,
    /// Read the image through the host's page cache even for large reads
    /// (by default, reads of 128 KiB or more, a sequential stream's
    /// windows, bypass it with O_DIRECT: filemap caches them).
    #[arg(long)]
    no_direct_reads: bool,
    /// Threads serving the kernel's requests (default: one per processor,
    /// at least 2, at most 16).
    #[arg(long, default_value_t = MountOptions::default().threads, value_parser = whole_number::<usize>)]
    threads: usize,
    /// Keep the kernel's page cache in front of filemap's (reads of cached
    /// pages never reach the server); coherent all the same.
    #[arg(long)]
    kernel_cache: bool,
}

/// `--readahead`, of `mount` and of `torture --mount`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReadaheadArg {
    Always,
    BackendBound,
}

impl ReadaheadArg {
    pub(crate) fn mode(self) -> ReadaheadMode {
        match self {
            ReadaheadArg::Always => ReadaheadMode::Always,
            ReadaheadArg::BackendBound => ReadaheadMode::BackendBound,
        }
    }
}

/// A size: a whole number of bytes, or with a suffix K, M, G or T.
fn size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 10),
        Some((at, 'M' | 'm')) => (&text[..at], 20),
        Some((at, 'G' | 'g')) => (&text[..at], 30),
        Some((at, 'T' | 't')) => (&text[..at], 40),
        _ => (text, 0),
    };
    u64::from_str(digits)
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| "must be a whole number of bytes, with an optional K, M, G or T".to_owned())
}

pub fn format(args: FormatArgs) -> ExitCode {
    match filemap_fuse::format(&args.image, args.size) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("filemap format: {error}");
            ExitCode::from(2)
        }
    }
}

/// Serves the volume in the foreground until it is unmounted: by Ctrl-C,
/// SIGTERM or `umount` from outside. Everything is synced first.
pub fn mount(args: MountArgs) -> ExitCode {
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("filemap mount: {error}");
            ExitCode::from(2)
        }
    }
}

/// Unmounts `mountpoint` for a signal. If a file is open there (`EBUSY`), it
/// is detached at once instead (`MNT_DETACH`): no new path reaches it, and
/// the server syncs and ends when the last open file closes.
fn unmount(mountpoint: &Path) {
    let Ok(path) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        return;
    }
    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        eprintln!(
            "filemap mount: {} is busy (a file is open there): detached now; \
             the server syncs and ends when the last open file closes",
            mountpoint.display()
        );
        // SAFETY: as above.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

fn serve(args: MountArgs) -> std::io::Result<()> {
    let options = MountOptions {
        budget_bytes: args.budget,
        strategy: args.strategy,
        readahead_threads: args.readahead_threads,
        readahead_mode: args.readahead.mode(),
        direct_reads: !args.no_direct_reads,
        threads: args.threads,
        kernel_cache: args.kernel_cache,
    };
    if args.passthrough {
        // Both given: clap requires them with the flag.
        let (Some(dir), Some(mountpoint)) = (args.image, args.mountpoint) else {
            unreachable!("clap requires DIR and MOUNTPOINT with --passthrough");
        };
        let session = filemap_fuse::session_passthrough(&dir, &mountpoint, &options)?;
        let what = format!("{} passed through", dir.display());
        return run(move || session.run(), &what, &mountpoint);
    }
    // Temporary image and mount point, if not given: gone at the end.
    let scratch = tempfile::Builder::new()
        .prefix("filemap-mount-")
        .tempdir()?;
    let image = match args.image {
        Some(image) => image,
        None => {
            let image = scratch.path().join("volume.img");
            filemap_fuse::format(&image, DEFAULT_IMAGE_BYTES)?;
            image
        }
    };
    let mountpoint = match args.mountpoint {
        Some(mountpoint) => mountpoint,
        None => {
            let mountpoint = scratch.path().join("mnt");
            std::fs::create_dir(&mountpoint)?;
            mountpoint
        }
    };
    let session = filemap_fuse::session(&image, &mountpoint, &options)?;
    run(
        move || session.run(),
        &image.display().to_string(),
        &mountpoint,
    )
}

/// Serves a session (of `what`, at `mountpoint`) with `serve` until it is
/// unmounted; a signal unmounts it.
fn run(
    serve: impl FnOnce() -> std::io::Result<()>,
    what: &str,
    mountpoint: &Path,
) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let signals_handle = signals.handle();
    // Runs until `close` below: ending at the first signal would close the
    // signals' socket, and `close` writing to it would then raise SIGPIPE.
    let target = mountpoint.to_path_buf();
    let waiter = std::thread::spawn(move || {
        for _ in signals.forever() {
            unmount(&target);
        }
    });
    eprintln!(
        "filemap mount: {what} mounted at {} (Ctrl-C or `umount {}` ends it)",
        mountpoint.display(),
        mountpoint.display()
    );
    let _ = std::io::stderr().flush();
    let served = serve();
    signals_handle.close();
    let _ = waiter.join();
    served?;
    eprintln!("filemap mount: unmounted, everything synced");
    Ok(())
}
