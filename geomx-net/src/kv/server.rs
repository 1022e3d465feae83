//! The key-value server endpoint.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::conn::{Connection, Side};
use crate::driver::{Driver, DriverKind, NetOptions};
use crate::error::NetError;
use crate::link::{Dispatch, Link};
use crate::stats::{Counters, LiveCounters};
use crate::tls::{handshake, HandshakeSide, HandshakeSlots, Session, TlsContext};
use crate::wire::Frame;

use super::{Handler, PeerHandle, Request, Responder};

/// A server accepting key-value connections and passing their requests to a [`Handler`].
pub struct KvServer {
    inner: Arc<ServerInner>,
    accept: Option<JoinHandle<()>>,
}

struct ServerInner {
    node_id: u32,
    opts: NetOptions,
    driver: Driver,
    counters: Arc<LiveCounters>,
    stop: AtomicBool,
    local_addr: SocketAddr,
    dispatch: Arc<ServerDispatch>,
    /// Connections in their TLS handshake.
    handshakes: HandshakeSlots,
}

struct ServerDispatch {
    handler: Arc<dyn Handler>,
    links: Mutex<HashMap<usize, Arc<Link>>>,
}

impl Dispatch for ServerDispatch {
    fn on_established(&self, link: &Arc<Link>, _peer_id: u32) {
        self.handler.on_connect(&PeerHandle { link: link.clone() });
    }

    fn on_request(&self, link: &Arc<Link>, frame: Frame) {
        let reply = Responder::new(link.clone(), frame.header);
        let mut req = Request::from_frame(frame);
        // The id the connection announced in its Hello, whatever this frame's header says: a
        // handler that trusts `sender` trusts the connection, not each frame.
        req.sender = link.peer_id().unwrap_or(0);
        self.handler.on_request(req, reply);
    }

    fn on_closed(&self, link: &Arc<Link>, reason: crate::NetError) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(Arc::as_ptr(link) as usize));
        tracing::debug!(peer = %link.peer_addr(), %reason, "connection closed");
        self.handler
            .on_disconnect(&PeerHandle { link: link.clone() }, &reason);
    }
}

impl KvServer {
    /// Binds `addr` (port 0 picks a free port) and serves with node id 0.
    pub fn bind(
        addr: impl ToSocketAddrs,
        handler: impl Handler,
        opts: NetOptions,
    ) -> Result<KvServer, NetError> {
        Self::bind_with_id(addr, 0, Arc::new(handler), opts)
    }

    /// Binds `addr` and serves as node `node_id` (announced in HelloAck and reply frames).
    pub fn bind_with_id(
        addr: impl ToSocketAddrs,
        node_id: u32,
        handler: Arc<dyn Handler>,
        opts: NetOptions,
    ) -> Result<KvServer, NetError> {
        let listener = TcpListener::bind(addr)?;
        if let Some(algo) = opts.congestion {
            // Accepted sockets inherit it; a refused name fails here, not per connection.
            crate::congestion::set(&listener, algo)?;
        }
        let local_addr = listener.local_addr()?;
        let driver = Driver::new(&opts, false)?;
        let dispatch = Arc::new(ServerDispatch {
            handler,
            links: Mutex::new(HashMap::new()),
        });
        let inner = Arc::new(ServerInner {
            node_id,
            opts,
            driver,
            counters: Arc::new(LiveCounters::default()),
            stop: AtomicBool::new(false),
            local_addr,
            dispatch,
            handshakes: HandshakeSlots::new(),
        });
        let i2 = inner.clone();
        let accept = std::thread::Builder::new()
            .name("geomx-net-accept".into())
            .spawn(move || accept_loop(i2, listener))?;
        Ok(KvServer {
            inner,
            accept: Some(accept),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The driver actually in use.
    pub fn driver(&self) -> DriverKind {
        self.inner.driver.kind()
    }

    /// Traffic counted at this server's sockets, all connections together.
    pub fn stats(&self) -> Counters {
        self.inner.counters.snapshot()
    }

    /// Number of open connections. A connection is counted just after it starts, so one just
    /// accepted may exchange its first frames a moment before it is counted.
    pub fn connections(&self) -> usize {
        self.inner
            .dispatch
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Stops accepting, closes every connection (their pending requests fail) and stops the driver.
    pub fn shutdown(&mut self) {
        if self.inner.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let mut wake = self.inner.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, std::time::Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let links: Vec<Arc<Link>> = self
            .inner
            .dispatch
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for l in links {
            l.close();
        }
        self.inner.driver.shutdown();
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Authenticates an accepted connection on its own short-lived thread (bounded in number, time
/// and bytes), then admits it; a stranger is dropped before any frame is read.
fn authenticate(
    inner: &Arc<ServerInner>,
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<TlsContext>,
) {
    let Some(slot) = inner.handshakes.take(peer.ip(), &ctx, &stream) else {
        tracing::warn!(%peer, "refused connection: too many unauthenticated connections");
        return;
    };
    let deadline = Instant::now() + inner.opts.conn.handshake_timeout;
    let inner = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("geomx-net-tls".into())
        .spawn(move || {
            let done = handshake(&mut stream, &ctx, HandshakeSide::Server, deadline);
            // Past this, the connection is ours; an eviction meanwhile has shut it down.
            if !slot.release() {
                tracing::warn!(%peer, "refused connection: its handshake was ended for a newcomer");
                return;
            }
            match done {
                Ok(session) => admit(&inner, stream, peer, Some(session)),
                Err(e) => tracing::warn!(%peer, error = %e, "refused connection: TLS"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "refused connection: no thread for its handshake");
    }
}

/// Starts an accepted (and, with TLS, authenticated) connection.
fn admit(inner: &Arc<ServerInner>, stream: TcpStream, peer: SocketAddr, session: Option<Session>) {
    if inner.stop.load(Ordering::SeqCst) {
        return;
    }
    let open = inner
        .dispatch
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    if open >= inner.opts.max_connections {
        tracing::warn!(%peer, open, "refused connection: too many open connections");
        return;
    }
    let conn = Connection::new(
        Side::Acceptor,
        inner.node_id,
        inner.opts.conn,
        Instant::now(),
    );
    let dispatch: Arc<dyn Dispatch> = inner.dispatch.clone();
    match inner
        .driver
        .attach(stream, conn, inner.counters.clone(), dispatch, session)
    {
        Ok(link) => {
            let id = Arc::as_ptr(&link) as usize;
            let mut links = inner
                .dispatch
                .links
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            links.insert(id, link.clone());
            // It may have closed (and run on_closed) before it was inserted.
            if link.is_closed() {
                links.remove(&id);
            }
        }
        Err(e) => tracing::warn!(%peer, error = %e, "could not start connection"),
    }
}

fn accept_loop(inner: Arc<ServerInner>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        match inner.opts.security.context() {
            None => admit(&inner, stream, peer, None),
            Some(ctx) => authenticate(&inner, stream, peer, ctx.clone()),
        }
    }
}
