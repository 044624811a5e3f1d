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

pub fn server_config(pki: &Path) -> Result<Arc<rustls::ServerConfig>, tern_proto::daemon::ServeError> {
    let id = identity(pki).map_err(tern_proto::daemon::ServeError::Identity)?;
    let what = format!("the process server's certificate {}", pki.join("server.pem").display());
    let data_dir = pki.parent().unwrap_or(pki).display();
    let renew = format!(
        "issue it again with `process-server reissue-cert --data-dir {data_dir}` (it keeps its names), then restart"
    );
    match id.expiry(tern_core::pki::now_ms(), &what, &renew) {
        tern_core::pki::Expiry::Valid => {}
        tern_core::pki::Expiry::Soon(w) => tracing::warn!("{w}"),
        tern_core::pki::Expiry::Expired(e) => return Err(tern_proto::daemon::ServeError::Identity(e)),
    }
    Ok(tern_proto::tls::server_config(&id.ca_pem, &id.cert_pem, &id.key_pem)?)
}
