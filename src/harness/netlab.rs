//! The host side of a guest network for the drill and the benchmarks: one bridge that
//! carries the client's address, and a TAP on it for each VM (QEMU's too). Made with
//! iproute2 where it is, with busybox's spellings in the lab.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

pub(crate) const BRIDGE: &str = "tdbr0";
pub(crate) const HOST_IP: &str = "10.77.0.1/24";
pub(crate) const GUEST_IP: &str = "10.77.0.2";
pub(crate) const MAC: &str = "52:54:00:77:00:02";
/// The guest's numbered-request server (`tandem-work net`).
pub(crate) const SERVER_PORT: u16 = 7000;

/// Runs `cmd`, or when its program is missing or fails, `fallback` (busybox spells
/// some of iproute2's commands differently).
pub(crate) fn sh(cmd: &[&str], fallback: Option<&[&str]>) -> Result<()> {
    let run = |c: &[&str]| Command::new(c[0]).args(&c[1..]).output().ok().filter(|o| o.status.success());
    if run(cmd).is_some() || fallback.is_some_and(|f| run(f).is_some()) {
        return Ok(());
    }
    bail!("cannot set up the drill's network: `{}` failed (the drill needs root and iproute2 or busybox)", cmd.join(" "))
}

/// The host bridge the two hosts' TAPs join, with the client's address.
pub(crate) fn bridge() -> Result<()> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        return Ok(());
    }
    sh(&["ip", "link", "add", BRIDGE, "type", "bridge"], Some(&["brctl", "addbr", BRIDGE]))?;
    sh(&["ip", "addr", "add", HOST_IP, "dev", BRIDGE], None)?;
    sh(&["ip", "link", "set", BRIDGE, "up"], None)
}

/// A TAP on the bridge, removed when dropped.
pub(crate) struct Port(pub(crate) String);

impl Port {
    pub(crate) fn new(name: String) -> Result<Self> {
        sh(&["ip", "tuntap", "add", &name, "mode", "tap"], Some(&["tunctl", "-t", &name]))?;
        let port = Self(name);
        sh(&["ip", "link", "set", &port.0, "master", BRIDGE], Some(&["brctl", "addif", BRIDGE, &port.0]))?;
        sh(&["ip", "link", "set", &port.0, "up"], None)?;
        Ok(port)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = sh(&["ip", "tuntap", "del", &self.0, "mode", "tap"], Some(&["tunctl", "-d", &self.0]));
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
