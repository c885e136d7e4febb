//! One epoch's content, how it is cut into messages, and the checksum both ends compute
//! over it in the order it was sent.

use bytes::Bytes;

use crate::message::{EpochKind, Frame, Message, MAX_BATCH_PAGES, MAX_OUTPUT_BYTES, PAGE_SIZE};
use crate::verify::Verify;
use crate::{buffers, frame, pages, ProtoError};

/// What an epoch carries: pages (an address may repeat; the later copy wins) and the
/// machine state as of the epoch's pause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pub number: u64,
    pub kind: Option<EpochKind>,
    pub addresses: Vec<u64>,
    /// On a primary, every page's bytes, one page after another. A standby holds its
    /// pages' bytes in `received` instead.
    pub data: Vec<u8>,
    /// On a primary, each page's CRC-32 ([`crate::crc::page`]) as the capture took it
    /// from the bytes in `data`, so that encoding need not read the pages again; empty
    /// when not taken, and then computed while encoding. A wrong one cannot make a
    /// wrong page pass: the standby's check of the frame (raw pages) or of the epoch
    /// (compressed ones, checked as decompressed) fails.
    pub page_crcs: Vec<u32>,
    /// On a standby, the bytes of the pages `zero` does not mark, as they arrived: the
    /// pieces of the stream that carried them (or their decompression), kept rather
    /// than copied until the epoch commits, a page perhaps straddling two. They follow
    /// those in `data`.
    pub received: Vec<Bytes>,
    /// On a standby: its pages went into the image as they arrived (the first full
    /// epoch, see [`crate::standby::Event::Lay`]); `addresses` counts them, and only
    /// the state is left to apply.
    pub laid: bool,
    /// Per address, on a standby: whether the page came as a zero marker, and so is all
    /// zeros and has no bytes held. Empty: every page has its bytes held. Staging
    /// a marker as 4 KiB of zeros cost a fill and a copy per page (most of a booting
    /// guest's pages).
    pub zero: Vec<bool>,
    pub state: Vec<u8>,
    /// The guest's console output during the epoch.
    pub output: Vec<u8>,
    /// Where `output` starts in the console's whole output.
    pub output_offset: u64,
    /// The frames the guest's NICs sent during the epoch, each with its NIC's index.
    pub frames: Vec<(u8, Vec<u8>)>,
    /// Compress pages on the wire where it pays (see [`crate::pages`]).
    pub compress: bool,
    /// A slice of the guest the standby checks its image against once it has applied
    /// the epoch.
    pub verify: Option<Verify>,
}

impl Epoch {
    /// The bytes of each page not marked zero, in order, copied out of wherever they
    /// are held: for checks, not for the image (which takes [`Epoch::pieces`]).
    pub fn page_bytes(&self) -> Vec<Vec<u8>> {
        let all: Vec<u8> = self.pieces().concat();
        all.chunks_exact(PAGE_SIZE).map(<[u8]>::to_vec).collect()
    }

    /// Writes the epoch's pages into `memory`, a flat image addressed from 0 (a zero
    /// marker clears its page; a laid epoch's pages are there already). Through a copy
    /// of every page: for simulations, where a standby's image takes [`Epoch::pieces`].
    pub fn write_into(&self, memory: &mut [u8]) {
        if self.laid {
            return;
        }
        let bytes = self.page_bytes();
        let mut bytes = bytes.iter();
        for (i, &a) in self.addresses.iter().enumerate() {
            let to = &mut memory[a as usize..a as usize + PAGE_SIZE];
            if self.zero.get(i).copied().unwrap_or(false) {
                to.fill(0);
            } else if let Some(page) = bytes.next() {
                to.copy_from_slice(page);
            }
        }
    }

    /// The pages' bytes in the pieces they are held in, `data` first: what an image
    /// takes to apply them. A page may straddle pieces.
    pub fn pieces(&self) -> Vec<&[u8]> {
        std::iter::once(&self.data[..]).filter(|d| !d.is_empty()).chain(self.received.iter().map(|r| &r[..])).collect()
    }

    /// Bytes of the pages held, `data` and `received` together.
    pub fn page_data_len(&self) -> usize {
        self.data.len() + self.received.iter().map(Bytes::len).sum::<usize>()
    }

    /// The epoch as encoded frames of `generation` (begin, page batches, output,
    /// state, commit), as the chunks that go on the wire one after the other, and the
    /// payload bytes they carry (pages as sent, addresses, state, output): what
    /// compression and zero-page markers leave of the epoch. The pages are copied;
    /// [`Epoch::encode_taking`] sends them from where they are.
    pub fn encode(&self, generation: u64) -> Result<(Vec<Bytes>, usize), ProtoError> {
        self.encode_pages_of(generation, Bytes::copy_from_slice(&self.data))
    }

    /// [`Epoch::encode`], taking the pages' buffer out of the epoch rather than copying
    /// it: the frames carry slices of it, and once the last of them is dropped it goes
    /// to `give_back` (if any), to be filled again.
    pub fn encode_taking(&mut self, generation: u64, give_back: Option<&buffers::GiveBack>) -> Result<(Vec<Bytes>, usize), ProtoError> {
        let data = buffers::lend(std::mem::take(&mut self.data), give_back);
        self.encode_pages_of(generation, data)
    }

    fn encode_pages_of(&self, generation: u64, data: Bytes) -> Result<(Vec<Bytes>, usize), ProtoError> {
        let epoch = self.number;
        let mut hasher = EpochHasher::new(epoch);
        // What the encoding cannot check, refused here rather than by the receiver.
        let frame = |message: Message| {
            message.validate()?;
            frame::encode_shared(&Frame { generation, message })
        };
        crate::message::aligned(&self.addresses)?;
        if !self.zero.is_empty() {
            return Err(ProtoError::Invalid("an epoch with zero markers is a received one; it is not sent again".into()));
        }
        if data.len() != self.addresses.len() * PAGE_SIZE {
            return Err(ProtoError::Invalid(format!("{} bytes of pages for {} addresses", data.len(), self.addresses.len())));
        }
        let mut pages = pages::BatchEncoder::new(generation, epoch, self.compress);
        pages.frames.push(frame(Message::EpochBegin { epoch, kind: self.kind.unwrap_or(EpochKind::Delta) })?);
        let crcs = (self.page_crcs.len() == self.addresses.len()).then_some(&self.page_crcs[..]);
        for (i, batch) in self.addresses.chunks(MAX_BATCH_PAGES).enumerate() {
            let first = i * MAX_BATCH_PAGES;
            let from = first * PAGE_SIZE;
            let batch_crcs = crcs.map(|c| &c[first..first + batch.len()]);
            pages.batch(batch, &data.slice(from..from + batch.len() * PAGE_SIZE), batch_crcs, &mut hasher)?;
        }
        let (mut out, mut wire) = (pages.frames, pages.wire);
        let mut offset = self.output_offset;
        for bytes in self.output.chunks(MAX_OUTPUT_BYTES) {
            hasher.output(offset, bytes);
            wire += bytes.len();
            out.push(frame(Message::Output { epoch, offset, bytes: bytes.to_vec() })?);
            offset += bytes.len() as u64;
        }
        for (nic, bytes) in &self.frames {
            hasher.frame(*nic, bytes);
            wire += bytes.len();
            out.push(frame(Message::Frame { epoch, nic: *nic, bytes: bytes.clone() })?);
        }
        if let Some(v) = self.verify {
            hasher.verify(&v);
            out.push(frame(Message::Verify { epoch, first: v.first, pages: v.pages, digest: v.digest })?);
        }
        hasher.state(&self.state);
        wire += self.state.len();
        out.push(frame(Message::State { epoch, state: self.state.clone() })?);
        out.push(frame(Message::EpochCommit { epoch, pages: self.addresses.len() as u64, checksum: hasher.finish() })?);
        Ok((out, wire))
    }

    /// The frames [`Epoch::encode`] puts on the wire, decoded as the receiver sees them.
    pub fn frames(&self, generation: u64) -> Result<Vec<Frame>, ProtoError> {
        let mut decoder = frame::Decoder::default();
        let mut frames = Vec::new();
        for bytes in self.encode(generation)?.0 {
            decoder.push(&bytes);
            while let Some(frame) = decoder.next_frame()? {
                frames.push(frame);
            }
        }
        Ok(frames)
    }
}

/// CRC-32 over an epoch's number, each batch's addresses and data, and the state, in
/// the order sent: a lost, repeated or reordered message changes it.
pub struct EpochHasher(crc32fast::Hasher);

impl EpochHasher {
    pub fn new(epoch: u64) -> Self {
        let mut h = crc32fast::Hasher::new();
        h.update(&epoch.to_le_bytes());
        Self(h)
    }

    pub fn zero_pages(&mut self, addresses: &[u64]) {
        self.0.update(b"zero");
        for a in addresses {
            self.0.update(&a.to_le_bytes());
        }
    }

    /// A batch's addresses and then its pages' data: [`EpochHasher::addresses`] and
    /// then [`EpochHasher::data`] for each page in turn add up to the same.
    pub fn pages(&mut self, addresses: &[u64], data: &[u8]) {
        self.addresses(addresses);
        self.data(data);
    }

    pub fn addresses(&mut self, addresses: &[u64]) {
        for a in addresses {
            self.0.update(&a.to_le_bytes());
        }
    }

    pub fn data(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// [`EpochHasher::data`] of bytes whose CRC is already known: the same result,
    /// without reading them again.
    pub fn data_crc(&mut self, crc: &crc32fast::Hasher) {
        self.0.combine(crc);
    }

    pub fn output(&mut self, offset: u64, bytes: &[u8]) {
        self.0.update(&offset.to_le_bytes());
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn frame(&mut self, nic: u8, bytes: &[u8]) {
        self.0.update(b"frame");
        self.0.update(&[nic]);
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn verify(&mut self, v: &Verify) {
        self.0.update(b"verify");
        self.0.update(&v.first.to_le_bytes());
        self.0.update(&v.pages.to_le_bytes());
        self.0.update(&v.digest.to_le_bytes());
    }

    pub fn state(&mut self, state: &[u8]) {
        self.0.update(&(state.len() as u64).to_le_bytes());
        self.0.update(state);
    }

    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}
