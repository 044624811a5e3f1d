//! The io path of `--mode nbd`: every write the VM makes through the agent's NBD export is
//! applied to the local disk and appended, in the order it was applied, to the change log
//! that the session streams to the process server. A write is acked as soon as it is on
//! the local disk: the network is never waited for.
//!
//! One lock orders all disks of the VM, so a *mark* (a point's position) is one instant
//! across them: every write acked before it is in the log ahead of it, every later write
//! after it. Every position is therefore a crash-consistent cut.
//!
//! A point needs each disk's fingerprint at its mark. The blocks written since the last
//! mark are hashed afterwards, while writes go on: a write into a block not hashed yet
//! hashes the block's old content first (copy-before-write, of a hash only), so the hashes
//! are the mark's whatever happens after it.
//!
//! The log is bounded (`--log-buffer`): when the process server is away or slower than the
//! writes, the log is dropped, and the next session compares the disks with what the
//! server holds (a resync) before it streams again. Nothing written is ever lost: the disk
//! holds it, and a resync sends whatever differs.

use crate::activity::{ActivityLog, EXTENT};
use crate::nbd::Export;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_core::blocks::{BlockHashes, block_len, hash_block};
use tern_core::{BLOCK_SIZE, DiskName};

/// One entry of the change log.
#[derive(Debug)]
pub enum Item {
    Data {
        disk: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    /// A point's position: `Tracker::mark`'s id.
    Mark(u64),
}

/// What [`Tracker::next`] gives the session.
#[derive(Debug)]
pub enum Next {
    Item(Item),
    /// Nothing logged for a while.
    Idle,
    /// The log overflowed (or a write failed) and was dropped: resync.
    Overflowed,
}

/// An extent goes cold no sooner than this after its last write: a busy extent is not
/// marked hot again and again.
const RETIRE_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Disk {
    name: DiskName,
    size: u64,
    file: File,
}

/// The last write into a hot extent: the id of the first mark after it, and when.
type LastWrite = (u64, Instant);

/// Hashes of each disk's blocks at a mark, filled in after it.
#[derive(Debug)]
struct Snapshot {
    id: u64,
    /// Blocks written since the previous mark and not hashed yet, per disk.
    pending: Vec<BTreeSet<u64>>,
    /// Their hashes at the mark.
    done: Vec<BTreeMap<u64, BlockHashes>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// A session streams the log.
    logging: bool,
    overflowed: bool,
    queue: VecDeque<Item>,
    queued_bytes: usize,
    /// Blocks written since the last mark (or since logging started), per disk.
    dirty: Vec<BTreeSet<u64>>,
    snapshot: Option<Snapshot>,
    next_mark: u64,
    /// Per disk: the activity log, and the last write into each hot extent.
    activity: Vec<ActivityLog>,
    last_write: Vec<HashMap<u64, LastWrite>>,
}

/// Counters of a tracker, for status and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub queued_bytes: usize,
    pub logging: bool,
}

#[derive(Debug)]
pub struct Tracker {
    disks: Vec<Disk>,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Most bytes the log holds before it is dropped.
    capacity: usize,
}

impl Tracker {
    /// Opens each disk for reading and writing, and its activity log in `state_dir`. A
    /// disk without a usable log counts as hot all over: it is compared in full once.
    pub fn open(
        disks: &[(DiskName, std::path::PathBuf)],
        state_dir: &std::path::Path,
        capacity: usize,
    ) -> io::Result<Arc<Tracker>> {
        let mut open = Vec::new();
        let mut activity = Vec::new();
        for (name, path) in disks {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
            let size = tern_core::disk::DiskReader::open(path)?.size()?;
            let (mut log, usable) = ActivityLog::open(state_dir, name.as_str(), size)?;
            if !usable {
                log.all_hot()?;
            }
            activity.push(log);
            open.push(Disk { name: name.clone(), size, file });
        }
        let n = open.len();
        let inner = Inner {
            dirty: vec![BTreeSet::new(); n],
            activity,
            last_write: vec![HashMap::new(); n],
            ..Default::default()
        };
        Ok(Arc::new(Tracker { disks: open, inner: Mutex::new(inner), wake: Condvar::new(), capacity }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The NBD exports, one per disk, named after it.
    pub fn exports(self: &Arc<Self>) -> crate::nbd::Exports {
        Arc::new(
            (0..self.disks.len())
                .map(|i| {
                    let e: Arc<dyn Export> = Arc::new(DiskExport { tracker: self.clone(), disk: i });
                    (self.disks[i].name.to_string(), e)
                })
                .collect(),
        )
    }

    pub fn stats(&self) -> Stats {
        let g = self.lock();
        Stats { queued_bytes: g.queued_bytes, logging: g.logging }
    }

    /// A session starts streaming: the log starts empty here (the session's resync covers
    /// everything before), and every block counts as unchanged since this instant.
    pub fn start_logging(&self) {
        let mut g = self.lock();
        g.logging = true;
        g.overflowed = false;
        g.queue.clear();
        g.queued_bytes = 0;
        g.snapshot = None;
        for d in &mut g.dirty {
            d.clear();
        }
        // The resync compares every hot extent: once a mark after it is committed, those
        // not written since may go cold.
        let (mark, rested) =
            (g.next_mark, Instant::now().checked_sub(RETIRE_IDLE).unwrap_or_else(Instant::now));
        let inner = &mut *g;
        for (log, last) in inner.activity.iter().zip(&mut inner.last_write) {
            for e in log.hot() {
                last.entry(e).or_insert((mark, rested));
            }
        }
    }

    /// Byte ranges of each hot extent of `disk`: all that may differ from the agent's
    /// committed state.
    pub fn hot_ranges(&self, disk: usize) -> Vec<(u64, u64)> {
        let g = self.lock();
        let size = self.disks[disk].size;
        g.activity[disk].hot().into_iter().map(|e| (e * EXTENT, EXTENT.min(size - e * EXTENT))).collect()
    }

    /// Mark `id`'s point is acked and the agent's state committed: extents not written
    /// since, and rested, go cold.
    pub fn committed(&self, id: u64) {
        let mut g = self.lock();
        let now = Instant::now();
        let inner = &mut *g;
        for (disk, (log, last)) in inner.activity.iter_mut().zip(&mut inner.last_write).enumerate() {
            let cold: Vec<u64> = last
                .iter()
                .filter(|(_, (mark, at))| *mark <= id && now.duration_since(*at) >= RETIRE_IDLE)
                .map(|(e, _)| *e)
                .collect();
            if cold.is_empty() {
                continue;
            }
            match log.retire(&cold) {
                Ok(()) => {
                    for e in &cold {
                        last.remove(e);
                    }
                }
                Err(e) => tracing::warn!(disk = %self.disks[disk].name, error = %e,
                    "cannot update the activity log; its extents stay hot"),
            }
        }
    }

    /// The session ended: nothing streams the log, so it is not kept (the next session
    /// resyncs).
    pub fn stop_logging(&self) {
        let mut g = self.lock();
        g.logging = false;
        g.queue.clear();
        g.queued_bytes = 0;
        g.snapshot = None;
        for d in &mut g.dirty {
            d.clear();
        }
    }

    /// Marks the current position of the log for a point; `None` while no session streams
    /// it, or while the previous mark's hashes are not all taken.
    pub fn mark(&self) -> Option<u64> {
        let mut g = self.lock();
        if !g.logging || g.snapshot.is_some() {
            return None;
        }
        let id = g.next_mark;
        g.next_mark += 1;
        let pending = g.dirty.iter_mut().map(std::mem::take).collect();
        let done = vec![BTreeMap::new(); self.disks.len()];
        g.snapshot = Some(Snapshot { id, pending, done });
        g.queue.push_back(Item::Mark(id));
        drop(g);
        self.wake.notify_all();
        Some(id)
    }

    /// The next item of the log, waiting up to `wait` for one.
    pub fn next(&self, wait: Duration) -> Next {
        let mut g = self.lock();
        if g.queue.is_empty() && !g.overflowed {
            g = self.wake.wait_timeout(g, wait).map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        if g.overflowed || !g.logging {
            return Next::Overflowed;
        }
        match g.queue.pop_front() {
            Some(item) => {
                if let Item::Data { data, .. } = &item {
                    g.queued_bytes -= data.len();
                }
                Next::Item(item)
            }
            None => Next::Idle,
        }
    }

    /// Finishes mark `id`: hashes its blocks not hashed yet and returns, per disk, the
    /// hashes of every block written between the previous mark and this one, as they
    /// were at the mark. `None` if the mark was dropped (the log overflowed).
    pub fn mark_hashes(&self, id: u64) -> io::Result<Option<Vec<BTreeMap<u64, BlockHashes>>>> {
        loop {
            let mut g = self.lock();
            let Some(s) = g.snapshot.as_mut().filter(|s| s.id == id) else { return Ok(None) };
            let next = s.pending.iter().enumerate().find_map(|(d, p)| p.first().map(|b| (d, *b)));
            let Some((disk, block)) = next else {
                let s = g.snapshot.take().map(|s| s.done);
                return Ok(s);
            };
            // Under the lock, one block at a time: no write into it can come in between.
            self.preserve_block(s, disk, block)?;
        }
    }

    /// Hashes `block` of `disk` for the snapshot before a write changes it.
    fn preserve_block(&self, s: &mut Snapshot, disk: usize, block: u64) -> io::Result<()> {
        if !s.pending[disk].remove(&block) {
            return Ok(());
        }
        let d = &self.disks[disk];
        let mut buf = vec![0u8; block_len(d.size, block)];
        d.file.read_exact_at(&mut buf, block * BLOCK_SIZE as u64)?;
        s.done[disk].insert(block, hash_block(&buf));
        Ok(())
    }

    fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
        let b = BLOCK_SIZE as u64;
        offset / b..(offset + len).div_ceil(b)
    }

    /// Applies a change to the disk and logs it, in one step under the lock.
    fn change(
        &self,
        disk: usize,
        offset: u64,
        len: u64,
        apply: impl FnOnce(&File) -> io::Result<()>,
        item: impl FnOnce() -> Item,
    ) -> io::Result<()> {
        let d = &self.disks[disk];
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(s) = inner.snapshot.as_mut() {
            for b in Self::blocks(offset, len) {
                if let Err(e) = self.preserve_block(s, disk, b) {
                    // The mark cannot be hashed: drop it and resync rather than guess.
                    inner.snapshot = None;
                    self.overflow(inner);
                    return Err(e);
                }
            }
        }
        if inner.logging {
            inner.dirty[disk].extend(Self::blocks(offset, len));
        }
        let extents: Vec<u64> = (offset / EXTENT..(offset + len).div_ceil(EXTENT)).collect();
        let cold: Vec<u64> = extents.iter().copied().filter(|&e| !inner.activity[disk].is_hot(e)).collect();
        if !cold.is_empty() {
            // Durably hot before the write: a crash from here on compares these extents.
            inner.activity[disk].mark_hot(&cold).map_err(|e| {
                tracing::error!(disk = %d.name, error = %e, "cannot write the activity log in the state directory; \
                    the write is refused, as a crash could then lose track of it");
                e
            })?;
        }
        let stamp = (inner.next_mark, Instant::now());
        for e in extents {
            inner.last_write[disk].insert(e, stamp);
        }
        if let Err(e) = apply(&d.file) {
            // Part of it may be on the disk and not in the log: only a resync can tell.
            self.overflow(inner);
            return Err(e);
        }
        if inner.logging {
            let item = item();
            let bytes = if let Item::Data { data, .. } = &item { data.len() } else { 0 };
            if inner.queued_bytes + bytes > self.capacity {
                tracing::warn!(
                    capacity = self.capacity,
                    "the change log is full (the process server is away or slower \
                    than the writes); dropping it: the disks are compared with the server's copy once it catches up"
                );
                self.overflow(inner);
            } else {
                inner.queued_bytes += bytes;
                inner.queue.push_back(item);
            }
        }
        drop(g);
        self.wake.notify_all();
        Ok(())
    }

    fn overflow(&self, g: &mut Inner) {
        if g.logging {
            g.overflowed = true;
        }
        g.queue.clear();
        g.queued_bytes = 0;
        g.snapshot = None;
    }

    fn write(&self, disk: usize, data: &[u8], offset: u64) -> io::Result<()> {
        let len = data.len() as u64;
        self.change(
            disk,
            offset,
            len,
            |f| f.write_all_at(data, offset),
            || Item::Data { disk, offset, data: data.to_vec() },
        )
    }

    fn zero(&self, disk: usize, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        self.change(
            disk,
            offset,
            len,
            |f| crate::nbd::zero_range(f, offset, len, keep_allocated),
            || Item::Zero { disk, offset, len },
        )
    }

    /// Writes are durable on the local disk. They are durably recorded for replication
    /// too: a restarted agent compares its disks with the server's copy before it streams.
    fn flush(&self, disk: usize) -> io::Result<()> {
        self.disks[disk].file.sync_data()
    }

    pub fn disk_size(&self, disk: usize) -> u64 {
        self.disks[disk].size
    }
}

#[derive(Debug)]
struct DiskExport {
    tracker: Arc<Tracker>,
    disk: usize,
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.tracker.disks[self.disk].size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.tracker.disks[self.disk].file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.tracker.write(self.disk, data, offset)?;
        if fua { self.tracker.flush(self.disk) } else { Ok(()) }
    }
    fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> io::Result<()> {
        self.tracker.zero(self.disk, offset, len, keep_allocated)?;
        if fua { self.tracker.flush(self.disk) } else { Ok(()) }
    }
    fn flush(&self) -> io::Result<()> {
        self.tracker.flush(self.disk)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn tracker(dir: &std::path::Path, capacity: usize) -> Arc<Tracker> {
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 4 * BLOCK_SIZE]).unwrap();
        Tracker::open(&[(DiskName::new("sda").unwrap(), path)], dir, capacity).unwrap()
    }

    fn drain(t: &Tracker) -> Vec<Item> {
        let mut out = Vec::new();
        while let Next::Item(i) = t.next(Duration::ZERO) {
            out.push(i);
        }
        out
    }

    #[test]
    fn a_mark_hashes_the_blocks_as_they_were_at_the_mark_whatever_is_written_after() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path(), 1 << 20);
        t.start_logging();
        let a = vec![1u8; BLOCK_SIZE];
        t.write(0, &a, 0).unwrap();
        t.write(0, &[2u8; 10], (2 * BLOCK_SIZE) as u64).unwrap();
        let id = t.mark().unwrap();
        assert!(t.mark().is_none(), "one mark at a time");
        // Written after the mark, before its hashes are taken: copy-before-write keeps the old.
        t.write(0, &[9u8; 100], 50).unwrap();
        t.zero(0, 2 * BLOCK_SIZE as u64, 10, false).unwrap();
        let items = drain(&t);
        let kinds: Vec<&str> = items
            .iter()
            .map(|i| match i {
                Item::Data { .. } => "data",
                Item::Zero { .. } => "zero",
                Item::Mark(_) => "mark",
            })
            .collect();
        assert_eq!(kinds, ["data", "data", "mark", "data", "zero"]);
        let hashes = t.mark_hashes(id).unwrap().unwrap();
        assert_eq!(hashes[0].keys().copied().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(hashes[0][&0], hash_block(&a));
        let mut b2 = vec![0u8; BLOCK_SIZE];
        b2[..10].fill(2);
        assert_eq!(hashes[0][&2], hash_block(&b2));
        // The next mark covers what was written after this one.
        let next = t.mark().unwrap();
        drain(&t);
        let hashes = t.mark_hashes(next).unwrap().unwrap();
        assert_eq!(hashes[0].keys().copied().collect::<Vec<_>>(), [0, 2]);
        let mut b0 = a.clone();
        b0[50..150].fill(9);
        assert_eq!(hashes[0][&0], hash_block(&b0));
        assert_eq!(hashes[0][&2], hash_block(&vec![0u8; BLOCK_SIZE]));
    }

    #[test]
    fn a_full_log_is_dropped_and_says_so_but_the_disk_keeps_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path(), 100);
        // Not logging (no session): the write lands, nothing is queued.
        t.write(0, &[5u8; 10], 0).unwrap();
        assert!(matches!(t.next(Duration::ZERO), Next::Overflowed));
        t.start_logging();
        t.write(0, &[6u8; 60], 0).unwrap();
        let id = t.mark().unwrap();
        t.write(0, &[7u8; 60], 100).unwrap();
        assert!(matches!(t.next(Duration::ZERO), Next::Overflowed));
        assert!(t.mark_hashes(id).unwrap().is_none(), "the mark went with the log");
        let mut buf = [0u8; 160];
        t.disks[0].file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..60], &[6u8; 60][..]);
        assert_eq!(&buf[100..], &[7u8; 60][..]);
        // The next session starts a fresh log.
        t.start_logging();
        t.write(0, &[8u8; 60], 0).unwrap();
        assert!(matches!(t.next(Duration::ZERO), Next::Item(Item::Data { .. })));
    }
}
