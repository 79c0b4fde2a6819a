//! Cursors over the buffers of a vectored call (`read_vectored_at`,
//! `write_vectored_at`): they hand out the bytes of one page at a time, so
//! that each page is still copied whole in one step, however the caller cut
//! its buffers.
//!
//! A page whose bytes lie in one buffer is copied straight to or from it; a
//! page that straddles two or more buffers goes through a page-sized buffer
//! aside, so that a reader never sees it half old and half new.

use std::io::{self, IoSlice, IoSliceMut};

use crate::errno::with_message;
use crate::page::PAGE_SIZE;

/// The bytes of all `lens` together; `EINVAL` if they overflow, as `readv`
/// fails for a total past `ssize_t`.
pub(super) fn total_len(lens: impl Iterator<Item = usize>) -> io::Result<usize> {
    let mut total: usize = 0;
    for len in lens {
        total = total
            .checked_add(len)
            .filter(|&total| total <= isize::MAX as usize)
            .ok_or_else(|| with_message(libc::EINVAL, "the buffers of a vectored call overflow"))?;
    }
    Ok(total)
}

/// A position in a list of buffers: the buffer, and the offset in it.
#[derive(Clone, Copy, Default)]
struct Position {
    buffer: usize,
    at: usize,
}

impl Position {
    /// Moves past the buffers that have no bytes left (empty ones too);
    /// `len(i)` is the length of buffer `i`.
    fn skip_spent(&mut self, count: usize, len: impl Fn(usize) -> usize) {
        while self.buffer < count && self.at == len(self.buffer) {
            self.buffer += 1;
            self.at = 0;
        }
    }
}

/// The sources of a vectored write, a page's bytes at a time.
pub(super) struct Gather<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    position: Position,
    /// A page that straddles buffers, gathered (allocated at the first:
    /// `write_at`, one buffer, never needs it).
    aside: Vec<u8>,
}

impl<'a, 'b> Gather<'a, 'b> {
    pub(super) fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        Gather {
            bufs,
            position: Position::default(),
            aside: Vec::new(),
        }
    }

    /// The next `len` bytes (at most a page's): straight from a buffer if
    /// they lie in one, else gathered aside.
    pub(super) fn next(&mut self, len: usize) -> &[u8] {
        debug_assert!(len <= PAGE_SIZE);
        let bufs = self.bufs;
        let spent = |position: &mut Position| position.skip_spent(bufs.len(), |i| bufs[i].len());
        spent(&mut self.position);
        let Position { buffer, at } = self.position;
        if bufs[buffer].len() - at >= len {
            self.position.at += len;
            return &bufs[buffer][at..at + len];
        }
        self.aside.resize(PAGE_SIZE, 0);
        let mut done = 0;
        while done < len {
            spent(&mut self.position);
            let Position { buffer, at } = self.position;
            let take = (bufs[buffer].len() - at).min(len - done);
            self.aside[done..done + take].copy_from_slice(&bufs[buffer][at..at + take]);
            self.position.at += take;
            done += take;
        }
        &self.aside[..len]
    }

    /// Copies the next `dst.len()` bytes into `dst`.
    pub(super) fn copy_to(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(PAGE_SIZE) {
            chunk.copy_from_slice(self.next(chunk.len()));
        }
    }
}

/// The destinations of a vectored read, a run of bytes at a time.
pub(super) struct Scatter<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    position: Position,
    /// The bytes handed out so far.
    done: usize,
}

/// Where [`Scatter::next`] says the next bytes go.
pub(super) enum Destination<'s> {
    /// Straight into the caller's buffer: a run of whole pages, and the
    /// parts of a first and last page that lie in it.
    Straight(&'s mut [u8]),
    /// A page that straddles buffers: read it into a page-sized buffer of
    /// the caller's, then hand that to [`Scatter::put`]; `len` bytes.
    Aside(usize),
}

impl<'a, 'b> Scatter<'a, 'b> {
    pub(super) fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        Scatter {
            bufs,
            position: Position::default(),
            done: 0,
        }
    }

    /// Where the next bytes of a read at `offset` (the file offset of the
    /// first buffer's first byte) go, `left` bytes being still to read:
    /// every byte of the current buffer up to the last page that ends in
    /// it, or the page that straddles it and the next.
    pub(super) fn next(&mut self, offset: u64, left: usize) -> Destination<'_> {
        let bufs = &*self.bufs;
        self.position.skip_spent(bufs.len(), |i| bufs[i].len());
        let Position { buffer, at } = self.position;
        let pos = offset + self.done as u64;
        let here = (self.bufs[buffer].len() - at).min(left);
        let end = pos + here as u64;
        let page = PAGE_SIZE as u64;
        // The bytes here up to the last page boundary in them, all of them if
        // they end the read or end on a boundary.
        let straight = if here == left || end % page == 0 {
            here
        } else {
            ((end - end % page).saturating_sub(pos)) as usize
        };
        if straight > 0 {
            return Destination::Straight(&mut self.bufs[buffer][at..at + straight]);
        }
        let in_page = (pos % page) as usize;
        Destination::Aside((PAGE_SIZE - in_page).min(left))
    }

    /// Counts `n` bytes as read straight into what [`Scatter::next`] gave.
    pub(super) fn advance(&mut self, n: usize) {
        self.position.at += n;
        self.done += n;
    }

    /// Copies bytes read aside (a page's, or a whole bounced read's) into
    /// the buffers they belong in.
    pub(super) fn put(&mut self, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let bufs = &*self.bufs;
            self.position.skip_spent(bufs.len(), |i| bufs[i].len());
            let Position { buffer, at } = self.position;
            let take = (self.bufs[buffer].len() - at).min(bytes.len() - done);
            self.bufs[buffer][at..at + take].copy_from_slice(&bytes[done..done + take]);
            self.position.at += take;
            done += take;
        }
        self.done += bytes.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_straddles_buffers_is_gathered_whole() {
        let (a, b) = ([1u8; 100], [2u8; PAGE_SIZE]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)];
        let mut gather = Gather::new(&bufs);
        let first = gather.next(PAGE_SIZE).to_vec();
        assert_eq!(&first[..100], &a[..]);
        assert!(first[100..].iter().all(|&byte| byte == 2));
        assert_eq!(gather.next(100), &[2u8; 100][..]);
    }

    #[test]
    fn a_read_goes_straight_up_to_the_last_page_boundary_of_a_buffer() {
        let (mut a, mut b) = (vec![0u8; PAGE_SIZE + 10], vec![0u8; PAGE_SIZE]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let mut scatter = Scatter::new(&mut bufs);
        let left = 2 * PAGE_SIZE + 10;
        match scatter.next(0, left) {
            Destination::Straight(dst) => assert_eq!(dst.len(), PAGE_SIZE),
            Destination::Aside(_) => panic!("page 0 lies in the first buffer"),
        }
        scatter.advance(PAGE_SIZE);
        match scatter.next(0, left - PAGE_SIZE) {
            Destination::Aside(len) => assert_eq!(len, PAGE_SIZE),
            Destination::Straight(_) => panic!("page 1 straddles the buffers"),
        }
        scatter.put(&[9u8; PAGE_SIZE]);
        match scatter.next(0, 10) {
            Destination::Straight(dst) => assert_eq!(dst.len(), 10),
            Destination::Aside(_) => panic!("the last bytes lie in the second buffer"),
        }
        assert_eq!(a[PAGE_SIZE..], [9u8; 10]);
        assert!(b[..PAGE_SIZE - 10].iter().all(|&byte| byte == 9));
    }

    #[test]
    fn buffers_past_isize_max_are_refused() {
        let error = total_len([usize::MAX / 2, usize::MAX / 2, 2].into_iter()).unwrap_err();
        assert_eq!(crate::errno::errno(&error), Some(libc::EINVAL));
        assert_eq!(total_len([3, 0, 4].into_iter()).unwrap(), 7);
    }
}
