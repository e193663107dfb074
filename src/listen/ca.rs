//! cbgate's local certificate authority, for the `https://` listeners and `[intercept]`.
//!
//! Made on first use in `state_dir/ca/`: `ca.pem` (the certificate clients trust),
//! `ca-key.pem` (mode 0600) and `ca.json` (what it was made for). The CA is
//! **name-constrained** (RFC 5280 §4.2.1.10, critical): it can only vouch for the upstream host
//! names it was made for, `localhost` and the loopback addresses (127.0.0.0/8, ::1). Whoever
//! reads the key can therefore impersonate Coinbase's API hosts to the clients that trust
//! this CA, and nothing else to anyone; that is why clients should trust it per process, not in
//! the system store.
//!
//! Leaf certificates are made in memory, never written, and valid for [`LEAF_VALIDITY`]: a
//! local CA has no revocation, so expiry is the only bound on a leaf key that escaped the
//! process.
//!
//! The directory is made complete in a temporary directory and renamed into place, so two
//! processes starting at once never mix halves of two CAs: the second rename fails, and that
//! process loads the winner's CA. `--rotate` swaps the new directory in with one
//! `renameat2(RENAME_EXCHANGE)`.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA's directory inside `state_dir`.
pub const CA_DIR: &str = "ca";
/// The CA certificate (PEM) clients trust.
pub const CERT_FILE: &str = "ca.pem";
/// The CA's private key (PEM, PKCS#8), mode 0600.
pub const KEY_FILE: &str = "ca-key.pem";
/// What the CA was made for.
pub const META_FILE: &str = "ca.json";

/// How long a leaf certificate is valid. Short, because nothing can revoke a leaf of a local
/// CA; long enough that one leaf per name serves many connections (issuing costs a key
/// generation and a signature).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is replaced once it is this old (so none is ever served near its expiry).
pub const LEAF_RENEW_AFTER: Duration = Duration::from_secs(12 * 3600);
/// How long the CA is valid: clients trust it once; `cbgate ca --rotate` replaces it earlier.
pub const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Leaf `notBefore` is this far in the past, for clients whose clock is slightly behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// The loopback names a leaf may always carry.
pub const LOCALHOST: &str = "localhost";

/// Making, reading or using the local CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA in {}: {source}; state_dir must be a directory cbgate's user can write", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local CA file {} is not usable ({message}); run `cbgate ca --rotate` to make a new CA", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("local CA key {} has mode {mode:04o}: group or others can read or change it; run chmod 600 {}", path.display(), path.display())]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("issuing a certificate failed: {0}")]
    Issue(String),
    #[error("no state_dir (nor STATE_DIRECTORY, XDG_STATE_HOME, HOME): the local CA needs one; set state_dir, or tls.cert_file and tls.key_file")]
    NoStateDir,
}

/// What `ca.json` records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    /// The CA certificate's common name (its subject), needed to issue under it.
    common_name: String,
    /// The permitted DNS names besides `localhost`.
    dns: Vec<String>,
    /// The permitted IP addresses besides loopback (upstreams given by address).
    #[serde(default)]
    ips: Vec<IpAddr>,
    created_unix: u64,
    not_after_unix: u64,
}

/// A name a leaf certificate is issued for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

/// The local CA, loaded.
pub struct LocalCa {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    meta: Meta,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("dns", &self.meta.dns)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The CA certificate's path for `state_dir`.
pub fn cert_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CA_DIR).join(CERT_FILE)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    // A failed RNG leaves a fixed serial; serials only need to be unique per issuer for
    // revocation, which a local CA does not have.
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn ca_params(meta: &Meta) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, meta.common_name.clone());
    dn.push(DnType::OrganizationName, "cbgate");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut permitted: Vec<GeneralSubtree> = std::iter::once(LOCALHOST.to_owned())
        .chain(meta.dns.iter().cloned())
        .map(GeneralSubtree::DnsName)
        .collect();
    permitted.push(GeneralSubtree::IpAddress(CidrSubnet::V4(
        [127, 0, 0, 0],
        [255, 0, 0, 0],
    )));
    permitted.push(GeneralSubtree::IpAddress(CidrSubnet::V6(
        std::net::Ipv6Addr::LOCALHOST.octets(),
        [0xff; 16],
    )));
    for ip in &meta.ips {
        permitted.push(GeneralSubtree::IpAddress(match ip {
            IpAddr::V4(a) => CidrSubnet::V4(a.octets(), [0xff; 4]),
            IpAddr::V6(a) => CidrSubnet::V6(a.octets(), [0xff; 16]),
        }));
    }
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: Vec::new(),
    });
    p
}

/// Splits configured upstream hosts into DNS names and addresses (IPv6 in brackets).
fn split_hosts(hosts: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for h in hosts {
        let bare = h.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) if !ip.is_loopback() => ips.push(ip),
            Ok(_) => {}
            Err(_) => {
                let d = h.to_ascii_lowercase();
                if d != LOCALHOST && !dns.contains(&d) {
                    dns.push(d);
                }
            }
        }
    }
    dns.sort();
    ips.sort();
    ips.dedup();
    (dns, ips)
}

impl LocalCa {
    /// Loads the CA in `state_dir`, making it first (for `hosts`, the upstream host names)
    /// when there is none.
    pub fn load_or_create(state_dir: &Path, hosts: &[String]) -> Result<LocalCa, CaError> {
        let dir = state_dir.join(CA_DIR);
        if dir.join(KEY_FILE).exists() {
            return LocalCa::load(&dir);
        }
        let tmp = LocalCa::make(state_dir, hosts)?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Another process made one at the same moment: use it, drop ours.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                ) =>
            {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io_err(&dir)(e));
            }
        }
        LocalCa::load(&dir)
    }

    /// Replaces the CA in `state_dir` by a new one for `hosts` (the old one is deleted).
    pub fn rotate(state_dir: &Path, hosts: &[String]) -> Result<LocalCa, CaError> {
        let dir = state_dir.join(CA_DIR);
        let tmp = LocalCa::make(state_dir, hosts)?;
        let swapped = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            &dir,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        match swapped {
            // `tmp` now holds the old CA.
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(rustix::io::Errno::NOENT) => {
                std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io_err(&dir)(e.into()));
            }
        }
        LocalCa::load(&dir)
    }

    /// Makes a complete CA directory next to where it belongs and returns its path.
    fn make(state_dir: &Path, hosts: &[String]) -> Result<PathBuf, CaError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io_err(state_dir))?;
        let mut r = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut r);
        let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = state_dir.join(format!(".ca-new-{}-{tag}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        let result = (|| {
            let (dns, ips) = split_hosts(hosts);
            let now = unix_now();
            let meta = Meta {
                common_name: format!("cbgate local CA {tag}"),
                dns,
                ips,
                created_unix: now,
                not_after_unix: now + CA_VALIDITY.as_secs(),
            };
            let mut params = ca_params(&meta);
            params.serial_number = Some(random_serial());
            params.not_before = time::OffsetDateTime::now_utc() - BACKDATE;
            params.not_after = time::OffsetDateTime::now_utc() + CA_VALIDITY;
            let key = KeyPair::generate().map_err(|e| CaError::Issue(e.to_string()))?;
            let cert = params
                .self_signed(&key)
                .map_err(|e| CaError::Issue(e.to_string()))?;
            let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
            write_new(&tmp.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
            write_new(&tmp.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
            let meta_json =
                serde_json::to_vec_pretty(&meta).map_err(|e| CaError::Issue(e.to_string()))?;
            write_new(&tmp.join(META_FILE), &meta_json, 0o644)?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn load(dir: &Path) -> Result<LocalCa, CaError> {
        let key_path = dir.join(KEY_FILE);
        let meta_path = dir.join(META_FILE);
        let cert_path = dir.join(CERT_FILE);
        let mode = std::fs::metadata(&key_path)
            .map_err(io_err(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::InsecureKey {
                path: key_path,
                mode: mode & 0o7777,
            });
        }
        let key_pem =
            zeroize::Zeroizing::new(std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        let meta: Meta =
            serde_json::from_slice(&std::fs::read(&meta_path).map_err(io_err(&meta_path))?)
                .map_err(|e| CaError::Corrupt {
                    path: meta_path.clone(),
                    message: e.to_string(),
                })?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let corrupt = |message: &str| CaError::Corrupt {
            path: cert_path.clone(),
            message: message.to_owned(),
        };
        use rustls_pki_types::pem::PemObject as _;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| corrupt("not a PEM certificate"))?;
        // The certificate must carry this key's public half, or every leaf would fail.
        let spki = key.subject_public_key_info();
        if !cert_der.windows(spki.len()).any(|w| w == spki.as_slice()) {
            return Err(corrupt("it does not match ca-key.pem"));
        }
        let issuer = Issuer::new(ca_params(&meta), key);
        Ok(LocalCa {
            dir: dir.to_owned(),
            cert_pem,
            cert_der,
            issuer,
            meta,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's path.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// Whether the CA expires within `within`.
    pub fn expires_within(&self, within: Duration) -> bool {
        self.meta.not_after_unix <= unix_now().saturating_add(within.as_secs())
    }

    /// The upstream hosts of `hosts` this CA cannot vouch for (it was made before they were
    /// configured): `cbgate ca --rotate` makes one that can.
    pub fn missing(&self, hosts: &[String]) -> Vec<String> {
        let (dns, ips) = split_hosts(hosts);
        dns.into_iter()
            .filter(|d| !self.meta.dns.contains(d))
            .chain(
                ips.into_iter()
                    .filter(|ip| !self.meta.ips.contains(ip))
                    .map(|ip| ip.to_string()),
            )
            .collect()
    }

    /// Whether a leaf may be issued for `name`: exactly one of the names the CA was made for,
    /// `localhost`, or a loopback address.
    pub fn permits(&self, name: &LeafName) -> bool {
        match name {
            LeafName::Dns(d) => {
                let d = d.to_ascii_lowercase();
                d == LOCALHOST || self.meta.dns.contains(&d)
            }
            LeafName::Ip(ip) => ip.is_loopback() || self.meta.ips.contains(ip),
        }
    }

    /// Issues a leaf certificate for `name` (which must be [`LocalCa::permits`]): the chain
    /// (leaf, CA) and the leaf's key, both in memory only.
    pub fn issue(
        &self,
        name: &LeafName,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        if !self.permits(name) {
            return Err(CaError::Issue(format!(
                "{name:?} is outside the CA's name constraints"
            )));
        }
        let issue = |e: rcgen::Error| CaError::Issue(e.to_string());
        let mut p = CertificateParams::default();
        // No subject: some verifiers check a subject CN against the DNS constraints too, and
        // an IP address there would fail them. The SAN is then critical (RFC 5280 §4.2.1.6).
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![match name {
            LeafName::Dns(d) => SanType::DnsName(d.to_ascii_lowercase().try_into().map_err(issue)?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate().map_err(issue)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(issue)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }
}

/// Writes a new file with `mode` (never following or replacing an existing one) and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    // umask may have cleared bits of a public file; the key stays 0600 whatever it is.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec![
            "api.coinbase.com".into(),
            "advanced-trade-ws.coinbase.com".into(),
        ]
    }

    #[test]
    fn made_once_then_loaded_with_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let a = LocalCa::load_or_create(&state, &hosts()).expect("create");
        let b = LocalCa::load_or_create(&state, &hosts()).expect("load");
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(CA_DIR)), 0o700);
        assert_eq!(mode(&state.join(CA_DIR).join(KEY_FILE)), 0o600);
        let c = LocalCa::rotate(&state, &hosts()).expect("rotate");
        assert_ne!(a.cert_pem(), c.cert_pem());
        // Nothing of the old CA or the temporary directories is left.
        let left: Vec<_> = std::fs::read_dir(&state)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(CA_DIR)]);
    }

    #[test]
    fn concurrent_first_use_yields_one_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().to_owned();
        let pems: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let state = state.clone();
                    s.spawn(move || {
                        LocalCa::load_or_create(&state, &hosts())
                            .expect("create or load")
                            .cert_pem()
                            .to_owned()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert!(pems.iter().all(|p| p == &pems[0]));
    }

    #[test]
    fn leaves_only_for_permitted_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::load_or_create(dir.path(), &hosts()).expect("create");
        assert!(ca.permits(&LeafName::Dns("API.coinbase.com".into())));
        assert!(ca.permits(&LeafName::Dns("localhost".into())));
        assert!(ca.permits(&LeafName::Ip("127.0.0.1".parse().expect("ip"))));
        assert!(ca.permits(&LeafName::Ip("::1".parse().expect("ip"))));
        assert!(!ca.permits(&LeafName::Dns("example.com".into())));
        assert!(!ca.permits(&LeafName::Dns("evil.api.coinbase.com".into())));
        assert!(!ca.permits(&LeafName::Ip("10.0.0.1".parse().expect("ip"))));
        assert!(ca.issue(&LeafName::Dns("example.com".into())).is_err());
        let (chain, _) = ca
            .issue(&LeafName::Dns("api.coinbase.com".into()))
            .expect("issue");
        assert_eq!(chain.len(), 2);
        assert_eq!(
            ca.missing(&["api.cdp.coinbase.com".into()]),
            vec!["api.cdp.coinbase.com"]
        );
    }

    #[test]
    fn a_readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        LocalCa::load_or_create(dir.path(), &hosts()).expect("create");
        let key = dir.path().join(CA_DIR).join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = LocalCa::load_or_create(dir.path(), &hosts()).expect_err("refused");
        assert!(matches!(e, CaError::InsecureKey { .. }), "{e}");
    }
}
