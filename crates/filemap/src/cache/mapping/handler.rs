//! The fault handler of one mapping: a thread that serves the MISSING faults of
//! every view of the mapping's memfd, the cache's own and the user's maps.
//!
//! It holds the mapping only weakly, so the users' handles and maps decide how
//! long the mapping lives; the mapping stops the thread when it goes away. A
//! fault is served by the mapping's [`ServesFaults::serve_fault`], which fills
//! the page under the Fill mode of the coherence lock, exactly as a read miss
//! does. The thread knows the mapping only by that trait, so this file needs
//! nothing of the mapping's.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{JoinHandle, ThreadId};

use crate::map::uffd::{wait_readable, Event, EventFd, Readiness, Userfaultfd};
use crate::page::PAGE_SIZE;

/// What serves the faults the handler reads.
pub(super) trait ServesFaults: Send + Sync {
    /// Serves a fault at `addr` by thread `thread` (0 if unknown), and wakes
    /// the toucher.
    fn serve_fault(&self, addr: usize, thread: u32);
}

/// The handler thread and the means to stop it.
pub(super) struct FaultHandler {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
    name: String,
}

/// Numbers handler threads, so each has a name of its own.
static HANDLERS: AtomicU64 = AtomicU64::new(0);

impl FaultHandler {
    /// Starts serving the faults of `uffd` for `mapping`.
    pub(super) fn start(
        uffd: Arc<Userfaultfd>,
        mapping: Weak<dyn ServesFaults>,
    ) -> io::Result<Self> {
        let stop = Arc::new(EventFd::new()?);
        // Thread names are at most 15 bytes on Linux.
        let name = format!(
            "fm-faults-{}",
            HANDLERS.fetch_add(1, Ordering::Relaxed) % 100_000
        );
        let thread = std::thread::Builder::new()
            .name(name.clone())
            // The thread only runs the fill path: a small stack is plenty.
            .stack_size(256 << 10)
            .spawn({
                let stop = stop.clone();
                move || serve(&uffd, &stop, &mapping)
            })?;
        Ok(FaultHandler {
            stop,
            thread_id: thread.thread().id(),
            thread: Some(thread),
            name,
        })
    }

    /// The handler thread's name.
    pub(super) fn thread_name(&self) -> &str {
        &self.name
    }

    /// Stops the thread and waits for it, unless called on the thread itself (the
    /// last handle of the mapping was dropped while serving a fault): then the
    /// thread sees the signal and exits on its own.
    pub(super) fn stop(&mut self) {
        // Writing an eventfd only fails if its counter would overflow: it cannot here.
        let _ = self.stop.signal();
        if let Some(thread) = self.thread.take() {
            if std::thread::current().id() != self.thread_id {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(uffd: &Userfaultfd, stop: &EventFd, mapping: &Weak<dyn ServesFaults>) {
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
                    match mapping.upgrade() {
                        Some(mapping) => mapping.serve_fault(addr, thread),
                        // The mapping is going away: let the toucher retry.
                        None => {
                            let _ = uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
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
