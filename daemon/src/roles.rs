//! Authorisation by the role a client certificate names.

use tern_core::VmName;
use tern_core::pki::{Role, role_of};
use tonic::{Request, Status};
use tracing::warn;

/// The role of the verified client certificate of this request.
pub fn peer_role<T>(req: &Request<T>, call: &str) -> Result<Role, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        warn!(call, "request without a client certificate refused");
        Status::unauthenticated("a client certificate from this deployment's CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    role_of(leaf).map_err(|e| {
        warn!(call, error = %e, "client certificate names no tern role");
        Status::permission_denied(format!("client certificate refused: {e}"))
    })
}

pub fn require_admin<T>(req: &Request<T>, call: &str) -> Result<(), Status> {
    match peer_role(req, call)? {
        Role::Admin => Ok(()),
        other => {
            warn!(call, identity = %other, "non-admin identity refused on the admin API");
            Err(Status::permission_denied(format!(
                "the admin API needs an admin identity; this certificate is for the {other}. \
                 Use the admin bundle made by `process-server init` (DATA_DIR/pki/admin.bundle)"
            )))
        }
    }
}

/// The VM an agent certificate may write; refuses any other role.
pub fn require_agent_for<T>(req: &Request<T>, vm: &VmName) -> Result<(), Status> {
    match peer_role(req, "Replicate")? {
        Role::Agent(own) if &own == vm => Ok(()),
        Role::Agent(own) => {
            warn!(identity = %own, vm = %vm, "agent refused: its certificate is for another VM");
            Err(Status::permission_denied(format!(
                "this agent certificate is for VM {own}; it cannot write VM {vm}. \
                 Enroll an identity for {vm} with `drctl enroll agent --vm {vm} --out FILE`"
            )))
        }
        other => {
            warn!(identity = %other, vm = %vm, "replication refused: not an agent identity");
            Err(Status::permission_denied(format!(
                "only an agent identity may replicate; this certificate is for the {other}"
            )))
        }
    }
}

/// The master target takes calls from the process server only.
pub fn require_server<T>(req: &Request<T>, call: &str) -> Result<(), Status> {
    match peer_role(req, call)? {
        Role::Server => Ok(()),
        other => {
            warn!(call, identity = %other, "refused: only the process server may call the master target");
            Err(Status::permission_denied(format!(
                "only the process server may call the master target; this certificate is for the {other}"
            )))
        }
    }
}
