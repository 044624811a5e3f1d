//! Byte layouts of everything the store writes. `docs/on-disk-format.md` describes the
//! same layouts for people; keep the two in step.
//!
//! All integers are little-endian.

use tern_core::Digest;

/// Segment file header, 32 bytes:
/// `magic "TERNSEG\0" (8) | version u32 | header_len u32 | first_seq u64 | reserved u64`
pub const SEGMENT_MAGIC: &[u8; 8] = b"TERNSEG\0";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;

/// Record header, 80 bytes, followed by `payload_len` bytes of payload:
/// `magic "TRNR" (4) | kind u8 | flags u8 | reserved u16 | seq u64 | offset u64 | length u32 |
///  payload_len u32 | digest [32] | check [16]`
/// `check` is the first 16 bytes of BLAKE3(header bytes 0..64 ‖ payload), or with
/// [`FLAG_DIGEST_COVERS`] (plain writes) of the header alone, the digest covering the
/// payload: it finds torn and corrupt records without decompressing. `digest` is the
/// BLAKE3 of the plain data (write records), of the payload (bookmarks), or zero (zero
/// records).
pub const RECORD_MAGIC: &[u8; 4] = b"TRNR";
pub const RECORD_HEADER_LEN: usize = 80;
/// Largest plain extent one record may carry.
pub const MAX_RECORD_LEN: u32 = 4 << 20;

pub const FLAG_ZSTD: u8 = 1;
/// The payload is the plain data of a write, and its digest (which the record carries)
/// covers it: the check covers the header alone, so a record is hashed once on its way in.
pub const FLAG_DIGEST_COVERS: u8 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RecordKind {
    /// Plain data for `[offset, offset+length)`, zstd-compressed when `FLAG_ZSTD` is set.
    Write = 1,
    /// `[offset, offset+length)` is zeroes; no payload.
    Zero = 2,
    /// A recovery point: JSON payload (see `BookmarkBody`); `seq` is the last record it covers.
    Bookmark = 3,
    /// When the source wrote the records before it (see [`TimeRuns`]); `seq` is the last
    /// record it covers, like a bookmark's.
    Time = 4,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::Bookmark),
            4 => Some(RecordKind::Time),
            _ => None,
        }
    }

    /// True for records that change the disk (writes and zeroed extents).
    pub fn is_data(self) -> bool {
        matches!(self, RecordKind::Write | RecordKind::Zero)
    }

    /// True for marks that take no sequence number of their own (bookmarks, times).
    pub fn is_mark(self) -> bool {
        !self.is_data()
    }
}

/// The payload of a time record: records `first..=runs[0].0` were written by the source
/// at Unix millisecond `runs[0].1`, the records after them up to `runs[1].0` at `runs[1].1`,
/// and so on. Times never go down. `first u64 | n × (last_seq u64 | time_ms i64)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeRuns {
    pub first: u64,
    pub runs: Vec<(u64, i64)>,
}

impl TimeRuns {
    /// The runs of records `first, first+1, ...` written at `times` (one per record).
    pub fn of(first: u64, times: &[i64]) -> TimeRuns {
        let mut runs: Vec<(u64, i64)> = Vec::new();
        for (i, &t) in times.iter().enumerate() {
            let seq = first + i as u64;
            match runs.last_mut() {
                Some(last) if last.1 == t => last.0 = seq,
                _ => runs.push((seq, t)),
            }
        }
        TimeRuns { first, runs }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.runs.len());
        b.extend_from_slice(&self.first.to_le_bytes());
        for (seq, t) in &self.runs {
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// `None` when the payload is not a well-formed list of runs.
    pub fn decode(b: &[u8]) -> Option<TimeRuns> {
        if b.len() < 8 || !(b.len() - 8).is_multiple_of(16) {
            return None;
        }
        let first = u64::from_le_bytes(b[0..8].try_into().ok()?);
        let mut runs = Vec::with_capacity((b.len() - 8) / 16);
        let mut prev = (first.checked_sub(1)?, i64::MIN);
        for c in b[8..].chunks_exact(16) {
            let seq = u64::from_le_bytes(c[0..8].try_into().ok()?);
            let t = i64::from_le_bytes(c[8..16].try_into().ok()?);
            if seq <= prev.0 || t < prev.1 {
                return None;
            }
            runs.push((seq, t));
            prev = (seq, t);
        }
        Some(TimeRuns { first, runs })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u8,
    pub seq: u64,
    pub offset: u64,
    pub length: u32,
    pub payload_len: u32,
    pub digest: Digest,
}

impl RecordHeader {
    /// Encodes the header; `check` covers the header's first 64 bytes and the payload, or
    /// with [`FLAG_DIGEST_COVERS`] the header alone (the digest covers the payload).
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(RECORD_MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..64].copy_from_slice(&self.digest.0);
        let covered: &[u8] = if self.flags & FLAG_DIGEST_COVERS != 0 { &[] } else { payload };
        let check = check_of(&b[..64], covered);
        b[64..80].copy_from_slice(&check);
        b
    }

    /// Decodes a header; `None` when the magic or kind is wrong.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Option<RecordHeader> {
        if &b[0..4] != RECORD_MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Some(RecordHeader {
            kind: RecordKind::from_u8(b[4])?,
            flags: b[5],
            seq: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
            payload_len: u32_at(28),
            digest: Digest::from_slice(&b[32..64])?,
        })
    }

    /// True when the stored check matches the header and payload.
    pub fn check_matches(raw: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> bool {
        if raw[5] & FLAG_DIGEST_COVERS == 0 {
            return check_of(&raw[..64], payload) == raw[64..80];
        }
        check_of(&raw[..64], &[]) == raw[64..80]
            && u32::from_le_bytes([raw[24], raw[25], raw[26], raw[27]]) as usize == payload.len()
            && blake3::hash(payload).as_bytes()[..] == raw[32..64]
    }

    /// For a record whose check covers its header alone ([`FLAG_DIGEST_COVERS`]): whether
    /// the header is intact, its payload unread. `None` when the check covers the payload too.
    pub fn header_matches(raw: &[u8; RECORD_HEADER_LEN]) -> Option<bool> {
        (raw[5] & FLAG_DIGEST_COVERS != 0).then(|| check_of(&raw[..64], &[]) == raw[64..80])
    }
}

fn check_of(head: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(SEGMENT_MAGIC);
    b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&32u32.to_le_bytes());
    b[16..24].copy_from_slice(&first_seq.to_le_bytes());
    b
}

/// Returns the first sequence number, or `None` when this is not a segment header we read.
pub fn decode_segment_header(b: &[u8; SEGMENT_HEADER_LEN]) -> Option<u64> {
    if &b[0..8] != SEGMENT_MAGIC || b[8..12] != SEGMENT_VERSION.to_le_bytes() {
        return None;
    }
    Some(u64::from_le_bytes(b[16..24].try_into().ok()?))
}

/// The payload of a bookmark record: enough to rebuild the point's catalog rows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BookmarkBody {
    pub point: u64,
    pub vm: String,
    pub time_ms: i64,
    pub consistency: String,
    pub disks: Vec<BookmarkDisk>,
    /// A multi-VM point: its replication group (absent for a VM's own point).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BookmarkDisk {
    pub disk: String,
    pub seq: u64,
    pub fingerprint: String,
}

/// Fixed VHD footer (512 bytes, big-endian), as Hyper-V and Azure managed disks take it.
pub const VHD_FOOTER_LEN: usize = 512;

pub fn vhd_footer(size: u64, unique_id: [u8; 16], seconds_since_2000: u32) -> [u8; VHD_FOOTER_LEN] {
    let mut f = [0u8; VHD_FOOTER_LEN];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none (fixed disk)
    f[24..28].copy_from_slice(&seconds_since_2000.to_be_bytes());
    // "win " makes readers (qemu among them) take the size from the footer, not from CHS.
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = vhd_geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
    f[68..84].copy_from_slice(&unique_id);
    let sum: u32 = f.iter().map(|&b| u32::from(b)).sum();
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// CHS geometry as the VHD specification computes it.
fn vhd_geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    total = cth / heads;
    (
        u16::try_from(total).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(16),
        u8::try_from(spt).unwrap_or(255),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trips_and_checks() {
        let h = RecordHeader {
            kind: RecordKind::Write,
            flags: FLAG_ZSTD,
            seq: 9,
            offset: 4096,
            length: 8192,
            payload_len: 3,
            digest: Digest::of(b"x"),
        };
        let raw = h.encode(b"abc");
        assert_eq!(RecordHeader::decode(&raw), Some(h));
        assert!(RecordHeader::check_matches(&raw, b"abc"));
        assert!(!RecordHeader::check_matches(&raw, b"abd"));
    }

    #[test]
    fn vhd_footer_checksum() {
        let f = vhd_footer(64 << 20, [1; 16], 0);
        let stored = u32::from_be_bytes(f[64..68].try_into().unwrap());
        let mut z = f;
        z[64..68].fill(0);
        let sum: u32 = z.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(stored, !sum);
    }
}
