//! `PAGEMAP_SCAN`: which pages of a range are present, or written since the
//! last scan.

use std::io;
use std::mem::size_of;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use rustix::io::Errno;

use super::uapi::{
    ioctl, PageRegion, PmScanArg, PAGEMAP_SCAN, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
};

/// `/proc/self/pagemap`, opened once. The file is bound to the address space
/// that opened it: a `fork`ed child must not use it (views are not inherited
/// anyway).
fn pagemap() -> io::Result<BorrowedFd<'static>> {
    static PAGEMAP: OnceLock<OwnedFd> = OnceLock::new();
    if PAGEMAP.get().is_none() {
        let file = std::fs::File::open("/proc/self/pagemap")?;
        let _ = PAGEMAP.set(file.into()); // a racing opener's fd is dropped
    }
    Ok(PAGEMAP.get().expect("set above").as_fd())
}

/// `ioctl(open("/proc/self/pagemap"), PAGEMAP_SCAN, &pm_scan_arg)` over
/// `[addr, addr + len)`, repeated until the walk reaches the end: the page-
/// aligned ranges whose pages have every category of `category_mask`, merged
/// where adjacent. With `rearm`, adds `PM_SCAN_WP_MATCHING |
/// PM_SCAN_CHECK_WPASYNC`: the kernel write-protects the pages it reports, and
/// fails with `EPERM` if a mapping in the range is not registered WP with a
/// `WP_ASYNC` userfaultfd.
pub(crate) fn pagemap_scan(
    addr: usize,
    len: usize,
    category_mask: u64,
    rearm: bool,
) -> io::Result<Vec<Range<usize>>> {
    const CHUNK: usize = 64;
    let fd = pagemap()?;
    let end = addr as u64 + len as u64;
    let mut start = addr as u64;
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut regions = [PageRegion::default(); CHUNK];
    while start < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: if rearm {
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
            } else {
                0
            },
            start,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: CHUNK as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask,
            category_anyof_mask: 0,
            return_mask: category_mask,
        };
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg`; the kernel writes
        // at most `vec_len` `struct page_region`s to `vec`, our live local
        // array of that length, and only reads page tables of
        // `start..end` (changing write protection there with `rearm`, which
        // CHECK_WPASYNC limits to WP_ASYNC-registered views).
        let n = unsafe { ioctl(fd, PAGEMAP_SCAN, &mut arg) }? as usize;
        for r in &regions[..n.min(CHUNK)] {
            let r = r.start as usize..r.end as usize;
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        if arg.walk_end <= start {
            return Err(Errno::IO.into()); // no progress: should not happen
        }
        start = arg.walk_end;
    }
    Ok(out)
}

/// `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` for
/// `PAGE_IS_WRITTEN` over `[addr, addr + len)`: the ranges written since the
/// last scan (or mapped since, see `map/mod.rs`), write-protected again as they
/// are reported, so the next scan reports only later stores.
pub(crate) fn scan_written(addr: usize, len: usize) -> io::Result<Vec<Range<usize>>> {
    pagemap_scan(addr, len, PAGE_IS_WRITTEN, true)
}
