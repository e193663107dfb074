//! `cbgate token`: a fresh JWT for one request, as the Coinbase docs' script prints; `--key`
//! picks a named CDP credential.

use std::collections::HashMap;

use anyhow::Context as _;

use cbgate::config::{Config, DEFAULT_KEY};
use cbgate::gate::route::{Router, Upstream};
use cbgate::sign::jwt::{self, Binding, ClaimStyle};
use cbgate::sign::key::ApiKey;
use cbgate::sign::keys::Credential;

use super::{config_err, load, Failure, Loaded, Overrides, TokenArgs};

/// Prints one token.
pub fn run(args: TokenArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let Loaded { cfg, key, keys, .. } = load(&args.common, Overrides::default(), env)?;
    // The named credential stays loaded (and zeroized on drop) for as long as `key` borrows it.
    let named;
    let key: &ApiKey = match args.key.as_deref() {
        None | Some(DEFAULT_KEY) => key.as_ref().ok_or_else(|| {
            config_err(anyhow::anyhow!(
                "no API key configured: pass --key-file or set COINBASE_API_KEY + COINBASE_API_SECRET{}",
                if keys.names().is_empty() {
                    String::new()
                } else {
                    format!(", or pick a named credential with --key ({})", keys.names().join(", "))
                }
            ))
        })?,
        Some(name) => {
            named = keys
                .get(name)
                .ok_or_else(|| {
                    let mut known = keys.names();
                    known.insert(0, DEFAULT_KEY);
                    config_err(anyhow::anyhow!(
                        "--key names the credential {}, which is not configured; configured: {}",
                        cbgate::config::shown(name),
                        known.join(", ")
                    ))
                })?
                .current();
            match named.as_ref() {
                Credential::Cdp(k) => k,
                Credential::Hmac(h) => {
                    return Err(config_err(anyhow::anyhow!(
                        "--key {name} is of kind {}: Exchange, Prime and INTX keys sign each request with HMAC headers, there is no token to mint; send the request through cbgate (cbgate-key: {name}), or give a CDP credential",
                        h.kind().as_str()
                    )))
                }
            }
        }
    };
    let now = jwt::now_secs(0);
    let token = if args.ws {
        let none = Binding {
            method: "",
            host: "",
            path: "",
        };
        jwt::mint(key, now, ClaimStyle::None, &none)
    } else {
        let method = args.method.unwrap_or_default().to_ascii_uppercase();
        let target = args.path_or_url.unwrap_or_default();
        let (upstream, path) = token_target(&cfg, &target).map_err(config_err)?;
        let binding = Binding {
            method: &method,
            host: &upstream.authority,
            path: &path,
        };
        jwt::mint(key, now, upstream.claims, &binding)
    }
    .map_err(|e| Failure::Runtime(e.into()))?;
    println!("{token}");
    Ok(())
}

/// Splits a `token` target into the upstream and the path (the query never enters the claim).
fn token_target(cfg: &Config, target: &str) -> anyhow::Result<(Upstream, String)> {
    let without_query = |p: &str| p.split(['?', '#']).next().unwrap_or("/").to_owned();
    if target.starts_with('/') {
        let router = Router::new(&cfg.routes).map_err(anyhow::Error::msg)?;
        let route = router.find(target).with_context(|| {
            format!(
                "no route for {}; routes: {}",
                cbgate::config::shown(target),
                router.prefixes().join(", ")
            )
        })?;
        let upstream = Upstream::parse(&format!("https://{}", route.upstream.authority))
            .map_err(anyhow::Error::msg)?;
        return Ok((upstream, without_query(target)));
    }
    let full = if target.contains("://") {
        target.to_owned()
    } else {
        format!("https://{target}")
    };
    let url = url::Url::parse(&full)
        .with_context(|| format!("{} is not a path or URL", cbgate::config::shown(target)))?;
    let base = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default())
        + &url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let upstream = Upstream::parse(&base).map_err(anyhow::Error::msg)?;
    // Url::path() is percent-encoded and has dot segments resolved: the same path a client
    // library would send for this URL (cbgate itself refuses paths with dot segments).
    Ok((upstream, url.path().to_owned()))
}
