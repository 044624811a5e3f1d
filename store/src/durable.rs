//! The one way the store publishes a file or makes a directory entry durable.

use crate::StoreError;
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

/// fsyncs a directory so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Creates `dir` and its parents, making each new entry durable.
pub fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    std::fs::create_dir(dir).or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) }).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Publishes `contents` at `path`: write a temporary file, fsync it, rename, fsync the folder.
/// A reader sees the old file or the new one, never a mix, before and after a crash.
pub fn publish(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    publish_file(&tmp, path)
}

/// Writes `contents` to `path` through a temporary file and a rename, without fsyncs: for
/// notes whose loss costs only time, and whose readers check them.
pub fn publish_unsynced(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Renames a fully written and fsynced temporary file into place and fsyncs the folder.
pub fn publish_file(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    std::fs::rename(tmp, path).map_err(io_err(path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}
