//! Placeholder while the cache is written.
#![allow(missing_docs)]
pub const PAGE_SIZE: usize = 4096;
pub struct Mapping;
pub struct PageCache;
pub struct PageCacheBuilder;
