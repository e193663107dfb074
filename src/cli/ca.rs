//! `cbgate ca`: the local CA of the `https://` listeners and of `[intercept]`; and the TLS
//! set-up `serve` uses.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;

use cbgate::config::{Config, Sources};
use cbgate::listen::ca::LocalCa;
use cbgate::listen::tls::TlsContext;

use super::{config_err, CaArgs, Failure};

/// Prints the CA certificate (made first if needed), its path, or replaces it.
pub fn run(args: CaArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let sources = Sources {
        file: args.config.config.clone(),
        env,
        ..Sources::default()
    };
    let cfg = Config::load(&sources).map_err(config_err)?;
    let state_dir = cfg.state_dir.clone().ok_or_else(|| {
        config_err(anyhow::anyhow!(
            "no state_dir (nor STATE_DIRECTORY, XDG_STATE_HOME, HOME): set state_dir, where the local CA lives"
        ))
    })?;
    let hosts = cfg.upstream_hosts();
    let ca = if args.rotate {
        LocalCa::rotate(&state_dir, &hosts)
    } else {
        LocalCa::load_or_create(&state_dir, &hosts)
    }
    .map_err(|e| Failure::Runtime(e.into()))?;
    let mut out = std::io::stdout().lock();
    let written = if args.path {
        writeln!(out, "{}", ca.cert_path().display())
    } else {
        out.write_all(ca.cert_pem().as_bytes())
    };
    written.map_err(|e| Failure::Runtime(e.into()))?;
    if args.rotate {
        eprintln!(
            "cbgate: a new local CA replaced the old one; restart cbgate, and give clients the new {}",
            ca.cert_path().display()
        );
    }
    let missing = ca.missing(&hosts);
    if !missing.is_empty() {
        eprintln!(
            "cbgate: this CA was made before {} were configured and cannot vouch for them; run `cbgate ca --rotate`",
            missing.join(", ")
        );
    }
    Ok(())
}

/// TLS towards clients, when `https://` listeners or `[intercept]` need it: the static
/// certificate of `[tls]` and/or the local CA in `state_dir` (made on first use).
pub fn tls_context(cfg: &Config) -> anyhow::Result<Option<Arc<TlsContext>>> {
    if !cfg.needs_client_tls() {
        return Ok(None);
    }
    let cert = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    // The CA is needed for interception always, and for the listeners without [tls].
    let ca = if cert.is_none() || cfg.intercept.enabled {
        let dir = cfg.state_dir.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "the local CA needs a state_dir (nor STATE_DIRECTORY, XDG_STATE_HOME, HOME is set): set state_dir, or tls.cert_file and tls.key_file"
            )
        })?;
        let hosts = cfg.upstream_hosts();
        let ca = LocalCa::load_or_create(dir, &hosts)?;
        let missing = ca.missing(&hosts);
        if !missing.is_empty() {
            tracing::warn!(
                hosts = missing.join(", "),
                "the local CA was made before these upstream hosts were configured and cannot vouch for them: run `cbgate ca --rotate`"
            );
        }
        if ca.expires_within(std::time::Duration::from_secs(30 * 24 * 3600)) {
            tracing::warn!("the local CA expires within 30 days: run `cbgate ca --rotate` and give clients the new one");
        }
        tracing::info!(ca = %ca.cert_path().display(), "local CA (name-constrained to the upstream hosts, localhost and loopback); print it with `cbgate ca`");
        Some(Arc::new(ca))
    } else {
        None
    };
    Ok(Some(Arc::new(TlsContext::new(cert, ca)?)))
}
