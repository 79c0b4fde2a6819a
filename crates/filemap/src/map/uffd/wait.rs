//! Waiting for a userfaultfd: `poll` on it beside an eventfd that stops the
//! wait.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

/// What [`wait_readable`] found readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// The waited-on descriptor (a userfaultfd: events are pending, or it is
    /// in an error state that a read reports). Reported first when both are
    /// readable, so pending faults are served before a stop is seen.
    Fd,
    /// The stop descriptor (an [`EventFd`]), and not the other.
    Wake,
}

/// `poll([fd, wake_fd], POLLIN, timeout)`, retried on `EINTR`: blocks until
/// `fd` or `wake_fd` is readable (or in error) and says which; `fd` wins when
/// both are. Fails with `ErrorKind::TimedOut` when `timeout` passes first
/// (`None`: wait forever).
pub(crate) fn wait_readable(
    fd: BorrowedFd<'_>,
    wake_fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        // The time left, to the nanosecond (rustix polls with `ppoll`);
        // saturated, though the seconds of an `Instant` always fit.
        let left = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        let mut fds = [
            PollFd::from_borrowed_fd(fd, PollFlags::IN),
            PollFd::from_borrowed_fd(wake_fd, PollFlags::IN),
        ];
        let n = match rustix::event::poll(&mut fds, left.as_ref()) {
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let ready = |p: &PollFd<'_>| {
            p.revents()
                .intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP)
        };
        if ready(&fds[0]) {
            return Ok(Readiness::Fd);
        } else if ready(&fds[1]) {
            return Ok(Readiness::Wake);
        } else if n == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
}

/// An eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`), used to stop threads waiting in
/// [`wait_readable`].
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    pub fn new() -> io::Result<Self> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    /// `write(efd, &1u64, 8)`: makes the eventfd readable until drained. A
    /// full counter (`EAGAIN`) is already readable, so it is not an error.
    pub fn signal(&self) -> io::Result<()> {
        loop {
            match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `read(efd, &mut u64, 8)`: resets the counter; returns the sum of the
    /// signals since the last drain (0 if none).
    pub fn drain(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(_) => return Ok(u64::from_ne_bytes(buf)),
                Err(Errno::AGAIN) => return Ok(0),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The eventfd, for [`wait_readable`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
