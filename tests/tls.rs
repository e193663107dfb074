//! TLS towards clients, over real sockets with real TLS clients: the `https://` listener with
//! the local CA (`cbgate ca`), the CA's name constraints, the intercepting `HTTPS_PROXY`, the
//! timeouts of the TLS phases, and the official Coinbase Python SDK through both.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use cbgate::listen::ca::{self, LocalCa};
use cbgate::listen::server::Listener;
use cbgate::listen::tls::TlsContext;

use common::harness::{cbgate_command, Gate, KeyForm, Process, TestKey, Upstream};
use common::mock::MockOptions;
use common::provision;

/// A cbgate with a plain and an `https://` listener, its CA made by `cbgate ca`, in front of
/// the realistic mock.
struct Setup {
    up: Upstream,
    _gate: Gate,
    /// The plain listener (also the intercepting proxy when enabled).
    plain: SocketAddr,
    https: SocketAddr,
    state: tempfile::TempDir,
    /// What `cbgate ca` printed, as a client would save it.
    ca_pem: PathBuf,
}

/// Runs `cbgate ca ARGS` with `state_dir` and returns its stdout.
fn cbgate_ca(state: &Path, args: &[&str]) -> String {
    let out = cbgate_command()
        .env("CBGATE_STATE_DIR", state)
        .arg("ca")
        .args(args)
        .output()
        .expect("run cbgate ca");
    assert!(
        out.status.success(),
        "cbgate ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn setup_with(intercept: bool, tweak: impl FnOnce(&mut cbgate::config::Config)) -> Setup {
    setup_mock(intercept, |_| {}, tweak).await
}

async fn setup_mock(
    intercept: bool,
    mock: impl FnOnce(&mut MockOptions),
    tweak: impl FnOnce(&mut cbgate::config::Config),
) -> Setup {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let mut opts = MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        ..MockOptions::default()
    };
    mock(&mut opts);
    let up = Upstream::start_with(opts).await;
    let state = tempfile::tempdir().expect("tempdir");
    let printed = cbgate_ca(state.path(), &[]);
    assert!(
        printed.starts_with("-----BEGIN CERTIFICATE-----"),
        "{printed}"
    );
    let ca_pem = up.dir.path().join("cbgate-ca.pem");
    std::fs::write(&ca_pem, &printed).expect("save the CA");

    let mut cfg = up.config();
    cfg.state_dir = Some(state.path().to_owned());
    cfg.intercept.enabled = intercept;
    tweak(&mut cfg);
    let ca = LocalCa::load_or_create(state.path(), &cfg.upstream_hosts()).expect("load the CA");
    assert_eq!(
        ca.cert_pem(),
        printed,
        "serve uses the CA `cbgate ca` printed"
    );
    let tls = Arc::new(TlsContext::new(None, Some(Arc::new(ca))).expect("tls"));
    let plain_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let https_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain = plain_l.local_addr().expect("addr");
    let https = https_l.local_addr().expect("addr");
    let gate = Gate::start_tls(
        cfg,
        Some(&key),
        None,
        vec![Listener::Tcp(plain_l), Listener::Tls(https_l)],
        Some(tls),
    )
    .await;
    Setup {
        up,
        _gate: gate,
        plain,
        https,
        state,
        ca_pem,
    }
}

async fn setup(intercept: bool) -> Setup {
    setup_with(intercept, |_| {}).await
}

/// Runs a program to completion off the runtime's threads (cbgate runs in-process).
async fn run(mut cmd: std::process::Command) -> std::process::Output {
    cmd.stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("starts")
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn curl(args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--noproxy", "*"])
        .args(args);
    run(c).await
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_verifies_the_leaf_over_http1_and_h2() {
    let s = setup(false).await;
    let ca = s.ca_pem.to_str().expect("path");
    let port = s.https.port();
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        for host in ["localhost", "127.0.0.1"] {
            let url = format!("https://{host}:{port}/api/v3/brokerage/time");
            let out = curl(&[
                "--cacert",
                ca,
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
                &url,
            ])
            .await;
            let (stdout, stderr) = text(&out);
            assert_eq!(stdout, format!("200 {version}"), "{url} {flag}: {stderr}");
        }
    }
    // Signed requests too: the mock verifies cbgate's JWT.
    let url = format!("https://localhost:{port}/api/v3/brokerage/accounts");
    let out = curl(&["--cacert", ca, &url]).await;
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("\"accounts\""), "{stdout} {stderr}");
    // Without the CA, curl refuses the certificate.
    let out = curl(&[&url]).await;
    assert!(!out.status.success(), "curl trusted cbgate without its CA");
    assert!(
        s.up.mock
            .requests_to("GET", "/api/v3/brokerage/accounts")
            .len()
            == 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_ssl_and_requests_verify_the_leaf_and_negotiate_h2() {
    let s = setup(false).await;
    let script = r#"
import socket, ssl, sys
import requests
ca, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection(("127.0.0.1", port)) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as t:
        print("alpn", t.selected_alpn_protocol())
r = requests.get(f"https://localhost:{port}/api/v3/brokerage/time", verify=ca)
print("requests", r.status_code, r.json()["epochSeconds"].isdigit())
try:
    requests.get(f"https://localhost:{port}/api/v3/brokerage/time")
    print("default trust accepted cbgate")
except requests.exceptions.SSLError:
    print("default trust refuses")
"#;
    let mut c = std::process::Command::new(provision::python());
    c.args(["-c", script])
        .arg(&s.ca_pem)
        .arg(s.https.port().to_string())
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    let out = run(c).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["alpn h2", "requests 200 True", "default trust refuses"],
        "{stderr}"
    );
}

/// Signs a leaf for `name` with the CA key read from `state_dir`, as anyone who stole the key
/// could, and serves it on a fresh TLS port.
async fn serve_forged_leaf(state: &Path, name: &str) -> SocketAddr {
    let dir = state.join(ca::CA_DIR);
    let key_pem = std::fs::read_to_string(dir.join(ca::KEY_FILE)).expect("read the CA key");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(ca::META_FILE)).expect("ca.json"))
            .expect("json");
    let ca_key = rcgen::KeyPair::from_pem(&key_pem).expect("CA key");
    let mut ca_params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        meta["common_name"].as_str().expect("cn"),
    );
    dn.push(rcgen::DnType::OrganizationName, "cbgate");
    ca_params.distinguished_name = dn;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.use_authority_key_identifier_extension = true;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = p.signed_by(&leaf_key, &issuer).expect("sign the leaf");
    let ca_der = rustls_pki_types::pem::PemObject::from_pem_slice(
        std::fs::read(dir.join(ca::CERT_FILE))
            .expect("ca.pem")
            .as_slice(),
    )
    .expect("CA der");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), ca_der],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_for_another_name_signed_with_the_ca_key_fails_verification() {
    let s = setup(false).await;
    let ca = s.ca_pem.to_str().expect("path");
    // Control: a forged leaf for a permitted name verifies, so the refusal below is the
    // name constraint and nothing else.
    for (name, ok) in [
        ("api.coinbase.com", true),
        ("example.com", false),
        ("www.google.com", false),
    ] {
        let addr = serve_forged_leaf(s.state.path(), name).await;
        let resolve = format!("{name}:{}:127.0.0.1", addr.port());
        let url = format!("https://{name}:{}/", addr.port());
        let out = curl(&["--cacert", ca, "--resolve", &resolve, &url]).await;
        let (stdout, stderr) = text(&out);
        if ok {
            assert_eq!(stdout, "ok", "{name}: {stderr}");
        } else {
            assert!(!out.status.success(), "curl accepted a forged {name}");
            assert!(
                stderr.contains("permitted subtree violation"),
                "{name}: {stderr}"
            );
        }
        // Python's ssl (OpenSSL underneath, but its own verification settings) agrees.
        let script = r#"
import socket, ssl, sys
ca, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=name):
            print("verified")
except ssl.SSLCertVerificationError as e:
    print("refused:", e.verify_message)
"#;
        let mut c = std::process::Command::new(provision::python());
        c.args(["-c", script, ca, name, &addr.port().to_string()]);
        let out = run(c).await;
        let (stdout, stderr) = text(&out);
        let want = if ok {
            "verified".to_owned()
        } else {
            "refused: permitted subtree violation".to_owned()
        };
        assert_eq!(stdout.trim(), want, "{name}: {stderr}");
    }
}

/// Sends `head` on a new connection and reads the answer until close (or 5 s).
async fn raw(addr: SocketAddr, head: &str) -> String {
    common::harness::raw(addr, head.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_to_any_other_target_is_403_and_nothing_is_tunnelled() {
    let s = setup(true).await;
    let mock = s.up.mock.addr;
    for target in [
        format!("127.0.0.1:{}", mock.port()),
        format!("localhost:{}", mock.port()),
        "example.com:443".to_owned(),
        "api.coinbase.com:80".to_owned(),
        "api.coinbase.com:8443".to_owned(),
        "evil.api.coinbase.com:443".to_owned(),
    ] {
        let answer = raw(
            s.plain,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
        assert!(
            answer.contains("x-cbgate-error: connect_refused"),
            "{answer}"
        );
        assert!(
            answer.contains("cbgate tunnels only to the Coinbase hosts"),
            "{answer}"
        );
        // Only the 403: the bytes after the CONNECT were never answered or passed on.
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    }
    assert_eq!(s.up.mock.connections(), 0, "something reached the mock");
    assert!(s.up.mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_intercept_connect_and_absolute_form_stay_refused() {
    let s = setup(false).await;
    let answer = raw(
        s.plain,
        "CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("intercept.enabled"), "{answer}");
    let target = format!("http://{}/api/v3/brokerage/time", s.plain);
    let answer = raw(
        s.plain,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.plain
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(s.up.mock.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_intercept_absolute_form_naming_cbgate_is_served_and_others_refused() {
    let s = setup(true).await;
    let target = format!("http://{}/api/v3/brokerage/time", s.plain);
    let answer = raw(
        s.plain,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.plain
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("epochSeconds"), "{answer}");
    // An absolute-form target naming a Coinbase host is not cbgate: refused, not forwarded.
    let answer = raw(
        s.plain,
        "GET http://api.coinbase.com/api/v3/brokerage/accounts HTTP/1.1\r\nHost: api.coinbase.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(
        s.up.mock
            .requests_to("GET", "/api/v3/brokerage/accounts")
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_through_the_intercepting_proxy_reaches_the_matching_route() {
    let s = setup(true).await;
    let ca = s.ca_pem.to_str().expect("path");
    let proxy = format!("http://{}", s.plain);
    for flag in ["--http2", "--http1.1"] {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            ca,
            "-x",
            &proxy,
            flag,
        ])
        .arg("https://api.coinbase.com/api/v3/brokerage/accounts");
        let out = run(c).await;
        let (stdout, stderr) = text(&out);
        assert!(stdout.contains("\"accounts\""), "{flag}: {stdout} {stderr}");
    }
    // The path must belong to the tunnel's host: /api/v3 goes to api.coinbase.com, not cdp.
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert", ca, "-x", &proxy])
        .arg("https://api.cdp.coinbase.com/api/v3/brokerage/accounts");
    let out = run(c).await;
    let (stdout, _) = text(&out);
    assert!(stdout.contains("no_route"), "{stdout}");
    let recorded = s.up.mock.requests_to("GET", "/api/v3/brokerage/accounts");
    assert_eq!(recorded.len(), 2);
    assert!(recorded
        .iter()
        .all(|r| matches!(r.auth, common::mock::AuthOutcome::Valid { .. })));
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_tls_handshakes_and_tunnels_are_closed_at_header_read_timeout() {
    let s = setup_with(true, |c| c.header_read_timeout = Duration::from_millis(500)).await;
    // A client that connects to the https listener and never says hello.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(s.https)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A CONNECT that is accepted, then never starts TLS inside.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(s.plain)
        .await
        .expect("connect");
    tcp.write_all(b"CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A tunnel whose TLS is done but whose first request never comes.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(s.plain)
        .await
        .expect("connect");
    tcp.write_all(b"CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.expect("read"), 1, "closed early");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(
        std::fs::read(&s.ca_pem).expect("ca").as_slice(),
    )
    .expect("der");
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls_pki_types::ServerName::try_from("api.coinbase.com").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS inside the tunnel verifies");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(s.up.mock.requests().is_empty());
}

/// The official SDK's `RESTClient`, unmodified: list accounts, place and cancel an order.
const SDK_SCRIPT: &str = r#"
import json, os, sys, uuid
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from coinbase.rest import RESTClient

# A throwaway key the SDK can sign with; cbgate replaces its signature with the real key's.
pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()).decode()
kwargs = {"api_key": "organizations/x/apiKeys/placeholder", "api_secret": pem}
if len(sys.argv) > 1:
    kwargs["base_url"] = sys.argv[1]
client = RESTClient(**kwargs)
accounts = client.get_accounts()
print("accounts", sorted(a.currency for a in accounts.accounts))
order = client.limit_order_gtc_buy(str(uuid.uuid4()), "BTC-USD", "0.001", "10000")
order_id = order.success_response["order_id"]
print("order", order.success)
cancelled = client.cancel_orders(order_ids=[order_id])
print("cancel", [r["success"] for r in cancelled.results])
"#;

async fn sdk(env: &[(&str, String)], args: &[String]) -> (String, String) {
    let mut c = std::process::Command::new(provision::sdk_python());
    c.args(["-c", SDK_SCRIPT]).args(args);
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "COINBASE_API_KEY",
        "COINBASE_API_SECRET",
    ] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run(c).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "SDK failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

fn assert_sdk_round_trip(s: &Setup, stdout: &str) {
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["accounts ['BTC', 'USD']", "order True", "cancel [True]"],
        "{stdout}"
    );
    let orders = s.up.mock.orders();
    assert_eq!(orders.len(), 1);
    assert!(orders[0].cancelled);
    // Every request reached the mock signed by cbgate's key (the mock verifies it), never
    // with the SDK's throwaway one.
    let reqs = s.up.mock.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert!(reqs
        .iter()
        .all(|r| matches!(r.auth, common::mock::AuthOutcome::Valid { .. })));
}

#[tokio::test(flavor = "multi_thread")]
async fn coinbase_advanced_py_rest_client_through_the_https_listener() {
    let s = setup(false).await;
    let ca = s.ca_pem.to_string_lossy().into_owned();
    let base = format!("localhost:{}", s.https.port());
    let (stdout, _) = sdk(&[("REQUESTS_CA_BUNDLE", ca)], &[base]).await;
    assert_sdk_round_trip(&s, &stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn coinbase_advanced_py_rest_client_through_https_proxy() {
    let s = setup(true).await;
    let ca = s.ca_pem.to_string_lossy().into_owned();
    let (stdout, _) = sdk(
        &[
            ("REQUESTS_CA_BUNDLE", ca),
            ("HTTPS_PROXY", format!("http://{}", s.plain)),
        ],
        &[],
    )
    .await;
    assert_sdk_round_trip(&s, &stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn cbgate_ca_path_and_rotate() {
    let state = tempfile::tempdir().expect("tempdir");
    let first = cbgate_ca(state.path(), &[]);
    assert_eq!(
        cbgate_ca(state.path(), &[]),
        first,
        "made once, then the same"
    );
    let path = cbgate_ca(state.path(), &["--path"]);
    let path = PathBuf::from(path.trim_end());
    assert_eq!(path, state.path().join("ca").join("ca.pem"));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&state.path().join("ca").join(ca::KEY_FILE)), 0o600);
    assert_eq!(mode(&state.path().join("ca")), 0o700);
    let rotated = cbgate_ca(state.path(), &["--rotate"]);
    assert!(rotated.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_ne!(rotated, first);
    assert_eq!(cbgate_ca(state.path(), &[]), rotated);
    // The help says how to trust it per process, and not in the system store.
    let out = cbgate_command()
        .args(["ca", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
        "curl --cacert",
        "never in the system store",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_hello_on_the_plain_listener_is_logged_with_a_hint() {
    let port = common::harness::free_port();
    let admin = common::harness::free_port();
    let state = tempfile::tempdir().expect("tempdir");
    let mut cmd = cbgate_command();
    cmd.env("CBGATE_STATE_DIR", state.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
    let mut p = Process::spawn(cmd);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    p.wait_until("listening", || std::net::TcpStream::connect(addr).is_ok())
        .await;
    let out = curl(&[
        "-k",
        &format!("https://127.0.0.1:{port}/api/v3/brokerage/time"),
    ])
    .await;
    assert!(!out.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p
        .output()
        .contains("TLS ClientHello arrived on a plain-HTTP listener")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no hint:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = p.output();
    assert!(log.contains("https:// listener"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_client_token_connect_needs_it_as_the_proxy_password() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        ..MockOptions::default()
    })
    .await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut cfg = up.config();
    cfg.state_dir = Some(state.path().to_owned());
    cfg.intercept.enabled = true;
    let ca = LocalCa::load_or_create(state.path(), &cfg.upstream_hosts()).expect("CA");
    let ca_pem = up.dir.path().join("ca-client.pem");
    std::fs::write(&ca_pem, ca.cert_pem()).expect("write");
    let tls = Arc::new(TlsContext::new(None, Some(Arc::new(ca))).expect("tls"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let token = "a-client-token-of-some-length";
    let _gate = Gate::start_tls(
        cfg,
        Some(&key),
        Some(zeroize::Zeroizing::new(token.to_owned())),
        vec![Listener::Tcp(listener)],
        Some(tls),
    )
    .await;
    let answer = raw(
        addr,
        "CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let url = "https://api.coinbase.com/api/v3/brokerage/accounts";
    let ca = ca_pem.to_str().expect("path");
    for (proxy, ok) in [
        (
            format!("http://cbgate:wrong-token-of-some-length@{addr}"),
            false,
        ),
        (format!("http://cbgate:{token}@{addr}"), true),
    ] {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--max-time", "20", "--cacert", ca, "-x", &proxy, url]);
        let out = run(c).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(stdout.contains("\"accounts\""), ok, "{stdout} {stderr}");
    }
    assert_eq!(
        up.mock
            .requests_to("GET", "/api/v3/brokerage/accounts")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_holds_a_connection_slot_of_its_own() {
    let s = setup_with(true, |c| c.max_connections = 1).await;
    // The CONNECT's own connection plus the tunnel would need two slots: refused, nothing sent.
    let answer = raw(
        s.plain,
        "CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert_eq!(s.up.mock.connections(), 0);
}

/// The SDK's `WSUserClient` over `wss://` to the https listener. Note: coinbase-advanced-py
/// 1.8.4 connects with a bare `ssl.SSLContext()`, which verifies no certificate at all, so
/// this shows the WebSocket relay over cbgate's TLS, not certificate checking (the tests above
/// do that); `SSL_CERT_FILE` is set as the README says, for SDK versions that do verify.
#[tokio::test(flavor = "multi_thread")]
async fn coinbase_advanced_py_ws_user_client_through_the_https_listener() {
    use common::ws_mock::{SubAuth, WsMockOptions, WsUpstream};
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe: 2,
        ..WsMockOptions::default()
    })
    .await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut cfg = up.config();
    cfg.state_dir = Some(state.path().to_owned());
    let ca = LocalCa::load_or_create(state.path(), &cfg.upstream_hosts()).expect("CA");
    let ca_pem = up.dir.path().join("ca-client.pem");
    std::fs::write(&ca_pem, ca.cert_pem()).expect("write");
    let tls = Arc::new(TlsContext::new(None, Some(Arc::new(ca))).expect("tls"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _gate = Gate::start_tls(
        cfg,
        Some(&key),
        None,
        vec![Listener::Tls(listener)],
        Some(tls),
    )
    .await;
    let script = r#"
import sys, time
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from coinbase.websocket import WSUserClient
pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()).decode()
got = []
client = WSUserClient(api_key="organizations/x/apiKeys/placeholder", api_secret=pem,
                      base_url=sys.argv[1], on_message=got.append)
client.open()
client.user(product_ids=["BTC-USD"])
deadline = time.time() + 10
while len(got) < 2 and time.time() < deadline:
    time.sleep(0.05)
client.close()
print("messages", len(got))
"#;
    let mut c = std::process::Command::new(provision::sdk_python());
    c.args([
        "-c",
        script,
        &format!("wss://localhost:{}/ws/user", addr.port()),
    ])
    .env("SSL_CERT_FILE", &ca_pem)
    .env_remove("HTTPS_PROXY")
    .env_remove("https_proxy");
    let out = run(c).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The mock's two messages after the subscribe (and whatever else it sent) arrived.
    let n: usize = stdout
        .trim()
        .strip_prefix("messages ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}\n{stderr}"));
    assert!(n >= 2, "{stdout}\n{stderr}");
    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert!(subs[0].text.contains("\"user\""), "{}", subs[0].text);
    // Signed by cbgate's key: the SDK's own jwt was replaced.
    assert!(
        matches!(subs[0].auth, SubAuth::Valid(_)),
        "{:?}",
        subs[0].auth
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_certificate_is_served_instead_of_the_local_ca() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    // An operator's own certificate for localhost, from their own CA (the mock's test PKI).
    let own = common::mock::Pki::new(&["localhost"]);
    let own_dir = tempfile::tempdir().expect("tempdir");
    let own_ca = own.write_ca(own_dir.path());
    let cert_file = own_dir.path().join("cert.pem");
    let chain: String = own
        .cert_chain_der
        .iter()
        .map(|c| common::harness::pem("CERTIFICATE", c))
        .collect();
    std::fs::write(&cert_file, chain).expect("write cert");
    let key_file = common::harness::write_private(
        own_dir.path(),
        "key.pem",
        common::harness::pem("PRIVATE KEY", &own.key_der).as_bytes(),
    );
    let tls = Arc::new(
        TlsContext::new(Some((cert_file.as_path(), key_file.as_path())), None).expect("tls"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _gate = Gate::start_tls(
        up.config(),
        Some(&key),
        None,
        vec![Listener::Tls(listener)],
        Some(tls),
    )
    .await;
    let url = format!("https://localhost:{}/api/v3/brokerage/time", addr.port());
    let out = curl(&[
        "--cacert",
        own_ca.to_str().expect("path"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(stdout, "200", "{stderr}");
    // A key file others can read is refused, as the API key file is.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = TlsContext::new(Some((cert_file.as_path(), key_file.as_path())), None)
        .expect_err("readable key refused")
        .to_string();
    assert!(e.contains("tls.key_file"), "{e}");
}

/// Intercept reaches the HMAC families too: a client that talks to api.exchange.coinbase.com
/// itself (its own paths, no /exchange/ prefix) through HTTPS_PROXY gets cbgate's Exchange
/// signature, verified by the mock, and a deny rule written for the /exchange/ route holds
/// inside the tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn intercept_signs_exchange_requests_and_route_rules_hold_in_the_tunnel() {
    const SECRET: &str = "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciB0aGUgZXhjaGFuZ2Uga2V5IQ==";
    let s = setup_mock(
        true,
        |o| {
            o.hmac = vec![common::mock::ExpectedHmac {
                family: "exchange",
                key: "ex-key-1".into(),
                secret: SECRET.into(),
                passphrase: "ex-pass".into(),
            }]
        },
        |cfg| {
            let dir = cfg.state_dir.clone().expect("state_dir");
            let file = dir.join("exchange.json");
            std::fs::write(
                &file,
                format!(r#"{{"key": "ex-key-1", "secret": "{SECRET}", "passphrase": "ex-pass"}}"#),
            )
            .expect("write");
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
            let text = format!(
                "[keys.ex]\nkind = \"exchange\"\nfile = {file:?}\n[[policy.rules]]\naction = \"deny\"\npath = \"/exchange/profiles/**\"\n"
            );
            let parsed = cbgate::config::Config::from_toml_str(&text).expect("config");
            cfg.keys = parsed.keys;
            cfg.policy.rules = parsed.policy.rules;
            for r in &mut cfg.routes {
                if r.prefix == "/exchange/" {
                    r.key = Some("ex".into());
                }
            }
        },
    )
    .await;
    let ca = s.ca_pem.to_str().expect("path");
    let proxy = format!("http://{}", s.plain);
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert", ca, "-x", &proxy])
        .arg("https://api.exchange.coinbase.com/accounts?limit=1");
    let out = run(c).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout} {stderr}");
    let seen = s.up.mock.requests();
    let last = seen.last().expect("the request reached the mock");
    assert_eq!(last.path_and_query, "/accounts?limit=1");
    assert!(
        matches!(last.auth, common::mock::AuthOutcome::Valid { .. }),
        "{:?}",
        last.auth
    );
    // The rule names /exchange/profiles/**: inside the tunnel /profiles/... is the same route.
    let before = s.up.mock.requests().len();
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert", ca, "-x", &proxy])
        .arg("https://api.exchange.coinbase.com/profiles/transfer");
    let out = run(c).await;
    let (stdout, _) = text(&out);
    assert!(stdout.contains("policy_denied"), "{stdout}");
    assert_eq!(s.up.mock.requests().len(), before, "nothing was sent");
}
