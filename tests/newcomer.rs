//! What a newcomer meets first: the README's claims about behaviour, the flags each command
//! lists, moving a second instance off busy ports, and start-up that says when Coinbase cannot
//! be reached. Each test runs the binary as a user would.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::harness::{cbgate_command, free_port, http_get, KeyForm, Process, TestKey, Upstream};

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run cbgate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The README says the example clients' variables may stay exported where cbgate starts.
#[test]
fn client_variables_exported_where_cbgate_starts_are_ignored() {
    let readme = readme();
    assert!(
        readme.contains("cbgate ignores these four variables"),
        "the README's sentence about the client variables changed: update this test with it"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "x").expect("write");
    let out = run(cbgate_command()
        .arg("check")
        .env("CBGATE_URL", "http://127.0.0.1:8750")
        .env("CBGATE_WS_URL", "ws://127.0.0.1:8750/ws/user")
        .env("CBGATE_TOKEN_FILE", &token)
        .env("CBGATE_WS_MAX_MESSAGES", "4"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("config: ok"), "{}", text(&out));
}

#[test]
fn each_command_lists_only_the_flags_it_reads() {
    let help = |args: &[&str]| text(&run(cbgate_command().args(args)));
    let health = help(&["health", "--help"]);
    assert!(
        !health.contains("--key-file"),
        "health reads no key:\n{health}"
    );
    assert!(health.contains("--admin-listen"), "{health}");
    let completions = help(&["completions", "--help"]);
    assert!(
        !completions.contains("--key-file") && !completions.contains("--config"),
        "completions reads no configuration:\n{completions}"
    );
    let token = help(&["token", "--help"]);
    assert!(
        token.contains("cbgate token [OPTIONS] <METHOD> <PATH_OR_URL>"),
        "token's usage shows its required arguments as required:\n{token}"
    );
    let serve = help(&["serve", "--help"]);
    assert!(
        serve.contains("--admin-listen") && serve.contains("--key-file"),
        "{serve}"
    );
}

/// The completion commands in the README work on a fresh home and match `completions --help`.
#[test]
fn readme_completion_commands_work_in_an_empty_home() {
    let readme = readme();
    let lines: Vec<&str> = readme
        .lines()
        .filter(|l| l.contains("cbgate completions ") && l.contains('>'))
        .collect();
    assert!(lines.len() >= 3, "bash, zsh and fish lines: {lines:?}");
    let home = tempfile::tempdir().expect("tempdir");
    let bin = Path::new(env!("CARGO_BIN_EXE_cbgate"))
        .parent()
        .expect("bin dir")
        .to_owned();
    for line in &lines {
        let cmd = line.split('#').next().unwrap_or("").trim();
        let out = Command::new("sh")
            .args(["-ec", cmd])
            .env("HOME", home.path())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("sh");
        assert!(out.status.success(), "{cmd}: {}", text(&out));
    }
    let bash = home
        .path()
        .join(".local/share/bash-completion/completions/cbgate");
    assert!(
        std::fs::read_to_string(&bash).is_ok_and(|s| s.contains("_cbgate()")),
        "bash completion not at {}",
        bash.display()
    );
    let help = text(&run(cbgate_command().args(["completions", "--help"])));
    assert!(
        help.contains("~/.local/share/bash-completion/completions/cbgate"),
        "completions --help names the README's path:\n{help}"
    );
}

/// A configuration whose Coinbase is a closed loopback port (nothing listens on port 9), so no
/// test ever reaches the real one; `extra` is appended to `[upstream]`.
fn unreachable_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\n{extra}\n[upstream.resolve]\n\"api.coinbase.com\" = \"127.0.0.1:9\"\n\"api.cdp.coinbase.com\" = \"127.0.0.1:9\"\n"
        ),
    )
    .expect("write config");
    cfg
}

/// `cbgate serve` on the given ports, no key.
fn serve(listen: SocketAddr, admin: Option<SocketAddr>) -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = unreachable_config(dir.path(), "");
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(listen.to_string());
    if let Some(a) = admin {
        cmd.arg("--admin-listen").arg(a.to_string());
    }
    let p = Process::spawn(cmd);
    // The configuration has been read once the process started answering or exited; the
    // directory may go (the child keeps no handle on it after start-up).
    std::mem::forget(dir);
    p
}

async fn exit_of(p: Process) -> (Option<i32>, String) {
    let (status, out) = p.wait_exit().await;
    (status.code(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_is_told_who_holds_the_port_and_how_to_move() {
    let (p1, a1) = (loopback(free_port()), loopback(free_port()));
    let mut first = serve(p1, Some(a1));
    first
        .wait_until("the first instance answers /livez", || {
            cbgate_command()
                .args(["health", "--live", "--admin-listen"])
                .arg(a1.to_string())
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await;

    // Same proxy port.
    let (code, out) = exit_of(serve(p1, Some(loopback(free_port())))).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("another cbgate answers there") && out.contains("--listen"),
        "{out}"
    );
    // Free proxy port, the first one's admin port.
    let (code, out) = exit_of(serve(loopback(free_port()), Some(a1))).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("another cbgate's admin listener answers there")
            && out.contains("--admin-listen"),
        "{out}"
    );
    // A port some other program holds.
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = other.local_addr().expect("addr");
    let (code, out) = exit_of(serve(held, Some(loopback(free_port())))).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("another program (not cbgate) holds it"),
        "{out}"
    );
    drop(other);

    // --admin-listen moves the second instance, and health finds it there.
    let a2 = loopback(free_port());
    let mut second = serve(loopback(free_port()), Some(a2));
    second
        .wait_until("the second instance answers /livez", || {
            cbgate_command()
                .args(["health", "--live", "--admin-listen"])
                .arg(a2.to_string())
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await;
    second.signal("TERM");
    first.signal("TERM");
    assert_eq!(second.wait_exit().await.0.code(), Some(0));
    assert_eq!(first.wait_exit().await.0.code(), Some(0));
}

/// Coinbase unreachable at start: a warning with the reason, and `/readyz` stays ready (a
/// Coinbase outage is not cbgate's) but shows it in its detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coinbase_unreachable_at_start_is_said_and_shown_in_readyz() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let key_file = key.write_json(up.dir.path());
    let admin = loopback(free_port());
    let cfg = unreachable_config(
        up.dir.path(),
        &format!("ca_file = \"{}\"", up.ca_file.display()),
    );
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(loopback(free_port()).to_string())
        .arg("--admin-listen")
        .arg(admin.to_string())
        .arg("--key-file")
        .arg(&key_file);
    let p = Process::spawn(cmd);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !p.output().contains("Coinbase cannot be reached") {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning that Coinbase cannot be reached:\n{}",
            p.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["ready"], true, "{body}");
    assert_eq!(ready["upstream"]["reachable"], false, "{body}");
    assert!(
        ready["upstream"]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty() && d != "ok"),
        "{body}"
    );
    p.signal("TERM");
    let (_, out) = p.wait_exit().await;
    assert!(
        out.contains("WARN") && out.contains("Coinbase cannot be reached"),
        "{out}"
    );
}

/// A refused upgrade: the Python stream example prints cbgate's reason, as the Node one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_stream_example_prints_why_the_upgrade_was_refused() {
    let up = Upstream::start(None).await;
    let gate = common::harness::Gate::start(up.config(), None).await;
    let python = common::provision::python().to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/ws_user.py");
    let url = format!("ws://{}/ws/nowhere", gate.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("CBGATE_WS_URL", url)
            .stdin(Stdio::null())
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("upgrade refused: HTTP 404") && stderr.contains("no_route"),
        "cbgate's reason is hidden:\n{stderr}"
    );
    assert!(!stderr.contains("Traceback"), "{stderr}");
    gate.stop().await;
}

/// The README's contents line links only to headings that exist, and the sections a newcomer
/// looks for first are there.
#[test]
fn readme_contents_links_resolve_and_the_first_hour_sections_exist() {
    let readme = readme();
    let anchors: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with("## ") || l.starts_with("### "))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let contents = readme
        .split("**Contents:**")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a **Contents:** paragraph");
    let links: Vec<&str> = contents
        .split("](#")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    assert!(links.len() >= 10, "{links:?}");
    for link in links {
        assert!(
            anchors.iter().any(|a| a == link),
            "contents link #{link} has no heading"
        );
    }
    for heading in [
        "### Is it working?",
        "## FAQ",
        "## Troubleshooting",
        "## Uninstall",
        "## Licence",
        "### Install from .deb",
    ] {
        assert!(
            readme.lines().any(|l| l == heading),
            "README lacks {heading}"
        );
    }
}

/// A read-only container has no usable default `state_dir`: cbgate still starts (the kill
/// switch then lives in memory, and it says so); a configured `state_dir` it cannot use stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_default_state_dir_degrades_but_a_configured_one_is_an_error() {
    // Nothing can be created under /proc, even as root.
    let unusable = "/proc/cbgate-no-such-dir";
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = unreachable_config(dir.path(), "");
    let admin = loopback(free_port());
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(loopback(free_port()).to_string())
        .arg("--admin-listen")
        .arg(admin.to_string())
        .env("XDG_STATE_HOME", unusable)
        .env_remove("STATE_DIRECTORY");
    let mut p = Process::spawn(cmd);
    p.wait_until("the gateway answers /livez", || {
        cbgate_command()
            .args(["health", "--live", "--admin-listen"])
            .arg(admin.to_string())
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await;
    p.signal("TERM");
    let (status, out) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("the default state_dir is not usable"), "{out}");

    let dir2 = tempfile::tempdir().expect("tempdir");
    let cfg2 = unreachable_config(dir2.path(), "");
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg2)
        .arg("--listen")
        .arg(loopback(free_port()).to_string())
        .arg("--admin-listen")
        .arg(loopback(free_port()).to_string())
        .env("CBGATE_STATE_DIR", unusable);
    let (code, out) = exit_of(Process::spawn(cmd)).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("state_dir"), "{out}");
}
