//! The host side of a guest network for the drill and the benchmarks.
//!
//! The benchmarks use one bridge that carries the client's address, and a TAP on it for
//! each VM (QEMU's too). The drill builds two hosts and a client ([`Hosts`]): network
//! namespaces `tnd-a`, `tnd-b` and `tnd-c`, each host with its own bridge holding its
//! TAPs, all joined by veth pairs to one bridge (the guest's segment) in the root
//! namespace; and the hosts joined again on a second bridge, the replication link.
//! Made with iproute2 (the lab image carries it: busybox's ip has no namespaces or
//! veths).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

pub(crate) const BRIDGE: &str = "tdbr0";
pub(crate) const HOST_IP: &str = "10.77.0.1/24";
pub(crate) const GUEST_IP: &str = "10.77.0.2";
pub(crate) const MAC: &str = "52:54:00:77:00:02";
/// The guest's numbered-request server (`tandem-work net`).
pub(crate) const SERVER_PORT: u16 = 7000;

/// Runs `ip ARGS` (the words of `args`; no name here has a space).
fn ip(args: &str) -> Result<()> {
    let ok = Command::new("ip").args(args.split(' ')).output().is_ok_and(|o| o.status.success());
    if !ok {
        bail!("cannot set up the guest network: `ip {args}` failed (it needs root and iproute2)");
    }
    Ok(())
}

/// `ip` aimed at namespace `ns`, or at this one.
fn ip_in(ns: Option<&str>, args: &str) -> Result<()> {
    match ns {
        Some(ns) => ip(&format!("-n {ns} {args}")),
        None => ip(args),
    }
}

/// The host bridge the VMs' TAPs join, with the client's address.
pub(crate) fn bridge() -> Result<()> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        return Ok(());
    }
    ip(&format!("link add {BRIDGE} type bridge"))?;
    ip(&format!("addr add {HOST_IP} dev {BRIDGE}"))?;
    ip(&format!("link set {BRIDGE} up"))
}

/// A TAP on a bridge, in a namespace or this one, removed when dropped.
pub(crate) struct Tap {
    ns: Option<&'static str>,
    pub(crate) name: String,
}

impl Tap {
    /// A TAP on [`BRIDGE`], in this namespace.
    pub(crate) fn new(name: String) -> Result<Self> {
        Self::on(None, BRIDGE, name)
    }

    fn on(ns: Option<&'static str>, bridge: &str, name: String) -> Result<Self> {
        ip_in(ns, &format!("tuntap add {name} mode tap"))?;
        let tap = Self { ns, name };
        ip_in(ns, &format!("link set {} master {bridge} up", tap.name))?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip_in(self.ns, &format!("tuntap del {} mode tap", self.name));
    }
}

/// The bridge port (its TAP's name) where the bridge last saw frames from `mac`: its
/// forwarding database, as /sys gives it (`struct __fdb_entry`, 16 bytes each).
pub(crate) fn port_of(mac: &str) -> Option<String> {
    let mac: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect::<Option<_>>()?;
    let fdb = std::fs::read(Path::new("/sys/class/net").join(BRIDGE).join("brforward")).ok()?;
    let entry = fdb.chunks_exact(16).find(|e| e[..6] == mac[..] && e[7] == 0)?;
    let port = u16::from(entry[12]) << 8 | u16::from(entry[6]);
    let ports = std::fs::read_dir(Path::new("/sys/class/net").join(BRIDGE).join("brif")).ok()?;
    ports.flatten().find_map(|p| {
        let no = std::fs::read_to_string(p.path().join("port_no")).ok()?;
        (u16::from_str_radix(no.trim().trim_start_matches("0x"), 16).ok()? == port).then(|| p.file_name().to_string_lossy().into_owned())
    })
}

/// A raw socket on the bridge that sees its ARP traffic: how the drill knows the guest
/// announced itself after a takeover.
pub(crate) struct ArpWatch(std::os::fd::OwnedFd);

impl ArpWatch {
    pub(crate) fn open() -> Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let index: i32 = std::fs::read_to_string(Path::new("/sys/class/net").join(BRIDGE).join("ifindex"))?.trim().parse()?;
        let protocol = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        if fd < 0 {
            bail!("a packet socket on {BRIDGE}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields used are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index;
        // SAFETY: bind reads one sockaddr_ll of the given size, during the call only.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        if rc != 0 {
            bail!("binding a packet socket to {BRIDGE}: {}", std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Whether a gratuitous ARP (sender and target address both `ip`) from `mac` came
    /// within `wait`.
    pub(crate) fn saw_gratuitous(&self, mac: &str, ip: &str, wait: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mac: Vec<u8> = mac.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
        let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else { return false };
        let start = std::time::Instant::now();
        let mut buf = [0u8; 128];
        while start.elapsed() < wait {
            // SAFETY: recv writes at most buf.len() bytes into buf, during the call only.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 42 {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            // Ethernet (14 bytes), then ARP: sender MAC at 22, sender IP at 28, target IP at 38.
            let arp = &buf[..n as usize];
            if arp[12..14] == [0x08, 0x06] && arp[22..28] == mac[..] && arp[28..32] == ip.octets() && arp[38..42] == ip.octets() {
                return true;
            }
        }
        false
    }
}

/// The drill's two hosts and client, each a network namespace.
pub(crate) struct Hosts;

/// The replication link's addresses of host a (the first primary) and host b.
pub(crate) const LINK_IPS: [&str; 2] = ["10.77.1.1", "10.77.1.2"];
pub(crate) const HOSTS: [&str; 2] = ["tnd-a", "tnd-b"];
pub(crate) const CLIENT: &str = "tnd-c";
const CLIENT_IP: &str = "10.77.0.100/24";
const LINK_BRIDGE: &str = "tdbr1";

impl Hosts {
    /// Makes the namespaces and their links, once per lab host (later calls find them).
    pub(crate) fn make() -> Result<Self> {
        if Path::new("/run/netns").join(CLIENT).exists() {
            return Ok(Self);
        }
        // What a set-up that failed halfway left, gone first (each may well be absent).
        for leftover in [format!("link del {BRIDGE}"), format!("link del {LINK_BRIDGE}")]
            .into_iter()
            .chain(HOSTS.iter().chain([&CLIENT]).map(|ns| format!("netns del {ns}")))
        {
            let _ = ip(&leftover);
        }
        for br in [BRIDGE, LINK_BRIDGE] {
            ip(&format!("link add {br} type bridge"))?;
            ip(&format!("link set {br} up"))?;
        }
        // A veth pair from `bridge` here to `peer` in `ns`, the root end up.
        let veth = |root: &str, bridge: &str, peer: &str, ns: &str| {
            ip(&format!("link add {root} type veth peer name {peer} netns {ns}"))?;
            ip(&format!("link set {root} master {bridge} up"))
        };
        for (i, ns) in HOSTS.iter().enumerate() {
            let x = &ns[4..];
            ip(&format!("netns add {ns}"))?;
            ip(&format!("-n {ns} link set lo up"))?;
            // The guest's segment: the host's bridge, joined to the shared one.
            ip(&format!("-n {ns} link add br0 type bridge"))?;
            veth(&format!("tdg-{x}"), BRIDGE, "seg", ns)?;
            ip(&format!("-n {ns} link set seg master br0 up"))?;
            ip(&format!("-n {ns} link set br0 up"))?;
            // The replication link.
            veth(&format!("tdr-{x}"), LINK_BRIDGE, "repl", ns)?;
            ip(&format!("-n {ns} addr add {}/24 dev repl", LINK_IPS[i]))?;
            ip(&format!("-n {ns} link set repl up"))?;
        }
        ip(&format!("netns add {CLIENT}"))?;
        ip(&format!("-n {CLIENT} link set lo up"))?;
        veth("tdg-c", BRIDGE, "eth0", CLIENT)?;
        ip(&format!("-n {CLIENT} addr add {CLIENT_IP} dev eth0"))?;
        ip(&format!("-n {CLIENT} link set eth0 up"))?;
        Ok(Self)
    }

    /// A TAP on host `ns`'s bridge, removed when dropped.
    pub(crate) fn tap(&self, ns: &'static str, name: String) -> Result<Tap> {
        Tap::on(Some(ns), "br0", name)
    }
}
