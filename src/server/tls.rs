//! TLS for both listeners, with certificates that reload without a restart.
//!
//! We accept connections ourselves (see `conn.rs`), so TLS is one more step
//! of that accept: a rustls handshake (TLS 1.2 and 1.3 only) inside the same
//! handshake deadline. The server certificate comes from a resolver that
//! hands out whatever [`Reloading`] holds now; a watcher re-reads the PEM
//! files when their modification time changes (cert-manager and friends
//! rotate them in place), and a pair that does not load (a half-written
//! file, a key that does not match) is logged and the previous one kept.
//!
//! With `client_ca`, client certificates are verified against it (mTLS);
//! `require_client_cert` refuses peers without one at the handshake. A
//! verified certificate's names become the connection's [`PeerIdentity`],
//! which `grpc/auth.rs` maps to a principal (`cert_identity`).

use crate::config::TlsConfig;
use crate::grpc::auth::PeerIdentity;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

/// What tonic puts in every request's extensions for a connection accepted
/// by `conn.rs`: the TCP addresses and, with mTLS, the client's names.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    pub peer: Option<Arc<PeerIdentity>>,
}

/// The certificate and key in force, and where they come from.
#[derive(Debug)]
pub struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Modification times of the pair in force (to notice a rotation).
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads a PEM certificate chain and private key into a signing pair.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("[server.tls] cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("[server.tls] cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "[server.tls] cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("[server.tls] key {}: {e}", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("[server.tls] key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| {
        format!(
            "[server.tls] the key {} does not match the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(pair)
}

impl Reloading {
    /// Loads the pair again if either file changed since; returns whether
    /// a new pair is in force.
    pub fn refresh(&self) -> bool {
        let now = (mtime(&self.cert), mtime(&self.key));
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *stamp == now {
            return false;
        }
        match load_pair(&self.cert, &self.key, &self.provider) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                *stamp = now;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Often a rotation caught half-way: tried again next tick.
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one");
                false
            }
        }
    }
}

/// TLS for one server: an acceptor per protocol (gRPC speaks h2, the HTTP
/// side HTTP/1.1), sharing the reloading certificate.
#[derive(Clone)]
pub struct Tls {
    pub grpc: tokio_rustls::TlsAcceptor,
    pub http: tokio_rustls::TlsAcceptor,
    pub certs: Arc<Reloading>,
}

impl Tls {
    /// Loads `[server.tls]`; the error names the file and what is wrong.
    pub fn load(cfg: &TlsConfig) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = load_pair(&cfg.cert, &cfg.key, &provider)?;
        let certs = Arc::new(Reloading {
            stamp: Mutex::new((mtime(&cfg.cert), mtime(&cfg.key))),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            current: ArcSwap::from_pointee(pair),
            provider: provider.clone(),
        });
        let verifier = match &cfg.client_ca {
            None => None,
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let found = CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("[server.tls] client_ca {}: {e}", ca.display()))?;
                for c in found {
                    let c =
                        c.map_err(|e| format!("[server.tls] client_ca {}: {e}", ca.display()))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("[server.tls] client_ca {}: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "[server.tls] client_ca {}: no PEM certificate in the file",
                        ca.display()
                    ));
                }
                let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                );
                let b = if cfg.require_client_cert {
                    b
                } else {
                    b.allow_unauthenticated()
                };
                Some(
                    b.build()
                        .map_err(|e| format!("[server.tls] client_ca: {e}"))?,
                )
            }
        };
        let config = |alpn: &[u8]| -> Result<Arc<rustls::ServerConfig>, String> {
            let b = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
                .map_err(|e| format!("TLS: {e}"))?;
            let b = match &verifier {
                Some(v) => b.with_client_cert_verifier(v.clone()),
                None => b.with_no_client_auth(),
            };
            let mut c = b.with_cert_resolver(certs.clone());
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(Tls {
            grpc: tokio_rustls::TlsAcceptor::from(config(b"h2")?),
            http: tokio_rustls::TlsAcceptor::from(config(b"http/1.1")?),
            certs,
        })
    }

    /// Re-reads the certificate files when they change (every `every`).
    pub fn watch(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let certs = self.certs.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                certs.refresh();
            }
        })
    }
}

/// The names of a verified client certificate, from a TLS connection.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<Arc<PeerIdentity>> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::URI(u) => names.push(u.to_string()),
                _ => {}
            }
        }
    }
    Some(Arc::new(PeerIdentity { names }))
}

/// The HTTP listener over TLS, for `axum::serve`: handshakes run in their
/// own tasks (at most 256 at once, 10 s each), so one slow or silent client
/// cannot hold up the others' accepts.
pub struct HttpsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
    _accepting: AbortOnDrop,
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HttpsListener {
    pub fn new(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(256));
        let task = tokio::spawn(async move {
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let shaken = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await;
                    if let Ok(Ok(s)) = shaken {
                        let _ = tx.send((s, addr)).await;
                    }
                });
            }
        });
        Ok(HttpsListener {
            rx,
            local,
            _accepting: AbortOnDrop(task),
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (never, short of a panic): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
