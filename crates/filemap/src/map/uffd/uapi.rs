//! The uapi of userfaultfd and `PAGEMAP_SCAN`: request numbers, flags and
//! structures, laid out as in `linux/userfaultfd.h` and `linux/fs.h` of Linux
//! 6.18 (neither libc nor rustix declares them), and the `ioctl` calls that
//! pass them to the kernel, through `rustix::ioctl`.
//!
//! The sizes of the structures are checked at compile time against the sizes
//! encoded in the request numbers.

use std::ffi::c_void;
use std::io;
use std::os::fd::BorrowedFd;

use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};

const UFFDIO: u8 = 0xAA;
pub(super) const UFFD_API: u64 = 0xAA;
/// `_IO(USERFAULTFD_IOC, 0x00)`, on `/dev/userfaultfd`.
pub(super) const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);
pub(super) const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(UFFDIO, 0x3F);
pub(super) const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(UFFDIO, 0x00);
pub(super) const UFFDIO_UNREGISTER: Opcode = opcode::read::<UffdioRange>(UFFDIO, 0x01);
pub(super) const UFFDIO_WAKE: Opcode = opcode::read::<UffdioRange>(UFFDIO, 0x02);
pub(super) const UFFDIO_COPY: Opcode = opcode::read_write::<UffdioCopy>(UFFDIO, 0x03);
pub(super) const UFFDIO_WRITEPROTECT: Opcode =
    opcode::read_write::<UffdioWriteprotect>(UFFDIO, 0x06);
pub(super) const UFFDIO_CONTINUE: Opcode = opcode::read_write::<UffdioContinue>(UFFDIO, 0x07);
pub(super) const PAGEMAP_SCAN: Opcode = opcode::read_write::<PmScanArg>(b'f', 16);

// Checked against the C headers of this machine (gcc, linux/userfaultfd.h).
const _: () = {
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
    assert!(UFFDIO_CONTINUE == 0xc020_aa07);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
    assert!(PAGEMAP_SCAN == 0xc060_6610);
};

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub(crate) const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_THREAD_ID`: a fault names the thread that took it.
pub(crate) const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING faults on shmem (memfd) ranges.
pub(crate) const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: MINOR faults on shmem ranges (a touch of a
/// page the file has but the view does not map yet).
pub(crate) const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write protection on shmem ranges.
pub(crate) const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write protection applies to unpopulated ptes.
pub(crate) const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_POISON`: `UFFDIO_POISON`.
pub(crate) const FEATURE_POISON: u64 = 1 << 14;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself
/// (unprotects and lets the store proceed); `PAGEMAP_SCAN` reports them.
pub(crate) const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// The features [`Userfaultfd::new`](super::Userfaultfd::new) asks for, when the kernel offers them.
/// No `EVENT_*` feature: with those, `munmap`, `madvise` and `mremap` of a
/// registered range block until the handler reads the event.
pub(crate) const WANTED_FEATURES: u64 = FEATURE_MISSING_SHMEM
    | FEATURE_MINOR_SHMEM
    | FEATURE_WP_HUGETLBFS_SHMEM
    | FEATURE_WP_UNPOPULATED
    | FEATURE_WP_ASYNC
    | FEATURE_THREAD_ID;

pub(super) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub(super) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(super) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub(super) const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub(super) const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub(super) const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub(super) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `uffdio_register.ioctls`: `1 << _UFFDIO_COPY`.
pub(super) const UFFDIO_COPY_AVAILABLE: u64 = 1 << 0x03;
/// Bit of `uffdio_register.ioctls`: `1 << _UFFDIO_CONTINUE`.
pub(super) const UFFDIO_CONTINUE_AVAILABLE: u64 = 1 << 0x07;

pub(super) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub(super) const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub(super) const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub(super) const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
/// `sizeof(struct uffd_msg)`.
pub(super) const UFFD_MSG_SIZE: usize = 32;

pub(super) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(super) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;

#[repr(C)]
pub(super) struct UffdioApi {
    pub(super) api: u64,
    pub(super) features: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
pub(super) struct UffdioRange {
    pub(super) start: u64,
    pub(super) len: u64,
}

#[repr(C)]
pub(super) struct UffdioRegister {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
pub(super) struct UffdioCopy {
    pub(super) dst: u64,
    pub(super) src: u64,
    pub(super) len: u64,
    pub(super) mode: u64,
    pub(super) copy: i64,
}

#[repr(C)]
pub(super) struct UffdioContinue {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) mapped: i64,
}

#[repr(C)]
pub(super) struct UffdioWriteprotect {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
}

#[repr(C)]
pub(super) struct PmScanArg {
    pub(super) size: u64,
    pub(super) flags: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) walk_end: u64,
    pub(super) vec: u64,
    pub(super) vec_len: u64,
    pub(super) max_pages: u64,
    pub(super) category_inverted: u64,
    pub(super) category_mask: u64,
    pub(super) category_anyof_mask: u64,
    pub(super) return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct PageRegion {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) categories: u64,
}

/// `ioctl(fd, request, arg)`: the call's return value, or its errno.
///
/// # Safety
/// `T` must be the structure `request` expects on `fd` (its size is part of
/// the request number), and every address inside `*arg` must satisfy what that
/// request documents.
pub(super) unsafe fn ioctl<T>(
    fd: BorrowedFd<'_>,
    request: Opcode,
    arg: &mut T,
) -> io::Result<IoctlOutput> {
    let request = Request {
        opcode: request,
        arg: (arg as *mut T).cast(),
    };
    // SAFETY: `arg` is a live exclusive borrow of the structure the request
    // expects (caller's contract), so the kernel reads and writes only it.
    Ok(unsafe { rustix::ioctl::ioctl(fd, request) }?)
}

/// `ioctl(fd, request, value)` for a request that takes an integer by value:
/// the call's return value, or its errno.
///
/// # Safety
/// `request` must take an integer argument on `fd`, and `value` must be one it
/// accepts.
pub(super) unsafe fn ioctl_value(
    fd: BorrowedFd<'_>,
    request: Opcode,
    value: usize,
) -> io::Result<IoctlOutput> {
    let request = Request {
        opcode: request,
        arg: std::ptr::without_provenance_mut(value),
    };
    // SAFETY: the request reads its integer argument by value and touches no
    // memory through it (caller's contract).
    Ok(unsafe { rustix::ioctl::ioctl(fd, request) }?)
}

/// An ioctl request and its argument for `rustix::ioctl::ioctl`, answering the
/// call's return value: rustix's own `Updater` and `IntegerSetter` drop it,
/// and `PAGEMAP_SCAN` returns a count, `USERFAULTFD_IOC_NEW` a descriptor.
struct Request {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: a `Request` is built only by `ioctl` and `ioctl_value`, whose
// contracts make `arg` what `opcode` expects; the kernel may write through it,
// so the call is marked mutating. The output is the return value alone, read
// from nothing but the call's result.
unsafe impl Ioctl for Request {
    type Output = IoctlOutput;

    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _arg: *mut c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}
