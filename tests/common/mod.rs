//! Helpers shared by the integration tests: running the tandem binary, on the host or
//! inside the lab, and reading what the guest printed.
#![allow(dead_code)]

pub mod micro;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Lab runs are serialised within a test binary, and scripts/test.sh runs the binaries
/// one after another: two emulated lab hosts on a 2-core machine stall each other for
/// seconds.
static LAB: Mutex<()> = Mutex::new(());

thread_local! {
    /// When this test's thread last got the lab, for the tally's seconds.
    static LAB_HELD_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Both streams. Inside the lab a command's stderr reaches the lab console, so it
    /// arrives on `tandem lab`'s stdout; look for its messages here.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.stdout.lines().chain(self.stderr.lines())
    }

    /// Whether any line of either stream contains `text`.
    pub fn says(&self, text: &str) -> bool {
        self.lines().any(|l| l.contains(text))
    }

    /// Everything printed, for assertion messages.
    pub fn dump(&self) -> String {
        format!("exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Asserts that a host run failed with exit 1 and exactly one stderr line containing
/// `expect`, and did not panic.
pub fn assert_refused(run: &Run, expect: &str) {
    assert_eq!(run.code, 1, "{}", run.dump());
    assert!(!run.stderr.contains("panicked"), "{}", run.dump());
    assert_eq!(run.stderr.lines().count(), 1, "want one line\n{}", run.dump());
    assert!(run.stderr.contains(expect), "want {expect:?}\n{}", run.dump());
}

/// The built images, or a failure saying how to build them.
pub fn images() -> PathBuf {
    let dir = std::env::var_os("TANDEM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TANDEM_CACHE").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tandem")
            });
            cache.join("images")
        });
    for name in ["vmlinuz", "vmlinux", "guest-initrd.cpio", "lab-initrd.cpio.gz"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: these tests boot real guests; build the images with guest-images/build.sh \
             (needs the Debian packages listed in it), or run the README's test command",
            dir.join(name).display()
        );
    }
    dir
}

/// Runs `tandem ARGS` on the host.
pub fn tandem(args: &[&str]) -> Run {
    tandem_env(&[], args)
}

/// Runs `tandem ARGS` on the host with these environment variables set.
pub fn tandem_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    Run::from(
        Command::new(TANDEM)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running tandem"),
    )
}

/// How one lab run went, as `tandem lab --report` (or the drill's verdict) says.
#[derive(Default)]
pub struct LabFacts {
    /// The lab host never ran the command: nothing of tandem ran.
    pub never_started: bool,
    /// Guest triple faults the lab kernel counted (KVM's shutdown exit).
    pub triple_faults: u32,
    /// For a drill: every failed run carried the triple-fault signature.
    pub drill_failures_all_triple_faults: bool,
    /// The lab host froze: no tick from it for 90 s (`tandem lab`'s `frozen` fault).
    pub frozen: bool,
    /// The lab's own fault as its report names it (empty for none).
    pub lab_fault: String,
    /// Times the lab kernel patched its own text while the command ran (`None`:
    /// unknown): the lab host froze in such patches (docs/lab.md).
    pub text_patches: Option<u64>,
}

/// The fault signatures a test may be retried for, once, and why each is the lab's
/// and not tandem's (the counts are in docs/lab.md):
/// - a guest triple fault: a peer, QEMU with KVM in the same lab, stopped and
///   continued under dirty logging, dies the same way (KVM's shutdown exit while
///   delivering a #PF after nested page faults on write-protected guest page tables);
/// - a lab host that never ran the command: no tandem code had run;
/// - a lab host that froze (both CPUs stopped in its kernel, interrupts off): a peer,
///   QEMU with KVM in the same lab creating VMs in a loop, freezes it the same way,
///   at the same instruction of the lab kernel's scheduler.
///
/// Everything else, a lockup of the lab kernel, a hang or a guest that printed
/// nothing included, fails the test.
fn attributed(facts: &LabFacts) -> Option<&'static str> {
    if facts.never_started {
        Some("the lab host never ran the command")
    } else if facts.frozen {
        Some("the lab host froze, which a QEMU peer creating VMs in the same lab does too")
    } else if facts.triple_faults > 0 || facts.drill_failures_all_triple_faults {
        Some("a guest triple fault, which a QEMU peer in the same lab shows too")
    } else {
        None
    }
}

/// Where the suite's lab runs and retries are counted, one line each: `run NAME SECONDS`
/// and `retry NAME: WHY`. scripts/test.sh sums it up, lists the slowest runs and holds
/// the retries to a budget.
fn tally_file() -> PathBuf {
    std::env::var_os("TANDEM_TALLY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lab-tally"))
}

fn tally(line: &str) {
    use std::io::Write;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(tally_file());
    if let Ok(mut f) = file {
        let _ = writeln!(f, "{line}");
    }
}

fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// The one place that decides retries. Runs `attempt` (one lab run, whose facts it
/// returns beside what came out) and `check` (the test's assertions) on it. When the
/// check fails and the run carries an attributed signature (see [`attributed`]), the
/// failure is printed and counted, and the whole test runs once more; the second
/// verdict stands. Every lab run is counted.
pub fn checked(attempt: impl Fn() -> (Run, LabFacts), check: impl Fn(&Run)) -> Run {
    let name = test_name();
    for n in 1..=2 {
        let (run, facts) = attempt();
        // From when the lab was this test's, not from when it began to wait for it.
        let took = LAB_HELD_SINCE.with(|c| c.take()).map_or(0, |t| t.elapsed().as_secs());
        tally(&format!("run {name} {took}"));
        match facts.text_patches {
            Some(n) => tally(&format!("patches {name} {n}")),
            None => tally(&format!("patches {name} unknown")),
        }
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&run)));
        match (verdict, attributed(&facts)) {
            (Ok(()), _) => return run,
            (Err(_), Some(why)) if n == 1 => {
                tally(&format!("retry {name}: {why}"));
                eprintln!("LAB FAULT RETRIED ({name}): {why}; the failed attempt:\n{}", run.dump());
            }
            (Err(panic), _) => std::panic::resume_unwind(panic),
        }
    }
    unreachable!("the second attempt returns or panics")
}

/// Runs `tandem lab [LAB_ARGS] -- COMMAND` once, with the lab's report.
pub fn lab_run(lab_args: &[&str], command: &[&str]) -> (Run, LabFacts) {
    lab_run_env(&[], lab_args, command)
}

/// [`lab_run`] with these environment variables for `tandem lab`.
pub fn lab_run_env(env: &[(&str, &str)], lab_args: &[&str], command: &[&str]) -> (Run, LabFacts) {
    let _one_at_a_time = lab_ready();
    let report = std::env::temp_dir().join(format!("tandem-lab-report-{}-{}", std::process::id(), test_name()));
    let _ = std::fs::remove_file(&report);
    let report_arg = report.display().to_string();
    let mut args = vec!["lab", "--timeout", "400", "--report", &report_arg];
    args.extend_from_slice(lab_args);
    args.push("--");
    args.extend_from_slice(command);
    let run = tandem_env(env, &args);
    let json: serde_json::Value = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let facts = LabFacts {
        never_started: json["lab_fault"] == "never_started",
        triple_faults: json["guest_triple_faults"].as_u64().unwrap_or(0) as u32,
        drill_failures_all_triple_faults: false,
        frozen: json["lab_fault"] == "frozen",
        lab_fault: json["lab_fault"].as_str().unwrap_or("").to_string(),
        text_patches: json["kernel_text_patches"].as_u64(),
    };
    (run, facts)
}

/// One lab run of `COMMAND`, checked by `check` (see [`checked`]).
pub fn lab(lab_args: &[&str], command: &[&str], check: impl Fn(&Run)) -> Run {
    checked(|| lab_run(lab_args, command), check)
}

/// Checks that the lab can run, and holds it for one test's run.
pub fn lab_ready() -> std::sync::MutexGuard<'static, ()> {
    images();
    assert!(
        Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().unwrap().status.success(),
        "qemu-system-x86_64 is missing: the lab needs it (apt-get install qemu-system-x86)"
    );
    let guard = LAB.lock().unwrap_or_else(|e| e.into_inner());
    LAB_HELD_SINCE.with(|c| c.set(Some(std::time::Instant::now())));
    guard
}

/// `tandem run` inside the lab with the shipped guest (unless `run_args` names another
/// `--kernel`) and extra kernel arguments, checked by `check`.
pub fn lab_guest(run_args: &[&str], append: &str, check: impl Fn(&Run)) -> Run {
    let mut cmd = vec!["tandem", "run", "--initrd", "/images/guest-initrd.cpio"];
    if !run_args.contains(&"--kernel") {
        cmd.extend_from_slice(&["--kernel", "/images/vmlinuz"]);
    }
    cmd.extend_from_slice(run_args);
    cmd.extend_from_slice(&["--append", append]);
    lab(&[], &cmd, check)
}

/// The tick numbers the ticker workload printed, in order.
pub fn ticks(run: &Run) -> Vec<u64> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Runs `tandem drill ARGS --show-consoles` (it starts its own lab), checked by
/// `check`. The drill never repeats a run itself; its verdict line names each failed
/// run's fault signature, and only a failure whose every run is a guest triple fault
/// may be retried (see `common::checked`). `env` goes to the drill and the hosts it
/// starts: with `RUST_LOG=off` no log is written at all, and the verdict must not care.
pub fn drill(env: &[(&str, &str)], args: &[&str], check: impl Fn(&Run)) {
    checked(
        || {
            let _lab = lab_ready();
            let mut all = vec!["drill", "--show-consoles"];
            all.extend_from_slice(args);
            let run = tandem_env(env, &all);
            let verdicts = drill_verdicts(&run);
            let last = verdicts.iter().rev().find(|v| v.get("done").is_some()).cloned().unwrap_or_default();
            let failed = last["failed"].as_array().cloned().unwrap_or_default();
            let facts = LabFacts {
                drill_failures_all_triple_faults: !failed.is_empty()
                    && failed.iter().all(|f| f["signature"] == "guest_triple_fault"),
                // Only a freeze with no failed run before it excuses the drill.
                frozen: failed.is_empty() && verdicts.iter().any(|v| v["lab_fault"] == "frozen"),
                text_patches: verdicts.iter().find_map(|v| v["kernel_text_patches"].as_u64()),
                ..LabFacts::default()
            };
            (run, facts)
        },
        check,
    );
}

/// A drill's `drill-verdict: ` lines, each as its JSON.
pub fn drill_verdicts(run: &Run) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("drill-verdict: "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

/// The lines of `stdout` after the line `=== name` and before the next `===` line.
pub fn section<'a>(run: &'a Run, name: &str) -> Vec<&'a str> {
    run.stdout
        .lines()
        .skip_while(|l| l.trim() != format!("=== {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with("==="))
        .collect()
}
