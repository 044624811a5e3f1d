//! Wire types of tern's gRPC services (generated from `proto/tern.proto`) and the client
//! side of mutual TLS.
#![allow(missing_debug_implementations, clippy::unwrap_used, clippy::cast_possible_truncation)]

pub mod v1 {
    tonic::include_proto!("tern.v1");
}

pub use v1::*;

pub mod config;
pub mod daemon;
pub mod hash_table;
pub mod http;
pub mod metrics;
pub mod names;
pub mod rate;
pub mod tls;

use std::time::Duration;
use tern_core::pki::Bundle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest gRPC message either side accepts. Batches are kept under 4 MiB of payload;
/// the margin covers headers and incompressible data.
/// The largest recovery plan file taken (`drctl plan apply`; one of hundreds of VMs takes
/// tens of KiB): every plan is listed in one reply, which must stay within
/// [`MAX_MESSAGE_BYTES`] (W19-B: a 3 MiB plan was stored, and then `drctl plan list` failed
/// for every plan).
pub const MAX_PLAN_BYTES: usize = 64 << 10;

pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Largest HTTP/2 frame the daemons accept (the default is 16 KiB): a 1 MiB batch travels
/// as 4 frames, not 64, each handled, copied and woken for on its own. A 1 GiB random-data
/// initial sync (as in `bench/scale.sh`), builds run in turn: agent + process server
/// 3.19-3.89 CPU-s with 1 MiB frames, 3.54-5.0 with 16 KiB (7 runs each); 256 KiB frames
/// 3.27-3.99 against 1 MiB's 3.81-4.35 (4 runs each, a slow phase). Not larger: a frame is
/// sent whole before anything else on the connection (a keepalive's answer, another
/// call), and 256 KiB is 1 s on a 2 Mbit/s line, against the process server's 5 s
/// keepalive timeout.
pub const MAX_FRAME_BYTES: u32 = 256 << 10;
/// Blocks per `PageHashesRequest`: the answer (545 bytes a block) stays far below
/// [`MAX_MESSAGE_BYTES`].
pub const MAX_PAGE_HASH_BLOCKS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{url:?} is not a server address; write it as https://HOST:PORT")]
    BadUrl { url: String },
    #[error("cannot reach the process server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// HTTP/2 flow-control windows of every tern connection, both ends. A stream can have at
/// most its window in flight, so its throughput is at most window / round trip: hyper's
/// defaults (about 1 MiB) cap a 50 ms WAN at ~20 MB/s. The receiver gives credit back only
/// once half a window is free, so on average about 3/4 of it is in flight: 32 MiB per
/// stream carries ~500 MB/s at 50 ms (16 MiB held a 50 ms line to ~0.6 of what the same
/// stream did at 0 ms, in `bench/wan.sh`). The connection window covers a replication
/// stream plus the small calls beside it. Memory: a receiver buffers at most the window
/// per stream and the connection window per connection, and only while the application
/// reads slower than the line brings (a full disk, a slow fsync); a sender at most what it
/// has queued. For a real WAN the kernel's TCP buffers must allow as much (the kernel
/// advertises only part of them: `net.ipv4.tcp_rmem`/`tcp_wmem` maximum 64 MiB); see the
/// README.
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 48 << 20;

/// The tonic server both daemons serve on: the flow-control windows above and frames of up
/// to [`MAX_FRAME_BYTES`] from their clients. Each daemon adds its keepalive.
pub fn server() -> tonic::transport::Server {
    server_with_window(STREAM_WINDOW)
}

/// The same with another stream window; the connection's is 16 MiB more (the small calls
/// beside a stream), as [`CONNECTION_WINDOW`] is to [`STREAM_WINDOW`].
pub fn server_with_window(stream: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(stream))
        .initial_connection_window_size(Some(stream.saturating_add(CONNECTION_WINDOW - STREAM_WINDOW)))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// An endpoint for `url` with this bundle's client certificate, checking the server
/// against the bundle's CA.
pub fn endpoint(url: &str, bundle: &Bundle) -> Result<Endpoint, ConnectError> {
    let (host, _) = host_of(url)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&bundle.ca_pem))
        .identity(Identity::from_pem(&bundle.cert_pem, &bundle.key_pem))
        .domain_name(host);
    Endpoint::from_shared(url.to_string())
        .map_err(|_| ConnectError::BadUrl { url: url.to_string() })?
        .tls_config(tls)
        .map_err(|e| ConnectError::Unreachable { url: url.to_string(), reason: e.to_string() })
        .map(settings)
}

/// The host (without brackets) and the authority (`host:port`) of an `https://` URL.
fn host_of(url: &str) -> Result<(String, String), ConnectError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| ConnectError::BadUrl { url: url.to_string() })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    // Without a port, HTTPS's (as tonic's own connector takes it).
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').is_some_and(|(_, rest)| rest.starts_with(':')),
        None => authority.contains(':'),
    };
    // A port that is no port is the address's mistake, not a refused connection (W19-B:
    // `:99999` was dialled and said as "Connection refused").
    if has_port && authority.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()) {
        return Err(ConnectError::BadUrl { url: url.to_string() });
    }
    let authority = if has_port { authority.to_string() } else { format!("{authority}:443") };
    Ok((host.to_string(), authority))
}

/// This process's id, random at its start (see `Hello.instance`).
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut seed = [0u8; 20];
        seed[..4].copy_from_slice(&std::process::id().to_le_bytes());
        seed[4..].copy_from_slice(&now.as_nanos().to_le_bytes());
        tern_core::Digest::of(&seed).to_hex()[..16].to_string()
    })
}

/// Every client connection's timeouts, windows and keepalive.
fn settings(e: Endpoint) -> Endpoint {
    e.connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // A dead link is noticed within 15 s (the process server's own pings notice it in 7).
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
}

/// [`connect`], refusing a server whose certificate is revoked in `revocations` (the
/// handshake fails: "invalid peer certificate: Revoked"), and closing the connection when
/// it is revoked later. For the process server's connections to master targets.
pub async fn connect_checked(
    url: &str,
    bundle: &Bundle,
    revocations: tls::Revocations,
) -> Result<Channel, ConnectError> {
    let (host, authority) = host_of(url)?;
    let unreachable = |reason: String| ConnectError::Unreachable { url: url.to_string(), reason };
    let config = tls::client_config(bundle, revocations.clone()).map_err(|e| unreachable(e.to_string()))?;
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| ConnectError::BadUrl { url: url.to_string() })?;
    let connector = tls::Connector::new(config, host, authority, revocations);
    within_handshake_limit(url, HANDSHAKE_LIMIT, settings(endpoint).connect_with_connector(connector)).await
}

pub async fn connect(url: &str, bundle: &Bundle) -> Result<Channel, ConnectError> {
    let endpoint = endpoint(url, bundle)?;
    within_handshake_limit(url, HANDSHAKE_LIMIT, endpoint.connect()).await
}

/// The longest a connection may take, TCP and TLS handshakes included: the endpoint's
/// connect timeout covers the TCP connect only, and a peer (or a middlebox) that accepts
/// and then never answers the TLS handshake would otherwise hold the caller for good.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(20);

async fn within_handshake_limit(
    url: &str,
    limit: Duration,
    connecting: impl std::future::Future<Output = Result<Channel, tonic::transport::Error>>,
) -> Result<Channel, ConnectError> {
    let unreachable = |reason: String| ConnectError::Unreachable { url: url.to_string(), reason };
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(unreachable(explain(&e))),
        Err(_) => Err(unreachable(format!(
            "no answer within {} s: the TCP connection was accepted but the TLS handshake got no reply \
             (a hung server, or something between here and it holding connections)",
            limit.as_secs()
        ))),
    }
}

/// Why a connection failed, with what to do for the causes an operator meets.
fn explain(e: &tonic::transport::Error) -> String {
    {
        let mut reason = error_chain(e);
        if unknown_issuer(e) {
            reason.push_str(
                " — the server's certificate is not from the CA in this identity bundle: the bundle \
                 belongs to another deployment (or the server was initialised again); enroll a new one \
                 against this server",
            );
        }
        if reason.contains("InvalidContentType") {
            reason.push_str(
                " — the server there does not speak TLS: is it a plain-HTTP port, such as a status page \
                 (`--web`) or metrics (`--metrics`)? Give the address the daemon serves its API on \
                 (`--listen`)",
            );
        }
        if reason.contains("NotValidForName") || reason.contains("not valid for name") {
            reason.push_str(
                " — the server's certificate does not name the address dialled: dial it by a name its \
                 certificate holds, or give it a certificate naming this address too (a process server: \
                 `process-server reissue-cert --data-dir DIR --san ADDRESS`, which keeps the names it has, \
                 then restart it; a master target: `drctl enroll master-target --name ADDRESS`, and serve \
                 with that identity)",
            );
        }
        if reason.contains("invalid peer certificate") && reason.contains("xpired") {
            reason.push_str(
                " — the certificate the server presents has expired (or this host's clock is wrong: \
                 check it): a process server's is issued again on its host with `process-server \
                 reissue-cert --data-dir DIR`, then restart it; a master target's with `drctl enroll \
                 master-target --name NAME`",
            );
        } else if reason.contains("CertificateExpired") {
            reason.push_str(
                " — the server refused this identity as expired (or this host's clock is behind: check \
                 it): enroll a new one (`drctl enroll`)",
            );
        }
        if reason.contains("Revoked") {
            reason.push_str(
                " — the identity this server presents has been revoked (`drctl identities`): restart \
                 it with a new one",
            );
        }
        reason
    }
}

/// Whether a connection failed because the server's certificate chains to another CA.
fn unknown_issuer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        let rustls_error = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref())
        });
        if matches!(
            rustls_error,
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        ) {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The error and its sources, joined: tonic's top-level transport errors say little alone.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut last = s.clone();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Many errors repeat their cause in their own text ("tcp connect error: tcp
        // connect error"): a cause already said is not said again.
        let text = c.to_string();
        if !last.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        last = text;
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_port_takes_https_port() {
        assert_eq!(host_of("https://mt.example").unwrap(), ("mt.example".into(), "mt.example:443".into()));
        assert_eq!(
            host_of("https://mt.example:7444/").unwrap(),
            ("mt.example".into(), "mt.example:7444".into())
        );
        assert_eq!(host_of("https://[::1]").unwrap(), ("::1".into(), "[::1]:443".into()));
        assert_eq!(host_of("https://[::1]:7444").unwrap(), ("::1".into(), "[::1]:7444".into()));
        for bad in ["https://127.0.0.1:99999", "https://dr:", "https://[::1]:x", "http://dr:7443"] {
            assert!(matches!(host_of(bad), Err(ConnectError::BadUrl { .. })), "{bad}");
        }
    }

    /// A peer that takes the TCP connection and never answers the TLS handshake is given up
    /// on at the limit, saying so, by both ways of connecting (their own connect timeouts
    /// cover the TCP connect only).
    #[tokio::test]
    async fn a_handshake_without_an_answer_is_given_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let ca = tern_core::pki::Ca::create("test").unwrap();
        let bundle = ca.issue_client(&tern_core::pki::Role::Admin).unwrap();
        let limit = Duration::from_millis(1500);
        let (host, authority) = host_of(&url).unwrap();
        let config = tls::client_config(&bundle, tls::Revocations::default()).unwrap();
        let connector = tls::Connector::new(config, host, authority.clone(), tls::Revocations::default());
        let checked = settings(Endpoint::from_shared(format!("http://{authority}")).unwrap());
        let plain = endpoint(&url, &bundle).unwrap();
        for result in [
            within_handshake_limit(&url, limit, plain.connect()).await,
            within_handshake_limit(&url, limit, checked.connect_with_connector(connector)).await,
        ] {
            let Err(ConnectError::Unreachable { reason, .. }) = result else {
                panic!("connected to a silent peer")
            };
            assert!(reason.contains("TLS handshake got no reply"), "{reason}");
        }
        held.abort();
    }
}
