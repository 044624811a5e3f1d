//! The extent codec: hash + compress on the sending side, decompress + verify on every
//! receiving or reading side. The digest is always of the plain data.

use crate::Digest;

/// zstd level: 1 is the fastest level that still halves typical file-system data.
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("data digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("payload does not decompress to {expected} bytes: {reason}")]
    CorruptPayload { expected: usize, reason: String },
    #[error("plain payload holds {actual} bytes, record says {expected}")]
    LengthMismatch { expected: usize, actual: usize },
}

/// Extents from this size on are probed before they are compressed whole (the probe costs
/// at most 1/16 of compressing them).
const PROBE_MIN: usize = 128 * 1024;
const SMALL_MISSES: u32 = 8;
const SMALL_RETRY: u32 = 32;
/// A probe's size: one 4 KiB page.
const PROBE_LEN: usize = 4096;
/// A probe must shrink by at least 1/`PROBE_GAIN_DIV` (3 %) for the extent to be compressed.
const PROBE_GAIN_DIV: usize = 32;
/// An extent too small to probe must shrink by at least 1/`SMALL_GAIN_DIV` (12.5 %): zstd
/// pays a fixed cost per call (entropy tables built for each block), so a 4 KiB write that
/// compresses by 9 % (fio's data) cost the agent ~10 us of CPU, shared with the VM it
/// protects, to save ~370 bytes. In `--mode nbd` at 50 MB/s of 4 KiB writes, zstd was over
/// half of the streaming thread's CPU. Database and file-system pages of text or sparse
/// structures shrink far more, and stay compressed.
const SMALL_GAIN_DIV: usize = 8;

/// One encoded extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub digest: Digest,
    /// false: the payload is the plain data (compression did not pay).
    pub compressed: bool,
    pub payload: Vec<u8>,
}

/// Reusable compressor; one per worker thread.
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    /// Small extents in a row that did not compress, and those sent plain since.
    misses: u32,
    skipped: u32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    pub fn new() -> Self {
        let zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap_or_else(|e| {
            // Only fails when zstd cannot allocate a context: out of memory.
            panic!("zstd compressor context: {e}")
        });
        Encoder { zstd, misses: 0, skipped: 0 }
    }

    /// `data`'s digest, and `data` compressed or plain (see [`Encoder::compress`]).
    pub fn encode(&mut self, data: &[u8]) -> Encoded {
        let digest = Digest::of(data);
        match self.compress(data) {
            Some(payload) => Encoded { digest, compressed: true, payload },
            None => Encoded { digest, compressed: false, payload: data.to_vec() },
        }
    }

    /// `data` compressed, or `None` when that does not pay (the probe, a small extent's
    /// recent misses, or too small a gain): it then travels plain.
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if !self.worth_compressing(data) {
            return None;
        }
        let small = data.len() < PROBE_MIN;
        // A gain under 3 % is not worth the receiver's decompression; a small extent must
        // gain more (see `SMALL_GAIN_DIV`).
        let div = if small { SMALL_GAIN_DIV } else { PROBE_GAIN_DIV };
        match self.zstd.compress(data) {
            Ok(c) if c.len() * div < data.len() * (div - 1) => {
                if small {
                    self.misses = 0;
                }
                Some(c)
            }
            _ => {
                if small {
                    self.misses += 1;
                    self.skipped = 0;
                }
                None
            }
        }
    }

    /// A cheap probe before a large extent is compressed whole: its first page and the page
    /// at its middle. When neither shrinks by `PROBE_GAIN`, the extent travels plain (random,
    /// encrypted or already compressed data), for about 1 % of what compressing it costs.
    ///
    /// Extents too small to probe learn from the ones before: after `SMALL_MISSES` in a
    /// row did not compress, only one in `SMALL_RETRY` is tried until one does again.
    fn worth_compressing(&mut self, data: &[u8]) -> bool {
        if data.len() < PROBE_MIN {
            if self.misses >= SMALL_MISSES && self.skipped < SMALL_RETRY {
                self.skipped += 1;
                return false;
            }
            return true;
        }
        let mid = (data.len() / 2) & !(PROBE_LEN - 1);
        [&data[..PROBE_LEN], &data[mid..mid + PROBE_LEN]].into_iter().any(|probe| {
            self.zstd
                .compress(probe)
                .is_ok_and(|c| c.len() * PROBE_GAIN_DIV < probe.len() * (PROBE_GAIN_DIV - 1))
        })
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Reusable decompressor with verification.
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
    /// Reused by [`Decoder::check`], so checking allocates nothing per record.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    pub fn new() -> Self {
        let zstd =
            zstd::bulk::Decompressor::new().unwrap_or_else(|e| panic!("zstd decompressor context: {e}"));
        Decoder { zstd, scratch: Vec::new() }
    }

    /// Checks that the payload holds `length` bytes that hash to `expected`, without
    /// keeping them.
    pub fn check(
        &mut self,
        compressed: bool,
        payload: &[u8],
        length: usize,
        expected: &Digest,
    ) -> Result<(), CodecError> {
        let plain: &[u8] = if compressed {
            self.scratch.clear();
            self.scratch.reserve(length);
            let n = self
                .zstd
                .decompress_to_buffer(payload, &mut self.scratch)
                .map_err(|e| CodecError::CorruptPayload { expected: length, reason: e.to_string() })?;
            if n != length {
                return Err(CodecError::LengthMismatch { expected: length, actual: n });
            }
            &self.scratch
        } else {
            if payload.len() != length {
                return Err(CodecError::LengthMismatch { expected: length, actual: payload.len() });
            }
            payload
        };
        let actual = Digest::of(plain);
        if actual != *expected {
            return Err(CodecError::DigestMismatch { expected: *expected, actual });
        }
        Ok(())
    }

    /// Returns the plain data if it has `length` bytes and hashes to `expected`.
    pub fn decode(
        &mut self,
        compressed: bool,
        payload: &[u8],
        length: usize,
        expected: &Digest,
    ) -> Result<Vec<u8>, CodecError> {
        let plain = if compressed {
            let out = self
                .zstd
                .decompress(payload, length)
                .map_err(|e| CodecError::CorruptPayload { expected: length, reason: e.to_string() })?;
            if out.len() != length {
                return Err(CodecError::LengthMismatch { expected: length, actual: out.len() });
            }
            out
        } else {
            if payload.len() != length {
                return Err(CodecError::LengthMismatch { expected: length, actual: payload.len() });
            }
            payload.to_vec()
        };
        let actual = Digest::of(&plain);
        if actual != *expected {
            return Err(CodecError::DigestMismatch { expected: *expected, actual });
        }
        Ok(plain)
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn small_extents_that_do_not_compress_stop_being_tried_until_one_would() {
        let mut enc = Encoder::new();
        let mut x = 1u64;
        let mut random = || -> Vec<u8> {
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for _ in 0..SMALL_MISSES {
            assert!(!enc.encode(&random()).compressed);
        }
        let text = b"tern ".repeat(800);
        assert!(!enc.encode(&text).compressed, "skipped after a run of misses");
        let tries: Vec<bool> = (0..SMALL_RETRY + 1).map(|_| enc.encode(&text).compressed).collect();
        assert!(tries.iter().any(|c| *c), "retried within {SMALL_RETRY} extents");
        assert!(enc.encode(&text).compressed, "compressed again once one did");
    }

    /// A small extent that shrinks by 9 % travels plain and counts as a miss; one that
    /// shrinks by far more is compressed. A large one that shrinks by 9 % is compressed.
    #[test]
    fn small_extents_must_gain_an_eighth() {
        let mut x = 7u64;
        let mut nearly_random = |len: usize| -> Vec<u8> {
            let mut v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // The last tenth zeroes: about 9-10 % to gain.
            v[len - len / 10..].fill(0);
            v
        };
        let mut enc = Encoder::new();
        let small = nearly_random(4096);
        let e = enc.encode(&small);
        assert!(!e.compressed && e.payload == small, "a 9 % gain on 4 KiB is not worth it");
        assert_eq!(enc.misses, 1);
        assert!(enc.encode(&b"tern ".repeat(800)).compressed);
        assert_eq!(enc.misses, 0);
        let large: Vec<u8> = (0..PROBE_MIN * 2 / 4096).flat_map(|_| nearly_random(4096)).collect();
        let e = enc.encode(&large);
        assert!(e.compressed && e.payload.len() < large.len() * 95 / 100, "{}", e.payload.len());
    }

    #[test]
    fn round_trip_and_reject() {
        let data = vec![7u8; 65536];
        let mut enc = Encoder::new();
        let e = enc.encode(&data);
        assert!(e.compressed && e.payload.len() < 1000);
        let mut dec = Decoder::new();
        assert_eq!(dec.decode(true, &e.payload, data.len(), &e.digest).unwrap(), data);
        let wrong = Digest::of(b"other");
        assert!(matches!(
            dec.decode(true, &e.payload, data.len(), &wrong),
            Err(CodecError::DigestMismatch { .. })
        ));
        assert!(matches!(
            dec.decode(true, &e.payload[..e.payload.len() / 2], data.len(), &e.digest),
            Err(CodecError::CorruptPayload { .. })
        ));
    }

    /// The probe sends random extents plain, and does not stop an extent from being
    /// compressed when only one of its probed pages is random.
    #[test]
    fn large_extents_are_probed_before_they_are_compressed() {
        let mut random = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"probe").finalize_xof().fill(&mut random);
        let mut enc = Encoder::new();
        assert!(!enc.encode(&random).compressed);
        let mut mixed = vec![b'a'; 1 << 20];
        mixed[..4096].copy_from_slice(&random[..4096]);
        let e = enc.encode(&mixed);
        assert!(e.compressed && e.payload.len() < 64 * 1024, "{}", e.payload.len());
        let mut tail_random = vec![b'b'; 1 << 20];
        tail_random[1 << 19..].copy_from_slice(&random[1 << 19..]);
        let e = enc.encode(&tail_random);
        assert!(e.compressed && e.payload.len() < (1 << 19) + 64 * 1024, "half of it compresses");
        for d in [&random, &mixed, &tail_random] {
            let e = enc.encode(d);
            assert_eq!(&Decoder::new().decode(e.compressed, &e.payload, d.len(), &e.digest).unwrap(), d);
        }
    }

    #[test]
    fn incompressible_data_travels_plain() {
        let mut data = vec![0u8; 4096];
        blake3::Hasher::new().update(b"incompressible").finalize_xof().fill(&mut data);
        let e = Encoder::new().encode(&data);
        assert!(!e.compressed, "random bytes do not compress");
        assert_eq!(e.payload, data);
        assert_eq!(Decoder::new().decode(e.compressed, &e.payload, 4096, &e.digest).unwrap(), data);
    }
}
