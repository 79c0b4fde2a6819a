//! What the tests of `filemap mount` share: a formatted image with a mount
//! point, a server mounted with the `filemap` binary that never outlives its
//! test (a guard that unmounts), and a seeded random source.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        let child = filemap()
            .args([
                "mount",
                self.image().to_str().unwrap(),
                self.mnt().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("filemap runs");
        let mut server = Server {
            child,
            mnt: self.mnt(),
            ended: false,
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

/// A running `filemap mount`. Dropped without [`Server::stop`] or
/// [`Server::kill`] (a test failed), it is killed and its mount detached, so
/// a failed test leaves no mount behind.
pub struct Server {
    child: Child,
    mnt: PathBuf,
    /// Waited for: nothing left for the guard to do.
    ended: bool,
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
            None => {
                run("umount", &[self.mnt.to_str().unwrap()]);
            }
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
