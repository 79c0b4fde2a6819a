//! [`Histogram`]: latencies in log-linear buckets, cheap enough to record every
//! operation of a microsecond-scale workload.

/// Sub-buckets per power of two, as bits: 32 sub-buckets, so any value is
/// reported within 1/32 (about 3%) of what was recorded.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every `u64`: the values below `SUB` one each, then `SUB` per
/// power of two from `SUB` up to `2^63`.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) << SUB_BITS;

/// Counts of nanosecond latencies in log-linear buckets (HdrHistogram's layout
/// with 5 significant bits): recording is an index computation and an add.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("p50_ns", &self.quantile(0.5))
            .field("p99_ns", &self.quantile(0.99))
            .finish()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram::default()
    }

    /// Records one value, in nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// The value at quantile `q` (0 to 1) in nanoseconds, as the middle of its
    /// bucket; `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        // The rank of the value wanted, 1-based: the smallest value with at
        // least `q` of the values at or below it.
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket_bounds(bucket);
                return Some(low as f64 + (width as f64 - 1.0) / 2.0);
            }
        }
        unreachable!("the counts add up to the total")
    }
}

/// The bucket of `value`.
#[inline]
fn bucket_of(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros(); // at least SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (value >> shift) - SUB; // 0..SUB
    (((shift + 1) as u64) << SUB_BITS | mantissa) as usize
}

/// The lowest value of `bucket` and how many values it holds.
fn bucket_bounds(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < SUB {
        return (bucket, 1);
    }
    let shift = (bucket >> SUB_BITS) - 1;
    let mantissa = (bucket & (SUB - 1)) + SUB;
    (mantissa << shift, 1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for value in (0..100_000).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let bucket = bucket_of(value);
            assert!(bucket >= last && bucket < BUCKETS, "{value}");
            let (low, width) = bucket_bounds(bucket);
            assert!(
                low <= value && value - low < width,
                "{value}: {low} {width}"
            );
            last = bucket;
        }
    }

    #[test]
    fn quantiles_are_within_the_resolution() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for ns in 1..=10_000 {
            h.record(ns);
        }
        assert_eq!(h.count(), 10_000);
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((p50 - 5_000.0).abs() < 5_000.0 / 32.0, "{p50}");
        assert!((p99 - 9_900.0).abs() < 9_900.0 / 32.0, "{p99}");
        let mut twice = h.clone();
        twice.merge(&h);
        assert_eq!(twice.count(), 20_000);
        assert_eq!(twice.quantile(0.5), h.quantile(0.5));
    }
}
