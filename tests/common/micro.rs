//! Hosts of the micro guest on this machine's /dev/kvm: each a `tandem` process with
//! its console and events in files of one test directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TANDEM;

pub struct Side {
    pub child: Child,
    pub name: String,
    pub out: PathBuf,
    pub events: PathBuf,
}

impl Side {
    /// Starts `tandem ARGS --events DIR/NAME.events`, its stdout in DIR/NAME.out and
    /// its stderr in DIR/NAME.err.
    pub fn start(dir: &Path, name: &str, args: &[String]) -> Self {
        let (out, events) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.events")));
        let child = Command::new(TANDEM)
            .args(args)
            .arg("--events")
            .arg(&events)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        Self { child, name: name.into(), out, events }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn ticks(&self) -> Vec<u64> {
        ticks_in(&self.stdout())
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn has_event(&self, kind: &str) -> bool {
        self.events().iter().any(|e| e["event"] == kind)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The numbers of the micro guest's `tick N` lines in `text`.
pub fn ticks_in(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.strip_prefix("tick ")?.parse().ok()).collect()
}

/// Waits for `done`, failing with the hosts' logs (`NAME.err` in `dir`) past `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool, dir: &Path) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            panic!("{what}: not within {limit:?}\n{}", logs(dir));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every host's log in `dir`.
pub fn logs(dir: &Path) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "err")).collect())
        .unwrap_or_default();
    names.sort();
    names.iter().map(|f| format!("--- {}\n{}", f.display(), std::fs::read_to_string(f).unwrap_or_default())).collect()
}

/// A fresh directory for one test, with a key pair for each of `hosts` in DIR/HOST.
pub fn keyed_dir(name: &str, hosts: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-micro-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for who in hosts {
        let run = super::tandem(&["keygen", "--out", &dir.join(who).display().to_string()]);
        assert_eq!(run.code, 0, "{}", run.dump());
    }
    dir
}

#[path = "../../src/harness/ports.rs"]
mod ports;

/// A UDP port free on the loopback now, below the ephemeral range (see `ports`).
pub fn free_port() -> u16 {
    ports::free_loopback_udp().unwrap().port()
}
