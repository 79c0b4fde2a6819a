//! One file of a volume: the handle and its [`Backend`] operations.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::format::{FileMeta, BLOCK, BLOCK_SIZE, MAX_FILE_SIZE, RUN_RECORD};
use super::namespace::Timestamp;
#[cfg(doc)]
use super::Runtime;
use super::{State, Volume, REMOVED};
use crate::backend::Backend;
use crate::errno::{err, fail};

/// The number of runs in `fresh` `(logical block, physical block)`, sorted by
/// logical block: the most runs mapping them into holes can add to an extent
/// map.
fn fresh_runs(fresh: &[(u64, u64)]) -> u64 {
    let breaks = fresh
        .windows(2)
        .filter(|pair| pair[1] != (pair[0].0 + 1, pair[0].1 + 1))
        .count();
    (breaks + usize::from(!fresh.is_empty())) as u64
}

/// Which blocks a punch or zero of a byte range touches.
struct RangePlan {
    /// Partial blocks at the edges that are allocated: `(physical block, first
    /// byte, end byte)` inside the block.
    edges: Vec<(u64, u64, u64)>,
    /// The whole blocks, as `first logical block, count`.
    first_whole: u64,
    whole_count: u64,
}

/// Plans `offset..end` of `file`, clamped to its end of file; `None` if that
/// leaves nothing to do.
fn plan_range(file: &FileMeta, offset: u64, end: u64) -> Option<RangePlan> {
    if offset >= end || offset >= file.size {
        return None;
    }
    // The bytes of the last block past the end of file are zero already, so a
    // range reaching the end of file may treat that block as whole.
    let end = if end >= file.size {
        file.size.div_ceil(BLOCK) * BLOCK
    } else {
        end
    };
    let head = offset / BLOCK;
    let tail = (end - 1) / BLOCK;
    let mut partial = Vec::new();
    if head == tail {
        let (from, to) = (offset % BLOCK, end - head * BLOCK);
        if to - from < BLOCK {
            partial.push((head, from, to));
        }
    } else {
        if offset % BLOCK != 0 {
            partial.push((head, offset % BLOCK, BLOCK));
        }
        if end % BLOCK != 0 {
            partial.push((tail, 0, end % BLOCK));
        }
    }
    let first_whole = offset.div_ceil(BLOCK);
    let whole_count = (end / BLOCK).saturating_sub(first_whole);
    let edges = partial
        .into_iter()
        .filter_map(|(lblk, from, to)| Some((file.extents.lookup(lblk)?, from, to)))
        .collect();
    Some(RangePlan {
        edges,
        first_whole,
        whole_count,
    })
}

/// The byte span of `len` bytes of whole pages starting at page `index`.
fn page_span(index: u64, len: usize) -> io::Result<(u64, u64)> {
    if len % BLOCK_SIZE != 0 {
        return fail(libc::EINVAL);
    }
    let start = index.checked_mul(BLOCK).ok_or_else(|| err(libc::EINVAL))?;
    let end = start
        .checked_add(len as u64)
        .ok_or_else(|| err(libc::EINVAL))?;
    Ok((start, end))
}

/// The end of a collapse or insert range, or `EINVAL` unless both `offset` and
/// `len` are multiples of the block size, `len` is positive and the end fits.
fn aligned_range(offset: u64, len: u64) -> io::Result<u64> {
    if offset % BLOCK != 0 || len % BLOCK != 0 || len == 0 {
        return fail(libc::EINVAL);
    }
    offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))
}

/// Splits per-page physical blocks into runs `(first page, page count, first
/// physical block or None for a hole)` that one device call can serve.
fn runs(plan: &[Option<u64>]) -> Vec<(usize, usize, Option<u64>)> {
    let mut runs: Vec<(usize, usize, Option<u64>)> = Vec::new();
    for (page, &phys) in plan.iter().enumerate() {
        if let Some((_, count, run_phys)) = runs.last_mut() {
            let extends = match (*run_phys, phys) {
                (None, None) => true,
                (Some(first), Some(next)) => first + *count as u64 == next,
                _ => false,
            };
            if extends {
                *count += 1;
                continue;
            }
        }
        runs.push((page, 1, phys));
    }
    runs
}

impl Volume {
    /// A new handle of file `id`, counted in its runtime's handles until it
    /// drops.
    pub(super) fn new_handle(self: &Arc<Self>, state: &mut State, id: u64) -> VolumeFile {
        let runtime = state.runtime.entry(id).or_default();
        runtime.handles += 1;
        VolumeFile {
            volume: Arc::clone(self),
            id,
            changes: runtime.changes.clone(),
            touched: runtime.touched.clone(),
        }
    }
}

/// A handle to one file of a [`Volume`]: cheap to clone, and each clone counts
/// as a handle for [`Volume::remove_file`].
///
/// ```
/// use std::sync::Arc;
/// use filemap::{Backend, MemDevice, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(4 << 20)))?;
/// let file = volume.create_file("a")?;
/// file.set_len(3 * 4096)?;
/// file.write_pages(1, &[5; 4096])?;
/// assert_eq!(file.allocated_blocks()?, 1); // pages 0 and 2 are holes
/// file.punch_hole(4096, 4096)?;
/// assert_eq!(file.allocated_blocks()?, 0);
/// let error = volume.remove_file("a").unwrap_err(); // a handle is open
/// assert_eq!(filemap::errno(&error), Some(libc::EBUSY));
/// drop(file);
/// volume.remove_file("a")?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct VolumeFile {
    volume: Arc<Volume>,
    pub(super) id: u64,
    /// The file's change count, shared by its handles (see [`Runtime`]).
    changes: Arc<AtomicU64>,
    /// When the file was last touched (see [`Runtime`]).
    touched: Arc<AtomicU64>,
}

/// Counts a change of the file when it drops: at the end of every call that
/// may change its bytes or size, whatever the outcome (a failed call may have
/// changed some).
struct Changes<'a>(&'a AtomicU64);

impl Drop for Changes<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

impl VolumeFile {
    /// The volume the file lives on.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The number of blocks allocated to the file (like `st_blocks`, in 4 KiB units).
    pub fn allocated_blocks(&self) -> io::Result<u64> {
        self.volume
            .with_file(self.id, |file| Ok(file.extents.mapped_blocks()))
    }

    /// The physical block that page `page` of the file maps to, if any (tests use
    /// it to watch block reuse).
    /// (A test hook: only with the `testing` feature.)
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn physical_block(&self, page: u64) -> Option<u64> {
        self.volume
            .with_file(self.id, |file| Ok(file.extents.lookup(page)))
            .ok()
            .flatten()
    }

    /// Writes whole pages at page `index`, moving the file's times if `touch`.
    fn write_blocks(&self, index: u64, buf: &[u8], touch: bool) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look up under the mutex, and take fresh blocks for holes without mapping
        // them: a fresh block still holds its previous owner's data, so it is mapped
        // only once this write's data is on it (as ext4 does with unwritten extents).
        // Until then, readers of the hole read zeroes.
        let (size, plan, fresh, held) = {
            let mut guard = self.volume.state.lock();
            let state = &mut *guard;
            let file = state.meta.file(self.id).ok_or_else(|| err(libc::ENOENT))?;
            if pages > 0 && end - BLOCK >= file.size {
                return fail(libc::EINVAL);
            }
            let mut plan: Vec<Option<u64>> = (0..pages as u64)
                .map(|page| file.extents.lookup(index + page))
                .collect();
            let size = file.size;
            let holes = plan.iter().filter(|phys| phys.is_none()).count() as u64;
            // Check space first so that ENOSPC changes nothing.
            if holes > state.space.allocator.available() {
                return fail(libc::ENOSPC);
            }
            let alloc = &mut state.space.allocator;
            let mut fresh = Vec::with_capacity(holes as usize);
            for (page, slot) in (index..).zip(plan.iter_mut()) {
                if slot.is_none() {
                    let phys = alloc.allocate().expect("space checked above");
                    fresh.push((page, phys));
                    *slot = Some(phys);
                }
            }
            // Mapping the fresh blocks adds at most one run per run of them:
            // reserve that much metadata, or give the blocks back (in reverse,
            // which restores the allocator's stack).
            let held = fresh_runs(&fresh) * RUN_RECORD;
            if let Err(error) = state.reserve_meta(held) {
                for &(_, phys) in fresh.iter().rev() {
                    state.space.allocator.free(phys, 1);
                }
                return Err(error);
            }
            state.space.allocator.in_flight += holes;
            (size, plan, fresh, held)
        };
        let written = self.write_planned(start, size, &plan, buf);
        // Map the fresh blocks, or give them back after an error. A hole another
        // writer filled meanwhile keeps that writer's block, and this write's page
        // goes there in place: a fresh block that was never mapped is the only kind
        // that can be freed without a reader possibly holding it (and, never
        // mapped, no commit can hold it either).
        let mut overwrite = Vec::new();
        let mapped = {
            let mut guard = self.volume.state.lock();
            let state = &mut *guard;
            state.meta_reserved -= held;
            let allocator = &mut state.space.allocator;
            allocator.in_flight -= fresh.len() as u64;
            let mut inode = state
                .meta
                .inodes
                .get_mut(&self.id)
                .filter(|_| written.is_ok());
            let before = inode.as_ref().map(|inode| inode.encoded_len());
            if let Some(inode) = inode.as_deref_mut() {
                if touch {
                    let now = Timestamp::now();
                    inode.mtime = now;
                    inode.ctime = now;
                }
                state.dirty = true;
            }
            let mut file = inode.as_deref_mut().and_then(|inode| inode.file_mut());
            let mut inserted = Vec::with_capacity(fresh.len());
            for &(page, phys) in &fresh {
                match file.as_deref_mut() {
                    Some(file) if page * BLOCK < file.size => match file.extents.lookup(page) {
                        None => {
                            file.extents.insert(page, phys);
                            inserted.push(page);
                            continue;
                        }
                        Some(existing) => overwrite.push((page, existing)),
                    },
                    // An error, a removed file, or a page truncated away meanwhile.
                    _ => {}
                }
                allocator.free(phys, 1);
            }
            match (inode, before) {
                (Some(inode), Some(before)) => {
                    let after = state.meta_len - before + inode.encoded_len();
                    let file = inode.file_mut().expect("a file");
                    // Pages another writer filled meanwhile can split this
                    // write's runs into more than it reserved. If the area
                    // cannot take them, unmap the fresh blocks again: nothing
                    // else maps them, and the file reads as before.
                    if after + state.meta_reserved > state.meta_capacity {
                        for &page in &inserted {
                            for (phys, len) in file.extents.remove_range(page, 1) {
                                allocator.free(phys, len);
                            }
                        }
                        debug_assert_eq!(inode.encoded_len(), before);
                        Err(err(libc::ENOSPC))
                    } else {
                        state.meta_len = after;
                        state.dirty = true;
                        Ok(())
                    }
                }
                _ => Ok(()),
            }
        };
        written?;
        mapped?;
        for (page, existing) in overwrite {
            let offset = (page - index) as usize * BLOCK_SIZE;
            let bytes = &buf[offset..offset + BLOCK_SIZE];
            self.write_planned(page * BLOCK, size, &[Some(existing)], bytes)?;
        }
        Ok(())
    }

    /// Writes whole pages `buf` starting at byte `start` to the planned blocks,
    /// zeroing the bytes of the last page past `size` (the end of file).
    fn write_planned(
        &self,
        start: u64,
        size: u64,
        plan: &[Option<u64>],
        buf: &[u8],
    ) -> io::Result<()> {
        let end = start + buf.len() as u64;
        let (body_plan, last) = if end > size {
            // The last page straddles the end of file: its tail must stay zero on
            // the device, so a later grow reads zeroes there.
            let (body, last) = plan.split_at(plan.len() - 1);
            (body, last[0])
        } else {
            (plan, None)
        };
        for (page, count, phys) in runs(body_plan) {
            let phys = phys.expect("every written page has a block");
            let bytes = &buf[page * BLOCK_SIZE..(page + count) * BLOCK_SIZE];
            self.volume.device.write_all_at(bytes, phys * BLOCK)?;
        }
        if let Some(phys) = last {
            let last_start = end - BLOCK;
            let mut page = buf[buf.len() - BLOCK_SIZE..].to_vec();
            page[(size - last_start) as usize..].fill(0);
            self.volume.device.write_all_at(&page, phys * BLOCK)?;
        }
        Ok(())
    }
}

impl Clone for VolumeFile {
    fn clone(&self) -> Self {
        let mut state = self.volume.state.lock();
        self.volume.new_handle(&mut state, self.id)
    }
}

impl Drop for VolumeFile {
    /// The last handle of a file unlinked while open frees it.
    fn drop(&mut self) {
        let mut state = self.volume.state.lock();
        let Some(runtime) = state.runtime.get_mut(&self.id) else {
            return;
        };
        runtime.handles -= 1;
        let last = runtime.handles == 0;
        if last && state.inode(self.id).is_ok_and(|inode| inode.is_orphan()) {
            state.free_inode(self.id);
        }
    }
}

impl fmt::Debug for VolumeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeFile").field("id", &self.id).finish()
    }
}

impl Backend for VolumeFile {
    fn len(&self) -> io::Result<u64> {
        self.volume.with_file(self.id, |file| Ok(file.size))
    }

    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.volume.with_file(self.id, |file| {
            let data = file.extents.next_mapped(offset / BLOCK);
            let at = data.map(|block| (block * BLOCK).max(offset));
            Ok(at.filter(|&at| at < file.size))
        })
    }

    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.volume.with_file(self.id, |file| {
            if offset >= file.size {
                return Ok(None);
            }
            let hole = file.extents.next_unmapped(offset / BLOCK) * BLOCK;
            Ok(Some(hole.max(offset).min(file.size)))
        })
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look the blocks up under the mutex, then read outside it: see the
        // volume's documentation for why nothing here stops block reuse.
        let (size, plan) = self.volume.with_file(self.id, |file| {
            let plan: Vec<Option<u64>> = (0..pages as u64)
                .map(|page| {
                    let inside = start + page * BLOCK < file.size;
                    inside.then(|| file.extents.lookup(index + page)).flatten()
                })
                .collect();
            Ok((file.size, plan))
        })?;
        for (page, count, phys) in runs(&plan) {
            let bytes = &mut buf[page * BLOCK_SIZE..(page + count) * BLOCK_SIZE];
            match phys {
                Some(phys) => self.volume.device.read_exact_at(bytes, phys * BLOCK)?,
                None => bytes.fill(0),
            }
        }
        if end > size {
            buf[size.saturating_sub(start) as usize..].fill(0);
        }
        Ok(())
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.write_blocks(index, buf, true)
    }

    /// As `write_pages`, leaving the times: they moved with the write into
    /// the cache ([`Backend::touch`]).
    fn write_back_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.write_blocks(index, buf, false)
    }

    /// Moves the modification and change times, at most once a millisecond
    /// (the clock reading and a shared counter, no lock, the rest of it).
    fn touch(&self) -> io::Result<()> {
        let now = Timestamp::now();
        let ms = (now.secs as u64)
            .wrapping_mul(1000)
            .wrapping_add(u64::from(now.nanos / 1_000_000))
            .max(1);
        if self.touched.swap(ms, Ordering::Relaxed) != ms {
            self.volume.touch_data(self.id);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        if len > MAX_FILE_SIZE {
            return fail(libc::EFBIG);
        }
        // Growing only records the size: the bytes past the old end of file are
        // zero on the device already.
        let shrink = self.volume.change_file(self.id, 0, 0, |file, _| {
            if len >= file.size {
                file.size = len;
                return Ok(None);
            }
            let within = len % BLOCK;
            let tail = match within {
                0 => None,
                _ => file.extents.lookup(len / BLOCK).map(|phys| (phys, within)),
            };
            Ok(Some(tail))
        })?;
        let Some(tail) = shrink else {
            return Ok(());
        };
        // Zero the new last block's tail before freeing anything, so a device
        // error leaves the size and the mapping unchanged.
        if let Some((phys, within)) = tail {
            self.volume
                .write_zeros(phys * BLOCK + within, BLOCK - within)?;
        }
        // Cutting the runs at the new end never adds one.
        self.volume.change_file(self.id, 0, 0, |file, space| {
            for (phys, count) in file.extents.remove_range(len.div_ceil(BLOCK), u64::MAX) {
                space.free(phys, count);
            }
            file.size = len;
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        // Punching inside a run splits it in two: reserve room for one more run
        // before zeroing anything, so ENOSPC changes nothing.
        let plan = {
            let mut state = self.volume.state.lock();
            let file = state.meta.file(self.id).ok_or_else(|| err(libc::ENOENT))?;
            let plan = plan_range(file, offset, end);
            if plan.is_some() {
                state.reserve_meta(RUN_RECORD)?;
            }
            plan
        };
        let Some(plan) = plan else {
            return Ok(());
        };
        let zeroed = plan.edges.iter().try_for_each(|&(phys, from, to)| {
            self.volume.write_zeros(phys * BLOCK + from, to - from)
        });
        self.volume
            .change_file(self.id, RUN_RECORD, 0, |file, space| {
                zeroed?;
                for (phys, count) in file
                    .extents
                    .remove_range(plan.first_whole, plan.whole_count)
                {
                    space.free(phys, count);
                }
                Ok(())
            })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        // Holes already read zero, so only allocated blocks are written.
        let plan = self.volume.with_file(self.id, |file| {
            Ok(plan_range(file, offset, end).map(|plan| {
                let whole = file.extents.runs_in(plan.first_whole, plan.whole_count);
                (plan, whole)
            }))
        })?;
        let Some((plan, whole)) = plan else {
            return Ok(());
        };
        for &(phys, from, to) in &plan.edges {
            self.volume.write_zeros(phys * BLOCK + from, to - from)?;
        }
        for (_, extent) in whole {
            self.volume
                .write_zeros(extent.phys * BLOCK, extent.len * BLOCK)?;
        }
        self.volume.touch_data(self.id);
        Ok(())
    }

    /// Frees the blocks of the range (most recently freed first, as a punch does)
    /// and re-keys the extents after it, then commits the volume (see the volume's
    /// documentation): time proportional to the extents moved plus a commit.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and the range ends before the end of file (the kernel's rule:
    /// a collapse may not reach the end of file).
    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        let end = aligned_range(offset, len)?;
        self.volume
            .change_file(self.id, 0, RUN_RECORD, |file, space| {
                if end >= file.size {
                    return fail(libc::EINVAL);
                }
                let (first, count) = (offset / BLOCK, len / BLOCK);
                for (phys, run) in file.extents.remove_range(first, count) {
                    space.free(phys, run);
                }
                file.extents.shift_down(first + count, count);
                file.size -= len;
                Ok(())
            })?;
        self.volume.commit()
    }

    /// Re-keys the extents from `offset` on, then commits the volume (see the
    /// volume's documentation): time proportional to the extents moved plus a
    /// commit. The inserted range is a hole.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and `offset` is before the end of file; `EFBIG` if the file
    /// would outgrow [`Backend::max_file_size`].
    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _changes = Changes(&self.changes);
        aligned_range(offset, len)?;
        self.volume.change_file(self.id, 0, RUN_RECORD, |file, _| {
            if offset >= file.size {
                return fail(libc::EINVAL);
            }
            let size = file
                .size
                .checked_add(len)
                .filter(|&size| size <= MAX_FILE_SIZE)
                .ok_or_else(|| err(libc::EFBIG))?;
            file.extents.shift_up(offset / BLOCK, len / BLOCK);
            file.size = size;
            Ok(())
        })?;
        self.volume.commit()
    }

    /// Commits the whole volume (see [`Volume::sync`]).
    fn sync(&self) -> io::Result<()> {
        self.volume.with_file(self.id, |_| Ok(()))?;
        self.volume.commit()
    }

    fn remove(&self) -> io::Result<()> {
        let mut state = self.volume.state.lock();
        Volume::remove_locked(&mut state, self.id)
    }

    /// The volume's number in this process and the file's id; the version
    /// counts the file's changes since the volume was opened.
    fn identity(&self) -> io::Result<Option<crate::FileIdentity>> {
        let changes = self.changes.load(Ordering::Acquire);
        if changes & REMOVED != 0 {
            return fail(libc::ENOENT);
        }
        Ok(Some(crate::FileIdentity {
            file: u128::from(self.volume.serial) << 64 | u128::from(self.id),
            version: changes.into(),
        }))
    }
}
