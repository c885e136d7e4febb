//! The network drill (`tandem drill --workload net`): the guest serves numbered
//! requests and a file over TCP through its NIC, a client on the host holds one
//! connection to it, and the primary is killed. The verdict requires the same
//! connection to carry on on the standby with no reply lost, repeated or out of order
//! and no reset; with `download`, an HTTP download that spans the takeover must
//! arrive whole, its hash the one the client computes itself.
//!
//! Primary, standby and client each live in a network namespace of their own (see
//! `netlab::Hosts`): each host's TAP on its own bridge, the hosts' bridges and the
//! client on one segment, and the replication link on another.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{finish, DrillArgs, Outcome};
use crate::harness::netlab::{port_of, ArpWatch, Hosts, CLIENT, GUEST_IP, HOSTS, LINK_IPS, MAC, SERVER_PORT};
use crate::harness::proc::{threads, Proc};

/// `tandem net-client ARGS` in the client's namespace: its exit status and its verdict
/// line.
fn client(args: Vec<String>) -> JoinHandle<Result<(bool, String)>> {
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", CLIENT])
            .arg(std::env::current_exe()?)
            .arg("net-client")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("running the net client")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let line = text.lines().find_map(|l| l.strip_prefix("net-client: ")).unwrap_or(text.trim()).to_string();
        Ok((out.status.success(), line))
    })
}

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
    /// The primary dies halfway through sending an epoch that carries the guest's
    /// frames, about two seconds into the connection.
    MidEpoch,
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
        "mid-epoch" => NetKill::MidEpoch,
        other => NetKill::After(Duration::from_millis(other.parse().with_context(|| {
            format!("--kill-at {other:?}: for the net workload, expected a number of ms, random, download, after-release, idle or mid-epoch")
        })?)),
    })
}

pub(super) fn one_run(args: &DrillArgs, images: &Path, n: u32, kill: NetKill) -> Result<Outcome> {
    let hosts = Hosts::make()?;
    let (dir, pkeys, skeys) = super::run_dir(n)?;
    let (port_a, port_b) = (hosts.tap(HOSTS[0], format!("tda{n}"))?, hosts.tap(HOSTS[1], format!("tdb{n}"))?);
    let addr = format!("{}:{}", LINK_IPS[1], 7100 + n);
    let path = |p: PathBuf| p.display().to_string();
    let timeout = args.timeout_ms.to_string();
    let standby_args = vec![
        "standby".to_string(), "--listen".into(), addr.clone(),
        "--key".into(), path(skeys.join("key.pem")), "--peer-cert".into(), path(pkeys.join("cert.pem")),
        "--state-dir".into(), path(dir.join("standby-state")), "--timeout-ms".into(), timeout.clone(),
        "--mem-mib=256".into(), "--net".into(), format!("tap={},mac={MAC}", port_b.name),
    ];
    let primary_args = vec![
        "primary".to_string(), "--standby".into(), addr,
        "--key".into(), path(pkeys.join("key.pem")), "--peer-cert".into(), path(skeys.join("cert.pem")),
        "--timeout-ms".into(), timeout, "--epoch-ms".into(), args.epoch_ms.to_string(),
        "--kernel".into(), path(images.join(&args.kernel)), "--initrd".into(), path(images.join("guest-initrd.cpio")),
        "--net".into(), format!("tap={},mac={MAC}", port_a.name),
        "--append".into(), format!("quiet tandem.workload=net tandem.ip={GUEST_IP}/24"),
    ];
    let mut primary_args = primary_args;
    if kill == NetKill::MidEpoch {
        // Frames flow in every epoch once the client sends (a request every 50 ms,
        // epochs of 100 ms in the lab): the 20th such epoch is a second or two in.
        primary_args.extend(["--debug-die-mid-frames-epoch".into(), "20".into()]);
    }
    let mut standby = Proc::start_in(Some(HOSTS[1]), &standby_args, &dir, "standby")?;
    if !standby.wait_for("standing_by", Duration::from_secs(30)) {
        bail!("the standby did not start:\n{}", standby.log());
    }
    let mut primary = Proc::start_in(Some(HOSTS[0]), &primary_args, &dir, "primary")?;
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
    // The client sends until a few seconds past the takeover: the kill, the
    // detection, and then two seconds of requests the new primary must answer (40 at
    // the usual pace; the idle kill's pace leaves it two).
    let kill_after = match kill {
        NetKill::After(d) => d.as_secs() + 1,
        NetKill::Download => 1,
        NetKill::Idle => 3,
        // The release comes 1.5 s in and a little more; the 20th epoch with frames
        // (a request every 50 ms, 100 ms epochs), 2 to 3 s in.
        NetKill::AfterRelease | NetKill::MidEpoch => 3,
    };
    let held = client(vec![
        format!("--to={GUEST_IP}:{SERVER_PORT}"),
        format!("--every-ms={}", if kill == NetKill::Idle { 1000 } else { 50 }),
        format!("--seconds={}", kill_after + args.timeout_ms.div_ceil(1000) + 2),
        "--reply-timeout-s=60".into(),
    ]);
    let began = Instant::now();
    let fetch = (kill == NetKill::Download).then(|| client(vec![format!("--to={GUEST_IP}:80"), "--download".into()]));
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
        NetKill::MidEpoch => {
            primary.wait_exit(Duration::from_secs(60));
            match primary.event("fault_injected") {
                Some(e) => format!("in the middle of sending epoch {}, the 20th with frames", e["epoch"]),
                None => "never: the primary did not die in an epoch with frames".to_string(),
            }
        }
    };
    let arp = ArpWatch::open()?;
    if kill != NetKill::MidEpoch {
        let _ = primary.child.kill();
    }
    let fetched_before_kill = fetch.as_ref().map(|f| f.is_finished());
    let took_over = standby.wait_for("took_over", Duration::from_secs(60));
    let announced = took_over && arp.saw_gratuitous(MAC, GUEST_IP, Duration::from_secs(10));
    let (kept, verdict) = held.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let mut result = if !took_over {
        Err(format!("no takeover; the client saw: {verdict}"))
    } else if !kept {
        Err(format!("the connection did not survive: {verdict}"))
    } else {
        Ok(format!("the connection survived: {verdict} (the client's longest wait, the takeover's gap)"))
    };
    if let Some(fetch) = fetch {
        let got = fetch.join().map_err(|_| anyhow::anyhow!("the download thread panicked"))?;
        result = match (result, got) {
            (Ok(v), Ok((true, line))) => Ok(format!(
                "{v}; the download across the takeover arrived {} s{}",
                line.trim_start_matches("download=").replace(" seconds=", " in "),
                if fetched_before_kill == Some(true) { " (but it had ended before the kill)" } else { "" }
            )),
            (Ok(_), Ok((false, line))) => Err(format!("the download across the takeover failed: {line}")),
            (Ok(_), Err(e)) => Err(format!("the download failed: {e:#}")),
            (Err(e), _) => Err(e),
        };
    }
    // The network followed the move: the bridge sends the guest's frames to the
    // standby's port now (the RARP it sent at takeover, and the guest's own frames),
    // and the client's neighbour table has the guest's address at its MAC.
    let neigh = Command::new("ip").args(["-n", CLIENT, "neigh", "show", GUEST_IP]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    let client_knows = neigh.as_deref().is_ok_and(|n| n.contains(MAC) && !n.contains("FAILED"));
    result = match (result, port_of(MAC)) {
        (Ok(_), _) if !client_knows => Err(format!("after the takeover the client's neighbour table has {neigh:?} for {GUEST_IP}")),
        (Ok(_), _) if !announced => Err(format!("the guest sent no gratuitous ARP for {GUEST_IP} after the takeover")),
        (Ok(v), Some(port)) if port == "tdg-b" => {
            Ok(format!("{v}; the guest announced {GUEST_IP}, the bridge found {MAC} on the standby's {port} and the client has it for {GUEST_IP}"))
        }
        (Ok(_), found) => Err(format!("after the takeover the bridge has {MAC} on {found:?}, not on the standby host's tdg-b")),
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
        assert_eq!(parse("mid-epoch", &mut rng).unwrap(), NetKill::MidEpoch);
        assert!(parse("mid-epoch:3", &mut rng).is_err());
    }
}
