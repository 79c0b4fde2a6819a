//! Eviction: which cached page goes when the budget is used up.
//!
//! Every page that becomes present gets one entry in a queue shared by the
//! cache's mappings (its slot's `QUEUED` bit says it has one; the bit and the
//! entry outlive the page, so a page dropped and filled again keeps its entry).
//! A hit marks its page `REFERENCED` (only when the mark is clear, so a hot page
//! is written once per pass of the hand, not once per hit). When the budget is
//! used up, the thread that needs a page moves the hand: a referenced page
//! loses its mark and stays, an unreferenced one is a candidate, and an entry
//! whose page is gone leaves the queue. Candidates are evicted outside the
//! queue's lock by [`crate::Mapping`], which skips pages that are locked, being
//! filled or under writeback, writes dirty ones back first and holds stores
//! through maps back while it drops a mapped page.
//!
//! Two policies share this machinery, and [`simulate`] runs either over a trace
//! with exactly the cache's rules, so that they can be compared on the same
//! accesses (`filemap bench evict`):
//! - [`EvictionPolicy::Clock`]: the queue is a ring; the hand goes round it.
//! - [`EvictionPolicy::Sieve`] (SIEVE, Zhang et al., NSDI 2024): new entries go
//!   in at the head, the hand moves from the tail towards the head and stays
//!   where it stopped; a referenced entry is not moved. One-hit pages (a scan)
//!   are found quickly near the tail, hot pages survive passes.

use std::collections::{HashMap, VecDeque};

/// How the eviction hand picks pages; see the module documentation.
///
/// ```
/// use filemap::cache::{simulate_eviction, EvictionPolicy};
/// use filemap::PageCache;
///
/// let cache = PageCache::builder().eviction(EvictionPolicy::Clock).build()?;
/// assert_eq!(cache.eviction(), EvictionPolicy::Clock);
/// // A hot set of 4 pages, polluted by a one-time scan, in a cache of 8 pages.
/// let mut trace: Vec<u64> = Vec::new();
/// for round in 0..100 {
///     trace.extend(0..4);
///     trace.extend((0..8).map(|i| 1000 + round * 8 + i));
/// }
/// let sieve = simulate_eviction(EvictionPolicy::Sieve, 8, &trace);
/// let clock = simulate_eviction(EvictionPolicy::Clock, 8, &trace);
/// assert!(sieve >= clock, "SIEVE {sieve} against CLOCK {clock}");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EvictionPolicy {
    /// CLOCK (second chance): a ring swept in order.
    Clock,
    /// SIEVE: a FIFO queue whose hand keeps its place between sweeps.
    Sieve,
}

impl EvictionPolicy {
    /// Every policy.
    pub const ALL: [EvictionPolicy; 2] = [EvictionPolicy::Clock, EvictionPolicy::Sieve];

    /// The policy's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            EvictionPolicy::Clock => "clock",
            EvictionPolicy::Sieve => "sieve",
        }
    }
}

/// A queue entry: a page of one mapping, packed in one word (the mapping's
/// id in the top [`MAPPING_BITS`] bits, the page index below), so an entry
/// costs 8 bytes in a ring and 16 in a SIEVE node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key(u64);

/// Bits of a mapping id in a [`Key`]: the page index takes the rest, as many
/// bits as the page tree has (`tree::MAX_PAGES` is 2^36).
pub(crate) const MAPPING_BITS: u32 = 28;
const INDEX_BITS: u32 = 64 - MAPPING_BITS;

impl Key {
    pub(crate) fn new(mapping: u32, index: u64) -> Key {
        debug_assert!(mapping < 1 << MAPPING_BITS && index < 1 << INDEX_BITS);
        Key((u64::from(mapping) << INDEX_BITS) | index)
    }

    pub(crate) fn mapping(self) -> u32 {
        (self.0 >> INDEX_BITS) as u32
    }

    pub(crate) fn index(self) -> u64 {
        self.0 & ((1 << INDEX_BITS) - 1)
    }
}

/// What the hand finds at an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Visit {
    /// The page was referenced: its mark is now clear, and it stays.
    Keep,
    /// The page may be evicted; its entry stays until its page is gone.
    Candidate,
    /// The page (or its mapping) is gone: the entry leaves the queue.
    Stale,
}

const NONE: u32 = u32::MAX;

/// A SIEVE list node, linked in an arena by index.
#[derive(Clone, Copy, Debug)]
struct Node {
    key: Key,
    /// Towards the head (newer entries).
    newer: u32,
    /// Towards the tail (older entries).
    older: u32,
}

/// The entries in the policy's order.
#[derive(Debug)]
pub(crate) struct Queue {
    policy: EvictionPolicy,
    ring: VecDeque<Key>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    hand: u32,
    len: usize,
}

impl Queue {
    pub(crate) fn new(policy: EvictionPolicy) -> Self {
        Queue {
            policy,
            ring: VecDeque::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NONE,
            tail: NONE,
            hand: NONE,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes the queue has allocated.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<Key>()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    /// Adds a new entry (behind the hand for CLOCK, at the head for SIEVE).
    pub(crate) fn push(&mut self, key: Key) {
        self.len += 1;
        if self.policy == EvictionPolicy::Clock {
            self.ring.push_back(key);
            return;
        }
        let node = Node {
            key,
            newer: NONE,
            older: self.head,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.nodes[at as usize] = node;
                at
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if self.head != NONE {
            self.nodes[self.head as usize].newer = at;
        }
        self.head = at;
        if self.tail == NONE {
            self.tail = at;
        }
    }

    /// Moves the hand over at most `visits` entries and returns up to `wanted`
    /// candidates, deciding each entry with `visit`.
    pub(crate) fn sweep(
        &mut self,
        wanted: usize,
        visits: usize,
        mut visit: impl FnMut(Key) -> Visit,
    ) -> Vec<Key> {
        let mut candidates = Vec::new();
        for _ in 0..visits {
            if candidates.len() >= wanted || self.len == 0 {
                break;
            }
            if self.policy == EvictionPolicy::Clock {
                let key = self.ring.pop_front().expect("len > 0");
                match visit(key) {
                    Visit::Keep => self.ring.push_back(key),
                    Visit::Candidate => {
                        candidates.push(key);
                        self.ring.push_back(key);
                    }
                    Visit::Stale => self.len -= 1,
                }
                continue;
            }
            if self.hand == NONE {
                self.hand = self.tail;
            }
            let at = self.hand;
            let node = self.nodes[at as usize];
            self.hand = node.newer;
            match visit(node.key) {
                Visit::Keep => {}
                Visit::Candidate => candidates.push(node.key),
                Visit::Stale => self.unlink(at),
            }
        }
        candidates
    }

    fn unlink(&mut self, at: u32) {
        let node = self.nodes[at as usize];
        match node.newer {
            NONE => self.head = node.older,
            newer => self.nodes[newer as usize].older = node.older,
        }
        match node.older {
            NONE => self.tail = node.newer,
            older => self.nodes[older as usize].newer = node.newer,
        }
        self.free.push(at);
        self.len -= 1;
    }
}

/// Runs `policy` over `trace` (page numbers) in a cache of `capacity` pages,
/// with the cache's rules (one entry per page, kept while the page is away;
/// a hit marks the page referenced), and returns the hit ratio.
///
/// ```
/// use filemap::cache::{simulate_eviction, EvictionPolicy};
///
/// // A working set that fits: only the first touch of each page misses.
/// let hot: Vec<u64> = (0..10).flat_map(|_| 0..4).collect();
/// assert_eq!(simulate_eviction(EvictionPolicy::Sieve, 8, &hot), 0.9);
/// // A scan that never comes back never hits, whatever the policy.
/// let scan: Vec<u64> = (0..100).collect();
/// assert_eq!(simulate_eviction(EvictionPolicy::Clock, 8, &scan), 0.0);
/// ```
pub fn simulate(policy: EvictionPolicy, capacity: usize, trace: &[u64]) -> f64 {
    #[derive(Default)]
    struct Page {
        present: bool,
        referenced: bool,
        queued: bool,
    }
    let capacity = capacity.max(1);
    let mut pages: HashMap<u64, Page> = HashMap::new();
    let mut queue = Queue::new(policy);
    let (mut hits, mut present) = (0usize, 0usize);
    for &page in trace {
        let entry = pages.entry(page).or_default();
        if entry.present {
            entry.referenced = true;
            hits += 1;
            continue;
        }
        while present >= capacity {
            let victims = queue.sweep(1, usize::MAX, |key: Key| {
                let p = pages.get_mut(&key.index()).expect("queued pages exist");
                if !p.present {
                    p.queued = false;
                    Visit::Stale
                } else if std::mem::take(&mut p.referenced) {
                    Visit::Keep
                } else {
                    Visit::Candidate
                }
            });
            for key in victims {
                pages.get_mut(&key.index()).expect("a candidate").present = false;
                present -= 1;
            }
        }
        let entry = pages.get_mut(&page).expect("inserted above");
        entry.present = true;
        present += 1;
        if !entry.queued {
            entry.queued = true;
            queue.push(Key::new(0, page));
        }
    }
    if trace.is_empty() {
        return 0.0;
    }
    hits as f64 / trace.len() as f64
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn key(index: u64) -> Key {
        Key::new(3, index)
    }

    #[test]
    fn keys_pack_a_mapping_and_a_page_index() {
        let key = Key::new((1 << MAPPING_BITS) - 1, (1 << 36) - 1);
        assert_eq!(key.mapping(), (1 << MAPPING_BITS) - 1);
        assert_eq!(key.index(), (1 << 36) - 1);
        assert_eq!(std::mem::size_of::<Node>(), 16);
    }

    #[test]
    fn clock_gives_referenced_pages_a_second_chance() {
        let mut queue = Queue::new(EvictionPolicy::Clock);
        for i in 0..4 {
            queue.push(key(i));
        }
        let referenced = [true, false, true, false];
        let mut marks = referenced;
        let victims = queue.sweep(2, 10, |k| {
            if std::mem::take(&mut marks[k.index() as usize]) {
                Visit::Keep
            } else {
                Visit::Candidate
            }
        });
        assert_eq!(victims, [key(1), key(3)]);
        assert_eq!(queue.len(), 4, "candidates keep their entries");
    }

    #[test]
    fn sieve_hand_keeps_its_place_and_stale_entries_leave() {
        let mut queue = Queue::new(EvictionPolicy::Sieve);
        for i in 0..4 {
            queue.push(key(i)); // head: 3, tail: 0
        }
        // Tail first: 0 is referenced (kept), 1 is a candidate.
        let mut referenced = [true, false, false, false];
        let first = queue.sweep(1, 10, |k| {
            if std::mem::take(&mut referenced[k.index() as usize]) {
                Visit::Keep
            } else {
                Visit::Candidate
            }
        });
        assert_eq!(first, [key(1)]);
        // The hand goes on from 2; entry 1 is now stale and leaves on the next pass.
        let second = queue.sweep(3, 4, |k| {
            if k.index() == 1 {
                Visit::Stale
            } else {
                Visit::Candidate
            }
        });
        assert_eq!(second, [key(2), key(3), key(0)]);
        assert_eq!(queue.len(), 4);
        let third = queue.sweep(4, 4, |k| {
            if k.index() == 1 {
                Visit::Stale
            } else {
                Visit::Keep
            }
        });
        assert!(third.is_empty());
        assert_eq!(queue.len(), 3);
        queue.push(key(9));
        assert_eq!(queue.len(), 4);
    }

    /// A hot set read over and over with scans of one-time pages in between:
    /// SIEVE keeps the hot set, CLOCK lets the scans flush it.
    #[test]
    fn sieve_resists_scans_better_than_clock() {
        let mut trace = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut next_scan = 1_000_000;
        for round in 0..200 {
            for _ in 0..400 {
                trace.push(rng.u64(..100));
            }
            if round % 2 == 0 {
                for _ in 0..150 {
                    trace.push(next_scan);
                    next_scan += 1;
                }
            }
        }
        let clock = simulate(EvictionPolicy::Clock, 120, &trace);
        let sieve = simulate(EvictionPolicy::Sieve, 120, &trace);
        println!("scan-polluted hit ratio: clock {clock:.3}, sieve {sieve:.3}");
        assert!(sieve > clock, "clock {clock}, sieve {sieve}");
    }

    #[test]
    fn a_cache_as_large_as_the_trace_misses_each_page_once() {
        let trace: Vec<u64> = (0..50).chain(0..50).collect();
        for policy in EvictionPolicy::ALL {
            assert_eq!(simulate(policy, 50, &trace), 0.5);
        }
    }
}
