//! Copies of memory that other threads or maps may change at the same time,
//! at the fastest speed the processor copies a page.
//!
//! # Safety
//! A plain `memcpy` racing a store is a data race: undefined behaviour even if
//! the torn result is thrown away (Miri flags it, and the compiler may assume
//! it away). Every copy here is instead code the compiler cannot see into
//! (inline assembly) or relaxed atomic accesses, and what each does is load
//! and store bytes of the two ranges, each byte once, in some order: exactly
//! what a sequence of relaxed atomic byte accesses does, which races soundly.
//! The result may mix bytes of several versions of the source; the callers
//! validate it (a hit re-checks the page's state word) or hold the page still
//! (pins, the page lock).
//!
//! # Progress
//! No single instruction of a copy touches two pages. A copy into or out of a
//! memory map may fault on each page, and the fault may evict the page before
//! it (a budget of one page keeps one); an instruction that needed two pages
//! at once would fault for ever, each fault evicting what the other installed
//! (a 32-byte store across a page boundary did, in `tests/regressions.rs`,
//! with a one-page budget). `rep movsb` makes progress byte by byte; the
//! vector and pair loops run only where both ranges are aligned to their
//! width (so no access crosses a page), and hand anything else to `rep movsb`
//! (x86-64) or to the atomic words (aarch64).
//!
//! The copies ([`RacyCopy`]):
//! - `rep-movsb` (x86-64): one `rep movsb` in inline assembly. With ERMS/FSRM
//!   it runs at `memcpy` speed for 4 KiB on most Intel processors.
//! - `avx2` (x86-64, where the processor has it): a loop in inline assembly
//!   of 32-byte vector loads and stores, four registers per turn, then
//!   `rep movsb` for the tail; for ranges aligned to the vector's width (page
//!   copies), else `rep movsb` (see `# Progress`). Vector accesses are no
//!   more atomic than bytes, and need not be: each byte is loaded once and
//!   stored once, as above. On some processors (AMD's) they copy a cached page
//!   faster than `rep movsb` does.
//! - `avx512` (x86-64, where the processor has AVX-512F and the crate was
//!   built by Rust 1.89 or later, which made the feature usable): the same
//!   loop with 64-byte registers, for ranges aligned to 64 bytes, else
//!   `rep movsb`. Offered so that the choice below sees it; on an Intel Xeon
//!   with FSRM it copied a cached page about 2% slower than `rep movsb`.
//! - `neon-pairs` (aarch64): a loop in inline assembly of `ldp`/`stp` of two
//!   128-bit registers, then single bytes for the tail; for ranges aligned to
//!   32 bytes, else the atomic words.
//! - `atomic-words` (elsewhere): relaxed atomic loads and stores, a word at a
//!   time where both ranges are aligned, else a byte at a time.
//!
//! Which one a process uses is chosen once ([`select`], which
//! [`PageCache`](crate::PageCache) calls when it is built): each copy the
//! processor supports copies random pages of a 4 MiB buffer in turns, and the
//! fastest wins; one within 3% of `rep-movsb` loses to it, the simplest.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// A way to copy memory that races soundly; see the module's `# Safety`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RacyCopy {
    /// One `rep movsb` (x86-64).
    RepMovsb,
    /// A loop of 32-byte vector loads and stores (x86-64 with AVX2).
    Avx2,
    /// A loop of 64-byte vector loads and stores (x86-64 with AVX-512F, built
    /// by Rust 1.89 or later).
    Avx512,
    /// A loop of `ldp`/`stp` pairs of 128-bit registers (aarch64).
    NeonPairs,
    /// Relaxed atomic words, or bytes where unaligned (any processor).
    AtomicWords,
}

/// Every copy, in the order a tie goes by (the first wins).
const ALL: [RacyCopy; 5] = [
    RacyCopy::RepMovsb,
    RacyCopy::NeonPairs,
    RacyCopy::Avx2,
    RacyCopy::Avx512,
    RacyCopy::AtomicWords,
];

impl RacyCopy {
    /// The copy's name in reports.
    #[cfg_attr(not(any(test, feature = "bench")), allow(dead_code))]
    pub fn name(self) -> &'static str {
        match self {
            RacyCopy::RepMovsb => "rep-movsb",
            RacyCopy::Avx2 => "avx2",
            RacyCopy::Avx512 => "avx512",
            RacyCopy::NeonPairs => "neon-pairs",
            RacyCopy::AtomicWords => "atomic-words",
        }
    }

    /// Whether this processor runs the copy.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            RacyCopy::RepMovsb => true,
            #[cfg(target_arch = "x86_64")]
            RacyCopy::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            RacyCopy::Avx512 => x86::AVX512_BUILT && std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            RacyCopy::NeonPairs => true,
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            RacyCopy::AtomicWords => true,
            _ => false,
        }
    }

    /// The copies this processor runs.
    pub fn available() -> Vec<RacyCopy> {
        ALL.into_iter().filter(|copy| copy.is_available()).collect()
    }

    /// Copies `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// The copy must be available ([`RacyCopy::is_available`]). Both ranges
    /// must be valid for `len` bytes and must not overlap. Other threads may
    /// access them concurrently only through these copies, atomics, or stores
    /// of other processes or maps (outside the Rust abstract machine).
    #[inline]
    pub unsafe fn copy(self, src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: the caller's guarantees, passed on; each arm's copy is
        // available (the caller checked), so its instructions exist here.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                RacyCopy::RepMovsb => x86::rep_movsb(src, dst, len),
                #[cfg(target_arch = "x86_64")]
                RacyCopy::Avx2 if aligned(src, dst, 32) => x86::avx2(src, dst, len),
                #[cfg(target_arch = "x86_64")]
                RacyCopy::Avx2 => x86::rep_movsb(src, dst, len),
                #[cfg(target_arch = "x86_64")]
                RacyCopy::Avx512 if aligned(src, dst, 64) => x86::avx512(src, dst, len),
                #[cfg(target_arch = "x86_64")]
                RacyCopy::Avx512 => x86::rep_movsb(src, dst, len),
                #[cfg(target_arch = "aarch64")]
                RacyCopy::NeonPairs if aligned(src, dst, 32) => aarch64::neon_pairs(src, dst, len),
                _ => atomic_words(src, dst, len),
            }
        }
    }
}

/// Whether both addresses are aligned to `width` bytes (a power of two), so
/// that no access of that width from either crosses a page (`# Progress`).
#[inline]
fn aligned(src: *const u8, dst: *mut u8, width: usize) -> bool {
    (src as usize | dst as usize) & (width - 1) == 0
}

/// The chosen copy, as its index in [`ALL`]; [`UNCHOSEN`] until [`select`].
static CHOSEN: AtomicU8 = AtomicU8::new(UNCHOSEN);
const UNCHOSEN: u8 = u8::MAX;

/// The copy this process uses, chosen at the first call (see [`select`]).
#[inline]
pub fn chosen() -> RacyCopy {
    match CHOSEN.load(Ordering::Relaxed) {
        UNCHOSEN => select(),
        index => ALL[index as usize],
    }
}

/// Chooses the copy this process uses, once: the fastest the processor runs
/// on random 4 KiB pages of a 4 MiB buffer (a few milliseconds, the first
/// time). Threads that race here may each measure; they agree on the first
/// choice stored.
pub fn select() -> RacyCopy {
    let chosen = CHOSEN.load(Ordering::Relaxed);
    if chosen != UNCHOSEN {
        return ALL[chosen as usize];
    }
    let fastest = fastest_copy();
    let index = ALL.iter().position(|&copy| copy == fastest).unwrap_or(0) as u8;
    match CHOSEN.compare_exchange(UNCHOSEN, index, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => fastest,
        Err(first) => ALL[first as usize],
    }
}

/// Makes `copy` the copy of this process (a test hook: the regression tests
/// run with each copy the processor has). Fails with `EINVAL` for a copy
/// this processor does not run.
#[cfg(feature = "testing")]
pub fn force(copy: RacyCopy) -> std::io::Result<()> {
    if !copy.is_available() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let index = ALL
        .iter()
        .position(|&c| c == copy)
        .expect("every copy is in ALL");
    CHOSEN.store(index as u8, Ordering::Relaxed);
    Ok(())
}

/// Copies `len` bytes from `src` to `dst` with the chosen copy.
///
/// # Safety
/// As [`RacyCopy::copy`] (the chosen copy is available).
#[inline]
pub(crate) unsafe fn copy_racy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's guarantees; `chosen` is available by construction.
    unsafe { chosen().copy(src, dst, len) }
}

/// The fastest available copy of random 4 KiB pages of a 4 MiB buffer: each
/// copy in turn for a while, five turns, the best turn of each counted.
fn fastest_copy() -> RacyCopy {
    const BUFFER: usize = 4 << 20;
    const PAGE: usize = 4096;
    const COPIES: usize = 512;
    let copies = RacyCopy::available();
    if copies.len() == 1 {
        return copies[0];
    }
    // Page-aligned, as the cache's pages and most buffers copied into are.
    let mut src = crate::AlignedBuf::new(BUFFER, PAGE);
    src.fill(1);
    let mut dst = crate::AlignedBuf::new(PAGE, PAGE);
    let mut best = vec![Duration::MAX; copies.len()];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..5 {
        for (copy, best) in copies.iter().zip(&mut best) {
            let started = Instant::now();
            for _ in 0..COPIES {
                // xorshift: a page the prefetcher cannot guess.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let page = (seed as usize % (BUFFER / PAGE)) * PAGE;
                // SAFETY: both ranges are in bounds of their own buffers, which
                // nothing else touches; `copy` is available.
                unsafe { copy.copy(src.as_ptr().add(page), dst.as_mut_ptr(), PAGE) };
            }
            *best = (*best).min(started.elapsed());
        }
    }
    std::hint::black_box(&dst);
    let (fastest, time) = copies
        .iter()
        .zip(&best)
        .min_by_key(|(_, time)| **time)
        .map(|(&copy, &time)| (copy, time))
        .expect("at least one copy runs everywhere");
    // A near tie goes to the first in `ALL` (rep movsb, where there is one).
    copies
        .iter()
        .zip(&best)
        .find(|(_, &other)| other.as_secs_f64() <= time.as_secs_f64() * 1.03)
        .map_or(fastest, |(&copy, _)| copy)
}

/// Relaxed atomic accesses, a word at a time where both ranges and the
/// length are 8-byte aligned, else a byte at a time.
///
/// # Safety
/// As [`RacyCopy::copy`].
unsafe fn atomic_words(src: *const u8, dst: *mut u8, len: usize) {
    use std::sync::atomic::AtomicU64;
    let aligned = (src as usize | dst as usize | len) % 8 == 0;
    if aligned {
        for i in (0..len).step_by(8) {
            // SAFETY: in bounds and 8-byte aligned (checked above) by the caller's
            // guarantee; every racing access is atomic or outside the program.
            unsafe {
                let word = AtomicU64::from_ptr(src.add(i) as *mut u64).load(Ordering::Relaxed);
                AtomicU64::from_ptr(dst.add(i) as *mut u64).store(word, Ordering::Relaxed);
            }
        }
    } else {
        for i in 0..len {
            // SAFETY: in bounds by the caller's guarantee; bytes need no alignment.
            unsafe {
                let byte = AtomicU8::from_ptr(src.add(i) as *mut u8).load(Ordering::Relaxed);
                AtomicU8::from_ptr(dst.add(i)).store(byte, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// One `rep movsb`.
    ///
    /// # Safety
    /// As [`super::RacyCopy::copy`].
    #[inline]
    pub(super) unsafe fn rep_movsb(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: the caller guarantees both ranges; the direction flag is
        // clear at function boundaries (System V ABI), so `rep movsb` copies
        // forwards, each byte once.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                options(nostack, preserves_flags)
            );
        }
    }

    /// 128 bytes a turn in four 32-byte registers, then `rep movsb` for the
    /// tail; `vzeroupper` at the end, so that later SSE code pays no
    /// transition.
    ///
    /// # Safety
    /// As [`super::RacyCopy::copy`], and the processor has AVX2; both ranges
    /// start 32-byte aligned (`# Progress`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(src: *const u8, dst: *mut u8, len: usize) {
        let turns = len / 128;
        // SAFETY: `turns * 128 <= len` bytes of both ranges, which the caller
        // guarantees, are each loaded and stored once, forwards; the tail
        // (`len % 128` bytes, right after) goes to `rep movsb` with the
        // pointers the loop advanced. AVX2 is present (the caller checked).
        unsafe {
            asm!(
                "test {turns}, {turns}",
                "jz 3f",
                "2:",
                "vmovdqu ymm0, [rsi]",
                "vmovdqu ymm1, [rsi + 32]",
                "vmovdqu ymm2, [rsi + 64]",
                "vmovdqu ymm3, [rsi + 96]",
                "vmovdqu [rdi], ymm0",
                "vmovdqu [rdi + 32], ymm1",
                "vmovdqu [rdi + 64], ymm2",
                "vmovdqu [rdi + 96], ymm3",
                "add rsi, 128",
                "add rdi, 128",
                "dec {turns}",
                "jnz 2b",
                "vzeroupper",
                "3:",
                "rep movsb",
                turns = inout(reg) turns => _,
                inout("rcx") len % 128 => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                out("ymm0") _,
                out("ymm1") _,
                out("ymm2") _,
                out("ymm3") _,
                options(nostack)
            );
        }
    }

    /// Whether this build has the AVX-512 copy: `#[target_feature(enable =
    /// "avx512f")]` is stable from Rust 1.89, past the crate's minimum.
    #[rustversion::since(1.89)]
    pub(super) const AVX512_BUILT: bool = true;
    #[rustversion::before(1.89)]
    pub(super) const AVX512_BUILT: bool = false;

    /// [`avx2`] with 64-byte registers: 256 bytes a turn in four of them.
    ///
    /// # Safety
    /// As [`super::RacyCopy::copy`], and the processor has AVX-512F; both
    /// ranges start 64-byte aligned (`# Progress`).
    #[rustversion::since(1.89)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(src: *const u8, dst: *mut u8, len: usize) {
        let turns = len / 256;
        // SAFETY: as in `avx2`, with 256-byte turns and a `len % 256` tail;
        // AVX-512F is present (the caller checked).
        unsafe {
            asm!(
                "test {turns}, {turns}",
                "jz 3f",
                "2:",
                "vmovdqu64 zmm0, [rsi]",
                "vmovdqu64 zmm1, [rsi + 64]",
                "vmovdqu64 zmm2, [rsi + 128]",
                "vmovdqu64 zmm3, [rsi + 192]",
                "vmovdqu64 [rdi], zmm0",
                "vmovdqu64 [rdi + 64], zmm1",
                "vmovdqu64 [rdi + 128], zmm2",
                "vmovdqu64 [rdi + 192], zmm3",
                "add rsi, 256",
                "add rdi, 256",
                "dec {turns}",
                "jnz 2b",
                "vzeroupper",
                "3:",
                "rep movsb",
                turns = inout(reg) turns => _,
                inout("rcx") len % 256 => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                out("zmm0") _,
                out("zmm1") _,
                out("zmm2") _,
                out("zmm3") _,
                options(nostack)
            );
        }
    }

    /// Never called: a build without the AVX-512 copy does not offer it
    /// ([`AVX512_BUILT`]). Copies with `rep movsb` all the same.
    ///
    /// # Safety
    /// As [`super::RacyCopy::copy`].
    #[rustversion::before(1.89)]
    pub(super) unsafe fn avx512(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { rep_movsb(src, dst, len) }
    }
}

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::arch::asm;

    /// 64 bytes a turn in two `ldp`/`stp` pairs of 128-bit registers, then a
    /// byte at a time for the tail.
    ///
    /// # Safety
    /// As [`super::RacyCopy::copy`] (NEON is part of every aarch64 processor);
    /// both ranges start 32-byte aligned (`# Progress`).
    pub(super) unsafe fn neon_pairs(src: *const u8, dst: *mut u8, len: usize) {
        let turns = len / 64;
        let tail = len % 64;
        // SAFETY: `turns * 64 <= len` bytes of both ranges, which the caller
        // guarantees, then the `tail` bytes right after, are each loaded and
        // stored once, forwards, through the advancing pointers.
        unsafe {
            asm!(
                "cbz {turns}, 3f",
                "2:",
                "ldp q0, q1, [{src}], #32",
                "ldp q2, q3, [{src}], #32",
                "stp q0, q1, [{dst}], #32",
                "stp q2, q3, [{dst}], #32",
                "subs {turns}, {turns}, #1",
                "b.ne 2b",
                "3:",
                "cbz {tail}, 5f",
                "4:",
                "ldrb {byte:w}, [{src}], #1",
                "strb {byte:w}, [{dst}], #1",
                "subs {tail}, {tail}, #1",
                "b.ne 4b",
                "5:",
                turns = inout(reg) turns => _,
                tail = inout(reg) tail => _,
                src = inout(reg) src => _,
                dst = inout(reg) dst => _,
                byte = out(reg) _,
                out("v0") _,
                out("v1") _,
                out("v2") _,
                out("v3") _,
                options(nostack)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every available copy, at every length up to 600 bytes, a page, and
    /// odd lengths past it, from and to every alignment mod 64: the bytes
    /// copied are the source's, and no byte around the destination changes.
    #[test]
    fn every_available_copy_copies_exactly_its_bytes_at_every_length_and_alignment() {
        let copies = RacyCopy::available();
        assert!(!copies.is_empty());
        // Both buffers start on a page, so that the offsets below are their
        // alignments and the vector loops run where they may.
        let mut src = crate::AlignedBuf::new(20_000, 4096);
        for (i, byte) in src.iter_mut().enumerate() {
            *byte = (i * 7 + i / 251) as u8;
        }
        let lengths = (0..=600).chain([4095, 4096, 4097, 8191, 12_345]);
        for copy in copies {
            for len in lengths.clone() {
                for (from, to) in [
                    (0, 0),
                    (1, 0),
                    (0, 3),
                    (17, 41),
                    (63, 1),
                    (32, 32),
                    (64, 128),
                ] {
                    let mut dst = crate::AlignedBuf::new(len + 200, 4096);
                    dst.fill(0xAA);
                    // SAFETY: both ranges in bounds of distinct buffers; the copy
                    // is available.
                    unsafe { copy.copy(src.as_ptr().add(from), dst.as_mut_ptr().add(to), len) };
                    let name = copy.name();
                    assert_eq!(
                        &dst[to..to + len],
                        &src[from..from + len],
                        "{name} {len} {from} {to}"
                    );
                    assert!(dst[..to].iter().all(|&b| b == 0xAA), "{name} wrote before");
                    assert!(
                        dst[to + len..].iter().all(|&b| b == 0xAA),
                        "{name} wrote past"
                    );
                }
            }
        }
    }

    #[test]
    fn the_chosen_copy_is_available_and_stays_chosen() {
        let chosen = select();
        assert!(chosen.is_available(), "{}", chosen.name());
        assert_eq!(super::chosen(), chosen);
        assert_eq!(select(), chosen);
    }

    #[test]
    fn the_copies_this_processor_has_are_offered() {
        let names: Vec<_> = RacyCopy::available().iter().map(|c| c.name()).collect();
        #[cfg(target_arch = "x86_64")]
        {
            assert!(names.contains(&"rep-movsb"));
            assert_eq!(
                names.contains(&"avx2"),
                std::arch::is_x86_feature_detected!("avx2")
            );
            assert_eq!(
                names.contains(&"avx512"),
                x86::AVX512_BUILT && std::arch::is_x86_feature_detected!("avx512f")
            );
        }
        #[cfg(target_arch = "aarch64")]
        assert_eq!(names, ["neon-pairs"]);
    }
}
