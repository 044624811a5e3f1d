//! The wire form of a receiver's block hashes (`BlockHashes.table`): per 64 KiB block, a
//! tag byte, then nothing more (tag 0: the block is all zeroes), the 32-byte block hash
//! and the sixteen 32-byte page hashes (tag 1), or the block hash alone (tag 2: coarse;
//! the pages of a block that differs are asked for with `PageHashesRequest`). In memory a
//! coarse entry has all-zero page hashes. Zero blocks, the bulk of a sparse disk, cost one
//! byte.

use tern_core::Digest;
use tern_core::blocks::{BlockHashes, block_count, block_len, zero_block};

const ZERO: u8 = 0;
const FULL: u8 = 1;
const COARSE: u8 = 2;

/// Whether an entry carries the block hash alone.
pub fn is_coarse(b: &BlockHashes) -> bool {
    b.pages[0] == Digest::ZERO && b.block != Digest::ZERO
}

pub fn encode(blocks: &[BlockHashes], block_len: impl Fn(usize) -> usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * 8);
    for (i, b) in blocks.iter().enumerate() {
        if *b == zero_block(block_len(i)) {
            out.push(ZERO);
        } else if is_coarse(b) {
            out.push(COARSE);
            out.extend_from_slice(&b.block.0);
        } else {
            out.push(FULL);
            out.extend_from_slice(&b.block.0);
            for p in &b.pages {
                out.extend_from_slice(&p.0);
            }
        }
    }
    out
}

/// The `BlockHashes` message for `chunk`: the blocks from `first` of a disk of `size` bytes.
pub fn message(disk: &str, size: u64, first: u64, chunk: &[BlockHashes]) -> crate::BlockHashes {
    crate::BlockHashes {
        disk: disk.to_string(),
        first_block: first,
        table: encode(chunk, |i| block_len(size, first + i as u64)),
        last: first + chunk.len() as u64 >= block_count(size),
        blocks: Vec::new(),
        upto_seq: 0,
    }
}

/// The answer to a `PageHashesRequest`: the entries of `blocks` of a disk of `size` bytes.
pub fn sparse_message(disk: &str, size: u64, blocks: &[u64], entries: &[BlockHashes]) -> crate::BlockHashes {
    crate::BlockHashes {
        disk: disk.to_string(),
        first_block: 0,
        table: encode(entries, |i| block_len(size, blocks[i])),
        last: false,
        blocks: blocks.to_vec(),
        upto_seq: 0,
    }
}

/// Decodes a table; `block_len(i)` is the length of the i-th block of this message.
/// `None` when the table is malformed.
pub fn decode(table: &[u8], block_len: impl Fn(usize) -> usize) -> Option<Vec<BlockHashes>> {
    let mut out = Vec::new();
    let mut rest = table;
    while let Some((&tag, tail)) = rest.split_first() {
        match tag {
            ZERO => {
                out.push(zero_block(block_len(out.len())));
                rest = tail;
            }
            FULL => {
                let entry = tail.get(..32 * 17)?;
                let d = |k: usize| Digest::from_slice(&entry[k * 32..(k + 1) * 32]).unwrap_or(Digest::ZERO);
                let mut pages = [Digest::ZERO; tern_core::PAGES_PER_BLOCK];
                for (k, p) in pages.iter_mut().enumerate() {
                    *p = d(k + 1);
                }
                out.push(BlockHashes { block: d(0), pages });
                rest = &tail[32 * 17..];
            }
            COARSE => {
                let block = Digest::from_slice(tail.get(..32)?)?;
                out.push(BlockHashes { block, pages: [Digest::ZERO; tern_core::PAGES_PER_BLOCK] });
                rest = &tail[32..];
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::blocks::hash_block;

    #[test]
    fn round_trip() {
        let data = vec![3u8; tern_core::BLOCK_SIZE];
        let coarse =
            BlockHashes { block: Digest::of(&data), pages: [Digest::ZERO; tern_core::PAGES_PER_BLOCK] };
        let blocks =
            vec![hash_block(&data), zero_block(tern_core::BLOCK_SIZE), hash_block(&data[..5000]), coarse];
        let len = |i: usize| if i == 2 { 5000 } else { tern_core::BLOCK_SIZE };
        let t = encode(&blocks, len);
        assert_eq!(t.len(), 1 + 544 + 1 + 1 + 544 + 1 + 32);
        assert!(is_coarse(&coarse) && !is_coarse(&blocks[0]) && !is_coarse(&blocks[1]));
        assert_eq!(decode(&t, len).unwrap(), blocks);
        assert!(decode(&t[..100], len).is_none());
    }
}
