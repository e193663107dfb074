//! `cbgate serve` (the default command): load, bind, run until SIGTERM/SIGINT.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;

use cbgate::config::{Config, ListenAddr, LogFormat, RuntimeModel};
use cbgate::gate::client::ClientGate;
use cbgate::gate::halt::Halt;
use cbgate::gate::halt_shared::SharedHalt;
use cbgate::listen::server::{self, Listener, ServeOptions};
use cbgate::listen::workers;
use cbgate::ops::reload::{self, KeyReloader};
use cbgate::ops::{admin, clock, harden};
use cbgate::proxy::Proxy;
use cbgate::sign::key::Algorithm;

use super::{config_err, load, Failure, Loaded, Overrides, ServeArgs};

/// Log targets that are never printed, whatever the filter: tungstenite logs every WebSocket
/// frame at trace level (through the `log` bridge), payload included, which would put signed
/// subscribe messages and users' private stream data in the logs.
const SILENCED_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Sets up logging. Lines are written in batches by a background thread woken a few times a
/// second, not once per line (`ops::logbuf`; never dropping: a thread that finds the queue full
/// writes it out itself), so a request never waits on stderr; keep the guard until exit to flush.
fn init_logging(cfg: &Config) -> Result<cbgate::ops::logbuf::Guard, Failure> {
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
    let (writer, guard) = cbgate::ops::logbuf::start(Box::new(std::io::stderr()), "cbgate-log")
        .context("starting the log writer thread")
        .map_err(Failure::Runtime)?;
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
    Ok(guard)
}

/// Runs the proxy.
pub fn run(
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
        client_tokens,
        admin_token,
        wallet,
        keys,
    } = load(
        &args.common,
        Overrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
        },
        env,
    )?;
    let _log_guard = init_logging(&cfg)?;
    log_hardening(hardening);
    let files = &hardening.open_files;
    tracing::info!(
        soft = files.soft,
        hard = files.hard,
        raised_from = files.raised_from,
        "open-file limit (RLIMIT_NOFILE)"
    );
    if let Some(warning) = files.shortfall(harden::descriptors_needed(&cfg)) {
        tracing::warn!("{warning}");
    }
    if client_token.is_some() {
        tracing::info!("clients must send the cbgate-token header");
    }
    for (name, c) in &cfg.clients.named {
        tracing::info!(
            identity = name.as_str(),
            token = c.token_file.is_some(),
            unix_uid = c.unix_uid,
            unix_gid = c.unix_gid,
            permission = c.permission.unwrap_or(cfg.policy.permission).as_str(),
            rules = c.rules.len(),
            "client identity"
        );
    }
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if !cfg.clients.named.is_empty() && !cfg.identity_required() {
        tracing::info!("clients.require = false: a request from no known identity is served as anonymous with the global policy");
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
    if wallet.is_some() {
        tracing::info!(
            "wallet secret loaded: cbgate mints X-Wallet-Auth for CDP v2 wallet requests"
        );
    }
    for k in keys.iter() {
        tracing::info!(key = k.name(), kind = k.kind().as_str(), fingerprint = %k.current().fingerprint(), "credential loaded");
    }
    let per_core = cfg.runtime.model == RuntimeModel::PerCore;
    let threads = cfg.runtime.thread_count();
    // Per-core: the workers serve the proxy listeners; this thread's runtime runs the admin
    // listener, the clock, key reloads and the signals.
    let runtime = if per_core {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else if cfg.runtime.threads > 0 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
    .context("starting the async runtime")
    .map_err(Failure::Runtime)?;
    tracing::info!(
        model = if per_core { "per-core" } else { "shared" },
        threads,
        "runtime"
    );
    let halt = match &cfg.state_dir {
        Some(dir) => match Halt::open(dir) {
            Ok(h) => h,
            // The default location may not exist where cbgate runs (a read-only container):
            // run, but say that a halt will not outlive the process.
            Err(e) if cfg.state_dir_is_default => {
                tracing::warn!(
                    error = %e,
                    "the default state_dir is not usable: a halt will not survive a restart; set state_dir (CBGATE_STATE_DIR) to a writable directory"
                );
                Halt::in_memory()
            }
            Err(e) => return Err(config_err(e)),
        },
        None => {
            tracing::warn!("no state_dir (nor STATE_DIRECTORY, XDG_STATE_HOME, HOME): a halt will not survive a restart");
            Halt::in_memory()
        }
    };
    if let Some(h) = halt.current() {
        tracing::warn!(
            reason = h.reason,
            since = h.since_rfc3339(),
            "trading is HALTED (from state_dir): orders are refused until `cbgate resume`"
        );
    }
    let redis_access = cbgate::gate::budget::RedisAccess {
        password: match &cfg.budget.redis_password_file {
            None => None,
            Some(path) => Some(load_redis_password(path).map_err(config_err)?),
        },
        ca_pem: match &cfg.budget.redis_ca_file {
            None => None,
            Some(path) => Some(load_redis_ca(path).map_err(config_err)?),
        },
    };
    // rustls for rediss:// picks the process-wide provider: the one cbgate uses everywhere.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tls = super::ca::tls_context(&cfg).map_err(config_err)?;
    let result = runtime.block_on(async move {
        let mut proxy = Proxy::new(&cfg, key)
            .map_err(config_err)?
            .with_keys(keys)
            .with_wallet_secret(wallet)
            .with_redis_password(redis_access.clone(), &cfg)
            .map_err(config_err)?
            .with_client_token(client_token, &cfg)
            .with_client_tokens(client_tokens)
            .map_err(config_err)?
            .with_admin_token(admin_token)
            .with_halt(halt);
        if let Some(tls) = tls {
            proxy = proxy.with_tls(tls);
        }
        if cfg.intercept.enabled {
            tracing::info!(hosts = cfg.upstream_hosts().join(", "), "intercept: CONNECT is answered for these hosts on port 443 (HTTPS_PROXY)");
        }
        let replica = cfg.budget.replica_name.clone().unwrap_or_else(default_replica_name);
        let shared = SharedHalt::new(&cfg.budget, &redis_access, replica, proxy.metrics().budget().clone())
            .map_err(config_err)?
            .map(Arc::new);
        if let Some(s) = &shared {
            // Learn the shared state before serving (bounded by redis_connect_timeout): a
            // replica that starts while the others are halted starts halted.
            if let Err(e) = s.reconcile(proxy.halt_state()).await {
                tracing::error!(error = %e, "the shared halt could not be applied to state_dir");
            }
            tracing::info!(replica = s.replica(), halted = proxy.halt_state().is_halted(), poll_ms = cfg.budget.halt_poll.as_millis() as u64, "kill switch shared through Redis");
        }
        let proxy = Arc::new(proxy.with_shared_halt(shared.clone()));
        if let Some(s) = shared {
            tokio::spawn(s.run(Arc::clone(&proxy), Proxy::halt_state));
        }
        if let Some(url) = &cfg.budget.redis {
            if cfg.budget.enabled {
                // Shown with any password redacted.
                tracing::info!(redis = %cbgate::gate::budget::redacted_url(url), replicas = cfg.budget.replicas, "rate budget: connecting to Redis");
            }
        }
        proxy.budget().start();
        if let Some(file) = &cfg.audit.file {
            tracing::info!(file = %file.display(), "audit log: state-changing requests and refusals are recorded");
        }
        let bind_failed = |addr: &ListenAddr, e: server::BindError| {
            let hint = match addr {
                ListenAddr::Tcp(a) | ListenAddr::Tls(a) if e.cause.kind() == std::io::ErrorKind::AddrInUse => {
                    format!(
                        "; {}: move this one with --listen ADDR (or `listen` in the configuration, CBGATE_LISTEN)",
                        who_holds(*a)
                    )
                }
                _ => String::new(),
            };
            Failure::Runtime(anyhow::anyhow!("{e}{hint}"))
        };
        let mut listeners = Vec::new();
        // Per-core: one list of sockets per worker.
        let mut per_worker: Vec<Vec<workers::Unregistered>> =
            (0..threads).map(|_| Vec::new()).collect();
        for addr in &cfg.listen {
            if per_core {
                let group = workers::bind(addr, cfg.unix_mode.0, threads)
                    .await
                    .map_err(|e| bind_failed(addr, e))?;
                if let Some(first) = group.first() {
                    tracing::info!(listen = %first.describe(), sockets = group.len(), "listening");
                }
                for (mine, l) in per_worker.iter_mut().zip(group) {
                    mine.push(l);
                }
            } else {
                let l = Listener::bind_mode(addr, cfg.unix_mode.0)
                    .await
                    .map_err(|e| bind_failed(addr, e))?;
                tracing::info!(listen = %l.describe(), "listening");
                listeners.push(l);
            }
        }
        let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
            .await
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!(
                        "; {}: move this one's admin listener with --admin-listen ADDR (or `admin_listen`, CBGATE_ADMIN_LISTEN)",
                        who_holds(cfg.admin_listen)
                    )
                } else {
                    String::new()
                };
                Failure::Runtime(anyhow::anyhow!(
                    "cannot listen on admin_listen {}: {e}{hint}",
                    cfg.admin_listen
                ))
            })?;
        tracing::info!(admin_listen = %cfg.admin_listen, "admin endpoints: /livez /readyz /metrics /status /halt /resume");
        // The admin listener outlives the drain, so /readyz reports 503 while it lasts. No
        // client token there (probes), but the same Host and Origin checks.
        let admin_gate = ClientGate::new(None, &cfg.allowed_origins, &cfg.allowed_hosts).allow_ip_hosts();
        tokio::spawn(admin::run(
            admin,
            Arc::clone(&proxy),
            admin_gate,
            ServeOptions::admin(&cfg),
            std::future::pending(),
        ));
        tokio::spawn(clock::run(Arc::clone(&proxy), cfg.clock_check_interval));
        let reloader = Arc::new(KeyReloader::new(
            key_file,
            allow_insecure,
        ));
        tokio::spawn(reload::run(Arc::clone(&proxy), reloader));
        let opts = ServeOptions::proxy(&cfg);
        let (drain, drain_started) = tokio::sync::watch::channel(false);
        // A worker with no socket (a Unix listener goes to the first worker only) would end
        // at once and mark cbgate as shutting down: only workers with sockets run.
        per_worker.retain(|mine| !mine.is_empty());
        let serving = if per_core {
            let started = workers::spawn(per_worker, Arc::clone(&proxy), opts, drain_started)
                .context("starting the worker threads")
                .map_err(Failure::Runtime)?;
            futures_util::future::Either::Left(started.wait())
        } else {
            let mut drain_started = drain_started;
            futures_util::future::Either::Right(server::run(listeners, Arc::clone(&proxy), opts, async move {
                let _ = drain_started.wait_for(|stop| *stop).await;
            }))
        };
        let outcome = tokio::select! {
            () = serving => Ok(()),
            code = stop_signals(drain) => Err(Failure::Signal(code)),
        };
        // Result records of the last responses are queued without waiting: write them out,
        // also when a second signal cut the drain short.
        if let Some(audit) = proxy.audit() {
            if let Err(e) = audit.sync().await {
                tracing::error!(error = %e, "audit log not flushed at exit");
            }
        }
        if outcome.is_ok() {
            tracing::info!("stopped");
        }
        outcome
    });
    if matches!(result, Err(Failure::Signal(_))) {
        // Dropping the runtime would wait for blocking work without end (a DNS lookup, say):
        // bound it. Tasks, connections and the proxy are dropped here.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    result
}

/// Who answers on a port that is already in use: another cbgate (its admin `/livez`, or the
/// `x-cbgate-error` header cbgate puts on its own errors) or some other program.
fn who_holds(addr: std::net::SocketAddr) -> &'static str {
    match admin::http_get(addr, "/livez", std::time::Duration::from_secs(1)) {
        Ok(got) if got.body.contains(r#""status":"alive""#) => {
            "another cbgate's admin listener answers there"
        }
        Ok(got) if got.head.to_ascii_lowercase().contains("x-cbgate-error") => {
            "another cbgate answers there"
        }
        _ => "another program (not cbgate) holds it",
    }
}

/// Waits for SIGTERM or SIGINT (the orchestrator's stop signal; also as PID 1), then tells the
/// server to drain through `drain`. A second signal during the drain means the operator will not
/// wait: this returns the exit code for it (128 + signal number: 143 for SIGTERM, 130 for SIGINT)
/// and the caller stops at once. Both handlers stay installed between the two, so a quick second
/// signal is not lost to the default action either.
async fn stop_signals(drain: tokio::sync::watch::Sender<bool>) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    const SIGINT_EXIT: u8 = 130;
    const SIGTERM_EXIT: u8 = 143;
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let code = match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            drain.send_replace(true);
            tokio::select! {
                _ = term.recv() => SIGTERM_EXIT,
                _ = int.recv() => SIGINT_EXIT,
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            drain.send_replace(true);
            let _ = tokio::signal::ctrl_c().await;
            SIGINT_EXIT
        }
    };
    tracing::warn!(
        exit_code = code,
        "second stop signal during the drain: exiting now, open requests are cut short"
    );
    code
}

/// This replica's name in the shared halt: the host name (a container's is its id) and pid.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(48)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cbgate".into());
    format!("{host}:{}", std::process::id())
}

/// Reads `budget.redis_ca_file`: PEM with at least one certificate.
fn load_redis_ca(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "budget.redis_ca_file: file {} cannot be read",
            path.display()
        )
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        anyhow::bail!(
            "budget.redis_ca_file: file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

/// Reads `budget.redis_password_file`: private like the key file, one line, not empty.
fn load_redis_password(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    cbgate::sign::key::check_private_file(path)
        .map_err(|e| anyhow::anyhow!("budget.redis_password_file: {e}"))?;
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
        format!(
            "budget.redis_password_file: file {} cannot be read",
            path.display()
        )
    })?);
    let password = zeroize::Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned());
    if password.is_empty() || password.contains(['\r', '\n']) {
        anyhow::bail!(
            "budget.redis_password_file: file {} must hold the password on one line",
            path.display()
        );
    }
    Ok(password)
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
