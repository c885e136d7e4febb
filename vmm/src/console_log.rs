//! The console as the world has been given it: every released byte has an offset in
//! the guest's whole output since it started, and the latest of them are kept, so a
//! console client that lost its host can resume on the next one exactly where it
//! stopped, as TCP resumes by sequence number.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Released output kept for clients that lag behind.
pub const KEPT_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
struct Inner {
    /// Offset of the first byte kept.
    start: u64,
    bytes: VecDeque<u8>,
    /// Serving: false on a standby until it takes over, when it learns where the
    /// console stands.
    live: bool,
    /// The guest's console has ended: nothing more will come.
    ended: bool,
}

impl Inner {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// What a reader gets from [`ConsoleLog::read`].
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Bytes starting at `offset`, which is later than the one asked for only when
    /// what lay between is no longer kept.
    Bytes { offset: u64, bytes: Vec<u8> },
    /// Everything up to `end` was read and the console has ended.
    Ended { end: u64 },
    /// The reader asked for an offset beyond all the output there is.
    Ahead { end: u64 },
    /// Nothing new within the wait (or the log is not live yet).
    Nothing,
}

#[derive(Debug, Default)]
pub struct ConsoleLog {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl ConsoleLog {
    /// A log serving from the guest's first byte.
    pub fn live() -> Arc<Self> {
        let log = Self::default();
        log.lock().live = true;
        Arc::new(log)
    }

    /// A log that serves nothing until [`ConsoleLog::seed`] (a standby's).
    pub fn pending() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts serving, with `released` standing at `start` in the whole output.
    pub fn seed(&self, start: u64, released: &[u8]) {
        let mut inner = self.lock();
        inner.start = start;
        inner.bytes = released.iter().copied().collect();
        inner.live = true;
        trim(&mut inner);
        self.changed.notify_all();
    }

    pub fn append(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.bytes.extend(bytes);
        trim(&mut inner);
        self.changed.notify_all();
    }

    /// The guest's console has ended: readers get the rest, then the end.
    pub fn close(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }

    /// Whether it serves yet (a standby's does only once it has taken over).
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    /// Where the output released so far ends.
    pub fn end(&self) -> u64 {
        self.lock().end()
    }

    /// Up to `max` bytes from `offset` on, waiting up to `wait` for some.
    pub fn read(&self, offset: u64, max: usize, wait: Duration) -> Read {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, wait, |i| !i.live || (i.end() <= offset && !i.ended))
            .unwrap_or_else(|e| e.into_inner());
        if !inner.live {
            return Read::Nothing;
        }
        let end = inner.end();
        if offset > end {
            return Read::Ahead { end };
        }
        if offset == end {
            return if inner.ended { Read::Ended { end } } else { Read::Nothing };
        }
        let from = offset.max(inner.start);
        let skip = (from - inner.start) as usize;
        let bytes: Vec<u8> = inner.bytes.iter().skip(skip).take(max).copied().collect();
        Read::Bytes { offset: from, bytes }
    }
}

fn trim(inner: &mut Inner) {
    let excess = inner.bytes.len().saturating_sub(KEPT_BYTES);
    inner.bytes.drain(..excess);
    inner.start += excess as u64;
}

/// Writes released output to `out` (the host's stdout) and then into the log, in that
/// order: a client served from the log never sees a byte before stdout does.
pub struct LogWriter<W: Write + Send> {
    out: W,
    log: Arc<ConsoleLog>,
}

impl<W: Write + Send> LogWriter<W> {
    pub fn new(out: W, log: Arc<ConsoleLog>) -> Self {
        Self { out, log }
    }
}

impl<W: Write + Send> Write for LogWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A host whose stdout is gone still serves its console clients.
        let _ = self.out.write_all(buf);
        self.log.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Duration = Duration::ZERO;

    #[test]
    fn a_reader_resumes_at_its_offset_and_learns_of_the_end() {
        let log = ConsoleLog::live();
        log.append(b"tick 1\ntick 2\n");
        assert_eq!(log.read(0, 7, NOW), Read::Bytes { offset: 0, bytes: b"tick 1\n".to_vec() });
        assert_eq!(log.read(7, 100, NOW), Read::Bytes { offset: 7, bytes: b"tick 2\n".to_vec() });
        assert_eq!(log.read(14, 100, NOW), Read::Nothing);
        assert_eq!(log.read(15, 100, NOW), Read::Ahead { end: 14 });
        log.close();
        assert_eq!(log.read(14, 100, NOW), Read::Ended { end: 14 });
    }

    #[test]
    fn a_standby_serves_only_once_seeded_and_from_where_the_console_stood() {
        let log = ConsoleLog::pending();
        assert_eq!(log.read(0, 100, NOW), Read::Nothing);
        log.seed(100, b"tick 9\n");
        log.append(b"tick 10\n");
        assert_eq!(log.read(103, 4, NOW), Read::Bytes { offset: 103, bytes: b"k 9\n".to_vec() });
        // Older than what is kept: the reader is told where it resumes.
        assert_eq!(log.read(50, 3, NOW), Read::Bytes { offset: 100, bytes: b"tic".to_vec() });
    }

    #[test]
    fn a_waiting_reader_wakes_on_new_output() {
        let log = ConsoleLog::live();
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                LogWriter::new(io::sink(), log).write_all(b"x").unwrap();
            })
        };
        assert_eq!(log.read(0, 10, Duration::from_secs(10)), Read::Bytes { offset: 0, bytes: b"x".to_vec() });
        writer.join().unwrap();
    }

    #[test]
    fn only_the_latest_output_is_kept() {
        let log = ConsoleLog::live();
        log.append(&vec![b'a'; KEPT_BYTES]);
        log.append(b"bc");
        assert_eq!(log.read(0, 1, NOW), Read::Bytes { offset: 2, bytes: b"a".to_vec() });
        assert_eq!(log.end(), KEPT_BYTES as u64 + 2);
    }
}
