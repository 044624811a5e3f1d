//! Reading and writing a disk that may be a block device.
//!
//! A buffered read of a block device is served from the device's own page cache, and a
//! mounted file system's writes bypass that cache: once a device's blocks are cached, a
//! buffered reader keeps seeing what they held then, however often the file system writes
//! them. So every read of a block device here is direct I/O (`O_DIRECT`), which always
//! asks the device. Image files keep their page-cache reads (a file's writes and reads
//! share one cache, and SEEK_DATA/SEEK_HOLE work on it).
//!
//! Direct I/O wants the buffer address, offset and length aligned to the device's logical
//! block size; [`ALIGN`] (4 KiB) covers every logical block size in use. Callers that read
//! into an [`AlignedBuf`] at aligned offsets pay nothing extra; other reads go through a
//! per-thread bounce buffer.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// Alignment of direct reads: buffer address, offset and length.
pub const ALIGN: usize = 4096;

/// A heap buffer whose start is aligned to [`ALIGN`], for direct reads without a copy.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self { raw, start, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A disk image or block device opened for reading; block devices are read directly.
#[derive(Debug)]
pub struct DiskReader {
    file: File,
    direct: bool,
}

thread_local! {
    /// Bounce buffer for direct reads whose buffer, offset or length is not aligned.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

impl DiskReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        // Non-blocking: opening a FIFO waits for a writer otherwise (W19-B: the agent hung at
        // its start, saying nothing). It changes nothing for a regular file's reads, and a
        // device is opened again below.
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        let kind = file.metadata()?.file_type();
        if kind.is_file() {
            return Ok(Self { file, direct: false });
        }
        if !kind.is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a disk: give a raw image file or a block device",
            ));
        }
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Self { file: File::from(fd), direct: true })
    }

    /// True for a block device, read with direct I/O.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The open file, for metadata and SEEK_DATA/SEEK_HOLE (a device has no holes to find).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes (a device's size is where its end is).
    pub fn size(&self) -> io::Result<u64> {
        let m = self.file.metadata()?;
        if m.file_type().is_file() {
            Ok(m.len())
        } else {
            rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)
        }
    }

    /// Fills `buf` from `offset`, as [`FileExt::read_exact_at`].
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        if buf.as_ptr().align_offset(ALIGN) == 0 && aligned(buf.len()) && offset.is_multiple_of(ALIGN as u64)
        {
            return self.file.read_exact_at(buf, offset);
        }
        self.read_bounced(buf, offset)
    }

    /// An unaligned direct read: the aligned span around it, read into the thread's bounce
    /// buffer, then copied. A device's size is a multiple of its logical block size, so
    /// the span may end past the device only where `buf` does not reach.
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let head = usize::try_from(offset % ALIGN as u64).unwrap_or(0);
        let start = offset - head as u64;
        let span = (head + buf.len()).next_multiple_of(ALIGN);
        BOUNCE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|b| b.len() < span) {
                *slot = Some(AlignedBuf::new(span.max(1 << 20)));
            }
            let bounce = slot.as_mut().map(|b| &mut b[..span]).ok_or(io::ErrorKind::OutOfMemory)?;
            let mut got = 0;
            while got < head + buf.len() {
                match self.file.read_at(&mut bounce[got..], start + got as u64) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                // A short read leaves `got` unaligned only at the device's end, where the
                // next read returns 0.
                if !aligned(got) {
                    break;
                }
            }
            if got < head + buf.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            buf.copy_from_slice(&bounce[head..head + buf.len()]);
            Ok(())
        })
    }
}

fn aligned(n: usize) -> bool {
    n.is_multiple_of(ALIGN)
}

/// The image container a disk's first bytes announce, if any: such a file holds a
/// container (metadata, tables, compressed clusters), not the guest's disk byte for byte.
pub fn container_format(path: &Path) -> io::Result<Option<&'static str>> {
    let disk = DiskReader::open(path)?;
    let mut head = AlignedBuf::new(1024);
    let len = usize::try_from(disk.size()?.min(1024)).unwrap_or(0) / 512 * 512;
    if len == 0 {
        return Ok(None);
    }
    disk.read_exact_at(&mut head[..len], 0)?;
    let at = |offset: usize, magic: &[u8]| head[..len].get(offset..offset + magic.len()) == Some(magic);
    Ok(if at(0, b"QFI\xfb") {
        Some("qcow2")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(0, b"conectix") || at(512, b"cxsparse") {
        Some("dynamic VHD")
    } else {
        None
    })
}

/// Writes all of `slices` at `offset` (`pwritev`, resumed after a short write): data is
/// written from where it is instead of being copied into one buffer first.
pub fn write_all_vectored_at(f: &File, mut slices: &mut [io::IoSlice<'_>], offset: u64) -> io::Result<()> {
    let mut at = offset;
    while !slices.is_empty() {
        match rustix::io::pwritev(f, slices, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n as u64;
                io::IoSlice::advance_slices(&mut slices, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Opens a disk for writing. For a block device, first drops the clean pages of its page
/// cache: they may be stale (see the module doc), and a write of part of a page merges
/// into whatever the cache holds.
pub fn open_for_write(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    if file.metadata()?.file_type().is_block_device() {
        file.sync_all()?;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    }
    Ok(file)
}

/// Lowers the calling thread's priority to nice 10, for background work that must yield
/// the CPU to the work it serves. Never raises it: a process started nicer keeps its nice.
pub fn lower_thread_priority() -> std::io::Result<()> {
    let tid = Some(rustix::thread::gettid());
    let nice = rustix::process::getpriority_process(tid).unwrap_or(0).max(10);
    Ok(rustix::process::setpriority_process(tid, nice)?)
}

/// Takes an exclusive flock on `file` without waiting: `false` when another process (or
/// another open file description) holds it. The lock lasts as long as the file is open.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [1, 4095, 4096, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_ptr().align_offset(ALIGN), 0);
            assert_eq!(b.len(), len);
        }
    }

    /// The bounce path, on a regular file opened for direct I/O (as a device would be):
    /// unaligned offsets and lengths, and the end of a file that is not a whole number of
    /// alignment units.
    #[test]
    fn unaligned_direct_reads_go_through_the_bounce_buffer() {
        use rustix::fs::{Mode, OFlags};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let data: Vec<u8> = (0..3 * ALIGN as u32 + 1000).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let fd = rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECT, Mode::empty()).unwrap();
        let r = DiskReader { file: File::from(fd), direct: true };
        let mut whole = AlignedBuf::new(2 * ALIGN);
        r.read_exact_at(&mut whole, ALIGN as u64).unwrap();
        assert_eq!(&whole[..], &data[ALIGN..3 * ALIGN]);
        for (at, len) in
            [(1usize, 10usize), (4000, 200), (0, data.len()), (3 * ALIGN + 1, 999), (5, data.len() - 5)]
        {
            let mut buf = vec![0u8; len];
            r.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(buf == data[at..at + len], "{len} bytes at {at}");
        }
        let mut buf = vec![0u8; 2];
        assert!(r.read_exact_at(&mut buf, data.len() as u64 - 1).is_err(), "a read past the end fails");
    }

    #[test]
    fn container_headers_are_recognised_and_raw_disks_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], Option<&str>); 5] = [
            (b"QFI\xfb\0\0\0\x03", Some("qcow2")),
            (b"KDMV\x01\0\0\0", Some("VMDK")),
            (b"vhdxfile", Some("VHDX")),
            (b"conectix", Some("dynamic VHD")),
            (b"\xeb\x63\x90 an MBR boot sector", None),
        ];
        for (i, (head, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("d{i}.img"));
            let mut data = vec![0u8; 4096];
            data[..head.len()].copy_from_slice(head);
            std::fs::write(&path, &data).unwrap();
            assert_eq!(container_format(&path).unwrap(), *want, "case {i}");
        }
    }

    #[test]
    fn an_image_file_reads_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let r = DiskReader::open(&path).unwrap();
        assert!(!r.is_direct());
        assert_eq!(r.size().unwrap(), 10_000);
        let mut buf = vec![0u8; 333];
        r.read_exact_at(&mut buf, 4001).unwrap();
        assert_eq!(buf, data[4001..4334]);
        assert!(r.read_exact_at(&mut buf, 9_900).is_err(), "a read past the end fails");
        let err = DiskReader::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a disk"), "{err}");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = DiskReader::open(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a disk"), "a FIFO is refused, not waited on: {err}");
    }
}
