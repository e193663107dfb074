//! `cbgate check --online`: one signed call per CDP credential through the same signing path
//! and upstream client as the proxy, `GET /api/v3/brokerage/key_permissions`, with the exact
//! reason when it fails.

use crate::config::{KeyKind, DEFAULT_KEY};
use crate::forward::upstream::OwnCall;
use crate::ops::clock;
use crate::proxy::Proxy;
use crate::sign::jwt::Binding;
use crate::sign::keys::Credential;

/// The endpoint that tells what a key may do.
pub const PERMISSIONS_PATH: &str = "/api/v3/brokerage/key_permissions";

/// What the online check learned.
#[derive(Debug)]
pub struct Online {
    /// Coinbase's clock minus ours, when it could be measured.
    pub clock_offset: Result<f64, String>,
    /// Each CDP credential probed, by name (`default` is `[key]`), with its permissions
    /// (`can_view`, `can_trade`, `can_transfer`, `portfolio_uuid`, `portfolio_type`) or why
    /// the call failed.
    pub permissions: Vec<(String, Result<serde_json::Value, String>)>,
}

/// Measures the clock, then asks Coinbase for the permissions of every CDP credential (`[key]`
/// as `default`, and each CDP `[keys.NAME]`), or of `only` that one. HMAC credentials have no
/// such endpoint and are skipped; a name that is no CDP credential is an error for that name.
pub async fn online(proxy: &Proxy, only: Option<&str>) -> Online {
    let Some(route) = proxy.router().find(PERMISSIONS_PATH) else {
        let none = format!("no route for {PERMISSIONS_PATH}");
        return Online {
            clock_offset: Err(none.clone()),
            permissions: vec![("-".into(), Err(none))],
        };
    };
    let upstream = &route.upstream;
    let clock_offset = clock::measure(proxy, upstream).await;
    if let Ok(offset) = clock_offset {
        clock::apply(proxy, offset);
    }
    let mut names: Vec<String> = Vec::new();
    if proxy.signer().key().is_some() {
        names.push(DEFAULT_KEY.to_owned());
    }
    names.extend(
        proxy
            .keys()
            .iter()
            .filter(|k| k.kind() == KeyKind::Cdp)
            .map(|k| k.name().to_owned()),
    );
    if let Some(only) = only {
        // The name is printed: a pasted secret is not repeated (it matches no credential).
        let printable =
            crate::config::valid_key_name(only) && !crate::config::looks_like_key_material(only);
        names = vec![if printable {
            only.to_owned()
        } else {
            crate::config::shown(only)
        }];
    }
    let mut permissions = Vec::new();
    for name in names {
        let result = permissions_of(proxy, route, &name, &clock_offset).await;
        permissions.push((name, result));
    }
    Online {
        clock_offset,
        permissions,
    }
}

/// A JWT for the permissions call, signed by the credential `name`.
fn token_for(
    proxy: &Proxy,
    name: &str,
    binding: &Binding<'_>,
    claims: crate::sign::jwt::ClaimStyle,
) -> Result<String, String> {
    if name == DEFAULT_KEY {
        return proxy
            .signer()
            .mint(claims, binding)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no [key] configured (pass --key-file or set COINBASE_API_KEY + COINBASE_API_SECRET)".to_owned());
    }
    let Some(named) = proxy.keys().get(name) else {
        let mut known = proxy.keys().names();
        known.insert(0, DEFAULT_KEY);
        return Err(format!(
            "{} is not a configured credential; configured: {}",
            crate::config::shown(name),
            known.join(", ")
        ));
    };
    match named.current().as_ref() {
        Credential::Cdp(key) => {
            let now = crate::sign::jwt::now_secs(proxy.signer().clock_offset());
            crate::sign::jwt::mint(key, now, claims, binding).map_err(|e| e.to_string())
        }
        Credential::Hmac(h) => Err(format!(
            "of kind {}: key_permissions is a CDP endpoint, so only CDP credentials can be probed",
            h.kind().as_str()
        )),
    }
}

async fn permissions_of(
    proxy: &Proxy,
    route: &crate::gate::route::Route,
    name: &str,
    clock_offset: &Result<f64, String>,
) -> Result<serde_json::Value, String> {
    let upstream = &route.upstream;
    let binding = Binding {
        method: "GET",
        host: &upstream.authority,
        path: PERMISSIONS_PATH,
    };
    let token = token_for(proxy, name, &binding, upstream.claims)?;
    let (status, _, body) = proxy
        .upstream()
        .call(
            OwnCall {
                method: http::Method::GET,
                host: &upstream.host,
                authority: &upstream.authority,
                path: PERMISSIONS_PATH,
                token: Some(&token),
                body: None,
            },
            64 * 1024,
        )
        .await?;
    if status.as_u16() == 401 {
        let skew = match clock_offset {
            Ok(o) => format!("measured clock offset {o:+.1} s (cbgate corrects offsets over 1 s)"),
            Err(_) => "the clock offset could not be measured".into(),
        };
        return Err(format!(
            "401 from Coinbase: the token was refused. Usual causes: the key was deleted or \
             lacks permissions (compare the name and fingerprint with the portal), an Ed25519 key \
             used on the /v2 App API, a clock off by more than a few seconds ({skew}), or an \
             Exchange/Prime key instead of a CDP key"
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{status} from Coinbase: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}
