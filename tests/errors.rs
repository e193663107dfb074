//! Error messages as people read them: every input cbgate reads, fed real key material, never
//! echoes it; typos name the variable or key and the right spelling; an unusable
//! `upstream.ca_file` fails `check` as it fails `serve`; TLS reasons are sentences.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;

use common::harness::{self, assert_no_secret, write_private, Gate, KeyForm, TestKey};

/// One way of handing cbgate some text.
struct Case {
    what: String,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

/// Every environment variable that is a configuration key, read off the shipped
/// `config/cbgate.toml` (which lists every key, some commented out), plus the array tables.
fn config_keys() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cbgate.toml"))
        .expect("config/cbgate.toml");
    let mut keys: Vec<Vec<String>> = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            keys.push(name.split('.').map(str::to_owned).collect());
            table = vec!["(array)".into()];
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.split('.').map(str::to_owned).collect();
            continue;
        }
        let l = l.strip_prefix('#').map_or(l, str::trim);
        let Some((k, _)) = l.split_once(" = ") else {
            continue;
        };
        let k = k.trim();
        if table.first().is_some_and(|t| t == "(array)")
            || k.is_empty()
            || !k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            continue;
        }
        let mut path = table.clone();
        path.push(k.to_owned());
        if !keys.contains(&path) {
            keys.push(path);
        }
    }
    assert!(keys.len() >= 20, "too few keys found: {keys:?}");
    for must in [["key", "file"], ["upstream", "ca_file"]] {
        assert!(keys.iter().any(|k| k == &must), "{must:?} not found");
    }
    assert!(keys.iter().any(|k| k == &["client_token_file"]));
    keys
}

fn env_name(path: &[String]) -> String {
    format!("CBGATE_{}", path.join("__").to_ascii_uppercase())
}

/// A TOML basic string holding `s` (JSON string escapes are valid TOML).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

/// The cases for one secret; files go in `dir`.
fn cases(secret: &str, dir: &Path) -> Vec<Case> {
    let mut v = Vec::new();
    let file = |name: &str, body: String| -> PathBuf { write_private(dir, name, body.as_bytes()) };
    let with_config = |what: &str, path: PathBuf| Case {
        what: format!("--config {what}"),
        args: vec!["--config".into(), path.into()],
        env: vec![],
    };
    // The configuration file holds the secret: as itself, as a key JSON, as a .env file.
    v.push(with_config("raw secret", file("raw", secret.to_owned())));
    v.push(with_config(
        "key JSON",
        file(
            "key.json",
            serde_json::json!({"name": "organizations/o/apiKeys/k", "privateKey": secret})
                .to_string(),
        ),
    ));
    v.push(with_config(
        ".env",
        file(
            "dot.env",
            format!(
                "COINBASE_API_KEY=organizations/o/apiKeys/k\nCOINBASE_API_SECRET=\"{}\"\n",
                secret.replace('\n', "\\n")
            ),
        ),
    ));
    v.push(with_config(
        ".env, raw lines",
        file("raw.env", format!("COINBASE_API_SECRET={secret}\n")),
    ));
    // ... as a TOML value of every key, under a misspelt key, and as a key name.
    for (i, key) in config_keys().iter().enumerate() {
        let (last, tables) = key.split_last().expect("non-empty key");
        let head = if tables.is_empty() {
            String::new()
        } else {
            format!("[{}]\n", tables.join("."))
        };
        let body = format!("{head}{last} = {}\n", toml_string(secret));
        v.push(with_config(
            &format!("TOML {}", key.join(".")),
            file(&format!("k{i}.toml"), body),
        ));
    }
    v.push(with_config(
        "TOML list",
        file("list.toml", format!("listen = [{}]\n", toml_string(secret))),
    ));
    v.push(with_config(
        "TOML typo",
        file("typo.toml", format!("lisen = {}\n", toml_string(secret))),
    ));
    v.push(with_config(
        "TOML key name",
        file("name.toml", format!("{} = 1\n", toml_string(secret))),
    ));
    v.push(with_config(
        "TOML broken",
        file(
            "broken.toml",
            format!("listen = [{}\n", toml_string(secret)),
        ),
    ));
    // Every variable cbgate reads.
    let mut vars: Vec<String> = config_keys().iter().map(|k| env_name(k)).collect();
    vars.extend(
        [
            "CBGATE_CONFIG",
            "CBGATE_KEY_FILE",
            "CBGATE_UPSTREAM_CA_FILE",
            "COINBASE_API_KEY",
            "COINBASE_API_SECRET",
        ]
        .map(String::from),
    );
    for var in vars {
        v.push(Case {
            what: format!("env {var}"),
            args: vec![],
            env: vec![(var, secret.to_owned())],
        });
    }
    v.push(Case {
        what: "env COINBASE_API_KEY + COINBASE_API_SECRET both the secret".into(),
        args: vec![],
        env: vec![
            ("COINBASE_API_KEY".into(), secret.to_owned()),
            ("COINBASE_API_SECRET".into(), secret.to_owned()),
        ],
    });
    // Every flag, as two arguments and as --flag=value.
    for flag in ["--config", "--key-file", "--listen"] {
        v.push(Case {
            what: format!("{flag} SECRET"),
            args: vec![flag.into(), secret.into()],
            env: vec![],
        });
        v.push(Case {
            what: format!("{flag}=SECRET"),
            args: vec![format!("{flag}={secret}").into()],
            env: vec![],
        });
    }
    v
}

/// Runs cbgate, killing it if it has not exited within 10 s (it should fail at once).
fn run_bounded(args: &[OsString], env: &[(String, String)]) -> (Output, bool) {
    let mut cmd = harness::cbgate_command();
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cbgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut timed_out = false;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (child.wait_with_output().expect("output"), timed_out)
}

/// Feeds each secret through every case to `subcommand` (4 at a time) and checks that no
/// 16-character window of it comes back, that cbgate fails with a message, and never panics.
fn no_input_echoes_the_secret(subcommand: &[&str]) {
    let secrets = [
        TestKey::generate(KeyForm::P256Sec1).secret,
        TestKey::generate(KeyForm::Ed25519B64_64).secret,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut all: Vec<Case> = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).expect("mkdir");
        for c in cases(secret, &sub) {
            let mut args: Vec<OsString> = subcommand.iter().map(OsString::from).collect();
            args.extend(c.args);
            all.push(Case {
                what: format!("{} [{i}]", c.what),
                args,
                env: c.env,
            });
        }
    }
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(Case { what, args, env }) = all.get(n) else {
                    break;
                };
                let (out, timed_out) = run_bounded(args, env);
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let secret = &secrets[usize::from(what.ends_with("[1]"))];
                let leak = harness::find_secret(&text, secret);
                let mut f = failures.lock().expect("lock");
                if let Some(window) = leak {
                    // The window is printed: it is a throwaway test key.
                    f.push(format!("{what}: output quotes the secret ({window:?})"));
                }
                if timed_out {
                    f.push(format!("{what}: cbgate accepted it and kept running"));
                }
                if text.contains("panicked") {
                    f.push(format!("{what}: panic"));
                }
                if out.status.success() || out.stderr.is_empty() {
                    f.push(format!(
                        "{what}: not refused with a message ({:?})",
                        out.status
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().expect("lock");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn check_never_echoes_key_material_from_any_input() {
    no_input_echoes_the_secret(&["check"]);
}

#[test]
fn token_never_echoes_key_material_from_any_input() {
    no_input_echoes_the_secret(&["token", "GET", "/api/v3/brokerage/accounts"]);
}

#[test]
fn serve_never_echoes_key_material_from_any_input() {
    no_input_echoes_the_secret(&["serve"]);
}

#[test]
fn health_never_echoes_key_material_from_any_input() {
    no_input_echoes_the_secret(&["health"]);
}

fn check(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = harness::cbgate_command()
        .arg("check")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run cbgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One line, a sentence: no Rust Debug text.
fn assert_sentence(msg: &str) {
    assert_eq!(msg.trim_end().lines().count(), 1, "not one line: {msg:?}");
    for debug in ["Err(", "Error(", "Some(", "Other(", "Kind(", "Os {", "::"] {
        assert!(!msg.contains(debug), "Debug text {debug:?} in {msg:?}");
    }
}

#[test]
fn environment_typos_name_the_variable_and_the_right_spelling() {
    for (var, want) in [
        ("CBGATE_KEY_FILE", "CBGATE_KEY__FILE"),
        ("CBGATE_UPSTREAM_CA_FILE", "CBGATE_UPSTREAM__CA_FILE"),
        ("CBGATE_UPSTREAM__CA_FIL", "CBGATE_UPSTREAM__CA_FILE"),
        ("CBGATE_UPSTRAEM__CA_FILE", "CBGATE_UPSTREAM__CA_FILE"),
        ("CBGATE_LISEN", "CBGATE_LISTEN"),
        ("CBGATE_LOG__LEVLE", "CBGATE_LOG__LEVEL"),
    ] {
        let (code, msg) = check(&[], &[(var, "/tmp/x")]);
        assert_eq!(code, Some(2), "{var}: {msg}");
        assert!(
            msg.contains(&format!("environment variable {var} ")),
            "{var}: {msg}"
        );
        assert!(
            msg.contains(&format!("did you mean {want}?")),
            "{var}: {msg}"
        );
        assert!(!msg.contains("unknown field"), "{var}: {msg}");
        assert_sentence(&msg);
    }
    let (code, msg) = check(&[], &[("CBGATE_POLICY__PERMISSION", "trading")]);
    assert_eq!(code, Some(2));
    assert!(
        msg.contains(
            "environment variable CBGATE_POLICY__PERMISSION: expected one of view, trade, transfer"
        ),
        "{msg}"
    );
    let (code, msg) = check(&[], &[("CBGATE_MAX_BODY_BYTES", "lots")]);
    assert_eq!(code, Some(2));
    assert!(
        msg.contains("CBGATE_MAX_BODY_BYTES: the value is not a whole number"),
        "{msg}"
    );
}

#[test]
fn file_typos_and_bad_values_suggest_the_key_without_rust_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (body, want) in [
        (
            "lisen = [\"127.0.0.1:1\"]\n",
            "unknown key lisen; did you mean listen?",
        ),
        (
            "[upstream]\nca_fil = \"x\"\n",
            "unknown key upstream.ca_fil; did you mean upstream.ca_file?",
        ),
        (
            "key_file = \"x\"\n",
            "unknown key key_file; did you mean file in the [key] table?",
        ),
        (
            "[policy]\npermission = \"trading\"\n",
            "key policy.permission: expected one of view, trade, transfer",
        ),
        (
            "[log]\nformat = \"yaml\"\n",
            "key log.format: expected one of text, json",
        ),
        (
            "max_body_bytes = \"lots\"\n",
            "key max_body_bytes: expected a whole number, found text",
        ),
        (
            "[upstream]\nconnect_timeout = \"soon\"\n",
            "key upstream.connect_timeout: the value is not a duration such as 5s or 250ms",
        ),
        (
            "listen = [\"127.0.0.1:1\"\n",
            "is not valid TOML: line 1, column 24: unclosed array",
        ),
    ] {
        let path = dir.path().join("cbgate.toml");
        std::fs::write(&path, body).expect("write");
        let (code, msg) = check(&["--config", path.to_str().expect("utf8")], &[]);
        assert_eq!(code, Some(2), "{body}: {msg}");
        assert!(msg.contains(want), "{body}: want {want:?} in {msg:?}");
        for rust in ["enum", "Permission", "variant", "u64", "unknown field"] {
            assert!(!msg.contains(rust), "{body}: Rust words in {msg:?}");
        }
        assert_sentence(&msg);
    }
}

/// `check` builds the upstream client as `serve` does, so an unusable CA file fails it with
/// exit 2 and a sentence, not "config: ok".
#[test]
fn check_refuses_an_unusable_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = TestKey::generate(KeyForm::P256Sec1);
    let not_a_cert = write_private(dir.path(), "key.pem", key.secret.as_bytes());
    let missing = dir.path().join("no-such-ca.pem");
    for (ca, want) in [
        (&missing, "does not exist"),
        (&not_a_cert, "holds no PEM certificate"),
    ] {
        let (code, msg) = check(
            &[],
            &[("CBGATE_UPSTREAM__CA_FILE", ca.to_str().expect("utf8"))],
        );
        assert_eq!(code, Some(2), "{msg}");
        assert!(
            msg.contains("upstream.ca_file") && msg.contains(want),
            "{msg}"
        );
        assert_sentence(&msg);
        assert_no_secret(&msg, &key.secret, "check's message");
    }
}

/// A server presenting its CA certificate as its own: rustls reports
/// `Other(OtherError(CaUsedAsEndEntity))`; the client gets a sentence.
#[tokio::test]
async fn a_ca_certificate_served_as_the_server_certificate_is_a_sentence() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut params =
        rcgen::CertificateParams::new(vec!["api.coinbase.com".to_owned()]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let kp = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&kp).expect("self-signed CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, cert.pem()).expect("write CA");
    let server_cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der())),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let mut cfg = cbgate::config::Config::default();
    cfg.upstream.ca_file = Some(ca_file);
    cfg.upstream.resolve.insert("api.coinbase.com".into(), addr);
    let gate = Gate::start(cfg, None).await;
    let r = harness::get(&gate, "/api/v3/brokerage/products").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("upstream_tls"));
    let msg = r.json()["message"].as_str().expect("message").to_owned();
    assert!(
        msg.contains("the server presented a CA certificate as its own"),
        "{msg}"
    );
    assert_sentence(&msg);
    gate.stop().await;
    server.abort();
}

/// The mode hint for `client_token_file` is one that works for it: chmod, not
/// key.allow_insecure_permissions (which only covers the key file).
#[test]
fn client_token_file_mode_message_gives_a_fix_that_works() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-client-token-of-enough-length").expect("write");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let token = token.to_str().expect("utf8");
    let (code, msg) = check(&[], &[("CBGATE_CLIENT_TOKEN_FILE", token)]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("environment variable CBGATE_CLIENT_TOKEN_FILE: file ")
            && msg.contains("has mode 0644"),
        "{msg}"
    );
    assert!(msg.contains(&format!("chmod 600 {token}")), "{msg}");
    assert!(!msg.contains("allow_insecure_permissions"), "{msg}");
    // Even with the key setting on, the token file is still refused: the hint would not work.
    let (code, _) = check(
        &[],
        &[
            ("CBGATE_CLIENT_TOKEN_FILE", token),
            ("CBGATE_KEY__ALLOW_INSECURE_PERMISSIONS", "true"),
        ],
    );
    assert_eq!(code, Some(2));
    assert_sentence(&msg);
}

/// A missing path names the flag, variable or key that gave it.
#[test]
fn a_missing_path_names_the_setting_that_gave_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.json");
    let missing = missing.to_str().expect("utf8");
    let cfg = dir.path().join("cbgate.toml");
    std::fs::write(&cfg, format!("[key]\nfile = {}\n", toml_string(missing))).expect("write");
    for (args, env, want) in [
        (
            vec!["--key-file", missing],
            vec![],
            "cbgate: --key-file: key file",
        ),
        (
            vec![],
            vec![("CBGATE_KEY__FILE", missing)],
            "cbgate: environment variable CBGATE_KEY__FILE: key file",
        ),
        (
            vec!["--config", cfg.to_str().expect("utf8")],
            vec![],
            "cbgate: configuration key key.file: key file",
        ),
        (
            vec![],
            vec![("CBGATE_CLIENT_TOKEN_FILE", missing)],
            "cbgate: environment variable CBGATE_CLIENT_TOKEN_FILE: file",
        ),
    ] {
        let (code, msg) = check(&args, &env);
        assert_eq!(code, Some(2), "{msg}");
        assert!(
            msg.starts_with(want) && msg.contains("does not exist"),
            "want {want:?}: {msg}"
        );
        assert!(msg.contains(missing), "a short path is shown: {msg}");
        assert_sentence(&msg);
    }
}
