//! Key-value layer for parameter servers: [`KvServer`] with a [`Handler`], [`KvClient`] with
//! many requests in flight, responses matched by request id.
//!
//! A handler may answer later from any thread: [`Responder`] is `Send + 'static`. That is how a
//! HiPS local server parks worker pushes until the global tier answers (fused push-reply).

mod client;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

pub use client::{KvClient, Pending};
pub use server::KvServer;

use crate::conn::reply_header;
use crate::error::NetError;
use crate::link::Link;
use crate::owned::OwnedBytes;
use crate::wire::{Frame, FrameHeader, MsgKind, PayloadCodec};

/// A request received by a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Node id the sender announced in its Hello.
    pub sender: u32,
    /// Request kind (Push, Pull, or a coordinator kind).
    pub kind: MsgKind,
    /// Key.
    pub key: u64,
    /// Round / version (Push: the round pushed; Pull: the minimum version wanted).
    pub version: u64,
    /// Range offset.
    pub offset: u64,
    /// Total length of the keyed tensor.
    pub total: u64,
    /// Payload codec.
    pub codec: PayloadCodec,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Request {
    pub(crate) fn from_frame(f: Frame) -> Request {
        let h = f.header;
        Request {
            sender: h.sender,
            kind: h.kind,
            key: h.key,
            version: h.version,
            offset: h.offset,
            total: h.total,
            codec: h.codec,
            payload: f.payload,
        }
    }
}

/// A successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Node id of the responder.
    pub sender: u32,
    /// Key of the request.
    pub key: u64,
    /// Version the responder attached (e.g. the parameters' new version).
    pub version: u64,
    /// Range offset of the request.
    pub offset: u64,
    /// Total length of the request.
    pub total: u64,
    /// Payload codec.
    pub codec: PayloadCodec,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Response {
    pub(crate) fn from_frame(f: Frame) -> Response {
        let h = f.header;
        Response {
            sender: h.sender,
            key: h.key,
            version: h.version,
            offset: h.offset,
            total: h.total,
            codec: h.codec,
            payload: f.payload,
        }
    }
}

/// A connected peer of a server, as seen by the [`Handler`].
#[derive(Clone)]
pub struct PeerHandle {
    link: Arc<Link>,
}

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHandle")
            .field("node_id", &self.node_id())
            .field("addr", &self.addr())
            .finish()
    }
}

impl PeerHandle {
    /// The node id the peer announced.
    pub fn node_id(&self) -> u32 {
        self.link.peer_id().unwrap_or(0)
    }

    /// The peer's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.link.peer_addr()
    }

    /// A stable identity of this connection (distinct for two connections of the same node id).
    pub fn conn_id(&self) -> usize {
        Arc::as_ptr(&self.link) as usize
    }

    /// The identity in the peer's job certificate, when the connection uses mutual TLS
    /// ([`crate::tls::Security::Mtls`]); `None` on plaintext connections.
    pub fn identity(&self) -> Option<&crate::tls::Identity> {
        self.link.identity()
    }

    /// The driver that serves this connection (never [`crate::DriverKind::Auto`]). On the
    /// portable driver a [`Responder::send`] blocks until the peer's socket takes the bytes, so a
    /// handler that answers other connections than its own should hand those replies to a
    /// [`crate::sched::reply::ReplyQueue`]: a peer behind a slow link must not hold the thread
    /// that reads the connection whose request completed the round. An io_uring handler's sends
    /// only queue.
    pub fn driver(&self) -> crate::DriverKind {
        self.link.driver()
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// What the kernel measured of the connection's path (`None` where it cannot say).
    pub fn tcp_rate(&self) -> Option<crate::TcpRate> {
        self.link.tcp_rate()
    }

    /// Sets the connection's send buffer (`SO_SNDBUF`; Linux doubles it for its bookkeeping),
    /// like [`crate::KvClient::set_send_buffer`] on the accepting side.
    pub fn set_send_buffer(&self, bytes: usize) -> Result<(), NetError> {
        self.link.set_send_buffer(bytes)
    }

    /// The connection's send buffer as the kernel reports it (Linux: twice the value set).
    pub fn send_buffer(&self) -> Result<usize, NetError> {
        self.link.send_buffer()
    }

    /// Closes the connection (pending requests of the peer fail with `PeerClosed`).
    pub fn close(&self) {
        self.link.close();
    }

    /// Sends an unsolicited frame (Shutdown / AbortNotice) to the peer.
    pub(crate) fn notify(&self, kind: MsgKind, payload: &[u8]) -> Result<(), NetError> {
        self.link.send_frame(&FrameHeader::new(kind), payload)
    }
}

/// Completes one request, now or later, from any thread. Dropping it unanswered sends the peer an
/// error reply ("request dropped without a reply").
pub struct Responder {
    link: Arc<Link>,
    req: FrameHeader,
    done: bool,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("request", &self.req)
            .finish()
    }
}

impl Responder {
    pub(crate) fn new(link: Arc<Link>, req: FrameHeader) -> Responder {
        Responder {
            link,
            req,
            done: false,
        }
    }

    /// The connection the request came on.
    pub fn peer(&self) -> PeerHandle {
        PeerHandle {
            link: self.link.clone(),
        }
    }

    /// Key of the request being answered.
    pub fn key(&self) -> u64 {
        self.req.key
    }

    /// Answers with a payload. Fails if the connection is gone (the peer already saw the failure).
    pub fn send(
        mut self,
        version: u64,
        codec: PayloadCodec,
        payload: &[u8],
    ) -> Result<(), NetError> {
        let h = self.data_reply(version, codec);
        self.link.send_frame(&h, payload)
    }

    /// Like [`Responder::send`] with a payload handed over: the driver may send it after this
    /// returns, without copying it (io_uring), and drops it once sent.
    pub fn send_owned(
        mut self,
        version: u64,
        codec: PayloadCodec,
        payload: OwnedBytes,
    ) -> Result<(), NetError> {
        let h = self.data_reply(version, codec);
        self.link.send_frame_owned(&h, payload)
    }

    /// Marks the request answered and builds the header of its data reply.
    fn data_reply(&mut self, version: u64, codec: PayloadCodec) -> FrameHeader {
        self.done = true;
        let mut h = reply_header(&self.req, 0, true);
        h.version = version;
        h.codec = codec;
        h
    }

    /// Answers with an error message; the requester's `Pending::wait` returns `NetError::Remote`.
    pub fn error(mut self, msg: &str) -> Result<(), NetError> {
        self.done = true;
        self.send_error(msg)
    }

    fn send_error(&self, msg: &str) -> Result<(), NetError> {
        let h = reply_header(&self.req, 0, false);
        self.link.send_frame(&h, msg.as_bytes())
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.done && !self.link.is_closed() {
            let _ = self.send_error("request dropped without a reply");
        }
    }
}

/// Server-side request handler.
///
/// Callbacks run on driver threads (one reader thread per connection with the portable driver, the
/// ring thread with io_uring): return quickly and answer slow requests later through the
/// [`Responder`]. A [`Responder::send`] on a portable reader thread blocks until the socket takes
/// the bytes, and the connection is not read meanwhile (another thread keeps its heartbeats
/// going): see [`PeerHandle::driver`] for answering large or other connections' replies. On
/// io_uring a blocked callback holds every connection of the ring, heartbeats included.
pub trait Handler: Send + Sync + 'static {
    /// A request arrived; answer it through `reply`, now or later.
    fn on_request(&self, req: Request, reply: Responder);

    /// A peer finished its handshake.
    fn on_connect(&self, _peer: &PeerHandle) {}

    /// A peer's connection closed or failed (after the handshake or not); its unanswered
    /// responders now fail to send.
    fn on_disconnect(&self, _peer: &PeerHandle, _reason: &NetError) {}
}

/// A shared handler: lets a caller keep an `Arc` to its handler's state.
impl<H: Handler + ?Sized> Handler for Arc<H> {
    fn on_request(&self, req: Request, reply: Responder) {
        (**self).on_request(req, reply)
    }

    fn on_connect(&self, peer: &PeerHandle) {
        (**self).on_connect(peer)
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        (**self).on_disconnect(peer, reason)
    }
}
