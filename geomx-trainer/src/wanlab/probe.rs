//! Measurements across a lab's links with real traffic: bulk TCP goodput and a UDP round trip.
//! The lab's tests and `geomx wan-lab --selftest` share them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::{Lab, WanLabError};

fn io(what: &str) -> impl FnOnce(std::io::Error) -> WanLabError + '_ {
    move |e| WanLabError::io(what, e)
}

/// Longest a probe waits for one packet or one read before giving up.
const STALL: Duration = Duration::from_secs(10);

/// Bulk TCP from the namespace of link `send` to that of link `recv` for `total` after the first
/// byte arrives; returns the receiver's goodput in Mbit/s over `[skip, total)`.
pub fn bulk_tcp_mbit(
    lab: &Lab,
    recv: usize,
    send: usize,
    skip: Duration,
    total: Duration,
) -> Result<f64, WanLabError> {
    if skip >= total {
        return Err(WanLabError::Invalid(format!(
            "bulk TCP: skip {skip:?} must be shorter than total {total:?}"
        )));
    }
    let bind = SocketAddr::new(lab.node_addr(recv).into(), 0);
    let listener = lab
        .node(recv)
        .run(move || TcpListener::bind(bind))?
        .map_err(io("binding the bulk TCP receiver"))?;
    let to = listener
        .local_addr()
        .map_err(io("bulk TCP receiver address"))?;
    // The sender stops when the receiver closes, or after the receiver's time plus a margin.
    let limit = total + STALL;
    let sender = lab.node(send).spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(to)?;
        let buf = vec![7u8; 256 * 1024];
        let t = Instant::now();
        while t.elapsed() < limit {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
        Ok(())
    })?;
    let (mut c, _) = listener.accept().map_err(io("accepting bulk TCP"))?;
    c.set_read_timeout(Some(STALL))
        .map_err(io("bulk TCP read timeout"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = None;
    let mut counted = 0u64;
    loop {
        let n = c.read(&mut buf).map_err(io("reading bulk TCP"))?;
        let now = Instant::now();
        let el = now - *first.get_or_insert(now);
        if el >= total || n == 0 {
            break;
        }
        if el >= skip {
            counted += n as u64;
        }
    }
    drop(c);
    match sender.join() {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(WanLabError::io("bulk TCP sender", e)),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(WanLabError::Invalid("bulk TCP sender panicked".into())),
    }
    Ok(counted as f64 * 8.0 / (total - skip).as_secs_f64() / 1e6)
}

/// Round trips in ms of `pings` UDP ping-pongs from the namespace of link `from` to an echo in
/// that of link `to`, in the order sent.
pub fn udp_rtts_ms(
    lab: &Lab,
    from: usize,
    to: usize,
    pings: usize,
) -> Result<Vec<f64>, WanLabError> {
    let bind = SocketAddr::new(lab.node_addr(to).into(), 0);
    let echo = lab
        .node(to)
        .run(move || UdpSocket::bind(bind))?
        .map_err(io("binding the UDP echo"))?;
    let echo_addr = echo.local_addr().map_err(io("UDP echo address"))?;
    echo.set_read_timeout(Some(STALL))
        .map_err(io("UDP echo timeout"))?;
    let e = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, a)) = echo.recv_from(&mut b) {
            if b[0] == 0xff {
                break;
            }
            let _ = echo.send_to(&b[..n], a);
        }
    });
    let bind = SocketAddr::new(lab.node_addr(from).into(), 0);
    let s = lab
        .node(from)
        .run(move || UdpSocket::bind(bind))?
        .map_err(io("binding the UDP pinger"))?;
    s.set_read_timeout(Some(STALL))
        .map_err(io("UDP pinger timeout"))?;
    let mut rtts = Vec::with_capacity(pings);
    let mut b = [0u8; 64];
    let result = (|| {
        for i in 0..pings {
            let t = Instant::now();
            // Payload byte i % 255 never equals the echo's stop byte 0xff.
            s.send_to(&[(i % 255) as u8; 32], echo_addr)
                .map_err(io("sending a UDP ping"))?;
            let (n, _) = s.recv_from(&mut b).map_err(io("waiting for a UDP pong"))?;
            if n != 32 {
                return Err(WanLabError::Invalid(format!(
                    "UDP pong of {n} bytes, sent 32"
                )));
            }
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    })();
    let _ = s.send_to(&[0xff], echo_addr);
    let _ = e.join();
    result.map(|()| rtts)
}

/// The median of `v` (the upper one for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
    }
}
