//! The network drill (`tandem drill --workload net`): the guest serves numbered
//! requests and a file over TCP through its NIC, a client on the host holds one
//! connection to it, and the primary is killed. The verdict requires the same
//! connection to carry on on the standby with no reply lost, repeated or out of order
//! and no reset; with `download`, an HTTP download that spans the takeover must
//! arrive whole, its hash the one the client computes itself.
//!
//! Primary and standby each have their own TAP, both on one host bridge that carries
//! the client's address: the two hosts' ports on one network segment. (Network
//! namespaces for each host and the client, and the replication link across them,
//! are still to come: the lab's busybox cannot make veth pairs.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net_client::{self, blob_sha256, download, NetClientArgs};
use super::{finish, DrillArgs, Outcome};
use crate::harness::netlab::{bridge, port_of, ArpWatch, Port, GUEST_IP, MAC, SERVER_PORT};
use crate::harness::proc::{threads, Proc};

/// When the primary dies, for the network workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NetKill {
    /// This long after the client's first request.
    After(Duration),
    /// A second into an HTTP download of the guest's blob.
    Download,
    /// Right after the primary released an epoch's output (a commit).
    AfterRelease,
    /// Between two requests a second apart: nothing in flight either way.
    Idle,
}

pub(super) fn parse(text: &str, rng: &mut u64) -> Result<NetKill> {
    Ok(match text {
        "random" => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            NetKill::After(Duration::from_millis(*rng % 6000))
        }
        "download" => NetKill::Download,
        "after-release" => NetKill::AfterRelease,
        "idle" => NetKill::Idle,
        other => NetKill::After(Duration::from_millis(other.parse().with_context(|| {
            format!("--kill-at {other:?}: for the net workload, expected a number of ms, random, download, after-release or idle")
        })?)),
    })
}

pub(super) fn one_run(args: &DrillArgs, images: &Path, n: u32, kill: NetKill) -> Result<Outcome> {
    bridge()?;
    let (dir, pkeys, skeys) = super::run_dir(n)?;
    let (port_a, port_b) = (Port::new(format!("tda{n}"))?, Port::new(format!("tdb{n}"))?);
    let addr = format!("127.0.0.1:{}", 7100 + n);
    let path = |p: PathBuf| p.display().to_string();
    let timeout = args.timeout_ms.to_string();
    let standby_args = vec![
        "standby".to_string(), "--listen".into(), addr.clone(),
        "--key".into(), path(skeys.join("key.pem")), "--peer-cert".into(), path(pkeys.join("cert.pem")),
        "--state-dir".into(), path(dir.join("standby-state")), "--timeout-ms".into(), timeout.clone(),
        "--mem-mib=256".into(), "--net".into(), format!("tap={},mac={MAC}", port_b.0),
    ];
    let primary_args = vec![
        "primary".to_string(), "--standby".into(), addr,
        "--key".into(), path(pkeys.join("key.pem")), "--peer-cert".into(), path(skeys.join("cert.pem")),
        "--timeout-ms".into(), timeout, "--epoch-ms".into(), args.epoch_ms.to_string(),
        "--kernel".into(), path(images.join(&args.kernel)), "--initrd".into(), path(images.join("guest-initrd.cpio")),
        "--net".into(), format!("tap={},mac={MAC}", port_a.0),
        "--append".into(), format!("quiet tandem.workload=net tandem.ip={GUEST_IP}/24"),
    ];
    let mut standby = Proc::start(&standby_args, &dir, "standby")?;
    if !standby.wait_for("standing_by", Duration::from_secs(30)) {
        bail!("the standby did not start:\n{}", standby.log());
    }
    let mut primary = Proc::start(&primary_args, &dir, "primary")?;
    let listening = Instant::now() + Duration::from_secs(240);
    let ready = primary.wait_for("protected", Duration::from_secs(120)) && loop {
        if primary.console().contains("TANDEM-NET-LISTENING") {
            break true;
        }
        if Instant::now() > listening || primary.event("vm_ended").is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !ready {
        let why = format!("the guest's server never listened behind a protected primary{}", threads(&mut primary.child));
        return Ok(finish(n, &mut primary, &mut standby, Err(why), "never"));
    }
    let server: SocketAddr = format!("{GUEST_IP}:{SERVER_PORT}").parse()?;
    let client_args = NetClientArgs {
        to: server,
        every_ms: if kill == NetKill::Idle { 1000 } else { 50 },
        // Long enough to go on well past the takeover.
        seconds: 8 + 2 * args.timeout_ms.div_ceil(1000),
        reply_timeout_s: 60,
    };
    let client = std::thread::spawn(move || net_client::hold(&client_args));
    let began = Instant::now();
    let fetch = (kill == NetKill::Download).then(|| {
        let server: SocketAddr = format!("{GUEST_IP}:80").parse().expect("a literal address");
        std::thread::spawn(move || download(server))
    });
    let killed_at = match kill {
        NetKill::After(d) => {
            std::thread::sleep(d);
            format!("{} ms into the connection", d.as_millis())
        }
        NetKill::Download => {
            std::thread::sleep(Duration::from_secs(1));
            "a second into an HTTP download of the 8 MiB blob".to_string()
        }
        NetKill::Idle => {
            std::thread::sleep(Duration::from_millis(2500));
            "between two requests a second apart".to_string()
        }
        NetKill::AfterRelease => {
            std::thread::sleep(Duration::from_millis(1500));
            let seen = primary.events().iter().filter(|e| e["event"] == "released").count();
            let deadline = Instant::now() + Duration::from_secs(10);
            while primary.events().iter().filter(|e| e["event"] == "released").count() == seen && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            "right after a release".to_string()
        }
    };
    let arp = ArpWatch::open()?;
    let _ = primary.child.kill();
    let fetched_before_kill = fetch.as_ref().map(|f| f.is_finished());
    let took_over = standby.wait_for("took_over", Duration::from_secs(60));
    let announced = took_over && arp.saw_gratuitous(MAC, GUEST_IP, Duration::from_secs(10));
    let verdict = client.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let mut result = if !took_over {
        Err(format!("no takeover; the client saw: {verdict}"))
    } else if !verdict.kept() {
        Err(format!("the connection did not survive: {verdict}"))
    } else {
        Ok(format!("the connection survived: {verdict} (the client's longest wait, the takeover's gap)"))
    };
    if let Some(fetch) = fetch {
        let got = fetch.join().map_err(|_| anyhow::anyhow!("the download thread panicked"))?;
        result = match (result, got) {
            (Ok(v), Ok((hash, took))) if hash == blob_sha256() => Ok(format!(
                "{v}; the download across the takeover arrived whole in {:.1} s{}",
                took.as_secs_f64(),
                if fetched_before_kill == Some(true) { " (but it had ended before the kill)" } else { "" }
            )),
            (Ok(_), Ok((hash, _))) => Err(format!("the download arrived with hash {hash}, not the blob's")),
            (Ok(_), Err(e)) => Err(format!("the download failed: {e:#}")),
            (Err(e), _) => Err(e),
        };
    }
    // The network followed the move: the bridge sends the guest's frames to the
    // standby's port now (the RARP it sent at takeover, and the guest's own frames).
    result = match (result, port_of(MAC)) {
        (Ok(_), _) if !announced => Err(format!("the guest sent no gratuitous ARP for {GUEST_IP} after the takeover")),
        (Ok(v), Some(port)) if port == port_b.0 => {
            Ok(format!("{v}; the guest announced {GUEST_IP} and the bridge found {MAC} on the standby's {port}"))
        }
        (Ok(_), found) => Err(format!("after the takeover the bridge has {MAC} on {found:?}, not on the standby's {}", port_b.0)),
        (Err(e), _) => Err(e),
    };
    tracing::debug!(elapsed_ms = began.elapsed().as_millis() as u64, "network drill run judged");
    let outcome = finish(n, &mut primary, &mut standby, result, &killed_at);
    drop((primary, standby, port_a, port_b));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_points_parse() {
        let mut rng = 7;
        assert_eq!(parse("download", &mut rng).unwrap(), NetKill::Download);
        assert_eq!(parse("250", &mut rng).unwrap(), NetKill::After(Duration::from_millis(250)));
        assert!(matches!(parse("random", &mut rng).unwrap(), NetKill::After(d) if d < Duration::from_secs(6)));
        assert!(parse("mid-epoch", &mut rng).is_err());
    }
}
