//! The primary's epoch loop, on the VM thread. Every epoch: pause the vCPUs, seal the
//! devices' held output, take the dirty pages and the machine state into a staging
//! buffer, resume, and queue the epoch for the link thread, which streams it while the
//! guest runs on. An epoch's output (console bytes, NIC frames) is released only when
//! the standby has acknowledged that epoch, so nothing the world has seen is missing
//! from the state the standby would take over from.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_proto::buffers::{self, GiveBack};
use tandem_proto::epoch::Epoch;
use tandem_proto::handshake::Identity;
use tandem_proto::message::EpochKind;
use tandem_proto::primary::Primary;
use tandem_proto::role::primary::{Mode, PrimaryRole};
use tandem_proto::sent::{Pending, SentPages, Skipped};
use tandem_proto::verify::{self, Rotation, Verify};
use tandem_vmm::devices::outputs::{EpochOutput, HeldOutput, Outputs};
use tandem_vmm::output::{EpochGate, HeldConsole, SharedSink};
use tandem_vmm::slice::SliceReader;
use tandem_vmm::snapshot::{codec, Kind, SnapshotError};
use tandem_vmm::vm::{is_transient, Vm};

use crate::events::{Event, Events};
use crate::transport::primary::{self as transport, Dial, Faults, Outbox, Outgoing, Tell};
use crate::witness::{WitnessClient, WitnessLink};
use crate::{Heartbeat, ReplicationError};

mod link;
mod role;
mod status;

use link::{LinkState, LinkView};

/// What the primary does when its standby falls silent past the heartbeat timeout.
pub use tandem_proto::role::primary::Policy as StandbyLoss;

pub struct Config {
    pub standby: SocketAddr,
    pub tls: rustls::ClientConfig,
    pub identity: Identity,
    /// Time between the starts of two epochs while the guest has output waiting.
    pub epoch: Duration,
    /// Time between the starts of two epochs while it has none: no one waits for such
    /// an epoch, and a longer one sends a page the guest keeps writing once rather than
    /// at every epoch, and write-protects it less often.
    pub quiet_epoch: Duration,
    /// Epochs in flight before the next one waits for an ack.
    pub window: usize,
    /// Every this many epochs (0: never), a slice of `verify_pages` pages goes with
    /// the epoch for the standby to check its image against (see
    /// `tandem_proto::verify`).
    pub verify_every: u32,
    pub verify_pages: u32,
    pub heartbeat: Heartbeat,
    pub on_standby_loss: StandbyLoss,
    /// With a witness, `Continue` runs on only while the witness leases it the time.
    pub witness: Option<WitnessLink>,
    /// How long to try to reach the standby before giving up at start.
    pub connect_timeout: Duration,
    pub faults: Faults,
    pub events: Events,
}

/// The console's output gate, shared with the serial port that writes into it.
pub type Gate = Arc<Mutex<EpochGate<Box<dyn Write + Send>>>>;

/// A vCPU that keeps failing to stop or to hand over its state is not slow but stuck:
/// past this many captures given up in a row, the primary stops.
const MAX_SKIPPED_IN_A_ROW: u32 = 20;

/// Figures for `tandem ctl status` and the logs.
#[derive(Default)]
struct Stats {
    epochs: u64,
    bytes: u64,
    last_pages: usize,
    last_bytes: usize,
    /// Stopped time of the latest epochs, newest last.
    stopped: Vec<Duration>,
    /// Epochs that waited because the standby was `window` epochs behind.
    stretched: u64,
    /// Dirty pages not sent because the standby already held them as they were.
    unchanged: u64,
}

pub struct Protector {
    /// What the link thread has told of the standby.
    link: LinkView,
    outbox: Outbox,
    /// Lets the link thread wake the VM thread, once there is a VM.
    waker: Arc<OnceLock<tandem_vmm::vcpu::Waker>>,
    /// What the guest sends the world, held per epoch: the console's output from the
    /// start, the NICs' frames once [`Protector::attach`] has the VM.
    outputs: Outputs,
    epoch: Duration,
    quiet_epoch: Duration,
    standby: SocketAddr,
    /// The standby-loss policy and the witness's lease: what to do, decided without
    /// I/O; this side carries it out.
    role: PrimaryRole,
    witness: Option<WitnessClient>,
    /// The role's clock starts here.
    zero: Instant,
    /// How the standby was lost and how long it had been silent, for the log.
    lost: (String, Duration),
    /// When the latest epoch began: the next is due `epoch` later if the guest has
    /// output waiting, else `quiet_epoch` later.
    last_start: Instant,
    /// Whether the epoch now due is already counted as waiting for the standby.
    waiting: bool,
    /// Whether the standby's first ack after a full sync has been announced.
    announced: bool,
    /// The latest full epoch sent.
    full_epoch: u64,
    /// Captures given up in a row on a slow vCPU (see `is_transient`).
    skipped: u32,
    /// What the standby holds, for the connection `sent_conn`.
    sent: SentPages,
    sent_conn: u64,
    /// Staging buffers come back here once the frames that carried their pages are
    /// gone (acknowledged and sent), for the VM to copy later deltas into.
    give_back: GiveBack,
    returned: mpsc::Receiver<Vec<u8>>,
    stats: Stats,
    events: Events,
    /// Where replica checks go next, and how to read a slice of the guest; set by
    /// [`Protector::attach`].
    rotation: Rotation,
    slices: Option<SliceReader>,
    verify_every: u32,
    verify_pages: u32,
    /// The roles this host had before, for `ctl status`.
    history: String,
    /// Epochs sent that carried NIC frames, and the one to die in the middle of (a
    /// fault injected for tests).
    frame_epochs: u64,
    die_mid_frames_epoch: Option<u64>,
}

impl Protector {
    /// Reaches the standby and passes the handshake, before any guest runs; returns the
    /// protector and the sink the VM's console must write to.
    pub fn start(config: Config, out: Box<dyn Write + Send>) -> Result<(Self, SharedSink), ReplicationError> {
        let gate: Gate = Arc::new(Mutex::new(EpochGate::new(out, 1)));
        let connect_timeout = config.connect_timeout;
        let addr = config.standby;
        let mut protector = Self::spawn(config, gate.clone(), Mode::Protected)?;
        match protector.link.wait_while(connect_timeout, |l| matches!(l, LinkState::Connecting { .. })) {
            LinkState::Protecting => {}
            LinkState::Refused(why) => return Err(ReplicationError::Refused(why)),
            LinkState::Left => return Err(ReplicationError::NoStandby(format!("the standby at {addr} left at once"))),
            LinkState::Connecting { why } => {
                return Err(ReplicationError::NoStandby(format!(
                    "no standby answered at {addr} within {} s{}",
                    connect_timeout.as_secs(),
                    why.map(|w| format!(" (last attempt: {w})")).unwrap_or_default()
                )));
            }
        }
        let sink: SharedSink = gate;
        Ok((protector, sink))
    }

    /// Protects a VM that already runs unprotected (one this host took over), writing
    /// its console through `gate`, as soon as a standby answers at `config.standby`:
    /// until then output goes out at once, and the guest runs on. The first standby to
    /// answer gets a full sync, and from its acknowledgement on output is held again.
    pub fn start_unprotected(config: Config, gate: Gate) -> Result<Self, ReplicationError> {
        gate.lock().unwrap_or_else(|e| e.into_inner()).unprotect().map_err(|e| ReplicationError::NoStandby(format!("console output: {e}")))?;
        Self::spawn(config, gate, Mode::Unprotected)
    }

    fn spawn(config: Config, gate: Gate, mode: Mode) -> Result<Self, ReplicationError> {
        let generation = config.identity.generation;
        let machine = Primary::new(config.identity, config.window);
        let (tell, told) = mpsc::channel();
        let (give_back, returned) = buffers::returned();
        let waker = Arc::new(OnceLock::new());
        let link = LinkView::new(told, machine.tickets(), config.window);
        let outputs = Outputs::default();
        outputs.add(Arc::new(HeldConsole(gate)));
        let release = {
            let (outputs, events) = (outputs.clone(), config.events.clone());
            Box::new(move |epoch: u64| match outputs.commit(epoch) {
                Ok(released) if released.bytes > 0 || released.frames > 0 => {
                    let lag_ms = released.lag.map_or(0.0, |d| d.as_secs_f64() * 1e3);
                    events.emit(Event::Released { epoch, bytes: released.bytes, lag_ms, frames: released.frames })
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("releasing the guest's output: {e}"),
            })
        };
        let dial = Dial {
            addr: config.standby,
            tls: config.tls,
            heartbeat: config.heartbeat,
            faults: config.faults,
            events: config.events.clone(),
        };
        let outbox = transport::spawn(dial, machine, Tell::new(tell, waker.clone()), release)?;
        // Only a primary that may run on without its standby asks the witness anything.
        let witness = match config.on_standby_loss {
            StandbyLoss::Continue => match config.witness {
                Some(link) => {
                    let waker = waker.clone();
                    Some(WitnessClient::start(link, Box::new(move || if let Some(w) = waker.get() { w.wake() }))?)
                }
                None => None,
            },
            StandbyLoss::Pause => None,
        };
        let retry = config.heartbeat.interval * 5;
        Ok(Self {
            role: PrimaryRole::new(
                config.on_standby_loss,
                witness.is_some(),
                generation,
                retry,
                config.heartbeat.timeout,
                mode == Mode::Unprotected,
            ),
            witness,
            zero: Instant::now(),
            lost: (String::new(), Duration::ZERO),
            link,
            outbox,
            waker,
            outputs,
            epoch: config.epoch,
            quiet_epoch: config.quiet_epoch.max(config.epoch),
            standby: config.standby,
            last_start: Instant::now(),
            waiting: false,
            announced: false,
            full_epoch: 0,
            skipped: 0,
            sent: SentPages::default(),
            sent_conn: 0,
            give_back,
            returned,
            stats: Stats::default(),
            events: config.events,
            rotation: Rotation::default(),
            slices: None,
            verify_every: config.verify_every,
            verify_pages: config.verify_pages,
            history: String::new(),
            frame_epochs: 0,
            die_mid_frames_epoch: config.faults.die_mid_frames_epoch,
        })
    }

    /// How this host came to be the primary, for `ctl status` (`standby@1,primary@2`).
    pub fn set_history(&mut self, history: String) {
        self.history = history;
    }

    /// Lets the link thread end the VM thread's wait as soon as an ack or a change of
    /// the link arrives, so that waiting for the standby costs no polling.
    /// Also holds the output of the VM's devices from the next epoch on, and reads
    /// the slices replica checks cover through `slices`.
    pub fn attach(&mut self, waker: tandem_vmm::vcpu::Waker, devices: Vec<Arc<dyn EpochOutput>>, slices: SliceReader) {
        self.rotation = Rotation::new(slices.spans());
        self.slices = Some(slices);
        // Set once: a VM is attached once.
        let _ = self.waker.set(waker);
        let next = self.link.next_epoch;
        for output in devices {
            // Unprotected, they pass output through until a standby is in sync.
            if self.role.mode() == Mode::Protected {
                output.protect(next);
            }
            self.outputs.add(output);
        }
    }

    /// How long the VM thread may wait before calling [`Protector::poll`] again: until
    /// the next epoch is due if it could go now, else (an ack awaited, no standby) a
    /// whole epoch, as the link and the witness client wake the thread at each change
    /// (see [`Protector::attach`]); and no later than the role's next deadline (the
    /// standby's silence judged lost, a lease to renew or lapsing).
    pub fn next_wait(&self) -> Duration {
        let ready = self.link.state == LinkState::Protecting && (self.link.need_full || self.link.can_send());
        let wait = if ready { self.next_due().saturating_duration_since(Instant::now()).min(self.epoch) } else { self.epoch };
        match self.role.next_timeout() {
            Some(due) => wait.min(due.saturating_sub(self.zero.elapsed())),
            None => wait,
        }
    }

    /// Output cuts an epoch short: it is the only thing that waits on one.
    fn next_due(&self) -> Instant {
        self.last_start + if self.outputs.waiting_for_epoch() { self.epoch } else { self.quiet_epoch }
    }

    /// Does whatever is due: an epoch, a full sync for a new standby, or the
    /// standby-loss policy. An error means the VM must stop: the standby refused this
    /// primary, which happens only when another has taken its place.
    pub fn poll(&mut self, vm: &mut Vm) -> Result<(), ReplicationError> {
        self.link.drain();
        let l = &self.link;
        let (state, need_full, quiet, can_send, acked) = (l.state.clone(), l.need_full, l.heard.elapsed(), l.can_send(), l.acked);
        if let (false, Some(epoch), LinkState::Protecting) = (self.announced, acked.filter(|a| *a >= self.full_epoch), &state) {
            self.announced = true;
            tracing::info!("protected: the standby holds epoch {epoch}; output flows as epochs are acknowledged");
            self.events.emit(Event::Protected { epoch });
        }
        let now = self.zero.elapsed();
        if let Some(reply) = self.witness.as_ref().and_then(|w| w.reply()) {
            self.role.handle_witness(reply.answer, reply.asked.saturating_duration_since(self.zero), now);
        }
        self.role.handle_timeout(now);
        self.carry_out(vm)?;
        match state {
            LinkState::Refused(why) => Err(ReplicationError::Refused(why)),
            LinkState::Left => Ok(()),
            LinkState::Protecting => {
                if need_full {
                    self.role.handle_standby_following();
                    self.carry_out(vm)?;
                    return self.send(vm, Kind::Full);
                }
                // The same standby came back holding what it held: carry on.
                self.role.handle_standby_in_sync();
                self.carry_out(vm)?;
                if Instant::now() < self.next_due() {
                    return Ok(());
                }
                if !can_send {
                    if !self.waiting {
                        self.waiting = true;
                        self.stats.stretched += 1;
                        tracing::debug!("the standby is behind: the epoch waits for an ack");
                    }
                    return Ok(());
                }
                self.send(vm, Kind::Delta)
            }
            LinkState::Connecting { why } => {
                // The role judges the standby lost once silent past the timeout.
                if self.role.mode() == Mode::Protected {
                    self.lost = (why.unwrap_or_else(|| "no answer".into()), quiet);
                    self.role.handle_link_down(self.link.heard.saturating_duration_since(self.zero), now);
                    self.carry_out(vm)?;
                }
                Ok(())
            }
        }
    }

    /// Captures an epoch and queues it. If the standby changed meanwhile (it went, or
    /// came back needing a full epoch), the capture is dropped and its pages are handed
    /// back for the next one.
    fn send(&mut self, vm: &mut Vm, kind: Kind) -> Result<(), ReplicationError> {
        let (number, conn) = (self.link.next_epoch, self.link.conn);
        let started = Instant::now();
        self.last_start = started;
        self.waiting = false;
        let outputs = self.outputs.clone();
        let check = match &self.slices {
            Some(slices) if self.verify_every > 0 && number % u64::from(self.verify_every) == 0 => {
                self.rotation.next(self.verify_pages).map(|slice| (slices.clone(), slice))
            }
            _ => None,
        };
        let mut copied = None;
        // Output from here on belongs to the next epoch: this one's state covers what
        // the guest printed and sent until now. The slice to check is copied here,
        // paused, so it is the guest of this very instant; digested after the pause.
        let mut fence = || {
            outputs.seal(number);
            if let Some((slices, (first, pages))) = &check {
                copied = Some((*first, *pages, slices.read(*first, *pages)));
            }
        };
        while let Ok(buffer) = self.returned.try_recv() {
            vm.recycle(buffer);
        }
        let (snap, taken, stopped) = match vm.capture_fenced(kind, &mut fence) {
            Ok(captured) => captured,
            // The guest ran on and nothing was taken: the next epoch tries again.
            Err(e) if is_transient(&e) && self.skipped < MAX_SKIPPED_IN_A_ROW => {
                self.skipped += 1;
                tracing::warn!("epoch {number} skipped: {e}");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.skipped = 0;
        // The standby gets the output the epoch covers, to print itself should it take
        // over before this primary has released it. A full epoch carries all output
        // not yet released: the standby holds no epoch before it.
        let from = if kind == Kind::Full { 0 } else { number };
        let held = self.outputs.held(from, number);
        let state = match codec::encode(&snap.state) {
            Ok(state) => state,
            Err(e) => {
                vm.give_back_dirty(&taken);
                return Err(SnapshotError::from(e).into());
            }
        };
        // What the standby holds is known only for the connection it was learnt on.
        if self.sent_conn != conn {
            self.sent.forget();
            self.sent_conn = conn;
        }
        let (mut addresses, mut data, mut page_crcs) = (snap.pages, snap.data, snap.page_crcs);
        let (unchanged, pending): (Skipped, Pending) = match kind {
            Kind::Full => (Skipped::default(), SentPages::full(&addresses, &data)),
            _ => self.sent.skip_unchanged(&mut addresses, &mut data, &mut page_crcs),
        };
        let (pages, bytes) = (addresses.len(), data.len() + state.len());
        let proto_kind = if kind == Kind::Full { EpochKind::Full } else { EpochKind::Delta };
        // The link may have changed during the capture. An epoch handed over anyway
        // would be kept (or dropped for a full one) by the link thread, but one that
        // can be sent again with the next is cheaper not encoded at all.
        self.link.drain();
        let l = &self.link;
        if l.conn != conn || l.state != LinkState::Protecting || (kind != Kind::Full && l.need_full) {
            vm.give_back_dirty(&taken);
            return Ok(());
        }
        let ticket = self.link.ticket();
        let verify = match copied {
            Some((first, pages, Ok(bytes))) => Some(Verify { first, pages, digest: verify::digest(&bytes) }),
            Some((first, _, Err(e))) => {
                tracing::warn!("no replica check at epoch {number}: reading {first:#x}: {e}");
                None
            }
            None => None,
        };
        let mut epoch = Epoch { kind: Some(proto_kind), addresses, data, page_crcs, state, verify, ..Epoch::default() };
        carry(&mut epoch, held);
        let frame_count = epoch.frames.len();
        let encoded = match ticket.encode(&mut epoch, Some(&self.give_back)) {
            Ok(encoded) => encoded,
            Err(e) => {
                vm.give_back_dirty(&taken);
                return Err(e.into());
            }
        };
        let wire = encoded.wire_bytes();
        // Handed over whatever the link does meanwhile: from here the epoch is the
        // link thread's to send, keep for the next standby, or drop for a full one,
        // and its pages are not the VM's to send again.
        self.link.handed(kind == Kind::Full);
        if frame_count > 0 {
            self.frame_epochs += 1;
        }
        let die_mid = frame_count > 0 && self.die_mid_frames_epoch == Some(self.frame_epochs);
        self.outbox.send(Outgoing::Epoch { encoded, die_mid });
        self.sent.record(pending);
        tracing::debug!(epoch = number, pages, unchanged = unchanged.pages, frames = frame_count, bytes, wire, stopped_us = stopped.as_micros() as u64, "epoch queued");
        let stats = &mut self.stats;
        stats.unchanged += unchanged.pages as u64;
        stats.epochs += 1;
        stats.bytes += bytes as u64;
        stats.last_pages = pages;
        stats.last_bytes = bytes;
        stats.stopped.push(stopped);
        let excess = stats.stopped.len().saturating_sub(1024);
        stats.stopped.drain(..excess);
        if kind == Kind::Full {
            self.announced = false;
            self.full_epoch = number;
            self.events.emit(Event::FullSync { epoch: number, pages });
            tracing::info!(
                "full sync to the standby: epoch {number}, {pages} pages, guest stopped {:.1} ms (of {:.0} ms)",
                stopped.as_secs_f64() * 1e3,
                started.elapsed().as_secs_f64() * 1e3
            );
            // A guest paused for a lost standby runs again: the new standby has all it
            // needs on its way, and output is held until it acknowledges.
            self.role.handle_standby_in_sync();
            self.carry_out(vm)?;
        }
        Ok(())
    }

    /// The guest has stopped: says goodbye so the standby does not take over, and
    /// releases the last output once the standby has the goodbye. Without that
    /// confirmation the output stays unreleased: the standby might still take over and
    /// print it again.
    /// Returns whether all output was released.
    pub fn finish(mut self, reason: &str) -> bool {
        self.link.drain();
        let protecting = self.link.state == LinkState::Protecting;
        if self.role.mode() == Mode::Unprotected {
            return self.outputs.commit(u64::MAX).is_ok();
        }
        if !protecting {
            let held = self.outputs.held_bytes();
            if held > 0 {
                tracing::warn!("{held} bytes of the guest's last output were not released: no standby confirmed them");
            }
            self.events.emit(Event::Goodbye { confirmed: false });
            return false;
        }
        self.outbox.send(Outgoing::Goodbye(reason.to_string()));
        // The goodbye goes out after every epoch queued before it, which can take a
        // while on a slow link; a standby that dies meanwhile shows as a lost link.
        if self.link.wait_while(Duration::from_secs(120), |l| *l == LinkState::Protecting) == LinkState::Left {
            let released = self.outputs.commit(u64::MAX).is_ok();
            self.events.emit(Event::Goodbye { confirmed: true });
            return released;
        }
        tracing::warn!("the standby did not confirm the goodbye; the guest's last output stays unreleased");
        self.events.emit(Event::Goodbye { confirmed: false });
        false
    }
}

/// Puts what the devices hold for the epoch into it, as the protocol carries it.
fn carry(epoch: &mut Epoch, held: Vec<HeldOutput>) {
    for output in held {
        match output {
            HeldOutput::Console { offset, bytes } => {
                epoch.output_offset = offset;
                epoch.output = bytes;
            }
            HeldOutput::Frames { nic, frames } => epoch.frames.extend(frames.into_iter().map(|f| (nic, f))),
        }
    }
}
