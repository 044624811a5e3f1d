//! The BLAKE3 chaining values of all-zero 1 MiB subtrees, by position.
//!
//! An output's whole-disk BLAKE3 (`vm.json`'s `blake3`, equal to `b3sum` of the file) must
//! cover the zeroes of its holes: a BLAKE3 chunk's chaining value depends on its position,
//! so no two zero subtrees share one, and hashing them costs about 0.25 CPU-s per GiB of
//! hole. But the value of the zero subtree at a given position depends on nothing else
//! (not the disk, not the VM), so a store works it out once per MiB up to the size of its
//! largest disk and keeps it in `<data-dir>/zero-subtrees`: a failover then hashes only the
//! 1 MiB units that hold data and takes the others' values from here.
//!
//! Layout: the magic `TERNZS01`, then records of [`RECORD_UNITS`] values (32 bytes each, the
//! units of 64 MiB of disk) followed by a 32-byte BLAKE3 of the record's index (u64 LE) and
//! its values. Records are only appended. Opening checks every record and trusts the file
//! up to the first one that fails (a torn append, a damaged sector): what follows is
//! computed again. A value the file gives is therefore always the one its position has.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blake3::hazmat::{ChainingValue, HasherExt};

use crate::StoreError;
use crate::durable::io_err;

/// Bytes of disk one value covers: a complete BLAKE3 subtree of 1024 chunks.
pub const UNIT: u64 = 1 << 20;
/// Values per record.
const PER_RECORD: usize = 64;
pub const RECORD_UNITS: u64 = PER_RECORD as u64;
const MAGIC: &[u8; 8] = b"TERNZS01";
/// A record's values, then its check.
const VALUES: usize = PER_RECORD * 32;
const RECORD: usize = VALUES + 32;
const RECORD_BYTES: u64 = RECORD as u64;

/// The chaining value of the all-zero subtree of [`UNIT`] bytes at `unit * UNIT`.
pub fn zero_unit(unit: u64) -> ChainingValue {
    static ZEROES: [u8; 1 << 20] = [0; 1 << 20];
    blake3::Hasher::new().set_input_offset(unit * UNIT).update(&ZEROES).finalize_non_root()
}

fn record_check(index: u64, values: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(values);
    *h.finalize().as_bytes()
}

/// The table of one data directory. One writer at a time (the store holds the directory's
/// lock against other processes; `lock` serialises this one's threads).
#[derive(Debug)]
pub struct ZeroSubtrees {
    path: PathBuf,
    lock: Mutex<()>,
}

/// A checked view of the table, covering units `[0, units)`: values are read from it in
/// increasing order, a window at a time.
#[derive(Debug)]
pub struct ZeroTable {
    file: File,
    units: u64,
    window: Vec<u8>,
    window_first: u64,
}

impl ZeroSubtrees {
    pub fn new(path: PathBuf) -> ZeroSubtrees {
        ZeroSubtrees { path, lock: Mutex::new(()) }
    }

    /// Opens the file (created with its magic when missing or not ours) and returns it with
    /// the number of records it holds that pass their check; a damaged tail is cut.
    fn open_checked(&self) -> Result<(File, u64), StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        let len = file.metadata().map_err(io_err(&self.path))?.len();
        let mut magic = [0u8; 8];
        if len < 8 || file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
            if len > 0 {
                tracing::warn!(path = %self.path.display(), "the zero-subtree table is not one; it is made again");
            }
            file.set_len(0).map_err(io_err(&self.path))?;
            file.write_all_at(MAGIC, 0).map_err(io_err(&self.path))?;
            return Ok((file, 0));
        }
        let mut records = 0u64;
        let mut buf = vec![0u8; RECORD];
        while 8 + (records + 1) * RECORD_BYTES <= len {
            file.read_exact_at(&mut buf, 8 + records * RECORD_BYTES).map_err(io_err(&self.path))?;
            let (values, check) = buf.split_at(VALUES);
            if record_check(records, values) != check {
                tracing::warn!(path = %self.path.display(), record = records,
                    "a record of the zero-subtree table fails its check; it and what follows are made again");
                break;
            }
            records += 1;
        }
        if 8 + records * RECORD_BYTES != len {
            file.set_len(8 + records * RECORD_BYTES).map_err(io_err(&self.path))?;
        }
        Ok((file, records))
    }

    /// Appends records `[from, to)`, computed on `threads` threads.
    fn append(&self, file: &File, from: u64, to: u64, threads: u64) -> Result<(), StoreError> {
        let mut next = from;
        while next < to {
            // A batch of records per round, so that a long fill is written as it goes.
            let threads = usize::try_from(threads).unwrap_or(1).clamp(1, 64);
            let batch = usize::try_from(to - next).unwrap_or(usize::MAX).min(threads * 4);
            let mut out = vec![0u8; batch * RECORD];
            let per = batch.div_ceil(threads);
            std::thread::scope(|s| {
                for (i, part) in out.chunks_mut(per * RECORD).enumerate() {
                    let first = next + (i * per) as u64;
                    s.spawn(move || {
                        for (j, rec) in part.chunks_mut(RECORD).enumerate() {
                            let index = first + j as u64;
                            let (values, check) = rec.split_at_mut(VALUES);
                            for (k, v) in values.chunks_mut(32).enumerate() {
                                v.copy_from_slice(&zero_unit(index * RECORD_UNITS + k as u64));
                            }
                            check.copy_from_slice(&record_check(index, values));
                        }
                    });
                }
            });
            file.write_all_at(&out, 8 + next * RECORD_BYTES).map_err(io_err(&self.path))?;
            next += batch as u64;
        }
        Ok(())
    }

    fn records_for(bytes: u64) -> u64 {
        bytes.div_ceil(UNIT).div_ceil(RECORD_UNITS)
    }

    /// The table covering a disk of `bytes`, the values it lacks computed first on all
    /// cores. (Nothing is synced: a value lost in a crash is computed again, and one
    /// damaged fails its record's check.)
    pub fn covering(&self, bytes: u64) -> Result<ZeroTable, StoreError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (file, have) = self.open_checked()?;
        let need = Self::records_for(bytes);
        if have < need {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
            tracing::info!(
                from_mib = have * RECORD_UNITS,
                to_mib = need * RECORD_UNITS,
                "working out the zero-subtree values a disk of this size needs (once per data directory)"
            );
            self.append(&file, have, need, threads)?;
        }
        Ok(ZeroTable { file, units: have.max(need) * RECORD_UNITS, window: Vec::new(), window_first: 0 })
    }

    /// Background warm-up: appends at most `max_records` of what a disk of `bytes` needs,
    /// on `threads` threads (started by the caller's, so at its priority). Returns whether
    /// more remain.
    pub fn warm(&self, bytes: u64, max_records: u64, threads: u64) -> Result<bool, StoreError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (file, have) = self.open_checked()?;
        let need = Self::records_for(bytes);
        let to = need.min(have + max_records);
        if have < to {
            self.append(&file, have, to, threads)?;
        }
        Ok(to < need)
    }

    /// Bytes of disk the table covers now (checked).
    pub fn covered(&self) -> Result<u64, StoreError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.open_checked()?.1 * RECORD_UNITS * UNIT)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ZeroTable {
    /// Units `[0, units)` are covered.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// The value of `unit` (< `units()`); cheapest when asked in increasing order.
    pub fn get(&mut self, unit: u64) -> Result<ChainingValue, StoreError> {
        if unit >= self.units {
            return Err(StoreError::Invariant("a zero subtree past the table"));
        }
        let rec = unit / RECORD_UNITS;
        let windowed = (self.window.len() / RECORD) as u64;
        if unit < self.window_first || (unit - self.window_first) / RECORD_UNITS >= windowed {
            // 256 records (16 GiB of disk) per read.
            let count = (self.units / RECORD_UNITS - rec).min(256);
            self.window.resize(usize::try_from(count).unwrap_or(256) * RECORD, 0);
            self.file
                .read_exact_at(&mut self.window, 8 + rec * RECORD_BYTES)
                .map_err(|source| StoreError::Io { path: "zero-subtrees".into(), source })?;
            self.window_first = rec * RECORD_UNITS;
        }
        let i = usize::try_from(unit - self.window_first).unwrap_or(usize::MAX);
        let at = (i / PER_RECORD) * RECORD + (i % PER_RECORD) * 32;
        let mut cv = [0u8; 32];
        cv.copy_from_slice(&self.window[at..at + 32]);
        Ok(cv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_zero_subtrees_and_a_damaged_record_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let z = ZeroSubtrees::new(dir.path().join("zero-subtrees"));
        let mut t = z.covering(3 * RECORD_UNITS * UNIT - 1).unwrap();
        assert_eq!(t.units(), 3 * RECORD_UNITS);
        for unit in [0, 1, RECORD_UNITS - 1, RECORD_UNITS, 2 * RECORD_UNITS + 5, 3 * RECORD_UNITS - 1] {
            assert_eq!(t.get(unit).unwrap(), zero_unit(unit), "unit {unit}");
        }
        assert!(t.get(3 * RECORD_UNITS).is_err());
        // Warm-up goes a step at a time and stops when the size is covered.
        assert!(z.warm(6 * RECORD_UNITS * UNIT, 2, 1).unwrap());
        assert!(!z.warm(6 * RECORD_UNITS * UNIT, 2, 2).unwrap());
        assert_eq!(z.covered().unwrap(), 6 * RECORD_UNITS * UNIT);
        // A flipped byte in record 4: records 0-3 stay, 4 and 5 are made again, right.
        let f = OpenOptions::new().write(true).open(z.path()).unwrap();
        f.write_all_at(&[0xff], 8 + 4 * RECORD_BYTES + 100).unwrap();
        assert_eq!(z.covered().unwrap(), 4 * RECORD_UNITS * UNIT);
        let mut t = z.covering(6 * RECORD_UNITS * UNIT).unwrap();
        assert_eq!(t.get(4 * RECORD_UNITS + 3).unwrap(), zero_unit(4 * RECORD_UNITS + 3));
        // A torn append (half a record) and a file that is not the table.
        f.set_len(8 + 6 * RECORD_BYTES + 40).unwrap();
        assert_eq!(z.covered().unwrap(), 6 * RECORD_UNITS * UNIT);
        std::fs::write(z.path(), b"something else entirely").unwrap();
        assert_eq!(z.covered().unwrap(), 0);
        let mut t = z.covering(UNIT).unwrap();
        assert_eq!(t.get(7).unwrap(), zero_unit(7));
    }
}
