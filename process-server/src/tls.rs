//! The process server's TLS identity, read from its data directory. It serves with it and
//! dials master targets with it.

use std::path::Path;
use std::sync::Arc;
use tern_core::pki::Bundle;
pub use tern_proto::tls::incoming;

/// CA certificate, server certificate and key from `DATA_DIR/pki`.
pub fn identity(pki: &Path) -> Result<Bundle, String> {
    let read = |f: &str| {
        std::fs::read_to_string(pki.join(f)).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                "the process server's user cannot read it: everything under the data directory must be \
                 that user's (`chown -R USER: DATA_DIR`, after a command run as root)"
            } else {
                "is this a data directory made by `process-server init`?"
            };
            format!("{}: {e}; {hint}", pki.join(f).display())
        })
    };
    Ok(Bundle { ca_pem: read("ca.pem")?, cert_pem: read("server.pem")?, key_pem: read("server.key")? })
}

/// When the certificate this process serves expires (Unix ms; 0 until it is loaded): the
/// one loaded at start, not `server.pem` as it may be since (a `reissue-cert` takes effect
/// at the restart).
static SERVED_EXPIRES_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// When the certificate this process serves expires (Unix ms).
pub fn expires_ms() -> Option<i64> {
    Some(SERVED_EXPIRES_MS.load(std::sync::atomic::Ordering::Relaxed)).filter(|&t| t != 0)
}

/// Says, twice a day, when the server's certificate is in its last 30 days, and once it
/// has expired: the server checks it at start only, and one running for months would
/// otherwise go on until agents refused it at their next connection (W18-A).
pub async fn expiry_worker(data_dir: std::path::PathBuf, shutdown: tokio_util::sync::CancellationToken) {
    let pki = data_dir.join("pki");
    let what = format!("the process server's certificate {}", pki.join("server.pem").display());
    let renew = format!(
        "issue it again with `process-server reissue-cert --data-dir {}` (it keeps its names), then restart",
        data_dir.display()
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(12 * 3600)) => {}
        }
        let served =
            expires_ms().ok_or_else(|| tern_core::pki::PkiError::BadCertificate("not loaded".into()));
        match tern_core::pki::expiry_of(served, tern_core::pki::now_ms(), &what, &renew) {
            tern_core::pki::Expiry::Valid => {}
            tern_core::pki::Expiry::Soon(w) => tracing::warn!("{w}"),
            tern_core::pki::Expiry::Expired(e) => tracing::error!("{e}; agents and drctl are refused"),
        }
    }
}

pub fn server_config(pki: &Path) -> Result<Arc<rustls::ServerConfig>, tern_proto::daemon::ServeError> {
    let id = identity(pki).map_err(tern_proto::daemon::ServeError::Identity)?;
    let what = format!("the process server's certificate {}", pki.join("server.pem").display());
    let data_dir = pki.parent().unwrap_or(pki).display();
    let renew = format!(
        "issue it again with `process-server reissue-cert --data-dir {data_dir}` (it keeps its names), then restart"
    );
    if let Ok(at) = id.expires_ms() {
        SERVED_EXPIRES_MS.store(at, std::sync::atomic::Ordering::Relaxed);
    }
    match id.expiry(tern_core::pki::now_ms(), &what, &renew) {
        tern_core::pki::Expiry::Valid => {}
        tern_core::pki::Expiry::Soon(w) => tracing::warn!("{w}"),
        tern_core::pki::Expiry::Expired(e) => return Err(tern_proto::daemon::ServeError::Expired(e)),
    }
    Ok(tern_proto::tls::server_config(&id.ca_pem, &id.cert_pem, &id.key_pem)?)
}
