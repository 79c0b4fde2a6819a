//! Frame memory: fixed-size page frames under the cache's byte budget.
//!
//! Frames are read optimistically by cache hits while another thread may be
//! rewriting them (a freed frame is handed to another page at once), so frame
//! memory is never a `&[u8]`: every access goes through relaxed atomic words,
//! and a reader trusts what it copied only after re-validating the page's state
//! word (see `page.rs`). Chunks of frames are allocated on first use and never
//! freed while the cache lives, so a stale optimistic reader always reads mapped
//! memory.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use super::PAGE_SIZE;

const WORDS_PER_FRAME: usize = PAGE_SIZE / 8;
/// Frames per chunk: 2 MiB of frame memory is allocated at a time.
const FRAMES_PER_CHUNK: usize = 512;

/// The index of a frame in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameId(pub(crate) u32);

/// All frame memory of one cache.
pub(crate) struct FramePool {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
    free: Mutex<FreeList>,
    capacity: u32,
    used: AtomicUsize,
}

struct FreeList {
    /// Frames given back, reused last-in first-out (warm in the CPU cache).
    stack: Vec<u32>,
    /// Frames below this index have been handed out at least once.
    high_water: u32,
}

impl FramePool {
    /// A pool of `capacity` frames; no memory is allocated until frames are used.
    pub(crate) fn new(capacity: u32) -> Self {
        let chunks = (capacity as usize).div_ceil(FRAMES_PER_CHUNK);
        FramePool {
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            free: Mutex::new(FreeList {
                stack: Vec::new(),
                high_water: 0,
            }),
            capacity,
            used: AtomicUsize::new(0),
        }
    }

    /// How many frames the pool may hand out at once.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// How many frames are handed out now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A free frame, or `None` when the whole budget is in use. Its contents are
    /// whatever its last owner left.
    pub(crate) fn alloc(&self) -> Option<FrameId> {
        let mut free = self.free.lock();
        let index = match free.stack.pop() {
            Some(index) => index,
            None if free.high_water < self.capacity => {
                let index = free.high_water;
                self.chunks[index as usize / FRAMES_PER_CHUNK].get_or_init(|| {
                    (0..FRAMES_PER_CHUNK * WORDS_PER_FRAME)
                        .map(|_| AtomicU64::new(0))
                        .collect()
                });
                free.high_water += 1;
                index
            }
            None => return None,
        };
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(FrameId(index))
    }

    /// Gives `frame` back. The caller must have unlinked it from every page, so
    /// that only stale optimistic readers (which re-validate) can still read it.
    pub(crate) fn free(&self, frame: FrameId) {
        let mut free = self.free.lock();
        debug_assert!(frame.0 < free.high_water && !free.stack.contains(&frame.0));
        free.stack.push(frame.0);
        self.used.fetch_sub(1, Ordering::Relaxed);
    }

    fn words(&self, frame: FrameId) -> &[AtomicU64] {
        let index = frame.0 as usize;
        let chunk = self.chunks[index / FRAMES_PER_CHUNK]
            .get()
            .expect("frame ids are only handed out from initialised chunks");
        let first = (index % FRAMES_PER_CHUNK) * WORDS_PER_FRAME;
        &chunk[first..first + WORDS_PER_FRAME]
    }

    /// Copies `dst.len()` bytes from `offset` in `frame`. The bytes may be torn by a
    /// concurrent writer: callers validate them against the page state.
    pub(crate) fn read(&self, frame: FrameId, offset: usize, dst: &mut [u8]) {
        debug_assert!(offset + dst.len() <= PAGE_SIZE);
        let words = self.words(frame);
        let mut pos = offset;
        for chunk in split_by_word(offset, dst.len()) {
            let bytes = words[pos / 8].load(Ordering::Relaxed).to_ne_bytes();
            let start = pos % 8;
            let out = pos - offset;
            dst[out..out + chunk].copy_from_slice(&bytes[start..start + chunk]);
            pos += chunk;
        }
    }

    /// Copies `src` into `frame` at `offset`. The caller owns the frame's contents
    /// (page locked, or a fill that claimed it), so no other writer races it.
    pub(crate) fn write(&self, frame: FrameId, offset: usize, src: &[u8]) {
        debug_assert!(offset + src.len() <= PAGE_SIZE);
        // Pairs with the acquire fence of optimistic readers: a reader that sees any
        // of these bytes also sees the state change made before them (a lock taken,
        // or the frame's previous page unlinked), and so discards its copy.
        fence(Ordering::Release);
        let words = self.words(frame);
        let mut pos = offset;
        for chunk in split_by_word(offset, src.len()) {
            let word = &words[pos / 8];
            let start = pos % 8;
            let input = pos - offset;
            if chunk == 8 {
                let bytes: [u8; 8] = src[input..input + 8].try_into().expect("8 bytes");
                word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
            } else {
                let mut bytes = word.load(Ordering::Relaxed).to_ne_bytes();
                bytes[start..start + chunk].copy_from_slice(&src[input..input + chunk]);
                word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
            }
            pos += chunk;
        }
    }

    /// Zeroes `len` bytes of `frame` from `offset`; same ownership rule as `write`.
    pub(crate) fn zero(&self, frame: FrameId, offset: usize, len: usize) {
        const ZEROES: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.write(frame, offset, &ZEROES[..len]);
    }
}

/// The lengths of the pieces of `offset..offset + len` split at 8-byte words.
fn split_by_word(offset: usize, len: usize) -> impl Iterator<Item = usize> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let chunk = (8 - pos % 8).min(end - pos);
            pos += chunk;
            chunk
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_reused_and_bounded() {
        let pool = FramePool::new(3);
        let frames: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert!(pool.alloc().is_none(), "budget exceeded");
        assert_eq!(pool.used(), 3);
        pool.free(frames[1]);
        assert_eq!(pool.alloc(), Some(frames[1]));
    }

    #[test]
    fn unaligned_reads_and_writes_round_trip() {
        let pool = FramePool::new(1);
        let frame = pool.alloc().unwrap();
        pool.zero(frame, 0, PAGE_SIZE);
        let data: Vec<u8> = (0..100u8).collect();
        pool.write(frame, 13, &data);
        let mut out = vec![0xaa; 120];
        pool.read(frame, 3, &mut out);
        assert!(out[..10].iter().all(|&b| b == 0));
        assert_eq!(&out[10..110], &data[..]);
        assert!(out[110..].iter().all(|&b| b == 0));
        pool.zero(frame, 20, 5);
        let mut out = [0xaa; 10];
        pool.read(frame, 18, &mut out);
        assert_eq!(out, [5, 6, 0, 0, 0, 0, 0, 12, 13, 14]);
    }
}
