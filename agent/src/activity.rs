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
//!
//! The log knows only the writes that came through the agent. Beside it, `disk-NAME.seal`
//! says which file it describes (device, inode and birth time, or a block device's number,
//! and size) and, once the agent stopped cleanly, the file's modification and change times
//! after its last write. A disk that is another file now (moved over, disks swapped in
//! `--disk`), or a file written while the agent was stopped (restored from a backup,
//! written in place by another tool), makes every extent hot: the disk is compared in full
//! once. A clean stop's seal that matched stays clean until the agent's first write of a
//! run, so a run that writes nothing (a start that fails) keeps it; otherwise the seal is
//! written at once, so that every clean stop can make it clean. After a crash only the file's identity can be
//! checked: its times moved with the agent's own writes. A log without a seal (written by
//! an older agent) is trusted as it was then.

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

    /// Opens the log of a disk of `size` bytes, read from `disk_file`. False in the second
    /// value: there was no usable log (first run in nbd mode, after scan mode, another disk
    /// size, a disk that is not the one the log describes or that was written while the
    /// agent was stopped), so every extent starts hot: the disk is compared in full once.
    /// That log is written whole and renamed into place, so a crash leaves the old file or
    /// the new one. The seal is left as it is until the run's first write.
    pub fn open(
        state_dir: &Path,
        disk: &str,
        size: u64,
        disk_file: &File,
    ) -> io::Result<(ActivityLog, bool)> {
        ActivityLog::open_sealed(state_dir, disk, size, disk_file).map(|(log, usable, _)| (log, usable))
    }

    /// [`ActivityLog::open`]; the third value is true when a clean stop's seal matched, the
    /// one case where the seal waits for the run's first write to say the agent runs. In
    /// every other case it says so now: a run that never writes the disk (an idle disk, a
    /// first run) must still leave a seal for its clean stop to make clean.
    pub fn open_sealed(
        state_dir: &Path,
        disk: &str,
        size: u64,
        disk_file: &File,
    ) -> io::Result<(ActivityLog, bool, bool)> {
        let seen = Seal::of(disk_file, size, true)?;
        let (trusted, clean) = match Seal::read(state_dir, disk) {
            Ok(sealed) => {
                let why = sealed.changed(&seen);
                if let Some(why) = why {
                    tracing::warn!(disk, why, "the disk is compared in full with the process server's copy");
                }
                (why.is_none(), why.is_none() && sealed.clean)
            }
            Err(SealMissing::Damaged) => (false, false),
            Err(SealMissing::Absent) => (true, false),
        };
        let (log, usable) = ActivityLog::open_log(state_dir, disk, size, trusted)?;
        if !clean {
            seen.running().write(state_dir, disk)?;
        }
        Ok((log, usable, clean))
    }

    fn open_log(state_dir: &Path, disk: &str, size: u64, trusted: bool) -> io::Result<(ActivityLog, bool)> {
        let path = ActivityLog::path(state_dir, disk);
        let extents = size.div_ceil(EXTENT);
        let len = usize::try_from(extents.div_ceil(8)).unwrap_or(usize::MAX).next_multiple_of(PAGE);
        if let Some(bits) = std::fs::read(&path).ok().filter(|b| trusted && b.len() == len) {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            return Ok((ActivityLog { file, bits, extents }, true));
        }
        let mut log = ActivityLog { file: File::open("/dev/null")?, bits: vec![0u8; len], extents };
        for e in 0..extents {
            log.set(e, true);
        }
        replace_durably(&path, &log.bits)?;
        log.file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        Ok((log, false))
    }

    /// Scan mode writes the disks' state without the io path: an activity log left by nbd
    /// mode would miss those writes, so it goes.
    pub fn remove(state_dir: &Path, disk: &str) {
        let _ = std::fs::remove_file(ActivityLog::path(state_dir, disk));
        let _ = std::fs::remove_file(Seal::path(state_dir, disk));
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

/// Which file a disk's activity log describes, and (`clean`) its times once the agent
/// stopped writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    clean: bool,
    /// A file's device and inode, and its birth time where the file system keeps one (an
    /// inode number is given again to the next file made after one is removed); zero for
    /// a block device.
    dev: u64,
    ino: u64,
    btime: (i64, u32),
    /// A block device's number; zero for a file.
    rdev: u64,
    size: u64,
    /// Modification and change times (seconds, nanoseconds); kept only when `clean`.
    mtime: (i64, i64),
    ctime: (i64, i64),
}

// Layout: b"TERNSEAL", version u32 LE (1), clean u32, dev, ino, rdev, size u64, mtime s i64,
// ns i64, ctime s i64, ns i64, btime s i64, ns i64, then the BLAKE3 of the 96 bytes before it.
const SEAL_MAGIC: &[u8; 8] = b"TERNSEAL";
const SEAL_BODY: usize = 96;

/// Why there is no seal to trust.
#[derive(Debug)]
enum SealMissing {
    /// No file: the log was written by an agent from before seals (or there is no log).
    Absent,
    Damaged,
}

impl Seal {
    fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join(format!("disk-{disk}.seal"))
    }

    /// `f`, a disk of `size` bytes, as it is now; `clean`: with its times.
    pub fn of(f: &File, size: u64, clean: bool) -> io::Result<Seal> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = f.metadata()?;
        let device = m.file_type().is_block_device();
        // A block device node's times do not move with its writes: only its number is kept.
        let times = clean && !device;
        let btime = if device { None } else { birth_time(f) };
        Ok(Seal {
            clean: times,
            dev: if device { 0 } else { m.dev() },
            ino: if device { 0 } else { m.ino() },
            btime: btime.unwrap_or((0, 0)),
            rdev: if device { m.rdev() } else { 0 },
            size,
            mtime: if times { (m.mtime(), m.mtime_nsec()) } else { (0, 0) },
            ctime: if times { (m.ctime(), m.ctime_nsec()) } else { (0, 0) },
        })
    }

    /// Why the disk seen now is not what this seal describes, if it is not.
    fn changed(&self, now: &Seal) -> Option<&'static str> {
        if (self.dev, self.ino, self.btime, self.rdev) != (now.dev, now.ino, now.btime, now.rdev) {
            Some("the disk is not the file (or device) the agent served when it last ran")
        } else if self.size != now.size {
            Some("the disk's size changed since the agent last ran")
        } else if self.clean && (self.mtime, self.ctime) != (now.mtime, now.ctime) {
            Some("the disk was written while the agent was stopped (its modification or change time moved)")
        } else {
            None
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SEAL_BODY + 32);
        b.extend_from_slice(SEAL_MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&u32::from(self.clean).to_le_bytes());
        for v in [self.dev, self.ino, self.rdev, self.size] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in
            [self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1, self.btime.0, i64::from(self.btime.1)]
        {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let check = blake3::hash(&b);
        b.extend_from_slice(check.as_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Seal> {
        let (body, check) = (b.get(..SEAL_BODY)?, b.get(SEAL_BODY..)?);
        if b.len() != SEAL_BODY + 32 || &body[..8] != SEAL_MAGIC || blake3::hash(body).as_bytes() != check {
            return None;
        }
        let word = |i: usize| body.get(i..i + 8).and_then(|w| w.try_into().ok());
        let u = |i: usize| word(i).map(u64::from_le_bytes);
        let s = |i: usize| word(i).map(i64::from_le_bytes);
        let version = u32::from_le_bytes(body[8..12].try_into().ok()?);
        let clean = u32::from_le_bytes(body[12..16].try_into().ok()?);
        if version != 1 || clean > 1 {
            return None;
        }
        Some(Seal {
            clean: clean == 1,
            dev: u(16)?,
            ino: u(24)?,
            rdev: u(32)?,
            size: u(40)?,
            mtime: (s(48)?, s(56)?),
            ctime: (s(64)?, s(72)?),
            btime: (s(80)?, u32::try_from(s(88)?).ok()?),
        })
    }

    /// This seal as the agent's first write of a run leaves it: the file's times are no
    /// longer the seal's.
    pub fn running(self) -> Seal {
        Seal { clean: false, mtime: (0, 0), ctime: (0, 0), ..self }
    }

    /// Waits until the clock has moved past this seal's change time by more than a file
    /// system's timestamp step (a second where it keeps no nanoseconds), so that a write
    /// made after the agent stops cannot leave the times the seal holds.
    pub fn outlast(&self) {
        if !self.clean {
            return;
        }
        let step_ns: i128 = if self.ctime.1 == 0 { 1_000_000_000 } else { 20_000_000 };
        let past = i128::from(self.ctime.0) * 1_000_000_000 + i128::from(self.ctime.1) + step_ns;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        let wait = past - now;
        if wait > 0 && wait <= 2 * step_ns {
            std::thread::sleep(std::time::Duration::from_nanos(u64::try_from(wait).unwrap_or(0)));
        }
    }

    /// The disk's seal in `state_dir`.
    fn read(state_dir: &Path, disk: &str) -> Result<Seal, SealMissing> {
        let path = Seal::path(state_dir, disk);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if ActivityLog::path(state_dir, disk).exists() {
                    tracing::info!(
                        disk,
                        "the activity log has no seal (an older agent wrote it): trusted as then"
                    );
                }
                return Err(SealMissing::Absent);
            }
            Err(e) => {
                tracing::warn!(disk, path = %path.display(), error = %e, "cannot read the disk's seal");
                return Err(SealMissing::Damaged);
            }
        };
        Seal::decode(&bytes).ok_or_else(|| {
            tracing::warn!(disk, path = %path.display(), "the disk's seal is damaged");
            SealMissing::Damaged
        })
    }

    /// Writes the seal over the old one in place and syncs it: no room is needed, and a
    /// write torn by a crash fails its check, so the log is then not trusted.
    pub fn write(&self, state_dir: &Path, disk: &str) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Seal::path(state_dir, disk))?;
        f.write_all_at(&self.encode(), 0)?;
        f.sync_data()
    }
}

/// A file's birth time (statx), where the kernel and file system give one.
fn birth_time(f: &File) -> Option<(i64, u32)> {
    use rustix::fs::{AtFlags, StatxFlags, statx};
    let x = statx(f, "", AtFlags::EMPTY_PATH, StatxFlags::BTIME).ok()?;
    StatxFlags::from_bits_retain(x.stx_mask)
        .contains(StatxFlags::BTIME)
        .then_some((x.stx_btime.tv_sec, x.stx_btime.tv_nsec))
}

/// Writes `bytes` to `path` through a synced temporary file renamed into place, then syncs
/// the directory: a crash leaves the old file or the new one.
fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let new = path.with_extension("new");
    std::fs::write(&new, bytes)?;
    File::open(&new)?.sync_all()?;
    std::fs::rename(&new, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, name: &str, size: u64) -> File {
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn hot_extents_survive_a_reopen_and_retired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let size = 100 * EXTENT + 5;
        let f = disk(dir.path(), "d.img", size);
        let (mut log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(!usable, "a new log is not usable: the disk is compared in full once");
        assert_eq!(log.hot().len(), 101, "every extent starts hot");
        log.retire(&(0..101).collect::<Vec<_>>()).unwrap();
        log.mark_hot(&[0, 7, 100]).unwrap();
        log.retire(&[7]).unwrap();
        drop(log);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(usable);
        assert_eq!(log.hot(), [0, 100]);
        // Another size: not usable.
        drop(log);
        let bigger = disk(dir.path(), "d.img", 50_000 * EXTENT);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", 50_000 * EXTENT, &bigger).unwrap();
        assert!(!usable);
        assert_eq!(log.hot().len(), 50_000);
    }

    /// A log whose only hot extent is 3, over `f`, sealed as a clean stop leaves it.
    fn cooled_and_sealed(dir: &Path, f: &File, size: u64) {
        let (mut log, _) = ActivityLog::open(dir, "sda", size, f).unwrap();
        log.retire(&log.hot()).unwrap();
        log.mark_hot(&[3]).unwrap();
        f.write_all_at(b"the agent's own last write", 3 * EXTENT).unwrap();
        f.sync_all().unwrap();
        Seal::of(f, size, true).unwrap().write(dir, "sda").unwrap();
    }

    #[test]
    fn a_disk_written_while_the_agent_was_stopped_is_compared_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * EXTENT;
        let f = disk(dir.path(), "d.img", size);
        cooled_and_sealed(dir.path(), &f, size);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(usable, "untouched since the clean stop");
        assert_eq!(log.hot(), [3]);

        // Restored from a backup, in place (the same inode and size), once the clock has
        // moved past the seal's times as a clean stop waits it to.
        cooled_and_sealed(dir.path(), &f, size);
        Seal::of(&f, size, true).unwrap().outlast();
        f.write_all_at(b"restored", 9 * EXTENT).unwrap();
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(!usable);
        assert_eq!(log.hot().len(), 16, "every extent is compared");

        // Another file of the same size in its place (moved over it, or disks swapped).
        cooled_and_sealed(dir.path(), &f, size);
        let other = disk(dir.path(), "other.img", size);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &other).unwrap();
        assert!(!usable);
        assert_eq!(log.hot().len(), 16);
    }

    #[test]
    fn after_a_crash_the_log_is_trusted_for_the_same_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * EXTENT;
        let f = disk(dir.path(), "d.img", size);
        cooled_and_sealed(dir.path(), &f, size);
        // The agent starts, writes (its seal first says it runs), and is killed.
        let (mut log, _) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        Seal::of(&f, size, false).unwrap().running().write(dir.path(), "sda").unwrap();
        log.mark_hot(&[5]).unwrap();
        f.write_all_at(b"written, then killed", 5 * EXTENT).unwrap();
        drop(log);
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(usable, "the times moved with the agent's own writes");
        assert_eq!(log.hot(), [3, 5]);
        drop(log);
        let other = disk(dir.path(), "other.img", size);
        assert!(!ActivityLog::open(dir.path(), "sda", size, &other).unwrap().1);
    }

    #[test]
    fn a_damaged_seal_is_not_trusted_and_a_log_from_before_seals_is() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * EXTENT;
        let f = disk(dir.path(), "d.img", size);
        let seal = Seal::path(dir.path(), "sda");
        cooled_and_sealed(dir.path(), &f, size);
        let mut b = std::fs::read(&seal).unwrap();
        b[20] ^= 1;
        std::fs::write(&seal, b).unwrap();
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(!usable);
        assert_eq!(log.hot().len(), 16);
        drop(log);
        // An older agent's log (no seal): trusted as it was then.
        cooled_and_sealed(dir.path(), &f, size);
        std::fs::remove_file(&seal).unwrap();
        let (log, usable) = ActivityLog::open(dir.path(), "sda", size, &f).unwrap();
        assert!(usable);
        assert_eq!(log.hot(), [3]);
        let s = Seal::of(&f, size, true).unwrap();
        assert_eq!(Seal::decode(&s.encode()), Some(s));
    }
}
