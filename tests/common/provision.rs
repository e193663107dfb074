//! What the example tests need besides Rust, provisioned once by the test run itself, so that
//! `cargo test` on a fresh machine with Python 3 and Node.js needs no other step:
//! - a Python venv under the target directory with `examples/python/requirements.txt` and
//!   PyYAML, re-created when the requirements change;
//! - `npm ci` in `examples/node` from its lockfile when its `node_modules` is missing or stale;
//! - for the SDK tests, a second venv with the pinned Coinbase libraries of
//!   `tests/sdk/requirements.txt`, and `npm ci` in `tests/sdk/node`.
//!
//! A missing interpreter fails with one line naming it and how to install it: never a skip.
//! Test processes run in parallel (nextest, or several test binaries), so each step holds an
//! exclusive file lock while it installs.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Packages the tests need besides the examples' own requirements (YAML for the deployment
/// examples).
const EXTRA_PYTHON: &[&str] = &["PyYAML>=6,<7"];

fn env_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-env")
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` holding an exclusive lock on `name` in the test-env directory.
fn locked<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let dir = env_dir();
    std::fs::create_dir_all(&dir).expect("create the test-env directory");
    let lock = File::create(dir.join(name)).expect("create a lock file");
    lock.lock().expect("lock the test-env directory");
    let out = f();
    let _ = lock.unlock();
    out
}

/// The venv's `python3`, with the examples' packages installed.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| venv("venv", "examples/python/requirements.txt", EXTRA_PYTHON))
}

/// The SDK venv's `python3`, with the pinned Coinbase libraries of `tests/sdk/requirements.txt`.
pub fn sdk_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| venv("sdk-venv", "tests/sdk/requirements.txt", &[]))
}

/// A venv named `name` in the test-env directory with `requirements` (relative to the crate)
/// and `extra` installed; re-created when either changes. Returns its `python3`.
fn venv(name: &str, requirements: &str, extra: &[&str]) -> PathBuf {
    assert!(
        works("python3", &["--version"]),
        "Python 3 is missing: install it (e.g. `apt-get install python3 python3-venv`); \
         cargo test provisions the rest itself"
    );
    let requirements_file = Path::new(ROOT).join(requirements);
    let wanted = format!(
        "{}\n{}\n",
        std::fs::read_to_string(&requirements_file)
            .unwrap_or_else(|e| panic!("read {requirements}: {e}")),
        extra.join("\n")
    );
    let venv = env_dir().join(name);
    let bin = venv.join("bin/python3");
    let marker = venv.join("cbgate-installed.txt");
    locked(&format!("{name}.lock"), || {
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str())
            && bin.is_file()
        {
            return;
        }
        let _ = std::fs::remove_dir_all(&venv);
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (on Debian: apt-get install python3-venv)",
        );
        run(
            Command::new(&bin)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&requirements_file)
                .args(extra),
            &format!("pip install -r {requirements}"),
        );
        std::fs::write(&marker, &wanted).expect("write the venv marker");
    });
    bin
}

/// `node`, with `examples/node/node_modules` installed from the lockfile.
pub fn node() -> &'static str {
    static NODE: OnceLock<()> = OnceLock::new();
    NODE.get_or_init(|| npm_ci("examples/node"));
    "node"
}

/// The directory of the SDK tests' Node packages (`tests/sdk/node`), installed from its
/// lockfile; scripts run there with `node` find them.
pub fn sdk_node() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        npm_ci("tests/sdk/node");
        Path::new(ROOT).join("tests/sdk/node")
    })
}

/// `npm ci` in `dir` (relative to the crate) unless its `node_modules` already matches the lockfile.
fn npm_ci(dir: &str) {
    assert!(
        works(
            "node",
            &["-e", "if (typeof fetch !== 'function') process.exit(1)"]
        ),
        "Node.js 18 or newer (with built-in fetch) is missing: install it \
         (e.g. `apt-get install nodejs npm`); cargo test provisions the rest itself"
    );
    let path = Path::new(ROOT).join(dir);
    let lockfile = std::fs::read(path.join("package-lock.json"))
        .unwrap_or_else(|e| panic!("read {dir}/package-lock.json: {e}"));
    // npm writes its own copy of the lockfile into node_modules: same bytes, nothing to do.
    let installed = path.join("node_modules/.package-lock.json");
    locked(&format!("npm-{}.lock", dir.replace('/', "-")), || {
        let current = std::fs::read(&installed).ok();
        if current.is_some_and(|c| same_packages(&c, &lockfile)) {
            return;
        }
        assert!(
            works("npm", &["--version"]),
            "npm is missing: install it (e.g. `apt-get install npm`)"
        );
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                .arg(&path),
            &format!("npm ci --prefix {dir}"),
        );
    });
}

/// Whether npm's record of what it installed lists the lockfile's packages and versions.
fn same_packages(installed: &[u8], lockfile: &[u8]) -> bool {
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
    let (Some(i), Some(l)) = (parse(installed), parse(lockfile)) else {
        return false;
    };
    let Some(wanted) = l["packages"].as_object() else {
        return false;
    };
    wanted
        .iter()
        .filter(|(path, _)| !path.is_empty())
        .all(|(path, p)| i["packages"][path]["version"] == p["version"])
}
