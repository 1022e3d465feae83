//! Sans-IO connection state machine: handshake, request/response matching, liveness.
//!
//! The machine owns no socket and reads no clock. The driver feeds it decoded frames
//! ([`Connection::handle_frame`]), byte activity and `now`, and drains what to send
//! ([`Connection::poll_transmit`]) and what happened ([`Connection::poll_event`]). Requests carry a
//! caller token `T` that comes back with the matching response, error or timeout.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::error::NetError;
use crate::wire::{Frame, FrameHeader, MsgKind, WireError};

/// Timing settings of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnConfig {
    /// Time allowed for the Hello / HelloAck exchange.
    pub handshake_timeout: Duration,
    /// A request without a response after this long fails with [`NetError::Timeout`].
    pub request_timeout: Duration,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// The peer is declared dead after this long without receiving any byte, and (in the
    /// drivers) when a send makes no progress for this long: a peer that stopped reading.
    pub peer_timeout: Duration,
}

impl Default for ConnConfig {
    /// The hips.md defaults: heartbeat 1 s, peer dead after 10 s; handshake 10 s; requests 60 s.
    fn default() -> Self {
        ConnConfig {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(10),
        }
    }
}

/// Which end of the TCP connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opened the connection; sends Hello, receives responses and notifications.
    Initiator,
    /// Accepted the connection; answers Hello, receives requests.
    Acceptor,
}

/// Something the driver or endpoint must act on.
#[derive(Debug)]
pub enum Event<T> {
    /// The handshake finished; the peer announced this node id.
    Established {
        /// Peer node id.
        peer_id: u32,
    },
    /// A request frame (acceptor side only); answer with a header from [`reply_header`].
    Request(Frame),
    /// An unsolicited notification (Shutdown, AbortNotice; initiator side only).
    Notify(Frame),
    /// The outcome of a request started with [`Connection::start_request`].
    Response {
        /// The caller's token.
        token: T,
        /// The Reply frame, or why there is none.
        result: Result<Frame, NetError>,
    },
    /// The connection is finished; every pending request has been failed before this event.
    Closed(NetError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking { deadline: Instant },
    Established,
    Closed,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Connection<T> {
    side: Side,
    local_id: u32,
    peer_id: Option<u32>,
    state: State,
    cfg: ConnConfig,
    next_request_id: u64,
    pending: HashMap<u64, (Instant, T)>,
    transmits: VecDeque<Frame>,
    events: VecDeque<Event<T>>,
    last_recv: Instant,
    last_sent: Instant,
    /// What the transport knew of a silent connection (the driver's
    /// [`Connection::note_transport`]), for the error if the peer is declared dead.
    transport: Option<String>,
    close_reason: Option<NetError>,
}

/// The header answering `req`: kind Reply (or ErrorReply when `ok` is false), same request id,
/// key and range, sender `local_id`. The caller sets version, codec and payload length.
pub fn reply_header(req: &FrameHeader, local_id: u32, ok: bool) -> FrameHeader {
    FrameHeader {
        kind: if ok {
            MsgKind::Reply
        } else {
            MsgKind::ErrorReply
        },
        sender: local_id,
        request_id: req.request_id,
        key: req.key,
        offset: req.offset,
        total: req.total,
        ..FrameHeader::new(MsgKind::Reply)
    }
}

impl<T> Connection<T> {
    /// A connection of `side` for node `local_id`, started at `now`. An initiator queues its Hello.
    pub fn new(side: Side, local_id: u32, cfg: ConnConfig, now: Instant) -> Self {
        let mut c = Connection {
            side,
            local_id,
            peer_id: None,
            state: State::Handshaking {
                deadline: now + cfg.handshake_timeout,
            },
            cfg,
            next_request_id: 1,
            pending: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            last_recv: now,
            last_sent: now,
            transport: None,
            close_reason: None,
        };
        if side == Side::Initiator {
            c.queue(FrameHeader::new(MsgKind::Hello), Vec::new());
        }
        c
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The peer's node id once the handshake is done.
    pub fn peer_id(&self) -> Option<u32> {
        self.peer_id
    }

    /// This node's id.
    pub fn local_id(&self) -> u32 {
        self.local_id
    }

    /// True once Hello / HelloAck were exchanged and the connection is not closed.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True after the connection closed (the reason is in [`Connection::close_reason`]).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Why the connection closed.
    pub fn close_reason(&self) -> Option<&NetError> {
        self.close_reason.as_ref()
    }

    /// Number of requests awaiting a response.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn queue(&mut self, mut header: FrameHeader, payload: Vec<u8>) {
        header.sender = self.local_id;
        self.transmits.push_back(Frame::new(header, payload));
    }

    /// Bytes (possibly a partial frame) arrived at `now`: the peer is alive.
    pub fn note_recv(&mut self, now: Instant) {
        self.last_recv = self.last_recv.max(now);
    }

    /// Bytes were handed to the socket at `now`.
    pub fn note_sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// Whether nothing has arrived for the peer timeout at `now`: the connection is about to
    /// close, and the driver may tell [`Connection::note_transport`] what it knows first.
    pub fn is_silent(&self, now: Instant) -> bool {
        self.state == State::Established
            && now.saturating_duration_since(self.last_recv) >= self.cfg.peer_timeout
    }

    /// What the transport knows of this connection (e.g. the kernel's `TCP_INFO`: when the
    /// peer's stack last acknowledged our bytes, retransmissions, zero-window probes), named in
    /// the error if [`Connection::handle_timeout`] declares the peer dead for silence. It tells
    /// a dead host or a cut path (nothing acknowledged either) from a hung process or a flow
    /// towards us in retransmission backoff (its stack still acknowledges ours).
    pub fn note_transport(&mut self, detail: String) {
        self.transport = Some(detail);
    }

    /// Processes one decoded frame received at `now`.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        self.note_recv(now);
        let kind = frame.header.kind;
        match self.state {
            State::Closed => {}
            State::Handshaking { .. } => match (self.side, kind) {
                (Side::Acceptor, MsgKind::Hello) => {
                    self.queue(FrameHeader::new(MsgKind::HelloAck), Vec::new());
                    self.establish(frame.header.sender);
                }
                (Side::Initiator, MsgKind::HelloAck) => self.establish(frame.header.sender),
                (Side::Initiator, MsgKind::ErrorReply) if frame.header.request_id == 0 => {
                    let msg = String::from_utf8_lossy(&frame.payload).into_owned();
                    self.close(NetError::Rejected(msg));
                }
                _ => self.close(NetError::Protocol(format!("{kind:?} before the handshake"))),
            },
            State::Established => self.handle_established(frame),
        }
    }

    fn establish(&mut self, peer: u32) {
        self.peer_id = Some(peer);
        self.state = State::Established;
        self.events.push_back(Event::Established { peer_id: peer });
    }

    fn handle_established(&mut self, frame: Frame) {
        let kind = frame.header.kind;
        match kind {
            MsgKind::Heartbeat => {}
            MsgKind::Goodbye => self.close(NetError::PeerClosed("peer said goodbye".into())),
            MsgKind::Reply | MsgKind::ErrorReply => {
                // A reply to a request that already timed out is dropped silently.
                if let Some((_, token)) = self.pending.remove(&frame.header.request_id) {
                    let result = if kind == MsgKind::Reply {
                        Ok(frame)
                    } else {
                        Err(NetError::Remote(
                            String::from_utf8_lossy(&frame.payload).into_owned(),
                        ))
                    };
                    self.events.push_back(Event::Response { token, result });
                }
            }
            k if k.is_request() && self.side == Side::Acceptor => {
                self.events.push_back(Event::Request(frame))
            }
            MsgKind::Shutdown | MsgKind::AbortNotice if self.side == Side::Initiator => {
                self.events.push_back(Event::Notify(frame))
            }
            other => self.close(NetError::Protocol(format!(
                "unexpected {other:?} on {:?} side",
                self.side
            ))),
        }
    }

    /// The decoder rejected the byte stream: close with that error.
    pub fn handle_wire_error(&mut self, err: WireError) {
        self.close(NetError::Wire(err));
    }

    /// The input failed otherwise (e.g. TLS authentication): close with `err`.
    pub fn handle_error(&mut self, err: NetError) {
        self.close(err);
    }

    /// The socket failed (reset, EOF, ...): close at once, failing every pending request.
    pub fn handle_io_closed(&mut self, reason: String) {
        self.close(NetError::PeerClosed(reason));
    }

    /// Registers a request and returns its header (request id and sender filled in); the caller
    /// sends it with its payload. On a closed connection the token comes back with the reason.
    pub fn start_request(
        &mut self,
        now: Instant,
        mut header: FrameHeader,
        token: T,
    ) -> Result<FrameHeader, (NetError, T)> {
        if self.state == State::Closed {
            let reason = self.close_reason.clone().unwrap_or(NetError::Shutdown);
            return Err((reason, token));
        }
        header.request_id = self.next_request_id;
        header.sender = self.local_id;
        self.next_request_id += 1;
        self.pending
            .insert(header.request_id, (now + self.cfg.request_timeout, token));
        Ok(header)
    }

    /// Drops a pending request whose frame could not be sent, returning its token.
    pub fn cancel_request(&mut self, request_id: u64) -> Option<T> {
        self.pending.remove(&request_id).map(|(_, t)| t)
    }

    /// Advances timers to `now`: handshake and liveness timeouts, request timeouts, heartbeats.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => return,
            State::Handshaking { deadline } if now >= deadline => {
                self.close(NetError::Timeout(format!(
                    "handshake not finished within {:?}",
                    self.cfg.handshake_timeout
                )));
                return;
            }
            State::Established if self.is_silent(now) => {
                let transport = self
                    .transport
                    .take()
                    .map(|t| format!("; {t}"))
                    .unwrap_or_default();
                self.close(NetError::PeerClosed(format!(
                    "no traffic from peer {} for {:?}{transport}",
                    self.peer_id.unwrap_or(0),
                    self.cfg.peer_timeout
                )));
                return;
            }
            _ => {}
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (d, _))| now >= *d)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((_, token)) = self.pending.remove(&id) {
                let err = NetError::Timeout(format!(
                    "request {id} unanswered after {:?}",
                    self.cfg.request_timeout
                ));
                self.events.push_back(Event::Response {
                    token,
                    result: Err(err),
                });
            }
        }
        if self.transmits.is_empty() {
            if let Some(f) = self.poll_heartbeat(now) {
                self.transmits.push_back(f);
            }
        }
    }

    /// A heartbeat to send at `now`, if one is due (nothing sent for the heartbeat interval on
    /// an established connection); counted as sent. [`Connection::handle_timeout`] queues it
    /// with the rest; a driver whose reading thread is held by the endpoint's callbacks sends
    /// it from another thread, so that the peer does not take a busy endpoint for a dead one.
    pub fn poll_heartbeat(&mut self, now: Instant) -> Option<Frame> {
        if self.state != State::Established
            || now.saturating_duration_since(self.last_sent) < self.cfg.heartbeat_interval
        {
            return None;
        }
        self.last_sent = now;
        let mut header = FrameHeader::new(MsgKind::Heartbeat);
        header.sender = self.local_id;
        Some(Frame::new(header, Vec::new()))
    }

    /// The next instant at which [`Connection::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = match self.state {
            State::Closed => return None,
            State::Handshaking { deadline } => deadline,
            State::Established => (self.last_recv + self.cfg.peer_timeout)
                .min(self.last_sent + self.cfg.heartbeat_interval),
        };
        for (d, _) in self.pending.values() {
            t = t.min(*d);
        }
        Some(t)
    }

    /// Closes locally (e.g. endpoint shutdown): queues a Goodbye and fails pending requests.
    pub fn close_local(&mut self) {
        if self.state != State::Closed {
            self.queue(FrameHeader::new(MsgKind::Goodbye), Vec::new());
            self.close(NetError::Shutdown);
        }
    }

    fn close(&mut self, reason: NetError) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        for (_, (_, token)) in self.pending.drain() {
            self.events.push_back(Event::Response {
                token,
                result: Err(reason.clone()),
            });
        }
        self.close_reason = Some(reason.clone());
        self.events.push_back(Event::Closed(reason));
    }

    /// The next control frame to send (Hello, HelloAck, Heartbeat, Goodbye).
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PayloadCodec;

    fn cfg() -> ConnConfig {
        ConnConfig {
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(10),
        }
    }

    /// Moves every queued control frame from `a` to `b`.
    fn pump(now: Instant, a: &mut Connection<u32>, b: &mut Connection<u32>) {
        while let Some(f) = a.poll_transmit() {
            b.handle_frame(now, f);
        }
    }

    fn events(c: &mut Connection<u32>) -> Vec<Event<u32>> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn pair(now: Instant) -> (Connection<u32>, Connection<u32>) {
        let mut cl = Connection::new(Side::Initiator, 7, cfg(), now);
        let mut sv = Connection::new(Side::Acceptor, 1, cfg(), now);
        pump(now, &mut cl, &mut sv);
        pump(now, &mut sv, &mut cl);
        (cl, sv)
    }

    #[test]
    fn handshake_exchanges_ids() {
        let now = Instant::now();
        let (mut cl, mut sv) = pair(now);
        assert!(cl.is_established() && sv.is_established());
        assert_eq!(cl.peer_id(), Some(1));
        assert_eq!(sv.peer_id(), Some(7));
        assert!(matches!(
            events(&mut cl)[..],
            [Event::Established { peer_id: 1 }]
        ));
        assert!(matches!(
            events(&mut sv)[..],
            [Event::Established { peer_id: 7 }]
        ));
    }

    #[test]
    fn responses_match_requests_by_id_in_any_order() {
        let now = Instant::now();
        let (mut cl, mut sv) = pair(now);
        events(&mut cl);
        events(&mut sv);
        let mut headers = Vec::new();
        for token in 0..3u32 {
            let mut h = FrameHeader::new(MsgKind::Push);
            h.key = u64::from(token) + 100;
            headers.push(cl.start_request(now, h, token).unwrap());
        }
        for h in &headers {
            sv.handle_frame(now, Frame::new(*h, vec![]));
        }
        let reqs: Vec<Frame> = events(&mut sv)
            .into_iter()
            .map(|e| match e {
                Event::Request(f) => f,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reqs.len(), 3);
        // Answer in reverse order; the third with an error.
        for (i, r) in reqs.iter().enumerate().rev() {
            let mut h = reply_header(&r.header, 1, i != 2);
            h.codec = PayloadCodec::Raw;
            let payload = if i == 2 {
                b"nope".to_vec()
            } else {
                vec![i as u8]
            };
            cl.handle_frame(now, Frame::new(h, payload));
        }
        let mut got: Vec<(u32, Result<u64, String>)> = events(&mut cl)
            .into_iter()
            .map(|e| match e {
                Event::Response { token, result } => (
                    token,
                    result.map(|f| f.header.key).map_err(|e| e.to_string()),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got[0], (0, Ok(100)));
        assert_eq!(got[1], (1, Ok(101)));
        assert_eq!(got[2], (2, Err("remote error: nope".into())));
        assert_eq!(cl.pending_len(), 0);
    }

    #[test]
    fn request_times_out_then_late_reply_is_ignored() {
        let t0 = Instant::now();
        let (mut cl, _sv) = pair(t0);
        events(&mut cl);
        let h = cl
            .start_request(t0, FrameHeader::new(MsgKind::Pull), 9)
            .unwrap();
        cl.handle_timeout(t0 + Duration::from_secs(4));
        assert!(events(&mut cl).is_empty());
        cl.note_recv(t0 + Duration::from_secs(4));
        cl.handle_timeout(t0 + Duration::from_secs(5));
        match &events(&mut cl)[..] {
            [Event::Response {
                token: 9,
                result: Err(NetError::Timeout(_)),
            }] => {}
            other => panic!("{other:?}"),
        }
        cl.handle_frame(
            t0 + Duration::from_secs(6),
            Frame::new(reply_header(&h, 1, true), vec![]),
        );
        assert!(events(&mut cl).is_empty());
        assert!(cl.is_established());
    }

    #[test]
    fn reset_fails_pending_at_once() {
        let t0 = Instant::now();
        let (mut cl, _sv) = pair(t0);
        events(&mut cl);
        cl.start_request(t0, FrameHeader::new(MsgKind::Push), 1)
            .unwrap();
        cl.start_request(t0, FrameHeader::new(MsgKind::Push), 2)
            .unwrap();
        cl.handle_io_closed("connection reset".into());
        let ev = events(&mut cl);
        assert_eq!(ev.len(), 3);
        assert!(ev[..2].iter().all(|e| matches!(
            e,
            Event::Response {
                result: Err(NetError::PeerClosed(_)),
                ..
            }
        )));
        assert!(matches!(ev[2], Event::Closed(NetError::PeerClosed(_))));
        let err = cl
            .start_request(t0, FrameHeader::new(MsgKind::Push), 3)
            .unwrap_err();
        assert!(matches!(err, (NetError::PeerClosed(_), 3)));
    }

    #[test]
    fn heartbeats_when_idle_and_silence_kills() {
        let t0 = Instant::now();
        let (mut cl, mut sv) = pair(t0);
        events(&mut cl);
        events(&mut sv);
        cl.handle_timeout(t0 + Duration::from_millis(1500));
        let hb = cl.poll_transmit().expect("heartbeat");
        assert_eq!(hb.header.kind, MsgKind::Heartbeat);
        sv.handle_frame(t0 + Duration::from_millis(1500), hb);
        sv.handle_timeout(t0 + Duration::from_millis(11_000));
        assert!(
            sv.is_established(),
            "heartbeat at 1.5 s keeps it alive until 11.5 s"
        );
        sv.handle_timeout(t0 + Duration::from_millis(11_500));
        assert!(sv.is_closed());
        assert!(matches!(sv.close_reason(), Some(NetError::PeerClosed(_))));
    }

    #[test]
    fn silence_names_what_the_transport_knew() {
        let t0 = Instant::now();
        let (mut cl, mut sv) = pair(t0);
        events(&mut cl);
        events(&mut sv);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!sv.is_silent(at(9_999)));
        assert!(sv.is_silent(at(10_000)));
        sv.note_transport("TCP: peer's last ack 0.4 s ago".into());
        sv.handle_timeout(at(10_000));
        assert!(
            sv.is_closed(),
            "what the transport says does not extend the timeout"
        );
        let Some(NetError::PeerClosed(msg)) = sv.close_reason() else {
            panic!("{:?}", sv.close_reason())
        };
        let peer = sv.peer_id().unwrap_or(0);
        assert_eq!(
            msg,
            &format!("no traffic from peer {peer} for 10s; TCP: peer's last ack 0.4 s ago")
        );
        assert!(
            !sv.is_silent(at(20_000)),
            "a closed connection is not silent"
        );
    }

    #[test]
    fn handshake_timeout_and_protocol_violation() {
        let t0 = Instant::now();
        let mut sv: Connection<u32> = Connection::new(Side::Acceptor, 1, cfg(), t0);
        sv.handle_timeout(t0 + Duration::from_secs(2));
        assert!(matches!(sv.close_reason(), Some(NetError::Timeout(_))));

        let mut sv: Connection<u32> = Connection::new(Side::Acceptor, 1, cfg(), t0);
        sv.handle_frame(t0, Frame::new(FrameHeader::new(MsgKind::Push), vec![1, 2]));
        assert!(matches!(sv.close_reason(), Some(NetError::Protocol(_))));
    }

    #[test]
    fn poll_timeout_tracks_earliest_deadline() {
        let t0 = Instant::now();
        let (mut cl, _sv) = pair(t0);
        assert_eq!(cl.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        cl.note_sent(t0 + Duration::from_secs(3));
        cl.note_recv(t0 + Duration::from_secs(3));
        cl.start_request(
            t0 + Duration::from_secs(3),
            FrameHeader::new(MsgKind::Pull),
            0,
        )
        .unwrap();
        assert_eq!(cl.poll_timeout(), Some(t0 + Duration::from_secs(4)));
    }
}
