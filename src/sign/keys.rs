//! Named credentials (`[keys.NAME]`): each a CDP key or an HMAC key, loaded once, swapped
//! atomically on rotation. `[key]` stays in [`crate::sign::jwt::Signer`] as the credential
//! named `default`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::config::{KeyKind, NamedKeyConfig};
use crate::sign::hmac::{HmacKey, HmacKeyError};
use crate::sign::key::{ApiKey, KeySource};

/// One loaded credential.
// Held behind an Arc: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Credential {
    /// A CDP key: signs JWTs.
    Cdp(ApiKey),
    /// An Exchange, Prime or INTX key: signs HMAC headers.
    Hmac(HmacKey),
}

impl Credential {
    /// The family this credential signs for.
    pub fn kind(&self) -> KeyKind {
        match self {
            Credential::Cdp(_) => KeyKind::Cdp,
            Credential::Hmac(h) => h.kind(),
        }
    }

    /// A fingerprint for logs (never the secret).
    pub fn fingerprint(&self) -> String {
        match self {
            Credential::Cdp(k) => k.fingerprint().to_string(),
            Credential::Hmac(h) => h.fingerprint(),
        }
    }
}

/// Loading a named credential failed; names the credential, never quotes its secret.
#[derive(Debug, thiserror::Error)]
#[error("credential {name} (keys.{name}): {reason}")]
pub struct KeyringError {
    pub name: String,
    pub reason: String,
}

/// One `[keys.NAME]` entry, loaded.
pub struct NamedKey {
    name: String,
    kind: KeyKind,
    /// The file it came from (reloaded on rotation); `None` for the environment.
    file: Option<PathBuf>,
    allow_insecure: bool,
    current: ArcSwap<Credential>,
}

impl fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedKey")
            .field("name", &self.name)
            .field("kind", &self.kind.as_str())
            .field("file", &self.file)
            .finish()
    }
}

impl NamedKey {
    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its kind, as configured.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The file it is reloaded from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The credential in use now; a request keeps the one it loaded.
    pub fn current(&self) -> Arc<Credential> {
        self.current.load_full()
    }

    /// Loads the file again, checks it, and swaps it in; the old one stays on error.
    pub fn reload(&self) -> Result<Arc<Credential>, String> {
        let Some(file) = &self.file else {
            return Err("it comes from the environment: nothing to reload".into());
        };
        let cred = load_file(self.kind, file, self.allow_insecure)?;
        let cred = Arc::new(cred);
        self.current.store(Arc::clone(&cred));
        Ok(cred)
    }
}

fn load_file(kind: KeyKind, file: &Path, allow_insecure: bool) -> Result<Credential, String> {
    match kind {
        KeyKind::Cdp => {
            let key = KeySource::File(file.to_owned())
                .load_with(allow_insecure)
                .map_err(|e| e.to_string())?;
            crate::sign::jwt::self_test(&key)?;
            Ok(Credential::Cdp(key))
        }
        k => HmacKey::load_file(k, file, allow_insecure)
            .map(Credential::Hmac)
            .map_err(|e| e.to_string()),
    }
}

/// Every named credential.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: BTreeMap<String, NamedKey>,
}

impl Keyring {
    /// Loads every `[keys.NAME]`; `env` is the process environment (for `key_env` etc.).
    pub fn load(
        cfg: &BTreeMap<String, NamedKeyConfig>,
        env: &HashMap<String, String>,
    ) -> Result<Keyring, KeyringError> {
        let mut keys = BTreeMap::new();
        for (name, c) in cfg {
            let fail = |reason: String| KeyringError {
                name: name.clone(),
                reason,
            };
            let cred = match &c.file {
                Some(f) => load_file(c.kind, f, c.allow_insecure_permissions).map_err(fail)?,
                None => from_env(c, env).map_err(fail)?,
            };
            keys.insert(
                name.clone(),
                NamedKey {
                    name: name.clone(),
                    kind: c.kind,
                    file: c.file.clone(),
                    allow_insecure: c.allow_insecure_permissions,
                    current: ArcSwap::from_pointee(cred),
                },
            );
        }
        Ok(Keyring { keys })
    }

    /// Builds a keyring from credentials already loaded (tests, tools).
    pub fn from_loaded(entries: Vec<(String, Credential)>) -> Keyring {
        let keys = entries
            .into_iter()
            .map(|(name, cred)| {
                let key = NamedKey {
                    name: name.clone(),
                    kind: cred.kind(),
                    file: None,
                    allow_insecure: false,
                    current: ArcSwap::from_pointee(cred),
                };
                (name, key)
            })
            .collect();
        Keyring { keys }
    }

    /// The credential named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedKey> {
        self.keys.get(name)
    }

    /// Every credential, by name.
    pub fn iter(&self) -> impl Iterator<Item = &NamedKey> {
        self.keys.values()
    }

    /// The configured names.
    pub fn names(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }
}

fn from_env(c: &NamedKeyConfig, env: &HashMap<String, String>) -> Result<Credential, String> {
    let get = |var: &Option<String>| -> Result<Zeroizing<String>, String> {
        let var = var.as_deref().unwrap_or("");
        env.get(var)
            .map(|v| Zeroizing::new(v.clone()))
            .ok_or_else(|| HmacKeyError::EnvMissing(var.to_owned()).to_string())
    };
    match c.kind {
        KeyKind::Cdp => {
            let name = get(&c.key_env)?;
            let secret = get(&c.secret_env)?;
            let key = KeySource::Inline {
                name: name.to_string(),
                secret,
            }
            .load()
            .map_err(|e| e.to_string())?;
            crate::sign::jwt::self_test(&key)?;
            Ok(Credential::Cdp(key))
        }
        k => {
            let key = get(&c.key_env)?;
            let secret = get(&c.secret_env)?;
            let pass = get(&c.passphrase_env)?;
            HmacKey::from_parts(k, &key, &secret, &pass)
                .map(Credential::Hmac)
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_credentials_from_the_environment() {
        let cfg = BTreeMap::from([(
            "ex".to_owned(),
            NamedKeyConfig {
                kind: KeyKind::Exchange,
                key_env: Some("EXK".into()),
                secret_env: Some("EXS".into()),
                passphrase_env: Some("EXP".into()),
                ..Default::default()
            },
        )]);
        let mut env = HashMap::from([
            ("EXK".to_owned(), "k1".to_owned()),
            ("EXS".to_owned(), "c2VjcmV0LXNlY3JldC1zZWNyZXQ=".to_owned()),
            ("EXP".to_owned(), "pass".to_owned()),
        ]);
        let ring = Keyring::load(&cfg, &env).expect("loads");
        let k = ring.get("ex").expect("named");
        assert_eq!(k.kind(), KeyKind::Exchange);
        assert!(matches!(k.current().as_ref(), Credential::Hmac(h) if h.key_id() == "k1"));
        assert!(
            k.reload().is_err(),
            "nothing to reload from the environment"
        );
        env.remove("EXP");
        let e = Keyring::load(&cfg, &env).expect_err("missing variable");
        assert_eq!(
            e.to_string(),
            "credential ex (keys.ex): the environment variable EXP is not set"
        );
    }
}
