//! The torture through a mount: the run's volume is mounted in this process
//! (`filemap mount`'s file system, served by the same cache the oracle's
//! mappings are open in), and each worker is a process of its own that makes
//! its calls with the kernel's file API on the mount: `pread`, `pwrite`,
//! `O_DIRECT`, `fallocate`, `ftruncate`, `fsync`, `readahead` and loads and
//! stores through a shared map. Their requests race each other in the
//! server's threads, the kernel's pages of their maps race the cache, and
//! the run's `invalidate`, and every other punch and zero range, call the
//! library in this process, which must tell the kernel of every change it
//! did not make.
//!
//! A worker thread of the run sends its worker process one call at a time
//! and waits for the reply, so the oracle's ticks bracket each call as they
//! do in the library's run.

mod worker;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use filemap::ReadaheadMode;
use filemap::{Mapping, PageCache, Volume};
use filemap_fuse::{MountOptions, Mounted};

use crate::run::{Copied, Ops};
use crate::{naming, OpKind, TortureConfig};
pub use worker::serve_worker;
use worker::{Call, Request, REPLY_BYTES};

/// The argument that makes a worker program serve as a torture worker:
/// `PROGRAM torture-worker DIR FILES PAGES` must call [`serve_worker`] with
/// `DIR`, `FILES` and `PAGES` (as the `filemap` command does).
pub const WORKER_ARG: &str = "torture-worker";

/// How a run goes through a mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSettings {
    /// The program each worker process runs, with [`WORKER_ARG`] first.
    pub worker: PathBuf,
    /// Files opened with the kernel's page cache in front of filemap's
    /// ([`MountOptions::kernel_cache`]).
    pub kernel_cache: bool,
    /// When the mounted cache reads ahead ([`MountOptions::readahead_mode`]).
    pub readahead: ReadaheadMode,
}

impl MountSettings {
    /// What the report calls this way through: `mount` or
    /// `mount+kernel-cache`, with `+readahead-backend-bound` where it reads
    /// ahead only while the backend is the slower part (not the mount's
    /// default).
    pub fn name(&self) -> &'static str {
        match (self.kernel_cache, self.readahead) {
            (false, ReadaheadMode::Always) => "mount",
            (true, ReadaheadMode::Always) => "mount+kernel-cache",
            (false, ReadaheadMode::BackendBound) => "mount+readahead-backend-bound",
            (true, ReadaheadMode::BackendBound) => "mount+kernel-cache+readahead-backend-bound",
        }
    }
}

/// The run's volume mounted in a temporary directory.
pub(crate) struct Mount {
    mounted: Option<Mounted>,
    dir: tempfile::TempDir,
}

impl Mount {
    /// Mounts `volume` with the run's cache settings; the worker processes
    /// are served by as many threads as there are workers.
    pub(crate) fn new(
        volume: Arc<Volume>,
        config: &TortureConfig,
        settings: &MountSettings,
    ) -> io::Result<Mount> {
        let dir = tempfile::Builder::new()
            .prefix("filemap-torture-")
            .tempdir()
            .map_err(naming("a temporary mount point"))?;
        let options = MountOptions {
            budget_bytes: config.cache_bytes,
            strategy: config.strategy,
            threads: config.threads.max(2),
            kernel_cache: settings.kernel_cache,
            readahead_mode: settings.readahead,
            ..MountOptions::default()
        };
        // Named by this process, so that a mount left behind by a run that
        // was killed says whose it was.
        let source = format!("filemap-torture:{}", std::process::id());
        let mounted = filemap_fuse::mount_volume(volume, Path::new(&source), dir.path(), &options)?;
        Ok(Mount {
            mounted: Some(mounted),
            dir,
        })
    }

    /// The cache every file of the mount is a mapping of.
    pub(crate) fn cache(&self) -> Arc<PageCache> {
        self.mounted
            .as_ref()
            .expect("mounted until dropped")
            .cache()
            .clone()
    }

    /// Starts a worker process on the mount's files.
    /// Starts a worker process on the mount's files; `files` are the
    /// library's mappings of the same files.
    pub(crate) fn worker(
        &self,
        config: &TortureConfig,
        settings: &MountSettings,
        files: &[Arc<Mapping>],
    ) -> io::Result<ThroughMount> {
        let mut child = Command::new(&settings.worker)
            .arg(WORKER_ARG)
            .arg(self.dir.path())
            .arg(config.files.to_string())
            .arg(config.pages_per_file.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(naming(settings.worker.display()))?;
        let input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        Ok(ThroughMount {
            child,
            input: Some(input),
            output,
            lost: false,
            library: files.to_vec(),
            zeroes: 0,
            kernel_cache: settings.kernel_cache,
        })
    }

    /// Unmounts, syncing everything; every worker must have ended.
    pub(crate) fn unmount(mut self) -> io::Result<()> {
        self.mounted
            .take()
            .expect("mounted until dropped")
            .unmount()
    }
}

/// A worker process, and the pipes of its calls.
pub(crate) struct ThroughMount {
    child: Child,
    input: Option<ChildStdin>,
    output: ChildStdout,
    /// The process ended or its pipe broke: no call reaches it any more.
    lost: bool,
    /// The library's mappings of the files, for the punches and zero ranges
    /// made beside the mount.
    library: Vec<Arc<Mapping>>,
    /// Punches and zero ranges so far: every other one goes to the library.
    zeroes: u64,
    /// The kernel's page cache is in front ([`MountSettings::kernel_cache`]).
    kernel_cache: bool,
}

impl ThroughMount {
    /// Sends `request` (with `data` to write) and waits for its reply; the
    /// bytes read land in `buf`. Returns their count.
    fn call(&mut self, request: Request, data: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        if self.lost {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the worker process is gone",
            ));
        }
        match self.exchange(request, data, buf) {
            Ok(answer) => answer,
            Err(broken) => {
                self.lost = true;
                let status = self.finish();
                Err(io::Error::new(
                    broken.kind(),
                    format!("the worker process failed ({status}): {broken}"),
                ))
            }
        }
    }

    /// One request and its reply: fails if the pipe does, else returns the
    /// call's own outcome.
    fn exchange(
        &mut self,
        request: Request,
        data: &[u8],
        buf: &mut [u8],
    ) -> io::Result<io::Result<usize>> {
        let input = self.input.as_mut().expect("open until finished");
        input.write_all(&request.encode())?;
        if request.call.sends_data() {
            input.write_all(data)?;
        }
        input.flush()?;
        let mut reply = [0u8; REPLY_BYTES];
        self.output.read_exact(&mut reply)?;
        let errno = u32::from_le_bytes(reply[..4].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(reply[4..].try_into().expect("4 bytes")) as usize;
        if request.call.returns_data() {
            if count > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a reply too long",
                ));
            }
            self.output.read_exact(&mut buf[..count])?;
        }
        Ok(match errno {
            0 => Ok(count),
            errno => Err(io::Error::from_raw_os_error(errno as i32)),
        })
    }

    /// Ends the process (at the end of its input) and says how it ended.
    fn finish(&mut self) -> String {
        drop(self.input.take());
        match self.child.wait() {
            Ok(status) => status.to_string(),
            Err(error) => format!("not waited for: {error}"),
        }
    }

    /// A call that carries no bytes either way.
    fn simple(&mut self, call: Call, file: usize, offset: u64, len: u64) -> io::Result<()> {
        self.call(Request::new(call, file, offset, len), &[], &mut [])
            .map(drop)
    }
}

impl Drop for ThroughMount {
    fn drop(&mut self) {
        if !self.lost {
            self.finish();
        }
    }
}

impl Ops for ThroughMount {
    fn read(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> io::Result<usize> {
        let call = if direct { Call::ReadDirect } else { Call::Read };
        self.call(Request::new(call, file, offset, buf.len()), &[], buf)
    }

    fn write(&mut self, file: usize, offset: u64, data: &[u8], direct: bool) -> io::Result<()> {
        let call = if direct {
            Call::WriteDirect
        } else {
            Call::Write
        };
        let request = Request::new(call, file, offset, data.len());
        self.call(request, data, &mut []).map(drop)
    }

    fn read_vectored(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        cuts: &[usize],
    ) -> io::Result<usize> {
        let request = Request::new(Call::ReadVectored, file, offset, buf.len()).with_cuts(cuts);
        self.call(request, &[], buf)
    }

    fn write_vectored(
        &mut self,
        file: usize,
        offset: u64,
        data: &[u8],
        cuts: &[usize],
    ) -> io::Result<()> {
        let request = Request::new(Call::WriteVectored, file, offset, data.len()).with_cuts(cuts);
        self.call(request, data, &mut []).map(drop)
    }

    fn zero(&mut self, file: usize, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.zeroes += 1;
        if self.zeroes % 2 == 0 {
            // A change the kernel did not make: the mount must tell it, or
            // the workers' maps (and its cache, if in front) keep old pages.
            let mapping = &self.library[file];
            return match punch {
                true => mapping.punch_hole(offset, len),
                false => mapping.zero_range(offset, len),
            };
        }
        let call = if punch { Call::Punch } else { Call::Zero };
        self.simple(call, file, offset, len)
    }

    fn next_zero_is_kernel_fallocate(&self) -> bool {
        // Every other one goes to the library (see `zero`).
        (self.zeroes + 1) % 2 == 1
    }

    fn set_len(&mut self, file: usize, len: u64) -> io::Result<()> {
        self.simple(Call::SetLen, file, 0, len)
    }

    fn readahead(&mut self, file: usize, offset: u64, len: u64) -> io::Result<()> {
        self.simple(Call::Readahead, file, offset, len)
    }

    fn sync(&mut self, file: usize, range: Option<(u64, u64)>) -> io::Result<()> {
        // `fdatasync` for a range: FUSE passes no range.
        match range {
            Some((offset, len)) => self.simple(Call::SyncRange, file, offset, len),
            None => self.simple(Call::SyncAll, file, 0, 0),
        }
    }

    fn map_read(&mut self, file: usize, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        let request = Request::new(Call::MapRead, file, offset as u64, buf.len());
        self.call(request, &[], buf).map(drop)
    }

    fn map_write(&mut self, file: usize, offset: usize, data: &[u8]) -> io::Result<()> {
        let request = Request::new(Call::MapWrite, file, offset as u64, data.len());
        self.call(request, data, &mut []).map(drop)
    }

    fn map_loads_are_validated(&self) -> bool {
        false
    }

    fn makes(&self, kind: OpKind) -> bool {
        // The mount has no pins, and a pin of the library beside it reads
        // the cache, not the stores that the workers' maps hold in the
        // kernel's pages until they are written back (as a read of a disk
        // does beside a mounted file system).
        kind != OpKind::Pin
    }

    fn buffered_reads_copied(&self) -> Copied {
        match self.kernel_cache {
            true => Copied::KernelCache,
            false => Copied::Atomically,
        }
    }

    fn is_lost(&self) -> bool {
        self.lost
    }
}
