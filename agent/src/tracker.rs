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
//! The log's memory is bounded (`--log-buffer`, counting the writes sent and not yet
//! acked too): when the process server is away or slower than the writes, the log goes on
//! in the state directory (`spill.log`, up to `--spill-max`), through a dropped link too.
//! Past that the log is dropped, and the next session compares the hot extents with what
//! the server holds (a resync) before it streams again. Nothing written is ever lost: the
//! disk holds it, and a resync sends whatever differs.

use crate::activity::{ActivityLog, EXTENT};
use crate::changes::{Changes, RangeSet, Update};
use crate::nbd::Export;
use crate::spill::Spill;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_core::blocks::{block_len, hash_block, page_value};
use tern_core::{BLOCK_SIZE, DiskName, PAGE_SIZE, PAGES_PER_BLOCK};

/// One entry of the change log.
#[derive(Debug)]
pub enum Item {
    Data {
        disk: usize,
        offset: u64,
        /// The write's own buffer, counted in the log's memory while anything holds it
        /// ([`Tracker::hold`]).
        data: bytes::Bytes,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    /// A point's position: `Tracker::mark`'s id.
    Mark(u64),
    /// The writes after it were made at this Unix millisecond (or later, before the next
    /// time item): logged whenever the clock has moved since the last one.
    Time(i64),
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
/// marked hot again and again. Each extent marked hot is a synced write under the lock
/// every write takes, so a workload that pauses longer than this and resumes across many
/// extents holds the VM's writes while it marks them: with 30 s, fio's random writes over
/// 1 GiB resuming after a 30 s pause held them for 1-2 s (bench/nbd.sh, point lag p99
/// 2.3-3.4 s; 1.3 s with 5 min). After a crash the agent compares what was written in the
/// last five minutes, not only the last 30 s.
const RETIRE_IDLE: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Disk {
    name: DiskName,
    size: u64,
    file: File,
}

/// The log's reader, woken by a write, waits this long for more before it reads: at
/// most a millisecond of delay, and far fewer wake-ups under many small writes.
const COALESCE: Duration = Duration::from_millis(1);
const COALESCE_ITEMS: usize = 64;

/// The last write into a hot extent: the id of the first mark after it, and when.
type LastWrite = (u64, Instant);

/// Hashes of each disk's changes at a mark, filled in after it.
#[derive(Debug)]
struct Snapshot {
    id: u64,
    /// Pages written since the previous mark and not hashed yet, per disk.
    pending: Vec<BTreeSet<u64>>,
    hashes: MarkHashes,
}

/// Per disk, what changed between a mark and the one before, as it was at the mark.
#[derive(Debug, Default)]
pub struct MarkHashes {
    /// Changed blocks' new page values (or whole entries).
    pub updates: Vec<BTreeMap<u64, Update>>,
    /// Blocks that were all zeroes.
    pub zeroed: Vec<RangeSet>,
}

#[derive(Debug, Default)]
struct Inner {
    /// A session streams the log.
    logging: bool,
    overflowed: bool,
    queue: VecDeque<Item>,
    queued_bytes: usize,
    /// What changed since the last mark (or since logging started), per disk.
    dirty: Vec<Changes>,
    snapshot: Option<Snapshot>,
    next_mark: u64,
    /// The log's reader waits for an item: a write wakes it.
    waiting: bool,
    /// Where the log goes on once its memory is full.
    spill: Option<Spill>,
    /// Bytes of writes in the log, per disk.
    backlog: Vec<u64>,
    /// Extents written since the log last started, per disk.
    touched: Vec<BTreeSet<u64>>,
    /// Per disk: the activity log, and the last write into each hot extent.
    activity: Vec<ActivityLog>,
    last_write: Vec<HashMap<u64, LastWrite>>,
    /// The newest time logged: times in the log never go down, whatever the clock does.
    last_time: i64,
    /// A multi-VM barrier holds the VM's new writes (they wait in `change`) until released.
    held: bool,
    /// The agent is stopping and has sealed its disks: writes are refused.
    sealed: bool,
    /// Per disk: its seal says the agent runs (written before the run's first write).
    unsealed: Vec<bool>,
    /// Per disk: the file's modification and change times as the agent last saw them, just
    /// after its own last write (or when opened, or when another writer was last noticed).
    /// Times that differ are another writer's. `None`: not watched (a block device, whose
    /// node's times say nothing of its writes; a network file system, whose times are its
    /// server's clock).
    own_write: Vec<Option<FileTimes>>,
    /// Per disk: the file's size was seen to differ from the export's (said once).
    size_told: Vec<bool>,
}

/// Counters of a tracker, for status and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub queued_bytes: usize,
    pub spilled_bytes: u64,
    pub logging: bool,
}

#[derive(Debug)]
pub struct Tracker {
    state_dir: std::path::PathBuf,
    disks: Vec<Disk>,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Writes held by a barrier wait on this for its release.
    resume: Condvar,
    /// Most bytes of writes the log holds in memory (past it, it spills).
    capacity: usize,
    /// The write data held in memory: in the log, in the streamer's batches, sent and not
    /// acked, and the resync's records.
    memory: Memory,
}

/// Bytes of write data held in memory, each buffer counted from its making until the last
/// holder lets go of it: the log's memory (`--log-buffer`) is measured by it, and the
/// resync's records count in it too while they wait to be sent.
#[derive(Debug, Clone, Default)]
pub struct Memory(Arc<AtomicUsize>);

impl Memory {
    /// `data` as a buffer counted here until the last of its records (in the log, a batch,
    /// or sent and kept until acked) lets go of it.
    pub fn hold(&self, data: Vec<u8>) -> bytes::Bytes {
        self.0.fetch_add(data.len(), Ordering::Relaxed);
        bytes::Bytes::from_owner(Held { data, count: self.0.clone() })
    }

    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Held {
    data: Vec<u8>,
    count: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.count.fetch_sub(self.data.len(), Ordering::Relaxed);
    }
}

impl Inner {
    /// Forgets the log, in memory and spilled, and the mark being hashed.
    fn drop_log(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
        self.backlog.iter_mut().for_each(|b| *b = 0);
        self.snapshot = None;
        if let Some(s) = &mut self.spill {
            s.reset();
        }
    }

    /// Logs the time before a write, when the clock has moved since the last one.
    fn stamp(&mut self, room: bool) -> Result<(), String> {
        let now = crate::now_ms();
        if now > self.last_time {
            self.last_time = now;
            self.append(Item::Time(now), room)?;
        }
        Ok(())
    }

    fn spilling(&self) -> bool {
        self.spill.as_ref().is_some_and(Spill::is_active)
    }

    /// Appends to the log: in memory while it has `room` (the writes it holds, counted
    /// with this one, are within its memory) and nothing waits in the spill, else to the
    /// spill. An error says why the log had to be dropped.
    fn append(&mut self, item: Item, room: bool) -> Result<(), String> {
        let bytes = if let Item::Data { data, .. } = &item { data.len() } else { 0 };
        if let Item::Data { disk, .. } = &item
            && let Some(b) = self.backlog.get_mut(*disk)
        {
            *b += bytes as u64;
        }
        if !self.spilling() && room {
            self.queued_bytes += bytes;
            self.queue.push_back(item);
            return Ok(());
        }
        let Some(spill) = &mut self.spill else { return Err("the change log is full".into()) };
        match spill.push(&item) {
            Ok(true) => Ok(()),
            Ok(false) => {
                Err("the change log is full in memory and in the state directory (--spill-max)".into())
            }
            Err(e) => Err(format!("the change log cannot spill to the state directory: {e}")),
        }
    }

    /// The oldest item of the log; `hold` counts a write read back from the spill.
    fn pop(&mut self, hold: impl FnOnce(Vec<u8>) -> bytes::Bytes) -> Result<Option<Item>, String> {
        let item = match self.queue.pop_front() {
            Some(item) => {
                if let Item::Data { data, .. } = &item {
                    self.queued_bytes -= data.len();
                }
                Some(item)
            }
            None => match &mut self.spill {
                Some(s) => s
                    .pop(hold)
                    .map_err(|e| format!("reading the change log back from the state directory: {e}"))?,
                None => None,
            },
        };
        if let Some(Item::Data { disk, data, .. }) = &item
            && let Some(b) = self.backlog.get_mut(*disk)
        {
            *b = b.saturating_sub(data.len() as u64);
        }
        Ok(item)
    }
}

impl Tracker {
    /// Opens each disk for reading and writing, and its activity log in `state_dir`. A
    /// disk without a usable log counts as hot all over: it is compared in full once. The
    /// log holds `capacity` bytes of writes in memory, then up to `spill_max` in the
    /// state directory.
    pub fn open(
        disks: &[(DiskName, std::path::PathBuf)],
        state_dir: &std::path::Path,
        capacity: usize,
        spill_max: u64,
    ) -> io::Result<Arc<Tracker>> {
        let mut open = Vec::new();
        let mut activity = Vec::new();
        let mut unsealed = Vec::new();
        let mut own_write = Vec::new();
        for (name, path) in disks {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
            // One agent serves a disk: writes through a second would never reach this one's
            // change log, nor the process server.
            if !tern_core::disk::try_lock_exclusive(&file)? {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "disk {name} ({}) is served by another nbd-mode agent (it holds the disk's lock); \
                         one agent serves a disk",
                        path.display()
                    ),
                ));
            }
            let size = tern_core::disk::DiskReader::open(path)?.size()?;
            let (log, _, clean) = ActivityLog::open_sealed(state_dir, name.as_str(), size, &file)?;
            activity.push(log);
            unsealed.push(!clean);
            let meta = file.metadata()?;
            let watched = meta.is_file() && crate::local_file_system(&file);
            own_write.push(watched.then(|| file_times(&meta)));
            open.push(Disk { name: name.clone(), size, file });
        }
        let n = open.len();
        let inner = Inner {
            unsealed,
            own_write,
            size_told: vec![false; n],
            dirty: (0..n).map(|_| Changes::default()).collect(),
            activity,
            last_write: vec![HashMap::new(); n],
            spill: Some(Spill::new(state_dir.join("spill.log"), spill_max)),
            backlog: vec![0; n],
            touched: vec![BTreeSet::new(); n],
            ..Default::default()
        };
        Ok(Arc::new(Tracker {
            state_dir: state_dir.to_path_buf(),
            disks: open,
            inner: Mutex::new(inner),
            wake: Condvar::new(),
            resume: Condvar::new(),
            capacity,
            memory: Memory::default(),
        }))
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
        let spilled = g.spill.as_ref().map_or(0, Spill::bytes);
        Stats { queued_bytes: g.queued_bytes, spilled_bytes: spilled, logging: g.logging }
    }

    /// The log runs (a session streams it, and it was not dropped).
    pub fn logging(&self) -> bool {
        self.lock().logging
    }

    /// How each disk is tracked: regime, bytes waiting in the log, bytes of hot extents.
    pub fn tracking(&self, resync: bool) -> Vec<(&'static str, u64, u64)> {
        let g = self.lock();
        let regime = match (resync, g.spilling()) {
            (true, _) => "resync",
            (false, true) => "spill",
            (false, false) => "log",
        };
        (0..self.disks.len())
            .map(|i| {
                let hot = g.activity[i].hot().len() as u64 * EXTENT;
                (regime, g.backlog[i], hot.min(self.disks[i].size))
            })
            .collect()
    }

    /// A session starts streaming: the log starts empty here (the session's resync covers
    /// everything before), and every block counts as unchanged since this instant.
    pub fn start_logging(&self) {
        let mut g = self.lock();
        self.start(&mut g);
    }

    fn start(&self, g: &mut Inner) {
        g.logging = true;
        g.overflowed = false;
        g.drop_log();
        // Every run of the log starts with its time: its reader knows when each write was.
        g.last_time = g.last_time.max(crate::now_ms());
        g.queue.push_back(Item::Time(g.last_time));
        for d in &mut g.dirty {
            d.clear();
        }
        for t in &mut g.touched {
            t.clear();
        }
        // The resync compares every hot extent: once a mark after it is committed, those
        // not written since may go cold.
        let (mark, rested) =
            (g.next_mark, Instant::now().checked_sub(RETIRE_IDLE).unwrap_or_else(Instant::now));
        for (log, last) in g.activity.iter().zip(&mut g.last_write) {
            for e in log.hot() {
                last.entry(e).or_insert((mark, rested));
            }
        }
    }

    /// The log overflowed during a resync: starts it again and returns, per disk, the byte
    /// ranges written since it last started (which the resync must compare again).
    pub fn restart_logging(&self) -> Vec<Vec<(u64, u64)>> {
        let mut g = self.lock();
        let written: Vec<Vec<(u64, u64)>> = g
            .touched
            .iter()
            .zip(&self.disks)
            .map(|(t, d)| t.iter().map(|&e| (e * EXTENT, EXTENT.min(d.size - e * EXTENT))).collect())
            .collect();
        self.start(&mut g);
        written
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
                    "cannot update the activity log; its extents stay hot on disk"),
            }
        }
    }

    /// The session ended: nothing streams the log, so it is not kept (the next session
    /// resyncs).
    pub fn stop_logging(&self) {
        let mut g = self.lock();
        g.logging = false;
        g.held = false;
        self.resume.notify_all();
        g.drop_log();
        for d in &mut g.dirty {
            d.clear();
        }
    }

    /// Marks the current position of the log for a point; `None` while no session streams
    /// it, or while the previous mark's hashes are not all taken. Returns the mark's id and
    /// time (on the clock of the log's time items: every write before it is at or before).
    pub fn mark(&self) -> Option<(u64, i64)> {
        self.mark_and_hold(false)
    }

    /// `data` as a buffer the log's memory counts (see [`Memory`]). What the streamer makes
    /// of a write (a compressed copy) is counted too: the log's memory is the writes' memory.
    pub fn hold(&self, data: Vec<u8>) -> bytes::Bytes {
        self.memory.hold(data)
    }

    /// What the log's memory counts, for a resync to count its records in.
    pub fn memory(&self) -> Memory {
        self.memory.clone()
    }

    /// Bytes of write data held in memory.
    pub fn held_bytes(&self) -> usize {
        self.memory.bytes()
    }

    /// Whether the log has room in memory for what is held now (a new write counted).
    fn room(&self) -> bool {
        self.held_bytes() <= self.capacity
    }

    /// A mark's hashes are still being taken (its point is not out yet).
    pub fn marking(&self) -> bool {
        self.lock().snapshot.is_some()
    }

    /// Releases the writes a [`Tracker::mark_and_hold`] held.
    pub fn release_hold(&self) {
        self.lock().held = false;
        self.resume.notify_all();
    }

    /// A mark, and with `hold` the VM's new writes wait from the mark on until
    /// [`Tracker::release_hold`] (or the log stops): a multi-VM barrier, where every
    /// member's cut must be one moment.
    pub fn mark_and_hold(&self, hold: bool) -> Option<(u64, i64)> {
        let mut g = self.lock();
        if !g.logging || g.snapshot.is_some() {
            return None;
        }
        if self.foreign_writes(&mut g) {
            return None;
        }
        g.held = hold;
        let time = crate::now_ms().max(g.last_time);
        let id = g.next_mark;
        g.next_mark += 1;
        let changes: Vec<Changes> = g.dirty.iter_mut().map(std::mem::take).collect();
        let n = changes.len();
        let mut hashes = MarkHashes { updates: vec![BTreeMap::new(); n], zeroed: Vec::new() };
        let mut pending = Vec::new();
        for c in changes {
            pending.push(c.pages);
            hashes.zeroed.push(c.zeroed);
        }
        g.snapshot = Some(Snapshot { id, pending, hashes });
        if let Err(e) = g.append(Item::Mark(id), self.room()) {
            self.drop_logged(&mut g, &e);
        }
        drop(g);
        self.wake.notify_all();
        Some((id, time))
    }

    /// The next item of the log, waiting up to `wait` for one.
    pub fn next(&self, wait: Duration) -> Next {
        let mut g = self.lock();
        if g.queue.is_empty() && !g.spilling() && !g.overflowed {
            g.waiting = true;
            g = self.wake.wait_timeout(g, wait).map_or_else(|p| p.into_inner().0, |(g, _)| g);
            g.waiting = false;
            if !g.queue.is_empty() && g.queue.len() < COALESCE_ITEMS && !wait.is_zero() {
                // Woken by one write: let a few more come, so that the reader is not woken
                // (and a batch not sent) for each write.
                drop(g);
                std::thread::sleep(COALESCE);
                g = self.lock();
            }
        }
        if g.overflowed || !g.logging {
            return Next::Overflowed;
        }
        match g.pop(|v| self.hold(v)) {
            Ok(Some(item)) => Next::Item(item),
            Ok(None) => Next::Idle,
            Err(e) => {
                self.drop_logged(&mut g, &e);
                Next::Overflowed
            }
        }
    }

    /// Finishes mark `id`: hashes its pages not hashed yet and returns what changed
    /// between the previous mark and this one, as it was at the mark. `None` if the mark
    /// was dropped (the log overflowed).
    pub fn mark_hashes(&self, id: u64) -> io::Result<Option<MarkHashes>> {
        loop {
            let mut g = self.lock();
            let Some(s) = g.snapshot.as_mut().filter(|s| s.id == id) else { return Ok(None) };
            // A few pages per turn of the lock: writers wait only that long.
            let next: Vec<(usize, u64)> = s
                .pending
                .iter()
                .enumerate()
                .flat_map(|(d, p)| p.iter().map(move |&q| (d, q)))
                .take(16)
                .collect();
            if next.is_empty() {
                // Hashed from the disk: only when nothing else wrote it meanwhile are they
                // what was sent.
                if self.foreign_writes(&mut g) {
                    return Ok(None);
                }
                return Ok(g.snapshot.take().map(|s| s.hashes));
            }
            for (disk, page) in next {
                self.preserve_page(s, disk, page)?;
            }
        }
    }

    /// Hashes `page` of `disk` for the snapshot before a write changes it (the whole
    /// block for the disk's short last block).
    fn preserve_page(&self, s: &mut Snapshot, disk: usize, page: u64) -> io::Result<()> {
        if !s.pending[disk].remove(&page) {
            return Ok(());
        }
        let d = &self.disks[disk];
        let per = PAGES_PER_BLOCK as u64;
        let block = page / per;
        let len = block_len(d.size, block);
        if len < BLOCK_SIZE {
            let mut buf = vec![0u8; len];
            d.file.read_exact_at(&mut buf, block * BLOCK_SIZE as u64)?;
            for q in block * per..(block + 1) * per {
                s.pending[disk].remove(&q);
            }
            s.hashes.updates[disk].insert(block, Update::Whole(Box::new(hash_block(&buf))));
            return Ok(());
        }
        let mut buf = [0u8; PAGE_SIZE];
        d.file.read_exact_at(&mut buf, page * PAGE_SIZE as u64)?;
        let index = usize::try_from(page % per).unwrap_or(0);
        let v = page_value(&buf, index);
        match s.hashes.updates[disk].entry(block).or_insert_with(|| Update::Pages(Vec::new())) {
            Update::Pages(p) => p.push((index, v)),
            Update::Whole(_) => {}
        }
        Ok(())
    }

    /// Applies a change to the disk and logs it, in one step under the lock.
    fn change(
        &self,
        disk: usize,
        offset: u64,
        len: u64,
        item: Item,
        apply: impl FnOnce(&File, &Item) -> io::Result<()>,
    ) -> io::Result<()> {
        let zero = matches!(item, Item::Zero { .. });
        let d = &self.disks[disk];
        let mut g = self.lock();
        // A write that comes once the agent is stopping waits, never answered: the process
        // ends, the client sees the connection go and sends it again to the next agent (an
        // error would reach the guest's file system).
        while g.held || g.sealed {
            g = self.resume.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        // Before this write moves the disk's modification time past another writer's.
        self.foreign_write(&mut g, disk);
        let inner = &mut *g;
        if let Some(s) = inner.snapshot.as_mut() {
            let p = PAGE_SIZE as u64;
            let (mut first, mut end) = (offset / p, (offset + len).div_ceil(p));
            // The disk's short last block is hashed whole: a write into any of its pages
            // saves it if one of them waits.
            let per = PAGES_PER_BLOCK as u64;
            let last = d.size / BLOCK_SIZE as u64;
            if !d.size.is_multiple_of(BLOCK_SIZE as u64) && end > last * per {
                first = first.min(last * per);
                end = end.max((last + 1) * per);
            }
            let hit: Vec<u64> = s.pending[disk].range(first..end).copied().collect();
            for page in hit {
                if let Err(e) = self.preserve_page(s, disk, page) {
                    // The mark cannot be hashed: drop it and resync rather than guess.
                    inner.snapshot = None;
                    self.overflow(inner);
                    return Err(e);
                }
            }
        }
        if inner.logging {
            let c = &mut inner.dirty[disk];
            if zero { c.zeroed(offset, len, d.size) } else { c.written(offset, len) }
        }
        if !inner.unsealed[disk] {
            // From the first write on, the disk's times are no longer those of a clean stop.
            crate::activity::Seal::of(&d.file, d.size, false)
                .and_then(|s| s.running().write(&self.state_dir, d.name.as_str()))
                .map_err(|e| {
                    tracing::error!(disk = %d.name, error = %e, "cannot write the disk's seal in the state directory; \
                        the write is refused, as a later start could then take the disk for unchanged");
                    e
                })?;
            inner.unsealed[disk] = true;
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
            inner.touched[disk].insert(e);
        }
        let applied = apply(&d.file, &item);
        if let Some(seen) = inner.own_write[disk].as_mut() {
            // Looked at right after: on a kernel with fine-grained timestamps (6.13 on), a
            // file's times looked at are fine-grained at its next change, so that a write
            // by another writer in the same clock tick still moves them (W18-C: it did not,
            // within a tick of the agent's own write, as the times were compared with the
            // clock instead).
            if let Ok(meta) = d.file.metadata() {
                *seen = file_times(&meta);
            }
        }
        if let Err(e) = applied {
            // Part of it may be on the disk and not in the log: only a resync can tell.
            self.overflow(inner);
            return Err(e);
        }
        if inner.logging
            && let Err(e) = inner.stamp(self.room()).and_then(|()| inner.append(item, self.room()))
        {
            self.drop_logged(inner, &e);
        }
        let wake = inner.waiting || inner.overflowed;
        drop(g);
        if wake {
            self.wake.notify_all();
        }
        Ok(())
    }

    /// Whether any disk was written by something other than this agent (see
    /// [`Tracker::foreign_write`]).
    fn foreign_writes(&self, g: &mut Inner) -> bool {
        let mut any = false;
        for disk in 0..self.disks.len() {
            any |= self.foreign_write(g, disk);
        }
        any
    }

    /// Whether the disk file was written by something other than this agent since the
    /// agent last wrote it (or opened it): its modification time is past that (a write
    /// sets it to the time it is made, or earlier on a coarse clock, never later). What
    /// the agent knows of the disk then holds no more (W18-B: `cp` of a backup over the
    /// file left the copy silently different; a `dd` into a page the VM had written made
    /// every later point fail its check, as its hash was read from the disk): the mark in
    /// progress is dropped, every extent goes hot and the log is dropped, so that the
    /// session compares the whole disk with the server's copy. Called under the lock,
    /// where the agent's own writes are made.
    fn foreign_write(&self, g: &mut Inner, disk: usize) -> bool {
        let d = &self.disks[disk];
        let Some(own) = g.own_write[disk] else { return false };
        let Ok(meta) = d.file.metadata() else { return false };
        if meta.len() != d.size && !g.size_told[disk] {
            g.size_told[disk] = true;
            let why = format!(
                "disk {}'s file is {} bytes now, the agent serves it at {}: replication cannot go on \
                 past it; put the file back to its size, or see README (a resized disk)",
                d.name,
                meta.len(),
                d.size
            );
            tracing::error!(disk = %d.name, "{why}");
            // Shown in the VM's status (W18-C: it stayed normal while no point was made).
            crate::state::note_disk_problem(d.name.as_str(), Some(why));
        } else if meta.len() == d.size && g.size_told[disk] {
            g.size_told[disk] = false;
            crate::state::note_disk_problem(d.name.as_str(), None);
        }
        // The change time too: `cp -a` or `rsync -a` put an old modification time back,
        // never an old change time.
        let seen = file_times(&meta);
        if seen == own {
            return false;
        }
        g.own_write[disk] = Some(seen);
        tracing::error!(disk = %d.name,
            "the disk file was written by something other than this agent (its modification or change \
             time moved since the agent's last write): comparing the whole disk with the process server's \
             copy. Only the agent may write a disk it serves: give the VM its NBD export, never the file");
        let extents: Vec<u64> = (0..d.size.div_ceil(EXTENT)).collect();
        if let Err(e) = g.activity[disk].mark_hot(&extents) {
            tracing::warn!(disk = %d.name, error = %e, "cannot write the activity log in the state directory");
        }
        let stamp = (g.next_mark, Instant::now());
        for e in extents {
            g.last_write[disk].insert(e, stamp);
            g.touched[disk].insert(e);
        }
        g.snapshot = None;
        self.overflow(g);
        true
    }

    /// The log cannot go on: it is dropped, and the hot extents are compared once the
    /// session reconnects. No write is lost: the disk and the activity log hold them.
    fn drop_logged(&self, g: &mut Inner, why: &str) {
        tracing::warn!(
            memory = self.capacity,
            "{why} (the process server is away or slower than the writes); dropping it: the hot \
             extents are compared with the server's copy once it catches up"
        );
        self.overflow(g);
    }

    /// Drops the log until the next session starts it again (which compares the hot
    /// extents first).
    fn overflow(&self, g: &mut Inner) {
        if g.logging {
            g.overflowed = true;
            g.logging = false;
        }
        g.drop_log();
    }

    /// The log keeps `data` itself: a write is not copied for it.
    fn write(&self, disk: usize, data: Vec<u8>, offset: u64) -> io::Result<()> {
        let len = data.len() as u64;
        let item = Item::Data { disk, offset, data: self.hold(data) };
        self.change(disk, offset, len, item, |f, item| match item {
            Item::Data { data, .. } => f.write_all_at(data, offset),
            _ => Ok(()),
        })
    }

    fn zero(&self, disk: usize, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        let item = Item::Zero { disk, offset, len };
        self.change(disk, offset, len, item, |f, _| crate::nbd::zero_range(f, offset, len, keep_allocated))
    }

    /// The agent stops: no write is taken from here on, and each disk, synced, is sealed
    /// with its times (see [`crate::activity`]), so that the next start can tell whether it
    /// was written meanwhile.
    pub fn seal(&self) {
        // A freeze the session started may still be running on the blocking pool (the
        // session is dropped at shutdown): its file systems may lie on these disks, and
        // their flush and thaw must be written before later writes are held. The freeze
        // marker (`STATE_DIR/frozen`) is there while one runs; up to 30 s.
        let marker = self.state_dir.join("frozen");
        let until = Instant::now() + std::time::Duration::from_secs(30);
        let mut clear = 0;
        while clear < 2 && Instant::now() < until {
            clear = if marker.exists() { 0 } else { clear + 1 };
            if clear < 2 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let mut g = self.lock();
        g.sealed = true;
        // Written by something else: every extent goes hot, compared at the next start.
        self.foreign_writes(&mut g);
        for (d, &written) in self.disks.iter().zip(&g.unsealed) {
            if !written {
                // Not written in this run: its seal stands as it is.
                continue;
            }
            let sealed =
                d.file.sync_all().and_then(|()| crate::activity::Seal::of(&d.file, d.size, true)).and_then(
                    |s| {
                        s.write(&self.state_dir, d.name.as_str())?;
                        Ok(s)
                    },
                );
            match sealed {
                Ok(s) => {
                    s.outlast();
                    tracing::debug!(disk = %d.name, "disk sealed");
                }
                // The next start then trusts only the disk's identity, as after a crash.
                Err(e) => {
                    tracing::warn!(disk = %d.name, error = %e, "cannot seal the disk in the state directory")
                }
            }
        }
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
    fn write_at(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
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

/// A file's modification and change times (seconds, nanoseconds each): any write moves
/// them, unless in the same tick of a coarse clock.
type FileTimes = (i64, i64, i64, i64);

fn file_times(meta: &std::fs::Metadata) -> FileTimes {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn tracker(dir: &std::path::Path, capacity: usize) -> Arc<Tracker> {
        spilling_tracker(dir, capacity, 0)
    }

    fn spilling_tracker(dir: &std::path::Path, capacity: usize, spill_max: u64) -> Arc<Tracker> {
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 4 * BLOCK_SIZE]).unwrap();
        Tracker::open(&[(DiskName::new("sda").unwrap(), path)], dir, capacity, spill_max).unwrap()
    }

    #[test]
    fn a_clean_stop_seals_the_disks_it_wrote_and_holds_later_writes_unanswered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let sda = DiskName::new("sda").unwrap();
        std::fs::write(&path, vec![0u8; 4 * BLOCK_SIZE]).unwrap();
        let open = || Tracker::open(&[(sda.clone(), path.clone())], dir.path(), 1 << 20, 0).unwrap();
        let t = open();
        t.write(0, vec![7u8; 4096], 0).unwrap();
        t.seal();
        drop(t);
        // Nothing changed: the log is trusted; a run that writes nothing keeps the seal.
        let (_, usable) =
            ActivityLog::open(dir.path(), "sda", 4 * BLOCK_SIZE as u64, &File::open(&path).unwrap()).unwrap();
        assert!(usable);
        let t = open();
        t.seal();
        drop(t);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"restored while stopped", 8192).unwrap();
        let (log, usable) = ActivityLog::open(dir.path(), "sda", 4 * BLOCK_SIZE as u64, &f).unwrap();
        assert!(!usable, "written after the clean stop");
        assert_eq!(log.hot(), [0]);
        drop(log);
        // A write that comes once the agent stops waits for the process to end, unanswered.
        let t = open();
        t.seal();
        let late = std::thread::spawn(move || t.write(0, vec![8u8; 4096], 4096));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!late.is_finished(), "a write after the seal was answered");
    }

    #[test]
    fn a_disk_never_written_by_the_agent_is_sealed_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let sda = DiskName::new("sda").unwrap();
        std::fs::write(&path, vec![0u8; 4 * BLOCK_SIZE]).unwrap();
        // A first run (and one after a log from before seals) that never writes the disk,
        // stopped cleanly; then the disk is restored while the agent is stopped.
        for first in [true, false] {
            if !first {
                std::fs::remove_file(dir.path().join("disk-sda.seal")).unwrap();
            }
            let t = Tracker::open(&[(sda.clone(), path.clone())], dir.path(), 1 << 20, 0).unwrap();
            // Compared and covered by a point: its extent went cold.
            let hot = t.lock().activity[0].hot();
            t.lock().activity[0].retire(&hot).unwrap();
            t.seal();
            drop(t);
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(b"restored while stopped", 4096).unwrap();
            let (_, usable) = ActivityLog::open(dir.path(), "sda", 4 * BLOCK_SIZE as u64, &f).unwrap();
            assert!(!usable, "first run {first}: a disk written while the agent was stopped is compared");
        }
    }

    #[test]
    fn past_its_memory_the_log_goes_on_in_the_state_directory_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = spilling_tracker(dir.path(), 100, 1 << 20);
        t.start_logging();
        for i in 0..4u8 {
            t.write(0, vec![i; 60], u64::from(i) * 1000).unwrap();
        }
        let (id, _) = t.mark().unwrap();
        assert!(t.stats().spilled_bytes > 0);
        let offsets: Vec<u64> = drain(&t)
            .iter()
            .map(|i| match i {
                Item::Data { offset, .. } => *offset,
                Item::Mark(m) => 1_000_000 + m,
                Item::Zero { .. } | Item::Time(_) => u64::MAX,
            })
            .filter(|&o| o != u64::MAX)
            .collect();
        assert_eq!(offsets, [0, 1000, 2000, 3000, 1_000_000 + id]);
        assert_eq!(t.stats().spilled_bytes, 0);
        assert_eq!(t.tracking(false)[0].1, 0, "no backlog once all is read");
        // Caught up: memory again.
        t.write(0, vec![9; 10], 0).unwrap();
        assert_eq!(t.stats().queued_bytes, 10);
    }

    /// The log's memory counts a write until the last holder lets go of it: a batch sent
    /// and not acked keeps its writes counted, so new writes spill; a write spilled is let
    /// go at once, and counted again when read back.
    #[test]
    fn the_logs_memory_counts_each_write_until_the_last_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let t = spilling_tracker(dir.path(), 100, 1 << 20);
        t.start_logging();
        t.write(0, vec![1; 60], 0).unwrap();
        let sent = drain(&t);
        assert_eq!((t.held_bytes(), t.stats().queued_bytes), (60, 0), "sent, not acked: still held");
        t.write(0, vec![2; 60], 1000).unwrap();
        assert!(t.stats().spilled_bytes >= 60, "no room beside the unacked write: spilled");
        assert_eq!(t.held_bytes(), 60, "a spilled write is not held");
        drop(sent);
        assert_eq!(t.held_bytes(), 0, "acked: let go");
        let back = drain(&t);
        assert!(matches!(back.last(), Some(Item::Data { offset: 1000, data, .. }) if data[..] == [2; 60]));
        assert_eq!(t.held_bytes(), 60, "read back from the spill: held again");
        drop(back);
        t.write(0, vec![3; 60], 0).unwrap();
        assert_eq!((t.held_bytes(), t.stats().queued_bytes), (60, 60), "room again: in memory");
    }

    /// A barrier's mark holds the VM's writes: a write made during the hold waits for the
    /// release and lands after the mark in the log.
    #[test]
    fn a_held_mark_keeps_new_writes_waiting_until_the_release() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path(), 1 << 20);
        t.start_logging();
        t.write(0, vec![1; 10], 0).unwrap();
        let (id, _) = t.mark_and_hold(true).unwrap();
        let (t2, (tx, rx)) = (t.clone(), std::sync::mpsc::channel());
        let writer = std::thread::spawn(move || {
            t2.write(0, vec![2; 10], 100).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "the write waits while held");
        t.release_hold();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        let order: Vec<String> = drain(&t)
            .iter()
            .filter_map(|i| match i {
                Item::Data { offset, .. } => Some(format!("w{offset}")),
                Item::Mark(m) => Some(format!("m{m}")),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["w0".to_string(), format!("m{id}"), "w100".to_string()]);
    }

    /// A write into the disk file by something other than the agent (W18-B: `dd`, or `cp`
    /// of a backup over it) is noticed: at the next mark (none is made), at the end of a
    /// mark's hashing (its hashes, read from the disk, are not what was sent), or at the
    /// agent's next write; every extent goes hot and the log is dropped, so that the session
    /// compares the whole disk with the server's copy. The agent's own writes never count.
    #[test]
    fn a_write_into_the_disk_file_by_another_writer_drops_the_mark_and_compares_the_whole_disk() {
        use std::os::unix::fs::FileExt;
        // Three extents, so that "every extent hot" is not the one the agent wrote.
        let size = 3 * EXTENT;
        let open = |dir: &std::path::Path| {
            let path = dir.join("d.img");
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            let t = Tracker::open(&[(DiskName::new("sda").unwrap(), path.clone())], dir, 1 << 20, 0).unwrap();
            (t, path)
        };
        let foreign = |path: &std::path::Path, at: u64| {
            // Past the clock's tick of the agent's last write.
            std::thread::sleep(Duration::from_millis(30));
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .write_all_at(&[7u8; 4096], at)
                .unwrap();
        };
        let whole_disk_hot = |t: &Tracker| t.hot_ranges(0).iter().map(|r| r.1).sum::<u64>() == size;
        let dir = tempfile::tempdir().unwrap();
        let (t, path) = open(dir.path());
        // Own writes and marks, with time between them: nothing noticed.
        t.start_logging();
        for i in 0..3u64 {
            std::thread::sleep(Duration::from_millis(30));
            t.write(0, vec![i as u8 + 1; 4096], i * 4096).unwrap();
            let (id, _) = t.mark().unwrap();
            assert!(t.mark_hashes(id).unwrap().is_some());
        }
        assert!(t.logging());
        // Before a mark: no mark, the whole disk hot, the log dropped.
        foreign(&path, 2 * EXTENT);
        assert!(t.mark().is_none());
        assert!(!t.logging() && whole_disk_hot(&t));
        // During a mark's hashing, into a page the VM wrote before the mark.
        let dir = tempfile::tempdir().unwrap();
        let (t, path) = open(dir.path());
        t.start_logging();
        t.write(0, vec![1u8; 4096], 8192).unwrap();
        let (id, _) = t.mark().unwrap();
        foreign(&path, 8192);
        assert!(t.mark_hashes(id).unwrap().is_none(), "hashes read after another writer are not the point's");
        assert!(!t.logging() && whole_disk_hot(&t));
        // Before the agent's next write, which would hide it.
        let dir = tempfile::tempdir().unwrap();
        let (t, path) = open(dir.path());
        t.start_logging();
        foreign(&path, 2 * EXTENT);
        std::thread::sleep(Duration::from_millis(30));
        t.write(0, vec![1u8; 4096], 4096).unwrap();
        assert!(!t.logging() && whole_disk_hot(&t), "noticed at the agent's write");
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
        t.write(0, a.clone(), 0).unwrap();
        t.write(0, vec![2u8; 10], (2 * BLOCK_SIZE) as u64).unwrap();
        let (id, _) = t.mark().unwrap();
        assert!(t.mark().is_none(), "one mark at a time");
        // Written after the mark, before its hashes are taken: copy-before-write keeps the old.
        t.write(0, vec![9u8; 100], 50).unwrap();
        t.zero(0, 2 * BLOCK_SIZE as u64, 10, false).unwrap();
        let items = drain(&t);
        let kinds: Vec<&str> = items
            .iter()
            .map(|i| match i {
                Item::Data { .. } => "data",
                Item::Zero { .. } => "zero",
                Item::Mark(_) => "mark",
                Item::Time(_) => "time",
            })
            .filter(|&k| k != "time")
            .collect();
        assert_eq!(kinds, ["data", "data", "mark", "data", "zero"]);
        let zero = tern_core::blocks::zero_block(BLOCK_SIZE);
        // Entries as the agent's state would hold them after the mark.
        let entry = |h: &MarkHashes, b: u64, old: &tern_core::blocks::BlockHashes| match &h.updates[0][&b] {
            Update::Pages(p) => tern_core::blocks::with_pages(old, p),
            Update::Whole(w) => **w,
        };
        let hashes = t.mark_hashes(id).unwrap().unwrap();
        assert_eq!(hashes.updates[0].keys().copied().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(entry(&hashes, 0, &zero), hash_block(&a));
        let mut b2 = vec![0u8; BLOCK_SIZE];
        b2[..10].fill(2);
        assert_eq!(entry(&hashes, 2, &zero), hash_block(&b2));
        // The next mark covers what was written after this one, a page at a time.
        let (next, _) = t.mark().unwrap();
        drain(&t);
        let later = t.mark_hashes(next).unwrap().unwrap();
        assert_eq!(later.updates[0].keys().copied().collect::<Vec<_>>(), [0, 2]);
        assert!(
            matches!(&later.updates[0][&0], Update::Pages(p) if p.len() == 1),
            "one page of block 0 changed"
        );
        let mut b0 = a.clone();
        b0[50..150].fill(9);
        assert_eq!(entry(&later, 0, &hash_block(&a)), hash_block(&b0));
        assert_eq!(entry(&later, 2, &hash_block(&b2)), zero);
    }

    #[test]
    fn the_short_last_block_is_hashed_as_it_was_at_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = 4 * BLOCK_SIZE + 3 * PAGE_SIZE + 100;
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let t = Tracker::open(&[(DiskName::new("sda").unwrap(), path)], dir.path(), 1 << 20, 0).unwrap();
        t.start_logging();
        let short = (4 * BLOCK_SIZE) as u64;
        t.write(0, vec![1u8; 10], short).unwrap();
        let (id, _) = t.mark().unwrap();
        // After the mark, another page of the short block: not the one that waits.
        t.write(0, vec![2u8; 10], short + 2 * PAGE_SIZE as u64).unwrap();
        drain(&t);
        let h = t.mark_hashes(id).unwrap().unwrap();
        let mut at_mark = vec![0u8; size - 4 * BLOCK_SIZE];
        at_mark[..10].fill(1);
        assert_eq!(h.updates[0][&4], Update::Whole(Box::new(hash_block(&at_mark))));
    }

    #[test]
    fn blocks_zeroed_whole_are_known_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path(), 1 << 20);
        t.start_logging();
        t.zero(0, 0, 3 * BLOCK_SIZE as u64, false).unwrap();
        let (id, _) = t.mark().unwrap();
        drain(&t);
        let h = t.mark_hashes(id).unwrap().unwrap();
        assert_eq!(h.zeroed[0].ranges().collect::<Vec<_>>(), [(0, 3)]);
        assert!(h.updates[0].is_empty());
    }

    #[test]
    fn a_full_log_is_dropped_and_says_so_but_the_disk_keeps_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path(), 100);
        // Not logging (no session): the write lands, nothing is queued.
        t.write(0, vec![5u8; 10], 0).unwrap();
        assert!(matches!(t.next(Duration::ZERO), Next::Overflowed));
        t.start_logging();
        t.write(0, vec![6u8; 60], 0).unwrap();
        let (id, _) = t.mark().unwrap();
        t.write(0, vec![7u8; 60], 100).unwrap();
        assert!(matches!(t.next(Duration::ZERO), Next::Overflowed));
        assert!(t.mark_hashes(id).unwrap().is_none(), "the mark went with the log");
        let mut buf = [0u8; 160];
        t.disks[0].file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..60], &[6u8; 60][..]);
        assert_eq!(&buf[100..], &[7u8; 60][..]);
        // The next session starts a fresh log.
        t.start_logging();
        t.write(0, vec![8u8; 60], 0).unwrap();
        let items = drain(&t);
        assert!(matches!(items[0], Item::Time(_)), "a log starts with its time: {items:?}");
        assert!(matches!(items.last(), Some(Item::Data { .. })), "{items:?}");
        let times: Vec<i64> =
            items.iter().filter_map(|i| if let Item::Time(t) = i { Some(*t) } else { None }).collect();
        assert!(times.is_sorted(), "times never go down: {times:?}");
    }
}
