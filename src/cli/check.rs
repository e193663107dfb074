//! `cbgate check [--online [--key NAME]]`: the same validation `serve` runs, then optionally one
//! signed call per CDP credential.

use std::collections::HashMap;

use anyhow::Context as _;

use cbgate::config::KeyKind;
use cbgate::ops::harden;
use cbgate::proxy::Proxy;

use super::{config_err, load, CheckArgs, Failure, Loaded, Overrides};

/// Checks configuration and key, and with `--online` the key at Coinbase.
pub fn run(
    args: CheckArgs,
    env: HashMap<String, String>,
    hardening: &harden::Report,
) -> Result<(), Failure> {
    let Loaded {
        cfg,
        key,
        client_token,
        client_tokens,
        wallet,
        keys,
        ..
    } = load(&args.common, Overrides::default(), env)?;
    let named: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "credential {}: kind {}, fingerprint {}",
                k.name(),
                k.kind().as_str(),
                k.current().fingerprint()
            )
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)?;
    let key_lines = key.as_ref().map(|k| {
        [
            format!("key: {}", k.name()),
            format!("algorithm: {}", k.algorithm().as_str()),
            format!("public key fingerprint: {}", k.fingerprint()),
        ]
    });
    // Any CDP credential will do: `[key]` or a CDP `[keys.NAME]`.
    let has_cdp = key.is_some() || keys.iter().any(|k| k.kind() == KeyKind::Cdp);
    // Exactly what `serve` builds before it binds, so `check` fails where `serve` would.
    let proxy = runtime
        .block_on(async {
            Proxy::new(&cfg, key).and_then(|p| {
                p.with_keys(keys)
                    .with_client_token(client_token, &cfg)
                    .with_client_tokens(client_tokens)
            })
        })
        .map_err(config_err)?;
    let listen: Vec<String> = cfg.listen.iter().map(ToString::to_string).collect();
    println!(
        "config: ok (listen {}; {} routes)",
        listen.join(", "),
        cfg.routes.len()
    );
    if !cfg.clients.named.is_empty() || cfg.client_token_file.is_some() {
        let mut shown = Vec::new();
        if cfg.client_token_file.is_some() {
            shown.push(format!(
                "default (client_token_file, {})",
                cfg.policy.permission.as_str()
            ));
        }
        for (name, c) in &cfg.clients.named {
            let mut by = Vec::new();
            if c.token_file.is_some() {
                by.push("token".to_owned());
            }
            if let Some(u) = c.unix_uid {
                by.push(format!("unix_uid {u}"));
            }
            if let Some(g) = c.unix_gid {
                by.push(format!("unix_gid {g}"));
            }
            let rules = match c.rules.len() {
                0 => String::new(),
                1 => ", 1 rule".to_owned(),
                n => format!(", {n} rules"),
            };
            shown.push(format!(
                "{name} ({}, {}{rules})",
                by.join(", "),
                c.permission.unwrap_or(cfg.policy.permission).as_str()
            ));
        }
        println!(
            "clients: {}; no known identity: {}",
            shown.join("; "),
            if cfg.identity_required() {
                "refused (401)"
            } else {
                "served as anonymous with the global policy"
            }
        );
    }
    for w in cfg.warnings() {
        println!("warning: {w}");
    }
    match key_lines {
        Some(lines) => {
            for line in lines {
                println!("{line}");
            }
            println!("self-test: a signed token verified against the public key");
        }
        None => println!(
            "key: none configured; requests will be forwarded unsigned (public endpoints only)"
        ),
    }
    if wallet.is_some() {
        println!("wallet secret: loaded; X-Wallet-Auth is minted for CDP v2 wallet requests");
    }
    for line in &named {
        println!("{line}");
    }
    let yes_no = |b: bool| if b { "yes" } else { "NO" };
    println!(
        "hardening: core dumps off: {}; not dumpable: {}; memory locked: {}",
        yes_no(hardening.core_dumps_disabled),
        yes_no(hardening.not_dumpable),
        match &hardening.memory_locked {
            Ok(()) => "yes".to_owned(),
            Err(why) => format!("NO ({why})"),
        }
    );
    let files = &hardening.open_files;
    let needed = harden::descriptors_needed(&cfg);
    let limit = |v: Option<u64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
    println!(
        "open files: soft limit {} (hard {}{}); the connection limits need up to {needed}",
        limit(files.soft),
        limit(files.hard),
        files
            .raised_from
            .map(|v| format!(", raised from {v}"))
            .unwrap_or_default(),
    );
    if let Some(warning) = files.shortfall(needed) {
        println!("warning: {warning}");
    }
    if !args.online {
        return Ok(());
    }
    if !has_cdp {
        return Err(config_err(anyhow::anyhow!(
            "--online needs a CDP key: pass --key-file, set COINBASE_API_KEY + COINBASE_API_SECRET, or configure a [keys.NAME] with kind = \"cdp\""
        )));
    }
    let report = runtime.block_on(cbgate::ops::online::online(&proxy, args.key.as_deref()));
    match &report.clock_offset {
        Ok(o) => println!("clock offset: {o:+.2} s (Coinbase minus local)"),
        Err(e) => println!("clock offset: not measured ({e})"),
    }
    let mut failed = Vec::new();
    for (name, result) in &report.permissions {
        match result {
            Ok(p) => {
                let field = |f: &str| p.get(f).unwrap_or(&serde_json::Value::Null).to_string();
                // One line per credential: which portfolio it is scoped to, and what it may do.
                println!(
                    "online: credential {name}: ok; portfolio_uuid: {}, portfolio_type: {}; can_view: {}, can_trade: {}, can_transfer: {}",
                    field("portfolio_uuid"),
                    field("portfolio_type"),
                    field("can_view"),
                    field("can_trade"),
                    field("can_transfer"),
                );
            }
            Err(e) => {
                println!("online: credential {name}: FAILED");
                failed.push(format!("credential {name}: {e}"));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Runtime(anyhow::anyhow!(
            "online check failed: {}",
            failed.join("; ")
        )))
    }
}
