//! Mutual TLS where revocation matters. The server side: TLS 1.3 only, client certificates
//! from the deployment CA required, handshakes done off the accept loop so a bad client
//! cannot stall others, and the connections of an identity closed when it is revoked (its
//! calls are then refused by the server's authorisation, which says why: a TLS alert would
//! reach a client only now and then, as "connection closed"). The client side, for the
//! process server's connections to master targets: a revoked server is refused at the
//! handshake, and a connection is closed when its server is revoked.

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem { path: what.to_string(), reason: e.to_string() })
}

/// The identities (by certificate serial, as [`tern_core::pki::serial_of`] writes it) a
/// server refuses, and the live connections of each, to close when one is revoked. Cloned,
/// it is the same set.
#[derive(Clone, Default, Debug)]
pub struct Revocations(Arc<RevocationsInner>);

#[derive(Default, Debug)]
struct RevocationsInner {
    revoked: RwLock<HashSet<String>>,
    /// Per identity that connected: set and cancelled when it is revoked.
    live: Mutex<HashMap<String, Cut>>,
}

/// How a revocation reaches an identity's connections: a flag each read and write looks
/// at, and a token an idle connection waits on.
#[derive(Clone, Default, Debug)]
struct Cut {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Revocations {
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.0.revoked.read().unwrap_or_else(PoisonError::into_inner).contains(serial)
    }

    /// The identity is revoked from now on, and its open connections are closed. (Later
    /// ones stay open, for the server to refuse their calls saying why.)
    pub fn revoke(&self, serial: &str) {
        self.0.revoked.write().unwrap_or_else(PoisonError::into_inner).insert(serial.to_string());
        let live = self.0.live.lock().unwrap_or_else(PoisonError::into_inner).remove(serial);
        if let Some(cut) = live {
            cut.flag.store(true, Ordering::Release);
            cut.token.cancel();
        }
    }

    /// Set and cancelled when the identity is revoked.
    fn cut(&self, serial: &str) -> Cut {
        let mut live = self.0.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.entry(serial.to_string()).or_default().clone()
    }
}

/// A connection that fails (reads and writes alike) once its client's identity is revoked.
/// A flag is looked at (an atomic load) before each read and write, and a token waited on
/// only when the connection has nothing to do, so that an idle connection is closed too.
pub struct Revocable<S> {
    inner: S,
    revoked: Arc<AtomicBool>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

fn revoked() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the client's identity was revoked")
}

impl<S> Revocable<S> {
    fn new(inner: S, cut: Cut) -> Revocable<S> {
        Revocable { inner, revoked: cut.flag, cut: Box::pin(cut.token.cancelled_owned()) }
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// What to answer for `polled`: the revocation if it came meanwhile (waiting for it
    /// when the connection waits).
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Pending if self.cut.as_mut().poll(cx).is_ready() => Poll::Ready(Err(revoked())),
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_revoked() {
            return Poll::Ready(Err(revoked()));
        }
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.check(cx, polled)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_revoked() {
            return Poll::Ready(Err(revoked()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_revoked() {
            return Poll::Ready(Err(revoked()));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Revocable<TlsStream<TcpStream>> {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// TLS 1.3 only, client certificates from the CA in `ca_pem` required.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem, "CA certificate")? {
        roots.add(ca).map_err(|e| TlsSetupError::Config(e.to_string()))?;
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsSetupError::Pem { path: "private key".into(), reason: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "certificate")?, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and yields the ones whose TLS handshake succeeded, each closed
/// when its client's identity is revoked in `revocations`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    revocations: Revocations,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> mpsc::Receiver<Result<Revocable<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let revocations = revocations.clone();
            inner.spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        debug!(%peer, "TLS session established");
                        // Verified by the CA, so it has a certificate that parses.
                        let serial = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| tern_core::pki::serial_of(c.as_ref()).unwrap_or_default());
                        let cut = revocations.cut(&serial.unwrap_or_default());
                        let _ = tx.send(Ok(Revocable::new(tls, cut))).await;
                    }
                    Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Checks a server's certificate as WebPKI does against the deployment CA, then refuses it
/// if its identity is revoked.
#[derive(Debug)]
struct RevocationChecking {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    revocations: Revocations,
}

impl rustls::client::danger::ServerCertVerifier for RevocationChecking {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let serial = tern_core::pki::serial_of(end_entity.as_ref()).unwrap_or_default();
        if self.revocations.is_revoked(&serial) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TLS 1.3 with the bundle's certificate, servers from its CA whose identity is not revoked.
pub fn client_config(
    bundle: &tern_core::pki::Bundle,
    revocations: Revocations,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(&bundle.ca_pem, "CA certificate")? {
        roots.add(ca).map_err(|e| TlsSetupError::Config(e.to_string()))?;
    }
    let key = PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes())
        .map_err(|e| TlsSetupError::Pem { path: "private key".into(), reason: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RevocationChecking { inner, revocations }))
        .with_client_auth_cert(certs(&bundle.cert_pem, "certificate")?, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Dials `authority` and makes the TLS handshake with [`client_config`]'s checks, for
/// `Endpoint::connect_with_connector`; the connection closes when the server's identity is
/// revoked.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    host: String,
    authority: String,
    revocations: Revocations,
}

impl Connector {
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        host: String,
        authority: String,
        revocations: Revocations,
    ) -> Self {
        Connector { tls: TlsConnector::from(config), host, authority, revocations }
    }
}

type ClientConn = hyper_util::rt::TokioIo<Revocable<tokio_rustls::client::TlsStream<TcpStream>>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = ClientConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<ClientConn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move {
            let name = rustls_pki_types::ServerName::try_from(c.host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tcp = TcpStream::connect(&c.authority).await?;
            tcp.set_nodelay(true)?;
            let tls = c.tls.connect(name, tcp).await?;
            let serial = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| tern_core::pki::serial_of(cert.as_ref()).unwrap_or_default())
                .unwrap_or_default();
            let cut = c.revocations.cut(&serial);
            Ok(hyper_util::rt::TokioIo::new(Revocable::new(tls, cut)))
        })
    }
}
