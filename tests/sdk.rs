//! The Coinbase client libraries, unmodified and pinned (`tests/sdk/`), driven through cbgate
//! as the README's per-library table configures them.

mod common;

use common::provision;
use std::process::Command;

/// The pinned libraries install and import: the versions the README's table names.
#[test]
fn pinned_sdks_are_installed() {
    let out = Command::new(provision::sdk_python())
        .args([
            "-c",
            "import importlib.metadata as m; \
             print(' '.join(m.version(p) for p in ['coinbase-advanced-py', 'ccxt', 'cdp-sdk']))",
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1.8.4 4.5.90 1.51.0"
    );
    let out = Command::new("node")
        .current_dir(provision::sdk_node())
        .args([
            "-e",
            "const v = p => JSON.parse(require('fs').readFileSync('node_modules/' + p + '/package.json')).version; \
             console.log([v('ccxt'), v('@coinbase/cdp-sdk'), v('@coinbase-sample/advanced-trade-sdk-ts')].join(' '))",
        ])
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4.5.84 1.57.0 0.3.0"
    );
}
