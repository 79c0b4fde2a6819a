//! The page index of one mapping: a radix tree from page index to [`Slot`].
//!
//! Lookups take no lock and write nothing: each level is a `OnceLock`, set once
//! and never cleared while the tree lives, so a hit is a few acquire loads. Slots
//! therefore have stable addresses, which lets threads park on them, and a page's
//! state word lives inline in its leaf (8 bytes per page index).
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

/// Slots by page index, created on first use. The root too: a file never
/// read costs two words here.
#[derive(Default)]
pub(crate) struct PageTree {
    /// The slots of the first [`FANOUT`] pages, outside the tree: a small
    /// file's whole index is one leaf, one hop away (the tree's path to its
    /// first leaf would be six nodes, 8 KiB).
    head: OnceLock<Leaf>,
    root: OnceLock<Node>,
    /// One past the last slot of the highest leaf created: walks stop there,
    /// so walking a small file's tree costs a few visits, not one per child
    /// of every level.
    end: AtomicU64,
}

#[inline]
fn child_index(index: u64, level: u32) -> usize {
    ((index >> (FANOUT_BITS * level)) as usize) & (FANOUT - 1)
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
        let mut node = self.root.get()?;
        let mut level = INTERIOR_LEVELS;
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
        let mut node = self.root.get_or_init(|| Node::new(INTERIOR_LEVELS));
        let mut level = INTERIOR_LEVELS;
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
        let first = first.max(FANOUT as u64);
        match self.root.get() {
            Some(root) if first <= last => {
                Self::walk(root, INTERIOR_LEVELS, 0, first, last, &mut visit);
            }
            _ => {}
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
        std::mem::size_of::<PageTree>() + head + self.root.get().map_or(0, node_bytes)
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
