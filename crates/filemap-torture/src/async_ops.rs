//! The async scenario's operations: the library through
//! [`filemap::AsyncMapping`], from a current-thread Tokio runtime per worker,
//! with some futures dropped before they complete.
//!
//! The oracle needs no change for dropped futures. A dropped read returns no
//! bytes, so nothing of it is checked (reads are dropped at any point, before
//! their first poll too). Changes (writes, punches, zeroes, truncates) are
//! dropped only after their first poll, which the front promises they then
//! complete: the oracle records each as a change that happened, and so checks
//! that promise. The worker's loop records a change as begun before its future
//! is made and as ended once [`Ops`] returns; a change dropped after its first
//! poll goes on in the blocking pool, so before returning we wait for this
//! worker's work in the pool to end ([`AsyncMapping::settled`]). Until then
//! the oracle allows both the old and the new contents; afterwards, only what
//! the change left.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use filemap::page::PAGE_SIZE;
use filemap::{AlignedBuf, AsyncMapping, MapRegion, Mapping};

use crate::run::{write_all_vectored, Ops, MAX_OP_PAGES};
use crate::vectored::cut_mut;

/// One future in this many is dropped before it completes.
const DROP_ONE_IN: u32 = 4;
/// The longest a future runs before it is dropped at a random time.
const MAX_RUN_US: u64 = 200;

/// A worker's operations through the async front.
pub(crate) struct AsyncLibrary<'a> {
    /// One front per file, of this worker only: waiting for its work in the
    /// pool waits for nobody else's.
    files: Vec<AsyncMapping>,
    maps: &'a [MapRegion],
    runtime: tokio::runtime::Runtime,
    rng: fastrand::Rng,
    /// The buffer of direct reads and writes, aligned as they need.
    direct: AlignedBuf,
}

/// How a future ends.
#[derive(Clone, Copy)]
enum Fate {
    Complete,
    /// Dropped before its first poll: it did nothing.
    DropUnpolled,
    /// Dropped right after its first poll.
    DropAfterFirstPoll,
    /// Dropped after running for this long, unless it completed first (a
    /// timeout polls its future before it looks at the clock: at least once).
    DropAfter(Duration),
}

impl<'a> AsyncLibrary<'a> {
    pub(crate) fn new(files: &[Arc<Mapping>], maps: &'a [MapRegion], seed: u64) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds");
        AsyncLibrary {
            files: files.iter().cloned().map(AsyncMapping::new).collect(),
            maps,
            runtime,
            rng: fastrand::Rng::with_seed(seed.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            direct: AlignedBuf::new(MAX_OP_PAGES as usize * PAGE_SIZE, PAGE_SIZE),
        }
    }

    /// A random fate; a `change` is always polled at least once.
    fn fate(&mut self, change: bool) -> Fate {
        if self.rng.u32(..DROP_ONE_IN) != 0 {
            return Fate::Complete;
        }
        match self.rng.u8(..4) {
            0 if !change => Fate::DropUnpolled,
            0 => Fate::DropAfterFirstPoll,
            1 => Fate::DropAfterFirstPoll,
            _ => Fate::DropAfter(Duration::from_micros(self.rng.u64(..MAX_RUN_US))),
        }
    }
}

/// Runs `call` on `runtime` to its end or to its `fate`; `None` if it was
/// dropped. Then waits for the work in the pool of `front` to end, so that a
/// dropped change has really ended when the caller records its end.
fn drive<T>(
    runtime: &tokio::runtime::Runtime,
    front: &AsyncMapping,
    fate: Fate,
    call: impl Future<Output = io::Result<T>>,
) -> io::Result<Option<T>> {
    runtime.block_on(async {
        let result = match fate {
            Fate::Complete => Some(call.await),
            Fate::DropUnpolled => None,
            Fate::DropAfterFirstPoll => {
                let mut call = std::pin::pin!(call);
                match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
                    Poll::Ready(result) => Some(result),
                    Poll::Pending => None,
                }
            }
            Fate::DropAfter(limit) => tokio::time::timeout(limit, call).await.ok(),
        };
        front.settled().await;
        result.transpose()
    })
}

impl Ops for AsyncLibrary<'_> {
    fn read(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> io::Result<usize> {
        let fate = self.fate(false);
        let front = &self.files[file];
        if !direct {
            let read = drive(&self.runtime, front, fate, front.read_at(buf, offset))?;
            // A dropped read's bytes are not checked.
            return Ok(read.unwrap_or(0));
        }
        let aligned = &mut self.direct[..buf.len()];
        let read = drive(
            &self.runtime,
            front,
            fate,
            front.read_direct(aligned, offset),
        )?;
        let n = read.unwrap_or(0);
        buf[..n].copy_from_slice(&aligned[..n]);
        Ok(n)
    }

    fn write(&mut self, file: usize, offset: u64, data: &[u8], direct: bool) -> io::Result<()> {
        let fate = self.fate(true);
        let front = &self.files[file];
        if !direct {
            return drive(&self.runtime, front, fate, front.write_all_at(data, offset)).map(drop);
        }
        let aligned = &mut self.direct[..data.len()];
        aligned.copy_from_slice(data);
        drive(
            &self.runtime,
            front,
            fate,
            front.write_direct(aligned, offset),
        )
        .map(drop)
    }

    fn zero(&mut self, file: usize, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let fate = self.fate(true);
        let front = &self.files[file];
        match punch {
            true => drive(&self.runtime, front, fate, front.punch_hole(offset, len)),
            false => drive(&self.runtime, front, fate, front.zero_range(offset, len)),
        }
        .map(drop)
    }

    fn set_len(&mut self, file: usize, len: u64) -> io::Result<()> {
        let fate = self.fate(true);
        let front = &self.files[file];
        drive(&self.runtime, front, fate, front.set_len(len)).map(drop)
    }

    // The async front has no vectored calls (a miss would carry the caller's
    // buffers to the pool): these are the synchronous ones, beside it.
    fn read_vectored(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        cuts: &[usize],
    ) -> io::Result<usize> {
        let mapping = self.files[file].mapping();
        mapping.read_vectored_at(&mut cut_mut(buf, cuts), offset)
    }

    fn write_vectored(
        &mut self,
        file: usize,
        offset: u64,
        data: &[u8],
        cuts: &[usize],
    ) -> io::Result<()> {
        write_all_vectored(self.files[file].mapping(), offset, data, cuts)
    }

    fn readahead(&mut self, file: usize, offset: u64, len: u64) -> io::Result<()> {
        let fate = self.fate(false);
        let front = &self.files[file];
        drive(&self.runtime, front, fate, front.readahead(offset, len)).map(drop)
    }

    fn sync(&mut self, file: usize, range: Option<(u64, u64)>) -> io::Result<()> {
        let fate = self.fate(false);
        let front = &self.files[file];
        match range {
            Some((offset, len)) => drive(&self.runtime, front, fate, front.sync_range(offset, len)),
            None => drive(&self.runtime, front, fate, front.sync_all()),
        }
        .map(drop)
    }

    fn map_read(&mut self, file: usize, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.maps[file].read(offset, buf)
    }

    fn map_write(&mut self, file: usize, offset: usize, data: &[u8]) -> io::Result<()> {
        self.maps[file].write(offset, data)
    }
}
