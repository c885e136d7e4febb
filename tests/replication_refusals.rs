//! A primary and a standby that must not pair are refused, each with a clear one-line
//! error, before any guest runs. The handshake happens before the primary boots its
//! VM, so these run on the host (its /dev/kvm gives the CPU model for the fingerprint).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_refused, tandem, Run, TANDEM};

struct Pair {
    dir: PathBuf,
}

impl Pair {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-refusal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for who in ["primary", "standby", "stranger"] {
            let run = tandem(&["keygen", "--out", &dir.join(who).display().to_string()]);
            assert_eq!(run.code, 0, "{}", run.dump());
        }
        std::fs::write(dir.join("kernel"), b"never booted: the handshake fails first").unwrap();
        Self { dir }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    /// Starts `tandem standby` on `port` with extra arguments; its stderr goes to a file.
    fn standby(&self, port: u16, extra: &[&str]) -> Standby {
        self.standby_as(port, "standby", extra)
    }

    /// Like [`Pair::standby`], with the key of `key_owner`.
    fn standby_as(&self, port: u16, key_owner: &str, extra: &[&str]) -> Standby {
        let log = self.dir.join(format!("standby-{port}.log"));
        let mut args = vec![
            "standby".to_string(), "--listen".into(), format!("127.0.0.1:{port}"),
            "--key".into(), self.path(&format!("{key_owner}/key.pem")), "--peer-cert".into(), self.path("primary/cert.pem"),
            "--state-dir".into(), self.path("standby-state"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(TANDEM)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let standby = Standby { child, log };
        standby.wait_for("standing by");
        standby
    }

    /// Runs `tandem primary` against `port` until it gives up.
    fn primary(&self, port: u16, key_owner: &str, extra: &[&str]) -> Run {
        let mut args = vec![
            "primary".to_string(), "--standby".into(), format!("127.0.0.1:{port}"),
            "--key".into(), self.path(&format!("{key_owner}/key.pem")), "--peer-cert".into(), self.path("standby/cert.pem"),
            "--kernel".into(), self.path("kernel"),
        ];
        if !extra.contains(&"--connect-timeout-s") {
            args.extend(["--connect-timeout-s".into(), "20".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tandem(&args)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Standby {
    child: Child,
    log: PathBuf,
}

impl Standby {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, text: &str) {
        let start = Instant::now();
        while !self.log().contains(text) {
            assert!(start.elapsed() < Duration::from_secs(20), "the standby never said {text:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kvm_present() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing: the fingerprint of the VM configuration needs KVM's CPU model");
}

/// Under TLS 1.3 the standby checks the primary's certificate only after the primary's
/// handshake is done, so its refusal reaches the primary as the end of a connection.
/// It carries the TLS alert and the standby's reason, and the primary gives up on the
/// first one instead of retrying until its connect timeout.
#[test]
fn a_primary_with_a_certificate_the_standby_did_not_pin_is_refused() {
    kvm_present();
    let pair = Pair::new("cert");
    let standby = pair.standby(7301, &[]);
    let run = pair.primary(7301, "stranger", &["--connect-timeout-s", "30"]);
    assert_refused(&run, "tandem: TLS: the standby refused this primary's certificate: the peer presented certificate");
    assert!(run.stderr.contains("not the pinned"), "the standby's reason must reach the primary\n{}", run.dump());
    standby.wait_for("turned a peer away in the TLS handshake");
    assert!(standby.log().contains("not the pinned"), "{}", standby.log());
}

#[test]
fn a_standby_with_a_certificate_the_primary_did_not_pin_is_refused() {
    kvm_present();
    let pair = Pair::new("standby-cert");
    let standby = pair.standby_as(7306, "stranger", &[]);
    let run = pair.primary(7306, "primary", &["--connect-timeout-s", "30"]);
    assert_refused(&run, "tandem: TLS: this primary refused the standby's certificate: the peer presented certificate");
    assert!(run.stderr.contains("not the pinned"), "{}", run.dump());
    standby.wait_for("a peer refused this standby's certificate in the TLS handshake");
}

#[test]
fn a_primary_of_another_protocol_version_is_refused() {
    kvm_present();
    let pair = Pair::new("version");
    let standby = pair.standby(7302, &[]);
    let run = pair.primary(7302, "primary", &["--debug-protocol-version", "99"]);
    assert_refused(&run, "the standby refused this primary: the peer speaks protocol version 99");
    standby.wait_for("refused the primary");
    assert!(standby.log().contains("protocol version 99"), "{}", standby.log());
}

#[test]
fn a_primary_with_another_vm_configuration_is_refused() {
    kvm_present();
    let pair = Pair::new("config");
    let standby = pair.standby(7303, &["--mem-mib", "512"]);
    let run = pair.primary(7303, "primary", &["--mem-mib", "256"]);
    assert_refused(&run, "differently configured VM");
    standby.wait_for("differently configured VM");
}

#[test]
fn a_primary_of_a_generation_a_standby_has_moved_past_is_refused() {
    kvm_present();
    let pair = Pair::new("generation");
    // The standby took over once (generation 2) and was restarted; the old primary
    // (generation 1) comes back.
    std::fs::create_dir_all(pair.dir.join("standby-state")).unwrap();
    std::fs::write(pair.dir.join("standby-state/generation"), "2\n").unwrap();
    let standby = pair.standby(7304, &[]);
    let run = pair.primary(7304, "primary", &[]);
    assert_refused(&run, "the peer's generation 1 is older than 2: a promoted standby has replaced it");
    standby.wait_for("generation 1 is older than 2");
}

#[test]
fn a_primary_with_no_standby_gives_up_with_a_clear_error() {
    kvm_present();
    let pair = Pair::new("none");
    let run = pair.primary(7305, "primary", &["--connect-timeout-s", "2"]);
    assert_refused(&run, "no standby answered at 127.0.0.1:7305 within 2 s");
}
