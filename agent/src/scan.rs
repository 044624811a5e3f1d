//! One scan pass over a VM's disks: read (skipping holes), hash 64 KiB blocks (and the
//! 4 KiB pages of those that changed), compare with what the receiver holds, and emit only
//! the pages that changed.
//! Hashing and compression run on a small pool of worker threads; results are consumed
//! in disk order, so records go out in offset order and memory stays bounded.

use crate::state::DiskState;
use crate::tracker::Memory;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use tern_core::blocks::{BlockHashes, DataRanges, Fingerprint, block_len, hash_block, is_zero, zero_block};
use tern_core::codec::Encoder;
use tern_core::disk::{AlignedBuf, DiskReader};
use tern_core::{BLOCK_SIZE, Digest, DiskName, PAGE_SIZE, PAGES_PER_BLOCK};
use tern_proto as pb;
use tokio_util::sync::CancellationToken;

/// Unit of work for one worker: 16 blocks.
const CHUNK: usize = 16 * BLOCK_SIZE;
/// Chunks in flight per worker: enough to keep workers busy, little memory.
const DEPTH_PER_WORKER: usize = 2;
/// A batch is sent once it holds this much payload.
const BATCH_BYTES: usize = 1 << 20;
const BATCH_RECORDS: usize = 1024;

#[derive(Debug, Clone)]
pub struct DiskSource {
    pub name: DiskName,
    pub path: PathBuf,
    pub size: u64,
    /// A block device: read directly, and without a change signal (only a freeze makes a
    /// pass over it a consistent cut).
    pub block_device: bool,
}

impl DiskSource {
    /// A read of this disk failed.
    fn read_err(&self, source: std::io::Error) -> ScanError {
        ScanError::Read { disk: self.name.clone(), path: self.path.display().to_string(), source }
    }
}

/// Block hashes of the receiver's copy, as they arrive for the first pass of a delta sync.
#[derive(Debug)]
pub enum HashChunk {
    /// The entries of consecutive blocks from the first one's index.
    Range(u64, Vec<BlockHashes>),
    /// Every block's entry has come.
    End,
    /// Page hashes asked for with [`ScanEvent::NeedPages`]: block index and entry, for the
    /// blocks of one request, in its order.
    Pages(Vec<(u64, BlockHashes)>),
}

#[derive(Debug)]
pub enum ScanEvent {
    Batch {
        disk: usize,
        records: Vec<pb::Record>,
    },
    /// These blocks differ from the receiver's coarse entries: ask for its page hashes.
    NeedPages {
        disk: usize,
        blocks: Vec<u64>,
    },
    /// A barrier's frozen pass is done and consistent: the VM stays frozen for the release.
    Reached,
    /// The barrier's hold ended: released (proceed or not), or `None` when no release came.
    Held {
        proceed: Option<bool>,
        held: std::time::Duration,
    },
    /// The pass waits until the server has acked every record of `disk` sent so far, then
    /// saves the disk's state at that seq (the answer): a long pass (the initial sync) cut
    /// by a dropped link or a restart goes on from there, not from the last point. For a
    /// table whose changes are in its file already (new to the session, or spilled).
    Settle {
        disk: usize,
        acked: SyncSender<tern_core::Seq>,
    },
    /// The seq of the last record of `disk` sent so far (the answer), at once: the state's
    /// changes up to here are saved once the server acks it (`PassShared::acked`), while
    /// the pass goes on (`Settle` drains the stream first: 6 s for 32 MiB at 5 MB/s).
    Mark {
        disk: usize,
        sent: SyncSender<tern_core::Seq>,
    },
}

/// What a pass and its session share per disk while it runs.
#[derive(Debug, Default)]
pub struct PassShared {
    /// The offset the pass has read the disk to (its size once done), for the reports of
    /// a long pass (`DiskTracking.pass_offset`).
    pub reached: std::sync::atomic::AtomicU64,
    /// The last seq of the disk the server has acked as durable.
    pub acked: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading disk {disk} ({path}): {source}")]
    Read { disk: DiskName, path: String, source: std::io::Error },
    #[error(
        "disk {disk} ({path}) is now {now} bytes, was {was}: the copy on the process server cannot take a \
         resized disk. The agent asks the server again every few seconds: put the disk back to {was} bytes \
         and replication goes on; or remove the VM's copy (`drctl remove VM --delete-points`: its recovery \
         points go) and the agent, started again (its unit does), syncs the disk anew"
    )]
    Resized { disk: DiskName, path: String, was: u64, now: u64 },
    #[error("scan cancelled")]
    Cancelled,
}

/// Per disk, the byte ranges a pass compares: `None` for the whole disk.
pub type Regions = Vec<Option<Vec<(u64, u64)>>>;

/// What a pass compares each disk with, and where.
#[derive(Debug, Default)]
pub struct Compare {
    /// The receiver's block hashes, for a disk compared with them as they arrive.
    pub feeds: Vec<Option<Receiver<HashChunk>>>,
    pub regions: Regions,
    /// The workers yield to other work (nice 10): in nbd mode the VM's writes come first.
    pub background: bool,
    /// Counts the records' payloads while they wait to be sent (nbd mode: the log's
    /// memory, so that the log spills sooner rather than the agent grow during a resync;
    /// in scan mode nothing reads it).
    pub memory: Memory,
    /// Save each disk's state at what the server acked this often during the pass (see
    /// [`ScanEvent::Settle`]); `None` saves nothing before the pass's point.
    pub save_every: Option<std::time::Duration>,
    /// Set once a save of this pass's progress is written.
    pub saved: Arc<std::sync::atomic::AtomicBool>,
    /// Per disk, what the pass and the session share.
    pub shared: Arc<Vec<PassShared>>,
}

#[derive(Debug, Default, Clone)]
pub struct PassResult {
    /// Each disk's fingerprint; only for disks compared whole (a pass limited to some
    /// regions leaves `Digest::ZERO`).
    pub fingerprints: Vec<Digest>,
    /// True when no disk changed while it was read (or the freeze hook held them).
    pub consistent: bool,
    pub bytes_read: u64,
    pub bytes_changed: u64,
}

/// Identity of a file's content version: a write changes mtime or size.
type Version = (i64, i64, u64);

fn version(f: &File) -> std::io::Result<Option<Version>> {
    let m = f.metadata()?;
    Ok(m.file_type().is_file().then(|| (m.mtime(), m.mtime_nsec(), m.size())))
}

/// Kernels before 6.13 stamp mtime from a coarse clock (one tick, at most 10 ms): a write in
/// the same tick as the one before leaves mtime as it was. A version taken while mtime is
/// that close to now cannot tell such a write from none (git calls these entries "racily
/// clean"), so the pass waits until mtime is this much in the past and looks again.
const RACY_MARGIN: std::time::Duration = std::time::Duration::from_millis(25);
/// Looks at most this often; a disk written all the time gives no version at all.
const RACY_LOOKS: usize = 4;

/// The version a pass starts from: one whose mtime is at least [`RACY_MARGIN`] old, so
/// that any later write changes it; `None` when the file keeps being written (the pass is
/// then a consistent cut only if frozen). `now` and `sleep` are the clock.
fn settled_version(
    stat: &mut dyn FnMut() -> std::io::Result<Option<Version>>,
    now: &dyn Fn() -> std::time::SystemTime,
    sleep: &mut dyn FnMut(std::time::Duration),
) -> std::io::Result<Option<Version>> {
    for _ in 0..RACY_LOOKS {
        let Some(v) = stat()? else { return Ok(None) };
        let mtime = u64::try_from(v.0)
            .ok()
            .and_then(|secs| u32::try_from(v.1).ok().map(|ns| std::time::Duration::new(secs, ns)))
            .map(|d| std::time::UNIX_EPOCH + d);
        let Some(settled_at) = mtime.map(|m| m + RACY_MARGIN) else { return Ok(Some(v)) };
        match settled_at.duration_since(now()) {
            // An mtime in the future (a clock stepped back, a copied timestamp) is never
            // waited out: no version, the pass is a cut only if frozen.
            Ok(wait) if wait > RACY_MARGIN => return Ok(None),
            Ok(wait) if !wait.is_zero() => sleep(wait),
            _ => return Ok(Some(v)),
        }
    }
    Ok(None)
}

struct ChunkOut {
    new: Vec<BlockHashes>,
    records: Vec<pb::Record>,
    read: u64,
    changed: u64,
    /// Blocks that differ from a coarse receiver entry (disk block indices): their pages
    /// are compared once the receiver's page hashes come.
    deferred: Vec<u64>,
}

struct Job {
    index: u64,
    old: Vec<BlockHashes>,
    /// The old entries are a receiver's, which can be asked for page hashes.
    ask_pages: bool,
    reply: SyncSender<Result<ChunkOut, std::io::Error>>,
}

/// Runs one pass over every disk; updates `states` to what the receiver will hold once
/// the emitted records are durable.
pub fn run_pass(
    disks: &[DiskSource],
    states: &mut [DiskState],
    frozen: bool,
    page_hashes: bool,
    compare: Compare,
    out: &tokio::sync::mpsc::Sender<ScanEvent>,
    cancel: &CancellationToken,
) -> Result<PassResult, ScanError> {
    let Compare { mut feeds, regions, background, memory, save_every, saved, shared } = compare;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let mut result = PassResult { consistent: true, ..Default::default() };
    let mut versions = Vec::new();
    for d in disks {
        let read_err = |source| d.read_err(source);
        let f = File::open(&d.path).map_err(read_err)?;
        let settled =
            settled_version(&mut || version(&f), &std::time::SystemTime::now, &mut |d| std::thread::sleep(d));
        versions.push(settled.map_err(read_err)?);
    }
    for (i, (d, state)) in disks.iter().zip(states.iter_mut()).enumerate() {
        let feed = feeds.get_mut(i).and_then(Option::take);
        let only = regions.get(i).and_then(Option::as_deref);
        let fp = scan_disk(
            i,
            d,
            state,
            workers,
            (page_hashes, background, &memory, save_every, &saved),
            shared.get(i),
            feed,
            only,
            out,
            cancel,
            &mut result,
        )?;
        result.fingerprints.push(fp);
    }
    for (d, before) in disks.iter().zip(&versions) {
        let read_err = |source| d.read_err(source);
        let f = File::open(&d.path).map_err(read_err)?;
        let now = version(&f).map_err(read_err)?;
        if before.is_none() || now != *before {
            // A block device gives no cheap change signal: only a freeze makes its cut consistent.
            result.consistent &= frozen;
        }
    }
    Ok(result)
}

/// Page-hash requests a pass keeps in flight before it waits for the oldest answer: the
/// pass goes on comparing meanwhile, so a delta sync is not a chain of round trips (up to
/// 8 x 4096 blocks ask at once; their answers take at most ~18 MiB).
const PAGE_REQUESTS_IN_FLIGHT: usize = 8;

/// The receiver's hashes still arriving for a disk's first pass of a delta sync.
struct Feed {
    rx: Receiver<HashChunk>,
    /// Blocks whose receiver entries are in the state.
    ready: usize,
    /// Answers to page-hash requests, by the first block each asked for (answers may come
    /// in another order than the requests).
    answers: std::collections::HashMap<u64, Vec<(u64, BlockHashes)>>,
    /// The feed is gone: nothing more will come.
    gone: bool,
    /// Page-hash requests sent and not yet answered, oldest first.
    asked: VecDeque<Vec<u64>>,
    /// Counts the payloads of the records made from the answers.
    memory: Memory,
    /// The last block whose receiver entry came coarse (its block hash alone).
    last_coarse: Option<u64>,
}

impl Feed {
    fn new(rx: Receiver<HashChunk>, memory: Memory) -> Feed {
        Feed {
            rx,
            ready: 0,
            answers: Default::default(),
            gone: false,
            asked: VecDeque::new(),
            memory,
            last_coarse: None,
        }
    }

    /// Waits until the receiver's entries up to block `last` have come: a chunk is compared
    /// only then.
    fn wait_ready(
        &mut self,
        state: &mut DiskState,
        last: u64,
        cancel: &CancellationToken,
    ) -> Result<(), ScanError> {
        let last_ready = usize::try_from(last).unwrap_or(usize::MAX);
        while self.ready < last_ready {
            if cancel.is_cancelled() {
                return Err(ScanError::Cancelled);
            }
            self.take(state, std::time::Duration::from_millis(100));
        }
        Ok(())
    }

    /// Asks for the page hashes of `deferred` blocks as soon as a request is full (all of
    /// them at the `end` of the pass); the pass goes on comparing meanwhile.
    fn ask(
        &mut self,
        index: usize,
        deferred: &mut Vec<u64>,
        end: bool,
        out: &tokio::sync::mpsc::Sender<ScanEvent>,
    ) -> Result<(), ScanError> {
        while deferred.len() >= pb::MAX_PAGE_HASH_BLOCKS || (end && !deferred.is_empty()) {
            let n = deferred.len().min(pb::MAX_PAGE_HASH_BLOCKS);
            let blocks: Vec<u64> = deferred.drain(..n).collect();
            out.blocking_send(ScanEvent::NeedPages { disk: index, blocks: blocks.clone() })
                .map_err(|_| ScanError::Cancelled)?;
            self.asked.push_back(blocks);
        }
        Ok(())
    }

    /// Emits the pages of the asked blocks whose answers have come, oldest request first;
    /// waits for answers only with too many requests out, or at the `end` of the pass.
    /// Returns the bytes emitted.
    #[allow(clippy::too_many_arguments)]
    fn use_answers(
        &mut self,
        d: &DiskSource,
        file: &DiskReader,
        state: &mut DiskState,
        end: bool,
        cancel: &CancellationToken,
        enc: &mut Encoder,
        emit: &mut dyn FnMut(pb::Record) -> Result<(), ScanError>,
    ) -> Result<u64, Resolve> {
        let mut sent = 0;
        while let Some(first) = self.asked.front().and_then(|b| b.first().copied()) {
            let wait = end || self.asked.len() > PAGE_REQUESTS_IN_FLIGHT;
            let Some(answer) = self.answer(first, state, wait, cancel)? else { break };
            let blocks = self.asked.pop_front().unwrap_or_default();
            sent += apply_pages(d, file, &blocks, &answer, state, enc, emit, &self.memory)?;
        }
        Ok(sent)
    }

    /// Files every message that has come; true once the receiver's entries of every block
    /// are in `state` (the feed ended, and was not cut short), and none from block `from`
    /// on is coarse: a saved coarse entry would make a block that differs go whole after a
    /// cut (no receiver's page hashes come for a saved state), where the pass would have
    /// sent only its pages that differ.
    fn all_filed(&mut self, state: &mut DiskState, from: u64) -> bool {
        self.file_arrived(state);
        self.ready == usize::MAX && !self.gone && self.last_coarse.is_none_or(|c| c < from)
    }

    /// Asks for the page hashes of `deferred` blocks and emits the pages of those whose
    /// answers have come (all of them, waiting, at the `end`); returns the bytes emitted.
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &mut self,
        (index, d, file): (usize, &DiskSource, &DiskReader),
        state: &mut DiskState,
        deferred: &mut Vec<u64>,
        end: bool,
        cancel: &CancellationToken,
        enc: &mut Encoder,
        batcher: &mut Batcher,
    ) -> Result<u64, ScanError> {
        self.ask(index, deferred, end, batcher.out)?;
        self.use_answers(d, file, state, end, cancel, enc, &mut |r| batcher.push(r)).map_err(|e| match e {
            Resolve::Io(e) => d.read_err(e),
            Resolve::Cancelled => ScanError::Cancelled,
            Resolve::Scan(e) => e,
        })
    }

    /// Files every message that has come, without waiting.
    fn file_arrived(&mut self, state: &mut DiskState) {
        loop {
            match self.rx.try_recv() {
                Ok(m) => self.keep(state, m),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.ready = usize::MAX;
                    self.gone = true;
                    break;
                }
            }
        }
    }

    /// Takes one message (waiting up to `wait`) into `state`. False once the feed is gone:
    /// what has not come stays unknown and is sent whole.
    fn take(&mut self, state: &mut DiskState, wait: std::time::Duration) -> bool {
        match self.rx.recv_timeout(wait) {
            Ok(m) => {
                self.keep(state, m);
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                self.ready = usize::MAX;
                self.gone = true;
                false
            }
        }
    }

    /// Files one message: block hashes into `state`, an answer among the answers.
    fn keep(&mut self, state: &mut DiskState, m: HashChunk) {
        match m {
            HashChunk::Range(at, blocks) => {
                if let Some(i) = blocks.iter().rposition(pb::hash_table::is_coarse) {
                    self.last_coarse = Some(at + i as u64);
                }
                state.fill_from(at, &blocks);
                let end = usize::try_from(at).unwrap_or(usize::MAX).saturating_add(blocks.len());
                self.ready = self.ready.max(end);
            }
            HashChunk::End => self.ready = usize::MAX,
            HashChunk::Pages(p) => {
                if let Some(&(first, _)) = p.first() {
                    self.answers.insert(first, p);
                }
            }
        }
    }

    /// The answer to the request whose first block is `first`: waits for it when `wait`,
    /// else takes only what has already come (`None`: not yet). A feed that is gone
    /// answers nothing: those blocks go whole.
    fn answer(
        &mut self,
        first: u64,
        state: &mut DiskState,
        wait: bool,
        cancel: &CancellationToken,
    ) -> Result<Option<std::collections::HashMap<u64, BlockHashes>>, Resolve> {
        loop {
            if let Some(a) = self.answers.remove(&first) {
                return Ok(Some(a.into_iter().collect()));
            }
            if self.gone {
                return Ok(Some(Default::default()));
            }
            if cancel.is_cancelled() {
                return Err(Resolve::Cancelled);
            }
            if !wait {
                // File what has come, without waiting; then ours is there or not yet.
                self.file_arrived(state);
                if !self.answers.contains_key(&first) && !self.gone {
                    return Ok(None);
                }
                continue;
            }
            self.take(state, std::time::Duration::from_millis(100));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn scan_disk(
    index: usize,
    d: &DiskSource,
    state: &mut DiskState,
    workers: usize,
    (page_hashes, background, memory, save_every, saved_flag): (
        bool,
        bool,
        &Memory,
        Option<std::time::Duration>,
        &std::sync::atomic::AtomicBool,
    ),
    shared: Option<&PassShared>,
    feed: Option<Receiver<HashChunk>>,
    only: Option<&[(u64, u64)]>,
    out: &tokio::sync::mpsc::Sender<ScanEvent>,
    cancel: &CancellationToken,
    result: &mut PassResult,
) -> Result<Digest, ScanError> {
    let read_err = |source| d.read_err(source);
    check_size(d)?;
    let chunks = d.size.div_ceil(CHUNK as u64);
    let whole = only.is_none();
    let mut plan = chunk_plan(chunks, only).into_iter().peekable();
    let mut fp = Fingerprint::new();
    let mut batcher = Batcher { disk: index, out, records: Vec::new(), bytes: 0 };
    let mut saves = Saves::new(save_every, saved_flag, shared);
    let mut feed = feed.map(|rx| Feed::new(rx, memory.clone()));
    let ask_pages = feed.is_some();
    let mut deferred: Vec<u64> = Vec::new();
    let file = DiskReader::open(&d.path).map_err(read_err)?;
    let mut enc = Encoder::new();
    std::thread::scope(|s| -> Result<(), ScanError> {
        let (job_tx, job_rx) = sync_channel::<Job>(workers * DEPTH_PER_WORKER);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let (rx, file) = (job_rx.clone(), DiskReader::open(&d.path).map_err(read_err)?);
            let memory = memory.clone();
            s.spawn(move || worker(rx, file, d.size, page_hashes, background, &memory));
        }
        let mut inflight: InFlight = VecDeque::new();
        let blocks_per_chunk = (CHUNK / BLOCK_SIZE) as u64;
        loop {
            while inflight.len() < workers * DEPTH_PER_WORKER
                && let Some(next) = plan.next()
            {
                let first = next * blocks_per_chunk;
                let last = (first + blocks_per_chunk).min(state.len());
                if let Some(f) = feed.as_mut() {
                    f.wait_ready(state, last, cancel)?;
                } else if known_empty(d, &file, state, first, last) {
                    inflight.push_back((next, None, Vec::new()));
                    continue;
                }
                let (reply, rx) = sync_channel(1);
                let old = state.range(first, last);
                let job = Job { index: next, old: old.clone(), ask_pages, reply };
                if job_tx.send(job).is_err() {
                    return Err(ScanError::Cancelled);
                }
                inflight.push_back((next, Some(rx), old));
            }
            let Some((chunk, rx, old)) = inflight.pop_front() else { break };
            if cancel.is_cancelled() {
                return Err(ScanError::Cancelled);
            }
            let first = chunk * blocks_per_chunk;
            saves.reached(state, (chunk * CHUNK as u64).min(d.size));
            let Some(rx) = rx else {
                for b in first..(first + blocks_per_chunk).min(state.len()) {
                    fp.push(&zero_block(block_len(d.size, b)).block);
                }
                continue;
            };
            let done = rx.recv().map_err(|_| ScanError::Cancelled)?.map_err(read_err)?;
            for ((b, h), was) in (first..).zip(&done.new).zip(&old) {
                fp.push(&h.block);
                // Only what changed is written: the state's cost follows the changes.
                if h != was {
                    state.set(b, *h);
                }
            }
            result.bytes_read += done.read;
            result.bytes_changed += done.changed;
            saves.unsaved |= !done.records.is_empty();
            for r in done.records {
                batcher.push(r)?;
            }
            deferred.extend(done.deferred);
            let end = inflight.is_empty() && plan.peek().is_none();
            if let Some(f) = feed.as_mut() {
                let sent =
                    f.resolve((index, d, &file), state, &mut deferred, end, cancel, &mut enc, &mut batcher)?;
                result.bytes_changed += sent;
                saves.unsaved |= sent > 0;
            }
            // Not at the pass's end: its point follows, and saves the state anyway.
            if saves.due() && !end && !state.failed() {
                let from = (chunk + 1) * blocks_per_chunk;
                let pass = (index, d, &file);
                let sink = (cancel, &mut enc, &mut batcher);
                result.bytes_changed +=
                    save_at(pass, state, feed.as_mut(), &mut deferred, sink, &mut saves, from)?;
            }
        }
        drop(job_tx);
        Ok(())
    })?;
    batcher.flush()?;
    // What is acked by now is saved (the others' passes follow: its point may be a while).
    saves.reached(state, d.size);
    Ok(if whole { fp.finish() } else { Digest::ZERO })
}

/// When a disk's pass saves its progress: `save_every` into the pass, then every
/// `save_every` while saves do not stall the pass (a committed table: its changes are
/// taken and committed once acked, see [`DiskState::snapshot`]). A save that waits for the
/// acks of all in flight (a table new to this session, or one that spilled) doubles the
/// interval, up to 16 times `save_every`, so that a pass on a link that holds pays for a
/// few of those only.
struct Saves<'a> {
    base: Option<std::time::Duration>,
    every: Option<std::time::Duration>,
    at: std::time::Instant,
    /// Records went since the last save.
    unsaved: bool,
    /// Set once a save is written (the session's `Progress::saved`).
    written: &'a std::sync::atomic::AtomicBool,
    /// Taken, waiting for the server's ack of their seq, oldest first.
    pending: VecDeque<crate::state::Snapshot>,
    /// Shared with the session: how far the pass has read, what the server acked.
    shared: Option<&'a PassShared>,
}

impl<'a> Saves<'a> {
    fn new(
        base: Option<std::time::Duration>,
        written: &'a std::sync::atomic::AtomicBool,
        shared: Option<&'a PassShared>,
    ) -> Saves<'a> {
        let at = std::time::Instant::now();
        Saves { base, every: base, at, unsaved: false, written, pending: VecDeque::new(), shared }
    }

    /// The pass has read the disk to `offset`: said to the session, and the snapshot the
    /// server has acked by now is committed.
    fn reached(&mut self, state: &mut DiskState, offset: u64) {
        if let Some(sh) = self.shared {
            sh.reached.store(offset, std::sync::atomic::Ordering::Relaxed);
            self.commit_acked(state, sh.acked.load(std::sync::atomic::Ordering::Relaxed));
        }
    }

    fn due(&self) -> bool {
        self.unsaved && self.every.is_some_and(|every| self.at.elapsed() >= every)
    }

    /// A save was made (`ok`: written; `stalled`: it waited for the acks of all in flight).
    fn done(&mut self, ok: bool, stalled: bool) {
        if ok {
            self.written.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        (self.at, self.unsaved) = (std::time::Instant::now(), false);
        if stalled {
            self.every = self.every.zip(self.base).map(|(e, base)| (e * 2).min(base * 16));
        }
    }

    /// Commits the newest snapshot the server has acked (`acked`); the older ones go with it.
    fn commit_acked(&mut self, state: &mut DiskState, acked: u64) {
        let Some(n) = self.pending.iter().rposition(|s| s.seq.0 <= acked) else { return };
        let snap = self.pending.drain(..=n).next_back().expect("a snapshot at n");
        let seq = snap.seq;
        match state.commit_snapshot(snap) {
            Ok(true) => {
                tracing::debug!(seq = seq.0, "pass progress saved");
                self.written.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot save the pass's progress"),
        }
    }
}

/// A save that is due, at a chunk boundary (blocks before `from` are done) that is not the
/// pass's end. With the receiver's hashes in play, only once all of them are in the state
/// (they are filed as the pass reaches them: a table saved before that would hold "unknown"
/// past the pass's position, and a cut would then send all of it whole instead of comparing
/// it with the receiver's hashes again) and the pass is past the coarse ones (see
/// `Feed::all_filed`: in practice, a sync cut before its first save, past what the receiver
/// got), and once no block waits for its page hashes (its entry is ahead of its records):
/// those are asked for and sent first. Every entry the state holds is then of a record
/// emitted, or the receiver's own. Returns the bytes those pages sent.
fn save_at(
    pass: (usize, &DiskSource, &DiskReader),
    state: &mut DiskState,
    feed: Option<&mut Feed>,
    deferred: &mut Vec<u64>,
    (cancel, enc, batcher): (&CancellationToken, &mut Encoder, &mut Batcher),
    saves: &mut Saves,
    from: u64,
) -> Result<u64, ScanError> {
    let mut sent = 0;
    if let Some(f) = feed {
        if !f.all_filed(state, from) {
            return Ok(0);
        }
        sent = f.resolve(pass, state, deferred, true, cancel, enc, batcher)?;
    }
    // Filing the feed may have failed the table: nothing to save then.
    if !state.failed() {
        save_progress(batcher, pass.1, state, saves)?;
    }
    Ok(sent)
}

/// Saves the pass's progress: sends the batch, then, with a committed table, takes its
/// changes to commit once the server acks the last record sent (the pass goes on);
/// otherwise waits until the server has acked every record of the disk emitted so far and
/// saves `state` at that seq. A state that cannot be saved answers "unknown" from then on
/// (see [`DiskState::commit`]): the pass goes on, sending more than needed, never less.
fn save_progress(
    batcher: &mut Batcher,
    d: &DiskSource,
    state: &mut DiskState,
    saves: &mut Saves,
) -> Result<(), ScanError> {
    batcher.flush()?;
    if state.can_snapshot() {
        // Nothing changed since the last commit, or acks slow to come: nothing to take.
        if state.pending() > 0 && saves.pending.len() < 4 {
            let (sent, rx) = sync_channel(1);
            let mark = ScanEvent::Mark { disk: batcher.disk, sent };
            batcher.out.blocking_send(mark).map_err(|_| ScanError::Cancelled)?;
            let seq = rx.recv().map_err(|_| ScanError::Cancelled)?;
            saves.pending.extend(state.snapshot(seq));
        }
        saves.done(false, false);
        return Ok(());
    }
    let ok = settle(batcher, d, state)?;
    saves.done(ok, true);
    Ok(())
}

/// Waits until the server has acked every record of the disk emitted so far (the batch is
/// sent), then saves `state` at that seq; true once saved.
fn settle(batcher: &mut Batcher, d: &DiskSource, state: &mut DiskState) -> Result<bool, ScanError> {
    let started = std::time::Instant::now();
    let (acked, rx) = sync_channel(1);
    let settle = ScanEvent::Settle { disk: batcher.disk, acked };
    batcher.out.blocking_send(settle).map_err(|_| ScanError::Cancelled)?;
    // No answer: the session ended meanwhile.
    let seq = rx.recv().map_err(|_| ScanError::Cancelled)?;
    let waited = started.elapsed();
    match state.commit(seq) {
        Ok(()) => {
            let ms = |t: std::time::Duration| u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
            tracing::debug!(disk = %d.name, seq = seq.0, waited_ms = ms(waited),
                saved_ms = ms(started.elapsed() - waited), "pass progress saved");
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(disk = %d.name, error = %e, "cannot save the pass's progress");
            Ok(false)
        }
    }
}

/// The chunks in flight, in order, each with its worker's answer, or none for a chunk that
/// is a hole of the disk and was zero in the state (nothing to read, compare or write: its
/// blocks are zero blocks), so that a pass over a sparse disk costs little per empty MiB;
/// and the state's entries it is compared with.
type InFlight = VecDeque<(u64, Option<Receiver<Result<ChunkOut, std::io::Error>>>, Vec<BlockHashes>)>;

/// Without a receiver's hashes to compare with: blocks `first..last` are a hole of the disk
/// and were zero in the state, so they are zero blocks, known without a look.
fn known_empty(d: &DiskSource, file: &DiskReader, state: &DiskState, first: u64, last: u64) -> bool {
    let (start, end) = (first * BLOCK_SIZE as u64, (last * BLOCK_SIZE as u64).min(d.size));
    state.zero_hole(first, last) && tern_core::blocks::is_hole(file.file(), start, end)
}

/// The chunks a pass compares, in order: all of them, or those the byte ranges touch.
fn chunk_plan(chunks: u64, only: Option<&[(u64, u64)]>) -> Vec<u64> {
    let Some(ranges) = only else { return (0..chunks).collect() };
    let c = CHUNK as u64;
    let set: std::collections::BTreeSet<u64> =
        ranges.iter().flat_map(|&(at, len)| at / c..at.saturating_add(len).div_ceil(c).min(chunks)).collect();
    set.into_iter().collect()
}

/// A disk whose size changed since the agent started is refused: its copy cannot follow.
fn check_size(d: &DiskSource) -> Result<(), ScanError> {
    let now = DiskReader::open(&d.path).and_then(|f| f.size()).map_err(|e| d.read_err(e))?;
    if now != d.size {
        return Err(ScanError::Resized {
            disk: d.name.clone(),
            path: d.path.display().to_string(),
            was: d.size,
            now,
        });
    }
    Ok(())
}

/// One disk's records, sent to the session in batches of about `BATCH_BYTES`.
struct Batcher<'a> {
    disk: usize,
    out: &'a tokio::sync::mpsc::Sender<ScanEvent>,
    records: Vec<pb::Record>,
    bytes: usize,
}

impl Batcher<'_> {
    fn push(&mut self, r: pb::Record) -> Result<(), ScanError> {
        self.bytes += r.payload.len() + 64;
        self.records.push(r);
        if self.bytes >= BATCH_BYTES || self.records.len() >= BATCH_RECORDS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ScanError> {
        if self.records.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let records = std::mem::take(&mut self.records);
        self.out
            .blocking_send(ScanEvent::Batch { disk: self.disk, records })
            .map_err(|_| ScanError::Cancelled)
    }
}

enum Resolve {
    Io(std::io::Error),
    Cancelled,
    Scan(ScanError),
}

/// Blocks that differed from coarse receiver entries, with the receiver's page hashes of
/// them (`answer`): reads the blocks again and emits the pages that differ (a block without
/// an answer goes whole). Returns the bytes emitted.
#[allow(clippy::too_many_arguments)]
fn apply_pages(
    d: &DiskSource,
    file: &DiskReader,
    blocks: &[u64],
    answer: &std::collections::HashMap<u64, BlockHashes>,
    state: &mut DiskState,
    enc: &mut Encoder,
    emit: &mut dyn FnMut(pb::Record) -> Result<(), ScanError>,
    memory: &Memory,
) -> Result<u64, Resolve> {
    let mut buf = AlignedBuf::new(BLOCK_SIZE);
    let mut sent = 0u64;
    for &b in blocks {
        let blen = tern_core::blocks::block_len(d.size, b);
        let at = b * BLOCK_SIZE as u64;
        file.read_exact_at(&mut buf[..blen], at).map_err(Resolve::Io)?;
        let block = &buf[..blen];
        let zero = is_zero(block);
        let new = if zero { zero_block(blen) } else { hash_block(block) };
        // What the receiver will hold is what is read and sent now.
        state.set(b, new);
        let theirs = answer.get(&b).filter(|e| !pb::hash_table::is_coarse(e));
        let mut runs = Vec::new();
        sent += match theirs {
            Some(old) => page_runs(block, 0, blen, &new, old, false, zero, &mut runs),
            None => page_runs(block, 0, blen, &new, &new, true, zero, &mut runs),
        };
        let mut records = Vec::new();
        encode_runs(block, at, &runs, enc, &mut records, memory);
        for r in records {
            emit(r).map_err(Resolve::Scan)?;
        }
    }
    Ok(sent)
}

/// Hashes the chunks it is given; at nice 10 when `background` (nbd mode's resync).
fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    file: DiskReader,
    size: u64,
    page_hashes: bool,
    background: bool,
    memory: &Memory,
) {
    if background {
        crate::lower_priority();
    }
    let mut enc = Encoder::new();
    let mut buf = AlignedBuf::new(CHUNK);
    let mut map = DataRanges::default();
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let out = scan_chunk(&file, &mut map, size, &job, &mut buf, &mut enc, page_hashes, memory);
        let _ = job.reply.send(out);
    }
}

/// The data extents of `[start, end)` of a file, as block-aligned offsets relative to
/// `start`; everything else is a hole. A file system (or a block device) that cannot tell
/// gives the whole range. `map` is the worker's, for the pass.
fn data_extents(file: &DiskReader, map: &mut DataRanges, start: u64, end: u64) -> Vec<(usize, usize)> {
    let block = BLOCK_SIZE as u64;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (data, hole) in map.within(file.file(), start, end) {
        let a = usize::try_from((data - start) / block * block).unwrap_or(usize::MAX);
        let b =
            usize::try_from(((hole - start).div_ceil(block) * block).min(end - start)).unwrap_or(usize::MAX);
        match out.last_mut() {
            Some((_, last_end)) if *last_end >= a => *last_end = b,
            _ => out.push((a, b)),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn scan_chunk(
    file: &DiskReader,
    map: &mut DataRanges,
    size: u64,
    job: &Job,
    buf: &mut [u8],
    enc: &mut Encoder,
    page_hashes: bool,
    memory: &Memory,
) -> Result<ChunkOut, std::io::Error> {
    let start = job.index * CHUNK as u64;
    let len = usize::try_from((size - start).min(CHUNK as u64)).unwrap_or(CHUNK);
    // Only the data extents are read; blocks in holes are zero without a look.
    let extents = data_extents(file, map, start, start + len as u64);
    let data = &mut buf[..len];
    let mut read = 0u64;
    let mut filled = 0usize;
    for &(a, b) in &extents {
        data[filled..a].fill(0);
        file.read_exact_at(&mut data[a..b], start + a as u64)?;
        read += (b - a) as u64;
        filled = b;
    }
    data[filled..].fill(0);
    let in_hole = |off: usize| !extents.iter().any(|&(a, b)| a <= off && off < b);
    let mut runs = Vec::new();
    let mut out = ChunkOut {
        new: Vec::with_capacity(job.old.len()),
        records: Vec::new(),
        read,
        changed: 0,
        deferred: Vec::new(),
    };
    for (b, old) in job.old.iter().enumerate() {
        let off = b * BLOCK_SIZE;
        let blen = (len - off).min(BLOCK_SIZE);
        let block = &data[off..off + blen];
        let zero = in_hole(off) || is_zero(block);
        let coarse_old = pb::hash_table::is_coarse(old);
        // Coarse first: the plain BLAKE3 of the block (fast, all SIMD lanes busy) decides
        // whether it changed; its 4 KiB page values are computed only when it did (or when
        // the receiver's entry has none, so that later passes have them). A block that was
        // unknown or all zero and now holds data has changed without a look.
        let maybe_same = !zero && old.block != Digest::ZERO && old.block != zero_block(blen).block;
        if job.ask_pages && coarse_old && !zero {
            let digest = Digest::of(block);
            if digest != old.block {
                // Which pages differ is known once the receiver's page hashes come; the
                // block is read and hashed page by page then, once.
                out.new.push(BlockHashes { block: digest, pages: [Digest::ZERO; PAGES_PER_BLOCK] });
                out.deferred.push(start / BLOCK_SIZE as u64 + b as u64);
                continue;
            }
        }
        let new = if zero {
            zero_block(blen)
        } else if maybe_same && !coarse_old && Digest::of(block) == old.block {
            *old
        } else if page_hashes {
            hash_block(block)
        } else {
            // A full download: the block hash alone; unknown page values make a later
            // pass send this block whole if it changes.
            BlockHashes { block: Digest::of(block), pages: [Digest::ZERO; PAGES_PER_BLOCK] }
        };
        out.new.push(new);
        if new.block == old.block {
            continue;
        }
        let whole = !page_hashes || new.pages[0] == Digest::ZERO || coarse_old;
        out.changed += page_runs(data, off, blen, &new, old, whole, zero, &mut runs);
    }
    encode_runs(data, start, &runs, enc, &mut out.records, memory);
    Ok(out)
}

/// A run of changed bytes of a buffer, not yet encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    from: usize,
    to: usize,
    zero: bool,
    /// The run's digest when it is already known (a whole block's).
    digest: Option<Digest>,
}

/// Appends the 4 KiB page runs of the block at `buf[off..off + blen]` whose hashes differ
/// between `new` and `old` (every page when `whole`) to `runs`, as offsets into `buf`.
/// Returns the bytes they cover.
#[allow(clippy::too_many_arguments)]
fn page_runs(
    buf: &[u8],
    off: usize,
    blen: usize,
    new: &BlockHashes,
    old: &BlockHashes,
    whole: bool,
    zero: bool,
    runs: &mut Vec<Run>,
) -> u64 {
    let pages = blen.div_ceil(PAGE_SIZE);
    let mut changed = 0u64;
    let mut p = 0;
    while p < pages {
        if !whole && new.pages[p] == old.pages[p] {
            p += 1;
            continue;
        }
        let run_start = p;
        while p < pages && (whole || new.pages[p] != old.pages[p]) {
            p += 1;
        }
        let from = run_start * PAGE_SIZE;
        let to = (p * PAGE_SIZE).min(blen);
        changed += (to - from) as u64;
        let digest = (from == 0 && to == blen && !zero && new.block != Digest::ZERO).then_some(new.block);
        runs.push(Run {
            from: off + from,
            to: off + to,
            zero: zero || is_zero(&buf[off + from..off + to]),
            digest,
        });
    }
    changed
}

/// Encodes `runs` of `buf` (which starts at disk offset `at`) as records, runs that touch
/// merged into one record of up to `CHUNK` bytes: a whole-disk pass sends 1 MiB records,
/// which compress faster and better than 64 KiB ones and cost every receiver less per byte.
/// When the merged extent does not compress (random or encrypted data) and each of its
/// runs is a whole block whose digest is known, each run travels as a record of its own
/// instead: the extent is then not hashed a second time.
/// `memory` counts the payloads.
fn encode_runs(
    buf: &[u8],
    at: u64,
    runs: &[Run],
    enc: &mut Encoder,
    records: &mut Vec<pb::Record>,
    memory: &Memory,
) {
    let mut i = 0;
    while i < runs.len() {
        let first = runs[i];
        let mut j = i + 1;
        while j < runs.len()
            && runs[j].from == runs[j - 1].to
            && runs[j].zero == first.zero
            && runs[j].to - first.from <= CHUNK
        {
            j += 1;
        }
        let (from, to) = (first.from, runs[j - 1].to);
        if first.zero {
            records.push(pb::Record {
                kind: pb::RecordKind::Zero as i32,
                offset: at + from as u64,
                length: u32::try_from(to - from).unwrap_or(0),
                ..Default::default()
            });
        } else {
            let extent = &buf[from..to];
            let known: Option<Vec<Digest>> = runs[i..j].iter().map(|r| r.digest).collect();
            // A record of the plain extent `buf[from..to]`, its payload compressed or not.
            let record = |from: usize, to: usize, digest: Digest, compressed: Option<Vec<u8>>| pb::Record {
                kind: pb::RecordKind::Write as i32,
                offset: at + from as u64,
                length: u32::try_from(to - from).unwrap_or(0),
                digest: digest.0.to_vec(),
                compression: if compressed.is_some() { pb::Compression::Zstd } else { pb::Compression::None }
                    as i32,
                payload: memory.hold(compressed.unwrap_or_else(|| buf[from..to].to_vec())),
            };
            match (enc.compress(extent), known) {
                (Some(c), known) => {
                    let digest = known.filter(|k| k.len() == 1).map_or_else(|| Digest::of(extent), |k| k[0]);
                    records.push(record(from, to, digest, Some(c)));
                }
                (None, Some(known)) => {
                    for (r, digest) in runs[i..j].iter().zip(known) {
                        records.push(record(r.from, r.to, digest, None));
                    }
                }
                (None, None) => records.push(record(from, to, Digest::of(extent), None)),
            }
        }
        i = j;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::state::DiskState;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// A file stamped by a coarse clock, as before Linux 6.13: `stat` sees the mtime of the
    /// last write, and a clock that moves only when the pass sleeps.
    struct Coarse {
        clock: std::cell::Cell<SystemTime>,
        slept: std::cell::Cell<Duration>,
    }

    fn as_version(t: SystemTime) -> Version {
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        (d.as_secs() as i64, i64::from(d.subsec_nanos()), 4096)
    }

    #[test]
    fn a_version_taken_in_the_tick_of_the_last_write_is_taken_again_once_settled() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = Coarse { clock: start.into(), slept: Duration::ZERO.into() };
        // Written in this very tick: its mtime is now.
        let mtime = start;
        let mut looks = 0;
        let v = settled_version(
            &mut || {
                looks += 1;
                Ok(Some(as_version(mtime)))
            },
            &|| c.clock.get(),
            &mut |d| {
                c.clock.set(c.clock.get() + d);
                c.slept.set(c.slept.get() + d);
            },
        )
        .unwrap();
        assert_eq!(v, Some(as_version(mtime)));
        assert_eq!(looks, 2, "looked again after waiting");
        assert!(c.slept.get() >= RACY_MARGIN, "waited {:?}", c.slept.get());
        // Any write from now on gets an mtime past the version's: the pass will see it.
        assert!(c.clock.get() > mtime);
    }

    #[test]
    fn an_old_version_is_taken_at_once_and_one_written_all_the_time_not_at_all() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let old = now - Duration::from_secs(5);
        let mut slept = false;
        let v = settled_version(&mut || Ok(Some(as_version(old))), &|| now, &mut |_| slept = true).unwrap();
        assert_eq!(v, Some(as_version(old)));
        assert!(!slept);
        // Each look finds a write in the current tick.
        let clock = std::cell::Cell::new(now);
        let v = settled_version(&mut || Ok(Some(as_version(clock.get()))), &|| clock.get(), &mut |d| {
            clock.set(clock.get() + d)
        })
        .unwrap();
        assert_eq!(v, None, "no settled version: the pass is not a consistent cut unless frozen");
        // An mtime an hour ahead is not waited for.
        let ahead = now + Duration::from_secs(3600);
        let mut slept = Duration::ZERO;
        let v = settled_version(&mut || Ok(Some(as_version(ahead))), &|| now, &mut |d| slept += d).unwrap();
        assert_eq!((v, slept), (None, Duration::ZERO));
    }

    /// A pass over a sparse disk after a point changes only the entries of the blocks
    /// written since: the state's cost follows the changes.
    #[test]
    fn a_pass_changes_only_the_entries_of_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = 64u64 << 20;
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&vec![7u8; 4 << 20], 8 << 20).unwrap();
        let disk =
            DiskSource { name: DiskName::new("sda").unwrap(), path: path.clone(), size, block_device: false };
        let mut states = vec![DiskState::zeroes(&dir.path().join("state"), size, "g").unwrap()];
        let pass = |states: &mut Vec<DiskState>| {
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            let cancel = CancellationToken::new();
            let (d, mut s) = (disk.clone(), std::mem::take(states));
            let scanner = std::thread::spawn(move || {
                run_pass(&[d], &mut s, false, true, Compare::default(), &tx, &cancel).unwrap();
                s
            });
            while rx.blocking_recv().is_some() {}
            *states = scanner.join().unwrap();
        };
        pass(&mut states);
        states[0].commit(tern_core::Seq(1)).unwrap();
        pass(&mut states);
        assert_eq!(states[0].pending(), 0, "nothing written, nothing changed");
        for i in 0..10u64 {
            f.write_all_at(&[1u8; 4096], i * (5 << 20) + 4096).unwrap();
        }
        pass(&mut states);
        assert_eq!(states[0].pending(), 10, "one entry per block written");
    }

    /// A long pass saves the state at what the server acked, never ahead: the records of a
    /// save that got no answer (the link dropped) are not in the saved state.
    #[test]
    fn a_pass_saves_its_progress_at_acked_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = 6 * CHUNK as u64;
        // Data that compresses: a chunk is one record far below a batch, so only the flush
        // before a save sends a chunk's records before the save asks for their seq.
        let mut x = 99u64;
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                b"tern"[(x >> 62) as usize]
            })
            .collect();
        std::fs::write(&path, &data).unwrap();
        let disk =
            DiskSource { name: DiskName::new("sda").unwrap(), path: path.clone(), size, block_device: false };
        let state = DiskState::zeroes(&DiskState::path(dir.path(), "sda"), size, "g").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let cancel = CancellationToken::new();
        let shared = Arc::new(vec![PassShared::default()]);
        let pass_shared = shared.clone();
        let scanner = std::thread::spawn(move || {
            let compare =
                Compare { save_every: Some(Duration::ZERO), shared: pass_shared, ..Default::default() };
            run_pass(&[disk], &mut [state], false, true, compare, &tx, &cancel).map(|_| ())
        });
        // Records are numbered from 1 as the session numbers them. The first save (a new
        // table, its changes in place) waits for the acks of all sent; the next ones take
        // the seq sent so far and go on. The first of those is acked while the second is
        // taken, the second never is: the session is gone at the third.
        let (mut records, mut settled, mut marks) = (Vec::new(), None, Vec::new());
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                ScanEvent::Batch { records: r, .. } => records.extend(r),
                ScanEvent::Settle { disk: 0, acked } => {
                    assert!(settled.is_none(), "only the first save waits for the acks");
                    settled = Some(records.len() as u64);
                    acked.send(tern_core::Seq(records.len() as u64)).unwrap();
                }
                ScanEvent::Mark { disk: 0, sent } => {
                    marks.push(records.len() as u64);
                    if marks.len() == 3 {
                        break;
                    }
                    // The first acked before the pass hears the second is sent (after, the
                    // pass could look for acks before the store, then stop at the third:
                    // 1 run in 30 failed so).
                    if marks.len() == 2 {
                        shared[0].acked.store(marks[0], std::sync::atomic::Ordering::Relaxed);
                    }
                    sent.send(tern_core::Seq(records.len() as u64)).unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(rx);
        assert!(matches!(scanner.join().unwrap(), Err(ScanError::Cancelled)));
        assert!(settled.is_some_and(|s| s > 0 && s < marks[0]), "{settled:?} {marks:?}");
        let acked_end = records[..usize::try_from(marks[0]).unwrap()]
            .iter()
            .map(|r| r.offset + u64::from(r.length))
            .max()
            .unwrap();
        assert!(acked_end < records.iter().map(|r| r.offset + u64::from(r.length)).max().unwrap());
        let mut saved = DiskState::open_saved(dir.path(), "sda", size).expect("a committed state");
        assert_eq!(saved.seq, tern_core::Seq(marks[0]), "the snapshot acked, not the one taken after it");
        for b in 0..saved.len() {
            let at = usize::try_from(b).unwrap() * BLOCK_SIZE;
            let want = if (at as u64) < acked_end {
                hash_block(&data[at..at + BLOCK_SIZE])
            } else {
                zero_block(BLOCK_SIZE)
            };
            assert!(saved.get(b) == want, "block {b}: the saved state holds what was not acked");
        }
    }

    /// A whole-disk pass sends runs of data blocks as records of up to 1 MiB (one chunk),
    /// zero blocks as zero extents, and the records rebuild the disk.
    #[test]
    fn a_whole_pass_merges_blocks_into_chunk_sized_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = 3 * CHUNK as u64 + 5 * BLOCK_SIZE as u64;
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut want = vec![0u8; usize::try_from(size).unwrap()];
        let mut x = 7u64;
        for (i, b) in want.iter_mut().enumerate() {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            // Mostly compressible data; blocks 20..23 stay zero (written, so not a hole);
            // chunk 2 (blocks 32..48) is random.
            let block = i / BLOCK_SIZE;
            if (32..48).contains(&block) {
                *b = (x >> 33) as u8;
            } else if !(20..23).contains(&block) {
                *b = if x >> 62 == 0 { (x >> 33) as u8 } else { b'a' };
            }
        }
        f.write_all_at(&want, 0).unwrap();
        let disk =
            DiskSource { name: DiskName::new("sda").unwrap(), path: path.clone(), size, block_device: false };
        let mut states = vec![DiskState::unknown(&dir.path().join("state"), size, "g").unwrap()];
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let cancel = CancellationToken::new();
        let scanner = std::thread::spawn(move || {
            run_pass(&[disk], &mut states, false, false, Compare::default(), &tx, &cancel)
        });
        let mut records = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            if let ScanEvent::Batch { records: r, .. } = ev {
                records.extend(r);
            }
        }
        scanner.join().unwrap().unwrap();
        let mut got = vec![0xffu8; want.len()];
        let mut dec = tern_core::codec::Decoder::new();
        let mut at = 0u64;
        for r in &records {
            assert_eq!(r.offset, at, "records tile the disk in order");
            assert!(r.length as usize <= CHUNK, "a record of {} bytes", r.length);
            let o = usize::try_from(r.offset).unwrap();
            let span = o..o + r.length as usize;
            if r.kind == pb::RecordKind::Zero as i32 {
                got[span].fill(0);
            } else {
                let digest = Digest::from_slice(&r.digest).unwrap();
                let compressed = r.compression == pb::Compression::Zstd as i32;
                let plain = dec.decode(compressed, &r.payload, r.length as usize, &digest).unwrap();
                got[span].copy_from_slice(&plain);
            }
            at += u64::from(r.length);
        }
        assert_eq!(at, size);
        assert!(got == want, "the records rebuild the disk");
        let lengths: Vec<u32> = records.iter().map(|r| r.length).collect();
        let (c, b) = (CHUNK as u32, BLOCK_SIZE as u32);
        // Chunk 1 holds blocks 16..32: data 16..20, zero 20..23, data 23..32. Chunk 2 does
        // not compress: a record per block, each with the digest its block hash gave.
        let random = [b; 16];
        assert_eq!(lengths, [&[c, 4 * b, 3 * b, 9 * b][..], &random, &[5 * b]].concat());
        assert!(records[4..20].iter().all(|r| r.compression == pb::Compression::None as i32));
    }

    /// A receiver with coarse entries for more blocks than one page-hash request may name:
    /// the pass asks in requests of at most `MAX_PAGE_HASH_BLOCKS`, without waiting for one
    /// answer before the next request (answers may come in any order), and sends, per
    /// block, only the page that differs from the receiver's.
    #[test]
    fn coarse_receiver_entries_are_resolved_in_bounded_requests() {
        let blocks = pb::MAX_PAGE_HASH_BLOCKS as u64 * 3 / 2;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = blocks * BLOCK_SIZE as u64;
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        // Ours: page 3 of every block holds the block's number. The receiver's: the same,
        // and page 5 too except in every 7th block (so that the blocks to ask for do not
        // come in whole chunks).
        let ours = |b: u64| {
            let mut d = vec![0u8; BLOCK_SIZE];
            d[3 * PAGE_SIZE..3 * PAGE_SIZE + 8].copy_from_slice(&(b + 1).to_le_bytes());
            d
        };
        let theirs = |b: u64| {
            let mut d = ours(b);
            if !b.is_multiple_of(7) {
                d[5 * PAGE_SIZE] = 1;
            }
            d
        };
        let differ: Vec<u64> = (0..blocks).filter(|b| !b.is_multiple_of(7)).collect();
        for b in 0..blocks {
            f.write_all_at(
                &ours(b)[3 * PAGE_SIZE..4 * PAGE_SIZE],
                b * BLOCK_SIZE as u64 + 3 * PAGE_SIZE as u64,
            )
            .unwrap();
        }
        let disk =
            DiskSource { name: DiskName::new("sda").unwrap(), path: path.clone(), size, block_device: false };
        let mut states = vec![DiskState::unknown(&dir.path().join("state"), size, "g").unwrap()];
        let (feed_tx, feed_rx) = std::sync::mpsc::channel();
        let coarse: Vec<BlockHashes> = (0..blocks)
            .map(|b| BlockHashes { block: Digest::of(&theirs(b)), pages: [Digest::ZERO; PAGES_PER_BLOCK] })
            .collect();
        feed_tx.send(HashChunk::Range(0, coarse)).unwrap();
        feed_tx.send(HashChunk::End).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let cancel = CancellationToken::new();
        let scanner = std::thread::spawn(move || {
            let r = run_pass(
                &[disk],
                &mut states,
                false,
                true,
                Compare { feeds: vec![Some(feed_rx)], ..Default::default() },
                &tx,
                &cancel,
            );
            (r.map(|p| p.bytes_changed), states)
        });
        let mut asked = Vec::new();
        let mut records = Vec::new();
        // Both requests are answered only once both have come, the later first: a pass that
        // waited for each answer before asking again would never send the second.
        let mut held: Vec<Vec<u64>> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match rx.try_recv() {
                Ok(ScanEvent::NeedPages { blocks: want, .. }) => {
                    assert!(want.len() <= pb::MAX_PAGE_HASH_BLOCKS, "{} blocks in one request", want.len());
                    asked.extend(want.iter().copied());
                    held.push(want);
                    if held.len() == 2 {
                        for want in held.drain(..).rev() {
                            let answer = want.iter().map(|&b| (b, hash_block(&theirs(b)))).collect();
                            feed_tx.send(HashChunk::Pages(answer)).unwrap();
                        }
                    }
                }
                Ok(ScanEvent::Batch { records: r, .. }) => records.extend(r),
                Ok(ScanEvent::Reached | ScanEvent::Held { .. }) => panic!("no barrier was asked for"),
                Ok(ScanEvent::Settle { .. } | ScanEvent::Mark { .. }) => {
                    panic!("no progress saves were asked for")
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the pass waits for each page-hash answer before asking again ({} asked)",
                        held.len()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        let (changed, states) = scanner.join().unwrap();
        asked.sort_unstable();
        assert!(asked == differ, "every differing block is asked for once ({} asks)", asked.len());
        assert_eq!(changed.unwrap(), differ.len() as u64 * PAGE_SIZE as u64, "one page per block");
        assert_eq!(records.len(), differ.len());
        assert!(records.iter().all(|r| r.kind == pb::RecordKind::Zero as i32
            && r.length as usize == PAGE_SIZE
            && r.offset % BLOCK_SIZE as u64 == 5 * PAGE_SIZE as u64));
        // The state now holds our own page hashes, for the passes to come.
        let mut states = states;
        assert_eq!(states[0].get(7), hash_block(&ours(7)));
    }
}
