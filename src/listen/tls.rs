//! TLS towards clients: the `https://` listeners and the TLS inside an intercepted `CONNECT`
//! tunnel. HTTP/1.1 and h2 are offered by ALPN.
//!
//! The certificate is `tls.cert_file` + `tls.key_file` when configured; otherwise a leaf from
//! the local CA ([`crate::listen::ca`]) for the name the client asks (SNI), made in memory on
//! first use and cached per name until it is [`ca::LEAF_RENEW_AFTER`] old. Only names the CA
//! may vouch for get one: any other SNI name ends the handshake (no certificate), and a client
//! that sends no SNI (it connected by IP address) gets one for the listener's address.
//!
//! The handshake runs inside the connection's `header_read_timeout` (see `server.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::listen::ca::{self, CaError, LeafName, LocalCa};

/// ALPN protocols offered to clients, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Setting up TLS towards clients failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("tls.cert_file {}: {message}", path.display())]
    Cert { path: PathBuf, message: String },
    #[error("tls.key_file {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// Where certificates come from.
enum Source {
    /// `tls.cert_file` + `tls.key_file`.
    Static(Arc<CertifiedKey>),
    /// The local CA.
    Ca {
        ca: Arc<LocalCa>,
        /// Issued leaves by name, with when they were issued.
        leaves: Mutex<HashMap<LeafName, (Arc<CertifiedKey>, Instant)>>,
    },
}

/// TLS towards clients: certificates and acceptors. Built once at start.
pub struct TlsContext {
    source: Source,
    /// The local CA, also when the listeners use a static certificate (interception always
    /// uses the CA).
    ca: Option<Arc<LocalCa>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// One server configuration per intercepted host (its certificate whatever the SNI).
    tunnels: Mutex<HashMap<String, Arc<ServerConfig>>>,
    /// Leaves for intercepted hosts when the listeners use a static certificate.
    tunnel_leaves: Mutex<HashMap<LeafName, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Builds the context. `cert` is `tls.cert_file` + `tls.key_file`; `ca` the local CA (the
    /// default source of certificates, and always the one of intercepted tunnels).
    pub fn new(
        cert: Option<(&Path, &Path)>,
        ca: Option<Arc<LocalCa>>,
    ) -> Result<TlsContext, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let source = match (cert, &ca) {
            (Some((cert, key)), _) => Source::Static(load_static(cert, key, &provider)?),
            (None, Some(ca)) => Source::Ca {
                ca: Arc::clone(ca),
                leaves: Mutex::new(HashMap::new()),
            },
            (None, None) => {
                return Err(TlsError::Ca(CaError::NoStateDir));
            }
        };
        Ok(TlsContext {
            source,
            ca,
            provider,
            tunnels: Mutex::new(HashMap::new()),
            tunnel_leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The local CA, if any.
    pub fn ca(&self) -> Option<&Arc<LocalCa>> {
        self.ca.as_ref()
    }

    fn config(&self, resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }

    /// The acceptor of an `https://` listener bound to `local`.
    pub fn listener_acceptor(self: &Arc<Self>, local: SocketAddr) -> Result<TlsAcceptor, TlsError> {
        // A client that connected by address sends no SNI: it gets the listener's address
        // (loopback when bound to every address).
        let ip = match local.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let resolver = Arc::new(ListenerResolver {
            ctx: Arc::clone(self),
            fallback: LeafName::Ip(ip),
        });
        Ok(TlsAcceptor::from(Arc::new(self.config(resolver)?)))
    }

    /// The acceptor inside a tunnel to `host` (an intercepted upstream host): its leaf from
    /// the local CA; a client whose SNI names another host gets no certificate.
    pub fn tunnel_acceptor(self: &Arc<Self>, host: &str) -> Result<TlsAcceptor, TlsError> {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cfg) = tunnels.get(host) {
            return Ok(TlsAcceptor::from(Arc::clone(cfg)));
        }
        let resolver = Arc::new(TunnelResolver {
            ctx: Arc::clone(self),
            host: host.to_ascii_lowercase(),
        });
        let cfg = Arc::new(self.config(resolver)?);
        tunnels.insert(host.to_owned(), Arc::clone(&cfg));
        Ok(TlsAcceptor::from(cfg))
    }

    /// The cached leaf for `name`, issued now if missing or old.
    fn leaf(
        &self,
        ca: &LocalCa,
        cache: &Mutex<HashMap<LeafName, (Arc<CertifiedKey>, Instant)>>,
        name: LeafName,
    ) -> Option<Arc<CertifiedKey>> {
        if !ca.permits(&name) {
            tracing::warn!(name = ?name, "TLS client asked for a name the local CA may not vouch for: handshake refused");
            return None;
        }
        // Issued under the lock: a burst of first handshakes makes one leaf, not one each.
        let mut leaves = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((leaf, at)) = leaves.get(&name) {
            if at.elapsed() < ca::LEAF_RENEW_AFTER {
                return Some(Arc::clone(leaf));
            }
        }
        let (chain, key) = match ca.issue(&name) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "issuing a leaf certificate failed");
                return None;
            }
        };
        let leaf = match CertifiedKey::from_der(chain, key, &self.provider) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::error!(error = %e, "loading an issued leaf certificate failed");
                return None;
            }
        };
        leaves.insert(name, (Arc::clone(&leaf), Instant::now()));
        Some(leaf)
    }
}

fn load_static(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cert_err = |message: String| TlsError::Cert {
        path: cert.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("holds no certificate".into()));
    }
    crate::sign::key::check_private_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    // The error never quotes the file: it is a private key.
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|_| TlsError::Key {
        path: key.to_owned(),
        message: "not a PEM private key (PKCS#8, SEC1 or PKCS#1)".into(),
    })?;
    CertifiedKey::from_der(chain, key_der, provider)
        .map(Arc::new)
        .map_err(|e| cert_err(format!("does not match tls.key_file or is unusable: {e}")))
}

/// Picks the certificate of an `https://` listener.
struct ListenerResolver {
    ctx: Arc<TlsContext>,
    fallback: LeafName,
}

impl std::fmt::Debug for ListenerResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ListenerResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match &self.ctx.source {
            Source::Static(k) => Some(Arc::clone(k)),
            Source::Ca { ca, leaves } => {
                let name = hello
                    .server_name()
                    .map(|n| LeafName::Dns(n.to_ascii_lowercase()))
                    .unwrap_or_else(|| self.fallback.clone());
                self.ctx.leaf(ca, leaves, name)
            }
        }
    }
}

/// Picks the certificate inside a tunnel: the tunnel's host, from the local CA.
struct TunnelResolver {
    ctx: Arc<TlsContext>,
    host: String,
}

impl std::fmt::Debug for TunnelResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelResolver")
            .field("host", &self.host)
            .finish()
    }
}

impl ResolvesServerCert for TunnelResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            if !sni.eq_ignore_ascii_case(&self.host) {
                tracing::warn!(
                    connect = self.host,
                    sni,
                    "TLS inside a CONNECT tunnel names another host: handshake refused"
                );
                return None;
            }
        }
        let ca = self.ctx.ca.as_ref()?;
        let cache = match &self.ctx.source {
            Source::Ca { leaves, .. } => leaves,
            Source::Static(_) => &self.ctx.tunnel_leaves,
        };
        self.ctx.leaf(ca, cache, LeafName::Dns(self.host.clone()))
    }
}
