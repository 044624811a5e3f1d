use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use tern_agent::scan::DiskSource;
use tern_core::pki::{Bundle, Role};
use tern_core::{DiskName, VmName};

use tern_proto::daemon::Misconfigured;

macro_rules! misconfigured {
    ($($arg:tt)*) => {
        return Err(Misconfigured(format!($($arg)*)).into())
    };
}

/// tern mobility agent: replicates a VM's disks to the process server.
#[derive(Parser, Debug)]
#[command(name = "mobility-agent", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TERN_GIT_REV"), ")"))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Scan the disks for changes at each interval and on checkpoint requests.
    Scan,
    /// Serve the disks over NBD (the VM's disks are the agent's exports) and stream every
    /// write as it happens; points are marks in that stream.
    Nbd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Replicate until stopped (Ctrl-C or SIGTERM).
    Run {
        /// Process server, e.g. https://dr.example:7443
        #[arg(long, env = "TERN_SERVER")]
        server: String,
        /// This VM's identity bundle (`drctl enroll agent --vm VM --out FILE`).
        #[arg(long, env = "TERN_IDENTITY")]
        identity: PathBuf,
        #[arg(long)]
        vm: String,
        /// A disk to protect, as NAME=PATH (raw image file or block device); repeatable.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Where the agent keeps its block-hash maps between runs.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, value_enum, default_value = "scan")]
        mode: Mode,
        /// Time between scans when the server sends no policy (the policy's crash interval wins).
        #[arg(long, value_parser = tern_core::units::parse_duration, default_value = "30s")]
        interval: std::time::Duration,
        /// Command that quiesces the VM's applications before an app-consistent point.
        #[arg(long)]
        freeze: Option<String>,
        /// Command that resumes them; runs whenever the freeze command ran, even if it failed.
        #[arg(long)]
        thaw: Option<String>,
        /// Freeze this mounted file system around app-consistent points (FIFREEZE/FITHAW); repeatable.
        #[arg(long = "freeze-fs")]
        freeze_fs: Vec<PathBuf>,
        /// Longest a freeze or thaw may take before it is abandoned (thaw still runs).
        #[arg(long, value_parser = tern_core::units::parse_duration, default_value = "60s")]
        hook_timeout: std::time::Duration,
        /// Command that shuts the VM down before a planned failover or a failback; the final
        /// point follows it. It must return only once the VM is off (writes nothing more),
        /// and succeed when the VM is already off: a failback cut short asks again. It may
        /// take up to 10 minutes (not --hook-timeout); past that it is killed and the planned
        /// failover or failback does not go on.
        #[arg(long)]
        shutdown: Option<String>,
        /// Largest rate on the wire, e.g. 20MiB (bytes per second); 0 for no limit.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "0")]
        max_rate: u64,
        /// Scan mode: during a long pass (the initial sync), how long before the state
        /// directory first saves what the server has acked (then at this interval; a save that
        /// waits for the acks of all in flight doubles it, up to 16 times this), so that a
        /// dropped link or a restart goes on from there instead of
        /// comparing everything sent again. A test knob: 0s saves after every 1 MiB chunk.
        #[arg(long, value_parser = tern_core::units::parse_duration, default_value = "2s", hide = true)]
        save_every: std::time::Duration,
        /// What the disks hold. Only raw disks are replicated; a disk that starts with the
        /// header of an image container (qcow2, VMDK, VHDX, dynamic VHD) is refused unless
        /// `raw` is given (the VM itself wrote those bytes).
        #[arg(long, value_enum, default_value = "detect")]
        disk_format: DiskFormat,
        /// --mode nbd: where the exports are served, unix:PATH or tcp:ADDR:PORT (default:
        /// unix:STATE_DIR/nbd.sock). Export names are the disk names.
        #[arg(long, value_parser = str::parse::<tern_agent::nbd::Listen>)]
        nbd_listen: Option<tern_agent::nbd::Listen>,
        /// --mode nbd: give the unix socket this group (a name or a number) and mode 0660,
        /// for a hypervisor that runs as another user (e.g. libvirt-qemu, kvm): connecting
        /// to a socket needs write permission on it. Without it, only the agent's user may.
        #[arg(long)]
        nbd_socket_group: Option<String>,
        /// --mode nbd: most bytes of writes held in memory, from the write until the server
        /// acks it durable (sent ones are kept, so a dropped link loses none): an eighth for
        /// the requests the NBD connections are applying (together), the rest for the change log; past
        /// it the log goes on in the state directory.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "64MiB")]
        log_buffer: u64,
        /// --mode nbd: most bytes of writes held in the state directory (spill.log);
        /// past it the log is dropped, and the extents written since the last point are
        /// compared with the server's copy once it is back.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "1GiB")]
        spill_max: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9465 (off by default).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DiskFormat {
    /// Refuse disks that start with an image container's header.
    Detect,
    /// Replicate every disk as raw bytes, whatever they start with.
    Raw,
}

/// A group's id, from its number or its name in /etc/group.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("--nbd-socket-group: reading /etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            f.next()?;
            Some((name, f.next()?.parse::<u32>().ok()?))
        })
        .find(|(name, _)| *name == group)
        .map(|(_, gid)| gid)
        .ok_or_else(|| anyhow::anyhow!("--nbd-socket-group {group}: no such group in /etc/group"))
}

/// `--mode nbd`'s settings, or `None` for scan mode.
fn nbd_mode(
    mode: Mode,
    listen: Option<tern_agent::nbd::Listen>,
    socket_group: Option<String>,
    log_buffer: u64,
    spill_max: u64,
    state_dir: &std::path::Path,
) -> anyhow::Result<Option<tern_agent::NbdMode>> {
    match mode {
        Mode::Scan if listen.is_some() => misconfigured!("--nbd-listen is for --mode nbd"),
        Mode::Scan if socket_group.is_some() => misconfigured!("--nbd-socket-group is for --mode nbd"),
        Mode::Scan => Ok(None),
        Mode::Nbd => {
            let listen = listen.unwrap_or_else(|| tern_agent::nbd::Listen::Unix(state_dir.join("nbd.sock")));
            // Below a batch's worth the log holds no write to send, and the session waits for
            // acks of nothing (W19-B: `--log-buffer 0` never replicated, blaming the server).
            if log_buffer < 1 << 20 {
                misconfigured!("--log-buffer must be at least 1MiB (64MiB by default)");
            }
            let log_buffer = usize::try_from(log_buffer).context("--log-buffer is too large")?;
            let socket_group = match (socket_group, &listen) {
                (None, _) => None,
                (Some(g), tern_agent::nbd::Listen::Unix(_)) => Some(group_id(&g)?),
                (Some(_), _) => {
                    misconfigured!("--nbd-socket-group is for a unix socket (--nbd-listen unix:PATH)")
                }
            };
            Ok(Some(tern_agent::NbdMode { listen, log_buffer, spill_max, socket_group }))
        }
    }
}

/// The agent allocates with jemalloc (its settings below). In nbd mode each write's buffer
/// is allocated by an NBD connection's thread and freed by another at the server's ack, and
/// the writes change under the agent (4 KiB random, then 1 MiB sequential): glibc's malloc
/// kept the pages the freed writes had held, between small objects that live on, until the
/// log went quiet, and the next burst's buffers came on top. `bench/nbd.sh`'s peak RSS:
/// 126.9-135.7 MiB with glibc and two arenas, 116.7-130.3 with one, 99.3-120.3 with
/// jemalloc. fio's random 4 KiB then 1 MiB writes back to back (20 s each): 119.5-139.6 MiB
/// with glibc and one arena, 101.2-108.9 with jemalloc; 30-39 MiB right after, against
/// 103-116. Also tried: a fixed mmap threshold (the 1 MiB writes' buffers then take fresh
/// pages beside the ones kept); mimalloc (the burst's peak 117-129 MiB, scan mode's over a
/// 64 GiB disk 61-83 MiB against 26-28 with glibc and 32 with jemalloc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (`_RJEM_MALLOC_CONF` in the environment overrides them): unused
/// pages back to the system about 250 ms after they are freed, by a background thread (the
/// VM's writes never wait on it); two arenas, as few threads allocate much (jemalloc keeps
/// a third for allocations of 8 MiB and more, purged at once).
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 69] = b"background_thread:true,dirty_decay_ms:250,muzzy_decay_ms:0,narenas:2\0";

/// The exit code of a scan-mode agent the process server refused (a revoked identity, a
/// disk it will not take): the unit's `RestartPreventExitStatus`, as starting it again
/// would be refused again.
const EXIT_REFUSED: i32 = 3;

/// The exit code of a configuration no restart can mend (a qcow2 image given as a raw disk,
/// an identity of another VM, flags that do not go together), as for a bad argument: the
/// unit's `RestartPreventExitStatus` too. A disk that cannot be opened is not one of them
/// (a device may appear later): that exits 1 and the unit tries again.
const EXIT_MISCONFIGURED: i32 = 2;

fn main() {
    tern_proto::daemon::init();
    if let Err(e) = run() {
        tern_proto::daemon::report_fatal(&format_args!("{e:#}"));
        let code = if matches!(e.downcast_ref(), Some(tern_agent::AgentError::Refused(_))) {
            EXIT_REFUSED
        } else if e.downcast_ref::<Misconfigured>().is_some()
            || e.downcast_ref::<tern_agent::AgentError>().is_some_and(tern_agent::AgentError::in_use)
        {
            EXIT_MISCONFIGURED
        } else {
            1
        };
        std::process::exit(code);
    }
}

fn run() -> anyhow::Result<()> {
    let Cmd::Run {
        server,
        identity,
        vm,
        disks,
        state_dir,
        mode,
        interval,
        freeze,
        thaw,
        freeze_fs,
        hook_timeout,
        shutdown,
        max_rate,
        save_every,
        disk_format,
        nbd_listen,
        nbd_socket_group,
        log_buffer,
        spill_max,
        metrics,
    } = tern_proto::config::parse::<Cli>().cmd;
    check_state_dir(&state_dir)?;
    let nbd = nbd_mode(mode, nbd_listen, nbd_socket_group, log_buffer, spill_max, &state_dir)?;
    let vm = VmName::new(&vm).map_err(|e| Misconfigured(e.to_string()))?;
    // A file that is there but is no identity is a mistake no restart mends (exit 2); one
    // not there yet may be written by whatever provisions the host (exit 1, tried again).
    let identity_bundle = match Bundle::load(&identity) {
        Ok(b) => b,
        // Not text at all (InvalidData) is a damaged file too.
        Err(e @ tern_core::pki::PkiError::Io { .. }) if !matches!(&e, tern_core::pki::PkiError::Io { error, .. } if error.kind() == std::io::ErrorKind::InvalidData) =>
        {
            return Err(anyhow::Error::new(e).context(format!("loading identity {}", identity.display())));
        }
        Err(e @ tern_core::pki::PkiError::BadBundle { .. }) => misconfigured!("loading identity: {e}"),
        Err(e) => misconfigured!(
            "loading identity {}: {e}; make a new one with `drctl enroll agent --vm {vm} --out FILE`",
            identity.display()
        ),
    };
    match identity_bundle.role()? {
        Role::Agent(own) if own == vm => {}
        Role::Agent(own) => misconfigured!(
            "{} is the identity of VM {own}, not {vm}; enroll one with `drctl enroll agent --vm {vm} --out FILE`",
            identity.display()
        ),
        other => misconfigured!("{} is the identity of the {other}, not of an agent", identity.display()),
    }
    let sources = open_disks(&disks, disk_format, (&server, &identity_bundle, &vm))?;
    // An nbd-mode agent is the VM's disk: it starts and serves it whatever its identity,
    // and its sessions say why replication waits (as after a revocation).
    let expired = format!("{}: the identity", identity.display());
    let renew = format!("enroll a new one with `drctl enroll agent --vm {vm} --out FILE`");
    if nbd.is_none()
        && let tern_core::pki::Expiry::Expired(e) =
            identity_bundle.expiry(tern_core::pki::now_ms(), &expired, &renew)
    {
        misconfigured!("{e}");
    }
    let marker = Some(state_dir.join("frozen"));
    tern_agent::hooks::warn_unmounted(&freeze_fs);
    let config = tern_agent::Config {
        server,
        identity: identity_bundle,
        vm,
        disks: sources,
        state_dir,
        interval,
        hooks: tern_agent::hooks::Hooks { freeze, thaw, freeze_fs, timeout: hook_timeout, marker },
        shutdown,
        max_rate,
        nbd,
        save_every,
    };
    if config.nbd.is_none()
        && !config.hooks.configured()
        && let Some(d) = config.disks.iter().find(|d| d.block_device)
    {
        misconfigured!(
            "disk {} ({}) is a block device: nothing shows whether it changed while it was read, so \
             its points need a freeze. Give --freeze-fs MOUNT for each file system on it, or \
             --freeze CMD --thaw CMD that quiesce what writes it (--freeze true --thaw true if \
             nothing does, e.g. the VM is off)",
            d.name,
            d.path.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        if let Some(addr) = metrics {
            tern_proto::metrics::serve(addr, None)?;
            tern_agent::describe_metrics();
            tern_agent::zero_counters(&config.vm);
        }
        let shutdown = tern_proto::daemon::shutdown_on_signal();
        tern_agent::run(config, shutdown).await.map_err(anyhow::Error::from)
    })
}

/// A state directory that is a process server's data directory is refused (W19-B: the
/// agent wrote its tables and lock into one).
fn check_state_dir(state_dir: &std::path::Path) -> anyhow::Result<()> {
    if ["catalog.db", "pki/ca.pem"].iter().any(|f| state_dir.join(f).exists()) {
        misconfigured!(
            "--state-dir {} is a process server's data directory; give the agent a directory of its own",
            state_dir.display()
        );
    }
    Ok(())
}

/// [`disk_sources`]; a disk that cannot be opened for a reason a restart may mend (a file
/// not there yet, a device not attached) exits 1 after telling the server (at its
/// address, this agent's identity and VM), which shows it in the VM's status.
fn open_disks(
    disks: &[String],
    disk_format: DiskFormat,
    (server, identity, vm): (&str, &Bundle, &VmName),
) -> anyhow::Result<Vec<DiskSource>> {
    match disk_sources(disks, disk_format) {
        Err(e) if e.downcast_ref::<Misconfigured>().is_none() => {
            let problem = format!("{e:#}; the agent exits and its unit starts it again");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(tern_agent::tell_problem(server, identity, vm, problem));
            Err(e)
        }
        sources => sources,
    }
}

/// The `--disk NAME=PATH` arguments, opened and checked: raw disks (not an image
/// container, unless `--disk-format raw`), not empty, each named once.
fn disk_sources(disks: &[String], disk_format: DiskFormat) -> anyhow::Result<Vec<DiskSource>> {
    let mut sources = Vec::new();
    for d in disks {
        let (name, path) =
            d.split_once('=').ok_or_else(|| Misconfigured(format!("--disk {d:?}: write it as NAME=PATH")))?;
        let name = DiskName::new(name).map_err(|e| Misconfigured(format!("--disk {d:?}: {e}")))?;
        let path = PathBuf::from(path);
        let disk = tern_core::disk::DiskReader::open(&path)
            .and_then(|d| Ok((d.size()?, d.is_direct())))
            .with_context(|| format!("disk {name}: cannot open {}", path.display()));
        let (size, block_device) = disk?;
        if disk_format == DiskFormat::Detect
            && let Some(container) = tern_core::disk::container_format(&path)
                .with_context(|| format!("disk {name}: cannot read {}", path.display()))?
        {
            misconfigured!(
                "disk {name}: {} is a {container} image, not a raw disk: replicated as it is, its \
                 recovery points would hold the container's bytes, not the VM's disk. Convert it \
                 (qemu-img convert -O raw), or serve it as a block device (qemu-nbd -c /dev/nbdN) and \
                 protect that; if the VM itself wrote these bytes, pass --disk-format raw",
                path.display()
            );
        }
        // An empty block device may be one not attached yet (an nbd or loop device at
        // boot): tried again (exit 1). An empty file is a mistake no restart mends.
        if size == 0 && block_device {
            bail!("disk {name}: {} is an empty device (not attached yet?)", path.display());
        }
        if size == 0 {
            misconfigured!("disk {name}: {} is empty", path.display());
        }
        if sources.iter().any(|s: &DiskSource| s.name == name) {
            misconfigured!("disk {name} is named twice");
        }
        sources.push(DiskSource { name, path, size, block_device });
    }
    Ok(sources)
}
