//! `tandem bench replicate`: what replication costs a guest. In the lab, the `dirty`
//! workload runs at several write rates, once alone (`tandem run`) and once as a
//! primary protected by a standby; the table gives the guest's write rate each way,
//! the stopped time per epoch, bytes per epoch, ack latency, the time to the first
//! line of output (released, when replicated) each way, and the output lag. Between
//! the two, the guest alone again with its dirty log harvested 10 times a second, as a
//! primary's epochs would, and nothing sent: the first line's floor in this lab for
//! anything that tracks a guest's writes by KVM's dirty log (docs/lab.md measured
//! QEMU's at the same). Then, natively on this host, the epoch pipeline's throughput
//! beside memcpy and loopback TCP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{in_the_lab_with, GUEST_INITRD, GUEST_VMLINUX};

#[derive(clap::Args, Clone, Debug)]
pub struct ReplicateArgs {
    /// Guest write rates to measure, in MiB/s.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    rates: Vec<u32>,
    /// Seconds each guest writes.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// The primary's epoch length (its --epoch-ms).
    #[arg(long, default_value_t = 25)]
    epoch_ms: u32,
    /// Directory of built images (default: $TANDEM_IMAGES, else ~/.cache/tandem/images).
    #[arg(long)]
    images: Option<PathBuf>,
}

const ROW_MARKER: &str = "@@BENCH-ROW ";

pub fn via_lab(args: &ReplicateArgs) -> Result<()> {
    if args.rates.is_empty() || args.rates.iter().any(|r| *r > 400) || !(8..=120).contains(&args.seconds) || !(1..=1000).contains(&args.epoch_ms) {
        bail!("--rates must be 0..=400 MiB/s each, --seconds 8..=120 and --epoch-ms 1..=1000");
    }
    let mut command = vec![
        "bench".to_string(),
        "replicate-in-lab".into(),
        format!("--seconds={}", args.seconds),
        format!("--epoch-ms={}", args.epoch_ms),
    ];
    command.push(format!("--rates={}", args.rates.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    let mut rows = Vec::new();
    let timeout = Duration::from_secs(120 + 280 * args.rates.len() as u64);
    in_the_lab_with(args.images.clone(), timeout, 2048, &command, &mut |line| match line.strip_prefix(ROW_MARKER) {
        Some(row) => rows.push(row.to_string()),
        // Progress, and the reason should the benchmark fail inside the lab.
        None if line.starts_with("bench:") || line.starts_with("tandem:") => println!("{line}"),
        None => {}
    })?;
    if rows.len() != args.rates.len() {
        bail!("the lab reported {} of {} rows", rows.len(), args.rates.len());
    }
    println!("replication in the lab (emulated host, loopback QUIC), dirty workload for {} s, {} ms epochs:", args.seconds, args.epoch_ms);
    println!(
        "{:>9} {:>11} {:>11} {:>9} {:>12} {:>12} {:>12} {:>10} {:>8} {:>10} {:>16} {:>9} {:>10} {:>7} {:>9} {:>9} {:>13} {:>11} {:>13}",
        "rate", "alone", "replicated", "slowdown", "stopped p50", "stopped p99", "bytes/epoch", "ack ms", "epochs",
        "1st alone", "1st logged", "synced", "1st repl", "ratio", "lag p50", "lag p99", "alone cpu/flt", "cpu p+s", "faults p/s"
    );
    println!("(1st logged: the guest alone, its dirty log harvested at 10 Hz and nothing sent, and its ratio to alone: the floor for any VMM tracking writes by dirty log)");
    println!("(cpu: seconds of CPU, and faults: minor page faults, each process had taken by its first line: alone, primary + standby)");
    for row in rows {
        println!("{row}");
    }
    println!();
    super::pipeline::run(&super::pipeline::PipelineArgs::default())
}

pub fn in_lab(args: &ReplicateArgs) -> Result<()> {
    let tandem = std::env::current_exe()?;
    for &rate in &args.rates {
        eprintln!("bench: {rate} MiB/s alone");
        let (alone_rate, first_alone, used_alone) = alone(&tandem, rate, args.seconds, &[])?;
        eprintln!("bench: {rate} MiB/s alone, its dirty log harvested at 10 Hz");
        let (_, first_logged, _) = alone(&tandem, rate, args.seconds, &["--debug-pause-hz", "10", "--debug-pause-work", "dirty-log"])?;
        eprintln!("bench: {rate} MiB/s replicated");
        let Replicated { rate: replicated, status, first_line: first_repl, synced, lag, used } =
            replicated(&tandem, rate, args.seconds, args.epoch_ms)?;
        let cpu = |u: Option<Usage>| u.map(|u| format!("{:.1}", u.cpu.as_secs_f64())).unwrap_or_else(|| "-".into());
        let faults = |u: Option<Usage>| u.map(|u| format!("{}k", u.faults / 1000)).unwrap_or_else(|| "-".into());
        let num = |k: &str| status.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let epochs = num("epochs");
        let per_epoch = if epochs > 0.0 { num("total_bytes") / epochs } else { 0.0 };
        let rate_text = |r: Option<f64>| r.map(|r| format!("{r:.1} MiB/s")).unwrap_or_else(|| "-".into());
        let slowdown = match (alone_rate, replicated) {
            (Some(a), Some(r)) if r > 0.0 => format!("{:.2}x", a / r),
            _ => "-".into(),
        };
        let secs = |t: Option<Duration>| t.map(|t| format!("{:.1} s", t.as_secs_f64())).unwrap_or_else(|| "-".into());
        let to_alone = |t: Option<Duration>| match (first_alone, t) {
            (Some(a), Some(r)) => format!("{:.2}x", r.as_secs_f64() / a.as_secs_f64()),
            _ => "-".into(),
        };
        let ratio = to_alone(first_repl);
        let logged = format!("{} {}", secs(first_logged), to_alone(first_logged));
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into());
        println!(
            "{ROW_MARKER}{:>4} MiB/s {:>11} {:>11} {:>9} {:>9.2} ms {:>9.2} ms {:>12.0} {:>10.2} {:>8.0} {:>10} {:>16} {:>9} {:>10} {:>7} {:>9} {:>9} {:>13} {:>11} {:>13}",
            rate,
            rate_text(alone_rate),
            rate_text(replicated),
            slowdown,
            num("stopped_p50_ms"),
            num("stopped_p99_ms"),
            per_epoch,
            num("ack_ms"),
            epochs,
            secs(first_alone),
            logged,
            secs(synced),
            secs(first_repl),
            ratio,
            ms(lag.map(|l| l.0)),
            ms(lag.map(|l| l.1)),
            format!("{}/{}", cpu(used_alone), faults(used_alone)),
            format!("{}+{}", cpu(used.0), cpu(used.1)),
            format!("{}/{}", faults(used.0), faults(used.1)),
        );
    }
    Ok(())
}

fn workload(rate: u32, seconds: u32) -> String {
    format!("quiet tandem.workload=dirty tandem.dirty_mib={rate} tandem.span_mib=64 tandem.seconds={seconds}")
}

/// The guest's own write rate from its per-second lines, past the first two seconds.
fn guest_rate(console: &str) -> Option<f64> {
    let points: Vec<(f64, f64)> = console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("dirty ")?;
            let sec: f64 = rest.split_whitespace().next()?.parse().ok()?;
            let pages: f64 = rest.split("pages=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((sec, pages))
        })
        .collect();
    let (first, last) = (points.get(2)?, points.last()?);
    (last.0 > first.0 && last.1 > first.1).then(|| (last.1 - first.1) * 4096.0 / (1 << 20) as f64 / (last.0 - first.0))
}

fn wait(child: &mut Child, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    bail!("a VM ran past {} s", limit.as_secs())
}

/// When the first line of the workload (`dirty 1 ...`) is in `console`.
fn first_line(console: &Path) -> bool {
    std::fs::read_to_string(console).is_ok_and(|c| c.lines().any(|l| l.starts_with("dirty ")))
}

/// CPU time and minor page faults of a process so far.
#[derive(Clone, Copy)]
struct Usage {
    cpu: Duration,
    faults: u64,
}

/// What the lab's kernel says process `pid` has used so far.
fn usage(pid: u32) -> Option<Usage> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Each thread of `pid` that has used a tenth of a second of CPU or more, named, with
/// that CPU: where a process's time went.
fn thread_usage(pid: u32) -> String {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        if let Some(u) = parse_stat(&read("stat")).filter(|u| u.cpu >= Duration::from_millis(100)) {
            out.push(format!("{} {:.1} s", read("comm").trim(), u.cpu.as_secs_f64()));
        }
    }
    out.join(", ")
}

/// CPU time and minor faults from a `stat` file of proc(5).
fn parse_stat(stat: &str) -> Option<Usage> {
    // After the command's name (which may hold spaces), the state is field 3 of
    // proc(5), so field N is at N - 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    // SAFETY: sysconf only reads a configuration value.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&h| h > 0)?;
    Some(Usage { cpu: Duration::from_millis((field(14)? + field(15)?) * 1000 / hz), faults: field(10)? })
}

/// Runs the guest alone (with `extra` arguments to `tandem run`); returns its write
/// rate, the time from start to its first line, and what it had used by then.
fn alone(tandem: &Path, rate: u32, seconds: u32, extra: &[&str]) -> Result<(Option<f64>, Option<Duration>, Option<Usage>)> {
    let console = std::env::temp_dir().join(format!("tandem-bench-alone-{rate}"));
    let start = Instant::now();
    let mut child = Command::new(tandem)
        .args(["run", "--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--append", &workload(rate, seconds)])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console)?)
        .spawn()
        .context("running the guest alone")?;
    let (mut first, mut used) = (None, None);
    while child.try_wait()?.is_none() && start.elapsed() < Duration::from_secs(180) {
        if first.is_none() && first_line(&console) {
            first = Some(start.elapsed());
            used = usage(child.id());
            eprintln!("bench: by its first line, the guest alone: {}", thread_usage(child.id()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait(&mut child, Duration::from_secs(10))?;
    let rate = guest_rate(&std::fs::read_to_string(&console).unwrap_or_default());
    let _ = std::fs::remove_file(&console);
    Ok((rate, first, used))
}

struct Replicated {
    /// The guest's write rate.
    rate: Option<f64>,
    /// The last status the primary gave while its standby followed.
    status: HashMap<String, String>,
    /// From the primary's start to its first released line.
    first_line: Option<Duration>,
    /// From the primary's start to the standby holding its first (full) epoch.
    synced: Option<Duration>,
    /// Output lag p50 and p99 (ms), from the primary's events.
    lag: Option<(f64, f64)>,
    /// What the primary and the standby had used by the first released line.
    used: (Option<Usage>, Option<Usage>),
}

/// Runs the guest as a primary with a standby.
fn replicated(tandem: &Path, rate: u32, seconds: u32, epoch_ms: u32) -> Result<Replicated> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-replicate-{rate}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (p, s) = (dir.join("p"), dir.join("s"));
    tandem_replication::tls::keygen(&p)?;
    tandem_replication::tls::keygen(&s)?;
    let path = |p: PathBuf| p.display().to_string();
    let mut standby = Command::new(tandem)
        .args(["standby", "--listen", "127.0.0.1:7200", "--timeout-ms", "3000", "--state-dir", &path(dir.join("state"))])
        .args(["--key", &path(s.join("key.pem")), "--peer-cert", &path(p.join("cert.pem"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let ctl = dir.join("ctl");
    let console = dir.join("console");
    let events = dir.join("events");
    let start = Instant::now();
    let start_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let mut primary = Command::new(tandem)
        .args(["primary", "--standby", "127.0.0.1:7200", "--timeout-ms", "3000", "--control", &path(ctl.clone())])
        .arg(format!("--epoch-ms={epoch_ms}"))
        .args(["--key", &path(p.join("key.pem")), "--peer-cert", &path(s.join("cert.pem")), "--events", &path(events.clone())])
        .args(["--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--append", &workload(rate, seconds)])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console)?)
        .stderr(Stdio::null())
        .spawn()?;
    let mut status = HashMap::new();
    let (mut first, mut used) = (None, (None, None));
    let mut asked = Instant::now();
    while primary.try_wait()?.is_none() && start.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_millis(50));
        if first.is_none() && first_line(&console) {
            first = Some(start.elapsed());
            used = (usage(primary.id()), usage(standby.id()));
            eprintln!("bench: by its first released line, the primary: {}", thread_usage(primary.id()));
            eprintln!("bench: and the standby: {}", thread_usage(standby.id()));
        }
        if asked.elapsed() < Duration::from_secs(1) {
            continue;
        }
        asked = Instant::now();
        let Ok(out) = Command::new(tandem).arg("ctl").arg(&ctl).arg("status").output() else { continue };
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        if line.contains("standby=following") {
            status = line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
    }
    let waited = wait(&mut primary, Duration::from_secs(10)).context("the replicated guest");
    let _ = standby.kill();
    let _ = standby.wait();
    waited?;
    let rate = guest_rate(&std::fs::read_to_string(&console).unwrap_or_default());
    let events: Vec<serde_json::Value> =
        std::fs::read_to_string(&events).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let lag = crate::harness::drill::check::lag_percentiles(&events).map(|(p50, p99, _)| (p50, p99));
    let synced = events
        .iter()
        .find(|e| e["event"] == "protected")
        .and_then(|e| e["t_ms"].as_u64())
        .map(|t| Duration::from_millis(t.saturating_sub(start_ms)));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Replicated { rate, status, first_line: first, synced, lag, used })
}
