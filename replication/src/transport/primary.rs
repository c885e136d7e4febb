//! The primary's connection to its standby, on a thread of its own: dial (and dial
//! again after any loss), hand every frame to the protocol machine, send what the VM
//! thread queues, beat the heart, and notice a silent standby. Reading and writing run
//! side by side, so a long epoch on the way out never hides the standby's heartbeats.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::message::Message;
use tandem_proto::primary::{Event, Primary};
use tandem_proto::{Frame, ProtoError};
use tandem_vmm::vcpu::Waker;
use tokio::sync::mpsc;

use super::{connect, LinkSender, TransportError};
use crate::events::{self as ev, Events};
use crate::Heartbeat;

/// How the link stands, as the VM thread sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling, or dialling again after `why`.
    Connecting { why: Option<String> },
    /// The standby follows.
    Protecting,
    /// The standby turned this primary down; nothing will change that.
    Refused(String),
    /// The goodbye went out and the standby closed the connection.
    Left,
}

/// What the VM thread and the link thread share.
pub struct Shared {
    pub machine: Primary,
    /// Bumped at each welcome; epochs queued for an older connection are not sent, as
    /// the new one resends whatever the standby lacks.
    pub conn: u64,
    /// The standby needs a full epoch before any delta.
    pub need_full: bool,
    pub link: LinkState,
    /// When the standby was last heard from, on any connection.
    pub last_heard: Instant,
    /// When each epoch in flight went out, for the ack latency.
    pub sent_at: Vec<(u64, Instant)>,
    /// The latest ack latencies, newest last.
    pub ack_latency: Vec<Duration>,
    /// Wakes the VM thread when what it waits for may have come: an ack (room for the
    /// next epoch), a new connection, a loss.
    pub waker: Option<Waker>,
    /// Signalled with the waker, for a VM thread that waits without a VM (before the
    /// guest boots, after it stopped): see [`wait_while`].
    changed: Arc<Condvar>,
}

impl Shared {
    pub fn new(machine: Primary) -> Self {
        Self {
            machine,
            conn: 0,
            need_full: true,
            link: LinkState::Connecting { why: None },
            last_heard: Instant::now(),
            sent_at: Vec::new(),
            ack_latency: Vec::new(),
            waker: None,
            changed: Arc::new(Condvar::new()),
        }
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
        self.changed.notify_all();
    }

    fn released(&mut self, epoch: u64) {
        let now = Instant::now();
        let (done, rest): (Vec<_>, Vec<_>) = self.sent_at.iter().partition(|(e, _)| *e <= epoch);
        self.sent_at = rest;
        for (_, at) in done {
            self.ack_latency.push(now - at);
        }
        let excess = self.ack_latency.len().saturating_sub(256);
        self.ack_latency.drain(..excess);
    }
}

pub fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits, at most `limit`, while `waiting` holds for the link's state; returns the
/// state it found last. Woken by the link thread at each change, not by polling.
pub fn wait_while(shared: &Mutex<Shared>, limit: Duration, mut waiting: impl FnMut(&LinkState) -> bool) -> LinkState {
    let deadline = Instant::now() + limit;
    let mut s = lock(shared);
    let changed = s.changed.clone();
    while waiting(&s.link) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s = changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
    }
    s.link.clone()
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
    /// `die_mid`: a fault to inject, SIGKILL halfway through sending it.
    Epoch { conn: u64, number: u64, frames: Arc<Vec<Bytes>>, die_mid: bool },
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

/// Starts the link thread. `release(epoch)` is called there as soon as the standby
/// holds every epoch up to `epoch`.
pub fn spawn(dial: Dial, shared: Arc<Mutex<Shared>>, release: Box<dyn Fn(u64) + Send>) -> Result<Outbox, TransportError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TransportError::Tls(format!("cannot start the network runtime: {e}")))?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("tandem-link".into())
        .spawn(move || runtime.block_on(run(dial, shared, rx, release)))
        .map_err(|e| TransportError::Tls(format!("cannot start the network thread: {e}")))?;
    Ok(Outbox(tx))
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

async fn run(dial: Dial, shared: Arc<Mutex<Shared>>, mut outbox: mpsc::UnboundedReceiver<Outgoing>, release: Box<dyn Fn(u64) + Send>) {
    tokio::spawn(super::watch_stalls("primary"));
    let mut corrupt = dial.faults.corrupt_epoch;
    loop {
        let end = match connect(dial.addr, dial.tls.clone()).await {
            Ok(link) => {
                let (tx, rx) = link.split();
                session(&dial, &shared, tx, rx, &mut outbox, &*release, &mut corrupt).await
            }
            Err(e) => ended(e),
        };
        if settle(&shared, end) {
            return;
        }
        // A goodbye queued while no standby was there ends the thread all the same.
        while let Ok(out) = outbox.try_recv() {
            if let Outgoing::Goodbye(_) = out {
                let mut s = lock(&shared);
                s.link = LinkState::Left;
                s.wake();
                return;
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

/// Records how a connection ended; true when the thread must stop.
fn settle(shared: &Mutex<Shared>, end: End) -> bool {
    let mut s = lock(shared);
    s.machine.disconnect();
    s.wake();
    match end {
        End::Lost(why) => {
            if s.link == LinkState::Protecting {
                tracing::warn!("lost the standby: {why}; reconnecting");
            }
            s.link = LinkState::Connecting { why: Some(why) };
            false
        }
        End::Refused(why) => {
            s.link = LinkState::Refused(why);
            true
        }
        End::Left => {
            s.link = LinkState::Left;
            true
        }
    }
}

async fn session(
    dial: &Dial,
    shared: &Mutex<Shared>,
    mut tx: LinkSender,
    mut rx: super::LinkReceiver,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    release: &(dyn Fn(u64) + Send),
    corrupt: &mut Option<u64>,
) -> End {
    let mut hello = lock(shared).machine.connect();
    if let (Some(v), Message::Hello { version, .. }) = (dial.faults.protocol_version, &mut hello.message) {
        *version = v;
    }
    if let Err(e) = tx.send(&hello).await {
        return ended(e);
    }
    // Frames the protocol machine answers with, sent before anything queued later.
    let (replies_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
    let timeout = dial.heartbeat.timeout;
    // The standby's silence on this connection counts from when it was opened.
    let opened = Instant::now();

    let pulse = tx.pulse();
    let reader = async {
        // Set when this side itself stalled: the standby's silence is judged only once
        // the frames that waited meanwhile have had a chance to be read.
        let mut grace: Option<Instant> = None;
        let mut packets = pulse.packets_in();
        loop {
            let heard = lock(shared).last_heard.max(opened);
            let deadline = (heard + timeout).max(grace.unwrap_or(heard));
            let frame = tokio::select! {
                got = rx.recv() => got,
                beat = pulse.recv() => {
                    match beat {
                        Ok(Frame { message: Message::Heartbeat { .. }, .. }) => lock(shared).last_heard = Instant::now(),
                        Ok(_) => return End::Lost("the standby sent a datagram that is not a heartbeat".into()),
                        Err(e) => return ended(e),
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let quiet = lock(shared).last_heard.max(opened).elapsed();
                    if quiet <= timeout {
                        continue;
                    }
                    // Packets still arrive (acknowledgements of the epochs going out,
                    // at least): the standby lives, its frames are only slow.
                    let now_in = pulse.packets_in();
                    if now_in > packets {
                        packets = now_in;
                        lock(shared).last_heard = Instant::now();
                        continue;
                    }
                    if grace.is_none() && dial.heartbeat.woke_late(deadline) {
                        tracing::debug!("the silence check ran late: this host stalled; judging the standby shortly");
                        grace = Some(Instant::now() + dial.heartbeat.interval);
                        continue;
                    }
                    tracing::debug!(packets_in = now_in, "no packet from the standby since the last check");
                    return End::Lost(format!("the standby has been silent for {} ms", quiet.as_millis()));
                }
            };
            grace = None;
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => return End::Lost("the standby closed the connection".into()),
                Err(e) => return ended(e),
            };
            let mut end = None;
            {
                let mut s = lock(shared);
                s.last_heard = Instant::now();
                for event in s.machine.handle(frame) {
                    match event {
                        Event::Send(f) => {
                            let _ = replies_tx.send(Reply::Frame(f));
                        }
                        Event::SendEpoch(frames) => {
                            let _ = replies_tx.send(Reply::Frames(frames));
                        }
                        Event::Connected { full_sync } => {
                            s.conn += 1;
                            s.need_full |= full_sync;
                            s.link = LinkState::Protecting;
                            tracing::info!(full_sync, "the standby follows");
                            dial.events.emit(ev::Event::StandbyFollows { full_sync });
                        }
                        Event::Released(epoch) => {
                            s.released(epoch);
                            let _ = replies_tx.send(Reply::Release(epoch));
                        }
                        Event::PeerLeft(why) => end = Some(End::Lost(format!("the standby left: {why}"))),
                        Event::Close(ProtoError::Refused(r)) => end = Some(End::Refused(format!("the standby refused this primary: {r}"))),
                        Event::Close(e) => end = Some(End::Lost(e.to_string())),
                    }
                }
                s.wake();
            }
            if let Some(end) = end {
                return end;
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
                        release(epoch);
                        let generation = lock(shared).machine.generation();
                        if let Err(e) = tx.send(&Frame { generation, message: Message::Released { epoch } }).await {
                            return ended(e);
                        }
                    }
                },
                out = outbox.recv() => match out {
                    Some(Outgoing::Epoch { conn, number, frames, die_mid }) => {
                        if conn != lock(shared).conn {
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
                        let generation = lock(shared).machine.generation();
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
            let s = lock(shared);
            s.machine.is_protecting().then(|| s.machine.generation())
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
