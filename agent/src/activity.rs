//! The activity log of `--mode nbd` (as in DRBD): before the first write into a 4 MiB
//! extent, the extent is durably marked *hot* in the state directory. An extent goes cold
//! again only once a point that covers all its writes has been acked and the agent's
//! state committed, and it has rested a while. So every block that may differ from the
//! agent's committed state (and from the server's copy) lies in a hot extent: after a
//! crash of the agent or its host, a lost session or a dropped log, only the hot extents
//! are compared with the receiver, never the whole disk.
//!
//! The file `disk-NAME.hot` is a bitmap, one bit per extent, written a 4 KiB page at a
//! time. A bit is set and synced before the write it covers is applied; a torn page can
//! only lose a bit whose write never happened, or keep a bit that was being cleared.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per extent.
pub const EXTENT: u64 = 4 << 20;
const PAGE: usize = 4096;

#[derive(Debug)]
pub struct ActivityLog {
    file: File,
    bits: Vec<u8>,
    extents: u64,
}

impl ActivityLog {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("disk-{disk}.hot"))
    }

    /// Opens the log of a disk of `size` bytes. False in the second value: there was no
    /// usable log (first run in nbd mode, after scan mode, another disk size), so every
    /// extent starts hot: the disk is compared in full once. That log is written whole and
    /// renamed into place, so a crash leaves the old file or the new one.
    pub fn open(state_dir: &Path, disk: &str, size: u64) -> io::Result<(ActivityLog, bool)> {
        let path = ActivityLog::path(state_dir, disk);
        let extents = size.div_ceil(EXTENT);
        let len = usize::try_from(extents.div_ceil(8)).unwrap_or(usize::MAX).next_multiple_of(PAGE);
        if let Some(bits) = std::fs::read(&path).ok().filter(|b| b.len() == len) {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            return Ok((ActivityLog { file, bits, extents }, true));
        }
        let mut log = ActivityLog { file: File::open("/dev/null")?, bits: vec![0u8; len], extents };
        for e in 0..extents {
            log.set(e, true);
        }
        let new = path.with_extension("hot.new");
        std::fs::write(&new, &log.bits)?;
        File::open(&new)?.sync_all()?;
        std::fs::rename(&new, &path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        log.file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        Ok((log, false))
    }

    /// Scan mode writes the disks' state without the io path: an activity log left by nbd
    /// mode would miss those writes, so it goes.
    pub fn remove(state_dir: &Path, disk: &str) {
        let _ = std::fs::remove_file(ActivityLog::path(state_dir, disk));
    }

    pub fn is_hot(&self, extent: u64) -> bool {
        self.bits
            .get(usize::try_from(extent / 8).unwrap_or(usize::MAX))
            .is_some_and(|b| b & (1 << (extent % 8)) != 0)
    }

    fn set(&mut self, extent: u64, hot: bool) -> Option<usize> {
        let i = usize::try_from(extent / 8).ok().filter(|&i| i < self.bits.len())?;
        if hot {
            self.bits[i] |= 1 << (extent % 8);
        } else {
            self.bits[i] &= !(1 << (extent % 8));
        }
        Some(i / PAGE)
    }

    fn write_pages(&self, pages: impl IntoIterator<Item = usize>) -> io::Result<()> {
        let mut pages: Vec<usize> = pages.into_iter().collect();
        pages.dedup();
        for p in pages {
            self.file.write_all_at(&self.bits[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64)?;
        }
        self.file.sync_data()
    }

    /// Marks extents hot, durably, before anything is written into them.
    pub fn mark_hot(&mut self, extents: &[u64]) -> io::Result<()> {
        let pages: Vec<usize> = extents.iter().filter_map(|&e| self.set(e, true)).collect();
        self.write_pages(pages).inspect_err(|_| {
            // Not durably hot: forget it, so the next write tries again.
            for &e in extents {
                self.set(e, false);
            }
        })
    }

    /// Extents whose every write is covered by the agent's committed state go cold.
    pub fn retire(&mut self, extents: &[u64]) -> io::Result<()> {
        let pages: Vec<usize> = extents.iter().filter_map(|&e| self.set(e, false)).collect();
        self.write_pages(pages)
    }

    /// Every hot extent, in order.
    pub fn hot(&self) -> Vec<u64> {
        (0..self.extents).filter(|&e| self.is_hot(e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_survive_a_reopen_and_retired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let size = 100 * EXTENT + 5;
        let (mut log, usable) = ActivityLog::open(dir.path(), "sda", size).unwrap();
        assert!(!usable, "a new log is not usable: the disk is compared in full once");
        assert_eq!(log.hot().len(), 101, "every extent starts hot");
        log.retire(&(0..101).collect::<Vec<_>>()).unwrap();
        log.mark_hot(&[0, 7, 100]).unwrap();
        log.retire(&[7]).unwrap();
        drop(log);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size).unwrap();
        assert!(usable);
        assert_eq!(log.hot(), [0, 100]);
        // Another size: not usable.
        drop(log);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", 50_000 * EXTENT).unwrap();
        assert!(!usable);
        assert_eq!(log.hot().len(), 50_000);
    }
}
