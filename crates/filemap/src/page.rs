//! The page: the unit of caching, filling, invalidation and block I/O. It
//! lives on the ground floor, so that the lock, the backends and the maps take
//! its size from here rather than from the cache above them.

/// The size of a page: the unit of caching, filling and invalidation.
pub const PAGE_SIZE: usize = 4096;

/// [`PAGE_SIZE`] as a byte count of a file, for offset arithmetic.
pub(crate) const PAGE: u64 = PAGE_SIZE as u64;
