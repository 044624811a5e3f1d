//! The agent's memory of what the receiver holds: per 64 KiB block, its hash and its 16
//! page hashes. It lives in a file in the state directory, read and written in place, so
//! the agent's memory does not follow the disk's size, and a restart does not resend the
//! disk.
//!
//! File `disk-NAME.table` (little-endian):
//! - bytes 0..4096: two header slots of 2048 bytes. Each is `magic "TERNAGT2" (8) |
//!   version u32 | committed u8 | fill u8 | reserved u16 | counter u64 | disk size u64 |
//!   blocks u64 | seq u64 | generation len u32 | generation | BLAKE3 of the preceding slot
//!   bytes [32]`. The slot with a good checksum and the higher counter is the header; a
//!   torn header write leaves the other slot.
//! - from byte 4096: one entry of 544 bytes per block, `block hash [32] | 16 × page hash
//!   [32]`. An all-zero entry (a hole: a new table is sparse, so blocks never written
//!   cost nothing) means the header's `fill`: a block of zeros, or unknown. An entry whose
//!   block hash is all 0xFF means unknown.
//!
//! A *committed* header vouches for the table as of the receiver's record `seq`: every
//! record up to it is reflected. Changes after a commit wait in memory (`overlay`, up to
//! [`OVERLAY_MAX`] blocks) until the next commit (a point acked, or a long pass's acked
//! progress, see `scan::ScanEvent::Settle` and [`DiskState::snapshot`]); the commit writes only those
//! entries, fsyncs, then writes the next header slot and fsyncs again. A crash between the
//! two leaves entries ahead of the committed seq, which is safe: they are of blocks that
//! records after that seq wrote, and the receiver names those ranges at reconnect, so the
//! agent forgets them and compares them again. When the overlay grows past its bound (a
//! large pass between points), the header is first marked uncommitted, then the overlay is
//! written in place: a crash before the next commit costs a compare of the whole disk with
//! the receiver's block hashes, never a wrong entry trusted.
//!
//! An I/O error on the table makes the state answer "unknown" for every block from then
//! on (everything with data is sent again — never less than needed) and its commits fail
//! before they write a header, so nothing unwritten is ever vouched for.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tern_core::blocks::{BlockHashes, block_count, block_len, zero_block};
use tern_core::{Digest, PAGES_PER_BLOCK, Seq};

const MAGIC: &[u8; 8] = b"TERNAGT2";
const VERSION: u32 = 2;
const HEADER_BYTES: u64 = HEADER_LEN as u64;
const HEADER_LEN: usize = 4096;
const SLOT_BYTES: usize = 2048;
const ENTRY_LEN: usize = 32 * (1 + PAGES_PER_BLOCK);
const UNKNOWN_MARK: [u8; 32] = [0xFF; 32];

/// Changed blocks kept in memory between commits (about 20 MiB) before they go to the
/// table in place.
pub const OVERLAY_MAX: usize = 32 * 1024;

/// An entry that matches no real data: the receiver's content is unknown.
pub const UNKNOWN: BlockHashes = BlockHashes { block: Digest::ZERO, pages: [Digest::ZERO; PAGES_PER_BLOCK] };

/// Tables (and the state directory itself) that could not be written, with why, until they
/// are written again: the agent tells the process server (`Tracking.problem`), so that
/// `drctl status` says it. A full state directory was said only in the agent's log (W15),
/// while every block went again at each session.
static WRITE_FAILURES: std::sync::Mutex<BTreeMap<PathBuf, String>> = std::sync::Mutex::new(BTreeMap::new());

/// Notes whether `path` (a table, or the state directory) could be written.
pub fn note_write(path: &Path, failure: Option<String>) {
    let mut f = WRITE_FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    match failure {
        Some(why) => f.insert(path.to_path_buf(), why),
        None => f.remove(path),
    };
}

/// Whether `dir` takes a write now (64 KiB, synced, then removed): a full file system that
/// was given room, a directory whose permissions were mended.
pub fn dir_writable(dir: &Path) -> bool {
    let probe = dir.join(".write-probe");
    let wrote = File::create(&probe)
        .and_then(|f| f.write_all_at(&[0u8; 64 << 10], 0).and_then(|()| f.sync_data()))
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    wrote
}

/// Per disk, what is wrong with it now that the server should show (an nbd-mode disk
/// file whose size changed under the agent).
static DISK_PROBLEMS: std::sync::Mutex<BTreeMap<String, String>> = std::sync::Mutex::new(BTreeMap::new());

/// Notes (or clears, with `None`) what is wrong with `disk` now.
pub fn note_disk_problem(disk: &str, problem: Option<String>) {
    let mut p = DISK_PROBLEMS.lock().unwrap_or_else(|p| p.into_inner());
    match problem {
        Some(why) => p.insert(disk.to_string(), why),
        None => p.remove(disk),
    };
}

/// What the agent tells the server is wrong on its side (`Tracking.problem`): what cannot
/// be written in the state directory now and what that costs, and what is wrong with a disk;
/// empty when nothing is.
pub fn write_problem() -> String {
    let disks: Vec<String> =
        DISK_PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    let state = state_problem();
    disks.into_iter().chain((!state.is_empty()).then_some(state)).collect::<Vec<_>>().join("; ")
}

fn state_problem() -> String {
    let f = WRITE_FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_empty() {
        return String::new();
    }
    let what: Vec<&str> = f.values().map(String::as_str).collect();
    format!(
        "the agent cannot write its state ({}): it sends again what it cannot vouch for, and a restart \
         compares the disks in full; free space in its state directory or fix its permissions (it starts a \
         new state within 10 s of that)",
        what.join("; ")
    )
}

/// A table's changes taken at an acked-to-be position (see [`DiskState::snapshot`]).
#[derive(Debug)]
pub struct Snapshot {
    pub seq: Seq,
    entries: BTreeMap<u64, (Option<Box<BlockHashes>>, u64)>,
    spills: u64,
}

/// What a never-written entry of a table means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Zero = 0,
    Unknown = 1,
}

#[derive(Debug)]
pub struct DiskState {
    pub size: u64,
    /// The receiver's copy this state describes.
    pub generation: String,
    /// The receiver's sequence number at the last commit.
    pub seq: Seq,
    blocks: u64,
    fill: Fill,
    path: PathBuf,
    file: File,
    /// The counter of the header last written.
    counter: u64,
    /// Whether the header on disk vouches for the table.
    committed: bool,
    /// Changes since the last commit, while the header vouches for the table.
    /// `None` is [`UNKNOWN`]: a resync forgets every block of the hot extents, and an
    /// entry of 544 bytes each (14 MiB for the 1 GiB of bench/nbd.sh) was most of what the
    /// agent held past its log in a burst. With each change, its stamp (see `stamp`).
    overlay: BTreeMap<u64, (Option<Box<BlockHashes>>, u64)>,
    /// Counts the changes: a snapshot's commit lets go of an entry only when it holds the
    /// very change the snapshot took (a value set again since, even back to the same
    /// value, is a later change that a later snapshot may have to write).
    stamp: u64,
    /// Set by the first I/O error on the table: every block reads as unknown from then on.
    failed: Option<String>,
    /// Times the overlay went to the table in place (a snapshot from before cannot commit).
    spills: u64,
    /// Tests: entry writes fail (ENOSPC) while header writes still succeed.
    #[cfg(test)]
    entry_writes_fail: bool,
    /// Tests: a commit stops here, as a crash would.
    #[cfg(test)]
    crash_at: Option<CrashAt>,
}

/// The steps of a commit a test crashes at.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashAt {
    /// The changed entries are written, not synced.
    Entries,
    /// The entries are synced, no header written.
    Synced,
    /// Half of the new header slot is written.
    TornHeader,
}

impl DiskState {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("disk-{disk}.table"))
    }

    /// A new table at `path`: the receiver holds an all-zero disk (a new copy).
    pub fn zeroes(path: &Path, size: u64, generation: &str) -> std::io::Result<DiskState> {
        DiskState::create(path, size, generation, Fill::Zero)
    }

    /// A new table at `path`: nothing is known of the receiver's copy; every block with
    /// data is sent (or compared with the receiver's hashes).
    pub fn unknown(path: &Path, size: u64, generation: &str) -> std::io::Result<DiskState> {
        DiskState::create(path, size, generation, Fill::Unknown)
    }

    /// Replaces whatever is at `path` with an empty, uncommitted table (sparse: O(1)).
    fn create(path: &Path, size: u64, generation: &str, fill: Fill) -> std::io::Result<DiskState> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let blocks = block_count(size);
        file.set_len(HEADER_BYTES + blocks * ENTRY_LEN as u64)?;
        no_readahead(&file);
        let header = Header {
            committed: false,
            fill,
            counter: 0,
            size,
            blocks,
            seq: Seq(0),
            generation: generation.to_string(),
        };
        let mut s = DiskState::from_header(path, file, header);
        s.write_header(false)?;
        s.file.sync_all()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(s)
    }

    /// The saved state of disk `disk` in `state_dir`: its table, or a state file of an
    /// older agent (`disk-NAME.state`, read once and turned into a table).
    pub fn open_saved(state_dir: &Path, disk: &str, size: u64) -> Option<DiskState> {
        let path = DiskState::path(state_dir, disk);
        let legacy = state_dir.join(format!("disk-{disk}.state"));
        if !path.exists() && legacy.exists() {
            match legacy_v1::load(&legacy, size) {
                Some((generation, seq, blocks)) => {
                    match DiskState::from_v1(&path, size, &generation, seq, &blocks) {
                        Ok(s) => {
                            tracing::info!(path = %path.display(), "agent state of an older version converted");
                            let _ = std::fs::remove_file(&legacy);
                            return Some(s);
                        }
                        Err(e) => tracing::warn!(path = %path.display(), error = %e,
                        "cannot convert the older agent state; the disk will be compared in full"),
                    }
                }
                None => tracing::warn!(path = %legacy.display(),
                    "older agent state unreadable; the disk will be compared in full"),
            }
        }
        DiskState::load(&path, size)
    }

    fn from_v1(
        path: &Path,
        size: u64,
        generation: &str,
        seq: Seq,
        blocks: &[BlockHashes],
    ) -> std::io::Result<DiskState> {
        let mut s = DiskState::zeroes(path, size, generation)?;
        for (b, h) in (0..).zip(blocks) {
            if *h != zero_block(block_len(size, b)) {
                s.set(b, *h);
            }
        }
        if let Some(e) = s.failed.take() {
            return Err(std::io::Error::other(e));
        }
        s.commit(seq).map_err(std::io::Error::other)?;
        Ok(s)
    }

    /// Opens a committed table; `None` when absent, damaged, uncommitted or for another
    /// disk size (the disk is then compared in full).
    pub fn load(path: &Path, size: u64) -> Option<DiskState> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).ok()?;
        no_readahead(&file);
        let mut head = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut head, 0).ok()?;
        let slots = [parse_slot(&head[..SLOT_BYTES]), parse_slot(&head[SLOT_BYTES..])];
        let Some(h) = slots.into_iter().flatten().max_by_key(|h| h.counter) else {
            tracing::warn!(path = %path.display(), "agent state is damaged; the disk will be compared in full");
            return None;
        };
        let blocks = block_count(size);
        let len = file.metadata().ok()?.len();
        if !h.committed
            || h.size != size
            || h.blocks != blocks
            || len < HEADER_BYTES + blocks * ENTRY_LEN as u64
        {
            return None;
        }
        Some(DiskState::from_header(path, file, h))
    }

    fn from_header(path: &Path, file: File, h: Header) -> DiskState {
        DiskState {
            size: h.size,
            generation: h.generation,
            seq: h.seq,
            blocks: h.blocks,
            fill: h.fill,
            path: path.to_path_buf(),
            file,
            counter: h.counter,
            committed: h.committed,
            overlay: BTreeMap::new(),
            stamp: 0,
            failed: None,
            spills: 0,
            #[cfg(test)]
            entry_writes_fail: false,
            #[cfg(test)]
            crash_at: None,
        }
    }

    /// Blocks in the disk.
    pub fn len(&self) -> u64 {
        self.blocks
    }

    /// Changes waiting for the next commit.
    pub fn pending(&self) -> usize {
        self.overlay.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// The entries of blocks `first..last`.
    pub fn range(&mut self, first: u64, last: u64) -> Vec<BlockHashes> {
        let last = last.min(self.blocks);
        if first >= last {
            return Vec::new();
        }
        if self.failed.is_some() {
            return vec![UNKNOWN; usize::try_from(last - first).unwrap_or(0)];
        }
        let n = usize::try_from(last - first).unwrap_or(0);
        let mut buf = vec![0u8; n * ENTRY_LEN];
        // A hole of the table (never written: the fill) is not read.
        let hole = tern_core::blocks::is_hole(&self.file, entry_offset(first), entry_offset(last));
        if !hole && let Err(e) = self.file.read_exact_at(&mut buf, entry_offset(first)) {
            self.fail(&e);
            return vec![UNKNOWN; n];
        }
        let mut out: Vec<BlockHashes> =
            buf.chunks_exact(ENTRY_LEN).zip(first..).map(|(e, b)| self.decode(b, e)).collect();
        for (b, h) in self.overlay.range(first..last) {
            if let Some(slot) = usize::try_from(b - first).ok().and_then(|i| out.get_mut(i)) {
                *slot = h.0.as_deref().copied().unwrap_or(UNKNOWN);
            }
        }
        out
    }

    /// Whether blocks `first..last` are all zero blocks here without a read: a table whose
    /// never-written entries mean zero, a hole of it there, and no change in memory.
    pub fn zero_hole(&self, first: u64, last: u64) -> bool {
        let last = last.min(self.blocks);
        self.fill == Fill::Zero
            && self.failed.is_none()
            && first < last
            && self.overlay.range(first..last).next().is_none()
            && tern_core::blocks::is_hole(&self.file, entry_offset(first), entry_offset(last))
    }

    pub fn get(&mut self, block: u64) -> BlockHashes {
        self.range(block, block + 1).pop().unwrap_or(UNKNOWN)
    }

    /// Records what the receiver holds (or will hold, once the records being sent are
    /// durable) for `block`.
    pub fn set(&mut self, block: u64, h: BlockHashes) {
        if block >= self.blocks || self.failed.is_some() {
            return;
        }
        if !self.committed {
            if let Err(e) = self.write_entry(block, &h) {
                self.fail(&e);
            }
            return;
        }
        self.stamp += 1;
        self.overlay.insert(block, ((h != UNKNOWN).then(|| Box::new(h)), self.stamp));
        if self.overlay.len() > OVERLAY_MAX {
            self.spill();
        }
    }

    /// Too many changes to hold: the header stops vouching (durably) before the table is
    /// changed in place; the next commit vouches again.
    fn spill(&mut self) {
        tracing::info!(path = %self.path.display(), blocks = self.overlay.len(),
            "many blocks changed since the last point: the agent state is written in place until the next one");
        let r = self.write_header(false).and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            self.fail(&e);
            return;
        }
        self.committed = false;
        self.spills += 1;
        self.write_overlay();
    }

    fn write_overlay(&mut self) {
        let overlay = std::mem::take(&mut self.overlay);
        for (b, (h, _)) in overlay {
            if let Err(e) = self.write_entry(b, &h.map_or(UNKNOWN, |h| *h)) {
                self.fail(&e);
                return;
            }
        }
    }

    fn write_entry(&self, block: u64, h: &BlockHashes) -> std::io::Result<()> {
        #[cfg(test)]
        if self.entry_writes_fail {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.file.write_all_at(&encode(h), entry_offset(block))
    }

    /// Takes block hashes from a receiver (see `BlockHashes` in the protocol).
    pub fn fill_from(&mut self, first_block: u64, blocks: &[BlockHashes]) {
        for (b, h) in (first_block..).zip(blocks) {
            self.set(b, *h);
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
            let end = offset.saturating_add(length).div_ceil(block).min(self.blocks);
            for b in first..end {
                if self.get(b) != UNKNOWN {
                    self.set(b, UNKNOWN);
                    n += 1;
                }
            }
        }
        n
    }

    /// [`DiskState::forget`], but a block keeps its entry, with the receiver's values in
    /// place of its doubtful pages, when `pages` (page index to the receiver's value, see
    /// `DiskState.doubtful_pages`) has every page of it that the ranges touch and its entry
    /// holds page values (a full block, neither unknown nor coarse): the entry then
    /// describes the receiver's copy, and the next pass sends only the pages that differ.
    /// Returns the blocks kept so and the blocks forgotten.
    pub fn forget_but_pages(
        &mut self,
        ranges: impl Iterator<Item = (u64, u64)>,
        pages: &std::collections::HashMap<u64, tern_core::Digest>,
    ) -> (usize, usize) {
        use tern_core::blocks::{BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK, with_pages};
        let (block, page) = (BLOCK_SIZE as u64, PAGE_SIZE as u64);
        // Per block, the pages the ranges touch.
        let mut touched: std::collections::BTreeMap<u64, u16> = std::collections::BTreeMap::new();
        for (offset, length) in ranges {
            let end = offset.saturating_add(length).min(self.blocks * block);
            for p in offset / page..end.div_ceil(page) {
                *touched.entry(p / PAGES_PER_BLOCK as u64).or_default() |= 1 << (p % PAGES_PER_BLOCK as u64);
            }
        }
        let (mut kept, mut forgotten) = (0, 0);
        let full_blocks = self.size / block;
        for (b, mask) in touched {
            let old = self.get(b);
            let usable = b < full_blocks && old != UNKNOWN && !old.pages.contains(&tern_core::Digest::ZERO);
            let changed: Option<Vec<(usize, tern_core::Digest)>> = (0..PAGES_PER_BLOCK)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| pages.get(&(b * PAGES_PER_BLOCK as u64 + i as u64)).map(|v| (i, *v)))
                .collect();
            match changed.filter(|_| usable) {
                Some(changed) => {
                    self.set(b, with_pages(&old, &changed));
                    kept += 1;
                }
                None if old != UNKNOWN => {
                    self.set(b, UNKNOWN);
                    forgotten += 1;
                }
                None => {}
            }
        }
        (kept, forgotten)
    }

    /// The receiver has made everything up to `seq` durable (a point was acked): the table
    /// vouches for it from now on. Writes only the entries changed since the last commit.
    pub fn commit(&mut self, seq: Seq) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.write_overlay();
        // An entry that could not be written must not be vouched for.
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        #[cfg(test)]
        if self.crash_at == Some(CrashAt::Entries) {
            return Err("crash".into());
        }
        let r = self.file.sync_data().and_then(|()| {
            #[cfg(test)]
            if self.crash_at == Some(CrashAt::Synced) {
                return Err(std::io::Error::other("crash"));
            }
            self.seq = seq;
            self.write_header(true)
        });
        match r.and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.committed = true;
                note_write(&self.path, None);
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(e.to_string())
            }
        }
    }

    /// The changes since the last commit as they are now, to commit at `seq` once the
    /// receiver has acked it while the pass goes on (see `scan::save_progress`): every
    /// entry must be of a record up to `seq`. `None` when the table cannot commit so: not
    /// committed (a new table, or one that spilled: its file holds entries of records that
    /// may not be acked, which only a commit of the whole overlay may vouch for), or failed.
    pub fn snapshot(&self, seq: Seq) -> Option<Snapshot> {
        self.can_snapshot().then(|| Snapshot { seq, entries: self.overlay.clone(), spills: self.spills })
    }

    /// Whether [`DiskState::snapshot`] can take one now.
    pub fn can_snapshot(&self) -> bool {
        self.committed && self.failed.is_none()
    }

    /// Commits a snapshot (its seq acked): writes its entries, then the header at its seq;
    /// the changes made since stay in memory. `Ok(false)`, nothing written, when a commit
    /// since covers it or the overlay spilled since.
    pub fn commit_snapshot(&mut self, snap: Snapshot) -> Result<bool, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.committed || snap.spills != self.spills || snap.seq <= self.seq {
            return Ok(false);
        }
        for (b, (h, _)) in &snap.entries {
            if let Err(e) = self.write_entry(*b, &h.as_deref().copied().unwrap_or(UNKNOWN)) {
                self.fail(&e);
                return Err(e.to_string());
            }
        }
        let r = self.file.sync_data().and_then(|()| {
            let seq = std::mem::replace(&mut self.seq, snap.seq);
            self.write_header(true).inspect_err(|_| self.seq = seq)
        });
        if let Err(e) = r.and_then(|()| self.file.sync_data()) {
            self.fail(&e);
            return Err(e.to_string());
        }
        // What the table now holds leaves memory; a block changed since keeps its change.
        for (b, (_, stamp)) in snap.entries {
            if self.overlay.get(&b).is_some_and(|e| e.1 == stamp) {
                self.overlay.remove(&b);
            }
        }
        note_write(&self.path, None);
        Ok(true)
    }

    /// An I/O error made the table unusable: it answers "unknown" and commits nothing.
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    fn fail(&mut self, e: &std::io::Error) {
        if self.failed.is_none() {
            tracing::error!(path = %self.path.display(), error = %e,
                "agent state cannot be read or written: every block is sent again until the next session starts a new state");
            self.failed = Some(format!("{}: {e}", self.path.display()));
            note_write(&self.path, self.failed.clone());
            self.overlay.clear();
        }
    }

    fn decode(&self, block: u64, e: &[u8]) -> BlockHashes {
        if e[..32] == UNKNOWN_MARK {
            return UNKNOWN;
        }
        if e.iter().all(|&b| b == 0) {
            return match self.fill {
                Fill::Zero => zero_block(block_len(self.size, block)),
                Fill::Unknown => UNKNOWN,
            };
        }
        hashes_of(e)
    }

    /// Writes the next header slot (not synced).
    fn write_header(&mut self, committed: bool) -> std::io::Result<()> {
        let counter = self.counter + 1;
        let mut slot = Vec::with_capacity(SLOT_BYTES);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&VERSION.to_le_bytes());
        slot.push(u8::from(committed));
        slot.push(self.fill as u8);
        slot.extend_from_slice(&0u16.to_le_bytes());
        slot.extend_from_slice(&counter.to_le_bytes());
        slot.extend_from_slice(&self.size.to_le_bytes());
        slot.extend_from_slice(&self.blocks.to_le_bytes());
        slot.extend_from_slice(&self.seq.0.to_le_bytes());
        let generation = self.generation.as_bytes();
        let glen = generation.len().min(SLOT_BYTES - 128);
        slot.extend_from_slice(&u32::try_from(glen).unwrap_or(0).to_le_bytes());
        slot.extend_from_slice(&generation[..glen]);
        let check = blake3::hash(&slot);
        slot.extend_from_slice(check.as_bytes());
        let at = if counter.is_multiple_of(2) { SLOT_BYTES as u64 } else { 0 };
        #[cfg(test)]
        if self.crash_at == Some(CrashAt::TornHeader) {
            self.file.write_all_at(&slot[..slot.len() / 2], at)?;
            return Err(std::io::Error::other("crash"));
        }
        self.file.write_all_at(&slot, at)?;
        self.counter = counter;
        Ok(())
    }
}

/// The table is read a few entries at a time where a pass is: readahead would fill the page
/// cache with large folios over its holes, and then one 544-byte entry written into such a
/// folio writes the whole folio back (megabytes per point, measured), and fills the holes.
fn no_readahead(f: &File) {
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::Random);
}

/// An entry's block hash and page hashes, as written (the same layout in both formats).
fn hashes_of(e: &[u8]) -> BlockHashes {
    let d = |i: usize| Digest::from_slice(&e[i * 32..(i + 1) * 32]).unwrap_or(Digest::ZERO);
    let mut pages = [Digest::ZERO; PAGES_PER_BLOCK];
    for (i, p) in pages.iter_mut().enumerate() {
        *p = d(i + 1);
    }
    BlockHashes { block: d(0), pages }
}

fn entry_offset(block: u64) -> u64 {
    HEADER_BYTES + block * ENTRY_LEN as u64
}

fn encode(h: &BlockHashes) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    if *h == UNKNOWN {
        e[..32].copy_from_slice(&UNKNOWN_MARK);
        return e;
    }
    e[..32].copy_from_slice(&h.block.0);
    for (i, p) in h.pages.iter().enumerate() {
        e[(i + 1) * 32..(i + 2) * 32].copy_from_slice(&p.0);
    }
    e
}

struct Header {
    committed: bool,
    fill: Fill,
    counter: u64,
    size: u64,
    blocks: u64,
    seq: Seq,
    generation: String,
}

fn parse_slot(s: &[u8]) -> Option<Header> {
    if s.get(..8)? != MAGIC || s.get(8..12)? != VERSION.to_le_bytes() {
        return None;
    }
    let u64_at = |i: usize| s.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let glen = usize::try_from(u32::from_le_bytes(s.get(48..52)?.try_into().ok()?)).ok()?;
    let end = 52usize.checked_add(glen)?;
    if s.get(end..end + 32)? != blake3::hash(s.get(..end)?).as_bytes() {
        return None;
    }
    Some(Header {
        committed: *s.get(12)? == 1,
        fill: if *s.get(13)? == Fill::Zero as u8 { Fill::Zero } else { Fill::Unknown },
        counter: u64_at(16)?,
        size: u64_at(24)?,
        blocks: u64_at(32)?,
        seq: Seq(u64_at(40)?),
        generation: String::from_utf8(s.get(52..end)?.to_vec()).ok()?,
    })
}

/// The state file of agents before the table (`TERNAGT1`): the whole map in one file,
/// rewritten at every point. Read only, to convert it.
mod legacy_v1 {
    use super::*;

    pub fn load(path: &Path, size: u64) -> Option<(String, Seq, Vec<BlockHashes>)> {
        let buf = std::fs::read(path).ok()?;
        let (body, check) = buf.split_at(buf.len().checked_sub(32)?);
        if blake3::hash(body).as_bytes() != check || body.get(..8)? != b"TERNAGT1" {
            return None;
        }
        let u64_at = |i: usize| body.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        if body.get(8..12)? != 1u32.to_le_bytes() || u64_at(16)? != size {
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
        let blocks = table.chunks_exact(ENTRY_LEN).map(hashes_of).collect();
        Some((generation, seq, blocks))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use tern_core::blocks::hash_block;

    fn data_block(i: u8) -> BlockHashes {
        hash_block(&vec![i; tern_core::BLOCK_SIZE])
    }

    #[test]
    fn commit_load_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let size = 200_000;
        let mut s = DiskState::zeroes(&p, size, "gen1").unwrap();
        assert!(DiskState::load(&p, size).is_none(), "a table never committed is not trusted");
        s.set(1, UNKNOWN);
        s.set(2, data_block(2));
        s.commit(Seq(42)).unwrap();
        let mut l = DiskState::load(&p, size).unwrap();
        assert_eq!((l.seq, l.generation.as_str()), (Seq(42), "gen1"));
        assert_eq!(
            l.range(0, 4),
            vec![zero_block(65536), UNKNOWN, data_block(2), zero_block(size as usize - 3 * 65536)]
        );
        assert!(DiskState::load(&p, 300_000).is_none(), "another disk size");
        // A damaged header slot: the other one (the creation's, uncommitted) is not enough.
        let mut bytes = std::fs::read(&p).unwrap();
        let newest = if l.counter.is_multiple_of(2) { SLOT_BYTES } else { 0 };
        bytes[newest + 30] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(DiskState::load(&p, size).is_none());
    }

    /// Between commits changes stay in memory: a crash (dropping the state) before the
    /// next commit leaves the table as the last commit wrote it.
    #[test]
    fn changes_reach_the_file_only_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut s = DiskState::unknown(&p, 1 << 20, "g").unwrap();
        s.set(3, data_block(3));
        s.commit(Seq(7)).unwrap();
        s.set(3, data_block(4));
        s.set(5, data_block(5));
        assert_eq!(s.get(3), data_block(4), "the overlay answers reads");
        drop(s);
        let mut l = DiskState::load(&p, 1 << 20).unwrap();
        assert_eq!(l.seq, Seq(7));
        assert_eq!(l.get(3), data_block(3));
        assert_eq!(l.get(5), UNKNOWN, "the fill of a table made unknown");
        l.set(5, data_block(5));
        l.commit(Seq(9)).unwrap();
        let mut again = DiskState::load(&p, 1 << 20).unwrap();
        assert_eq!((again.seq, again.get(5), again.get(3)), (Seq(9), data_block(5), data_block(3)));
    }

    /// Past the overlay's bound the header stops vouching before the table changes in
    /// place: a crash then loads nothing (a full compare), never a mix passed as valid.
    /// A pass's save while it goes on: the snapshot's entries and seq reach the file; the
    /// changes made after it stay in memory until a later commit.
    #[test]
    fn a_snapshot_commits_what_it_took_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let size = 1 << 20;
        let mut s = DiskState::zeroes(&p, size, "g").unwrap();
        assert!(s.snapshot(Seq(1)).is_none(), "a table never committed holds its changes in place");
        s.commit(Seq(1)).unwrap();
        s.set(0, data_block(1));
        s.set(1, data_block(2));
        let snap = s.snapshot(Seq(5)).unwrap();
        s.set(1, data_block(3));
        s.set(2, data_block(4));
        assert_eq!(s.commit_snapshot(snap), Ok(true));
        assert_eq!(
            (s.get(0), s.get(1), s.get(2), s.seq),
            (data_block(1), data_block(3), data_block(4), Seq(5))
        );
        let mut l = DiskState::load(&p, size).unwrap();
        assert_eq!(l.seq, Seq(5));
        assert_eq!((l.get(0), l.get(1), l.get(2)), (data_block(1), data_block(2), zero_block(65536)));
        // The rest goes with the next commit.
        s.commit(Seq(8)).unwrap();
        let mut l = DiskState::load(&p, size).unwrap();
        assert_eq!((l.seq, l.get(1), l.get(2)), (Seq(8), data_block(3), data_block(4)));
    }

    /// Two snapshots pending, the block set back to the first one's value meanwhile: the
    /// first one's commit keeps that later change in memory, so the second one's commit
    /// does not leave the table saying what the block held in between.
    #[test]
    fn a_change_set_back_after_a_snapshot_stays_until_it_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut s = DiskState::zeroes(&p, 1 << 20, "g").unwrap();
        s.commit(Seq(1)).unwrap();
        s.set(0, data_block(1));
        let first = s.snapshot(Seq(10)).unwrap();
        s.set(0, data_block(2));
        let second = s.snapshot(Seq(15)).unwrap();
        s.set(0, data_block(1));
        assert_eq!(s.commit_snapshot(first), Ok(true));
        assert_eq!(s.commit_snapshot(second), Ok(true));
        assert_eq!(s.get(0), data_block(1), "the change after the second snapshot is kept");
        s.commit(Seq(18)).unwrap();
        assert_eq!(DiskState::load(&p, 1 << 20).unwrap().get(0), data_block(1));
    }

    /// A table of more blocks than the overlay holds, committed at seq 1: its path, blocks,
    /// disk size and state.
    fn past_the_overlay(dir: &Path) -> (PathBuf, u64, u64, DiskState) {
        let p = dir.join("s");
        let blocks = OVERLAY_MAX as u64 + 10;
        let size = blocks * tern_core::BLOCK_SIZE as u64;
        let mut s = DiskState::zeroes(&p, size, "g").unwrap();
        s.commit(Seq(1)).unwrap();
        (p, blocks, size, s)
    }

    /// A snapshot a later commit covers, or one from before a spill (the file then holds
    /// entries of records that may not be acked), commits nothing.
    #[test]
    fn a_snapshot_from_before_a_commit_or_a_spill_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (p, blocks, size, mut s) = past_the_overlay(dir.path());
        s.set(0, data_block(1));
        let old = s.snapshot(Seq(3)).unwrap();
        s.commit(Seq(4)).unwrap();
        assert_eq!(s.commit_snapshot(old), Ok(false));
        assert_eq!(DiskState::load(&p, size).unwrap().seq, Seq(4));
        s.set(1, data_block(2));
        let before_spill = s.snapshot(Seq(6)).unwrap();
        for b in 2..blocks {
            s.set(b, data_block(3));
        }
        assert!(s.snapshot(Seq(9)).is_none(), "spilled: not committed");
        assert_eq!(s.commit_snapshot(before_spill), Ok(false));
        assert!(DiskState::load(&p, size).is_none(), "still uncommitted after the refused snapshot");
    }

    #[test]
    fn a_spill_uncommits_before_it_writes_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (p, blocks, size, mut s) = past_the_overlay(dir.path());
        for b in 0..blocks {
            s.set(b, data_block(1));
        }
        assert!(s.overlay.len() < OVERLAY_MAX, "the overlay was written out");
        assert!(DiskState::load(&p, size).is_none(), "uncommitted while entries change in place");
        assert_eq!(s.get(0), data_block(1));
        assert_eq!(s.get(blocks - 1), data_block(1));
        s.commit(Seq(2)).unwrap();
        let mut l = DiskState::load(&p, size).unwrap();
        assert_eq!(l.range(0, blocks), vec![data_block(1); usize::try_from(blocks).unwrap()]);
        // Only the changed entries and the header are written: the file stays sparse.
        use std::os::unix::fs::MetadataExt;
        let big = DiskState::zeroes(&dir.path().join("big"), 64 << 30, "g").unwrap();
        let m = std::fs::metadata(&big.path).unwrap();
        assert!(
            m.len() > 500 << 20 && m.blocks() * 512 <= 64 << 10,
            "{} bytes, {} allocated",
            m.len(),
            m.blocks() * 512
        );
    }

    /// A state file of the older format (written here as that agent wrote it) becomes a
    /// committed table with the same entries, and the old file goes.
    #[test]
    fn an_older_state_file_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let size = 200_000u64;
        let blocks = vec![zero_block(65536), UNKNOWN, data_block(9), zero_block(size as usize - 3 * 65536)];
        let mut body = Vec::new();
        body.extend_from_slice(b"TERNAGT1");
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&4u64.to_le_bytes());
        body.extend_from_slice(&42u64.to_le_bytes());
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(b"gen1");
        for b in &blocks {
            body.extend_from_slice(&b.block.0);
            for p in &b.pages {
                body.extend_from_slice(&p.0);
            }
        }
        let check = blake3::hash(&body);
        body.extend_from_slice(check.as_bytes());
        let legacy = dir.path().join("disk-sda.state");
        std::fs::write(&legacy, body).unwrap();
        let mut s = DiskState::open_saved(dir.path(), "sda", size).unwrap();
        assert_eq!((s.seq, s.generation.as_str()), (Seq(42), "gen1"));
        assert_eq!(s.range(0, 4), blocks);
        assert!(!legacy.exists());
        let mut again = DiskState::open_saved(dir.path(), "sda", size).unwrap();
        assert_eq!(again.range(0, 4), blocks);
    }

    /// A commit whose entries cannot all be written writes no header: the last commit
    /// stays the one on disk.
    #[test]
    fn a_failed_entry_write_is_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut s = DiskState::zeroes(&p, 1 << 20, "g").unwrap();
        s.commit(Seq(1)).unwrap();
        s.set(2, data_block(2));
        // The entry cannot be written (a hole of the table on a full file system); the
        // header slots, in an allocated page, still could be.
        s.entry_writes_fail = true;
        assert!(s.commit(Seq(2)).is_err());
        assert_eq!(s.get(2), UNKNOWN, "a failed state answers unknown");
        let mut l = DiskState::load(&p, 1 << 20).unwrap();
        assert_eq!((l.seq, l.get(2)), (Seq(1), zero_block(65536)));
    }

    /// A crash at each step of a commit: the table loads as the last commit vouched for it
    /// (its seq; the blocks the crashed commit did not touch as they were). Entries the
    /// crashed commit wrote may be ahead of that seq — blocks that records after it wrote,
    /// which the receiver names at reconnect so the agent compares them again.
    #[test]
    fn a_crash_at_each_step_of_a_commit_loads_the_last_commit() {
        for step in [CrashAt::Entries, CrashAt::Synced, CrashAt::TornHeader] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s");
            let mut s = DiskState::zeroes(&p, 1 << 20, "g").unwrap();
            s.set(1, data_block(1));
            s.set(2, data_block(2));
            s.commit(Seq(10)).unwrap();
            s.set(2, data_block(20));
            s.set(3, data_block(30));
            s.crash_at = Some(step);
            assert!(s.commit(Seq(20)).is_err(), "{step:?}");
            drop(s);
            let mut l =
                DiskState::load(&p, 1 << 20).unwrap_or_else(|| panic!("{step:?}: the last commit loads"));
            assert_eq!(l.seq, Seq(10), "{step:?}");
            assert_eq!(l.get(1), data_block(1), "{step:?}: untouched by the crashed commit");
            assert_eq!(l.get(4), zero_block(65536), "{step:?}");
            for b in [2, 3] {
                let e = l.get(b);
                assert!(
                    e == data_block(20)
                        || e == data_block(30)
                        || e == data_block(2)
                        || e == zero_block(65536),
                    "{step:?}: block {b} is its old or its new entry"
                );
            }
            // And the next commit after the restart vouches for what it writes.
            l.set(3, data_block(31));
            l.commit(Seq(21)).unwrap();
            let mut again = DiskState::load(&p, 1 << 20).unwrap();
            assert_eq!((again.seq, again.get(3)), (Seq(21), data_block(31)), "{step:?}");
        }
    }

    #[test]
    fn forget_counts_what_it_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskState::zeroes(&dir.path().join("s"), 1 << 20, "g").unwrap();
        s.commit(Seq(1)).unwrap();
        assert_eq!(s.forget([(65536 + 10, 70000)].into_iter()), 2);
        assert_eq!(s.forget([(65536, 1)].into_iter()), 0, "already unknown");
        assert_eq!(s.get(1), UNKNOWN);
        assert_eq!(s.get(3), zero_block(65536));
    }

    /// A doubtful block keeps its entry, with the receiver's pages in place, when every
    /// doubtful page of it has the receiver's value; else it is forgotten, as is an entry
    /// without page values, and a page given but not doubtful is not taken.
    #[test]
    fn forget_but_pages_keeps_blocks_whose_doubtful_pages_the_receiver_gave() {
        use tern_core::blocks::{hash_block, page_value, with_pages};
        let dir = tempfile::tempdir().unwrap();
        // Four full blocks and a short one.
        let mut s = DiskState::zeroes(&dir.path().join("s"), 4 * 65536 + 8192, "g").unwrap();
        for b in 0..4 {
            s.set(b, data_block(b as u8 + 1));
        }
        s.commit(Seq(1)).unwrap();
        let coarse = BlockHashes { block: data_block(9).block, pages: [tern_core::Digest::ZERO; 16] };
        s.set(3, coarse);
        let new_page = page_value(&[7u8; 4096], 1);
        let pages: std::collections::HashMap<u64, tern_core::Digest> = [
            (1, new_page),                             // block 0, page 1
            (17, page_value(&[8u8; 4096], 1)),         // block 1, page 1 (page 2 missing)
            (2 * 16 + 5, page_value(&[9u8; 4096], 5)), // block 2: given, not doubtful
            (3 * 16, page_value(&[9u8; 4096], 0)),     // block 3: coarse entry
            (64, page_value(&[9u8; 4096], 0)),         // the short block
        ]
        .into_iter()
        .collect();
        let ranges = [(4096, 4096), (65536 + 4096, 8192), (3 * 65536, 4096), (4 * 65536, 4096)];
        let (kept, forgotten) = s.forget_but_pages(ranges.into_iter(), &pages);
        assert_eq!((kept, forgotten), (1, 3));
        assert_eq!(s.get(0), with_pages(&data_block(1), &[(1, new_page)]));
        // What the receiver holds, byte for byte: block 0 with page 1 rewritten.
        let mut bytes = vec![1u8; 65536];
        bytes[4096..8192].fill(7);
        assert_eq!(s.get(0).block, hash_block(&bytes).block);
        assert_eq!(s.get(1), UNKNOWN, "page 2 of block 1 was not given");
        assert_eq!(s.get(2), data_block(3), "not doubtful: unchanged");
        assert_eq!(s.get(3), UNKNOWN, "a coarse entry cannot take pages");
        assert_eq!(s.get(4), UNKNOWN, "the short block's pages do not merge");
    }
}
