//! Turns the change log of `--mode nbd` into records and points, in log order, on a
//! blocking thread: the session sends what comes out as it comes.

use crate::changes::Update;
use crate::state::{DiskState, UNKNOWN};
use crate::tracker::{Item, MarkHashes, Next, Tracker};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_core::blocks::{FingerprintTree, GROUP_BLOCKS, with_pages, zero_block};
use tern_core::codec::Encoder;
use tern_core::{BLOCK_SIZE, Digest};
use tern_proto as pb;
use tokio_util::sync::CancellationToken;

/// A write is sent as records of at most this much data; a zeroed range as records of at
/// most the journal's longest.
const DATA_RECORD: usize = 1 << 20;
const ZERO_RECORD: u64 = 4 << 20;
/// A batch goes out once it holds this much payload, or when the log has nothing more.
const BATCH_BYTES: usize = 1 << 20;
/// ... or this many records (zeroed ranges carry no payload).
const BATCH_RECORDS: usize = 4096;
/// ... or once its first record has waited this long: a VM that writes a little all the
/// time never leaves the log idle, and its writes must not wait for a full batch (4,096
/// records took 20 s at 200 small writes a second), as they are lost with the site until
/// they reach the server.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// How long the log is waited on when no batch is being filled.
const IDLE_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub enum LogEvent {
    Batch {
        disk: usize,
        records: Vec<pb::Record>,
        /// When the VM wrote each record (Unix ms); empty before the session's first mark.
        times: Vec<i64>,
    },
    /// Mark `id`: every record before it has been emitted; each disk's fingerprint there.
    Mark { id: u64, fingerprints: Vec<Digest> },
    /// The log was dropped: the session resyncs.
    Overflowed,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the disks to hash a point's blocks: {0}")]
    Read(std::io::Error),
    #[error("disk {disk}: block {block} is not known to the agent's state, so the point has no fingerprint")]
    Unknown { disk: String, block: u64 },
}

/// A batch being filled: one disk's records, in log order.
struct Pending {
    disk: usize,
    records: Vec<pb::Record>,
    times: Vec<i64>,
    bytes: usize,
    /// It goes out by then at the latest.
    due: Instant,
}

/// Streams the log until it is dropped, the receiver goes, or `cancel`.
pub fn run(
    tracker: &Tracker,
    names: &[String],
    states: &Mutex<Vec<DiskState>>,
    out: &tokio::sync::mpsc::Sender<LogEvent>,
    cancel: &CancellationToken,
) -> Result<(), StreamError> {
    // The VM's writes come first: when the CPU is short, replication falls behind (the
    // log spills) rather than the VM's I/O slowing down.
    crate::lower_priority();
    let mut enc = Encoder::new();
    let mut trees: Vec<Option<FingerprintTree>> = vec![None; names.len()];
    let mut batch: Option<Pending> = None;
    let flush = |batch: &mut Option<Pending>| -> bool {
        match batch.take() {
            Some(b) => out
                .blocking_send(LogEvent::Batch { disk: b.disk, records: b.records, times: b.times })
                .is_ok(),
            None => true,
        }
    };
    // Each record goes with the time of its write once the session's first mark is
    // behind: from there on every position of the log is a crash-consistent state (before
    // it, the resync's records are in the journal too). The server keeps the times, and a
    // failover can then go to any moment between two points.
    let mut armed = false;
    let mut now = 0i64;
    while !cancel.is_cancelled() {
        let wait = batch.as_ref().map_or(IDLE_WAIT, |b| b.due.saturating_duration_since(Instant::now()));
        let item = match tracker.next(wait) {
            Next::Item(item) => item,
            Next::Idle => {
                if !flush(&mut batch) {
                    return Ok(());
                }
                continue;
            }
            Next::Overflowed => {
                flush(&mut batch);
                drop(out.blocking_send(LogEvent::Overflowed));
                return Ok(());
            }
        };
        let (disk, records) = match item {
            Item::Mark(id) => {
                if !flush(&mut batch) {
                    return Ok(());
                }
                let Some(hashes) = tracker.mark_hashes(id).map_err(StreamError::Read)? else {
                    continue;
                };
                let fingerprints = fingerprints(names, states, hashes, &mut trees)?;
                if out.blocking_send(LogEvent::Mark { id, fingerprints }).is_err() {
                    return Ok(());
                }
                armed = true;
                continue;
            }
            Item::Time(t) => {
                now = t;
                continue;
            }
            Item::Data { disk, offset, data } => {
                (disk, data_records(&mut enc, offset, &data, |c| tracker.hold(c)))
            }
            Item::Zero { disk, offset, len } => (disk, zero_records(offset, len)),
        };
        if batch.as_ref().is_some_and(|b| b.disk != disk) && !flush(&mut batch) {
            return Ok(());
        }
        let b = batch.get_or_insert_with(|| Pending {
            disk,
            records: Vec::new(),
            times: Vec::new(),
            bytes: 0,
            due: Instant::now() + BATCH_LINGER,
        });
        b.bytes += records.iter().map(|r| r.payload.len()).sum::<usize>();
        if armed {
            b.times.extend(std::iter::repeat_n(now, records.len()));
        }
        b.records.extend(records);
        if (b.bytes >= BATCH_BYTES || b.records.len() >= BATCH_RECORDS || Instant::now() >= b.due)
            && !flush(&mut batch)
        {
            return Ok(());
        }
    }
    Ok(())
}

/// The records of a write: its pieces of at most `DATA_RECORD`, each compressed if that
/// pays, else a slice of the write's own buffer (the log's), not a copy. `hold` counts a
/// compressed piece in the log's memory, as the write's buffer is.
fn data_records(
    enc: &mut Encoder,
    offset: u64,
    data: &bytes::Bytes,
    hold: impl Fn(Vec<u8>) -> bytes::Bytes,
) -> Vec<pb::Record> {
    let mut out = Vec::new();
    for at in (0..data.len()).step_by(DATA_RECORD) {
        let piece = data.slice(at..(at + DATA_RECORD).min(data.len()));
        let compressed = enc.compress(&piece);
        out.push(pb::Record {
            kind: pb::RecordKind::Write as i32,
            offset: offset + at as u64,
            length: u32::try_from(piece.len()).unwrap_or(0),
            digest: Digest::of(&piece).0.to_vec(),
            compression: if compressed.is_some() { pb::Compression::Zstd } else { pb::Compression::None }
                as i32,
            payload: compressed.map_or(piece, &hold),
        });
    }
    out
}

fn zero_records(offset: u64, len: u64) -> Vec<pb::Record> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(ZERO_RECORD);
        out.push(pb::Record {
            kind: pb::RecordKind::Zero as i32,
            offset: at,
            length: u32::try_from(n).unwrap_or(0),
            ..Default::default()
        });
        at += n;
    }
    out
}

/// Puts a mark's changes into the agent's state (they wait there for the point's ack)
/// and computes each disk's fingerprint. `trees` keeps each disk's fingerprint tree
/// between marks: the first mark of a session reads every entry of the state, the next
/// ones only the groups of blocks that changed.
fn fingerprints(
    names: &[String],
    states: &Mutex<Vec<DiskState>>,
    hashes: MarkHashes,
    trees: &mut [Option<FingerprintTree>],
) -> Result<Vec<Digest>, StreamError> {
    let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    let changes = hashes.updates.into_iter().zip(hashes.zeroed);
    for (((state, (updates, zeroed)), name), tree) in states.iter_mut().zip(changes).zip(names).zip(trees) {
        let mut stale = std::collections::BTreeSet::new();
        for (first, last) in zeroed.ranges() {
            for b in first..last {
                state.set(b, zero_block(BLOCK_SIZE));
            }
            stale.extend(first / GROUP_BLOCKS..=(last - 1) / GROUP_BLOCKS);
        }
        for (b, u) in updates {
            let h = match u {
                Update::Whole(h) => *h,
                Update::Pages(pages) => {
                    let old = state.get(b);
                    if old == UNKNOWN {
                        return Err(StreamError::Unknown { disk: name.clone(), block: b });
                    }
                    with_pages(&old, &pages)
                }
            };
            state.set(b, h);
            stale.insert(b / GROUP_BLOCKS);
        }
        let t = match tree {
            Some(t) => t,
            None => {
                let t = FingerprintTree::new(state.len());
                stale = (0..t.group_count()).collect();
                tree.insert(t)
            }
        };
        for g in stale {
            let r = t.group_blocks(g);
            let mut blocks = Vec::with_capacity(r.clone().count());
            for (b, h) in r.clone().zip(state.range(r.start, r.end)) {
                if h == UNKNOWN {
                    return Err(StreamError::Unknown { disk: name.clone(), block: b });
                }
                blocks.push(h.block);
            }
            t.set_group(g, &blocks);
        }
        out.push(t.root());
    }
    Ok(out)
}

/// Shared between the streaming thread and the session (which commits at a point's ack).
pub type SharedStates = Arc<Mutex<Vec<DiskState>>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A write is cut into records of at most `DATA_RECORD`, each decoding to its piece;
    /// a piece that does not compress travels in the write's own buffer, and what the
    /// records hold is counted.
    #[test]
    fn a_write_travels_in_its_own_buffer_unless_it_compresses() {
        let mut x = 1u64;
        let mut data: Vec<u8> = (0..DATA_RECORD + 8192)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (x >> 32).to_le_bytes()[0]
            })
            .collect();
        data[DATA_RECORD..].fill(b'a');
        let want = data.clone();
        let base = data.as_ptr() as usize;
        let held = std::cell::Cell::new(0);
        let hold = |c: Vec<u8>| {
            held.set(held.get() + c.len());
            bytes::Bytes::from(c)
        };
        let records = data_records(&mut Encoder::new(), 1 << 30, &data.into(), hold);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].compression, pb::Compression::None as i32);
        assert_eq!(records[0].payload.as_ptr() as usize, base, "not copied");
        assert_eq!(records[1].compression, pb::Compression::Zstd as i32);
        assert_eq!(held.get(), records[1].payload.len(), "the compressed piece is counted");
        let mut dec = tern_core::codec::Decoder::new();
        for (r, piece) in records.iter().zip(want.chunks(DATA_RECORD)) {
            let digest = Digest::from_slice(&r.digest).unwrap();
            let compressed = r.compression == pb::Compression::Zstd as i32;
            assert_eq!(dec.decode(compressed, &r.payload, r.length as usize, &digest).unwrap(), piece);
        }
        assert_eq!((records[0].offset, records[1].offset), (1 << 30, (1 << 30) + DATA_RECORD as u64));
    }
}
