//! filemap: a user-space page cache that stays coherent when hole punch, truncate,
//! zero range and direct I/O race with buffered reads, readahead and writes.
//!
//! The layers, outermost first (see `DESIGN.md` at the repository root):
//!
//! - [`Mapping`]: one per open file; the page index and the coherence lock. All
//!   locking lives here, so a backend cannot forget a lock.
//! - [`PageCache`]: shared frame memory under a byte budget.
//! - [`Backend`]: the address-space operations of one file: a [`Volume`] file
//!   (many files on one device) or a [`HostFile`] (one host file each).
//! - [`Device`]: block I/O ([`FileDevice`], [`MemDevice`], [`FaultyDevice`]).
//!
//! ```
//! use std::sync::Arc;
//! use filemap::{MemDevice, PageCache, Strategy, Volume};
//!
//! let volume = Volume::format(Arc::new(MemDevice::new(16 << 20)))?;
//! let cache = PageCache::builder().strategy(Strategy::Range).build()?;
//! let file = cache.open(Arc::new(volume.create_file("a")?))?;
//! file.write_all_at(b"hello", 4093)?;
//! file.punch_hole(4096, 4096)?; // the second page of the file is a hole now
//! let mut buf = [0u8; 5];
//! file.read_exact_at(&mut buf, 4093)?;
//! assert_eq!(&buf, b"hel\0\0");
//! # Ok::<(), std::io::Error>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Under a model checker the cache starts no thread of its own (fault serving,
// background writeback), so their code is unused there.
#![cfg_attr(any(loom, shuttle), allow(dead_code, unused_imports))]

mod aligned;
#[cfg(feature = "tokio")]
mod async_front;
pub mod backend;
#[cfg(any(feature = "bench", test))] // built for its own test too
#[doc(hidden)]
pub mod bench_support;
pub mod cache;
pub mod device;
mod errno;
pub mod fault;
pub mod lock;
pub(crate) mod map;
pub mod page;
// The racy copies: public only with the `testing` feature, whose tests run
// with each copy in turn.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod racy;
#[cfg(not(feature = "testing"))]
pub(crate) mod racy;
// The noise switch is a test hook: public only with the `testing` feature.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod schedule;
#[cfg(not(feature = "testing"))]
mod schedule;
pub(crate) mod sync;

pub use aligned::AlignedBuf;
#[cfg(feature = "tokio")]
pub use async_front::AsyncMapping;
pub use backend::{
    Attr, Backend, DirEntry, FaultyBackend, FileIdentity, FileKind, HostFile, RenameFlags, SetAttr,
    StatFs, Timestamp, Volume, VolumeFile,
};
pub use cache::{
    CacheStats, ChangeListener, EvictionPolicy, FileHandle, LockWaits, MapAccess, MapRegion,
    Mapping, PageCache, PageCacheBuilder, PinnedPage, PinnedPageMut, PinnedRange, PinnedSlices,
    ReadaheadMode,
};
pub use device::{Device, DeviceClaim, FaultyDevice, FileDevice, MemDevice};
pub use errno::{errno, Error};
pub use fault::FaultRule;
pub use lock::{Mode, Strategy};
pub use page::PAGE_SIZE;

// The README's Rust examples run as doctests, so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
