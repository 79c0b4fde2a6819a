//! Extent maps: a file's logical blocks to physical device blocks, as runs.
//!
//! Runs keep a large file's mapping small, and make every operation cost time
//! proportional to the runs it touches, never to the number of blocks in a range:
//! punching a terabyte out of a sparse file is as quick as punching one block.

use std::collections::BTreeMap;

/// A run of logical blocks mapped to as many consecutive physical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The physical block of the run's first logical block.
    pub phys: u64,
    /// The number of blocks in the run (never zero).
    pub len: u64,
}

/// A map from logical to physical blocks, kept as maximal runs: no two runs in
/// the map are contiguous both logically and physically.
///
/// Block numbers must be below `u64::MAX`, so a run's exclusive end fits in a `u64`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    /// Runs keyed by their first logical block.
    extents: BTreeMap<u64, Extent>,
    /// The number of mapped logical blocks, the sum of the runs' lengths.
    mapped: u64,
}

impl ExtentMap {
    /// An empty map: every block is a hole.
    pub fn new() -> Self {
        Self::default()
    }

    /// The physical block that logical block `lblk` maps to, if any.
    pub fn lookup(&self, lblk: u64) -> Option<u64> {
        let (&start, extent) = self.extents.range(..=lblk).next_back()?;
        let offset = lblk - start;
        (offset < extent.len).then(|| extent.phys + offset)
    }

    /// The first mapped block at or after `lblk` (`SEEK_DATA`), if any.
    pub fn next_mapped(&self, lblk: u64) -> Option<u64> {
        if self.lookup(lblk).is_some() {
            return Some(lblk);
        }
        self.extents.range(lblk..).next().map(|(&start, _)| start)
    }

    /// The first unmapped block at or after `lblk` (`SEEK_HOLE`). Runs that
    /// touch logically but not physically are walked across.
    pub fn next_unmapped(&self, lblk: u64) -> u64 {
        let mut at = lblk;
        while let Some((&start, extent)) = self.extents.range(..=at).next_back() {
            if start + extent.len <= at {
                break;
            }
            at = start + extent.len;
        }
        at
    }

    /// Maps `lblk` to `phys`, merging with the neighbouring runs when they are
    /// contiguous. Returns the physical block `lblk` mapped to before, if any.
    ///
    /// # Panics
    /// If either block number is `u64::MAX`.
    pub fn insert(&mut self, lblk: u64, phys: u64) -> Option<u64> {
        assert!(
            lblk < u64::MAX && phys < u64::MAX,
            "block number out of range"
        );
        let old = self.lookup(lblk);
        if old.is_some() {
            self.remove_range(lblk, 1);
        }
        let mut start = lblk;
        let mut extent = Extent { phys, len: 1 };
        if let Some((&left_start, left)) = self.extents.range(..lblk).next_back() {
            if left_start + left.len == lblk && left.phys + left.len == phys {
                start = left_start;
                extent = Extent {
                    phys: left.phys,
                    len: left.len + 1,
                };
            }
        }
        if let Some(right) = self.extents.get(&(lblk + 1)) {
            if phys + 1 == right.phys {
                extent.len += right.len;
                self.extents.remove(&(lblk + 1));
            }
        }
        self.extents.insert(start, extent);
        self.mapped += 1;
        old
    }

    /// Unmaps the logical blocks `first..first + count` (saturating at the end of
    /// the block space), splitting runs at the edges. Returns the freed physical
    /// runs as `(first physical block, length)`, in logical order.
    pub fn remove_range(&mut self, first: u64, count: u64) -> Vec<(u64, u64)> {
        let mut freed = Vec::new();
        if count == 0 {
            return freed;
        }
        let end = first.saturating_add(count);
        // A run that starts before `first` and reaches into the range.
        if let Some((&start, &extent)) = self.extents.range(..first).next_back() {
            let extent_end = start + extent.len;
            if extent_end > first {
                let kept = first - start;
                freed.push((extent.phys + kept, extent_end.min(end) - first));
                self.extents.insert(
                    start,
                    Extent {
                        phys: extent.phys,
                        len: kept,
                    },
                );
                if extent_end > end {
                    let skipped = end - start;
                    self.extents.insert(
                        end,
                        Extent {
                            phys: extent.phys + skipped,
                            len: extent.len - skipped,
                        },
                    );
                }
            }
        }
        // Runs that start inside the range; the last may reach past its end.
        let starts: Vec<u64> = self.extents.range(first..end).map(|(&s, _)| s).collect();
        for start in starts {
            let extent = self.extents.remove(&start).expect("key listed above");
            if start + extent.len > end {
                let cut = end - start;
                freed.push((extent.phys, cut));
                self.extents.insert(
                    end,
                    Extent {
                        phys: extent.phys + cut,
                        len: extent.len - cut,
                    },
                );
            } else {
                freed.push((extent.phys, extent.len));
            }
        }
        self.mapped -= freed.iter().map(|&(_, len)| len).sum::<u64>();
        freed
    }

    /// Moves every mapped block at or after logical block `from` down by `count`
    /// blocks (the shift of a collapse, after the collapsed range was removed),
    /// merging the runs that meet at the seam when they are physically contiguous.
    /// Costs time proportional to the runs moved, never to `count`.
    ///
    /// # Panics
    /// If `count > from`, or if a block of `from - count..from` is mapped (the
    /// shifted runs would land on it).
    pub fn shift_down(&mut self, from: u64, count: u64) {
        if count == 0 {
            return;
        }
        let to = from.checked_sub(count).expect("shift below block 0");
        assert!(
            self.runs_in(to, count).is_empty(),
            "shift_down onto mapped blocks"
        );
        // No run straddles `from`: one would be mapped just below it.
        let tail = self.extents.split_off(&from);
        if tail.is_empty() {
            return;
        }
        for (start, extent) in tail {
            self.extents.insert(start - count, extent);
        }
        self.merge_at(to);
    }

    /// Moves every mapped block at or after logical block `from` up by `count`
    /// blocks, leaving `from..from + count` a hole (the shift of an insert). A run
    /// straddling `from` is split there. Costs time proportional to the runs moved.
    ///
    /// # Panics
    /// If a moved block would reach `u64::MAX`.
    pub fn shift_up(&mut self, from: u64, count: u64) {
        if count == 0 {
            return;
        }
        if let Some((&start, &extent)) = self.extents.range(..from).next_back() {
            if start + extent.len > from {
                let kept = from - start;
                self.extents.insert(
                    start,
                    Extent {
                        phys: extent.phys,
                        len: kept,
                    },
                );
                self.extents.insert(
                    from,
                    Extent {
                        phys: extent.phys + kept,
                        len: extent.len - kept,
                    },
                );
            }
        }
        let tail = self.extents.split_off(&from);
        if let Some((&last, extent)) = tail.last_key_value() {
            assert!(
                last.checked_add(count)
                    .and_then(|start| start.checked_add(extent.len))
                    .is_some_and(|end| end < u64::MAX),
                "shift_up past the end of the block space"
            );
        }
        // Descending keys are all above every key left in the map, so each insert
        // lands past the current last key.
        for (start, extent) in tail.into_iter().rev() {
            self.extents.insert(start + count, extent);
        }
    }

    /// Merges the run starting at `lblk` into the run ending there, if the two are
    /// physically contiguous.
    fn merge_at(&mut self, lblk: u64) {
        let Some(&right) = self.extents.get(&lblk) else {
            return;
        };
        let Some((&left_start, left)) = self.extents.range_mut(..lblk).next_back() else {
            return;
        };
        if left_start + left.len == lblk && left.phys + left.len == right.phys {
            left.len += right.len;
            self.extents.remove(&lblk);
        }
    }

    /// The mapped runs inside logical blocks `first..first + count` (saturating),
    /// clipped to the range, as `(first logical block, run)`.
    pub fn runs_in(&self, first: u64, count: u64) -> Vec<(u64, Extent)> {
        let mut runs = Vec::new();
        if count == 0 {
            return runs;
        }
        let end = first.saturating_add(count);
        if let Some((&start, extent)) = self.extents.range(..first).next_back() {
            let extent_end = start + extent.len;
            if extent_end > first {
                let phys = extent.phys + (first - start);
                let len = extent_end.min(end) - first;
                runs.push((first, Extent { phys, len }));
            }
        }
        for (&start, extent) in self.extents.range(first..end) {
            let len = extent.len.min(end - start);
            runs.push((
                start,
                Extent {
                    phys: extent.phys,
                    len,
                },
            ));
        }
        runs
    }

    /// Every run, in logical order, as `(first logical block, run)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.extents.iter().map(|(&start, &extent)| (start, extent))
    }

    /// The number of mapped logical blocks.
    pub fn mapped_blocks(&self) -> u64 {
        self.mapped
    }

    /// The number of runs: what the map costs to store.
    pub fn run_count(&self) -> u64 {
        self.extents.len() as u64
    }

    /// A map of `runs` given as `(first logical block, run)` in ascending logical
    /// order (as [`ExtentMap::iter`] lists them); runs that are contiguous both
    /// logically and physically are merged. `None` if a run is empty, overlaps or
    /// precedes the one before it, or reaches `u64::MAX`.
    pub fn from_runs(runs: impl IntoIterator<Item = (u64, Extent)>) -> Option<Self> {
        let mut map = Self::new();
        let mut last: Option<(u64, Extent)> = None;
        for (start, extent) in runs {
            let end = start
                .checked_add(extent.len)
                .filter(|&end| end < u64::MAX)?;
            let phys_end = extent.phys.checked_add(extent.len)?;
            if extent.len == 0 || phys_end == u64::MAX {
                return None;
            }
            if let Some((last_start, last_extent)) = last {
                let last_end = last_start + last_extent.len;
                if start < last_end {
                    return None;
                }
                if start == last_end && last_extent.phys + last_extent.len == extent.phys {
                    let merged = Extent {
                        phys: last_extent.phys,
                        len: last_extent.len + extent.len,
                    };
                    map.extents.insert(last_start, merged);
                    map.mapped += extent.len;
                    last = Some((last_start, merged));
                    continue;
                }
            }
            debug_assert!(end > start);
            map.extents.insert(start, extent);
            map.mapped += extent.len;
            last = Some((start, extent));
        }
        Some(map)
    }

    /// Asserts the map's structural invariants: runs are non-empty, disjoint,
    /// maximal, and their lengths add up to [`ExtentMap::mapped_blocks`].
    #[cfg(any(test, feature = "testing"))]
    pub fn check_invariants(&self) {
        let mut total = 0u64;
        let mut previous: Option<(u64, Extent)> = None;
        for (start, extent) in self.iter() {
            assert!(extent.len > 0, "empty run at {start}");
            assert!(
                start.checked_add(extent.len).is_some(),
                "run at {start} overflows"
            );
            assert!(
                extent.phys.checked_add(extent.len).is_some(),
                "run at {start} overflows"
            );
            if let Some((prev_start, prev)) = previous {
                let prev_end = prev_start + prev.len;
                assert!(
                    prev_end <= start,
                    "runs at {prev_start} and {start} overlap"
                );
                assert!(
                    !(prev_end == start && prev.phys + prev.len == extent.phys),
                    "runs at {prev_start} and {start} should have been merged"
                );
            }
            total += extent.len;
            previous = Some((start, extent));
        }
        assert_eq!(total, self.mapped, "mapped block count is off");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn runs(map: &ExtentMap) -> Vec<(u64, u64, u64)> {
        map.iter().map(|(s, e)| (s, e.phys, e.len)).collect()
    }

    #[test]
    fn insert_merges_neighbours() {
        let mut map = ExtentMap::new();
        assert_eq!(map.insert(10, 100), None);
        assert_eq!(map.insert(12, 102), None);
        assert_eq!(runs(&map), [(10, 100, 1), (12, 102, 1)]);
        assert_eq!(map.insert(11, 101), None);
        assert_eq!(runs(&map), [(10, 100, 3)]);
        // Logically adjacent but not physically: a new run.
        map.insert(13, 200);
        assert_eq!(runs(&map), [(10, 100, 3), (13, 200, 1)]);
        assert_eq!(map.lookup(12), Some(102));
        assert_eq!(map.lookup(13), Some(200));
        assert_eq!(map.lookup(14), None);
        assert_eq!(map.lookup(9), None);
        // Replacing a mapping splits the run around it.
        assert_eq!(map.insert(11, 500), Some(101));
        assert_eq!(
            runs(&map),
            [(10, 100, 1), (11, 500, 1), (12, 102, 1), (13, 200, 1)]
        );
        assert_eq!(map.mapped_blocks(), 4);
        map.check_invariants();
    }

    #[test]
    fn next_mapped_and_unmapped_walk_runs_and_holes() {
        let mut map = ExtentMap::new();
        // Blocks 2..4 (physically 10, 11) and 4..6 (physically 50, 51): two
        // runs that touch logically; then 9.
        for (lblk, phys) in [(2, 10), (3, 11), (4, 50), (5, 51), (9, 7)] {
            map.insert(lblk, phys);
        }
        assert_eq!(map.run_count(), 3);
        assert_eq!(map.next_mapped(0), Some(2));
        assert_eq!(map.next_mapped(3), Some(3));
        assert_eq!(map.next_mapped(6), Some(9));
        assert_eq!(map.next_mapped(10), None);
        assert_eq!(map.next_unmapped(0), 0);
        assert_eq!(map.next_unmapped(2), 6);
        assert_eq!(map.next_unmapped(5), 6);
        assert_eq!(map.next_unmapped(9), 10);
    }

    #[test]
    fn remove_range_splits_at_edges() {
        let mut map = ExtentMap::new();
        for i in 0..10 {
            map.insert(i, 50 + i);
        }
        assert_eq!(map.remove_range(3, 4), [(53, 4)]);
        assert_eq!(runs(&map), [(0, 50, 3), (7, 57, 3)]);
        assert_eq!(map.remove_range(2, 6), [(52, 1), (57, 1)]);
        assert_eq!(runs(&map), [(0, 50, 2), (8, 58, 2)]);
        assert_eq!(map.mapped_blocks(), 4);
        map.check_invariants();
    }

    #[test]
    fn huge_ranges_cost_nothing() {
        let mut map = ExtentMap::new();
        map.insert(5, 1);
        map.insert(1 << 30, 2);
        map.insert(1 << 39, 3);
        let runs_found = map.runs_in(0, u64::MAX);
        assert_eq!(runs_found.len(), 3);
        assert_eq!(map.remove_range(6, 1 << 40), [(2, 1), (3, 1)]);
        assert_eq!(map.remove_range(0, u64::MAX), [(1, 1)]);
        assert_eq!(map.mapped_blocks(), 0);
        assert!(map.remove_range(u64::MAX - 1, u64::MAX).is_empty());
    }

    #[test]
    fn runs_in_clips() {
        let mut map = ExtentMap::new();
        for i in 0..10 {
            map.insert(i, 50 + i);
        }
        map.insert(20, 7);
        let found: Vec<_> = map
            .runs_in(4, 17)
            .into_iter()
            .map(|(s, e)| (s, e.phys, e.len))
            .collect();
        assert_eq!(found, [(4, 54, 6), (20, 7, 1)]);
        assert!(map.runs_in(10, 10).is_empty());
        assert!(map.runs_in(3, 0).is_empty());
    }

    #[test]
    fn shift_down_merges_at_the_seam() {
        let mut map = ExtentMap::new();
        map.insert(0, 10);
        map.insert(1, 50);
        map.insert(2, 11);
        map.insert(3, 12);
        map.insert(9, 13);
        assert_eq!(map.remove_range(1, 1), [(50, 1)]);
        map.shift_down(2, 1);
        assert_eq!(runs(&map), [(0, 10, 3), (8, 13, 1)]);
        map.check_invariants();
        // Onto a hole that is not adjacent: no merge.
        map.shift_down(8, 2);
        assert_eq!(runs(&map), [(0, 10, 3), (6, 13, 1)]);
        map.shift_down(6, 3);
        assert_eq!(runs(&map), [(0, 10, 4)]);
        map.shift_down(100, 50);
        map.shift_down(3, 0);
        assert_eq!(runs(&map), [(0, 10, 4)]);
        map.check_invariants();
    }

    #[test]
    #[should_panic(expected = "onto mapped blocks")]
    fn shift_down_onto_mapped_blocks_panics() {
        let mut map = ExtentMap::new();
        map.insert(0, 10);
        map.insert(5, 20);
        map.shift_down(5, 5);
    }

    #[test]
    fn shift_up_splits_a_straddling_run() {
        let mut map = ExtentMap::new();
        for i in 0..6 {
            map.insert(i, 100 + i);
        }
        map.insert(20, 7);
        map.shift_up(2, 3);
        assert_eq!(runs(&map), [(0, 100, 2), (5, 102, 4), (23, 7, 1)]);
        map.check_invariants();
        map.shift_up(23, 1 << 40);
        assert_eq!(map.lookup((1 << 40) + 23), Some(7));
        map.shift_up(u64::MAX - 1, 5);
        map.shift_up(0, 0);
        assert_eq!(map.mapped_blocks(), 7);
        // Shifting back down restores the original runs, merged again.
        map.shift_down((1 << 40) + 23, 1 << 40);
        map.shift_down(5, 3);
        assert_eq!(runs(&map), [(0, 100, 6), (20, 7, 1)]);
        map.check_invariants();
    }

    #[test]
    #[should_panic(expected = "past the end of the block space")]
    fn shift_up_past_the_end_panics() {
        let mut map = ExtentMap::new();
        map.insert(10, 1);
        map.shift_up(0, u64::MAX - 11);
    }

    #[test]
    fn shifting_a_huge_distance_costs_nothing() {
        let mut map = ExtentMap::new();
        map.insert(3, 1);
        map.insert(1 << 31, 2);
        let start = std::time::Instant::now();
        map.shift_up(1, 1 << 42);
        map.shift_down((1 << 42) + 1, 1 << 42);
        assert!(start.elapsed().as_secs() < 1);
        assert_eq!(runs(&map), [(3, 1, 1), (1 << 31, 2, 1)]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        /// Removes `first..first + count` and shifts the rest down: a collapse.
        Collapse(u64, u64),
        /// Shifts everything from `from` up by `count`: an insert range.
        ShiftUp(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..48, 0u64..48).prop_map(|(l, p)| Op::Insert(l, p)),
            2 => (0u64..56, prop_oneof![0u64..16, Just(u64::MAX)]).prop_map(|(f, c)| Op::Remove(f, c)),
            2 => (0u64..56, 0u64..16).prop_map(|(f, c)| Op::Collapse(f, c)),
            1 => (0u64..56, 0u64..16).prop_map(|(f, c)| Op::ShiftUp(f, c)),
        ]
    }

    /// The model's blocks from `from` on, moved by `shift` (which may not collide).
    fn model_shift(model: &mut BTreeMap<u64, u64>, from: u64, shift: impl Fn(u64) -> u64) {
        let tail = model.split_off(&from);
        model.extend(tail.into_iter().map(|(l, p)| (shift(l), p)));
    }

    proptest! {
        #[test]
        fn matches_a_per_block_model(ops in proptest::collection::vec(op(), 0..80)) {
            let mut map = ExtentMap::new();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(lblk, phys) => {
                        prop_assert_eq!(map.insert(lblk, phys), model.insert(lblk, phys));
                    }
                    Op::Remove(first, count) => {
                        let end = first.saturating_add(count);
                        let removed: Vec<u64> = model
                            .range(first..end)
                            .map(|(_, &p)| p)
                            .collect();
                        model.retain(|&l, _| !(first..end).contains(&l));
                        let freed: Vec<u64> = map
                            .remove_range(first, count)
                            .into_iter()
                            .flat_map(|(phys, len)| phys..phys + len)
                            .collect();
                        prop_assert_eq!(freed, removed);
                    }
                    Op::Collapse(first, count) => {
                        let end = first + count;
                        let removed: Vec<u64> = model.range(first..end).map(|(_, &p)| p).collect();
                        model.retain(|&l, _| !(first..end).contains(&l));
                        model_shift(&mut model, end, |l| l - count);
                        let freed: Vec<u64> = map
                            .remove_range(first, count)
                            .into_iter()
                            .flat_map(|(phys, len)| phys..phys + len)
                            .collect();
                        prop_assert_eq!(freed, removed);
                        map.shift_down(end, count);
                    }
                    Op::ShiftUp(from, count) => {
                        model_shift(&mut model, from, |l| l + count);
                        map.shift_up(from, count);
                    }
                }
                map.check_invariants();
                prop_assert_eq!(map.mapped_blocks(), model.len() as u64);
                for lblk in 0..60 {
                    prop_assert_eq!(map.lookup(lblk), model.get(&lblk).copied());
                }
                let every: Vec<(u64, u64)> = map
                    .iter()
                    .flat_map(|(s, e)| (0..e.len).map(move |i| (s + i, e.phys + i)))
                    .collect();
                let expected_every: Vec<(u64, u64)> = model.iter().map(|(&l, &p)| (l, p)).collect();
                prop_assert_eq!(every, expected_every);
                let listed: Vec<(u64, u64)> = map
                    .runs_in(7, 30)
                    .into_iter()
                    .flat_map(|(s, e)| (0..e.len).map(move |i| (s + i, e.phys + i)))
                    .collect();
                let expected: Vec<(u64, u64)> =
                    model.range(7..37).map(|(&l, &p)| (l, p)).collect();
                prop_assert_eq!(listed, expected);
            }
        }
    }
}
