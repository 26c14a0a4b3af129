//! The gateway's threads: one current-thread runtime per core, all
//! accepting on one listening socket (whichever is free takes the next
//! connection, as nginx's workers do), each with its own pool of upstream
//! connections. A request and everything it touches — the client's
//! connection, the pooled connection to the instance, its timers — stay
//! on one thread: no task hops between threads, no cross-core wake-ups.
//! (One socket per thread with SO_REUSEPORT was measured too: the kernel's
//! hash spreads connections unevenly, and the busier thread sets the pace —
//! 0.80 of nginx against 0.98-1.05 with the shared socket.)

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tracing::warn;

use crate::admission::ConnectionTable;
use crate::gateway::{Gateway, GatewayConfig, GatewayError};
use crate::meter::Meters;
use crate::route::Router;

/// The gateway's listening socket, one handle per thread.
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl Listeners {
    /// Binds `addr` once, with a handle for each of `n` threads (at
    /// least one).
    pub fn bind(addr: SocketAddr, n: usize) -> Result<Self, GatewayError> {
        let err = |source| GatewayError::Bind { addr, source };
        let first = listen(addr).map_err(err)?;
        let real = first.local_addr().map_err(err)?;
        let mut sockets = Vec::new();
        for _ in 1..n.max(1) {
            sockets.push(first.try_clone().map_err(err)?);
        }
        sockets.push(first);
        Ok(Self {
            sockets,
            addr: real,
        })
    }

    /// The address really listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// How long connections may finish sending after the platform stopped.
const FINAL_GRACE: Duration = Duration::from_secs(5);

/// The running gateway threads.
#[derive(Debug)]
pub struct GatewayThreads {
    handles: Vec<JoinHandle<()>>,
}

impl GatewayThreads {
    /// Starts one thread per listener. They accept until `accepting` turns
    /// false; then each connection finishes its request in flight and is
    /// closed; a thread ends when its connections are, or a few seconds
    /// after `running` turned false.
    pub fn spawn(
        router: Arc<dyn Router>,
        config: GatewayConfig,
        listeners: Listeners,
        accepting: watch::Receiver<bool>,
        running: watch::Receiver<bool>,
        meters: Arc<Meters>,
    ) -> io::Result<Self> {
        let mut handles = Vec::new();
        // Connections are counted across threads: the caps are the
        // gateway's, whichever thread accepted.
        let connections = ConnectionTable::new();
        for (i, socket) in listeners.sockets.into_iter().enumerate() {
            let (router, config) = (router.clone(), config.clone());
            let (connections, meters) = (connections.clone(), meters.clone());
            let (mut accepting, mut running) = (accepting.clone(), running.clone());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = std::thread::Builder::new()
                .name(format!("skiff-gateway-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(socket) {
                            Ok(l) => l,
                            Err(e) => {
                                warn!("gateway thread {i}: {e}");
                                return;
                            }
                        };
                        // A timer that is always due soon: tokio wakes its
                        // own driver (an eventfd write and an extra
                        // epoll_wait) whenever a new timer is due earlier than
                        // the driver's next wake-up, and the timers
                        // connections arm (header read, request timeout) are
                        // due further out than this one, so none of them does
                        // any more. The same tick drops pooled connections
                        // to instances that are gone or idle too long, also
                        // when no request comes.
                        let gateway = Gateway::sharing(router, config, connections, &meters);
                        let sweeper = gateway.clone();
                        tokio::spawn(async move {
                            let mut tick = tokio::time::interval(Duration::from_secs(1));
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            loop {
                                tick.tick().await;
                                sweeper.sweep_idle();
                            }
                        });
                        gateway
                            .serve(
                                listener,
                                async move {
                                    let _ = accepting.wait_for(|a| !*a).await;
                                },
                                async move {
                                    let _ = running.wait_for(|r| !*r).await;
                                    // Responses still being sent get a moment.
                                    tokio::time::sleep(FINAL_GRACE).await;
                                },
                            )
                            .await;
                    });
                })?;
            handles.push(handle);
        }
        Ok(Self { handles })
    }

    /// Waits until every thread has ended (call after `running` turned
    /// false; blocks).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}
