//! Notices a lab host that has stopped altogether: a ticker in the lab prints
//! [`ALIVE_MARKER`] every few seconds, and when nothing at all has come from the lab for
//! [`FROZEN_AFTER`], where its emulated CPUs are is read from QEMU's monitor and the
//! lab is stopped, rather than left to run out its whole time with nothing to show.
//! Seen at the start of a drill run (after `the standby is up`) about once in 30 VM
//! starts: the lab's own timers stopped firing, both emulated CPUs busy.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const ALIVE_MARKER: &str = "@@TANDEM-LAB-ALIVE@@";
/// Runs in the background of `/lab/run`.
pub const ALIVE_TICKER: &str = "grep -m1 ' _text$' /proc/kallsyms | sed 's/ .*//; s/^/@@TANDEM-LAB-TEXT=/'
( while sleep 5; do echo '@@TANDEM-LAB-ALIVE@@'; done ) </dev/null &\n";
/// Where the lab kernel's text starts (it is placed at random each boot), so that the
/// instruction pointers of a report can be looked up in its System.map later.
pub const TEXT_MARKER: &str = "@@TANDEM-LAB-TEXT=";
/// Far longer than any stall the lab has shown with its timers still running (seconds).
pub const FROZEN_AFTER: Duration = Duration::from_secs(90);

/// Watches one lab; every line read from it is passed to [`FreezeWatch::heard`].
pub struct FreezeWatch {
    start: Instant,
    last_ms: Arc<AtomicU64>,
    text: Arc<AtomicU64>,
    armed: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FreezeWatch {
    /// Watches the QEMU process `pid`, whose human monitor listens at `monitor`.
    pub fn new(pid: u32, monitor: PathBuf) -> Self {
        let start = Instant::now();
        let last_ms = Arc::new(AtomicU64::new(0));
        let text = Arc::new(AtomicU64::new(0));
        let (armed, done, fired) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (last_ms, text, armed, done, fired) = (last_ms.clone(), text.clone(), armed.clone(), done.clone(), fired.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let quiet = start.elapsed().saturating_sub(Duration::from_millis(last_ms.load(Ordering::SeqCst)));
                    if !armed.load(Ordering::SeqCst) || quiet < FROZEN_AFTER {
                        continue;
                    }
                    eprintln!(
                        "tandem lab: nothing at all from the lab host for {} s (its ticker prints every 5 s): it has frozen; \
                         where its CPUs are (its kernel text at {:#x}, _text in System.map):\n{}",
                        quiet.as_secs(),
                        text.load(Ordering::SeqCst),
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
        Self { start, last_ms, text, armed, done, fired, thread: Some(thread) }
    }

    /// The lab printed this line; true if it was one of this watch's own.
    pub fn read(&self, line: &str) -> bool {
        if line == ALIVE_MARKER {
            return true;
        }
        match line.strip_prefix(TEXT_MARKER).map(|a| u64::from_str_radix(a, 16)) {
            Some(address) => {
                self.text.store(address.unwrap_or(0), Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// A line came from the lab; `started`: the command is running (before that the
    /// lab's boot has its own limit).
    pub fn heard(&self, started: bool) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::SeqCst);
        self.armed.store(started, Ordering::SeqCst);
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
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    match read() {
        Ok(text) => text
            .lines()
            .filter(|l| l.starts_with("CPU#") || l.starts_with("RAX=") || l.starts_with("RIP=") || l.starts_with("CS ") || l.starts_with("CR0="))
            .map(|l| format!("  {l}\n"))
            .collect(),
        Err(e) => format!("  (the monitor did not answer: {e})\n"),
    }
}
