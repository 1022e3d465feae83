//! Coordinator over loopback: registration, ids, barriers, shutdown, abort on a lost node.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use geomx_net::coord::{
    CoordClient, CoordEvent, CoordOptions, CoordOutcome, Coordinator, Hello, PROTOCOL_VERSION,
};
use geomx_net::{ConnConfig, DriverKind, NetError, NetOptions};

fn net(driver: DriverKind) -> NetOptions {
    NetOptions {
        driver,
        conn: ConnConfig {
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_millis(100),
            // Long enough that a starved but healthy node is not declared dead on a loaded
            // machine.
            peer_timeout: Duration::from_secs(3),
        },
        tick: Duration::from_millis(20),
        ..NetOptions::default()
    }
}

fn drivers() -> Vec<DriverKind> {
    let mut d = vec![DriverKind::Portable];
    if geomx_net::uring_unavailable_reason().is_none() {
        d.push(DriverKind::IoUring);
    }
    d
}

fn hello(role: &str, dc: u32, rank: u32) -> Hello {
    Hello {
        role: role.into(),
        dc,
        rank,
        listen_addr: format!("127.0.0.1:{}", 9000 + dc * 10 + rank),
        protocol_version: PROTOCOL_VERSION,
        config_hash: 0xfeed,
        reattach: None,
    }
}

fn expected() -> Vec<(String, u32, u32)> {
    vec![
        ("server".into(), 0, 0),
        ("worker".into(), 0, 0),
        ("worker".into(), 1, 0),
    ]
}

/// Registers the three processes of [`expected`] at `addr` concurrently; their clients in that
/// order.
fn register_all(addr: std::net::SocketAddr, d: DriverKind) -> Vec<CoordClient> {
    let regs: Vec<_> = [("server", 0, 0), ("worker", 0, 0), ("worker", 1, 0)]
        .into_iter()
        .map(|(r, dc, k)| {
            thread::spawn(move || CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap())
        })
        .collect();
    regs.into_iter().map(|t| t.join().unwrap().0).collect()
}

fn coord(driver: DriverKind) -> Coordinator {
    let o = CoordOptions {
        net: net(driver),
        config_hash: 0xfeed,
        registration_timeout: Duration::from_secs(10),
        ..CoordOptions::default()
    };
    Coordinator::bind("127.0.0.1:0", expected(), o).unwrap()
}

const W: Duration = Duration::from_secs(30);

#[test]
fn register_barrier_done_shutdown() {
    for d in drivers() {
        let c = coord(d);
        let addr = c.local_addr();
        // A garbage peer first: never admitted, nothing crashes.
        let mut g = TcpStream::connect(addr).unwrap();
        g.write_all(&[0xAB; 300]).unwrap();
        let procs: Vec<_> = [("worker", 1, 0), ("server", 0, 0), ("worker", 0, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                thread::spawn(move || {
                    let (cl, m) = CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap();
                    cl.barrier("all").unwrap();
                    cl.barrier(&format!("dc:{dc}")).unwrap();
                    cl.done().unwrap();
                    let ev = cl.wait_event(W);
                    (m, ev)
                })
            })
            .collect();
        let results: Vec<_> = procs.into_iter().map(|p| p.join().unwrap()).collect();
        let ids: Vec<u32> = results.iter().map(|(m, _)| m.my_id).collect();
        assert_eq!(ids, vec![3, 1, 2], "{d:?}: ids by (dc, role, rank)");
        for (m, ev) in &results {
            assert_eq!(m.nodes.len(), 3);
            assert_eq!(m.find("worker", 1, 0).unwrap().addr, "127.0.0.1:9010");
            assert_eq!(ev, &Some(CoordEvent::Shutdown));
        }
        assert_eq!(c.wait(W), Some(CoordOutcome::Shutdown));
    }
}

#[test]
fn mismatch_rejected_and_lost_worker_aborts_everyone() {
    for d in drivers() {
        let c = coord(d);
        let addr = c.local_addr();
        let mut bad = hello("worker", 0, 0);
        bad.config_hash = 1;
        let e = CoordClient::register(addr, bad, net(d)).err().unwrap();
        assert!(
            matches!(e, NetError::Rejected(ref m) if m.contains("config hash")),
            "{e}"
        );
        let mut bad = hello("worker", 0, 0);
        bad.protocol_version = 99;
        let e = CoordClient::register(addr, bad, net(d)).err().unwrap();
        assert!(
            matches!(e, NetError::Rejected(ref m) if m.contains("protocol version")),
            "{e}"
        );
        let e = CoordClient::register(addr, hello("worker", 7, 0), net(d))
            .err()
            .unwrap();
        assert!(
            matches!(e, NetError::Rejected(ref m) if m.contains("not an expected")),
            "{e}"
        );

        let survivors: Vec<_> = [("server", 0, 0), ("worker", 0, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                thread::spawn(move || {
                    let (cl, _) = CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap();
                    let barrier = cl.barrier("all");
                    (barrier, cl.wait_event(W))
                })
            })
            .collect();
        let victim = thread::spawn(move || {
            let (cl, _) = CoordClient::register(addr, hello("worker", 1, 0), net(d)).unwrap();
            thread::sleep(Duration::from_millis(200));
            drop(cl); // the process "dies": connection closed without Done
        });
        victim.join().unwrap();
        let t0 = Instant::now();
        for s in survivors {
            let (barrier, ev) = s.join().unwrap();
            assert!(barrier.is_err(), "barrier released by the abort");
            match ev {
                Some(CoordEvent::Abort(n)) => {
                    assert_eq!((n.role.as_str(), n.dc, n.rank), ("worker", 1, 0), "{n}");
                }
                other => panic!("{d:?}: {other:?}"),
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
        assert!(matches!(c.wait(W), Some(CoordOutcome::Aborted(_))));
    }
}

#[test]
fn registration_timeout_names_missing() {
    for d in drivers() {
        let o = CoordOptions {
            net: net(d),
            config_hash: 0xfeed,
            registration_timeout: Duration::from_secs(5),
            ..CoordOptions::default()
        };
        let c = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
        let addr = c.local_addr();
        // Only one of three registers: the registration timeout names the missing ones.
        let h = thread::spawn(move || CoordClient::register(addr, hello("server", 0, 0), net(d)));
        let e = h.join().unwrap().err().unwrap();
        assert!(
            matches!(e, NetError::Rejected(ref m) if m.contains("worker (dc 1, rank 0)")),
            "{e}"
        );
        match c.wait(W) {
            Some(CoordOutcome::Aborted(n)) => {
                assert!(n.reason.contains("registration timed out"), "{n}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn silent_node_detected_by_heartbeat_timeout() {
    use geomx_net::wire::{encode, Frame, FrameHeader};
    use geomx_net::MsgKind;
    for d in drivers() {
        let c = coord(d);
        let addr = c.local_addr();
        let real: Vec<_> = [("server", 0, 0), ("worker", 0, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                thread::spawn(move || {
                    let (cl, _) = CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap();
                    cl.wait_event(W)
                })
            })
            .collect();
        // A hand-made peer: Hello, Register, then silence (no heartbeats).
        let mut raw = TcpStream::connect(addr).unwrap();
        let mut reg = FrameHeader::new(MsgKind::Register);
        reg.request_id = 1;
        let mut bytes = encode(&Frame::new(FrameHeader::new(MsgKind::Hello), vec![]));
        bytes.extend(encode(&Frame::new(reg, hello("worker", 1, 0).encode())));
        // Taken before the Register leaves, so a stall here cannot shorten the measured time.
        let t0 = Instant::now();
        raw.write_all(&bytes).unwrap();
        for r in real {
            match r.join().unwrap() {
                Some(CoordEvent::Abort(n)) => {
                    assert_eq!((n.role.as_str(), n.dc, n.rank), ("worker", 1, 0));
                    assert!(n.reason.contains("no traffic"), "{n}");
                }
                other => panic!("{d:?}: {other:?}"),
            }
        }
        // Detected by the 3 s peer timeout, not by anything sooner.
        assert!(
            t0.elapsed() >= Duration::from_millis(2500),
            "{:?}",
            t0.elapsed()
        );
        drop(raw);
    }
}

/// A member that lost a rejoinable peer polls `locate` until the peer registered again, and
/// then connects to its new address; a peer that is not a member is told nothing.
#[test]
fn a_member_locates_a_lost_server_and_its_next_incarnation() {
    for d in drivers() {
        let o = CoordOptions {
            net: net(d),
            config_hash: 0xfeed,
            registration_timeout: Duration::from_secs(10),
            rejoinable: vec!["server".into()],
            ..CoordOptions::default()
        };
        let c = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
        let addr = c.local_addr();
        let mut clients = register_all(addr, d);
        let worker = clients.remove(1);
        let server_key = geomx_net::coord::NodeKey::new("server", 0, 0);
        let l = worker.locate(&server_key).unwrap();
        assert_eq!(
            (l.addr.as_str(), l.incarnation, l.live),
            ("127.0.0.1:9000", 0, true)
        );
        // The server dies; the coordinator sees it (connection closed) and the job goes on.
        clients.remove(0).close();
        let deadline = Instant::now() + W;
        while worker.locate(&server_key).unwrap().live {
            assert!(Instant::now() < deadline, "{d:?}: the loss was never seen");
            thread::sleep(Duration::from_millis(20));
        }
        let mut again = hello("server", 0, 0);
        again.listen_addr = "127.0.0.1:9999".into();
        let (_server, m) = CoordClient::register(addr, again, net(d)).unwrap();
        assert_eq!(m.incarnation, 1);
        let l = worker.locate(&server_key).unwrap();
        assert_eq!(
            (l.addr.as_str(), l.incarnation, l.live),
            ("127.0.0.1:9999", 1, true)
        );
        // A stranger's locate is refused, and refused cleanly.
        let stranger = geomx_net::KvClient::connect(addr, 77, net(d)).unwrap();
        let e = stranger
            .request(
                geomx_net::wire::FrameHeader::new(geomx_net::MsgKind::Pull),
                &server_key.encode(),
            )
            .unwrap()
            .wait(W)
            .unwrap_err();
        assert!(e.to_string().contains("registered member"), "{e}");
        assert_eq!(
            c.wait(Duration::from_millis(1)),
            None,
            "{d:?}: the job goes on"
        );
    }
}

/// Members append records to the coordinator's journal, which keeps them in order with their
/// sender; a stranger's record and an oversized one are refused cleanly, and the job goes on.
#[test]
fn members_append_to_the_journal_and_strangers_cannot() {
    for d in drivers() {
        let o = CoordOptions {
            net: net(d),
            config_hash: 0xfeed,
            registration_timeout: Duration::from_secs(10),
            ..CoordOptions::default()
        };
        let c = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
        let addr = c.local_addr();
        let clients = register_all(addr, d);
        clients[0].journal(b"first").unwrap();
        clients[2].journal(b"second").unwrap();
        clients[0].journal(b"third").unwrap();
        let e = clients[1]
            .journal(&vec![0; geomx_net::coord::JOURNAL_RECORD_MAX + 1])
            .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let stranger = geomx_net::KvClient::connect(addr, 77, net(d)).unwrap();
        let e = stranger
            .request(
                geomx_net::wire::FrameHeader::new(geomx_net::MsgKind::Push),
                b"forged",
            )
            .unwrap()
            .wait(W)
            .unwrap_err();
        assert!(e.to_string().contains("registered member"), "{e}");
        let (records, refused) = c.journal();
        let got: Vec<(String, u32, &[u8])> = records
            .iter()
            .map(|r| (r.from.role.clone(), r.from.dc, r.bytes.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("server".to_string(), 0, &b"first"[..]),
                ("worker".to_string(), 1, &b"second"[..]),
                ("server".to_string(), 0, &b"third"[..]),
            ]
        );
        assert_eq!(refused, 1, "the oversized record (a stranger is no member)");
        assert_eq!(
            c.wait(Duration::from_millis(1)),
            None,
            "{d:?}: the job goes on"
        );
    }
}

/// Coordinator options that keep a snapshot in a temporary file named after `name` (returned),
/// with the reattach window `reattach`.
fn persisted(
    d: DriverKind,
    name: &str,
    reattach: Option<Duration>,
) -> (std::path::PathBuf, CoordOptions) {
    let file = std::env::temp_dir().join(format!("geomx-coord-{name}-{}", std::process::id()));
    let o = CoordOptions {
        net: net(d),
        config_hash: 0xfeed,
        registration_timeout: Duration::from_secs(10),
        state_file: Some(file.clone()),
        reattach_window: reattach,
        ..CoordOptions::default()
    };
    (file, o)
}

/// A member's journal records outlive the member and a coordinator restart: its loss changes the
/// membership, so the snapshot written then holds the journal, and a coordinator restored from
/// that file starts with it.
#[test]
fn a_lost_members_journal_records_survive_a_coordinator_restart() {
    let d = DriverKind::Portable;
    let (file, o) = persisted(d, "journal", None);
    let o = CoordOptions {
        rejoinable: vec!["worker".into()],
        ..o
    };
    let mut c = Coordinator::bind("127.0.0.1:0", expected(), o.clone()).unwrap();
    let addr = c.local_addr();
    let mut clients = register_all(addr, d);
    clients[2].journal(b"worker 1 was here").unwrap();
    clients.remove(2).close();
    let deadline = Instant::now() + W;
    let snap = loop {
        let s = geomx_net::coord::read_snapshot(&file).unwrap();
        if !s.lost.is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "the loss was never written");
        thread::sleep(Duration::from_millis(20));
    };
    let kept: Vec<&[u8]> = snap.journal.iter().map(|r| r.bytes.as_slice()).collect();
    assert_eq!(kept, [&b"worker 1 was here"[..]]);
    c.shutdown();
    drop(c);
    thread::sleep(Duration::from_millis(300));
    let c = Coordinator::bind_restored(addr, snap, o).unwrap();
    let (records, refused) = c.journal();
    assert_eq!(refused, 0);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].from.role.as_str(), records[0].from.dc),
        ("worker", 1)
    );
    drop(clients);
    let _ = std::fs::remove_file(file);
}

/// Journal records reach the snapshot file within a fraction of a second even when the
/// membership never changes, so a record outlives its member and the coordinator dying together.
#[test]
fn journal_records_reach_the_snapshot_file_without_a_membership_change() {
    let d = DriverKind::Portable;
    let (file, o) = persisted(d, "journal-tick", Some(Duration::from_secs(10)));
    let c = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
    let clients = register_all(c.local_addr(), d);
    clients[1].journal(b"round 7 summed ranks [0]").unwrap();
    let deadline = Instant::now() + W;
    loop {
        let kept = geomx_net::coord::read_snapshot(&file)
            .map(|s| {
                s.journal
                    .iter()
                    .map(|r| r.bytes.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if kept == [b"round 7 summed ranks [0]".to_vec()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record never reached the file: {kept:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(clients);
    drop(c);
    let _ = std::fs::remove_file(file);
}

/// The coordinator dies while the job runs and a new one continues from its snapshot file on
/// the same address: the members reconnect and reattach, and the job ends with Shutdown.
#[test]
fn a_restarted_coordinator_continues_the_job_from_its_snapshot() {
    for d in drivers() {
        let (file, o) = persisted(d, &format!("snapshot-{d:?}"), Some(Duration::from_secs(10)));
        let mut c = Coordinator::bind("127.0.0.1:0", expected(), o.clone()).unwrap();
        let addr = c.local_addr();
        let members: Vec<_> = [("server", 0, 0), ("worker", 0, 0), ("worker", 1, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                thread::spawn(move || {
                    let (cl, m) = CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap();
                    let cl = cl.reconnecting(true);
                    cl.barrier("all").unwrap();
                    (cl, m)
                })
            })
            .collect();
        let members: Vec<_> = members.into_iter().map(|t| t.join().unwrap()).collect();
        // The snapshot is on disk once the job runs; the coordinator "dies".
        let snap = geomx_net::coord::read_snapshot(&file).unwrap();
        assert_eq!(snap.nodes.len(), 3);
        c.shutdown();
        drop(c);
        thread::sleep(Duration::from_millis(300));
        let c = Coordinator::bind_restored(addr, snap, o).unwrap();
        // Every member reconnects on its own (its event watcher) and reports Done.
        let done: Vec<_> = members
            .into_iter()
            .map(|(cl, m)| {
                thread::spawn(move || {
                    cl.done().unwrap();
                    let deadline = Instant::now() + W;
                    loop {
                        match cl.wait_event(Duration::from_millis(200)) {
                            Some(e) => return (m.my_id, e),
                            None => assert!(Instant::now() < deadline, "no event"),
                        }
                    }
                })
            })
            .collect();
        for t in done {
            let (id, ev) = t.join().unwrap();
            assert_eq!(ev, CoordEvent::Shutdown, "{d:?}: node {id}");
        }
        assert_eq!(c.wait(W), Some(CoordOutcome::Shutdown));
        let _ = std::fs::remove_file(file);
    }
}

/// A slow snapshot write (fsync under the coordinator's state lock) does not silence the members:
/// the snapshot's temporary file is a FIFO that nobody reads for 2.5 s, so the first write waits
/// that long in `open`, past the members' 1 s dead-peer time. Every registration completes (with
/// the coordinator's handlers on the driver's thread, the members declared it lost). Writing to a
/// FIFO cannot be fsynced, so those snapshots fail (logged); that is not what is tested here.
#[cfg(unix)]
#[test]
fn a_slow_snapshot_write_does_not_silence_the_members() {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for d in drivers() {
        let (file, o) = persisted(d, &format!("slow-write-{}", d.name()), None);
        let tmp = file.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&file);
        let path = std::ffi::CString::new(tmp.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
        let coord = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
        let addr = coord.local_addr();
        let mut fast = net(d);
        fast.conn.peer_timeout = Duration::from_secs(1);
        let regs: Vec<_> = [("server", 0, 0), ("worker", 0, 0), ("worker", 1, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                let o = fast.clone();
                thread::spawn(move || CoordClient::register(addr, hello(r, dc, k), o))
            })
            .collect();
        thread::sleep(Duration::from_millis(2500));
        // From now on every write to the FIFO is read, until the coordinator is gone.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (tmp, stop) = (tmp.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(mut f) = std::fs::File::open(&tmp) {
                        let _ = f.read_to_end(&mut Vec::new());
                    }
                }
            })
        };
        let clients: Vec<CoordClient> = regs
            .into_iter()
            .map(|t| {
                let r = t.join().unwrap();
                r.unwrap_or_else(|e| panic!("{d:?}: registration failed: {e}"))
                    .0
            })
            .collect();
        assert_eq!(clients.len(), 3);
        drop(clients);
        drop(coord);
        stop.store(true, Ordering::SeqCst);
        // Unblock the reader's `open` if no write is under way (a writer that finds no reader
        // fails at once with O_NONBLOCK).
        // SAFETY: a valid NUL-terminated path; the descriptor is closed at once.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK);
            if fd >= 0 {
                libc::close(fd);
            }
        }
        reader.join().unwrap();
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&file);
    }
}

/// A TCP relay to `target`; `cut` closes every connection it relays so far (later ones are
/// relayed again).
fn cuttable_relay(target: std::net::SocketAddr) -> (std::net::SocketAddr, impl Fn()) {
    use std::net::{Shutdown, TcpListener};
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let relayed = open.clone();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(a) = inbound else { return };
            let Ok(b) = TcpStream::connect(target) else {
                continue;
            };
            let mut held = relayed.lock().unwrap();
            held.push(a.try_clone().unwrap());
            held.push(b.try_clone().unwrap());
            for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    let cut = move || {
        for s in open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    (addr, cut)
}

/// A member that loses the coordinator after its Done, while the others finish the job, learns
/// on reattaching that the job has finished: it gets the Shutdown it missed, not a lost
/// coordinator (which ends a trainer process with an error, and `geomx launch` restarted it).
#[test]
fn a_member_cut_off_after_its_done_gets_the_shutdown_it_missed() {
    for d in drivers() {
        let (file, o) = persisted(
            d,
            &format!("missed-{}", d.name()),
            Some(Duration::from_secs(10)),
        );
        let c = Coordinator::bind("127.0.0.1:0", expected(), o).unwrap();
        let addr = c.local_addr();
        let (relay, cut) = cuttable_relay(addr);
        let far = thread::spawn(move || {
            let (cl, _) = CoordClient::register(relay, hello("worker", 1, 0), net(d)).unwrap();
            cl.reconnecting(true)
        });
        let near: Vec<_> = [("server", 0, 0), ("worker", 0, 0)]
            .into_iter()
            .map(|(r, dc, k)| {
                thread::spawn(move || {
                    let (cl, _) = CoordClient::register(addr, hello(r, dc, k), net(d)).unwrap();
                    cl.reconnecting(true)
                })
            })
            .collect();
        let far = far.join().unwrap();
        let near: Vec<CoordClient> = near.into_iter().map(|t| t.join().unwrap()).collect();
        far.done().unwrap();
        cut();
        for m in &near {
            m.done().unwrap();
        }
        for m in &near {
            assert_eq!(m.wait_event(W), Some(CoordEvent::Shutdown), "{d:?}");
        }
        assert_eq!(c.wait(W), Some(CoordOutcome::Shutdown), "{d:?}");
        let deadline = Instant::now() + W;
        let ev = loop {
            if let Some(e) = far.wait_event(Duration::from_millis(200)) {
                break e;
            }
            assert!(Instant::now() < deadline, "{d:?}: no event");
        };
        assert_eq!(ev, CoordEvent::Shutdown, "{d:?}");
        let _ = std::fs::remove_file(file);
    }
}
