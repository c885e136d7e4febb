//! The lab: a Linux host with real KVM, running under QEMU's emulated AMD-V, so tandem
//! can boot Linux guests on machines whose own /dev/kvm cannot (see docs/lab.md).
//!
//! The lab host boots the cached base initramfs (busybox, kvm modules, guest images)
//! with a second archive appended for this run: `/lab/run` (the command), the tandem
//! binary and its libraries, and the operator's `--with` files under `/with/`. The lab's
//! /init runs `/lab/run`, prints an exit marker on the console and powers off.

pub mod cpio;
mod freeze;
mod hold;

pub use hold::hold;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where a `--with` file appears inside the lab.
pub const WITH_DIR: &str = "/with";
/// Printed by the lab's /init with the command's exit status.
const EXIT_MARKER: &str = "@@TANDEM-LAB-EXIT=";
/// Printed by the lab's /init just before it runs the command.
const START_MARKER: &str = "@@TANDEM-LAB-START@@";
/// Printed by `tandem lab` on stderr when the lab host timed out before running the
/// command: a fault of the lab, not of the command.
pub const NEVER_STARTED: &str = "the lab host never got as far as running the command";
/// The lab host's CPU: an EPYC with SVM, minus the features QEMU's TCG cannot emulate
/// (each would otherwise print a warning on every lab boot).
const LAB_CPU: &str = "EPYC,+svm,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec";
/// Exit status when the lab ran out of time, as timeout(1) uses.
pub const TIMEOUT_STATUS: i32 = 124;
/// Exit status when the lab host itself failed: its kernel locked up (see
/// [`LOCKUP_WATCH`]) or crashed.
pub const LAB_FAULT_STATUS: i32 = 125;
/// Printed by `tandem lab` on stderr with [`LAB_FAULT_STATUS`].
pub const LOCKED_UP: &str = "the lab host's kernel locked up";
/// Printed by the lockup watcher before and after the lab kernel's report.
const FAULT_MARKER: &str = "@@TANDEM-LAB-FAULT@@";
const FAULT_END_MARKER: &str = "@@TANDEM-LAB-FAULT-END@@";
/// How long the watcher gets to print the report it has begun.
const LOCKUP_REPORT_GRACE: Duration = Duration::from_secs(60);
/// Before the command, with one lab CPU online (the lab boots with `maxcpus=1`): hold
/// whatever makes the lab kernel patch its text on first use (see [`hold`]; `@HELD@`
/// stands for [`hold::HELD_MARKER`]), start
/// counting the patches made from here on (see [`TEXT_PATCHES_MARKER`]), then bring the
/// other CPUs online. `tsc=unstable` on the lab's command line keeps the clock the lab
/// has always had (HPET: its CPUs' TSCs do not agree), decided at boot, so that a CPU
/// coming online does not find the TSCs apart and patch the scheduler's clock.
const HOLD_AND_ONLINE: &str = r#"H=10.254.254
# iproute2's ip by its path: busybox's shell would run its own applet, which has no netns.
IP=/sbin/ip
if $IP netns add lab-hold && $IP link add lab-hold0 type veth peer name lab-hold1 netns lab-hold &&
	$IP addr add $H.1/30 dev lab-hold0 && $IP link set lab-hold0 up &&
	$IP -n lab-hold addr add $H.2/30 dev lab-hold1 && $IP -n lab-hold link set lab-hold1 up; then
	tandem lab-hold --icmp-from $H.2 </dev/null >/tmp/.lab-hold.log 2>&1 &
else
	echo "TANDEM-LAB-ERROR: could not make the lab-hold network namespace"
	tandem lab-hold </dev/null >/tmp/.lab-hold.log 2>&1 &
fi
while [ ! -e @HELD@ ] && kill -0 $! 2>/dev/null; do sleep 0.1; done
[ -e @HELD@ ] || echo "TANDEM-LAB-ERROR: tandem lab-hold ended: $(cat /tmp/.lab-hold.log)"
P=/sys/kernel/tracing/instances/text-patches
if mkdir $P && echo text_poke_bp_batch > $P/set_ftrace_filter && echo function > $P/current_tracer; then
	lab_text_patches() { grep -c 'text_poke_bp_batch' $P/trace; }
else
	lab_text_patches() { echo unknown; }
fi
for c in /sys/devices/system/cpu/cpu[0-9]*/online; do
	# No match (a one-CPU lab) leaves the pattern itself.
	[ -e $c ] || continue
	[ "$(cat $c)" = 1 ] || echo 1 > $c || echo "TANDEM-LAB-ERROR: could not bring ${c%/online} online"
done
# The tracer's own set-up patched text above: only the command's patches count.
: > $P/trace 2>/dev/null
"#;
/// Added to the lab kernel's command line; see [`HOLD_AND_ONLINE`].
const LAB_KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 maxcpus=1 tsc=unstable";

/// Runs in the background of `/lab/run`. A lab CPU stuck in the kernel (a soft lockup
/// or an RCU stall) never frees itself, and no command can be at fault for one: only
/// the lab host's kernel or its emulated CPU can. So rather than let the run time out
/// minutes later with nothing to go on, the watcher prints the kernel's report (the
/// stuck CPU's registers and call trace, which the console's log level holds back) and
/// `tandem lab` stops the lab. It reads the lab kernel's own log, never the console,
/// where a guest's lockup report (which tandem could cause) looks the same.
const LOCKUP_WATCH: &str = r#"lab_lockup_watch() {
	while sleep 2; do
		dmesg | grep -q -e 'soft lockup' -e 'self-detected stall' || continue
		sleep 5
		echo '@@TANDEM-LAB-FAULT@@'
		dmesg | sed -n -r '/soft lockup|self-detected stall/,$p' | grep -v Unhandled | head -120
		echo '@@TANDEM-LAB-FAULT-END@@'
		return
	done
}
lab_lockup_watch </dev/null &
"#;

/// Counts every guest triple fault in the lab, whoever's guest it was (tandem's or a
/// peer QEMU's): KVM's shutdown exit (SVM exit code 127), as the lab kernel's own
/// tracepoint sees it. The count comes from the lab's kernel, not from the command, so
/// a harness can weigh a failed run against a fault the lab is known to cause.
const SHUTDOWN_WATCH: &str = r#"T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
if echo 'exit_reason == 127' > $T/events/kvm/kvm_exit/filter && echo 1 > $T/events/kvm/kvm_exit/enable; then
	lab_shutdowns() { grep -c 'kvm_exit' $T/trace; }
else
	lab_shutdowns() { echo unknown; }
fi
"#;
/// Where everything in the lab is, printed shortly before the lab's time runs out, so
/// that a hang says where it hangs: every user process with its state and wait channel,
/// and the kernel stack of each thread of tandem and QEMU. `$1`: seconds to wait.
const HANG_WATCH: &str = r#"lab_hang_watch() {
	sleep "$1" || return
	echo '=== the lab is about to run out of time; where everything is:'
	for p in /proc/[0-9]*; do
		# Kernel threads (no command line) are left out.
		[ -s $p/cmdline ] || continue
		comm=$(cat $p/comm 2>/dev/null) || continue
		echo "pid ${p#/proc/} $comm state=$(sed -n 's/^State:\t//p' $p/status) wchan=$(cat $p/wchan 2>/dev/null)"
		case $comm in
		tandem|qemu-system-x86|vcpu*)
			for t in $p/task/*; do echo "  thread ${t##*/} $(cat $t/comm)"; sed 's/^/    /' $t/stack 2>/dev/null; done ;;
		esac
	done
	echo '=== end of where everything is'
}
"#;
/// Reloads kvm_amd without nested paging, so the lab's KVM shadows its guests' page
/// tables itself instead of leaning on the nested paging that QEMU's TCG emulates for
/// the lab's CPU (see [`nested_paging`]).
const NO_NESTED_PAGING: &str = r#"m=$(grep kvm-amd /lib/modules/order)
rmmod kvm_amd && insmod "/lib/modules/$m" npt=0 || echo "TANDEM-LAB-ERROR: could not reload kvm_amd with npt=0"
"#;
/// Printed after the command with the count of [`SHUTDOWN_WATCH`].
const SHUTDOWNS_MARKER: &str = "@@TANDEM-LAB-SHUTDOWNS=";
/// Printed after the command with how many times the lab kernel patched its own text
/// while the command ran (each a batch of `text_poke_bp`, with every CPU online): the
/// lab host froze in such patches, so a command should cause none.
const TEXT_PATCHES_MARKER: &str = "@@TANDEM-LAB-TEXT-PATCHES=";

/// How a lab run went, beyond the command's own status.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The command's exit status; [`TIMEOUT_STATUS`] or [`LAB_FAULT_STATUS`] when the
    /// lab stopped it.
    pub status: i32,
    /// A fault of the lab itself, if one ended the run.
    pub lab_fault: Option<LabFault>,
    /// Guest triple faults the lab kernel saw while the command ran (`None`: unknown,
    /// e.g. the run was cut off).
    pub guest_triple_faults: Option<u32>,
    /// Times the lab kernel patched its own text while the command ran (see
    /// [`TEXT_PATCHES_MARKER`]; `None`: unknown).
    pub kernel_text_patches: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabFault {
    /// The lab host never got as far as running the command: nothing of tandem ran.
    NeverStarted,
    /// A lab CPU stuck in the lab's kernel (see [`LOCKUP_WATCH`]).
    LockedUp,
    /// The lab host stopped altogether (see [`freeze`]). A peer shows it too: QEMU
    /// with KVM in the same lab, creating VMs in a loop, freezes it the same way
    /// (docs/lab.md).
    Frozen,
    /// The lab host stopped in the middle of the command: its /init always reports
    /// the command's status, so only the lab's kernel (a panic, which reboots and so
    /// ends QEMU) or QEMU itself can have ended it.
    Crashed,
}

/// What the lab needs from the host.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub images: PathBuf,
    pub timeout: Duration,
    pub with: Vec<PathBuf>,
    /// Append QEMU itself to the lab (for benchmarks that compare against it).
    pub with_qemu: bool,
    pub mem_mib: u32,
    pub cpus: u32,
}

/// The image cache: `$TANDEM_IMAGES`, else `${TANDEM_CACHE:-~/.cache/tandem}/images`.
pub fn default_images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_IMAGES") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("TANDEM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tandem")
        });
    cache.join("images")
}

fn require_image(images: &Path, name: &str) -> Result<PathBuf> {
    let path = images.join(name);
    if !path.is_file() {
        bail!(
            "lab image {} is missing: build the images with guest-images/build.sh (or point TANDEM_IMAGES at them)",
            path.display()
        );
    }
    Ok(path)
}

/// Finds `name` on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The QEMU that runs the lab host: `$TANDEM_LAB_QEMU` if set (to compare QEMU
/// versions side by side, see docs/lab.md), else the one on PATH.
fn qemu() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TANDEM_LAB_QEMU") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("TANDEM_LAB_QEMU={} is not a file", path.display());
        }
        return Ok(path);
    }
    find_program("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found: the lab needs QEMU; install the Debian package qemu-system-x86 (apt-get install qemu-system-x86)",
    )
}

/// Whether the lab's KVM uses the nested paging QEMU emulates: only when
/// `TANDEM_LAB_NPT=1`, for comparisons. With it, replicated guests triple-faulted in
/// the lab (5 in 25 boots in the census, two in a row in one test); without it, none
/// in the first 7 (docs/lab.md).
fn nested_paging() -> bool {
    std::env::var("TANDEM_LAB_NPT").is_ok_and(|v| v == "1")
}

/// Quotes one argument for the lab's busybox sh.
fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Shared libraries a dynamically linked program needs, as `ldd` lists them.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd (package libc-bin) to find tandem's libraries")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => line.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The tandem binary as it goes into the lab: a stripped copy when `strip` is at hand,
/// since debug info would make every lab boot unpack tens of MiB for nothing.
fn lab_binary(exe: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let stripped = scratch.join("tandem");
    let ok = find_program("strip").is_some()
        && Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(exe)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let path = if ok { &stripped } else { exe };
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Builds the per-run archive: the command, tandem and its libraries, the `--with` files.
fn overlay(command: &[String], with: &[PathBuf], timeout: Duration, scratch: &Path) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::default();
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(LOCKUP_WATCH);
    script.push_str(freeze::ALIVE_TICKER);
    if !nested_paging() {
        script.push_str(NO_NESTED_PAGING);
    }
    script.push_str(SHUTDOWN_WATCH);
    script.push_str(HANG_WATCH);
    script.push_str(&HOLD_AND_ONLINE.replace("@HELD@", hold::HELD_MARKER));
    // Well before the lab is stopped, allowing for its boot and for the listing.
    let hang_after = timeout.as_secs().saturating_sub(45).max(10);
    script.push_str(&format!("lab_hang_watch {hang_after} </dev/null &\n"));
    if let Ok(filter) = std::env::var("RUST_LOG") {
        script.push_str(&format!("export RUST_LOG={}\n", shell_quote(&filter)));
    }
    let args: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    script.push_str(&format!("{}\nrc=$?\necho \"{SHUTDOWNS_MARKER}$(lab_shutdowns)@@\"\necho \"{TEXT_PATCHES_MARKER}$(lab_text_patches)@@\"\nexit $rc\n", args.join(" ")));
    archive.file("/lab/run", 0o755, script.as_bytes());

    let exe = std::env::current_exe().context("locating the tandem binary")?;
    archive.file("/usr/bin/tandem", 0o755, &lab_binary(&exe, scratch)?);
    for lib in shared_libraries(&exe)? {
        let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        archive.file(&lib.to_string_lossy(), 0o755, &data);
    }

    let mut names = std::collections::HashSet::new();
    for file in with {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("--with {}: not a file name", file.display()))?;
        if !names.insert(name.to_string()) {
            bail!("--with {}: another --with file is also named {name}", file.display());
        }
        let data = std::fs::read(file).with_context(|| format!("--with {}", file.display()))?;
        archive.file(&format!("{WITH_DIR}/{name}"), 0o755, &data);
    }
    let mut out = Vec::new();
    archive.finish(&mut out)?;
    Ok(out)
}

/// Boots the lab, runs `command` inside, streams its output line by line to `on_line`,
/// and returns its exit status ([`TIMEOUT_STATUS`] if the lab ran out of time).
pub fn run(opts: &LabOptions, command: &[String], on_line: &mut dyn FnMut(&str)) -> Result<i32> {
    Ok(run_with_report(opts, command, on_line)?.status)
}

/// The number a `MARKER<number>@` line carries: `None` when `line` is no such line,
/// `Some(None)` when its number does not parse (the line is the marker's all the same).
fn marked_number<T: std::str::FromStr>(line: &str, marker: &str) -> Option<Option<T>> {
    line.strip_prefix(marker).map(|rest| rest.trim_end_matches('@').parse().ok())
}

/// Like [`run`], with what the lab itself saw.
pub fn run_with_report(opts: &LabOptions, command: &[String], on_line: &mut dyn FnMut(&str)) -> Result<Report> {
    if command.is_empty() {
        bail!("tandem lab needs a command to run, e.g. `tandem lab -- tandem run --kernel /images/vmlinuz`");
    }
    let qemu = qemu()?;
    let kernel = require_image(&opts.images, "vmlinuz")?;
    let base = require_image(&opts.images, "lab-initrd.cpio.gz")?;
    let scratch = tempdir()?;
    let initrd = scratch.path.join("lab-initrd.cpio");
    {
        let mut out = std::fs::File::create(&initrd).context("creating the lab initrd")?;
        out.write_all(&std::fs::read(&base).with_context(|| format!("reading {}", base.display()))?)?;
        out.write_all(&overlay(command, &opts.with, opts.timeout, &scratch.path)?)?;
        if opts.with_qemu {
            let extra = require_image(&opts.images, "lab-qemu.cpio.gz")?;
            out.write_all(&std::fs::read(&extra)?)?;
        }
    }

    let monitor = scratch.path.join("monitor.sock");
    let ticks = scratch.path.join("ticks");
    let mut lab = Command::new(&qemu);
    // A lab whose `tandem lab` was killed must not run on: its emulated CPUs would
    // take the host's cores from the next lab (seen: one burned a core for half an
    // hour and starved a test suite's labs into timeouts).
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call.
    unsafe {
        lab.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = lab
        .args(["-M", "pc", "-accel", "tcg,thread=multi", "-cpu", LAB_CPU])
        .args(["-smp", &opts.cpus.to_string(), "-m", &opts.mem_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", ticks.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", LAB_KERNEL_ARGS, "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;

    let watchdog = crate::harness::watchdog::Watchdog::new(child.id(), opts.timeout);
    let freeze = freeze::FreezeWatch::new(child.id(), ticks, monitor);
    let mut status = None;
    let mut started = false;
    let mut locked_up = None;
    let mut shutdowns = None;
    let mut text_patches = None;
    let stdout = child.stdout.take().context("QEMU's output pipe")?;
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']).trim_end_matches('\r');
        freeze.arm(started && status.is_none());
        if line == START_MARKER {
            started = true;
            freeze.arm(true);
            continue;
        }
        if let Some(n) = marked_number(line, SHUTDOWNS_MARKER) {
            shutdowns = n;
            continue;
        }
        if let Some(n) = marked_number(line, TEXT_PATCHES_MARKER) {
            text_patches = n;
            continue;
        }
        if let Some(n) = marked_number(line, EXIT_MARKER) {
            status = n;
            continue;
        }
        if line == FAULT_MARKER {
            locked_up.get_or_insert_with(|| crate::harness::watchdog::Watchdog::new(child.id(), LOCKUP_REPORT_GRACE));
            on_line("tandem lab: the lab host's kernel reports a CPU stuck in the kernel:");
            continue;
        }
        if line == FAULT_END_MARKER {
            // Nothing the command does from here on counts: stop the lab now.
            let _ = child.kill();
            continue;
        }
        // After the marker only the lab host's own power-off chatter follows.
        if status.is_none() {
            on_line(line);
        }
    }
    // Disarm before reaping, so the watchdogs can never signal a reused pid.
    let timed_out = watchdog.disarm();
    let frozen = freeze.stop();
    let locked_up = locked_up.map(|w| w.disarm());
    let _ = child.wait();
    let report = |status, lab_fault| Report { status, lab_fault, guest_triple_faults: shutdowns, kernel_text_patches: text_patches };
    if locked_up.is_some() && status.is_none() {
        eprintln!(
            "tandem lab: {LOCKED_UP} while running the command (a CPU stuck in the kernel, which no user program can cause: \
             a fault of the lab's kernel or its emulated CPU; its report is above); the lab was stopped (try again)"
        );
        return Ok(report(LAB_FAULT_STATUS, Some(LabFault::LockedUp)));
    }
    if frozen && status.is_none() {
        eprintln!("tandem lab: the lab host froze while running the command (see above); the lab was stopped");
        return Ok(report(LAB_FAULT_STATUS, Some(LabFault::Frozen)));
    }
    if timed_out {
        let lab_fault = if started {
            eprintln!("tandem lab: timed out after {:?} with the command still running; the lab was stopped", opts.timeout);
            None
        } else {
            eprintln!("tandem lab: timed out after {:?}: {NEVER_STARTED} (try again)", opts.timeout);
            Some(LabFault::NeverStarted)
        };
        return Ok(report(TIMEOUT_STATUS, lab_fault));
    }
    let Some(status) = status else {
        eprintln!(
            "tandem lab: the lab host stopped before the command finished, without its exit status: \
             the lab's kernel crashed (its report is above) or QEMU ended"
        );
        return Ok(report(LAB_FAULT_STATUS, Some(LabFault::Crashed)));
    };
    Ok(report(status, None))
}

/// A scratch directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempdir() -> Result<TempDir> {
    let path = std::env::temp_dir().join(format!(
        "tandem-lab-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn marker_lines_give_their_number_and_other_lines_none() {
        assert_eq!(marked_number::<i32>(&format!("{EXIT_MARKER}-3@"), EXIT_MARKER), Some(Some(-3)));
        assert_eq!(marked_number::<u32>(&format!("{SHUTDOWNS_MARKER}x@"), SHUTDOWNS_MARKER), Some(None));
        assert_eq!(marked_number::<u32>("tick 7", TEXT_PATCHES_MARKER), None);
    }

    #[test]
    fn ldd_lists_libc_for_a_dynamic_program() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
    }
}
