//! The agent's memory of what the receiver holds: per 64 KiB block, its hash and its 16
//! page hashes, as of the last recovery point the receiver acked. Persisted in the state
//! directory so a restart does not resend the disk.
//!
//! File layout (little-endian): `magic "TERNAGT1" (8) | version u32 | reserved u32 |
//! disk size u64 | blocks u64 | point seq u64 | generation len u32 | generation bytes |
//! blocks × (block hash [32] | 16 × page hash [32]) | BLAKE3 of all preceding bytes [32]`.

use std::io::Write;
use std::path::{Path, PathBuf};
use tern_core::blocks::{BlockHashes, block_count, block_len, zero_block};
use tern_core::{Digest, PAGES_PER_BLOCK, Seq};

const MAGIC: &[u8; 8] = b"TERNAGT1";
const VERSION: u32 = 1;
const ENTRY_LEN: usize = 32 * (1 + PAGES_PER_BLOCK);

/// An entry that matches no real data: the receiver's content is unknown.
pub const UNKNOWN: BlockHashes = BlockHashes { block: Digest::ZERO, pages: [Digest::ZERO; PAGES_PER_BLOCK] };

#[derive(Debug, Clone)]
pub struct DiskState {
    pub size: u64,
    /// The receiver's copy this state describes.
    pub generation: String,
    /// The receiver's sequence number at the point this state was saved.
    pub seq: Seq,
    pub blocks: Vec<BlockHashes>,
}

impl DiskState {
    /// The receiver holds an all-zero disk (a new copy).
    pub fn zeroes(size: u64, generation: &str) -> DiskState {
        let n = block_count(size);
        let blocks = (0..n).map(|i| zero_block(block_len(size, i))).collect();
        DiskState { size, generation: generation.to_string(), seq: Seq(0), blocks }
    }

    /// Nothing is known of the receiver's copy: every block with data is sent.
    pub fn unknown(size: u64, generation: &str) -> DiskState {
        let n = usize::try_from(block_count(size)).unwrap_or(0);
        DiskState { size, generation: generation.to_string(), seq: Seq(0), blocks: vec![UNKNOWN; n] }
    }

    /// Takes block hashes from a receiver (see `BlockHashes` in the protocol). A table
    /// that does not decode leaves the blocks unknown: they are sent whole.
    pub fn fill_from(&mut self, first_block: u64, blocks: &[BlockHashes]) {
        let first = usize::try_from(first_block).unwrap_or(usize::MAX);
        for (i, b) in blocks.iter().enumerate() {
            if let Some(slot) = self.blocks.get_mut(first.saturating_add(i)) {
                *slot = *b;
            }
        }
    }

    /// Forgets the blocks that the byte ranges `(offset, length)` touch: the receiver's
    /// content there is unknown, so the next pass compares them and sends what it reads.
    /// Returns the number of blocks forgotten.
    pub fn forget(&mut self, ranges: impl Iterator<Item = (u64, u64)>) -> usize {
        let block = tern_core::BLOCK_SIZE as u64;
        let mut n = 0;
        for (offset, length) in ranges {
            let first = offset / block;
            let end = offset.saturating_add(length).div_ceil(block);
            for b in first..end {
                if let Some(slot) = usize::try_from(b).ok().and_then(|i| self.blocks.get_mut(i))
                    && *slot != UNKNOWN
                {
                    *slot = UNKNOWN;
                    n += 1;
                }
            }
        }
        n
    }

    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("disk-{disk}.state"))
    }

    /// Publishes the state: streamed to a temporary file (no copy of the table in
    /// memory), fsynced, renamed into place, folder fsynced.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut w = HashingWriter {
            inner: std::io::BufWriter::new(std::fs::File::create(&tmp)?),
            hash: blake3::Hasher::new(),
        };
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&self.size.to_le_bytes());
        buf.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        buf.extend_from_slice(&self.seq.0.to_le_bytes());
        let generation = self.generation.as_bytes();
        buf.extend_from_slice(&u32::try_from(generation.len()).unwrap_or(0).to_le_bytes());
        buf.extend_from_slice(generation);
        w.write_all(&buf)?;
        for b in &self.blocks {
            w.write_all(&b.block.0)?;
            for p in &b.pages {
                w.write_all(&p.0)?;
            }
        }
        let check = w.hash.finalize();
        w.inner.write_all(check.as_bytes())?;
        let f = w.inner.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Loads a saved state; `None` when absent, damaged or for another disk size.
    pub fn load(path: &Path, size: u64) -> Option<DiskState> {
        let buf = std::fs::read(path).ok()?;
        let (body, check) = buf.split_at(buf.len().checked_sub(32)?);
        if blake3::hash(body).as_bytes() != check || body.get(..8)? != MAGIC {
            tracing::warn!(path = %path.display(), "agent state is damaged; the disk will be compared in full");
            return None;
        }
        let u64_at = |i: usize| body.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        if body.get(8..12)? != VERSION.to_le_bytes() || u64_at(16)? != size {
            return None;
        }
        let n = usize::try_from(u64_at(24)?).ok()?;
        let seq = Seq(u64_at(32)?);
        let glen = usize::try_from(u32::from_le_bytes(body.get(40..44)?.try_into().ok()?)).ok()?;
        let generation = String::from_utf8(body.get(44..44 + glen)?.to_vec()).ok()?;
        let table = body.get(44 + glen..)?;
        if table.len() != n * ENTRY_LEN || n as u64 != block_count(size) {
            return None;
        }
        let blocks = table
            .chunks_exact(ENTRY_LEN)
            .map(|e| {
                let d = |i: usize| Digest::from_slice(&e[i * 32..(i + 1) * 32]).unwrap_or(Digest::ZERO);
                let mut pages = [Digest::ZERO; PAGES_PER_BLOCK];
                for (i, p) in pages.iter_mut().enumerate() {
                    *p = d(i + 1);
                }
                BlockHashes { block: d(0), pages }
            })
            .collect();
        Some(DiskState { size, generation, seq, blocks })
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut s = DiskState::zeroes(200_000, "gen1");
        s.seq = Seq(42);
        s.blocks[1] = UNKNOWN;
        s.save(&p).unwrap();
        let l = DiskState::load(&p, 200_000).unwrap();
        assert_eq!(l.seq, Seq(42));
        assert_eq!(l.generation, "gen1");
        assert_eq!(l.blocks, s.blocks);
        assert!(DiskState::load(&p, 300_000).is_none());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(DiskState::load(&p, 200_000).is_none());
    }
}
