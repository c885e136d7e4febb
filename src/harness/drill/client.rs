//! The drill's console client: follows the guest's console across the takeover as a
//! user's `tandem console` would, so the drill can judge exactly-once delivery as a
//! consumer sees it, and time its kills by the output the primary has released.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::console::{self, Followed};

/// What the client received: the bytes, and how many numbered lines they hold.
#[derive(Default)]
struct Received {
    bytes: Vec<u8>,
    /// Where the last whole line ended.
    scanned: usize,
    /// When each numbered line arrived.
    arrivals: Vec<Instant>,
}

struct Sink {
    received: Arc<Mutex<Received>>,
    lines: Arc<AtomicU64>,
    prefix: &'static str,
    /// Print each numbered line as it comes (`drill --watch`), with the time since
    /// this instant, so a viewer sees the takeover's pause.
    watch: Option<Instant>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        r.bytes.extend_from_slice(buf);
        while let Some(nl) = r.bytes[r.scanned..].iter().position(|&b| b == b'\n') {
            let line = &r.bytes[r.scanned..r.scanned + nl];
            if line.starts_with(self.prefix.as_bytes()) {
                if let Some(start) = self.watch {
                    println!("    {:>6.2} s  {}", start.elapsed().as_secs_f64(), String::from_utf8_lossy(line));
                }
                self.lines.fetch_add(1, Ordering::Relaxed);
                r.arrivals.push(Instant::now());
            }
            r.scanned += nl + 1;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Client {
    received: Arc<Mutex<Received>>,
    lines: Arc<AtomicU64>,
    done: Receiver<Result<Followed, String>>,
}

/// How long the client waits with no host serving: a takeover takes the heartbeat
/// timeout and a resume, far less than this.
const PATIENCE: Duration = Duration::from_secs(60);

impl Client {
    /// Follows the console at `hosts`, counting lines that start with `prefix` (and
    /// printing them if `watch`).
    pub fn start(hosts: Vec<SocketAddr>, prefix: &'static str, watch: bool) -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let lines = Arc::new(AtomicU64::new(0));
        let (tx, done) = channel();
        let mut sink = Sink { received: received.clone(), lines: lines.clone(), prefix, watch: watch.then(Instant::now) };
        std::thread::spawn(move || {
            let result = console::follow(&hosts, 0, &mut sink, PATIENCE, &mut |_| {});
            let _ = tx.send(result.map_err(|e| format!("{e:#}")));
        });
        Self { received, lines, done }
    }

    /// Numbered lines received so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// The longest wait between two numbered lines that arrived before `until`: how
    /// live protection looked to a reader while the guest ticked steadily.
    pub fn longest_gap(&self, until: Instant) -> Option<Duration> {
        let r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        let before: Vec<Instant> = r.arrivals.iter().copied().filter(|t| *t <= until).collect();
        before.windows(2).map(|w| w[1] - w[0]).max()
    }

    /// Waits up to `limit` until `n` numbered lines have come; false if they did not.
    pub fn wait_lines(&self, n: u64, limit: Duration) -> bool {
        let start = Instant::now();
        while self.lines() < n {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Waits up to `limit` for the console's end; returns what was received, and how
    /// the client ended (`Err` if it did not see the end).
    pub fn finish(self, limit: Duration) -> (String, Result<u64, String>) {
        let ended = match self.done.recv_timeout(limit) {
            Ok(Ok(Followed::Ended(end))) => Ok(end),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("the console had not ended {} s after the hosts did", limit.as_secs())),
        };
        let r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        (String::from_utf8_lossy(&r.bytes).into_owned(), ended)
    }
}
