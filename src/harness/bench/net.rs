//! `tandem bench net`: what a client of the guest's network sees, in one lab run: the
//! round-trip time of numbered requests on one TCP connection (p50, p99) and the
//! throughput of an 8 MiB HTTP download, for QEMU (microvm, `-netdev tap`, the same
//! kernel and initramfs), tandem unreplicated, and tandem as a replicated primary
//! whose frames wait for each epoch's acknowledgement.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{ms, qemu_microvm, spawn, wait_for, Running, BASE_CMDLINE, GUEST_INITRD, GUEST_KERNEL, GUEST_VMLINUX};
use crate::harness::drill::net_client::{blob_sha256, download, round_trips};
use crate::harness::netlab::{bridge, Tap, GUEST_IP, MAC, SERVER_PORT};

#[derive(clap::Args, Clone)]
pub struct NetArgs {
    /// Round trips measured per VMM.
    #[arg(long, default_value_t = 200)]
    round_trips: u32,
    /// Downloads of the 8 MiB file per VMM (the median counts).
    #[arg(long, default_value_t = 3)]
    downloads: u32,
    /// The replicated primary's epoch length.
    #[arg(long, default_value_t = 25, value_name = "MS")]
    epoch_ms: u64,
    /// Directory of built images (default: as for `tandem lab`).
    #[arg(long)]
    images: Option<PathBuf>,
}

impl NetArgs {
    fn check(&self) -> Result<()> {
        if !(10..=10_000).contains(&self.round_trips) {
            bail!("--round-trips must be between 10 and 10000, got {}", self.round_trips);
        }
        if !(1..=20).contains(&self.downloads) {
            bail!("--downloads must be between 1 and 20, got {}", self.downloads);
        }
        if !(1..=10_000).contains(&self.epoch_ms) {
            bail!("--epoch-ms must be between 1 and 10000, got {}", self.epoch_ms);
        }
        Ok(())
    }
}

pub fn via_lab(args: &NetArgs) -> Result<()> {
    args.check()?;
    let command: Vec<String> = [
        "bench", "net-in-lab",
        "--round-trips", &args.round_trips.to_string(),
        "--downloads", &args.downloads.to_string(),
        "--epoch-ms", &args.epoch_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    super::in_the_lab(args.images.clone(), Duration::from_secs(900), 3072, &command)
}

struct Measured {
    name: &'static str,
    rtt: Vec<Duration>,
    /// MB/s of each download.
    bulk: Vec<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    ms(sorted[i.min(sorted.len() - 1)])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits until the guest's server takes a connection. A primary's guest answers ARP
/// only once the epoch holding its reply is acknowledged, and right after boot the
/// epochs still carry what the boot dirtied: the kernel's three ARP tries can time out
/// meanwhile, which is the settling, not the steady state measured.
fn reachable(to: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!("the guest's server at {to} took no connection within {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn measure(name: &'static str, args: &NetArgs) -> Result<Measured> {
    let server = format!("{GUEST_IP}:{SERVER_PORT}").parse()?;
    reachable(server, Duration::from_secs(60))?;
    let mut rtt = round_trips(server, args.round_trips)?;
    rtt.sort_unstable();
    let mut bulk = Vec::new();
    let want = blob_sha256();
    for _ in 0..args.downloads {
        let (hash, took) = download(format!("{GUEST_IP}:80").parse()?)?;
        if hash != want {
            bail!("{name}: the download arrived with hash {hash}, not the blob's");
        }
        bulk.push(8.0 * 1.048_576 / took.as_secs_f64());
    }
    Ok(Measured { name, rtt, bulk })
}

pub fn in_lab(args: &NetArgs) -> Result<()> {
    args.check()?;
    bridge()?;
    let dir = std::env::temp_dir().join("tandem-bench-net");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tandem = std::env::current_exe()?;
    let cmdline = format!("{BASE_CMDLINE} tandem.workload=net tandem.ip={GUEST_IP}/24");
    let limit = Duration::from_secs(240);
    let mut results = Vec::new();

    {
        let tap = Tap::new("tdq0".into())?;
        let mut q = qemu_microvm(&super::lab_qemu()?, 256, 1, &cmdline);
        q.args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", tap.name)])
            .args(["-device", &format!("virtio-net-device,netdev=n0,mac={MAC}")]);
        let log = dir.join("qemu.out");
        let _vm = Running(vec![spawn(q, &log)?]);
        wait_for(&log, "TANDEM-NET-LISTENING", limit)?;
        results.push(measure("qemu -M microvm", args)?);
        eprintln!("qemu measured");
    }
    {
        let tap = Tap::new("tdu0".into())?;
        let mut t = Command::new(&tandem);
        t.args(["run", "--kernel", GUEST_KERNEL, "--initrd", GUEST_INITRD, "--cmdline", &cmdline])
            .args(["--net", &format!("tap={},mac={MAC}", tap.name)]);
        let log = dir.join("run.out");
        let _vm = Running(vec![spawn(t, &log)?]);
        wait_for(&log, "TANDEM-NET-LISTENING", limit)?;
        results.push(measure("tandem", args)?);
        eprintln!("tandem measured");
    }
    {
        let (tap, spare) = (Tap::new("tdp0".into())?, Tap::new("tds0".into())?);
        let (pkeys, skeys) = (dir.join("pk"), dir.join("sk"));
        tandem_replication::tls::keygen(&pkeys)?;
        tandem_replication::tls::keygen(&skeys)?;
        let path = |p: PathBuf| p.display().to_string();
        let mut s = Command::new(&tandem);
        s.args(["standby", "--listen", "127.0.0.1:7190", "--state-dir", &path(dir.join("state"))])
            .args(["--key", &path(skeys.join("key.pem")), "--peer-cert", &path(pkeys.join("cert.pem"))])
            .args(["--net", &format!("tap={},mac={MAC}", spare.name)]);
        let mut p = Command::new(&tandem);
        // vmlinux: a bzImage decompressing itself writes 50 MB the epochs must carry.
        p.args(["primary", "--standby", "127.0.0.1:7190", "--epoch-ms", &args.epoch_ms.to_string()])
            .args(["--key", &path(pkeys.join("key.pem")), "--peer-cert", &path(skeys.join("cert.pem"))])
            .args(["--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--cmdline", &cmdline])
            .args(["--net", &format!("tap={},mac={MAC}", tap.name)]);
        let log = dir.join("primary.out");
        let standby = spawn(s, &dir.join("standby.out"))?;
        let _vms = Running(vec![standby, spawn(p, &log)?]);
        wait_for(&log, "TANDEM-NET-LISTENING", limit)?;
        results.push(measure("tandem primary", args)?);
    }

    println!();
    println!(
        "net: {} round trips on one TCP connection and {} downloads of 8 MiB over HTTP per VMM, \
         client on the lab host, same lab run; the primary's epochs {} ms",
        args.round_trips, args.downloads, args.epoch_ms
    );
    println!("{:<18} {:>10} {:>10} {:>11} {:>14} {:>14}", "VMM", "rtt p50 ms", "rtt p99 ms", "bulk MB/s", "p50 / qemu", "bulk / qemu");
    let (q50, qbulk) = (percentile(&results[0].rtt, 0.5), median(&mut results[0].bulk.clone()));
    for r in &mut results {
        let (p50, p99, bulk) = (percentile(&r.rtt, 0.5), percentile(&r.rtt, 0.99), median(&mut r.bulk));
        println!("{:<18} {:>10.2} {:>10.2} {:>11.2} {:>14.2} {:>14.2}", r.name, p50, p99, bulk, p50 / q50, bulk / qbulk);
    }
    println!("(in the lab, under emulation: compare the ratios, not the absolute figures)");
    Ok(())
}
