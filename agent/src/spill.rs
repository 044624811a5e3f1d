//! The change log's overflow in the state directory (`spill.log`): when the process
//! server is away or slower than the writes, and the log's memory is full, the log goes on
//! in this file, in order, up to `--spill-max`. It is read back as the session sends, and
//! emptied once read. It is never synced: after a crash the activity log says what to
//! compare, so the spill only saves a resync while the agent runs.

use crate::tracker::Item;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const HEADER: usize = 1 + 4 + 8 + 8;
const DATA: u8 = 0;
const ZERO: u8 = 1;
const MARK: u8 = 2;
const TIME: u8 = 3;

#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    read: u64,
    max: u64,
}

impl Spill {
    pub fn new(path: PathBuf, max: u64) -> Spill {
        Spill { path, file: None, written: 0, read: 0, max }
    }

    /// Items wait in the file: new ones must follow them there.
    pub fn is_active(&self) -> bool {
        self.read < self.written
    }

    /// Bytes waiting in the file.
    pub fn bytes(&self) -> u64 {
        self.written - self.read
    }

    /// Appends `item`; false when that would pass the bound.
    pub fn push(&mut self, item: &Item) -> io::Result<bool> {
        let (kind, disk, a, b, data): (u8, usize, u64, u64, &[u8]) = match item {
            Item::Data { disk, offset, data } => (DATA, *disk, *offset, data.len() as u64, data),
            Item::Zero { disk, offset, len } => (ZERO, *disk, *offset, *len, &[]),
            Item::Mark(id) => (MARK, 0, *id, 0, &[]),
            Item::Time(ms) => (TIME, 0, ms.cast_unsigned(), 0, &[]),
        };
        let len = (HEADER + data.len()) as u64;
        if self.written + len > self.max {
            return Ok(false);
        }
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)?;
            self.file = Some(f);
        }
        let mut head = [0u8; HEADER];
        head[0] = kind;
        head[1..5].copy_from_slice(&u32::try_from(disk).unwrap_or(u32::MAX).to_le_bytes());
        head[5..13].copy_from_slice(&a.to_le_bytes());
        head[13..21].copy_from_slice(&b.to_le_bytes());
        if let Some(f) = &self.file {
            // The header and the data from where they are: a spilled write is not copied.
            let mut slices = [io::IoSlice::new(&head), io::IoSlice::new(data)];
            tern_core::disk::write_all_vectored_at(f, &mut slices, self.written)?;
        }
        self.written += len;
        Ok(true)
    }

    /// The oldest item not read yet, a write's data in the buffer `hold` makes of it; the
    /// file is emptied once all is read.
    pub fn pop(&mut self, hold: impl FnOnce(Vec<u8>) -> bytes::Bytes) -> io::Result<Option<Item>> {
        let Some(f) = self.file.as_ref().filter(|_| self.is_active()) else { return Ok(None) };
        let mut h = [0u8; HEADER];
        f.read_exact_at(&mut h, self.read)?;
        let disk = usize::try_from(u32::from_le_bytes(h[1..5].try_into().unwrap_or_default())).unwrap_or(0);
        let a = u64::from_le_bytes(h[5..13].try_into().unwrap_or_default());
        let b = u64::from_le_bytes(h[13..21].try_into().unwrap_or_default());
        let mut len = HEADER as u64;
        let item = match h[0] {
            DATA => {
                let mut data = vec![0u8; usize::try_from(b).unwrap_or(0)];
                f.read_exact_at(&mut data, self.read + HEADER as u64)?;
                len += b;
                Item::Data { disk, offset: a, data: hold(data) }
            }
            ZERO => Item::Zero { disk, offset: a, len: b },
            TIME => Item::Time(a.cast_signed()),
            _ => Item::Mark(a),
        };
        self.read += len;
        if !self.is_active() {
            self.reset();
        }
        Ok(Some(item))
    }

    /// Forgets everything in the file.
    pub fn reset(&mut self) {
        if let Some(f) = &self.file {
            let _ = f.set_len(0);
        }
        self.written = 0;
        self.read = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_back_in_order_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::new(dir.path().join("spill.log"), 100);
        assert!(s.push(&Item::Data { disk: 1, offset: 7, data: vec![1, 2, 3].into() }).unwrap());
        assert!(s.push(&Item::Mark(4)).unwrap());
        assert!(s.push(&Item::Time(1_795_000_000_123)).unwrap());
        assert!(s.push(&Item::Zero { disk: 0, offset: 9, len: 1 << 40 }).unwrap());
        assert!(
            !s.push(&Item::Data { disk: 0, offset: 0, data: vec![0; 64].into() }).unwrap(),
            "past the bound"
        );
        assert!(s.is_active());
        assert!(
            matches!(s.pop(bytes::Bytes::from).unwrap(), Some(Item::Data { disk: 1, offset: 7, data }) if data[..] == [1, 2, 3])
        );
        assert!(matches!(s.pop(bytes::Bytes::from).unwrap(), Some(Item::Mark(4))));
        assert!(matches!(s.pop(bytes::Bytes::from).unwrap(), Some(Item::Time(1_795_000_000_123))));
        assert!(
            matches!(s.pop(bytes::Bytes::from).unwrap(), Some(Item::Zero { disk: 0, offset: 9, len }) if len == 1 << 40)
        );
        assert!(s.pop(bytes::Bytes::from).unwrap().is_none());
        assert_eq!(std::fs::metadata(dir.path().join("spill.log")).unwrap().len(), 0, "emptied once read");
        assert!(s.push(&Item::Data { disk: 0, offset: 0, data: vec![0; 64].into() }).unwrap(), "room again");
    }
}
