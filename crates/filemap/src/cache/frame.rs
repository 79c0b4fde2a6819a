//! Frame memory: fixed-size page frames under the cache's byte budget.
//!
//! Frames are read optimistically by cache hits while another thread may be
//! rewriting them (a freed frame is handed to another page at once), so frame
//! memory is never a `&[u8]`, and a reader trusts what it copied only after
//! re-validating the page's state word (see `page.rs`). Chunks of frames are
//! allocated on first use and never freed while the cache lives, so a stale
//! optimistic reader always reads mapped memory.
//!
//! # Safety
//! Copies in and out of frames race by design: a plain `memcpy` would be a data
//! race, undefined behaviour even if the torn result is thrown away. On x86-64 a
//! copy is one `rep movsb` in inline assembly: the compiler cannot see into it,
//! and what it does (load and store bytes, in some order) is exactly what a
//! sequence of relaxed atomic byte accesses does, which races soundly. With
//! ERMS/FSRM it runs at `memcpy` speed for 4 KiB. Elsewhere the copy is a loop of
//! relaxed `AtomicU64` accesses. The `unsafe` here is confined to those copies and
//! to a baseline `memcpy` for benchmarks.
#![allow(unsafe_code)]

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

    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    fn words(&self, frame: FrameId) -> &[AtomicU64] {
        let index = frame.0 as usize;
        let chunk = self.chunks[index / FRAMES_PER_CHUNK]
            .get()
            .expect("frame ids are only handed out from initialised chunks");
        let first = (index % FRAMES_PER_CHUNK) * WORDS_PER_FRAME;
        &chunk[first..first + WORDS_PER_FRAME]
    }

    /// The address of byte `offset` of `frame`, after checking that `len` bytes
    /// from there stay inside the frame.
    fn byte_ptr(&self, frame: FrameId, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset <= PAGE_SIZE && len <= PAGE_SIZE - offset,
            "copy outside a frame"
        );
        let index = frame.0 as usize;
        let chunk = self.chunks[index / FRAMES_PER_CHUNK]
            .get()
            .expect("frame ids are only handed out from initialised chunks");
        let word = &chunk[(index % FRAMES_PER_CHUNK) * WORDS_PER_FRAME];
        word.as_ptr().cast::<u8>().wrapping_add(offset)
    }

    /// Copies `dst.len()` bytes from `offset` in `frame`. The bytes may be torn by a
    /// concurrent writer: callers validate them against the page state.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub(crate) fn read(&self, frame: FrameId, offset: usize, dst: &mut [u8]) {
        let src = self.byte_ptr(frame, offset, dst.len());
        // SAFETY: `src..src + len` lies inside one frame (checked by `byte_ptr`) of a
        // chunk that lives as long as `self`; `dst` is an exclusive buffer of `len`
        // bytes that cannot overlap frame memory (frames are never lent out as
        // slices). Racing writers are sound: see the module's `# Safety`.
        unsafe { racy_copy(src, dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `dst.len()` bytes from `offset` in `frame`. The bytes may be torn by a
    /// concurrent writer: callers validate them against the page state.
    #[cfg(not(target_arch = "x86_64"))]
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
        // Pairs with the acquire fence of optimistic readers: a reader that sees any
        // of these bytes also sees the state change made before them (a lock taken,
        // or the frame's previous page unlinked), and so discards its copy.
        fence(Ordering::Release);
        #[cfg(target_arch = "x86_64")]
        {
            let dst = self.byte_ptr(frame, offset, src.len());
            // SAFETY: `dst..dst + len` lies inside one live frame (checked by
            // `byte_ptr`), `src` is a shared buffer of `len` bytes outside frame
            // memory; only optimistic readers race this copy (the caller owns the
            // frame's contents), which is sound: see the module's `# Safety`.
            unsafe { racy_copy(src.as_ptr(), dst, src.len()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.write_words(frame, offset, src);
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn write_words(&self, frame: FrameId, offset: usize, src: &[u8]) {
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

    /// A plain `memcpy` of a whole frame, for benchmarks that compare the hit
    /// path with the cost of the copy alone.
    ///
    /// # Safety
    /// No thread may write `frame` during the call.
    pub(crate) unsafe fn memcpy_page(&self, frame: FrameId, dst: &mut [u8; PAGE_SIZE]) {
        let src = self.byte_ptr(frame, 0, PAGE_SIZE);
        // SAFETY: the frame is live and `PAGE_SIZE` bytes long (`byte_ptr`), `dst`
        // is a distinct exclusive buffer of that size, and the caller guarantees no
        // concurrent writer, so this plain copy races with nothing.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) }
    }

    /// Zeroes `len` bytes of `frame` from `offset`; same ownership rule as `write`.
    pub(crate) fn zero(&self, frame: FrameId, offset: usize, len: usize) {
        const ZEROES: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.write(frame, offset, &ZEROES[..len]);
    }
}

/// Copies `len` bytes from `src` to `dst` with one `rep movsb`.
///
/// # Safety
/// Both ranges must be valid for `len` bytes and must not overlap. Other threads
/// may access them concurrently only through this function or atomics.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn racy_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller guarantees both ranges; the direction flag is clear at
    // function boundaries (System V ABI), so `rep movsb` copies forwards.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// The lengths of the pieces of `offset..offset + len` split at 8-byte words.
#[cfg(not(target_arch = "x86_64"))]
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
