//! `cbgate halt [--reason TEXT] [--cancel-open]`, `cbgate resume`, `cbgate status`: the kill
//! switch, through the running cbgate's admin listener (`POST /halt`, `POST /resume`,
//! `GET /status`), so the halt takes effect in the process that holds the key.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use zeroize::Zeroizing;

use cbgate::config::{Config, Sources};

use super::{config_err, ConfigArg, Failure};

/// Flags every kill-switch command takes.
#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The admin listener to talk to (overrides `admin_listen`).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

#[derive(Args, Debug)]
pub struct HaltArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Why, shown in every refusal and in `cbgate status`.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// Also cancel every open order of each signing key (Advanced Trade, the derivatives
    /// gateway and Exchange keys; INTX and Prime keys are reported as not cancelled), and
    /// report each id.
    #[arg(long)]
    pub cancel_open: bool,
}

/// How long a plain call may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// With `--cancel-open`: listing and cancelling can take many calls to Coinbase.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(300);

/// `cbgate halt`.
pub fn halt(args: HaltArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let body = serde_json::json!({ "reason": args.reason, "cancel_open": args.cancel_open });
    let timeout = if args.cancel_open {
        CANCEL_TIMEOUT
    } else {
        TIMEOUT
    };
    let v = call(
        &args.admin,
        env,
        "POST",
        "/halt",
        Some(body.to_string()),
        timeout,
    )?;
    print_status(&v);
    let mut ok = v.get("error").is_none();
    match v.get("replicas") {
        Some(r) if r.get("reached").and_then(|x| x.as_bool()) == Some(false) => {
            ok = false;
            eprintln!(
                "cbgate: {}",
                r.get("message").and_then(|m| m.as_str()).unwrap_or("")
            );
        }
        Some(_) => println!("shared through Redis: every replica halts within a poll"),
        None => {}
    }
    if let Some(c) = v.get("cancel") {
        ok &= print_cancel(c);
    }
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        eprintln!("cbgate: {e}");
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::Runtime(anyhow::anyhow!(
            "the halt is on, but not everything succeeded (see above)"
        )))
    }
}

/// `cbgate resume`.
pub fn resume(args: AdminArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let v = call(&args, env, "POST", "/resume", Some(String::new()), TIMEOUT)?;
    print_status(&v);
    Ok(())
}

/// `cbgate status`.
pub fn status(args: AdminArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let v = call(&args, env, "GET", "/status", None, TIMEOUT)?;
    print_status(&v);
    if let Some(b) = v.get("budget") {
        print_budget(b);
    }
    Ok(())
}

fn print_status(v: &serde_json::Value) {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    if v.get("halted").and_then(|h| h.as_bool()) == Some(true) {
        println!(
            "halted since {}: {} (orders are refused; cancels and reads pass)",
            s("since"),
            s("reason")
        );
    } else {
        println!("not halted: orders pass (subject to [guard])");
    }
    if let Some(by) = v.get("by").and_then(|b| b.as_str()) {
        println!("  halted by replica {by}");
    }
    if v.get("state_dir").is_some_and(|d| d.is_null()) {
        println!("note: no state_dir, so a halt does not survive a restart");
    }
    print_shared(v.get("shared").unwrap_or(&serde_json::Value::Null));
}

/// The shared kill switch of `/status`: Redis, this replica, the last change seen there.
fn print_shared(sh: &serde_json::Value) {
    if sh.is_null() {
        println!("kill switch: this replica only (no budget.redis, or shared_halt = false)");
        return;
    }
    let s = |k: &str| sh.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    println!(
        "kill switch: shared through {} as replica {} ({})",
        s("redis"),
        s("replica"),
        s("state")
    );
    if let Some(c) = sh.get("last_change").filter(|c| !c.is_null()) {
        let what = if c.get("halted").and_then(|h| h.as_bool()) == Some(true) {
            "halted"
        } else {
            "resumed"
        };
        println!(
            "  last change: {what} by {} at {} (version {})",
            c.get("by").and_then(|x| x.as_str()).unwrap_or("?"),
            c.get("at").and_then(|x| x.as_str()).unwrap_or("?"),
            c.get("version").and_then(|x| x.as_u64()).unwrap_or(0)
        );
    }
    if sh.get("pending_push").and_then(|p| p.as_bool()) == Some(true) {
        println!("  the halt made here is NOT yet in Redis: the other replicas are not halted until it answers");
    }
    if let Some(e) = sh.get("last_error").and_then(|e| e.as_str()) {
        println!("  Redis error since {}: {e}", s("last_error_at"));
    }
}

/// Prints the rate budget of `/status`: the mode, then one line per bucket in use.
fn print_budget(b: &serde_json::Value) {
    let s =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let mode = s(b, "mode");
    let redis = b
        .get("redis")
        .and_then(|r| r.get("url"))
        .and_then(|u| u.as_str())
        .map(|u| format!(" via {u}"))
        .unwrap_or_default();
    println!(
        "rate budget: {mode}{redis}, max wait {} ms",
        n(b, "max_wait_ms")
    );
    if let Some(e) = b
        .get("redis")
        .and_then(|r| r.get("last_error"))
        .and_then(|e| e.as_str())
    {
        let at = b
            .get("redis")
            .and_then(|r| r.get("last_error_at"))
            .and_then(|e| e.as_str())
            .unwrap_or("?");
        println!("  Redis error since {at}: {e}");
    } else if let Some(o) = b
        .get("redis")
        .and_then(|r| r.get("last_outage"))
        .filter(|o| !o.is_null())
    {
        let s = |k: &str| o.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
        println!(
            "  recovered at {} from a Redis outage since {}: {}",
            s("recovered_at"),
            s("at"),
            s("error")
        );
    }
    for bucket in b
        .get("buckets")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let paused = n(bucket, "paused_ms");
        let paused = if paused > 0.0 {
            format!(", PAUSED {paused} ms (Coinbase said 429)")
        } else {
            String::new()
        };
        println!(
            "  {} {}: {} of {} tokens left ({}/s), {} waiting{paused}",
            s(bucket, "credential"),
            s(bucket, "class"),
            n(bucket, "tokens"),
            n(bucket, "burst"),
            n(bucket, "rate_per_second"),
            n(bucket, "waiting"),
        );
    }
}

/// Prints what `--cancel-open` did (`[key]`, then each `[keys.NAME]`); true when every open
/// order of every key was cancelled.
fn print_cancel(c: &serde_json::Value) -> bool {
    let mut ok = print_one("", c);
    for k in c
        .get("keys")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let label = format!(
            "key {} ({}): ",
            k.get("key").and_then(|x| x.as_str()).unwrap_or("?"),
            k.get("kind").and_then(|x| x.as_str()).unwrap_or("?")
        );
        if let Some(why) = k.get("skipped").and_then(|x| x.as_str()) {
            println!("{label}{why}");
            ok = false;
        } else {
            ok &= print_one(&label, k);
        }
    }
    ok
}

/// Prints one key's cancel report; true when every open order was cancelled.
fn print_one(label: &str, c: &serde_json::Value) -> bool {
    let ids = |k: &str| -> Vec<serde_json::Value> {
        c.get(k)
            .and_then(|x| x.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let open = c.get("open").and_then(|x| x.as_u64()).unwrap_or(0);
    let cancelled = ids("cancelled");
    let failed = ids("failed");
    println!("{label}cancelled {} of {open} open orders", cancelled.len());
    for id in &cancelled {
        println!("  cancelled {}", id.as_str().unwrap_or("?"));
    }
    let mut ok = true;
    if let Some(d) = c.get("derivatives").filter(|d| !d.is_null()) {
        let n = d.get("cancelled").and_then(|x| x.as_u64()).unwrap_or(0);
        if let Some(why) = d.get("skipped").and_then(|x| x.as_str()) {
            println!("  derivatives gateway: skipped: {why}");
        } else if let Some(e) = d.get("error").and_then(|x| x.as_str()) {
            println!("  derivatives gateway: NOT cancelled: {e}");
            ok = false;
        } else {
            println!("  derivatives gateway: cancelled {n} open orders (private/cancel_all)");
        }
    }
    for f in &failed {
        println!(
            "  NOT cancelled {}: {}",
            f.get("order_id").and_then(|x| x.as_str()).unwrap_or("?"),
            f.get("reason").and_then(|x| x.as_str()).unwrap_or("?")
        );
    }
    let error = c.get("error").and_then(|x| x.as_str());
    if let Some(e) = error {
        println!("  stopped: {e}");
    }
    ok && failed.is_empty() && error.is_none()
}

/// One call to the admin listener; the JSON answer of a 200.
fn call(
    args: &AdminArgs,
    env: HashMap<String, String>,
    method: &str,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> Result<serde_json::Value, Failure> {
    let sources = Sources {
        file: args.config.config.clone(),
        env,
        listen: Vec::new(),
        admin_listen: args.admin_listen.clone(),
        key_file: None,
    };
    let cfg = Config::load(&sources).map_err(config_err)?;
    let token = match &cfg.admin_token_file {
        None => None,
        Some(p) => Some(super::load_admin_token(p).map_err(config_err)?),
    };
    let (status, text) = request(
        cfg.admin_listen,
        method,
        path,
        token.as_deref().map(String::as_str),
        body.as_deref(),
        timeout,
    )
    .with_context(|| format!("cannot reach the admin listener at {}", cfg.admin_listen))
    .map_err(Failure::Runtime)?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if status != 200 && !(status == 500 && v.get("halted").is_some()) {
        let msg = v
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| text.trim().to_owned());
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{method} {path}: {status}: {msg}"
        )));
    }
    Ok(v)
}

/// A blocking HTTP/1.0 request on loopback (a wildcard address is reached through loopback).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Zeroizing::new(format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n"));
    if let Some(t) = token {
        head.push_str("Authorization: Bearer ");
        head.push_str(t);
        head.push_str("\r\n");
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b.as_bytes())?;
    }
    let mut out = Vec::new();
    s.take(16 * 1024 * 1024).read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
