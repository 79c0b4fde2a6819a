//! Sequential readahead: which pages a read miss fills, and when the next
//! window is read ahead in the background.
//!
//! As the kernel's readahead (`mm/readahead.c`): a miss at the page after the
//! previous window (or at page 0) is sequential, and reads a window that starts
//! at the fill batch and doubles up to [`MAX_WINDOW_PAGES`]; any other miss
//! reads only what it asked for and ends the stream. A window read beyond what
//! its miss asked for leaves a mark on its first page past the request (the
//! kernel's `PG_readahead`): the read that reaches the mark hands the next
//! window, twice as large, to the cache's readahead threads and moves the mark
//! to that window's first page. So while the reader copies one window out of
//! the cache, the next one is read from the backend and installed on another
//! thread, and a device that is slow to answer (one opened with `O_DIRECT` has
//! no readahead of its own) keeps working while the reader does. That pays
//! only while the backend is the slower part ([`Readahead::observe`]); where
//! installing is slower, the mark ends the readahead instead and the stream's
//! next miss reads the next window itself, unless the cache is told to read
//! ahead always ([`ReadaheadMode::Always`]: a file system server, whose every
//! read is a round trip through the kernel that leaves the install time).
//!
//! A window read ahead grows to [`MAX_WINDOW_PAGES`] per thread (up to
//! [`MAX_PIECES`] of them) and is queued in pieces of [`MAX_WINDOW_PAGES`], so
//! that the threads read and install its pieces side by side.
//!
//! The mark is one atomic word that a hit only loads, so hits still write
//! nothing shared unless they reach it.

use std::sync::mpsc;
use std::time::Duration;

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::Mutex;

/// The largest readahead window, and the most pages one fill reads.
pub(crate) const MAX_WINDOW_PAGES: u64 = 512;

/// Readahead threads per cache by default: two, so that one reads the
/// backend while the other installs the window it read.
pub(crate) const DEFAULT_READAHEAD_THREADS: usize = 2;

/// The most pieces of [`MAX_WINDOW_PAGES`] a window read ahead is made of.
const MAX_PIECES: u64 = 4;

/// When a cache's readahead threads read the next window of a sequential
/// stream; see [`PageCacheBuilder::readahead_mode`](crate::PageCacheBuilder::readahead_mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReadaheadMode {
    /// While the backend has lately been slower to read a window than the
    /// cache to install it (a device opened with `O_DIRECT`, a remote store);
    /// a backend the host kernel caches is read synchronously, in the miss.
    #[default]
    BackendBound,
    /// For every sequential stream, whatever the backend: for readers that do
    /// other work between their reads, such as a file system server (each
    /// read a round trip through the kernel), where the threads overlap the
    /// next window's read and install with that work.
    Always,
}

/// The smallest fill [`Readahead::observe`] learns from.
const MIN_OBSERVED_PAGES: u64 = 32;

/// The most [`Readahead::observe`]'s score counts up to: as many fills where
/// installing is slower switch a stream back to synchronous windows.
const BACKEND_BOUND_MAX: u32 = 4;

/// No mark: no stream, or the file ends before the next window.
const NO_MARK: u64 = u64::MAX;

/// One mapping's readahead state.
pub(super) struct Readahead {
    stream: Mutex<Stream>,
    /// The page whose read starts the next window ([`NO_MARK`] for none).
    mark: AtomicU64,
    /// How far the backend has been the slower part of recent fills, from 0
    /// to [`BACKEND_BOUND_MAX`]: windows are read ahead on the threads while it
    /// is above 0 (see [`Readahead::observe`]).
    backend_bound: AtomicU32,
}

/// What a read miss fills, by [`Readahead::on_miss`].
pub(super) enum MissFill {
    /// A miss of the stream: this window (0 after a random miss: what it asked
    /// for). Its fill is reported with [`Readahead::filled`].
    Stream(u64),
    /// A miss inside the windows handed to the readahead threads (its reader
    /// overtook them): what it asked for, leaving the stream alone.
    Ahead,
}

/// Where the sequential stream stands.
#[derive(Default)]
struct Stream {
    /// The page after the last window read (synchronously or ahead).
    next: u64,
    /// The last window's size in pages (0 after a random miss).
    window: u64,
    /// The first page of the windows handed to the readahead threads since the
    /// last synchronous fill (they run up to `next`).
    ahead: u64,
}

impl Default for Readahead {
    fn default() -> Self {
        Readahead {
            stream: Mutex::new(Stream::default()),
            mark: AtomicU64::new(NO_MARK),
            backend_bound: AtomicU32::new(0),
        }
    }
}

impl Readahead {
    /// What a read miss at `index` fills.
    pub(super) fn on_miss(&self, index: u64, batch: u64) -> MissFill {
        let mut stream = self.stream.lock();
        if (stream.ahead..stream.next).contains(&index) {
            return MissFill::Ahead;
        }
        stream.window = if index == stream.next {
            (stream.window * 2).clamp(batch, MAX_WINDOW_PAGES.max(batch))
        } else {
            0
        };
        if stream.window == 0 {
            self.mark.store(NO_MARK, Ordering::Relaxed);
        }
        MissFill::Stream(stream.window)
    }

    /// Records a synchronous fill of `pages` pages at `index` for a miss that
    /// asked for `asked`: the stream goes on after it, and if it read ahead,
    /// the first page it read beyond the request is marked.
    pub(super) fn filled(&self, index: u64, pages: u64, asked: u64) {
        let mut stream = self.stream.lock();
        stream.next = index + pages;
        stream.ahead = stream.next;
        let mark = if pages > asked {
            index + asked
        } else {
            NO_MARK
        };
        self.mark.store(mark, Ordering::Relaxed);
    }

    /// Whether reading page `index` reaches the mark: one load, no store.
    #[inline]
    pub(super) fn is_mark(&self, index: u64) -> bool {
        self.mark.load(Ordering::Relaxed) == index
    }

    /// Records how long a fill of `pages` pages took to read from the backend
    /// and to install. Windows of a backend slower than the install (a device
    /// opened with `O_DIRECT`, a remote store) are read ahead on the readahead
    /// threads, so that the install and the reader's copies overlap the next
    /// read. Where the install is the slower part (a backend the host kernel
    /// caches and reads ahead itself), the threads would only add hand-offs and
    /// contend with the reader for the processors, and the stream stays
    /// synchronous: measured with `filemap bench seqread`, reading ahead on the
    /// threads there cost 10 to 30% against the synchronous windows.
    pub(super) fn observe(&self, pages: u64, read: Duration, install: Duration) {
        // Single pages and small batches say little about streaming. A score
        // rather than the last fill alone, so that one noisy fill does not
        // switch a stream back and forth.
        if pages >= MIN_OBSERVED_PAGES {
            let _ =
                self.backend_bound
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |score| {
                        Some(if read > install {
                            (score + 1).min(BACKEND_BOUND_MAX)
                        } else {
                            score.saturating_sub(1)
                        })
                    });
        }
    }

    /// Takes the mark at `index` (if another reader did not take it first) and
    /// returns the next window to read ahead, `(first page, pages)`, clipped
    /// to the file's `eof_pages`; its first page becomes the mark. Returns
    /// `None` and drops the mark if the window is better read synchronously:
    /// no `threads` to read it, or (in [`ReadaheadMode::BackendBound`]) a
    /// backend faster than the install.
    pub(super) fn take_mark(
        &self,
        index: u64,
        eof_pages: u64,
        threads: usize,
        mode: ReadaheadMode,
    ) -> Option<(u64, u64)> {
        let mut stream = self.stream.lock();
        if self.mark.load(Ordering::Relaxed) != index {
            return None;
        }
        let first = stream.next;
        let backend_bound = self.backend_bound.load(Ordering::Relaxed) > 0;
        if first >= eof_pages
            || threads == 0
            || (mode == ReadaheadMode::BackendBound && !backend_bound)
        {
            // The next miss, at `first`, reads the next window itself.
            self.mark.store(NO_MARK, Ordering::Relaxed);
            return None;
        }
        let pieces = (threads as u64).min(MAX_PIECES);
        let window = (stream.window * 2).clamp(1, MAX_WINDOW_PAGES * pieces);
        let pages = window.min(eof_pages - first);
        stream.window = window;
        stream.next = first + pages;
        self.mark.store(first, Ordering::Relaxed);
        Some((first, pages))
    }
}

/// A window for the readahead threads: the mapping's id, first page and pages.
type Request = (u32, u64, u64);

/// The cache's side of its readahead threads: where windows are queued
/// (`None` for a cache without threads), how many threads serve them, and
/// when they read ahead. The threads end when this goes, with the cache.
pub(crate) struct ReadaheadQueue {
    queue: Option<mpsc::Sender<Request>>,
    threads: usize,
    mode: ReadaheadMode,
}

/// The readahead threads' side: the windows queued for them, and how many
/// threads [`ReadaheadRequests::serve`] starts.
pub(crate) struct ReadaheadRequests {
    requests: Option<mpsc::Receiver<Request>>,
    threads: usize,
}

/// A queue of windows and its receiving end, for `threads` threads.
pub(crate) fn readahead_queue(
    threads: usize,
    mode: ReadaheadMode,
) -> (ReadaheadQueue, ReadaheadRequests) {
    let (queue, requests) = match threads {
        0 => (None, None),
        _ => {
            let (queue, requests) = mpsc::channel();
            (Some(queue), Some(requests))
        }
    };
    (
        ReadaheadQueue {
            queue,
            threads,
            mode,
        },
        ReadaheadRequests { requests, threads },
    )
}

impl ReadaheadQueue {
    /// How many threads serve the queue.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// When the threads read ahead.
    pub(crate) fn mode(&self) -> ReadaheadMode {
        self.mode
    }

    /// Queues a window of mapping `id` for the threads, in pieces of at most
    /// [`MAX_WINDOW_PAGES`] that the threads read side by side.
    pub(crate) fn submit(&self, id: u32, first: u64, pages: u64) {
        let Some(queue) = &self.queue else {
            return;
        };
        let end = first + pages;
        let mut piece = first;
        while piece < end {
            let pages = (end - piece).min(MAX_WINDOW_PAGES);
            // Fails only once the threads are gone, never before the cache.
            let _ = queue.send((id, piece, pages));
            piece += pages;
        }
    }
}

impl ReadaheadRequests {
    /// Starts the threads that read the queued windows: each window goes to
    /// `read(id, first, pages)`, which should hold the cache only while it reads.
    pub(crate) fn serve(
        self,
        read: impl Fn(u32, u64, u64) + Clone + Send + 'static,
    ) -> std::io::Result<()> {
        let Some(requests) = self.requests else {
            return Ok(());
        };
        // Real threads and a `std` channel: the model checkers never start them.
        let requests = std::sync::Arc::new(Mutex::new(requests));
        for _ in 0..self.threads {
            let (requests, read) = (requests.clone(), read.clone());
            std::thread::Builder::new()
                .name("fm-readahead".into())
                .stack_size(256 << 10)
                .spawn(move || loop {
                    let Ok((id, first, pages)) = requests.lock().recv() else {
                        return;
                    };
                    read(id, first, pages);
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: u64 = 32;
    const SLOW: Duration = Duration::from_millis(5);
    const FAST: Duration = Duration::from_micros(50);
    const ADAPTIVE: ReadaheadMode = ReadaheadMode::BackendBound;

    /// The window a miss gets, which must be a miss of the stream.
    fn window(readahead: &Readahead, index: u64) -> u64 {
        match readahead.on_miss(index, BATCH) {
            MissFill::Stream(window) => window,
            MissFill::Ahead => panic!("miss at {index} taken for one inside the windows ahead"),
        }
    }

    /// A stream whose first window, 32 pages read from a slow backend for a
    /// request of 8, marked page 8.
    fn marked_at_8() -> Readahead {
        let readahead = Readahead::default();
        assert_eq!(window(&readahead, 0), 32);
        readahead.observe(32, SLOW, FAST);
        readahead.filled(0, 32, 8);
        assert!(readahead.is_mark(8));
        readahead
    }

    #[test]
    fn sequential_misses_double_the_window_and_a_random_miss_ends_the_stream() {
        let readahead = Readahead::default();
        let mut index = 0;
        for expected in [32, 64, 128, 256, 512, 512] {
            assert_eq!(window(&readahead, index), expected, "miss at {index}");
            readahead.filled(index, expected, expected);
            index += expected;
        }
        assert_eq!(window(&readahead, 5), 0, "a random miss reads what it asks");
        readahead.filled(5, 1, 1);
        assert_eq!(window(&readahead, 6), BATCH, "a new stream starts small");
    }

    #[test]
    fn a_window_read_beyond_its_request_marks_the_first_page_past_it() {
        let readahead = Readahead::default();
        assert_eq!(window(&readahead, 0), 32);
        readahead.filled(0, 32, 32);
        assert!(!readahead.is_mark(32), "no readahead, no mark");
        assert_eq!(window(&readahead, 32), 64);
        readahead.filled(32, 64, 8);
        assert!(readahead.is_mark(40));
        assert!(!readahead.is_mark(41));
    }

    #[test]
    fn the_mark_hands_out_the_next_window_only_when_the_backend_is_the_slower_part() {
        let readahead = Readahead::default();
        assert_eq!(window(&readahead, 0), 32);
        readahead.filled(0, 32, 32);
        assert_eq!(window(&readahead, 32), 64);
        readahead.observe(64, FAST, SLOW);
        readahead.filled(32, 64, 32);
        assert_eq!(
            readahead.take_mark(64, 1 << 20, 1, ADAPTIVE),
            None,
            "install-bound"
        );
        assert!(!readahead.is_mark(64), "the stream goes on synchronously");
        assert_eq!(window(&readahead, 96), 128, "at the page after the window");

        readahead.observe(128, SLOW, FAST);
        readahead.filled(96, 128, 32);
        assert_eq!(
            readahead.take_mark(129, 1 << 20, 1, ADAPTIVE),
            None,
            "not the mark"
        );
        assert_eq!(
            readahead.take_mark(128, 1 << 20, 1, ADAPTIVE),
            Some((224, 256))
        );
        assert!(
            readahead.is_mark(224),
            "the mark moves to the window's first page"
        );
        assert_eq!(
            readahead.take_mark(128, 1 << 20, 1, ADAPTIVE),
            None,
            "taken once"
        );
        assert_eq!(
            readahead.take_mark(224, 600, 1, ADAPTIVE),
            Some((480, 120)),
            "clipped at the end"
        );
        assert_eq!(
            readahead.take_mark(480, 600, 1, ADAPTIVE),
            None,
            "nothing past the end"
        );
    }

    #[test]
    fn without_threads_the_mark_only_ends_the_readahead() {
        let readahead = marked_at_8();
        assert_eq!(readahead.take_mark(8, 1 << 20, 0, ADAPTIVE), None);
        assert!(!readahead.is_mark(8));
        assert_eq!(
            window(&readahead, 32),
            64,
            "the stream goes on synchronously"
        );
    }

    #[test]
    fn misses_inside_the_windows_read_ahead_leave_the_stream_alone() {
        let readahead = marked_at_8();
        assert_eq!(readahead.take_mark(8, 1 << 20, 1, ADAPTIVE), Some((32, 64)));
        assert_eq!(
            readahead.take_mark(32, 1 << 20, 1, ADAPTIVE),
            Some((96, 128))
        );
        for index in [32, 60, 95, 96, 223] {
            assert!(matches!(readahead.on_miss(index, BATCH), MissFill::Ahead));
        }
        assert!(readahead.is_mark(96), "the stream is where it was");
        assert_eq!(
            window(&readahead, 224),
            256,
            "the next window of the stream"
        );
    }

    #[test]
    fn always_mode_reads_ahead_even_when_the_install_is_the_slower_part() {
        let readahead = Readahead::default();
        assert_eq!(window(&readahead, 0), 32);
        readahead.observe(32, FAST, SLOW);
        readahead.filled(0, 32, 8);
        assert_eq!(readahead.take_mark(8, 1 << 20, 1, ADAPTIVE), None);
        assert_eq!(window(&readahead, 32), 64);
        readahead.observe(64, FAST, SLOW);
        readahead.filled(32, 64, 8);
        assert_eq!(
            readahead.take_mark(40, 1 << 20, 1, ReadaheadMode::Always),
            Some((96, 128))
        );
        assert_eq!(
            readahead.take_mark(96, 1 << 20, 0, ReadaheadMode::Always),
            None,
            "no threads, no readahead"
        );
    }

    #[test]
    fn windows_ahead_grow_to_a_piece_per_thread_and_are_queued_in_pieces() {
        let readahead = marked_at_8();
        let (mut index, mut sizes) = (8, Vec::new());
        for _ in 0..7 {
            let (first, pages) = readahead
                .take_mark(index, 1 << 20, 2, ADAPTIVE)
                .expect("backend-bound");
            sizes.push(pages);
            index = first;
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024, 1024, 1024]);
        let most = readahead.take_mark(index, 1 << 20, 64, ADAPTIVE);
        assert_eq!(
            most.map(|(_, pages)| pages),
            Some(MAX_PIECES * MAX_WINDOW_PAGES)
        );

        let (queue, requests) = readahead_queue(2, ReadaheadMode::Always);
        queue.submit(7, 100, 2 * MAX_WINDOW_PAGES + 5);
        let received: Vec<Request> = requests.requests.expect("threads").try_iter().collect();
        assert_eq!(
            received,
            [
                (7, 100, MAX_WINDOW_PAGES),
                (7, 100 + MAX_WINDOW_PAGES, MAX_WINDOW_PAGES),
                (7, 100 + 2 * MAX_WINDOW_PAGES, 5)
            ]
        );
    }
}
