//! Loopback ports for hosts that a drill, a benchmark or a test starts and must name
//! before they listen. Chosen below the kernel's range of ephemeral ports: between
//! finding a port free and the host binding it, any socket bound to port 0 (a QUIC
//! client's, in a drill running beside) could be handed that very port if it lay in
//! that range, and the host would fail with "Address already in use" (a partition
//! drill did, 2026-12-08, with eight drills at once).
//!
//! Shared with the integration tests (`tests/common/micro.rs` includes this file), so
//! it uses nothing but std (its test is in `proc.rs`, so that each test binary does not
//! run it again).

use std::net::{SocketAddr, UdpSocket};

/// The lowest port picked: below it are well-known and registered services.
const FIRST: u16 = 20_000;

/// Where the kernel's ephemeral ports begin (`ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback UDP address free now, outside the ephemeral range where it can be; the
/// kernel's own choice if that range leaves no room or every try is taken.
pub fn free_loopback_udp() -> std::io::Result<SocketAddr> {
    let end = ephemeral_start();
    if end > FIRST {
        let span = u64::from(end - FIRST);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mut x = (u64::from(nanos) << 20) ^ u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = FIRST + (x % span) as u16;
            if let Ok(socket) = UdpSocket::bind(("127.0.0.1", port)) {
                return socket.local_addr();
            }
        }
    }
    UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

