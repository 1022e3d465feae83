//! One live connection: the sans-IO [`Connection`] behind a lock, plus the driver's write half.
//!
//! Drivers call `on_input` / `on_tick` / `on_wire_error` / `on_io_closed`; the link applies them to
//! the state machine, sends the control frames it asks for and hands events to the endpoint's
//! [`Dispatch`] (outside the lock).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::conn::{Connection, Event};
use crate::error::NetError;
use crate::owned::OwnedBytes;
use crate::stats::LiveCounters;
use crate::tcp_state::TcpProgress;
use crate::wire::{Frame, FrameHeader, MsgKind, WireError, HEADER_LEN};

/// Where a request's outcome goes.
pub(crate) type ReplyTx = Sender<Result<Frame, NetError>>;

/// Endpoint callbacks (run on driver threads; must not block for long).
pub(crate) trait Dispatch: Send + Sync + 'static {
    fn on_established(&self, _link: &Arc<Link>, _peer_id: u32) {}
    fn on_request(&self, link: &Arc<Link>, frame: Frame);
    fn on_notify(&self, _link: &Arc<Link>, _frame: Frame) {}
    fn on_closed(&self, link: &Arc<Link>, reason: NetError);
}

/// The write half a driver provides.
pub(crate) trait LinkIo: Send + Sync {
    /// Writes one whole frame; blocks until the kernel has the bytes (or owns a copy).
    fn send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<()>;
    /// Like `send` with a payload the driver may keep until the kernel is done with it: it may
    /// return before the bytes are sent, without copying them (the default sends and drops).
    fn send_owned(&self, header: &[u8; HEADER_LEN], payload: OwnedBytes) -> std::io::Result<()> {
        self.send(header, (*payload).as_ref())
    }
    /// Like `send` but gives up at once (returning false) when another send is in progress.
    fn try_send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<bool>;
    /// Shuts the socket down in both directions (idempotent).
    fn shutdown(&self);
    /// Encrypted connections: sends a fatal TLS alert, best effort and without blocking, before
    /// the connection is closed for bad input (the default does nothing).
    fn send_alert(&self, _description: u8) {}
    /// What the kernel knows of the socket's progress (`None` where it cannot be read).
    fn tcp_progress(&self) -> Option<TcpProgress>;
    /// The connection's socket, for its options and its path figures.
    fn socket(&self) -> socket2::SockRef<'_>;
    /// The driver that writes this connection (never `Auto`).
    fn driver(&self) -> crate::DriverKind;
}

/// Reads a connection's input on the calling thread (drivers that read inline provide one).
pub(crate) trait Pump: Send + Sync {
    /// Reads and processes input once (blocking up to one tick). False if another thread is
    /// reading or the connection has ended (nothing was done).
    fn pump(&self, link: &Arc<Link>) -> bool;
}

pub(crate) struct Link {
    conn: Mutex<Connection<ReplyTx>>,
    pump: std::sync::OnceLock<Arc<dyn Pump>>,
    io: Box<dyn LinkIo>,
    counters: Arc<LiveCounters>,
    max_frame: usize,
    peer_addr: SocketAddr,
    /// The peer's certificate identity (mutual TLS), verified by the handshake.
    identity: Option<crate::tls::Identity>,
    dispatch: Arc<dyn Dispatch>,
}

impl Link {
    pub(crate) fn new(
        conn: Connection<ReplyTx>,
        io: Box<dyn LinkIo>,
        counters: Arc<LiveCounters>,
        max_frame: usize,
        peer_addr: SocketAddr,
        identity: Option<crate::tls::Identity>,
        dispatch: Arc<dyn Dispatch>,
    ) -> Arc<Link> {
        Arc::new(Link {
            conn: Mutex::new(conn),
            pump: std::sync::OnceLock::new(),
            io,
            counters,
            max_frame,
            peer_addr,
            identity,
            dispatch,
        })
    }

    pub(crate) fn set_pump(&self, pump: Arc<dyn Pump>) {
        let _ = self.pump.set(pump);
    }

    /// Receives from `rx` by `deadline`, reading the connection on this thread meanwhile when the
    /// driver reads inline (no thread hand-off for the response).
    pub(crate) fn wait_recv<T>(
        self: &Arc<Self>,
        rx: &crossbeam_channel::Receiver<T>,
        deadline: Instant,
    ) -> Result<T, crossbeam_channel::RecvTimeoutError> {
        use crossbeam_channel::{RecvTimeoutError, TryRecvError};
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            let pumped = match self.pump.get() {
                Some(p) => p.pump(self),
                None => return rx.recv_timeout(deadline - now),
            };
            if !pumped {
                // Someone else is reading (and will hand our result over), or the link ended.
                let slice = if self.is_closed() {
                    deadline - now
                } else {
                    Duration::from_micros(200)
                };
                match rx.recv_timeout(slice.min(deadline - now)) {
                    Ok(v) => return Ok(v),
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(RecvTimeoutError::Disconnected)
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection<ReplyTx>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The driver that writes this connection (never `Auto`).
    pub(crate) fn driver(&self) -> crate::DriverKind {
        self.io.driver()
    }

    pub(crate) fn identity(&self) -> Option<&crate::tls::Identity> {
        self.identity.as_ref()
    }

    pub(crate) fn peer_id(&self) -> Option<u32> {
        self.lock().peer_id()
    }

    pub(crate) fn local_id(&self) -> u32 {
        self.lock().local_id()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().is_closed()
    }

    pub(crate) fn close_reason(&self) -> Option<NetError> {
        self.lock().close_reason().cloned()
    }

    pub(crate) fn counters(&self) -> &LiveCounters {
        &self.counters
    }

    /// What the kernel measured of the connection's path.
    pub(crate) fn tcp_rate(&self) -> Option<crate::TcpRate> {
        crate::TcpRate::of(&self.io.socket())
    }

    /// Sets the connection's send buffer (`SO_SNDBUF`).
    pub(crate) fn set_send_buffer(&self, bytes: usize) -> Result<(), NetError> {
        if let Some(reason) = self.close_reason() {
            return Err(reason);
        }
        self.io.socket().set_send_buffer_size(bytes)?;
        Ok(())
    }

    /// The connection's send buffer as the kernel reports it.
    pub(crate) fn send_buffer(&self) -> Result<usize, NetError> {
        Ok(self.io.socket().send_buffer_size()?)
    }

    fn check_len(&self, len: usize) -> Result<(), NetError> {
        if len + HEADER_LEN > self.max_frame || len > u32::MAX as usize {
            return Err(NetError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(())
    }

    fn write(&self, header: &FrameHeader, payload: &[u8]) -> Result<(), NetError> {
        let mut h = *header;
        h.payload_len = payload.len() as u32;
        self.io.send(&h.encode(), payload)?;
        self.counters.add_sent(HEADER_LEN + payload.len(), 1);
        self.lock().note_sent(Instant::now());
        Ok(())
    }

    /// Sends a reply or notification frame whose payload the driver may keep (no copy).
    pub(crate) fn send_frame_owned(
        self: &Arc<Self>,
        header: &FrameHeader,
        payload: OwnedBytes,
    ) -> Result<(), NetError> {
        let len = (*payload).as_ref().len();
        self.send_unsolicited(header, len, |h| self.io.send_owned(h, payload))
    }

    /// The checks and accounting around a reply or notification frame of `len` payload bytes
    /// that `io` writes after its encoded header.
    fn send_unsolicited(
        self: &Arc<Self>,
        header: &FrameHeader,
        len: usize,
        io: impl FnOnce(&[u8; HEADER_LEN]) -> std::io::Result<()>,
    ) -> Result<(), NetError> {
        self.check_len(len)?;
        if let Some(reason) = self.close_reason() {
            return Err(reason);
        }
        let mut h = *header;
        h.sender = self.local_id();
        h.payload_len = len as u32;
        if let Err(e) = io(&h.encode()) {
            let e = NetError::from(e);
            self.on_io_closed(format!("send failed: {e}"));
            return Err(e);
        }
        self.counters.add_sent(HEADER_LEN + len, 1);
        self.lock().note_sent(Instant::now());
        Ok(())
    }

    /// Starts a request; its outcome is delivered on `tx`.
    pub(crate) fn send_request(
        self: &Arc<Self>,
        header: FrameHeader,
        payload: &[u8],
        tx: ReplyTx,
    ) -> Result<(), NetError> {
        self.check_len(payload.len())?;
        let header = self
            .lock()
            .start_request(Instant::now(), header, tx)
            .map_err(|(e, _)| e)?;
        if let Err(e) = self.write(&header, payload) {
            self.lock().cancel_request(header.request_id);
            self.on_io_closed(format!("send failed: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Sends a reply or notification frame.
    pub(crate) fn send_frame(
        self: &Arc<Self>,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), NetError> {
        self.send_unsolicited(header, payload.len(), |h| self.io.send(h, payload))
    }

    /// Frames (possibly none, for a partial read) arrived at `now`.
    pub(crate) fn on_input(self: &Arc<Self>, now: Instant, frames: &mut Vec<Frame>) {
        {
            let mut c = self.lock();
            c.note_recv(now);
            self.counters.add_recv_frames(frames.len() as u64);
            for f in frames.drain(..) {
                c.handle_frame(now, f);
            }
        }
        self.flush();
    }

    pub(crate) fn on_tick(self: &Arc<Self>, now: Instant) {
        let silent = self.lock().is_silent(now);
        // About to close for silence: the error says what the kernel knew (see `tcp_state`).
        let tcp = silent.then(|| self.io.tcp_progress()).flatten();
        let mut c = self.lock();
        if let Some(t) = tcp {
            c.note_transport(t.to_string());
        }
        c.handle_timeout(now);
        drop(c);
        self.flush();
    }

    /// While the thread that reads this connection is held by the endpoint's callbacks: a
    /// heartbeat if one is due, written only if no other frame is being written (that write
    /// proves liveness as well). Nothing else: input, events and the peer's liveness wait for
    /// the reader.
    pub(crate) fn heartbeat_while_busy(self: &Arc<Self>, now: Instant) {
        let Some(f) = self.lock().poll_heartbeat(now) else {
            return;
        };
        // A failed write is the reader's to see (its next read fails too).
        if let Ok(true) = self.io.try_send(&f.header.encode(), &f.payload) {
            self.counters.add_sent(HEADER_LEN, 1);
        }
    }

    pub(crate) fn on_wire_error(self: &Arc<Self>, err: WireError) {
        tracing::warn!(peer = %self.peer_addr, error = %err, "dropping connection: malformed frame");
        self.lock().handle_wire_error(err);
        self.flush();
    }

    /// Input could not be used: a malformed frame, or (TLS) a record that failed authentication.
    pub(crate) fn on_input_error(self: &Arc<Self>, err: NetError) {
        match err {
            NetError::Wire(e) => self.on_wire_error(e),
            other => {
                tracing::warn!(peer = %self.peer_addr, error = %other, "dropping connection");
                if matches!(other, NetError::Tls(crate::tls::TlsError::BadRecordMac)) {
                    // The peer learns why (RFC 8446 §5.2: bad_record_mac).
                    self.io.send_alert(crate::tls::record::BAD_RECORD_MAC);
                }
                self.lock().handle_error(other);
                self.flush();
            }
        }
    }

    pub(crate) fn on_io_closed(self: &Arc<Self>, reason: String) {
        self.lock().handle_io_closed(reason);
        self.flush();
    }

    /// Closes from this side: Goodbye, fail pending requests, shut the socket.
    pub(crate) fn close(self: &Arc<Self>) {
        self.lock().close_local();
        self.flush();
    }

    /// Sends queued control frames and dispatches queued events.
    pub(crate) fn flush(self: &Arc<Self>) {
        loop {
            let (tx, ev) = {
                let mut c = self.lock();
                (c.poll_transmit(), c.poll_event())
            };
            if tx.is_none() && ev.is_none() {
                return;
            }
            if let Some(f) = tx {
                let hdr = f.header.encode();
                let res = if f.header.kind == MsgKind::Heartbeat {
                    // Never block a reader on a heartbeat: a send in progress proves liveness.
                    self.io.try_send(&hdr, &f.payload).map(|sent| sent as u64)
                } else {
                    self.io.send(&hdr, &f.payload).map(|_| 1)
                };
                match res {
                    Ok(n) => {
                        self.counters
                            .add_sent(n as usize * (HEADER_LEN + f.payload.len()), n);
                        if n > 0 {
                            self.lock().note_sent(Instant::now());
                        }
                    }
                    Err(e) if f.header.kind == MsgKind::Goodbye => {
                        tracing::debug!(peer = %self.peer_addr, error = %e, "goodbye not sent");
                    }
                    Err(e) => self.lock().handle_io_closed(format!("send failed: {e}")),
                }
            }
            if let Some(ev) = ev {
                match ev {
                    Event::Established { peer_id } => self.dispatch.on_established(self, peer_id),
                    Event::Request(f) => self.dispatch.on_request(self, f),
                    Event::Notify(f) => self.dispatch.on_notify(self, f),
                    Event::Response { token, result } => {
                        let _ = token.send(result);
                    }
                    Event::Closed(reason) => {
                        // Flush a pending Goodbye before the socket goes.
                        while let Some(f) = self.lock().poll_transmit() {
                            let _ = self.io.send(&f.header.encode(), &f.payload);
                        }
                        self.io.shutdown();
                        self.dispatch.on_closed(self, reason);
                    }
                }
            }
        }
    }
}
