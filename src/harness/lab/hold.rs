//! Inside the lab, before the command: everything whose first use makes the lab kernel
//! patch its own text, done once while only one lab CPU is online, and held until the
//! lab powers off.
//!
//! A static key's first user (an idle VM's preempt notifiers and LAPIC, a UDP socket
//! with GRO, the random secrets of a first TCP connection and of a first ICMP error)
//! turns a no-op into a jump in live kernel text, and its last user turns it back. With
//! both emulated CPUs running, that is code one CPU rewrites while the other executes
//! it, which is where the lab host froze (docs/lab.md, "What froze the lab"). Done here
//! with one CPU online and held, a test's own VMs and sockets never flip a key.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};

/// Written when everything is held: `/lab/run` waits for it before it brings the other
/// CPUs online.
pub const HELD_MARKER: &str = "/tmp/.lab-held";
/// Loopback and the lab-hold veth pair answer at once; this only bounds a lab gone wrong.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Holds until killed (the lab powering off). `remote`: an address in another network
/// namespace, reached through a veth pair, for a first ICMP error sent on a real
/// device (one through loopback takes another path).
pub fn hold(remote: Option<Ipv4Addr>) -> Result<u8> {
    let _vm = tandem_vmm::vm::IdleVm::create(std::path::Path::new("/dev/kvm")).context("holding an idle VM open")?;
    let mut sockets = Vec::new();
    for local in [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), SocketAddr::from((Ipv6Addr::LOCALHOST, 0))] {
        sockets.push(udp_with_gro(local)?);
        first_connection(local)?;
        port_unreachable(local, local)?;
    }
    if let Some(remote) = remote {
        port_unreachable(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), SocketAddr::from((remote, 9)))?;
    }
    std::fs::write(HELD_MARKER, b"").context("marking the lab's keys held")?;
    loop {
        std::thread::park();
    }
}

/// A UDP socket with GRO on (as QUIC's sockets have it), which also sends one datagram
/// to itself.
fn udp_with_gro(local: SocketAddr) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(local).with_context(|| format!("binding a UDP socket on {local}"))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this function owns, with a pointer to a live
    // c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("turning GRO on for a UDP socket on {local}"));
    }
    socket.set_read_timeout(Some(ANSWER_WAIT))?;
    let me = socket.local_addr()?;
    socket.send_to(b"x", me).with_context(|| format!("sending a datagram on {me}"))?;
    let mut buf = [0u8; 8];
    socket.recv_from(&mut buf).with_context(|| format!("receiving a datagram on {me}"))?;
    Ok(socket)
}

/// A datagram to a closed port, answered with ICMP: the kernel draws the secret of the
/// IP identifiers of packets that may be fragmented (ICMP's) on first use.
/// `to`: a closed port, or with port 0 one chosen closed on `to`'s host.
fn port_unreachable(local: SocketAddr, to: SocketAddr) -> Result<()> {
    let closed = if to.port() == 0 { UdpSocket::bind(to)?.local_addr()? } else { to };
    let socket = UdpSocket::bind(local)?;
    socket.connect(closed)?;
    socket.send(b"x").with_context(|| format!("sending a datagram to the closed port {closed}"))?;
    // The ICMP error comes back as the next receive's error; nothing else can come.
    socket.set_read_timeout(Some(ANSWER_WAIT))?;
    let _ = socket.recv(&mut [0u8; 8]);
    Ok(())
}

/// One TCP connection over loopback, a byte each way, closed: the kernel draws the
/// secrets of its connection hashes on first use.
fn first_connection(local: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(local).with_context(|| format!("listening on {local}"))?;
    let mut client = TcpStream::connect(listener.local_addr()?).context("connecting over loopback")?;
    let (mut server, _) = listener.accept().context("accepting over loopback")?;
    client.set_read_timeout(Some(ANSWER_WAIT))?;
    server.set_read_timeout(Some(ANSWER_WAIT))?;
    let mut byte = [0u8; 1];
    client.write_all(b"x")?;
    server.read_exact(&mut byte)?;
    server.write_all(b"y")?;
    client.read_exact(&mut byte)?;
    Ok(())
}
