//! A worker process of the torture through a mount: it opens the run's files
//! on the mount and makes each call the run sends it, with the kernel's file
//! API, answering with what the call returned.
//!
//! The run writes a [`Request`] (and the bytes of a write) to the worker's
//! standard input, and reads a reply from its standard output: the call's
//! `errno` (0 if it worked) and byte count as two little-endian `u32`s, then
//! the bytes read. The worker ends at the end of its input.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::AlignedBuf;

use crate::vectored::{cut, cut_mut, MAX_CUTS};

/// The calls a worker makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Call {
    Read,
    ReadDirect,
    Write,
    WriteDirect,
    Punch,
    Zero,
    SetLen,
    Readahead,
    SyncRange,
    SyncAll,
    MapRead,
    MapWrite,
    ReadVectored,
    WriteVectored,
}

impl Call {
    const ALL: [Call; 14] = [
        Call::Read,
        Call::ReadDirect,
        Call::Write,
        Call::WriteDirect,
        Call::Punch,
        Call::Zero,
        Call::SetLen,
        Call::Readahead,
        Call::SyncRange,
        Call::SyncAll,
        Call::MapRead,
        Call::MapWrite,
        Call::ReadVectored,
        Call::WriteVectored,
    ];

    /// Whether the request carries `len` bytes to write.
    pub(crate) fn sends_data(self) -> bool {
        matches!(
            self,
            Call::Write | Call::WriteDirect | Call::MapWrite | Call::WriteVectored
        )
    }

    /// Whether the reply carries the bytes read.
    pub(crate) fn returns_data(self) -> bool {
        matches!(
            self,
            Call::Read | Call::ReadDirect | Call::MapRead | Call::ReadVectored
        )
    }
}

/// One call, as sent: `len` is the byte count of the range (of the new size
/// for `SetLen`); a vectored call's bytes are cut into buffers at `cuts`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    pub(crate) call: Call,
    pub(crate) file: usize,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    cuts: [Option<u16>; MAX_CUTS],
}

/// The bytes of a request's header.
pub(crate) const REQUEST_BYTES: usize = 24;
/// The bytes of a reply's header.
pub(crate) const REPLY_BYTES: usize = 8;
/// The longest read or write a request may carry.
pub(crate) const MAX_DATA: usize = 4 * PAGE_SIZE;

impl Request {
    pub(crate) fn new(call: Call, file: usize, offset: u64, len: impl TryInto<u64>) -> Request {
        let len = len.try_into().unwrap_or(u64::MAX);
        Request {
            call,
            file,
            offset,
            len,
            cuts: [None; MAX_CUTS],
        }
    }

    /// The request with its bytes cut at `cuts` (at most [`MAX_CUTS`], each
    /// at most [`MAX_DATA`]).
    pub(crate) fn with_cuts(mut self, cuts: &[usize]) -> Request {
        assert!(cuts.len() <= MAX_CUTS, "at most {MAX_CUTS} cuts");
        for (slot, &cut) in self.cuts.iter_mut().zip(cuts) {
            *slot = Some(u16::try_from(cut).expect("a cut inside one call's bytes"));
        }
        self
    }

    /// Where the call's bytes are cut.
    fn cuts(&self) -> Vec<usize> {
        self.cuts
            .iter()
            .flatten()
            .map(|&cut| usize::from(cut))
            .collect()
    }

    pub(crate) fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut bytes = [0u8; REQUEST_BYTES];
        bytes[0] = self.call as u8;
        bytes[1] = u8::try_from(self.file).expect("at most 255 files");
        // Bytes 2..8: each cut plus one, 0 for none.
        for (i, cut) in self.cuts.iter().enumerate() {
            let word = cut.map_or(0, |cut| cut + 1);
            bytes[2 + 2 * i..4 + 2 * i].copy_from_slice(&word.to_le_bytes());
        }
        bytes[8..16].copy_from_slice(&self.offset.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.len.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8; REQUEST_BYTES]) -> io::Result<Request> {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let call = *Call::ALL
            .get(usize::from(bytes[0]))
            .ok_or_else(|| bad(format!("unknown call {}", bytes[0])))?;
        let mut cuts = [None; MAX_CUTS];
        for (i, cut) in cuts.iter_mut().enumerate() {
            let at = 2 + 2 * i;
            let word = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
            *cut = word.checked_sub(1);
        }
        let request = Request {
            call,
            file: usize::from(bytes[1]),
            offset: word(8),
            len: word(16),
            cuts,
        };
        if request.cuts().iter().any(|&cut| cut as u64 > request.len) {
            return Err(bad(format!("cuts past the call's bytes: {request:?}")));
        }
        Ok(request)
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("torture worker: {what}"),
    )
}

/// One file of the run, as a worker opened it on the mount.
struct WorkerFile {
    buffered: File,
    direct: File,
    /// A shared read-write map of the file's first `map_len` bytes.
    map: NonNull<u8>,
    map_len: usize,
}

impl WorkerFile {
    fn open(path: &Path, map_len: usize) -> io::Result<WorkerFile> {
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
                })
        };
        let (buffered, direct) = (open(0)?, open(libc::O_DIRECT)?);
        // SAFETY: a new shared map of an open file; nothing else in this
        // process refers to its memory, which `Drop` unmaps. The run never
        // truncates a file below the mapped half, so no access in it faults.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                buffered.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(WorkerFile {
            buffered,
            direct,
            map: NonNull::new(map.cast()).expect("mmap never maps at 0"),
            map_len,
        })
    }

    /// The map's words of `offset..offset + len`, checked to lie inside it
    /// and be whole words.
    fn words(&self, offset: u64, len: usize) -> io::Result<*mut u64> {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if offset % 8 != 0 || len % 8 != 0 || offset.saturating_add(len) > self.map_len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: inside the map (checked above).
        Ok(unsafe { self.map.as_ptr().add(offset) }.cast())
    }

    /// Loads `buf` from the map, a word at a time: other processes store to
    /// the same pages meanwhile, so each load is volatile.
    fn map_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let words = self.words(offset, buf.len())?;
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            // SAFETY: word `i` lies inside the map (`words` checked the
            // range), which lives as long as `self`; it is 8-aligned, as the
            // map and the offset are.
            let word = unsafe { words.add(i).read_volatile() };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ok(())
    }

    /// Stores `data` through the map, a word at a time.
    fn map_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let words = self.words(offset, data.len())?;
        for (i, chunk) in data.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
            // SAFETY: as in `map_read`; the map is writable.
            unsafe { words.add(i).write_volatile(word) };
        }
        Ok(())
    }
}

impl Drop for WorkerFile {
    fn drop(&mut self) {
        // SAFETY: the map made in `open`, not used after this.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// `fallocate(2)` of `file` with `mode`, keeping the size.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: a plain system call on an open descriptor; no memory is passed.
    let done = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Serves a run of the torture through the mount at `dir`, whose files are
/// `file0` to `file{files - 1}`, each of `pages` pages; the first half of
/// each is mapped. Returns at the end of standard input; fails if the files
/// cannot be opened or the run's pipe breaks.
pub fn serve_worker(dir: &Path, files: usize, pages: u64) -> io::Result<()> {
    let map_len = usize::try_from(pages / 2 * PAGE).map_err(|_| bad("too many pages".into()))?;
    let files = (0..files)
        .map(|i| WorkerFile::open(&dir.join(format!("file{i}")), map_len))
        .collect::<io::Result<Vec<_>>>()?;
    let mut input = BufReader::new(io::stdin().lock());
    let mut output = BufWriter::new(io::stdout().lock());
    let mut data = vec![0u8; MAX_DATA];
    let mut direct = AlignedBuf::new(MAX_DATA, PAGE_SIZE);
    loop {
        let mut header = [0u8; REQUEST_BYTES];
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
        let request = Request::decode(&header)?;
        let file = files
            .get(request.file)
            .ok_or_else(|| bad(format!("no file {}", request.file)))?;
        let len = usize::try_from(request.len).unwrap_or(usize::MAX);
        let call = request.call;
        if (call.sends_data() || call.returns_data()) && len > MAX_DATA {
            return Err(bad(format!("{len} bytes is too long a call")));
        }
        if request.call.sends_data() {
            input.read_exact(&mut data[..len])?;
        }
        let result = make(&request, file, &mut data, &mut direct, len);
        let (errno, count) = match result {
            Ok(count) => (0, count),
            Err(error) => (error.raw_os_error().unwrap_or(libc::EIO), 0),
        };
        output.write_all(&(errno as u32).to_le_bytes())?;
        output.write_all(&(count as u32).to_le_bytes())?;
        if call.returns_data() {
            let read = match call {
                Call::ReadDirect => &direct[..count],
                _ => &data[..count],
            };
            output.write_all(read)?;
        }
        output.flush()?;
    }
}

/// Makes `request`'s call on `file`: reads land in `data` (`direct` for a
/// direct read), writes come from `data`. Returns the bytes read.
fn make(
    request: &Request,
    file: &WorkerFile,
    data: &mut [u8],
    direct: &mut AlignedBuf,
    len: usize,
) -> io::Result<usize> {
    let offset = request.offset;
    match request.call {
        Call::Read => file.buffered.read_at(&mut data[..len], offset),
        Call::ReadDirect => file.direct.read_at(&mut direct[..len], offset),
        Call::Write => file.buffered.write_all_at(&data[..len], offset).map(|()| 0),
        Call::WriteDirect => {
            direct[..len].copy_from_slice(&data[..len]);
            let written = file.direct.write_at(&direct[..len], offset)?;
            if written != len {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(0)
        }
        Call::Punch => fallocate(
            &file.buffered,
            libc::FALLOC_FL_PUNCH_HOLE,
            offset,
            request.len,
        )
        .map(|()| 0),
        Call::Zero => fallocate(
            &file.buffered,
            libc::FALLOC_FL_ZERO_RANGE,
            offset,
            request.len,
        )
        .map(|()| 0),
        Call::SetLen => file.buffered.set_len(request.len).map(|()| 0),
        Call::Readahead => {
            // SAFETY: a plain system call on an open descriptor.
            let done = unsafe { libc::readahead(file.buffered.as_raw_fd(), offset as i64, len) };
            if done != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(0)
        }
        Call::SyncRange => file.buffered.sync_data().map(|()| 0),
        Call::SyncAll => file.buffered.sync_all().map(|()| 0),
        Call::MapRead => file.map_read(offset, &mut data[..len]).map(|()| len),
        Call::MapWrite => file.map_write(offset, &data[..len]).map(|()| 0),
        Call::ReadVectored => rustix::io::preadv(
            &file.buffered,
            &mut cut_mut(&mut data[..len], &request.cuts()),
            offset,
        )
        .map_err(io::Error::from),
        Call::WriteVectored => {
            let pieces = cut(&data[..len], &request.cuts());
            let written = rustix::io::pwritev(&file.buffered, &pieces, offset)?;
            if written != len {
                // Short only at a failure, which the next call would report.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_cuts_survive_the_pipe() {
        let request =
            Request::new(Call::WriteVectored, 3, 8192, 3 * PAGE).with_cuts(&[0, 4000, 12288]);
        let back = Request::decode(&request.encode()).unwrap();
        assert_eq!(back.call, Call::WriteVectored);
        assert_eq!((back.file, back.offset, back.len), (3, 8192, 3 * PAGE));
        assert_eq!(back.cuts(), vec![0, 4000, 12288]);
        let plain = Request::decode(&Request::new(Call::Read, 0, 0, 10u64).encode()).unwrap();
        assert_eq!(plain.cuts(), Vec::<usize>::new());
    }

    #[test]
    fn cuts_past_a_calls_bytes_are_refused() {
        let request = Request::new(Call::ReadVectored, 0, 0, 100u64).with_cuts(&[101]);
        let error = Request::decode(&request.encode()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
