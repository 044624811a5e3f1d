//! The first step of ingest, the same on both daemons: a batch off the wire becomes
//! records (an unknown kind, a bad digest or a disk not named in `Hello` refuse the whole
//! batch), which are verified whole — decompressed, BLAKE3 compared, extent inside the
//! disk — on the blocking pool before any of it is written. Appending, the group commit
//! and the ack follow in each daemon's writer.

use std::sync::Arc;
use tern_core::codec::Decoder;
use tern_core::{Digest, Seq};
use tern_proto as pb;
use tern_store::{DiskHandle, PlainRecord, Record, RecordKind, decode_record, verify_record};
use tonic::Status;

/// A batch verified whole: its records (kept compressed, for a journal) or, when the
/// plain bytes are wanted (written through onto a target disk), those.
#[derive(Debug)]
pub struct Verified {
    pub disk: Arc<DiskHandle>,
    pub first: Seq,
    pub records: Vec<Record>,
    pub plain: Vec<PlainRecord>,
    /// Payload bytes as they came on the wire.
    pub wire_bytes: u64,
    /// When the source wrote each record (Unix ms), or empty.
    pub times: Vec<i64>,
}

impl Verified {
    /// The last seq the batch covers.
    pub fn last(&self) -> Seq {
        let n = self.records.len().max(self.plain.len()) as u64;
        Seq(self.first.0 + n.saturating_sub(1))
    }
}

pub type Pending = tokio::task::JoinHandle<Result<Verified, Status>>;

/// The records of a batch for `disk`, refused whole if any does not parse.
pub fn records_of(disk: &DiskHandle, b: pb::Batch) -> Result<Vec<Record>, Status> {
    let mut records = Vec::with_capacity(b.records.len());
    for (i, r) in b.records.into_iter().enumerate() {
        let seq = b.first_seq + i as u64;
        let kind = match pb::RecordKind::try_from(r.kind) {
            Ok(pb::RecordKind::Write) => RecordKind::Write,
            Ok(pb::RecordKind::Zero) => RecordKind::Zero,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "disk {} seq {seq}: unknown record kind {}",
                    disk.name, r.kind
                )));
            }
        };
        let digest = if kind == RecordKind::Zero {
            Digest::ZERO
        } else {
            Digest::from_slice(&r.digest).ok_or_else(|| {
                Status::invalid_argument(format!("disk {} seq {seq}: digest is not 32 bytes", disk.name))
            })?
        };
        records.push(Record {
            kind,
            offset: r.offset,
            length: r.length,
            digest,
            compressed: r.compression == pb::Compression::Zstd as i32,
            payload: r.payload,
        });
    }
    Ok(records)
}

/// Parses `b` and starts verifying it on the blocking pool, so that consecutive batches
/// verify in parallel while the writer keeps their order. `plain`: keep the decompressed
/// bytes instead of the records.
pub fn verify(disk: Arc<DiskHandle>, mut b: pb::Batch, plain: bool) -> Result<Pending, Status> {
    let first = Seq(b.first_seq);
    let times = std::mem::take(&mut b.times_ms);
    if !times.is_empty() && (times.len() != b.records.len() || !times.is_sorted()) {
        return Err(Status::invalid_argument(format!(
            "disk {}: a batch's times must be one per record and never go down",
            disk.name
        )));
    }
    let mut records = records_of(&disk, b)?;
    let wire_bytes = records.iter().map(|r| r.payload.len() as u64).sum();
    Ok(tokio::task::spawn_blocking(move || {
        thread_local! {
            static DECODER: std::cell::RefCell<Decoder> = std::cell::RefCell::new(Decoder::new());
        }
        DECODER.with(|d| {
            let mut dec = d.borrow_mut();
            let mut kept = Vec::new();
            for (i, r) in records.iter().enumerate() {
                let seq = first.0 + i as u64;
                let bad = |problem| {
                    tracing::warn!(disk = %disk.name, seq, error = %problem, "record failed verification; batch rejected");
                    Status::data_loss(format!(
                        "disk {} seq {seq}: {problem}; the batch was rejected and nothing of it stored; resend it",
                        disk.name
                    ))
                };
                if plain {
                    let data = decode_record(&mut dec, disk.size, r).map_err(bad)?;
                    kept.push(PlainRecord { offset: r.offset, length: r.length, data });
                } else {
                    verify_record(&mut dec, disk.size, r).map_err(bad)?;
                }
            }
            if plain {
                records.clear();
            }
            Ok(Verified { disk, first, records, plain: kept, wire_bytes, times })
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::{DiskName, VmName};
    use tern_store::Store;

    fn batch(kind: i32, payload: Vec<u8>, digest: Vec<u8>) -> pb::Batch {
        pb::Batch {
            disk: "sda".into(),
            first_seq: 1,
            records: vec![pb::Record {
                kind,
                offset: 0,
                length: u32::try_from(payload.len()).unwrap(),
                digest,
                compression: pb::Compression::None as i32,
                payload: payload.into(),
            }],
            times_ms: Vec::new(),
        }
    }

    /// Both daemons refuse what either would refuse: an unknown record kind (the master
    /// target used to store one as a write) and a record whose bytes do not match its digest.
    #[tokio::test]
    async fn a_batch_is_refused_whole_for_an_unknown_kind_or_a_bad_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = VmName::new("vm").unwrap();
        let disk = store.register(&vm, &[(DiskName::new("sda").unwrap(), 1 << 20)]).unwrap().remove(0);
        let page = vec![7u8; 4096];
        let good = Digest::of(&page).0.to_vec();
        for plain in [false, true] {
            let err = verify(disk.clone(), batch(9, page.clone(), good.clone()), plain).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            assert!(err.message().contains("unknown record kind 9"), "{}", err.message());
            let bad =
                verify(disk.clone(), batch(pb::RecordKind::Write as i32, page.clone(), vec![0; 32]), plain)
                    .unwrap()
                    .await
                    .unwrap()
                    .unwrap_err();
            assert_eq!(bad.code(), tonic::Code::DataLoss, "{bad:?}");
            let ok =
                verify(disk.clone(), batch(pb::RecordKind::Write as i32, page.clone(), good.clone()), plain)
                    .unwrap()
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(ok.last(), Seq(1));
            assert_eq!(ok.plain.len(), usize::from(plain));
        }
        // Times, when sent, are one per record and never go down.
        let good_batch = || batch(pb::RecordKind::Write as i32, page.clone(), good.clone());
        let stamped = verify(disk.clone(), pb::Batch { times_ms: vec![5], ..good_batch() }, false).unwrap();
        assert_eq!(stamped.await.unwrap().unwrap().times, [5]);
        let err =
            verify(disk.clone(), pb::Batch { times_ms: vec![5, 6], ..good_batch() }, false).unwrap_err();
        assert!(err.message().contains("one per record"), "{}", err.message());
        let mut two = good_batch();
        two.records.push(two.records[0].clone());
        let err = verify(disk, pb::Batch { times_ms: vec![6, 5], ..two }, false).unwrap_err();
        assert!(err.message().contains("never go down"), "{}", err.message());
    }
}
