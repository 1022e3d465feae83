//! Picking a loopback port for a process that binds it later (a launcher writes the address
//! into a job file, a test into a program's environment).
//!
//! The port a listener bound to port 0 gets comes from the kernel's ephemeral range, which
//! outgoing connections draw their local ports from as well: once that listener is closed,
//! any connection made on the machine may take the port before the intended process binds it
//! (seen in CI on a loaded machine: "Address already in use"). Ports below the ephemeral range
//! are only ever taken by an explicit bind.

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lowest port tried: above the well-known and most registered service ports.
const FROM: u16 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default where it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback TCP port that was free a moment ago, below the ephemeral range where there is
/// room (else one the OS picks). Candidates are drawn from the time and the process id, so
/// that concurrent callers start in different places; the port is still not reserved.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let to = ephemeral_start();
    if to > FROM + 100 {
        let span = u64::from(to - FROM);
        let mut x = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        for _ in 0..256 {
            // xorshift64*: a spread of candidates, nothing more.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = FROM + (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_is_below_the_ephemeral_range() {
        let start = ephemeral_start();
        for _ in 0..20 {
            let port = free_loopback_port().unwrap();
            if start > FROM + 100 {
                assert!(
                    (FROM..start).contains(&port),
                    "{port} not in {FROM}..{start}"
                );
            }
        }
    }

    #[test]
    fn a_taken_port_is_not_picked() {
        // Hold many candidates: the picker must step over every held one.
        let held: Vec<TcpListener> = (0..50)
            .filter_map(|_| free_loopback_port().ok())
            .filter_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        for _ in 0..20 {
            let p = free_loopback_port().unwrap();
            assert!(!ports.contains(&p), "{p} is held");
        }
    }
}
