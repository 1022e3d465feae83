//! The sans-IO connection under arbitrary (well-formed) frame sequences and clock jumps: it never
//! panics, every request token comes back exactly once, and a closed connection stays closed.

use std::time::{Duration, Instant};

use geomx_net::conn::{reply_header, ConnConfig, Connection, Event, Side};
use geomx_net::wire::{Frame, FrameHeader, MsgKind};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Frame(MsgKind, u64),
    Request,
    Advance(u64),
    Reset,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (prop::sample::select(MsgKind::ALL.to_vec()), 0u64..6)
            .prop_map(|(k, id)| Step::Frame(k, id)),
        Just(Step::Request),
        (0u64..3000).prop_map(Step::Advance),
        Just(Step::Reset),
    ]
}

proptest! {
    #[test]
    fn tokens_come_back_exactly_once(side in prop::bool::ANY, steps in prop::collection::vec(step(), 0..60)) {
        let side = if side { Side::Initiator } else { Side::Acceptor };
        let cfg = ConnConfig {
            handshake_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(1000),
            heartbeat_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(2000),
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut c: Connection<u32> = Connection::new(side, 1, cfg, now);
        let mut issued = Vec::new();
        let mut returned = Vec::new();
        let mut closed = false;
        for s in steps {
            match s {
                Step::Frame(kind, id) => {
                    let mut h = FrameHeader::new(kind);
                    h.request_id = id;
                    if matches!(kind, MsgKind::Reply | MsgKind::ErrorReply) {
                        h = reply_header(&h, 2, kind == MsgKind::Reply);
                    }
                    c.handle_frame(now, Frame::new(h, vec![]));
                }
                Step::Request => {
                    let token = issued.len() as u32;
                    match c.start_request(now, FrameHeader::new(MsgKind::Push), token) {
                        Ok(h) => {
                            prop_assert!(h.request_id != 0);
                            issued.push(token);
                        }
                        Err((_, t)) => prop_assert_eq!(t, token),
                    }
                }
                Step::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    c.handle_timeout(now);
                }
                Step::Reset => c.handle_io_closed("reset".into()),
            }
            while c.poll_transmit().is_some() {}
            while let Some(e) = c.poll_event() {
                match e {
                    Event::Response { token, .. } => returned.push(token),
                    Event::Closed(_) => {
                        prop_assert!(!closed, "closed twice");
                        closed = true;
                    }
                    _ => prop_assert!(!closed, "event after close"),
                }
            }
            prop_assert_eq!(closed, c.is_closed());
            prop_assert_eq!(c.pending_len() + returned.len(), issued.len());
        }
        c.handle_io_closed("end".into());
        while let Some(e) = c.poll_event() {
            if let Event::Response { token, .. } = e {
                returned.push(token);
            }
        }
        returned.sort_unstable();
        prop_assert_eq!(returned, issued);
    }
}
