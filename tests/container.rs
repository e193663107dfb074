//! The container image, run as users run it: the image that `.ci/run` builds from the
//! Dockerfile's runtime stage (same user, paths, HEALTHCHECK, ENTRYPOINT) with the release binary,
//! started with podman as its default non-root user, the key mounted read-only, host networking
//! to reach the TLS mock Coinbase on loopback. It checks the process's uid, runs the image's own
//! HEALTHCHECK command inside the container, and sends a request through it that the mock
//! verifies (signature, key name, request claim).
//!
//! Not part of `cargo test` (`test = false` in Cargo.toml): it needs an image and podman. `.ci/run`
//! builds the image and runs `cargo test --test container` with `CBGATE_TEST_IMAGE` set; without
//! it this test fails, it does not skip.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;

use common::harness::{
    assert_no_secret, free_port, h1_client, http_get, send, KeyForm, TestKey, Upstream,
};
use common::mock::AuthOutcome;

/// The user the Dockerfile's runtime stage runs as (distroless's `nonroot`).
const IMAGE_UID: u32 = 65532;

fn image() -> String {
    match std::env::var("CBGATE_TEST_IMAGE") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "CBGATE_TEST_IMAGE is not set: this test runs the container image that .ci/run builds \
             (e.g. CBGATE_TEST_IMAGE=localhost/cbgate:ci); run it through .ci/run, or build the \
             image as .ci/run does and set the variable"
        ),
    }
}

/// `podman ARGS`, with the runtime that works on these machines (runc; see .ci/run), ended after
/// `limit` so that a hung engine fails the test instead of stalling CI.
fn podman(args: &[&str], limit: Duration) -> Output {
    let runtime = std::env::var("CBGATE_TEST_OCI_RUNTIME").unwrap_or_else(|_| "runc".to_owned());
    let mut child = Command::new("podman")
        .arg("--runtime")
        .arg(&runtime)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("podman cannot be run ({e}): apt-get install -y podman runc"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait for podman").is_some() {
            return child.wait_with_output().expect("podman output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("podman output");
            panic!(
                "podman {args:?} did not finish in {limit:?}:\n{}",
                text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn podman_ok(args: &[&str], limit: Duration) -> String {
    let out = podman(args, limit);
    assert!(
        out.status.success(),
        "podman {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the container however the test ends.
struct Container(String);

impl Container {
    fn logs(&self) -> String {
        text(&podman(&["logs", &self.0], Duration::from_secs(20)))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(
            &["rm", "--force", "--time", "2", &self.0],
            Duration::from_secs(30),
        );
    }
}

/// The uid of the container's main process, read from the host's /proc.
fn container_uid(name: &str) -> u32 {
    let pid = podman_ok(
        &["inspect", "--format", "{{.State.Pid}}", name],
        Duration::from_secs(20),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("read the container process's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("effective uid in /proc status")
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap_or_else(|e| {
        panic!(
            "chown {} to {uid} ({e}): the key file must belong to the image's user, which \
             needs root (CI runs as root)",
            path.display()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_runs_non_root_reports_healthy_and_signs_through_to_the_mock() {
    let image = image();

    // The image's HEALTHCHECK, as the Dockerfile declares it (podman keeps it with --format docker).
    let inspect = podman_ok(&["image", "inspect", &image], Duration::from_secs(20));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).expect("image inspect JSON");
    let health_test: Vec<String> = inspect[0]["Healthcheck"]["Test"]
        .as_array()
        .unwrap_or_else(|| panic!("image {image} has no HEALTHCHECK: {}", inspect[0]))
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    assert_eq!(health_test, ["CMD", "/usr/local/bin/cbgate", "health"]);
    assert_eq!(
        inspect[0]["Config"]["User"],
        format!("{IMAGE_UID}:{IMAGE_UID}")
    );
    assert_eq!(
        inspect[0]["Config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/cbgate"])
    );

    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // Inside the container: the configuration, the test CA and the key, each mounted read-only.
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["{listen}"]
admin_listen = "{admin}"

[upstream]
ca_file = "/etc/cbgate/ca.pem"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"api.cdp.coinbase.com" = "{mock}"
"#,
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key_file = key.write_json(key_dir.path());
    chown(&key_file, IMAGE_UID);

    let name = format!("cbgate-test-{}", std::process::id());
    let mounts = [
        format!("{}:/etc/cbgate/cbgate.toml:ro", cfg.display()),
        format!("{}:/etc/cbgate/ca.pem:ro", up.ca_file.display()),
        format!("{}:/run/secrets/cdp_api_key.json:ro", key_file.display()),
    ];
    let mut args: Vec<&str> = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--network=host",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        // How `cbgate health` (the HEALTHCHECK, run with the container's environment) finds
        // the admin listener that this configuration moved.
        "--env=CBGATE_CONFIG=/etc/cbgate/cbgate.toml",
    ];
    for m in &mounts {
        args.push("--volume");
        args.push(m);
    }
    args.extend([
        image.as_str(),
        "serve",
        "--key-file",
        "/run/secrets/cdp_api_key.json",
    ]);
    podman_ok(&args, Duration::from_secs(60));
    let container = Container(name.clone());

    // Ready: the admin /readyz answers 200 on the host's loopback (20 s at most).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Connect first: http_get panics on a refused connection.
        let listening = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(admin),
        )
        .await;
        if let Ok(Ok(conn)) = listening {
            drop(conn);
            if http_get(admin, "/readyz").await.0 == StatusCode::OK {
                break;
            }
        }
        let running = podman_ok(
            &["inspect", "--format", "{{.State.Running}}", &name],
            Duration::from_secs(20),
        );
        assert!(
            running.trim() == "true",
            "the container exited before it was ready:\n{}",
            container.logs()
        );
        assert!(
            Instant::now() < deadline,
            "the container was not ready in 20 s:\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        container_uid(&name),
        IMAGE_UID,
        "cbgate in the container must run as the image's non-root user"
    );

    // The engine runs the image's HEALTHCHECK (podman schedules it with systemd timers, which
    // this machine lacks, so it is run on demand): healthy.
    let out = podman(&["healthcheck", "run", &name], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "podman healthcheck run: {}\n{}",
        text(&out),
        container.logs()
    );
    let status = podman_ok(
        &["inspect", "--format", "{{.State.Health.Status}}", &name],
        Duration::from_secs(20),
    );
    assert_eq!(status.trim(), "healthy");
    // The same command by hand, inside the container: it prints /readyz, with the key's name.
    let mut exec = vec!["exec", name.as_str()];
    exec.extend(health_test[1..].iter().map(String::as_str));
    let health = podman_ok(&exec, Duration::from_secs(30));
    assert!(
        health.contains(&key.name),
        "cbgate health printed: {health}"
    );

    // A request through the container, signed there, verified by the mock.
    let req = http::Request::get(format!("http://{listen}/api/v3/brokerage/accounts?limit=1"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let r = send(&h1_client(), req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}\n{}",
        r.text(),
        container.logs()
    );
    let signed: Vec<_> = up
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/v3/brokerage/accounts?limit=1")
        .collect();
    assert_eq!(signed.len(), 1, "the mock saw {signed:?}");
    match &signed[0].auth {
        AuthOutcome::Valid { kid, .. } => assert_eq!(kid, &key.name),
        other => panic!("the mock refused the container's JWT: {other:?}"),
    }

    // The logs of the whole run hold no part of the secret.
    assert_no_secret(&container.logs(), &key.secret, "container logs");
}
