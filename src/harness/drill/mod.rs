//! `tandem drill`: a failover drill. A primary and a standby (two processes, over
//! loopback QUIC) run the ticker guest; the primary is killed with SIGKILL at the
//! chosen moment; the console the primary released, followed by the console of the
//! standby that took over, must be one sequence with no line lost or repeated.
//!
//! Linux guests need real KVM, so by default the drill runs itself inside the lab;
//! `--here` runs it on this host.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::harness::lab;
use crate::replicate::LossPolicy;
use crate::harness::proc::{threads, Proc, REAP_LIMIT};

pub(crate) mod check;
mod client;
mod journal;
mod net;
pub mod net_client;
mod in_lab;
mod partition;
mod pingpong;

use client::Client;

#[derive(clap::Args, Clone, Debug)]
pub struct DrillArgs {
    /// When to kill the primary, per run (a comma-separated list is used in turn):
    /// MS after the standby first holds a committed epoch; `after-output:N` (as soon
    /// as a console client has received N numbered lines from the primary, in a burst
    /// of releases); `random` (0 to 6 s after the first numbered line reached the
    /// client); `mid-epoch[:N]` (in the middle of sending epoch N, by default 8, early
    /// in the guest's boot); `initial-sync` (before the first commit: the standby must
    /// refuse to take over).
    #[arg(long, default_value = "random", value_delimiter = ',')]
    kill_at: Vec<String>,
    /// Number of runs.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// The guest's workload: `ticker` (a numbered line every 100 ms), `dirty`
    /// (writes memory at --dirty-mib MiB/s and checks it every second), `journal`
    /// (appends numbered records to its disk, each synced and then printed; each host
    /// has its own disk, and the standby's must end up holding every record whole) or
    /// `net` (a client holds a TCP connection to the guest through its NIC; --kill-at
    /// then takes MS, random, download, after-release, idle or mid-epoch).
    #[arg(long, default_value = "ticker")]
    workload: String,
    /// For the dirty workload: MiB written per second.
    #[arg(long, default_value_t = 10)]
    dirty_mib: u32,
    /// Lines the guest prints before it powers off (ticks, or seconds of dirtying).
    #[arg(long, default_value_t = 200)]
    lines: u32,
    /// Heartbeat timeout for both sides. The lab is an emulated machine whose threads
    /// stall now and then (the worst of 42 runs' stalls: 136 ms), hence twice the
    /// production default.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
    /// The primary's epoch length. The lab runs guests tens of times slower than a
    /// real host, so its epochs are longer than the production default (25 ms) in the
    /// same proportion of the guest's progress.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    epoch_ms: u64,
    /// The guest's kernel, in the images directory: `vmlinux` (ELF, booted through
    /// PVH) or `vmlinuz` (the same kernel as a bzImage). A bzImage first decompresses
    /// itself, writing some 50 MB the pipeline must carry: in the lab that doubles a
    /// replicated guest's time to its first tick (docs/lab.md).
    #[arg(long, default_value = "vmlinux")]
    kernel: String,
    /// Seed for `random` kill times (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// N failovers in a row instead of runs: the primary killed, the standby taking
    /// over and protecting the guest again with a new standby on the dead host
    /// (`standby --then-protect`), alternating between the two hosts; the guest never
    /// restarts and the console client must see every line once (ticker or journal).
    #[arg(long, value_name = "N")]
    ping_pong: Option<u32>,
    /// Cut links instead of killing the primary, one fault per run: `p-s`, `p-w`,
    /// `s-w` (a link cut), `p-isolated`, `s-isolated` (both of a host's links). Each
    /// link goes through a relay the drill cuts; each side's released console is judged
    /// (the ticker guest).
    #[arg(long, value_delimiter = ',', value_name = "FAULT")]
    partition: Vec<String>,
    /// With --partition: a witness on a third host, which the two consult.
    #[arg(long)]
    witness: bool,
    /// With --partition: the primary's policy when it loses its standby.
    #[arg(long, value_enum, default_value_t = LossPolicy::Pause)]
    on_standby_loss: LossPolicy,
    /// With --partition --here: the built-in micro guest instead of Linux (for a host
    /// whose KVM cannot run Linux).
    #[arg(long)]
    micro_guest: bool,
    /// Print each run's two consoles and logs.
    #[arg(long)]
    show_consoles: bool,
    /// Print each numbered line as the console client receives it, and the moment the
    /// primary is killed: the takeover as a viewer of the demo follows it.
    #[arg(long)]
    watch: bool,
    /// For tests: the primary corrupts a frame of epoch N on the wire, once.
    #[arg(long, hide = true, value_name = "N")]
    corrupt_epoch: Option<u64>,
    /// Run on this host instead of inside the lab (needs KVM that runs Linux guests,
    /// and the guest images at --images).
    #[arg(long)]
    here: bool,
    /// Directory of built images (default: $TANDEM_IMAGES, else ~/.cache/tandem/images;
    /// /images inside the lab).
    #[arg(long)]
    images: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    After(Duration),
    /// Once a console client has this many numbered lines, and then after a while.
    AfterOutput { lines: u64, then: Duration },
    /// In the middle of sending this epoch.
    MidEpoch(u64),
    InitialSync,
}

fn parse_kill(text: &str, rng: &mut u64) -> Result<Kill> {
    Ok(match text {
        // Early in the guest's boot, when epochs are large and long in transfer.
        "mid-epoch" => Kill::MidEpoch(8),
        "initial-sync" => Kill::InitialSync,
        "random" => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            Kill::AfterOutput { lines: 1, then: Duration::from_millis(*rng % 6000) }
        }
        other => {
            let bad = || format!("--kill-at {other:?}: expected a number of ms, after-output:N, random, mid-epoch[:N] or initial-sync");
            if let Some(n) = other.strip_prefix("mid-epoch:") {
                Kill::MidEpoch(n.parse().ok().filter(|n| *n > 1).with_context(bad)?)
            } else if let Some(n) = other.strip_prefix("after-output:") {
                Kill::AfterOutput { lines: n.parse().ok().filter(|n| *n > 0).with_context(bad)?, then: Duration::ZERO }
            } else {
                Kill::After(Duration::from_millis(other.parse().with_context(bad)?))
            }
        }
    })
}

pub fn run(args: &DrillArgs) -> Result<u8> {
    if !["ticker", "dirty", "journal", "net"].contains(&args.workload.as_str()) {
        bail!("--workload must be ticker, dirty, journal or net, got {:?}", args.workload);
    }
    if args.runs == 0 || args.runs > 100 {
        bail!("--runs must be between 1 and 100, got {}", args.runs);
    }
    let mut rng = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    }) | 1;
    // Checked before anything starts, so a typo fails at once.
    for k in &args.kill_at {
        if args.workload == "net" {
            net::parse(k, &mut rng.clone())?;
        } else {
            parse_kill(k, &mut rng.clone())?;
        }
    }
    if let Some(rounds) = args.ping_pong {
        if !(1..=100).contains(&rounds) || args.workload == "net" || args.workload == "dirty" {
            bail!("--ping-pong takes 1 to 100 failovers, with the ticker or journal workload");
        }
    }
    for f in &args.partition {
        partition::Fault::parse(f)?;
    }
    if !args.here {
        return in_lab::run(args, rng);
    }
    if !args.partition.is_empty() {
        return partition::run(args, &args.images.clone().unwrap_or_else(lab::default_images_dir));
    }
    if let Some(rounds) = args.ping_pong {
        let images = args.images.clone().unwrap_or_else(lab::default_images_dir);
        let verdict = pingpong::run(args, &images, rounds)?;
        let ok = verdict.is_ok();
        match verdict {
            Ok(line) => println!("{line}"),
            Err(why) => println!("ping-pong: FAILED: {why}"),
        }
        println!("{VERDICT_PREFIX}{}", json!({ "runs": 1, "done": 1, "passed": u32::from(ok), "failed": if ok { vec![] } else { vec![json!({ "run": 1, "signature": null })] } }));
        return Ok(if ok { 0 } else { 1 });
    }
    let images = args.images.clone().unwrap_or_else(lab::default_images_dir);
    let stalls = StallMeter::start();
    let mut passed = 0;
    let mut failed = Vec::new();
    for n in 1..=args.runs {
        let kill_at = &args.kill_at[(n as usize - 1) % args.kill_at.len()];
        stalls.reset();
        let result = if args.workload == "net" {
            net::parse(kill_at, &mut rng).and_then(|kill| net::one_run(args, &images, n, kill))
        } else {
            parse_kill(kill_at, &mut rng).and_then(|kill| one_run(args, &images, n, kill))
        };
        let stall = stalls.worst();
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                println!("run {n}: FAILED: {e:#} (worst lab stall {} ms)", stall.as_millis());
                failed.push(json!({ "run": n, "signature": null }));
                verdict(args.runs, n, passed, &failed);
                continue;
            }
        };
        if let Some(stuck) = &outcome.stuck {
            println!("=== run {n} stuck processes\n{stuck}\n=== run {n} stuck end");
        }
        println!("{} (worst lab stall {} ms)", outcome.line, stall.as_millis());
        if args.show_consoles {
            println!(
                "=== run {n} primary console\n{}\n=== run {n} standby console\n{}\n=== run {n} client console\n{}\n=== run {n} end",
                outcome.primary, outcome.standby, outcome.client
            );
            println!("=== run {n} primary events\n{}\n=== run {n} standby events\n{}\n=== run {n} events end", outcome.primary_events, outcome.standby_events);
        }
        if outcome.ok {
            passed += 1;
        } else {
            failed.push(json!({ "run": n, "signature": outcome.signature }));
        }
        if !outcome.ok || args.show_consoles {
            println!("=== run {n} primary log\n{}\n=== run {n} standby log\n{}\n=== run {n} logs end", outcome.primary_log, outcome.standby_log);
        }
        verdict(args.runs, n, passed, &failed);
    }
    println!(
        "drill: {passed}/{} runs kept {}{}",
        args.runs,
        if args.workload == "net" { "the connection (no reply lost, repeated or out of order, no reset)" } else { "continuity (no line lost or repeated)" },
        if passed == args.runs { "" } else { ": FAILED" }
    );
    Ok(if passed == args.runs { 0 } else { 1 })
}

/// For tools, after every run: the verdict so far, with each failed run's fault
/// signature (see `Signature`), from which a harness decides whether the lab, not
/// tandem, failed. Printed as it goes, so that a lab that dies in a later run still
/// leaves what the earlier runs showed.
fn verdict(runs: u32, done: u32, passed: u32, failed: &[serde_json::Value]) {
    println!("{VERDICT_PREFIX}{}", json!({ "runs": runs, "done": done, "passed": passed, "failed": failed }));
}

/// Starts the drill's machine-readable verdict line, printed after each run (the last
/// one stands): a JSON object with `runs`, `done`, `passed` and `failed` (each `{run,
/// signature}`); or, when the lab itself failed, `lab_fault` (as `tandem lab
/// --report` names it), after the verdicts of the runs it finished.
pub const VERDICT_PREFIX: &str = "drill-verdict: ";

/// How long this process's 20 ms sleeps overran at worst since the last reset: the
/// drill's measure of how long the (emulated, shared) machine stalled everything on
/// it, printed beside each run's verdict. A stall longer than the heartbeat timeout
/// can make a standby take over from a primary that was alive; such a run is still
/// judged on continuity alone, which a takeover done right keeps.
struct StallMeter(Arc<AtomicU64>);

impl StallMeter {
    fn start() -> Self {
        let worst = Arc::new(AtomicU64::new(0));
        let w = worst.clone();
        std::thread::spawn(move || loop {
            let before = Instant::now();
            std::thread::sleep(Duration::from_millis(20));
            let over = before.elapsed().saturating_sub(Duration::from_millis(20)).as_millis() as u64;
            w.fetch_max(over, Ordering::Relaxed);
        });
        Self(worst)
    }

    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    fn worst(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

struct Outcome {
    ok: bool,
    /// Why the run failed, when that matches a known fault signature.
    signature: Option<Signature>,
    /// Processes that SIGKILL could not end, and where their threads were stuck.
    stuck: Option<String>,
    line: String,
    primary: String,
    standby: String,
    /// What the console client received across the takeover.
    client: String,
    primary_events: String,
    standby_events: String,
    primary_log: String,
    standby_log: String,
}

/// What a failed run's evidence matches. Only a harness decides what a signature
/// excuses (see docs/lab.md); the drill itself never repeats a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Signature {
    /// A guest's vCPU triple-faulted (KVM's shutdown exit), on either host.
    GuestTripleFault,
    /// Not one byte from the guest on either host.
    SilentGuest,
    /// A process outlived SIGKILL, stuck in the kernel.
    StuckProcess,
}

/// Run `n`'s own directory, with a key pair for each host in it: (the directory, the
/// primary's keys, the standby's). Each run its own directory and ports: a process
/// stuck in the kernel by an earlier run may still hold them.
fn run_dir(n: u32) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("tandem-drill-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (pkeys, skeys) = (dir.join("primary-keys"), dir.join("standby-keys"));
    tandem_replication::tls::keygen(&pkeys)?;
    tandem_replication::tls::keygen(&skeys)?;
    Ok((dir, pkeys, skeys))
}

fn one_run(args: &DrillArgs, images: &Path, n: u32, kill: Kill) -> Result<Outcome> {
    let (dir, pkeys, skeys) = run_dir(n)?;
    let addr = format!("127.0.0.1:{}", 7100 + n);
    let consoles: [std::net::SocketAddr; 2] = [([127, 0, 0, 1], 7300 + n as u16).into(), ([127, 0, 0, 1], 7500 + n as u16).into()];
    let path = |p: PathBuf| p.display().to_string();
    let timeout = args.timeout_ms.to_string();
    let mut standby_args = vec![
        "standby".to_string(), "--listen".into(), addr.clone(),
        "--key".into(), path(skeys.join("key.pem")), "--peer-cert".into(), path(pkeys.join("cert.pem")),
        "--state-dir".into(), path(dir.join("standby-state")), "--timeout-ms".into(), timeout.clone(),
        "--console-listen".into(), consoles[1].to_string(),
    ];
    // `quiet`: each byte on the serial console is an exit, and in the lab the kernel's
    // boot log alone doubled the time to the first tick (docs/lab.md).
    let workload = match args.workload.as_str() {
        "dirty" => format!("quiet tandem.workload=dirty tandem.dirty_mib={} tandem.seconds={}", args.dirty_mib, args.lines),
        // Bursts of two records ten times a second: a run of --lines records lasts
        // about as long as the ticker's, so a random kill lands within it.
        "journal" => format!("quiet tandem.workload=journal tandem.records={} tandem.burst=2 tandem.interval_ms=100", args.lines),
        _ => format!("quiet tandem.workload=ticker tandem.ticks={}", args.lines),
    };
    let mut primary_args = vec![
        "primary".to_string(), "--standby".into(), addr,
        "--key".into(), path(pkeys.join("key.pem")), "--peer-cert".into(), path(skeys.join("cert.pem")),
        "--timeout-ms".into(), timeout, "--console-listen".into(), consoles[0].to_string(),
        "--epoch-ms".into(), args.epoch_ms.to_string(),
        "--kernel".into(), path(images.join(&args.kernel)), "--initrd".into(), path(images.join("guest-initrd.cpio")),
        "--append".into(), workload,
    ];
    if let Kill::MidEpoch(epoch) = kill {
        primary_args.extend(["--debug-die-mid-epoch".into(), epoch.to_string()]);
    }
    if let Some(epoch) = args.corrupt_epoch {
        primary_args.extend(["--debug-corrupt-epoch".into(), epoch.to_string()]);
    }
    standby_args.push("--mem-mib=256".into());
    let journal = args.workload == "journal";
    if journal {
        let (pdisk, sdisk) = (dir.join("primary.img"), dir.join("standby.img"));
        journal::make_disk(&pdisk)?;
        journal::make_disk(&sdisk)?;
        primary_args.extend(["--disk".into(), path(pdisk)]);
        standby_args.extend(["--disk".into(), path(sdisk)]);
    }
    // With --show-consoles, each stage as it is reached: should a run hang, the last
    // one printed says where, since the run's own report comes only at its end.
    let began = Instant::now();
    let stage = |what: &str| {
        if args.show_consoles {
            println!("run {n}: {what} after {:.1} s", began.elapsed().as_secs_f64());
        }
    };
    let mut standby = Proc::start(&standby_args, &dir, "standby")?;
    if !standby.wait_for("standing_by", Duration::from_secs(30)) {
        bail!("the standby did not start:\n{}", standby.log());
    }
    stage("the standby is up");
    let mut primary = Proc::start(&primary_args, &dir, "primary")?;
    let prefix = match args.workload.as_str() {
        "dirty" => "dirty ",
        "journal" => "journal ",
        _ => "tick ",
    };
    // Before the initial sync completes nothing is released, and nothing taken over.
    let client = (kill != Kill::InitialSync).then(|| Client::start(consoles.to_vec(), prefix, args.watch));

    let ready = match kill {
        Kill::InitialSync => primary.wait_for("standby_follows", Duration::from_secs(60)),
        _ => primary.wait_for("protected", Duration::from_secs(120)),
    };
    stage(if ready { "the primary is ready for the kill" } else { "the primary never got ready for the kill" });
    if !ready {
        let why = format!("the primary never got as far as the kill point{}", threads(&mut primary.child));
        return Ok(finish(n, &mut primary, &mut standby, Err(why), "never"));
    }
    let killed_at: String = match kill {
        Kill::After(d) => {
            std::thread::sleep(d);
            format!("{} ms after the first commit", d.as_millis())
        }
        Kill::AfterOutput { lines, then } => {
            let client = client.as_ref().expect("a client for every kill after output");
            if !client.wait_lines(lines, OUTPUT_LIMIT) {
                // Output still flowing means a guest that is slow to boot; none, a
                // pipeline that has stopped releasing.
                let released: Vec<Value> = primary.events().into_iter().filter(|e| e["event"] == "released").collect();
                let bytes: u64 = released.iter().filter_map(|e| e["bytes"].as_u64()).sum();
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                let last = released.last().and_then(|e| e["t_ms"].as_u64()).map(|t| now_ms.saturating_sub(t) as f64 / 1000.0);
                let why = format!(
                    "the primary released {} numbered lines in {} s, not {lines} ({bytes} bytes of console released in all, {}): {}",
                    client.lines(),
                    OUTPUT_LIMIT.as_secs(),
                    last.map(|s| format!("the last {s:.1} s before the limit")).unwrap_or_else(|| "none at all".into()),
                    if last.is_some_and(|s| s < 5.0) { "the guest is slow to boot, its output released as it comes" } else { "protection is not live" }
                );
                return Ok(finish(n, &mut primary, &mut standby, Err(why), "never"));
            }
            std::thread::sleep(then);
            // A kill after the guest has ended tests no takeover: the run says so
            // rather than reporting a console that never ended.
            if let Some(ended) = primary.event("vm_ended") {
                let why = if then.is_zero() {
                    format!(
                        "the guest had ended on the primary ({}) before numbered line {lines} was released: its output lagged \
                         it by more than its whole run, so this kill tests no takeover (give it more --lines)",
                        ended["how"].as_str().unwrap_or("?")
                    )
                } else {
                    format!(
                        "the guest had ended on the primary ({}) within the {} ms the kill waited after numbered line {lines}: \
                         the run was shorter than the kill's delay, so this kill tests no takeover (give it more --lines)",
                        ended["how"].as_str().unwrap_or("?"),
                        then.as_millis()
                    )
                };
                return Ok(finish(n, &mut primary, &mut standby, Err(why), "never"));
            }
            format!("{} ms after numbered line {lines} reached the console client", then.as_millis())
        }
        Kill::InitialSync => "during the initial sync".into(),
        Kill::MidEpoch(epoch) => format!("in the middle of sending epoch {epoch}"),
    };
    let released_before_kill = client.as_ref().map(Client::lines);
    let longest_gap = client.as_ref().and_then(|c| c.longest_gap(Instant::now()));
    if !matches!(kill, Kill::MidEpoch(_)) {
        let _ = primary.child.kill();
        if args.watch {
            println!("    ======== run {n}: the primary is killed (SIGKILL); the standby takes over ========");
        }
    }
    let primary_exit = primary.wait_exit(Duration::from_secs(120));
    stage(&format!("the primary ended ({primary_exit:?})"));
    let standby_exit = standby.wait_exit(Duration::from_secs(180));
    stage(&format!("the standby ended ({standby_exit:?})"));
    // A wait that ran out is a hang: where each process is goes with the verdict.
    let hung = (primary_exit.is_none() || standby_exit.is_none()).then(|| {
        format!("; primary {}; standby {}", threads(&mut primary.child), threads(&mut standby.child))
    });

    let (pcon, scon) = (primary.console(), standby.console());
    let (ccon, client_end) = match client {
        Some(client) => {
            let (text, end) = client.finish(Duration::from_secs(30));
            (Some(text), end)
        }
        None => (None, Ok(0)),
    };
    let verdict = if kill == Kill::InitialSync {
        let refused = standby_exit == Some(1) && standby.event("not_promoted").is_some();
        let silent = pcon.trim().is_empty() && scon.trim().is_empty();
        if refused && silent {
            Ok("the standby refused to take over and nothing was released".to_string())
        } else {
            Err(format!("wanted a refusal to promote and no output (standby exit {standby_exit:?}, released {} bytes)", pcon.len() + scon.len()))
        }
    } else if pcon.is_empty() && scon.is_empty() {
        // Not one byte from the guest on either host, not even the kernel's first line.
        Err(format!("{SILENT_GUEST} (primary exit {primary_exit:?}, standby exit {standby_exit:?})"))
    } else {
        let consoles = check::Consoles { primary: &pcon, standby: &scon, client: ccon.as_deref().unwrap_or(""), client_end: &client_end };
        let verdict = check::check(prefix, args.lines, &consoles, standby_exit, primary_exit);
        // The guest read its journal back at the end; the host reads the disk itself.
        match verdict {
            Ok(v) if journal && !scon.contains("TANDEM-JOURNAL-OK") => Err(format!("{v}; but the guest found its journal wrong when it read it back")),
            Ok(v) if journal => journal::verify(&dir.join("standby.img"), args.lines).map(|d| format!("{v}; {d}")),
            other => other,
        }
    };
    let verdict = match (verdict, hung) {
        (Err(e), Some(hung)) => Err(format!("{e}{hung}")),
        (verdict, _) => verdict,
    };
    let lag = check::output_lag(&primary.events());
    let verdict = verdict.map(|v| {
        let v = match released_before_kill {
            Some(k) => format!("{v}; {k} numbered lines had reached the client when the kill came"),
            None => v,
        };
        let v = match longest_gap {
            Some(gap) => format!("{v} (at most {} ms apart)", gap.as_millis()),
            None => v,
        };
        match lag {
            Some(lag) => format!("{v}; {lag}"),
            None => v,
        }
    });
    let mut outcome = finish(n, &mut primary, &mut standby, verdict, &killed_at);
    outcome.client = ccon.unwrap_or_default();
    stage("both processes reaped");
    drop((primary, standby));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

/// Ends both processes and judges the run from its verdict and the evidence.
fn finish(n: u32, primary: &mut Proc, standby: &mut Proc, verdict: Result<String, String>, killed_at: &str) -> Outcome {
    let mut stuck = Vec::new();
    for (who, proc) in [("primary", &mut *primary), ("standby", &mut *standby)] {
        if let Some(threads) = proc.end() {
            stuck.push(format!("the {who} (pid {}) ignored SIGKILL for {REAP_LIMIT:?} {threads}", proc.child.id()));
        }
    }
    let stuck = (!stuck.is_empty()).then(|| stuck.join("\n"));
    let (pcon, scon) = (primary.console(), standby.console());
    let triple_fault = [&*primary, &*standby]
        .iter()
        .any(|p| p.event("vm_ended").is_some_and(|e| e["how"] == "triple_fault"));
    let signature = match &verdict {
        Ok(_) => None,
        Err(_) if triple_fault => Some(Signature::GuestTripleFault),
        Err(_) if stuck.is_some() => Some(Signature::StuckProcess),
        Err(_) if pcon.is_empty() && scon.is_empty() => Some(Signature::SilentGuest),
        Err(_) => None,
    };
    let takeover = standby.event("took_over").map(|e| {
        format!(
            "took over as primary: generation={} epoch={} unreleased_output_bytes={} unreleased_frames={} detection_ms={} resume_ms={:.1}",
            e["generation"], e["epoch"], e["unreleased_output_bytes"], e["unreleased_frames"], e["detection_ms"], e["resume_ms"].as_f64().unwrap_or(0.0)
        )
    });
    let line = format!(
        "run {n}: kill {killed_at}: {}; {}{}",
        takeover.unwrap_or_else(|| "no takeover".into()),
        match &verdict {
            Ok(v) => format!("continuity OK: {v}"),
            Err(e) => format!("FAILED: {e}"),
        },
        match signature {
            Some(sig) => format!(" [signature: {}]", json!(sig).as_str().unwrap_or("?")),
            None => String::new(),
        }
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Outcome {
        ok: verdict.is_ok(),
        signature,
        stuck,
        line,
        primary: pcon,
        standby: scon,
        client: String::new(),
        primary_events: read(&primary.events),
        standby_events: read(&standby.events),
        primary_log: primary.log(),
        standby_log: standby.log(),
    }
}

/// The verdict of a run whose guest never printed anything, on either host: a guest
/// stuck early in its boot (the lab's start-up hang, see docs/lab.md), which the
/// standby, rebuilding the same VM, inherits.
pub const SILENT_GUEST: &str = "the guest printed nothing at all, on either host";



/// How long a kill after output waits for the primary to release that output.
const OUTPUT_LIMIT: Duration = Duration::from_secs(180);
