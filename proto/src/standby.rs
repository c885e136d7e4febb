//! The standby's end: stage an epoch as it arrives, apply it only once its commit
//! verifies, acknowledge it. Anything out of place ends the connection and discards the
//! staged epoch; nothing partial or unverified is ever applied over a committed one.
//! The one exception is the first full epoch, while nothing is committed: its pages go
//! into the image as they come ([`Event::Lay`]), since there is no earlier image to
//! keep, and staging a whole guest would double the standby's memory. Until its commit
//! the image is not a guest anyone can resume.

use crate::buffers::Pool;
use crate::epoch::{Epoch, EpochHasher};
use crate::handshake::Identity;
use crate::frame::Received;
use crate::message::{Compression, EpochKind, Frame, Message};
use crate::pages;
use crate::ProtoError;

#[derive(Debug)]
pub enum Event {
    /// Send this frame to the primary.
    Send(Frame),
    /// A verified epoch: apply it to the image, then it is the last committed. One
    /// whose pages were laid already ([`Epoch::laid`]) leaves only its state to apply.
    Apply(Epoch),
    /// The first full epoch begins while nothing is committed: empty the image (an
    /// earlier attempt may have left pages in it); its pages follow as [`Event::Lay`].
    Clear,
    /// Pages of that epoch (addresses, zero marks and bytes), to write into the image
    /// now, in order. Zero pages need no write: the image was cleared.
    Lay(Epoch),
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

/// Released output kept for console clients that lag behind: a client resumes here
/// from its last offset, and finds it if it is no further behind than this.
pub const HISTORY_BYTES: usize = 1 << 20;

/// The console output of committed epochs, placed in the console's whole output.
#[derive(Debug, Default)]
struct History {
    /// Offset of the first byte kept.
    start: u64,
    bytes: std::collections::VecDeque<u8>,
    /// Where each committed epoch's output ends, for releases, oldest first.
    ends: std::collections::VecDeque<(u64, u64)>,
    /// Everything before this offset the primary said it released.
    released: u64,
    /// How many bytes the last committed delta added.
    last_delta_output: usize,
}

impl History {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn trim(&mut self) {
        let excess = self.bytes.len().saturating_sub(HISTORY_BYTES) as u64;
        let drop = excess.min(self.released.saturating_sub(self.start));
        self.bytes.drain(..drop as usize);
        self.start += drop;
    }
}

/// What a standby holds of the console when it takes over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Console {
    /// Offset of `released`'s first byte.
    pub start: u64,
    /// Output the primary said it released, kept for clients that resume from it.
    pub released: Vec<u8>,
    /// Output committed but not said to be released: printed at takeover, as the
    /// primary may not have.
    pub unreleased: Vec<u8>,
}

/// Decoding buffers kept for later batches: 64 MiB of full ones, as many as the frame
/// decoder keeps of frames.
const DECODED_BUFFERS: usize = 32;

pub struct Standby {
    identity: Identity,
    committed: Option<u64>,
    history: History,
    /// The frames of committed epochs the primary has not said it released, each with
    /// its epoch and NIC, oldest first.
    frames: std::collections::VecDeque<(u64, u8, Vec<u8>)>,
    phase: Phase,
    staging: Option<(Epoch, EpochHasher)>,
    /// Pages in the last epoch committed: the next one is staged in room for as many,
    /// rather than grown (and copied) batch by batch.
    last_pages: usize,
    /// Buffers compressed batches are decoded into, back once the epoch is applied.
    decoded: Pool,
    /// The addresses of an applied delta handed back by [`Standby::recycle`], to stage
    /// the next epoch's in. Its pages' bytes are the frames' own (see [`Epoch::received`]),
    /// whose buffers the frame decoder keeps for later frames.
    spare: Vec<u64>,
}

impl Standby {
    /// `committed`: the last epoch the standby's image holds, from an earlier connection.
    pub fn new(identity: Identity, committed: Option<u64>) -> Self {
        Self {
            identity,
            committed,
            history: History::default(),
            frames: std::collections::VecDeque::new(),
            phase: Phase::AwaitingHello,
            staging: None,
            last_pages: 0,
            decoded: Pool::new(DECODED_BUFFERS),
            spare: Vec::new(),
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

    /// The console as of the last committed epoch: a standby taking over prints the
    /// unreleased part before its VM runs, as the primary may never have.
    pub fn console(&self) -> Console {
        let h = &self.history;
        let split = h.released.clamp(h.start, h.end()) - h.start;
        let (released, unreleased): (Vec<u8>, Vec<u8>) = {
            let all: Vec<u8> = h.bytes.iter().copied().collect();
            let (a, b) = all.split_at(split as usize);
            (a.to_vec(), b.to_vec())
        };
        Console { start: h.start, released, unreleased }
    }

    /// The output of committed epochs that the primary had not said it released.
    pub fn unreleased_output(&self) -> Vec<u8> {
        self.console().unreleased
    }

    /// The frames of committed epochs that the primary had not said it released, each
    /// with its NIC, in the order the guest sent them: sent at takeover, before the VM
    /// runs.
    pub fn unreleased_frames(&self) -> Vec<(u8, Vec<u8>)> {
        self.frames.iter().map(|(_, nic, f)| (*nic, f.clone())).collect()
    }

    /// Takes back the commit of an epoch the VM side could not apply after all (its
    /// content was not what the checksum could vouch for) and ends the connection:
    /// `committed` is what the image still holds.
    pub fn revert(&mut self, committed: Option<u64>) {
        // The output of a delta taken back goes; that of a full epoch stays, as
        // printing output twice at a takeover is better than not at all. Its frames
        // stay: it was acknowledged, so the primary may have sent them already, and a
        // network shows a frame twice more harmlessly than a console a line.
        if self.committed != committed {
            let h = &mut self.history;
            if h.ends.back().is_some_and(|&(e, _)| Some(e) == self.committed) {
                h.ends.pop_back();
                let keep = h.bytes.len().saturating_sub(h.last_delta_output);
                h.bytes.truncate(keep);
            }
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

    /// Takes back an epoch once applied, to stage a later one in its buffers. Only a
    /// delta's are kept: a full epoch's hold the whole guest, memory better let go.
    pub fn recycle(&mut self, epoch: Epoch) {
        if epoch.kind == Some(EpochKind::Delta) && epoch.addresses.capacity() > self.spare.capacity() {
            self.spare = epoch.addresses;
        }
    }

    pub fn handle(&mut self, frame: Frame) -> Vec<Event> {
        self.handle_received(frame.into())
    }

    /// [`Standby::handle`] for a frame as the decoder yielded it: a batch's data CRC
    /// that its check worked out spares the epoch's checksum reading the pages again.
    pub fn handle_received(&mut self, received: Received) -> Vec<Event> {
        match self.step(received.frame, received.data_crc) {
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

    fn step(&mut self, frame: Frame, data_crc: Option<u32>) -> Result<Vec<Event>, (ProtoError, Option<Frame>)> {
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
                let mut addresses = std::mem::take(&mut self.spare);
                addresses.clear();
                addresses.reserve(self.last_pages);
                let laid = self.committed.is_none();
                let staged = Epoch { number: epoch, kind: Some(kind), addresses, laid, ..Epoch::default() };
                self.staging = Some((staged, EpochHasher::new(epoch)));
                Ok(if laid { vec![Event::Clear] } else { vec![] })
            }
            Message::Pages { epoch, addresses, compression, data } => {
                self.staged(epoch).map_err(|e| (e, None))?;
                let known = data_crc.filter(|_| compression == Compression::None);
                let raw = pages::decode(addresses.len(), compression, data, &self.decoded).map_err(|e| (e, None))?;
                let (staged, hasher) = self.staging.as_mut().expect("checked just above");
                match known {
                    Some(crc) => {
                        hasher.addresses(&addresses);
                        hasher.data_crc(&crc32fast::Hasher::new_with_initial_len(crc, raw.len() as u64));
                    }
                    None => {
                        hasher.addresses(&addresses);
                        raw.pieces().iter().for_each(|p| hasher.data(p));
                    }
                }
                staged.addresses.extend_from_slice(&addresses);
                if staged.laid {
                    let n = addresses.len();
                    return Ok(vec![Event::Lay(Epoch { addresses, zero: vec![false; n], received: raw.into_pieces(), ..Epoch::default() })]);
                }
                staged.received.extend(raw.into_pieces());
                staged.zero.resize(staged.addresses.len(), false);
                Ok(vec![])
            }
            Message::ZeroPages { epoch, addresses } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                hasher.zero_pages(&addresses);
                staged.addresses.extend_from_slice(&addresses);
                if staged.laid {
                    let n = addresses.len();
                    return Ok(vec![Event::Lay(Epoch { addresses, zero: vec![true; n], ..Epoch::default() })]);
                }
                staged.zero.resize(staged.addresses.len(), true);
                Ok(vec![])
            }
            Message::Output { epoch, offset, bytes } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                if staged.output.is_empty() {
                    staged.output_offset = offset;
                } else if offset != staged.output_offset + staged.output.len() as u64 {
                    return Err(out_of_order(format!("output at offset {offset} in epoch {epoch}, not where its last ended")));
                }
                hasher.output(offset, &bytes);
                staged.output.extend_from_slice(&bytes);
                Ok(vec![])
            }
            Message::Frame { epoch, nic, bytes } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                hasher.frame(nic, &bytes);
                staged.frames.push((nic, bytes));
                Ok(vec![])
            }
            Message::Verify { epoch, first, pages, digest } => {
                let (staged, hasher) = self.staged(epoch).map_err(|e| (e, None))?;
                let v = crate::verify::Verify { first, pages, digest };
                if staged.verify.replace(v).is_some() {
                    return Err(out_of_order(format!("two checks in epoch {epoch}")));
                }
                hasher.verify(&v);
                Ok(vec![])
            }
            Message::Released { epoch } => {
                if !matches!(self.committed, Some(c) if epoch <= c) {
                    return Err(out_of_order(format!("a release of epoch {epoch}, which is not committed")));
                }
                let h = &mut self.history;
                while let Some(&(e, end)) = h.ends.front() {
                    if e > epoch {
                        break;
                    }
                    h.released = h.released.max(end);
                    h.ends.pop_front();
                }
                h.trim();
                while self.frames.front().is_some_and(|(e, ..)| *e <= epoch) {
                    self.frames.pop_front();
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
                let (mut staged, hasher) = self.staging.take().expect("checked just above");
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
                let h = &mut self.history;
                if staged.kind == Some(EpochKind::Full) {
                    // A full epoch carries all output not yet released, from where the
                    // released output ends.
                    *h = History { start: staged.output_offset, released: staged.output_offset, ..History::default() };
                    // And all frames not yet released.
                    self.frames.clear();
                } else if !staged.output.is_empty() && staged.output_offset != h.end() {
                    return Err(bad(format!("its output starts at offset {}, where {} was due", staged.output_offset, h.end())));
                }
                h.last_delta_output = if staged.kind == Some(EpochKind::Full) { 0 } else { staged.output.len() };
                if !staged.output.is_empty() {
                    h.bytes.extend(&staged.output);
                    h.ends.push_back((epoch, h.end()));
                }
                self.frames.extend(staged.frames.drain(..).map(|(nic, f)| (epoch, nic, f)));
                self.committed = Some(epoch);
                self.last_pages = staged.addresses.len();
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
        Message::ZeroPages { .. } => "zero pages",
        Message::State { .. } => "state",
        Message::EpochCommit { .. } => "epoch commit",
        Message::Ack { .. } => "ack",
        Message::Output { .. } => "output",
        Message::Frame { .. } => "frame",
        Message::Verify { .. } => "verify",
        Message::Released { .. } => "release",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Goodbye { .. } => "goodbye",
        Message::WitnessAsk(_) => "witness ask",
        Message::WitnessAnswer(_) => "witness answer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    fn commit(standby: &mut Standby, number: u64, kind: EpochKind, output: &[u8]) {
        let output_offset = standby.history.end();
        commit_at(standby, number, kind, output_offset, output);
    }

    fn commit_at(standby: &mut Standby, number: u64, kind: EpochKind, output_offset: u64, output: &[u8]) {
        feed(standby, Epoch { number, kind: Some(kind), state: vec![1], output: output.to_vec(), output_offset, ..Epoch::default() });
    }

    /// Hands the standby every message of `epoch`, none of which may end the connection.
    fn feed(standby: &mut Standby, epoch: Epoch) {
        for frame in epoch.frames(1).unwrap() {
            for event in standby.handle(frame) {
                assert!(!matches!(event, Event::Close(_)), "{event:?}");
            }
        }
    }

    #[test]
    fn only_the_first_full_epoch_is_laid_as_it_comes_and_a_later_one_is_staged() {
        let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
        let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        standby.handle(primary.hello());
        let mut data = vec![7u8; crate::message::PAGE_SIZE];
        data.extend(vec![0u8; crate::message::PAGE_SIZE]);
        let epoch = |number, kind| Epoch { number, kind: Some(kind), addresses: vec![0x1000, 0x2000], data: data.clone(), state: vec![1], ..Epoch::default() };
        let events: Vec<_> = epoch(1, EpochKind::Full).frames(1).unwrap().into_iter().flat_map(|f| standby.handle(f)).collect();
        match &events[..] {
            [Event::Clear, Event::Lay(zero), Event::Lay(raw), Event::Apply(applied), Event::Send(ack)] => {
                assert_eq!((&zero.addresses, &zero.zero), (&vec![0x2000], &vec![true]));
                assert_eq!((&raw.addresses, raw.page_bytes()), (&vec![0x1000], vec![data[..4096].to_vec()]));
                assert!(applied.laid && applied.received.is_empty() && applied.addresses.len() == 2);
                assert!(matches!(ack.message, Message::Ack { epoch: 1 }));
            }
            other => panic!("{other:?}"),
        }
        // With epoch 1 committed, a re-sync must not touch the image before it commits.
        let events: Vec<_> = epoch(2, EpochKind::Full).frames(1).unwrap().into_iter().flat_map(|f| standby.handle(f)).collect();
        match &events[..] {
            [Event::Apply(applied), Event::Send(_)] => assert!(!applied.laid && applied.page_bytes().len() == 1),
            other => panic!("{other:?}"),
        }
        // A first full epoch that fails its checksum is never applied, only laid.
        let mut fresh = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        fresh.handle(primary.hello());
        let mut frames = epoch(1, EpochKind::Full).frames(1).unwrap();
        if let Some(Frame { message: Message::EpochCommit { checksum, .. }, .. }) = frames.last_mut() {
            *checksum ^= 1;
        }
        let events: Vec<_> = frames.into_iter().flat_map(|f| fresh.handle(f)).collect();
        assert!(!events.iter().any(|e| matches!(e, Event::Apply(_))) && matches!(events.last(), Some(Event::Close(_))), "{events:?}");
        assert_eq!(fresh.committed(), None);
    }

    #[test]
    fn a_batchs_data_crc_from_its_frame_counts_in_the_epochs_checksum() {
        let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
        let data: Vec<u8> = (0..2 * crate::message::PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let epoch = Epoch { number: 1, kind: Some(EpochKind::Full), addresses: vec![0x1000, 0x2000], data: data.clone(), state: vec![1], ..Epoch::default() };
        // Each page batch handed over with `crc` as its data's, as the decoder would.
        let run = |crc: u32| {
            let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
            standby.handle(primary.hello());
            let frames = epoch.frames(1).unwrap().into_iter();
            let received = frames.map(|frame| {
                let pages = matches!(frame.message, Message::Pages { .. });
                Received { frame, data_crc: pages.then_some(crc) }
            });
            received.flat_map(|r| standby.handle_received(r)).collect::<Vec<_>>()
        };
        let right = run(crc32fast::hash(&data));
        assert!(right.iter().any(|e| matches!(e, Event::Send(Frame { message: Message::Ack { epoch: 1 }, .. }))), "{right:?}");
        let wrong = run(crc32fast::hash(&data) ^ 1);
        assert!(matches!(wrong.last(), Some(Event::Close(_))), "{wrong:?}");
        assert!(!wrong.iter().any(|e| matches!(e, Event::Send(Frame { message: Message::Ack { .. }, .. }))), "{wrong:?}");
    }

    #[test]
    fn an_epochs_replica_check_arrives_with_it_and_only_once() {
        let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
        let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        standby.handle(primary.hello());
        let verify = crate::verify::Verify { first: 0x2000, pages: 4, digest: 99 };
        let epoch = Epoch { number: 1, kind: Some(EpochKind::Full), state: vec![1], verify: Some(verify), ..Epoch::default() };
        let applied: Vec<_> = epoch.frames(1).unwrap().into_iter().flat_map(|f| standby.handle(f)).collect();
        assert!(applied.iter().any(|e| matches!(e, Event::Apply(ep) if ep.verify == Some(verify))), "{applied:?}");
        // The check is covered by the epoch's checksum, and an epoch holds one.
        let mut frames = Epoch { number: 2, kind: Some(EpochKind::Delta), state: vec![1], verify: Some(verify), ..Epoch::default() }.frames(1).unwrap();
        let check = frames.iter().position(|f| matches!(f.message, Message::Verify { .. })).unwrap();
        frames.insert(check, frames[check].clone());
        let events: Vec<_> = frames.into_iter().flat_map(|f| standby.handle(f)).collect();
        assert!(events.iter().any(|e| matches!(e, Event::Close(_))), "{events:?}");
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
        // A full re-sync carries all unreleased output itself, from where the released
        // output ended.
        commit_at(&mut standby, 5, EpochKind::Full, 12, b"tick 2 tick 3 ");
        assert_eq!(standby.unreleased_output(), b"tick 2 tick 3 ");
        assert_eq!(standby.console(), Console { start: 12, released: vec![], unreleased: b"tick 2 tick 3 ".to_vec() });
        standby.handle(Frame { generation: 1, message: Message::Released { epoch: 5 } });
        commit(&mut standby, 6, EpochKind::Delta, b"tick 4 ");
        assert_eq!(standby.console(), Console { start: 12, released: b"tick 2 tick 3 ".to_vec(), unreleased: b"tick 4 ".to_vec() });
        // Output that does not follow on from the last is refused.
        let out = {
            let epoch = Epoch { number: 7, kind: Some(EpochKind::Delta), state: vec![1], output: b"x".to_vec(), output_offset: 99, ..Epoch::default() };
            epoch.frames(1).unwrap().into_iter().flat_map(|f| standby.handle(f)).collect::<Vec<_>>()
        };
        assert!(matches!(out.last(), Some(Event::Close(_))), "{out:?}");
        // A release of an epoch not yet held is a protocol error.
        let out = standby.handle(Frame { generation: 1, message: Message::Released { epoch: 9 } });
        assert!(matches!(out.last(), Some(Event::Close(_))), "{out:?}");
    }

    fn commit_frames(standby: &mut Standby, number: u64, kind: EpochKind, frames: &[(u8, &[u8])]) {
        let frames = frames.iter().map(|(nic, f)| (*nic, f.to_vec())).collect();
        feed(standby, Epoch { number, kind: Some(kind), state: vec![1], frames, ..Epoch::default() });
    }

    #[test]
    fn frames_the_primary_has_not_released_are_kept_until_it_says_so() {
        let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
        let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        standby.handle(primary.hello());
        commit_frames(&mut standby, 1, EpochKind::Full, &[(0, b"a")]);
        commit_frames(&mut standby, 2, EpochKind::Delta, &[(1, b"b"), (0, b"c")]);
        commit_frames(&mut standby, 3, EpochKind::Delta, &[]);
        let frames = |s: &Standby| s.unreleased_frames().into_iter().map(|(n, f)| (n, f[0])).collect::<Vec<_>>();
        assert_eq!(frames(&standby), [(0, b'a'), (1, b'b'), (0, b'c')]);
        standby.handle(Frame { generation: 1, message: Message::Released { epoch: 1 } });
        assert_eq!(frames(&standby), [(1, b'b'), (0, b'c')]);
        // A frame of an epoch whose commit never came is never sent.
        let partial = Epoch { number: 4, kind: Some(EpochKind::Delta), state: vec![1], frames: vec![(0, b"d".to_vec())], ..Epoch::default() };
        let mut wire = partial.frames(1).unwrap();
        wire.pop();
        wire.into_iter().for_each(|f| drop(standby.handle(f)));
        assert_eq!(frames(&standby), [(1, b'b'), (0, b'c')]);
        // A full re-sync carries every unreleased frame itself.
        standby.reconnect();
        standby.handle(primary.hello());
        commit_frames(&mut standby, 5, EpochKind::Full, &[(0, b"c"), (0, b"d")]);
        assert_eq!(frames(&standby), [(0, b'c'), (0, b'd')]);
        standby.handle(Frame { generation: 1, message: Message::Released { epoch: 5 } });
        assert!(standby.unreleased_frames().is_empty());
    }
}
