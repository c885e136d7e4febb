//! A primary and a standby driven against each other in one process, through a link
//! that loses, reorders, duplicates and corrupts whole messages, with a guest whose
//! memory changes between epochs. Whatever the link does, the standby only ever applies
//! an epoch exactly as the primary captured it, and the primary releases an epoch's
//! output only once the standby holds it.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use common::Rng;
use tandem_proto::epoch::Epoch;
use tandem_proto::handshake::Identity;
use tandem_proto::message::{EpochKind, Frame, Message, Role, PAGE_SIZE};
use tandem_proto::primary::{self, Primary};
use tandem_proto::standby::{self, Standby};
use tandem_proto::ProtoError;

const PAGES: usize = 24;

#[derive(Clone, Copy)]
struct Faults {
    loss: u64,
    reorder: u64,
    duplicate: u64,
    corrupt: u64,
}

const CLEAN: Faults = Faults { loss: 0, reorder: 0, duplicate: 0, corrupt: 0 };

struct World {
    rng: Rng,
    faults: Faults,
    primary: Primary,
    standby: Standby,
    to_standby: VecDeque<Frame>,
    to_primary: VecDeque<Frame>,
    guest: Vec<u8>,
    dirty: BTreeSet<usize>,
    full_sync_due: bool,
    /// Where the next epoch's console output starts.
    console_offset: u64,
    /// What each epoch captured: the guest's memory and state.
    captured: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    image: Vec<u8>,
    image_state: Vec<u8>,
    released: u64,
    applied: u64,
    closes: u64,
}

impl World {
    fn new(seed: u64, faults: Faults) -> Self {
        let id = |role| Identity { role, fingerprint: 0xfeed, generation: 1 };
        let mut w = Self {
            rng: Rng(seed),
            faults,
            primary: Primary::new(id(Role::Primary), 4),
            standby: Standby::new(id(Role::Standby), None),
            to_standby: VecDeque::new(),
            to_primary: VecDeque::new(),
            guest: vec![0; PAGES * PAGE_SIZE],
            dirty: BTreeSet::new(),
            full_sync_due: false,
            console_offset: 0,
            captured: BTreeMap::new(),
            image: vec![0; PAGES * PAGE_SIZE],
            image_state: Vec::new(),
            released: 0,
            applied: 0,
            closes: 0,
        };
        w.connect();
        w
    }

    fn connect(&mut self) {
        self.to_standby.clear();
        self.to_primary.clear();
        self.standby.reconnect();
        let hello = self.primary.connect();
        self.send_to_standby(hello);
    }

    fn reconnect(&mut self) {
        self.closes += 1;
        self.primary.disconnect();
        self.connect();
    }

    /// Puts a frame on the link, which may lose, corrupt, repeat or reorder it.
    fn send_to_standby(&mut self, mut frame: Frame) {
        let f = self.faults;
        if self.rng.chance(f.loss) {
            return;
        }
        if self.rng.chance(f.corrupt) {
            if let Message::Pages { data, .. } = &mut frame.message {
                let i = (self.rng.next() as usize) % data.len();
                let mut flipped = data.contiguous().to_vec();
                flipped[i] ^= 0x40;
                *data = flipped.into();
            }
        }
        if self.rng.chance(f.duplicate) {
            self.to_standby.push_back(frame.clone());
        }
        if self.rng.chance(f.reorder) && !self.to_standby.is_empty() {
            let at = self.to_standby.len() - 1;
            self.to_standby.insert(at, frame);
        } else {
            self.to_standby.push_back(frame);
        }
    }

    fn guest_runs(&mut self) {
        for _ in 0..(self.rng.next() % 4) {
            let page = (self.rng.next() as usize) % PAGES;
            let byte = (self.rng.next() as usize) % PAGE_SIZE;
            if self.rng.next() % 8 == 0 {
                // Cleared, as a guest frees and zeroes memory: it goes as a zero marker.
                self.guest[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(0);
            } else {
                self.guest[page * PAGE_SIZE + byte] = self.rng.next() as u8;
            }
            self.dirty.insert(page);
        }
    }

    fn epoch(&mut self) {
        if !self.primary.can_send() {
            return;
        }
        let kind = if self.full_sync_due { EpochKind::Full } else { EpochKind::Delta };
        let pages: Vec<usize> = match kind {
            EpochKind::Full => (0..PAGES).collect(),
            EpochKind::Delta => self.dirty.iter().copied().collect(),
        };
        let addresses = pages.iter().map(|&p| (p * PAGE_SIZE) as u64).collect();
        let data = pages.iter().flat_map(|&p| self.guest[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].to_vec()).collect();
        let state = format!("cpu state {}", self.rng.next()).into_bytes();
        let output = format!("console of epoch {}\n", self.primary.next_epoch()).into_bytes();
        let offset = self.console_offset;
        self.console_offset += output.len() as u64;
        let mut epoch = Epoch { kind: Some(kind), addresses, data, state: state.clone(), output, output_offset: offset, ..Epoch::default() };
        let encoded = self.primary.send_epoch(&mut epoch, None).unwrap();
        self.captured.insert(encoded.number, (self.guest.clone(), state));
        self.dirty.clear();
        self.full_sync_due = false;
        for frame in from_wire(&encoded.frames) {
            self.send_to_standby(frame);
        }
    }

    /// Delivers one frame each way, if any, and acts on what comes of it.
    fn deliver(&mut self) {
        if let Some(frame) = self.to_standby.pop_front() {
            for event in self.standby.handle(frame) {
                match event {
                    standby::Event::Send(f) => self.to_primary.push_back(f),
                    standby::Event::Clear => self.image.fill(0),
                    standby::Event::Lay(pages) => pages.write_into(&mut self.image),
                    standby::Event::Apply(epoch) => {
                        epoch.write_into(&mut self.image);
                        self.image_state = epoch.state.clone();
                        let (memory, state) = &self.captured[&epoch.number];
                        assert!(self.image == *memory && self.image_state == *state, "epoch {} applied wrong", epoch.number);
                        assert!(epoch.number > self.applied || epoch.kind == Some(EpochKind::Full));
                        self.applied = epoch.number;
                    }
                    standby::Event::PeerLeft(_) => unreachable!("nobody says goodbye here"),
                    standby::Event::Close(e) => {
                        assert!(matches!(e, ProtoError::OutOfOrder(_) | ProtoError::BadEpoch { .. } | ProtoError::Invalid(_)), "{e}");
                        self.reconnect();
                        return;
                    }
                }
            }
        }
        if let Some(frame) = self.to_primary.pop_front() {
            for event in self.primary.handle(frame) {
                match event {
                    primary::Event::Send(f) => self.send_to_standby(f),
                    primary::Event::SendEpoch(frames) => from_wire(&frames).into_iter().for_each(|f| self.send_to_standby(f)),
                    primary::Event::Connected { full_sync } => self.full_sync_due |= full_sync,
                    primary::Event::Released(e) => {
                        // Output commit: only what the standby holds.
                        assert!(Some(e) <= self.standby.committed(), "released {e} beyond the standby's {:?}", self.standby.committed());
                        assert!(e >= self.released);
                        self.released = e;
                    }
                    primary::Event::PeerLeft(_) => unreachable!("nobody says goodbye here"),
                    primary::Event::Close(e) => panic!("the primary closed: {e}"),
                }
            }
        }
    }

    /// A lost message can leave both sides waiting: the primary for a welcome or an
    /// ack. Its handshake and ack timeouts then end the connection, and it starts again.
    fn timeouts(&mut self) {
        let idle = self.to_standby.is_empty() && self.to_primary.is_empty();
        if idle && (!self.primary.is_protecting() || self.primary.lag() > 0) {
            self.reconnect();
        }
    }

    fn settle(&mut self) {
        self.faults = CLEAN;
        for _ in 0..10_000 {
            let idle = self.to_standby.is_empty() && self.to_primary.is_empty();
            if idle && self.primary.is_protecting() && self.primary.lag() == 0 && !self.full_sync_due {
                break;
            }
            self.timeouts();
            // No new guest writes: only a re-sync the standby asked for is sent.
            if self.full_sync_due {
                self.epoch();
            }
            self.deliver();
        }
    }
}

/// The frames an encoded epoch's chunks carry: the simulated link damages frames, not
/// bytes.
fn from_wire(chunks: &[bytes::Bytes]) -> Vec<Frame> {
    let mut decoder = tandem_proto::frame::Decoder::default();
    let mut frames = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
    }
    assert!(decoder.is_empty());
    frames
}

fn run(seed: u64, faults: Faults, steps: usize) -> World {
    let mut w = World::new(seed, faults);
    for step in 0..steps {
        w.guest_runs();
        if step % 3 == 0 {
            w.epoch();
        }
        w.deliver();
        w.timeouts();
    }
    w.settle();
    // Everything captured is at the standby, and released.
    let last = *w.captured.keys().last().expect("some epochs");
    assert_eq!(w.standby.committed(), Some(last), "seed {seed}");
    assert_eq!(w.released, last, "seed {seed}");
    assert_eq!(w.image, w.captured[&last].0);
    w
}

#[test]
fn a_clean_link_replicates_every_epoch_in_order() {
    let w = run(1, CLEAN, 600);
    assert_eq!(w.closes, 0);
    assert!(w.applied > 100, "{}", w.applied);
}

#[test]
fn lost_reordered_repeated_and_corrupted_messages_never_apply_a_wrong_epoch() {
    let faults = Faults { loss: 20, reorder: 20, duplicate: 20, corrupt: 20 };
    let mut closes = 0;
    for seed in 1..=200 {
        closes += run(seed * 7919, faults, 300).closes;
    }
    assert!(closes > 200, "the faults should have forced reconnects: {closes}");
}

#[test]
fn a_standby_that_lost_its_image_gets_a_full_resync() {
    let mut w = run(3, CLEAN, 100);
    // A new standby process with nothing committed, same generation.
    w.standby = Standby::new(Identity { role: Role::Standby, fingerprint: 0xfeed, generation: 1 }, None);
    w.image = vec![0; PAGES * PAGE_SIZE];
    w.reconnect();
    for _ in 0..50 {
        w.guest_runs();
        w.epoch();
        w.deliver();
    }
    w.settle();
    let last = *w.captured.keys().last().unwrap();
    assert_eq!(w.standby.committed(), Some(last));
    assert_eq!(w.image, w.captured[&last].0);
}

#[test]
fn a_promoted_standby_refuses_the_old_primary() {
    let old = Identity { role: Role::Primary, fingerprint: 1, generation: 4 };
    let mut promoted = Standby::new(Identity { role: Role::Standby, fingerprint: 1, generation: 5 }, Some(9));
    let events = promoted.handle(old.hello());
    assert!(matches!(&events[..], [standby::Event::Send(Frame { message: Message::Refused(_), .. }), standby::Event::Close(ProtoError::Refused(_))]), "{events:?}");
    // And the old primary, reading that refusal, stops.
    let mut primary = Primary::new(old, 4);
    primary.connect();
    let standby::Event::Send(refusal) = &events[0] else { unreachable!() };
    let out = primary.handle(refusal.clone());
    assert!(matches!(&out[..], [primary::Event::Close(ProtoError::Refused(_))]), "{out:?}");
}
