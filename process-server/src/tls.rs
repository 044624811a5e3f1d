//! The process server's TLS identity, read from its data directory.

use std::path::Path;
use std::sync::Arc;
pub use tern_proto::tls::incoming;

pub fn server_config(pki: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let read = |f: &str| {
        std::fs::read_to_string(pki.join(f)).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; is this a data directory made by `process-server init`?",
                pki.join(f).display()
            )
        })
    };
    Ok(tern_proto::tls::server_config(&read("ca.pem")?, &read("server.pem")?, &read("server.key")?)?)
}
