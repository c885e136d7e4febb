//! Where the guest's console output goes.
//!
//! Every byte the guest sends to the outside world passes through an [`OutputSink`].
//! Today the console writes through at once; replication swaps in an [`EpochGate`],
//! which holds each epoch's bytes until the standby has acknowledged that epoch, so
//! nothing the world has seen can be lost by a failover.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::outputs::{EpochOutput, HeldOutput, Released};

/// Receives guest output.
pub trait OutputSink: Send {
    /// Accepts bytes the guest produced.
    fn emit(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Pushes whatever may be released to its destination.
    fn flush(&mut self) -> io::Result<()>;
    /// The next byte is at `offset` in the console's whole output: a VM taken over
    /// continues a console that began on another host.
    fn continue_at(&mut self, _offset: u64) {}
}

/// Releases output as soon as the guest produces it, line by line: the serial port
/// hands over one byte at a time, and a write per byte would cost a syscall each.
pub struct Passthrough<W: Write + Send> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write + Send> Passthrough<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            line: Vec::with_capacity(256),
        }
    }
}

impl<W: Write + Send> OutputSink for Passthrough<W> {
    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.line.extend_from_slice(bytes);
        if bytes.contains(&b'\n') || self.line.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.line.clear();
        }
        self.out.flush()
    }
}

/// Holds output per epoch and releases an epoch's bytes only once it is committed.
/// Unprotected (no standby, and the operator chose to carry on without one), it
/// writes through.
pub struct EpochGate<W: Write + Send> {
    out: W,
    /// Output of epochs not yet committed, oldest first, tagged with their epoch.
    held: VecDeque<(u64, Vec<u8>)>,
    /// Bytes released so far: where the first held byte stands in the whole output.
    released: u64,
    current: u64,
    unprotected: bool,
    /// When each sealed epoch that holds output was sealed, oldest first.
    sealed_at: VecDeque<(u64, Instant)>,
    /// From the seal of the oldest epoch the last commit released to that commit: the
    /// output lag the world saw.
    last_lag: Option<Duration>,
}

impl<W: Write + Send> EpochGate<W> {
    pub fn new(out: W, first_epoch: u64) -> Self {
        Self {
            out,
            held: VecDeque::new(),
            released: 0,
            current: first_epoch,
            unprotected: false,
            sealed_at: VecDeque::new(),
            last_lag: None,
        }
    }

    /// Releases everything held and writes through from now on.
    pub fn unprotect(&mut self) -> io::Result<()> {
        self.unprotected = true;
        self.commit(u64::MAX).map(drop)
    }

    /// Holds output again, as part of `epoch` onwards.
    pub fn protect(&mut self, epoch: u64) {
        self.unprotected = false;
        self.current = epoch;
    }

    /// Output from now on belongs to `epoch` (called while the guest is paused).
    pub fn begin_epoch(&mut self, epoch: u64) {
        self.current = epoch;
    }

    /// Ends epoch `epoch` (called while the guest is paused): everything held from it
    /// on (including output of an earlier attempt at it that was dropped) is its, and
    /// output from now on belongs to the next.
    pub fn seal(&mut self, epoch: u64) {
        let mut merged = Vec::new();
        while self.held.back().is_some_and(|(e, _)| *e >= epoch) {
            if let Some((_, bytes)) = self.held.pop_back() {
                merged.splice(0..0, bytes);
            }
        }
        if !merged.is_empty() {
            self.held.push_back((epoch, merged));
            // An epoch sealed again (its first capture was dropped) keeps its first
            // seal: its output has waited since then.
            if !matches!(self.sealed_at.back(), Some((e, _)) if *e >= epoch) {
                self.sealed_at.push_back((epoch, Instant::now()));
            }
        }
        self.current = epoch + 1;
    }

    /// A copy of the output held for epochs `from..=through`, in order.
    pub fn output(&self, from: u64, through: u64) -> Vec<u8> {
        self.output_at(from, through).1
    }

    /// The output held for epochs `from..=through`, and where its first byte stands in
    /// the whole output since the guest started.
    pub fn output_at(&self, from: u64, through: u64) -> (u64, Vec<u8>) {
        let before: usize = self.held.iter().take_while(|(e, _)| *e < from).map(|(_, b)| b.len()).sum();
        let bytes = self
            .held
            .iter()
            .filter(|(e, _)| (from..=through).contains(e))
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        (self.released + before as u64, bytes)
    }

    /// Releases all output of epochs up to and including `epoch`; returns how many
    /// bytes went out.
    pub fn commit(&mut self, epoch: u64) -> io::Result<usize> {
        let mut released = 0;
        while self.held.front().is_some_and(|(e, _)| *e <= epoch) {
            if let Some((_, bytes)) = self.held.pop_front() {
                self.out.write_all(&bytes)?;
                released += bytes.len();
                self.released += bytes.len() as u64;
            }
        }
        self.out.flush()?;
        let mut oldest = None;
        while self.sealed_at.front().is_some_and(|(e, _)| *e <= epoch) {
            let at = self.sealed_at.pop_front().map(|(_, at)| at);
            oldest = oldest.or(at);
        }
        self.last_lag = oldest.filter(|_| released > 0).map(|at| at.elapsed());
        Ok(released)
    }

    /// How long the output the last commit released had waited since its epoch was
    /// sealed (the oldest, if it released several); `None` if it released nothing.
    pub fn last_lag(&self) -> Option<Duration> {
        self.last_lag
    }

    /// Whether the guest has written output since the last seal: output that waits for
    /// the next epoch to be cut before it can even start on its way out.
    pub fn waiting_for_epoch(&self) -> bool {
        !self.unprotected && self.held.back().is_some_and(|(e, _)| *e >= self.current)
    }

    /// Bytes still held back.
    pub fn held_bytes(&self) -> usize {
        self.held.iter().map(|(_, b)| b.len()).sum()
    }
}

impl<W: Write + Send> OutputSink for EpochGate<W> {
    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.unprotected {
            self.out.write_all(bytes)?;
            self.released += bytes.len() as u64;
            if bytes.contains(&b'\n') {
                self.out.flush()?;
            }
            return Ok(());
        }
        match self.held.back_mut() {
            Some((epoch, buf)) if *epoch == self.current => buf.extend_from_slice(bytes),
            _ => self.held.push_back((self.current, bytes.to_vec())),
        }
        Ok(())
    }

    /// Nothing held is released by a flush: only a commit releases output.
    fn flush(&mut self) -> io::Result<()> {
        if self.unprotected {
            self.out.flush()?;
        }
        Ok(())
    }

    /// Offsets the gate hands a standby (with each epoch's output) count from there.
    fn continue_at(&mut self, offset: u64) {
        if self.held.is_empty() {
            self.released = offset;
        }
    }
}

/// The console's gate as one of the VM's [`EpochOutput`]s, shared with the serial
/// port that writes into it.
pub struct HeldConsole<W: Write + Send>(pub Arc<Mutex<EpochGate<W>>>);

impl<W: Write + Send> HeldConsole<W> {
    fn gate(&self) -> std::sync::MutexGuard<'_, EpochGate<W>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<W: Write + Send + 'static> EpochOutput for HeldConsole<W> {
    fn protect(&self, epoch: u64) {
        self.gate().protect(epoch)
    }

    fn unprotect(&self) -> io::Result<()> {
        self.gate().unprotect()
    }

    fn seal(&self, epoch: u64) {
        self.gate().seal(epoch)
    }

    fn commit(&self, epoch: u64) -> io::Result<Released> {
        let mut gate = self.gate();
        let bytes = gate.commit(epoch)?;
        Ok(Released { bytes, frames: 0, lag: gate.last_lag() })
    }

    fn held(&self, from: u64, through: u64) -> Vec<HeldOutput> {
        let (offset, bytes) = self.gate().output_at(from, through);
        vec![HeldOutput::Console { offset, bytes }]
    }

    fn waiting_for_epoch(&self) -> bool {
        self.gate().waiting_for_epoch()
    }

    fn held_bytes(&self) -> usize {
        self.gate().held_bytes()
    }
}

/// A sink shared between the device that produces output and whoever drives releases.
pub type SharedSink = Arc<Mutex<dyn OutputSink>>;

/// Adapts a [`SharedSink`] to `io::Write` for devices that want a writer.
pub struct SinkWriter(pub SharedSink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sink = self.0.lock().map_err(|_| io::Error::other("output sink poisoned"))?;
        sink.emit(buf)?;
        Ok(buf.len())
    }

    /// The serial device flushes after every byte; line buffering is the sink's business.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn passthrough_releases_whole_lines() {
        let cap = Capture::default();
        let mut sink = Passthrough::new(cap.clone());
        sink.emit(b"tick ").unwrap();
        assert!(cap.0.lock().unwrap().is_empty());
        sink.emit(b"1\n").unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"tick 1\n");
        sink.emit(b"# ").unwrap();
        sink.flush().unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"tick 1\n# ");
    }

    #[test]
    fn epoch_gate_releases_only_committed_epochs_in_order() {
        let cap = Capture::default();
        let mut gate = EpochGate::new(cap.clone(), 1);
        gate.emit(b"a").unwrap();
        gate.begin_epoch(2);
        gate.emit(b"b").unwrap();
        gate.emit(b"c").unwrap();
        gate.begin_epoch(3);
        gate.emit(b"d").unwrap();
        gate.flush().unwrap();
        assert!(cap.0.lock().unwrap().is_empty(), "flush must not release");
        gate.commit(2).unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"abc");
        assert_eq!(gate.held_bytes(), 1);
        gate.commit(3).unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"abcd");
    }

    #[test]
    fn output_waits_for_an_epoch_from_its_first_byte_to_the_next_seal() {
        let mut gate = EpochGate::new(Capture::default(), 1);
        assert!(!gate.waiting_for_epoch());
        gate.emit(b"a").unwrap();
        assert!(gate.waiting_for_epoch());
        gate.seal(1);
        assert!(!gate.waiting_for_epoch(), "sealed output waits for a commit, not an epoch");
        gate.emit(b"b").unwrap();
        gate.unprotect().unwrap();
        assert!(!gate.waiting_for_epoch(), "unprotected output waits for nothing");
    }

    #[test]
    fn a_commit_tells_how_long_the_oldest_output_it_released_waited() {
        let mut gate = EpochGate::new(Capture::default(), 1);
        gate.emit(b"a").unwrap();
        gate.seal(1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        gate.seal(2);
        gate.commit(2).unwrap();
        assert!(gate.last_lag().is_some_and(|lag| lag >= std::time::Duration::from_millis(20)));
        gate.seal(3);
        gate.commit(3).unwrap();
        assert_eq!(gate.last_lag(), None, "nothing released");
    }

    #[test]
    fn a_sealed_epoch_owns_everything_since_the_last_one() {
        let cap = Capture::default();
        let mut gate = EpochGate::new(cap.clone(), 1);
        gate.emit(b"a").unwrap();
        gate.seal(1);
        gate.emit(b"b").unwrap();
        // An attempt at epoch 2 that was dropped, then epoch 2 again.
        gate.seal(2);
        gate.emit(b"c").unwrap();
        gate.seal(2);
        gate.emit(b"d").unwrap();
        assert_eq!(gate.output_at(2, 2), (1, b"bc".to_vec()));
        assert_eq!(gate.output_at(0, 2), (0, b"abc".to_vec()));
        gate.commit(2).unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"abc");
        assert_eq!(gate.output_at(0, 3), (3, b"d".to_vec()));
    }

    #[test]
    fn an_unprotected_gate_releases_everything_and_writes_through_until_protected() {
        let cap = Capture::default();
        let mut gate = EpochGate::new(cap.clone(), 1);
        gate.emit(b"a").unwrap();
        gate.unprotect().unwrap();
        gate.emit(b"b").unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"ab");
        gate.protect(7);
        gate.emit(b"c").unwrap();
        gate.commit(6).unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"ab");
        gate.commit(7).unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"abc");
    }
}
