//! What the tests of `filemap mount` share: a formatted image with a mount
//! point, a server mounted with the `filemap` binary that never outlives its
//! test (a guard that unmounts), and a seeded random source.

// Each test file uses its own part of this module.
#![allow(dead_code)]

pub mod map;
pub mod programs;

use std::cell::Cell;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

pub fn filemap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_filemap"))
}

/// Runs `program` with `args`; panics with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program} cannot run here: {error}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = mountpoint.to_str().expect("a UTF-8 path");
    mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted))
}

/// A formatted image and a mount point in a temporary directory.
pub struct Image {
    pub dir: tempfile::TempDir,
}

impl Image {
    pub fn new(size: &str) -> Image {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
        let image = dir.path().join("volume.img");
        let out = filemap()
            .args(["format", image.to_str().unwrap(), "--size", size])
            .output()
            .expect("filemap runs");
        assert!(
            out.status.success(),
            "format: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Image { dir }
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("volume.img")
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn at(&self, name: &str) -> String {
        self.mnt().join(name).to_str().unwrap().to_owned()
    }

    /// Mounts the image; the server runs until [`Server::stop`] or
    /// [`Server::kill`], or until the guard is dropped.
    pub fn mount(&self) -> Server {
        self.mount_with(&[])
    }

    /// Mounts the image with `filemap mount`'s options `options` too.
    pub fn mount_with(&self, options: &[&str]) -> Server {
        let mut command = filemap();
        command
            .args([
                "mount",
                self.image().to_str().unwrap(),
                self.mnt().to_str().unwrap(),
            ])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A test process that dies where no guard runs (a signal, an abort)
        // must not leave its mount served: the server gets SIGTERM, which
        // unmounts. (Sent when the thread that spawned it ends: each server
        // is ended by its test's thread before that.)
        // SAFETY: runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: prctl(2) is one, and the
        // closure allocates nothing.
        unsafe {
            command.pre_exec(
                || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                },
            );
        }
        let child = command.spawn().expect("filemap runs");
        let mut server = Server {
            child,
            mnt: self.mnt(),
            ended: false,
            slot: register_mount(&self.mnt()),
        };
        let started = Instant::now();
        while !is_mounted(&server.mnt) {
            if let Some(status) = server.child.try_wait().expect("wait") {
                server.ended = true;
                panic!(
                    "filemap mount could not mount ({status}): {}",
                    server.stderr()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not mounted after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

/// A host directory `src` and a mount point `mnt` in a temporary directory,
/// for `filemap mount --passthrough`.
pub struct HostDir {
    pub dir: tempfile::TempDir,
}

impl HostDir {
    pub fn new() -> HostDir {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(dir.path().join("src")).expect("source directory");
        std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
        HostDir { dir }
    }

    pub fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// `name` on the mount.
    pub fn at(&self, name: &str) -> String {
        self.mnt().join(name).to_str().unwrap().to_owned()
    }

    /// `name` in the host directory itself.
    pub fn host(&self, name: &str) -> String {
        self.src().join(name).to_str().unwrap().to_owned()
    }

    /// Mounts `src` with `--passthrough`; the server runs until
    /// [`Server::stop`] or [`Server::kill`], or until the guard is dropped.
    pub fn mount(&self) -> Server {
        let mut command = filemap();
        command
            .args([
                "mount",
                "--passthrough",
                self.src().to_str().unwrap(),
                self.mnt().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // As in `Image::mount`: the server ends with the thread that spawned it.
        // SAFETY: runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: prctl(2) is one, and the
        // closure allocates nothing.
        unsafe {
            command.pre_exec(
                || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                },
            );
        }
        let child = command.spawn().expect("filemap runs");
        let mut server = Server {
            child,
            mnt: self.mnt(),
            ended: false,
            slot: register_mount(&self.mnt()),
        };
        let started = Instant::now();
        while !is_mounted(&server.mnt) {
            if let Some(status) = server.child.try_wait().expect("wait") {
                server.ended = true;
                panic!(
                    "filemap mount --passthrough could not mount ({status}): {}",
                    server.stderr()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not mounted after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

/// A running `filemap mount`. Dropped without [`Server::stop`] or
/// [`Server::kill`] (a test failed), it is killed and its mount detached, so
/// a failed test leaves no mount behind.
pub struct Server {
    child: Child,
    mnt: PathBuf,
    /// Waited for: nothing left for the guard to do.
    ended: bool,
    /// Its entry in `MOUNTS`.
    slot: usize,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr, to its end (it has exited or is
    /// exiting).
    fn stderr(&mut self) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        stderr
    }

    /// Ends the server by `signal` (or by `umount` if `None`) and checks that
    /// it exits 0, unmounted.
    pub fn stop(mut self, signal: Option<&str>) {
        match signal {
            Some(signal) => {
                run(
                    "kill",
                    &[&format!("-{signal}"), &self.child.id().to_string()],
                );
            }
            None => umount(&self.mnt),
        }
        let stderr = self.stderr();
        let status = self.child.wait().expect("wait");
        self.ended = true;
        assert!(status.success(), "the server exited {status}: {stderr}");
        assert!(
            !is_mounted(&self.mnt),
            "still mounted after the server ended"
        );
    }

    /// Kills the server with SIGKILL, as a crash would, and cleans up the
    /// dead mount it leaves ("Transport endpoint is not connected"): `umount`,
    /// or a lazy one while something still holds a file of it. Returns what
    /// the server had written to stderr.
    pub fn kill(mut self) -> String {
        run("kill", &["-KILL", &self.child.id().to_string()]);
        let stderr = self.stderr();
        let status = self.child.wait().expect("wait");
        self.ended = true;
        assert!(
            status.code().is_none(),
            "the server exited {status} instead of being killed: {stderr}"
        );
        detach(&self.mnt);
        stderr
    }
}

impl Server {
    /// Kills the server with SIGKILL and leaves its dead mount in place, for
    /// a test of what a dead mount point does; the caller unmounts it.
    pub fn kill_leaving_a_dead_mount(mut self) {
        run("kill", &["-KILL", &self.child.id().to_string()]);
        self.child.wait().expect("wait");
        self.ended = true;
    }
}

/// `umount mnt`, as a user would type it; panics with its output unless it
/// succeeds. "Target is busy" is tried again for a while: tests run side by
/// side in one process, and a child another test spawns holds a copy of
/// every descriptor of the process between its fork and its exec, this
/// test's last file on the mount included.
pub fn umount(mnt: &Path) {
    let path = mnt.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("umount")
            .arg(path)
            .output()
            .expect("umount cannot run here");
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("busy") && Instant::now() < deadline,
            "umount {path}: {stderr}"
        );
        eprintln!("umount {path}: busy, trying again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts `mnt` if it is mounted: `umount`, else `umount -l`. Panics if it
/// stays mounted.
fn detach(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    let path = mnt.to_str().unwrap();
    let plain = Command::new("umount").arg(path).output();
    if is_mounted(mnt) {
        let lazy = Command::new("umount").args(["-l", path]).output();
        assert!(
            !is_mounted(mnt),
            "{path} stays mounted: umount said {plain:?}, umount -l said {lazy:?}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        MOUNTS[self.slot].store(std::ptr::null_mut(), Ordering::Relaxed);
        if self.ended {
            return;
        }
        // A test failed with the server running: SIGKILL aborts the
        // connection, so nothing blocked on the mount can hang, and the dead
        // mount is detached. Nothing here may panic again.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.mnt) {
            let path = self.mnt.to_str().unwrap_or_default();
            let _ = Command::new("umount").arg(path).output();
            if is_mounted(&self.mnt) {
                let _ = Command::new("umount").args(["-l", path]).output();
            }
        }
    }
}

/// A small seeded random source (SplitMix64): the same seed gives the same
/// sequence on every machine, so a failure's seed replays it.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..end` (`end` > 0).
    pub fn below(&mut self, end: u64) -> u64 {
        assert!(end > 0, "an empty range");
        self.u64() % end
    }

    /// A number in `start..end` (`end` > `start`).
    pub fn within(&mut self, start: u64, end: u64) -> u64 {
        start + self.below(end - start)
    }

    /// True once in `n` draws.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// Fills `buf` with bytes, none of them zero (so a byte that reads zero
    /// was zeroed, never written).
    pub fn fill_nonzero(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.u64().to_le_bytes();
            for (byte, random) in chunk.iter_mut().zip(word) {
                *byte = random | 1;
            }
        }
    }
}

/// The mount points of this process's servers, for the SIGBUS handler, which
/// may neither allocate nor lock. Each string is leaked on purpose: a handler
/// on another thread may be reading it when its server ends.
static MOUNTS: [AtomicPtr<libc::c_char>; 64] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 64];

/// Enters `mnt` in a free slot of `MOUNTS`; the slot's number.
fn register_mount(mnt: &Path) -> usize {
    let path = CString::new(mnt.as_os_str().as_bytes()).expect("a path without NUL");
    let path = CString::into_raw(path);
    for (slot, entry) in MOUNTS.iter().enumerate() {
        let free = std::ptr::null_mut();
        if entry
            .compare_exchange(free, path, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return slot;
        }
    }
    panic!("more than {} servers at once", MOUNTS.len());
}

// A SIGBUS (a load or store through a map of the mount that the mount could
// not serve) ends the process with no word of what the test was doing, and
// where no guard runs: a handler prints the faulting thread's note first, and
// detaches this process's mounts.
thread_local! {
    /// The note of this thread's test: a pointer and a length into the
    /// `Note` that owns the text, or null.
    static NOTE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// What a SIGBUS on this thread reports (the test, its step, how to replay
/// it); cleared when dropped.
pub struct Note {
    text: String,
}

impl Note {
    pub fn new() -> Note {
        Note {
            text: String::new(),
        }
    }

    pub fn set(&mut self, text: String) {
        self.text = text;
        NOTE.with(|note| note.set((self.text.as_ptr(), self.text.len())));
    }
}

impl Drop for Note {
    fn drop(&mut self) {
        NOTE.with(|note| note.set((std::ptr::null(), 0)));
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int) {
    const HEAD: &[u8] = b"\nSIGBUS: a load or store through a map of the mount faulted\n";
    let (ptr, len) = NOTE
        .try_with(|note| note.get())
        .unwrap_or((std::ptr::null(), 0));
    // SAFETY: write(2) and umount2(2) are async-signal-safe. write reads
    // `len` bytes at `ptr`: HEAD, and the note's text, which its `Note`
    // keeps alive while the pointer is set (it is changed only between map
    // accesses, and SIGBUS is raised synchronously by an access of this
    // thread). Each mount point is a NUL-terminated string never freed. The
    // handler was installed with SA_RESETHAND: returning retries the access,
    // which now ends the process by SIGBUS, and its servers with it.
    unsafe {
        libc::write(2, HEAD.as_ptr().cast(), HEAD.len());
        if !ptr.is_null() {
            libc::write(2, ptr.cast(), len);
        }
        for entry in &MOUNTS {
            let path = entry.load(Ordering::Relaxed);
            if !path.is_null() {
                libc::umount2(path, libc::MNT_DETACH);
            }
        }
    }
}

/// Installs the SIGBUS report (once per process).
pub fn install_sigbus_report() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid value, filled in before use;
        // the handler only reads a thread-local cell (const-initialised, no
        // destructor: no allocation or lock) and atomics, and makes
        // async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()),
                0,
                "sigaction"
            );
        }
    });
}
