//! The standby's side of the network, on a thread of its own: accept primaries (a new
//! connection replaces the old one), feed every frame to the protocol machine, pass
//! verified epochs to the VM side, acknowledge them, beat the heart, and report a
//! primary that has fallen silent. After a promotion every primary is turned away.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_proto::verify;
use tandem_proto::message::EpochKind;
use tandem_vmm::snapshot::image::Image;
use tandem_vmm::snapshot::SnapshotError;

/// The standby's image, until a takeover hands it to the guest.
pub type SharedImage = Arc<Mutex<Option<Image>>>;
use tandem_vmm::snapshot::Kind;
use tandem_proto::handshake::{Identity, Refusal};
use tandem_proto::liveness::{Liveness, Verdict};
use tandem_proto::message::Message;
use tandem_proto::standby::{Event, Standby};
use tandem_proto::{Frame, ProtoError};
use tokio::sync::mpsc;

use super::{Link, Listener, Pulse, TransportError};
use crate::Heartbeat;

/// What the network side tells the VM side, in the order it happened.
#[derive(Debug)]
pub enum Report {
    /// A primary was accepted.
    Following { peer: String, generation: u64 },
    /// An epoch verified, applied to the image and acknowledged.
    Applied { epoch: u64, full: bool, pages: usize, bytes: usize },
    /// The slice of the image the epoch named was compared with the primary's digest
    /// of it; if they differed, the image is no copy of the guest any more: it holds
    /// no committed epoch, and the connection ended for a full resync.
    Checked { epoch: u64, first: u64, pages: u32, same: bool },
    /// A connection ended; any epoch it was in the middle of was discarded.
    Dropped(String),
    /// A peer was turned away.
    Refused(String),
    /// The primary said goodbye on purpose.
    Left(String),
    /// The primary has not been heard from for this long, past the timeout.
    Silent(Duration),
    /// The witness answered (the witness client's wake-up; the answer is its own).
    WitnessAnswered,
}

struct State {
    machine: Standby,
    /// Whether the primary lives, judged once one has been followed.
    liveness: Liveness,
    judging: bool,
    /// The liveness's clock starts here.
    zero: Instant,
    /// Set on promotion: this generation now runs the VM here.
    promoted: Option<u64>,
    silence_reported: bool,
    /// An epoch is being laid into the image: frames wait meanwhile, so their absence
    /// is not the primary's silence.
    applying: bool,
    /// The current connection's evidence of life.
    pulse: Option<Pulse>,
}

impl State {
    /// The primary this standby follows was heard from now.
    fn heard(&mut self) {
        self.liveness.heard(self.zero.elapsed());
        self.judging = true;
        self.silence_reported = false;
    }
}

/// What the VM side asks of the network thread.
enum Command {
    Rearm,
    Promote { generation: u64, reply: std::sync::mpsc::SyncSender<Promoted> },
}

/// The console and the NIC frames as of the last committed epoch (see
/// [`StandbyLink::promote`]).
type Promoted = (tandem_proto::standby::Console, Vec<(u8, Vec<u8>)>);

/// The VM side's handle on the network thread, which owns the standby's protocol
/// machine: the VM side asks, by message, and shares nothing with it.
pub struct StandbyLink {
    commands: mpsc::UnboundedSender<Command>,
}

impl StandbyLink {
    /// Judges the primary's silence afresh: it was reported, but the witness did not
    /// let this standby act on it, and the primary has been heard from since.
    pub fn rearm_silence(&self) {
        let _ = self.commands.send(Command::Rearm);
    }

    /// From now on this host runs the VM at `generation`: the current primary is cut
    /// off and every primary that comes later is refused.
    /// Returns the console as of the last committed epoch: what the primary said it
    /// released, for console clients that resume, and what it did not, for the new
    /// VM's console to print first; and the NIC frames the primary did not say it
    /// released, for the new VM's NICs to send first.
    /// `None` if the network thread has stopped.
    pub fn promote(&self, generation: u64) -> Option<Promoted> {
        let (reply, promoted) = std::sync::mpsc::sync_channel(1);
        self.commands.send(Command::Promote { generation, reply }).ok()?;
        promoted.recv().ok()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the network thread on `listener`.
/// Verified epochs are applied to `image` before they are acknowledged.
pub fn spawn(
    addr: std::net::SocketAddr,
    tls: rustls::ServerConfig,
    identity: Identity,
    heartbeat: Heartbeat,
    image: SharedImage,
    reports: Sender<Report>,
) -> Result<StandbyLink, TransportError> {
    let state = Arc::new(Mutex::new(State {
        machine: Standby::new(identity, None),
        liveness: Liveness::new(Duration::ZERO, heartbeat.interval, heartbeat.timeout),
        judging: false,
        zero: Instant::now(),
        promoted: None,
        silence_reported: false,
        applying: false,
        pulse: None,
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TransportError::Tls(format!("cannot start the network runtime: {e}")))?;
    let listener = {
        // quinn binds its socket into the runtime it is created in.
        let _inside = runtime.enter();
        Listener::bind(addr, tls)?
    };
    let (commands, asked) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("tandem-link".into())
        .spawn(move || runtime.block_on(run(listener, state, heartbeat, image, reports, asked)))
        .map_err(|e| TransportError::Tls(format!("cannot start the network thread: {e}")))?;
    Ok(StandbyLink { commands })
}

async fn run(
    listener: Listener,
    state: Arc<Mutex<State>>,
    heartbeat: Heartbeat,
    image: SharedImage,
    reports: Sender<Report>,
    mut asked: mpsc::UnboundedReceiver<Command>,
) {
    tokio::spawn(super::watch_stalls("standby"));
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    // Four checks per heartbeat interval: silence is measured from the last check that
    // saw a packet arrive, so the check's period is how far past the timeout a
    // takeover may begin (and how stale that last sighting may be).
    let period = heartbeat.interval / 4;
    let mut check = tokio::time::interval(period);
    // After a stall, one late tick, not a burst of them ahead of the frames that waited.
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = tokio::time::Instant::now();
    // Accepting runs on its own task: a handshake in progress must not be dropped
    // whenever something else in the loop below happens first.
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let result = listener.accept().await;
            let closed = matches!(result, Err(TransportError::Closed));
            if accepted_tx.send(result).is_err() || closed {
                return;
            }
        }
    });
    loop {
        tokio::select! {
            Some(result) = accepted.recv() => match result {
                Ok(link) => {
                    if let Some(old) = current.take() {
                        old.abort();
                    }
                    let promoted = {
                        let mut s = lock(&state);
                        s.machine.reconnect();
                        s.promoted
                    };
                    let task = match promoted {
                        Some(generation) => tokio::spawn(turn_away(link, generation, reports.clone())),
                        None => tokio::spawn(session(link, state.clone(), heartbeat, image.clone(), reports.clone())),
                    };
                    current = Some(task);
                }
                Err(TransportError::Closed) => return,
                Err(e) => {
                    let report = match e.tls_refusal() {
                        Some(r) if r.by_peer => Report::Refused(format!("a peer refused this standby's certificate in the TLS handshake: {}", r.reason)),
                        Some(r) => Report::Refused(format!("turned a peer away in the TLS handshake: {}", r.reason)),
                        None => Report::Dropped(format!("a connection attempt failed: {e}")),
                    };
                    let _ = reports.send(report);
                }
            },
            Some(command) = asked.recv() => match command {
                Command::Rearm => lock(&state).silence_reported = false,
                Command::Promote { generation, reply } => {
                    // Under the lock the sessions take for every frame: none is handled
                    // after this, and the console is the promotion's own.
                    let promoted = {
                        let mut s = lock(&state);
                        s.promoted = Some(generation);
                        (s.machine.console(), s.machine.unreleased_frames())
                    };
                    if let Some(old) = current.take() {
                        old.abort();
                    }
                    let _ = reply.send(promoted);
                }
            },
            _ = check.tick() => {
                let mut s = lock(&state);
                let (due_at, now) = (due.into_std().saturating_duration_since(s.zero), s.zero.elapsed());
                due = tokio::time::Instant::now() + period;
                if s.promoted.is_some() || s.silence_reported || s.applying || !s.judging {
                    continue;
                }
                let packets = s.pulse.as_ref().map_or(0, |p| p.packets_in());
                if let Verdict::Silent(quiet) = s.liveness.check(due_at, now, packets) {
                    s.silence_reported = true;
                    tracing::debug!(packets_in = packets, "no packet from the primary since the last check");
                    let _ = reports.send(Report::Silent(quiet));
                }
            }
        }
    }
}

/// Runs `work` on the standby's image, unless a takeover has handed it to the guest.
fn on_image<T>(image: &SharedImage, work: impl FnOnce(&mut Image) -> Result<T, SnapshotError>) -> Result<T, SnapshotError> {
    let mut held = image.lock().unwrap_or_else(|e| e.into_inner());
    let image = held.as_mut().ok_or_else(|| SnapshotError::Corrupt("the image already runs as the guest".into()))?;
    work(image)
}

/// Why a primary's connection ended, short of its goodbye.
enum Ended {
    /// The protocol machine turned the primary down (the refusal went out to it).
    Refused(String),
    Dropped(String),
}

/// One primary's connection.
async fn session(link: Link, state: Arc<Mutex<State>>, heartbeat: Heartbeat, image: SharedImage, reports: Sender<Report>) {
    let peer = link.peer().to_string();
    let (mut tx, mut rx) = link.split();
    let (replies_tx, mut replies) = mpsc::unbounded_channel::<Frame>();
    let pulse = tx.pulse();
    {
        let mut s = lock(&state);
        s.pulse = Some(pulse.clone());
        let now = s.zero.elapsed();
        s.liveness.opened(now);
    }

    // Ends with the primary's goodbye (Ok, its reason) or why the connection dropped.
    let reader = async {
        // Bytes of the first full epoch laid in the image so far, for its report.
        let mut laid_bytes = 0;
        loop {
            let got = tokio::select! {
                got = rx.recv_checked() => got,
                beat = pulse.recv() => {
                    match beat {
                        Ok(Frame { message: Message::Heartbeat { .. }, generation }) => {
                            let mut s = lock(&state);
                            if s.machine.is_following() && generation == s.machine.generation() {
                                s.heard();
                            }
                        }
                        Ok(_) => return Err(Ended::Dropped("the primary sent a datagram that is not a heartbeat".to_string())),
                        Err(e) => return Err(Ended::Dropped(e.to_string())),
                    }
                    continue;
                }
            };
            let received = match got {
                Ok(Some(received)) => received,
                Ok(None) => return Err(Ended::Dropped("the primary closed the connection".to_string())),
                Err(e) => return Err(Ended::Dropped(e.to_string())),
            };
            tracing::trace!(generation = received.frame.generation, "frame in");
            let (committed, events) = {
            let mut s = lock(&state);
            // Promoted meanwhile: the console handed to the new VM is as of now, so no
            // later epoch may be committed, applied or acknowledged here.
            if s.promoted.is_some() {
                return Err(Ended::Dropped("this host has taken over".to_string()));
            }
            let was_following = s.machine.is_following();
            let committed = s.machine.committed();
            let events = s.machine.handle_received(received);
            if s.machine.is_following() {
                s.heard();
                if !was_following {
                    let _ = reports.send(Report::Following { peer: peer.clone(), generation: s.machine.generation() });
                }
            }
            (committed, events)
            };
            for event in events {
                match event {
                    Event::Send(f) => {
                        let _ = replies_tx.send(f);
                    }
                    Event::Clear | Event::Lay(_) => {
                        // In order, each before the next frame is handled; off the
                        // network thread, as an apply is.
                        let image = image.clone();
                        let laid = tokio::task::spawn_blocking(move || {
                            on_image(&image, |image| match event {
                                Event::Lay(pages) => image.lay(&pages.addresses, &pages.zero, &pages.pieces()).map(|()| pages.page_data_len()),
                                _ => image.clear().map(|()| 0),
                            })
                        })
                        .await;
                        match laid.map_err(|e| e.to_string()).and_then(|laid| laid.map_err(|e| e.to_string())) {
                            Ok(bytes) => laid_bytes += bytes,
                            Err(e) => {
                                lock(&state).machine.revert(committed);
                                return Err(Ended::Dropped(format!("the first full epoch cannot be laid in the image: {e}")));
                            }
                        }
                    }
                    Event::Apply(epoch) => {
                        // Applied off the network thread, so heartbeats keep flowing
                        // while a full epoch is laid down; acknowledged only after.
                        let image = image.clone();
                        let number = epoch.number;
                        let full = epoch.kind == Some(EpochKind::Full);
                        let (pages, bytes) = (epoch.addresses.len(), std::mem::take(&mut laid_bytes) + epoch.page_data_len() + epoch.state.len());
                        lock(&state).applying = true;
                        let applied = tokio::task::spawn_blocking(move || {
                            let kind = if full { Kind::Full } else { Kind::Delta };
                            // The replica check, if the epoch named one: the image is
                            // then the guest as of the epoch's pause, where the primary
                            // took its digest.
                            let checked = on_image(&image, |image| {
                                if epoch.laid {
                                    image.finish(&epoch.state)?;
                                } else {
                                    image.apply_marked(kind, &epoch.addresses, &epoch.zero, &epoch.pieces(), &epoch.state)?;
                                }
                                Ok(epoch.verify.map(|v| {
                                    let same = image.slices().read(v.first, v.pages).map(|b| verify::digest(&b) == v.digest);
                                    (v, same.unwrap_or(false))
                                }))
                            });
                            (checked, epoch)
                        })
                        .await;
                        let applied = {
                            let mut s = lock(&state);
                            s.applying = false;
                            if s.judging {
                                let now = s.zero.elapsed();
                                s.liveness.heard(now);
                            }
                            applied.map(|(checked, epoch)| {
                                s.machine.recycle(epoch);
                                checked
                            })
                        };
                        match applied {
                            Ok(Ok(checked)) => {
                                let _ = reports.send(Report::Applied { epoch: number, full, pages, bytes });
                                if let Some((v, same)) = checked {
                                    let _ = reports.send(Report::Checked { epoch: number, first: v.first, pages: v.pages, same });
                                    if !same {
                                        // Not acknowledged, and nothing here to take over
                                        // from until a full epoch has replaced it all.
                                        lock(&state).machine.revert(None);
                                        return Err(Ended::Dropped(format!("the image differs from the primary's guest at epoch {number}: a full resync follows")));
                                    }
                                }
                            }
                            Ok(Err(e)) => {
                                lock(&state).machine.revert(committed);
                                return Err(Ended::Dropped(format!("epoch {number} verified but cannot be applied: {e}")));
                            }
                            Err(e) => {
                                lock(&state).machine.revert(committed);
                                return Err(Ended::Dropped(format!("epoch {number} could not be applied: {e}")));
                            }
                        }
                    }
                    Event::PeerLeft(why) => return Ok(why),
                    Event::Close(ProtoError::Refused(r)) => return Err(Ended::Refused(r.to_string())),
                    Event::Close(e) => return Err(Ended::Dropped(e.to_string())),
                }
            }
        }
    };

    let writer = async {
        while let Some(frame) = replies.recv().await {
            if tx.send(&frame).await.is_err() {
                return;
            }
        }
    };
    // Beats on its own: an acknowledgement being written must not delay a heartbeat.
    let beater = async {
        let current = || {
            let s = lock(&state);
            s.machine.is_following().then(|| s.machine.generation())
        };
        pulse.beat(heartbeat.interval, current).await.to_string()
    };

    let ended = tokio::select! {
        ended = reader => ended,
        () = writer => Err(Ended::Dropped("the connection failed while sending".to_string())),
        why = beater => Err(Ended::Dropped(why)),
    };
    lock(&state).pulse = None;
    // What the machine answered last (a refusal, typically) still goes out.
    while let Ok(frame) = replies.try_recv() {
        let _ = tx.send(&frame).await;
    }
    let why = match ended {
        Ok(reason) => {
            // Reported only once the confirmation is on its way: the process may end
            // as soon as it hears of the goodbye.
            tx.close_and_flush(super::GOODBYE_RECEIVED, Duration::from_millis(500)).await;
            let _ = reports.send(Report::Left(reason));
            return;
        }
        Err(why) => why,
    };
    let _ = reports.send(match why {
        Ended::Refused(refusal) => Report::Refused(format!("refused the primary at {peer}: {refusal}")),
        Ended::Dropped(why) => Report::Dropped(format!("the connection from {peer} ended: {why}; an epoch in transfer, if any, was discarded")),
    });
    tx.finish(Duration::from_millis(200), "dropped").await;
}

/// After a promotion: any primary that calls is told it has been replaced.
async fn turn_away(link: Link, generation: u64, reports: Sender<Report>) {
    let peer = link.peer().to_string();
    let (mut tx, mut rx) = link.split();
    let Ok(Some(first)) = rx.recv().await else { return };
    let theirs = first.generation;
    let refusal = Refusal::StaleGeneration { theirs: theirs.min(generation - 1), ours: generation };
    let _ = tx.send(&Frame { generation, message: Message::Refused(refusal.clone()) }).await;
    let _ = reports.send(Report::Refused(format!("refused the primary at {peer}: {refusal}")));
    tx.finish(Duration::from_millis(200), "refused").await;
}
