//! What every tern binary does the same way at start: logging, the TLS provider, and one
//! cancellation token for Ctrl-C and SIGTERM.

use tokio_util::sync::CancellationToken;

/// Logs to stderr (`RUST_LOG` filters, default `info`; colours only on a terminal), as
/// text or, with `TERN_LOG_FORMAT=json`, one JSON object a line (for a log shipper), and
/// installs the ring TLS provider.
pub fn init() {
    let filter = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = if json_logs() {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            // A log reader gone (a closed pipe) loses lines, never the daemon: reporting
            // the failed write on that same stderr would panic the task that logged.
            .log_internal_errors(false)
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .log_internal_errors(false)
            .try_init()
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A token cancelled on Ctrl-C or SIGTERM. Call inside the runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Tells systemd (a `Type=notify` unit) that the daemon is ready; nothing without one.
pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Tells systemd that the daemon is stopping (draining sessions).
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// `TERN_LOG_FORMAT=json`: log lines are JSON objects.
fn json_logs() -> bool {
    match std::env::var("TERN_LOG_FORMAT") {
        Ok(v) if v.eq_ignore_ascii_case("json") => true,
        // Said, not ignored (W19-B): the logs come as text then.
        Ok(v) if !v.is_empty() && !v.eq_ignore_ascii_case("text") => {
            eprintln!("warning: TERN_LOG_FORMAT={v:?} is not json or text; logging text");
            false
        }
        _ => false,
    }
}

/// Ends the process with one `error:` line and exit code 1 when `run` fails (with JSON
/// logs, one JSON log line at level ERROR, so that a log pipeline keeps the reason).
/// A start-up check that failed on the configuration itself (a bad flag or config value, an
/// identity of the wrong role): no restart mends it, so the daemon exits 2, which its unit
/// does not restart ([`exit_on`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// Ends the process on a start-up or run error (`{e:#}`: with its causes): exit 2 when
/// `misconfigured` says it is (a [`Misconfigured`] in it), else 1.
pub fn exit_on<E: std::fmt::Display>(result: Result<(), E>, misconfigured: impl Fn(&E) -> bool) {
    if let Err(e) = result {
        report_fatal(&format_args!("{e:#}"));
        std::process::exit(if misconfigured(&e) { 2 } else { 1 });
    }
}

pub fn exit_on_error<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(e) = result {
        report_fatal(&e);
        std::process::exit(1);
    }
}

/// Says why the daemon cannot go on: one `error:` line on stderr, or with JSON logs one
/// JSON log line at level ERROR. Written directly, whatever `RUST_LOG` filters, and a
/// closed stderr is ignored (the exit code still says it).
pub fn report_fatal(e: &dyn std::fmt::Display) {
    use std::io::Write;
    let line = if json_logs() {
        use tracing_subscriber::fmt::time::FormatTime;
        let mut now = String::new();
        let _ = tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut now));
        format!(
            "{{\"timestamp\":{},\"level\":\"ERROR\",\"message\":{},\"fatal\":true}}\n",
            json_string(&now),
            json_string(&e.to_string())
        )
    } else {
        format!("error: {e}\n")
    };
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why a daemon could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Identity(String),
    /// Its certificate expired: no restart mends it (exit 2, as the master target does).
    #[error("{0}")]
    Expired(String),
    /// The list of identities is gone: no restart mends it (exit 2).
    #[error("{0}")]
    IdentitiesLost(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error("cannot open the data directory: {0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    /// One no restart mends (written by a newer version): exit 2, not restarted.
    #[error("cannot open the data directory: {0}")]
    StoreForGood(Box<dyn std::error::Error + Send + Sync>),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("a start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl ServeError {
    pub fn store(e: impl std::error::Error + Send + Sync + 'static) -> ServeError {
        ServeError::Store(Box::new(e))
    }

    /// A data directory that cannot be opened; `for_good` when no restart mends it.
    pub fn opening(for_good: bool, e: impl std::error::Error + Send + Sync + 'static) -> ServeError {
        if for_good { ServeError::StoreForGood(Box::new(e)) } else { ServeError::store(e) }
    }

    /// Whether the daemon exits 2 for it, as for a [`Misconfigured`].
    pub fn for_good(&self) -> bool {
        matches!(self, ServeError::StoreForGood(_) | ServeError::Expired(_) | ServeError::IdentitiesLost(_))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fatal_message_is_one_json_string() {
        assert_eq!(super::json_string("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
    }
}
