//! Materialisation: the disk as of a point, written out as a sparse raw image or a fixed
//! VHD, checked against the point's fingerprint while it is written.

use crate::durable::{io_err, publish_file};
use crate::format::{RecordKind, vhd_footer};
use crate::journal::JournalSnapshot;
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

/// Writes `disk` as of `upto` to `path` and checks its fingerprint. `progress` gets the
/// bytes done so far. The file appears at `path` only when complete and fsynced.
pub fn materialize_disk(
    disk: &DiskHandle,
    snapshot: &JournalSnapshot,
    upto: Seq,
    expected: Digest,
    path: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64),
) -> Result<OutputDisk, StoreError> {
    if upto > snapshot.durable {
        return Err(StoreError::PointBeyondDurable {
            disk: disk.name.to_string(),
            seq: upto,
            durable: snapshot.durable,
        });
    }
    let _reading = disk.read_lock();
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
        let (content, fingerprint) = hash_output(&out, disk.size, &tmp)?;
        if fingerprint != expected {
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
    let mut dec = Decoder::new();
    let zeroes = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    for rec in snapshot.read_range(after, upto) {
        let rec = rec?;
        let r = &rec.record;
        match r.kind {
            RecordKind::Bookmark => continue,
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

/// Bytes each hashing thread takes per round.
const HASH_SLICE: u64 = 8 << 20;

/// Hashes every 64 KiB block of a file on all cores, reading only its data ranges: `hash`
/// gets a block's bytes, or `None` for a block inside a hole (all zeroes, not read).
/// `emit` gets the results in block order, a run at a time (first block index and the
/// run), and returns false to stop.
fn hash_blocks<T: Send>(
    f: &DiskReader,
    size: u64,
    path: &Path,
    hash: &(dyn Fn(Option<&[u8]>, usize) -> T + Sync),
    emit: &mut dyn FnMut(u64, Vec<T>) -> bool,
) -> Result<(), StoreError> {
    let ranges = tern_core::blocks::data_ranges(f.file(), 0, size);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8) as u64;
    let slice_of = |start: u64| hash_slice(f, &ranges, size, start, path, hash);
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
    hash: &(dyn Fn(Option<&[u8]>, usize) -> T + Sync),
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
        for (block, &data) in buf[..n].chunks(BLOCK_SIZE).zip(&blocks) {
            out.push(hash(data.then_some(block), block.len()));
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
    let hash = |data: Option<&[u8]>, len: usize| match data {
        Some(d) if !is_zero(d) => Digest::of(d),
        _ => zero_block(len).block,
    };
    hash_blocks(f, size, path, &hash, &mut |_, run| {
        run.iter().for_each(|d| fp.push(d));
        true
    })?;
    Ok(fp.finish())
}

/// BLAKE3 of the whole content and the block fingerprint, in one read of the output.
pub fn hash_output(f: &File, size: u64, path: &Path) -> Result<(Digest, Digest), StoreError> {
    let mut whole = blake3::Hasher::new();
    let mut fp = Fingerprint::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let n = usize::try_from((size - pos).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        f.read_exact_at(&mut buf[..n], pos).map_err(io_err(path))?;
        whole.update(&buf[..n]);
        fp.push_data(&buf[..n]);
        pos += n as u64;
    }
    debug_assert_eq!(fp.blocks(), size.div_ceil(BLOCK_SIZE as u64));
    Ok((Digest::from(whole.finalize()), fp.finish()))
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
    HashedCopy { path: disk.base_path.clone(), scratch: false, base_seq: disk.base_seq() }
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
    /// The base image's position when the copy is the base image: it must not move while
    /// the copy is in use (a retention fold would change what it describes).
    base_seq: Seq,
}

impl HashedCopy {
    /// The disk as of `upto`; materialised under `scratch` unless it is the base image.
    pub fn new(disk: &DiskHandle, scratch: &Path, upto: Seq) -> Result<HashedCopy, StoreError> {
        {
            // Nothing past the base image (a master target's untouched target disk, a
            // folded replica): hash it where it lies, skipping its holes.
            let _reading = disk.read_lock();
            if disk.journal().durable() <= disk.base_seq() && upto <= disk.base_seq() {
                return Ok(HashedCopy {
                    path: disk.base_path.clone(),
                    scratch: false,
                    base_seq: disk.base_seq(),
                });
            }
        }
        crate::durable::create_dir_durable(scratch)?;
        let n = SCRATCH_COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = scratch.join(format!("hash-{}-{}-{}-{n}.raw", disk.vm, disk.name, std::process::id()));
        let copy = HashedCopy { path: path.clone(), scratch: true, base_seq: Seq(0) };
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        out.set_len(disk.size).map_err(io_err(&path))?;
        let _reading = disk.read_lock();
        let snapshot = disk.journal().snapshot();
        fill(disk, &snapshot, upto, &out, &path, &mut |_| {})?;
        Ok(copy)
    }

    /// Hashes every block of the copy (see [`hash_disk`]).
    pub fn hash(
        &self,
        disk: &DiskHandle,
        coarse: bool,
        emit: &mut dyn FnMut(u64, &[tern_core::blocks::BlockHashes]) -> bool,
    ) -> Result<(), StoreError> {
        let _reading = self.read_lock(disk)?;
        let f = DiskReader::open(&self.path).map_err(io_err(&self.path))?;
        hash_file(&f, disk.size, &self.path, coarse, emit)
    }

    /// Block and page hashes of some blocks of the copy.
    pub fn page_hashes(
        &self,
        disk: &DiskHandle,
        blocks: &[u64],
    ) -> Result<Vec<tern_core::blocks::BlockHashes>, StoreError> {
        use tern_core::blocks::{block_count, block_len, hash_block, zero_block};
        let _reading = self.read_lock(disk)?;
        let f = DiskReader::open(&self.path).map_err(io_err(&self.path))?;
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        let mut out = Vec::with_capacity(blocks.len());
        for &b in blocks {
            if b >= block_count(disk.size) {
                return Err(StoreError::Invariant(
                    "a page-hash request names a block past the end of the disk",
                ));
            }
            let len = block_len(disk.size, b);
            f.read_exact_at(&mut buf[..len], b * BLOCK_SIZE as u64).map_err(io_err(&self.path))?;
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
        if self.scratch {
            return Ok(None);
        }
        let guard = disk.read_lock();
        if disk.base_seq() != self.base_seq {
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
    let hash = |data: Option<&[u8]>, len: usize| match data {
        Some(d) if !is_zero(d) && coarse => {
            BlockHashes { block: Digest::of(d), pages: [Digest::ZERO; tern_core::PAGES_PER_BLOCK] }
        }
        Some(d) if !is_zero(d) => hash_block(d),
        _ => zero_block(len),
    };
    let mut pending = Vec::with_capacity(HASHES_PER_CHUNK);
    let mut first = 0u64;
    let mut stopped = false;
    hash_blocks(f, size, path, &hash, &mut |_, run| {
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
