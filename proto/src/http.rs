//! The daemons' small HTTP servers (`--metrics`, the process server's status page): at most
//! [`MAX_CONNECTIONS`] at once, a request's head read within [`HEAD_LIMIT`], a connection
//! ended after [`LIFETIME`]. Without bounds, idle and slow clients held every file
//! descriptor the process may open (W19-B: the process server then could not open a
//! journal segment, and a VM's replication stopped). The bound keeps the daemon's
//! descriptors; it cannot keep a client that reaches the port from taking every connection
//! (bind these to loopback or a management network).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once on one listener; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's head (its line and headers) must arrive within this long, the first or the
/// next on a kept-alive connection (which is closed when idle for as long).
pub const HEAD_LIMIT: Duration = Duration::from_secs(10);
/// A connection's answers after this long say it closes (`Connection: close`), and it is
/// cut [`HEAD_LIMIT`] later whatever it does: a client opens another.
pub const LIFETIME: Duration = Duration::from_secs(120);

/// Serves `app` on the connections `listener` accepts until `stop`.
pub async fn serve<L>(mut listener: L, app: axum::Router, stop: impl Future<Output = ()>)
where
    L: axum::serve::Listener,
{
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut said_full: Option<Instant> = None;
    let mut stop = std::pin::pin!(stop);
    loop {
        let (io, _) = tokio::select! {
            () = &mut stop => return,
            c = listener.accept() => c,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(io);
            if said_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                said_full = Some(Instant::now());
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "HTTP connections refused: as many are open as are served at once"
                );
            }
            continue;
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let born = Instant::now();
        // Past its lifetime, a connection's next answer says it closes (W19-C: closed between
        // requests without a word, a kept-alive scraper's next request failed).
        let service = hyper::service::service_fn(move |req| {
            let answer = hyper::service::Service::call(&inner, req);
            async move {
                let mut response = answer.await?;
                if born.elapsed() >= LIFETIME {
                    response
                        .headers_mut()
                        .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_LIMIT)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            // An answer that has not ended by then (a client that reads it slowly) is cut.
            let _ = tokio::time::timeout(LIFETIME + HEAD_LIMIT, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Idle connections beyond the bound are closed, one that sends no head is cut off, and
    /// requests are answered again once room is made.
    #[tokio::test]
    async fn idle_and_slow_clients_are_bounded_and_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        tokio::spawn(serve(listener, app, std::future::pending()));
        assert!(get(addr).await.unwrap().ends_with("ok\n"));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = get(addr).await.unwrap_or_default();
        assert!(!refused.contains("ok"), "beyond the bound: closed, {refused:?}");
        // One that sent half a head is cut off within the limit.
        let started = Instant::now();
        idle[0].write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(HEAD_LIMIT * 2, idle[0].read_to_end(&mut rest)).await.unwrap();
        assert!(started.elapsed() < HEAD_LIMIT * 2, "{:?}", started.elapsed());
        drop(idle);
        let until = Instant::now() + Duration::from_secs(30);
        while !get(addr).await.unwrap_or_default().ends_with("ok\n") {
            assert!(Instant::now() < until, "answered again once room is made");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
