//! The examples of examples/ run here, so they cannot rot.
//!
//! Clients (Python, Node, curl) run as subprocesses against cbgate in-process and the mock
//! Coinbase over real TLS (tests/common/mock.rs, `realistic` mode), which verifies every JWT; each
//! test checks that the mock received exactly the signed requests the example means to send and
//! that the example printed the order id the mock issued. A missing interpreter or package fails
//! the test with the command that installs it (.ci/run installs them all).
//!
//! Deployment examples (compose, Kubernetes, systemd) cannot run here (no container engine, no
//! cluster, systemd is not PID 1): they are parsed, and the invariants that keep the key safe
//! are checked, with cbgate's own configuration loader where cbgate would read them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use cbgate::config::{Config, ListenAddr};
use common::harness::{raw, write_private, Gate, KeyForm, TestKey, Upstream};
use common::mock::{AuthOutcome, MockOptions};
use common::ws_mock::{SubAuth, WsMockOptions, WsUpstream};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A client token as `client_token_file` would hold it (16+ printable characters).
const CLIENT_TOKEN: &str = "example-client-token-0123456789abcdef";

fn example(rel: &str) -> PathBuf {
    Path::new(ROOT).join("examples").join(rel)
}

fn read(rel: &str) -> String {
    let path = example(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Prerequisites: fail (never skip) with the install command.
// ---------------------------------------------------------------------------

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn require(program: &str, args: &[&str], what: &str, install: &str) {
    assert!(
        succeeds(program, args),
        "{what} is missing: run `{install}` (see .ci/run: the examples must run in CI)"
    );
}

/// The provisioned venv's python (examples' packages and PyYAML installed on first use).
fn python() -> &'static str {
    common::provision::python()
        .to_str()
        .expect("UTF-8 venv path")
}

/// `node`, with examples/node's packages installed from the lockfile on first use.
fn node() -> &'static str {
    common::provision::node()
}

fn require_curl() {
    require(
        "curl",
        &["--version"],
        "curl (examples/curl.sh)",
        "apt-get update && apt-get install -y curl",
    );
}

// ---------------------------------------------------------------------------
// Running a client
// ---------------------------------------------------------------------------

/// `program args...` with nothing of the developer's cbgate or Coinbase environment, and `env`.
fn client(program: &str, args: &[&Path], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CBGATE_") || k.starts_with("COINBASE_") || k == "JQ" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs `cmd` to completion (30 s at most) off the async runtime, which keeps serving cbgate.
async fn run(cmd: Command) -> Output {
    common::harness::run_within(cmd, Duration::from_secs(30)).await
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// The trade examples: list accounts, place a limit order, cancel it
// ---------------------------------------------------------------------------

/// A mock Coinbase answering the trading endpoints, and the key it expects.
async fn trading_upstream() -> (TestKey, Upstream) {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        ..MockOptions::default()
    })
    .await;
    (key, up)
}

/// The claims of a request the mock accepted, or a panic naming why it did not.
fn claims<'a>(auth: &'a AuthOutcome, key: &TestKey) -> &'a Value {
    match auth {
        AuthOutcome::Valid { kid, claims, .. } => {
            assert_eq!(kid, &key.name, "signed with another key");
            claims
        }
        other => panic!("the mock did not accept the request's JWT: {other:?}"),
    }
}

/// The example ran through and the mock saw exactly: the accounts list, one order, its cancel,
/// each with a valid JWT bound to that method and path, and nothing of the client's token.
fn check_trade(example: &str, out: &Output, key: &TestKey, up: &Upstream) {
    let (stdout, stderr) = text(out);
    // Shown with `cargo test --test examples -- --nocapture`.
    println!("---- {example}\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{example} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let requests = up.mock.requests();
    let seen: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(
        seen,
        [
            "GET /api/v3/brokerage/accounts?limit=250",
            "POST /api/v3/brokerage/orders",
            "POST /api/v3/brokerage/orders/batch_cancel",
        ],
        "{example}: requests the mock received"
    );
    for (r, uri) in requests.iter().zip([
        "GET api.coinbase.com/api/v3/brokerage/accounts",
        "POST api.coinbase.com/api/v3/brokerage/orders",
        "POST api.coinbase.com/api/v3/brokerage/orders/batch_cancel",
    ]) {
        assert_eq!(claims(&r.auth, key)["uri"], uri, "{example}: JWT uri claim");
        assert!(
            r.headers.get("cbgate-token").is_none(),
            "{example}: the client token reached Coinbase"
        );
    }

    let order: Value = serde_json::from_slice(&requests[1].body).expect("order body is JSON");
    assert_eq!(order["product_id"], "BTC-USD", "{example}: {order}");
    assert_eq!(order["side"], "BUY", "{example}: {order}");
    assert!(
        order["client_order_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{example}: client_order_id: {order}"
    );
    assert_eq!(
        order["order_configuration"],
        json!({"limit_limit_gtc": {"base_size": "0.0001", "limit_price": "10000.00", "post_only": true}}),
        "{example}: order_configuration"
    );
    assert_eq!(
        requests[1]
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{example}: content-type of the order"
    );

    let orders = up.mock.orders();
    assert_eq!(orders.len(), 1, "{example}: orders placed");
    let id = &orders[0].order_id;
    assert_eq!(orders[0].request, order);
    assert!(
        orders[0].cancelled,
        "{example}: the order was not cancelled"
    );
    let cancel: Value = serde_json::from_slice(&requests[2].body).expect("cancel body is JSON");
    assert_eq!(
        cancel,
        json!({ "order_ids": [id] }),
        "{example}: batch_cancel body"
    );

    assert!(
        stdout.contains(&format!("placed order {id}"))
            && stdout.contains(&format!("cancelled order {id}")),
        "{example} did not print the order id {id}:\n{stdout}"
    );
    assert!(
        stdout.contains("BTC") && stdout.contains("USD"),
        "{example} did not print the accounts:\n{stdout}"
    );
}

/// Runs a trade example three ways: against a loopback cbgate (the README's quick start); with
/// `CBGATE_TOKEN_FILE` against a cbgate that requires the client token (the compose set-up);
/// and without the token against that cbgate, which must fail loudly with nothing sent upstream.
async fn trade_example(example: &str, program: &str, script: &[&Path], extra: &[(&str, &str)]) {
    // 1. Plain.
    let (key, up) = trading_upstream().await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let mut env = vec![("CBGATE_URL", gate.url.as_str())];
    env.extend_from_slice(extra);
    let out = run(client(program, script, &env)).await;
    check_trade(example, &out, &key, &up);
    gate.stop().await;

    // 2. With the client token.
    let (key, up) = trading_upstream().await;
    let gate = Gate::start_with_token(up.config(), Some(&key), CLIENT_TOKEN).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = write_private(
        dir.path(),
        "cbgate-token",
        format!("{CLIENT_TOKEN}\n").as_bytes(),
    );
    let token_path = token_file.to_str().expect("utf-8 path");
    let mut env = vec![
        ("CBGATE_URL", gate.url.as_str()),
        ("CBGATE_TOKEN_FILE", token_path),
    ];
    env.extend_from_slice(extra);
    let out = run(client(program, script, &env)).await;
    check_trade(&format!("{example} (client token)"), &out, &key, &up);

    // 3. Token required, none sent: a non-zero exit that says who refused, and nothing upstream.
    let before = up.mock.requests().len();
    let mut env = vec![("CBGATE_URL", gate.url.as_str())];
    env.extend_from_slice(extra);
    let out = run(client(program, script, &env)).await;
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "{example} without the token exited 0:\n{stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("client_unauthorized"),
        "{example} without the token did not show cbgate's refusal:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        up.mock.requests().len(),
        before,
        "a refused request reached Coinbase"
    );
    gate.stop().await;
}

#[tokio::test]
async fn python_trade_example_lists_places_and_cancels() {
    let script = example("python/trade.py");
    trade_example("examples/python/trade.py", python(), &[&script], &[]).await;
}

#[tokio::test]
async fn node_trade_example_lists_places_and_cancels() {
    let script = example("node/trade.mjs");
    trade_example("examples/node/trade.mjs", node(), &[&script], &[]).await;
}

#[tokio::test]
async fn curl_example_lists_places_and_cancels() {
    require_curl();
    let script = example("curl.sh");
    if succeeds("jq", &["--version"]) {
        trade_example("examples/curl.sh (jq)", "bash", &[&script], &[]).await;
    } else {
        eprintln!("jq is not installed: examples/curl.sh runs with raw JSON only");
    }
    // Without jq: raw JSON, and the order id found with sed.
    trade_example(
        "examples/curl.sh (no jq)",
        "bash",
        &[&script],
        &[("JQ", "")],
    )
    .await;
}

// ---------------------------------------------------------------------------
// The user-channel stream (Node; the Python one runs in tests/ws.rs)
// ---------------------------------------------------------------------------

async fn node_ws_run(token: bool) {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe: 2,
        ..WsMockOptions::default()
    })
    .await;
    let gate = if token {
        Gate::start_with_token(up.config(), Some(&key), CLIENT_TOKEN).await
    } else {
        Gate::start(up.config(), Some(&key)).await
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = write_private(dir.path(), "cbgate-token", CLIENT_TOKEN.as_bytes());
    let url = format!("ws://{}/ws/user", gate.addr);
    let mut env = vec![
        ("CBGATE_WS_URL", url.as_str()),
        ("CBGATE_WS_MAX_MESSAGES", "4"),
    ];
    if token {
        env.push((
            "CBGATE_TOKEN_FILE",
            token_file.to_str().expect("utf-8 path"),
        ));
    }
    let script = example("node/ws_user.mjs");
    let out = run(client(node(), &[&script], &env)).await;
    let (stdout, stderr) = text(&out);
    println!("---- examples/node/ws_user.mjs\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "ws_user.mjs failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 4, "CBGATE_WS_MAX_MESSAGES=4:\n{stdout}");
    assert_eq!(lines[0]["channel"], "subscriptions", "{stdout}");
    assert!(
        lines[1..].iter().any(|m| m["channel"] == "user"),
        "{stdout}"
    );

    // Both subscribes were sent before the first message was read; the mock may still be
    // recording the second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.mock.subscriptions().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let subs = up.mock.subscriptions();
    let mut channels = Vec::new();
    for s in &subs {
        match &s.auth {
            SubAuth::Valid(t) => assert_eq!(t.kid, key.name),
            other => panic!("the mock did not accept the subscribe token: {other:?}"),
        }
        let msg: Value = serde_json::from_str(&s.text).expect("subscribe is JSON");
        assert_eq!(msg["product_ids"], json!(["BTC-USD"]));
        channels.push(msg["channel"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(channels, ["user", "heartbeats"]);
    if token {
        let upgrade = &up.mock.upgrades()[0];
        assert!(
            upgrade.headers.get("cbgate-token").is_none(),
            "the client token reached Coinbase"
        );
    }
    gate.stop().await;
}

#[tokio::test]
async fn node_ws_example_streams_the_user_channel() {
    node_ws_run(false).await;
    node_ws_run(true).await;
}

// ---------------------------------------------------------------------------
// Deployment examples
// ---------------------------------------------------------------------------

/// A YAML file as JSON, through PyYAML (YAML 1.1, as Kubernetes reads it: 0400 is octal).
fn yaml(rel: &str) -> Value {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(example(rel))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The compose file's secret names a service mounts (short syntax: /run/secrets/<name>).
fn secret_names(service: &Value) -> Vec<&str> {
    strings(&service["secrets"])
}

#[tokio::test]
async fn compose_example_listens_beyond_loopback_only_with_a_client_token() {
    let compose = yaml("docker-compose.yml");
    let gate_svc = &compose["services"]["cbgate"];
    let bot = &compose["services"]["bot"];

    // cbgate reads examples/cbgate-compose.toml, via CBGATE_CONFIG (the healthcheck too).
    let config_path = gate_svc["environment"]["CBGATE_CONFIG"]
        .as_str()
        .expect("cbgate's CBGATE_CONFIG");
    assert!(
        strings(&gate_svc["volumes"])
            .contains(&format!("./cbgate-compose.toml:{config_path}:ro").as_str()),
        "the cbgate service must mount cbgate-compose.toml read-only at {config_path}"
    );
    let toml = read("cbgate-compose.toml");
    let cfg = Config::from_toml_str(&toml).expect("cbgate-compose.toml is a valid configuration");

    // The invariant: a non-loopback listener only together with unsafe_listen + a client token.
    let beyond_loopback = cfg
        .listen
        .iter()
        .any(|l| matches!(l, ListenAddr::Tcp(a) if !a.ip().is_loopback()));
    assert!(
        beyond_loopback,
        "the bot is another container: cbgate must listen beyond loopback"
    );
    assert!(cfg.unsafe_listen && cfg.client_token_file.is_some());
    // ...which cbgate itself enforces: drop either and the configuration is refused.
    for removed in ["unsafe_listen = true", "client_token_file ="] {
        let weakened: String = toml
            .lines()
            .filter(|l| !l.starts_with(removed))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Config::from_toml_str(&weakened)
            .err()
            .unwrap_or_else(|| panic!("cbgate accepted the compose listener without `{removed}`"));
        assert!(err.to_string().contains("not a loopback address"), "{err}");
    }

    // The secrets: the key only to cbgate; the token to both, at the paths each one reads.
    let secret_path = |name: &str| format!("/run/secrets/{name}");
    let token_path = cfg.client_token_file.clone().expect("client_token_file");
    let key_path = cfg.key.file.clone().expect("key.file");
    let gate_secrets = secret_names(gate_svc);
    let bot_secrets = secret_names(bot);
    let token_secret = gate_secrets
        .iter()
        .find(|n| Path::new(&secret_path(n)) == token_path)
        .expect("the client token file is a compose secret of the cbgate service");
    let key_secret = gate_secrets
        .iter()
        .find(|n| Path::new(&secret_path(n)) == key_path)
        .expect("key.file is a compose secret of the cbgate service");
    assert!(
        bot_secrets.contains(token_secret),
        "the bot needs the client token"
    );
    assert!(
        !bot_secrets.contains(key_secret),
        "the bot must not get the API key"
    );
    for name in [token_secret, key_secret] {
        assert!(
            compose["secrets"][*name]["file"].is_string(),
            "secret {name} must come from a file"
        );
    }

    // The bot reaches cbgate by its service name, with the token.
    assert_eq!(bot["environment"]["CBGATE_URL"], "http://cbgate:8750");
    assert_eq!(
        bot["environment"]["CBGATE_TOKEN_FILE"],
        secret_path(token_secret)
    );
    assert_eq!(bot["depends_on"]["cbgate"]["condition"], "service_healthy");
    let health = strings(&gate_svc["healthcheck"]["test"]);
    assert_eq!(health, ["CMD", "/usr/local/bin/cbgate", "health"]);
    assert!(
        gate_svc.get("ports").is_none(),
        "cbgate must not be published on the host"
    );

    // And that configuration behaves as the comments say: the bot's Host is allowed with the
    // token; without it 401; another Host 403 (DNS rebinding), even with the token.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut run_cfg = cfg.clone();
    let test_cfg = up.config();
    run_cfg.upstream = test_cfg.upstream;
    run_cfg.key.file = None;
    let gate = Gate::start_with_token(run_cfg, Some(&key), CLIENT_TOKEN).await;
    let ask = |host: &str, token: bool| {
        let token = if token {
            format!("cbgate-token: {CLIENT_TOKEN}\r\n")
        } else {
            String::new()
        };
        format!(
            "GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: {host}\r\n{token}Connection: close\r\n\r\n"
        )
    };
    let ok = raw(gate.addr, ask("cbgate:8750", true).as_bytes()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let no_token = raw(gate.addr, ask("cbgate:8750", false).as_bytes()).await;
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    let rebound = raw(gate.addr, ask("attacker.example:8750", true).as_bytes()).await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let requests = up.mock.requests();
    assert_eq!(
        requests.len(),
        1,
        "only the allowed request reaches Coinbase"
    );
    claims(&requests[0].auth, &key);
    gate.stop().await;
}

/// A container's command (exec probe) as strings.
fn probe_command(container: &Value, probe: &str) -> Vec<String> {
    strings(&container[probe]["exec"]["command"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn mounts(container: &Value) -> Vec<(&str, &str, bool)> {
    container["volumeMounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or_default(),
                        m["mountPath"].as_str().unwrap_or_default(),
                        m["readOnly"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kubernetes_example_keeps_the_key_0400_and_probes_with_cbgate_health() {
    let pod = yaml("kubernetes/pod.yaml");
    assert_eq!(pod["kind"], "Pod");
    let spec = &pod["spec"];
    let pod_sc = &spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert!(pod_sc["runAsUser"].as_u64().is_some_and(|u| u != 0));

    // The key's Secret volume: mode 0400 (YAML 1.1 octal: 256).
    let volumes = spec["volumes"].as_array().expect("volumes");
    let secret_volume = volumes
        .iter()
        .find(|v| v.get("secret").is_some())
        .expect("a Secret volume for the key");
    assert_eq!(
        secret_volume["secret"]["defaultMode"], 0o400,
        "the key Secret volume needs defaultMode: 0400"
    );
    let secret_name = secret_volume["name"].as_str().expect("volume name");

    let containers = spec["containers"].as_array().expect("containers");
    let inits = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let cbgate = containers
        .iter()
        .find(|c| c["name"] == "cbgate")
        .expect("a container named cbgate");
    let others: Vec<&Value> = containers
        .iter()
        .filter(|c| c["name"] != "cbgate")
        .collect();
    assert!(!others.is_empty(), "a bot container next to cbgate");

    // Every container: no privilege escalation, read-only root, all capabilities dropped, none
    // added (IPC_LOCK would not reach a non-root process; the manifest explains it).
    for c in containers.iter().chain(inits.iter()) {
        let sc = &c["securityContext"];
        let name = c["name"].as_str().unwrap_or_default();
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert!(
            strings(&sc["capabilities"]["drop"]).contains(&"ALL"),
            "{name}"
        );
        assert!(
            sc["capabilities"].get("add").is_none(),
            "{name} adds capabilities"
        );
        assert!(
            sc.get("runAsUser").is_none_or(|u| u != 0),
            "{name} runs as root"
        );
    }

    // Probes: `cbgate health --live` / `cbgate health`, as exec (no shell or curl in the image).
    assert_eq!(
        probe_command(cbgate, "livenessProbe"),
        ["/usr/local/bin/cbgate", "health", "--live"]
    );
    assert_eq!(
        probe_command(cbgate, "readinessProbe"),
        ["/usr/local/bin/cbgate", "health"]
    );

    // The Secret is mounted by the init container only; the key cbgate reads is the 0400 copy
    // on a volume that only the init container and cbgate (read-only) mount.
    for c in containers {
        assert!(
            mounts(c).iter().all(|(n, _, _)| *n != secret_name),
            "{} mounts the Secret directly",
            c["name"]
        );
    }
    let args = strings(&cbgate["args"]);
    let key_file = args
        .iter()
        .position(|a| *a == "--key-file")
        .and_then(|i| args.get(i + 1))
        .expect("cbgate args: --key-file PATH");
    let (copy_volume, _, read_only) = mounts(cbgate)
        .into_iter()
        .find(|(_, path, _)| key_file.starts_with(&format!("{path}/")))
        .expect("the key file is on a volume mounted into cbgate");
    assert!(read_only, "cbgate mounts its key volume read-only");
    for c in &others {
        assert!(
            mounts(c).iter().all(|(n, _, _)| *n != copy_volume),
            "the bot can reach the key copy"
        );
    }
    let copier = inits
        .iter()
        .find(|c| mounts(c).iter().any(|(n, _, _)| *n == secret_name))
        .expect("an init container copies the key");
    let script = strings(&copier["command"]).join(" ");
    let file_name = Path::new(key_file)
        .file_name()
        .and_then(|f| f.to_str())
        .expect("key file name");
    assert!(
        script.contains(&format!("chmod 0400 /key/{file_name}")),
        "the copy must be made 0400: {script}"
    );
    let copy = volumes
        .iter()
        .find(|v| v["name"] == copy_volume)
        .expect("the copy volume");
    assert_eq!(
        copy["emptyDir"]["medium"], "Memory",
        "the key copy stays off disk"
    );

    // The sidecar shares the Pod's loopback: cbgate keeps its loopback default.
    assert!(!args.contains(&"--listen"));
    for c in &others {
        let env = c["env"].as_array().cloned().unwrap_or_default();
        assert!(env
            .iter()
            .any(|e| e["name"] == "CBGATE_URL" && e["value"] == "http://127.0.0.1:8750"));
    }
}

/// `Key=value` lines of a unit file (comments and sections left out), in order.
fn unit_directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[tokio::test]
async fn systemd_example_is_hardened_and_its_command_line_starts() {
    let unit = read("systemd/cbgate.service");
    let directives = unit_directives(&unit);
    let has = |k: &str, v: &str| directives.iter().any(|(dk, dv)| dk == k && dv == v);
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("CapabilityBoundingSet", ""),
        (
            "LoadCredential",
            "cdp_api_key.json:/etc/cbgate/cdp_api_key.json",
        ),
        (
            "ExecStart",
            "/usr/bin/cbgate serve --config /etc/cbgate/cbgate.toml --key-file %d/cdp_api_key.json",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert!(has(k, v), "examples/systemd/cbgate.service lacks {k}={v}");
    }

    // The command line systemd runs, with the credential as it appears to the service: mode
    // 0440 (the ACL mask newer systemd shows) in the unit's private $CREDENTIALS_DIRECTORY.
    // cbgate accepts it there; the configuration is the one the unit installs.
    let creds = tempfile::tempdir().expect("tempdir");
    let key = TestKey::generate(KeyForm::P256Sec1);
    let key_file = key.write_json(creds.path());
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    }
    let exec = directives
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .map(|(_, v)| v.clone())
        .expect("ExecStart");
    let argv: Vec<String> = exec
        .replace("%d", creds.path().to_str().expect("utf-8"))
        .replace(
            "/etc/cbgate/cbgate.toml",
            &format!("{ROOT}/config/cbgate.toml"),
        )
        .split_whitespace()
        .skip(1)
        .map(|a| {
            if a == "serve" {
                "check".to_owned()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut cmd = common::harness::cbgate_command();
    cmd.args(&argv);
    cmd.env("CREDENTIALS_DIRECTORY", creds.path());
    for (k, v) in &directives {
        if k == "Environment" {
            let (name, value) = v.split_once('=').expect("Environment=NAME=value");
            cmd.env(name, value);
        }
    }
    let out = cmd.output().expect("run cbgate check");
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "cbgate {argv:?} with the unit's environment failed:\n{stdout}{stderr}"
    );
    assert!(stdout.contains(&format!("key: {}", key.name)), "{stdout}");

    // systemd's own checker, where the machine has it (no systemd needs to be running).
    if succeeds("systemd-analyze", &["--version"]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("cbgate.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/bin/cbgate", env!("CARGO_BIN_EXE_cbgate")),
        )
        .expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze");
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "systemd-analyze verify:\n{stdout}{stderr}"
        );
    } else {
        eprintln!(
            "systemd-analyze is not installed: the unit was checked by the directives above only"
        );
    }
}

// ---------------------------------------------------------------------------
// The README points at every example
// ---------------------------------------------------------------------------

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read examples/") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Installed packages, caches, the compose example's local secrets, and dotfiles.
        if name.starts_with('.') || ["node_modules", "__pycache__", "secrets"].contains(&name) {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn readme_references_every_example_file() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let mut files = Vec::new();
    files_under(&Path::new(ROOT).join("examples"), &mut files);
    assert!(files.len() >= 12, "examples/ looks incomplete: {files:?}");
    let missing: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(ROOT)
                .expect("under the repository")
                .to_string_lossy()
                .trim_start_matches('/')
                .to_owned()
        })
        .filter(|rel| !readme.contains(rel.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not mention: {missing:?}"
    );
}

// ---------------------------------------------------------------------------
// The README's own snippets
// ---------------------------------------------------------------------------

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md")
}

/// The text of the README section that starts with `heading` (up to the next `## `).
fn section<'a>(readme: &'a str, heading: &str) -> &'a str {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {heading:?}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 4);
    &rest[..end]
}

/// The fenced code blocks of language `lang` in `text`.
fn code_blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let end = body.find("\n```").expect("closed code fence");
        blocks.push(body[..end + 1].to_owned());
        rest = &body[end + 4..];
    }
    blocks
}

/// Writes `code` as `file` in a fresh directory that can import the examples' Node packages.
fn snippet_file(code: &str, file: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(
        example("node/node_modules"),
        dir.path().join("node_modules"),
    )
    .expect("symlink node_modules");
    let path = dir.path().join(file);
    std::fs::write(&path, code).expect("write snippet");
    (dir, path)
}

/// Runs `cmd` until it has printed `n` lines (then stops it) or 20 s pass; returns the lines.
async fn first_lines(mut cmd: Command, n: usize) -> Vec<String> {
    use std::io::BufRead as _;
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        while lines.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        assert!(
            lines.len() == n,
            "{what} printed {} of {n} lines: {lines:?}\nstderr:\n{}",
            lines.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn readme_websocket_snippets_stream_the_user_channel() {
    let readme = readme();
    let ws_section = section(&readme, "## WebSocket");
    for (lang, program, file) in [
        ("python", python(), "snippet.py"),
        ("js", node(), "snippet.mjs"),
    ] {
        let blocks = code_blocks(ws_section, lang);
        assert_eq!(
            blocks.len(),
            1,
            "one {lang} client in the WebSocket section"
        );
        assert!(blocks[0].lines().count() <= 12, "a short {lang} client");
        let key = TestKey::generate(KeyForm::P256Sec1);
        let up = WsUpstream::start(WsMockOptions {
            key: Some(key.expected.clone()),
            on_subscribe: 1,
            ..WsMockOptions::default()
        })
        .await;
        let gate = Gate::start(up.config(), Some(&key)).await;
        let default_url = "ws://127.0.0.1:8750/ws/user";
        assert!(
            blocks[0].contains(default_url),
            "{lang} snippet: {default_url}"
        );
        let code = blocks[0].replace(default_url, &format!("ws://{}/ws/user", gate.addr));
        let (_dir, path) = snippet_file(&code, file);
        // Two subscribes, each: an ack and one update.
        let lines = first_lines(client(program, &[&path], &[]), 4).await;
        let channels: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON")["channel"].clone())
            .collect();
        assert_eq!(channels[0], "subscriptions", "{lang}: {lines:?}");
        assert!(channels.contains(&json!("user")), "{lang}: {lines:?}");
        for s in up.mock.subscriptions() {
            assert!(
                matches!(s.auth, SubAuth::Valid(_)),
                "{lang}: subscribe not signed: {:?}",
                s.auth
            );
        }
        gate.stop().await;
    }
}

#[tokio::test]
async fn readme_rest_snippets_reach_the_mock_signed() {
    let readme = readme();
    let point = section(&readme, "## Point your client at cbgate");
    let python: Vec<String> = code_blocks(point, "python")
        .into_iter()
        .filter(|b| b.contains("http://127.0.0.1:8750"))
        .collect();
    let node = code_blocks(point, "js");
    assert_eq!(python.len(), 1, "one Python 'after' snippet");
    assert_eq!(node.len(), 1, "one Node snippet");
    for (program, file, code, expect) in [
        (self::python(), "after.py", &python[0], "['BTC', 'USD']"),
        (self::node(), "after.mjs", &node[0], "200"),
    ] {
        let (key, up) = trading_upstream().await;
        let gate = Gate::start(up.config(), Some(&key)).await;
        let code = code.replace("http://127.0.0.1:8750", &gate.url);
        let (_dir, path) = snippet_file(&code, file);
        let out = run(client(program, &[&path], &[])).await;
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success() && stdout.contains(expect),
            "README {program} snippet:\n{stdout}{stderr}"
        );
        let requests = up.mock.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].path_and_query,
            "/api/v3/brokerage/accounts?limit=10"
        );
        claims(&requests[0].auth, &key);
        gate.stop().await;
    }
}

// ---------------------------------------------------------------------------
// examples/three-programs: one cbgate, three keys, three identities
// ---------------------------------------------------------------------------

/// The kid of the JWT the mock verified, or a panic naming why it did not.
fn signer(r: &common::mock::Recorded) -> String {
    match &r.auth {
        AuthOutcome::Valid { kid, .. } => kid.clone(),
        other => panic!("{} {}: not verified: {other:?}", r.method, r.path_and_query),
    }
}

/// examples/three-programs/cbgate.toml as shipped, with only what cannot be on this machine
/// replaced: the key and token files (written to `dir`) and the upstream (the mock). Each
/// program runs unmodified with its own token file; the mock checks which key signed each
/// request; the refusals shown never reach it.
#[tokio::test]
async fn three_programs_example_each_program_gets_its_own_key_and_ceiling() {
    require_curl();
    let toml = read("three-programs/cbgate.toml");
    let mut cfg = Config::from_toml_str(&toml).expect("the example is a valid configuration");
    let names = ["dashboard", "bot", "ops"];
    assert_eq!(
        cfg.keys.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bot", "dashboard", "ops"]
    );
    assert!(cfg.clients.require, "the example requires known identities");
    assert!(cfg.guard.is_active(), "the bot's orders are guarded");
    for (name, permission) in names.iter().zip(["view", "trade", "transfer"]) {
        let c = &cfg.clients.named[*name];
        assert_eq!(c.permission.map(|p| p.as_str()), Some(permission), "{name}");
        assert_eq!(c.keys.as_deref(), Some(&[name.to_string()][..]), "{name}");
        assert_eq!(c.default_key.as_deref(), Some(*name), "{name}");
    }

    let keys = [
        TestKey::generate(KeyForm::P256Sec1),
        TestKey::generate(KeyForm::Ed25519B64_64),
        TestKey::generate(KeyForm::P256Pkcs8),
    ];
    let up = Upstream::start_with(MockOptions {
        key: Some(keys[0].expected.clone()),
        also_accept: vec![keys[1].expected.clone(), keys[2].expected.clone()],
        realistic: true,
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tokens = Vec::new();
    for (name, key) in names.iter().zip(&keys) {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).expect("mkdir");
        cfg.keys.get_mut(*name).expect("key").file = Some(key.write_json(&sub));
        let token = write_private(
            dir.path(),
            &format!("{name}.token"),
            format!("{name}-example-token-{}\n", uuid_like(name)).as_bytes(),
        );
        cfg.clients.named.get_mut(*name).expect("client").token_file = Some(token.clone());
        tokens.push(token);
    }
    let test_cfg = up.config();
    cfg.upstream.ca_file = test_cfg.upstream.ca_file;
    cfg.upstream.resolve = test_cfg.upstream.resolve;
    let gate = Gate::start(cfg, None).await;

    // Runs one program; returns its output and what the mock received meanwhile.
    let run_program =
        |program: &'static str, script: &'static str, token: PathBuf, args: Vec<String>| {
            let url = gate.url.clone();
            let up = &up;
            async move {
                let before = up.mock.requests().len();
                let path = example(&format!("three-programs/{script}"));
                let mut cmd = client(
                    program,
                    &[&path],
                    &[
                        ("CBGATE_URL", url.as_str()),
                        ("CBGATE_TOKEN_FILE", token.to_str().expect("utf-8 path")),
                    ],
                );
                cmd.args(args);
                let out = run(cmd).await;
                let (stdout, stderr) = text(&out);
                println!("---- {script}\n{stdout}{stderr}");
                assert!(
                    out.status.success(),
                    "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    out.status
                );
                (stdout, up.mock.requests()[before..].to_vec())
            }
        };
    let seen = |recs: &[common::mock::Recorded]| -> Vec<(String, String)> {
        recs.iter()
            .map(|r| (format!("{} {}", r.method, r.path_and_query), signer(r)))
            .collect()
    };

    // The dashboard: reads with its key; its order is refused by its view ceiling.
    let (stdout, recs) = run_program(python(), "dashboard.py", tokens[0].clone(), vec![]).await;
    let d = keys[0].name.clone();
    assert_eq!(
        seen(&recs),
        [
            (
                "GET /api/v3/brokerage/accounts?limit=250".to_owned(),
                d.clone()
            ),
            ("GET /api/v3/brokerage/portfolios".to_owned(), d),
        ]
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("account") && l.contains("BTC"))
            && stdout.contains("portfolio 8b5a5a1c-0000-4000-8000-000000000002 CONSUMER"),
        "the dashboard printed balances and portfolios:\n{stdout}"
    );
    assert!(
        stdout.contains("refused as it should be: HTTP 403 policy_denied")
            && stdout.contains("\"dashboard\""),
        "{stdout}"
    );

    // The bot: places and cancels with its key; the ops key is refused.
    let (stdout, recs) = run_program(python(), "bot.py", tokens[1].clone(), vec![]).await;
    let b = keys[1].name.clone();
    assert_eq!(
        seen(&recs),
        [
            ("POST /api/v3/brokerage/orders".to_owned(), b.clone()),
            ("POST /api/v3/brokerage/orders/batch_cancel".to_owned(), b),
        ]
    );
    let orders = up.mock.orders();
    assert_eq!(orders.len(), 1);
    assert!(orders[0].cancelled);
    assert!(
        stdout.contains(&format!("placed order {}", orders[0].order_id)),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused as it should be: HTTP 403 key_not_allowed")
            && stdout.contains("credential ops")
            && stdout.contains("\"bot\""),
        "{stdout}"
    );

    // The ops script: moves funds with its key; without a token it is refused.
    let [source, target] = common::mock::PORTFOLIOS.map(|(uuid, _, _)| uuid.to_owned());
    let (stdout, recs) = run_program(
        "bash",
        "ops.sh",
        tokens[2].clone(),
        vec![source.clone(), target.clone(), "10".into(), "USD".into()],
    )
    .await;
    let o = keys[2].name.clone();
    assert_eq!(
        seen(&recs),
        [
            ("GET /api/v3/brokerage/portfolios".to_owned(), o.clone()),
            ("POST /api/v3/brokerage/portfolios/move_funds".to_owned(), o),
        ]
    );
    let moved: Value = serde_json::from_slice(&recs[1].body).expect("move_funds body");
    assert_eq!(
        moved,
        json!({"funds": {"value": "10", "currency": "USD"},
               "source_portfolio_uuid": source, "target_portfolio_uuid": target})
    );
    assert!(
        stdout.contains("refused as it should be: HTTP 401 without a token")
            && stdout.contains(&format!("moved 10 USD to {target}")),
        "{stdout}"
    );
    // No token reached Coinbase.
    for r in up.mock.requests() {
        assert!(r.headers.get("cbgate-token").is_none() && r.headers.get("cbgate-key").is_none());
    }
    gate.stop().await;
}

/// A token suffix that differs per program (token files need 16+ characters, all distinct).
fn uuid_like(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}
