//! Kills a child process that outlives its time limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Armed on creation; dropping it (or [`Watchdog::disarm`]) stops it.
pub struct Watchdog {
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// SIGKILLs process `pid` once `limit` has passed, unless disarmed first.
    pub fn new(pid: u32, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let thread = {
            let (done, fired) = (done.clone(), fired.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + limit;
                while Instant::now() < deadline {
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                fired.store(true, Ordering::SeqCst);
                // SAFETY: kill(2) on our own child's pid; the caller has not reaped it
                // yet (it disarms first), so the pid cannot have been reused.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            })
        };
        Self {
            done,
            fired,
            thread: Some(thread),
        }
    }

    /// Stops the watchdog; returns whether it had already killed the process.
    pub fn disarm(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}
