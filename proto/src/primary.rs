//! The primary's end: send epochs, keep each until the standby acknowledges it, and say
//! when an epoch's output may be released. Keeping unacknowledged epochs lets a
//! reconnected standby be brought up to date by sending them again; a standby that has
//! lost more than that needs a full re-sync.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::epoch::Epoch;
use crate::handshake::Identity;
use crate::message::{EpochKind, Frame, Message};
use crate::standby::name;
use crate::ProtoError;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Send this frame to the standby.
    Send(Frame),
    /// Send these encoded frames (an epoch kept for a reconnection) to the standby.
    SendEpoch(Arc<Vec<Bytes>>),
    /// The standby is following. With `full_sync`, it needs a full epoch before any
    /// delta (it holds nothing, or less than the epochs kept here can make up).
    Connected { full_sync: bool },
    /// The standby holds every epoch up to this one: their output may be released,
    /// and a [`Message::Released`] then tells the standby so.
    Released(u64),
    /// The standby said goodbye on purpose.
    PeerLeft(String),
    /// The connection must end.
    Close(ProtoError),
}

enum Phase {
    Disconnected,
    AwaitingHello,
    AwaitingWelcome { generation: u64 },
    Protecting { generation: u64 },
}

pub struct Primary {
    identity: Identity,
    /// Most epochs sent but not acknowledged before the guest must wait.
    window: usize,
    phase: Phase,
    next_epoch: u64,
    acked: Option<u64>,
    in_flight: VecDeque<Encoded>,
    compress: bool,
}

/// An epoch encoded for the wire, frames with their headers: built once, outside any
/// lock the network side needs (compressing a large epoch takes long on a slow host),
/// handed to QUIC without a copy, and sent again as it is after a reconnection.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub number: u64,
    pub kind: EpochKind,
    pub generation: u64,
    pub frames: Arc<Vec<Bytes>>,
    /// The payload bytes the frames carry (pages as sent, addresses, state, output):
    /// what compression and zero-page markers leave of the epoch on the wire.
    pub wire: usize,
}

impl Encoded {
    pub fn wire_bytes(&self) -> usize {
        self.wire
    }
}

/// What the next epoch's encoding needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub number: u64,
    pub generation: u64,
    pub compress: bool,
}

impl Ticket {
    /// Encodes `epoch` as the one this ticket is for: its number and whether its pages
    /// are compressed are the ticket's. The epoch is only read, so its buffers can be
    /// used again for the next one.
    pub fn encode(self, epoch: &mut Epoch) -> Result<Encoded, ProtoError> {
        epoch.number = self.number;
        epoch.compress = self.compress;
        let kind = epoch.kind.unwrap_or(EpochKind::Delta);
        epoch.kind = Some(kind);
        let (frames, wire) = epoch.encode(self.generation)?;
        Ok(Encoded { number: self.number, kind, generation: self.generation, frames: Arc::new(frames), wire })
    }
}

impl Primary {
    pub fn new(identity: Identity, window: usize) -> Self {
        Self {
            identity,
            window: window.max(1),
            phase: Phase::Disconnected,
            next_epoch: 1,
            acked: None,
            in_flight: VecDeque::new(),
            compress: true,
        }
    }

    /// Whether pages are compressed on the wire where it pays (the default), for
    /// measurements of what it buys.
    pub fn with_compression(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Starts a connection: send this hello first.
    pub fn connect(&mut self) -> Frame {
        self.phase = Phase::AwaitingHello;
        self.identity.hello()
    }

    pub fn disconnect(&mut self) {
        self.phase = Phase::Disconnected;
    }

    pub fn is_protecting(&self) -> bool {
        matches!(self.phase, Phase::Protecting { .. })
    }

    /// Whether another epoch may be sent now, or the guest must wait for acks
    /// (back-pressure: the standby is `window` epochs behind).
    pub fn can_send(&self) -> bool {
        self.is_protecting() && self.in_flight.len() < self.window
    }

    /// Epochs sent and not yet acknowledged.
    pub fn lag(&self) -> usize {
        self.in_flight.len()
    }

    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    /// The number the next epoch sent will have.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    pub fn generation(&self) -> u64 {
        self.identity.generation
    }

    /// What encoding the next epoch needs; `None` while no standby follows.
    pub fn ticket(&self) -> Option<Ticket> {
        match self.phase {
            Phase::Protecting { generation } => Some(Ticket { number: self.next_epoch, generation, compress: self.compress }),
            _ => None,
        }
    }

    /// Keeps an encoded epoch until acknowledged; the caller sends its frames. Refused
    /// when it is no longer the epoch due (the standby changed while it was encoded).
    pub fn queue(&mut self, epoch: Encoded) -> Result<(), ProtoError> {
        if self.ticket().map(|t| (t.number, t.generation)) != Some((epoch.number, epoch.generation)) {
            return Err(ProtoError::OutOfOrder(format!("epoch {} encoded for a connection that has changed", epoch.number)));
        }
        if epoch.kind == EpochKind::Full {
            // A full epoch makes every earlier one moot.
            self.in_flight.clear();
        }
        self.next_epoch += 1;
        self.in_flight.push_back(epoch);
        Ok(())
    }

    /// Encodes, numbers and keeps an epoch: [`Primary::ticket`], [`Ticket::encode`] and
    /// [`Primary::queue`] at once, for callers that hold no lock.
    pub fn send_epoch(&mut self, epoch: &mut Epoch) -> Result<Encoded, ProtoError> {
        let ticket = self.ticket().ok_or_else(|| ProtoError::OutOfOrder("an epoch while no standby is following".into()))?;
        let encoded = ticket.encode(epoch)?;
        self.queue(encoded.clone())?;
        Ok(encoded)
    }

    pub fn handle(&mut self, frame: Frame) -> Vec<Event> {
        match self.step(frame) {
            Ok(events) => events,
            Err(e) => {
                self.phase = Phase::Disconnected;
                vec![Event::Close(e)]
            }
        }
    }

    fn step(&mut self, frame: Frame) -> Result<Vec<Event>, ProtoError> {
        if let Message::Refused(refusal) = frame.message {
            return Err(ProtoError::Refused(refusal));
        }
        match self.phase {
            Phase::Disconnected => Err(ProtoError::OutOfOrder("a frame while not connected".into())),
            Phase::AwaitingHello => {
                let generation = self.identity.judge(&frame)?;
                self.phase = Phase::AwaitingWelcome { generation };
                Ok(vec![])
            }
            Phase::AwaitingWelcome { generation } => {
                check_generation(&frame, generation)?;
                let Message::Welcome { committed } = frame.message else {
                    return Err(ProtoError::OutOfOrder(format!("{} before the welcome", name(&frame.message))));
                };
                self.phase = Phase::Protecting { generation };
                Ok(self.resume_from(committed, generation))
            }
            Phase::Protecting { generation } => {
                check_generation(&frame, generation)?;
                match frame.message {
                    Message::Ack { epoch } => self.ack(epoch).map(|e| vec![e]),
                    Message::Heartbeat { .. } => Ok(vec![]),
                    Message::Goodbye { reason } => {
                        self.phase = Phase::Disconnected;
                        Ok(vec![Event::PeerLeft(reason)])
                    }
                    other => Err(ProtoError::OutOfOrder(format!("unexpected {}", name(&other)))),
                }
            }
        }
    }

    /// Acks are cumulative: the standby applies epochs in order.
    fn ack(&mut self, epoch: u64) -> Result<Event, ProtoError> {
        if !self.in_flight.iter().any(|e| e.number == epoch) {
            return Err(ProtoError::OutOfOrder(format!("an ack of epoch {epoch}, which is not in flight")));
        }
        while self.in_flight.front().is_some_and(|e| e.number <= epoch) {
            self.in_flight.pop_front();
        }
        self.acked = Some(epoch);
        Ok(Event::Released(epoch))
    }

    /// After a welcome: drops what the standby already holds and sends the rest again,
    /// or asks for a full re-sync when the epochs kept here cannot make it up.
    fn resume_from(&mut self, committed: Option<u64>, generation: u64) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(c) = committed {
            if self.in_flight.iter().any(|e| e.number == c) {
                while self.in_flight.front().is_some_and(|e| e.number <= c) {
                    self.in_flight.pop_front();
                }
                self.acked = Some(c);
                events.push(Event::Released(c));
            }
        }
        let continues = match (committed, self.in_flight.front()) {
            (Some(c), Some(first)) => first.number == c + 1,
            (Some(c), None) => self.acked == Some(c),
            (None, Some(first)) => first.kind == EpochKind::Full,
            (None, None) => false,
        };
        if !continues {
            self.in_flight.clear();
            events.push(Event::Connected { full_sync: true });
            return events;
        }
        events.push(Event::Connected { full_sync: false });
        for epoch in &self.in_flight {
            if epoch.generation != generation {
                // Encoded for an older generation: the standby needs everything again.
                self.in_flight.clear();
                events.retain(|e| !matches!(e, Event::Connected { .. }));
                events.push(Event::Connected { full_sync: true });
                return events;
            }
        }
        events.extend(self.in_flight.iter().map(|e| Event::SendEpoch(e.frames.clone())));
        events
    }
}

fn check_generation(frame: &Frame, generation: u64) -> Result<(), ProtoError> {
    if frame.generation != generation {
        return Err(ProtoError::OutOfOrder(format!("a frame of generation {} in generation {generation}", frame.generation)));
    }
    Ok(())
}
