//! The primary's connection to its standby, on a thread of its own that owns the
//! protocol machine: dial (and dial again after any loss), hand every frame to the
//! machine, keep and send the epochs the VM thread hands over, beat the heart, notice
//! a silent standby, and tell the VM thread what happened ([`LinkEvent`]). Reading and
//! writing run side by side, so a long epoch on the way out never hides the standby's
//! heartbeats.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::liveness::{Liveness, Verdict};
use tandem_proto::message::Message;
use tandem_proto::primary::{Encoded, Event, Primary, Queued};
use tandem_proto::{Frame, ProtoError};
use tandem_vmm::vcpu::Waker;
use tokio::sync::mpsc;

use super::{connect, LinkSender, TransportError};
use crate::events::{self as ev, Events};
use crate::Heartbeat;

/// What the link thread tells the VM thread, in order. The protocol machine lives on
/// the link thread; the VM thread keeps its own view of the link from these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A standby follows (a new connection); with `full_sync` it needs a full epoch
    /// before any delta, and every epoch queued before is moot.
    Following { full_sync: bool },
    /// The standby holds every epoch up to this one, and its output has been released.
    Released(u64),
    /// The connection was lost (the link dials again); the standby was last heard at
    /// `heard`.
    Down { why: String, heard: Instant },
    /// The standby turned this primary down; nothing will change that.
    Refused(String),
    /// The goodbye went out and the standby closed the connection.
    Left,
}

/// The link thread's way to the VM thread: the events, and a wake-up for a VM thread
/// that waits in its VM's loop.
#[derive(Clone)]
pub struct Tell {
    events: Sender<LinkEvent>,
    /// Set once, when the VM exists.
    waker: Arc<OnceLock<Waker>>,
}

impl Tell {
    pub fn new(events: Sender<LinkEvent>, waker: Arc<OnceLock<Waker>>) -> Self {
        Self { events, waker }
    }

    fn tell(&self, event: LinkEvent) {
        // A VM thread that is gone needs telling nothing.
        let _ = self.events.send(event);
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }
}

/// Faults the primary injects on purpose, for tests of what the standby does with them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// SIGKILL this process halfway through sending this epoch.
    pub die_mid_epoch: Option<u64>,
    /// The same, in the Nth epoch that carries frames from the guest's NICs: a kill
    /// mid-epoch while the guest's network is busy.
    pub die_mid_frames_epoch: Option<u64>,
    /// Flip a byte in the middle of this epoch's frames, the first time it is sent.
    pub corrupt_epoch: Option<u64>,
    /// Claim this protocol version in the hello.
    pub protocol_version: Option<u16>,
}

/// What the VM thread hands the link thread.
pub enum Outgoing {
    /// The next epoch, numbered after the one before whatever became of the
    /// connection. `die_mid`: a fault to inject, SIGKILL halfway through sending it.
    Epoch { encoded: Encoded, die_mid: bool },
    /// Say goodbye, finish the stream and stop.
    Goodbye(String),
}

/// The VM thread's end of the queue to the link thread.
pub struct Outbox(mpsc::UnboundedSender<Outgoing>);

impl Outbox {
    /// Queues `out`; false once the link thread has stopped.
    pub fn send(&self, out: Outgoing) -> bool {
        self.0.send(out).is_ok()
    }
}

pub struct Dial {
    pub addr: SocketAddr,
    pub tls: rustls::ClientConfig,
    pub heartbeat: Heartbeat,
    pub faults: Faults,
    pub events: Events,
}

/// Starts the link thread, which owns `machine` from here on. `release(epoch)` is
/// called there as soon as the standby holds every epoch up to `epoch`, before the
/// VM thread hears of it.
pub fn spawn(dial: Dial, machine: Primary, tell: Tell, release: Box<dyn Fn(u64) + Send>) -> Result<Outbox, TransportError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TransportError::Tls(format!("cannot start the network runtime: {e}")))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let liveness = Liveness::new(Duration::ZERO, dial.heartbeat.interval, dial.heartbeat.timeout);
    let link = Link { machine: RefCell::new(machine), liveness: RefCell::new(liveness), zero: Instant::now(), tell, release };
    std::thread::Builder::new()
        .name("tandem-link".into())
        .spawn(move || runtime.block_on(run(dial, link, rx)))
        .map_err(|e| TransportError::Tls(format!("cannot start the network thread: {e}")))?;
    Ok(Outbox(tx))
}

/// What the link thread holds: the connection's futures (reading, writing, beating)
/// run on its one thread and share it without a lock.
struct Link {
    machine: RefCell<Primary>,
    /// Whether the standby lives: when it was last heard from, on any connection.
    liveness: RefCell<Liveness>,
    /// The liveness's clock starts here.
    zero: Instant,
    tell: Tell,
    release: Box<dyn Fn(u64) + Send>,
}

impl Link {
    /// Hands the machine an epoch from the VM thread; whether to send it now.
    fn queue(&self, encoded: Encoded) -> bool {
        let number = encoded.number;
        match self.machine.borrow_mut().queue(encoded) {
            Ok(Queued::Send) => true,
            Ok(Queued::Kept | Queued::Moot) => false,
            Err(e) => {
                tracing::error!("epoch {number} not kept: {e}");
                false
            }
        }
    }

    fn generation(&self) -> u64 {
        self.machine.borrow().generation()
    }

    fn now(&self) -> Duration {
        self.zero.elapsed()
    }

    fn heard(&self) {
        self.liveness.borrow_mut().heard(self.now());
    }
}

/// What the reader hands the writer, in order.
enum Reply {
    Frame(Frame),
    /// An epoch sent again after a reconnection.
    Frames(Arc<Vec<Bytes>>),
    /// Release this epoch's output, then tell the standby.
    Release(u64),
}

/// How a connection ended.
enum End {
    Lost(String),
    Refused(String),
    Left,
}

async fn run(dial: Dial, link: Link, mut outbox: mpsc::UnboundedReceiver<Outgoing>) {
    tokio::spawn(super::watch_stalls("primary"));
    let mut corrupt = dial.faults.corrupt_epoch;
    loop {
        let end = match connect(dial.addr, dial.tls.clone()).await {
            Ok(conn) => {
                let (tx, rx) = conn.split();
                session(&dial, &link, tx, rx, &mut outbox, &mut corrupt).await
            }
            Err(e) => ended(e),
        };
        if settle(&link, end) {
            return;
        }
        // Between connections epochs still come: the machine keeps them for the next
        // standby. A goodbye queued while no standby was there ends the thread.
        while let Ok(out) = outbox.try_recv() {
            match out {
                Outgoing::Epoch { encoded, .. } => {
                    link.queue(encoded);
                }
                Outgoing::Goodbye(_) => {
                    link.tell.tell(LinkEvent::Left);
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a transport error ends a connection: a TLS refusal, which no retry can mend,
/// or a loss.
fn ended(e: TransportError) -> End {
    // The standby closes the connection this way once it has read the goodbye, and any
    // of the connection's readers (the stream, the heartbeats) may be the first to
    // hear of it.
    if e.is_goodbye_received() {
        return End::Left;
    }
    match e.tls_refusal() {
        Some(r) if r.by_peer => End::Refused(format!("TLS: the standby refused this primary's certificate: {}", r.reason)),
        Some(r) => End::Refused(format!("TLS: this primary refused the standby's certificate: {}", r.reason)),
        None => End::Lost(e.to_string()),
    }
}

/// Tells the VM thread how a connection ended; true when the link thread must stop.
fn settle(link: &Link, end: End) -> bool {
    link.machine.borrow_mut().disconnect();
    let (event, stop) = match end {
        End::Lost(why) => (LinkEvent::Down { why, heard: link.zero + link.liveness.borrow().heard_at() }, false),
        End::Refused(why) => (LinkEvent::Refused(why), true),
        End::Left => (LinkEvent::Left, true),
    };
    link.tell.tell(event);
    stop
}

async fn session(
    dial: &Dial,
    link: &Link,
    mut tx: LinkSender,
    mut rx: super::LinkReceiver,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    corrupt: &mut Option<u64>,
) -> End {
    let mut hello = link.machine.borrow_mut().connect();
    if let (Some(v), Message::Hello { version, .. }) = (dial.faults.protocol_version, &mut hello.message) {
        *version = v;
    }
    if let Err(e) = tx.send(&hello).await {
        return ended(e);
    }
    // Frames the protocol machine answers with, sent before anything queued later.
    let (replies_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
    link.liveness.borrow_mut().opened(link.now());

    let pulse = tx.pulse();
    let reader = async {
        loop {
            let deadline = link.zero + link.liveness.borrow().deadline();
            let frame = tokio::select! {
                got = rx.recv() => got,
                beat = pulse.recv() => {
                    match beat {
                        Ok(Frame { message: Message::Heartbeat { .. }, .. }) => link.heard(),
                        Ok(_) => return End::Lost("the standby sent a datagram that is not a heartbeat".into()),
                        Err(e) => return ended(e),
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let due = deadline.saturating_duration_since(link.zero);
                    match link.liveness.borrow_mut().check(due, link.now(), pulse.packets_in()) {
                        Verdict::Alive => continue,
                        Verdict::Silent(quiet) => {
                            tracing::debug!(packets_in = pulse.packets_in(), "no packet from the standby since the last check");
                            return End::Lost(format!("the standby has been silent for {} ms", quiet.as_millis()));
                        }
                    }
                }
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => return End::Lost("the standby closed the connection".into()),
                Err(e) => return ended(e),
            };
            link.heard();
            let events = link.machine.borrow_mut().handle(frame);
            for event in events {
                match event {
                    Event::Send(f) => {
                        let _ = replies_tx.send(Reply::Frame(f));
                    }
                    Event::SendEpoch(frames) => {
                        let _ = replies_tx.send(Reply::Frames(frames));
                    }
                    Event::Connected { full_sync } => {
                        tracing::info!(full_sync, "the standby follows");
                        dial.events.emit(ev::Event::StandbyFollows { full_sync });
                        link.tell.tell(LinkEvent::Following { full_sync });
                    }
                    Event::Released(epoch) => {
                        let _ = replies_tx.send(Reply::Release(epoch));
                    }
                    Event::PeerLeft(why) => return End::Lost(format!("the standby left: {why}")),
                    Event::Close(ProtoError::Refused(r)) => return End::Refused(format!("the standby refused this primary: {r}")),
                    Event::Close(e) => return End::Lost(e.to_string()),
                }
            }
        }
    };

    tokio::pin!(reader);
    let writer = async {
        loop {
            tokio::select! {
                biased;
                Some(reply) = replies.recv() => match reply {
                    Reply::Frame(frame) => {
                        if let Err(e) = tx.send(&frame).await {
                            return ended(e);
                        }
                    }
                    Reply::Frames(frames) => {
                        for frame in frames.iter() {
                            if let Err(e) = tx.send_encoded(frame.clone()).await {
                                return ended(e);
                            }
                        }
                    }
                    Reply::Release(epoch) => {
                        // Released first, the standby told after: should this host die
                        // in between, the standby prints that output again (a console
                        // client skips it by its offset), but never misses any.
                        (link.release)(epoch);
                        link.tell.tell(LinkEvent::Released(epoch));
                        let generation = link.generation();
                        if let Err(e) = tx.send(&Frame { generation, message: Message::Released { epoch } }).await {
                            return ended(e);
                        }
                    }
                },
                out = outbox.recv() => match out {
                    Some(Outgoing::Epoch { encoded, die_mid }) => {
                        let (number, frames) = (encoded.number, encoded.frames.clone());
                        if !link.queue(encoded) {
                            continue;
                        }
                        if let Err(e) = send_epoch(&mut tx, number, &frames, dial, corrupt, die_mid).await {
                            return ended(e);
                        }
                        let path = tx.path_stats();
                        tracing::debug!(
                            epoch = number,
                            rtt_us = path.rtt.as_micros() as u64,
                            cwnd = path.cwnd,
                            congestion_events = path.congestion_events,
                            lost_packets = path.lost_packets,
                            sent_packets = path.sent_packets,
                            "epoch written to the stream"
                        );
                    }
                    Some(Outgoing::Goodbye(reason)) => {
                        let generation = link.generation();
                        let _ = tx.send(&Frame { generation, message: Message::Goodbye { reason } }).await;
                        return End::Left;
                    }
                    None => return End::Left,
                },
            }
        }
    };
    // Beats on its own, so that neither an epoch being written nor a goodbye draining
    // delays a heartbeat.
    let beater = async {
        let current = || {
            let m = link.machine.borrow();
            m.is_protecting().then(|| m.generation())
        };
        ended(pulse.beat(dial.heartbeat.interval, current).await)
    };
    tokio::pin!(beater);

    let end = tokio::select! {
        end = &mut reader => end,
        end = writer => end,
        end = &mut beater => end,
    };
    match end {
        End::Left => {
            // The goodbye went out behind every epoch queued before it, which on a slow
            // link can be seconds of data still on its way. The standby keeps beating
            // while it drains, so listen until it confirms (it closes saying so) or
            // falls silent: a fixed grace gave up on live standbys and left the guest's
            // last output unreleased. Closing once the bytes are merely acknowledged
            // could cut them off unread, and a standby that never reads the goodbye
            // takes over a guest that has stopped.
            tx.end_stream();
            let confirmed = tokio::time::timeout(GOODBYE_LIMIT, async {
                tokio::select! {
                    end = &mut reader => end,
                    end = &mut beater => end,
                }
            })
            .await;
            tx.close("goodbye");
            match confirmed {
                Ok(End::Left) => End::Left,
                Ok(End::Lost(why) | End::Refused(why)) => End::Lost(format!("the standby did not confirm the goodbye: {why}")),
                Err(_) => End::Lost("the standby did not confirm the goodbye in time".into()),
            }
        }
        End::Lost(why) => {
            tx.close(&why);
            End::Lost(why)
        }
        End::Refused(why) => {
            tx.close(&why);
            End::Refused(why)
        }
    }
}

/// How long a goodbye may take to reach a standby that is still draining epochs.
const GOODBYE_LIMIT: Duration = Duration::from_secs(120);

async fn send_epoch(tx: &mut LinkSender, number: u64, frames: &[Bytes], dial: &Dial, corrupt: &mut Option<u64>, die_mid: bool) -> Result<(), TransportError> {
    let middle = frames.len() / 2;
    for (i, frame) in frames.iter().enumerate() {
        if i == middle && (die_mid || dial.faults.die_mid_epoch == Some(number)) {
            tracing::warn!(epoch = number, "fault injection: dying in the middle of the epoch");
            dial.events.emit(ev::Event::FaultInjected { fault: ev::Fault::DieMidEpoch, epoch: number });
            die();
        }
        if i == middle && *corrupt == Some(number) {
            tracing::warn!(epoch = number, "fault injection: corrupting a frame of the epoch");
            dial.events.emit(ev::Event::FaultInjected { fault: ev::Fault::CorruptFrame, epoch: number });
            *corrupt = None;
            tx.send_corrupted(frame).await?;
            continue;
        }
        tx.send_encoded(frame.clone()).await?;
    }
    Ok(())
}

/// Ends this process as a power cut would: no goodbye, no flush, no destructors.
fn die() -> ! {
    // SAFETY: kill(2) with this process's own pid and a signal number; no memory is
    // involved.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
