//! The proof of the kernel facts recorded in `map/mod.rs`, on the running
//! kernel. Every test maps a memfd several times; "user" views are
//! registered, the "install" view is registered and only ever the
//! destination of `UFFDIO_COPY`. Threads that may block in a fault run
//! under a timeout, so a wrong assumption fails instead of hanging.
use super::*;
use crate::map::memfd::{Memfd, View};
use crate::page::PAGE_SIZE;
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::process::{waitpid, Pid, Signal, WaitOptions};
use rustix::thread::{sched_setaffinity, CpuSet};
use std::ffi::c_void;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

const P: usize = PAGE_SIZE;

/// A page whose every word is `stamp`.
fn page(stamp: u64) -> Vec<u8> {
    stamp.to_ne_bytes().repeat(P / 8)
}

/// The errno a call failed with (`None` if it did not fail).
fn errno<T>(result: io::Result<T>) -> Option<Errno> {
    Errno::from_io_error(result.as_ref().err()?)
}

/// `n` pages, stamped `first`, `first + 1`, and so on.
fn stamped_pages(n: u64, first: u64) -> Vec<u8> {
    (first..first + n).map(page).collect::<Vec<_>>().concat()
}

/// The word at `addr`, an aligned address inside a live view.
fn load(addr: usize) -> u64 {
    // SAFETY: tests pass aligned addresses inside views they keep mapped
    // for the call. View memory is shared with other threads and the
    // kernel, so it is accessed only as atomics, never as plain references.
    unsafe { (*(addr as *const AtomicU64)).load(Ordering::Relaxed) }
}

/// Stores `value` to the word at `addr` (as for [`load`]).
fn store(addr: usize, value: u64) {
    // SAFETY: as in `load`; the views stored to are writable.
    unsafe { (*(addr as *const AtomicU64)).store(value, Ordering::Relaxed) }
}

/// The file's page `index` through `pread`.
fn file_page(memfd: &Memfd, index: usize) -> Vec<u8> {
    let mut buf = vec![0u8; P];
    assert_eq!(memfd.read_at(&mut buf, (index * P) as u64).unwrap(), P);
    buf
}

/// Copies `data` (whole pages) to `dst`, failing the test on error.
fn install(uffd: &Userfaultfd, dst: usize, data: &[u8], wp: bool) -> io::Result<usize> {
    // SAFETY: `data` is a live buffer of `data.len()` bytes.
    unsafe { uffd.copy(dst, data.as_ptr(), data.len(), wp, false) }
}

/// Runs `f` on a new thread and waits at most 10 s for it: a thread that
/// blocks in a fault nobody serves fails the test instead of hanging it.
fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("thread blocked (or panicked)")
}

/// A memfd of `pages` pages, a userfaultfd, a writable user view and an
/// install view, both registered (with WP if `wp`).
struct Setup {
    memfd: Arc<Memfd>,
    uffd: Arc<Userfaultfd>,
    user: View,
    install: View,
}

fn setup(pages: usize, wp: bool) -> Setup {
    let memfd = Memfd::new("filemap-test").unwrap();
    memfd.set_len((pages * P) as u64).unwrap();
    let uffd = Userfaultfd::new().unwrap();
    let user = View::new(&memfd, 0, pages * P, true).unwrap();
    let install = View::new(&memfd, 0, pages * P, true).unwrap();
    uffd.register(user.addr(), user.len(), wp).unwrap();
    uffd.register(install.addr(), install.len(), wp).unwrap();
    Setup {
        memfd: Arc::new(memfd),
        uffd: Arc::new(uffd),
        user,
        install,
    }
}

/// A fault-handling thread: serves each event with `serve`, logs them all,
/// and returns the log when stopped.
struct Handler {
    stop: Arc<EventFd>,
    thread: Option<thread::JoinHandle<Vec<Event>>>,
}

impl Handler {
    fn spawn(
        uffd: Arc<Userfaultfd>,
        serve: impl FnMut(&Userfaultfd, Event) + Send + 'static,
    ) -> Self {
        Self::spawn_opts(uffd, None, false, serve)
    }

    /// Like `spawn`, pinned to `cpu` if given, and spinning on
    /// `read_events` instead of sleeping in `poll` if `spin`.
    fn spawn_opts(
        uffd: Arc<Userfaultfd>,
        cpu: Option<usize>,
        spin: bool,
        mut serve: impl FnMut(&Userfaultfd, Event) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(EventFd::new().unwrap());
        let stop2 = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let (mut log, mut events) = (Vec::new(), Vec::new());
            if let Some(cpu) = cpu {
                pin(cpu);
            }
            if spin {
                loop {
                    if stop2.drain().unwrap() > 0 {
                        return log;
                    }
                    uffd.read_events(&mut events).unwrap();
                    for &e in &events {
                        log.push(without_thread(e));
                        serve(&uffd, e);
                    }
                }
            }
            loop {
                match wait_readable(uffd.as_fd(), stop2.as_fd(), None).unwrap() {
                    Readiness::Fd => {
                        uffd.read_events(&mut events).unwrap();
                        for &e in &events {
                            log.push(without_thread(e));
                            serve(&uffd, e);
                        }
                    }
                    Readiness::Wake => return log,
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Event> {
        self.stop.signal().unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.signal();
            let _ = t.join();
        }
    }
}

/// Serves MISSING faults in any of `views` (address, length; all mapping
/// the file from offset 0) by copying page `stamp(index)` into the install
/// view at `install`, then waking the faulting page.
fn installer(
    views: Vec<(usize, usize)>,
    install: usize,
    stamp: impl Fn(usize) -> u64 + Send + 'static,
) -> impl FnMut(&Userfaultfd, Event) + Send + 'static {
    move |uffd, e| {
        let Event::Missing { addr, .. } = e else {
            return;
        };
        let (base, _) = *views
            .iter()
            .find(|&&(a, l)| (a..a + l).contains(&addr))
            .expect("fault outside the test's views");
        let index = (addr - base) / P;
        // EEXIST (a racing install) is fine: the page is there.
        let _ = install_page(uffd, install + index * P, stamp(index));
        uffd.wake(addr, P).unwrap();
    }
}

fn install_page(uffd: &Userfaultfd, dst: usize, stamp: u64) -> io::Result<usize> {
    install(uffd, dst, &page(stamp), false)
}

fn missing(addr: usize, write: bool) -> Event {
    Event::Missing {
        addr,
        write,
        thread: 0,
    }
}

/// The event as logged: thread ids differ from run to run.
fn without_thread(event: Event) -> Event {
    match event {
        Event::Missing { addr, write, .. } => missing(addr, write),
        Event::Minor { addr, write, .. } => Event::Minor {
            addr,
            write,
            thread: 0,
        },
        other => other,
    }
}

fn present(addr: usize, len: usize) -> Vec<Range<usize>> {
    pagemap_scan(addr, len, PAGE_IS_PRESENT, false).unwrap()
}

#[test]
fn handshake_grants_the_wanted_features() {
    let available = available_features().unwrap();
    let uffd = Userfaultfd::new().unwrap();
    println!(
        "userfaultfd: available features {available:#x}, granted {:#x}, wp_async {}",
        uffd.features(),
        uffd.has_wp_async()
    );
    assert_eq!(uffd.features(), WANTED_FEATURES & available);
    assert!(uffd.features() & FEATURE_MISSING_SHMEM != 0);
}

/// Test 1: a touch of an absent page blocks in MISSING; the handler
/// installs it through the install view and wakes the faulting page; every
/// view and `pread` see it. Also for a store, and for a kernel access
/// (`write` from the view) that faults on the thread's behalf.
#[test]
fn missing_fault_served_through_install_view() {
    let s = setup(4, false);
    let third = View::new(&s.memfd, 0, 4 * P, true).unwrap(); // unregistered
    let (u, len) = (s.user.addr(), s.user.len());
    let h = Handler::spawn(
        Arc::clone(&s.uffd),
        installer(vec![(u, len)], s.install.addr(), |i| 0x1000 + i as u64),
    );

    assert_eq!(in_thread(move || load(u + P)), 0x1001);
    in_thread(move || store(u + 2 * P + 8, 77));
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    let written = in_thread(move || {
        // libc: rustix's write takes a slice, and view memory is never one.
        // SAFETY: `u + 3P .. u + 4P` is inside the user view, kept mapped
        // until the thread is joined; the kernel reads it (faulting).
        unsafe { libc::write(fd, (u + 3 * P) as *const libc::c_void, P) }
    });
    assert_eq!(written, P as isize);
    let mut got = vec![0u8; P];
    std::io::Read::read_exact(&mut b, &mut got).unwrap();
    assert!(
        got == page(0x1003),
        "write() from the view read the installed page"
    );

    let log = h.stop();
    assert_eq!(
        log,
        [
            missing(u + P, false),
            missing(u + 2 * P, true),
            missing(u + 3 * P, false)
        ]
    );
    // The installed pages are in the file: a third view and pread see them.
    let t = third.addr();
    assert_eq!(
        (load(t + P), load(t + 2 * P), load(t + 2 * P + 8)),
        (0x1001, 0x1002, 77)
    );
    assert!(file_page(&s.memfd, 1) == page(0x1001));
    let mut expect = page(0x1002);
    expect[8..16].copy_from_slice(&77u64.to_ne_bytes());
    assert!(file_page(&s.memfd, 2) == expect);
    assert!(!s.memfd.page_present(0).unwrap(), "page 0 never touched");
}

/// Test 2: UFFDIO_COPY is "install if absent": EEXIST on a present page;
/// a multi-page copy stopping at a present page returns a short count.
#[test]
fn copy_into_present_page_is_eexist() {
    let s = setup(4, false);
    let i = s.install.addr();
    assert_eq!(install_page(&s.uffd, i, 1).unwrap(), P);
    let err = install_page(&s.uffd, i, 2).unwrap_err();
    assert_eq!(Errno::from_io_error(&err), Some(Errno::EXIST));
    s.uffd.wake(i, P).unwrap(); // a failed copy wakes no one
    assert!(
        file_page(&s.memfd, 0) == page(1),
        "EEXIST left the page alone"
    );

    // Pages 1..4 with page 2 present: page 1 is copied, then a short count.
    install_page(&s.uffd, i + 2 * P, 2).unwrap();
    let three = [page(9), page(9), page(9)].concat();
    assert_eq!(install(&s.uffd, i + P, &three, false).unwrap(), P);
    let err = install(&s.uffd, i + 2 * P, &three[P..], false).unwrap_err();
    assert_eq!(Errno::from_io_error(&err), Some(Errno::EXIST));
    assert_eq!(
        install(&s.uffd, i + 3 * P, &three[2 * P..], false).unwrap(),
        P
    );
    let stamps: Vec<u64> = (0..4).map(|p| load(i + p * P)).collect();
    assert_eq!(stamps, [1, 9, 2, 9]);

    // Past the end of the file: EFAULT, not SIGBUS.
    s.memfd.set_len(3 * P as u64).unwrap();
    let err = install_page(&s.uffd, i + 3 * P, 5).unwrap_err();
    assert_eq!(Errno::from_io_error(&err), Some(Errno::FAULT));
    // Outside any registered range: ENOENT.
    let other = View::new(&s.memfd, 0, P, true).unwrap();
    let err = install_page(&s.uffd, other.addr(), 5).unwrap_err();
    assert_eq!(Errno::from_io_error(&err), Some(Errno::NOENT));
}

/// Test 3: a punch zaps the page from every view; the next touch through
/// a registered view raises MISSING again.
#[test]
fn punch_zaps_every_view() {
    let s = setup(2, false);
    let v2 = View::new(&s.memfd, 0, 2 * P, true).unwrap();
    s.uffd.register(v2.addr(), v2.len(), false).unwrap();
    let (u, w) = (s.user.addr(), v2.addr());
    let stamp = Arc::new(AtomicU64::new(1));
    let st = Arc::clone(&stamp);
    let h = Handler::spawn(
        Arc::clone(&s.uffd),
        installer(vec![(u, 2 * P), (w, 2 * P)], s.install.addr(), move |_| {
            st.load(Ordering::SeqCst)
        }),
    );

    assert_eq!(in_thread(move || load(u)), 1); // fault
    assert_eq!(in_thread(move || load(w)), 1); // present: no fault
    assert_eq!(present(u, P), [u..u + P]);
    assert_eq!(present(w, P), [w..w + P]);

    s.memfd.punch(0, P as u64).unwrap();
    assert!(!s.memfd.page_present(0).unwrap());
    assert!(present(u, P).is_empty(), "punch zapped the user view");
    assert!(present(w, P).is_empty(), "punch zapped the second view");
    assert!(
        present(s.install.addr(), P).is_empty(),
        "and the install view"
    );

    stamp.store(2, Ordering::SeqCst);
    assert_eq!(in_thread(move || load(w)), 2); // fault in the second view
    assert_eq!(in_thread(move || load(u)), 2); // present again: no fault
    s.memfd.punch(0, P as u64).unwrap();
    stamp.store(3, Ordering::SeqCst);
    assert_eq!(in_thread(move || load(u)), 3); // fault in the user view
    assert_eq!(
        h.stop(),
        [missing(u, false), missing(w, false), missing(u, false)]
    );
}

/// Test 4: a reader of a registered view never sees a zero page that a
/// punch could leave behind: after the punch the page is a hole (pread
/// reads zeroes without allocating) until the handler installs it.
#[test]
fn punch_then_touch_faults_instead_of_reading_zeroes() {
    let s = setup(1, false);
    let u = s.user.addr();
    let i = s.install.addr();
    install_page(&s.uffd, i, 1).unwrap();
    assert_eq!(load(u), 1);

    s.memfd.punch(0, P as u64).unwrap();
    assert!(!s.memfd.page_present(0).unwrap());
    assert!(
        file_page(&s.memfd, 0) == page(0),
        "pread of the hole reads zeroes"
    );
    assert!(!s.memfd.page_present(0).unwrap(), "and does not allocate");

    // The handler checks, at the fault, that the page is still a hole.
    let (tx, rx) = mpsc::channel();
    let memfd = Arc::clone(&s.memfd);
    let mut serve = installer(vec![(u, P)], i, |_| 2);
    let h = Handler::spawn(Arc::clone(&s.uffd), move |uffd, e| {
        let _ = tx.send(memfd.page_present(0).unwrap());
        serve(uffd, e);
    });
    assert_eq!(in_thread(move || load(u)), 2);
    assert_eq!(h.stop(), [missing(u, false)]);
    assert_eq!(rx.try_recv(), Ok(false), "absent while the reader waited");
    assert!(file_page(&s.memfd, 0) == page(2));
}

/// Test 4, racing: a reader spins on a registered view while another
/// thread punches the page over and over; it must only ever read
/// installed stamps (never a zero page).
#[test]
fn reader_racing_punches_never_reads_zeroes() {
    let s = setup(1, false);
    let u = s.user.addr();
    let next = AtomicU64::new(1);
    let h = Handler::spawn(
        Arc::clone(&s.uffd),
        installer(vec![(u, P)], s.install.addr(), move |_| {
            next.fetch_add(1, Ordering::SeqCst)
        }),
    );
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let reader = thread::spawn(move || {
        let (mut loads, mut zeroes, mut last) = (0u64, 0u64, 0u64);
        while !d.load(Ordering::Relaxed) {
            let v = load(u);
            if v == 0 {
                zeroes += 1;
            }
            assert!(v >= last, "stamps only grow");
            last = v;
            loads += 1;
        }
        (loads, zeroes)
    });
    let punches = 2000;
    for _ in 0..punches {
        s.memfd.punch(0, P as u64).unwrap();
        thread::sleep(Duration::from_micros(20));
    }
    done.store(true, Ordering::Relaxed);
    // The reader may be blocked in a fault: the handler still serves it.
    let (loads, zeroes) = reader.join().unwrap();
    let faults = h.stop().len();
    println!(
        "racing punch: {punches} punches, {faults} faults, {loads} loads, {zeroes} zero reads"
    );
    assert_eq!(zeroes, 0);
    assert!(faults > 1);
}

/// Test 5 (the trap): a touch through an UNREGISTERED view of a hole
/// allocates a zero page in the file, which hides MISSING from every
/// registered view afterwards.
#[test]
fn unregistered_touch_allocates_zero_page_hiding_missing() {
    let s = setup(1, false);
    let u = s.user.addr();
    let plain = View::new(&s.memfd, 0, P, false).unwrap();
    let h = Handler::spawn(
        Arc::clone(&s.uffd),
        installer(vec![(u, P)], s.install.addr(), |_| 7),
    );
    assert!(!s.memfd.page_present(0).unwrap());
    assert_eq!(load(plain.addr()), 0); // a read, through a read-only view
    assert!(
        s.memfd.page_present(0).unwrap(),
        "the read allocated a page"
    );
    assert_eq!(
        in_thread(move || load(u)),
        0,
        "the registered view reads zeroes"
    );
    let err = install_page(&s.uffd, s.install.addr(), 7).unwrap_err();
    assert_eq!(
        Errno::from_io_error(&err),
        Some(Errno::EXIST),
        "and nothing can be installed"
    );
    assert!(h.stop().is_empty(), "no MISSING fault was raised");
}

fn wp_setup(pages: usize) -> Option<Setup> {
    let s = setup(pages, true);
    if !s.uffd.has_wp_async() {
        println!("WP_ASYNC not granted: write tracking tests skipped");
        return None;
    }
    Some(s)
}

fn pages(base: usize, idx: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &i in idx {
        let r = base + i * P..base + (i + 1) * P;
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// Test 6: stores through a view registered MISSING|WP with WP_ASYNC, into
/// pages installed write-protected, do not block and are reported once per
/// scan.
#[test]
fn wp_async_reports_each_store_once() {
    let Some(s) = wp_setup(4) else { return };
    let (u, len) = (s.user.addr(), s.user.len());
    let data = stamped_pages(4, 1);
    assert_eq!(install(&s.uffd, u, &data, true).unwrap(), 4 * P);
    assert!(
        scan_written(u, len).unwrap().is_empty(),
        "installed protected"
    );
    assert_eq!(load(u + P), 2); // reads are not stores
    in_thread(move || store(u + 2 * P, 30)); // does not block
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[2]));
    assert!(
        scan_written(u, len).unwrap().is_empty(),
        "re-armed by the scan"
    );
    in_thread(move || store(u + 2 * P + 8, 31));
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[2]));
    in_thread(move || {
        store(u, 10);
        store(u + 3 * P, 40);
        store(u + 2 * P, 32);
    });
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[0, 2, 3]));
    assert_eq!(file_page(&s.memfd, 3)[..8], 40u64.to_ne_bytes());
    // A scan over a view not registered WP fails (CHECK_WPASYNC).
    let err = scan_written(s.install.addr() + len, P);
    let plain = View::new(&s.memfd, 0, P, true).unwrap();
    let err2 = scan_written(plain.addr(), P).unwrap_err();
    println!("scan of unmapped range: {err:?}; of an unregistered view: {err2:?}");
    assert_eq!(Errno::from_io_error(&err2), Some(Errno::PERM));
}

/// Test 6, arming: how a view registered WP starts tracking, and which
/// pages mapped into it after the arming are reported. Each page is
/// installed through the install view after the arming, then read or
/// stored through the view. Three ways to arm an 8-page window of a view:
/// one scan while nothing of its 2 MiB page table exists, one scan after a
/// page of the window was mapped (the page table exists), and
/// UFFDIO_WRITEPROTECT.
#[test]
fn wp_async_arming_a_fresh_view() {
    const VIEW: usize = 1024; // pages: holds an aligned 2 MiB window
    let Some(s) = wp_setup(3 * VIEW) else { return };
    let i = s.install.addr();
    for (k, arm) in [
        "scan, no page table",
        "scan, page table",
        "UFFDIO_WRITEPROTECT",
    ]
    .into_iter()
    .enumerate()
    {
        let view = View::new(&s.memfd, (k * VIEW * P) as u64, VIEW * P, true).unwrap();
        s.uffd.register(view.addr(), view.len(), true).unwrap();
        // The window: 8 pages at the start of a 2 MiB-aligned region of the
        // view, so no other mapping shares its page table.
        let a = view.addr().next_multiple_of(512 * P);
        let (len, j) = (8 * P, k * VIEW + (a - view.addr()) / P); // j: its file page
        let rel = |v: &[Range<usize>]| {
            v.iter()
                .map(|r| (r.start - a) / P..(r.end - a) / P)
                .collect::<Vec<_>>()
        };
        if k == 1 {
            install_page(&s.uffd, i + j * P, 1).unwrap();
            assert_eq!(load(a), 1);
        }
        let arming = if k == 2 {
            s.uffd.write_protect(a, len, true).unwrap();
            Vec::new()
        } else {
            scan_written(a, len).unwrap()
        };
        assert!(scan_written(a, len).unwrap().is_empty(), "armed");
        // After arming: +1 installed and read, +2 installed and stored, +3
        // installed with WP (into the install view) then stored.
        install_page(&s.uffd, i + (j + 1) * P, 2).unwrap();
        install_page(&s.uffd, i + (j + 2) * P, 3).unwrap();
        install(&s.uffd, i + (j + 3) * P, &page(4), true).unwrap();
        assert_eq!(load(a + P), 2);
        in_thread(move || {
            store(a + 2 * P, 30);
            store(a + 3 * P, 40);
        });
        let first = scan_written(a, len).unwrap();
        let second = scan_written(a, len).unwrap();
        in_thread(move || store(a + P, 20));
        let third = scan_written(a, len).unwrap();
        println!(
            "arm by {arm}: arming scan {:?}; after read +1, store +2, +3: {:?}; again: {:?}; after store +1: {:?}",
            rel(&arming),
            rel(&first),
            rel(&second),
            rel(&third)
        );
        // The arming scan reports every page that is not protected, mapped
        // or not, page table or not, and protects it (an empty pte gets a
        // uffd-wp marker). UFFDIO_WRITEPROTECT does the same silently.
        // From then on a page mapped into the view, whenever it was
        // installed and through whichever view, maps protected: reads are
        // not reported, stores are.
        assert_eq!(rel(&arming), if k == 2 { vec![] } else { vec![0..8] });
        assert_eq!(rel(&first), [2..4]);
        assert!(second.is_empty());
        assert_eq!(rel(&third), [1..2]);
    }
}

/// Test 6, punch: is a store tracked after its page was punched and
/// installed again (installed before the next touch, or by a MISSING
/// fault), for a page protected or written at the time of the punch?
#[test]
fn wp_async_tracking_survives_punch() {
    let Some(s) = wp_setup(4) else { return };
    let (u, len, i) = (s.user.addr(), s.user.len(), s.install.addr());
    install(&s.uffd, u, &stamped_pages(4, 1), true).unwrap();
    in_thread(move || {
        store(u + P, 20);
        store(u + 3 * P, 40);
    });
    // Page 0 protected, page 1 written (not yet scanned) at the punch.
    s.memfd.punch(0, 2 * P as u64).unwrap();
    let after_punch = scan_written(u, len).unwrap();
    install_page(&s.uffd, i, 5).unwrap();
    install_page(&s.uffd, i + P, 6).unwrap();
    assert_eq!((load(u), load(u + P)), (5, 6)); // map them by reading
    let after_read = scan_written(u, len).unwrap();
    in_thread(move || {
        store(u, 50);
        store(u + P, 60);
    });
    let after_store = scan_written(u, len).unwrap();
    // Page 2, protected, punched and refilled through a MISSING fault.
    s.memfd.punch(2 * P as u64, P as u64).unwrap();
    let h = Handler::spawn(Arc::clone(&s.uffd), installer(vec![(u, len)], i, |_| 7));
    assert_eq!(in_thread(move || load(u + 2 * P)), 7);
    let fault_read = scan_written(u, len).unwrap();
    in_thread(move || store(u + 2 * P, 70));
    let fault_store = scan_written(u, len).unwrap();
    assert_eq!(h.stop(), [missing(u + 2 * P, false)]);
    let rel = |v: &[Range<usize>]| {
        v.iter()
            .map(|r| (r.start - u) / P..(r.end - u) / P)
            .collect::<Vec<_>>()
    };
    println!(
        "punch: after punch {:?}; reinstalled+read {:?}; stored {:?}; refilled by fault+read {:?}; stored {:?}",
        rel(&after_punch),
        rel(&after_read),
        rel(&after_store),
        rel(&fault_read),
        rel(&fault_store)
    );
    // Page 3 was written: reported. Page 1 was written, then punched: its
    // zapped pte is empty and unprotected, which a scan reports as written
    // (and protects with a marker). Page 0 was protected at the punch: the
    // zap leaves a uffd-wp marker, not reported.
    assert_eq!(after_punch, pages(u, &[1, 3]));
    // Both refilled pages map protected: reads are not reported, stores are.
    assert!(after_read.is_empty());
    assert_eq!(after_store, pages(u, &[0, 1]));
    // The same for a page refilled through a MISSING fault.
    assert!(fault_read.is_empty());
    assert_eq!(fault_store, pages(u, &[2]));
}

/// A memfd of `pages` pages with a user view registered as a store trap
/// (`MISSING | WP | MINOR`) and armed, and an install view registered
/// MISSING only, as the cache registers them; `None` without the features.
fn trap_setup(pages: usize) -> Option<Setup> {
    let memfd = Memfd::new("filemap-test").unwrap();
    memfd.set_len((pages * P) as u64).unwrap();
    let uffd = Userfaultfd::new().unwrap();
    if !uffd.has_store_trap() {
        println!("MINOR_SHMEM or WP_ASYNC not granted: store trap tests skipped");
        return None;
    }
    let user = View::new(&memfd, 0, pages * P, true).unwrap();
    let install = View::new(&memfd, 0, pages * P, true).unwrap();
    uffd.register_store_trap(user.addr(), user.len()).unwrap();
    uffd.register(install.addr(), install.len(), false).unwrap();
    scan_written(user.addr(), user.len()).unwrap(); // arm
    Some(Setup {
        memfd: Arc::new(memfd),
        uffd: Arc::new(uffd),
        user,
        install,
    })
}

/// Waits at most 10 s for one fault event.
fn next_event(uffd: &Userfaultfd) -> Event {
    let stop = EventFd::new().unwrap();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ready = wait_readable(uffd.as_fd(), stop.as_fd(), Some(Duration::from_millis(100)));
        if matches!(ready, Ok(Readiness::Fd)) && uffd.read_events(&mut events).unwrap() > 0 {
            assert_eq!(events.len(), 1, "one fault at a time: {events:?}");
            return without_thread(events[0]);
        }
    }
    panic!("no fault event within 10 s");
}

fn minor(addr: usize, write: bool) -> Event {
    Event::Minor {
        addr,
        write,
        thread: 0,
    }
}

/// Test 8, the store trap: on a view registered `MISSING | WP | MINOR`,
/// a touch of a page the file has (installed through the install view) but
/// the view does not map is a MINOR fault, a read's and a store's alike;
/// `UFFDIO_CONTINUE` with `MODE_WP` maps it protected, so a read is not
/// reported as a store and a store is. MISSING faults still come for pages
/// the file lacks. All three modes coexist on one shmem view.
#[test]
fn minor_faults_on_present_pages_and_continue_keeps_tracking() {
    let Some(s) = trap_setup(4) else { return };
    let (u, len, i) = (s.user.addr(), s.user.len(), s.install.addr());
    let data = [page(1), page(2)].concat();
    install(&s.uffd, i, &data, false).unwrap(); // pages 0 and 1, not mapped in u
    let reader = thread::spawn(move || load(u));
    assert_eq!(next_event(&s.uffd), minor(u, false));
    assert_eq!(s.uffd.continue_pages(u, P).unwrap(), P); // wakes the reader
    assert_eq!(reader.join().unwrap(), 1);
    let storer = thread::spawn(move || store(u + P, 20));
    assert_eq!(next_event(&s.uffd), minor(u + P, true));
    s.uffd.continue_pages(u + P, P).unwrap();
    storer.join().unwrap();
    assert_eq!(
        scan_written(u, len).unwrap(),
        pages(u, &[1]),
        "the read of page 0 is not a store; the store to page 1 is"
    );
    in_thread(move || store(u, 10)); // mapped now: no fault
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[0]));
    assert_eq!(errno(s.uffd.continue_pages(u, P)), Some(Errno::EXIST));
    // Page 2 is not in the file: MISSING, and CONTINUE there is EFAULT.
    let toucher = thread::spawn(move || load(u + 2 * P));
    assert_eq!(next_event(&s.uffd), missing(u + 2 * P, false));
    assert_eq!(
        errno(s.uffd.continue_pages(u + 2 * P, P)),
        Some(Errno::FAULT)
    );
    install_page(&s.uffd, i + 2 * P, 3).unwrap();
    // Installed through the install view: the toucher's view now needs a
    // CONTINUE (which also wakes it), or it faults MINOR on its retry.
    s.uffd.continue_pages(u + 2 * P, P).unwrap();
    assert_eq!(toucher.join().unwrap(), 3);
    assert!(scan_written(u, len).unwrap().is_empty());
}

/// Test 8, holding stores back: zapping a tracked view's entries of a page
/// (`MADV_DONTNEED`) keeps what was written reported (the written entry is
/// left empty, which the next scan reports; a protected one keeps its
/// marker), and a later store through the view blocks in a MINOR fault until
/// the handler answers. If the page was punched meanwhile, `CONTINUE` fails
/// with `EFAULT`; the toucher, woken, faults MISSING and stores into the new
/// page. This is the drop sequence: lock, zap, scan, write back, punch.
#[test]
fn zap_keeps_stores_reported_and_traps_later_ones() {
    let Some(s) = trap_setup(4) else { return };
    let (u, len, i) = (s.user.addr(), s.user.len(), s.install.addr());
    install(&s.uffd, i, &stamped_pages(4, 1), false).unwrap();
    s.uffd.continue_pages(u, 4 * P).unwrap();
    in_thread(move || {
        store(u + P, 20);
        assert_eq!(load(u + 2 * P), 3);
    });
    // SAFETY: the range is the user view, alive for the whole test.
    unsafe { crate::map::memfd::zap(u, len) }.unwrap();
    assert_eq!(
        present(u, len),
        Vec::<Range<usize>>::new(),
        "zapped from the view"
    );
    assert!(s.memfd.page_present(P as u64).unwrap(), "still in the file");
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[1]));
    // A store now waits in a MINOR fault: it does not reach the file.
    let done = Arc::new(AtomicBool::new(false));
    let storer = thread::spawn({
        let done = Arc::clone(&done);
        move || {
            store(u + 2 * P, 30);
            done.store(true, Ordering::SeqCst);
        }
    });
    assert_eq!(next_event(&s.uffd), minor(u + 2 * P, true));
    thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "the store is held back");
    assert!(file_page(&s.memfd, 2) == page(3));
    // The page is dropped meanwhile; the handler's CONTINUE finds it gone.
    s.memfd.punch(2 * P as u64, P as u64).unwrap();
    assert_eq!(
        errno(s.uffd.continue_pages(u + 2 * P, P)),
        Some(Errno::FAULT)
    );
    s.uffd.wake(u + 2 * P, P).unwrap();
    assert_eq!(next_event(&s.uffd), missing(u + 2 * P, true));
    install_page(&s.uffd, i + 2 * P, 7).unwrap();
    s.uffd.continue_pages(u + 2 * P, P).unwrap();
    storer.join().unwrap();
    let mut expect = page(7);
    expect[..8].copy_from_slice(&30u64.to_ne_bytes());
    assert!(file_page(&s.memfd, 2) == expect, "stored into the new page");
    assert_eq!(scan_written(u, len).unwrap(), pages(u, &[2]));
}

/// Test 7: shrinking the file below a mapped page makes a touch there
/// SIGBUS (in a forked child), and a kernel access through a registered
/// view EFAULT (no MISSING fault). The child also proves MADV_DONTFORK.
#[test]
fn shrink_below_mapped_page_is_sigbus() {
    let s = setup(2, false);
    let (u, i) = (s.user.addr(), s.install.addr());
    let data = [page(1), page(2)].concat();
    install(&s.uffd, i, &data, false).unwrap();
    // A plain mapping without MADV_DONTFORK, for the child.
    // SAFETY: null hint, no MAP_FIXED: a new range the kernel chooses.
    let raw = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            2 * P,
            ProtFlags::READ,
            MapFlags::SHARED,
            s.memfd.as_fd(),
            0,
        )
    }
    .unwrap() as usize;
    assert_eq!((load(raw), load(raw + P)), (1, 2));
    assert_eq!((load(u), load(u + P)), (1, 2));
    s.memfd.set_len(P as u64).unwrap();
    assert_eq!(s.memfd.len().unwrap(), P as u64);

    // libc: rustix has no fork, mincore or _exit (but in its unstable runtime
    // API), so the child is made and run through libc.
    // SAFETY: the child only loads from mapped memory, calls mincore and
    // _exit (async-signal-safe, no allocation, no locks).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut vec = 0u8;
        // SAFETY: mincore writes one byte for one page into `vec`.
        let dontfork = unsafe { libc::mincore(u as *mut libc::c_void, P, &mut vec) } == -1;
        if !dontfork {
            // SAFETY: _exit ends the child without running anything.
            unsafe { libc::_exit(3) };
        }
        if load(raw) != 1 {
            // SAFETY: as above.
            unsafe { libc::_exit(2) };
        }
        // Past the end of the file: SIGBUS.
        load(raw + P);
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0);
    let child = Pid::from_raw(pid).expect("positive");
    let (waited, status) = waitpid(Some(child), WaitOptions::empty())
        .unwrap()
        .expect("a status without WNOHANG");
    assert_eq!(waited, child);
    assert!(
        status.terminating_signal() == Some(Signal::BUS.as_raw()),
        "child status {:#x} (exit 3: view inherited; 2: page 0 wrong; 0: no SIGBUS)",
        status.as_raw()
    );

    // A syscall reading the registered view past the end: EFAULT at once,
    // and no MISSING event.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    // libc: rustix's write takes a slice, and view memory is never one.
    // SAFETY: `u + P` is inside the user view; the kernel reads it.
    let rc = unsafe { libc::write(a.as_raw_fd(), (u + P) as *const libc::c_void, 8) };
    assert_eq!(rc, -1);
    assert_eq!(
        Errno::from_io_error(&io::Error::last_os_error()),
        Some(Errno::FAULT)
    );
    let mut events = Vec::new();
    assert_eq!(s.uffd.read_events(&mut events).unwrap(), 0);
    // SAFETY: unmaps the plain mapping made above, used by nothing else.
    unsafe { rustix::mm::munmap(raw as *mut c_void, 2 * P) }.unwrap();
}

/// Test 8: one UFFDIO_COPY installs 16 pages and returns the full length.
#[test]
fn sixteen_page_copy() {
    let s = setup(16, false);
    let data = stamped_pages(16, 100);
    assert_eq!(
        install(&s.uffd, s.install.addr(), &data, false).unwrap(),
        16 * P
    );
    for p in 0..16 {
        assert!(s.memfd.page_present((p * P) as u64).unwrap());
        assert_eq!(load(s.user.addr() + p * P), p as u64 + 100); // no fault
    }
    let mut events = Vec::new();
    assert_eq!(s.uffd.read_events(&mut events).unwrap(), 0);
}

/// Test 9: the fault round trip, printed: a thread touches N fresh pages
/// one by one; a handler serves each with a 4 KiB copy (into the install
/// view then a wake, or straight into the faulting view), or with 16 pages.
#[test]
fn fault_round_trip() {
    const N: usize = 2000;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let other = if cpus > 1 { Some(1) } else { None };
    for (name, batch, direct, handler_cpu, spin) in [
        (
            "install view + wake, poll, other CPU",
            1,
            false,
            other,
            false,
        ),
        ("faulting view, poll, other CPU", 1, true, other, false),
        ("faulting view, poll, same CPU", 1, true, Some(0), false),
        ("faulting view, spinning, other CPU", 1, true, other, true),
        (
            "install view + wake, spinning, other CPU",
            1,
            false,
            other,
            true,
        ),
        (
            "16 pages into faulting view, poll, other CPU",
            16,
            true,
            other,
            false,
        ),
    ] {
        let s = setup(N, false);
        let (u, i) = (s.user.addr(), s.install.addr());
        let buf = page(1).repeat(batch);
        let serve = move |uffd: &Userfaultfd, e| {
            let Event::Missing { addr, .. } = e else {
                return;
            };
            let n = batch.min(N - (addr - u) / P);
            let off = addr - u;
            // SAFETY: `buf` is a live buffer of at least `n` pages.
            let res = unsafe {
                if direct {
                    uffd.copy(addr, buf.as_ptr(), n * P, false, true)
                } else {
                    uffd.copy(i + off, buf.as_ptr(), n * P, false, false)
                }
            };
            if !direct || res.is_err() {
                uffd.wake(addr, P).unwrap();
            }
        };
        let h = Handler::spawn_opts(Arc::clone(&s.uffd), handler_cpu, spin, serve);
        let elapsed = in_thread(move || {
            pin(0);
            let start = Instant::now();
            let mut sum = 0;
            for p in 0..N {
                sum += load(u + p * P);
            }
            assert_eq!(sum, N as u64);
            start.elapsed()
        });
        let f = h.stop().len();
        println!(
            "fault round trip, {name}: {N} pages, {f} faults in {elapsed:?}: \
             {:.1} us/fault, {:.0} faults/s, {:.0} pages/s",
            elapsed.as_secs_f64() * 1e6 / f as f64,
            f as f64 / elapsed.as_secs_f64(),
            N as f64 / elapsed.as_secs_f64()
        );
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).unwrap();
}
