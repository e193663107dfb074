//! The `cbgate` binary: flags, configuration, key, listeners; then [`cbgate::server::run`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use zeroize::{Zeroize as _, Zeroizing};

use cbgate::config::{Config, LogFormat, Sources};
use cbgate::jwt::{self, Binding, ClaimStyle};
use cbgate::key::{Algorithm, ApiKey, KeySource};
use cbgate::proxy::Proxy;
use cbgate::reload::{self, KeyReloader};
use cbgate::route::{Router, Upstream};
use cbgate::server::{self, Listener, ServeOptions};
use cbgate::{admin, clock, harden};

/// Exit code for bad configuration (flags, file, environment or key).
const EXIT_CONFIG: u8 = 2;

/// cbgate: a local authenticating reverse proxy for the Coinbase APIs.
///
/// Send plain HTTP to cbgate (default http://127.0.0.1:8750) instead of https://api.coinbase.com;
/// cbgate signs each request with a fresh JWT and forwards it over verified TLS. The key comes
/// from --key-file (the CDP key JSON) or COINBASE_API_KEY + COINBASE_API_SECRET.
#[derive(Parser, Debug)]
#[command(name = "cbgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Serve(ServeArgs),
    /// Print a fresh JWT for one request, as the Coinbase docs' script does.
    Token(TokenArgs),
    /// Validate the configuration and key; print the key name, algorithm and fingerprint.
    Check(CheckArgs),
    /// Probe the admin /readyz (or /livez) and exit 0 when it answers 200, 1 otherwise: for
    /// Docker HEALTHCHECK and Kubernetes exec probes in an image without curl.
    Health(HealthArgs),
    /// Print a shell completion script, e.g. `cbgate completions bash > /etc/bash_completion.d/cbgate`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    common: Common,
    /// Also call GET /api/v3/brokerage/key_permissions through the signing path and print the
    /// key's permissions, or the exact reason it failed.
    #[arg(long)]
    online: bool,
}

#[derive(Args, Debug)]
struct HealthArgs {
    #[command(flatten)]
    common: Common,
    /// Probe /livez (the process answers) instead of /readyz.
    #[arg(long)]
    live: bool,
}

#[derive(Args, Debug, Default)]
struct Common {
    /// TOML configuration file (see config/cbgate.toml).
    #[arg(
        long,
        short = 'c',
        env = "CBGATE_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<PathBuf>,
    /// CDP API key JSON file (overrides key.file).
    #[arg(long, value_name = "FILE", global = true)]
    key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Listen address, IP:PORT or unix:/path; repeat for several (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    #[command(flatten)]
    common: Common,
    /// A WebSocket subscribe token (no request binding); METHOD and PATH are not needed.
    #[arg(long)]
    ws: bool,
    /// HTTP method, e.g. GET.
    #[arg(required_unless_present = "ws")]
    method: Option<String>,
    /// `/api/v3/...` (the route picks the host), `api.coinbase.com/path` or a full https URL.
    #[arg(required_unless_present = "ws")]
    path_or_url: Option<String>,
}

fn main() -> ExitCode {
    // Before any secret is read: no core files, not dumpable, memory locked where allowed.
    let hardening = harden::apply();
    let cli = Cli::parse();
    let env = match environment() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("cbgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        None => serve(cli.serve, env, &hardening),
        Some(Command::Serve(args)) => serve(args, env, &hardening),
        Some(Command::Token(args)) => token(args, env),
        Some(Command::Check(args)) => check(args, env, &hardening),
        Some(Command::Health(args)) => health(args, env),
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Into a buffer first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cbgate", &mut script);
            let _ = std::io::stdout().write_all(&script);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("cbgate: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("cbgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process environment as text. `std::env::vars()` panics on a value that is not UTF-8 and
/// the panic message quotes the value, which could be the secret: name the variable instead.
fn environment() -> Result<HashMap<String, String>, String> {
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

enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn config_err(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Config(e.into())
}

/// What start-up loads: configuration, key (`None`: requests go unsigned), client token.
struct Loaded {
    cfg: Config,
    key: Option<ApiKey>,
    /// The key file, when the key came from one (watched for rotation).
    key_file: Option<PathBuf>,
    /// The key file's mode is not checked (configured, or a systemd credential).
    allow_insecure: bool,
    client_token: Option<Zeroizing<String>>,
}

fn load(
    common: &Common,
    listen: &[String],
    env: HashMap<String, String>,
) -> Result<Loaded, Failure> {
    let mut sources = Sources {
        file: common.config.clone(),
        env,
        listen: listen.to_vec(),
        key_file: common.key_file.clone(),
    };
    let loaded = load_from(&sources);
    // The environment map held a copy of the secret: wipe it before it is freed.
    if let Some(secret) = sources.env.get_mut("COINBASE_API_SECRET") {
        secret.zeroize();
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
            let key = src.load_with(allow_insecure).map_err(config_err)?;
            jwt::self_test(&key)
                .map_err(|e| config_err(anyhow::anyhow!("key self-test failed: {e}")))?;
            Some(key)
        }
    };
    let client_token = match &cfg.client_token_file {
        None => None,
        Some(path) => Some(load_client_token(path).map_err(config_err)?),
    };
    Ok(Loaded {
        cfg,
        key,
        key_file,
        allow_insecure,
        client_token,
    })
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
    cbgate::key::check_private_file(path).map_err(|e| anyhow::anyhow!("client_token_file: {e}"))?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("client_token_file {} cannot be read", path.display()))?,
    );
    let token = Zeroizing::new(text.trim().to_owned());
    if token.chars().count() < 16 || token.chars().any(|c| c.is_control() || c == ' ') {
        anyhow::bail!(
            "client_token_file {}: the token must be at least 16 printable characters without spaces",
            path.display()
        );
    }
    Ok(token)
}

/// Log targets that are never printed, whatever the filter: tungstenite logs every WebSocket
/// frame at trace level (through the `log` bridge), payload included, which would put signed
/// subscribe messages and users' private stream data in the logs.
const SILENCED_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Sets up logging. Lines are written by a background thread (blocking, never dropping, when its
/// buffer is full), so a request never waits on stderr; keep the guard until exit to flush.
fn init_logging(cfg: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Checked for every event: no allocation in here.
    let silenced = tracing_subscriber::filter::filter_fn(|meta| {
        !SILENCED_TARGETS.iter().any(|t| {
            meta.target()
                .strip_prefix(t)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default (128,000 lines) reserves about 4 MiB; a few thousand lines is plenty of
        // slack for a writer that blocks rather than drops.
        .buffered_lines_limit(4096)
        .thread_name("cbgate-log")
        .finish(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match cfg.log.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter).with_filter(silenced))
        .init();
    guard
}

fn serve(
    args: ServeArgs,
    env: HashMap<String, String>,
    hardening: &harden::Report,
) -> Result<(), Failure> {
    let Loaded {
        cfg,
        key,
        key_file,
        allow_insecure,
        client_token,
    } = load(&args.common, &args.listen, env)?;
    let _log_guard = init_logging(&cfg);
    log_hardening(hardening);
    if client_token.is_some() {
        tracing::info!("clients must send the cbgate-token header");
    }
    match &key {
        None => tracing::warn!(
            "no API key configured: requests are forwarded unsigned (public endpoints only); \
             set key.file or COINBASE_API_KEY + COINBASE_API_SECRET"
        ),
        Some(k) => {
            tracing::info!(key = k.name(), alg = k.algorithm().as_str(), fingerprint = %k.fingerprint(), "key loaded");
            if k.algorithm() == Algorithm::EdDsa
                && cfg.routes.iter().any(|r| r.prefix.starts_with("/v2/"))
            {
                tracing::warn!("the Coinbase App API (/v2/...) accepts ECDSA keys only: /v2 requests signed with this Ed25519 key will get 401");
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(async move {
        let proxy = Arc::new(
            Proxy::new(&cfg, key)
                .map_err(config_err)?
                .with_client_token(client_token, &cfg),
        );
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let l = Listener::bind(addr)
                .await
                .map_err(|e| Failure::Runtime(e.into()))?;
            tracing::info!(listen = %l.describe(), "listening");
            listeners.push(l);
        }
        let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
            .await
            .with_context(|| format!("cannot listen on admin_listen {}", cfg.admin_listen))
            .map_err(Failure::Runtime)?;
        tracing::info!(admin_listen = %cfg.admin_listen, "admin endpoints: /livez /readyz /metrics");
        // The admin listener outlives the drain, so /readyz reports 503 while it lasts.
        tokio::spawn(admin::run(admin, Arc::clone(&proxy), std::future::pending()));
        tokio::spawn(clock::run(Arc::clone(&proxy), cfg.clock_check_interval));
        let reloader = Arc::new(KeyReloader::new(
            key_file,
            allow_insecure,
        ));
        tokio::spawn(reload::run(Arc::clone(&proxy), reloader));
        let opts = ServeOptions {
            header_read_timeout: cfg.header_read_timeout,
            drain_timeout: cfg.shutdown_timeout,
            max_connections: cfg.max_connections,
            max_headers: cfg.max_headers,
        };
        server::run(listeners, proxy, opts, shutdown_signal()).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM (the orchestrator's stop signal; also as PID 1).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn log_hardening(r: &harden::Report) {
    if !r.core_dumps_disabled {
        tracing::warn!("could not disable core dumps (RLIMIT_CORE)");
    }
    if !r.not_dumpable {
        tracing::warn!("could not mark the process non-dumpable (PR_SET_DUMPABLE)");
    }
    if let Err(why) = &r.memory_locked {
        tracing::warn!("memory not locked: the key may be written to swap: {why}");
    }
}

fn token(args: TokenArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    let Loaded { cfg, key, .. } = load(&args.common, &[], env)?;
    let key = key.ok_or_else(|| {
        config_err(anyhow::anyhow!(
            "no API key configured: pass --key-file or set COINBASE_API_KEY + COINBASE_API_SECRET"
        ))
    })?;
    let now = jwt::now_secs(0);
    let token = if args.ws {
        let none = Binding {
            method: "",
            host: "",
            path: "",
        };
        jwt::mint(&key, now, ClaimStyle::None, &none)
    } else {
        let method = args.method.unwrap_or_default().to_ascii_uppercase();
        let target = args.path_or_url.unwrap_or_default();
        let (upstream, path) = token_target(&cfg, &target).map_err(config_err)?;
        let binding = Binding {
            method: &method,
            host: &upstream.authority,
            path: &path,
        };
        jwt::mint(&key, now, upstream.claims, &binding)
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
                "no route for {target}; routes: {}",
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
    let url = url::Url::parse(&full).with_context(|| format!("{target:?} is not a path or URL"))?;
    let base = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default())
        + &url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let upstream = Upstream::parse(&base).map_err(anyhow::Error::msg)?;
    // Url::path() is percent-encoded and has dot segments resolved: the same path a client
    // library would send for this URL (cbgate itself refuses paths with dot segments).
    Ok((upstream, url.path().to_owned()))
}

fn check(
    args: CheckArgs,
    env: HashMap<String, String>,
    hardening: &harden::Report,
) -> Result<(), Failure> {
    let Loaded { cfg, key, .. } = load(&args.common, &[], env)?;
    let listen: Vec<String> = cfg.listen.iter().map(ToString::to_string).collect();
    println!(
        "config: ok (listen {}; {} routes)",
        listen.join(", "),
        cfg.routes.len()
    );
    match &key {
        Some(k) => {
            println!("key: {}", k.name());
            println!("algorithm: {}", k.algorithm().as_str());
            println!("public key fingerprint: {}", k.fingerprint());
            println!("self-test: a signed token verified against the public key");
        }
        None => println!(
            "key: none configured; requests will be forwarded unsigned (public endpoints only)"
        ),
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
    if args.online {
        return check_online(&cfg, key);
    }
    Ok(())
}

fn check_online(cfg: &Config, key: Option<ApiKey>) -> Result<(), Failure> {
    if key.is_none() {
        return Err(config_err(anyhow::anyhow!(
            "--online needs a key: pass --key-file or set COINBASE_API_KEY + COINBASE_API_SECRET"
        )));
    }
    let runtime = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)?;
    let report = runtime.block_on(async {
        let proxy = Proxy::new(cfg, key).map_err(config_err)?;
        Ok::<_, Failure>(cbgate::check::online(&proxy).await)
    })?;
    match &report.clock_offset {
        Ok(o) => println!("clock offset: {o:+.2} s (Coinbase minus local)"),
        Err(e) => println!("clock offset: not measured ({e})"),
    }
    match report.permissions {
        Ok(p) => {
            println!("online: ok");
            for field in [
                "can_view",
                "can_trade",
                "can_transfer",
                "portfolio_uuid",
                "portfolio_type",
            ] {
                println!(
                    "{field}: {}",
                    p.get(field).unwrap_or(&serde_json::Value::Null)
                );
            }
            Ok(())
        }
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!(
            "online check failed: {e}"
        ))),
    }
}

fn health(args: HealthArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    // Only the configuration is needed: a probe must not depend on reading the key.
    let sources = Sources {
        file: args.common.config.clone(),
        env,
        listen: Vec::new(),
        key_file: None,
    };
    let cfg = Config::load(&sources).map_err(config_err)?;
    let path = if args.live { "/livez" } else { "/readyz" };
    match admin::probe(cfg.admin_listen, path, std::time::Duration::from_secs(3)) {
        Ok(body) => {
            println!("{body}");
            Ok(())
        }
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!("{e}"))),
    }
}
