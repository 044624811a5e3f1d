//! Block hashing shared by the agent (change detection), the store (materialisation
//! checks) and the master target.
//!
//! A disk is cut into 64 KiB blocks; a block's hash is the plain BLAKE3 of its bytes
//! (the last block may be shorter). Inside a full block, each 4 KiB page has a
//! chaining value (the BLAKE3 tree node of that page), so one pass over the data gives
//! both the page values used to find changed pages and the block hash: the 16 page
//! values merge up the BLAKE3 tree into exactly `blake3::hash(block)`.
//!
//! A disk's *fingerprint* is the BLAKE3 of the concatenated block hashes, in order.

use crate::Digest;
use blake3::hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use std::sync::OnceLock;

pub const BLOCK_SIZE: usize = 64 * 1024;
pub const PAGE_SIZE: usize = 4 * 1024;
pub const PAGES_PER_BLOCK: usize = BLOCK_SIZE / PAGE_SIZE;

/// Hashes of one block: the block hash and one value per 4 KiB page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BlockHashes {
    pub block: Digest,
    pub pages: [Digest; PAGES_PER_BLOCK],
}

/// Hashes a block of at most `BLOCK_SIZE` bytes that starts at a block boundary.
/// Short (last) blocks hash their pages plainly: page values only need to be stable
/// for one disk size, and the block hash is `blake3::hash(data)` either way.
pub fn hash_block(data: &[u8]) -> BlockHashes {
    assert!(data.len() <= BLOCK_SIZE, "block longer than BLOCK_SIZE");
    let mut pages = [Digest::ZERO; PAGES_PER_BLOCK];
    if data.len() != BLOCK_SIZE {
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            pages[i] = Digest::of(page);
        }
        return BlockHashes { block: Digest::of(data), pages };
    }
    let mut cvs: [ChainingValue; PAGES_PER_BLOCK] = [[0; 32]; PAGES_PER_BLOCK];
    for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
        cvs[i] = page_value(page, i).0;
        pages[i] = Digest(cvs[i]);
    }
    BlockHashes { block: merge_pages(&cvs), pages }
}

/// The value of page `index` (a full `PAGE_SIZE` page) of a full block.
pub fn page_value(page: &[u8], index: usize) -> Digest {
    let mut h = blake3::Hasher::new();
    h.set_input_offset((index * PAGE_SIZE) as u64);
    h.update(page);
    Digest(h.finalize_non_root())
}

/// A full block's hashes after some of its pages changed: `(index, page_value)` each.
/// Costs the changed pages' hashing (done by the caller) and 15 merges, not the block.
pub fn with_pages(old: &BlockHashes, changed: &[(usize, Digest)]) -> BlockHashes {
    let mut pages = old.pages;
    for &(i, v) in changed {
        pages[i] = v;
    }
    let cvs: [ChainingValue; PAGES_PER_BLOCK] = pages.map(|d| d.0);
    BlockHashes { block: merge_pages(&cvs), pages }
}

fn merge_pages(cvs: &[ChainingValue; PAGES_PER_BLOCK]) -> Digest {
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level.chunks_exact(2).map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash)).collect();
    }
    Digest::from(merge_subtrees_root(&level[0], &level[1], Mode::Hash))
}

/// Hashes of an all-zero block of `len` bytes (holes and zero blocks hash as zeroes do).
pub fn zero_block(len: usize) -> BlockHashes {
    static FULL: OnceLock<BlockHashes> = OnceLock::new();
    if len == BLOCK_SIZE {
        *FULL.get_or_init(|| hash_block(&vec![0u8; BLOCK_SIZE]))
    } else {
        hash_block(&vec![0u8; len])
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    // Compare in u128 lanes; the compiler vectorises this.
    let (lanes, tail) = data.as_chunks::<16>();
    lanes.iter().all(|c| u128::from_ne_bytes(*c) == 0) && tail.iter().all(|&b| b == 0)
}

/// The data ranges of a file within `[start, end)`, skipping holes (SEEK_DATA/SEEK_HOLE);
/// one range covering all of it when the file system cannot tell.
pub fn data_ranges(f: &std::fs::File, start: u64, end: u64) -> Vec<(u64, u64)> {
    DataRanges::default().within(f, start, end)
}

/// Whether `[start, end)` of a file is a hole (false when the file system cannot tell).
/// One SEEK_DATA: unlike [`data_ranges`] it does not look for where the data ends, which
/// on tmpfs walks the file's pages to the next hole.
pub fn is_hole(f: &std::fs::File, start: u64, end: u64) -> bool {
    use rustix::fs::{SeekFrom, seek};
    match seek(f, SeekFrom::Data(start)) {
        Ok(data) => data >= end,
        Err(e) => e == rustix::io::Errno::NXIO,
    }
}

/// The data ranges of one file asked for range after range, in order (the chunks of a
/// pass): the data extent found last is remembered, so that a dense file costs one
/// SEEK_HOLE per extent rather than one per range. SEEK_HOLE looks for the end of the data
/// from where it is asked, which on tmpfs walks every page to it: once per 1 MiB chunk made
/// the first pass over a 1 GiB file there quadratic (12 s of CPU where reading took 0.2 s).
/// Only data is remembered, and a range once data is read as such: should it have become a
/// hole since, its zeroes are read, which is right, only slower. Keep one for a pass.
#[derive(Debug, Default)]
pub struct DataRanges {
    extent: Option<(u64, u64)>,
}

impl DataRanges {
    /// The data ranges within `[start, end)`, as [`data_ranges`].
    pub fn within(&mut self, f: &std::fs::File, start: u64, end: u64) -> Vec<(u64, u64)> {
        use rustix::fs::{SeekFrom, seek};
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            if let Some((data, hole)) = self.extent
                && data <= pos
                && pos < hole
            {
                out.push((pos, hole.min(end)));
                pos = hole;
                continue;
            }
            let data = match seek(f, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return vec![(start, end)],
            };
            if data >= end {
                break;
            }
            let Ok(hole) = seek(f, SeekFrom::Hole(data)) else {
                out.push((data, end));
                break;
            };
            self.extent = Some((data, hole));
            out.push((data, hole.min(end)));
            pos = hole.max(data + 1);
        }
        out
    }
}

/// Number of blocks of a disk of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

/// Length of block `index` of a disk of `size` bytes.
pub fn block_len(size: u64, index: u64) -> usize {
    let start = index * BLOCK_SIZE as u64;
    usize::try_from((size - start).min(BLOCK_SIZE as u64)).unwrap_or(BLOCK_SIZE)
}

/// Builds a disk fingerprint from block hashes fed in order.
#[derive(Debug, Default)]
pub struct Fingerprint {
    hasher: blake3::Hasher,
    /// Hashes not yet fed: BLAKE3 hashes many chunks at once (SIMD) only when given them
    /// together, and a 1 TiB disk has 16 million blocks.
    pending: Vec<u8>,
    blocks: u64,
}

impl Fingerprint {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, block: &Digest) {
        const BATCH: usize = 64 << 10;
        if self.pending.len() >= BATCH {
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
        self.pending.extend_from_slice(&block.0);
        self.blocks += 1;
    }

    /// Feeds every block of `data`, which must start at a block boundary.
    pub fn push_data(&mut self, data: &[u8]) {
        for block in data.chunks(BLOCK_SIZE) {
            let d = if is_zero(block) { zero_block(block.len()).block } else { Digest::of(block) };
            self.push(&d);
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn finish(&self) -> Digest {
        let mut h = self.hasher.clone();
        h.update(&self.pending);
        Digest::from(h.finalize())
    }
}

/// Blocks per group of a [`FingerprintTree`]: 32 KiB of block hashes, 32 BLAKE3 chunks.
pub const GROUP_BLOCKS: u64 = 1024;

/// A disk's fingerprint kept up to date as its blocks change. The fingerprint is the
/// BLAKE3 of the concatenated block hashes, and BLAKE3 is a tree: the chaining value of
/// each group of [`GROUP_BLOCKS`] hashes is kept, so a change costs its group's hashes and
/// the merges above (one per group), never the whole disk's hashes.
#[derive(Debug, Clone)]
pub struct FingerprintTree {
    blocks: u64,
    groups: Vec<ChainingValue>,
    /// A disk of one group: its fingerprint is a plain hash.
    single: Digest,
}

impl FingerprintTree {
    pub fn new(blocks: u64) -> FingerprintTree {
        let n = usize::try_from(blocks.div_ceil(GROUP_BLOCKS).max(1)).unwrap_or(usize::MAX);
        FingerprintTree { blocks, groups: vec![[0; 32]; n], single: Digest::ZERO }
    }

    pub fn group_count(&self) -> u64 {
        self.groups.len() as u64
    }

    /// The blocks of group `g`.
    pub fn group_blocks(&self, g: u64) -> std::ops::Range<u64> {
        g * GROUP_BLOCKS..((g + 1) * GROUP_BLOCKS).min(self.blocks)
    }

    /// Sets group `g` from the hashes of its blocks, in order.
    pub fn set_group(&mut self, g: u64, hashes: &[Digest]) {
        debug_assert_eq!(hashes.len() as u64, self.group_blocks(g).count() as u64);
        let mut h = blake3::Hasher::new();
        if self.groups.len() == 1 {
            for d in hashes {
                h.update(&d.0);
            }
            self.single = Digest::from(h.finalize());
            return;
        }
        h.set_input_offset(g * GROUP_BLOCKS * 32);
        for d in hashes {
            h.update(&d.0);
        }
        if let Some(slot) = usize::try_from(g).ok().and_then(|i| self.groups.get_mut(i)) {
            *slot = h.finalize_non_root();
        }
    }

    /// The fingerprint: equal to [`Fingerprint`] fed every block hash in order.
    pub fn root(&self) -> Digest {
        if self.groups.len() == 1 {
            return self.single;
        }
        // BLAKE3's tree: the left subtree holds the largest power of two of chunks below
        // the total, which at group granularity is the largest power of two of groups
        // below their count (every group but the last is full).
        fn split(cvs: &[ChainingValue]) -> (&[ChainingValue], &[ChainingValue]) {
            cvs.split_at(cvs.len().next_power_of_two() / 2)
        }
        fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
            if cvs.len() == 1 {
                return cvs[0];
            }
            let (l, r) = split(cvs);
            merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
        }
        let (l, r) = split(&self.groups);
        Digest::from(merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_asked_chunk_by_chunk_equal_those_asked_at_once_and_holes_are_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        let mib = 1u64 << 20;
        f.set_len(24 * mib + 4096 + 17).unwrap();
        // Data: a run over chunks 1..5, one in the middle of chunk 9, and the odd tail.
        for (at, len) in [(mib + 4096, 4 * mib), (9 * mib + 8192, 8192), (24 * mib, 4096 + 17)] {
            f.write_all_at(&vec![7u8; len as usize], at).unwrap();
        }
        let size = f.metadata().unwrap().len();
        let whole = data_ranges(&f, 0, size);
        // Whatever the file system rounds holes to, the data written is inside its ranges.
        let covered = |at: u64| whole.iter().any(|&(a, b)| a <= at && at < b);
        assert!(
            covered(mib + 4096) && covered(5 * mib + 4095) && covered(9 * mib + 8192) && covered(size - 1)
        );
        for chunk in [mib, mib / 2 + 4096, 3 * mib] {
            let mut map = DataRanges::default();
            let mut pieces: Vec<(u64, u64)> = Vec::new();
            let mut at = 0;
            while at < size {
                let end = (at + chunk).min(size);
                let got = map.within(&f, at, end);
                assert_eq!(got, data_ranges(&f, at, end), "[{at}, {end})");
                assert_eq!(is_hole(&f, at, end), got.is_empty(), "[{at}, {end})");
                for r in got {
                    match pieces.last_mut() {
                        Some(last) if last.1 == r.0 => last.1 = r.1,
                        _ => pieces.push(r),
                    }
                }
                at = end;
            }
            assert_eq!(pieces, whole, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_fingerprint_tree_equals_the_flat_fingerprint_and_follows_changes() {
        for blocks in [1u64, 31, 1023, 1024, 1025, 2048, 2049, 3000, 4096, 5000, 9001] {
            let mut hashes: Vec<Digest> = (0..blocks).map(|i| Digest::of(&i.to_le_bytes())).collect();
            let flat = |hashes: &[Digest]| {
                let mut f = Fingerprint::new();
                hashes.iter().for_each(|h| f.push(h));
                f.finish()
            };
            let mut t = FingerprintTree::new(blocks);
            for g in 0..t.group_count() {
                let r = t.group_blocks(g);
                t.set_group(g, &hashes[r.start as usize..r.end as usize]);
            }
            assert_eq!(t.root(), flat(&hashes), "{blocks} blocks");
            // One block changes: its group alone is set again.
            let b = blocks / 2;
            hashes[b as usize] = Digest::of(b"changed");
            let g = b / GROUP_BLOCKS;
            let r = t.group_blocks(g);
            t.set_group(g, &hashes[r.start as usize..r.end as usize]);
            assert_eq!(t.root(), flat(&hashes), "{blocks} blocks, block {b} changed");
        }
    }

    #[test]
    fn a_block_updated_page_by_page_hashes_as_the_whole_block() {
        let mut data: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let old = hash_block(&data);
        data[3 * PAGE_SIZE + 5] ^= 0xFF;
        data[15 * PAGE_SIZE..].fill(0);
        let changed: Vec<(usize, Digest)> =
            [3, 15].iter().map(|&i| (i, page_value(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], i))).collect();
        let new = with_pages(&old, &changed);
        assert_eq!(new, hash_block(&data));
        assert_eq!(new.block, Digest::of(&data));
    }

    #[test]
    fn tree_merge_equals_plain_hash() {
        let data: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let h = hash_block(&data);
        assert_eq!(h.block, Digest::of(&data));
        let short = &data[..10_000];
        assert_eq!(hash_block(short).block, Digest::of(short));
    }

    #[test]
    fn one_changed_page_changes_one_page_value() {
        let mut data = vec![5u8; BLOCK_SIZE];
        let a = hash_block(&data);
        data[PAGE_SIZE * 3 + 17] ^= 1;
        let b = hash_block(&data);
        let changed: Vec<usize> = (0..PAGES_PER_BLOCK).filter(|&i| a.pages[i] != b.pages[i]).collect();
        assert_eq!(changed, vec![3]);
        assert_ne!(a.block, b.block);
    }

    #[test]
    fn zero_detection() {
        let mut z = vec![0u8; 4099];
        assert!(is_zero(&z));
        z[4098] = 1;
        assert!(!is_zero(&z));
        z[4098] = 0;
        z[3] = 1;
        assert!(!is_zero(&z));
        assert_eq!(zero_block(BLOCK_SIZE).block, Digest::of(&[0u8; BLOCK_SIZE]));
    }
}
