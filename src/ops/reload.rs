//! Key rotation without a restart: on SIGHUP, and when the key file changes; client tokens
//! are read again on SIGHUP.
//!
//! The directory is watched, not the file: Kubernetes secret volumes replace a key by swapping
//! the `..data` symlink, which never touches the file's own inode. A new key is loaded, checked
//! (parse + signing self-test) and swapped in atomically; requests in flight keep the key they
//! started with. A bad new key is rejected with a log line and a metric, and the last good key
//! stays in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::proxy::Proxy;
use crate::sign::key::KeySource;

/// Where the key comes from and how strictly its file is checked.
#[derive(Debug)]
pub struct KeyReloader {
    /// The key file; `None` when the key came from the environment (nothing to reload).
    file: Option<PathBuf>,
    allow_insecure_permissions: bool,
    /// SHA-256 of the file content last loaded, to ignore events that changed nothing.
    last_digest: std::sync::Mutex<Option<Vec<u8>>>,
    /// The same for each named credential's file.
    named_digests: Digests,
}

impl KeyReloader {
    /// `file`: the key file in use, or `None` for a key from the environment (or no key).
    pub fn new(file: Option<PathBuf>, allow_insecure_permissions: bool) -> KeyReloader {
        let last_digest = std::sync::Mutex::new(file.as_deref().and_then(digest_of));
        KeyReloader {
            file,
            allow_insecure_permissions,
            last_digest,
            named_digests: Digests::default(),
        }
    }

    /// The watched key file, if the key comes from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Loads the key again and swaps it in. Returns whether a new key is now in use.
    pub fn reload(&self, proxy: &Proxy, why: &str) -> bool {
        let Some(path) = &self.file else {
            tracing::info!(
                trigger = why,
                "the key does not come from a file: nothing to reload"
            );
            return false;
        };
        let loaded = KeySource::File(path.clone())
            .load_with(self.allow_insecure_permissions)
            .map_err(|e| e.to_string())
            .and_then(|k| crate::sign::jwt::self_test(&k).map(|()| k));
        match loaded {
            Ok(key) => {
                if let Ok(mut d) = self.last_digest.lock() {
                    *d = digest_of(path);
                }
                tracing::info!(
                    trigger = why,
                    key = key.name(),
                    alg = key.algorithm().as_str(),
                    fingerprint = %key.fingerprint(),
                    "key reloaded"
                );
                proxy.signer().replace_key(key);
                proxy.metrics().key_reload(true);
                true
            }
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "new key rejected: the previous key stays in use");
                proxy.metrics().key_reload(false);
                false
            }
        }
    }

    /// Reloads when the file's content differs from what was last loaded.
    fn reload_if_changed(&self, proxy: &Proxy) {
        if let Some(path) = self.file() {
            let now = digest_of(path);
            let changed = self.last_digest.lock().map(|d| *d != now).unwrap_or(true);
            if changed && now.is_some() {
                self.reload(proxy, "file changed");
            }
        }
        self.reload_named(proxy, "file changed", true);
    }

    /// Reloads every named credential that comes from a file (`only_changed`: those whose
    /// content differs from what was last loaded). Each is checked and swapped on its own: a
    /// bad file leaves that credential as it was and touches no other.
    pub fn reload_named(&self, proxy: &Proxy, why: &str, only_changed: bool) {
        let digests = &self.named_digests;
        for k in proxy.keys().iter() {
            let Some(path) = k.file() else { continue };
            let now = digest_of(path);
            if only_changed {
                let same = digests
                    .lock()
                    .map(|d| d.get(k.name()) == Some(&now))
                    .unwrap_or(false);
                if same || now.is_none() {
                    continue;
                }
            }
            match k.reload() {
                Ok(cred) => {
                    tracing::info!(trigger = why, key = k.name(), kind = k.kind().as_str(), fingerprint = %cred.fingerprint(), "credential reloaded");
                    proxy.metrics().credential_reload(k.name(), true);
                }
                Err(e) => {
                    tracing::error!(trigger = why, key = k.name(), error = %e, "new credential rejected: the previous one stays in use");
                    proxy.metrics().credential_reload(k.name(), false);
                }
            }
            // Remembered either way: a bad file is reported once, not on every event.
            if let Ok(mut d) = digests.lock() {
                d.insert(k.name().to_owned(), now);
            }
        }
    }

    /// Records the digests of the named credential files as loaded at start.
    pub fn remember_named(&self, proxy: &Proxy) {
        if let Ok(mut d) = self.named_digests.lock() {
            for k in proxy.keys().iter() {
                if let Some(p) = k.file() {
                    d.insert(k.name().to_owned(), digest_of(p));
                }
            }
        }
    }
}

/// Content digests of named credential files, by name, as last loaded.
type Digests = std::sync::Mutex<std::collections::HashMap<String, Option<Vec<u8>>>>;

fn digest_of(path: &Path) -> Option<Vec<u8>> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).ok()?);
    Some(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
            .as_ref()
            .to_vec(),
    )
}

/// Runs until the task is dropped: reloads on SIGHUP and on changes in the key file's directory.
pub async fn run(proxy: Arc<Proxy>, reloader: Arc<KeyReloader>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: key reload on signal is off");
            None
        }
    };
    let (tx, mut rx) = mpsc::channel::<()>(1);
    reloader.remember_named(&proxy);
    // Kept alive for as long as this task runs: one per directory holding a key file.
    let mut dirs: Vec<PathBuf> = Vec::new();
    let files = reloader.file().map(Path::to_owned).into_iter().chain(
        proxy
            .keys()
            .iter()
            .filter_map(|k| k.file().map(Path::to_owned)),
    );
    let mut _watchers = Vec::new();
    for f in files {
        let dir = dir_of(&f);
        if dirs.contains(&dir) {
            continue;
        }
        dirs.push(dir);
        if let Some(w) = watch_dir(&f, tx.clone()) {
            _watchers.push(w);
        }
    }
    drop(tx);
    loop {
        tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                if reloader.file().is_some() || proxy.keys().iter().next().is_none() {
                    reloader.reload(&proxy, "SIGHUP");
                }
                reloader.reload_named(&proxy, "SIGHUP", false);
                reload_client_tokens(&proxy);
            }
            Some(()) = rx.recv() => {
                // Let a burst of events (write, rename, symlink swap) settle first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                reloader.reload_if_changed(&proxy);
            }
            else => return,
        }
    }
}

/// Reads the client identities' token files again (on SIGHUP): all at once or, on any error,
/// none (the previous tokens stay in use).
pub fn reload_client_tokens(proxy: &Proxy) {
    match proxy.identities().reload_tokens(proxy.admin_control().0) {
        Ok(0) => {}
        Ok(n) => tracing::info!(tokens = n, "client tokens reloaded"),
        Err(e) => tracing::error!(
            error = %e,
            "new client tokens rejected: the previous ones stay in use"
        ),
    }
}

fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn watch_dir(file: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = dir_of(file);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a pending wake-up: nothing is lost.
            let _ = tx.try_send(());
        }
    });
    match watcher {
        Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the key directory: reload with SIGHUP");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the key directory: reload with SIGHUP");
            None
        }
    }
}
