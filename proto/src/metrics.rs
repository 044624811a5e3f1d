//! Prometheus metrics, the same way on every daemon: `--metrics ADDR` serves the text
//! format over HTTP at `http://ADDR/metrics` (the `metrics` facade and its Prometheus
//! exporter), with the process's own figures beside the daemon's, and `/healthz`. Off by
//! default.
//! Names and labels are listed in the README ("Metrics").

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Starts the exporter on `addr` and a task that keeps the process metrics current. Call
/// from inside the daemon's runtime. `gauges_expire`: a daemon that refreshes its gauges
/// periodically drops the series not refreshed for that long (a VM gone, a job ended, a
/// relay no longer running), instead of showing their last value for ever.
pub fn serve(addr: SocketAddr, gauges_expire: Option<Duration>) -> Result<(), MetricsError> {
    let err = |reason: String| MetricsError { addr, reason };
    // Bound now, so that a port in use stops the daemon at start with the reason.
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| err(e.to_string()))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, gauges_expire)
        .install_recorder()
        .map_err(|e| err(e.to_string()))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    // `/healthz` answers `ok` while the daemon runs (a liveness probe); `/metrics` the
    // Prometheus text; anything else 404.
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    let text = handle.render() + &cpu_counter();
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    metrics::describe_gauge!("process_resident_memory_bytes", metrics::Unit::Bytes, "Resident memory.");
    metrics::describe_gauge!(
        "process_start_time_seconds",
        metrics::Unit::Seconds,
        "Start time, Unix seconds."
    );
    metrics::describe_gauge!("process_open_fds", "Open file descriptors.");
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("process_start_time_seconds").set(started);
    // The first figures before the listener answers: a scrape never finds them missing.
    process_metrics();
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            process_metrics();
        }
    });
    // The address bound (port 0 given: the one the system chose).
    let addr = listener.local_addr().unwrap_or(addr);
    tokio::spawn(crate::http::serve(listener, app, std::future::pending()));
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

/// `process_cpu_seconds_total`, read at each scrape, as the counter every Prometheus client
/// library names it (the facade's counters hold integers, so it is written here).
fn cpu_counter() -> String {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    // Fields after the command name (which may hold spaces) — utime and stime are the
    // 14th and 15th of the line, the 12th and 13th after the closing parenthesis.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return String::new() };
    let Some((_, rest)) = stat.rsplit_once(')') else { return String::new() };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu = (t(11) + t(12)) as f64 / ticks.max(1.0);
    format!(
        "# HELP process_cpu_seconds_total User and system CPU time.\n\
         # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n"
    )
}

/// Reads this process's RSS and open files from /proc.
fn process_metrics() {
    let page = rustix::param::page_size() as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(rss) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok())
    {
        metrics::gauge!("process_resident_memory_bytes").set(rss * page);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

/// A gRPC code as a metric label: `ResourceExhausted` becomes `resource_exhausted`.
pub fn code_label(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_become_snake_case_labels() {
        assert_eq!(super::code_label(tonic::Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(super::code_label(tonic::Code::DataLoss), "data_loss");
        assert_eq!(super::code_label(tonic::Code::Ok), "ok");
    }
}
