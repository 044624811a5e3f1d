//! The BLAKE3 chaining values of all-zero 1 MiB subtrees, by position.
//!
//! An output's whole-disk BLAKE3 (`vm.json`'s `blake3`, equal to `b3sum` of the file) must
//! cover the zeroes of its holes: a BLAKE3 chunk's chaining value depends on its position,
//! so no two zero subtrees share one, and hashing them costs about 0.25 CPU-s per GiB of
//! hole. But the value of the zero subtree at a given position depends on nothing else
//! (not the disk, not the VM), so a store works it out once per MiB up to the size of its
//! largest disk, in the background ([`crate::Store::warm_zero_subtrees`]), and keeps it in
//! `<data-dir>/zero-subtrees`: an output's BLAKE3 then takes the values of its 1 MiB units
//! that lie wholly in a hole from here, as far as the table reaches, and hashes the rest.
//! The table only saves work: a value it cannot give is hashed instead.
//!
//! Layout: the magic `TERNZS01`, then records of [`RECORD_UNITS`] values (32 bytes each, the
//! units of 64 MiB of disk) followed by a 32-byte BLAKE3 of the record's index (u64 LE) and
//! its values. Records are only appended. The first use in a process checks every record
//! and keeps the file up to the first one that fails (a torn append, a damaged sector):
//! what follows is computed again. Each record is checked again as it is read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
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

/// The table of one data directory. The file is checked once, when first used; after
/// that only this process appends to it (the store holds the directory's lock against
/// other processes), under `state`'s lock.
#[derive(Debug)]
pub struct ZeroSubtrees {
    path: PathBuf,
    /// Held only to open, append a computed batch, or cut: never while values are worked
    /// out, so an output's `table()` waits for a write at most.
    state: Mutex<Option<Opened>>,
    /// One warm-up at a time.
    warming: Mutex<()>,
}

#[derive(Debug)]
struct Opened {
    file: File,
    /// Records in the file, all checked or written by this process.
    records: u64,
}

/// A view of the table covering units `[0, units)`: values are read from it in increasing
/// order, a window of records at a time, each record checked as it is read.
#[derive(Debug)]
pub struct ZeroTable<'a> {
    owner: &'a ZeroSubtrees,
    file: File,
    units: u64,
    window: Vec<u8>,
    window_first: u64,
    /// Per record of the window: it was read and passes its check.
    good: Vec<bool>,
}

impl ZeroSubtrees {
    pub fn new(path: PathBuf) -> ZeroSubtrees {
        ZeroSubtrees { path, state: Mutex::new(None), warming: Mutex::new(()) }
    }

    /// The file, opened and checked on first use (created with its magic when missing or
    /// not ours; a damaged tail cut).
    fn opened<'a>(&self, state: &'a mut Option<Opened>) -> Result<&'a mut Opened, StoreError> {
        if state.is_none() {
            *state = Some(self.open_checked()?);
        }
        state.as_mut().ok_or(StoreError::Invariant("the zero-subtree table is open"))
    }

    fn open_checked(&self) -> Result<Opened, StoreError> {
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
            return Ok(Opened { file, records: 0 });
        }
        let mut records = 0u64;
        let mut buf = vec![0u8; RECORD];
        while 8 + (records + 1) * RECORD_BYTES <= len {
            let read = file.read_exact_at(&mut buf, 8 + records * RECORD_BYTES);
            let (values, check) = buf.split_at(VALUES);
            if read.is_err() || record_check(records, values) != check {
                tracing::warn!(path = %self.path.display(), record = records,
                    "a record of the zero-subtree table cannot be read or fails its check; it and what follows are made again");
                break;
            }
            records += 1;
        }
        if 8 + records * RECORD_BYTES != len {
            file.set_len(8 + records * RECORD_BYTES).map_err(io_err(&self.path))?;
        }
        Ok(Opened { file, records })
    }

    /// Records `[from, to)`, worked out on `threads` threads (started by the caller's
    /// thread, so at its priority).
    fn compute(from: u64, to: u64, threads: u64) -> Vec<u8> {
        let threads = usize::try_from(threads).unwrap_or(1).clamp(1, 64);
        let count = usize::try_from(to - from).unwrap_or(0);
        let mut out = vec![0u8; count * RECORD];
        let per = count.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(per * RECORD).enumerate() {
                let first = from + (i * per) as u64;
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
        out
    }

    /// What the table holds now; never waits for values to be worked out. Units past it
    /// are the caller's to hash.
    pub fn table(&self) -> Result<ZeroTable<'_>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let opened = self.opened(&mut state)?;
        let file = opened.file.try_clone().map_err(io_err(&self.path))?;
        Ok(ZeroTable {
            owner: self,
            file,
            units: opened.records * RECORD_UNITS,
            window: Vec::new(),
            window_first: 0,
            good: Vec::new(),
        })
    }

    /// Record `index` was found damaged after the file was opened: the table is cut
    /// there, and the warm-up makes it again.
    fn damaged(&self, index: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(opened) = state.as_mut()
            && opened.records > index
        {
            tracing::warn!(path = %self.path.display(), record = index,
                "a record of the zero-subtree table fails its check; it and what follows are made again");
            opened.records = index;
            if opened.file.set_len(8 + index * RECORD_BYTES).is_err() {
                *state = None;
            }
        }
    }

    /// Background warm-up: appends at most `max_records` of what a disk of `bytes` needs,
    /// worked out on `threads` threads without the table's lock (taken only to write each
    /// batch). Returns whether more remain.
    pub fn warm(&self, bytes: u64, max_records: u64, threads: u64) -> Result<bool, StoreError> {
        let _one = self.warming.lock().unwrap_or_else(|p| p.into_inner());
        let have = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.opened(&mut state)?.records
        };
        let need = bytes.div_ceil(UNIT).div_ceil(RECORD_UNITS);
        let to = need.min(have.saturating_add(max_records));
        let mut next = have;
        while next < to {
            // A few records per thread a round: memory stays small whatever the range.
            let end = to.min(next + threads.clamp(1, 64) * 4);
            let out = Self::compute(next, end, threads);
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let opened = self.opened(&mut state)?;
            if opened.records != next {
                // Cut meanwhile (a damaged record): the next step starts from there.
                return Ok(true);
            }
            if let Err(e) = opened.file.write_all_at(&out, 8 + next * RECORD_BYTES) {
                // What was written of the batch is checked again on the next opening.
                *state = None;
                return Err(io_err(&self.path)(e));
            }
            opened.records = end;
            next = end;
        }
        Ok(to < need)
    }

    /// Bytes of disk the table covers.
    #[cfg(test)]
    pub fn covered(&self) -> Result<u64, StoreError> {
        Ok(self.table()?.units * UNIT)
    }

    #[cfg(test)]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl ZeroTable<'_> {
    /// Units `[0, units)` are covered.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Checks the records that cover units `[0, units)` and returns how many units, from
    /// the start, can be taken from the table: those before the first record that cannot
    /// be read or fails its check (which is cut, to be made again). About 32 MB read per
    /// TiB of disk.
    pub fn usable(&mut self, units: u64) -> u64 {
        let records = units.min(self.units).div_ceil(RECORD_UNITS);
        let mut index = 0;
        while index < records {
            // Reads and checks the window of records from `index` on (a bad one shows in
            // `good`, not in the result of this first read).
            let _ = self.get(index * RECORD_UNITS);
            let first = self.window_first / RECORD_UNITS;
            if let Some(bad) = self.good.iter().position(|g| !g).map(|j| first + j as u64)
                && bad < records
            {
                self.owner.damaged(bad);
                return (bad * RECORD_UNITS).min(units);
            }
            index = first + (self.good.len() as u64).max(1);
        }
        units.min(self.units)
    }

    /// The value of `unit` (< `units()`); cheapest when asked in increasing order. An
    /// error (the file could not be read, or a record no longer passes its check) leaves
    /// the caller to hash the unit's zeroes.
    pub fn get(&mut self, unit: u64) -> Result<ChainingValue, StoreError> {
        if unit >= self.units {
            return Err(StoreError::Invariant("a zero subtree past the table"));
        }
        let rec = unit / RECORD_UNITS;
        let windowed = (self.window.len() / RECORD) as u64;
        if unit < self.window_first || (unit - self.window_first) / RECORD_UNITS >= windowed {
            // 256 records (16 GiB of disk) per read.
            let count = (self.units / RECORD_UNITS - rec).min(256);
            self.window.clear();
            self.window.resize(usize::try_from(count).unwrap_or(256) * RECORD, 0);
            // Records read whole and passing their check are good; a short read leaves
            // the rest bad.
            let mut read = 0;
            while read < self.window.len() {
                match self.file.read_at(&mut self.window[read..], 8 + rec * RECORD_BYTES + read as u64) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            self.good = self
                .window
                .chunks(RECORD)
                .zip(rec..)
                .enumerate()
                .map(|(i, (r, index))| {
                    let (values, check) = r.split_at(VALUES);
                    (i + 1) * RECORD <= read && record_check(index, values) == check
                })
                .collect();
            self.window_first = rec * RECORD_UNITS;
        }
        let i = usize::try_from(unit - self.window_first).unwrap_or(usize::MAX);
        if !self.good[i / PER_RECORD] {
            return Err(StoreError::Invariant("a zero-subtree record cannot be read back as written"));
        }
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
        let path = dir.path().join("zero-subtrees");
        let z = ZeroSubtrees::new(path.clone());
        assert_eq!(z.covered().unwrap(), 0, "a new table covers nothing");
        // Warm-up goes a step at a time and stops when the size is covered.
        assert!(z.warm(3 * RECORD_UNITS * UNIT - 1, 2, 1).unwrap());
        assert!(!z.warm(3 * RECORD_UNITS * UNIT - 1, 2, 2).unwrap());
        let mut t = z.table().unwrap();
        assert_eq!(t.units(), 3 * RECORD_UNITS);
        for unit in [0, 1, RECORD_UNITS - 1, RECORD_UNITS, 2 * RECORD_UNITS + 5, 3 * RECORD_UNITS - 1] {
            assert_eq!(t.get(unit).unwrap(), zero_unit(unit), "unit {unit}");
        }
        assert!(t.get(3 * RECORD_UNITS).is_err());
        assert!(!z.warm(6 * RECORD_UNITS * UNIT, 4, 2).unwrap());
        // A flipped byte in record 4: a table open before it fails to read that record
        // back; the next opening (a restart) keeps records 0-3 and makes 4 and 5 again.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 8 + 4 * RECORD_BYTES + 100).unwrap();
        let mut t = z.table().unwrap();
        assert!(t.get(4 * RECORD_UNITS + 3).is_err());
        assert_eq!(t.get(3).unwrap(), zero_unit(3));
        // An output checks the records it needs first: it takes the table up to the
        // damaged one, which is cut, and the warm-up makes it again.
        assert_eq!(t.usable(6 * RECORD_UNITS), 4 * RECORD_UNITS);
        assert_eq!(z.covered().unwrap(), 4 * RECORD_UNITS * UNIT);
        assert!(!z.warm(6 * RECORD_UNITS * UNIT, 10, 2).unwrap());
        assert_eq!(z.table().unwrap().usable(6 * RECORD_UNITS), 6 * RECORD_UNITS);
        assert_eq!(z.table().unwrap().usable(2 * RECORD_UNITS + 1), 2 * RECORD_UNITS + 1);
        f.write_all_at(&[0xff], 8 + 4 * RECORD_BYTES + 100).unwrap();
        let z = ZeroSubtrees::new(path.clone());
        assert_eq!(z.covered().unwrap(), 4 * RECORD_UNITS * UNIT);
        z.warm(6 * RECORD_UNITS * UNIT, 10, 2).unwrap();
        assert_eq!(z.table().unwrap().get(4 * RECORD_UNITS + 3).unwrap(), zero_unit(4 * RECORD_UNITS + 3));
        // A torn append (part of a record) and a file that is not the table.
        f.set_len(8 + 6 * RECORD_BYTES + 40).unwrap();
        assert_eq!(ZeroSubtrees::new(path.clone()).covered().unwrap(), 6 * RECORD_UNITS * UNIT);
        std::fs::write(&path, b"something else entirely").unwrap();
        let z = ZeroSubtrees::new(path);
        assert_eq!(z.covered().unwrap(), 0);
        z.warm(UNIT, 1, 1).unwrap();
        assert_eq!(z.table().unwrap().get(7).unwrap(), zero_unit(7));
    }
}
