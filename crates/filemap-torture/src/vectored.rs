//! The buffers of the torture's vectored calls: a read or write of a few
//! pages cut into up to [`MAX_CUTS`] + 1 buffers at random places, most of
//! them inside a page (so that pages straddle buffers), some at a page
//! boundary (so that buffers may be empty).

use std::io::{IoSlice, IoSliceMut};

use filemap::page::PAGE_SIZE;

/// The most cuts of one call's bytes.
pub(crate) const MAX_CUTS: usize = 3;

/// Where to cut `len` bytes: up to [`MAX_CUTS`] offsets, sorted, each at
/// most `len`.
pub(crate) fn random_cuts(rng: &mut fastrand::Rng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.usize(1..=MAX_CUTS))
        .map(|_| match rng.u8(..8) {
            0 => rng.usize(..=len / PAGE_SIZE) * PAGE_SIZE,
            _ => rng.usize(..=len),
        })
        .collect();
    cuts.sort_unstable();
    cuts
}

/// `bytes` cut at `cuts` (sorted, each at most `bytes.len()`).
pub(crate) fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<IoSlice<'a>> {
    let mut at = 0;
    let mut pieces: Vec<IoSlice<'a>> = cuts
        .iter()
        .map(|&cut| {
            let piece = IoSlice::new(&bytes[at..cut]);
            at = cut;
            piece
        })
        .collect();
    pieces.push(IoSlice::new(&bytes[at..]));
    pieces
}

/// `bytes` cut at `cuts` (sorted, each at most `bytes.len()`), writable.
pub(crate) fn cut_mut<'a>(mut bytes: &'a mut [u8], cuts: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for &cut in cuts {
        let (piece, rest) = bytes.split_at_mut(cut - at);
        pieces.push(IoSliceMut::new(piece));
        bytes = rest;
        at = cut;
    }
    pieces.push(IoSliceMut::new(bytes));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_lie_in_the_bytes_and_the_pieces_cover_them_in_order() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..1000 {
            let len = rng.usize(..=4 * PAGE_SIZE);
            let cuts = random_cuts(&mut rng, len);
            assert!(cuts.len() <= MAX_CUTS && cuts.iter().all(|&c| c <= len));
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let joined: Vec<u8> = cut(&bytes, &cuts).iter().flat_map(|p| p.to_vec()).collect();
            assert_eq!(joined, bytes);
            let mut copy = bytes.clone();
            let lens: Vec<usize> = cut_mut(&mut copy, &cuts).iter().map(|p| p.len()).collect();
            assert_eq!(lens.iter().sum::<usize>(), len);
        }
    }
}
