//! The kernel interfaces of memory maps, on the ground floor below the cache:
//! `memfd.rs` (the memfd a cache's pages live in, and views of it) and
//! `uffd.rs` (userfaultfd: registration, installs, wakes, write tracking).
//!
//! How the cache uses them: a mapping's pages live in a memfd at their file
//! offsets; user maps ([`crate::MapRegion`], in `cache/mapping/region.rs`) are
//! `MAP_SHARED` views of it whose absent pages are filled on first touch
//! through userfaultfd (MISSING), from the cache or the backend, by the
//! cache's fault threads (`cache/faults.rs`, `cache/mapping/fault.rs`).
//! Read-write maps are also registered MINOR, so that a drop can hold their
//! stores back.
//!
//! What follows is why this design was chosen: the kernel behaviour it relies
//! on, each point proved by a test in `uffd.rs` (named in parentheses) on
//! Linux 6.18, x86-64.
//!
//! # Faults and installs
//! - A touch of a page absent from the memfd, through a view registered MISSING,
//!   blocks the thread and queues a MISSING event (`write` tells a store from a
//!   load). This includes faults the kernel takes for a syscall on the thread's
//!   behalf (a `write(2)` from a view): we never use `UFFD_USER_MODE_ONLY`, which
//!   would turn those into `EFAULT`. (test `missing_fault_served_through_install_view`)
//! - `UFFDIO_COPY` into *any* registered view of the memfd (a cache-owned
//!   "install view", not the faulting one) allocates the page in the memfd
//!   atomically: every view and `pread` see it. It wakes only waiters on its
//!   destination range, so after an install through the install view,
//!   `UFFDIO_WAKE` the faulting page. (same test)
//! - `UFFDIO_COPY` is "install if absent": `EEXIST` if the page exists (the page
//!   is left alone). A multi-page copy stopping at a present page returns the
//!   short count (the ioctl fails with `EAGAIN` but `copy` holds the bytes
//!   copied); the retry of the rest reports `EEXIST`. `EFAULT` past the end of
//!   the file, `ENOENT` outside this userfaultfd's registered ranges. A failed
//!   copy wakes nobody: always `UFFDIO_WAKE` after one. `EAGAIN` with nothing
//!   copied only happens with the `EVENT_*` features, which we do not request.
//!   (test `copy_into_present_page_is_eexist`)
//! - One `UFFDIO_COPY` of 16 pages installs them all and returns the full
//!   length. (test `sixteen_page_copy`)
//!
//! # Punch, truncate and the zero-page trap
//! - `fallocate(PUNCH_HOLE)` on the memfd zaps the page from every view (the
//!   ptes are gone, `PAGEMAP_SCAN` shows them not present), and the next touch
//!   through any registered view raises MISSING again. (test `punch_zaps_every_view`)
//! - After a punch, `pread` reads zeroes and allocates nothing; a reader that
//!   touches the page blocks in MISSING until the handler installs it: it never
//!   sees a zero page. With a reader spinning on a page punched 2000 times in a
//!   row, it read zero 0 times in ~2000 faults.
//!   (test `punch_then_touch_faults_instead_of_reading_zeroes`),
//!   (test `reader_racing_punches_never_reads_zeroes`)
//! - The trap: a touch (even a read) through an UNREGISTERED mapping of the
//!   memfd allocates a zero page in the file: registered views then read zeroes
//!   with no MISSING event, and `UFFDIO_COPY` fails with `EEXIST`. So the cache
//!   reads the memfd only with `pread` (or from pages it knows are present), and
//!   views are `MADV_DONTFORK` (a child would not inherit the registration).
//!   Closing the userfaultfd unregisters its views the same way: keep it alive
//!   as long as they are. (test `unregistered_touch_allocates_zero_page_hiding_missing`)
//! - Shrinking the memfd (`ftruncate`) below a mapped page: a touch there is
//!   `SIGBUS` (checked before userfaultfd, so no MISSING event), and a syscall
//!   reading it fails with `EFAULT` at once. So keeping the memfd's size at the
//!   end of file gives real-file `SIGBUS` semantics. `MADV_DONTFORK` verified:
//!   the child has no view. (test `shrink_below_mapped_page_is_sigbus`)
//!
//! # Write tracking (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`)
//! The handshake asks for `MISSING_SHMEM | MINOR_SHMEM | WP_HUGETLBFS_SHMEM |
//! WP_UNPOPULATED | WP_ASYNC`; this kernel offers all of them (0x1ffff) and
//! grants them together (0xb520), on one userfaultfd also used for MISSING. A view registered
//! `MISSING | WP` then behaves as follows ("protected" is the uffd-wp bit of
//! *that view's* pte, or a uffd-wp marker in an empty pte):
//! - A store to a protected page does not block: the kernel unprotects the pte
//!   and the store proceeds. `scan_written` (PAGE_IS_WRITTEN with
//!   `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`) reports it and protects it
//!   again: the next scan reports nothing, a later store is reported again.
//!   Reads are never reported. Scanning a view not registered WP on a WP_ASYNC
//!   userfaultfd fails with `EPERM`. (test `wp_async_reports_each_store_once`)
//! - Written = "not protected", mapped or not: the FIRST scan of a fresh view
//!   reports its whole range (whether its page table exists or not) and protects
//!   every pte, empty ones with a marker. So arm each new view with one scan and
//!   ignore that scan's report (or arm with `UFFDIO_WRITEPROTECT`, which does the
//!   same silently). After arming, a page mapped into the view later, whenever
//!   and through whichever view it was installed, maps protected: a read is not
//!   reported, a store is. (test `wp_async_arming_a_fresh_view`)
//! - `UFFDIO_COPY_MODE_WP` protects only the destination view's pte. Pages
//!   installed through the install view reach user views unprotected unless
//!   those views are armed (then they are protected by the markers).
//! - Punch: a page protected at the punch keeps a marker in every armed view,
//!   so after a refill (by `UFFDIO_COPY` or through a MISSING fault) reads are
//!   not reported and stores are. A page stored to and then punched before a
//!   scan has an unprotected empty pte: the next scan reports it (its data is
//!   gone) and re-protects it. So a store is never missed: every unprotected
//!   pte is reported. (test `wp_async_tracking_survives_punch`)
//! - Consequence: with async WP alone nothing stops a store landing between
//!   the scan that finds a page clean and the punch that drops it; that store
//!   is lost. The scan after the punch reports the page, so the loss can be
//!   detected, not prevented. Hence the store trap below.
//!
//! # Holding stores back (`MINOR_SHMEM` + zap)
//! Read-write views are registered `MISSING | WP | MINOR`; the cache's own
//! views and read-only maps `MISSING` only. On such a view:
//! - A touch of a page the file has but the view does not map is a MINOR fault
//!   (a load's or a store's); `UFFDIO_CONTINUE` with `MODE_WP` maps the file's
//!   page write-protected, so a read is not reported as a store and a store is.
//!   A page the file lacks still raises MISSING, and `CONTINUE` there is
//!   `EFAULT`. (test `minor_faults_on_present_pages_and_continue_keeps_tracking`)
//! - `MADV_DONTNEED` on the view zaps its entries and leaves the file's pages:
//!   a written entry becomes empty, which the next scan still reports, and a
//!   protected one keeps its marker. A store after the zap blocks in a MINOR
//!   fault until the handler answers; if the page was punched meanwhile,
//!   `CONTINUE` fails with `EFAULT`, and the woken toucher faults MISSING and
//!   stores into the new page. (test `zap_keeps_stores_reported_and_traps_later_ones`)
//! - So a drop that must keep stores (write back, then punch; a move by
//!   collapse or insert; a buffered write replacing a mapped page) locks the
//!   page, zaps it from the read-write views, scans, and only then reads it:
//!   later stores wait in the handler, which maps pages only under their page
//!   lock, until the page is unlocked. The price is one round trip per first
//!   touch of a cached page through a read-write map, with the next 15 cached
//!   pages mapped by the same round trip.
//!
//! # Cost (test `fault_round_trip`, printed; 2 vCPUs, a firecracker VM)
//! One 4 KiB fault served by a handler sleeping in `poll` on the other vCPU:
//! 64-75 us (13-15k faults/s), the same through the install view plus
//! `UFFDIO_WAKE` as straight into the faulting view; 5.5 us when both threads
//! share a vCPU; 24-28 us with a spinning handler (the faulting thread's own
//! wake-up remains). 16 pages per fault: about 225k pages/s across vCPUs, 620k
//! when unpinned threads happened to share one. The cross-vCPU wake-up
//! dominates, so fill in batches (fault-around) and keep the handler cheap.
#![allow(dead_code)] // until the cache uses all of this layer

pub(crate) mod memfd;
pub(crate) mod uffd;
