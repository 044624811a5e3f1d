//! The status page (`serve --web ADDR`; off loopback, HTTPS for admins only): the VMs with state, health and
//! RPO; per VM an RPO chart over the last hours with its recovery points on the time
//! line; running and recent jobs with progress. Plain HTML and SVG rendered here, no
//! scripts, refreshed by the browser every 10 s. `/healthz` answers 200 while the server
//! serves (for load balancers and probes).

use crate::Ctx;
use crate::admin::AdminService;
use axum::extract::State;
use axum::response::Html;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_core::units::rpo_text;
use tern_core::{Health, JobKind, JobState, VmName};
use tern_proto as pb;

/// RPO samples per VM: (time ms, RPO s), one every [`SAMPLE_EVERY`], for [`KEEP_MS`].
pub type RpoHistory = Mutex<HashMap<VmName, VecDeque<(i64, i64)>>>;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const KEEP_MS: i64 = 6 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
}

/// Binds the page's listener.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, WebError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| WebError::Bind(addr, e))
}

/// Serves the page until the server stops, and samples the RPO for its charts. On
/// loopback it is plain HTTP; on any other address it is HTTPS that takes only clients
/// presenting an admin identity of this deployment (the admin bundle of `drctl`).
pub async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener) {
    ctx.tracker.spawn(sample(ctx.clone()));
    let app = axum::Router::new()
        .route("/", axum::routing::get(index))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .with_state(ctx.clone());
    let stop = ctx.shutdown.clone();
    let stopped = async move { stop.cancelled().await };
    let local = listener.local_addr();
    match local {
        Ok(addr) if !addr.ip().is_loopback() => match admin_tls(&ctx, listener, addr) {
            Ok(l) => {
                tracing::info!(%addr, "status page over HTTPS, for admin identities only");
                // A browser checks the certificate's names against the address it dials
                // (W18-A: nothing said so at start, and only the browser failed).
                let pem =
                    std::fs::read_to_string(ctx.data_dir.join("pki").join("server.pem")).unwrap_or_default();
                let names = tern_core::pki::server_names(&pem).unwrap_or_default();
                let ip = addr.ip().to_string();
                if !addr.ip().is_unspecified() && !names.contains(&ip) {
                    tracing::warn!(%addr, names = ?names,
                        "the server's certificate does not name the status page's address: browsers dialling \
                         it refuse the page. Dial it by a name the certificate holds, or add the address \
                         (`process-server reissue-cert --data-dir DIR --san ADDRESS`, then restart)");
                }
                tern_proto::http::serve(l, app, stopped).await;
            }
            Err(e) => tracing::error!(error = %e, "the status page cannot serve HTTPS"),
        },
        _ => tern_proto::http::serve(listener, app, stopped).await,
    }
}

type TlsConn = tern_proto::tls::Revocable<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// TLS connections whose client presented an admin certificate of this deployment's CA.
struct AdminTls {
    conns: tokio::sync::mpsc::Receiver<Result<TlsConn, std::io::Error>>,
    revocations: tern_proto::tls::Revocations,
    addr: std::net::SocketAddr,
}

fn admin_tls(
    ctx: &Ctx,
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
) -> Result<AdminTls, String> {
    let revocations = ctx.identities.revocations();
    let config = crate::tls::server_config(&ctx.data_dir.join("pki")).map_err(|e| e.to_string())?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conns = crate::tls::incoming(
        listener,
        Arc::new(config),
        revocations.clone(),
        ctx.shutdown.clone(),
        &ctx.tracker,
    );
    Ok(AdminTls { conns, addr, revocations: revocations.clone() })
}

impl axum::serve::Listener for AdminTls {
    type Io = TlsConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(conn) = self.conns.recv().await else { return std::future::pending().await };
            let Ok(tls) = conn else { continue };
            let peer = tls.get_ref().get_ref().0.peer_addr().unwrap_or(self.addr);
            let leaf = tls.get_ref().get_ref().1.peer_certificates().and_then(|c| c.first());
            let role = leaf.map(|c| tern_core::pki::role_of(c.as_ref()));
            let serial = leaf.and_then(|c| tern_core::pki::serial_of(c.as_ref()).ok());
            if let Some(serial) = serial.filter(|s| self.revocations.is_revoked(s)) {
                tracing::warn!(%peer, serial, "status page: the identity is revoked");
                continue;
            }
            match role {
                Some(Ok(tern_core::pki::Role::Admin)) => return (tls, peer),
                other => {
                    tracing::warn!(%peer, role = ?other, "status page: only an admin identity may see it")
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

async fn sample(ctx: Arc<Ctx>) {
    let admin = AdminService { ctx: ctx.clone() };
    loop {
        for s in statuses(&ctx, &admin).await {
            let Ok(vm) = VmName::new(&s.vm) else { continue };
            let now = tern_store::now_ms();
            let mut h = crate::lock(&ctx.rpo_history);
            let q = h.entry(vm).or_default();
            q.push_back((now, s.rpo_seconds));
            while q.front().is_some_and(|(t, _)| *t < now - KEEP_MS) {
                q.pop_front();
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

async fn statuses(ctx: &Arc<Ctx>, admin: &AdminService) -> Vec<pb::VmStatus> {
    let store = ctx.store.clone();
    let vms =
        tokio::task::spawn_blocking(move || store.vms()).await.ok().and_then(Result::ok).unwrap_or_default();
    let mut out = Vec::new();
    for vm in vms {
        if let Ok(s) = admin.vm_status(vm).await {
            out.push(s);
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Points shown per VM: the newest (a VM with a point a second has tens of thousands).
const PAGE_POINTS: usize = 500;

async fn index(State(ctx): State<Arc<Ctx>>) -> Html<String> {
    let admin = AdminService { ctx: ctx.clone() };
    let vms = statuses(&ctx, &admin).await;
    let mut points = HashMap::new();
    for s in &vms {
        let (store, name) = (ctx.store.clone(), s.vm.clone());
        let list = tokio::task::spawn_blocking(move || {
            VmName::new(&name).ok().and_then(|v| store.recent_points(&v, PAGE_POINTS).ok())
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        points.insert(s.vm.clone(), list);
    }
    let jobs = ctx.jobs.clone();
    let jobs =
        tokio::task::spawn_blocking(move || jobs.list(0)).await.ok().and_then(Result::ok).unwrap_or_default();
    let history = crate::lock(&ctx.rpo_history).clone();
    Html(render(&vms, &points, &history, &jobs, tern_store::now_ms()))
}

/// The whole page.
pub fn render(
    vms: &[pb::VmStatus],
    // Per VM: its newest points, and how many it has.
    points: &HashMap<String, (Vec<tern_store::Point>, u64)>,
    history: &HashMap<VmName, VecDeque<(i64, i64)>>,
    jobs: &[pb::JobInfo],
    now: i64,
) -> String {
    let mut h = String::from(concat!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">",
        "<title>tern</title><style>",
        "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}",
        "td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}",
        ".normal{color:#17702a}.warning{color:#a86a00}.critical{color:#b00020;font-weight:bold}",
        "svg{background:#fafafa;border:1px solid #ddd}.point{fill:#1f5fbf}.app{fill:#17702a}",
        "</style></head><body><h1>tern process server</h1>"
    ));
    let _ = write!(
        h,
        "<h2>Protected VMs</h2><table id=\"vms\"><tr><th>VM</th><th>state</th><th>health</th><th>agent</th><th>RPO</th><th>points</th><th>problem</th></tr>"
    );
    for s in vms {
        let mut state =
            pb::VmState::read(s.state).map_or("unknown", |st| st.shown(s.last_point != 0)).to_string();
        if let Some(t) = &s.test_failover {
            let _ = write!(state, " (test failover of point {} open)", t.point);
        }
        let health = pb::Health::read(s.health).unwrap_or(Health::Critical).as_str();
        let n = points.get(&s.vm).map_or(0, |p| p.1);
        let _ = write!(
            h,
            "<tr class=\"vm\" data-vm=\"{vm}\"><td>{vm}</td><td class=\"state\">{state}</td><td class=\"{health}\">{health}</td><td>{agent}</td><td>{rpo}</td><td>{n}</td><td>{err}</td></tr>",
            vm = esc(&s.vm),
            agent = if s.agent_connected { "connected" } else { "away" },
            rpo = rpo_text(s.rpo_seconds),
            err = esc(&s.error),
        );
    }
    h.push_str("</table>");
    for s in vms {
        let list = points.get(&s.vm).map_or(&[][..], |p| p.0.as_slice());
        let samples = VmName::new(&s.vm).ok().and_then(|v| history.get(&v).cloned()).unwrap_or_default();
        let threshold = s.policy.as_ref().map_or(0, |p| p.rpo_threshold_ms / 1000) as i64;
        chart(&mut h, &s.vm, list, &samples, threshold, now);
    }
    jobs_table(&mut h, jobs);
    h.push_str("</body></html>");
    h
}

/// One VM's RPO over time (a line, the threshold dashed) and its points as marks on the
/// time line below, from its oldest point (or sample) to now, at least ten minutes.
fn chart(
    h: &mut String,
    vm: &str,
    points: &[tern_store::Point],
    samples: &VecDeque<(i64, i64)>,
    threshold: i64,
    now: i64,
) {
    const W: f64 = 900.0;
    const H: f64 = 160.0;
    const LINE: f64 = 140.0;
    let first = points.iter().map(|p| p.time_ms).chain(samples.iter().map(|s| s.0)).min().unwrap_or(now);
    let start = first.min(now - 600_000);
    let span = (now - start).max(1) as f64;
    let x = |t: i64| 10.0 + (t - start) as f64 / span * (W - 20.0);
    let top_secs = samples.iter().map(|s| s.1).chain([threshold * 2, 60]).max().unwrap_or(60);
    let top = top_secs as f64;
    let y = |rpo: i64| 10.0 + (1.0 - rpo.max(0) as f64 / top) * (LINE - 30.0);
    let _ = write!(
        h,
        "<h2>{vm}</h2><svg class=\"chart\" data-vm=\"{vm}\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>RPO of {vm} since {since}, and its recovery points</title>",
        vm = esc(vm),
        since = tern_store::rfc3339(start),
    );
    if threshold > 0 {
        let _ = write!(
            h,
            "<line x1=\"10\" x2=\"{}\" y1=\"{ty}\" y2=\"{ty}\" stroke=\"#a86a00\" stroke-dasharray=\"4 4\"/>\
             <text x=\"14\" y=\"{}\" font-size=\"11\" fill=\"#a86a00\">RPO threshold {}</text>",
            W - 10.0,
            y(threshold) - 4.0,
            rpo_text(threshold),
            ty = y(threshold)
        );
    }
    let _ = write!(
        h,
        "<text x=\"14\" y=\"20\" font-size=\"11\">RPO (top of the chart: {})</text>",
        rpo_text(top_secs)
    );
    let line: Vec<String> =
        samples.iter().filter(|s| s.1 >= 0).map(|&(t, r)| format!("{:.1},{:.1}", x(t), y(r))).collect();
    if !line.is_empty() {
        let _ = write!(
            h,
            "<polyline class=\"rpo\" fill=\"none\" stroke=\"#1f5fbf\" points=\"{}\"/>",
            line.join(" ")
        );
    }
    let _ = write!(h, "<line x1=\"10\" x2=\"{}\" y1=\"{LINE}\" y2=\"{LINE}\" stroke=\"#999\"/>", W - 10.0);
    for p in points {
        let class = if p.consistency == tern_store::Consistency::App { "point app" } else { "point" };
        let _ = write!(
            h,
            "<circle class=\"{class}\" data-id=\"{id}\" cx=\"{cx:.1}\" cy=\"{LINE}\" r=\"4\"><title>point {id} at {t} ({c})</title></circle>",
            id = p.id.0,
            cx = x(p.time_ms),
            t = tern_store::rfc3339(p.time_ms),
            c = p.consistency.as_str(),
        );
    }
    let _ = write!(
        h,
        "<text x=\"10\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">now</text></svg>",
        H - 4.0,
        tern_store::rfc3339(start),
        W - 10.0,
        H - 4.0
    );
}

fn jobs_table(h: &mut String, jobs: &[pb::JobInfo]) {
    h.push_str("<h2>Jobs</h2><table id=\"jobs\"><tr><th>id</th><th>kind</th><th>VM</th><th>state</th><th>phase</th><th>progress</th><th>error</th></tr>");
    for j in jobs.iter().rev().take(20) {
        let kind = pb::JobKind::read(j.kind).map_or("unknown", JobKind::as_str);
        let state = pb::JobState::read(j.state).map_or("unknown", JobState::as_str);
        let pct = if j.total == 0 {
            String::from("-")
        } else {
            format!("{:.0} %", j.done as f64 * 100.0 / j.total as f64)
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{kind}</td><td>{}</td><td>{state}</td><td>{}</td><td><progress max=\"100\" value=\"{}\"></progress> {pct}</td><td>{}</td></tr>",
            j.id,
            esc(&j.vm),
            esc(&j.phase),
            (j.done * 100).checked_div(j.total).unwrap_or(0),
            esc(&j.error),
        );
    }
    h.push_str("</table>");
}
