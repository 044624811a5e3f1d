use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// tern process server: receives, verifies and stores replicated disks at the recovery site.
#[derive(Parser, Debug)]
#[command(name = "process-server", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TERN_GIT_REV"), ")"))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: `serve`'s flags being larger than the other commands' costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the deployment's CA, the server identity and the admin bundle (DIR/pki/admin.bundle).
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Extra DNS name or IP address for the server certificate (localhost and 127.0.0.1 are always in).
        #[arg(long = "san", value_parser = tern_core::pki::check_san)]
        sans: Vec<String>,
    },
    /// Serve the replication and admin APIs.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:7443 (port 0 picks a free port and prints it).
        #[arg(long, value_parser = listen_address)]
        listen: String,
        /// Close journal segments past this size, e.g. 256MiB.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "256MiB")]
        segment_size: u64,
        /// Space set aside in the data directory (the file `space-reserve`) for retention to
        /// fold the journal into the base images when the file system is full: a fold needs
        /// room before it frees a segment, up to twice a segment's size. At most a twentieth
        /// of the file system; 0 turns it off. Keep it at least twice --segment-size.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "1GiB")]
        space_reserve: u64,
        /// How often retention prunes points and folds the journal into the base images.
        #[arg(long, value_parser = tern_core::units::parse_duration, default_value = "60s")]
        retention_every: std::time::Duration,
        /// How often the background scrub re-verifies every recovery point (newest first);
        /// a point that does not recover turns its VM critical. 0 turns it off.
        #[arg(long, value_parser = tern_core::units::parse_duration, default_value = "6h")]
        scrub_every: std::time::Duration,
        /// At most this much disk verified per second by the scrub, e.g. 64MiB.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "64MiB")]
        scrub_rate: u64,
        /// At most this many bytes per second on each relay to a master target, e.g. 50MB
        /// (a reprotected VM's changes share the WAN with everything else); 0: no cap.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "0")]
        relay_max_rate: u64,
        /// HTTP/2 flow-control window of each agent's stream: how much an agent may send
        /// before this server has taken it in, so also what one agent can hold of this
        /// server's memory while its journal writes lag (a slow disk). 32MiB carries about
        /// 500 MB/s over a 50 ms WAN; on a LAN of hundreds of agents, 4MiB bounds memory to
        /// a few MiB per agent.
        #[arg(long, value_parser = tern_core::units::parse_size, default_value = "32MiB")]
        stream_window: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (off by default).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Serve the status page (and /healthz) at http://ADDR/, e.g. 127.0.0.1:8080 (off
        /// by default); on an address other than loopback it is HTTPS and takes only
        /// clients presenting an admin identity (the admin bundle).
        #[arg(long)]
        web: Option<std::net::SocketAddr>,
    },
    /// Issue the server's certificate again, naming the DNS names and IP addresses agents,
    /// drctl and master targets dial it by (a --san forgotten at init); restart the server
    /// to use it. Identities issued before stay valid.
    ReissueCert {
        #[arg(long)]
        data_dir: PathBuf,
        /// DNS name or IP address to add to the names the certificate has (localhost and
        /// 127.0.0.1 are always in).
        #[arg(long = "san", value_parser = tern_core::pki::check_san)]
        sans: Vec<String>,
        /// Name only the --san given (and localhost, 127.0.0.1 and ::1), dropping the names it had.
        #[arg(long)]
        replace: bool,
    },
    /// Issue a new admin identity from the deployment's CA, on the process server's host:
    /// the way back when no admin identity is left valid (expired, lost, revoked). It is
    /// on record (`drctl identities`) once it has connected. The server may be running.
    EnrollAdmin {
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the bundle (a new file).
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe what a data directory holds (no server may run on it); with
    /// --rebuild-catalog, rebuild a lost catalog.db from the journals and base images.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
        /// Rebuild DIR/catalog.db from the bookmarks in the journals (only when it is missing).
        #[arg(long)]
        rebuild_catalog: bool,
    },
}

/// `--listen`: HOST:PORT (a name is resolved when binding), checked here so that a bad
/// value from `TERN_LISTEN` or the config file is refused naming where it came from.
fn listen_address(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_string()),
        _ => Err(format!("{s:?}: write HOST:PORT, e.g. 0.0.0.0:7443 or [::]:7443")),
    }
}

fn main() {
    tern_proto::daemon::init();
    use tern_proto::daemon::{Misconfigured, ServeError};
    // No restart mends these: exit 2, which the unit does not restart.
    tern_proto::daemon::exit_on(run(), |e| {
        e.downcast_ref::<Misconfigured>().is_some()
            || e.downcast_ref::<ServeError>().is_some_and(ServeError::for_good)
    });
}

/// Fails start-up on the configuration itself: exit 2 (see `Misconfigured`).
macro_rules! misconfigured {
    ($($arg:tt)*) => {
        return Err(tern_proto::daemon::Misconfigured(format!($($arg)*)).into())
    };
}

/// A data directory `process-server init` made (its CA key is there), for the commands
/// that issue from the CA.
fn initialised(data_dir: &std::path::Path) -> anyhow::Result<()> {
    if !data_dir.join("pki").join("ca.key").exists() {
        // Not `init` here: a new CA there would be another deployment's, which no identity of
        // this one works with (W18-A).
        anyhow::bail!(
            "{} is not initialised (no pki/ca.key): give the data directory of the deployment's process \
             server (its --data-dir, or data-dir in its config file)",
            data_dir.display()
        );
    }
    Ok(())
}

/// `serve`'s checks of its flags and data directory; returns the stream window.
fn serve_checks(
    data_dir: &std::path::Path,
    stream_window: u64,
    scrub_rate: u64,
    retention_every: std::time::Duration,
) -> anyhow::Result<u32> {
    // W19-B: 0 ran retention in a loop, on both cores.
    if retention_every < std::time::Duration::from_secs(1) {
        misconfigured!("--retention-every must be at least 1s (60s by default)");
    }
    let Some(window) = u32::try_from(stream_window).ok().filter(|w| (64 << 10..=1 << 30).contains(w)) else {
        misconfigured!("--stream-window must be between 64KiB and 1GiB");
    };
    if scrub_rate == 0 {
        misconfigured!(
            "--scrub-rate 0 would stall the scrub; give a rate (e.g. 64MiB), or --scrub-every 0 to turn the \
             scrub off"
        );
    }
    // Only a file not there is a misconfiguration: one that cannot be read now (a disk not
    // mounted yet, EIO) fails as 1, and the unit tries again.
    let ca = data_dir.join("pki").join("ca.pem");
    if !anyhow::Context::with_context(ca.try_exists(), || format!("reading {}", ca.display()))? {
        misconfigured!(
            "{} is not initialised; run `process-server init --data-dir {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(window)
}

fn run() -> anyhow::Result<()> {
    match tern_proto::config::parse::<Cli>().cmd {
        Cmd::Init { data_dir, sans } => {
            let admin = tern_process_server::init(&data_dir, &sans)?;
            println!("initialised {}", data_dir.display());
            println!("admin identity: {}", admin.display());
            Ok(())
        }
        Cmd::EnrollAdmin { data_dir, out } => {
            initialised(&data_dir)?;
            if out.exists() {
                anyhow::bail!("{} exists already; give a new file", out.display());
            }
            tern_process_server::enroll_admin(&data_dir, &out)?;
            println!("admin identity: {}", out.display());
            Ok(())
        }
        Cmd::ReissueCert { data_dir, sans, replace } => {
            initialised(&data_dir)?;
            let names = tern_process_server::reissue_server_cert(&data_dir, &sans, replace)?;
            println!("server certificate issued again for: {}", names.join(", "));
            println!("restart the process server to use it");
            Ok(())
        }
        Cmd::Check { data_dir, rebuild_catalog } => {
            // A mistyped path is not an empty site (W19-D: it was made, and said 0 VMs).
            if !data_dir.join("pki").join("ca.pem").exists() && !data_dir.join("vms").exists() {
                misconfigured!(
                    "{} is not a process server's data directory (no pki/ca.pem, no vms/); give the --data-dir \
                     that `process-server serve` uses",
                    data_dir.display()
                );
            }
            let report = if rebuild_catalog {
                tern_process_server::check::rebuild(&data_dir)?
            } else {
                tern_process_server::check::check(&data_dir)?
            };
            print!("{report}");
            Ok(())
        }
        Cmd::Serve {
            data_dir,
            listen,
            segment_size,
            space_reserve,
            retention_every,
            scrub_every,
            scrub_rate,
            relay_max_rate,
            stream_window,
            metrics,
            web,
        } => {
            let stream_window = serve_checks(&data_dir, stream_window, scrub_rate, retention_every)?;
            let segment_bytes = Some(segment_size);
            let scrub = tern_process_server::scrub::ScrubConfig { every: scrub_every, rate: scrub_rate };
            tern_process_server::finish_reissue(&data_dir.join("pki"))?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
                if let Some(addr) = metrics {
                    // Its gauges are refreshed every 2 s (see `metrics.rs`).
                    tern_proto::metrics::serve(addr, Some(std::time::Duration::from_secs(30)))?;
                }
                let web = match web {
                    Some(addr) => Some(tern_process_server::web::bind(addr).await?),
                    None => None,
                };
                let shutdown = tern_proto::daemon::shutdown_on_signal();
                let config = tern_process_server::Config {
                    data_dir,
                    segment_bytes,
                    space_reserve,
                    retention_every,
                    scrub,
                    relay_max_rate,
                    stream_window,
                    metrics: metrics.is_some(),
                    web,
                };
                Ok(tern_process_server::run(config, listener, shutdown).await?)
            })
        }
    }
}
