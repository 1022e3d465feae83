//! A request's `sender` is the node id its connection announced in the Hello, not whatever each
//! frame's header claims: a handler that maps senders to members (workers, local servers) trusts
//! the connection, and one connection cannot speak for another node.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geomx_net::wire::{self, Frame, FrameHeader, MsgKind, HEADER_LEN};
use geomx_net::{Handler, KvServer, NetOptions, PayloadCodec, Request, Responder};

struct Record(Arc<Mutex<Vec<u32>>>);

impl Handler for Record {
    fn on_request(&self, req: Request, reply: Responder) {
        self.0.lock().unwrap().push(req.sender);
        let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
    }
}

fn read_frame(s: &mut TcpStream) -> Frame {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let h = FrameHeader::decode(&head, 1 << 20).unwrap();
    let mut buf = head.to_vec();
    buf.resize(HEADER_LEN + h.payload_len as usize, 0);
    s.read_exact(&mut buf[HEADER_LEN..]).unwrap();
    wire::decode(&buf, 1 << 20).unwrap()
}

#[test]
fn requests_carry_the_hello_id_not_the_frame_header() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut server =
        KvServer::bind("127.0.0.1:0", Record(seen.clone()), NetOptions::default()).unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = FrameHeader {
        sender: 5,
        ..FrameHeader::new(MsgKind::Hello)
    };
    s.write_all(&wire::encode(&Frame::new(hello, Vec::new())))
        .unwrap();
    assert_eq!(read_frame(&mut s).header.kind, MsgKind::HelloAck);
    for (id, claimed) in [(1u64, 9u32), (2, 5), (3, 0)] {
        let push = FrameHeader {
            sender: claimed,
            request_id: id,
            version: id,
            ..FrameHeader::new(MsgKind::Push)
        };
        s.write_all(&wire::encode(&Frame::new(push, vec![1, 2, 3])))
            .unwrap();
        let reply = read_frame(&mut s);
        assert_eq!(
            (reply.header.kind, reply.header.request_id),
            (MsgKind::Reply, id)
        );
    }
    assert_eq!(*seen.lock().unwrap(), vec![5, 5, 5]);
    server.shutdown();
}
