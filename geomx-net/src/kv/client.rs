//! The key-value client endpoint.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::conn::{Connection, Side};
use crate::driver::{Driver, DriverKind, NetOptions};
use crate::error::NetError;
use crate::link::{Dispatch, Link};
use crate::stats::{Counters, LiveCounters};
use crate::tls::{handshake, HandshakeSide, Identity};
use crate::wire::{Frame, FrameHeader, MsgKind, PayloadCodec};

use super::Response;

/// A connection to one [`super::KvServer`]. Cheap to clone; clones share the connection and may be
/// used from several threads at once. The connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct KvClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    link: Arc<Link>,
    driver: Driver,
    counters: Arc<LiveCounters>,
    server_id: u32,
    notify_rx: Receiver<Result<Frame, NetError>>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.link.close();
        self.driver.shutdown();
    }
}

struct ClientDispatch {
    state_tx: Sender<Result<u32, NetError>>,
    notify_tx: Sender<Result<Frame, NetError>>,
}

impl Dispatch for ClientDispatch {
    fn on_established(&self, _link: &Arc<Link>, peer_id: u32) {
        let _ = self.state_tx.send(Ok(peer_id));
    }

    fn on_request(&self, link: &Arc<Link>, _frame: Frame) {
        // The connection state machine never delivers requests to an initiator.
        link.on_io_closed("request sent to a client".into());
    }

    fn on_notify(&self, _link: &Arc<Link>, frame: Frame) {
        let _ = self.notify_tx.send(Ok(frame));
    }

    fn on_closed(&self, link: &Arc<Link>, reason: NetError) {
        tracing::debug!(peer = %link.peer_addr(), %reason, "client connection closed");
        let _ = self.state_tx.send(Err(reason.clone()));
        let _ = self.notify_tx.send(Err(reason));
    }
}

/// The outcome of one request, to be awaited.
pub struct Pending {
    rx: Receiver<Result<Frame, NetError>>,
    link: Arc<Link>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("peer", &self.link.peer_addr())
            .finish()
    }
}

impl Pending {
    /// Waits up to `timeout` for the response. A request also fails on its own after the
    /// connection's request timeout, or at once when the connection fails.
    pub fn wait(self, timeout: Duration) -> Result<Response, NetError> {
        match self.link.wait_recv(&self.rx, Instant::now() + timeout) {
            Ok(r) => r.map(Response::from_frame),
            Err(RecvTimeoutError::Timeout) => {
                Err(NetError::Timeout(format!("no response within {timeout:?}")))
            }
            Err(RecvTimeoutError::Disconnected) => Err(NetError::Shutdown),
        }
    }

    /// The response if it already arrived; `Ok(None)` if it has not.
    pub fn try_wait(&self) -> Result<Option<Response>, NetError> {
        match self.rx.try_recv() {
            Ok(r) => r.map(|f| Some(Response::from_frame(f))),
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(NetError::Shutdown),
        }
    }
}

impl KvClient {
    /// Connects to `addr` as node `my_node_id` and completes the handshake, within
    /// `opts.connect_timeout` and `opts.conn.handshake_timeout`.
    pub fn connect(
        addr: impl ToSocketAddrs,
        my_node_id: u32,
        opts: NetOptions,
    ) -> Result<KvClient, NetError> {
        let mut last = NetError::Timeout("no address to connect to".into());
        for a in addr.to_socket_addrs()? {
            match Self::connect_one(a, my_node_id, opts.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn connect_one(
        addr: SocketAddr,
        my_node_id: u32,
        opts: NetOptions,
    ) -> Result<KvClient, NetError> {
        let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                NetError::Timeout(format!(
                    "connect to {addr} within {:?}",
                    opts.connect_timeout
                ))
            } else {
                NetError::from(e)
            }
        })?;
        let session = match opts.security.context() {
            None => None,
            Some(ctx) => {
                let deadline = Instant::now() + opts.conn.handshake_timeout;
                Some(handshake(
                    &mut stream,
                    ctx,
                    HandshakeSide::Client,
                    deadline,
                )?)
            }
        };
        let driver = Driver::new(&opts, true)?;
        let counters = Arc::new(LiveCounters::default());
        let (state_tx, state_rx) = crossbeam_channel::unbounded();
        let (notify_tx, notify_rx) = crossbeam_channel::unbounded();
        let dispatch = Arc::new(ClientDispatch {
            state_tx,
            notify_tx,
        });
        let conn = Connection::new(Side::Initiator, my_node_id, opts.conn, Instant::now());
        // A failed attach must not leave the driver's ring thread, eventfd and buffers behind.
        let link = driver
            .attach(stream, conn, counters.clone(), dispatch, session)
            .inspect_err(|_| driver.shutdown())?;
        // The connection enforces the handshake timeout itself; the margin covers timer ticks.
        let wait = opts.conn.handshake_timeout + opts.tick * 4 + Duration::from_millis(100);
        let server_id = match link.wait_recv(&state_rx, Instant::now() + wait) {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                driver.shutdown();
                return Err(e);
            }
            Err(_) => {
                link.close();
                driver.shutdown();
                return Err(NetError::Timeout(format!("handshake with {addr}")));
            }
        };
        Ok(KvClient {
            inner: Arc::new(ClientInner {
                link,
                driver,
                counters,
                server_id,
                notify_rx,
            }),
        })
    }

    /// Pushes `payload` for `key` at round `version`, range `offset` of `total`. The response
    /// carries whatever the server's handler answers (e.g. the updated parameters).
    pub fn push(
        &self,
        key: u64,
        version: u64,
        codec: PayloadCodec,
        offset: u64,
        total: u64,
        payload: &[u8],
    ) -> Result<Pending, NetError> {
        let h = FrameHeader {
            key,
            version,
            codec,
            offset,
            total,
            ..FrameHeader::new(MsgKind::Push)
        };
        self.request(h, payload)
    }

    /// Pulls `key` (range `offset` of `total`) at version `min_version` or later.
    pub fn pull(
        &self,
        key: u64,
        min_version: u64,
        offset: u64,
        total: u64,
    ) -> Result<Pending, NetError> {
        let h = FrameHeader {
            key,
            version: min_version,
            offset,
            total,
            ..FrameHeader::new(MsgKind::Pull)
        };
        self.request(h, &[])
    }

    /// Sends any request kind (see [`MsgKind::is_request`]); the request id is assigned here.
    pub fn request(&self, header: FrameHeader, payload: &[u8]) -> Result<Pending, NetError> {
        if !header.kind.is_request() {
            return Err(NetError::Protocol(format!(
                "{:?} is not a request kind",
                header.kind
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inner.link.send_request(header, payload, tx)?;
        Ok(Pending {
            rx,
            link: self.inner.link.clone(),
        })
    }

    /// What the kernel measured of the connection's path (`None` where it cannot say).
    pub fn tcp_rate(&self) -> Option<crate::TcpRate> {
        self.inner.link.tcp_rate()
    }

    /// Sets the connection's send buffer (`SO_SNDBUF`; Linux doubles it for its bookkeeping):
    /// what it may hold unacknowledged from now on (see [`crate::NetOptions::send_buffer`]).
    pub fn set_send_buffer(&self, bytes: usize) -> Result<(), NetError> {
        self.inner.link.set_send_buffer(bytes)
    }

    /// The connection's send buffer as the kernel reports it.
    pub fn send_buffer(&self) -> Result<usize, NetError> {
        self.inner.link.send_buffer()
    }

    /// The node id the server announced.
    pub fn server_id(&self) -> u32 {
        self.inner.server_id
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.link.peer_addr()
    }

    /// The driver actually in use.
    pub fn driver(&self) -> DriverKind {
        self.inner.driver.kind()
    }

    /// Traffic counted at this client's socket.
    pub fn stats(&self) -> Counters {
        self.inner.counters.snapshot()
    }

    /// The identity in the server's job certificate (mutual TLS), `None` on plaintext.
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.inner.link.identity()
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<NetError> {
        self.inner.link.close_reason()
    }

    /// The next unsolicited frame from the server (coordinator broadcast) within `timeout`;
    /// `Some(Err)` once the connection closed.
    pub(crate) fn next_notification(&self, timeout: Duration) -> Option<Result<Frame, NetError>> {
        self.inner
            .link
            .wait_recv(&self.inner.notify_rx, Instant::now() + timeout)
            .ok()
    }

    /// Closes the connection now (for every clone); pending requests fail with `Shutdown`.
    pub fn close(&self) {
        self.inner.link.close();
    }
}
