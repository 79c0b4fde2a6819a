//! Copies of memory that other threads or maps may change at the same time.
//!
//! # Safety
//! A plain `memcpy` racing a store is a data race: undefined behaviour even if
//! the torn result is thrown away. On x86-64 a copy here is one `rep movsb` in
//! inline assembly: the compiler cannot see into it, and what it does (load and
//! store bytes, in some order) is exactly what a sequence of relaxed atomic byte
//! accesses does, which races soundly. With ERMS/FSRM it runs at `memcpy` speed
//! for 4 KiB. Elsewhere the copy is a loop of relaxed atomic accesses.
#![allow(unsafe_code)]

#[cfg(not(target_arch = "x86_64"))]
use std::sync::atomic::{AtomicU64, Ordering};

/// Copies `len` bytes from `src` to `dst` with one `rep movsb`.
///
/// # Safety
/// Both ranges must be valid for `len` bytes and must not overlap. Other threads
/// may access them concurrently only through this function, atomics, or stores
/// of other processes or maps (outside the Rust abstract machine).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) unsafe fn copy_racy(src: *const u8, dst: *mut u8, len: usize) {
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

/// Copies `len` bytes from `src` to `dst` with relaxed atomic accesses, a word at
/// a time where both are aligned, else a byte at a time.
///
/// # Safety
/// As for the x86-64 version.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn copy_racy(src: *const u8, dst: *mut u8, len: usize) {
    use std::sync::atomic::AtomicU8;
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
