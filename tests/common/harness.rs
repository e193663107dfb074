//! Test harness: generated keys in every accepted form, a cbgate instance in-process pointed at
//! the mock through `upstream.resolve`, and small HTTP clients (HTTP/1.1, h2c, raw bytes).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use cbgate::config::Config;
use cbgate::listen::server::{self, Listener, ServeOptions};
use cbgate::listen::workers::{self, Unregistered};
use cbgate::proxy::Proxy;
use cbgate::sign::key::KeySource;

use super::mock::{ExpectedKey, MockCoinbase, MockOptions, Pki};

/// The host names the test CA's certificate covers.
pub const HOSTS: &[&str] = &[
    "api.coinbase.com",
    "api.cdp.coinbase.com",
    "advanced-trade-ws.coinbase.com",
    "advanced-trade-ws-user.coinbase.com",
    "api.exchange.coinbase.com",
    "api.prime.coinbase.com",
    "api.international.coinbase.com",
    "drb.coinbase.com",
    "ws-feed.exchange.coinbase.com",
];

/// The forms a secret comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyForm {
    /// `-----BEGIN EC PRIVATE KEY-----` (what the CDP portal gave for ECDSA keys).
    P256Sec1,
    /// `-----BEGIN PRIVATE KEY-----` holding a P-256 key.
    P256Pkcs8,
    /// base64 of seed || public key (the portal's Ed25519 form).
    Ed25519B64_64,
    /// base64 of the seed alone.
    Ed25519B64_32,
    /// `-----BEGIN PRIVATE KEY-----` holding an Ed25519 key.
    Ed25519Pkcs8,
}

/// A generated key: its name, its secret text as a user would paste it, and what the mock
/// needs to verify its tokens.
#[derive(Clone)]
pub struct TestKey {
    pub name: String,
    pub secret: String,
    pub expected: ExpectedKey,
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// PKCS#8 v1 prefix for an Ed25519 private key (RFC 8410 §7), followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl TestKey {
    pub fn generate(form: KeyForm) -> TestKey {
        let name = format!("organizations/{}/apiKeys/{}", uuid_like(), uuid_like());
        match form {
            KeyForm::P256Sec1 | KeyForm::P256Pkcs8 => {
                let kp =
                    EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                        .expect("generate P-256");
                let secret = if form == KeyForm::P256Sec1 {
                    let der = kp.private_key().as_der().expect("SEC1 DER");
                    pem("EC PRIVATE KEY", der.as_ref())
                } else {
                    let der = kp.to_pkcs8v1().expect("PKCS#8");
                    pem("PRIVATE KEY", der.as_ref())
                };
                TestKey {
                    expected: ExpectedKey::Es256 {
                        name: name.clone(),
                        public_key: kp.public_key().as_ref().to_vec(),
                    },
                    name,
                    secret,
                }
            }
            KeyForm::Ed25519B64_64 | KeyForm::Ed25519B64_32 | KeyForm::Ed25519Pkcs8 => {
                let mut seed = [0u8; 32];
                aws_lc_rs::rand::fill(&mut seed).expect("random seed");
                let kp = Ed25519KeyPair::from_seed_unchecked(&seed).expect("ed25519 from seed");
                let public = kp.public_key().as_ref().to_vec();
                let secret = match form {
                    KeyForm::Ed25519B64_64 => STANDARD.encode([&seed[..], &public[..]].concat()),
                    KeyForm::Ed25519B64_32 => STANDARD.encode(seed),
                    _ => pem(
                        "PRIVATE KEY",
                        &[&ED25519_PKCS8_PREFIX[..], &seed[..]].concat(),
                    ),
                };
                // The portal's new keys are named by a bare id.
                let name = uuid_like();
                TestKey {
                    expected: ExpectedKey::EdDsa {
                        name: name.clone(),
                        public_key: public,
                    },
                    name,
                    secret,
                }
            }
        }
    }

    /// Writes the CDP key JSON (`name` + `privateKey`), mode 0600, and returns its path.
    pub fn write_json(&self, dir: &Path) -> PathBuf {
        let body = serde_json::json!({ "name": self.name, "privateKey": self.secret });
        write_private(dir, "cdp_api_key.json", body.to_string().as_bytes())
    }
}

/// Writes a file readable by its owner only, as a key file should be.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A mock Coinbase plus its PKI, the usual start of a test.
pub struct Upstream {
    pub pki: Pki,
    pub mock: MockCoinbase,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

impl Upstream {
    pub async fn start(key: Option<&TestKey>) -> Upstream {
        Upstream::start_with(MockOptions {
            key: key.map(|k| k.expected.clone()),
            ..MockOptions::default()
        })
        .await
    }

    pub async fn start_with(opts: MockOptions) -> Upstream {
        let pki = Pki::new(HOSTS);
        let mock = MockCoinbase::start(&pki, opts).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = pki.write_ca(dir.path());
        Upstream {
            pki,
            mock,
            dir,
            ca_file,
        }
    }

    /// A configuration that trusts the test CA and resolves both API hosts to the mock.
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.upstream.ca_file = Some(self.ca_file.clone());
        for h in HOSTS {
            cfg.upstream.resolve.insert((*h).to_owned(), self.mock.addr);
        }
        cfg.upstream.connect_timeout = Duration::from_secs(2);
        cfg.upstream.request_timeout = Duration::from_secs(5);
        cfg
    }
}

/// Whether this test run serves in-process gates with the per-core model (two worker threads
/// with their own runtimes) rather than on the test's runtime: `CBGATE_RUNTIME__MODEL=per-core
/// cargo nextest run` runs the suite that way (the `cbgate` binary, whose default it is, also
/// gets the variable, so `=shared` runs the binary's tests in the other model).
pub fn per_core_tests() -> bool {
    std::env::var("CBGATE_RUNTIME__MODEL").is_ok_and(|m| m == "per-core")
}

/// A cbgate instance serving in-process on 127.0.0.1:0.
pub struct Gate {
    pub addr: SocketAddr,
    pub url: String,
    /// The proxy being served (its metrics, for assertions).
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gate {
    /// Starts cbgate with `cfg`, signing with `key` (loaded from its JSON file, as users do).
    pub async fn start(cfg: Config, key: Option<&TestKey>) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Gate::start_on(cfg, key, vec![Listener::Tcp(listener)]).await
    }

    pub async fn start_on(cfg: Config, key: Option<&TestKey>, listeners: Vec<Listener>) -> Gate {
        Gate::start_full(cfg, key, None, listeners).await
    }

    /// Starts cbgate requiring `token` as `cbgate-token`.
    pub async fn start_with_token(cfg: Config, key: Option<&TestKey>, token: &str) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Gate::start_full(
            cfg,
            key,
            Some(zeroize::Zeroizing::new(token.to_owned())),
            vec![Listener::Tcp(listener)],
        )
        .await
    }

    /// Starts cbgate signing with `key` and minting `X-Wallet-Auth` with `wallet`.
    pub async fn start_with_wallet(
        cfg: Config,
        key: Option<&TestKey>,
        wallet: Option<cbgate::sign::wallet::WalletSecret>,
    ) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Gate::start_inner(cfg, key, None, wallet, vec![Listener::Tcp(listener)], None).await
    }

    pub async fn start_full(
        cfg: Config,
        key: Option<&TestKey>,
        token: Option<zeroize::Zeroizing<String>>,
        listeners: Vec<Listener>,
    ) -> Gate {
        Gate::start_inner(cfg, key, token, None, listeners, None).await
    }

    /// Starts cbgate with TLS towards clients (`https://` listeners, `[intercept]`).
    pub async fn start_tls(
        cfg: Config,
        key: Option<&TestKey>,
        token: Option<zeroize::Zeroizing<String>>,
        listeners: Vec<Listener>,
        tls: Option<Arc<cbgate::listen::tls::TlsContext>>,
    ) -> Gate {
        Gate::start_inner(cfg, key, token, None, listeners, tls).await
    }

    async fn start_inner(
        mut cfg: Config,
        key: Option<&TestKey>,
        token: Option<zeroize::Zeroizing<String>>,
        wallet: Option<cbgate::sign::wallet::WalletSecret>,
        listeners: Vec<Listener>,
        tls: Option<Arc<cbgate::listen::tls::TlsContext>>,
    ) -> Gate {
        // The runtime the Gate really serves with (below), so that what depends on it (each
        // upstream pool's share of the per-host slots) is what `cbgate serve` would set up.
        cfg.runtime = if per_core_tests() {
            cbgate::config::RuntimeConfig {
                model: cbgate::config::RuntimeModel::PerCore,
                threads: 2,
            }
        } else {
            cbgate::config::RuntimeConfig {
                model: cbgate::config::RuntimeModel::Shared,
                threads: 0,
            }
        };
        cfg.validate().expect("valid test config");
        let api_key = key.map(|k| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = k.write_json(dir.path());
            KeySource::File(path).load().expect("test key loads")
        });
        let addr = match listeners.first() {
            Some(Listener::Tcp(l) | Listener::Tls(l)) => l.local_addr().expect("addr"),
            _ => SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        // `[keys.NAME]` from files, as `cbgate serve` loads them.
        let keys = cbgate::sign::keys::Keyring::load(&cfg.keys, &std::collections::HashMap::new())
            .expect("named test keys load");
        let mut proxy = Proxy::new(&cfg, api_key)
            .expect("proxy builds")
            .with_wallet_secret(wallet)
            .with_client_token(token, &cfg)
            .with_keys(keys)
            // `clients.NAME.token_file`s, as `cbgate serve` reads them.
            .with_client_tokens(
                cbgate::gate::identity::ClientTokens::read(&cfg).expect("client token files read"),
            )
            .expect("client tokens are distinct");
        if let Some(tls) = tls {
            proxy = proxy.with_tls(tls);
        }
        let proxy = Arc::new(proxy);
        let (tx, rx) = oneshot::channel();
        let opts = ServeOptions {
            drain_timeout: Duration::from_secs(5),
            ..ServeOptions::proxy(&cfg)
        };
        let task = if per_core_tests() {
            // Two per-core workers, each with its own handle on every listener.
            let mut per_worker = vec![Vec::new(), Vec::new()];
            for l in listeners {
                let l = Unregistered::from_listener(l).expect("listener leaves the runtime");
                per_worker[1].push(l.try_clone().expect("second handle"));
                per_worker[0].push(l);
            }
            // Dropping the sender (a Gate dropped without stop) stops the workers too.
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let workers = workers::spawn(per_worker, proxy.clone(), opts, stop_rx)
                .expect("worker threads start");
            tokio::spawn(async move {
                let _ = rx.await;
                stop_tx.send_replace(true);
                workers.wait().await;
            })
        } else {
            tokio::spawn(server::run(listeners, proxy.clone(), opts, async move {
                let _ = rx.await;
            }))
        };
        Gate {
            addr,
            url: format!("http://{addr}"),
            proxy,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops accepting, drains, and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Resp {
    /// Reads a response whole.
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Resp {
        let version = resp.version();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
            version,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// cbgate's own error code, when cbgate (not Coinbase) answered.
    pub fn cbgate_error(&self) -> Option<&str> {
        self.headers
            .get("x-cbgate-error")
            .and_then(|v| v.to_str().ok())
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive.
pub fn h1_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Resp {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20 s")
        .expect("request reaches cbgate");
    Resp::read(resp).await
}

pub async fn get(gate: &Gate, path: &str) -> Resp {
    let req = Request::get(format!("{}{path}", gate.url))
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&h1_client(), req).await
}

/// Writes raw bytes on a new TCP connection and reads until the server closes it (or 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one request over a Unix socket (HTTP/1.1) and reads the whole response.
pub async fn send_unix(sock: &Path, req: Request<Full<Bytes>>) -> Resp {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect unix socket");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("response within 20 s")
        .expect("response");
    Resp::read(resp).await
}

/// `GET path` over a Unix socket.
pub async fn get_unix(sock: &Path, path: &str) -> Resp {
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    send_unix(sock, req).await
}

/// The `cbgate` binary with nothing from the developer's environment steering it.
pub fn cbgate_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cbgate"));
    for (k, _) in std::env::vars() {
        // CBGATE_RUNTIME__MODEL is kept: it runs the suite in either model (per_core_tests).
        if (k.starts_with("CBGATE_") && k != "CBGATE_RUNTIME__MODEL")
            || k.starts_with("COINBASE_")
            || k == "RUST_LOG"
            || k == "CREDENTIALS_DIRECTORY"
        {
            c.env_remove(k);
        }
    }
    // The kill switch persists in state_dir, by default under $HOME: keep tests off the
    // developer's own halt state (tests that need one set state_dir).
    c.env_remove("STATE_DIRECTORY");
    c.env(
        "XDG_STATE_HOME",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-state"),
    );
    c.stdin(std::process::Stdio::null());
    c
}

/// A free loopback port (bound, then released: fine for tests on a quiet machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `cbgate serve` process whose stdout and stderr are collected as it runs.
pub struct Process {
    pub child: std::process::Child,
    output: Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Spawns `command` (stdout and stderr piped and drained continuously: trace logging
    /// would otherwise fill a pipe and block the server).
    pub fn spawn(mut command: std::process::Command) -> Process {
        use std::io::Read as _;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cbgate");
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        let mut readers = Vec::new();
        let pipes: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for mut pipe in pipes {
            let out = Arc::clone(&output);
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }));
        }
        Process {
            child,
            output,
            readers,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits until `probe` returns true, the process exits (panic), or 20 s pass (panic).
    pub async fn wait_until(&mut self, what: &str, mut probe: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if probe() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cbgate exited ({status}) before {what}:\n{}", self.output());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the process to exit (20 s at most) and returns its status and all output.
    pub async fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cbgate did not exit:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (status, self.output())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain HTTP GET to `addr` (the admin listener): status and body.
/// `cbgate serve --config cfg` as a child process, once its admin listener at `admin`
/// answers `/readyz` with 200 (the process's own deadline bounds the wait).
pub async fn serve_until_ready(cfg: &std::path::Path, admin: SocketAddr) -> Process {
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"]).arg(cfg);
    let mut process = Process::spawn(cmd);
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let probe = tokio::spawn(async move {
        loop {
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/readyz").await.0 == StatusCode::OK
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    });
    process
        .wait_until("/readyz 200", || {
            ready.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
    probe.abort();
    process
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(&h1_client(), req).await;
    (r.status, r.text())
}

/// The texts of `secret` that must never appear in output: the text itself and, for a PEM, each
/// body line, the body joined (newlines lost), and the `\n`-escaped form a .env file or a JSON
/// string holds.
pub fn secret_pieces(secret: &str) -> Vec<String> {
    let mut pieces = vec![secret.to_owned()];
    if secret.contains("-----BEGIN") {
        let unescaped = secret.replace("\\r\\n", "\n").replace("\\n", "\n");
        let body: Vec<&str> = unescaped
            .lines()
            .map(|l| l.trim().trim_matches(['"', '\'']))
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .collect();
        pieces.extend(body.iter().map(|l| (*l).to_owned()));
        pieces.push(body.concat());
        pieces.push(unescaped.replace('\n', "\\n"));
        pieces.push(unescaped);
    }
    pieces
}

/// The first 16-character window of `secret` (in any of its `secret_pieces`) found in
/// `haystack`; windows inside a PEM armour line (`-----BEGIN ...`) carry no secret.
pub fn find_secret(haystack: &str, secret: &str) -> Option<String> {
    let unescaped = secret.replace("\\r\\n", "\n").replace("\\n", "\n");
    let armour: Vec<&str> = unescaped
        .lines()
        .map(|l| l.trim().trim_matches(['"', '\'']))
        .filter(|l| l.starts_with("-----") && l.ends_with("-----"))
        .collect();
    for piece in secret_pieces(secret) {
        let chars: Vec<char> = piece.chars().collect();
        for w in chars.windows(16) {
            let s: String = w.iter().collect();
            if !armour.iter().any(|a| a.contains(&s)) && haystack.contains(&s) {
                return Some(s);
            }
        }
    }
    None
}

/// No 16-character window of `secret` appears in `haystack` (see `find_secret`).
pub fn assert_no_secret(haystack: &str, secret: &str, what: &str) {
    if let Some(s) = find_secret(haystack, secret) {
        panic!("{what} contains part of the secret: {s:?}");
    }
}

/// Runs `cmd` off the async runtime (which keeps serving cbgate) and collects its output,
/// killing it after `limit` so a hung client fails its test instead of the whole run.
pub async fn run_within(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let deadline = std::time::Instant::now() + limit;
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        child.wait_with_output().expect("collect output")
    })
    .await
    .expect("join")
}
