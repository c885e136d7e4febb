//! The standby's end: stage an epoch as it arrives, apply it only once its commit
//! verifies, acknowledge it. Anything out of place ends the connection and discards the
//! staged epoch; nothing partial or unverified is ever applied.

use crate::epoch::{Epoch, EpochHasher};
use crate::handshake::Identity;
use crate::message::{EpochKind, Frame, Message};
use crate::ProtoError;

#[derive(Debug)]
pub enum Event {
    /// Send this frame to the primary.
    Send(Frame),
    /// A verified epoch: apply it to the image, then it is the last committed.
    Apply(Epoch),
    /// The primary said goodbye on purpose.
    PeerLeft(String),
    /// The connection must end; the staged epoch was discarded.
    Close(ProtoError),
}

enum Phase {
    AwaitingHello,
    Following { generation: u64 },
    Closed,
}

pub struct Standby {
    identity: Identity,
    committed: Option<u64>,
    /// The latest epoch whose output the primary said it releases.
    released: Option<u64>,
    /// Output of committed epochs after `released`, oldest first.
    unreleased: std::collections::VecDeque<(u64, Vec<u8>)>,
    phase: Phase,
    staging: Option<(Epoch, EpochHasher)>,
}

impl Standby {
    /// `committed`: the last epoch the standby's image holds, from an earlier connection.
    pub fn new(identity: Identity, committed: Option<u64>) -> Self {
        Self {
            identity,
            committed,
            released: None,
            unreleased: Default::default(),
            phase: Phase::AwaitingHello,
            staging: None,
        }
    }

    /// The generation the standby follows: raised to a newer primary's on handshake.
    pub fn generation(&self) -> u64 {
        self.identity.generation
    }

    /// The last epoch applied; `None` while not even the initial sync has completed,
    /// when the standby must not take over.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Whether a primary has been accepted on this connection (heartbeats may flow).
    pub fn is_following(&self) -> bool {
        matches!(self.phase, Phase::Following { .. })
    }

    /// The output of committed epochs that the primary had not said it released: a
    /// standby taking over prints it before its VM runs, as the primary never did.
    pub fn unreleased_output(&self) -> Vec<u8> {
        self.unreleased.iter().flat_map(|(_, b)| b.iter().copied()).collect()
    }

    /// Takes back the commit of an epoch the VM side could not apply after all (its
    /// content was not what the checksum could vouch for) and ends the connection:
    /// `committed` is what the image still holds.
    pub fn revert(&mut self, committed: Option<u64>) {
        if self.committed != committed {
            self.unreleased.pop_back();
        }
        self.committed = committed;
        self.phase = Phase::Closed;
        self.staging = None;
    }

    /// A new connection: a hello is expected first, and nothing staged survives.
    pub fn reconnect(&mut self) {
        self.phase = Phase::AwaitingHello;
        self.staging = None;
    }

    pub fn handle(&mut self, frame: Frame) -> Vec<Event> {
        match self.step(frame) {
            Ok(events) => events,
            Err((error, reply)) => {
                self.phase = Phase::Closed;
                self.staging = None;
                let mut out: Vec<Event> = reply.into_iter().map(Event::Send).collect();
                out.push(Event::Close(error));
                out
            }
        }
    }

    fn step(&mut self, frame: Frame) -> Result<Vec<Event>, (ProtoError, Option<Frame>)> {
        let out_of_order = |what: String| (ProtoError::OutOfOrder(what), None);
        let generation = match self.phase {
            Phase::Closed => return Err(out_of_order("a frame after the connection failed".into())),
            Phase::AwaitingHello => {
                return match self.identity.judge(&frame) {
                    Ok(generation) => {
                        self.identity.generation = generation;
                        self.phase = Phase::Following { generation };
                        Ok(vec![
                            Event::Send(self.identity.hello()),
                            Event::Send(Frame { generation, message: Message::Welcome { committed: self.committed } }),
                        ])
                    }
                    Err(refusal) => {
                        let reply = Frame { generation: self.identity.generation, message: Message::Refused(refusal.clone()) };
                        Err((refusal.into(), Some(reply)))
                    }
                };
            }
            Phase::Following { generation } => generation,
        };
        if frame.generation != generation {
            return Err(out_of_order(format!("a frame of generation {} in generation {generation}", frame.generation)));
        }
        match frame.message {
            Message::EpochBegin { epoch, kind } => {
                if let Some((staged, _)) = &self.staging {
                    return Err(out_of_order(format!("epoch {epoch} began before epoch {} was committed", staged.number)));
                }
                // A delta must follow the last committed epoch; a full one (a re-sync)
                // replaces everything, and only has to be newer.
                match (self.committed, kind) {
                    (None, EpochKind::Delta) => return Err(out_of_order(format!("delta epoch {epoch} before any full one"))),
                    (Some(c), EpochKind::Delta) if epoch != c + 1 => {
                        return Err(out_of_order(format!("epoch {epoch} where {} was due", c + 1)))
                    }
                    (Some(c), EpochKind::Full) if epoch <= c => {
                        return Err(out_of_order(format!("full epoch {epoch} after epoch {c}")))
                    }
                    _ => {}
                }
                let staged = Epoch { number: epoch, kind: Some(kind), ..Epoch::default() };
                self.staging = Some((staged, EpochHasher::new(epoch)));
                Ok(vec![])
            }
            Message::Pages { epoch, addresses, data, .. } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                hasher.pages(&addresses, &data);
                staged.addresses.extend_from_slice(&addresses);
                staged.data.extend_from_slice(&data);
                Ok(vec![])
            }
            Message::Output { epoch, bytes } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                hasher.output(&bytes);
                staged.output.extend_from_slice(&bytes);
                Ok(vec![])
            }
            Message::Released { epoch } => {
                if !matches!(self.committed, Some(c) if epoch <= c) {
                    return Err(out_of_order(format!("a release of epoch {epoch}, which is not committed")));
                }
                self.released = self.released.max(Some(epoch));
                while self.unreleased.front().is_some_and(|(e, _)| *e <= epoch) {
                    self.unreleased.pop_front();
                }
                Ok(vec![])
            }
            Message::State { epoch, state } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                if !staged.state.is_empty() {
                    return Err(out_of_order(format!("a second state for epoch {epoch}")));
                }
                hasher.state(&state);
                staged.state = state;
                Ok(vec![])
            }
            Message::EpochCommit { epoch, pages, checksum } => {
                self.staged(epoch).map_err(|e| (e, None))?;
                let (staged, hasher) = self.staging.take().expect("checked just above");
                let bad = |why: String| (ProtoError::BadEpoch { epoch, why }, None);
                if staged.state.is_empty() {
                    return Err(bad("no machine state".into()));
                }
                if staged.addresses.len() as u64 != pages {
                    return Err(bad(format!("{} pages arrived of {pages}", staged.addresses.len())));
                }
                if hasher.finish() != checksum {
                    return Err(bad("checksum mismatch".into()));
                }
                self.committed = Some(epoch);
                if staged.kind == Some(EpochKind::Full) {
                    // A full epoch carries all output not yet released.
                    self.unreleased.clear();
                }
                if !staged.output.is_empty() {
                    self.unreleased.push_back((epoch, staged.output.clone()));
                }
                Ok(vec![Event::Apply(staged), Event::Send(Frame { generation, message: Message::Ack { epoch } })])
            }
            Message::Heartbeat { .. } => Ok(vec![]),
            Message::Goodbye { reason } => {
                self.staging = None;
                self.phase = Phase::Closed;
                Ok(vec![Event::PeerLeft(reason)])
            }
            other => Err(out_of_order(format!("unexpected {}", name(&other)))),
        }
    }

    fn staged(&mut self, epoch: u64) -> Result<&mut (Epoch, EpochHasher), ProtoError> {
        match self.staging.as_ref().map(|s| s.0.number) {
            Some(n) if n == epoch => Ok(self.staging.as_mut().expect("just seen")),
            Some(n) => Err(ProtoError::OutOfOrder(format!("data of epoch {epoch} during epoch {n}"))),
            None => Err(ProtoError::OutOfOrder(format!("data of epoch {epoch} outside any epoch"))),
        }
    }
}

/// A message's kind, for error messages.
pub(crate) fn name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "hello",
        Message::Welcome { .. } => "welcome",
        Message::Refused(_) => "refusal",
        Message::EpochBegin { .. } => "epoch begin",
        Message::Pages { .. } => "pages",
        Message::State { .. } => "state",
        Message::EpochCommit { .. } => "epoch commit",
        Message::Ack { .. } => "ack",
        Message::Output { .. } => "output",
        Message::Released { .. } => "release",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Goodbye { .. } => "goodbye",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    fn commit(standby: &mut Standby, number: u64, kind: EpochKind, output: &[u8]) {
        let epoch = Epoch { number, kind: Some(kind), state: vec![1], output: output.to_vec(), ..Epoch::default() };
        for frame in epoch.frames(1) {
            for event in standby.handle(frame) {
                assert!(!matches!(event, Event::Close(_)), "{event:?}");
            }
        }
    }

    #[test]
    fn output_the_primary_has_not_released_is_kept_until_it_says_so() {
        let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
        let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        standby.handle(primary.hello());
        commit(&mut standby, 1, EpochKind::Full, b"boot ");
        commit(&mut standby, 2, EpochKind::Delta, b"tick 1 ");
        commit(&mut standby, 3, EpochKind::Delta, b"");
        assert_eq!(standby.unreleased_output(), b"boot tick 1 ");
        standby.handle(Frame { generation: 1, message: Message::Released { epoch: 2 } });
        assert_eq!(standby.unreleased_output(), b"");
        commit(&mut standby, 4, EpochKind::Delta, b"tick 2 ");
        assert_eq!(standby.unreleased_output(), b"tick 2 ");
        // A full re-sync carries all unreleased output itself.
        commit(&mut standby, 5, EpochKind::Full, b"tick 2 tick 3 ");
        assert_eq!(standby.unreleased_output(), b"tick 2 tick 3 ");
        // A release of an epoch not yet held is a protocol error.
        let out = standby.handle(Frame { generation: 1, message: Message::Released { epoch: 9 } });
        assert!(matches!(out.last(), Some(Event::Close(_))), "{out:?}");
    }
}
