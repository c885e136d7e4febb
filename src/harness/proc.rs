//! A `tandem` child process driven from outside, as an operator would: its stdout,
//! stderr and event stream in files, killed and reaped when left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

/// A child process whose output goes to files, killed if left behind.
pub(crate) struct Proc {
    pub(crate) child: Child,
    out: PathBuf,
    err: PathBuf,
    pub(crate) events: PathBuf,
    /// Killed, and either reaped or given up on (see [`Proc::end`]).
    ended: bool,
}

/// How long a killed process may take to end before it counts as stuck in the kernel.
pub(crate) const REAP_LIMIT: Duration = Duration::from_secs(30);

impl Proc {
    /// Starts `tandem ARGS --events FILE`, its output and events in files in `dir`.
    pub(crate) fn start(args: &[String], dir: &Path, name: &str) -> Result<Self> {
        Self::start_in(None, args, dir, name)
    }

    /// The same in network namespace `netns` (`ip netns exec`, which execs tandem: the
    /// child is tandem itself, for signals).
    pub(crate) fn start_in(netns: Option<&str>, args: &[String], dir: &Path, name: &str) -> Result<Self> {
        let (out, err) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let events = dir.join(format!("{name}.events"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(std::env::current_exe()?);
                c
            }
            None => Command::new(std::env::current_exe()?),
        };
        let child = command
            .args(args)
            .arg("--events")
            .arg(&events)
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        Ok(Self { child, out, err, events, ended: false })
    }

    /// The events the process wrote so far, in order.
    pub(crate) fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub(crate) fn event(&self, kind: &str) -> Option<Value> {
        self.events().into_iter().find(|e| e["event"] == kind)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub(crate) fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// Waits up to `limit` for an event of this kind, or the process to end.
    pub(crate) fn wait_for(&mut self, kind: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.event(kind).is_some() {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.event(kind).is_some();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process and reaps it. One that SIGKILL cannot end within
    /// [`REAP_LIMIT`] is stuck in the kernel: it is left behind, never waited for
    /// without end, and where its threads are stuck is returned.
    pub(crate) fn end(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.ended, true) {
            return None;
        }
        let _ = self.child.kill();
        match self.wait_exit(REAP_LIMIT) {
            Some(_) => None,
            None => Some(threads(&mut self.child)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.end();
    }
}


/// Where each thread of a process still running is stuck, from /proc: what a hang
/// leaves to go on.
pub(crate) fn threads(child: &mut Child) -> String {
    if !matches!(child.try_wait(), Ok(None)) {
        return "(the process had ended)".into();
    }
    let dir = format!("/proc/{}/task", child.id());
    let mut out = String::from("(still running after the wait; its threads:)\n");
    for task in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        out.push_str(&format!("{} wchan={}\n{}", read("comm").trim(), read("wchan").trim(), read("stack")));
    }
    out
}

/// A loopback UDP address free now, for a host to listen on (see [`super::ports`]).
pub(crate) fn free_addr() -> Result<std::net::SocketAddr> {
    Ok(super::ports::free_loopback_udp()?)
}

/// Starts `tandem witness` on `listen` with its key pair in `keys`, answering the hosts
/// whose key pairs are in `hosts`, its record in `dir/witness-state`, and a lease of
/// `lease_ms` if given (else its default).
pub(crate) fn start_witness(dir: &Path, listen: std::net::SocketAddr, keys: &Path, hosts: [&Path; 2], lease_ms: Option<u64>) -> Result<Proc> {
    let path = |p: PathBuf| p.display().to_string();
    let mut args = vec![
        "witness".to_string(), "--listen".into(), listen.to_string(), "--key".into(), path(keys.join("key.pem")),
        "--peer-cert".into(), path(hosts[0].join("cert.pem")), "--peer-cert".into(), path(hosts[1].join("cert.pem")),
        "--state-dir".into(), path(dir.join("witness-state")),
    ];
    if let Some(ms) = lease_ms {
        args.extend(["--lease-ms".into(), ms.to_string()]);
    }
    Proc::start(&args, dir, "witness")
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_addresses_come_from_below_the_ephemeral_range_and_are_free() {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let start: u16 = ephemeral.split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..20 {
            let addr = super::free_addr().unwrap();
            assert!(addr.port() >= 20_000 && addr.port() < start, "{addr}");
            std::net::UdpSocket::bind(addr).unwrap();
        }
    }
}
