//! How much of a file's page cache the kernel holds in large folios: a 4 KiB
//! read hit copies out of either, but finds its page faster in a large one,
//! so two files cached in folios of different sizes are not read at the same
//! speed (`bench mount --kernel-cache` says which it compared). Read from
//! `/proc/self/pagemap` and `/proc/kpageflags` (which need root, as mounting
//! does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PAGE: u64 = filemap::page::PAGE;
/// `/proc/kpageflags` bits: the first page of a compound page, and the others.
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
/// `/proc/self/pagemap`: the page is present, and the mask of its frame number.
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// The share of the first `bytes` of `path` (at most 16 MiB) that the kernel
/// caches in large folios, after reading them in through a map.
pub fn large_folio_share(path: &Path, bytes: u64) -> io::Result<f64> {
    use rustix::mm::{MapFlags, ProtFlags};
    let file = File::open(path)?;
    let pages = bytes.min(file.metadata()?.len()).min(16 << 20) / PAGE;
    if pages == 0 {
        return Ok(0.0);
    }
    let len = (pages * PAGE) as usize;
    // SAFETY: a new private read-only map of `len` bytes of a file no one
    // shrinks during the bench, at an address the kernel picks: it overlaps
    // nothing of ours, is only read below, inside `len`, and is unmapped
    // before this returns.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::PRIVATE,
            &file,
            0,
        )?
    };
    let base = map as usize;
    for page in 0..pages as usize {
        // SAFETY: inside the map; a read fault maps the cached page itself
        // (a private map copies a page only when it is written).
        unsafe { std::ptr::read_volatile((base + page * PAGE as usize) as *const u8) };
    }
    let counted = count_large(base, pages);
    // SAFETY: the map made above, not used after this.
    unsafe { rustix::mm::munmap(map, len)? };
    let (large, seen) = counted?;
    if seen == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: no page frame of it visible (needs root)",
                path.display()
            ),
        ));
    }
    Ok(large as f64 / seen as f64)
}

/// How many of the `pages` pages mapped from `base` on are parts of large
/// folios, and how many were seen.
fn count_large(base: usize, pages: u64) -> io::Result<(u64, u64)> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let flags = File::open("/proc/kpageflags")?;
    let mut entries = vec![0u8; pages as usize * 8];
    pagemap.read_exact_at(&mut entries, (base as u64 / PAGE) * 8)?;
    let (mut large, mut seen) = (0, 0);
    for entry in entries.chunks_exact(8) {
        let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
        let pfn = entry & PM_PFN;
        if entry & PM_PRESENT == 0 || pfn == 0 {
            // Absent, or the frame hidden (no privilege): not counted.
            continue;
        }
        seen += 1;
        let mut page_flags = [0u8; 8];
        flags.read_exact_at(&mut page_flags, pfn * 8)?;
        if u64::from_le_bytes(page_flags) & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL) != 0 {
            large += 1;
        }
    }
    Ok((large, seen))
}

#[cfg(test)]
mod tests {
    use super::large_folio_share;
    use std::io::Write;
    use std::path::Path;

    /// Writes 4 MiB to a new file in `dir`, 1 MiB at a time, and syncs it.
    fn written(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("f");
        let mut file = std::fs::File::create(&path).unwrap();
        for _ in 0..4 {
            file.write_all(&vec![7u8; 1 << 20]).unwrap();
        }
        file.sync_all().unwrap();
        path
    }

    #[test]
    fn a_file_in_large_folios_is_told_from_one_in_small_pages() {
        // ext4 (since Linux 6.16) caches a file written 1 MiB at a time in
        // large folios; tmpfs, with huge pages off (its default), in pages.
        let host = tempfile::tempdir().unwrap();
        let large = large_folio_share(&written(host.path()), 4 << 20).unwrap();
        assert!(
            large > 0.5,
            "{}: {:.0}% in large folios; a host file system caching in large folios is needed",
            host.path().display(),
            large * 100.0
        );
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let small = large_folio_share(&written(shm.path()), 4 << 20).unwrap();
        assert_eq!(small, 0.0, "tmpfs with huge pages off");
    }
}
