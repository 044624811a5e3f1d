//! The append-only journal of one disk: numbered segment files of self-describing records.

use crate::StoreError;
use crate::durable::{create_dir_durable, io_err, sync_dir};
use crate::format::{
    FLAG_DIGEST_COVERS, FLAG_ZSTD, MAX_RECORD_LEN, RECORD_HEADER_LEN, RecordHeader, RecordKind,
    SEGMENT_HEADER_LEN, TimeRuns, decode_segment_header, encode_segment_header,
};
use crate::written::{Ranges, Written};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tern_core::codec::{CodecError, Decoder};
use tern_core::{Digest, Seq};

/// A segment is closed and a new one started once it passes this size.
pub const SEGMENT_TARGET_BYTES: u64 = 256 << 20;

/// The active segment's checked length is noted (`checkpoint`) each time it has grown by
/// this much: opening the journal checks only what follows.
const CHECKPOINT_EVERY: u64 = 16 << 20;
const CHECKPOINT_MAGIC: &[u8; 8] = b"TRNCKPT\0";
const CHECKPOINT_LEN: usize = 72;
/// Synced journal bytes dropped from the page cache at a time.
const DROP_CACHE_EVERY: u64 = 8 << 20;

/// One record, as it arrives from a sender or is read back from a segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u32,
    pub digest: Digest,
    pub compressed: bool,
    pub payload: bytes::Bytes,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("kind", &self.kind)
            .field("offset", &self.offset)
            .field("length", &self.length)
            .field("payload", &self.payload.len())
            .finish()
    }
}

/// Why an incoming record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordProblem {
    #[error("extent [{offset}, +{length}) lies outside the disk of {size} bytes")]
    OutOfBounds { offset: u64, length: u32, size: u64 },
    #[error("extent length {0} is zero or larger than {MAX_RECORD_LEN}")]
    BadLength(u32),
    #[error("a zero extent carries a payload")]
    ZeroWithPayload,
    #[error("bookmarks and time records are made by the server, not sent")]
    Bookmark,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Checks an incoming record against the disk and its own digest. Costs a decompression
/// and a hash; run it off the async reactor.
pub fn verify_record(dec: &mut Decoder, disk_size: u64, r: &Record) -> Result<(), RecordProblem> {
    check_extent(disk_size, r)?;
    if r.kind == RecordKind::Write {
        dec.check(r.compressed, &r.payload, r.length as usize, &r.digest)?;
    }
    Ok(())
}

fn check_extent(disk_size: u64, r: &Record) -> Result<(), RecordProblem> {
    if r.length == 0 || r.length > MAX_RECORD_LEN {
        return Err(RecordProblem::BadLength(r.length));
    }
    if r.offset.checked_add(u64::from(r.length)).is_none_or(|end| end > disk_size) {
        return Err(RecordProblem::OutOfBounds { offset: r.offset, length: r.length, size: disk_size });
    }
    match r.kind {
        RecordKind::Zero if !r.payload.is_empty() => Err(RecordProblem::ZeroWithPayload),
        RecordKind::Bookmark | RecordKind::Time => Err(RecordProblem::Bookmark),
        _ => Ok(()),
    }
}

/// [`verify_record`], keeping the plain data of a write (`None` for a zero extent).
pub fn decode_record(
    dec: &mut Decoder,
    disk_size: u64,
    r: &Record,
) -> Result<Option<Vec<u8>>, RecordProblem> {
    check_extent(disk_size, r)?;
    match r.kind {
        RecordKind::Write => Ok(Some(dec.decode(r.compressed, &r.payload, r.length as usize, &r.digest)?)),
        _ => Ok(None),
    }
}

#[derive(Clone, Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Bytes known to be durable.
    durable_len: u64,
    /// Where its data records wrote, when this process wrote them all.
    written: Written,
}

/// What opening a journal found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub durable: Seq,
    /// Bytes cut off the end of the last segment (a torn tail); they are kept in a
    /// `.torn` file beside it.
    pub cut_bytes: u64,
}

/// The writer's handle on one disk's journal. One per disk; readers take a
/// [`JournalSnapshot`] and read without it.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    segments: Vec<Segment>,
    active: Option<File>,
    active_len: u64,
    /// The disk bytes the active segment's records write (decompressed): a segment also
    /// closes past twice its target of them, so that folding one into the base image needs
    /// a bounded room however well its records compressed (the space reserve's size).
    active_logical: u64,
    /// The durable end when this process opened the journal: records after it were
    /// appended by this process.
    opened: Seq,
    dir_dirty: bool,
    segment_target: u64,
    written: Seq,
    durable: Seq,
    /// The headers of the records being appended; their payloads are written from where
    /// they are, not copied.
    heads: Vec<[u8; RECORD_HEADER_LEN]>,
    /// Set when an fsync failed: the kernel may have dropped the pages it could not write
    /// and a later fsync would succeed without them, so nothing more is written or called
    /// durable until the journal is opened again (which checks every record).
    failed: Option<String>,
    /// The active segment's length the last checkpoint noted.
    checkpointed: u64,
    /// Where the active segment's pages may still be in the page cache (see `sync_files`).
    cached_from: u64,
    /// Where the last record written starts in the active segment, and its check bytes.
    last_record: (u64, [u8; 16]),
}

/// `DIR/damaged`: `FIRST_SEQ OFFSET` of the first record a read found damaged (bit rot in a
/// closed segment, which opening does not read). The next open cuts the journal there:
/// the bytes from it on, and every later segment, are kept beside it (`.torn-OFFSET`,
/// `.cut`), and the store removes the points past the new end and gives the disk a new
/// epoch, so that its agent resends what is missing.
const DAMAGE_MARK: &str = "damaged";

/// A note that the active segment (the one starting at `first_seq`) holds valid records up
/// to byte `len`, the last numbered `last_seq`, whose header starts at `last_at` with check
/// bytes `last_check`: they were fsynced and checked, so opening the journal checks only
/// what follows. Written without an fsync of its own (a lost or old one only means
/// checking more). It is trusted only when that record is found where it says, so a
/// damaged note, or one left from another segment of the same name, is ignored.
/// `magic (8) | first_seq u64 | len u64 | last_seq u64 | last_at u64 | last_check [16] |
///  check [16]` (check: BLAKE3 of the bytes before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Checkpoint {
    first_seq: u64,
    len: u64,
    last_seq: u64,
    last_at: u64,
    last_check: [u8; 16],
}

impl Checkpoint {
    fn encode(&self) -> [u8; CHECKPOINT_LEN] {
        let mut b = [0u8; CHECKPOINT_LEN];
        b[0..8].copy_from_slice(CHECKPOINT_MAGIC);
        b[8..16].copy_from_slice(&self.first_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.last_seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.last_at.to_le_bytes());
        b[40..56].copy_from_slice(&self.last_check);
        let check = blake3::hash(&b[..56]);
        b[56..72].copy_from_slice(&check.as_bytes()[..16]);
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() != CHECKPOINT_LEN
            || &b[0..8] != CHECKPOINT_MAGIC
            || blake3::hash(&b[..56]).as_bytes()[..16] != b[56..72]
        {
            return None;
        }
        let at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        Some(Checkpoint {
            first_seq: at(8)?,
            len: at(16)?,
            last_seq: at(24)?,
            last_at: at(32)?,
            last_check: b[40..56].try_into().ok()?,
        })
    }

    /// The checkpoint of `dir`, if it is about the segment at `path` (starting at
    /// `first_seq`) and that segment holds the record it names.
    fn read(dir: &Path, path: &Path, first_seq: u64) -> Option<Checkpoint> {
        let c = std::fs::read(dir.join("checkpoint")).ok().as_deref().and_then(Checkpoint::decode)?;
        let f = File::open(path).ok()?;
        let file_len = f.metadata().ok()?.len();
        if c.first_seq != first_seq
            || c.last_at < SEGMENT_HEADER_LEN as u64
            || c.last_at + RECORD_HEADER_LEN as u64 > c.len
            || c.len > file_len
        {
            return None;
        }
        let mut raw = [0u8; RECORD_HEADER_LEN];
        f.read_exact_at(&mut raw, c.last_at).ok()?;
        let h = RecordHeader::decode(&raw)?;
        (h.seq == c.last_seq && raw[64..80] == c.last_check).then_some(c)
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Where a closed segment's written ranges are kept ([`crate::written::encode_file`]).
fn ranges_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.ranges"))
}

/// At open, once the segments are known: the active one grows again, so its ranges are not
/// known, and a file of them (a roll cut short: the next segment's header never became
/// durable, so that segment was removed) would be stale. Files of segments no longer there
/// go too, so that none is ever taken for a later segment of the same name.
fn forget_stale_ranges(dir: &Path, segments: &mut [Segment]) -> Result<(), StoreError> {
    if let Some(seg) = segments.last_mut() {
        seg.written = Written::Unknown;
    }
    let mut removed = false;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(first) =
            name.to_str().and_then(|n| n.strip_suffix(".ranges")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if segments.iter().any(|s| s.first_seq == first && !matches!(s.written, Written::Unknown)) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Removes the ranges file of the segment starting at `first_seq`; whether there was one.
fn remove_ranges(dir: &Path, first_seq: u64) -> Result<bool, StoreError> {
    let path = ranges_path(dir, first_seq);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::Io { path: path.display().to_string(), source: e }),
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, checking every record and cutting a torn tail.
    pub fn open(dir: &Path) -> Result<(Journal, Recovery), StoreError> {
        create_dir_durable(dir)?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(num) = name.strip_suffix(".seg")
                && let Ok(n) = num.parse::<u64>()
            {
                found.push((n, entry.path()));
            }
        }
        found.sort();
        if let Some((first, offset)) = read_damage_mark(dir) {
            cut_at_damage(dir, &mut found, first, offset)?;
        }
        let mut recovery = Recovery::default();
        let mut segments = Vec::new();
        let mut last = Seq(found.first().map_or(0, |(n, _)| n.saturating_sub(1)));
        let count = found.len();
        let firsts: Vec<u64> = found.iter().map(|(n, _)| *n).collect();
        for (i, (first_seq, path)) in found.into_iter().enumerate() {
            let is_last = i + 1 == count;
            if first_seq != last.0 + 1 {
                return Err(StoreError::SegmentCorrupt {
                    path: path.display().to_string(),
                    offset: 0,
                    reason: format!("segment starts at seq {first_seq}, expected {}", last.0 + 1),
                });
            }
            if !is_last {
                // A closed segment was fsynced before the next one began: only its header is
                // checked here (every record is checked again whenever it is read), so that
                // opening a long journal does not read all of it.
                let len = check_closed_segment(&path, first_seq)?;
                last = Seq(firsts[i + 1] - 1);
                let written = std::fs::read(ranges_path(dir, first_seq))
                    .ok()
                    .and_then(|b| crate::written::decode_file(&b, first_seq, len))
                    .map_or(Written::Unknown, Written::Closed);
                segments.push(Segment { first_seq, path, durable_len: len, written });
                continue;
            }
            // Only what follows the checkpoint is checked, when it is about this segment.
            let from = Checkpoint::read(dir, &path, first_seq);
            let scan = scan_segment(&path, first_seq, from)?;
            if scan.bad_at.is_some() && !is_last {
                return Err(StoreError::SegmentCorrupt {
                    path: path.display().to_string(),
                    offset: scan.good_len,
                    reason: "record fails its checksum in a closed segment".into(),
                });
            }
            if let Some(file_len) = scan.bad_at {
                recovery.cut_bytes = file_len - scan.good_len;
                cut_tail(&path, scan.good_len, file_len)?;
            }
            if scan.good_len < SEGMENT_HEADER_LEN as u64 {
                // A segment whose header never became durable holds nothing acked.
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                sync_dir(dir)?;
                continue;
            }
            if scan.last_seq.0 > 0 {
                last = scan.last_seq;
            }
            segments.push(Segment { first_seq, path, durable_len: scan.good_len, written: Written::Unknown });
        }
        forget_stale_ranges(dir, &mut segments)?;
        recovery.durable = last;
        let mut j = Journal {
            dir: dir.to_path_buf(),
            segments,
            active: None,
            active_len: 0,
            active_logical: 0,
            opened: last,
            dir_dirty: false,
            segment_target: SEGMENT_TARGET_BYTES,
            written: last,
            durable: last,
            heads: Vec::new(),
            failed: None,
            checkpointed: 0,
            cached_from: 0,
            last_record: (0, [0; 16]),
        };
        if let Some(seg) = j.segments.last() {
            let f = OpenOptions::new().read(true).write(true).open(&seg.path).map_err(io_err(&seg.path))?;
            j.active_len = seg.durable_len;
            // Not known without reading it: at least its stored bytes.
            j.active_logical = seg.durable_len;
            j.active = Some(f);
            // The next checkpoint comes after the next 16 MiB, once its last record is known.
            j.checkpointed = seg.durable_len;
        }
        Ok((j, recovery))
    }

    /// Notes, durably, that a read found the record at byte `offset` of segment `path`
    /// damaged, so that the next open cuts the journal there (see [`DAMAGE_MARK`]); `known`
    /// is the damage noted before, if any: the earliest is the one kept. Returns the damage
    /// noted: (segment's first seq, offset).
    pub fn note_damage(
        &self,
        path: &str,
        offset: u64,
        known: Option<(u64, u64)>,
        base: Seq,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let p = Path::new(path);
        let first = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|_| p.parent() == Some(self.dir.as_path()))
            .ok_or(StoreError::Invariant("damage noted for a segment of another journal"))?;
        // A segment that holds records the base holds too is not cut: a cut there would
        // end the journal below the base (and the damage may be in a record the base has).
        if first <= base.0 {
            return Ok(known);
        }
        if let Some(k) = known.filter(|k| *k <= (first, offset)) {
            return Ok(Some(k));
        }
        crate::durable::publish(&self.dir.join(DAMAGE_MARK), format!("{first} {offset}\n").as_bytes())?;
        Ok(Some((first, offset)))
    }

    /// Last sequence number that is fsynced.
    pub fn durable(&self) -> Seq {
        self.durable
    }

    /// Total bytes of all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.durable_len).sum::<u64>().max(self.active_len)
    }

    /// Appends records numbered from `first_seq`, which must follow the last written one.
    /// Not durable until [`Journal::sync`] returns. The records must have been verified
    /// (ingest does): a plain write's digest is its payload's check from here on.
    pub fn append(&mut self, first_seq: Seq, records: &[Record]) -> Result<Seq, StoreError> {
        self.check_failed()?;
        if first_seq != self.written.next() {
            return Err(StoreError::SeqGap { expected: self.written.next(), got: first_seq });
        }
        if records.is_empty() {
            return Ok(self.written);
        }
        self.heads.clear();
        for (i, r) in records.iter().enumerate() {
            self.heads.push(header_of(r, first_seq.0 + i as u64));
        }
        self.write_records(first_seq, records)?;
        if let Some(seg) = self.segments.last_mut() {
            for r in records.iter().filter(|r| r.kind.is_data()) {
                seg.written.add(r.offset, r.offset + u64::from(r.length));
                if r.kind == RecordKind::Write {
                    // Zero extents punch holes in the base: they take no room.
                    self.active_logical += u64::from(r.length);
                }
            }
        }
        self.written = Seq(first_seq.0 + records.len() as u64 - 1);
        Ok(self.written)
    }

    /// Appends a bookmark after the last written record.
    pub fn append_bookmark(&mut self, body: &[u8]) -> Result<(), StoreError> {
        self.append_mark(RecordKind::Bookmark, body)
    }

    /// Appends a time record after the last written record (see [`TimeRuns`]).
    pub fn append_times(&mut self, runs: &TimeRuns) -> Result<(), StoreError> {
        self.append_mark(RecordKind::Time, &runs.encode())
    }

    fn append_mark(&mut self, kind: RecordKind, body: &[u8]) -> Result<(), StoreError> {
        self.check_failed()?;
        let r = Record {
            kind,
            offset: 0,
            length: 0,
            digest: Digest::of(body),
            compressed: false,
            payload: bytes::Bytes::copy_from_slice(body),
        };
        self.heads.clear();
        self.heads.push(header_of(&r, self.written.0));
        let next = self.written.next();
        self.write_records(next, std::slice::from_ref(&r))
    }

    /// Writes `records` after their headers in `heads`, in one vectored write per up to
    /// 512 records.
    fn write_records(&mut self, next_seq: Seq, records: &[Record]) -> Result<(), StoreError> {
        // A segment that begins at `next_seq` holds marks only (a bookmark began it, or
        // retention retired the segments before): one of the same name cannot follow it, so
        // it takes these records too, full or not. The next record past them rolls.
        let begins_here = self.segments.last().is_some_and(|s| s.first_seq == next_seq.0);
        if self.active.is_none()
            || (!begins_here
                && (self.active_len >= self.segment_target
                    || self.active_logical >= self.segment_target.saturating_mul(2)))
        {
            self.roll(next_seq)?;
        }
        let Some(seg) = self.segments.last() else { return Err(StoreError::Invariant("no active segment")) };
        let Some(f) = self.active.as_ref() else { return Err(StoreError::Invariant("no active segment")) };
        let mut at = self.active_len;
        let mut last_at = at;
        // Two slices a record, within Linux's IOV_MAX of 1,024 slices a call.
        for (heads, records) in self.heads.chunks(512).zip(records.chunks(512)) {
            let mut slices = Vec::with_capacity(2 * records.len());
            let mut len = 0;
            for (h, r) in heads.iter().zip(records) {
                last_at = at + len;
                slices.push(IoSlice::new(h));
                slices.push(IoSlice::new(&r.payload));
                len += (h.len() + r.payload.len()) as u64;
            }
            if let Err(e) = tern_core::disk::write_all_vectored_at(f, &mut slices, at) {
                // Whole records of this batch may be in the file past its end: they go,
                // so that none is ever read back as following a later, different batch.
                let _ = f.set_len(self.active_len);
                return Err(io_err(&seg.path)(e));
            }
            at += len;
        }
        let mut check = [0u8; 16];
        if let Some(h) = self.heads.last() {
            check.copy_from_slice(&h[64..RECORD_HEADER_LEN]);
        }
        self.last_record = (last_at, check);
        self.active_len = at;
        Ok(())
    }

    fn roll(&mut self, first_seq: Seq) -> Result<(), StoreError> {
        // Close the old segment durably before starting the next.
        if self.active.is_some() {
            self.sync()?;
        }
        // No ranges file may be there for a segment being made (opening and deleting
        // remove them; this is in case one could not be).
        if remove_ranges(&self.dir, first_seq.0)? {
            sync_dir(&self.dir)?;
        }
        let path = self.dir.join(segment_name(first_seq.0));
        let mut f =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        if let Err(e) = f.write_all(&encode_segment_header(first_seq.0)) {
            // A full disk, say: the next roll must be able to create it again.
            let _ = std::fs::remove_file(&path);
            return Err(StoreError::Io { path: path.display().to_string(), source: e });
        }
        if let Some(old) = self.segments.last_mut()
            && matches!(old.written, Written::Open(_))
        {
            old.written.close();
            if let Written::Closed(r) = &old.written {
                // Best effort, no fsync: without it a restarted process reads the headers.
                let b = crate::written::encode_file(old.first_seq, old.durable_len, r);
                if let Err(e) = std::fs::write(ranges_path(&self.dir, old.first_seq), b) {
                    tracing::debug!(dir = %self.dir.display(), error = %e, "a segment's ranges file not written");
                }
            }
        }
        self.segments.push(Segment {
            first_seq: first_seq.0,
            path,
            durable_len: 0,
            written: Written::Open(crate::written::WrittenRanges::new()),
        });
        self.forget_checkpoint();
        self.active = Some(f);
        self.active_len = SEGMENT_HEADER_LEN as u64;
        self.active_logical = 0;
        self.dir_dirty = true;
        Ok(())
    }

    /// Makes everything written durable and returns the durable sequence number.
    pub fn sync(&mut self) -> Result<Seq, StoreError> {
        self.check_failed()?;
        if let Err(e) = self.sync_files() {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        self.durable = self.written;
        if let Some(seg) = self.segments.last()
            && seg.durable_len >= self.checkpointed + CHECKPOINT_EVERY
        {
            let (last_at, last_check) = self.last_record;
            let c = Checkpoint {
                first_seq: seg.first_seq,
                len: seg.durable_len,
                last_seq: self.durable.0,
                last_at,
                last_check,
            };
            // Best effort: without it, opening checks more.
            if let Err(e) = crate::durable::publish_unsynced(&self.dir.join("checkpoint"), &c.encode()) {
                tracing::debug!(dir = %self.dir.display(), error = %e, "journal checkpoint not written");
            }
            self.checkpointed = seg.durable_len;
        }
        Ok(self.durable)
    }

    /// fsyncs the active segment and, after a roll, the directory.
    fn sync_files(&mut self) -> Result<(), StoreError> {
        if let (Some(f), Some(seg)) = (self.active.as_ref(), self.segments.last_mut())
            && seg.durable_len != self.active_len
        {
            crate::failpoint("journal-fsync")?;
            f.sync_data().map_err(io_err(&seg.path))?;
            // Synced pages are clean: they leave the page cache, a sync behind and 8 MiB at
            // a time (pages just written may still sit in the kernel's per-CPU batches),
            // so that a stream of writes does not grow it. On a VM whose free memory goes
            // back to its host, every new page of cache is faulted in again: 1 GiB written
            // and synced took 0.56-3.6 s here, 0.35-0.54 s dropped as it went. Readers
            // read older parts of the journal from the disk.
            if seg.durable_len >= self.cached_from + DROP_CACHE_EVERY {
                let _ = rustix::fs::fadvise(
                    f,
                    self.cached_from,
                    std::num::NonZeroU64::new(seg.durable_len - self.cached_from),
                    rustix::fs::Advice::DontNeed,
                );
                self.cached_from = seg.durable_len & !4095;
            }
            seg.durable_len = self.active_len;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// The checkpoint was about a segment that is no longer the active one: it goes, so
    /// that it can never be taken for a later segment of the same name.
    fn forget_checkpoint(&mut self) {
        let path = self.dir.join("checkpoint");
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "an old journal checkpoint could not be removed");
        }
        self.checkpointed = 0;
        self.cached_from = 0;
        self.dir_dirty = true;
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(reason) => {
                Err(StoreError::JournalFailed { dir: self.dir.display().to_string(), reason: reason.clone() })
            }
            None => Ok(()),
        }
    }

    /// Whether every record after `seq` was appended by this process (none came from
    /// before it opened the journal).
    pub fn appended_here_after(&self, seq: Seq) -> bool {
        self.opened <= seq
    }

    /// Segments are closed once they pass `bytes` (default [`SEGMENT_TARGET_BYTES`]).
    pub fn set_segment_target(&mut self, bytes: u64) {
        self.segment_target = bytes.max(4096);
    }

    /// Numbering continues after `seq` when the journal holds nothing past it (all its
    /// segments were applied to the base and deleted).
    pub fn continue_after(&mut self, seq: Seq) {
        if self.written < seq && self.segments.is_empty() {
            self.written = seq;
            self.durable = seq;
        }
    }

    /// The bytes of the segments a fold up to `seq` would leave: those holding a record
    /// from `seq` on, as [`Journal::delete_segments_through`] keeps them.
    pub fn bytes_kept_after_fold(&self, seq: Seq) -> u64 {
        let n = self.segments.len();
        let len = |i: usize| {
            if i + 1 == n {
                self.segments[i].durable_len.max(self.active_len)
            } else {
                self.segments[i].durable_len
            }
        };
        (0..n).filter(|&i| i + 1 == n || self.segments[i + 1].first_seq > seq.0).map(len).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Deletes the closed segments whose records all have seq < `seq` (already applied to
    /// the base image). The segment holding record `seq` stays, and with it the bookmarks
    /// of the points at `seq` that follow the record there (a catalog rebuild reads them);
    /// [`Journal::retire_folded`] lets it go once those bookmarks are copied.
    /// The active segment is never deleted. Returns how many went.
    pub fn delete_segments_through(&mut self, seq: Seq) -> Result<usize, StoreError> {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments[1].first_seq <= seq.0 {
            let seg = &self.segments[0];
            // The ranges file first: one never outlives its segment, to be taken for a later
            // segment of the same name.
            remove_ranges(&self.dir, seg.first_seq)?;
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            self.segments.remove(0);
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }

    /// Retires the segments the base image holds whole: when the base holds every record
    /// (`base` is the last one written, and durable) and the segments hold an eighth of the
    /// segment size, the journal goes on in a segment that holds only the bookmarks at
    /// `base` (those of the points there, from point `keep_from` on: a catalog rebuild
    /// reads them), and every older segment goes. That segment is a new one, or the active
    /// one when it holds marks only (a bookmark began it); the bookmarks not yet in it are
    /// copied there. Without it, retention never frees a VM's active segment, up to a whole
    /// segment per disk however short its window (W17: a full data directory stalled until
    /// space was added, though every base held everything). Returns how many segments went.
    ///
    /// A crash before the old segments go leaves bookmarks twice, which a rebuild takes
    /// once; after, the last segment alone, whose bookmarks name `base` as their record.
    pub fn retire_folded(&mut self, base: Seq, keep_from: u64) -> Result<usize, StoreError> {
        self.check_failed()?;
        let Some(active) = self.segments.last() else { return Ok(0) };
        // A segment that begins after `base` holds marks only, and stays.
        let marks_only = active.first_seq > base.0;
        let freed: u64 = self.segments[..self.segments.len() - usize::from(marks_only)]
            .iter()
            .map(|s| s.durable_len)
            .sum();
        if base.0 == 0 || self.written != base || self.durable != base || freed < self.segment_target / 8 {
            return Ok(0);
        }
        // The bookmarks only (time records tell when records were written, and those
        // records go), each point's once, those already in a marks-only segment left there.
        let mut found = Vec::new();
        let mut reader = self.snapshot().read_marks(Seq(base.0 - 1), base);
        while let Some(r) = reader.next() {
            let r = r?;
            if r.seq != base || r.record.kind != RecordKind::Bookmark {
                continue;
            }
            let stays = marks_only && reader.position().is_some_and(|p| p.segment == active.first_seq);
            let point = serde_json::from_slice::<crate::format::BookmarkBody>(&r.record.payload)
                .ok()
                .map(|b| b.point);
            found.push((stays, point, r.record.payload));
        }
        let mut seen: std::collections::HashSet<u64> =
            found.iter().filter(|f| f.0).filter_map(|f| f.1).collect();
        let copies: Vec<bytes::Bytes> = found
            .into_iter()
            .filter(|(stays, point, _)| !stays && point.is_none_or(|p| p >= keep_from && seen.insert(p)))
            .map(|f| f.2)
            .collect();
        if !marks_only {
            self.roll(base.next())?;
        }
        for body in &copies {
            self.append_bookmark(body)?;
        }
        self.sync()?;
        crate::failpoint("retire-before-delete")?;
        let old = self.segments.len() - 1;
        for seg in self.segments.drain(..old) {
            remove_ranges(&self.dir, seg.first_seq)?;
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        sync_dir(&self.dir)?;
        Ok(old)
    }

    /// Where a fold of the records `(base, seq]` stops on its way, so that each segment can
    /// go as soon as the base holds it: the first record of each later segment that begins
    /// inside the range (folding to it lets the segment before go), then `seq`.
    pub fn fold_steps(&self, base: Seq, seq: Seq) -> Vec<Seq> {
        let mut steps: Vec<Seq> = self
            .segments
            .iter()
            .skip(1)
            .map(|s| Seq(s.first_seq))
            .filter(|&first| base < first && first < seq)
            .collect();
        steps.push(seq);
        steps
    }

    /// Deletes every segment (a committed failover); numbering goes on after `base`, the
    /// base image's position, exactly as it does when the journal is opened again.
    pub fn delete_all(&mut self, base: Seq) -> Result<(), StoreError> {
        self.sync()?;
        self.active = None;
        for seg in self.segments.drain(..) {
            remove_ranges(&self.dir, seg.first_seq)?;
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        // A damage noted in them went with them.
        let mark = self.dir.join(DAMAGE_MARK);
        match std::fs::remove_file(&mark) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io { path: mark.display().to_string(), source: e }),
        }
        self.active_len = 0;
        self.active_logical = 0;
        self.written = base;
        self.durable = base;
        self.forget_checkpoint();
        sync_dir(&self.dir)
    }

    /// Where the records numbered after `after` wrote, as far as the segments' summaries
    /// tell without reading: the ranges of each segment that begins after `after` and was
    /// written by this process (a superset, see [`crate::written`]), and a view of the
    /// segments left to read headers from (the one holding `after`, and those there before
    /// the journal was opened).
    pub fn written_since(&mut self, after: Seq) -> (Vec<Ranges>, JournalSnapshot) {
        let mut known = Vec::new();
        let mut unread = Vec::new();
        let count = self.segments.len();
        for i in 0..count {
            let last = if i + 1 < count { Seq(self.segments[i + 1].first_seq - 1) } else { self.written };
            if last <= after {
                continue;
            }
            let seg = &mut self.segments[i];
            match seg.written.ranges() {
                Some(r) if seg.first_seq > after.0 => known.push(r),
                _ => unread.push((seg.path.clone(), seg.first_seq, seg.durable_len)),
            }
        }
        (known, JournalSnapshot { segments: unread, durable: self.durable, some_left_out: true })
    }

    /// A view of the durable records for readers.
    pub fn snapshot(&self) -> JournalSnapshot {
        JournalSnapshot {
            segments: self.segments.iter().map(|s| (s.path.clone(), s.first_seq, s.durable_len)).collect(),
            durable: self.durable,
            some_left_out: false,
        }
    }
}

/// The header of `r` numbered `seq`. A plain write's check covers the header alone: its
/// digest, verified on the way in, covers the payload, which is then hashed once, not twice.
fn header_of(r: &Record, seq: u64) -> [u8; RECORD_HEADER_LEN] {
    let mut flags = if r.compressed { FLAG_ZSTD } else { 0 };
    if r.kind == RecordKind::Write && !r.compressed && r.payload.len() == r.length as usize {
        flags |= FLAG_DIGEST_COVERS;
    }
    let h = RecordHeader {
        kind: r.kind,
        flags,
        seq,
        offset: r.offset,
        length: r.length,
        payload_len: u32::try_from(r.payload.len()).unwrap_or(u32::MAX),
        digest: r.digest,
    };
    h.encode(&r.payload)
}

struct Scan {
    good_len: u64,
    last_seq: Seq,
    /// File length, when a bad or partial record follows `good_len`.
    bad_at: Option<u64>,
}

/// Checks a closed segment's header; returns its length.
fn check_closed_segment(path: &Path, first_seq: u64) -> Result<u64, StoreError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    if f.read_exact(&mut head).is_err() || decode_segment_header(&head) != Some(first_seq) {
        return Err(StoreError::SegmentCorrupt {
            path: path.display().to_string(),
            offset: 0,
            reason: "the header of a closed segment is damaged".into(),
        });
    }
    Ok(len)
}

/// Checks the records of the active segment, from `from` (a checkpoint) when given.
fn scan_segment(path: &Path, first_seq: u64, from: Option<Checkpoint>) -> Result<Scan, StoreError> {
    let f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    if r.read_exact(&mut head).is_err() || decode_segment_header(&head) != Some(first_seq) {
        return Ok(Scan { good_len: 0, last_seq: Seq(0), bad_at: Some(file_len) });
    }
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut last = Seq(first_seq - 1);
    if let Some(c) = from.filter(|c| c.len >= pos && c.len <= file_len) {
        r.seek(SeekFrom::Start(c.len)).map_err(io_err(path))?;
        pos = c.len;
        last = Seq(c.last_seq);
    }
    let mut payload = Vec::new();
    loop {
        if pos == file_len {
            return Ok(Scan { good_len: pos, last_seq: last, bad_at: None });
        }
        let mut raw = [0u8; RECORD_HEADER_LEN];
        let ok = r.read_exact(&mut raw).is_ok()
            && match RecordHeader::decode(&raw) {
                Some(h) if h.payload_len <= 2 * MAX_RECORD_LEN => {
                    payload.resize(h.payload_len as usize, 0);
                    let expected_seq = if h.kind.is_mark() { last.0 } else { last.0 + 1 };
                    r.read_exact(&mut payload).is_ok()
                        && RecordHeader::check_matches(&raw, &payload)
                        && h.seq == expected_seq
                        && {
                            last = Seq(h.seq);
                            true
                        }
                }
                _ => false,
            };
        if !ok {
            return Ok(Scan { good_len: pos, last_seq: last, bad_at: Some(file_len) });
        }
        pos += (RECORD_HEADER_LEN + payload.len()) as u64;
    }
}

/// Keeps the bytes past `good_len` in a `.torn` file, then cuts them off.
fn read_damage_mark(dir: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(DAMAGE_MARK)).ok()?;
    let (first, offset) = text.trim().split_once(' ')?;
    Some((first.parse().ok()?, offset.parse().ok()?))
}

/// Cuts the journal at a damage a read noted (see [`DAMAGE_MARK`]): the damaged segment
/// from `offset` on and every later segment are set aside, kept beside it; `found` keeps
/// the segments that remain.
fn cut_at_damage(
    dir: &Path,
    found: &mut Vec<(u64, PathBuf)>,
    first: u64,
    offset: u64,
) -> Result<(), StoreError> {
    let mark = dir.join(DAMAGE_MARK);
    if !found.iter().any(|(n, _)| *n == first) {
        // The segment is gone (folded or deleted since): nothing to cut.
        tracing::warn!(dir = %dir.display(), segment = first, "a damage mark names a segment that is gone; removed");
        std::fs::remove_file(&mark).map_err(io_err(&mark))?;
        return sync_dir(dir);
    }
    let mut kept = Vec::new();
    for (n, path) in found.drain(..) {
        let whole = n > first || (n == first && offset < SEGMENT_HEADER_LEN as u64);
        if whole {
            let aside = path.with_extension("seg.cut");
            std::fs::rename(&path, &aside).map_err(io_err(&path))?;
            tracing::error!(segment = %path.display(), kept_as = %aside.display(),
                "journal cut at a damaged record: a later segment is set aside");
            continue;
        }
        if n == first {
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            if offset < len {
                cut_tail(&path, offset, len)?;
                tracing::error!(segment = %path.display(), offset, "journal cut at a damaged record");
            }
        }
        kept.push((n, path));
    }
    *found = kept;
    sync_dir(dir)?;
    std::fs::remove_file(&mark).map_err(io_err(&mark))?;
    sync_dir(dir)
}

fn cut_tail(path: &Path, good_len: u64, file_len: u64) -> Result<(), StoreError> {
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
    let mut tail = vec![0u8; usize::try_from(file_len - good_len).unwrap_or(0)];
    f.read_exact_at(&mut tail, good_len).map_err(io_err(path))?;
    let torn = path.with_extension(format!("seg.torn-{good_len}"));
    crate::durable::publish(&torn, &tail)?;
    f.set_len(good_len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    tracing::warn!(segment = %path.display(), offset = good_len, bytes = tail.len(),
        "torn tail cut off the journal; the bytes are kept beside it");
    Ok(())
}

/// The durable part of a journal at one moment. Safe to read while the writer appends.
#[derive(Debug, Clone)]
pub struct JournalSnapshot {
    /// Each segment's path, first seq and durable length.
    segments: Vec<(PathBuf, u64, u64)>,
    pub durable: Seq,
    /// Some of the journal's segments are not among these (they were answered without a
    /// read): one segment's end is not the next one's start.
    some_left_out: bool,
}

/// A record read back from a segment, with its sequence number.
#[derive(Debug)]
pub struct StoredRecord {
    pub seq: Seq,
    pub record: Record,
    /// The payload is the plain data and its BLAKE3 was found to be the digest as it was
    /// read (a plain write's check, `FLAG_DIGEST_COVERS`): it needs no decoding.
    pub plain_checked: bool,
}

impl JournalSnapshot {
    /// The first record the journal still holds (`None`: no segment at all).
    pub fn first_seq(&self) -> Option<Seq> {
        self.segments.first().map(|&(_, first, _)| Seq(first))
    }

    /// Reads records with sequence numbers up to `upto` (bookmarks included), in order,
    /// checking each record's checksum.
    pub fn read(&self, upto: Seq) -> JournalReader {
        self.read_range(Seq(0), upto)
    }

    /// Reads records with `after < seq <= upto`, in order. Segments wholly before `after`
    /// are not opened; records before it in the first segment read are skipped unread.
    pub fn read_range(&self, after: Seq, upto: Seq) -> JournalReader {
        // Records numbered after `after` start in the last segment that begins at or before
        // `after + 1` (a segment's records all come before the next segment's first).
        let index = self.segments.iter().rposition(|&(_, first, _)| first <= after.0 + 1).unwrap_or(0);
        self.reader_at(index, None, after, upto)
    }

    /// Goes on from where an earlier reader stopped (see [`JournalReader::position`]),
    /// without reading its segment again from the start.
    pub fn read_from(&self, from: &ReadPosition, upto: Seq) -> JournalReader {
        match self.segments.iter().position(|&(_, first, _)| first == from.segment) {
            Some(index) => self.reader_at(index, Some(from.offset), from.last_seq, upto),
            None => self.read_range(from.last_seq, upto),
        }
    }

    /// A reader of records `after < seq <= upto` from segment `index` (at byte `start_at`
    /// of it, or from its start).
    fn reader_at(&self, index: usize, start_at: Option<u64>, after: Seq, upto: Seq) -> JournalReader {
        JournalReader {
            segments: self.segments.clone(),
            index,
            reader: None,
            after,
            upto,
            pos: 0,
            end: 0,
            start_at,
            last_seq: after,
            mark: start_at.map(|offset| (index, offset)),
            skip: Skip::Nothing,
            seen: None,
            some_left_out: self.some_left_out,
        }
    }

    /// The bookmarks and time records among records `after < seq <= upto`, in order; the
    /// data records between them are skipped unread.
    pub fn read_marks(&self, after: Seq, upto: Seq) -> JournalReader {
        JournalReader { skip: Skip::Data, ..self.read_range(after, upto) }
    }

    /// The records `after < seq <= upto` without their payloads (returned empty, unread):
    /// where each wrote, at the cost of reading headers. A header its check covers alone is
    /// checked; the others (compressed writes, older records) are taken as they read.
    pub fn read_headers(&self, after: Seq, upto: Seq) -> JournalReader {
        JournalReader { skip: Skip::Payloads, ..self.read_range(after, upto) }
    }
}

#[derive(Debug)]
pub struct JournalReader {
    segments: Vec<(PathBuf, u64, u64)>,
    index: usize,
    reader: Option<BufReader<File>>,
    after: Seq,
    upto: Seq,
    pos: u64,
    end: u64,
    /// Where to start in the first segment opened (a resumed read).
    start_at: Option<u64>,
    /// Seq of the last record returned.
    last_seq: Seq,
    /// Segment index and offset just after the last record returned or skipped.
    mark: Option<(usize, u64)>,
    /// What the reader skips unread.
    skip: Skip,
    /// The seq of the last record header read in the open segment, returned or skipped
    /// (`None`: not known, after a resumed read starts mid-segment): the next must follow
    /// it, and a segment's last must come just before the next segment's first.
    seen: Option<u64>,
    /// See [`JournalSnapshot`]'s field.
    some_left_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    Nothing,
    /// Data records: only bookmarks and time records are returned ([`JournalSnapshot::read_marks`]).
    Data,
    /// Every payload ([`JournalSnapshot::read_headers`]).
    Payloads,
}

/// Where a journal reader stopped: just after the record numbered `last_seq`, at byte
/// `offset` of the segment whose first seq is `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPosition {
    pub segment: u64,
    pub offset: u64,
    pub last_seq: Seq,
}

impl JournalReader {
    /// Where this reader stands: after the last record it returned.
    pub fn position(&self) -> Option<ReadPosition> {
        let (index, offset) = self.mark?;
        let &(_, segment, _) = self.segments.get(index)?;
        Some(ReadPosition { segment, offset, last_seq: self.last_seq })
    }
}

impl JournalReader {
    fn next_record(&mut self) -> Result<Option<StoredRecord>, StoreError> {
        loop {
            if self.reader.is_none() {
                let Some((path, _, len)) = self.segments.get(self.index) else { return Ok(None) };
                let mut f = File::open(path).map_err(io_err(path))?;
                match self.start_at.take() {
                    Some(offset) => {
                        f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
                        self.pos = offset;
                    }
                    None => {
                        let mut head = [0u8; SEGMENT_HEADER_LEN];
                        f.read_exact(&mut head).map_err(io_err(path))?;
                        self.pos = SEGMENT_HEADER_LEN as u64;
                        self.seen = Some(self.segments[self.index].1.saturating_sub(1));
                    }
                }
                self.end = *len;
                // Headers alone: a small buffer, so that large payloads are skipped unread.
                let capacity = if self.skip == Skip::Payloads { 64 << 10 } else { 1 << 20 };
                self.reader = Some(BufReader::with_capacity(capacity, f));
            }
            let path = self.segments[self.index].0.clone();
            if self.pos >= self.end {
                // A segment ends just before the next begins: one gone from between them
                // (a data directory restored in part) took records every later point needs;
                // a read that wants none of them goes on, to stop at the next record.
                if let (Some(seen), Some(&(_, next, _))) = (self.seen, self.segments.get(self.index + 1))
                    && seen + 1 != next
                    && seen < self.upto.0
                    && !self.some_left_out
                {
                    return Err(StoreError::SegmentCorrupt {
                        path: path.display().to_string(),
                        offset: self.end,
                        reason: format!(
                            "records {} to {} are missing: this segment ends at record {seen} and the next \
                             one starts at {next} (a segment file is gone)",
                            seen + 1,
                            next.saturating_sub(1)
                        ),
                    });
                }
                self.reader = None;
                self.index += 1;
                self.seen = None;
                continue;
            }
            let Some(r) = self.reader.as_mut() else { continue };
            let corrupt = |offset, reason: &str| StoreError::SegmentCorrupt {
                path: path.display().to_string(),
                offset,
                reason: reason.to_string(),
            };
            let mut raw = [0u8; RECORD_HEADER_LEN];
            r.read_exact(&mut raw).map_err(io_err(&path))?;
            let h = RecordHeader::decode(&raw).ok_or_else(|| corrupt(self.pos, "bad record header"))?;
            // Records are numbered one after another; a mark takes the number of the record
            // before it (as an open checks the active segment, `scan_segment`).
            if let Some(seen) = self.seen {
                let expected = if h.kind.is_mark() { seen } else { seen + 1 };
                if h.seq != expected {
                    return Err(corrupt(
                        self.pos,
                        &format!("record numbered {}, expected {expected}", h.seq),
                    ));
                }
            }
            self.seen = Some(h.seq);
            if h.seq > self.upto.0 {
                // Past the end: this reader is done.
                self.reader = None;
                self.index = self.segments.len();
                return Ok(None);
            }
            if (h.seq <= self.after.0) || (self.skip == Skip::Data && h.kind.is_data()) {
                // Not wanted: skipped without reading (nor checking) its payload.
                r.seek_relative(i64::from(h.payload_len)).map_err(io_err(&path))?;
                self.pos += (RECORD_HEADER_LEN + h.payload_len as usize) as u64;
                self.mark = Some((self.index, self.pos));
                continue;
            }
            let payload = if self.skip == Skip::Payloads {
                if RecordHeader::header_matches(&raw) == Some(false) {
                    return Err(corrupt(self.pos, "record header fails its checksum"));
                }
                r.seek_relative(i64::from(h.payload_len)).map_err(io_err(&path))?;
                None
            } else {
                let mut payload = vec![0u8; h.payload_len as usize];
                r.read_exact(&mut payload).map_err(io_err(&path))?;
                if !RecordHeader::check_matches(&raw, &payload) {
                    return Err(corrupt(self.pos, "record fails its checksum"));
                }
                Some(payload)
            };
            self.pos += (RECORD_HEADER_LEN + h.payload_len as usize) as u64;
            self.last_seq = Seq(h.seq);
            self.mark = Some((self.index, self.pos));
            return Ok(Some(StoredRecord {
                seq: Seq(h.seq),
                // A payload checked against its digest (none without a payload).
                plain_checked: payload.is_some() && h.flags & FLAG_DIGEST_COVERS != 0,
                record: Record {
                    kind: h.kind,
                    offset: h.offset,
                    length: h.length,
                    digest: h.digest,
                    compressed: h.flags & FLAG_ZSTD != 0,
                    payload: payload.map(bytes::Bytes::from).unwrap_or_default(),
                },
            }));
        }
    }
}

impl Iterator for JournalReader {
    type Item = Result<StoredRecord, StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    use crate::test_record as write_rec;

    use crate::incompressible;

    #[test]
    fn append_sync_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec.durable, Seq(0));
        j.append(Seq(1), &[write_rec(&[1; 4096], 0), write_rec(&[2; 4096], 4096)]).unwrap();
        j.append_bookmark(b"{}").unwrap();
        j.append(Seq(3), &[write_rec(&[3; 8192], 0)]).unwrap();
        assert_eq!(j.sync().unwrap(), Seq(3));
        assert!(matches!(j.append(Seq(9), &[write_rec(&[3; 10], 0)]), Err(StoreError::SeqGap { .. })));
        drop(j);
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec, Recovery { durable: Seq(3), cut_bytes: 0 });
        let got: Vec<_> = j.snapshot().read(Seq(2)).map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 3, "two writes and the bookmark after seq 2");
        assert_eq!(got[2].record.kind, RecordKind::Bookmark);
        assert_eq!(j.snapshot().read(Seq(3)).count(), 4);
    }

    /// A segment file gone from the middle of a journal (a data directory restored in part)
    /// leaves no hole in the names an open reads, but every read across it stops there, as
    /// a damaged record would: the records after the gap never pass for the ones before.
    #[test]
    fn a_segment_gone_from_the_middle_stops_every_read_across_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(4096);
        for s in 1..=6 {
            j.append(Seq(s), &[write_rec(&incompressible(s, 8192), 0)]).unwrap();
        }
        j.sync().unwrap();
        assert_eq!(j.segment_count(), 6, "one record per segment");
        drop(j);
        std::fs::remove_file(dir.path().join(segment_name(3))).unwrap();
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec.durable, Seq(6), "an open reads names only");
        let snap = j.snapshot();
        let err = snap.read(Seq(6)).find_map(Result::err).expect("a read across the gap fails");
        match &err {
            StoreError::SegmentCorrupt { path, reason, .. } => {
                assert!(path.ends_with(&segment_name(2)), "{path}");
                assert!(reason.contains("records 3 to 3 are missing"), "{reason}");
            }
            other => panic!("{other}"),
        }
        // Reads before the gap, and after it from the segment past it, still work.
        assert_eq!(snap.read(Seq(2)).collect::<Result<Vec<_>, _>>().unwrap().len(), 2);
        assert_eq!(snap.read_range(Seq(3), Seq(6)).collect::<Result<Vec<_>, _>>().unwrap().len(), 3);
        // A read from a record before the gap to one past it fails, skipped or not.
        assert!(snap.read_range(Seq(1), Seq(5)).any(|r| r.is_err()));
        assert!(snap.read_marks(Seq(0), Seq(6)).any(|r| r.is_err()));
        // A record out of its place inside a closed segment (record 2 copied after record
        // 4, its checksum whole) is found too.
        let seg = |n| dir.path().join(segment_name(n));
        let moved = std::fs::read(seg(2)).unwrap()[SEGMENT_HEADER_LEN..].to_vec();
        let mut four = std::fs::read(seg(4)).unwrap();
        four.extend_from_slice(&moved);
        std::fs::write(seg(4), four).unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        match j.snapshot().read_range(Seq(3), Seq(6)).find_map(Result::err) {
            Some(StoreError::SegmentCorrupt { reason, .. }) => {
                assert!(reason.contains("record numbered 2, expected 5"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A segment of marks only grows past its target rather than roll into one of its own
    /// name (an idle VM's points, one bookmark each, once retention retired its records):
    /// every bookmark and the records after them are taken, and read back after a reopen.
    #[test]
    fn a_segment_of_marks_only_takes_bookmarks_past_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(4096);
        j.append(Seq(1), &[write_rec(&incompressible(1, 8192), 0)]).unwrap();
        for _ in 0..64 {
            j.append_bookmark(&[b'x'; 200]).unwrap();
        }
        assert_eq!(j.segment_count(), 2, "the first bookmark began a segment of marks");
        j.append(Seq(2), &[write_rec(&incompressible(2, 8192), 0)]).unwrap();
        j.append(Seq(3), &[write_rec(&incompressible(3, 4096), 0)]).unwrap();
        j.sync().unwrap();
        assert_eq!(j.segment_count(), 3, "the record after them rolled");
        drop(j);
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec.durable, Seq(3));
        let all: Vec<_> = j.snapshot().read(Seq(3)).map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), 67);
        assert_eq!(all.iter().filter(|r| r.record.kind == RecordKind::Bookmark).count(), 64);
    }

    /// A journal whose records are all in the base goes on in a segment of the kept
    /// bookmarks alone: a new one, or a marks-only one a bookmark began (the bookmarks
    /// before it copied there); pruned points' bookmarks and time records are left behind.
    #[test]
    fn a_folded_journal_keeps_only_the_bookmarks_of_its_kept_points() {
        let bookmark =
            |p: u64| format!(r#"{{"point":{p},"vm":"v","time_ms":0,"consistency":"crash","disks":[]}}"#);
        for marks_only in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            j.set_segment_target(64 << 10);
            j.append(Seq(1), &[write_rec(&incompressible(1, 4096), 0)]).unwrap();
            j.append(Seq(2), &[write_rec(&incompressible(2, 8192), 4096)]).unwrap();
            j.append_bookmark(bookmark(1).as_bytes()).unwrap();
            j.append_times(&TimeRuns::of(1, &[10, 20])).unwrap();
            j.append_bookmark(bookmark(2).as_bytes()).unwrap();
            if marks_only {
                // Point 3 after the third write, in its segment; point 4 begins the next.
                j.append(Seq(3), &[write_rec(&incompressible(3, 8192), 0)]).unwrap();
                j.append_bookmark(bookmark(3).as_bytes()).unwrap();
                j.set_segment_target(16 << 10);
                j.append_bookmark(bookmark(4).as_bytes()).unwrap();
            }
            j.sync().unwrap();
            let base = j.written;
            assert_eq!(j.segment_count(), 1 + usize::from(marks_only));
            assert_eq!(j.retire_folded(Seq(1), 0).unwrap(), 0, "records past the base: nothing goes");
            // Points before 2 are pruned.
            assert_eq!(j.retire_folded(base, 2).unwrap(), 1);
            assert_eq!(j.segment_count(), 1);
            assert_eq!(j.retire_folded(base, 2).unwrap(), 0, "nothing more to retire");
            drop(j);
            let (j, rec) = Journal::open(dir.path()).unwrap();
            assert_eq!(rec.durable, base);
            let marks: Vec<_> = j.snapshot().read(base).map(|r| r.unwrap()).collect();
            let points: Vec<String> =
                marks.iter().map(|r| String::from_utf8(r.record.payload.to_vec()).unwrap()).collect();
            let want = if marks_only { vec![bookmark(4), bookmark(3)] } else { vec![bookmark(2)] };
            assert_eq!(points, want, "marks_only: {marks_only}");
            assert!(marks.iter().all(|r| r.seq == base && r.record.kind == RecordKind::Bookmark));
        }
    }

    /// Records that compress well still close a segment once it holds twice its target of
    /// disk data: folding one segment into the base image takes a bounded room.
    #[test]
    fn a_segment_closes_past_twice_its_target_of_decompressed_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(64 << 10);
        // 64 KiB of a repeated byte compresses to a few dozen bytes.
        for i in 0..8u64 {
            j.append(Seq(i + 1), &[write_rec(&[7; 64 << 10], i * (64 << 10))]).unwrap();
        }
        j.sync().unwrap();
        assert!(j.bytes() < 64 << 10, "stored far under the target: {}", j.bytes());
        assert_eq!(j.segment_count(), 4, "a new segment every 128 KiB of disk data");
    }

    /// Headers alone name the same records as a full read, with no payload; a damaged
    /// header is found, a damaged payload is not read.
    #[test]
    fn headers_are_read_without_their_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for seq in 1..=6u64 {
            let data = incompressible(seq, 4096 * seq as usize);
            j.append(Seq(seq), &[write_rec(&data, seq << 20)]).unwrap();
        }
        j.append_bookmark(b"{}").unwrap();
        j.sync().unwrap();
        let full: Vec<_> = j.snapshot().read_range(Seq(2), Seq(7)).map(|r| r.unwrap()).collect();
        let heads: Vec<_> = j.snapshot().read_headers(Seq(2), Seq(7)).map(|r| r.unwrap()).collect();
        let key =
            |r: &StoredRecord| (r.seq, r.record.kind, r.record.offset, r.record.length, r.record.digest);
        assert_eq!(heads.iter().map(key).collect::<Vec<_>>(), full.iter().map(key).collect::<Vec<_>>());
        assert!(heads.iter().all(|r| r.record.payload.is_empty()));
        assert_eq!(heads.len(), 5);
        // Damage record 4's payload, then record 5's header offset field.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        let mut at = SEGMENT_HEADER_LEN as u64;
        for seq in 1..=5u64 {
            let len = 4096 * seq;
            if seq == 4 {
                f.write_all_at(&[0xEE], at + RECORD_HEADER_LEN as u64 + 7).unwrap();
            }
            if seq == 5 {
                f.write_all_at(&[0xEE], at + 18).unwrap();
            }
            at += RECORD_HEADER_LEN as u64 + len;
        }
        let upto4: Vec<_> = j.snapshot().read_headers(Seq(0), Seq(4)).map(|r| r.unwrap().seq).collect();
        assert_eq!(upto4, [Seq(1), Seq(2), Seq(3), Seq(4)], "a damaged payload is not read");
        assert!(j.snapshot().read_range(Seq(3), Seq(4)).any(|r| r.is_err()), "a full read finds it");
        assert!(j.snapshot().read_headers(Seq(4), Seq(5)).any(|r| r.is_err()), "a damaged header is found");
    }

    /// A closed segment's written ranges are kept beside it: the next open takes them
    /// instead of reading its headers, unless the file is damaged; the active segment's
    /// are never taken from a file (it may grow), and a deleted segment's file goes with it.
    /// A damage mark is taken only for a segment wholly past the base, never cuts a
    /// segment that is gone, and goes with the records when they are all deleted.
    #[test]
    fn a_damage_mark_past_the_base_only_and_never_for_a_gone_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(8192);
        for seq in 1..=10u64 {
            j.append(Seq(seq), &[write_rec(&incompressible(seq, 4096), seq * 8192)]).unwrap();
        }
        j.sync().unwrap();
        let segs: Vec<(u64, String)> =
            j.segments.iter().map(|s| (s.first_seq, s.path.display().to_string())).collect();
        assert!(segs.len() > 2, "{segs:?}");
        let mark = dir.path().join(DAMAGE_MARK);
        // The first segment holds records the base (up to its first record) holds: not noted.
        assert_eq!(j.note_damage(&segs[0].1, 100, None, Seq(segs[0].0)).unwrap(), None);
        assert!(!mark.exists());
        let last = segs.last().unwrap();
        let noted = j.note_damage(&last.1, 4096, None, Seq(0)).unwrap();
        assert_eq!(noted, Some((last.0, 4096)));
        // An earlier damage wins over a later one.
        assert_eq!(j.note_damage(&segs[1].1, 100, noted, Seq(0)).unwrap(), Some((segs[1].0, 100)));
        assert!(mark.exists());
        j.delete_all(Seq(10)).unwrap();
        assert!(!mark.exists(), "the mark goes with the records");
        // A mark for a segment that is gone cuts nothing.
        j.append(Seq(11), &[write_rec(&incompressible(11, 4096), 0)]).unwrap();
        j.sync().unwrap();
        std::fs::write(&mark, "3 100\n").unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable(), Seq(11));
        assert!(!mark.exists());
    }

    #[test]
    fn closed_segments_keep_their_written_ranges_for_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let n = {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            j.set_segment_target(8192);
            for seq in 1..=20u64 {
                j.append(Seq(seq), &[write_rec(&incompressible(seq, 4096), seq * 8192)]).unwrap();
            }
            j.sync().unwrap();
            let (known, unread) = j.written_since(Seq(0));
            assert_eq!((known.len(), unread.segments.len()), (j.segment_count(), 0), "all from memory");
            assert_eq!(&*known[1], &[(3 * 8192, 3 * 8192 + 4096), (4 * 8192, 4 * 8192 + 4096)]);
            // Records after 3: the segment holding 3 (and 4) is read, later ones answer
            // from memory, earlier ones not at all.
            let (known, unread) = j.written_since(Seq(3));
            assert_eq!((known.len(), unread.segments.len()), (j.segment_count() - 2, 1));
            j.segment_count()
        };
        let ranges_files = || {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ranges"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(ranges_files().len(), n - 1, "one per closed segment");
        {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            let (known, unread) = j.written_since(Seq(0));
            assert_eq!((known.len(), unread.segments.len()), (n - 1, 1), "only the active one is read");
            assert_eq!(&*known[1], &[(3 * 8192, 3 * 8192 + 4096), (4 * 8192, 4 * 8192 + 4096)]);
        }
        // A damaged file is not taken; a deleted segment's file goes.
        let second = dir.path().join(&ranges_files()[1]);
        let mut b = std::fs::read(&second).unwrap();
        b[40] ^= 1;
        std::fs::write(&second, b).unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.written_since(Seq(0)).1.segments.len(), 2);
        j.delete_segments_through(Seq(5)).unwrap();
        assert_eq!(ranges_files().len(), j.segment_count() - 1);
        j.delete_all(Seq(20)).unwrap();
        assert!(ranges_files().is_empty());
    }

    /// A roll cut short (the next segment's header never made durable: the file gone, or
    /// there but empty) leaves a closed segment's ranges file beside what is again the
    /// active segment, which then grows: that file is never taken for it, then or once it
    /// is closed again.
    #[test]
    fn a_segment_active_again_after_a_cut_short_roll_is_read_not_taken_from_its_file() {
        for emptied in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (mut j, _) = Journal::open(dir.path()).unwrap();
                j.set_segment_target(8192);
                for seq in 1..=5u64 {
                    j.append(Seq(seq), &[write_rec(&incompressible(seq, 4096), seq * 8192)]).unwrap();
                }
                j.sync().unwrap();
            }
            // Segments 1-2, 3-4 (closed, with their files) and 5, which goes.
            let five = dir.path().join(segment_name(5));
            if emptied {
                File::create(&five).unwrap();
            } else {
                std::fs::remove_file(&five).unwrap();
            }
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            assert_eq!(j.durable(), Seq(4));
            assert_eq!(j.written_since(Seq(2)).1.segments.len(), 1, "3-4 is read");
            j.set_segment_target(1 << 20);
            j.append(Seq(5), &[write_rec(&incompressible(5, 4096), 1 << 30)]).unwrap(); // into 3-5
            j.set_segment_target(8192);
            j.append(Seq(6), &[write_rec(&incompressible(6, 4096), 6 * 8192)]).unwrap(); // a new one
            j.sync().unwrap();
            let (known, unread) = j.written_since(Seq(2));
            assert_eq!((known.len(), unread.segments.len()), (1, 1), "3-5 is read, 6 known");
            drop(j);
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            let (_, unread) = j.written_since(Seq(2));
            assert_eq!(unread.segments.len(), 2, "3-5 is read again, as is the active one");
            let heads: Vec<u64> =
                unread.read_headers(Seq(2), Seq(6)).map(|r| r.unwrap().record.offset).collect();
            assert_eq!(heads, [3 * 8192, 4 * 8192, 1 << 30, 6 * 8192], "emptied: {emptied}");
        }
    }

    /// A ranges file is taken only for a segment of the length it names.
    #[test]
    fn a_ranges_file_of_another_length_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            j.set_segment_target(8192);
            for seq in 1..=6u64 {
                j.append(Seq(seq), &[write_rec(&incompressible(seq, 4096), seq * 8192)]).unwrap();
            }
            j.sync().unwrap();
        }
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.written_since(Seq(0)).1.segments.len(), 1, "only the active one is read");
        drop(j);
        let three = dir.path().join(segment_name(3));
        let f = OpenOptions::new().write(true).open(&three).unwrap();
        f.set_len(f.metadata().unwrap().len() - 100).unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let unread: Vec<u64> = j.written_since(Seq(0)).1.segments.iter().map(|s| s.1).collect();
        assert_eq!(unread, [3, 5]);
    }

    #[test]
    fn ranges_skip_earlier_segments_and_a_read_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(8192);
        for seq in 1..=20u64 {
            let data = incompressible(seq, 4096);
            j.append(Seq(seq), &[write_rec(&data, seq * 4096)]).unwrap();
            if seq % 5 == 0 {
                j.append_bookmark(b"{}").unwrap();
            }
        }
        j.sync().unwrap();
        assert!(j.segment_count() > 3);
        let seqs = |r: JournalReader| -> Vec<(u64, bool)> {
            r.map(|x| x.unwrap()).map(|x| (x.seq.0, x.record.kind == RecordKind::Bookmark)).collect()
        };
        let all = seqs(j.snapshot().read(Seq(20)));
        for after in 0..20u64 {
            let want: Vec<_> = all.iter().copied().filter(|&(s, _)| s > after).collect();
            assert_eq!(seqs(j.snapshot().read_range(Seq(after), Seq(20))), want, "after {after}");
        }
        // Read up to 12, then go on from there after more records arrived.
        let mut r = j.snapshot().read_range(Seq(3), Seq(12));
        let first: Vec<_> = r.by_ref().map(|x| x.unwrap().seq.0).collect();
        assert_eq!(first.first(), Some(&4));
        assert_eq!(first.last(), Some(&12));
        let at = r.position().unwrap();
        assert_eq!(at.last_seq, Seq(12));
        j.append(Seq(21), &[write_rec(&[21; 4096], 0)]).unwrap();
        j.sync().unwrap();
        let rest = seqs(j.snapshot().read_from(&at, Seq(21)));
        let want: Vec<_> = all.iter().copied().filter(|&(s, _)| s > 12).chain([(21, false)]).collect();
        assert_eq!(rest, want);
    }

    /// After a failed fsync nothing more is written or called durable (a later fsync could
    /// succeed without the pages the kernel dropped); opening the journal again checks it
    /// and goes on from what is really there.
    #[test]
    fn a_failed_fsync_stops_the_journal_until_it_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(Seq(1), &[write_rec(&[1; 4096], 0)]).unwrap();
        assert_eq!(j.sync().unwrap(), Seq(1));
        j.append(Seq(2), &[write_rec(&[2; 4096], 4096)]).unwrap();
        crate::set_failpoint(Some("journal-fsync"));
        assert!(matches!(j.sync(), Err(StoreError::Injected(_))));
        crate::set_failpoint(None);
        assert_eq!(j.durable(), Seq(1));
        let again = j.sync().unwrap_err().to_string();
        assert!(again.contains("could not be made durable") && again.contains("restart"), "{again}");
        assert!(matches!(
            j.append(Seq(3), &[write_rec(&[3; 4096], 0)]),
            Err(StoreError::JournalFailed { .. })
        ));
        assert_eq!(j.durable(), Seq(1));
        drop(j);
        let (mut j, rec) = Journal::open(dir.path()).unwrap();
        // Record 2 reached the file here (only the fsync was made to fail): it is checked
        // and kept; on real storage it might be cut, and the sender would resend it.
        assert_eq!(rec.durable, Seq(2));
        j.append(Seq(3), &[write_rec(&[3; 4096], 0)]).unwrap();
        assert_eq!(j.sync().unwrap(), Seq(3));
    }

    /// Opening checks the active segment only past its checkpoint; a torn record after
    /// it is still cut, and a checkpoint that does not match the segment is ignored.
    #[test]
    fn opening_checks_only_what_follows_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for i in 0..24u64 {
            j.append(Seq(i + 1), &[write_rec(&incompressible(i, 1 << 20), 0)]).unwrap();
            j.sync().unwrap();
        }
        drop(j);
        let seg = dir.path().join(segment_name(1));
        let c = Checkpoint::read(dir.path(), &seg, 1).expect("a checkpoint of the active segment");
        assert!(c.len >= CHECKPOINT_EVERY && (16..24).contains(&c.last_seq), "{c:?}");
        // Damage before the checkpoint is not read at open (readers find it), damage after
        // it is: record 2's payload and the last record's tail.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        let record = (RECORD_HEADER_LEN + (1 << 20)) as u64;
        f.write_all_at(b"rot", SEGMENT_HEADER_LEN as u64 + record + 500).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 100).unwrap();
        drop(f);
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!((rec.durable, rec.cut_bytes), (Seq(23), record - 100), "the torn last record is cut");
        assert!(j.snapshot().read(Seq(23)).any(|r| r.is_err()), "record 2's damage shows on read");
        drop(j);
        // A checkpoint whose record is not where it says (another segment of the same name,
        // say) is ignored: the whole segment is checked, and the cut comes at record 2.
        let wrong = Checkpoint { last_check: [7; 16], ..c };
        std::fs::write(dir.path().join("checkpoint"), wrong.encode()).unwrap();
        let (_, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec.durable, Seq(1));
        std::fs::write(dir.path().join("checkpoint"), b"garbage").unwrap();
        assert_eq!(Journal::open(dir.path()).unwrap().1.durable, Seq(1));
        // A checkpoint goes with its segment: a later segment of the same name (after a
        // committed failover, say) never finds it.
        std::fs::write(dir.path().join("checkpoint"), c.encode()).unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.delete_all(Seq(0)).unwrap();
        assert!(!dir.path().join("checkpoint").exists());
    }

    #[test]
    fn torn_tail_is_cut_at_open_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(Seq(1), &[write_rec(&[1; 4096], 0)]).unwrap();
        j.sync().unwrap();
        j.append(Seq(2), &[write_rec(&[7; 65536], 0)]).unwrap();
        j.sync().unwrap();
        let seg = dir.path().join(segment_name(1));
        let len = std::fs::metadata(&seg).unwrap().len();
        drop(j);
        // A crash in the middle of the second record's write.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 10).unwrap();
        let (mut j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec.durable, Seq(1));
        assert!(rec.cut_bytes > 0);
        assert!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .any(|e| { e.unwrap().file_name().to_string_lossy().contains("torn") })
        );
        // The sender resends seq 2 and the journal goes on.
        j.append(Seq(2), &[write_rec(&[8; 4096], 0)]).unwrap();
        assert_eq!(j.sync().unwrap(), Seq(2));
        let recs: Vec<_> = j.snapshot().read(Seq(2)).map(|r| r.unwrap()).collect();
        assert_eq!(recs.len(), 2);
    }

    /// A plain write is hashed once on its way in: its check covers the header, its digest
    /// the payload. A plain record whose check covers the payload too (a journal written
    /// before) still reads, and damage to either payload is found.
    #[test]
    fn a_plain_write_is_covered_by_its_digest_and_older_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let data = incompressible(1, 8192);
        let r = write_rec(&data, 0);
        assert!(!r.compressed);
        j.append(Seq(1), &[r]).unwrap();
        j.sync().unwrap();
        drop(j);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let raw: [u8; RECORD_HEADER_LEN] =
            bytes[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + RECORD_HEADER_LEN].try_into().unwrap();
        assert_eq!(raw[5], FLAG_DIGEST_COVERS);
        let mut older = RecordHeader::decode(&raw).unwrap();
        older.flags = 0;
        older.seq = 2;
        older.offset = 8192;
        bytes.extend_from_slice(&older.encode(&data));
        bytes.extend_from_slice(&data);
        std::fs::write(&seg, &bytes).unwrap();
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!((rec.durable, rec.cut_bytes), (Seq(2), 0));
        let recs: Vec<_> = j.snapshot().read(Seq(2)).map(|r| r.unwrap()).collect();
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|r| r.record.payload == data && !r.record.compressed));
        drop(j);
        for at in [SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 9, bytes.len() - 9] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            std::fs::write(&seg, &damaged).unwrap();
            let snap = JournalSnapshot {
                segments: vec![(seg.clone(), 1, bytes.len() as u64)],
                durable: Seq(2),
                some_left_out: false,
            };
            assert!(snap.read(Seq(2)).any(|r| r.is_err()), "damage at {at} is found");
        }
    }

    #[test]
    fn corrupt_record_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(Seq(1), &[write_rec(&[1; 4096], 0), write_rec(&[2; 4096], 4096)]).unwrap();
        j.sync().unwrap();
        let snap = j.snapshot();
        drop(j);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 2; // inside the first payload
        bytes[at] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let err = snap.read(Seq(2)).next().unwrap().unwrap_err();
        assert!(matches!(err, StoreError::SegmentCorrupt { .. }), "{err}");
    }

    #[test]
    fn a_closed_segment_is_not_read_at_open_and_its_damage_shows_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_target(4096);
        for seq in 1..=3u64 {
            let data = incompressible(seq, 8192);
            j.append(Seq(seq), &[write_rec(&data, 0)]).unwrap();
        }
        j.sync().unwrap();
        assert_eq!(j.segment_count(), 3);
        drop(j);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 2] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let (j, rec) = Journal::open(dir.path()).unwrap();
        assert_eq!(rec, Recovery { durable: Seq(3), cut_bytes: 0 }, "nothing is cut from a closed segment");
        let err = j.snapshot().read(Seq(3)).next().unwrap().unwrap_err();
        assert!(matches!(err, StoreError::SegmentCorrupt { .. }), "{err}");
        assert_eq!(j.snapshot().read_range(Seq(1), Seq(3)).count(), 2, "later segments read fine");
        // A damaged header of a closed segment stops the open.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        assert!(matches!(Journal::open(dir.path()), Err(StoreError::SegmentCorrupt { .. })));
    }

    #[test]
    fn verify_rejects_digest_mismatch_and_bounds() {
        let mut dec = Decoder::new();
        let mut r = write_rec(&[5; 4096], 0);
        assert!(verify_record(&mut dec, 1 << 20, &r).is_ok());
        r.digest = Digest::of(b"not the data");
        assert!(matches!(
            verify_record(&mut dec, 1 << 20, &r),
            Err(RecordProblem::Codec(CodecError::DigestMismatch { .. }))
        ));
        let r = write_rec(&[5; 4096], (1 << 20) - 100);
        assert!(matches!(verify_record(&mut dec, 1 << 20, &r), Err(RecordProblem::OutOfBounds { .. })));
    }
}
