//! The torture's operations on a peer cache ([`filemap_peers`]): a
//! read-through page cache over the run's backends, as a user of moka,
//! quick_cache or foyer would write it. Reads go through the peer's loading
//! call page by page; writes, punches, zero ranges, truncates and direct
//! writes change the backend, then remove every key of the range; direct
//! reads read the backend. A file's size changes (and the writes that may
//! extend it) hold a mutex of the file, as a file system's inode lock would:
//! the oracle is there for the cache, not for the size. Maps and pins are
//! the library's alone and left out of the mix.

use std::io;
use std::sync::Arc;

use filemap::backend::Backend;
use filemap::page::{index_of, PAGE, PAGE_SIZE};
use filemap_peers::{Page, PageKey, PageSource, Peer, PeerCache};
use parking_lot::Mutex;

use crate::run::Ops;
use crate::OpKind;

/// The run's backends as a peer's source: page `(file, index)` is read with
/// `read_pages`.
struct Backends(Vec<Arc<dyn Backend>>);

impl PageSource for Backends {
    fn load(&self, (file, index): PageKey) -> io::Result<Page> {
        filemap_peers::read_page(|bytes| self.0[file as usize].read_pages(index, bytes))
    }
}

/// A peer cache over the run's files, shared by its workers.
pub(crate) struct PeerFiles {
    cache: Box<dyn PeerCache>,
    backends: Vec<Arc<dyn Backend>>,
    /// Held by a change of a file's size, and by writes that may make one.
    sizes: Vec<Mutex<()>>,
    /// The most pages a file spans: a truncate removes the keys up to its end.
    pages_per_file: u64,
}

impl PeerFiles {
    /// `peer`, holding at most `cache_bytes` of pages of `backends`.
    pub(crate) fn new(
        peer: Peer,
        cache_bytes: u64,
        backends: &[Arc<dyn Backend>],
        pages_per_file: u64,
    ) -> PeerFiles {
        let source = Arc::new(Backends(backends.to_vec()));
        PeerFiles {
            cache: peer.build((cache_bytes / PAGE).max(1), source),
            backends: backends.to_vec(),
            sizes: backends.iter().map(|_| Mutex::new(())).collect(),
            pages_per_file,
        }
    }
}

/// One worker's operations on a [`PeerFiles`].
pub(crate) struct PeerOps<'a>(pub(crate) &'a PeerFiles);

impl PeerOps<'_> {
    /// Reads whole pages at `offset` into `buf` up to the end of file,
    /// through the cache or (`direct`) from the backend.
    fn read_pages(
        &self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> io::Result<usize> {
        let files = self.0;
        let size = files.backends[file].len()?;
        let n = (size.saturating_sub(offset) as usize).min(buf.len()) / PAGE_SIZE * PAGE_SIZE;
        if direct {
            files.backends[file].read_pages(index_of(offset), &mut buf[..n])?;
            return Ok(n);
        }
        for (i, page) in buf[..n].chunks_exact_mut(PAGE_SIZE).enumerate() {
            let key = (file as u32, index_of(offset) + i as u64);
            page.copy_from_slice(&files.cache.get(key)?[..]);
        }
        Ok(n)
    }
}

impl Ops for PeerOps<'_> {
    fn read(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> io::Result<usize> {
        self.read_pages(file, offset, buf, direct)
    }

    fn write(&mut self, file: usize, offset: u64, data: &[u8], _direct: bool) -> io::Result<()> {
        let files = self.0;
        let backend = &files.backends[file];
        {
            let _size = files.sizes[file].lock();
            let end = offset + data.len() as u64;
            if end > backend.len()? {
                backend.set_len(end)?;
            }
            backend.write_pages(index_of(offset), data)?;
        }
        files
            .cache
            .remove_range(file as u32, offset, data.len() as u64);
        Ok(())
    }

    fn read_vectored(
        &mut self,
        file: usize,
        offset: u64,
        buf: &mut [u8],
        _cuts: &[usize],
    ) -> io::Result<usize> {
        self.read_pages(file, offset, buf, false)
    }

    fn write_vectored(
        &mut self,
        file: usize,
        offset: u64,
        data: &[u8],
        _cuts: &[usize],
    ) -> io::Result<()> {
        self.write(file, offset, data, false)
    }

    fn zero(&mut self, file: usize, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let files = self.0;
        let backend = &files.backends[file];
        {
            let _size = files.sizes[file].lock();
            let len = len.min(backend.len()?.saturating_sub(offset));
            if len > 0 {
                match punch {
                    true => backend.punch_hole(offset, len)?,
                    false => backend.zero_range(offset, len)?,
                }
            }
        }
        files.cache.remove_range(file as u32, offset, len);
        Ok(())
    }

    fn set_len(&mut self, file: usize, len: u64) -> io::Result<()> {
        let files = self.0;
        {
            let _size = files.sizes[file].lock();
            files.backends[file].set_len(len)?;
        }
        let end = files.pages_per_file * PAGE;
        files
            .cache
            .remove_range(file as u32, len, end.saturating_sub(len));
        Ok(())
    }

    fn readahead(&mut self, file: usize, offset: u64, len: u64) -> io::Result<()> {
        let size = self.0.backends[file].len()?;
        let end = (offset + len).min(size);
        for index in index_of(offset)..index_of(end + PAGE - 1) {
            self.0.cache.get((file as u32, index))?;
        }
        Ok(())
    }

    fn sync(&mut self, file: usize, _range: Option<(u64, u64)>) -> io::Result<()> {
        // Nothing is dirty in the peer: every write went to the backend.
        self.0.backends[file].sync()
    }

    fn map_read(&mut self, _file: usize, _offset: usize, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn map_write(&mut self, _file: usize, _offset: usize, _data: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn makes(&self, kind: OpKind) -> bool {
        !matches!(kind, OpKind::MapRead | OpKind::MapWrite | OpKind::Pin)
    }

    fn invalidate(
        &mut self,
        file: usize,
        _library: &filemap::Mapping,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.0.cache.remove_range(file as u32, offset, len);
        Ok(())
    }
}
