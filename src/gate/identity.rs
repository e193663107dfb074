//! Client identities (`[clients.NAME]`): who is asking, so that each program gets its own
//! ceiling, and logs, audit records and metrics can say who did what.
//!
//! Recognition, first match wins:
//! 1. a token: the `cbgate-token` header, or, when there is none, `Authorization: Bearer
//!    <token>` (what many SDKs can set). A token is a bearer credential: it means its identity
//!    on any listener, whoever presents it.
//! 2. on a Unix-socket listener, the peer's uid (`unix_uid`), then its primary gid (`unix_gid`),
//!    as the kernel reports them at accept (`SO_PEERCRED`): nothing a client can forge.
//! 3. otherwise `anonymous` (the global policy alone), or 401 when an identity is required
//!    (`clients.require`, or `client_token_file`, whose token is the identity `default`).
//!
//! A token that matches no identity is no identity (step 2 and 3 decide), never an error of its
//! own. Tokens are kept only as SHA-256 digests, compared in constant time against every
//! identity's digest (equal lengths, no early exit), so neither timing nor a memory dump shows
//! a token; the files' text is zeroized once hashed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, Config, KeyKind, Permission, ANONYMOUS, DEFAULT_CLIENT};
use crate::gate::client::{ClientError, TOKEN_HEADER};
use crate::gate::policy::{Denied, Policy};

/// The Unix peer credentials of a connection, taken at accept (`SO_PEERCRED`) and carried to
/// each of its requests as a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
}

/// How a request's identity was recognised (a log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Token,
    UnixUid,
    UnixGid,
    /// No known identity: `anonymous`.
    Nothing,
}

impl By {
    /// The log value.
    pub fn as_str(self) -> &'static str {
        match self {
            By::Token => "token",
            By::UnixUid => "unix_uid",
            By::UnixGid => "unix_gid",
            By::Nothing => "none",
        }
    }
}

/// One client identity: its name and its settings. Later phases (key selection, rate budget)
/// read what they need from [`Identity::settings`].
#[derive(Debug)]
pub struct Identity {
    name: String,
    /// Its own ceiling and rules; `None` for `anonymous` and `default` (the global policy only).
    policy: Option<Policy>,
    settings: ClientConfig,
}

impl Identity {
    /// The name from the configuration (`anonymous` for no known identity): bounded, never a
    /// secret, so fit for logs and metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is `anonymous` (no known identity).
    pub fn is_anonymous(&self) -> bool {
        self.name == ANONYMOUS
    }

    /// The `[clients.NAME]` table (empty for `anonymous` and `default`).
    pub fn settings(&self) -> &ClientConfig {
        &self.settings
    }

    /// The effective ceiling: the identity's own, else the global one.
    pub fn permission(&self, global: &Policy) -> Permission {
        self.policy
            .as_ref()
            .map_or(global.permission(), Policy::permission)
    }

    /// Decides one request: the global policy, then the identity's own (an identity can only
    /// narrow). Refusals name the identity.
    pub fn check(&self, global: &Policy, method: &Method, path: &str) -> Result<(), Denied> {
        self.check_on(global, method, path, KeyKind::Cdp, path, false)
    }

    /// [`Identity::check`] for a request to an API of `family` (see [`Policy::check_on`]).
    pub fn check_on(
        &self,
        global: &Policy,
        method: &Method,
        path: &str,
        family: KeyKind,
        upstream_path: &str,
        gateway: bool,
    ) -> Result<(), Denied> {
        global
            .check_on(method, path, family, upstream_path, gateway)
            .map_err(|Denied(m)| {
                if self.is_anonymous() {
                    Denied(m)
                } else {
                    Denied(format!("{m} (client identity \"{}\")", self.name))
                }
            })?;
        match &self.policy {
            Some(p) => p.check_on(method, path, family, upstream_path, gateway),
            None => Ok(()),
        }
    }
}

/// A recognised request: the identity and how.
#[derive(Clone, Debug)]
pub struct Recognised {
    pub identity: Arc<Identity>,
    pub by: By,
}

/// Tokens read from the identities' `token_file`s, by identity name.
#[derive(Default)]
pub struct ClientTokens(BTreeMap<String, Zeroizing<String>>);

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl ClientTokens {
    /// Adds `name`'s token.
    pub fn insert(&mut self, name: &str, token: Zeroizing<String>) {
        self.0.insert(name.to_owned(), token);
    }

    /// The identity whose token is `token`, if any (a start-up check, not the request path).
    pub fn holder_of(&self, token: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, t)| t.as_str() == token)
            .map(|(n, _)| n.as_str())
    }

    /// Reads every `clients.NAME.token_file` (permissions checked as for the key file). The
    /// error names the key; `client_token_file` is read by the caller (it names its own
    /// setting's origin).
    pub fn read(cfg: &Config) -> Result<ClientTokens, String> {
        let mut out = ClientTokens::default();
        for (name, c) in &cfg.clients.named {
            if let Some(path) = &c.token_file {
                let token = read_token_file(path)
                    .map_err(|e| format!("configuration key clients.{name}.token_file: {e}"))?;
                out.insert(name, token);
            }
        }
        Ok(out)
    }
}

/// A token file could not be used. Never quotes the file's content.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("file {} has mode {mode:04o}: group or others can read or change it; run chmod 600 {}", .path.display(), .path.display())]
    Insecure { path: std::path::PathBuf, mode: u32 },
    #[error("file {} does not exist", crate::config::shown(&.0.to_string_lossy()))]
    Missing(std::path::PathBuf),
    #[error("file {} is a directory; give the path of the token file", .0.display())]
    Directory(std::path::PathBuf),
    #[error("file {} cannot be read: {reason}", .path.display())]
    Unreadable {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("file {}: the token must be at least 16 printable characters without spaces", .0.display())]
    Short(std::path::PathBuf),
}

/// Reads a token file: private like the key file (no group or other bits), at least 16
/// printable characters without spaces, surrounding whitespace trimmed.
pub fn read_token_file(path: &Path) -> Result<Zeroizing<String>, TokenFileError> {
    use crate::sign::key::KeyError;
    crate::sign::key::check_private_file(path).map_err(|e| match e {
        KeyError::InsecurePermissions { path, mode } => TokenFileError::Insecure { path, mode },
        KeyError::FileMissing(p) => TokenFileError::Missing(p),
        KeyError::IsDirectory(p) => TokenFileError::Directory(p),
        other => TokenFileError::Unreadable {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })?;
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| TokenFileError::Unreadable {
                path: path.to_owned(),
                reason: e.kind().to_string(),
            })?,
        );
    let token = Zeroizing::new(text.trim().to_owned());
    if token.chars().count() < 16 || token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(TokenFileError::Short(path.to_owned()));
    }
    Ok(token)
}

/// Building the identities failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{key}: {message}")]
    Policy { key: String, message: String },
    #[error("{} and {} have the same token: one token would be two identities; give each its own token", setting(.0), setting(.1))]
    SameToken(String, String),
    #[error("a token was given for {0}, which is not a configured client identity")]
    Unknown(String),
}

/// The setting that gives identity `name` its token.
fn setting(name: &str) -> String {
    if name == DEFAULT_CLIENT {
        "client_token_file".to_owned()
    } else {
        format!("clients.{name}.token_file")
    }
}

/// SHA-256 of each token, with the identity it stands for.
type TokenDigests = Vec<([u8; 32], Arc<Identity>)>;

/// Every configured identity and how to recognise it.
pub struct Identities {
    anonymous: Arc<Identity>,
    by_name: BTreeMap<String, Arc<Identity>>,
    /// SHA-256 of each identity's token; swapped whole when the token files are read again.
    tokens: ArcSwap<TokenDigests>,
    /// `client_token_file` (the identity `default`), to read it again on reload.
    default_token_file: Option<PathBuf>,
    uids: HashMap<u32, Arc<Identity>>,
    gids: HashMap<u32, Arc<Identity>>,
    require: bool,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .field("tokens", &self.tokens.load().len())
            .field("uids", &self.uids.keys().collect::<Vec<_>>())
            .field("gids", &self.gids.keys().collect::<Vec<_>>())
            .field("require", &self.require)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Identities {
    /// The identities of `cfg` (names, ceilings, rules, uids, gids), without tokens yet: an
    /// identity whose token is not given ([`Identities::with_tokens`]) is not recognised by
    /// token.
    pub fn new(cfg: &Config) -> Result<Identities, IdentityError> {
        let anonymous = Arc::new(Identity {
            name: ANONYMOUS.to_owned(),
            policy: None,
            settings: ClientConfig::default(),
        });
        let mut by_name = BTreeMap::new();
        let mut uids = HashMap::new();
        let mut gids = HashMap::new();
        if cfg.client_token_file.is_some() {
            by_name.insert(DEFAULT_CLIENT.to_owned(), Arc::new(default_identity()));
        }
        for (name, c) in &cfg.clients.named {
            let permission = c.permission.unwrap_or(cfg.policy.permission);
            let policy = Policy::for_client(name, permission, &c.rules)
                .map_err(|(key, message)| IdentityError::Policy { key, message })?;
            let id = Arc::new(Identity {
                name: name.clone(),
                policy: Some(policy),
                settings: c.clone(),
            });
            if let Some(uid) = c.unix_uid {
                uids.insert(uid, Arc::clone(&id));
            }
            if let Some(gid) = c.unix_gid {
                gids.insert(gid, Arc::clone(&id));
            }
            by_name.insert(name.clone(), id);
        }
        Ok(Identities {
            anonymous,
            by_name,
            tokens: ArcSwap::from_pointee(Vec::new()),
            default_token_file: cfg.client_token_file.clone(),
            uids,
            gids,
            require: cfg.identity_required(),
        })
    }

    /// Sets the identities' tokens (from [`ClientTokens::read`], plus `default` for
    /// `client_token_file`); two identities with one token are an error.
    pub fn with_tokens(self, tokens: ClientTokens) -> Result<Identities, IdentityError> {
        let current = self.tokens.load_full();
        let next = self.digests(current.as_slice(), &tokens)?;
        self.tokens.store(Arc::new(next));
        Ok(self)
    }

    /// `base` plus the digests of `tokens`; an unknown name or a token two identities share
    /// is an error.
    fn digests(
        &self,
        base: &[([u8; 32], Arc<Identity>)],
        tokens: &ClientTokens,
    ) -> Result<TokenDigests, IdentityError> {
        let mut out = base.to_vec();
        for (name, token) in &tokens.0 {
            let Some(id) = self.by_name.get(name) else {
                return Err(IdentityError::Unknown(name.clone()));
            };
            let d = digest(token);
            if let Some((_, other)) = out.iter().find(|(o, _)| *o == d) {
                return Err(IdentityError::SameToken(other.name.clone(), name.clone()));
            }
            out.push((d, Arc::clone(id)));
        }
        Ok(out)
    }

    /// Reads every identity's `token_file` (and `client_token_file`) again and swaps the new
    /// set in at once: all files good, or nothing changes (the error names the setting, never
    /// a token). `admin`: the admin token, which no client may share. Returns how many tokens
    /// are now in use. The identities themselves (names, ceilings, keys) do not change.
    pub fn reload_tokens(&self, admin: Option<&str>) -> Result<usize, String> {
        let mut tokens = ClientTokens::default();
        if let Some(path) = &self.default_token_file {
            let t = read_token_file(path).map_err(|e| format!("client_token_file: {e}"))?;
            tokens.insert(DEFAULT_CLIENT, t);
        }
        for (name, id) in &self.by_name {
            if let Some(path) = &id.settings.token_file {
                let t =
                    read_token_file(path).map_err(|e| format!("clients.{name}.token_file: {e}"))?;
                tokens.insert(name, t);
            }
        }
        if let Some(admin) = admin {
            if let Some(holder) = tokens.holder_of(admin) {
                return Err(format!(
                    "{} holds the same token as admin_token_file: that client could halt and resume trading; give it a token of its own",
                    setting(holder)
                ));
            }
        }
        // A default token given without client_token_file (a library caller) is kept as it is.
        let kept: Vec<_> = match &self.default_token_file {
            Some(_) => Vec::new(),
            None => self
                .tokens
                .load()
                .iter()
                .filter(|(_, id)| id.name == DEFAULT_CLIENT)
                .cloned()
                .collect(),
        };
        let next = self.digests(&kept, &tokens).map_err(|e| e.to_string())?;
        let n = next.len();
        self.tokens.store(Arc::new(next));
        Ok(n)
    }

    /// Requires `token` from every client as the identity `default` (what `client_token_file`
    /// does), or removes that requirement's token with `None`.
    pub fn set_default_token(&mut self, token: Option<Zeroizing<String>>) {
        let mut tokens = (*self.tokens.load_full()).clone();
        tokens.retain(|(_, id)| id.name != DEFAULT_CLIENT);
        if let Some(t) = token {
            let id = Arc::clone(
                self.by_name
                    .entry(DEFAULT_CLIENT.to_owned())
                    .or_insert_with(|| Arc::new(default_identity())),
            );
            tokens.push((digest(&t), id));
            self.require = true;
        }
        self.tokens.store(Arc::new(tokens));
    }

    /// Whether a request from no known identity is refused.
    pub fn required(&self) -> bool {
        self.require
    }

    /// The configured identity names (for metrics and messages), `anonymous` excluded.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Who sent this request: by token, else by the Unix peer, else `anonymous` (or 401 when
    /// an identity is required).
    pub fn recognise(
        &self,
        headers: &HeaderMap,
        peer: Option<Peer>,
    ) -> Result<Recognised, ClientError> {
        self.recognise_by(headers, peer, presented_token)
    }

    /// Who sent this `CONNECT` (intercept): as [`Identities::recognise`], but the token may also
    /// be the password of `Proxy-Authorization: Basic` (what
    /// `HTTPS_PROXY=http://user:TOKEN@127.0.0.1:8750` sends), and `Authorization` is not read.
    pub fn recognise_connect(
        &self,
        headers: &HeaderMap,
        peer: Option<Peer>,
    ) -> Result<Recognised, ClientError> {
        self.recognise_by(headers, peer, presented_proxy_token)
    }

    fn recognise_by(
        &self,
        headers: &HeaderMap,
        peer: Option<Peer>,
        presented: fn(&HeaderMap) -> Result<Option<Zeroizing<String>>, ClientError>,
    ) -> Result<Recognised, ClientError> {
        let mut token_sent = false;
        let tokens = self.tokens.load();
        if !tokens.is_empty() {
            if let Some(presented) = presented(headers)? {
                token_sent = true;
                let d = digest(&presented);
                let mut found = None;
                // Every digest is compared (no early exit): timing says nothing of which one.
                for (known, id) in tokens.iter() {
                    if aws_lc_rs::constant_time::verify_slices_are_equal(known, &d).is_ok() {
                        found = Some(id);
                    }
                }
                if let Some(id) = found {
                    return Ok(Recognised {
                        identity: Arc::clone(id),
                        by: By::Token,
                    });
                }
            }
        }
        if let Some(p) = peer {
            if let Some(id) = self.uids.get(&p.uid) {
                return Ok(Recognised {
                    identity: Arc::clone(id),
                    by: By::UnixUid,
                });
            }
            if let Some(id) = self.gids.get(&p.gid) {
                return Ok(Recognised {
                    identity: Arc::clone(id),
                    by: By::UnixGid,
                });
            }
        }
        if self.require {
            // With only client_token_file, today's message.
            let legacy = self.by_name.len() == 1 && self.by_name.contains_key(DEFAULT_CLIENT);
            return Err(if legacy {
                ClientError::Token
            } else {
                ClientError::NoIdentity {
                    token_sent,
                    peer: peer.map(|p| (p.uid, p.gid)),
                }
            });
        }
        Ok(Recognised {
            identity: Arc::clone(&self.anonymous),
            by: By::Nothing,
        })
    }
}

fn default_identity() -> Identity {
    Identity {
        name: DEFAULT_CLIENT.to_owned(),
        policy: None,
        settings: ClientConfig::default(),
    }
}

/// A presented token as text, trimmed. Token files are text: bytes that are not UTF-8 match no
/// identity (the empty token), rather than a lossy copy that would not be zeroized.
fn text_token(raw: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(
        std::str::from_utf8(raw)
            .map(|t| t.trim().to_owned())
            .unwrap_or_default(),
    )
}

/// The one value of header `name`, if any; two are refused: which one counts would be a guess.
fn one_header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    shown: &'static str,
) -> Result<Option<&'h HeaderValue>, ClientError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ClientError::Ambiguous(shown));
    }
    Ok(first)
}

/// The credentials of an authorization header value `<scheme> <credentials>` when its scheme
/// is `scheme` (RFC 9110 §11.1: case-insensitive).
fn credentials<'v>(value: &'v HeaderValue, scheme: &str) -> Option<&'v [u8]> {
    let b = value.as_bytes().trim_ascii();
    let space = b.iter().position(|&c| c == b' ')?;
    let (s, rest) = b.split_at(space);
    s.eq_ignore_ascii_case(scheme.as_bytes())
        .then(|| rest.trim_ascii())
}

/// The token the request presents: its one `cbgate-token`, else the `Bearer` credentials of its
/// one `Authorization` header.
fn presented_token(headers: &HeaderMap) -> Result<Option<Zeroizing<String>>, ClientError> {
    if let Some(v) = one_header(headers, &TOKEN_HEADER, "cbgate-token")? {
        return Ok(Some(text_token(v.as_bytes())));
    }
    Ok(
        one_header(headers, &header::AUTHORIZATION, "Authorization")?
            .and_then(|v| credentials(v, "bearer"))
            .map(text_token),
    )
}

/// The token a `CONNECT` presents: its one `cbgate-token`, else the password of its one
/// `Proxy-Authorization: Basic` (RFC 7617: base64 of `user:password`; the user is ignored).
fn presented_proxy_token(headers: &HeaderMap) -> Result<Option<Zeroizing<String>>, ClientError> {
    if let Some(v) = one_header(headers, &TOKEN_HEADER, "cbgate-token")? {
        return Ok(Some(text_token(v.as_bytes())));
    }
    let basic = one_header(headers, &header::PROXY_AUTHORIZATION, "Proxy-Authorization")?
        .and_then(|v| credentials(v, "basic"));
    let Some(b64) = basic else {
        return Ok(None);
    };
    use base64::Engine as _;
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return Ok(None);
    };
    let raw = Zeroizing::new(raw);
    let password = raw
        .iter()
        .position(|&c| c == b':')
        .map_or(&raw[..0], |i| &raw[i + 1..]);
    Ok(Some(text_token(password)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;

    fn cfg() -> Config {
        let mut c = Config::default();
        c.policy.permission = Permission::Transfer;
        c.clients.named.insert(
            "dash".into(),
            ClientConfig {
                token_file: Some("/x".into()),
                permission: Some(Permission::View),
                ..ClientConfig::default()
            },
        );
        c.clients.named.insert(
            "bot".into(),
            ClientConfig {
                unix_uid: Some(1001),
                unix_gid: Some(50),
                rules: vec![RuleConfig {
                    action: crate::config::RuleAction::Deny,
                    methods: vec!["POST".into()],
                    path: "/api/v3/brokerage/orders/edit".into(),
                }],
                ..ClientConfig::default()
            },
        );
        c
    }

    fn tokens(pairs: &[(&str, &str)]) -> ClientTokens {
        let mut t = ClientTokens::default();
        for (n, v) in pairs {
            t.insert(n, Zeroizing::new((*v).to_owned()));
        }
        t
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        m
    }

    #[test]
    fn precedence_token_then_uid_then_gid_then_anonymous() {
        let ids = Identities::new(&cfg())
            .expect("ids")
            .with_tokens(tokens(&[("dash", "dash-token-0123456789")]))
            .expect("tokens");
        let peer = Some(Peer { uid: 1001, gid: 7 });
        let who = |hs: &[(&str, &str)], p| {
            let r = ids.recognise(&h(hs), p).expect("recognised");
            (r.identity.name().to_owned(), r.by)
        };
        assert_eq!(
            who(&[("cbgate-token", "dash-token-0123456789")], peer),
            ("dash".into(), By::Token)
        );
        assert_eq!(
            who(&[("authorization", "bearer  dash-token-0123456789")], None),
            ("dash".into(), By::Token)
        );
        // cbgate-token decides when both are sent.
        assert_eq!(
            who(
                &[
                    ("cbgate-token", "wrong-token-0123456789"),
                    ("authorization", "Bearer dash-token-0123456789")
                ],
                None
            ),
            ("anonymous".into(), By::Nothing)
        );
        assert_eq!(
            who(&[("cbgate-token", "wrong-token-0123456789")], peer),
            ("bot".into(), By::UnixUid)
        );
        assert_eq!(
            who(&[], Some(Peer { uid: 5, gid: 50 })),
            ("bot".into(), By::UnixGid)
        );
        assert_eq!(
            who(&[], Some(Peer { uid: 5, gid: 5 })),
            ("anonymous".into(), By::Nothing)
        );
        assert!(matches!(
            ids.recognise(&h(&[("cbgate-token", "a"), ("cbgate-token", "b")]), None),
            Err(ClientError::Ambiguous(_))
        ));
        assert!(!format!("{ids:?}").contains("dash-token"));
    }

    #[test]
    fn required_identity_and_same_tokens() {
        let mut c = cfg();
        c.clients.require = true;
        let ids = Identities::new(&c).expect("ids");
        let e = ids
            .recognise(&h(&[("authorization", "Bearer x")]), None)
            .expect_err("refused");
        assert!(matches!(e, ClientError::NoIdentity { .. }), "{e}");
        let same = Identities::new(&c).expect("ids").with_tokens(tokens(&[
            ("dash", "same-token-0123456789"),
            ("bot", "same-token-0123456789"),
        ]));
        let e = same.expect_err("same token").to_string();
        assert!(
            e.contains("clients.bot.token_file") && e.contains("clients.dash"),
            "{e}"
        );
        assert!(!e.contains("same-token"), "{e}");
    }

    #[test]
    fn identity_policy_narrows_and_names_the_identity() {
        let c = cfg();
        let global = Policy::new(&c.policy).expect("global");
        let ids = Identities::new(&c).expect("ids");
        let bot = ids
            .recognise(&HeaderMap::new(), Some(Peer { uid: 1001, gid: 0 }))
            .expect("bot")
            .identity;
        assert!(bot
            .check(&global, &Method::POST, "/v2/accounts/a/transactions")
            .is_ok());
        let e = bot
            .check(&global, &Method::POST, "/api/v3/brokerage/orders/Edit/")
            .expect_err("denied");
        assert!(
            e.0.contains("\"bot\"") && e.0.contains("clients.bot.rules"),
            "{e}"
        );
        let dash = ids.by_name.get("dash").expect("dash");
        let e = dash
            .check(&global, &Method::POST, "/api/v3/brokerage/orders")
            .expect_err("view");
        assert!(e.0.contains("\"dash\"") && e.0.contains("\"view\""), "{e}");
        assert_eq!(dash.permission(&global), Permission::View);
        // The global policy still applies to an identity, and its refusal names it too.
        let mut narrow = c.clone();
        narrow.policy.permission = Permission::View;
        narrow.clients.named.clear();
        let g = Policy::new(&narrow.policy).expect("global");
        let e = bot
            .check(&g, &Method::POST, "/api/v3/brokerage/orders")
            .expect_err("global");
        assert!(
            e.0.contains("cbgate's permission ceiling") && e.0.contains("\"bot\""),
            "{e}"
        );
    }
}
