//! Where a journal segment's data records wrote, kept in memory beside the segment so that
//! "which blocks did the records after seq N write" needs no read of their headers.
//!
//! Exact while a segment's writes merge into at most [`MAX_RANGES`] ranges; past that the
//! ranges are widened to a coarser grain (4 KiB, then doubling) until they fit. A wider
//! range only means a sender compares a few more blocks again: the answer is always a
//! superset of what was written, never less.

use std::sync::Arc;

/// A segment's written ranges `[start, end)`, merged, in offset order.
pub type Ranges = Arc<[(u64, u64)]>;

/// Ranges kept per segment after merging: 64 KiB of memory, so 20 GB of journal in 256 MiB
/// segments holds at most 5 MiB of them per disk.
pub const MAX_RANGES: usize = 4096;

/// The first grain ranges are widened to when a segment's exact ranges do not fit.
const FIRST_GRAIN: u64 = 4096;

/// The byte ranges `[start, end)` one segment's data records wrote.
#[derive(Debug, Clone)]
pub struct WrittenRanges {
    /// Merged and in offset order up to `merged`; appended as they come after it.
    ranges: Vec<(u64, u64)>,
    merged: usize,
    /// Every range is widened to multiples of this (1: exact).
    grain: u64,
}

impl Default for WrittenRanges {
    fn default() -> Self {
        WrittenRanges { ranges: Vec::new(), merged: 0, grain: 1 }
    }
}

impl WrittenRanges {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that `[start, end)` was written.
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.ranges.last_mut()
            && last.0 <= start
            && start <= last.1
        {
            // A sequential writer extends the last range: no growth at all.
            last.1 = last.1.max(end);
            return;
        }
        self.ranges.push((start, end));
        if self.ranges.len() >= 2 * MAX_RANGES {
            self.compact();
        }
    }

    /// Sorts, widens to the grain and merges, coarsening until at most [`MAX_RANGES`] remain.
    fn compact(&mut self) {
        if self.merged == self.ranges.len() && self.ranges.len() <= MAX_RANGES {
            return;
        }
        loop {
            let grain = self.grain;
            for r in &mut self.ranges {
                r.0 -= r.0 % grain;
                r.1 = r.1.div_ceil(grain).saturating_mul(grain);
            }
            merge(&mut self.ranges);
            if self.ranges.len() <= MAX_RANGES {
                break;
            }
            self.grain = if self.grain < FIRST_GRAIN { FIRST_GRAIN } else { self.grain * 2 };
        }
        self.merged = self.ranges.len();
    }

    /// The ranges, merged, in offset order.
    pub fn frozen(&mut self) -> Ranges {
        self.compact();
        Arc::from(self.ranges.as_slice())
    }
}

/// Sorts `[start, end)` ranges into offset order and merges those that touch or overlap;
/// empty ones go.
pub fn merge(ranges: &mut Vec<(u64, u64)>) {
    ranges.retain(|(a, b)| a < b);
    ranges.sort_unstable();
    let mut kept = 0;
    for i in 0..ranges.len() {
        let (a, b) = ranges[i];
        if kept > 0 && ranges[kept - 1].1 >= a {
            ranges[kept - 1].1 = ranges[kept - 1].1.max(b);
        } else {
            ranges[kept] = (a, b);
            kept += 1;
        }
    }
    ranges.truncate(kept);
}

/// What a segment's summary is.
#[derive(Debug, Clone)]
pub enum Written {
    /// The segment was there when the journal was opened: only its headers tell.
    Unknown,
    /// The active segment, being appended to.
    Open(WrittenRanges),
    /// A closed segment's ranges, merged.
    Closed(Ranges),
}

impl Written {
    /// Notes a write; a summary not open for writes (a segment that was not the active one
    /// when it was opened) no longer says what its segment holds.
    pub fn add(&mut self, start: u64, end: u64) {
        match self {
            Written::Open(w) => w.add(start, end),
            Written::Closed(_) => *self = Written::Unknown,
            Written::Unknown => {}
        }
    }

    /// Closes an open summary (the segment is closed).
    pub fn close(&mut self) {
        if let Written::Open(w) = self {
            *self = Written::Closed(w.frozen());
        }
    }

    /// The ranges, if known.
    pub fn ranges(&mut self) -> Option<Ranges> {
        match self {
            Written::Unknown => None,
            Written::Open(w) => Some(w.frozen()),
            Written::Closed(r) => Some(r.clone()),
        }
    }
}

/// A closed segment's ranges as kept beside it (`<first seq>.ranges`), so that a restarted
/// process knows them without reading the segment's headers:
/// `magic "TERNWR01" (8) | first_seq u64 | segment_len u64 | count u64 |
///  count × (start u64, end u64) | check [32]` (BLAKE3 of the bytes before it). Taken only
/// when the check holds and the segment is still that long: a torn or stale file is
/// ignored (the headers are read instead), so it needs no fsync.
const FILE_MAGIC: &[u8; 8] = b"TERNWR01";

pub fn encode_file(first_seq: u64, segment_len: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + 16 * ranges.len() + 32);
    b.extend_from_slice(FILE_MAGIC);
    b.extend_from_slice(&first_seq.to_le_bytes());
    b.extend_from_slice(&segment_len.to_le_bytes());
    b.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(a, z) in ranges {
        b.extend_from_slice(&a.to_le_bytes());
        b.extend_from_slice(&z.to_le_bytes());
    }
    let check = blake3::hash(&b);
    b.extend_from_slice(check.as_bytes());
    b
}

/// The ranges in `b` when it is the file of the segment starting at `first_seq` that is
/// `segment_len` bytes long, intact.
pub fn decode_file(b: &[u8], first_seq: u64, segment_len: u64) -> Option<Ranges> {
    let (body, check) = b.split_at_checked(b.len().checked_sub(32)?)?;
    if body.len() < 32 || &body[..8] != FILE_MAGIC || blake3::hash(body).as_bytes() != check {
        return None;
    }
    let at = |i: usize| body.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
    let count = usize::try_from(at(24)?).ok()?;
    if at(8)? != first_seq || at(16)? != segment_len || body.len() != 32 + count.checked_mul(16)? {
        return None;
    }
    (0..count).map(|i| Some((at(32 + 16 * i)?, at(40 + 16 * i)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ranges_file_reads_back_only_for_its_segment_and_only_whole() {
        let r = [(0, 4096), (8192, 1 << 30)];
        let b = encode_file(17, 5000, &r);
        assert_eq!(&*decode_file(&b, 17, 5000).unwrap(), &r);
        assert!(decode_file(&b, 18, 5000).is_none(), "another segment of that name");
        assert!(decode_file(&b, 17, 6000).is_none(), "the segment grew after it was written");
        assert!(decode_file(&b[..b.len() - 1], 17, 5000).is_none(), "torn");
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_file(&bad, 17, 5000).is_none(), "byte {i} flipped");
        }
        assert_eq!(&*decode_file(&encode_file(1, 32, &[]), 1, 32).unwrap(), &[]);
    }

    fn covered(ranges: &[(u64, u64)], at: u64) -> bool {
        ranges.iter().any(|&(a, b)| a <= at && at < b)
    }

    #[test]
    fn ranges_are_exact_while_they_fit_and_merge_where_they_touch() {
        let mut w = WrittenRanges::new();
        w.add(8192, 12288);
        w.add(0, 4096);
        w.add(4096, 6000);
        w.add(100_000, 100_001);
        w.add(5, 5); // empty
        assert_eq!(&*w.frozen(), &[(0, 6000), (8192, 12288), (100_000, 100_001)]);
    }

    #[test]
    fn sequential_writes_stay_one_range() {
        let mut w = WrittenRanges::new();
        for i in 0..100_000u64 {
            w.add(i * 4096, (i + 1) * 4096);
        }
        assert_eq!(&*w.frozen(), &[(0, 100_000 * 4096)]);
    }

    #[test]
    fn too_many_ranges_coarsen_to_a_superset_that_fits() {
        // 20,000 scattered 512-byte writes over 1 GiB, in a pseudo-random order.
        let mut w = WrittenRanges::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut wrote = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % (1 << 30)) & !511;
            w.add(at + 3, at + 512);
            wrote.push(at + 3);
        }
        let r = w.frozen();
        assert!(r.len() <= MAX_RANGES, "{} ranges", r.len());
        assert!(r.windows(2).all(|p| p[0].1 < p[1].0), "merged and in order");
        for at in wrote {
            assert!(covered(&r, at) && covered(&r, at + 508), "{at} covered");
        }
        // Coarse, but not the whole disk.
        let bytes: u64 = r.iter().map(|(a, b)| b - a).sum();
        assert!(bytes < 1 << 30, "{bytes}");
    }

    #[test]
    fn an_unknown_summary_stays_unknown_and_a_closed_one_written_again_becomes_unknown() {
        let mut u = Written::Unknown;
        u.add(0, 10);
        assert!(u.ranges().is_none());
        let mut o = Written::Open(WrittenRanges::new());
        o.add(10, 20);
        o.close();
        assert_eq!(&*o.ranges().unwrap(), &[(10, 20)]);
        o.add(30, 40); // a closed segment written again: its ranges no longer tell
        assert!(o.ranges().is_none());
    }
}
