//! The primary's end: send epochs, keep each until the standby acknowledges it, and say
//! when an epoch's output may be released. Keeping unacknowledged epochs lets a
//! reconnected standby be brought up to date by sending them again; a standby that has
//! lost more than that needs a full re-sync.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::buffers::GiveBack;
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
    /// The standby needs a full epoch: deltas encoded before the encoder knew are moot.
    awaiting_full: bool,
}

/// What became of an epoch handed to [`Primary::queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Kept until acknowledged: send its frames now.
    Send,
    /// Kept, not sent: no standby follows yet, and the next one gets it with the
    /// epochs it lacks (or a full sync) once it says what it holds.
    Kept,
    /// Dropped: the standby needs a full epoch, which carries every page anyway.
    Moot,
}

/// An epoch encoded for the wire, as the chunks that go on the stream one after the
/// other (frames with their headers, raw pages as slices of the capture): built once,
/// off the network thread (compressing a large epoch takes long on a slow host),
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

/// How this primary encodes its epochs, for an encoder on another thread than the
/// machine: it numbers the epochs itself, one after the other, and hands each to
/// [`Primary::queue`] in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tickets {
    generation: u64,
    compress: bool,
}

impl Tickets {
    pub fn ticket(self, number: u64) -> Ticket {
        Ticket { number, generation: self.generation, compress: self.compress }
    }

    pub fn generation(self) -> u64 {
        self.generation
    }
}

impl Ticket {
    /// Encodes `epoch` as the one this ticket is for: its number and whether its pages
    /// are compressed are the ticket's. The pages' buffer goes with the frames, which
    /// carry slices of it, and comes back through `give_back` (if any) once they are
    /// all gone.
    pub fn encode(self, epoch: &mut Epoch, give_back: Option<&GiveBack>) -> Result<Encoded, ProtoError> {
        epoch.number = self.number;
        epoch.compress = self.compress;
        let kind = epoch.kind.unwrap_or(EpochKind::Delta);
        epoch.kind = Some(kind);
        let (frames, wire) = epoch.encode_taking(self.generation, give_back)?;
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
            awaiting_full: false,
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

    /// How to encode epochs for this machine elsewhere (see [`Primary::queue`]).
    pub fn tickets(&self) -> Tickets {
        Tickets { generation: self.identity.generation, compress: self.compress }
    }

    /// Whether the standby needs a full epoch before any delta.
    pub fn awaits_full(&self) -> bool {
        self.awaiting_full
    }

    /// Takes an epoch encoded with [`Primary::tickets`], numbered after every epoch
    /// queued before it, whatever happened to the connection meanwhile: an epoch is
    /// the guest's state, not the connection's, so it is kept until acknowledged
    /// (unless a full epoch must come first), and says whether to send it now.
    pub fn queue(&mut self, epoch: Encoded) -> Result<Queued, ProtoError> {
        if epoch.generation != self.identity.generation || epoch.number < self.next_epoch {
            return Err(ProtoError::OutOfOrder(format!(
                "epoch {} of generation {} after epoch {} of generation {}",
                epoch.number,
                epoch.generation,
                self.next_epoch.saturating_sub(1),
                self.identity.generation
            )));
        }
        self.next_epoch = epoch.number + 1;
        match epoch.kind {
            EpochKind::Full => {
                // A full epoch makes every earlier one moot.
                self.in_flight.clear();
                self.awaiting_full = false;
            }
            _ if self.awaiting_full => return Ok(Queued::Moot),
            _ => {}
        }
        self.in_flight.push_back(epoch);
        Ok(if self.is_protecting() { Queued::Send } else { Queued::Kept })
    }

    /// Encodes, numbers and keeps an epoch while a standby follows, for a caller that
    /// encodes on the machine's own thread.
    pub fn send_epoch(&mut self, epoch: &mut Epoch, give_back: Option<&GiveBack>) -> Result<Encoded, ProtoError> {
        if !self.is_protecting() {
            return Err(ProtoError::OutOfOrder("an epoch while no standby is following".into()));
        }
        let encoded = self.tickets().ticket(self.next_epoch).encode(epoch, give_back)?;
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
            self.awaiting_full = true;
            events.push(Event::Connected { full_sync: true });
            return events;
        }
        events.push(Event::Connected { full_sync: false });
        for epoch in &self.in_flight {
            if epoch.generation != generation {
                // Encoded for an older generation: the standby needs everything again.
                self.in_flight.clear();
                self.awaiting_full = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    fn identity(role: Role) -> Identity {
        Identity { role, fingerprint: 0xfeed, generation: 1 }
    }

    /// Connects `p` to a standby holding `committed`; the machine's answer to the welcome.
    fn welcome(p: &mut Primary, committed: Option<u64>) -> Vec<Event> {
        p.connect();
        assert!(p.handle(identity(Role::Standby).hello()).is_empty());
        p.handle(Frame { generation: 1, message: Message::Welcome { committed } })
    }

    fn epoch(p: &Primary, number: u64, kind: EpochKind) -> Encoded {
        p.tickets().ticket(number).encode(&mut Epoch { kind: Some(kind), ..Epoch::default() }, None).unwrap()
    }

    #[test]
    fn epochs_numbered_elsewhere_are_kept_across_a_lost_connection_and_sent_to_the_standby_that_continues() {
        let mut p = Primary::new(identity(Role::Primary), 4);
        assert_eq!(welcome(&mut p, None), vec![Event::Connected { full_sync: true }]);
        assert!(p.awaits_full());
        // A delta encoded before the encoder knew a full epoch was owed is moot.
        assert_eq!(p.queue(epoch(&p, 1, EpochKind::Delta)), Ok(Queued::Moot));
        assert_eq!(p.queue(epoch(&p, 2, EpochKind::Full)), Ok(Queued::Send));
        assert!(!p.awaits_full());
        assert_eq!(p.handle(Frame { generation: 1, message: Message::Ack { epoch: 2 } }), vec![Event::Released(2)]);
        // The link drops; the next epoch arrives in between and is kept, not lost.
        p.disconnect();
        let third = epoch(&p, 3, EpochKind::Delta);
        assert_eq!(p.queue(third.clone()), Ok(Queued::Kept));
        assert_eq!(p.queue(epoch(&p, 3, EpochKind::Delta)).map_err(|_| ()), Err(()), "an epoch number goes once");
        assert_eq!(welcome(&mut p, Some(2)), vec![Event::Connected { full_sync: false }, Event::SendEpoch(third.frames)]);
        assert_eq!(p.queue(epoch(&p, 4, EpochKind::Delta)), Ok(Queued::Send));
    }

    #[test]
    fn a_standby_holding_too_little_makes_the_kept_epochs_moot_until_a_full_one() {
        let mut p = Primary::new(identity(Role::Primary), 4);
        welcome(&mut p, None);
        assert_eq!(p.queue(epoch(&p, 1, EpochKind::Full)), Ok(Queued::Send));
        p.disconnect();
        assert_eq!(p.queue(epoch(&p, 2, EpochKind::Delta)), Ok(Queued::Kept));
        // A new standby, holding nothing: epoch 1 was never acknowledged.
        assert_eq!(welcome(&mut p, Some(7)), vec![Event::Connected { full_sync: true }]);
        assert_eq!(p.queue(epoch(&p, 3, EpochKind::Delta)), Ok(Queued::Moot));
        assert_eq!(p.queue(epoch(&p, 4, EpochKind::Full)), Ok(Queued::Send));
        assert_eq!(p.lag(), 1);
    }
}
