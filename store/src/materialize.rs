//! Materialisation: the disk as of a point, written out as a sparse raw image or a fixed
//! VHD, checked against the point's fingerprint while it is written.

use crate::durable::{io_err, publish_file};
use crate::format::{RecordKind, vhd_footer};
use crate::journal::JournalSnapshot;
use crate::zero_subtrees::{UNIT, ZeroSubtrees};
use crate::{DiskHandle, StoreError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tern_core::blocks::{BLOCK_SIZE, Fingerprint, is_zero};
use tern_core::codec::Decoder;
use tern_core::disk::{AlignedBuf, DiskReader};
use tern_core::{Digest, Seq};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Vhd,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
        }
    }
}

/// One written disk, as `vm.json` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutputDisk {
    pub name: String,
    pub file: String,
    /// `raw` or `vhd`.
    pub format: &'static str,
    /// The disk's size: `blake3` and `fingerprint` cover these bytes.
    pub size: u64,
    /// The size the output presents: for VHD the disk padded with zeroes to a whole MiB
    /// (what cloud managed disks take); the footer follows it.
    pub virtual_size: u64,
    /// BLAKE3 of the disk's contents (its first `size` bytes; not the padding or footer).
    pub blake3: String,
    pub fingerprint: String,
    /// The disk's last journal record written out.
    pub seq: u64,
}

/// A VHD's virtual size: the disk padded with zeroes to a whole MiB, as cloud managed
/// disks require (and qemu needs whole 512-byte sectors).
pub fn vhd_virtual_size(size: u64) -> u64 {
    size.next_multiple_of(1 << 20)
}

/// A fresh random (version 4) UUID for a VHD's unique id: every export is a new disk.
fn random_uuid() -> Result<[u8; 16], StoreError> {
    use std::io::Read;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(io_err(Path::new("/dev/urandom")))?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

const COPY_CHUNK: usize = 1 << 20;

/// Writes `disk` as of `upto` to `path` and checks its fingerprint (when `expected` is
/// given). `progress` gets the bytes done so far. The file appears at `path` only when
/// complete and fsynced. The journal is read as it is once the disk's read lock is held:
/// retention may have replaced its segments before (see `Journal::retire_folded`).
#[allow(clippy::too_many_arguments)]
pub fn materialize_disk(
    disk: &DiskHandle,
    upto: Seq,
    expected: Option<Digest>,
    path: &Path,
    format: Format,
    zeroes: &ZeroSubtrees,
    progress: &mut dyn FnMut(u64),
) -> Result<OutputDisk, StoreError> {
    let _reading = disk.read_lock();
    let snapshot = &disk.journal().snapshot();
    if upto > snapshot.durable {
        return Err(StoreError::PointBeyondDurable {
            disk: disk.name.to_string(),
            seq: upto,
            durable: snapshot.durable,
        });
    }
    if upto < disk.base_seq() {
        return Err(StoreError::Invariant("point is behind the base image"));
    }
    let tmp = PathBuf::from(format!("{}.partial", path.display()));
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let virtual_size = if format == Format::Vhd { vhd_virtual_size(disk.size) } else { disk.size };
    out.set_len(virtual_size).map_err(io_err(&tmp))?;
    let result = fill(disk, snapshot, upto, &out, &tmp, progress).and_then(|()| {
        let (content, fingerprint) = hash_output(disk.size, &tmp, zeroes)?;
        if let Some(expected) = expected
            && fingerprint != expected
        {
            return Err(StoreError::FingerprintMismatch {
                disk: disk.name.to_string(),
                expected,
                actual: fingerprint,
            });
        }
        if format == Format::Vhd {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs().saturating_sub(946_684_800));
            let footer = vhd_footer(virtual_size, random_uuid()?, u32::try_from(secs).unwrap_or(0));
            out.write_all_at(&footer, virtual_size).map_err(io_err(&tmp))?;
        }
        out.sync_all().map_err(io_err(&tmp))?;
        Ok((content, fingerprint))
    });
    match result {
        Ok((content, fingerprint)) => {
            drop(out);
            publish_file(&tmp, path)?;
            Ok(OutputDisk {
                name: disk.name.to_string(),
                file: path.display().to_string(),
                format: format.extension(),
                size: disk.size,
                virtual_size,
                blake3: content.to_hex(),
                fingerprint: fingerprint.to_hex(),
                seq: upto.0,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn fill(
    disk: &DiskHandle,
    snapshot: &JournalSnapshot,
    upto: Seq,
    out: &File,
    out_path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    // 1. The base image, skipping its holes and zero chunks so the output stays sparse.
    let base = DiskReader::open(&disk.base_path).map_err(io_err(&disk.base_path))?;
    let mut buf = AlignedBuf::new(COPY_CHUNK);
    let mut done = 0u64;
    for (start, end) in tern_core::blocks::data_ranges(base.file(), 0, disk.size) {
        let mut pos = start;
        while pos < end {
            let n = usize::try_from((end - pos).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
            base.read_exact_at(&mut buf[..n], pos).map_err(io_err(&disk.base_path))?;
            if !is_zero(&buf[..n]) {
                out.write_all_at(&buf[..n], pos).map_err(io_err(out_path))?;
            }
            pos += n as u64;
            done += n as u64;
            progress(done);
        }
    }
    // 2. The journal up to the point, every record verified again.
    apply_records(disk, snapshot, disk.base_seq(), upto, out, out_path, &mut |n| progress(done + n))
}

/// Writes the records `after < seq <= upto` onto `out` in order, verifying each one.
/// Replaying a record twice is harmless, so an interrupted apply can simply run again.
pub(crate) fn apply_records(
    disk: &DiskHandle,
    snapshot: &JournalSnapshot,
    after: Seq,
    upto: Seq,
    out: &File,
    out_path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    apply_records_with(disk, snapshot, after, upto, out, out_path, &mut |_, _| Ok(()), progress)
}

/// [`apply_records`], calling `before(offset, length)` ahead of writing each record.
#[allow(clippy::too_many_arguments)]
fn apply_records_with(
    disk: &DiskHandle,
    snapshot: &JournalSnapshot,
    after: Seq,
    upto: Seq,
    out: &File,
    out_path: &Path,
    before: &mut dyn FnMut(u64, u64) -> Result<(), StoreError>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    let mut dec = Decoder::new();
    let zeroes = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    for rec in snapshot.read_range(after, upto) {
        let rec = rec.inspect_err(|e| disk.note_damage(e))?;
        let r = &rec.record;
        if matches!(r.kind, RecordKind::Write | RecordKind::Zero) {
            before(r.offset, u64::from(r.length))?;
        }
        match r.kind {
            RecordKind::Bookmark | RecordKind::Time => continue,
            // Checked as it was read: hashed once, not again by decoding a copy.
            RecordKind::Write if rec.plain_checked => {
                out.write_all_at(&r.payload, r.offset).map_err(io_err(out_path))?;
            }
            RecordKind::Write => {
                let plain =
                    dec.decode(r.compressed, &r.payload, r.length as usize, &r.digest).map_err(|e| {
                        StoreError::JournalRecordBad { disk: disk.name.to_string(), seq: rec.seq, reason: e }
                    })?;
                out.write_all_at(&plain, r.offset).map_err(io_err(out_path))?;
            }
            RecordKind::Zero => zero_range(out, out_path, r.offset, u64::from(r.length), &zeroes)?,
        }
        done += u64::from(r.length);
        progress(done);
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of `out` read as zeroes: a regular file gets a hole
/// punched (no data written, space freed), anything else (a block device, a file system
/// without hole punching) gets zeroes written.
pub(crate) fn zero_range(
    out: &File,
    out_path: &Path,
    offset: u64,
    len: u64,
    zeroes: &[u8],
) -> Result<(), StoreError> {
    use rustix::fs::{FallocateFlags, fallocate};
    let is_file = out.metadata().is_ok_and(|m| m.file_type().is_file());
    if is_file && fallocate(out, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len).is_ok()
    {
        return Ok(());
    }
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = usize::try_from((end - pos).min(zeroes.len() as u64)).unwrap_or(zeroes.len());
        out.write_all_at(&zeroes[..n], pos).map_err(io_err(out_path))?;
        pos += n as u64;
    }
    Ok(())
}

/// Hashes one block: its offset, its bytes (`None` inside a hole: zeroes, not read), its length.
type BlockHasher<'a, T> = dyn Fn(u64, Option<&[u8]>, usize) -> T + Sync + 'a;

/// Bytes each hashing thread takes per round.
const HASH_SLICE: u64 = 8 << 20;

/// Hashes every 64 KiB block of a file on all cores, reading only its data ranges: `hash`
/// gets a block's bytes, or `None` for a block inside a hole (all zeroes, not read).
/// `emit` gets the results in block order, a run at a time (first block index and the
/// run), and returns false to stop. `ranges`: the file's data ranges
/// ([`tern_core::blocks::data_ranges`]), from the caller, who may need them too.
fn hash_blocks<T: Send>(
    f: &DiskReader,
    size: u64,
    path: &Path,
    ranges: &[(u64, u64)],
    hash: &BlockHasher<'_, T>,
    emit: &mut dyn FnMut(u64, Vec<T>) -> bool,
) -> Result<(), StoreError> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8) as u64;
    let slice_of = |start: u64| hash_slice(f, ranges, size, start, path, hash);
    // Workers take slices in order and may run ahead of the emitter by a bounded window;
    // the emitter puts finished slices back in order.
    let slices = size.div_ceil(HASH_SLICE);
    let window = workers * 4;
    let next = std::sync::atomic::AtomicU64::new(0);
    let progress = (std::sync::Mutex::new((0u64, false)), std::sync::Condvar::new());
    std::thread::scope(|s| -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Result<Vec<T>, StoreError>)>();
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, progress, slice_of) = (&next, &progress, &slice_of);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= slices {
                        return;
                    }
                    {
                        let (lock, cv) = progress;
                        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        while !g.1 && i >= g.0 + window {
                            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                        if g.1 {
                            return;
                        }
                    }
                    if tx.send((i, slice_of(i * HASH_SLICE))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let stop = |progress: &(std::sync::Mutex<(u64, bool)>, std::sync::Condvar)| {
            progress.0.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
            progress.1.notify_all();
        };
        let mut done: std::collections::BTreeMap<u64, Vec<T>> = std::collections::BTreeMap::new();
        let mut emitted = 0u64;
        while emitted < slices {
            let Ok((i, r)) = rx.recv() else {
                return Err(StoreError::Invariant("the hashing threads stopped early"));
            };
            match r {
                Ok(v) => {
                    done.insert(i, v);
                }
                Err(e) => {
                    stop(&progress);
                    return Err(e);
                }
            }
            while let Some(v) = done.remove(&emitted) {
                if !emit(emitted * HASH_SLICE / BLOCK_SIZE as u64, v) {
                    stop(&progress);
                    return Ok(());
                }
                emitted += 1;
                progress.0.lock().unwrap_or_else(|p| p.into_inner()).0 = emitted;
                progress.1.notify_all();
            }
        }
        Ok(())
    })
}

/// Hashes the blocks of `[start, start + HASH_SLICE)`, reading only runs of blocks that
/// overlap a data range (`ranges` sorted and disjoint); blocks in holes are hashed as zeros.
fn hash_slice<T>(
    f: &DiskReader,
    ranges: &[(u64, u64)],
    size: u64,
    start: u64,
    path: &Path,
    hash: &BlockHasher<'_, T>,
) -> Result<Vec<T>, StoreError> {
    let has_data = |a: u64, b: u64| {
        let i = ranges.partition_point(|&(_, end)| end <= a);
        ranges.get(i).is_some_and(|&(start, _)| start < b)
    };
    let end = (start + HASH_SLICE).min(size);
    let mut out = Vec::with_capacity(usize::try_from((end - start).div_ceil(BLOCK_SIZE as u64)).unwrap_or(0));
    let mut buf = AlignedBuf::new(COPY_CHUNK);
    let mut pos = start;
    while pos < end {
        let n = usize::try_from((end - pos).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        let blocks: Vec<bool> = (0..n.div_ceil(BLOCK_SIZE))
            .map(|i| {
                let at = pos + (i * BLOCK_SIZE) as u64;
                has_data(at, (at + BLOCK_SIZE as u64).min(pos + n as u64))
            })
            .collect();
        let mut i = 0;
        while i < blocks.len() {
            if !blocks[i] {
                i += 1;
                continue;
            }
            let run = blocks[i..].iter().take_while(|&&d| d).count();
            let (a, b) = (i * BLOCK_SIZE, ((i + run) * BLOCK_SIZE).min(n));
            f.read_exact_at(&mut buf[a..b], pos + a as u64).map_err(io_err(path))?;
            i += run;
        }
        for (i, (block, &data)) in buf[..n].chunks(BLOCK_SIZE).zip(&blocks).enumerate() {
            out.push(hash(pos + (i * BLOCK_SIZE) as u64, data.then_some(block), block.len()));
        }
        pos += n as u64;
    }
    Ok(out)
}

/// The block fingerprint of a file, reading only its data ranges (holes are zero blocks),
/// on all cores.
pub fn fingerprint_file(f: &DiskReader, size: u64, path: &Path) -> Result<Digest, StoreError> {
    use tern_core::blocks::zero_block;
    let mut fp = Fingerprint::new();
    let hash = |_, data: Option<&[u8]>, len: usize| match data {
        Some(d) if !is_zero(d) => Digest::of(d),
        _ => zero_block(len).block,
    };
    let ranges = tern_core::blocks::data_ranges(f.file(), 0, size);
    hash_blocks(f, size, path, &ranges, &hash, &mut |_, run| {
        run.iter().for_each(|d| fp.push(d));
        true
    })?;
    Ok(fp.finish())
}

/// BLAKE3 of a file's first `size` bytes and its block fingerprint, in one parallel pass
/// that reads only the file's data ranges (see [`hash_blocks`]). The whole-file BLAKE3 is
/// put together from the chaining values of its subtrees (the BLAKE3 tree, through
/// `blake3::hazmat`), so that blocks can be hashed on all cores and holes are never read.
/// A 1 MiB unit that lies wholly in a hole takes its value from `zeroes` (see
/// [`crate::zero_subtrees`]) when the table covers it; other zeroes are hashed (about 0.25
/// CPU-s per GiB, since a chunk's value depends on its position). The table only saves
/// work: when it cannot be read, the zeroes are hashed. The fingerprint takes a zero
/// block's hash, a constant.
pub fn hash_output(size: u64, path: &Path, zeroes: &ZeroSubtrees) -> Result<(Digest, Digest), StoreError> {
    use blake3::hazmat::{ChainingValue, HasherExt};
    use tern_core::blocks::zero_block;
    let reader = DiskReader::open(path).map_err(io_err(path))?;
    if size <= BLOCK_SIZE as u64 {
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        reader.read_exact_at(&mut buf, 0).map_err(io_err(path))?;
        let mut fp = Fingerprint::new();
        fp.push_data(&buf);
        return Ok((Digest::of(&buf), fp.finish()));
    }
    let ranges = tern_core::blocks::data_ranges(reader.file(), 0, size);
    // Units the table stands for: wholly inside the file (a file of one unit is its own
    // root, and is hashed) and covered by the table.
    let mut table = if size > UNIT {
        zeroes
            .table()
            .inspect_err(|e| tracing::warn!(error = %e, "the zero-subtree table cannot be read; the zeroes of holes are hashed"))
            .ok()
    } else {
        None
    };
    // Only as far as every record checks out: the units of a damaged one are hashed on
    // all cores with the rest (and the record is made again by the warm-up).
    let table_units = table.as_mut().map_or(0, |t| t.usable(size / UNIT));
    let hole_unit = |unit: u64| {
        let (a, b) = (unit * UNIT, (unit + 1) * UNIT);
        let i = ranges.partition_point(|&(_, end)| end <= a);
        unit < table_units && ranges.get(i).is_none_or(|&(start, _)| start >= b)
    };
    static ZEROES: [u8; BLOCK_SIZE] = [0u8; BLOCK_SIZE];
    let hash = |offset: u64, data: Option<&[u8]>, len: usize| -> (Digest, Option<ChainingValue>) {
        let block = match data {
            Some(d) if !is_zero(d) => Digest::of(d),
            _ => zero_block(len).block,
        };
        if data.is_none() && hole_unit(offset / UNIT) {
            return (block, None);
        }
        let bytes = data.unwrap_or(&ZEROES[..len]);
        let cv = blake3::Hasher::new().set_input_offset(offset).update(bytes).finalize_non_root();
        (block, Some(cv))
    };
    const UNIT_BLOCKS: u64 = UNIT / BLOCK_SIZE as u64;
    let mut fp = Fingerprint::new();
    let mut tree = SubtreeStack::default();
    // Blocks of the current unit left to the table, which must be all 16 of them.
    let mut in_unit = 0u64;
    let mut failed = None;
    let mut warned = false;
    hash_blocks(&reader, size, path, &ranges, &hash, &mut |first, run| {
        for (i, (block, cv)) in run.into_iter().enumerate() {
            fp.push(&block);
            let index = first + i as u64;
            if index.is_multiple_of(UNIT_BLOCKS) {
                in_unit = 0;
            }
            let Some(cv) = cv else {
                in_unit += 1;
                if index % UNIT_BLOCKS < UNIT_BLOCKS - 1 {
                    continue;
                }
                if in_unit != UNIT_BLOCKS {
                    failed = Some(StoreError::Invariant("a unit of a hole was hashed in part"));
                    return false;
                }
                // The unit's last block: one value stands for all of its blocks.
                let unit = index / UNIT_BLOCKS;
                // `table` is there: without it no unit is left to it.
                let cv = table.as_mut().map_or(Err(StoreError::Invariant("no table")), |t| t.get(unit));
                let cv = cv.unwrap_or_else(|e| {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, unit, "a zero-subtree value cannot be read; its zeroes are hashed");
                    }
                    crate::zero_subtrees::zero_unit(unit)
                });
                tree.push(cv, UNIT_BLOCKS);
                continue;
            };
            if in_unit != 0 {
                failed = Some(StoreError::Invariant("a unit of a hole was hashed in part"));
                return false;
            }
            tree.push(cv, 1);
        }
        true
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    debug_assert_eq!(fp.blocks(), size.div_ceil(BLOCK_SIZE as u64));
    Ok((tree.root(), fp.finish()))
}

/// The chaining values of a file's subtrees, fed in order, merged as BLAKE3's own hasher
/// merges its chunks: a subtree of 2^k blocks starts at a multiple of 2^k blocks, two
/// neighbours of one size merge at once, and the last one waits, since only at the end is
/// it known which merge is the root.
#[derive(Default)]
struct SubtreeStack {
    /// Complete subtrees and their sizes in blocks, larger ones first.
    stack: Vec<(blake3::hazmat::ChainingValue, u64)>,
    last: Option<(blake3::hazmat::ChainingValue, u64)>,
}

impl SubtreeStack {
    fn push(&mut self, cv: blake3::hazmat::ChainingValue, blocks: u64) {
        use blake3::hazmat::{Mode, merge_subtrees_non_root};
        if let Some((mut done, mut size)) = self.last.replace((cv, blocks)) {
            while let Some(&(left, left_size)) = self.stack.last()
                && left_size == size
            {
                self.stack.pop();
                done = merge_subtrees_non_root(&left, &done, Mode::Hash);
                size *= 2;
            }
            self.stack.push((done, size));
        }
    }

    /// The root hash; at least two subtrees were pushed.
    fn root(mut self) -> Digest {
        use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
        let mut right = self.last.take().unwrap_or_default().0;
        while self.stack.len() > 1 {
            let (left, _) = self.stack.pop().unwrap_or_default();
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        let (left, _) = self.stack.pop().unwrap_or_default();
        Digest::from(merge_subtrees_root(&left, &right, Mode::Hash))
    }
}

/// Block hashes per message of a delta sync.
pub const HASHES_PER_CHUNK: usize = 2048;

/// Hashes every 64 KiB block (and its 4 KiB pages) of the disk as of `upto`: the receiver's
/// side of a delta sync. `emit` gets them in order, a chunk at a time, and returns false
/// to stop. With `coarse`, when nothing lies past the base image, entries carry the block
/// hash alone (see `base_block_hashes` for the pages of the blocks that differ); the
/// returned flag says whether they did.
pub fn hash_disk(
    disk: &DiskHandle,
    scratch: &Path,
    upto: Seq,
    coarse: bool,
    emit: &mut dyn FnMut(u64, &[tern_core::blocks::BlockHashes]) -> bool,
) -> Result<bool, StoreError> {
    let copy = HashedCopy::new(disk, scratch, upto)?;
    // A scratch copy goes away with `copy`: nobody could answer for its pages later.
    let coarse = coarse && !copy.scratch;
    copy.hash(disk, coarse, emit)?;
    Ok(coarse)
}

/// Block and page hashes of some blocks of the disk's base image: the pages a coarse
/// [`hash_disk`] left out, for the blocks whose hash differs on the sender's side.
pub fn base_block_hashes(
    disk: &DiskHandle,
    blocks: &[u64],
) -> Result<Vec<tern_core::blocks::BlockHashes>, StoreError> {
    let base_seq = disk.base_seq();
    HashedCopy { path: disk.base_path.clone(), scratch: false, base_seq, overlay: None, upto: base_seq }
        .page_hashes(disk, blocks)
}

/// The copy of a disk as of one position that a delta sync's hashes describe: the base
/// image itself when nothing lies past it, else a scratch file materialised from base and
/// journal. Kept while the sender may ask for the page hashes of blocks that differ from
/// coarse entries, so that the answers describe the same copy. A scratch file is removed
/// when the copy is dropped.
#[derive(Debug)]
pub struct HashedCopy {
    path: PathBuf,
    /// `path` is a scratch file, removed with the copy (else it is the base image).
    scratch: bool,
    /// The base image's position: it must not move while the copy is in use (a retention
    /// fold would change what it describes).
    base_seq: Seq,
    /// With a scratch file: the blocks it holds (those the journal's records wrote, each
    /// whole: the base image's bytes, then the records); every other block is read from
    /// the base image. So the scratch file takes the records' blocks, not the disk.
    overlay: Option<Vec<u64>>,
    /// The position the copy describes.
    upto: Seq,
}

fn has_block(bits: &[u64], b: u64) -> bool {
    usize::try_from(b / 64).ok().and_then(|i| bits.get(i)).is_some_and(|w| w & (1 << (b % 64)) != 0)
}

impl HashedCopy {
    /// The disk as of `upto`; materialised under `scratch` unless it is the base image.
    pub fn new(disk: &DiskHandle, scratch: &Path, upto: Seq) -> Result<HashedCopy, StoreError> {
        HashedCopy::new_until(disk, scratch, upto, &|| false)
    }

    /// [`HashedCopy::new`], given up (an `Interrupted` error) once `stop` says so between
    /// records: a session whose agent went away does not finish a copy nobody will read.
    pub fn new_until(
        disk: &DiskHandle,
        scratch: &Path,
        upto: Seq,
        stop: &dyn Fn() -> bool,
    ) -> Result<HashedCopy, StoreError> {
        {
            // Nothing past the base image (a master target's untouched target disk, a
            // folded replica): hash it where it lies, skipping its holes.
            let _reading = disk.read_lock();
            if disk.durable() <= disk.base_seq() && upto <= disk.base_seq() {
                return Ok(HashedCopy {
                    path: disk.base_path.clone(),
                    scratch: false,
                    base_seq: disk.base_seq(),
                    overlay: None,
                    upto: disk.base_seq(),
                });
            }
        }
        crate::durable::create_dir_durable(scratch)?;
        let n = SCRATCH_COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = scratch.join(format!("hash-{}-{}-{}-{n}.raw", disk.vm, disk.name, std::process::id()));
        let mut copy =
            HashedCopy { path: path.clone(), scratch: true, base_seq: Seq(0), overlay: None, upto };
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        out.set_len(disk.size).map_err(io_err(&path))?;
        let _reading = disk.read_lock();
        copy.base_seq = disk.base_seq();
        if upto < copy.base_seq {
            return Err(StoreError::Invariant("the position to hash is behind the base image; sync again"));
        }
        let snapshot = disk.journal().snapshot();
        let base = DiskReader::open(&disk.base_path).map_err(io_err(&disk.base_path))?;
        let blocks = tern_core::blocks::block_count(disk.size);
        let mut bits = vec![0u64; usize::try_from(blocks.div_ceil(64)).unwrap_or(0)];
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        // Before a record is written, each block it touches is brought over whole from
        // the base image (once): the scratch file then holds those blocks as of `upto`.
        let mut bring = |offset: u64, len: u64| -> Result<(), StoreError> {
            if stop() {
                return Err(StoreError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "the copy is no longer wanted",
                    ),
                });
            }
            if len == 0 {
                return Ok(());
            }
            let last = ((offset + len - 1) / BLOCK_SIZE as u64).min(blocks.saturating_sub(1));
            for b in offset / BLOCK_SIZE as u64..=last {
                if has_block(&bits, b) {
                    continue;
                }
                let n = tern_core::blocks::block_len(disk.size, b);
                base.read_exact_at(&mut buf[..n], b * BLOCK_SIZE as u64).map_err(io_err(&disk.base_path))?;
                if !is_zero(&buf[..n]) {
                    out.write_all_at(&buf[..n], b * BLOCK_SIZE as u64).map_err(io_err(&path))?;
                }
                if let Some(w) = usize::try_from(b / 64).ok().and_then(|i| bits.get_mut(i)) {
                    *w |= 1 << (b % 64);
                }
            }
            Ok(())
        };
        apply_records_with(disk, &snapshot, disk.base_seq(), upto, &out, &path, &mut bring, &mut |_| {})?;
        let copied: u32 = bits.iter().map(|w| w.count_ones()).sum();
        tracing::info!(vm = %disk.vm, disk = %disk.name, blocks = copied, mib = (u64::from(copied) * BLOCK_SIZE as u64) >> 20,
            records_after = %disk.base_seq(), upto = %upto,
            "hashing over the base image: the blocks the journal's records wrote are copied aside");
        copy.overlay = Some(bits);
        Ok(copy)
    }

    /// Block `b`'s bytes into `buf`: from the scratch file if it holds it, else the base.
    fn read_block(
        &self,
        disk: &DiskHandle,
        files: &CopyFiles,
        b: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let (f, path) = match (&self.overlay, &files.base) {
            (Some(bits), Some(base)) if !has_block(bits, b) => (base, &disk.base_path),
            _ => (&files.copy, &self.path),
        };
        f.read_exact_at(buf, b * BLOCK_SIZE as u64).map_err(io_err(path))
    }

    fn open(&self, disk: &DiskHandle) -> Result<CopyFiles, StoreError> {
        let copy = DiskReader::open(&self.path).map_err(io_err(&self.path))?;
        let base = match self.overlay {
            Some(_) => Some(DiskReader::open(&disk.base_path).map_err(io_err(&disk.base_path))?),
            None => None,
        };
        Ok(CopyFiles { copy, base })
    }

    /// Hashes every block of the copy (see [`hash_disk`]).
    pub fn hash(
        &self,
        disk: &DiskHandle,
        coarse: bool,
        emit: &mut dyn FnMut(u64, &[tern_core::blocks::BlockHashes]) -> bool,
    ) -> Result<(), StoreError> {
        let _reading = self.read_lock(disk)?;
        let files = self.open(disk)?;
        let (Some(bits), Some(base)) = (&self.overlay, &files.base) else {
            return hash_file(&files.copy, disk.size, &self.path, coarse, emit);
        };
        // The base image's hashes, with the scratch file's blocks hashed in their place.
        let mut failed = None;
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        hash_file(base, disk.size, &disk.base_path, coarse, &mut |first, chunk| {
            let mut chunk = chunk.to_vec();
            for (i, h) in chunk.iter_mut().enumerate() {
                let b = first + i as u64;
                if !has_block(bits, b) {
                    continue;
                }
                let n = tern_core::blocks::block_len(disk.size, b);
                if let Err(e) = self.read_block(disk, &files, b, &mut buf[..n]) {
                    failed = Some(e);
                    return false;
                }
                *h = block_hashes(&buf[..n], coarse);
            }
            emit(first, &chunk)
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Block and page hashes of some blocks of the copy.
    pub fn page_hashes(
        &self,
        disk: &DiskHandle,
        blocks: &[u64],
    ) -> Result<Vec<tern_core::blocks::BlockHashes>, StoreError> {
        use tern_core::blocks::{block_count, block_len, hash_block, zero_block};
        let _reading = self.read_lock(disk)?;
        let files = self.open(disk)?;
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        let mut out = Vec::with_capacity(blocks.len());
        for &b in blocks {
            if b >= block_count(disk.size) {
                return Err(StoreError::Invariant(
                    "a page-hash request names a block past the end of the disk",
                ));
            }
            let len = block_len(disk.size, b);
            self.read_block(disk, &files, b, &mut buf[..len])?;
            out.push(if is_zero(&buf[..len]) { zero_block(len) } else { hash_block(&buf[..len]) });
        }
        Ok(out)
    }

    /// For the base image: holds off retention while it is read, and checks that it has
    /// not moved since the copy was taken.
    fn read_lock<'a>(
        &self,
        disk: &'a DiskHandle,
    ) -> Result<Option<std::sync::RwLockReadGuard<'a, ()>>, StoreError> {
        if self.scratch && self.overlay.is_none() {
            return Ok(None);
        }
        let guard = disk.read_lock();
        // An overlay holds every block a record up to `upto` wrote: a fold of records up
        // to there changes none of the base's other blocks (it runs under the write lock,
        // so a read sees the base before or after it). The base image alone must not move.
        let base = disk.base_seq();
        let moved = match self.overlay {
            Some(_) => base < self.base_seq || base > self.upto,
            None => base != self.base_seq,
        };
        if moved {
            return Err(StoreError::Invariant(
                "the base image moved while its hashes were in use; sync again",
            ));
        }
        Ok(Some(guard))
    }
}

impl Drop for HashedCopy {
    fn drop(&mut self) {
        if self.scratch {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The files a [`HashedCopy`] reads: the copy, and the base image under an overlay.
struct CopyFiles {
    copy: DiskReader,
    base: Option<DiskReader>,
}

/// A block's hashes as [`hash_file`] gives them: the block hash alone when `coarse`.
fn block_hashes(d: &[u8], coarse: bool) -> tern_core::blocks::BlockHashes {
    use tern_core::blocks::{BlockHashes, hash_block, zero_block};
    if is_zero(d) {
        zero_block(d.len())
    } else if coarse {
        BlockHashes { block: Digest::of(d), pages: [Digest::ZERO; tern_core::PAGES_PER_BLOCK] }
    } else {
        hash_block(d)
    }
}

/// Numbers scratch copies, so that two copies of one disk never share a file.
static SCRATCH_COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Hashes a whole file block by block (holes as zero blocks, without reading them), on
/// all cores, and hands them to `emit` in chunks of [`HASHES_PER_CHUNK`].
fn hash_file(
    f: &DiskReader,
    size: u64,
    path: &Path,
    coarse: bool,
    emit: &mut dyn FnMut(u64, &[tern_core::blocks::BlockHashes]) -> bool,
) -> Result<(), StoreError> {
    use tern_core::blocks::{BlockHashes, hash_block, zero_block};
    let hash = |_, data: Option<&[u8]>, len: usize| match data {
        Some(d) if !is_zero(d) && coarse => {
            BlockHashes { block: Digest::of(d), pages: [Digest::ZERO; tern_core::PAGES_PER_BLOCK] }
        }
        Some(d) if !is_zero(d) => hash_block(d),
        _ => zero_block(len),
    };
    let mut pending = Vec::with_capacity(HASHES_PER_CHUNK);
    let mut first = 0u64;
    let mut stopped = false;
    let ranges = tern_core::blocks::data_ranges(f.file(), 0, size);
    hash_blocks(f, size, path, &ranges, &hash, &mut |_, run| {
        for h in run {
            pending.push(h);
            if pending.len() == HASHES_PER_CHUNK {
                if !emit(first, &pending) {
                    stopped = true;
                    return false;
                }
                first += pending.len() as u64;
                pending.clear();
            }
        }
        true
    })?;
    if !stopped && !pending.is_empty() {
        emit(first, &pending);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A copy with records past the base image is an overlay (its scratch file holds only
    /// the blocks the records wrote, not the disk): it hashes, coarse or not, and answers
    /// page hashes exactly as the disk written out whole does, before and after retention
    /// has folded part of the journal into the base image.
    #[test]
    fn an_overlay_copy_hashes_as_the_disk_written_whole() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = crate::retention::tests::setup(dir.path());
        let check = |store: &crate::Store| {
            let h = store.vm_disks(&vm).remove(0);
            let upto = h.durable();
            assert!(upto > h.base_seq());
            let copy = HashedCopy::new(&h, &dir.path().join("scratch"), upto).unwrap();
            assert!(copy.overlay.is_some());
            let whole = dir.path().join("whole.raw");
            let _ = std::fs::remove_file(&whole);
            let f = File::create_new(&whole).unwrap();
            f.set_len(h.size).unwrap();
            fill(&h, &h.journal().snapshot(), upto, &f, &whole, &mut |_| {}).unwrap();
            for coarse in [false, true] {
                let mut want = Vec::new();
                let reader = DiskReader::open(&whole).unwrap();
                hash_file(&reader, h.size, &whole, coarse, &mut |_, c| {
                    want.extend_from_slice(c);
                    true
                })
                .unwrap();
                let mut got = Vec::new();
                copy.hash(&h, coarse, &mut |_, c| {
                    got.extend_from_slice(c);
                    true
                })
                .unwrap();
                assert_eq!(got, want, "coarse {coarse}");
            }
            let blocks: Vec<u64> = (0..tern_core::blocks::block_count(h.size)).collect();
            let reference = HashedCopy {
                path: whole.clone(),
                scratch: false,
                base_seq: h.base_seq(),
                overlay: None,
                upto: h.base_seq(),
            };
            assert_eq!(copy.page_hashes(&h, &blocks).unwrap(), reference.page_hashes(&h, &blocks).unwrap());
            // 24 pages written, each in one block or two: not the 1 MiB disk.
            let allocated = std::fs::metadata(&copy.path).unwrap().blocks() * 512;
            assert!(allocated <= 48 * BLOCK_SIZE as u64 && allocated < h.size, "{allocated}");
        };
        check(&store);
        // A copy taken before the fold still answers after it (the fold wrote only blocks
        // it holds), the same hashes.
        let h = store.vm_disks(&vm).remove(0);
        let early = HashedCopy::new(&h, &dir.path().join("scratch"), h.durable()).unwrap();
        let hashes = |copy: &HashedCopy, h: &DiskHandle| {
            let mut got = Vec::new();
            copy.hash(h, false, &mut |_, c| {
                got.extend_from_slice(c);
                true
            })
            .unwrap();
            got
        };
        let before = hashes(&early, &h);
        // One no longer wanted stops between records, and leaves no scratch file.
        let scratch = dir.path().join("scratch");
        let err = HashedCopy::new_until(&h, &scratch, h.durable(), &|| true).unwrap_err();
        assert!(err.to_string().contains("no longer wanted"), "{err}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 1, "only the early copy's file");
        store.apply_retention(&vm, 4000).unwrap();
        assert!(store.vm_disks(&vm)[0].base_seq() > Seq(0), "part of the journal folded");
        assert_eq!(hashes(&early, &store.vm_disks(&vm)[0]), before);
        check(&store);
    }

    /// A sparse file of `size` bytes whose `data` ranges hold pseudo-random bytes (zeroes
    /// elsewhere, most of it holes), and its content.
    fn sparse(dir: &Path, name: &str, size: u64, data: &[(u64, u64)]) -> (PathBuf, Vec<u8>) {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut content = vec![0u8; size as usize];
        for &(a, len) in data {
            let end = (a + len).min(size);
            let mut bytes = vec![0u8; (end - a) as usize];
            blake3::Hasher::new().update(&a.to_le_bytes()).finalize_xof().fill(&mut bytes);
            f.write_all_at(&bytes, a).unwrap();
            content[a as usize..end as usize].copy_from_slice(&bytes);
        }
        (path, content)
    }

    fn check(dir: &Path, name: &str, size: u64, data: &[(u64, u64)]) {
        let (path, content) = sparse(dir, name, size, data);
        let zeroes = ZeroSubtrees::new(dir.join("zero-subtrees"));
        zeroes.warm(size, u64::MAX, 2).unwrap();
        let (whole, fp) = hash_output(size, &path, &zeroes).unwrap();
        let mut want_fp = Fingerprint::new();
        want_fp.push_data(&content);
        assert_eq!(whole, Digest::of(&content), "BLAKE3 of {size} bytes, data {data:?}");
        assert_eq!(fp, want_fp.finish(), "fingerprint of {size} bytes, data {data:?}");
    }

    /// The whole-file BLAKE3 put together from subtrees equals the plain BLAKE3 for holes
    /// and data at every alignment: inside a 1 KiB chunk, across chunk, 64 KiB block and
    /// larger subtree boundaries, at the start, at the end of odd-sized files, none, all.
    #[test]
    fn the_sparse_blake3_equals_the_plain_one_for_holes_at_every_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let k = 1024u64;
        let sizes = [
            1,
            1000,
            4096,
            64 * k,
            64 * k + 1,
            3 * 64 * k + 17,
            1 << 20,
            (1 << 20) + 12_345,
            5 * (1 << 20) - 1,
        ];
        let layouts: Vec<Vec<(u64, u64)>> = vec![
            vec![],
            vec![(0, u64::MAX / 2)],
            vec![(0, 10)],
            vec![(1000, 100)],
            vec![(1023, 2)],
            vec![(4095, 4097)],
            vec![(64 * k - 1, 2)],
            vec![(64 * k, 64 * k)],
            vec![(128 * k - 3000, 200 * k)],
            vec![(512 * k - 1, 1), ((1 << 20) - 5, 10)],
            vec![(3 * (1 << 20) + 7, 100), (4 * (1 << 20), 64 * k + 3)],
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            for (j, layout) in layouts.iter().enumerate() {
                let inside: Vec<(u64, u64)> = layout.iter().copied().filter(|&(a, _)| a < size).collect();
                check(dir.path(), &format!("f{i}-{j}"), size, &inside);
            }
        }
    }

    /// Against `b3sum` (Debian package b3sum), the tool an operator checks an output with:
    /// sparse and dense files of odd sizes.
    #[test]
    fn the_sparse_blake3_equals_b3sum() {
        let dir = tempfile::tempdir().unwrap();
        // Holes of whole 1 MiB units take the zero-subtree table's values: across its
        // records (64 MiB), beside data inside and straddling units, up to an odd end.
        let zeroes = ZeroSubtrees::new(dir.path().join("zero-subtrees"));
        let m = 1u64 << 20;
        let cases: [(u64, Vec<(u64, u64)>); 5] = [
            (40 * m + 333, vec![(5 << 20, 3 << 20), (33 << 20, 1)]),
            (3 * m + 4097, vec![(0, u64::MAX / 2)]),
            (7_777_777, vec![]),
            (130 * m + 65_537, vec![(m - 1, 2), (63 * m + 100, 2 * m), (129 * m, m + 3)]),
            (64 * m + m / 2, vec![(64 * m, 1)]),
        ];
        // The table covers the first 64 MiB at first (a warm-up under way): units past it
        // are hashed.
        zeroes.warm(64 * m, u64::MAX, 2).unwrap();
        for (i, (size, data)) in cases.into_iter().enumerate() {
            let inside: Vec<(u64, u64)> = data.into_iter().filter(|&(a, _)| a < size).collect();
            let (path, _) = sparse(dir.path(), &format!("b{i}"), size, &inside);
            let out = std::process::Command::new("b3sum")
                .arg("--no-names")
                .arg(&path)
                .output()
                .expect("b3sum (Debian package b3sum) runs; .ci/run installs it");
            assert!(out.status.success(), "{out:?}");
            let b3sum = String::from_utf8(out.stdout).unwrap().trim().to_string();
            let (whole, _) = hash_output(size, &path, &zeroes).unwrap();
            assert_eq!(whole.to_hex(), b3sum, "file {i} of {size} bytes");
            if size > 64 * m {
                // Covered whole; then with a record damaged under it (its zeroes hashed).
                zeroes.warm(size, u64::MAX, 2).unwrap();
                assert_eq!(hash_output(size, &path, &zeroes).unwrap().0.to_hex(), b3sum, "file {i}, covered");
                let f = std::fs::OpenOptions::new().write(true).open(zeroes.path()).unwrap();
                f.write_all_at(&[0xee; 4], 8 + 2080 + 77).unwrap();
                assert_eq!(hash_output(size, &path, &zeroes).unwrap().0.to_hex(), b3sum, "file {i}, damaged");
                let again = ZeroSubtrees::new(zeroes.path().to_path_buf());
                assert_eq!(hash_output(size, &path, &again).unwrap().0.to_hex(), b3sum, "file {i}, cut");
            }
        }
    }
}
