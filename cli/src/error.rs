//! Why drctl failed, and the exit code that says so to a script.

use tern_proto as pb;

/// Exit codes: 1 the server refused or an operation failed, 2 a usage mistake (clap's own
/// code for bad arguments), 3 the process server could not be reached or did not accept
/// the identity, 4 a point does not verify. `drctl status --check` follows the monitoring
/// plugin convention instead: 0 normal, 1 warning, 2 critical, 3 unknown (unreachable).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Server(String),
    /// The VM, point or job named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The VM's state (or an open test failover, a job) does not allow it now.
    #[error("{0}")]
    Refused(String),
    #[error("point {point} of {vm} does not verify")]
    Mismatch { vm: String, point: u64 },
    /// The stored data a point needs is damaged (`DATA_LOSS`): it does not recover.
    #[error("{0}")]
    NotRecoverable(String),
    #[error("job {id} ({kind} of {vm}) failed: {error}")]
    JobFailed { id: u64, kind: String, vm: String, error: String },
    #[error("{0}")]
    Local(String),
    /// `drctl status --check` found a VM that is not normal.
    #[error("{1}")]
    Unhealthy(tern_core::Health, String),
    /// `drctl status --check` could not tell (unreachable, refused, a usage mistake): the
    /// monitoring convention's UNKNOWN.
    #[error("{0}")]
    CheckUnknown(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::Mismatch { .. } | CliError::NotRecoverable(_) => 4,
            CliError::NotFound(_) => 5,
            CliError::Refused(_) => 6,
            CliError::Server(_) | CliError::JobFailed { .. } | CliError::Local(_) => 1,
            CliError::Unhealthy(tern_core::Health::Critical, _) => 2,
            CliError::Unhealthy(..) => 1,
            CliError::CheckUnknown(_) => 3,
        }
    }
}

/// A status the transport made (the connection failed or was closed under the call; its
/// cause is attached) says the server was not reached or did not accept the identity; one
/// the server sent says what it refused.
impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let from_transport = std::error::Error::source(&s).is_some() || s.message().is_empty();
        match s.code() {
            Code::Unknown | Code::Cancelled | Code::Unavailable if from_transport => {
                // The status's own Display carries its code and its source's Debug form: the
                // message and the causes' texts read better.
                let chain = match std::error::Error::source(&s) {
                    Some(cause) => {
                        let causes = pb::error_chain(cause);
                        if s.message().is_empty() || causes.contains(s.message()) {
                            causes
                        } else {
                            format!("{}: {causes}", s.message())
                        }
                    }
                    None => s.message().to_string(),
                };
                CliError::Unreachable(transport_failure(&chain))
            }
            Code::NotFound => CliError::NotFound(s.message().to_string()),
            // The server's word that an argument is wrong: a usage mistake, as clap's are.
            Code::InvalidArgument => CliError::Usage(s.message().to_string()),
            Code::FailedPrecondition => CliError::Refused(s.message().to_string()),
            // A gRPC server without the admin API: a master target's port, say.
            Code::Unimplemented => CliError::Usage(
                "the server at --server does not serve the admin API (a master target's or another \
                 service's port?); give the process server's --listen address"
                    .into(),
            ),
            _ if s.message().is_empty() => {
                CliError::Server(format!("the process server answered {:?}", s.code()))
            }
            _ => CliError::Server(s.message().to_string()),
        }
    }
}

/// What a connection that failed under a call says, by its cause: a server that is not
/// (or no longer) listening, a handshake that refused the identity, or a cut.
fn transport_failure(chain: &str) -> String {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("connection refused") || lower.contains("connectionrefused") {
        format!(
            "the process server is not listening (connection refused: {chain}); is it running? A job it \
             ran goes on or is marked interrupted at its next start: see `drctl jobs`"
        )
    } else if !["close_notify", "unexpected eof", "peer closed", "reset", "broken pipe"]
        .iter()
        .any(|w| lower.contains(w))
        && ["certificate", "tls", "handshake", "unknownca", "revoked"].iter().any(|w| lower.contains(w))
    {
        // (A connection closed mid-call without TLS's goodbye names TLS too: a cut, not a
        // refused identity.)
        format!(
            "the process server closed the connection ({chain}); is --identity a bundle issued by this \
             deployment's CA, and not revoked?"
        )
    } else {
        format!(
            "the connection to the process server was cut ({chain}); it may have stopped or the network \
             failed: see `drctl status` and `drctl jobs` once it answers (after an enroll or a revoke, \
             `drctl identities`)"
        )
    }
}

impl From<pb::ConnectError> for CliError {
    fn from(e: pb::ConnectError) -> Self {
        match e {
            pb::ConnectError::BadUrl { .. } => CliError::Usage(e.to_string()),
            pb::ConnectError::Unreachable { .. } => CliError::Unreachable(e.to_string()),
        }
    }
}

impl From<tern_core::pki::PkiError> for CliError {
    fn from(e: tern_core::pki::PkiError) -> Self {
        CliError::Local(e.to_string())
    }
}

impl From<tern_core::units::UnitError> for CliError {
    fn from(e: tern_core::units::UnitError) -> Self {
        CliError::Usage(e.to_string())
    }
}

#[cfg(test)]
mod transport_tests {
    #[test]
    fn a_cut_connection_is_told_by_its_cause() {
        let refused = super::transport_failure("tcp connect error: Connection refused (os error 111)");
        assert!(refused.contains("not listening") && !refused.contains("--identity"), "{refused}");
        let tls = super::transport_failure("invalid peer certificate: UnknownIssuer");
        assert!(tls.contains("--identity"), "{tls}");
        let cut = super::transport_failure("connection reset");
        assert!(cut.contains("was cut") && !cut.contains("--identity"), "{cut}");
        let killed = super::transport_failure(
            "transport error: connection error: peer closed connection without sending TLS close_notify",
        );
        assert!(killed.contains("was cut") && !killed.contains("--identity"), "{killed}");
    }
}
