//! A volume: many files on one device, with a block allocator and extent maps.
//!
//! This is the realistic substrate for the cache: files share a device, and a
//! freed block is handed to the next allocation at once, whichever file asks. A
//! stale block mapping therefore exposes another file's data, exactly as in the
//! kernel bug reports the cache's coherence lock exists to prevent.
//!
//! Metadata (file table, sizes, extent maps, allocator) lives in memory behind one
//! mutex. Device I/O is always done outside that mutex: the backend deliberately
//! does not serialise its I/O against block reuse, because preventing a read of a
//! freed-and-reused block is the page cache's job, and a backend that hid such
//! races would hide the bugs the torture looks for.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::extent::ExtentMap;
use super::Backend;
use crate::device::Device;
use crate::errno::{err, fail};

/// The volume's block size in bytes, equal to the cache's page size so that a page
/// is always exactly one block.
pub const BLOCK_SIZE: usize = 4096;
const _: () = assert!(BLOCK_SIZE == crate::PAGE_SIZE);

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The largest file size, 2^44 bytes (16 TiB): logical block numbers then fit in
/// 32 bits, which a future on-disk extent format can rely on (ext4 has the same
/// limit with 4 KiB blocks).
const MAX_FILE_SIZE: u64 = 1 << 44;

/// The longest file name in bytes, as on common Unix file systems.
const MAX_NAME_LEN: usize = 255;

/// Blocks at the start of the device that are never allocated: block 0 is kept
/// for a future superblock.
const RESERVED_BLOCKS: u64 = 1;

/// Zeroes to write from, so zeroing a range allocates nothing.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Many files sharing one device in 4 KiB blocks.
pub struct Volume {
    device: Arc<dyn Device>,
    total_blocks: u64,
    state: Mutex<State>,
}

/// Everything behind the volume's mutex.
struct State {
    meta: Metadata,
    /// Live [`VolumeFile`] handles per file id: runtime only, never persisted.
    handles: HashMap<u64, u64>,
}

/// The volume's persistent metadata: plain data, so a later on-disk format can
/// serialise it as it is.
#[derive(Clone, Debug)]
struct Metadata {
    names: BTreeMap<String, u64>,
    files: BTreeMap<u64, FileMeta>,
    /// Ids are never reused, so a handle of a removed file can never reach a
    /// newer file that happens to get the same id.
    next_id: u64,
    allocator: Allocator,
}

#[derive(Clone, Debug)]
struct FileMeta {
    name: String,
    size: u64,
    extents: ExtentMap,
}

/// The block allocator: a LIFO stack of freed runs, then never-used blocks above
/// a high-water mark.
///
/// LIFO is deliberate: the block freed last is the block allocated next, so a
/// stale mapping of it reads another file's data at once instead of by luck.
#[derive(Clone, Debug)]
struct Allocator {
    /// Freed runs `(first block, length)`; the top of the stack is the last entry.
    free: Vec<(u64, u64)>,
    /// The number of blocks in `free`.
    free_count: u64,
    /// Blocks handed to writes that have not mapped them yet (see
    /// `VolumeFile::write_pages`): neither free nor owned by a file.
    in_flight: u64,
    /// Blocks at or above this have never been allocated.
    high_water: u64,
    /// The device's size in blocks.
    total: u64,
}

impl Allocator {
    fn available(&self) -> u64 {
        self.free_count + (self.total - self.high_water)
    }

    /// The most recently freed block, or else a never-used one.
    fn allocate(&mut self) -> Option<u64> {
        if let Some(top) = self.free.last_mut() {
            let block = top.0;
            top.0 += 1;
            top.1 -= 1;
            if top.1 == 0 {
                self.free.pop();
            }
            self.free_count -= 1;
            return Some(block);
        }
        if self.high_water < self.total {
            self.high_water += 1;
            return Some(self.high_water - 1);
        }
        None
    }

    fn free(&mut self, first: u64, len: u64) {
        if len > 0 {
            self.free.push((first, len));
            self.free_count += len;
        }
    }
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

fn check_name(name: &str) -> io::Result<()> {
    if name.len() > MAX_NAME_LEN {
        return fail(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(['/', '\0']) {
        return fail(libc::EINVAL);
    }
    Ok(())
}

impl Volume {
    /// Makes an empty volume on `device`, using every whole block of it. Nothing
    /// is written to the device yet: the metadata lives in memory.
    ///
    /// Fails with `EINVAL` if the device is smaller than the reserved blocks.
    pub fn format(device: Arc<dyn Device>) -> io::Result<Arc<Volume>> {
        let total_blocks = device.len() / BLOCK;
        if total_blocks < RESERVED_BLOCKS {
            return fail(libc::EINVAL);
        }
        Ok(Arc::new(Volume {
            device,
            total_blocks,
            state: Mutex::new(State {
                meta: Metadata {
                    names: BTreeMap::new(),
                    files: BTreeMap::new(),
                    next_id: 1,
                    allocator: Allocator {
                        free: Vec::new(),
                        free_count: 0,
                        in_flight: 0,
                        high_water: RESERVED_BLOCKS,
                        total: total_blocks,
                    },
                },
                handles: HashMap::new(),
            }),
        }))
    }

    /// Creates an empty file and returns a handle to it.
    ///
    /// Fails with `EEXIST` if the name is taken, `EINVAL` if it is empty or holds
    /// `/` or NUL, and `ENAMETOOLONG` if it is longer than 255 bytes.
    pub fn create_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        check_name(name)?;
        let mut state = self.state.lock();
        if state.meta.names.contains_key(name) {
            return fail(libc::EEXIST);
        }
        let id = state.meta.next_id;
        state.meta.next_id += 1;
        state.meta.names.insert(name.to_owned(), id);
        state.meta.files.insert(
            id,
            FileMeta {
                name: name.to_owned(),
                size: 0,
                extents: ExtentMap::new(),
            },
        );
        Ok(self.new_handle(&mut state, id))
    }

    /// Opens an existing file; fails with `ENOENT` if there is none of that name.
    pub fn open_file(self: &Arc<Self>, name: &str) -> io::Result<VolumeFile> {
        let mut state = self.state.lock();
        let id = *state
            .meta
            .names
            .get(name)
            .ok_or_else(|| err(libc::ENOENT))?;
        Ok(self.new_handle(&mut state, id))
    }

    /// Removes a file by name and frees its blocks.
    ///
    /// Fails with `ENOENT` if there is no such file and `EBUSY` while any handle
    /// of it is alive (use [`Backend::remove`] on a handle to remove it anyway).
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        let id = *state
            .meta
            .names
            .get(name)
            .ok_or_else(|| err(libc::ENOENT))?;
        if state.handles.get(&id).is_some_and(|&count| count > 0) {
            return fail(libc::EBUSY);
        }
        Self::remove_locked(&mut state.meta, id)
    }

    /// The names of every file, sorted.
    pub fn file_names(&self) -> Vec<String> {
        self.state.lock().meta.names.keys().cloned().collect()
    }

    /// The device's size in blocks, reserved blocks included.
    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    /// The number of blocks that can still be allocated.
    pub fn free_blocks(&self) -> u64 {
        self.state.lock().meta.allocator.available()
    }

    /// The device the volume lives on.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// Asserts that every block below the allocator's high-water mark is exactly
    /// one of: reserved, free, or allocated to exactly one file; that no file maps
    /// blocks past its end of file; and that the file table is consistent.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let state = self.state.lock();
        let meta = &state.meta;
        let alloc = &meta.allocator;
        assert_eq!(meta.names.len(), meta.files.len(), "file table out of sync");
        // (first block, length, owner) for every block below the high-water mark.
        let mut claims: Vec<(u64, u64, String)> = vec![(0, RESERVED_BLOCKS, "reserved".into())];
        let mut free_count = 0;
        for &(first, len) in &alloc.free {
            assert!(len > 0, "empty free run at {first}");
            claims.push((first, len, "free list".into()));
            free_count += len;
        }
        assert_eq!(free_count, alloc.free_count, "free block count is off");
        for (&id, file) in &meta.files {
            assert_eq!(meta.names.get(&file.name), Some(&id), "name of file {id}");
            assert!(file.size <= MAX_FILE_SIZE, "file {id} too large");
            file.extents.check_invariants();
            let blocks = file.size.div_ceil(BLOCK);
            for (lblk, extent) in file.extents.iter() {
                assert!(
                    lblk + extent.len <= blocks,
                    "file {} maps block {} past its end",
                    file.name,
                    lblk + extent.len - 1
                );
                claims.push((extent.phys, extent.len, format!("file {}", file.name)));
            }
        }
        claims.sort();
        let mut next = 0;
        for (first, len, owner) in &claims {
            assert!(
                *first >= next,
                "block {first} ({owner}) is claimed twice: {claims:?}"
            );
            next = first + len;
        }
        assert!(
            next <= alloc.high_water,
            "a claimed block is above the high-water mark"
        );
        let claimed: u64 = claims.iter().map(|(_, len, _)| len).sum();
        assert_eq!(
            claimed + alloc.in_flight,
            alloc.high_water,
            "blocks leaked below the high-water mark"
        );
        let mapped: u64 = meta.files.values().map(|f| f.extents.mapped_blocks()).sum();
        assert_eq!(
            mapped + free_count + RESERVED_BLOCKS + alloc.in_flight,
            alloc.high_water
        );
        assert!(alloc.high_water <= self.total_blocks);
    }

    fn new_handle(self: &Arc<Self>, state: &mut State, id: u64) -> VolumeFile {
        *state.handles.entry(id).or_insert(0) += 1;
        VolumeFile {
            volume: Arc::clone(self),
            id,
        }
    }

    fn remove_locked(meta: &mut Metadata, id: u64) -> io::Result<()> {
        let mut file = meta.files.remove(&id).ok_or_else(|| err(libc::ENOENT))?;
        meta.names.remove(&file.name);
        for (phys, len) in file.extents.remove_range(0, u64::MAX) {
            meta.allocator.free(phys, len);
        }
        Ok(())
    }

    /// Runs `f` on file `id` under the mutex; `ENOENT` if it was removed.
    fn with_file<R>(
        &self,
        id: u64,
        f: impl FnOnce(&mut FileMeta, &mut Allocator) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut state = self.state.lock();
        let Metadata {
            files, allocator, ..
        } = &mut state.meta;
        let file = files.get_mut(&id).ok_or_else(|| err(libc::ENOENT))?;
        f(file, allocator)
    }

    /// Writes `len` zero bytes at device byte `offset`.
    fn write_zeros(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let chunk = len.min(ZEROS.len() as u64);
            self.device.write_all_at(&ZEROS[..chunk as usize], offset)?;
            offset += chunk;
            len -= chunk;
        }
        Ok(())
    }
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("device", &self.device)
            .field("total_blocks", &self.total_blocks)
            .finish_non_exhaustive()
    }
}

/// A handle to one file of a [`Volume`]: cheap to clone, and each clone counts
/// as a handle for [`Volume::remove_file`].
pub struct VolumeFile {
    volume: Arc<Volume>,
    id: u64,
}

impl VolumeFile {
    /// The volume the file lives on.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The number of blocks allocated to the file (like `st_blocks`, in 4 KiB units).
    pub fn allocated_blocks(&self) -> io::Result<u64> {
        self.volume
            .with_file(self.id, |file, _| Ok(file.extents.mapped_blocks()))
    }

    /// The physical block that page `page` of the file maps to, if any (tests use
    /// it to watch block reuse).
    #[doc(hidden)]
    pub fn physical_block(&self, page: u64) -> Option<u64> {
        self.volume
            .with_file(self.id, |file, _| Ok(file.extents.lookup(page)))
            .ok()
            .flatten()
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
    fn drop(&mut self) {
        let mut state = self.volume.state.lock();
        if let Some(count) = state.handles.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                state.handles.remove(&self.id);
            }
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
        self.volume.with_file(self.id, |file, _| Ok(file.size))
    }

    fn max_file_size(&self) -> u64 {
        MAX_FILE_SIZE
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look the blocks up under the mutex, then read outside it: see the
        // module documentation for why nothing here stops block reuse.
        let (size, plan) = self.volume.with_file(self.id, |file, _| {
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
        let (start, end) = page_span(index, buf.len())?;
        let pages = buf.len() / BLOCK_SIZE;
        // Look up under the mutex, and take fresh blocks for holes without mapping
        // them: a fresh block still holds its previous owner's data, so it is mapped
        // only once this write's data is on it (as ext4 does with unwritten extents).
        // Until then, readers of the hole read zeroes.
        let (size, plan, fresh) = self.volume.with_file(self.id, |file, alloc| {
            if pages > 0 && end - BLOCK >= file.size {
                return fail(libc::EINVAL);
            }
            let mut plan: Vec<Option<u64>> = (0..pages as u64)
                .map(|page| file.extents.lookup(index + page))
                .collect();
            let holes = plan.iter().filter(|phys| phys.is_none()).count();
            // Check space first so that ENOSPC changes nothing.
            if holes as u64 > alloc.available() {
                return fail(libc::ENOSPC);
            }
            let mut fresh = Vec::with_capacity(holes);
            for (page, slot) in (index..).zip(plan.iter_mut()) {
                if slot.is_none() {
                    let phys = alloc.allocate().expect("space checked above");
                    alloc.in_flight += 1;
                    fresh.push((page, phys));
                    *slot = Some(phys);
                }
            }
            Ok((file.size, plan, fresh))
        })?;
        let written = self.write_planned(start, size, &plan, buf);
        // Map the fresh blocks, or give them back after an error. A hole another
        // writer filled meanwhile keeps that writer's block, and this write's page
        // goes there in place: a fresh block that was never mapped is the only kind
        // that can be freed without a reader possibly holding it.
        let mut overwrite = Vec::new();
        {
            let mut state = self.volume.state.lock();
            let Metadata {
                files, allocator, ..
            } = &mut state.meta;
            let mut file = files.get_mut(&self.id).filter(|_| written.is_ok());
            for &(page, phys) in &fresh {
                allocator.in_flight -= 1;
                match file.as_deref_mut() {
                    Some(file) if page * BLOCK < file.size => match file.extents.lookup(page) {
                        None => {
                            file.extents.insert(page, phys);
                            continue;
                        }
                        Some(existing) => overwrite.push((page, existing)),
                    },
                    // An error, a removed file, or a page truncated away meanwhile.
                    _ => {}
                }
                allocator.free(phys, 1);
            }
        }
        written?;
        for (page, existing) in overwrite {
            let offset = (page - index) as usize * BLOCK_SIZE;
            let bytes = &buf[offset..offset + BLOCK_SIZE];
            self.write_planned(page * BLOCK, size, &[Some(existing)], bytes)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_FILE_SIZE {
            return fail(libc::EFBIG);
        }
        // Growing only records the size: the bytes past the old end of file are
        // zero on the device already.
        let shrink = self.volume.with_file(self.id, |file, _| {
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
        self.volume.with_file(self.id, |file, alloc| {
            for (phys, count) in file.extents.remove_range(len.div_ceil(BLOCK), u64::MAX) {
                alloc.free(phys, count);
            }
            file.size = len;
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        let plan = self
            .volume
            .with_file(self.id, |file, _| Ok(plan_range(file, offset, end)))?;
        let Some(plan) = plan else {
            return Ok(());
        };
        for &(phys, from, to) in &plan.edges {
            self.volume.write_zeros(phys * BLOCK + from, to - from)?;
        }
        self.volume.with_file(self.id, |file, alloc| {
            for (phys, count) in file
                .extents
                .remove_range(plan.first_whole, plan.whole_count)
            {
                alloc.free(phys, count);
            }
            Ok(())
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| err(libc::EINVAL))?;
        // Holes already read zero, so only allocated blocks are written.
        let plan = self.volume.with_file(self.id, |file, _| {
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
        Ok(())
    }

    /// Frees the blocks of the range (most recently freed first, as a punch does)
    /// and re-keys the extents after it: metadata only, no device I/O, and time
    /// proportional to the extents moved.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and the range ends before the end of file (the kernel's rule:
    /// a collapse may not reach the end of file).
    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = aligned_range(offset, len)?;
        self.volume.with_file(self.id, |file, alloc| {
            if end >= file.size {
                return fail(libc::EINVAL);
            }
            let (first, count) = (offset / BLOCK, len / BLOCK);
            for (phys, run) in file.extents.remove_range(first, count) {
                alloc.free(phys, run);
            }
            file.extents.shift_down(first + count, count);
            file.size -= len;
            Ok(())
        })
    }

    /// Re-keys the extents from `offset` on: metadata only, and time
    /// proportional to the extents moved. The inserted range is a hole.
    ///
    /// `EINVAL` unless `offset` and `len` are multiples of [`BLOCK_SIZE`], `len`
    /// is positive and `offset` is before the end of file; `EFBIG` if the file
    /// would outgrow [`Backend::max_file_size`].
    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        aligned_range(offset, len)?;
        self.volume.with_file(self.id, |file, _| {
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
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.volume.with_file(self.id, |_, _| Ok(()))?;
        self.volume.device.flush()
    }

    fn remove(&self) -> io::Result<()> {
        let mut state = self.volume.state.lock();
        Volume::remove_locked(&mut state.meta, self.id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::device::{DeviceOp, FaultyDevice, MemDevice};

    const PAGE: usize = BLOCK_SIZE;

    fn volume(blocks: u64) -> Arc<Volume> {
        Volume::format(Arc::new(MemDevice::new(blocks * BLOCK))).unwrap()
    }

    fn errno<T: fmt::Debug>(result: io::Result<T>) -> i32 {
        result.unwrap_err().raw_os_error().expect("an errno")
    }

    /// A page whose every byte is `fill`.
    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    fn read(file: &VolumeFile, index: u64, pages: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; pages * PAGE];
        file.read_pages(index, &mut buf).unwrap();
        buf
    }

    /// A file of `pages` pages, page i filled with byte `i + 1`.
    fn filled(volume: &Arc<Volume>, name: &str, pages: u64) -> VolumeFile {
        let file = volume.create_file(name).unwrap();
        file.set_len(pages * BLOCK).unwrap();
        let data: Vec<u8> = (0..pages).flat_map(|i| page(i as u8 + 1)).collect();
        file.write_pages(0, &data).unwrap();
        file
    }

    #[test]
    fn write_read_round_trip() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(4 * BLOCK).unwrap();
        let data: Vec<u8> = (0..4 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        file.write_pages(0, &data).unwrap();
        assert_eq!(read(&file, 0, 4), data);
        assert_eq!(read(&file, 1, 2), &data[PAGE..3 * PAGE]);
        assert_eq!(file.len().unwrap(), 4 * BLOCK);
        assert_eq!(file.allocated_blocks().unwrap(), 4);
        // Fresh allocations are physically contiguous: one run.
        let first = file.physical_block(0).unwrap();
        assert_eq!(file.physical_block(3), Some(first + 3));
        file.sync().unwrap();
        // Another handle sees the same data.
        let again = volume.open_file("a").unwrap();
        assert_eq!(read(&again, 0, 4), data);
        volume.check_invariants();
    }

    #[test]
    fn holes_and_pages_past_eof_read_zero() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(3 * BLOCK).unwrap();
        file.write_pages(0, &page(1)).unwrap();
        file.write_pages(2, &page(3)).unwrap();
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..2 * PAGE], page(0));
        assert_eq!(&data[2 * PAGE..3 * PAGE], page(3));
        assert_eq!(&data[3 * PAGE..], vec![0; 2 * PAGE]);
        assert_eq!(file.physical_block(1), None);
        assert_eq!(read(&file, 1 << 30, 1), page(0));
        volume.check_invariants();
    }

    #[test]
    fn bytes_past_eof_in_the_last_page_stay_zero() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(100).unwrap();
        file.write_pages(0, &page(9)).unwrap();
        let data = read(&file, 0, 1);
        assert_eq!(&data[..100], &[9; 100]);
        assert!(data[100..].iter().all(|&b| b == 0));
        // Growing exposes zeroes, not what the page buffer held past the end.
        file.set_len(BLOCK).unwrap();
        assert!(read(&file, 0, 1)[100..].iter().all(|&b| b == 0));
        volume.check_invariants();
    }

    #[test]
    fn writes_past_eof_and_bad_arguments_are_rejected() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        assert_eq!(errno(file.write_pages(0, &page(1))), libc::EINVAL);
        file.set_len(BLOCK + 1).unwrap();
        assert_eq!(errno(file.write_pages(2, &page(1))), libc::EINVAL);
        let two: Vec<u8> = [page(1), page(2), page(3)].concat();
        assert_eq!(errno(file.write_pages(0, &two)), libc::EINVAL);
        assert_eq!(
            file.allocated_blocks().unwrap(),
            0,
            "a rejected write allocates nothing"
        );
        assert_eq!(errno(file.write_pages(0, &[1; 100])), libc::EINVAL);
        assert_eq!(errno(file.read_pages(0, &mut [0; 100])), libc::EINVAL);
        assert_eq!(errno(file.read_pages(u64::MAX, &mut page(0))), libc::EINVAL);
        assert_eq!(
            errno(file.read_pages(u64::MAX / BLOCK, &mut page(0))),
            libc::EINVAL
        );
        assert_eq!(errno(file.write_pages(u64::MAX, &page(0))), libc::EINVAL);
        assert_eq!(errno(file.punch_hole(u64::MAX, 2)), libc::EINVAL);
        assert_eq!(errno(file.zero_range(2, u64::MAX)), libc::EINVAL);
        assert_eq!(errno(file.set_len(MAX_FILE_SIZE + 1)), libc::EFBIG);
        assert_eq!(errno(file.set_len(u64::MAX)), libc::EFBIG);
        file.set_len(MAX_FILE_SIZE).unwrap();
        assert_eq!(file.max_file_size(), MAX_FILE_SIZE);
        assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
        volume.check_invariants();
    }

    #[test]
    fn punch_whole_and_partial_blocks() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        let free = volume.free_blocks();
        // Whole block 1, plus the last 100 bytes of block 0 and the first 10 of block 2.
        file.punch_hole(BLOCK - 100, BLOCK + 110).unwrap();
        assert_eq!(file.physical_block(1), None);
        assert_eq!(volume.free_blocks(), free + 1);
        let data = read(&file, 0, 4);
        assert_eq!(&data[..PAGE - 100], &page(1)[..PAGE - 100]);
        assert!(data[PAGE - 100..2 * PAGE + 10].iter().all(|&b| b == 0));
        assert_eq!(&data[2 * PAGE + 10..3 * PAGE], &page(3)[10..]);
        assert_eq!(&data[3 * PAGE..], page(4));
        assert_eq!(file.len().unwrap(), 4 * BLOCK, "the size does not change");

        // Inside one block.
        file.punch_hole(3 * BLOCK + 5, 10).unwrap();
        let data = read(&file, 3, 1);
        assert_eq!(&data[..5], &[4; 5]);
        assert_eq!(&data[5..15], &[0; 10]);
        assert_eq!(&data[15..], &page(4)[15..]);
        assert!(file.physical_block(3).is_some());

        // A punch of a hole, of nothing, and past EOF changes nothing.
        file.punch_hole(BLOCK, BLOCK).unwrap();
        file.punch_hole(0, 0).unwrap();
        file.punch_hole(100 * BLOCK, u64::MAX - 100 * BLOCK)
            .unwrap();
        assert_eq!(read(&file, 3, 1), data);
        volume.check_invariants();
    }

    #[test]
    fn punch_to_eof_frees_a_partial_last_block() {
        let volume = volume(64);
        let file = filled(&volume, "a", 2);
        file.set_len(BLOCK + 100).unwrap();
        file.punch_hole(BLOCK, 50).unwrap();
        assert!(
            file.physical_block(1).is_some(),
            "bytes 50..100 are still data"
        );
        file.punch_hole(BLOCK + 10, 1 << 40).unwrap();
        assert!(
            file.physical_block(1).is_some(),
            "bytes 0..10 are still data"
        );
        file.punch_hole(BLOCK, 1 << 40).unwrap();
        assert_eq!(file.physical_block(1), None);
        assert_eq!(read(&file, 1, 1), page(0));
        assert_eq!(read(&file, 0, 1), page(1));
        volume.check_invariants();
    }

    #[test]
    fn huge_punch_of_a_sparse_file_is_instant() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(MAX_FILE_SIZE).unwrap();
        for index in [0, 1 << 20, (MAX_FILE_SIZE / BLOCK) - 1] {
            file.write_pages(index, &page(5)).unwrap();
        }
        let start = Instant::now();
        file.punch_hole(0, MAX_FILE_SIZE).unwrap();
        file.zero_range(0, MAX_FILE_SIZE).unwrap();
        file.set_len(0).unwrap();
        // Generous: a per-block loop over 2^32 blocks would take minutes.
        assert!(start.elapsed().as_secs() < 5);
        assert_eq!(file.allocated_blocks().unwrap(), 0);
        volume.check_invariants();
    }

    #[test]
    fn zero_range_keeps_blocks_and_leaves_holes() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        file.punch_hole(2 * BLOCK, BLOCK).unwrap();
        let blocks: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
        let free = volume.free_blocks();
        // The last 10 bytes of block 0 up to the first 10 bytes of block 3.
        file.zero_range(BLOCK - 10, 2 * BLOCK + 20).unwrap();
        let after: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
        assert_eq!(after, blocks, "zeroing neither frees nor allocates");
        assert_eq!(volume.free_blocks(), free);
        let data = read(&file, 0, 4);
        assert!(data[..PAGE - 10] == page(1)[..PAGE - 10]);
        assert!(data[PAGE - 10..3 * PAGE + 10].iter().all(|&b| b == 0));
        assert!(data[3 * PAGE + 10..] == page(4)[10..]);
        assert_eq!(file.len().unwrap(), 4 * BLOCK);

        // Inside one block; other bytes survive.
        file.zero_range(3 * BLOCK + 20, 2).unwrap();
        let last = read(&file, 3, 1);
        assert_eq!(&last[..10], &[0; 10]);
        assert_eq!(&last[10..20], &[4; 10]);
        assert_eq!(&last[20..22], &[0; 2]);
        assert!(last[22..] == page(4)[22..]);

        // Zeroing to past EOF zeroes the whole last block and keeps it.
        file.zero_range(3 * BLOCK, u64::MAX - 3 * BLOCK).unwrap();
        assert_eq!(file.physical_block(3), blocks[3]);
        assert!(read(&file, 3, 1) == page(0));
        volume.check_invariants();
    }

    #[test]
    fn collapse_removes_blocks_and_shifts_the_rest_down() {
        let volume = volume(64);
        let file = filled(&volume, "a", 6);
        file.set_len(6 * BLOCK - 100).unwrap();
        let freed = [file.physical_block(1), file.physical_block(2)];
        let free = volume.free_blocks();
        file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 4 * BLOCK - 100);
        assert_eq!(volume.free_blocks(), free + 2);
        assert_eq!(file.allocated_blocks().unwrap(), 4);
        let data = read(&file, 0, 5);
        for (i, fill) in [1u8, 4, 5].into_iter().enumerate() {
            assert_eq!(data[i * PAGE..(i + 1) * PAGE], page(fill), "page {i}");
        }
        assert_eq!(&data[3 * PAGE..4 * PAGE - 100], &page(6)[100..]);
        assert!(data[4 * PAGE - 100..].iter().all(|&b| b == 0));
        volume.check_invariants();

        // The freed blocks go to the next allocation, LIFO as after a punch.
        let other = volume.create_file("b").unwrap();
        other.set_len(2 * BLOCK).unwrap();
        other.write_pages(0, &page(9)).unwrap();
        assert!(freed.contains(&other.physical_block(0)));
        volume.check_invariants();
    }

    #[test]
    fn collapse_of_holes_and_a_merge_at_the_seam() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(8 * BLOCK).unwrap();
        file.write_pages(0, &[page(1), page(2)].concat()).unwrap();
        file.write_pages(5, &page(6)).unwrap();
        file.write_pages(2, &page(3)).unwrap();
        // Pages 0, 1, 2 are physically contiguous; page 5 follows them on the device.
        let first = file.physical_block(0).unwrap();
        file.punch_hole(2 * BLOCK, BLOCK).unwrap();
        file.write_pages(5, &page(6)).unwrap();
        file.collapse_range(2 * BLOCK, 3 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 5 * BLOCK);
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..2 * PAGE], page(2));
        assert_eq!(&data[2 * PAGE..3 * PAGE], page(6));
        assert!(data[3 * PAGE..].iter().all(|&b| b == 0));
        assert_eq!(file.physical_block(0), Some(first));
        volume.check_invariants();
    }

    #[test]
    fn insert_shifts_up_and_leaves_a_hole() {
        let volume = volume(64);
        let file = filled(&volume, "a", 3);
        file.set_len(3 * BLOCK - 10).unwrap();
        let blocks: Vec<_> = (0..3).map(|i| file.physical_block(i)).collect();
        let free = volume.free_blocks();
        file.insert_range(BLOCK, 2 * BLOCK).unwrap();
        assert_eq!(file.len().unwrap(), 5 * BLOCK - 10);
        assert_eq!(volume.free_blocks(), free, "an insert allocates nothing");
        let after: Vec<_> = [0, 3, 4].iter().map(|&i| file.physical_block(i)).collect();
        assert_eq!(after, blocks, "the data moved, not copied");
        let data = read(&file, 0, 5);
        assert_eq!(&data[..PAGE], page(1));
        assert!(data[PAGE..3 * PAGE].iter().all(|&b| b == 0));
        assert_eq!(&data[3 * PAGE..4 * PAGE], page(2));
        assert_eq!(&data[4 * PAGE..5 * PAGE - 10], &page(3)[10..]);
        assert!(data[5 * PAGE - 10..].iter().all(|&b| b == 0));
        // The hole takes writes; collapsing it again restores the original.
        file.write_pages(2, &page(7)).unwrap();
        assert_eq!(read(&file, 2, 1), page(7));
        file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
        let data = read(&file, 0, 3);
        assert_eq!(&data[..2 * PAGE], [page(1), page(2)].concat());
        assert_eq!(&data[2 * PAGE..3 * PAGE - 10], &page(3)[..PAGE - 10]);
        assert_eq!(file.allocated_blocks().unwrap(), 3);
        volume.check_invariants();

        // Inserting at block 0 shifts everything.
        file.insert_range(0, BLOCK).unwrap();
        assert_eq!(read(&file, 0, 1), page(0));
        assert_eq!(read(&file, 1, 1), page(1));
        volume.check_invariants();
    }

    #[test]
    fn collapse_and_insert_reject_bad_arguments_and_change_nothing() {
        let volume = volume(64);
        let file = filled(&volume, "a", 4);
        let before = read(&file, 0, 4);
        let size = 4 * BLOCK;
        for (offset, len) in [
            (1, BLOCK),
            (0, BLOCK + 1),
            (0, 0),
            (0, size),
            (BLOCK, 3 * BLOCK),
            (BLOCK, 4 * BLOCK),
            (size, BLOCK),
            (u64::MAX - BLOCK + 1, BLOCK),
            (BLOCK, u64::MAX - BLOCK + 1),
        ] {
            assert_eq!(
                errno(file.collapse_range(offset, len)),
                libc::EINVAL,
                "collapse {offset} {len}"
            );
        }
        for (offset, len) in [
            (1, BLOCK),
            (0, 1),
            (0, 0),
            (size, BLOCK),
            (8 * BLOCK, BLOCK),
            (u64::MAX - BLOCK + 1, BLOCK),
            (BLOCK, u64::MAX - BLOCK + 1),
        ] {
            assert_eq!(
                errno(file.insert_range(offset, len)),
                libc::EINVAL,
                "insert {offset} {len}"
            );
        }
        assert_eq!(
            errno(file.insert_range(0, MAX_FILE_SIZE - size + BLOCK)),
            libc::EFBIG
        );
        assert_eq!(
            errno(file.insert_range(0, u64::MAX - BLOCK * 2 + 1)),
            libc::EFBIG
        );
        assert_eq!(file.len().unwrap(), size);
        assert_eq!(read(&file, 0, 4), before);
        // Exactly the largest size is allowed.
        file.insert_range(0, MAX_FILE_SIZE - size).unwrap();
        assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
        assert_eq!(read(&file, (MAX_FILE_SIZE - size) / BLOCK, 4), before);
        file.remove().unwrap();
        assert_eq!(errno(file.collapse_range(0, BLOCK)), libc::ENOENT);
        assert_eq!(errno(file.insert_range(0, BLOCK)), libc::ENOENT);
        volume.check_invariants();
    }

    #[test]
    fn huge_collapse_and_insert_of_a_sparse_file_are_instant() {
        let volume = volume(64);
        let file = volume.create_file("a").unwrap();
        file.set_len(MAX_FILE_SIZE / 2).unwrap();
        let last = MAX_FILE_SIZE / 2 / BLOCK - 1;
        for index in [0, 1 << 20, last] {
            file.write_pages(index, &page(5)).unwrap();
        }
        let start = Instant::now();
        file.insert_range(BLOCK, MAX_FILE_SIZE / 2).unwrap();
        assert_eq!(read(&file, last + MAX_FILE_SIZE / 2 / BLOCK, 1), page(5));
        file.collapse_range(BLOCK, MAX_FILE_SIZE / 2 - BLOCK)
            .unwrap();
        file.collapse_range(0, MAX_FILE_SIZE / 2).unwrap();
        assert!(start.elapsed().as_secs() < 5);
        assert_eq!(file.len().unwrap(), BLOCK);
        assert_eq!(read(&file, 0, 1), page(5));
        assert_eq!(file.allocated_blocks().unwrap(), 1);
        volume.check_invariants();
    }

    #[test]
    fn truncate_inside_a_block_then_grow_reads_zero_tail() {
        let volume = volume(64);
        let file = filled(&volume, "a", 3);
        let free = volume.free_blocks();
        file.set_len(BLOCK + 123).unwrap();
        assert_eq!(file.len().unwrap(), BLOCK + 123);
        assert_eq!(volume.free_blocks(), free + 1);
        assert_eq!(file.physical_block(2), None);
        file.set_len(3 * BLOCK).unwrap();
        let data = read(&file, 0, 3);
        assert_eq!(&data[..PAGE], page(1));
        assert_eq!(&data[PAGE..PAGE + 123], &[2; 123]);
        assert!(data[PAGE + 123..].iter().all(|&b| b == 0));
        file.set_len(0).unwrap();
        assert_eq!(file.allocated_blocks().unwrap(), 0);
        volume.check_invariants();
    }

    #[test]
    fn freed_blocks_are_reused_at_once_by_another_file() {
        let volume = volume(64);
        let a = filled(&volume, "a", 4);
        let b = volume.create_file("b").unwrap();
        b.set_len(4 * BLOCK).unwrap();

        let freed = a.physical_block(2).unwrap();
        a.punch_hole(2 * BLOCK, BLOCK).unwrap();
        b.write_pages(0, &page(0xBB)).unwrap();
        assert_eq!(
            b.physical_block(0),
            Some(freed),
            "LIFO: the block freed last comes first"
        );

        // Truncate frees too, and the stale block now holds b's data.
        let freed = a.physical_block(3).unwrap();
        a.set_len(3 * BLOCK).unwrap();
        b.write_pages(1, &page(0xBC)).unwrap();
        assert_eq!(b.physical_block(1), Some(freed));
        let mut raw = page(0);
        volume
            .device()
            .read_exact_at(&mut raw, freed * BLOCK)
            .unwrap();
        assert_eq!(raw, page(0xBC));

        // Removing a file frees all of its blocks.
        let remaining = [a.physical_block(0).unwrap(), a.physical_block(1).unwrap()];
        a.remove().unwrap();
        b.write_pages(2, &[page(1), page(2)].concat()).unwrap();
        let mut reused = [b.physical_block(2).unwrap(), b.physical_block(3).unwrap()];
        reused.sort();
        assert_eq!(reused, remaining);
        volume.check_invariants();
    }

    #[test]
    fn enospc_changes_nothing() {
        let volume = volume(4); // block 0 is reserved: 3 usable
        assert_eq!(volume.total_blocks(), 4);
        assert_eq!(volume.free_blocks(), 3);
        let file = volume.create_file("a").unwrap();
        file.set_len(8 * BLOCK).unwrap();
        file.write_pages(0, &page(1)).unwrap();
        let big: Vec<u8> = (0..3).flat_map(|i| page(i + 2)).collect();
        assert_eq!(errno(file.write_pages(1, &big)), libc::ENOSPC);
        assert_eq!(file.allocated_blocks().unwrap(), 1);
        assert_eq!(volume.free_blocks(), 2);
        file.write_pages(1, &big[..2 * PAGE]).unwrap();
        assert_eq!(volume.free_blocks(), 0);
        assert_eq!(errno(file.write_pages(5, &page(1))), libc::ENOSPC);
        // Overwriting allocated blocks needs no space.
        file.write_pages(0, &page(7)).unwrap();
        assert_eq!(read(&file, 0, 1), page(7));
        volume.check_invariants();
    }

    #[test]
    fn a_failed_write_unmaps_the_blocks_it_allocated() {
        let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * BLOCK)), 1));
        let volume = Volume::format(faulty.clone()).unwrap();
        let a = filled(&volume, "a", 1);
        a.remove().unwrap(); // its block, full of 1s, is next in line
        let b = volume.create_file("b").unwrap();
        b.set_len(BLOCK).unwrap();
        faulty.fail_nth(DeviceOp::Write, 1, libc::EIO);
        assert_eq!(errno(b.write_pages(0, &page(2))), libc::EIO);
        assert_eq!(b.physical_block(0), None);
        assert_eq!(read(&b, 0, 1), page(0), "b must not see a's old data");
        volume.check_invariants();
    }

    #[test]
    fn file_table_errors() {
        let volume = volume(16);
        let a = volume.create_file("a").unwrap();
        assert_eq!(errno(volume.create_file("a")), libc::EEXIST);
        assert_eq!(errno(volume.create_file("")), libc::EINVAL);
        assert_eq!(errno(volume.create_file("x/y")), libc::EINVAL);
        assert_eq!(errno(volume.create_file("x\0")), libc::EINVAL);
        assert_eq!(
            errno(volume.create_file(&"n".repeat(256))),
            libc::ENAMETOOLONG
        );
        volume.create_file(&"n".repeat(255)).unwrap();
        assert_eq!(errno(volume.open_file("missing")), libc::ENOENT);
        assert_eq!(errno(volume.remove_file("missing")), libc::ENOENT);

        // Busy while any handle, clone included, is alive.
        let clone = a.clone();
        assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
        drop(a);
        assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
        drop(clone);
        volume.remove_file("a").unwrap();
        assert_eq!(errno(volume.open_file("a")), libc::ENOENT);
        assert_eq!(volume.file_names(), ["n".repeat(255)]);

        // Removing through a handle: every handle of it fails afterwards.
        let b = filled(&volume, "b", 2);
        let other = volume.open_file("b").unwrap();
        let free = volume.free_blocks();
        b.remove().unwrap();
        assert_eq!(volume.free_blocks(), free + 2);
        for handle in [&b, &other] {
            assert_eq!(errno(handle.len()), libc::ENOENT);
            assert_eq!(errno(handle.read_pages(0, &mut page(0))), libc::ENOENT);
            assert_eq!(errno(handle.write_pages(0, &page(0))), libc::ENOENT);
            assert_eq!(errno(handle.set_len(0)), libc::ENOENT);
            assert_eq!(errno(handle.punch_hole(0, 1)), libc::ENOENT);
            assert_eq!(errno(handle.zero_range(0, 1)), libc::ENOENT);
            assert_eq!(errno(handle.sync()), libc::ENOENT);
            assert_eq!(errno(handle.remove()), libc::ENOENT);
        }
        // A new file of the same name is a different file.
        let c = volume.create_file("b").unwrap();
        assert_eq!(c.len().unwrap(), 0);
        assert_eq!(errno(b.len()), libc::ENOENT);
        volume.check_invariants();
    }

    #[test]
    fn format_rejects_a_device_without_blocks() {
        let device = Arc::new(MemDevice::new(BLOCK - 1));
        assert_eq!(errno(Volume::format(device)), libc::EINVAL);
    }

    #[test]
    fn concurrent_files_never_share_blocks() {
        let volume = volume(256);
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let file = volume.create_file(&format!("f{t}")).unwrap();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t.into());
                    file.set_len(32 * BLOCK).unwrap();
                    for _ in 0..500 {
                        let index = rng.u64(0..32);
                        match rng.u8(0..4) {
                            0 | 1 => {
                                if index * BLOCK < file.len().unwrap() {
                                    file.write_pages(index, &page(t)).unwrap();
                                }
                            }
                            2 => file
                                .punch_hole(index * BLOCK, rng.u64(1..4 * BLOCK))
                                .unwrap(),
                            _ => file.set_len(rng.u64(0..32 * BLOCK)).unwrap(),
                        }
                        // Every block this file maps holds its own pages only.
                        let mut buf = page(0);
                        file.read_pages(index, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b == 0 || b == t));
                        file.volume().check_invariants();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        volume.check_invariants();
    }

    #[derive(Clone, Debug)]
    enum FileOp {
        Write(u64, u8),
        Punch(u64, u64),
        Collapse(u64, u64),
        Insert(u64, u64),
        SetLen(u64),
    }

    fn file_op() -> impl Strategy<Value = FileOp> {
        prop_oneof![
            4 => (0u64..24, 1u8..255).prop_map(|(p, f)| FileOp::Write(p, f)),
            1 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Punch(p, n)),
            2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Collapse(p, n)),
            2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Insert(p, n)),
            1 => (0u64..24).prop_map(FileOp::SetLen),
        ]
    }

    proptest! {
        /// Whole-page operations against a model holding one fill byte per page
        /// (0 for a hole), with a second file sharing the volume so that freed
        /// blocks are reused.
        #[test]
        fn collapse_and_insert_match_a_page_model(ops in proptest::collection::vec(file_op(), 0..60)) {
            let volume = volume(256);
            let file = volume.create_file("a").unwrap();
            let other = volume.create_file("b").unwrap();
            other.set_len(64 * BLOCK).unwrap();
            let mut model: Vec<u8> = vec![0; 8];
            file.set_len(8 * BLOCK).unwrap();
            for (step, op) in ops.into_iter().enumerate() {
                let pages = model.len() as u64;
                let (result, expect_ok) = match op {
                    FileOp::Write(p, fill) => {
                        let ok = p < pages;
                        if ok {
                            model[p as usize] = fill;
                        }
                        (file.write_pages(p, &page(fill)), ok)
                    }
                    FileOp::Punch(p, n) => {
                        for slot in model.iter_mut().skip(p as usize).take(n as usize) {
                            *slot = 0;
                        }
                        (file.punch_hole(p * BLOCK, n * BLOCK), true)
                    }
                    FileOp::Collapse(p, n) => {
                        let ok = p + n < pages;
                        if ok {
                            model.drain(p as usize..(p + n) as usize);
                        }
                        (file.collapse_range(p * BLOCK, n * BLOCK), ok)
                    }
                    FileOp::Insert(p, n) => {
                        let ok = p < pages;
                        if ok {
                            model.splice(p as usize..p as usize, vec![0; n as usize]);
                        }
                        (file.insert_range(p * BLOCK, n * BLOCK), ok)
                    }
                    FileOp::SetLen(p) => {
                        model.resize(p as usize, 0);
                        (file.set_len(p * BLOCK), true)
                    }
                };
                prop_assert_eq!(result.is_ok(), expect_ok, "{:?}", result);
                // Churn the other file so freed blocks are taken at once.
                other.write_pages(step as u64 % 64, &page(0xEE)).unwrap();
                prop_assert_eq!(file.len().unwrap(), model.len() as u64 * BLOCK);
                let data = read(&file, 0, model.len() + 1);
                for (i, &fill) in model.iter().enumerate() {
                    prop_assert!(
                        data[i * PAGE..(i + 1) * PAGE].iter().all(|&b| b == fill),
                        "page {} should be all {}", i, fill
                    );
                }
                prop_assert!(data[model.len() * PAGE..].iter().all(|&b| b == 0));
                prop_assert_eq!(
                    file.allocated_blocks().unwrap(),
                    model.iter().filter(|&&fill| fill != 0).count() as u64
                );
                volume.check_invariants();
            }
        }
    }
}
