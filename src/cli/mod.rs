//! The subcommands, one file each; `main.rs` parses the flags and calls one of them.
//! This is the binary's side: it may use everything in the library, and `anyhow` for messages.

pub mod audit;
pub mod ca;
pub mod check;
pub mod completions;
pub mod halt;
pub mod health;
pub mod man;
pub mod placeholder;
pub mod serve;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use zeroize::{Zeroize as _, Zeroizing};

use cbgate::config::{Config, Sources};
use cbgate::sign::jwt;
use cbgate::sign::key::{ApiKey, KeyError, KeySource};
use cbgate::sign::wallet::WalletSecret;

/// Exit code for bad configuration (flags, file, environment or key).
pub const EXIT_CONFIG: u8 = 2;

/// cbgate: a local authenticating reverse proxy for the Coinbase APIs.
///
/// Send plain HTTP to cbgate (default http://127.0.0.1:8750) instead of https://api.coinbase.com;
/// cbgate signs each request with a fresh JWT and forwards it over verified TLS. The key comes
/// from --key-file (the CDP key JSON) or COINBASE_API_KEY + COINBASE_API_SECRET.
#[derive(Parser, Debug)]
#[command(name = "cbgate", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Serve(ServeArgs),
    /// Print a fresh JWT for one request, as the Coinbase docs' script does.
    #[command(
        override_usage = "cbgate token [OPTIONS] <METHOD> <PATH_OR_URL>\n       cbgate token [OPTIONS] --ws"
    )]
    Token(TokenArgs),
    /// Validate the configuration and key; print the key name, algorithm and fingerprint.
    Check(CheckArgs),
    /// Probe the admin /readyz (or /livez) and exit 0 when it answers 200, 1 otherwise: for
    /// Docker HEALTHCHECK and Kubernetes exec probes in an image without curl.
    Health(HealthArgs),
    /// Kill switch: refuse every new or edited order (cancels and reads still pass) until
    /// `cbgate resume`; survives a restart. Talks to the running cbgate's admin listener.
    Halt(halt::HaltArgs),
    /// Lift the kill switch: orders pass again (subject to [guard]).
    Resume(halt::AdminArgs),
    /// Show whether trading is halted, why and since when.
    Status(halt::AdminArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a throwaway credential for a client library that insists on one: cbgate removes
    /// the client's signatures and signs with the real key, so the client gets this instead.
    /// Default: a CDP key JSON with a fresh P-256 key (SEC1), named organizations/placeholder/...
    PlaceholderKey(placeholder::PlaceholderArgs),
    /// Print the local CA certificate (PEM) of the https:// listeners and of [intercept],
    /// making it in state_dir on first use.
    ///
    /// The CA is name-constrained (RFC 5280) to the upstream hosts of routes and ws_routes,
    /// localhost and the loopback addresses: it cannot vouch for any other site. Trust it per
    /// client process, never in the system store (its key is on this disk: in the system store
    /// it would vouch for Coinbase's hosts to every program on the machine):
    ///
    ///   cbgate ca > cbgate-ca.pem
    ///   REQUESTS_CA_BUNDLE=cbgate-ca.pem python app.py      (requests, coinbase-advanced-py)
    ///   SSL_CERT_FILE=cbgate-ca.pem python app.py           (aiohttp, urllib, cdp-sdk)
    ///   NODE_EXTRA_CA_CERTS=cbgate-ca.pem node app.js       (Node.js)
    ///   curl --cacert cbgate-ca.pem https://127.0.0.1:8443/api/v3/brokerage/time
    ///
    /// REQUESTS_CA_BUNDLE and SSL_CERT_FILE replace the default roots for that process, which
    /// is what you want when it only talks to Coinbase through cbgate.
    #[command(verbatim_doc_comment)]
    Ca(CaArgs),
    /// Print a shell completion script, e.g. for bash (per user):
    /// `mkdir -p ~/.local/share/bash-completion/completions && cbgate completions bash > ~/.local/share/bash-completion/completions/cbgate`
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page cbgate(1) (roff), for packaging: `cbgate man > cbgate.1`.
    #[command(hide = true)]
    Man {
        /// Write cbgate.1 and a page for each subcommand (cbgate-serve.1, ...) into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct CaArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the path of the CA certificate file instead of the certificate.
    #[arg(long)]
    pub path: bool,
    /// Replace the CA by a new one (new key); restart cbgate and re-trust the new certificate.
    #[arg(long)]
    pub rotate: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of audit log files, oldest first (audit.log.2 audit.log.1
    /// audit.log); names the first edited, deleted, reordered or truncated record.
    Verify {
        /// The files, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: Common,
    /// Also call GET /api/v3/brokerage/key_permissions through the signing path with every
    /// CDP credential and print each one's portfolio and permissions, or the exact reason it
    /// failed.
    #[arg(long)]
    pub online: bool,
    /// With --online: probe only the credential NAME (`default` is `[key]`).
    #[arg(long, value_name = "NAME", requires = "online")]
    pub key: Option<String>,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Probe /livez (the process answers) instead of /readyz.
    #[arg(long)]
    pub live: bool,
    /// The admin listener to probe (overrides `admin_listen`).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

/// `--config`, which every command that reads the configuration takes.
#[derive(Args, Debug, Default)]
pub struct ConfigArg {
    /// TOML configuration file (see config/cbgate.toml).
    #[arg(
        long,
        short = 'c',
        env = "CBGATE_CONFIG",
        value_name = "FILE",
        allow_hyphen_values = true
    )]
    pub config: Option<PathBuf>,
}

/// The configuration and the key: what `serve`, `token` and `check` load.
#[derive(Args, Debug, Default)]
pub struct Common {
    #[command(flatten)]
    pub config: ConfigArg,
    /// CDP API key JSON file (overrides key.file).
    // Hyphen values are taken as the value, so a pasted PEM ("-----BEGIN ...") reaches our
    // check, which refuses it unseen, instead of clap's error, which would quote it.
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Listen address, IP:PORT or unix:/path; repeat for several (overrides `listen`).
    #[arg(long, value_name = "ADDR", allow_hyphen_values = true)]
    pub listen: Vec<String>,
    /// Admin listener address, IP:PORT (overrides `admin_listen`; default 127.0.0.1:8751).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    pub common: Common,
    /// A WebSocket subscribe token (no request binding); METHOD and PATH are not needed.
    #[arg(long)]
    pub ws: bool,
    /// Mint with the CDP credential NAME (`[keys.NAME]`; `default` is `[key]`) instead of
    /// `[key]`. Exchange, Prime and INTX keys have no token: they sign each request.
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// HTTP method, e.g. GET.
    #[arg(required_unless_present = "ws")]
    pub method: Option<String>,
    /// `/api/v3/...` (the route picks the host), `api.coinbase.com/path` or a full https URL.
    #[arg(required_unless_present = "ws")]
    pub path_or_url: Option<String>,
}

/// The process environment as text. `std::env::vars()` panics on a value that is not UTF-8 and
/// the panic message quotes the value, which could be the secret: name the variable instead.
pub fn environment() -> Result<HashMap<String, String>, String> {
    let mut env = HashMap::new();
    for (k, v) in std::env::vars_os() {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => {
                env.insert(k, v);
            }
            // Only variables cbgate reads matter; others may hold anything.
            Err(_) if k.starts_with("CBGATE_") || k.starts_with("COINBASE_") || k == "RUST_LOG" => {
                return Err(format!("environment variable {k} is not valid UTF-8"));
            }
            Err(_) => {}
        }
    }
    Ok(env)
}

/// A clap (command-line) error as text, with every argument that looks like key material
/// replaced: clap quotes unexpected arguments, and a pasted PEM or secret is one.
pub fn redact_args(message: &str, args: &[String]) -> String {
    const HIDDEN: &str = "(a value that looks like key material, not shown)";
    let secretish: Vec<&str> = args
        .iter()
        .flat_map(|a| [a.as_str(), a.split_once('=').map_or("", |(_, v)| v)])
        .filter(|a| !a.is_empty() && cbgate::config::looks_like_key_material(a))
        .collect();
    let mut out = message.to_owned();
    for a in &secretish {
        out = out.replace(a, HIDDEN);
    }
    // Clap may quote only part of an argument: then say nothing of it at all.
    let leaks = secretish.iter().any(|a| {
        let chars: Vec<char> = a.chars().collect();
        chars
            .windows(16)
            .any(|w| out.contains(&w.iter().collect::<String>()))
    });
    if leaks {
        return "error: a command-line argument looks like key material (not shown); put the key in a file and pass --key-file FILE (see cbgate --help)\n".to_owned();
    }
    out
}

/// Why a command failed: bad configuration (exit 2), a runtime error (exit 1), or a second stop
/// signal that cut the drain short (exit 128 + the signal's number, the shell convention).
pub enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
    Signal(u8),
}

/// A configuration failure.
pub fn config_err(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Config(e.into())
}

/// What start-up loads: configuration, key (`None`: requests go unsigned), client token.
pub struct Loaded {
    pub cfg: Config,
    pub key: Option<ApiKey>,
    /// The key file, when the key came from one (watched for rotation).
    pub key_file: Option<PathBuf>,
    /// The key file's mode is not checked (configured, or a systemd credential).
    pub allow_insecure: bool,
    pub client_token: Option<Zeroizing<String>>,
    /// The client identities' tokens (`clients.NAME.token_file`).
    pub client_tokens: cbgate::gate::identity::ClientTokens,
    /// The admin control token (`admin_token_file`).
    pub admin_token: Option<Zeroizing<String>>,
    /// The CDP Wallet Secret (`key.wallet_secret_file` or `CDP_WALLET_SECRET`).
    pub wallet: Option<WalletSecret>,
    /// The named credentials (`[keys.NAME]`).
    pub keys: cbgate::sign::keys::Keyring,
}

/// Flags that override configuration keys (only `serve` has them).
#[derive(Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub admin_listen: Option<String>,
}

/// Loads configuration, key and client token for a command.
pub fn load(
    common: &Common,
    overrides: Overrides,
    env: HashMap<String, String>,
) -> Result<Loaded, Failure> {
    let mut sources = Sources {
        file: common.config.config.clone(),
        env,
        listen: overrides.listen,
        admin_listen: overrides.admin_listen,
        key_file: common.key_file.clone(),
    };
    let loaded = load_from(&sources);
    // The environment map held copies of the secrets: wipe them before they are freed.
    for name in [
        "COINBASE_API_SECRET",
        "CDP_API_KEY_SECRET",
        "CDP_WALLET_SECRET",
    ] {
        if let Some(secret) = sources.env.get_mut(name) {
            secret.zeroize();
        }
    }
    // And of the named credentials' secrets and passphrases.
    if let Ok(l) = &loaded {
        for k in l.cfg.keys.values() {
            for var in [&k.secret_env, &k.passphrase_env].into_iter().flatten() {
                if let Some(v) = sources.env.get_mut(var) {
                    v.zeroize();
                }
            }
        }
    }
    loaded
}

fn load_from(sources: &Sources) -> Result<Loaded, Failure> {
    let cfg = Config::load(sources).map_err(config_err)?;
    let source = KeySource::select(cfg.key.file.as_deref(), &sources.env).map_err(config_err)?;
    let key_file = match &source {
        Some(KeySource::File(p)) => Some(p.clone()),
        _ => None,
    };
    let allow_insecure = allow_insecure_key_mode(&cfg, key_file.as_deref(), &sources.env);
    let key = match source {
        None => None,
        Some(src) => {
            let key = src.load_with(allow_insecure).map_err(|e| match e {
                // Say which setting named the path: the flag, the variable or the file key.
                KeyError::FileMissing(_) | KeyError::IsDirectory(_) => config_err(anyhow::anyhow!(
                    "{}: {e}",
                    setting_origin(sources, "key.file", Some("--key-file"))
                )),
                e => config_err(e),
            })?;
            jwt::self_test(&key)
                .map_err(|e| config_err(anyhow::anyhow!("key self-test failed: {e}")))?;
            Some(key)
        }
    };
    let client_token = match &cfg.client_token_file {
        None => None,
        Some(path) => Some(load_client_token(path).map_err(|e| {
            let origin = setting_origin(sources, "client_token_file", None);
            config_err(anyhow::anyhow!("{origin}: {e:#}"))
        })?),
    };
    let admin_token = match &cfg.admin_token_file {
        None => None,
        Some(path) => Some(load_admin_token(path).map_err(config_err)?),
    };
    let client_tokens = cbgate::gate::identity::ClientTokens::read(&cfg)
        .map_err(|e| config_err(anyhow::anyhow!("{e}")))?;
    // The admin token halts and resumes trading: a client holding the same one could too.
    if let Some(admin) = &admin_token {
        let holder = if client_token.as_deref() == Some(admin) {
            Some("client_token_file".to_owned())
        } else {
            client_tokens
                .holder_of(admin)
                .map(|n| format!("clients.{n}.token_file"))
        };
        if let Some(h) = holder {
            return Err(config_err(anyhow::anyhow!(
                "admin_token_file holds the same token as {h}: that client could halt and resume trading; give the admin endpoints a token of their own"
            )));
        }
    }
    let wallet = WalletSecret::select(
        cfg.key.wallet_secret_file.as_deref(),
        sources.env.get("CDP_WALLET_SECRET").map(String::as_str),
        allow_insecure,
    )
    .map_err(|e| {
        let origin = if cfg.key.wallet_secret_file.is_some() {
            setting_origin(sources, "key.wallet_secret_file", None)
        } else {
            "environment variable CDP_WALLET_SECRET".to_owned()
        };
        config_err(anyhow::anyhow!("{origin}: {e}"))
    })?;
    let keys = cbgate::sign::keys::Keyring::load(&cfg.keys, &sources.env).map_err(config_err)?;
    Ok(Loaded {
        keys,
        cfg,
        key,
        key_file,
        allow_insecure,
        client_token,
        client_tokens,
        admin_token,
        wallet,
    })
}

/// Which layer set a path setting, for messages: the flag, else the variable, else the file.
fn setting_origin(sources: &Sources, key: &str, flag: Option<&str>) -> String {
    let var = format!("CBGATE_{}", key.replace('.', "__").to_ascii_uppercase());
    match flag {
        Some(f) if key == "key.file" && sources.key_file.is_some() => f.to_owned(),
        _ if sources.env.contains_key(&var) => format!("environment variable {var}"),
        _ => format!("configuration key {key}"),
    }
}

/// Whether the key file's mode may be ignored: when configured so, or when the file is a
/// systemd credential (`LoadCredential=`): systemd grants the service user access through an
/// ACL, which makes the group bits show as readable although nobody else can read the file.
fn allow_insecure_key_mode(
    cfg: &Config,
    key_file: Option<&std::path::Path>,
    env: &HashMap<String, String>,
) -> bool {
    let in_credentials = match (key_file, env.get("CREDENTIALS_DIRECTORY")) {
        (Some(f), Some(dir)) if !dir.is_empty() => f.starts_with(dir),
        _ => false,
    };
    cfg.key.allow_insecure_permissions || in_credentials
}

/// Reads `client_token_file`: private like the key file, at least 16 characters.
fn load_client_token(path: &std::path::Path) -> anyhow::Result<Zeroizing<String>> {
    load_token_file(path)
}

/// Reads `admin_token_file`, with the same rules as `client_token_file`; the error names it.
pub fn load_admin_token(path: &std::path::Path) -> anyhow::Result<Zeroizing<String>> {
    load_token_file(path).map_err(|e| anyhow::anyhow!("admin_token_file: {e:#}"))
}

/// A token file: private like the key file, at least 16 printable characters. The caller
/// names the setting that gave the path.
fn load_token_file(path: &std::path::Path) -> anyhow::Result<Zeroizing<String>> {
    // key.allow_insecure_permissions is about the key file only: no such hint here.
    cbgate::gate::identity::read_token_file(path).map_err(|e| anyhow::anyhow!("{e}"))
}
