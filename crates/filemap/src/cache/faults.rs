//! The fault service of a cache: one userfaultfd for all its mappings and a
//! fixed number of threads that serve the MISSING and MINOR faults of every
//! view registered with it, the cache's own and the user's maps.
//!
//! Nothing of it exists until the first map: a cache that is never mapped
//! needs no userfaultfd (which an unprivileged process may not create) and
//! runs no fault thread. The service routes a fault by its address to the
//! mapping whose view holds it, which it knows only as [`ServesFaults`] and
//! holds only weakly, so the users' handles and maps decide how long a mapping
//! lives. A mapping serves its fault by filling the page under the Fill mode
//! of the coherence lock, exactly as a read miss does.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{JoinHandle, ThreadId};

use crate::errno::with_message;
use crate::map::uffd::{wait_readable, Event, EventFd, Readiness, Userfaultfd};
use crate::page::PAGE_SIZE;
use crate::sync::{Mutex, RwLock};

/// What serves the faults of a view.
pub(crate) trait ServesFaults: Send + Sync {
    /// Serves a fault at `addr` by thread `thread` (0 if unknown), and wakes
    /// the toucher.
    fn serve_fault(&self, addr: usize, thread: u32);
}

/// Where faults go.
#[derive(Default)]
struct RouteTable {
    /// Start address of a view or region -> its end and whom its faults go to.
    owners: BTreeMap<usize, (usize, Weak<dyn ServesFaults>)>,
    /// The page store's own views (start -> end). A fault there that no owner
    /// takes is an optimistic reader's late touch of a region given back: it
    /// gets a page of zeroes, which the next owner's region is cleared of
    /// (see [`FaultService::route_cleared`]).
    store_views: BTreeMap<usize, usize>,
}

type Routes = RwLock<RouteTable>;

/// The entry of `map` (start -> entry) whose range holds `addr`, given each
/// entry's end.
fn holding<V>(map: &BTreeMap<usize, V>, addr: usize, end: impl Fn(&V) -> usize) -> Option<&V> {
    map.range(..=addr)
        .next_back()
        .map(|(_, value)| value)
        .filter(|value| addr < end(value))
}

/// The fault service of one cache (see the module docs).
pub(crate) struct FaultService {
    threads: usize,
    running: OnceLock<Running>,
    /// Serialises the start (rare; `running` is read without a lock).
    starting: Mutex<()>,
    routes: Arc<Routes>,
}

/// The userfaultfd and the threads reading it, once started.
struct Running {
    uffd: Arc<Userfaultfd>,
    stop: Arc<EventFd>,
    threads: Vec<(JoinHandle<()>, ThreadId, String)>,
}

/// Numbers fault threads, so each has a name of its own.
static FAULT_THREADS: AtomicU64 = AtomicU64::new(0);

impl FaultService {
    /// A service that will run `threads` threads once started.
    pub(crate) fn new(threads: usize) -> Self {
        FaultService {
            threads,
            running: OnceLock::new(),
            starting: Mutex::new(()),
            routes: Arc::new(Routes::default()),
        }
    }

    /// The userfaultfd, if the service was started.
    pub(crate) fn uffd(&self) -> Option<&Arc<Userfaultfd>> {
        self.running.get().map(|running| &running.uffd)
    }

    /// The userfaultfd, creating it and starting the threads on the first
    /// call. Where the kernel refuses an unprivileged process a userfaultfd,
    /// `EPERM` with a message that says what would allow it.
    pub(crate) fn start(&self) -> io::Result<&Arc<Userfaultfd>> {
        if let Some(running) = self.running.get() {
            return Ok(&running.uffd);
        }
        let _starting = self.starting.lock();
        if self.running.get().is_none() {
            let running = self.run()?;
            let _ = self.running.set(running);
        }
        Ok(&self.running.get().expect("just started").uffd)
    }

    fn run(&self) -> io::Result<Running> {
        let uffd = Arc::new(Userfaultfd::new().map_err(|error| {
            if error.raw_os_error() == Some(libc::EPERM) {
                with_message(
                    libc::EPERM,
                    "memory maps need a userfaultfd, which the kernel refuses this process: \
                     allow it with the sysctl vm.unprivileged_userfaultfd=1, read-write \
                     access to /dev/userfaultfd, or the capability CAP_SYS_PTRACE",
                )
            } else {
                error
            }
        })?);
        let stop = Arc::new(EventFd::new()?);
        let mut threads = Vec::with_capacity(self.threads);
        for _ in 0..self.threads {
            // Thread names are at most 15 bytes on Linux.
            let name = format!(
                "fm-faults-{}",
                FAULT_THREADS.fetch_add(1, Ordering::Relaxed) % 100_000
            );
            let (uffd, stop, routes) = (uffd.clone(), stop.clone(), self.routes.clone());
            let thread = std::thread::Builder::new()
                .name(name.clone())
                // The thread only runs the fill path: a small stack is plenty.
                .stack_size(256 << 10)
                .spawn(move || serve(&uffd, &stop, &routes))?;
            let id = thread.thread().id();
            threads.push((thread, id, name));
        }
        Ok(Running {
            uffd,
            stop,
            threads,
        })
    }

    /// Sends the faults of `addr..addr + len` to `owner`.
    pub(crate) fn route(&self, addr: usize, len: usize, owner: Weak<dyn ServesFaults>) {
        self.routes.write().owners.insert(addr, (addr + len, owner));
    }

    /// As [`FaultService::route`], for a region of the page store's views that
    /// `clear` empties first: no zero page a late touch of the region's old
    /// owner got (see [`RouteTable::store_views`]) can land between the clear
    /// and the route.
    pub(crate) fn route_cleared(
        &self,
        addr: usize,
        len: usize,
        owner: Weak<dyn ServesFaults>,
        clear: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut routes = self.routes.write();
        clear()?;
        routes.owners.insert(addr, (addr + len, owner));
        Ok(())
    }

    /// Forgets the view or region at `addr` (before it is unmapped or given
    /// to another owner).
    pub(crate) fn unroute(&self, addr: usize) {
        self.routes.write().owners.remove(&addr);
    }

    /// Enters one of the page store's own views (see [`RouteTable::store_views`]).
    pub(crate) fn add_store_view(&self, addr: usize, len: usize) {
        self.routes.write().store_views.insert(addr, addr + len);
    }

    /// The names of the fault threads (none before the first map).
    pub(crate) fn thread_names(&self) -> Vec<String> {
        self.running.get().map_or_else(Vec::new, |running| {
            running
                .threads
                .iter()
                .map(|(_, _, name)| name.clone())
                .collect()
        })
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        // Writing an eventfd only fails if its counter would overflow: it cannot here.
        let _ = running.stop.signal();
        let me = std::thread::current().id();
        for (thread, id, _) in running.threads {
            // A fault thread may drop the last handle of the cache itself: it
            // then sees the signal and exits on its own.
            if id != me {
                let _ = thread.join();
            }
        }
    }
}

/// A fault thread: reads events and sends each to the owner of its view.
fn serve(uffd: &Userfaultfd, stop: &EventFd, routes: &Routes) {
    let mut events = Vec::new();
    loop {
        match wait_readable(uffd.as_fd(), stop.as_fd(), None) {
            Ok(Readiness::Fd) => {}
            Ok(Readiness::Wake) | Err(_) => return,
        }
        if uffd.read_events(&mut events).is_err() {
            continue;
        }
        for event in &events {
            match *event {
                Event::Missing { addr, thread, .. } | Event::Minor { addr, thread, .. } => {
                    let page = addr & !(PAGE_SIZE - 1);
                    let owner = {
                        let routes = routes.read();
                        let owner = holding(&routes.owners, addr, |(end, _)| *end)
                            .and_then(|(_, owner)| owner.upgrade());
                        if owner.is_none()
                            && holding(&routes.store_views, addr, |end| *end).is_some()
                        {
                            // Under the read lock, so that no region is
                            // cleared and given out in between.
                            let _ = install_zeroes(uffd, page);
                        }
                        owner
                    };
                    match owner {
                        Some(owner) => owner.serve_fault(addr, thread),
                        // Zeroes, or a user map going away: let the toucher retry.
                        None => {
                            let _ = uffd.wake(page, PAGE_SIZE);
                        }
                    }
                }
                Event::WriteProtect { addr } => {
                    let _ = uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
                }
                Event::Other => {}
            }
        }
    }
}

/// Installs a page of zeroes at `page` (absent there: it faulted MISSING).
#[allow(unsafe_code)] // the copy reads a static buffer of a page
fn install_zeroes(uffd: &Userfaultfd, page: usize) -> io::Result<usize> {
    static ZEROES: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    // SAFETY: the source is a static page, readable for the whole call.
    unsafe { uffd.copy(page, ZEROES.as_ptr(), PAGE_SIZE, false, true) }
}
