//! The space reserve: `DATA_DIR/space-reserve`, a file of allocated blocks that nothing
//! else may use. When the data directory's file system fills, retention gives it up, so
//! that it can fold the journal into the base images (which allocates before it frees a
//! segment) and free space; without it a full data directory could never shrink.
//!
//! While the file is not held (given up, deleted by hand, or there was no room to make
//! it), a new journal record is taken only with at least the reserve's size free, so that
//! the journal cannot eat the room a fold needs; the file is made again as soon as twice
//! its size is free.

use crate::StoreError;
use crate::durable::{io_err, sync_dir};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub const RESERVE_FILE: &str = "space-reserve";

/// The largest share of the data directory's file system the reserve takes, whatever its
/// configured size: a small test installation keeps most of its space.
const MAX_SHARE: u64 = 20;

#[derive(Debug)]
pub struct Reserve {
    dir: PathBuf,
    /// Bytes the file holds when held; 0: no reserve (the master target).
    bytes: u64,
    held: AtomicBool,
    /// Making and giving up the file, one at a time.
    change: Mutex<()>,
}

/// What the file system under `dir` has free for this process, in bytes.
pub fn free_bytes(dir: &Path) -> Result<u64, StoreError> {
    let s = rustix::fs::statvfs(dir).map_err(|e| io_err(dir)(e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

fn size_of_fs(dir: &Path) -> Result<u64, StoreError> {
    let s = rustix::fs::statvfs(dir).map_err(|e| io_err(dir)(e.into()))?;
    Ok(s.f_blocks.saturating_mul(s.f_frsize))
}

impl Reserve {
    /// The reserve of the data directory `dir`, `configured` bytes at most (and at most a
    /// twentieth of its file system). Made now if it is missing and there is room. `None`
    /// (a tool that only reads, the master target) leaves the file as it is and keeps no
    /// reserve; `Some(0)` removes it.
    pub fn open(dir: &Path, configured: Option<u64>) -> Result<Reserve, StoreError> {
        let bytes = match configured {
            None | Some(0) => 0,
            Some(n) => n.min(size_of_fs(dir)? / MAX_SHARE),
        };
        let reserve =
            Reserve { dir: dir.to_path_buf(), bytes, held: AtomicBool::new(false), change: Mutex::new(()) };
        let path = reserve.path();
        if configured == Some(0) && path.exists() {
            // Turned off: the file left from an earlier configuration is space for the data.
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let _ = std::fs::remove_file(dir.join(format!("{RESERVE_FILE}.tmp")));
        if bytes == 0 {
            return Ok(reserve);
        }
        if bytes < configured.unwrap_or(0) {
            tracing::warn!(dir = %dir.display(), reserve_bytes = bytes,
                "the space reserve is cut to a twentieth of the data directory's file system");
        }
        match reserve.take() {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(dir = %dir.display(), reserve_bytes = bytes, free_bytes = free_bytes(dir)?,
                "too little free space to set the space reserve aside: new records are taken only \
                 while as much as the reserve stays free; free space in the data directory")
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
                "the space reserve cannot be set aside: new records are taken only while as much as \
                 the reserve stays free"),
        }
        Ok(reserve)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// The reserve's size in bytes (0: none).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the file is set aside now (always true without a reserve).
    pub fn held(&self) -> bool {
        self.bytes == 0 || self.held.load(Ordering::Acquire)
    }

    /// Makes the file when twice its size is free; returns whether it is held.
    pub fn take(&self) -> Result<bool, StoreError> {
        let _one = self.change.lock().unwrap_or_else(|p| p.into_inner());
        if self.held() {
            return Ok(true);
        }
        let path = self.path();
        let have = std::fs::metadata(&path).map_or(0, |m| m.len());
        if have >= self.bytes {
            // Already there (a start, or a size lowered since: the excess goes back).
            if have > self.bytes {
                let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                f.set_len(self.bytes).and_then(|()| f.sync_all()).map_err(io_err(&path))?;
            }
            self.held.store(true, Ordering::Release);
            return Ok(true);
        }
        if free_bytes(&self.dir)?.saturating_add(have) < self.bytes.saturating_mul(2) {
            return Ok(false);
        }
        let tmp = self.dir.join(format!("{RESERVE_FILE}.tmp"));
        let made = (|| {
            let f = std::fs::File::create(&tmp)?;
            allocate(&f, self.bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        sync_dir(&self.dir)?;
        self.held.store(true, Ordering::Release);
        tracing::info!(path = %path.display(), bytes = self.bytes, "space reserve set aside");
        Ok(true)
    }

    /// Gives the file up (the file system is full: retention needs room to fold, or a
    /// recovery action room for its catalog rows), saying `why` in the log; returns whether
    /// it was held.
    pub fn release(&self, why: &str) -> Result<bool, StoreError> {
        let _one = self.change.lock().unwrap_or_else(|p| p.into_inner());
        if self.bytes == 0 || !self.held.load(Ordering::Acquire) {
            return Ok(false);
        }
        let path = self.path();
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        self.held.store(false, Ordering::Release);
        sync_dir(&self.dir)?;
        tracing::warn!(path = %path.display(), bytes = self.bytes,
            "the data directory is full: its space reserve is given up {why}; new records wait until there \
             is room again");
        Ok(true)
    }

    /// Whether a new journal record may be written: while the file is held, once it can be
    /// made again (twice its size free), or while its size stays free. Refused as a full file
    /// system, which the agent retries: after a release, the room freed is the fold's.
    pub fn admit(&self) -> Result<(), StoreError> {
        // A file deleted by hand (an emergency) gives its room to retention and the catalog,
        // not to the next record: noticed here, at once.
        self.recheck();
        if self.held() {
            return Ok(());
        }
        match self.take() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "the space reserve cannot be set aside yet"),
        }
        let free = free_bytes(&self.dir)?;
        if free >= self.bytes {
            return Ok(());
        }
        Err(StoreError::Io {
            path: self.dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{free} bytes free, less than the space reserve's {} bytes kept for retention to fold \
                     the journal: new records wait until points age out of their retention window and \
                     are folded, or space is added",
                    self.bytes
                ),
            ),
        })
    }

    /// Notices a reserve file deleted by hand (an operator freeing space in an emergency):
    /// it is made again by [`Reserve::admit`] or retention once there is room.
    pub fn recheck(&self) {
        if self.bytes > 0 && self.held.load(Ordering::Acquire) && !self.path().exists() {
            self.held.store(false, Ordering::Release);
            tracing::warn!(path = %self.path().display(), "the space reserve was removed; it is made again once there is room");
        }
    }
}

/// Allocates `len` bytes to `f`: `fallocate`, or zeroes written where the file system has no
/// `fallocate`.
fn allocate(f: &std::fs::File, len: u64) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(f, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            use std::io::Write;
            let zeros = vec![0u8; 1 << 20];
            let mut w = std::io::BufWriter::new(f);
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(zeros.len());
                w.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            w.flush()
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_given_up_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reserve::open(dir.path(), Some(1 << 20)).unwrap();
        // This machine's test directories have far more than 20 MiB.
        assert_eq!(r.bytes(), 1 << 20);
        assert!(r.held());
        assert_eq!(std::fs::metadata(r.path()).unwrap().len(), 1 << 20);
        r.admit().unwrap();
        assert!(r.release("for a test").unwrap());
        assert!(!r.path().exists());
        assert!(!r.release("for a test").unwrap(), "given up once");
        // There is room: the next record's admission makes it again.
        r.admit().unwrap();
        assert!(r.held() && r.path().exists());
        // Removed by hand, it is noticed and made again.
        std::fs::remove_file(r.path()).unwrap();
        r.recheck();
        assert!(!r.held());
        r.admit().unwrap();
        assert!(r.held() && r.path().exists());
        drop(r);
        // Opened again, the file there is the reserve.
        let r = Reserve::open(dir.path(), Some(1 << 20)).unwrap();
        assert!(r.held());
        // Opened by a tool that keeps no reserve, the file stays.
        let r = Reserve::open(dir.path(), None).unwrap();
        assert!(r.held() && r.path().exists());
        // Turned off, the file goes.
        let r = Reserve::open(dir.path(), Some(0)).unwrap();
        assert!(r.held() && !r.path().exists());
    }
}
