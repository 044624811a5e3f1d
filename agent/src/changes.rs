//! What changed on a disk between two marks of `--mode nbd`, kept so that a mark's hashes
//! cost the changes, not the blocks they touch: written 4 KiB pages (a 4 KiB write
//! rehashes one page and merges it into its block's entry), and blocks zeroed whole
//! (TRIM, WRITE_ZEROES), whose hashes are known without reading them.

use std::collections::{BTreeMap, BTreeSet};
use tern_core::blocks::BlockHashes;
use tern_core::{BLOCK_SIZE, Digest, PAGE_SIZE, PAGES_PER_BLOCK};

const PAGES: u64 = PAGES_PER_BLOCK as u64;

/// Disjoint, non-adjacent ranges `[start, end)` of block indices.
#[derive(Debug, Default, Clone)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> =
            self.0.range(..=end).rev().take_while(|(_, e)| **e >= start).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Removes `block`; true if it was in the set.
    pub fn remove(&mut self, block: u64) -> bool {
        let Some((&s, &e)) = self.0.range(..=block).next_back() else { return false };
        if block >= e {
            return false;
        }
        self.0.remove(&s);
        if s < block {
            self.0.insert(s, block);
        }
        if block + 1 < e {
            self.0.insert(block + 1, e);
        }
        true
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(s, e)| (*s, *e))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A block's change at a mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// New values of some pages of a full block: `(index in block, page value)`.
    Pages(Vec<(usize, Digest)>),
    /// The whole entry (the disk's last, short block).
    Whole(Box<BlockHashes>),
}

/// One disk's changes since the last mark.
#[derive(Debug, Default)]
pub struct Changes {
    /// Pages written (or zeroed in part of a block).
    pub pages: BTreeSet<u64>,
    /// Blocks zeroed whole and not written since.
    pub zeroed: RangeSet,
}

impl Changes {
    /// `[offset, offset + len)` was written with data.
    pub fn written(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (p, b) = (PAGE_SIZE as u64, BLOCK_SIZE as u64);
        for block in offset / b..(offset + len).div_ceil(b) {
            // A zeroed block written again: its other pages are zero, not what the
            // entry from before the zeroing says, so all of them are hashed.
            if self.zeroed.remove(block) {
                self.pages.extend(block * PAGES..(block + 1) * PAGES);
            }
        }
        self.pages.extend(offset / p..(offset + len).div_ceil(p));
    }

    /// `[offset, offset + len)` was zeroed, on a disk of `size` bytes.
    pub fn zeroed(&mut self, offset: u64, len: u64, size: u64) {
        let b = BLOCK_SIZE as u64;
        let end = offset + len;
        // Whole blocks only, and never the disk's short last block.
        let first = offset.div_ceil(b);
        let last = (end / b).min(size / b);
        if first < last {
            self.zeroed.insert(first, last);
            let dropped: Vec<u64> = self.pages.range(first * PAGES..last * PAGES).copied().collect();
            for p in dropped {
                self.pages.remove(&p);
            }
            self.written(offset, (first * b).saturating_sub(offset).min(len));
            self.written(last * b, end.saturating_sub(last * b));
        } else {
            self.written(offset, len);
        }
    }

    pub fn clear(&mut self) {
        *self = Changes::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_split() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(20, 25);
        r.insert(5, 8);
        r.insert(7, 11);
        assert_eq!(r.ranges().collect::<Vec<_>>(), [(5, 25)]);
        assert!(r.remove(5) && r.remove(12) && !r.remove(12) && !r.remove(30));
        assert_eq!(r.ranges().collect::<Vec<_>>(), [(6, 12), (13, 25)]);
    }

    #[test]
    fn zeroed_blocks_are_kept_whole_and_a_write_into_one_rehashes_it_all() {
        let (b, p) = (BLOCK_SIZE as u64, PAGE_SIZE as u64);
        let mut c = Changes::default();
        c.written(b + 5, 10); // page 16
        c.zeroed(b / 2, 3 * b, 100 * b); // half of block 0, blocks 1-2, half of block 3
        assert_eq!(c.zeroed.ranges().collect::<Vec<_>>(), [(1, 3)]);
        let pages: Vec<u64> = c.pages.iter().copied().collect();
        let want: Vec<u64> = (8..16).chain(48..56).collect();
        assert_eq!(pages, want, "the partly zeroed blocks' pages, not the zeroed blocks'");
        c.written(2 * b + p, 1);
        assert_eq!(c.zeroed.ranges().collect::<Vec<_>>(), [(1, 2)]);
        assert!((32..48).all(|q| c.pages.contains(&q)));
    }
}
