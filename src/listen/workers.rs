//! The per-core model (`[runtime] model = "per-core"`): N threads, each running a
//! single-threaded tokio runtime with its own `SO_REUSEPORT` socket on every TCP listener and
//! its own upstream pool, so a request is accepted, signed, forwarded and answered on one
//! thread, with no wake-up of another thread on its way.
//!
//! Everything that limits stays shared: the `max_connections` slots ([`ConnectionSlots`]), and
//! through the one [`Proxy`] the upstream in-flight and per-host slots, the budget, the halt and
//! the WebSocket sessions. Each worker runs [`server::run_with_slots`], so every timeout and the
//! graceful drain are the same code as in the shared model. A Unix-socket listener is served
//! by the first worker only (the kernel does not spread Unix connections over sockets).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::config::ListenAddr;
use crate::listen::server::{self, BindError, ConnectionSlots, Listener, ServeOptions};
use crate::proxy::Proxy;

/// A bound listener between threads: not registered with any runtime yet.
#[derive(Debug)]
pub enum Unregistered {
    Tcp(std::net::TcpListener),
    Tls(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: std::path::PathBuf,
    },
}

impl Unregistered {
    /// Takes `l` off the runtime it was bound on, to hand it to a worker.
    pub fn from_listener(l: Listener) -> io::Result<Unregistered> {
        Ok(match l {
            Listener::Tcp(l) => Unregistered::Tcp(l.into_std()?),
            Listener::Tls(l) => Unregistered::Tls(l.into_std()?),
            Listener::Unix { listener, path } => Unregistered::Unix {
                listener: listener.into_std()?,
                path,
            },
        })
    }

    /// A second handle on the same socket (one accept queue): for a listener that was bound
    /// without `SO_REUSEPORT` and should still be served by more than one worker.
    pub fn try_clone(&self) -> io::Result<Unregistered> {
        Ok(match self {
            Unregistered::Tcp(l) => Unregistered::Tcp(l.try_clone()?),
            Unregistered::Tls(l) => Unregistered::Tls(l.try_clone()?),
            Unregistered::Unix { listener, path } => Unregistered::Unix {
                listener: listener.try_clone()?,
                path: path.clone(),
            },
        })
    }

    /// Registers the listener with the runtime of the calling thread.
    fn register(self) -> io::Result<Listener> {
        Ok(match self {
            Unregistered::Tcp(l) => Listener::Tcp(tokio::net::TcpListener::from_std(l)?),
            Unregistered::Tls(l) => Listener::Tls(tokio::net::TcpListener::from_std(l)?),
            Unregistered::Unix { listener, path } => Listener::Unix {
                listener: tokio::net::UnixListener::from_std(listener)?,
                path,
            },
        })
    }

    /// The address clients use, for logs.
    pub fn describe(&self) -> String {
        match self {
            Unregistered::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Unregistered::Tls(l) => l
                .local_addr()
                .map_or_else(|_| "https".into(), |a| format!("https://{a}")),
            Unregistered::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

/// Binds `addr` once per worker: `workers` sockets sharing the port through `SO_REUSEPORT`
/// (the kernel spreads new connections over them), or, for a Unix socket, one.
///
/// An address some other socket already listens on is refused as with one socket: the port
/// is first bound alone, without `SO_REUSEPORT`, so cbgate never joins another process's
/// group and silently shares its port.
pub async fn bind(
    addr: &ListenAddr,
    unix_mode: u32,
    workers: usize,
) -> Result<Vec<Unregistered>, BindError> {
    let err = |cause| BindError {
        addr: addr.to_string(),
        cause,
    };
    let (tcp, tls) = match addr {
        ListenAddr::Unix(_) => {
            let l = Listener::bind_mode(addr, unix_mode).await?;
            return match l {
                Listener::Unix { listener, path } => Ok(vec![Unregistered::Unix {
                    listener: listener.into_std().map_err(err)?,
                    path,
                }]),
                Listener::Tcp(_) | Listener::Tls(_) => {
                    Err(err(io::Error::other("a Unix address bound as TCP")))
                }
            };
        }
        ListenAddr::Tcp(a) => (*a, false),
        ListenAddr::Tls(a) => (*a, true),
    };
    if tcp.port() != 0 {
        // Fails with AddrInUse when anything listens there, SO_REUSEPORT or not.
        drop(std::net::TcpListener::bind(tcp).map_err(err)?);
    }
    let mut out = Vec::with_capacity(workers);
    let mut at = tcp;
    for _ in 0..workers.max(1) {
        let l = reuseport_listener(at).map_err(err)?;
        // Port 0: the siblings join the port the first one got.
        at = l.local_addr().map_err(err)?;
        out.push(if tls {
            Unregistered::Tls(l)
        } else {
            Unregistered::Tcp(l)
        });
    }
    Ok(out)
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // tokio's own backlog for TcpListener::bind.
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Running per-core workers.
#[derive(Debug)]
pub struct Workers {
    done: Vec<oneshot::Receiver<()>>,
}

/// Starts one worker thread per entry of `listeners` (each entry: that worker's sockets), each
/// serving until `shutdown` turns `true`, then draining like [`server::run`].
pub fn spawn(
    listeners: Vec<Vec<Unregistered>>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Workers> {
    let slots = ConnectionSlots::new(opts.max_connections);
    let mut done = Vec::with_capacity(listeners.len());
    for (index, mine) in listeners.into_iter().enumerate() {
        let (finished, finished_rx) = oneshot::channel();
        let (proxy, opts, slots, mut shutdown) = (
            Arc::clone(&proxy),
            opts.clone(),
            slots.clone(),
            shutdown.clone(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("cbgate-w{index}"))
            .spawn(move || {
                crate::forward::upstream::enter_worker(index);
                runtime.block_on(async move {
                    let mut registered = Vec::with_capacity(mine.len());
                    for l in mine {
                        let what = l.describe();
                        match l.register() {
                            Ok(l) => registered.push(l),
                            Err(e) => {
                                tracing::error!(worker = index, listen = what, error = %e, "listener not served");
                            }
                        }
                    }
                    server::run_with_slots(registered, proxy, opts, slots, async move {
                        let _ = shutdown.wait_for(|stop| *stop).await;
                    })
                    .await;
                });
                // Blocking work still running (a DNS lookup) must not hold the exit.
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                let _ = finished.send(());
            })?;
        done.push(finished_rx);
    }
    Ok(Workers { done })
}

impl Workers {
    /// Resolves once every worker has stopped accepting and drained (or ended otherwise).
    pub async fn wait(self) {
        for d in self.done {
            // A worker that panicked dropped its sender: it is over too.
            let _ = d.await;
        }
    }
}
