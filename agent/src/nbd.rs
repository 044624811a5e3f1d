//! An NBD server (the NetworkBlockDevice project's `doc/proto.md`): fixed newstyle
//! handshake with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT` and `EXPORT_NAME`, simple replies,
//! and the `READ`, `WRITE` (with FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES` and `DISC`
//! commands. Each connection runs on its own thread: requests are taken in the order they
//! come (a client keeps as many in flight as it likes), and replies are written out in
//! bulk whenever no further request is already waiting.
//!
//! Structured replies, block status and TLS are not offered: clients fall back to simple
//! replies, and a unix socket (the default) or loopback is where the hypervisor talks to
//! the agent.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tracing::{debug, info, warn};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Every export: flush and FUA make writes durable whichever connection wrote them, so
/// clients may open several connections at once.
const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The largest request payload: larger reads are refused, larger writes end the
/// connection (their payload cannot be skipped safely).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Option payloads beyond this are not read: the connection ends.
const MAX_OPTION: u32 = 64 << 10;

/// A disk served over NBD.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Returns once the data is written (durable too when `fua`). The export may keep the
    /// buffer.
    fn write_at(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()>;
    /// Zeroes `len` bytes; may deallocate them unless `keep_allocated`.
    fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> io::Result<()>;
    /// Every write completed before it is durable.
    fn flush(&self) -> io::Result<()>;
}

/// Exports by name, in the order `NBD_OPT_LIST` gives them; the first is the default
/// (the empty name).
pub type Exports = Arc<Vec<(String, Arc<dyn Export>)>>;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(Listen::Tcp).map_err(|e| format!("{s:?}: {e}; write tcp:HOST:PORT"));
        }
        Err(format!("{s:?}: write unix:PATH or tcp:ADDR:PORT"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

trait Stream: Read + Write + Send + Sized + 'static {
    fn duplicate(&self) -> io::Result<Self>;
    fn read_timeout(&self, limit: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

impl Stream for TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.set_nodelay(true)?;
        self.try_clone()
    }
    fn read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

/// Connections served at once, negotiating or not: each holds a thread and two file
/// descriptors, and without a bound idle clients took every descriptor the agent may open,
/// locking the hypervisor out of its disk (W19-B: 10,000 held connections). QEMU opens one
/// per disk (a few with multi-conn), nbdcopy four.
pub const MAX_CONNECTIONS: usize = 128;
/// A client must pick an export within this long, or is cut off: one that connects and
/// says nothing holds a connection of the bound above only this long. Once it has one, it
/// may stay idle for good (a VM that does not write).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Binds `listen` and serves `exports` on background threads, one per connection.
/// Returns where it listens (the port chosen, for `tcp:…:0`). A stale unix socket left by
/// an earlier run is replaced; one that something still serves on is refused.
/// The connections together hold at most `in_flight` bytes of request payloads at once
/// (one larger request alone).
pub fn serve(listen: &Listen, exports: Exports, in_flight: usize) -> io::Result<Listen> {
    let in_flight = Arc::new(InFlight::new(in_flight));
    match listen {
        Listen::Unix(path) => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                // Removing a live socket would cut its VM off from its disk.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is served by another process (another agent?); give this one another \
                             --nbd-listen, or stop the other first",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let l = UnixListener::bind(path)?;
            spawn_accept(move || l.accept().map(|(s, _)| s), exports, in_flight)?;
            Ok(listen.clone())
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)?;
            let bound = l.local_addr()?;
            spawn_accept(move || l.accept().map(|(s, _)| s), exports, in_flight)?;
            Ok(Listen::Tcp(bound))
        }
    }
}

fn spawn_accept<S: Stream>(
    mut accept: impl FnMut() -> io::Result<S> + Send + 'static,
    exports: Exports,
    in_flight: Arc<InFlight>,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let mut said_full = None::<std::time::Instant>;
    std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
        loop {
            match accept() {
                Ok(s) if open.load(Ordering::Acquire) >= MAX_CONNECTIONS => {
                    // Closed at once: the client sees the connection end and may retry.
                    drop(s);
                    if said_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        said_full = Some(std::time::Instant::now());
                        warn!(
                            max = MAX_CONNECTIONS,
                            "NBD connections refused: as many are open as are served at once"
                        );
                    }
                }
                Ok(s) => {
                    let (exports, in_flight, open) = (exports.clone(), in_flight.clone(), open.clone());
                    open.fetch_add(1, Ordering::AcqRel);
                    let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
                        match connection(s, &exports, &in_flight) {
                            Ok(()) => debug!("NBD client disconnected"),
                            Err(e) => info!(error = %e, "NBD connection ended"),
                        }
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                    if let Err(e) = spawned {
                        warn!(error = %e, "cannot start a thread for an NBD connection");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "accepting an NBD connection failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(())
}

fn connection<S: Stream>(stream: S, exports: &Exports, in_flight: &InFlight) -> io::Result<()> {
    // A socket option: it holds for the duplicate the writer has too.
    stream.read_timeout(Some(HANDSHAKE_LIMIT))?;
    let mut w = BufWriter::with_capacity(256 << 10, stream.duplicate()?);
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let Some(export) = handshake(&mut r, &mut w, exports)? else { return Ok(()) };
    r.get_ref().read_timeout(None)?;
    transmission(&mut r, &mut w, export.as_ref(), in_flight)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    let len = u32::try_from(data.len()).map_err(|_| protocol("option reply too long"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(data)
}

/// Negotiates until the client picks an export (`None`: it aborted or went away).
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &Exports,
) -> io::Result<Option<Arc<dyn Export>>> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let client = read_u32(r)?;
    if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol("the client sent unknown handshake flags"));
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // No way to say "unknown" here but to hang up.
                let Some(e) = find(exports, &name) else { return Ok(None) };
                w.write_all(&e.size().to_be_bytes())?;
                w.write_all(&TRANSMISSION_FLAGS.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0; 124])?;
                }
                w.flush()?;
                return Ok(Some(e));
            }
            OPT_ABORT => {
                // The client may hang up without reading the ack.
                drop(option_reply(w, opt, REP_ACK, &[]).and_then(|()| w.flush()));
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => option_reply(w, opt, REP_ERR_INVALID, &[])?,
            OPT_LIST => {
                for (name, _) in exports.iter() {
                    let mut d = u32::try_from(name.len()).unwrap_or(0).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let chosen = info(w, opt, &data, exports)?;
                if opt == OPT_GO && chosen.is_some() {
                    w.flush()?;
                    return Ok(chosen);
                }
            }
            // Structured replies, meta contexts, TLS, extended headers: not offered.
            _ => option_reply(w, opt, REP_ERR_UNSUP, &[])?,
        }
        w.flush()?;
    }
}

fn find(exports: &Exports, name: &str) -> Option<Arc<dyn Export>> {
    if name.is_empty() {
        return exports.first().map(|(_, e)| e.clone());
    }
    exports.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone())
}

/// Answers `NBD_OPT_INFO`/`GO`: the export's size and flags, its name and block sizes
/// when asked (block sizes always: any alignment is accepted, 4 KiB is preferred).
fn info(w: &mut impl Write, opt: u32, data: &[u8], exports: &Exports) -> io::Result<Option<Arc<dyn Export>>> {
    let parsed = (|| {
        let n = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(data.get(4..4 + n)?).ok()?;
        let count = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
        let reqs = data.get(6 + n..)?;
        if reqs.len() != 2 * count {
            return None;
        }
        let reqs: Vec<u16> = reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Some((name.to_string(), reqs))
    })();
    let Some((name, reqs)) = parsed else {
        option_reply(w, opt, REP_ERR_INVALID, &[])?;
        return Ok(None);
    };
    let Some(export) = find(exports, &name) else {
        option_reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
        return Ok(None);
    };
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    option_reply(w, opt, REP_INFO, &d)?;
    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        option_reply(w, opt, REP_INFO, &d)?;
    }
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, MAX_PAYLOAD] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(w, opt, REP_INFO, &d)?;
    option_reply(w, opt, REP_ACK, &[])?;
    Ok(Some(export))
}

fn reply(w: &mut impl Write, error: u32, cookie: u64) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h)
}

fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        // ENOSPC, EFBIG, EDQUOT: the client may retry once there is room.
        Some(28 | 27 | 122) => ENOSPC,
        _ => EIO,
    }
}

/// Large requests of one connection are served at once by this many threads: reading the
/// next 1 MiB write off the socket overlaps applying the last (bench/nbd.sh, sequential
/// 1 MiB writes: 0.67x of qemu-nbd's throughput before, 0.97-1.14x with), and a large read
/// or write that waits (for the disk, or held for a multi-VM barrier) does not hold up the
/// requests behind it.
const WORKERS: usize = 4;

/// Requests up to this size are served on the connection's own thread, in order: handing
/// each 4 KiB request to a worker cost two thirds of the random-write IOPS (20k against
/// 46-49k inline).
const INLINE_MAX: u32 = 128 << 10;

/// One request, its payload read.
struct Request<'a> {
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    in_bounds: bool,
    data: Vec<u8>,
    /// Its payload's bytes counted in the connections' [`InFlight`] (0 if served inline),
    /// given back when it is dropped: served, or dropped on the way by an error.
    _held: Taken<'a>,
}

/// Bytes counted in an [`InFlight`], given back when dropped: a request dropped on any
/// error path (a client gone in the middle of its payload, a reply that cannot be written)
/// must not keep them, or every connection's large requests would wait for them for ever.
struct Taken<'a> {
    from: &'a InFlight,
    bytes: usize,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.from.give_back(self.bytes);
    }
}

/// The payload bytes of the requests the workers of every connection hold, bounded: a
/// connection's reader waits for workers to finish before it takes a request that would
/// pass the bound (a request alone always goes), in turn with the other connections' (a
/// large request waiting for the bytes to drain is not passed by smaller ones). With
/// `--log-buffer`'s log, this bounds the agent's memory for writes, whatever size and
/// number of requests its clients send over however many connections (W17: 32
/// connections of 32 MiB writes took 1 GB when each connection had a bound of its own).
#[derive(Debug)]
pub struct InFlight {
    state: std::sync::Mutex<Turns>,
    done: std::sync::Condvar,
    max: usize,
}

/// The bytes held, and the turns of the readers waiting for room: the next turn to give
/// out and the turn that may take next.
#[derive(Debug, Default)]
struct Turns {
    bytes: usize,
    next: u64,
    serving: u64,
}

impl Turns {
    fn fits(&self, len: usize, max: usize) -> bool {
        self.bytes == 0 || self.bytes + len <= max
    }
}

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight { state: std::sync::Mutex::default(), done: std::sync::Condvar::new(), max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `len` bytes if they fit now and no reader waits before this one.
    fn try_take(&self, len: usize) -> bool {
        let mut t = self.lock();
        let fits = t.next == t.serving && t.fits(len, self.max);
        if fits {
            t.bytes += len;
        }
        fits
    }

    /// Counts `len` bytes once the readers before this one have taken theirs and they fit.
    fn take(&self, len: usize) {
        let mut t = self.lock();
        let turn = t.next;
        t.next += 1;
        while t.serving != turn || !t.fits(len, self.max) {
            t = self.done.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        t.bytes += len;
        t.serving += 1;
        drop(t);
        // The next turn may fit already.
        self.done.notify_all();
    }

    fn give_back(&self, len: usize) {
        if len > 0 {
            self.lock().bytes -= len;
            self.done.notify_all();
        }
    }
}

/// The connection's reply side, shared by the workers: replies go out as each request is
/// done, in any order (each names its request's cookie).
struct Replies<'a, W: Write> {
    w: std::sync::Mutex<&'a mut W>,
    /// Workers waiting to write a reply: the last of a burst flushes.
    waiting: std::sync::atomic::AtomicUsize,
}

impl<W: Write> Replies<'_, W> {
    /// Writes a reply; it goes out at once unless `defer` (the connection's thread has
    /// more requests read already, and flushes before it waits for the client again) or
    /// another worker is about to write its own.
    fn send(&self, error: u32, cookie: u64, data: Option<&[u8]>, defer: bool) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        let left = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        reply(&mut **w, error, cookie)?;
        if let Some(d) = data {
            w.write_all(d)?;
        }
        if left == 0 && !defer { w.flush() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        self.w.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Serves one request and replies.
fn serve_request<W: Write>(
    q: Request<'_>,
    export: &dyn Export,
    out: &Replies<'_, W>,
    defer: bool,
) -> io::Result<()> {
    let fua = q.flags & CMD_FLAG_FUA != 0;
    let send = |error: u32, data: Option<&[u8]>| out.send(error, q.cookie, data, defer);
    match q.cmd {
        CMD_READ if !q.in_bounds || q.len > MAX_PAYLOAD => send(EINVAL, None),
        CMD_READ => {
            let mut buf = vec![0; q.len as usize];
            match export.read_at(&mut buf, q.offset) {
                Ok(()) => send(0, Some(&buf)),
                Err(e) => send(errno(&e), None),
            }
        }
        CMD_WRITE => {
            let e = if !q.in_bounds {
                ENOSPC
            } else {
                export.write_at(q.data, q.offset, fua).map_or_else(|e| errno(&e), |()| 0)
            };
            send(e, None)
        }
        CMD_FLUSH => send(export.flush().map_or_else(|e| errno(&e), |()| 0), None),
        CMD_TRIM if !q.in_bounds => send(EINVAL, None),
        CMD_WRITE_ZEROES if !q.in_bounds => send(ENOSPC, None),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let keep = q.cmd == CMD_WRITE_ZEROES && q.flags & CMD_FLAG_NO_HOLE != 0;
            let e = export.zero(q.offset, u64::from(q.len), keep, fua).map_or_else(|e| errno(&e), |()| 0);
            send(e, None)
        }
        _ => send(EINVAL, None),
    }
}

/// Serves requests until the client disconnects: this thread reads them and serves the
/// small ones, `WORKERS` threads serve the large ones; each is answered when done. A flush is answered once every write replied to before it is
/// durable (the export's flush covers every write applied); `DISC` waits for the requests
/// in flight, then flushes.
fn transmission<S: Read, W: Write + Send>(
    r: &mut BufReader<S>,
    w: &mut W,
    export: &dyn Export,
    held: &InFlight,
) -> io::Result<()> {
    let size = export.size();
    let out = Replies { w: std::sync::Mutex::new(w), waiting: std::sync::atomic::AtomicUsize::new(0) };
    let broken: std::sync::Mutex<Option<io::Error>> = std::sync::Mutex::new(None);
    // Bounded: a client that sends faster than requests are served waits, and memory stays
    // at a few requests' payloads.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Request<'_>>(WORKERS);
    let rx = std::sync::Mutex::new(rx);
    let read = std::thread::scope(|s| {
        let (rx, out, broken) = (&rx, &out, &broken);
        for _ in 0..WORKERS {
            s.spawn(move || {
                loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(q) = next else { return };
                    // Its bytes go back once it is served (the reply sent).
                    if let Err(e) = serve_request(q, export, out, false) {
                        broken.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    }
                }
            });
        }
        let result = read_requests(r, size, &tx, export, out, held);
        drop(tx);
        result
    });
    if let Some(e) = broken.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let disconnect = read?;
    let w = out.w.into_inner().unwrap_or_else(|p| p.into_inner());
    w.flush()?;
    if disconnect { export.flush() } else { Ok(()) }
}

/// Reads requests and hands them to the workers until the client disconnects (true for
/// `DISC`, false when it just closed) or breaks the protocol.
fn read_requests<'a, S: Read, W: Write>(
    r: &mut BufReader<S>,
    size: u64,
    tx: &std::sync::mpsc::SyncSender<Request<'a>>,
    export: &dyn Export,
    out: &Replies<'_, W>,
    in_flight: &'a InFlight,
) -> io::Result<bool> {
    loop {
        // Replies held back while more requests were read go out before waiting for more.
        if r.buffer().is_empty() {
            out.flush()?;
        }
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let field = |a: usize, b: usize| &h[a..b];
        if u32::from_be_bytes(field(0, 4).try_into().unwrap_or_default()) != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let flags = u16::from_be_bytes(field(4, 6).try_into().unwrap_or_default());
        let cmd = u16::from_be_bytes(field(6, 8).try_into().unwrap_or_default());
        let cookie = u64::from_be_bytes(field(8, 16).try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(field(16, 24).try_into().unwrap_or_default());
        let len = u32::from_be_bytes(field(24, 28).try_into().unwrap_or_default());
        let in_bounds = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
        // A worker's request with a payload (one it writes, or reads into a buffer) waits
        // for room among those in flight, before its payload is read.
        let payload = len <= MAX_PAYLOAD && (cmd == CMD_WRITE || (cmd == CMD_READ && in_bounds));
        let held = if payload && len > INLINE_MAX { len as usize } else { 0 };
        if held > 0 && !in_flight.try_take(held) {
            // The replies held back go out before this thread waits.
            out.flush()?;
            in_flight.take(held);
        }
        let held = Taken { from: in_flight, bytes: held };
        let mut data = Vec::new();
        match cmd {
            CMD_DISC => return Ok(true),
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    return Err(protocol("write larger than the advertised maximum"));
                }
                // A buffer of its own, read without zeroing it first: the export keeps it.
                data.reserve_exact(len as usize);
                if (&mut *r).take(u64::from(len)).read_to_end(&mut data)? != len as usize {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            _ => {}
        }
        let q = Request { cmd, flags, cookie, offset, len, in_bounds, data, _held: held };
        if len <= INLINE_MAX {
            // Its reply goes out with the next flush: at the top of the loop, before this
            // thread waits for the client.
            serve_request(q, export, out, true)?;
            continue;
        }
        // The workers live as long as this connection (it holds their receiver), so the
        // queue is only ever full, never closed.
        if let Err(std::sync::mpsc::TrySendError::Full(q)) = tx.try_send(q) {
            // Every worker is busy: the replies held back go out before this thread waits.
            out.flush()?;
            tx.send(q).map_err(|_| io::Error::other("the NBD workers stopped"))?;
        }
    }
}

/// A plain file (or block device) served as it is: the tests' reference export.
#[derive(Debug)]
pub struct FileExport {
    file: std::fs::File,
    size: u64,
}

impl FileExport {
    pub fn open(path: &std::path::Path) -> io::Result<FileExport> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileExport { file, size })
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn write_at(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, &data, offset)?;
        if fua { self.file.sync_data() } else { Ok(()) }
    }
    fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> io::Result<()> {
        zero_range(&self.file, offset, len, keep_allocated)?;
        if fua { self.file.sync_data() } else { Ok(()) }
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Zeroes a range of a file: punches a hole (or zeroes in place when `keep_allocated`);
/// writes zeroes where the file system or device cannot.
pub fn zero_range(file: &std::fs::File, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    let how = if keep_allocated { FallocateFlags::ZERO_RANGE } else { FallocateFlags::PUNCH_HOLE };
    if fallocate(file, how | FallocateFlags::KEEP_SIZE, offset, len).is_ok() {
        return Ok(());
    }
    let zeroes = vec![0u8; 1 << 20];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = usize::try_from((end - at).min(zeroes.len() as u64)).unwrap_or(zeroes.len());
        std::os::unix::fs::FileExt::write_all_at(file, &zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// A client speaking the protocol by hand, for what real clients never send.
    struct Client(UnixStream);

    impl Client {
        fn connect(exports: Exports) -> Client {
            Client::connect_with(exports, Arc::new(InFlight::new(8 << 20)))
        }

        /// A connection whose payload bytes count in `in_flight` (shared by the connections
        /// given the same).
        fn connect_with(exports: Exports, in_flight: Arc<InFlight>) -> Client {
            let (a, b) = UnixStream::pair().unwrap();
            std::thread::spawn(move || connection(b, &exports, &in_flight));
            let mut c = Client(a);
            let mut hello = [0u8; 18];
            c.0.read_exact(&mut hello).unwrap();
            assert_eq!(&hello[..8], b"NBDMAGIC");
            c.0.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).unwrap();
            c
        }

        fn option(&mut self, opt: u32, data: &[u8]) {
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.0.write_all(&m).unwrap();
        }

        /// (reply type, data)
        fn option_reply(&mut self) -> (u32, Vec<u8>) {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.0.read_exact(&mut d).unwrap();
            (kind, d)
        }

        fn go(&mut self, name: &str) -> Vec<(u32, Vec<u8>)> {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            self.option(OPT_GO, &d);
            let mut replies = Vec::new();
            loop {
                let r = self.option_reply();
                let end = r.0 != REP_INFO;
                replies.push(r);
                if end {
                    return replies;
                }
            }
        }

        /// Sends a request; returns the reply's error and data (`read` bytes of it).
        fn request(
            &mut self,
            cmd: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
            read: usize,
        ) -> (u32, Vec<u8>) {
            send(self, cmd, 42, offset, len, payload);
            let (cookie, error) = next_reply(self);
            assert_eq!(cookie, 42);
            let mut d = vec![0; if error == 0 { read } else { 0 }];
            self.0.read_exact(&mut d).unwrap();
            (error, d)
        }
    }

    /// A file export whose writes wait until the gate opens.
    struct GatedExport {
        file: FileExport,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl Export for GatedExport {
        fn size(&self) -> u64 {
            self.file.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_at(buf, offset)
        }
        fn write_at(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open);
            self.file.write_at(data, offset, fua)
        }
        fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> io::Result<()> {
            self.file.zero(offset, len, keep_allocated, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.file.flush()
        }
    }

    /// Sends a request with `cookie` without waiting for its reply.
    fn send(c: &mut Client, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        c.0.write_all(&m).unwrap();
    }

    /// The next reply's header: its cookie and error.
    fn next_reply(c: &mut Client) -> (u64, u32) {
        let mut h = [0u8; 16];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        (u64::from_be_bytes(h[8..].try_into().unwrap()), u32::from_be_bytes(h[4..8].try_into().unwrap()))
    }

    /// A read sent after a large write that waits is answered first: large requests of
    /// one connection are served at once and answered as each is done.
    #[test]
    fn a_read_is_answered_while_an_earlier_write_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let gated = Arc::new(GatedExport {
            file: FileExport::open(&path).unwrap(),
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
        });
        let e: Arc<dyn Export> = gated.clone();
        let mut c = Client::connect(Arc::new(vec![("sda".to_string(), e)]));
        c.go("sda");
        let big = vec![1u8; 256 << 10];
        send(&mut c, CMD_WRITE, 1, 0, big.len() as u32, &big);
        send(&mut c, CMD_READ, 2, 300 << 10, 3, &[]);
        c.0.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        assert_eq!(next_reply(&mut c), (2, 0), "the read is answered while the write waits");
        let mut data = [0u8; 3];
        c.0.read_exact(&mut data).unwrap();
        assert_eq!(data, [7, 7, 7]);
        *gated.open.lock().unwrap() = true;
        gated.opened.notify_all();
        assert_eq!(next_reply(&mut c), (1, 0));
        assert_eq!(c.request(CMD_READ, 0, 4, &[], 4).1, [1, 1, 1, 1]);
    }

    /// A file export that notes the most payload bytes its writes held at once.
    struct CountingExport {
        file: FileExport,
        now: std::sync::Mutex<(usize, usize)>,
    }

    impl Export for CountingExport {
        fn size(&self) -> u64 {
            self.file.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_at(buf, offset)
        }
        fn write_at(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
            let len = data.len();
            {
                let mut n = self.now.lock().unwrap();
                n.0 += len;
                n.1 = n.1.max(n.0);
            }
            std::thread::sleep(std::time::Duration::from_millis(30));
            let r = self.file.write_at(data, offset, fua);
            self.now.lock().unwrap().0 -= len;
            r
        }
        fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> io::Result<()> {
            self.file.zero(offset, len, keep_allocated, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.file.flush()
        }
    }

    /// However many large writes the clients send at once, over however many connections,
    /// the connections together hold at most their bound of payload (a write larger than
    /// the bound goes alone), and serve several at once within it.
    #[test]
    fn the_payloads_the_connections_hold_stay_within_one_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let counting = Arc::new(CountingExport {
            file: FileExport::open(&path).unwrap(),
            now: std::sync::Mutex::new((0, 0)),
        });
        let e: Arc<dyn Export> = counting.clone();
        let exports: Exports = Arc::new(vec![("sda".to_string(), e)]);
        let bound = Arc::new(InFlight::new(512 << 10));
        let mut clients: Vec<Client> =
            (0..2).map(|_| Client::connect_with(exports.clone(), bound.clone())).collect();
        let piece = 256 << 10;
        for c in &mut clients {
            c.go("sda");
            c.0.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        }
        for i in 0..8u8 {
            let c = &mut clients[usize::from(i % 2)];
            send(c, CMD_WRITE, u64::from(i), u64::from(i) * piece as u64, piece as u32, &vec![i + 1; piece]);
        }
        let mut cookies: Vec<u64> = clients
            .iter_mut()
            .flat_map(|c| (0..4).map(|_| next_reply(c)).collect::<Vec<_>>())
            .map(|(k, e)| k + u64::from(e) * 100)
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..8).collect::<Vec<u64>>(), "every write done, none failed");
        let most = counting.now.lock().unwrap().1;
        assert!(most <= 512 << 10, "at most the bound at once, over both connections: {most}");
        assert_eq!(most, 512 << 10, "two at once within it");
        let big = vec![9u8; 1 << 20];
        assert_eq!(
            clients[1].request(CMD_WRITE, 2 << 20, big.len() as u32, &big, 0).0,
            0,
            "larger than the bound: alone"
        );
        let want: Vec<u8> = (0..8u8).flat_map(|i| vec![i + 1; piece]).chain(big).collect();
        assert_eq!(std::fs::read(&path).unwrap()[..3 << 20], want[..]);
    }

    /// A client gone in the middle of a large write's payload gives its bytes back: the
    /// other connections' large requests do not wait for them for ever.
    #[test]
    fn a_payload_cut_short_gives_its_room_back_to_the_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let exports = exports(dir.path());
        let bound = Arc::new(InFlight::new(512 << 10));
        let mut gone = Client::connect_with(exports.clone(), bound.clone());
        gone.go("sda");
        // 1 MiB announced, larger than the bound (taken alone), 100 bytes of it sent.
        send(&mut gone, CMD_WRITE, 1, 0, 1 << 20, &[7u8; 100]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(gone);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while bound.lock().bytes > 0 {
            assert!(std::time::Instant::now() < until, "the cut write's bytes were never given back");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut c = Client::connect_with(exports, bound);
        c.go("sda");
        c.0.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let data = vec![3u8; 256 << 10];
        assert_eq!(c.request(CMD_WRITE, 0, data.len() as u32, &data, 0).0, 0);
    }

    fn exports(dir: &std::path::Path) -> Exports {
        let path = dir.join("d.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let e: Arc<dyn Export> = Arc::new(FileExport::open(&path).unwrap());
        Arc::new(vec![("sda".to_string(), e)])
    }

    /// Idle connections that never negotiate are cut off after the handshake limit, and
    /// beyond the bound new ones are closed at once; a client gets in again once room is
    /// made (W19-B: 10,000 idle connections took every descriptor, and QEMU could not
    /// connect).
    #[test]
    fn idle_connections_are_bounded_and_cut_off_before_they_negotiate() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        serve(&Listen::Unix(sock.clone()), exports(dir.path()), 8 << 20).unwrap();
        let hello = |c: &mut UnixStream| {
            let mut h = [0u8; 18];
            c.read_exact(&mut h).map(|()| h[..8] == *b"NBDMAGIC")
        };
        let mut idle: Vec<UnixStream> =
            (0..MAX_CONNECTIONS).map(|_| UnixStream::connect(&sock).unwrap()).collect();
        for c in &mut idle {
            assert!(hello(c).unwrap());
        }
        let mut refused = UnixStream::connect(&sock).unwrap();
        refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(hello(&mut refused).is_err(), "closed at once: the bound is full");
        // The handshake limit cuts the idle ones off (each sees its connection end).
        let started = std::time::Instant::now();
        let mut end = [0u8; 1];
        assert_eq!(idle[0].read(&mut end).unwrap(), 0);
        let waited = started.elapsed();
        assert!(waited <= HANDSHAKE_LIMIT + Duration::from_secs(5), "{waited:?}");
        drop(idle);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = UnixStream::connect(&sock).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if hello(&mut c).unwrap_or(false) {
                break;
            }
            assert!(std::time::Instant::now() < until, "a client gets in once room is made");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn options_name_unknown_exports_and_unsupported_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::connect(exports(dir.path()));
        c.option(OPT_LIST, &[]);
        let (kind, d) = c.option_reply();
        assert_eq!((kind, &d[4..]), (REP_SERVER, &b"sda"[..]));
        assert_eq!(c.option_reply().0, REP_ACK);
        c.option(8, &[]); // structured replies: not offered
        assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
        c.option(OPT_INFO, &[0, 0]); // too short
        assert_eq!(c.option_reply().0, REP_ERR_INVALID);
        let r = c.go("nope");
        assert_eq!(r[0].0, REP_ERR_UNKNOWN);
        let r = c.go("sda");
        let export = &r[0].1;
        assert_eq!(u16::from_be_bytes(export[..2].try_into().unwrap()), INFO_EXPORT);
        assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), 1 << 20);
        assert_eq!(r.last().unwrap().0, REP_ACK);
    }

    #[test]
    fn requests_out_of_bounds_are_refused_and_the_rest_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::connect(exports(dir.path()));
        c.go("");
        assert_eq!(c.request(CMD_READ, (1 << 20) - 1, 2, &[], 2).0, EINVAL);
        assert_eq!(c.request(CMD_WRITE, (1 << 20) - 1, 2, &[1, 2], 0).0, ENOSPC);
        assert_eq!(c.request(CMD_WRITE, 5, 3, &[1, 2, 3], 0).0, 0);
        assert_eq!(c.request(CMD_WRITE_ZEROES, 100, 50, &[], 0).0, 0);
        assert_eq!(c.request(99, 0, 0, &[], 0).0, EINVAL);
        assert_eq!(c.request(CMD_FLUSH, 0, 0, &[], 0).0, 0);
        let (e, d) = c.request(CMD_READ, 4, 5, &[], 5);
        assert_eq!((e, d), (0, vec![7, 1, 2, 3, 7]));
        assert_eq!(c.request(CMD_READ, 99, 52, &[], 52).1, [&[7u8][..], &[0; 50], &[7]].concat());
    }
}
