//! userfaultfd, eventfd and `PAGEMAP_SCAN`: thin wrappers over the kernel
//! interfaces the memory maps are built on. `map/mod.rs` records what the kernel
//! does with them; the tests in `uffd/tests.rs` prove it on the running kernel.
//!
//! - `uapi`: the request numbers, flags and structures (neither libc nor rustix
//!   declares them) and the `ioctl` calls that pass them;
//! - `userfaultfd`: [`Userfaultfd`] and the [`Event`]s read from it;
//! - `wait`: [`wait_readable`] and the [`EventFd`] that stops it;
//! - `pagemap`: [`pagemap_scan`] and [`scan_written`].
//!
//! # Safety
//! The `unsafe` here is `ioctl` calls, `userfaultfd` and the raw `tgkill`
//! syscall (and, in the tests, accesses to views and a `fork`). Each
//! ioctl is given a pointer to a live, exclusively borrowed `#[repr(C)]` value of
//! exactly the structure its request number encodes, so the kernel reads and
//! writes only that value. The addresses *inside* those structures (ranges to
//! register, copy, wake or scan) are checked by the kernel against the calling
//! process's mappings; they can only affect memory the caller mapped for
//! userfaultfd (a [`View`](super::memfd::View)), never memory Rust owns, with one
//! exception: the source of [`Userfaultfd::copy`], which the kernel reads and so
//! must be readable (that method is `unsafe` for it).
#![allow(unsafe_code)]

mod pagemap;
mod uapi;
mod userfaultfd;
mod wait;

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // ranges of pages, on purpose
mod tests;

pub(crate) use pagemap::scan_written;
pub(crate) use userfaultfd::{send_sigbus, Event, Userfaultfd};
pub(crate) use wait::{wait_readable, EventFd, Readiness};

// The rest of this module's interface: the kernel's feature bits and page
// categories, the feature probe and the general scan. The tests name them;
// the crate does not yet name them all.
#[allow(unused_imports)]
pub(crate) use {
    pagemap::pagemap_scan,
    uapi::{
        FEATURE_MINOR_SHMEM, FEATURE_MISSING_SHMEM, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_POISON,
        FEATURE_THREAD_ID, FEATURE_WP_ASYNC, FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED,
        PAGE_IS_PRESENT, PAGE_IS_WRITTEN, WANTED_FEATURES,
    },
    userfaultfd::available_features,
};
