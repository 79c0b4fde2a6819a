//! The page index of one mapping: a radix tree from page index to [`Slot`].
//!
//! Lookups take no lock and write nothing: each level is a `OnceLock`, set once
//! and never cleared while the tree lives, so a hit is a few acquire loads. Slots
//! therefore have stable addresses, which lets threads park on them, and a page's
//! state word lives inline in its leaf (8 bytes per page index).
//!
//! The index space is cut in tiers, as a classic Unix inode's blocks are
//! (direct, indirect, double indirect): tier 0, pages 0..64, is one leaf; tier
//! `k`, pages 64^k..64^(k+1), is a tree of `k` interior levels over leaves. So
//! a lookup takes as many hops as its index needs, not the most any index
//! does: two for a page of the first 16 MiB, three up to 1 GiB, six only past
//! 64 GiB. (One tree of a fixed height took six for every page past the
//! first 64: each a dependent load, on the hit path.)
//! No crate offers a concurrent map with stable inline slots and allocation-free
//! lock-free reads, which is why this one is written here.

use super::page::Slot;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::OnceLock;

const FANOUT_BITS: u32 = 6;
const FANOUT: usize = 1 << FANOUT_BITS;
/// Levels of interior nodes above the leaves.
const INTERIOR_LEVELS: u32 = 5;
/// Page indexes the tree can hold: 2^36 pages, 256 TiB of 4 KiB pages.
pub(crate) const MAX_PAGES: u64 = 1 << (FANOUT_BITS * (INTERIOR_LEVELS + 1));

type Leaf = Box<[Slot; FANOUT]>;

enum Node {
    Interior(Box<[OnceLock<Node>; FANOUT]>),
    Leaf(Leaf),
}

fn new_leaf() -> Leaf {
    Box::new(std::array::from_fn(|_| Slot::default()))
}

impl Node {
    fn new(level: u32) -> Node {
        if level == 0 {
            Node::Leaf(new_leaf())
        } else {
            Node::Interior(Box::new(std::array::from_fn(|_| OnceLock::new())))
        }
    }
}

/// Slots by page index, created on first use. The tiers too: a file never
/// read costs a few words here.
#[derive(Default)]
pub(crate) struct PageTree {
    /// Tier 0: the slots of the first [`FANOUT`] pages, a small file's whole
    /// index, one hop away.
    head: OnceLock<Leaf>,
    /// Tier `k` (from 1): the node of level `k` over pages 64^k..64^(k+1).
    tiers: [OnceLock<Node>; INTERIOR_LEVELS as usize],
    /// One past the last slot of the highest leaf created: walks stop there,
    /// so walking a small file's tree costs a few visits, not one per child
    /// of every level.
    end: AtomicU64,
}

#[inline]
fn child_index(index: u64, level: u32) -> usize {
    ((index >> (FANOUT_BITS * level)) as usize) & (FANOUT - 1)
}

/// The tier of `index` (at least [`FANOUT`] and below [`MAX_PAGES`]): 1 to
/// [`INTERIOR_LEVELS`], its node's level.
#[inline]
fn tier_of(index: u64) -> u32 {
    (u64::BITS - 1 - index.leading_zeros()) / FANOUT_BITS
}

/// The first page of tier `tier` (from 1).
fn tier_first(tier: u32) -> u64 {
    1 << (FANOUT_BITS * tier)
}

impl PageTree {
    /// The slot of `index` if it was ever created.
    #[inline]
    pub(crate) fn get(&self, index: u64) -> Option<&Slot> {
        if index < FANOUT as u64 {
            return self.head.get().map(|head| &head[index as usize]);
        }
        if index >= MAX_PAGES {
            return None;
        }
        let mut level = tier_of(index);
        let mut node = self.tiers[level as usize - 1].get()?;
        loop {
            match node {
                Node::Interior(children) => {
                    node = children[child_index(index, level)].get()?;
                    level -= 1;
                }
                Node::Leaf(slots) => return Some(&slots[child_index(index, 0)]),
            }
        }
    }

    /// The slot of `index`, created (absent) if needed.
    pub(crate) fn get_or_create(&self, index: u64) -> &Slot {
        if index < FANOUT as u64 {
            let head = self.head.get_or_init(new_leaf);
            self.cover(FANOUT as u64);
            return &head[index as usize];
        }
        assert!(index < MAX_PAGES, "page index {index} beyond the tree");
        let mut level = tier_of(index);
        let mut node = self.tiers[level as usize - 1].get_or_init(|| Node::new(level));
        loop {
            match node {
                Node::Interior(children) => {
                    node = children[child_index(index, level)].get_or_init(|| Node::new(level - 1));
                    level -= 1;
                }
                Node::Leaf(slots) => {
                    self.cover((index | (FANOUT as u64 - 1)) + 1);
                    return &slots[child_index(index, 0)];
                }
            }
        }
    }

    /// Makes walks reach index `end - 1`: after a slot below it was created,
    /// before the creator claims it (every walk that must see the slot comes
    /// after the claim, under the coherence lock or through the slot's state).
    /// Outside the `OnceLock`'s initialiser: under a model checker an atomic
    /// is a scheduling point, and the initialiser must not yield.
    #[inline]
    fn cover(&self, end: u64) {
        if self.end.load(Ordering::Relaxed) < end {
            self.end.fetch_max(end, Ordering::Release);
        }
    }

    /// Calls `visit` for every created slot with index in `first..=last`, in
    /// order. Subtrees never created are skipped whole, so the cost follows the
    /// pages ever cached in the range, not its length.
    pub(crate) fn for_each(&self, first: u64, last: u64, mut visit: impl FnMut(u64, &Slot)) {
        let end = self.end.load(Ordering::Acquire);
        if first > last || first >= end {
            return;
        }
        let last = last.min(end - 1);
        if let Some(head) = self.head.get().filter(|_| first < FANOUT as u64) {
            for index in first..=last.min(FANOUT as u64 - 1) {
                visit(index, &head[index as usize]);
            }
        }
        for tier in 1..=INTERIOR_LEVELS {
            let (tier_first, tier_last) = (tier_first(tier), tier_first(tier + 1) - 1);
            let (from, to) = (first.max(tier_first), last.min(tier_last));
            if let Some(node) = self.tiers[tier as usize - 1].get().filter(|_| from <= to) {
                Self::walk(node, tier, 0, from, to, &mut visit);
            }
        }
    }

    /// Bytes the tree has allocated: its nodes, leaves included.
    pub(crate) fn allocated_bytes(&self) -> usize {
        fn node_bytes(node: &Node) -> usize {
            match node {
                Node::Interior(children) => {
                    std::mem::size_of::<[OnceLock<Node>; FANOUT]>()
                        + children
                            .iter()
                            .filter_map(OnceLock::get)
                            .map(node_bytes)
                            .sum::<usize>()
                }
                Node::Leaf(_) => std::mem::size_of::<[Slot; FANOUT]>(),
            }
        }
        let head = self
            .head
            .get()
            .map_or(0, |_| std::mem::size_of::<[Slot; FANOUT]>());
        let tiers: usize = self
            .tiers
            .iter()
            .filter_map(OnceLock::get)
            .map(node_bytes)
            .sum();
        std::mem::size_of::<PageTree>() + head + tiers
    }

    fn walk(
        node: &Node,
        level: u32,
        base: u64,
        first: u64,
        last: u64,
        visit: &mut impl FnMut(u64, &Slot),
    ) {
        let span = 1u64 << (FANOUT_BITS * level);
        let lo = (first.max(base) - base) / span;
        let hi = (last.min(base + span * FANOUT as u64 - 1) - base) / span;
        for i in lo..=hi {
            let child_base = base + i * span;
            match node {
                Node::Interior(children) => {
                    if let Some(child) = children[i as usize].get() {
                        Self::walk(child, level - 1, child_base, first, last, visit);
                    }
                }
                Node::Leaf(slots) => visit(child_base, &slots[i as usize]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_created_on_demand() {
        let tree = PageTree::default();
        assert!(tree.get(5).is_none());
        let slot = tree.get_or_create(5) as *const Slot;
        assert_eq!(tree.get(5).map(|s| s as *const Slot), Some(slot));
        assert!(tree.get(MAX_PAGES - 1).is_none());
        tree.get_or_create(MAX_PAGES - 1);
        assert!(tree.get(MAX_PAGES - 1).is_some());
    }

    #[test]
    fn every_index_has_one_slot_across_the_tier_boundaries() {
        let tree = PageTree::default();
        let mut indexes = vec![0, 63, MAX_PAGES - 1];
        for tier in 1..=INTERIOR_LEVELS {
            let first = tier_first(tier);
            indexes.extend([first - 1, first, first + 1, 2 * first - 1, 2 * first]);
        }
        indexes.sort_unstable();
        indexes.dedup();
        let slots: Vec<*const Slot> = indexes
            .iter()
            .map(|&index| tree.get_or_create(index) as *const Slot)
            .collect();
        for (&index, &slot) in indexes.iter().zip(&slots) {
            assert_eq!(
                tree.get(index).map(|s| s as *const Slot),
                Some(slot),
                "{index}"
            );
        }
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), slots.len(), "two indexes share a slot");
        for &index in &indexes {
            tree.get(index).unwrap().publish(index % 2 == 0);
        }
        let mut seen = Vec::new();
        tree.for_each(0, u64::MAX, |index, slot| {
            if slot.load().is_uptodate() {
                seen.push(index);
            }
        });
        assert_eq!(seen, indexes, "visited once each, in order");
        assert_eq!(tier_of(63 + 1), 1);
        assert_eq!(tier_of(4095), 1);
        assert_eq!(tier_of(4096), 2);
        assert_eq!(tier_of(MAX_PAGES - 1), INTERIOR_LEVELS);
    }

    #[test]
    fn a_small_file_allocates_one_interior_node() {
        let tree = PageTree::default();
        for index in 0..4096 {
            tree.get_or_create(index);
        }
        let slots = std::mem::size_of::<[Slot; FANOUT]>();
        let node = std::mem::size_of::<[OnceLock<Node>; FANOUT]>();
        assert_eq!(
            tree.allocated_bytes(),
            std::mem::size_of::<PageTree>() + 64 * slots + node
        );
    }

    #[test]
    fn for_each_visits_created_slots_in_range_only() {
        let tree = PageTree::default();
        for index in [0u64, 63, 64, 1000, 1 << 20, MAX_PAGES - 1] {
            let slot = tree.get_or_create(index);
            slot.publish(false);
        }
        let mut seen = Vec::new();
        tree.for_each(63, 1 << 20, |index, slot| {
            if slot.load().is_uptodate() {
                seen.push(index)
            }
        });
        assert_eq!(seen, vec![63, 64, 1000, 1 << 20]);
        let mut all = 0;
        tree.for_each(0, u64::MAX, |_, _| all += 1);
        // Leaves hold 64 slots each: the six indexes live in five leaves
        // (the first in the head).
        assert_eq!(all, 5 * FANOUT);
    }
}
