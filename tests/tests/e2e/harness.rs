//! Shared harness: build and start the real binaries, make disk images, poll with deadlines.
#![allow(dead_code)]

use anyhow::{Context, bail};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Directory of the workspace's binaries (target/debug), built once per test process.
/// `TERN_BIN_DIR` runs the scenarios against binaries built elsewhere (an older revision,
/// to check that a new test fails there), without building.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TERN_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
        let status = Command::new(cargo)
            // Fail points let crash tests stop a daemon at an exact step (TERN_CRASH_AT).
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--bins",
                "--features",
                "tern-store/failpoints",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

pub fn deadline_poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a child process with SIGKILL and reaps it.
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// Spawns a daemon that prints `listening on ADDR` first; returns it and the port.
pub fn spawn_listening(cmd: &mut Command) -> (Child, u16) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}"));
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    (child, port)
}

/// A process server with its own data directory.
pub struct Server {
    pub data: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Extra arguments for `serve`.
    pub extra: Vec<String>,
    /// Extra environment for `serve`.
    pub env: Vec<(String, String)>,
}

impl Server {
    pub fn init(root: &Path) -> Server {
        let data = root.join("ps");
        let out =
            Command::new(bin("process-server")).args(["init", "--data-dir"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        Server { log: root.join("ps.log"), data, port: 0, child: None, extra: Vec::new(), env: Vec::new() }
    }

    /// A server initialised under `root` whose `serve` also listens for HTTP (`--metrics`
    /// or `--web`) on a free port at `host`; the port is returned.
    pub fn with_http(root: &Path, flag: &str, host: &str) -> (Server, u16) {
        let mut server = Server::init(root);
        let port = free_port();
        server.extra = vec![flag.into(), format!("{host}:{port}")];
        server.start();
        (server, port)
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let (child, port) = spawn_listening(
            Command::new(bin("process-server"))
                .args(["serve", "--data-dir"])
                .arg(&self.data)
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(&self.extra)
                // Tests run side by side: each data directory sets aside a little, not 1 GiB.
                .env("TERN_SPACE_RESERVE", "16MiB")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stderr(log),
        );
        self.port = port;
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn admin(&self) -> PathBuf {
        self.data.join("pki").join("admin.bundle")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs drctl with the admin identity.
    pub fn drctl(&self, args: &[&str]) -> Output {
        drctl_as(&self.url(), &self.admin(), args)
    }

    /// Runs drctl --json, asserts success, parses the output.
    pub fn drctl_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.drctl(&a);
        assert!(
            out.status.success(),
            "drctl {args:?} failed: {}\nserver log tail:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 30)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs drctl, asserts it fails, returns its stderr.
    pub fn drctl_err(&self, args: &[&str]) -> String {
        let out = self.drctl(args);
        assert!(
            !out.status.success(),
            "drctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn wait_connected(&self, vm: &str) {
        deadline_poll("the agent to connect", Duration::from_secs(60), || {
            let out = self.drctl(&["status", vm, "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["agent_connected"] == true).then_some(())
        });
    }

    pub fn enroll_agent(&self, vm: &str, out: &Path) {
        self.drctl_json(&["enroll", "agent", "--vm", vm, "--out", out.to_str().unwrap()]);
    }

    pub fn status(&self, vm: &str) -> Value {
        self.drctl_json(&["status", vm])
    }

    /// Asks for a point and waits for it; retries while the agent is (re)connecting, or its
    /// sessions end on the server's side (a full data directory being freed).
    pub fn checkpoint(&self, vm: &str) -> Value {
        deadline_poll("a checkpoint", Duration::from_secs(90), || {
            let out = self.drctl(&["checkpoint", vm, "--wait", "--json", "--timeout", "60s"]);
            if out.status.success() {
                return Some(serde_json::from_slice(&out.stdout).unwrap());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("not connected")
                    || err.contains("went away")
                    || err.contains("disconnected")
                    || err.contains("session ended")
                    || err.contains("not protected"),
                "checkpoint failed: {err}"
            );
            None
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn drctl_as(url: &str, identity: &Path, args: &[&str]) -> Output {
    Command::new(bin("drctl"))
        .args(["--server", url, "--identity"])
        .arg(identity)
        .args(args)
        .output()
        .unwrap()
}

/// A running mobility agent.
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Agent {
    pub fn start(
        server: &Server,
        identity: &Path,
        vm: &str,
        disks: &[(&str, &Path)],
        state: &Path,
        extra: &[&str],
    ) -> Agent {
        Agent::start_at(&server.url(), identity, vm, disks, state, extra)
    }

    /// [`Agent::start`] against a server URL (a proxy in front of the server).
    pub fn start_at(
        url: &str,
        identity: &Path,
        vm: &str,
        disks: &[(&str, &Path)],
        state: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--server".into(),
            url.to_string(),
            "--identity".into(),
            identity.display().to_string(),
            "--vm".into(),
            vm.into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--interval".into(),
            "1h".into(),
        ];
        for (name, path) in disks {
            args.push("--disk".into());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = state.with_extension("log");
        let mut a = Agent { child: None, log, args };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.child = Some(Command::new(bin("mobility-agent")).args(&self.args).stderr(log).spawn().unwrap());
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent as its unit does (SIGTERM) and waits for it to exit cleanly.
    pub fn stop(&mut self) {
        let pid = self.child.as_ref().expect("a running agent").id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let exited = self.wait_exit("the agent to exit on SIGTERM");
        assert!(exited.success(), "{exited:?}\n{}", tail(&self.log_text(), 20));
        self.child = None;
    }

    /// Waits (up to 20 s) for an agent that is expected to stop by itself, e.g. refusing
    /// its arguments; returns its exit status.
    pub fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a running agent");
        deadline_poll(what, Duration::from_secs(20), || child.try_wait().unwrap())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A sparse ext4 image of `size_mib` MiB holding a few MiB of text and binary files.
pub fn make_ext4(path: &Path, size_mib: u64, seed: u64) {
    let src = path.with_extension("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("data")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..40 {
        let mut f = std::fs::File::create(src.join("etc").join(format!("conf{i}.txt"))).unwrap();
        for l in 0..(200 + i * 20) {
            writeln!(
                f,
                "line {l} of config {i}: key_{} = value_{}",
                rng.random::<u16>(),
                rng.random::<u32>()
            )
            .unwrap();
        }
    }
    for i in 0..6 {
        let mut buf = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut buf);
        std::fs::write(src.join("data").join(format!("blob{i}.bin")), &buf).unwrap();
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&src).arg(path).output().unwrap();
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&src).unwrap();
}

/// A sparse image of `size_mib` MiB whose first `data_mib` MiB are random.
pub fn make_random(path: &Path, size_mib: u64, data_mib: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib << 20).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..data_mib {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i << 20).unwrap();
    }
}

/// Overwrites the first `data_mib` MiB of an existing disk with random data, in place and
/// keeping its size, as a running VM would (an agent may be reading it meanwhile).
pub fn write_random(path: &Path, data_mib: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..data_mib {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i << 20).unwrap();
    }
}

/// Rewrites `fraction` of the disk's 4 KiB pages, scattered, with random data.
pub fn scatter_writes(path: &Path, fraction: f64, seed: u64) -> usize {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let pages = f.metadata().unwrap().len() / 4096;
    let n = ((pages as f64) * fraction).ceil() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < n {
        chosen.insert(rng.random_range(0..pages));
    }
    let mut buf = vec![0u8; 4096];
    for p in &chosen {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, p * 4096).unwrap();
    }
    f.sync_all().unwrap();
    n
}

/// The fingerprint tern gives a disk: BLAKE3 of the BLAKE3 hashes of its 64 KiB blocks.
pub fn fingerprint(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    let mut h = blake3::Hasher::new();
    for block in data.chunks(64 * 1024) {
        h.update(blake3::hash(block).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// BLAKE3 of the first `len` bytes of a file (all of it when `len` is None).
pub fn b3(path: &Path, len: Option<u64>) -> String {
    let f = std::fs::File::open(path).unwrap();
    let size = len.unwrap_or_else(|| f.metadata().unwrap().len());
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = ((size - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize().to_hex().to_string()
}

pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("spawn")?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A master target on loopback.
pub struct MasterTarget {
    pub data: PathBuf,
    pub identity: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Extra arguments for `serve`.
    pub extra: Vec<String>,
}

impl MasterTarget {
    pub fn start(server: &Server, root: &Path, name: &str) -> MasterTarget {
        let identity = root.join(format!("{name}.bundle"));
        server.drctl_json(&["enroll", "master-target", "--name", name, "--out", identity.to_str().unwrap()]);
        let mut mt = MasterTarget {
            data: root.join(name),
            identity,
            port: 0,
            child: None,
            log: root.join(format!("{name}.log")),
            extra: Vec::new(),
        };
        mt.restart();
        mt
    }

    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Starts with extra environment, e.g. `TERN_CRASH_AT` to crash at a fail point.
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let (child, port) = spawn_listening(
            Command::new(bin("master-target"))
                .envs(env.iter().copied())
                .args(["serve", "--data-dir"])
                .arg(&self.data)
                .args(["--listen", &format!("127.0.0.1:{}", self.port), "--identity"])
                .arg(&self.identity)
                .args(&self.extra)
                .stderr(log),
        );
        self.port = port;
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts again on the port it had, so the process server's record of it stays right.
    pub fn restart_same_port(&mut self) {
        self.restart();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MasterTarget {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A loop device over an image file (needs root), detached when dropped.
pub struct LoopDevice {
    pub dev: PathBuf,
}

impl LoopDevice {
    pub fn attach(image: &Path) -> LoopDevice {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "losetup needs root: {}", String::from_utf8_lossy(&out.stderr));
        LoopDevice { dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()) }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

/// A file system mounted for a test (needs root), thawed and unmounted when dropped.
pub struct Mounted {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `source` (a device, or an image with `-o loop`) on `dir`, creating it.
    pub fn new(source: &Path, dir: &Path, opts: &[&str]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(opts).arg(source).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount needs root: {}", String::from_utf8_lossy(&out.stderr));
        Mounted { dir: dir.to_path_buf(), mounted: true }
    }

    pub fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted) {
            let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).output();
            let out = Command::new("umount").arg(&self.dir).output().unwrap();
            assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).output();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
    }
}

/// A TCP proxy on loopback in front of a server: it can cut every connection through it
/// and refuse new ones for a while, as a flaky network would.
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    down: std::sync::atomic::AtomicBool,
    /// Each connection's client and server sides, and whether it was stranded.
    conns: std::sync::Mutex<Vec<(std::net::TcpStream, std::net::TcpStream, Arc<AtomicBool>)>>,
    /// The server sides of stranded connections: kept open, unread.
    stranded: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl Proxy {
    pub fn start(target_port: u16) -> Proxy {
        Proxy::delayed(target_port, Duration::ZERO)
    }

    /// A proxy that delays every chunk by `one_way` in each direction, as a WAN would: a
    /// delay line, so chunks in flight do not wait for one another.
    pub fn delayed(target_port: u16, one_way: Duration) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if st.down.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                let stranded = Arc::new(AtomicBool::new(false));
                st.conns.lock().unwrap().push((
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    stranded.clone(),
                ));
                let (c, u, s) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap(), stranded.clone());
                std::thread::spawn(move || delay_line(c, u, one_way, &s));
                std::thread::spawn(move || delay_line(upstream, client, one_way, &stranded));
            }
        });
        Proxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until [`Proxy::up`].
    pub fn cut(&self) {
        self.state.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for (client, upstream, _) in self.state.conns.lock().unwrap().drain(..) {
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = upstream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Drops the client side of every connection and keeps the server side open and
    /// unread, as a link that died somewhere between would look to the server until its
    /// keepalive notices.
    pub fn strand(&self) {
        let mut stranded = self.state.stranded.lock().unwrap();
        for (client, upstream, flag) in self.state.conns.lock().unwrap().drain(..) {
            // Its copy threads end without closing the server's side, and it stays open.
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = client.shutdown(std::net::Shutdown::Both);
            stranded.push(upstream);
        }
    }

    pub fn up(&self) {
        self.state.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; closes both at the end
/// unless the connection was `stranded` (its server side is left open).
fn delay_line(
    mut from: std::net::TcpStream,
    to: std::net::TcpStream,
    delay: Duration,
    stranded: &AtomicBool,
) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    let mut out = to.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if out.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    if stranded.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A free loopback port, for a daemon that takes an address rather than a listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET http://127.0.0.1:PORT/PATH, once it answers 200: the body with its headers.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    deadline_poll("an HTTP endpoint", Duration::from_secs(20), || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.starts_with("HTTP/1.1 200").then_some(body)
    })
}

/// Enrolls `vm`, gives it a disk `vm.img` of `size_mib` with `data_mib` of random data, starts
/// its agent (state in `vm-state`, with `extra` arguments) and waits for its first point.
pub fn protect_vm(
    server: &Server,
    root: &Path,
    vm: &str,
    size_mib: u64,
    data_mib: u64,
    extra: &[&str],
) -> Agent {
    let identity = root.join(format!("{vm}.bundle"));
    server.enroll_agent(vm, &identity);
    let disk = root.join(format!("{vm}.img"));
    make_random(&disk, size_mib, data_mib, vm.bytes().map(u64::from).sum());
    let agent =
        Agent::start(server, &identity, vm, &[("sda", &disk)], &root.join(format!("{vm}-state")), extra);
    server.checkpoint(vm);
    agent
}

/// Commits one row per transaction, 2 ms apart, until `stop`; `committed` is the last
/// number whose commit has returned. `synchronous = EXTRA`: with the default rollback
/// journal, FULL does not sync the directory after the journal is deleted (the commit),
/// so a crash-consistent image may roll the last returned commit back; EXTRA makes a
/// returned commit durable, which is what the checks count on.
pub fn sqlite_writer(
    db: &Path,
    committed: &std::sync::atomic::AtomicI64,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("PRAGMA synchronous = EXTRA; CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB);")
        .unwrap();
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        conn.execute("INSERT INTO t VALUES (?1, randomblob(3000))", [n]).unwrap();
        committed.store(n, Ordering::Release);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Checks a recovered image of an ext4 file system holding `sqlite_writer`'s database:
/// e2fsck replays the journal (exit 1: fixed) and finds it sound, the database passes
/// `PRAGMA integrity_check`, holds rows 1..=n without a gap, and n ≥ `before` (the commits
/// that returned before the point was asked for). `what` names the point in messages;
/// `mnt` is where the image is mounted for the check.
pub fn check_database_image(image: &Path, mnt: &Path, before: i64, what: &str) {
    let fsck = Command::new("e2fsck").args(["-fy"]).arg(image).output().unwrap();
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "{what}: e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let mut m = Mounted::new(image, mnt, &["-o", "loop"]);
    let conn = rusqlite::Connection::open(m.dir.join("app.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "{what}");
    let (rows, max): (i64, i64) = conn
        .query_row("SELECT count(*), coalesce(max(n), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    drop(conn);
    m.unmount();
    assert_eq!(rows, max, "{what}: rows 1..={max} without a gap");
    assert!(
        max >= before,
        "{what} holds {max} transactions; {before} were committed before it was asked for"
    );
}

/// A freeze and a thaw hook that each append their name to `log` (one line per call).
pub fn logging_hooks(log: &Path) -> (String, String) {
    (format!("echo freeze >> {}", log.display()), format!("echo thaw >> {}", log.display()))
}

/// The journal segments (`*.seg`) in `dir`, in order.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

/// A tmpfs of a given size mounted on a new directory (needs root), unmounted on drop: a
/// data directory that fills up.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, opts: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let t = Tmpfs { dir: dir.to_path_buf() };
        t.run(opts);
        t
    }

    /// Changes its options (`size=256m`) in place.
    pub fn remount(&self, opts: &str) {
        self.run(&format!("remount,{opts}"));
    }

    fn run(&self, opts: &str) {
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

/// A started process server whose data directory is a tmpfs of `size` (`48m`): retention
/// every second, 1 MiB segments, a 4 MiB space reserve, and its clock moved by the
/// milliseconds written to the returned file (0 now). For the full-storage scenarios.
pub fn server_on_a_small_tmpfs(root: &Path, size: &str) -> (Server, Tmpfs, PathBuf) {
    let clock = root.join("clock");
    std::fs::write(&clock, "0").unwrap();
    let tmpfs = Tmpfs::mount(&root.join("ps"), &format!("size={size}"));
    let mut server = Server::init(root);
    server.extra = ["--retention-every", "1s", "--segment-size", "1MiB", "--space-reserve", "4MiB"]
        .map(String::from)
        .to_vec();
    server.env = vec![("TERN_CLOCK_FILE".into(), clock.display().to_string())];
    server.start();
    (server, tmpfs, clock)
}
