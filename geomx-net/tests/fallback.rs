//! Driver selection when io_uring is unavailable (forced through GEOMX_NET_DISABLE_URING; this
//! file is its own test process, so the override cannot leak into other tests).

use std::time::Duration;

use geomx_net::{
    DriverKind, Handler, KvClient, KvServer, NetError, NetOptions, PayloadCodec, Request, Responder,
};

struct Echo;
impl Handler for Echo {
    fn on_request(&self, req: Request, reply: Responder) {
        let _ = reply.send(req.version, req.codec, &req.payload);
    }
}

#[test]
fn auto_falls_back_to_portable_and_explicit_io_uring_fails_clearly() {
    std::env::set_var("GEOMX_NET_DISABLE_URING", "1");
    let why = geomx_net::uring_unavailable_reason().expect("forced unavailable");
    assert!(why.contains("GEOMX_NET_DISABLE_URING"), "{why}");

    let auto = NetOptions {
        driver: DriverKind::Auto,
        ..NetOptions::default()
    };
    let server = KvServer::bind("127.0.0.1:0", Echo, auto.clone()).unwrap();
    assert_eq!(server.driver(), DriverKind::Portable);
    let client = KvClient::connect(server.local_addr(), 1, auto).unwrap();
    assert_eq!(client.driver(), DriverKind::Portable);
    let r = client
        .push(1, 2, PayloadCodec::Raw, 0, 0, b"hi")
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    assert_eq!(r.payload, b"hi");

    let forced = NetOptions {
        driver: DriverKind::IoUring,
        ..NetOptions::default()
    };
    match KvServer::bind("127.0.0.1:0", Echo, forced) {
        Err(NetError::DriverUnavailable(m)) => {
            assert!(m.contains("GEOMX_NET_DISABLE_URING"), "{m}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("io_uring must be refused"),
    }
}
