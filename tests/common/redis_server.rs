//! A real redis-server for the tests (the Debian package `.ci/run` installs): on a loopback
//! port, without persistence, killed on drop; optionally TLS-only with a test CA (rcgen).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A redis-server on a loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    pub password: String,
    tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

/// The files of a TLS redis-server: its certificate and key, and the CA that signed it.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// A fresh CA (named `cn`) and a server certificate for 127.0.0.1 and localhost, in `dir`.
    pub fn generate(dir: &Path, cn: &str) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, cn);
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf.distinguished_name
            .push(DnType::CommonName, "redis test");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf cert");
        let files = TlsFiles {
            ca: dir.join(format!("{cn}-ca.pem")),
            cert: dir.join(format!("{cn}-redis.pem")),
            key: dir.join(format!("{cn}-redis.key")),
        };
        std::fs::write(&files.ca, ca_cert.pem()).expect("write ca");
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

pub fn redis_server_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("redis-server is not installed: apt-get install redis-server (as .ci/run does)")
    })
}

impl RedisServer {
    /// Plain TCP on `port`, with `password`.
    pub fn start(port: u16, password: &str) -> RedisServer {
        RedisServer::spawn(port, password, None)
    }

    /// TLS only on `port` (no plain port), with `password`; clients need no certificate.
    pub fn start_tls(port: u16, password: &str, tls: &TlsFiles) -> RedisServer {
        RedisServer::spawn(port, password, Some(tls.clone()))
    }

    fn spawn(port: u16, password: &str, tls: Option<TlsFiles>) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = std::process::Command::new(redis_server_binary());
        match &tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", password])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let r = RedisServer {
            child: Some(child),
            port,
            password: password.to_owned(),
            tls,
            _dir: dir,
        };
        r.wait_answering();
        r
    }

    /// Waits until Redis answers PING (plain), or accepts connections (TLS: it listens only
    /// once its certificates are loaded).
    fn wait_answering(&self) {
        use std::io::{Read as _, Write as _};
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                if self.tls.is_some() {
                    return;
                }
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let cmd = format!("AUTH {}\r\nPING\r\n", self.password);
                let mut buf = [0u8; 64];
                if s.write_all(cmd.as_bytes()).is_ok() {
                    let mut got = Vec::new();
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(5).any(|w| w == b"+PONG") {
                            return;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
