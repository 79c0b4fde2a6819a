//! The page: the unit of caching, filling, invalidation and block I/O, and
//! the arithmetic between byte offsets and page indexes. It lives on the
//! ground floor, so that the lock, the backends and the maps take it from here
//! rather than from the cache above them, and so that tests, the bench and
//! the torture need no page constant of their own.
//!
//! ```
//! use filemap::page::{index_of, offset_in_page, pages_to_cover, start_of, PAGE};
//!
//! assert_eq!(index_of(2 * PAGE + 5), 2);
//! assert_eq!(offset_in_page(2 * PAGE + 5), 5);
//! assert_eq!(start_of(2), 2 * PAGE);
//! assert_eq!(pages_to_cover(2 * PAGE + 5), 3);
//! ```

/// The size of a page: the unit of caching, filling and invalidation.
pub const PAGE_SIZE: usize = 4096;

/// [`PAGE_SIZE`] as a byte count of a file, for offset arithmetic.
pub const PAGE: u64 = PAGE_SIZE as u64;

/// The index of the page that holds byte `offset`.
///
/// ```
/// use filemap::page::{index_of, PAGE};
///
/// assert_eq!(index_of(PAGE - 1), 0);
/// assert_eq!(index_of(PAGE), 1); // a page holds the byte it starts with
/// ```
#[inline]
pub const fn index_of(offset: u64) -> u64 {
    offset / PAGE
}

/// Where byte `offset` sits inside its page.
///
/// ```
/// use filemap::page::{offset_in_page, PAGE, PAGE_SIZE};
///
/// assert_eq!(offset_in_page(3 * PAGE + 10), 10);
/// assert_eq!(offset_in_page(PAGE - 1), PAGE_SIZE - 1);
/// ```
#[inline]
pub const fn offset_in_page(offset: u64) -> usize {
    (offset % PAGE) as usize
}

/// The byte offset at which page `index` starts.
///
/// ```
/// use filemap::page::{index_of, start_of, PAGE};
///
/// assert_eq!(start_of(3), 3 * PAGE);
/// assert_eq!(start_of(index_of(3 * PAGE + 10)), 3 * PAGE); // rounds down
/// ```
#[inline]
pub const fn start_of(index: u64) -> u64 {
    index * PAGE
}

/// How many pages hold bytes `0..end`: the index one past the last page of a
/// file of size `end`.
///
/// ```
/// use filemap::page::{pages_to_cover, PAGE};
///
/// assert_eq!(pages_to_cover(0), 0);
/// assert_eq!(pages_to_cover(PAGE), 1);
/// assert_eq!(pages_to_cover(PAGE + 1), 2); // a partial last page counts
/// ```
#[inline]
pub const fn pages_to_cover(end: u64) -> u64 {
    end.div_ceil(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_boundaries_belong_to_the_page_they_start() {
        assert_eq!(index_of(PAGE - 1), 0);
        assert_eq!(index_of(PAGE), 1);
        assert_eq!(offset_in_page(PAGE), 0);
        assert_eq!(offset_in_page(PAGE - 1), PAGE_SIZE - 1);
        assert_eq!(pages_to_cover(0), 0);
        assert_eq!(pages_to_cover(1), 1);
        assert_eq!(pages_to_cover(PAGE), 1);
        assert_eq!(pages_to_cover(PAGE + 1), 2);
        assert_eq!(pages_to_cover(u64::MAX), u64::MAX / PAGE + 1);
    }
}
