//! Notices a lab host that has stopped altogether: a ticker in the lab writes to the
//! lab's second serial port (a file here, apart from the command's output, which it
//! would otherwise interleave with) every few seconds, and when that file has not grown
//! for [`FROZEN_AFTER`], where the emulated CPUs are is read from QEMU's monitor and the
//! lab is stopped, rather than left to run out its whole time with nothing to show.
//! Seen as a drill's VM started, at a takeover, and in the micro-guest tests: the lab's
//! own timers stopped, both emulated CPUs in its kernel with interrupts off.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs in the background of `/lab/run`. The kernel's text address first: the kernel
/// is placed at random each boot, so a report's instruction pointers are offsets from
/// it, looked up in any lab's `/proc/kallsyms` (Debian's System.map is a placeholder).
pub const ALIVE_TICKER: &str = "( grep -m1 ' _text$' /proc/kallsyms; while sleep 5; do echo alive; done ) </dev/null >/dev/ttyS1 2>&1 &\n";
/// Far longer than any stall the lab has shown with its timers still running.
pub const FROZEN_AFTER: Duration = Duration::from_secs(90);

/// Watches one lab.
pub struct FreezeWatch {
    armed: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FreezeWatch {
    /// Watches the QEMU process `pid`, whose second serial port writes to `ticks` and
    /// whose human monitor listens at `monitor`.
    pub fn new(pid: u32, ticks: PathBuf, monitor: PathBuf) -> Self {
        let (armed, done, fired) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (armed, done, fired) = (armed.clone(), done.clone(), fired.clone());
            std::thread::spawn(move || {
                let (mut size, mut changed) = (0, Instant::now());
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = std::fs::metadata(&ticks).map(|m| m.len()).unwrap_or(0);
                    if now != size || !armed.load(Ordering::SeqCst) {
                        (size, changed) = (now, Instant::now());
                        continue;
                    }
                    if changed.elapsed() < FROZEN_AFTER {
                        continue;
                    }
                    let text = std::fs::read_to_string(&ticks).unwrap_or_default();
                    let text = text.lines().find(|l| l.ends_with(" _text")).and_then(|l| l.split_whitespace().next()).unwrap_or("unknown");
                    eprintln!(
                        "tandem lab: the lab host has not ticked for {} s (it ticks every 5 s): it has frozen; \
                         where its CPUs are (its kernel text at {text}: look the offsets up in the lab's /proc/kallsyms):\n{}",
                        changed.elapsed().as_secs(),
                        cpu_registers(&monitor)
                    );
                    fired.store(true, Ordering::SeqCst);
                    // SAFETY: kill(2) on our own child's pid; the caller has not reaped
                    // it yet (it stops this watch first), so the pid cannot be reused.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    return;
                }
            })
        };
        Self { armed, done, fired, thread: Some(thread) }
    }

    /// Whether the command is running: the lab's boot and power-off have limits of
    /// their own.
    pub fn arm(&self, running: bool) {
        self.armed.store(running, Ordering::SeqCst);
    }

    /// Stops the watch; returns whether it found the lab frozen (and stopped it).
    pub fn stop(mut self) -> bool {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}

/// Each emulated CPU's instruction pointer and mode, from the monitor's
/// `info registers -a`, or why it could not be read.
fn cpu_registers(monitor: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(monitor)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"info registers -a\n")?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    match read() {
        Ok(text) => text
            .lines()
            .filter(|l| ["CPU#", "RAX=", "RIP=", "CS ", "CR0="].iter().any(|p| l.starts_with(p)))
            .map(|l| format!("  {l}\n"))
            .collect(),
        Err(e) => format!("  (the monitor did not answer: {e})\n"),
    }
}
