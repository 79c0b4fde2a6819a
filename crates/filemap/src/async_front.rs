//! [`AsyncMapping`]: the calls of a [`Mapping`] as futures for Tokio (the
//! `tokio` feature).
//!
//! Hits are served in the caller's task: a read or write first tries the
//! `_nowait` call ([`Mapping::read_at_nowait`], [`Mapping::write_at_nowait`]),
//! which copies what cached pages hold and never waits, so a read whose pages
//! are all cached completes on its first poll, with no spawn and no thread
//! hop. Whatever may wait (a miss that reads the backend, a busy page, a
//! coherence mode held by someone else, direct I/O, invalidation, syncs) runs
//! the blocking call on Tokio's blocking pool ([`tokio::task::spawn_blocking`])
//! with buffers of its own, so the runtime's worker threads never wait on a
//! lock or a device.
//!
//! # Cancellation
//! A future that is dropped before its first poll did nothing. Once polled,
//! what it handed to the pool runs to its end whether or not the future is
//! still there (a blocking call cannot be interrupted), and the cache stays as
//! consistent as it is after the same blocking call:
//!
//! - A read dropped mid-way leaves unspecified bytes in the caller's buffer;
//!   the pool goes on reading into a buffer of its own, and its fills publish
//!   or are discarded, page by page, as every fill does: a fill claims its
//!   absent pages and publishes each with a compare-and-swap against the
//!   state it claimed, and an invalidation of the range in between removes
//!   the claim, so that the swap fails and the page read is thrown away. No
//!   page is ever visible half-filled.
//! - A write, direct write, punch, zero, truncate, readahead or sync dropped
//!   after its first poll completes later, as the blocking call would: the
//!   part the fast path did not write is handed to the pool whole, with a copy
//!   of the caller's bytes. Each page lands whole, as with
//!   [`Mapping::write_at`]. [`AsyncMapping::settled`] waits for such work.
//!   The one exception: if the runtime shuts down before the pool starts the
//!   call, Tokio drops it unrun, so a write then lands only the part its fast
//!   path wrote, as a short write.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::cache::DIRECT_IO_MEMORY_ALIGN;
use crate::{AlignedBuf, Mapping};

/// The calls of a [`Mapping`] as futures, for Tokio: hits in the caller's
/// task, everything that may wait on Tokio's blocking pool (see the module's
/// documentation for what dropping each future means).
///
/// Its futures must be polled inside a Tokio runtime (one of either kind):
/// handing work to the pool panics outside one, as [`tokio::task::spawn_blocking`]
/// does. Cloning is cheap; clones share the count of work in the pool that
/// [`AsyncMapping::settled`] waits for.
///
/// ```
/// use std::sync::Arc;
/// use filemap::{AsyncMapping, MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = AsyncMapping::new(cache.open(Arc::new(volume.create_file("log")?))?);
/// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
/// runtime.block_on(async {
///     file.write_all_at(&[7; 8192], 0).await?; // a new page: on the pool
///     file.sync_all().await?;
///     let mut buf = [0u8; 8192];
///     file.read_exact_at(&mut buf, 0).await?; // both pages cached: in this task
///     assert_eq!(buf, [7; 8192]);
///     file.punch_hole(0, 4096).await?;
///     assert_eq!(file.read_at(&mut buf, 0).await?, 8192); // page 0 from the backend
///     assert_eq!(&buf[..4096], &[0; 4096][..]);
///     Ok::<(), std::io::Error>(())
/// })?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AsyncMapping {
    mapping: Arc<Mapping>,
    pool: Arc<PoolWork>,
}

/// The calls an [`AsyncMapping`] (and its clones) handed to the pool that
/// have not ended.
#[derive(Debug, Default)]
struct PoolWork {
    running: AtomicUsize,
    /// Told when `running` drops to 0.
    idle: Notify,
}

/// One call counted in [`PoolWork::running`]; moved into the call, so that
/// the count drops when the call ends, or when Tokio drops it unrun.
struct InPool(Arc<PoolWork>);

impl InPool {
    fn new(pool: &Arc<PoolWork>) -> InPool {
        pool.running.fetch_add(1, Ordering::SeqCst);
        InPool(pool.clone())
    }
}

impl Drop for InPool {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How much of a read or write the fast path did: `Ok(Some(n))`, or
/// `Ok(None)` where it would have had to wait.
fn fast_path(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Ok(n) => Ok(Some(n)),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(error) => Err(error),
    }
}

/// The result of a read or write whose first `done` bytes the fast path
/// copied and whose rest ended with `rest`: an error after some bytes is a
/// short count, as the kernel answers (the next call meets the error).
fn after(done: usize, rest: io::Result<usize>) -> io::Result<usize> {
    match rest {
        Ok(n) => Ok(done + n),
        Err(_) if done > 0 => Ok(done),
        Err(error) => Err(error),
    }
}

impl AsyncMapping {
    /// The async front of `mapping`.
    pub fn new(mapping: Arc<Mapping>) -> AsyncMapping {
        AsyncMapping {
            mapping,
            pool: Arc::default(),
        }
    }

    /// The mapping behind it, for the calls that never wait (`len`,
    /// `read_at_nowait`, ...) and for maps.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.mapping
    }

    /// How many calls of this front (and its clones) are on the pool now,
    /// those of dropped futures included.
    pub fn in_pool(&self) -> usize {
        self.pool.running.load(Ordering::SeqCst)
    }

    /// Waits until no call of this front (or its clones) is on the pool: the
    /// work of futures dropped after their first poll has then ended.
    pub async fn settled(&self) {
        loop {
            let idle = std::pin::pin!(self.pool.idle.notified());
            let mut idle = idle;
            // Registered before the count is read, so that a call ending in
            // between is not missed.
            idle.as_mut().enable();
            if self.in_pool() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Runs `call` on the mapping on Tokio's blocking pool and waits for it.
    /// The call runs to its end even if this future is dropped.
    fn on_pool<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Mapping) -> io::Result<T> + Send + 'static,
    ) -> impl Future<Output = io::Result<T>> + Send + 'static {
        let mapping = self.mapping.clone();
        let counted = InPool::new(&self.pool);
        let task = tokio::task::spawn_blocking(move || {
            let _counted = counted;
            call(&mapping)
        });
        async move {
            match task.await {
                Ok(result) => result,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(_) => Err(io::Error::other(
                    "the runtime shut down before its blocking pool ran the call",
                )),
            }
        }
    }

    /// [`Mapping::read_at`]: reads up to `buf.len()` bytes at `offset`,
    /// fewer only at the end of file. Cached pages are copied in the caller's
    /// task; from the first page that is not a hit on, the rest is read on
    /// the pool into a buffer of its own and copied into `buf`. An error
    /// after some bytes were copied gives their count.
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let done = match fast_path(self.mapping.read_at_nowait(buf, offset))? {
            Some(n) if n == buf.len() || n == 0 => return Ok(n),
            Some(n) => n,
            None => 0,
        };
        let at = offset + done as u64;
        // Short at the end of file: nothing more to read.
        if done > 0 && at >= self.mapping.len() {
            return Ok(done);
        }
        let len = buf.len() - done;
        let rest = self.on_pool(move |mapping| {
            let mut rest = vec![0; len];
            let n = mapping.read_at(&mut rest, at)?;
            rest.truncate(n);
            Ok(rest)
        });
        after(
            done,
            rest.await.map(|rest| {
                buf[done..done + rest.len()].copy_from_slice(&rest);
                rest.len()
            }),
        )
    }

    /// [`Mapping::read_exact_at`]: reads exactly `buf.len()` bytes at
    /// `offset`, or fails with `UnexpectedEof`.
    pub async fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset).await? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// [`Mapping::write_at`]: writes `buf` at `offset`. Cached pages inside
    /// the file are written in the caller's task; from the first page that is
    /// not, the rest (copied) is written on the pool, and is written whole
    /// even if this future is dropped. An error after some bytes were written
    /// gives their count.
    pub async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let done = match fast_path(self.mapping.write_at_nowait(buf, offset))? {
            Some(n) if n == buf.len() => return Ok(n),
            Some(n) => n,
            None => 0,
        };
        let rest = buf[done..].to_vec();
        let at = offset + done as u64;
        after(
            done,
            self.on_pool(move |mapping| mapping.write_at(&rest, at))
                .await,
        )
    }

    /// [`Mapping::write_all_at`]: writes all of `buf` at `offset`, or fails.
    pub async fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset).await? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ))
                }
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// [`Mapping::read_direct`], on the pool, into a buffer of its own that
    /// sits at the same offset from [`DIRECT_IO_MEMORY_ALIGN`] as `buf`, so
    /// that the answer (an alignment error included) is the blocking call's.
    pub async fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (skew, len) = (buf.as_ptr() as usize % DIRECT_IO_MEMORY_ALIGN, buf.len());
        let read = self.on_pool(move |mapping| {
            let mut bounce = AlignedBuf::new(skew + len, DIRECT_IO_MEMORY_ALIGN);
            let n = mapping.read_direct(&mut bounce[skew..], offset)?;
            Ok((bounce, n))
        });
        let (bounce, n) = read.await?;
        buf[..n].copy_from_slice(&bounce[skew..skew + n]);
        Ok(n)
    }

    /// [`Mapping::write_direct`], on the pool, from a copy of `buf` aligned
    /// as `buf` is (as for [`AsyncMapping::read_direct`]).
    pub async fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let skew = buf.as_ptr() as usize % DIRECT_IO_MEMORY_ALIGN;
        let mut copy = AlignedBuf::new(skew + buf.len(), DIRECT_IO_MEMORY_ALIGN);
        copy[skew..].copy_from_slice(buf);
        self.on_pool(move |mapping| mapping.write_direct(&copy[skew..], offset))
            .await
    }

    /// [`Mapping::punch_hole`], on the pool.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.punch_hole(offset, len))
            .await
    }

    /// [`Mapping::zero_range`], on the pool.
    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.zero_range(offset, len))
            .await
    }

    /// [`Mapping::collapse_range`], on the pool.
    pub async fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.collapse_range(offset, len))
            .await
    }

    /// [`Mapping::insert_range`], on the pool.
    pub async fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.insert_range(offset, len))
            .await
    }

    /// [`Mapping::set_len`] (truncate or extend), on the pool.
    pub async fn set_len(&self, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.set_len(len)).await
    }

    /// [`Mapping::invalidate_range`], on the pool.
    pub async fn invalidate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.invalidate_range(offset, len))
            .await
    }

    /// [`Mapping::readahead`], on the pool; completes once the pages are
    /// cached (dropping the future lets the readahead go on).
    pub async fn readahead(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.readahead(offset, len))
            .await
    }

    /// [`Mapping::sync_range`], on the pool.
    pub async fn sync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on_pool(move |mapping| mapping.sync_range(offset, len))
            .await
    }

    /// [`Mapping::sync_all`], on the pool.
    pub async fn sync_all(&self) -> io::Result<()> {
        self.on_pool(Mapping::sync_all).await
    }
}

impl From<Arc<Mapping>> for AsyncMapping {
    fn from(mapping: Arc<Mapping>) -> AsyncMapping {
        AsyncMapping::new(mapping)
    }
}
