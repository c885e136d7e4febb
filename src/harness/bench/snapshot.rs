//! `tandem bench snapshot`: how long a snapshot stops the guest and takes in all, full
//! and delta, at several dirty rates and guest sizes, and how long a restore takes;
//! beside QEMU on the same guest in the same lab run. QEMU has no snapshot of a running
//! diskless VM other than migrating it to a file, and no incremental one, so each of
//! its captures is a whole migration (`migrate exec:cat > FILE`), and its restore is
//! `-incoming exec:cat FILE`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::qmp::Qmp;
use super::{lab_qemu, ms, qemu_microvm, BASE_CMDLINE, GUEST_INITRD, GUEST_KERNEL};
use crate::control;

#[derive(clap::Args, Clone)]
pub struct SnapshotArgs {
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024])]
    sizes: Vec<u64>,
    /// Rates at which the guest dirties memory, in MiB/s (0: an idle guest).
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 10, 100])]
    rates: Vec<u64>,
    /// Deltas per case (for QEMU, whole migrations), one second apart.
    #[arg(long, default_value_t = 5)]
    deltas: u32,
    /// Directory of built images (default: as for `tandem lab`).
    #[arg(long)]
    images: Option<PathBuf>,
}

/// Runs each case in a lab of its own, so a lab host that crashes (the emulated AMD-V
/// occasionally brings one down, under either VMM) costs one attempt at one case; a
/// case is tried up to three times. The table is printed here, from the rows the labs
/// report.
pub fn via_lab(args: &SnapshotArgs) -> Result<()> {
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    if args.sizes.is_empty() || args.rates.is_empty() || args.deltas == 0 || largest > 4096 {
        bail!("--sizes and --rates need at least one value each, sizes at most 4096 MiB, --deltas at least 1");
    }
    let mut rows = Vec::new();
    for &mem_mib in &args.sizes {
        for &rate in &args.rates {
            let case = Case { mem_mib, rate };
            let mut row = None;
            for attempt in 1..=3 {
                eprintln!("== {mem_mib} MiB guest, {rate} MiB/s (attempt {attempt})");
                match case_in_a_lab(args, case) {
                    Ok(r) => {
                        row = Some(r);
                        break;
                    }
                    Err(e) => eprintln!("the lab failed: {e:#}"),
                }
            }
            rows.push(row.unwrap_or(Row { case, tandem: None, qemu: None, errors: vec!["the lab failed 3 times".into()] }));
        }
    }
    print_table(&rows, args.deltas);
    if rows.iter().any(|r| r.tandem.is_none() || r.qemu.is_none()) {
        bail!("some cases failed; see the messages above");
    }
    Ok(())
}

/// Marks the line a lab run reports its case's results on.
const ROW_MARKER: &str = "@@BENCH-ROW ";

fn case_in_a_lab(args: &SnapshotArgs, case: Case) -> Result<Row> {
    // The lab's RAM holds the guest, a full snapshot's staging copy and the file itself.
    let lab_mem = u32::try_from(3 * case.mem_mib + 1024)?;
    // A case takes one to two minutes in the lab; a lab that hangs is retried sooner.
    let timeout = Duration::from_secs((180 + 20 * u64::from(args.deltas)) * case.mem_mib.div_ceil(512));
    let command: Vec<String> = [
        "bench", "snapshot-in-lab",
        "--sizes", &case.mem_mib.to_string(),
        "--rates", &case.rate.to_string(),
        "--deltas", &args.deltas.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut row = None;
    super::in_the_lab_with(args.images.clone(), timeout, lab_mem, &command, &mut |line| {
        match line.strip_prefix(ROW_MARKER) {
            Some(json) => row = serde_json::from_str::<Row>(json).ok(),
            None => eprintln!("{line}"),
        }
    })?;
    row.context("the lab finished without reporting the case's results")
}

/// One guest size at one dirty rate.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Case {
    mem_mib: u64,
    rate: u64,
}

impl Case {
    /// Idle is a ticker printing once a second; otherwise the dirty workload over a span
    /// large enough that a second's writes are all distinct pages.
    fn cmdline(&self) -> String {
        let workload = if self.rate == 0 {
            "tandem.workload=ticker tandem.interval_ms=1000".to_string()
        } else {
            format!(
                "tandem.workload=dirty tandem.dirty_mib={} tandem.span_mib={}",
                self.rate,
                (self.mem_mib / 2).min(128)
            )
        };
        format!("{BASE_CMDLINE} {workload}")
    }

    /// A line the workload prints every second.
    fn progress(&self) -> &'static str {
        if self.rate == 0 {
            "tick "
        } else {
            "dirty "
        }
    }
}

/// One capture: how long the guest was stopped, how long it took in all.
#[derive(Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Capture {
    stopped: Duration,
    total: Duration,
    pages: u64,
}

/// What one VMM did in one case.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Outcome {
    full: Capture,
    deltas: Vec<Capture>,
    restore: Duration,
    /// MiB/s the guest's workload managed while captures went on.
    guest_rate: f64,
}

/// One case's results, as a lab run reports them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Row {
    case: Case,
    tandem: Option<Outcome>,
    qemu: Option<Outcome>,
    /// Why a VMM's run failed, to print under the table.
    errors: Vec<String>,
}

pub fn in_lab(args: &SnapshotArgs) -> Result<()> {
    let tandem = std::env::current_exe()?;
    let qemu = lab_qemu()?;
    for &mem_mib in &args.sizes {
        for &rate in &args.rates {
            let case = Case { mem_mib, rate };
            eprintln!("-- tandem");
            let mut errors = Vec::new();
            let ours = tandem_case(&tandem, case, args.deltas)
                .inspect_err(|e| errors.push(format!("tandem, {} MiB at {rate} MiB/s: {e:#}", case.mem_mib)));
            eprintln!("-- qemu");
            let theirs = qemu_case(&qemu, case, args.deltas)
                .inspect_err(|e| errors.push(format!("qemu, {} MiB at {rate} MiB/s: {e:#}", case.mem_mib)));
            let row = Row { case, tandem: ours.ok(), qemu: theirs.ok(), errors };
            println!("{ROW_MARKER}{}", serde_json::to_string(&row)?);
        }
    }
    Ok(())
}

/// A VMM process whose console lines are kept with the time each arrived.
struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Guest {
    fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let out = child.stdout.take().context("child stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                keep.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), line));
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for a line starting with `prefix` after the first `skip` lines, and returns
    /// how many lines there are then.
    fn wait_line(&mut self, prefix: &str, skip: usize, limit: Duration) -> Result<usize> {
        let start = Instant::now();
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if lines.iter().skip(skip).any(|(_, l)| l.starts_with(prefix)) {
                    return Ok(lines.len());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the VMM exited ({status}) before printing {prefix:?}");
            }
            if start.elapsed() > limit {
                bail!("no {prefix:?} line within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VMM's exit status, if it has ended, and its last console lines: what a
    /// failure message needs.
    fn last_words(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("the VMM exited ({status})"),
            _ => "the VMM was still running".into(),
        };
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let tail: Vec<&str> = lines.iter().rev().take(5).rev().map(|(_, l)| l.as_str()).collect();
        format!("{status}; its console ended with: {}", tail.join(" | "))
    }

    fn line_count(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The dirty workload's write rate over lines `from..`, from its cumulative
    /// `pages=` counts and the times the lines arrived.
    fn dirty_rate(&self, from: usize) -> f64 {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let points: Vec<(Instant, u64)> = lines
            .iter()
            .skip(from)
            .filter(|(_, l)| l.starts_with("dirty "))
            .filter_map(|(t, l)| Some((*t, l.split("pages=").nth(1)?.split(' ').next()?.parse().ok()?)))
            .collect();
        match (points.first(), points.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 * 4096.0 / (1 << 20) as f64 / (b.0 - a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Ends a restored VM once its guest has shown it runs on (a workload line), and
    /// deletes the file it came from; returns the restore time if all went well.
    fn confirm(mut self, restored: Result<Duration>, case: Case, file: &str) -> Result<Duration> {
        let alive = restored.and_then(|t| {
            self.wait_line(case.progress(), self.line_count(), Duration::from_secs(60))?;
            Ok(t)
        });
        self.kill();
        let _ = std::fs::remove_file(file);
        alive
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const SNAPSHOT: &str = "/tmp/bench-snapshot";
const DELTA: &str = "/tmp/bench-delta";

fn tandem_case(tandem: &Path, case: Case, deltas: u32) -> Result<Outcome> {
    let ctl = PathBuf::from("/tmp/bench-ctl");
    let mut cmd = Command::new(tandem);
    cmd.args(["run", "--kernel", GUEST_KERNEL, "--initrd", GUEST_INITRD, "--cmdline", &case.cmdline()])
        .args(["--mem-mib", &case.mem_mib.to_string(), "--control"])
        .arg(&ctl);
    let mut guest = Guest::spawn(cmd)?;
    let result = (|| -> Result<Outcome> {
        let seen = guest.wait_line(&format!("{}2 ", case.progress()), 0, BOOT_LIMIT)?;
        let mut out = Outcome { full: tandem_capture(&ctl, SNAPSHOT, false)?, ..Outcome::default() };
        for _ in 0..deltas {
            std::thread::sleep(Duration::from_secs(1));
            out.deltas.push(tandem_capture(&ctl, DELTA, true)?);
            let _ = std::fs::remove_file(DELTA);
        }
        out.guest_rate = guest.dirty_rate(seen);
        Ok(out)
    })();
    let result = result.with_context(|| guest.last_words());
    guest.kill();
    let mut out = result?;

    let ctl = PathBuf::from("/tmp/bench-ctl-restored");
    let start = Instant::now();
    let mut cmd = Command::new(tandem);
    cmd.args(["restore", "--snapshot", SNAPSHOT, "--control"]).arg(&ctl);
    let restored = Guest::spawn(cmd)?;
    // The control socket answers once the VM is rebuilt and running.
    let answered = loop {
        if control::send(&ctl, &["status".into()]).is_ok() {
            break Ok(start.elapsed());
        }
        if start.elapsed() > BOOT_LIMIT {
            break Err(anyhow::anyhow!("the restored VM did not answer within {BOOT_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    out.restore = restored.confirm(answered, case, SNAPSHOT).context("restore")?;
    Ok(out)
}

/// `snapshot FILE [--delta]` through the control socket, with the times tandem reports.
fn tandem_capture(ctl: &Path, file: &str, delta: bool) -> Result<Capture> {
    let mut words = vec!["snapshot".to_string(), file.to_string()];
    if delta {
        words.push("--delta".into());
    }
    let reply = control::send(ctl, &words)?;
    let field = |name: &str| -> Result<f64> {
        reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {reply:?}"))
    };
    Ok(Capture {
        stopped: Duration::from_secs_f64(field("stopped_ms")? / 1e3),
        total: Duration::from_secs_f64(field("total_ms")? / 1e3),
        pages: field("pages")? as u64,
    })
}

const QEMU_FILE: &str = "/tmp/bench-qemu-state";
const QEMU_DELTA: &str = "/tmp/bench-qemu-again";

fn qemu_case(qemu: &Path, case: Case, deltas: u32) -> Result<Outcome> {
    let qmp_path = PathBuf::from("/tmp/bench-qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = qemu_microvm(qemu, case.mem_mib, 1, &case.cmdline());
    cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let mut guest = Guest::spawn(cmd)?;
    let result = (|| -> Result<Outcome> {
        let seen = guest.wait_line(&format!("{}2 ", case.progress()), 0, BOOT_LIMIT)?;
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
        // Unthrottled, as tandem writes its snapshot at full speed; QEMU's default
        // limit is for networks shared with other traffic.
        qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 1u64 << 40 }))?;
        let mut out = Outcome { full: qemu_migrate(&mut qmp, QEMU_FILE)?, ..Outcome::default() };
        for _ in 0..deltas {
            std::thread::sleep(Duration::from_secs(1));
            out.deltas.push(qemu_migrate(&mut qmp, QEMU_DELTA)?);
            let _ = std::fs::remove_file(QEMU_DELTA);
        }
        out.guest_rate = guest.dirty_rate(seen);
        Ok(out)
    })();
    let result = result.with_context(|| guest.last_words());
    guest.kill();
    let mut out = result?;

    let qmp_path = PathBuf::from("/tmp/bench-qmp-restored");
    let _ = std::fs::remove_file(&qmp_path);
    let start = Instant::now();
    let mut cmd = qemu_microvm(qemu, case.mem_mib, 1, &case.cmdline());
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(["-incoming", &format!("exec:cat {QEMU_FILE}")]);
    let restored = Guest::spawn(cmd)?;
    let running = (|| -> Result<Duration> {
        let mut qmp = Qmp::connect(&qmp_path, BOOT_LIMIT)?;
        loop {
            let status = qmp.execute("query-status", json!({}))?;
            if status["status"] == "running" {
                break Ok(start.elapsed());
            }
            if start.elapsed() > BOOT_LIMIT {
                bail!("QEMU's incoming VM was not running within {BOOT_LIMIT:?} ({status})");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })();
    out.restore = restored.confirm(running, case, QEMU_FILE).context("QEMU restore")?;
    Ok(out)
}

/// How long a migration to a file may take before it is called non-converging.
const MIGRATION_LIMIT: Duration = Duration::from_secs(60);

/// Migrates the running VM into `file`, lets it run on, and returns QEMU's own figures.
fn qemu_migrate(qmp: &mut Qmp, file: &str) -> Result<Capture> {
    qmp.execute("migrate", json!({ "uri": format!("exec:cat > {file}") }))?;
    let start = Instant::now();
    let info = loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {info}"),
            _ if start.elapsed() > MIGRATION_LIMIT => {
                let _ = qmp.execute("migrate_cancel", json!({}));
                bail!(
                    "QEMU's migration did not converge within {MIGRATION_LIMIT:?}: the guest dirties memory faster than \
                     QEMU writes it out within its downtime limit (status {})",
                    info["status"]
                );
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    qmp.execute("cont", json!({}))?;
    let figure = |name: &str| info[name].as_u64().with_context(|| format!("no {name} in {info}"));
    // After a QMP reconnect QEMU has been seen to report a completed migration with
    // no timings at all; that is no measurement.
    if figure("total-time")? == 0 {
        bail!("QEMU reported a completed migration without timings: {info}");
    }
    Ok(Capture {
        stopped: Duration::from_millis(figure("downtime")?),
        total: Duration::from_millis(figure("total-time")?),
        pages: info["ram"]["transferred"].as_u64().unwrap_or(0) / 4096,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn print_table(rows: &[Row], deltas: u32) {
    println!();
    println!("snapshot: tandem vs QEMU (migrate to a file, -incoming) on the same guest, same lab run");
    println!("delta = median of {deltas} captures 1 s apart (QEMU: whole migrations; it has no delta)");
    println!(
        "{:<8} {:>5} {:<8} {:>11} {:>10} {:>11} {:>10} {:>9} {:>13}",
        "guest", "MiB/s", "capture", "tandem stop", "total", "qemu down", "total", "stop/down", "delta pages"
    );
    let cell = |d: Option<Duration>| d.map_or("FAILED".to_string(), |d| format!("{:.1}", ms(d)));
    let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.3}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    };
    for Row { case, tandem: ours, qemu: theirs, .. } in rows {
        let guest = format!("{} MiB", case.mem_mib);
        let pick = |o: &Option<Outcome>, f: &dyn Fn(&Outcome) -> Capture| o.as_ref().map(f);
        let full = |o: &Outcome| o.full;
        let delta = |o: &Outcome| Capture {
            stopped: median(o.deltas.iter().map(|c| c.stopped).collect()),
            total: median(o.deltas.iter().map(|c| c.total).collect()),
            pages: {
                let mut p: Vec<u64> = o.deltas.iter().map(|c| c.pages).collect();
                p.sort_unstable();
                p.get(p.len() / 2).copied().unwrap_or(0)
            },
        };
        for (name, f) in [("full", &full as &dyn Fn(&Outcome) -> Capture), ("delta", &delta)] {
            let (a, b) = (pick(ours, f), pick(theirs, f));
            println!(
                "{guest:<8} {:>5} {name:<8} {:>11} {:>10} {:>11} {:>10} {:>9} {:>13}",
                case.rate,
                cell(a.map(|c| c.stopped)),
                cell(a.map(|c| c.total)),
                cell(b.map(|c| c.stopped)),
                cell(b.map(|c| c.total)),
                ratio(a.map(|c| c.stopped), b.map(|c| c.stopped)),
                if name == "delta" { a.map_or("-".into(), |c| c.pages.to_string()) } else { String::new() },
            );
        }
        let (a, b) = (ours.as_ref().map(|o| o.restore), theirs.as_ref().map(|o| o.restore));
        println!(
            "{guest:<8} {:>5} {:<8} {:>11} {:>10} {:>11} {:>10} {:>9}",
            case.rate, "restore", "-", cell(a), "-", cell(b), ratio(a, b)
        );
        if case.rate > 0 {
            let rate = |o: &Option<Outcome>| o.as_ref().map_or("-".into(), |o| format!("{:.1}", o.guest_rate));
            println!("{:<8} guest wrote MiB/s: {} under tandem, {} under QEMU", "", rate(ours), rate(theirs));
        }
    }
    for error in rows.iter().flat_map(|r| &r.errors) {
        println!("FAILED: {error}");
    }
    println!("stop = guest stopped (tandem: pause to resume; QEMU: its reported downtime); total = until the file is written");
    println!("restore = process start to running (tandem: control socket answers; QEMU: query-status says running)");
    println!("(times are in the lab, under emulation: compare the ratios, not the absolute figures)");
}
