//! tern-process-server: ingest, verification and storage of replicated disks, recovery
//! points, test failover, and the admin API, all over gRPC with mutual TLS.

pub mod admin;
pub use tern_daemon::roles as auth;
pub mod check;
pub mod clock;
pub mod failback;
pub mod groups;
pub mod health;
pub mod hub;
pub mod identities;
pub mod initial;
pub mod jobs;
pub mod metrics;
pub mod plan;
pub mod relay;
pub mod replication;
pub mod scrub;
pub mod tls;
pub mod web;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_core::pki::{Ca, Role, write_private};
use tern_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tracing::info;

/// Shared state of a running process server.
#[derive(Debug)]
pub struct Ctx {
    pub data_dir: PathBuf,
    pub store: Arc<Store>,
    pub hub: hub::Hub,
    pub barriers: groups::Barriers,
    /// Each VM's initial sync until its first point, across its sessions.
    pub initial_syncs: initial::InitialSyncs,
    pub plans: plan::Plans,
    pub jobs: Arc<jobs::Jobs>,
    pub relay: relay::Relay,
    pub scrub: scrub::Scrub,
    /// Bytes per second at most on each relay to a master target (0: no cap).
    pub relay_max_rate: u64,
    /// RPO samples for the status page's charts.
    pub rpo_history: web::RpoHistory,
    /// When retention last ran over each VM (the store's clock).
    pub retention_runs: std::sync::Mutex<std::collections::HashMap<tern_core::VmName, i64>>,
    /// Why each VM's last retention pass failed, until one succeeds: a journal that cannot
    /// be folded only grows (status shows it; the VM is critical).
    pub retention_errors: std::sync::Mutex<std::collections::HashMap<tern_core::VmName, String>>,
    /// VMs a failback is bringing back now: the recovered VM is shut down on purpose, so
    /// its RPO and absence say nothing (only a failure does).
    pub failing_back: std::sync::Mutex<std::collections::HashSet<tern_core::VmName>>,
    /// Identities issued or seen, and the revoked ones the TLS layer refuses.
    pub identities: Arc<identities::Identities>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Locks a mutex; a panic elsewhere while it was held does not make its data unusable here.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn store_status(e: StoreError) -> Status {
    tern_daemon::store_status(e, tern_daemon::Site::ProcessServer)
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} is already initialised (pki/ca.pem exists); use another --data-dir")]
    AlreadyInitialised(String),
    #[error(transparent)]
    Pki(#[from] tern_core::pki::PkiError),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("cannot record the admin identity: {0}")]
    Identities(String),
}

/// Creates the deployment's CA, the server identity and the admin bundle.
pub fn init(data_dir: &Path, sans: &[String]) -> Result<PathBuf, InitError> {
    let pki = data_dir.join("pki");
    if pki.join("ca.pem").exists() {
        return Err(InitError::AlreadyInitialised(data_dir.display().to_string()));
    }
    std::fs::create_dir_all(&pki)
        .map_err(|error| InitError::Io { path: pki.display().to_string(), error })?;
    let ca = Ca::create(&data_dir.display().to_string())?;
    let (server_cert, server_key) = ca.issue_server(sans)?;
    let admin = ca.issue_client(&Role::Admin)?;
    write_private(&pki.join("ca.key"), &ca.key_pem)?;
    write_private(&pki.join("server.key"), &server_key)?;
    write_private(&pki.join("ca.pem"), &ca.cert_pem)?;
    write_private(&pki.join("server.pem"), &server_cert)?;
    let admin_path = pki.join("admin.bundle");
    write_private(&admin_path, &admin.to_pem())?;
    let record = |e: &dyn std::fmt::Display| InitError::Identities(e.to_string());
    identities::Identities::open(&pki)
        .map_err(|e| record(&e))?
        .record(admin.info().map_err(|e| record(&e))?)
        .map_err(|e| record(&e))?;
    Ok(admin_path)
}

/// `process-server enroll-admin`: a new admin identity from the deployment's CA, written to
/// `out` (a new file, readable by its owner alone). Not recorded here (a running server
/// keeps its own list): it is on record once it has connected.
pub fn enroll_admin(data_dir: &Path, out: &Path) -> Result<(), InitError> {
    let pki = data_dir.join("pki");
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).map_err(io_at(&pki.join(name)));
    let ca = Ca { cert_pem: read("ca.pem")?, key_pem: read("ca.key")? };
    let admin = ca.issue_client(&Role::Admin)?;
    write_private(out, &admin.to_pem())?;
    Ok(())
}

/// Issues the server's certificate again from the deployment's CA, naming `sans` besides
/// the names it has (with `replace`, instead of them) and localhost, 127.0.0.1 and ::1: a
/// name forgotten at `init`. The server uses it from its next start; agents and bundles
/// issued before stay valid (same CA). Returns the names.
pub fn reissue_server_cert(
    data_dir: &Path,
    sans: &[String],
    replace: bool,
) -> Result<Vec<String>, InitError> {
    let pki = data_dir.join("pki");
    finish_reissue(&pki)?;
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).map_err(io_at(&pki.join(name)));
    let ca = Ca { cert_pem: read("ca.pem")?, key_pem: read("ca.key")? };
    let defaults = ["localhost", "127.0.0.1", "::1"];
    let mut names: Vec<String> = Vec::new();
    let had = if replace { Vec::new() } else { tern_core::pki::server_names(&read("server.pem")?)? };
    for n in had.iter().chain(sans) {
        if !defaults.contains(&n.as_str()) && !names.contains(n) {
            names.push(n.clone());
        }
    }
    let (cert, key) = ca.issue_server(&names)?;
    // Both written aside and made durable before either replaces the old one, the key
    // first; a stop in between is finished or undone at the next start (`finish_reissue`).
    for (name, text) in [("server.key.new", &key), ("server.pem.new", &cert)] {
        let path = pki.join(name);
        let _ = std::fs::remove_file(&path);
        write_private(&path, text)?;
        own_like(&path, &pki)?;
    }
    std::fs::File::open(&pki).and_then(|d| d.sync_all()).map_err(io_at(&pki))?;
    for name in ["server.key", "server.pem"] {
        let to = pki.join(name);
        std::fs::rename(pki.join(format!("{name}.new")), &to).map_err(io_at(&to))?;
    }
    std::fs::File::open(&pki).and_then(|d| d.sync_all()).map_err(io_at(&pki))?;
    Ok(defaults.iter().map(ToString::to_string).chain(names).collect())
}

/// Gives `path` the owner of `like`: a command run as root (`sudo process-server
/// reissue-cert`) on the data directory of a server that runs as its own user must leave
/// files that user can read (the server then failed to start, Permission denied).
pub fn own_like(path: &Path, like: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(like).map_err(io_at(like))?;
    let has = std::fs::metadata(path).map_err(io_at(path))?;
    if (has.uid(), has.gid()) != (want.uid(), want.gid()) {
        std::os::unix::fs::chown(path, Some(want.uid()), Some(want.gid())).map_err(io_at(path))?;
    }
    Ok(())
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> InitError {
    let path = path.display().to_string();
    move |error| InitError::Io { path, error }
}

/// Completes or undoes a reissue of the server's certificate that a stop cut short. The
/// key is renamed first, once both new files are whole and synced: `server.pem.new` alone
/// means the key was renamed and the certificate must follow; anything else left (both, or
/// the key alone) means no rename happened and the old pair stands.
pub fn finish_reissue(pki: &Path) -> Result<(), InitError> {
    let (key_new, pem_new) = (pki.join("server.key.new"), pki.join("server.pem.new"));
    if pem_new.exists() && !key_new.exists() {
        let pem = pki.join("server.pem");
        std::fs::rename(&pem_new, &pem).map_err(io_at(&pem))?;
    } else {
        for f in [&key_new, &pem_new] {
            if f.exists() {
                std::fs::remove_file(f).map_err(io_at(f))?;
            }
        }
    }
    std::fs::File::open(pki).and_then(|d| d.sync_all()).map_err(io_at(pki))
}

/// Records a connected client's identity if it is not on record yet (off the accept path:
/// the record is written to disk).
fn record_seen(
    identities: &Arc<identities::Identities>,
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) {
    let Some(Ok(info)) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| tern_core::pki::cert_info(c.as_ref()))
    else {
        return;
    };
    if identities.known(&info.serial) {
        return;
    }
    let identities = identities.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = identities.record(info) {
            tracing::warn!(error = %e, "cannot record a connected identity");
        }
    });
}

#[derive(Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Journal segments close past this size.
    pub segment_bytes: Option<u64>,
    /// The data directory's space reserve (`tern_store::reserve`), 0 for none.
    pub space_reserve: u64,
    /// How often retention runs.
    pub retention_every: Duration,
    pub scrub: scrub::ScrubConfig,
    /// Bytes per second at most on each relay to a master target (0: no cap).
    pub relay_max_rate: u64,
    /// Each agent's HTTP/2 stream window (`tern_proto::STREAM_WINDOW` by default).
    pub stream_window: u32,
    /// Keep the Prometheus gauges current (the exporter itself is started by `main`).
    pub metrics: bool,
    /// The status page's listener (`web::bind`), if any.
    pub web: Option<tokio::net::TcpListener>,
}

/// The identities on record (`pki/identities`), made empty where there is none.
fn open_identities(pki: &Path) -> Result<Arc<identities::Identities>, tern_proto::daemon::ServeError> {
    let identity_error =
        |e: identities::IdentitiesError| tern_proto::daemon::ServeError::Identity(e.to_string());
    let identities = Arc::new(identities::Identities::open(pki).map_err(identity_error)?);
    let file = pki.join("identities");
    if !identities.existed() && pki.join(identities::KEPT_MARK).exists() {
        // Lost (W18-A: started anew and empty, every revoked identity was let in again).
        return Err(tern_proto::daemon::ServeError::IdentitiesLost(format!(
            "{} is missing: it holds which identities are revoked, and without it every revoked identity \
             would be let in again. Restore it from a backup. If it is lost for good: create it empty \
             (`touch {}`, owned by the server's user), start the server, and revoke again every identity \
             that was revoked (`drctl identities` lists those seen since)",
            file.display(),
            file.display()
        )));
    }
    if identities.existed() && !pki.join(identities::KEPT_MARK).exists() {
        // Written by a release before the mark: from now on its loss is noticed.
        if let Err(e) = std::fs::File::create(pki.join(identities::KEPT_MARK)) {
            tracing::warn!(error = %e, "cannot mark the list of identities as kept");
        }
    }
    if !identities.existed() {
        // A data directory from before identities were kept, or one whose file was
        // removed: said, as the file is where revocations are kept.
        tracing::warn!(
            file = %pki.join("identities").display(),
            "no list of identities: starting an empty one, nothing revoked. If this data \
             directory had revoked identities, stop the server and restore the file from a backup"
        );
        identities.save().map_err(identity_error)?;
    }
    Ok(identities)
}

/// Opens the data directory's store; the jobs the last stop cut short are marked failed.
async fn open_store(config: &Config) -> Result<Arc<Store>, tern_proto::daemon::ServeError> {
    let dir = config.data_dir.clone();
    let options = tern_store::StoreOptions {
        segment_bytes: config.segment_bytes,
        reserve_bytes: Some(config.space_reserve),
    };
    let store = tokio::task::spawn_blocking(move || {
        let store = Store::open_with(&dir, options)?;
        let (reserve, segment) = (store.reserve().bytes(), options.segment_bytes.unwrap_or(0));
        if reserve > 0 && reserve < segment.saturating_mul(2) {
            // A fold step writes up to a segment's data, decompressed up to twice its size.
            tracing::warn!(reserve_bytes = reserve, segment_bytes = segment,
                "the space reserve is smaller than two journal segments: on a full file system retention \
                 may not be able to fold; lower --segment-size or give the data directory more space");
        }
        match store.fail_interrupted_jobs(tern_store::now_ms()) {
            Ok(0) => {}
            Ok(failed) => tracing::warn!(jobs = failed, "jobs interrupted by the last stop are marked failed"),
            // A full file system must not keep the server down (no failover without it).
            Err(e) if e.is_storage_full() => tracing::warn!(error = %e,
                "the jobs the last stop interrupted cannot be marked failed yet (the data directory is full); \
                 they show as running until the next start"),
            Err(e) => return Err(e),
        }
        match plan::mark_interrupted(&store) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(plans = n, "plan operations interrupted by the last stop are marked failed; `drctl plan continue` goes on"),
            Err(e) => tracing::warn!(error = %e, "cannot mark the plan operations the last stop interrupted; they show as running"),
        }
        Ok::<_, StoreError>(store)
    })
    .await?
    .map_err(|e| tern_proto::daemon::ServeError::opening(e.is_for_good(), e))?;
    Ok(Arc::new(store))
}

/// Serves until `shutdown` is cancelled, then drains with a deadline.
/// The two gRPC services, each refusing revoked identities (a revoked agent's refusal is
/// its VM's error in status).
#[allow(clippy::type_complexity)]
fn services(
    ctx: Arc<Ctx>,
) -> (
    InterceptedService<
        tern_proto::replication_server::ReplicationServer<replication::ReplicationService>,
        impl tonic::service::Interceptor + Clone,
    >,
    InterceptedService<
        tern_proto::admin_server::AdminServer<admin::AdminService>,
        impl tonic::service::Interceptor + Clone,
    >,
) {
    let replication =
        tern_proto::replication_server::ReplicationServer::new(replication::ReplicationService {
            ctx: ctx.clone(),
        })
        .max_decoding_message_size(tern_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(tern_proto::MAX_MESSAGE_BYTES);
    let c = ctx.clone();
    let refuse = identities::refuse_revoked(
        ctx.identities.revocations().clone(),
        // While the VM's own agent replicates, a refused old one (the recovered VM's, still
        // running after a failback) is that host's business, not the VM's health.
        Arc::new(move |vm: &tern_core::VmName, why: &str| {
            if !c.hub.connected(vm) {
                c.hub.set_error(vm, why);
            }
        }),
    );
    let admin = tern_proto::admin_server::AdminServer::new(admin::AdminService { ctx });
    (InterceptedService::new(replication, refuse.clone()), InterceptedService::new(admin, refuse))
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tern_proto::daemon::ServeError> {
    let pki = config.data_dir.join("pki");
    let identities = open_identities(&pki)?;
    let tls = tls::server_config(&pki)?;
    let store = open_store(&config).await?;
    let stop = shutdown.clone();
    let warm = store
        .warm_zero_subtrees(move || stop.is_cancelled())
        .inspect_err(|e| tracing::warn!(error = %e, "cannot start the zero-subtree warm-up; outputs hash the zeroes of their holes"))
        .ok();
    let tracker = TaskTracker::new();
    let ctx = Arc::new(Ctx {
        data_dir: config.data_dir.clone(),
        jobs: jobs::Jobs::new(store.clone()),
        relay: relay::Relay::default(),
        scrub: scrub::Scrub::open(&config.data_dir),
        relay_max_rate: config.relay_max_rate,
        retention_runs: Default::default(),
        retention_errors: Default::default(),
        failing_back: Default::default(),
        rpo_history: Default::default(),
        store,
        hub: hub::Hub::default(),
        barriers: groups::Barriers::default(),
        initial_syncs: initial::InitialSyncs::default(),
        plans: plan::Plans::default(),
        shutdown: shutdown.clone(),
        identities: identities.clone(),
        tracker: tracker.clone(),
    });
    // Every agent is away until it connects to this run: counted from the start, as a VM's
    // health and its group's count an agent away (not forever, nor not at all).
    for vm in ctx.store.vms().unwrap_or_default() {
        ctx.hub.absent_from_now(&vm);
    }
    tracker.spawn(health::health_worker(ctx.clone()));
    tracker.spawn(tls::expiry_worker(ctx.data_dir.clone(), ctx.shutdown.clone()));
    tracker.spawn(health::retention_worker(ctx.clone(), config.retention_every));
    tracker.spawn(relay::relay_worker(ctx.clone()));
    tracker.spawn(groups::group_worker(ctx.clone()));
    tracker.spawn(scrub::scrub_worker(ctx.clone(), config.scrub));
    if config.metrics {
        tracker.spawn(metrics::metrics_worker(ctx.clone()));
    }
    // Said once the data directory is open (it may be refused: in use, damaged), so that
    // "listening" means serving.
    // A reader may have gone after the first line (`serve | head -1`): not an error.
    use std::io::Write as _;
    if let Ok(addr) = listener.local_addr() {
        let _ = writeln!(std::io::stdout(), "listening on {addr}");
    }
    if let Some(listener) = config.web {
        if let Ok(addr) = listener.local_addr() {
            let scheme = if addr.ip().is_loopback() { "http" } else { "https" };
            let _ = writeln!(std::io::stdout(), "status page on {scheme}://{addr}/");
        }
        tracker.spawn(web::serve(ctx.clone(), listener));
    }
    let incoming = tls::incoming(listener, tls, identities.revocations().clone(), shutdown.clone(), &tracker);
    // Each identity that connects is recorded once (those issued before `pki/identities`
    // was kept), so that `drctl identities` lists it.
    let incoming = ReceiverStream::new(incoming).map(move |conn| {
        if let Ok(tls) = &conn {
            record_seen(&identities, tls.get_ref());
        }
        conn
    });
    let (replication, admin) = services(ctx.clone());
    info!(data_dir = %config.data_dir.display(), "process server ready");
    tern_proto::daemon::notify_ready();
    tern_proto::server_with_window(config.stream_window)
        // An agent that is gone without a word (host down, link cut) is noticed within
        // about 7 s, and its VM's session is free for the next agent.
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(replication)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    info!("listener closed; draining sessions");
    tern_proto::daemon::notify_stopping();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
        tracing::warn!("sessions did not drain within 10s; stopping anyway");
    }
    if let Some(warm) = warm {
        // It holds the store during a step: the data directory is free once it has ended.
        let _ = tokio::task::spawn_blocking(move || warm.join()).await;
    }
    info!("process server stopped");
    Ok(())
}
