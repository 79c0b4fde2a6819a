//! Where the data blocks stand: the LIFO block allocator, and the blocks a
//! crash could give back to a file, which wait for a commit before reuse (see
//! "No foreign data across crashes" in the volume's documentation).

use std::collections::BTreeMap;
use std::io;

use super::format::{corrupt, Layout, Metadata};

/// A set of blocks as disjoint, non-adjacent runs: first block to length.
#[derive(Clone, Debug, Default)]
pub(super) struct RunSet {
    runs: BTreeMap<u64, u64>,
}

impl RunSet {
    /// The union of `runs` `(first block, length)`, which may overlap.
    pub(super) fn from_runs(mut runs: Vec<(u64, u64)>) -> RunSet {
        runs.sort_unstable();
        let mut set = RunSet::default();
        let mut current: Option<(u64, u64)> = None;
        for (first, len) in runs.into_iter().filter(|&(_, len)| len > 0) {
            let end = first + len;
            current = match current {
                Some((start, current_end)) if first <= current_end => {
                    Some((start, current_end.max(end)))
                }
                _ => {
                    if let Some((start, current_end)) = current {
                        set.runs.insert(start, current_end - start);
                    }
                    Some((first, end))
                }
            };
        }
        if let Some((start, end)) = current {
            set.runs.insert(start, end - start);
        }
        set
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&first, &len)| (first, len))
    }

    pub(super) fn union(&self, other: &RunSet) -> RunSet {
        RunSet::from_runs(self.iter().chain(other.iter()).collect())
    }

    /// Calls `each(first, len, inside)` for the pieces of `first..first + len`
    /// inside and outside the set, in ascending order.
    pub(super) fn split(&self, first: u64, len: u64, mut each: impl FnMut(u64, u64, bool)) {
        let end = first + len;
        let mut at = first;
        let before = self.runs.range(..first).next_back();
        for (&start, &run_len) in before.into_iter().chain(self.runs.range(first..end)) {
            let (start, run_end) = (start.max(at), (start + run_len).min(end));
            if run_end <= start {
                continue;
            }
            if start > at {
                each(at, start - at, false);
            }
            each(start, run_end - start, true);
            at = run_end;
        }
        if at < end {
            each(at, end - at, false);
        }
    }
}

/// Where the data blocks stand: the allocator, and the blocks a crash could
/// give back to a file.
#[derive(Debug)]
pub(super) struct Space {
    pub(super) allocator: Allocator,
    /// The blocks the newest durable metadata maps, and those a commit in flight
    /// (or one that failed) may have made durable: no allocation may take them.
    pub(super) committed: RunSet,
    /// Blocks freed while `committed` held them: they go back to the allocator
    /// once a commit that no longer maps them is durable.
    pub(super) pending: Vec<(u64, u64)>,
    /// The number of blocks in `pending`.
    pub(super) pending_count: u64,
}

impl Space {
    /// The space of a volume whose files are `meta`: every data block no file
    /// maps is free, and every mapped one is committed. `EUCLEAN` if two runs
    /// map one block (metadata that was never written by a volume).
    pub(super) fn rebuild(meta: &Metadata, layout: Layout) -> io::Result<Space> {
        let mut runs = meta.mapped_runs();
        runs.sort_unstable();
        let mut gaps = Vec::new();
        let mut next = layout.data_start();
        for &(phys, len) in &runs {
            if phys < next {
                return Err(corrupt(format!("physical block {phys} is mapped twice")));
            }
            if phys > next {
                gaps.push((next, phys - next));
            }
            next = phys + len;
        }
        // The lowest gap on top of the stack: it is taken first.
        gaps.reverse();
        Ok(Space {
            allocator: Allocator {
                free_count: gaps.iter().map(|&(_, len)| len).sum(),
                free: gaps,
                in_flight: 0,
                high_water: next,
                total: layout.total_blocks,
            },
            committed: RunSet::from_runs(runs),
            pending: Vec::new(),
            pending_count: 0,
        })
    }

    /// Frees blocks a file mapped: to the allocator, except those durable
    /// metadata may still map, which wait for the next commit.
    pub(super) fn free(&mut self, first: u64, len: u64) {
        let Space {
            allocator,
            committed,
            pending,
            pending_count,
        } = self;
        committed.split(first, len, |first, len, is_committed| {
            if is_committed {
                pending.push((first, len));
                *pending_count += len;
            } else {
                allocator.free(first, len);
            }
        });
    }
}

/// The block allocator: a LIFO stack of freed runs, then never-used blocks above
/// a high-water mark.
///
/// LIFO is deliberate: the block freed last is the block allocated next, so a
/// stale mapping of it reads another file's data at once instead of by luck.
#[derive(Clone, Debug)]
pub(super) struct Allocator {
    /// Freed runs `(first block, length)`; the top of the stack is the last entry.
    pub(super) free: Vec<(u64, u64)>,
    /// The number of blocks in `free`.
    pub(super) free_count: u64,
    /// Blocks handed to writes that have not mapped them yet (see
    /// `VolumeFile::write_pages`): neither free nor owned by a file.
    pub(super) in_flight: u64,
    /// Blocks at or above this have never been allocated (since the volume was
    /// opened).
    pub(super) high_water: u64,
    /// The device's size in blocks.
    pub(super) total: u64,
}

impl Allocator {
    pub(super) fn available(&self) -> u64 {
        self.free_count + (self.total - self.high_water)
    }

    /// The most recently freed block, or else a never-used one.
    pub(super) fn allocate(&mut self) -> Option<u64> {
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

    /// Pushes a run onto the stack, merged with the top when it ends where the
    /// top begins (blocks given back in the reverse order of their allocation
    /// restore the stack as it was).
    pub(super) fn free(&mut self, first: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.free_count += len;
        match self.free.last_mut() {
            Some(top) if first + len == top.0 => *top = (first, top.1 + len),
            _ => self.free.push((first, len)),
        }
    }
}
