//! Write-through: a master target receiving a full download (failback with `--sync
//! during`) writes each verified record straight onto its base image, the target disk,
//! instead of keeping it in a journal first: the target disk is being replaced anyway, and
//! one write beats a journal append plus a later fold. Order, so that a crash anywhere is
//! harmless:
//! 1. write the records onto the base image (holes punched for zero extents);
//! 2. fsync the base image;
//! 3. move the catalog's base position to the last record written — only then is it acked.
//!
//! After a crash between 1 and 3 the sender resends from the old base position; writing a
//! record twice is harmless because records are replayed in order.

use crate::durable::io_err;
use crate::materialize::zero_range;
use crate::{DiskHandle, Store, StoreError, failpoint};
use std::fs::File;
use std::os::unix::fs::FileExt;
use tern_core::Seq;

/// A verified record ready to be written: its plain bytes, or `None` for zeroes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRecord {
    pub offset: u64,
    pub length: u32,
    pub data: Option<Vec<u8>>,
}

impl Store {
    /// Opens a disk's base image for [`Store::write_through`].
    pub fn open_base_for_writing(&self, h: &DiskHandle) -> Result<File, StoreError> {
        tern_core::disk::open_for_write(&h.base_path).map_err(io_err(&h.base_path))
    }

    /// Writes records straight onto the disk's base image. Nothing is durable, nor counted
    /// as received, until [`Store::commit_through`].
    pub fn write_through(
        &self,
        h: &DiskHandle,
        out: &File,
        records: &[PlainRecord],
    ) -> Result<(), StoreError> {
        let zeroes = vec![0u8; 1 << 20];
        for r in records {
            if r.offset.checked_add(u64::from(r.length)).is_none_or(|end| end > h.size) {
                return Err(StoreError::Invariant("a write-through record lies outside the disk"));
            }
            match &r.data {
                Some(d) => out.write_all_at(d, r.offset).map_err(io_err(&h.base_path))?,
                None => zero_range(out, &h.base_path, r.offset, u64::from(r.length), &zeroes)?,
            }
        }
        Ok(())
    }

    /// Makes the records written through so far durable and records that the base image
    /// holds everything up to `upto`. The disk's journal must be empty: a disk is written
    /// through from its first record or not at all.
    pub fn commit_through(&self, h: &DiskHandle, out: &File, upto: Seq) -> Result<(), StoreError> {
        if h.journal().segment_count() != 0 {
            return Err(StoreError::Invariant("write-through on a disk whose journal holds records"));
        }
        if upto <= h.base_seq() {
            return Ok(());
        }
        out.sync_data().map_err(io_err(&h.base_path))?;
        failpoint("write-through-after-base-write")?;
        self.catalog().set_base_seq(&h.vm, &h.name, upto)?;
        *h.base_seq.lock().unwrap_or_else(|p| p.into_inner()) = upto;
        h.journal().continue_after(upto);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::PlainRecord;
    use crate::{Store, StoreError, set_failpoint};
    use tern_core::{DiskName, Seq, VmName};

    const SIZE: u64 = 1 << 20;

    fn target(dir: &std::path::Path) -> (Store, std::sync::Arc<crate::DiskHandle>, std::path::PathBuf) {
        let path = dir.join("target.img");
        std::fs::write(&path, vec![7u8; SIZE as usize]).unwrap();
        let store = Store::open(&dir.join("store")).unwrap();
        let vm = VmName::new("vm").unwrap();
        let d = DiskName::new("sda").unwrap();
        store.register_on(&vm, &[(d.clone(), SIZE, path.clone(), Seq(10))]).unwrap();
        let h = store.disk(&vm, &d).unwrap();
        (store, h, path)
    }

    #[test]
    fn records_land_on_the_base_and_the_position_moves_only_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, h, path) = target(dir.path());
        let f = store.open_base_for_writing(&h).unwrap();
        let recs = [
            PlainRecord { offset: 4096, length: 4096, data: Some(vec![1u8; 4096]) },
            PlainRecord { offset: 65536, length: 131072, data: None },
        ];
        store.write_through(&h, &f, &recs).unwrap();
        assert_eq!(h.journal().durable(), Seq(10), "nothing counts before the commit");
        store.commit_through(&h, &f, Seq(12)).unwrap();
        assert_eq!(h.journal().durable(), Seq(12));
        assert_eq!(h.base_seq(), Seq(12));
        let data = std::fs::read(&path).unwrap();
        assert!(data[4096..8192].iter().all(|&b| b == 1));
        assert!(data[65536..196608].iter().all(|&b| b == 0));
        assert!(data[..4096].iter().chain(&data[196608..]).all(|&b| b == 7));
        // Reopened, the store remembers the position.
        drop((h, store));
        let store = Store::open(&dir.path().join("store")).unwrap();
        let h = store.disk(&VmName::new("vm").unwrap(), &DiskName::new("sda").unwrap()).unwrap();
        assert_eq!(h.journal().durable(), Seq(12));
    }

    #[test]
    fn a_crash_before_the_catalog_moves_keeps_the_old_position_and_a_resend_converges() {
        let dir = tempfile::tempdir().unwrap();
        let (store, h, path) = target(dir.path());
        let f = store.open_base_for_writing(&h).unwrap();
        let rec = [PlainRecord { offset: 0, length: 4096, data: Some(vec![3u8; 4096]) }];
        store.write_through(&h, &f, &rec).unwrap();
        set_failpoint(Some("write-through-after-base-write"));
        let err = store.commit_through(&h, &f, Seq(11)).unwrap_err();
        set_failpoint(None);
        assert!(matches!(err, StoreError::Injected(_)));
        drop((f, h, store));
        let store = Store::open(&dir.path().join("store")).unwrap();
        let h = store.disk(&VmName::new("vm").unwrap(), &DiskName::new("sda").unwrap()).unwrap();
        assert_eq!(h.journal().durable(), Seq(10), "the unacked record is sent again");
        let f = store.open_base_for_writing(&h).unwrap();
        store.write_through(&h, &f, &rec).unwrap();
        store.commit_through(&h, &f, Seq(11)).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..4096], &[3u8; 4096][..]);
    }
}
