//! Invariant checks shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the corpus
//! smoke test (`tests/fuzz_corpus.rs`). Each function takes arbitrary bytes, drives one cbgate
//! API with them and panics when an invariant is violated. Plain functions, no fuzzing crate:
//! `cargo test` runs them without building libFuzzer.

use std::sync::OnceLock;

use cbgate::config::{Config, ListenAddr, Permission, PolicyConfig, RuleAction, RuleConfig};
use cbgate::gate::policy::{check_path, Policy};
use cbgate::sign::key::{Algorithm, ApiKey, KeyError};
use http::Method;

// ---------------------------------------------------------------------------
// key_parse
// ---------------------------------------------------------------------------

/// The name used when the input has no NUL byte.
const DEFAULT_NAME: &str = "organizations/0f0e0d0c/apiKeys/a1b2c3d4";

/// How long a run of secret characters must be before seeing it in output counts as a leak.
const WINDOW: usize = 16;

/// `ApiKey::parse(name, secret)`; the input is `name NUL secret`, or just the secret.
///
/// Invariants:
/// - never panics;
/// - an `Err`'s Display and Debug contain no 16-character window of the secret, except text
///   that is PEM armour (`-----BEGIN ...-----` / `-----END ...-----` labels) or that the error
///   sentences themselves contain (an input that happens to spell part of a message);
/// - an `Ok` key's Debug and fingerprint contain no 16-character run of base64 characters
///   from the secret (the key name, which is printed, is excluded), its public key has the
///   length of its algorithm, and a signature it makes verifies under that public key.
pub fn key_parse(data: &[u8]) {
    let (name, secret) = match data.iter().position(|&b| b == 0) {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            String::from_utf8_lossy(&data[i + 1..]).into_owned(),
        ),
        None => (
            DEFAULT_NAME.to_owned(),
            String::from_utf8_lossy(data).into_owned(),
        ),
    };
    match ApiKey::parse(&name, &secret) {
        Ok(key) => check_key(&key, &name, &secret),
        Err(e) => check_key_error(&e, &name, &secret),
    }
}

fn check_key(key: &ApiKey, name: &str, secret: &str) {
    assert!(!key.name().is_empty(), "Ok key with an empty name");
    let shown = format!("{key:?}").replace(&format!("{:?}", key.name()), "");
    let fingerprint = key.fingerprint();
    for w in secret_windows(secret, true) {
        if name.contains(w.as_str()) {
            continue;
        }
        assert!(
            !shown.contains(w.as_str()),
            "ApiKey Debug shows secret text {w:?}: {shown}"
        );
        assert!(
            !fingerprint.contains(w.as_str()),
            "fingerprint shows secret text {w:?}: {fingerprint}"
        );
    }
    let public = key.public_key();
    let verify: &dyn aws_lc_rs::signature::VerificationAlgorithm = match key.algorithm() {
        Algorithm::Es256 => {
            assert!(
                public.len() == 65 && public[0] == 4,
                "ES256 public key is not an uncompressed P-256 point ({} bytes)",
                public.len()
            );
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED
        }
        Algorithm::EdDsa => {
            assert_eq!(public.len(), 32, "Ed25519 public key length");
            &aws_lc_rs::signature::ED25519
        }
    };
    let message = b"cbgate fuzz: header.payload";
    let sig = key.sign(message).expect("an Ok key signs");
    assert_eq!(sig.len(), 64, "{:?} signature length", key.algorithm());
    aws_lc_rs::signature::UnparsedPublicKey::new(verify, public)
        .verify(message, &sig)
        .expect("the signature verifies under the key's own public key");
}

fn check_key_error(e: &KeyError, name: &str, secret: &str) {
    let display = e.to_string();
    let debug = format!("{e:?}");
    assert!(!display.is_empty(), "empty error message");
    assert!(
        !display.contains('\n'),
        "error Display is not one line: {display:?}"
    );
    let mut allowed = error_sentences().to_owned();
    if let KeyError::WrongLength(n) = e {
        allowed.push_str(&format!("{e}\n{e:?}\n{n}\n"));
    }
    for w in secret_windows(secret, false) {
        if allowed.contains(w.as_str()) || name.contains(w.as_str()) {
            continue;
        }
        assert!(
            !display.contains(w.as_str()),
            "KeyError Display quotes the secret ({w:?}): {display}"
        );
        assert!(
            !debug.contains(w.as_str()),
            "KeyError Debug quotes the secret ({w:?}): {debug}"
        );
    }
}

/// Display and Debug of every error `ApiKey::parse` can return, one per line: an input that
/// spells part of one of these sentences is not a leak when the message shows it.
fn error_sentences() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let all = [
            KeyError::EmptyName,
            KeyError::EmptySecret,
            KeyError::PublicKeyGiven("PUBLIC KEY"),
            KeyError::Rsa,
            KeyError::WrongCurve("P-384"),
            KeyError::WrongCurve("P-521"),
            KeyError::WrongCurve("secp256k1"),
            KeyError::WrongCurve("P-224"),
            KeyError::UnsupportedPem(
                "ENCRYPTED PRIVATE KEY: decrypt it first, e.g. openssl pkcs8 -in enc.pem -out key.pem",
            ),
            KeyError::UnsupportedPem("OPENSSH PRIVATE KEY"),
            KeyError::UnsupportedPem("CERTIFICATE"),
            KeyError::UnsupportedPem("not a private key"),
            KeyError::BadPem,
            KeyError::BadPrivateKey("EC PRIVATE KEY"),
            KeyError::BadPrivateKey("PRIVATE KEY"),
            KeyError::BadBase64,
            KeyError::PublicHalfMismatch,
        ];
        all.iter().map(|e| format!("{e}\n{e:?}\n")).collect()
    })
}

/// Every `WINDOW`-character window of the secret, as given and after the unescaping the parser
/// does (`\n` literals, CR), leaving out PEM armour labels (`BEGIN EC PRIVATE KEY` between the
/// `-----` fences). With `base64_only`, only windows inside runs of base64/base64url characters.
fn secret_windows(secret: &str, base64_only: bool) -> Vec<String> {
    let unescaped = secret
        .replace("\\r\\n", "\n")
        .replace("\\n", "\n")
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    let mut out = std::collections::BTreeSet::new();
    for text in [secret, unescaped.as_str()] {
        for line in text.split('\n') {
            for piece in line.split("-----") {
                if piece.starts_with("BEGIN") || piece.starts_with("END") {
                    continue;
                }
                let runs: Vec<&str> = if base64_only {
                    piece
                        .split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c)))
                        .collect()
                } else {
                    vec![piece]
                };
                for run in runs {
                    let chars: Vec<char> = run.chars().collect();
                    for w in chars.windows(WINDOW) {
                        out.insert(w.iter().collect::<String>());
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

// ---------------------------------------------------------------------------
// config_load
// ---------------------------------------------------------------------------

/// `Config::from_toml_str` on the input (lossy UTF-8).
///
/// Invariants: never panics; an error has a non-empty message; an accepted configuration
/// passes `validate` again, listens only on loopback or Unix sockets unless `unsafe_listen`
/// and `client_token_file` are both set, compiles its policy, and has at least one route,
/// every route prefix and WebSocket path starting with `/` and every upstream URL parsing.
pub fn config_load(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let cfg = match Config::from_toml_str(&text) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty configuration error");
            let _ = format!("{e:?}");
            return;
        }
    };
    cfg.validate()
        .expect("an accepted configuration validates again");
    assert!(!cfg.listen.is_empty(), "accepted with no listener");
    for l in &cfg.listen {
        if let ListenAddr::Tcp(a) = l {
            assert!(
                a.ip().is_loopback() || (cfg.unsafe_listen && cfg.client_token_file.is_some()),
                "accepted non-loopback listener {a} without unsafe_listen + client_token_file"
            );
        }
    }
    Policy::new(&cfg.policy).expect("an accepted configuration's policy compiles");
    assert!(cfg.max_connections > 0 && cfg.max_headers > 0 && cfg.max_body_bytes > 0);
    assert!(!cfg.routes.is_empty(), "accepted with no routes");
    for r in &cfg.routes {
        assert!(r.prefix.starts_with('/'), "route prefix {:?}", r.prefix);
        cbgate::gate::route::Upstream::parse(&r.upstream).expect("accepted route upstream parses");
    }
    for r in &cfg.ws_routes {
        assert!(r.path.starts_with('/'), "ws route path {:?}", r.path);
        cbgate::gate::route::Upstream::parse_ws(&r.upstream).expect("accepted ws upstream parses");
    }
    let _ = format!("{cfg:?}");
}

// ---------------------------------------------------------------------------
// policy_path
// ---------------------------------------------------------------------------

/// `check_path` and `Policy::{new, check}`.
///
/// Input: byte 0 picks the permission (`% 3`: view, trade, transfer) and the rules
/// (`/ 3 % 3`: none, a fixed set, or rules read from the input); the rest is lossy UTF-8
/// lines. The last line is the request, `METHOD PATH` (or just a path, sent as POST); with
/// rules from the input, each earlier line is a rule `a|d METHOD,METHOD /pattern` (`a` allows,
/// anything else denies; the method list may be empty).
///
/// Invariants:
/// - never panics;
/// - if `check_path(p)` accepts `p`: it starts with `/`, every byte is in 0x21..=0x7e, it has
///   no backslash, no `//`, no `.` or `..` segment, no `%2f`, `%2e`, `%5c` or `%00` in any
///   case, every `%` starts a two-hex-digit escape, and its percent-decoded form has no
///   control byte, backslash, `//`, dot segment or extra `/`; moreover every byte is an RFC 3986
///   unreserved character, `/` or `%`, every percent-decoded segment is made of unreserved
///   characters only (so no `;`, no non-ASCII byte: no overlong or full-width dot) and none ends
///   in a dot;
/// - under the `view` ceiling with no rules, only GET and HEAD pass; under `transfer`, all;
/// - under the `trade` ceiling with no rules, a POST (or any method but GET and HEAD) whose
///   percent-decoded path is not `/api/v3/brokerage/orders`, below it, or below
///   `/api/v3/brokerage/convert/` is denied;
/// - `Policy::new` accepts exactly the rules a small reference model accepts (a literal segment
///   must be non-empty, unreserved characters only once percent-decoded, not ending in a dot;
///   `/` alone is the root), and `Policy::check` decides every request as the reference model
///   does (first matching rule, else the ceiling, on the percent-decoded path, a literal also
///   matching itself plus `.` and anything);
/// - with the fixed rules, a request `check_path` accepts that is denied stays denied with a
///   format suffix (`.json`) on its last segment: no suffix walks past a deny rule.
pub fn policy_path(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let permission =
        [Permission::View, Permission::Trade, Permission::Transfer][usize::from(mode % 3)];
    let text = String::from_utf8_lossy(rest);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let request = lines.pop().unwrap_or_default();
    let (method, path) = match request.split_once(' ') {
        Some((m, p)) => (Method::from_bytes(m.as_bytes()).unwrap_or(Method::POST), p),
        None => (Method::POST, request),
    };
    let rules = match mode / 3 % 3 {
        0 => Vec::new(),
        1 => fixed_rules(),
        _ => lines.iter().take(8).map(|l| rule_from_line(l)).collect(),
    };

    let path_ok = check_path(path).is_ok();
    if path_ok {
        check_canonical(path);
    }

    // The ceilings alone.
    for m in [method.clone(), Method::POST] {
        let decoded = match_form(path).into_bytes();
        let read = m == Method::GET || m == Method::HEAD;
        let under = decoded == b"/api/v3/brokerage/orders"
            || decoded.starts_with(b"/api/v3/brokerage/orders/")
            || decoded.starts_with(b"/api/v3/brokerage/convert/");
        let trade = ceiling_only(Permission::Trade).check(&m, path);
        if !read && !under {
            assert!(
                trade.is_err(),
                "trade ceiling lets {m} {path:?} through (decoded {:?})",
                String::from_utf8_lossy(&decoded)
            );
        }
        if trade.is_ok() && !read {
            assert!(under, "trade ceiling allowed {m} {path:?}");
        }
        assert_eq!(
            ceiling_only(Permission::View).check(&m, path).is_ok(),
            read,
            "view ceiling on {m} {path:?}"
        );
        assert!(
            ceiling_only(Permission::Transfer).check(&m, path).is_ok(),
            "transfer ceiling denied {m} {path:?}"
        );
    }

    // The configured policy against the reference model.
    let cfg = PolicyConfig {
        permission,
        rules: rules.clone(),
    };
    let model = model_compile(&rules);
    match (Policy::new(&cfg), model) {
        (Ok(policy), Some(model)) => {
            let got = policy.check(&method, path);
            let want = model_decide(permission, &model, &method, path);
            assert_eq!(
                got.is_ok(),
                want,
                "{method} {path:?} under {permission:?} with {rules:?}: policy says {got:?}"
            );
            if let Err(d) = got {
                assert!(!d.0.is_empty());
                let last_is_segment = path.len() > 1 && !path.ends_with('/');
                if mode / 3 % 3 == 1 && path_ok && last_is_segment {
                    let suffixed = format!("{path}.json");
                    assert!(
                        policy.check(&method, &suffixed).is_err(),
                        "{method} {path:?} is denied but {suffixed:?} is not"
                    );
                }
            }
        }
        (Err((key, msg)), None) => {
            assert!(key.starts_with("policy.rules["), "error key {key:?}");
            assert!(!msg.is_empty());
        }
        (got, want) => panic!(
            "Policy::new({rules:?}) is {} but the model says {}",
            if got.is_ok() { "Ok" } else { "Err" },
            if want.is_some() { "valid" } else { "invalid" }
        ),
    }
}

fn ceiling_only(permission: Permission) -> Policy {
    Policy::new(&PolicyConfig {
        permission,
        rules: Vec::new(),
    })
    .expect("a policy without rules compiles")
}

fn fixed_rules() -> Vec<RuleConfig> {
    let rule = |action, methods: &[&str], path: &str| RuleConfig {
        action,
        methods: methods.iter().map(|m| m.to_string()).collect(),
        path: path.to_owned(),
    };
    vec![
        rule(RuleAction::Deny, &["POST"], "/api/v3/brokerage/orders/edit"),
        rule(RuleAction::Allow, &["post"], "/v2/accounts/*/transactions"),
        rule(RuleAction::Deny, &["*"], "/api/v3/brokerage/orders/**"),
        rule(
            RuleAction::Deny,
            &["POST", "PUT"],
            "/v2/accounts/*/withdrawals",
        ),
        rule(
            RuleAction::Deny,
            &[],
            "/api/v3/brokerage/portfolios/move_funds",
        ),
        rule(
            RuleAction::Allow,
            &["DELETE"],
            "/api/v3/brokerage/portfolios/*",
        ),
    ]
}

fn rule_from_line(line: &str) -> RuleConfig {
    let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
    let (methods, path) = rest.split_once(' ').unwrap_or(("", rest));
    RuleConfig {
        action: if head.starts_with('a') {
            RuleAction::Allow
        } else {
            RuleAction::Deny
        },
        methods: if methods.is_empty() {
            Vec::new()
        } else {
            methods.split(',').map(str::to_owned).collect()
        },
        path: path.to_owned(),
    }
}

/// What `check_path` promises about a path it accepts.
fn check_canonical(path: &str) {
    let b = path.as_bytes();
    assert_eq!(
        b.first(),
        Some(&b'/'),
        "accepted {path:?} without a leading /"
    );
    assert!(
        b.iter().all(|c| (0x21..=0x7e).contains(c)),
        "accepted {path:?} with a byte outside 0x21..=0x7e"
    );
    assert!(!path.contains('\\'), "accepted a backslash in {path:?}");
    assert!(!path.contains("//"), "accepted // in {path:?}");
    assert!(
        !path[1..].split('/').any(|s| s == "." || s == ".."),
        "accepted a dot segment in {path:?}"
    );
    let lower = path.to_ascii_lowercase();
    for bad in ["%2f", "%2e", "%5c", "%00"] {
        assert!(!lower.contains(bad), "accepted {bad} in {path:?}");
    }
    for (i, _) in path.match_indices('%') {
        assert!(
            b.len() > i + 2 && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit(),
            "accepted a malformed % escape in {path:?}"
        );
    }
    let decoded = percent_decode(path);
    assert!(
        !decoded.iter().any(|&c| c < 0x20 || c == 0x7f || c == b'\\'),
        "{path:?} decodes to a control byte or backslash"
    );
    assert_eq!(
        decoded.iter().filter(|&&c| c == b'/').count(),
        b.iter().filter(|&&c| c == b'/').count(),
        "{path:?} decodes to extra /"
    );
    assert!(
        !decoded.windows(2).any(|w| w == b"//"),
        "{path:?} decodes to //"
    );
    assert!(
        !decoded[1..]
            .split(|&c| c == b'/')
            .any(|s| s == b"." || s == b".."),
        "{path:?} decodes to a dot segment"
    );
    assert!(
        b.iter().all(|&c| unreserved(c) || c == b'/' || c == b'%'),
        "accepted {path:?} with a raw byte outside unreserved, / and %"
    );
    for seg in decoded[1..].split(|&c| c == b'/') {
        assert!(
            seg.iter().all(|&c| unreserved(c)),
            "accepted {path:?}: segment {:?} decodes to a byte outside A-Z a-z 0-9 - . _ ~",
            String::from_utf8_lossy(seg)
        );
        assert!(
            seg.last() != Some(&b'.'),
            "accepted {path:?}: a segment ends in a dot"
        );
    }
}

/// RFC 3986 §2.3, written out.
fn unreserved(c: u8) -> bool {
    c.is_ascii_uppercase()
        || c.is_ascii_lowercase()
        || c.is_ascii_digit()
        || c == b'-'
        || c == b'.'
        || c == b'_'
        || c == b'~'
}

/// Percent-decoding as RFC 3986 and the `percent-encoding` crate do it: `%` plus two hex
/// digits is one byte; any other `%` stays.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

// The reference model: an independent, deliberately plain reading of the documented policy.

enum ModelSeg {
    Literal(String),
    One,
    Rest,
}

struct ModelRule {
    allow: bool,
    /// `None`: every method.
    methods: Option<Vec<String>>,
    pattern: Vec<ModelSeg>,
}

/// The rules as the model reads them, or `None` when one is invalid: a pattern must start with
/// `/`, `*` and `**` must be whole segments and `**` the last one; a method must be a non-empty
/// HTTP token once upper-cased, and `*` (for all methods) ends the list.
fn model_compile(rules: &[RuleConfig]) -> Option<Vec<ModelRule>> {
    let mut out = Vec::new();
    for r in rules {
        let rest = r.path.strip_prefix('/')?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let parts: Vec<&str> = rest.split('/').collect();
        let mut pattern = Vec::new();
        for (i, s) in parts.iter().enumerate() {
            pattern.push(match *s {
                "*" => ModelSeg::One,
                "**" if i + 1 == parts.len() => ModelSeg::Rest,
                s if s.contains('*') => return None,
                // The root pattern `/`.
                "" if parts.len() == 1 => ModelSeg::Literal(String::new()),
                s => {
                    let d = percent_decode(s);
                    if d.is_empty() || !d.iter().all(|&c| unreserved(c)) || d.ends_with(b".") {
                        return None;
                    }
                    ModelSeg::Literal(String::from_utf8_lossy(&d).to_ascii_lowercase())
                }
            });
        }
        let mut methods = Some(Vec::new());
        for m in &r.methods {
            if m == "*" {
                methods = None;
                break;
            }
            let upper = m.to_ascii_uppercase();
            let token = !upper.is_empty()
                && upper
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
            if !token {
                return None;
            }
            if let Some(v) = methods.as_mut() {
                v.push(upper);
            }
        }
        let methods = methods.filter(|v| !v.is_empty());
        out.push(ModelRule {
            allow: r.action == RuleAction::Allow,
            methods,
            pattern,
        });
    }
    Some(out)
}

fn model_matches(pattern: &[ModelSeg], path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let segs: Vec<&str> = rest.split('/').collect();
    for (i, p) in pattern.iter().enumerate() {
        let seg = segs.get(i);
        match (p, seg) {
            (ModelSeg::Rest, _) => return true,
            (ModelSeg::One, Some(s)) if !s.is_empty() => {}
            (ModelSeg::Literal(l), Some(s))
                if l == s || (!l.is_empty() && s.starts_with(&format!("{l}."))) => {}
            _ => return false,
        }
    }
    segs.len() == pattern.len()
}

/// The documented matching form: percent-decoded, ASCII case folded, no trailing '/'.
fn match_form(path: &str) -> String {
    let mut p = String::from_utf8_lossy(&percent_decode(path)).to_ascii_lowercase();
    if p.len() > 1 && p.ends_with('/') {
        p.pop();
    }
    p
}

fn model_decide(permission: Permission, rules: &[ModelRule], method: &Method, path: &str) -> bool {
    let decoded = match_form(path);
    for r in rules {
        let method_ok = match &r.methods {
            None => true,
            Some(v) => v
                .iter()
                .any(|m| m == method.as_str() || (method == Method::HEAD && m == "GET")),
        };
        if method_ok && model_matches(&r.pattern, &decoded) {
            return r.allow;
        }
    }
    let read = method == Method::GET || method == Method::HEAD;
    match permission {
        Permission::View => read,
        Permission::Trade => {
            read || decoded == "/api/v3/brokerage/orders"
                || decoded.starts_with("/api/v3/brokerage/orders/")
                || decoded.starts_with("/api/v3/brokerage/convert/")
        }
        Permission::Transfer => true,
    }
}
