//! The userfaultfd: opening it, its handshake, registering ranges, resolving
//! faults (`UFFDIO_COPY`, `UFFDIO_CONTINUE`, `UFFDIO_WAKE`), write protection
//! and reading its fault events.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use rustix::io::Errno;
use rustix::mm::UserfaultfdFlags;

use super::uapi::{
    ioctl, ioctl_value, UffdioApi, UffdioContinue, UffdioCopy, UffdioRange, UffdioRegister,
    UffdioWriteprotect, FEATURE_MINOR_SHMEM, FEATURE_WP_ASYNC, FEATURE_WP_HUGETLBFS_SHMEM,
    UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_CONTINUE_AVAILABLE, UFFDIO_CONTINUE_MODE_WP, UFFDIO_COPY,
    UFFDIO_COPY_AVAILABLE, UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP,
    UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_MODE_WP, UFFD_API,
    UFFD_EVENT_PAGEFAULT, UFFD_MSG_SIZE, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE, USERFAULTFD_IOC_NEW, WANTED_FEATURES,
};

/// A fault read from a [`Userfaultfd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A touch of a page absent from the file, through a view registered
    /// MISSING. `addr` is page-aligned; `write` says the access was a store;
    /// `thread` is the faulting thread's id (0 without `UFFD_FEATURE_THREAD_ID`).
    Missing {
        addr: usize,
        write: bool,
        thread: u32,
    },
    /// A touch of a page the file has but the view does not map, through a
    /// view registered MINOR (fields as for `Missing`).
    Minor {
        addr: usize,
        write: bool,
        thread: u32,
    },
    /// A store to a write-protected page (only without `WP_ASYNC`, which
    /// resolves these in the kernel).
    WriteProtect { addr: usize },
    /// Any other message (events of features not requested).
    Other,
}

/// A userfaultfd (`O_CLOEXEC | O_NONBLOCK`), after its `UFFDIO_API` handshake.
///
/// Closing it (drop) unregisters every range registered through it and wakes
/// the threads blocked in its faults: they retry as if the range had never been
/// registered, so a touch of an absent page then allocates a zero page. Keep the
/// userfaultfd alive as long as its views.
#[derive(Debug)]
pub(crate) struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

impl Userfaultfd {
    /// `ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW, O_CLOEXEC |
    /// O_NONBLOCK)`, or `userfaultfd(O_CLOEXEC | O_NONBLOCK)` when the device
    /// cannot be opened; then `ioctl(uffd, UFFDIO_API, &uffdio_api)` asking for
    /// [`WANTED_FEATURES`] & what the kernel offers.
    ///
    /// Faults taken by the kernel on behalf of a syscall (a `write` whose
    /// buffer is in a view) are handled like user faults: `UFFD_USER_MODE_ONLY`
    /// is never used, since it would make such syscalls fail with `EFAULT`.
    /// The kernel's offer is probed once per process on a throwaway
    /// userfaultfd (`UFFDIO_API` fails with `EINVAL` when asked for a feature it
    /// lacks, and a userfaultfd gets one handshake).
    pub fn new() -> io::Result<Self> {
        Self::with_features(WANTED_FEATURES & available_features()?)
    }

    /// Like [`Userfaultfd::new`], asking for exactly `features`
    /// (`UFFD_FEATURE_*` bits; `EINVAL` if the kernel lacks one).
    pub fn with_features(features: u64) -> io::Result<Self> {
        let fd = open_userfaultfd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which holds no address.
        unsafe { ioctl(fd.as_fd(), UFFDIO_API, &mut api) }?;
        Ok(Self { fd, features })
    }

    /// The `UFFD_FEATURE_*` bits granted at the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether `UFFD_FEATURE_WP_ASYNC` was granted (with it, the shmem
    /// write-protect features it needs).
    pub fn has_wp_async(&self) -> bool {
        let needed = FEATURE_WP_ASYNC | FEATURE_WP_HUGETLBFS_SHMEM;
        self.features & needed == needed
    }

    /// Whether stores through a view can be both tracked and held back: write
    /// protection in the asynchronous mode plus MINOR faults on shmem, for
    /// [`Userfaultfd::register_store_trap`].
    pub fn has_store_trap(&self) -> bool {
        self.has_wp_async() && self.features & FEATURE_MINOR_SHMEM != 0
    }

    /// `ioctl(uffd, UFFDIO_REGISTER, &uffdio_register)` with
    /// `UFFDIO_REGISTER_MODE_MISSING`, plus `UFFDIO_REGISTER_MODE_WP` if
    /// `write_protect`. `addr` and `len` are page-aligned and cover whole
    /// mappings of shmem (or parts of them: the kernel splits the mapping).
    /// Fails with `EINVAL` if the kernel would not allow `UFFDIO_COPY` there.
    pub fn register(&self, addr: usize, len: usize, write_protect: bool) -> io::Result<()> {
        let wp = if write_protect {
            UFFDIO_REGISTER_MODE_WP
        } else {
            0
        };
        self.register_modes(addr, len, UFFDIO_REGISTER_MODE_MISSING | wp)
    }

    /// [`Userfaultfd::register`] with `MISSING | WP | MINOR`: besides MISSING
    /// faults, stores are tracked (asynchronous WP) and a touch of a page the
    /// file has but the view does not map raises a MINOR fault, which
    /// [`Userfaultfd::continue_pages`] resolves. So after the view's entries for
    /// a page are zapped ([`crate::map::memfd::zap`]), no store reaches that page
    /// through the view until the handler lets it. Needs
    /// [`Userfaultfd::has_store_trap`].
    pub fn register_store_trap(&self, addr: usize, len: usize) -> io::Result<()> {
        self.register_modes(
            addr,
            len,
            UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR,
        )
    }

    fn register_modes(&self, addr: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; the range
        // in it is checked by the kernel against our mappings and only changes
        // how faults in it are handled.
        unsafe { ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg) }?;
        let needed = UFFDIO_COPY_AVAILABLE
            | if mode & UFFDIO_REGISTER_MODE_MINOR != 0 {
                UFFDIO_CONTINUE_AVAILABLE
            } else {
                0
            };
        if reg.ioctls & needed != needed {
            let _ = self.unregister(addr, len);
            return Err(Errno::INVAL.into());
        }
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_UNREGISTER, &uffdio_range)`. Threads blocked in
    /// faults of the range are woken and retry unregistered.
    pub fn unregister(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut range = range(addr, len);
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`; the kernel
        // checks the range against our mappings.
        unsafe { ioctl(self.fd.as_fd(), UFFDIO_UNREGISTER, &mut range) }?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_COPY, &uffdio_copy)`: allocates pages, copies `len`
    /// bytes from `src` into them and installs them at `dst..dst + len` (page-
    /// aligned, inside one registered range of this userfaultfd), with
    /// `UFFDIO_COPY_MODE_WP` if `write_protect` (the range must be registered
    /// with write protection) and `UFFDIO_COPY_MODE_DONTWAKE` if `!wake`.
    ///
    /// On shmem the page goes into the file, so every view and `pread` see it;
    /// the write-protect bit applies to `dst`'s mapping only. Returns the bytes
    /// copied: `len`, or a positive short count if a later page failed (the
    /// copied part is woken unless `!wake`; retry the rest to learn why).
    /// Errors: `EEXIST` if the first page is already in the file (the copy is
    /// "install if absent"); `ENOENT` if `dst` is not registered here; `EFAULT`
    /// past the end of the file; `EAGAIN` (`ErrorKind::WouldBlock`) if the
    /// address space is changing under a pending event (read the events, then
    /// retry). A failure wakes no one: [`Userfaultfd::wake`] after one.
    ///
    /// # Safety
    /// `src..src + len` must be readable for the duration of the call. (A
    /// fault on it is not undefined behaviour for the kernel, which returns
    /// `EFAULT`, but `src` must not be memory another thread of this process
    /// is allowed to be writing without synchronisation.)
    pub unsafe fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        write_protect: bool,
        wake: bool,
    ) -> io::Result<usize> {
        let mut arg = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: if write_protect {
                UFFDIO_COPY_MODE_WP
            } else {
                0
            } | if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`. The kernel reads
        // `src..src + len`, readable by the caller's contract, and writes only
        // into newly allocated pages that it installs at `dst` if `dst` lies in
        // a range registered with this userfaultfd (our views), never into
        // memory Rust owns.
        match unsafe { ioctl(self.fd.as_fd(), UFFDIO_COPY, &mut arg) } {
            Ok(_) => Ok(len),
            // A partial copy fails with EAGAIN but reports the bytes copied.
            Err(_) if arg.copy > 0 => Ok(arg.copy as usize),
            Err(e) => Err(e),
        }
    }

    /// `ioctl(uffd, UFFDIO_CONTINUE, &uffdio_continue)` with
    /// `UFFDIO_CONTINUE_MODE_WP`: maps the pages the file already has at
    /// `addr..addr + len` (page-aligned, in a range registered MINOR) into that
    /// view, write-protected so that stores stay tracked, and wakes the range.
    /// Returns the bytes mapped: `len`, or a positive short count if a later
    /// page failed. Errors: `EEXIST` if the first page is already mapped there;
    /// `EFAULT` if the file does not have it (it was punched: wake the range, and
    /// the toucher's retry faults MISSING). A failure wakes no one.
    pub fn continue_pages(&self, addr: usize, len: usize) -> io::Result<usize> {
        let mut arg = UffdioContinue {
            range: range(addr, len),
            mode: UFFDIO_CONTINUE_MODE_WP,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue`; it maps
        // pages the memfd already holds into our registered range only.
        match unsafe { ioctl(self.fd.as_fd(), UFFDIO_CONTINUE, &mut arg) } {
            Ok(_) => Ok(len),
            Err(_) if arg.mapped > 0 => Ok(arg.mapped as usize),
            Err(e) => Err(e),
        }
    }

    /// `ioctl(uffd, UFFDIO_WAKE, &uffdio_range)`: wakes the threads blocked in
    /// faults of the range, which retry their access.
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut range = range(addr, len);
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range` and only wakes
        // waiters on this userfaultfd.
        unsafe { ioctl(self.fd.as_fd(), UFFDIO_WAKE, &mut range) }?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_WRITEPROTECT, &uffdio_writeprotect)`: sets (or
    /// clears, which also wakes) write protection on a range registered with
    /// it. On shmem, setting it also marks unpopulated ptes, so a page mapped
    /// there later starts protected.
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: range(addr, len),
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`;
        // it changes page-table protection of our registered range only.
        unsafe { ioctl(self.fd.as_fd(), UFFDIO_WRITEPROTECT, &mut arg) }?;
        Ok(())
    }

    /// `read(uffd, buf, n * sizeof(struct uffd_msg))`, repeated until no
    /// message is pending; `out` is cleared first. Returns the number of events
    /// read, 0 when none is pending. Each fault is read once: a thread that
    /// faults again after being woken produces a new event.
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        out.clear();
        let mut buf = [0u8; UFFD_MSG_SIZE * 64];
        loop {
            let n = match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) => n,
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for msg in buf[..n].chunks_exact(UFFD_MSG_SIZE) {
                out.push(parse_msg(msg));
            }
            if n < buf.len() {
                break;
            }
        }
        Ok(out.len())
    }

    /// The userfaultfd, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange {
        start: addr as u64,
        len: len as u64,
    }
}

fn parse_msg(msg: &[u8]) -> Event {
    let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
    if msg[0] != UFFD_EVENT_PAGEFAULT {
        return Event::Other;
    }
    let (flags, addr) = (word(8), word(16) as usize);
    let write = flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
    // `pagefault.feat.ptid`, right after the address.
    let thread = u32::from_ne_bytes(msg[24..28].try_into().expect("4 bytes"));
    if flags & UFFD_PAGEFAULT_FLAG_MINOR != 0 {
        Event::Minor {
            addr,
            write,
            thread,
        }
    } else if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
        Event::WriteProtect { addr }
    } else {
        Event::Missing {
            addr,
            write,
            thread,
        }
    }
}

/// A new userfaultfd before its handshake.
fn open_userfaultfd() -> io::Result<OwnedFd> {
    let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    if let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
        // new file descriptor; no memory is passed.
        let fd = unsafe { ioctl_value(dev.as_fd(), USERFAULTFD_IOC_NEW, flags.bits() as usize) };
        if let Ok(fd) = fd {
            // SAFETY: the ioctl returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: userfaultfd(2) takes flags by value and returns a new descriptor;
    // what the descriptor can do to our memory is what the methods of
    // `Userfaultfd` allow, each under its own proof.
    Ok(unsafe { rustix::mm::userfaultfd(flags) }?)
}

/// `tgkill(getpid(), thread, SIGBUS)`: what the kernel does to a thread that
/// touches a page of a file map wholly past the end of file. Without a handler
/// the process dies, as it would with a real file map.
pub(crate) fn send_sigbus(thread: u32) -> io::Result<()> {
    let pid = std::process::id() as libc::pid_t;
    // libc: rustix has no tgkill (only its unstable runtime API has `tkill`).
    // SAFETY: tgkill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, thread as libc::pid_t, libc::SIGBUS) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `UFFD_FEATURE_*` bits the kernel offers, probed once per process:
/// `UFFDIO_API` with no feature requested on a throwaway userfaultfd answers
/// with every feature the kernel has.
pub(crate) fn available_features() -> io::Result<u64> {
    static AVAILABLE: OnceLock<u64> = OnceLock::new();
    if let Some(&f) = AVAILABLE.get() {
        return Ok(f);
    }
    let fd = open_userfaultfd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which holds no address.
    unsafe { ioctl(fd.as_fd(), UFFDIO_API, &mut api) }?;
    Ok(*AVAILABLE.get_or_init(|| api.features))
}
