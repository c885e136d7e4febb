//! Framing over a byte stream: each frame is
//! `magic "TNDF" | u32 length | u32 CRC-32 of the payload | payload` (little-endian),
//! the payload being one encoded [`Frame`]. The length is checked against the limit
//! before anything is allocated or awaited.

use bytes::{Bytes, BytesMut};

use crate::buffers::Pool;

use crate::codec;
use crate::message::{Compression, Frame, Message};
use crate::rope::Rope;
use crate::ProtoError;

pub const MAGIC: [u8; 4] = *b"TNDF";
const HEADER: usize = 12;
/// Largest payload: a full batch of pages with its addresses, or the largest machine
/// state, with room for the envelope.
pub const MAX_FRAME_BYTES: u64 = 5 << 20;

/// Encodes `frame` with its header, or refuses one over the limit.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    encode_with(frame.message.size_hint(), |out| codec::encode_into(frame, out)).map(Vec::from)
}

/// [`encode`] into shared bytes, as QUIC takes them without a copy.
pub fn encode_shared(frame: &Frame) -> Result<Bytes, ProtoError> {
    encode_with(frame.message.size_hint(), |out| codec::encode_into(frame, out))
}

/// A frame whose payload `write` appends to the buffer it is given (which holds the
/// header so far), so a large payload is written once, in place; then the header is
/// completed, or the frame refused if over the limit.
pub fn encode_with(size_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Result<Bytes, ProtoError> {
    let mut out = Vec::with_capacity(HEADER + size_hint);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; HEADER - 4]);
    write(&mut out);
    let len = out.len() - HEADER;
    if len == 0 || len as u64 > MAX_FRAME_BYTES {
        return Err(ProtoError::TooLarge(len as u64));
    }
    let crc = crc32fast::hash(&out[HEADER..]);
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(Bytes::from(out))
}

/// A frame whose payload is what `write` appends after the header, then `tail`: bytes
/// shared with whoever holds them, sent as they are (a batch of pages goes from the
/// capture's buffer to QUIC without a copy). `tail_crc` is the CRC of `tail`, which the
/// caller has computed for the epoch's checksum anyway. The frame is the chunks
/// returned, in order.
pub fn encode_split(size_hint: usize, write: impl FnOnce(&mut Vec<u8>), tail: Vec<Bytes>, tail_crc: &crc32fast::Hasher) -> Result<Vec<Bytes>, ProtoError> {
    let mut head = Vec::with_capacity(HEADER + size_hint);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&[0; HEADER - 4]);
    write(&mut head);
    let len = head.len() - HEADER + tail.iter().map(Bytes::len).sum::<usize>();
    if len as u64 > MAX_FRAME_BYTES {
        return Err(ProtoError::TooLarge(len as u64));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[HEADER..]);
    crc.combine(tail_crc);
    head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    head[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    let mut chunks = Vec::with_capacity(1 + tail.len());
    chunks.push(Bytes::from(head));
    chunks.extend(tail.into_iter().filter(|t| !t.is_empty()));
    Ok(chunks)
}

/// A frame at least this long is gathered as the pieces it arrives in (a batch of raw
/// pages, whose bytes a standby keeps until its epoch commits, then copies once into
/// its image), or, when its bytes must be read in one piece (compressed pages, any
/// other message), assembled in a buffer of its own from a pool.
const LARGE_FRAME: usize = 64 << 10;
/// Buffers the decoder's pool keeps for later frames: about 64 MiB of full batches, what a
/// steady stream of deltas keeps staged at once on a guest of a few hundred MiB.
const POOLED_BUFFERS: usize = 32;

/// Collects bytes as they arrive and yields whole frames. After an error the stream is
/// unusable: the connection must be dropped.
pub struct Decoder {
    /// Bytes received and not yet handed out as frames (nor taken into `large`); a
    /// frame taken leaves from the front without moving what follows.
    buf: BytesMut,
    large: Option<Large>,
    /// Buffers of large frames read in one piece: the allocator hands a freed epoch's
    /// worth of frames back to the kernel, and faulting them in again cost more than
    /// the copy into them.
    pool: Pool,
}

/// A piece shorter than this is copied rather than kept: a slice keeps its whole
/// receive buffer (a datagram, or a batch of them) alive until the epoch commits, and
/// a peer sending data a few bytes a packet would otherwise make a standby hold many
/// times the epoch's size.
const MIN_KEPT_PIECE: usize = 1024;

/// A large frame being gathered.
struct Large {
    header: [u8; HEADER],
    /// The payload so far, as it arrived, but for `small`.
    pieces: Vec<Bytes>,
    /// Copies of the short pieces that came after the last of `pieces`.
    small: BytesMut,
    got: usize,
    /// The payload's length.
    len: usize,
    /// Of the payload so far: computed as the bytes arrive, while they are in cache,
    /// rather than by reading the whole frame again once it is complete.
    crc: crc32fast::Hasher,
}

/// A frame as the decoder yields it, with what checking it learnt on the way.
#[derive(Debug, PartialEq)]
pub struct Received {
    pub frame: Frame,
    /// The CRC-32 of a batch of uncompressed pages' data, where the frame's check
    /// worked it out: the epoch's checksum then need not read the pages again.
    pub data_crc: Option<u32>,
}

impl From<Frame> for Received {
    fn from(frame: Frame) -> Self {
        Self { frame, data_crc: None }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self { buf: BytesMut::new(), large: None, pool: Pool::new(POOLED_BUFFERS) }
    }
}

impl Decoder {
    /// Whether no bytes are waiting: nothing partial is left after the last frame.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.large.is_none()
    }

    /// Takes a copy of `bytes`.
    pub fn push(&mut self, bytes: &[u8]) {
        match &self.large {
            Some(_) => self.push_shared(Bytes::copy_from_slice(bytes)),
            None => self.buf.extend_from_slice(bytes),
        }
    }

    /// Takes `bytes` as they are: what belongs to a large frame is kept, not copied.
    pub fn push_shared(&mut self, mut bytes: Bytes) {
        if let Some(large) = &mut self.large {
            let take = bytes.len().min(large.len - large.got);
            large.crc.update(&bytes[..take]);
            large.got += take;
            let piece = bytes.split_to(take);
            if piece.len() < MIN_KEPT_PIECE {
                large.small.extend_from_slice(&piece);
            } else {
                if !large.small.is_empty() {
                    large.pieces.push(large.small.split().freeze());
                }
                large.pieces.push(piece);
            }
        }
        self.buf.extend_from_slice(&bytes);
    }

    /// The next whole frame, `None` until one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        Ok(self.next_received()?.map(|r| r.frame))
    }

    /// [`Decoder::next_frame`], with what its check learnt.
    pub fn next_received(&mut self) -> Result<Option<Received>, ProtoError> {
        if let Some(large) = &self.large {
            if large.got < large.len {
                return Ok(None);
            }
            let Large { header, mut pieces, small, crc, .. } = self.large.take().expect("checked just above");
            pieces.push(small.freeze());
            return self.gathered(Rope::from_pieces(pieces), crc.finalize(), header_crc(&header)).map(Some);
        }
        if self.buf.len() < HEADER {
            // A wrong magic shows as soon as its bytes do.
            let n = self.buf.len().min(MAGIC.len());
            if self.buf[..n] != MAGIC[..n] {
                return Err(ProtoError::BadMagic);
            }
            return Ok(None);
        }
        if self.buf[..4] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let len = u32::from_le_bytes(self.buf[4..8].try_into().expect("4 bytes")) as u64;
        if len > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(len));
        }
        let end = HEADER + len as usize;
        if self.buf.len() < end {
            if end >= LARGE_FRAME {
                // The rest is kept as it comes.
                let head = self.buf.split().freeze();
                let mut header = [0; HEADER];
                header.copy_from_slice(&head[..HEADER]);
                let payload = head.slice(HEADER..);
                let mut crc = crc32fast::Hasher::new();
                crc.update(&payload);
                self.large = Some(Large { header, got: payload.len(), pieces: vec![payload], small: BytesMut::new(), len: len as usize, crc });
            }
            return Ok(None);
        }
        let expected = header_crc(&self.buf);
        let crc = crc32fast::hash(&self.buf[HEADER..end]);
        // The frame's bytes leave the buffer without a copy; a batch of pages keeps
        // pointing into them.
        checked(self.buf.split_to(end).freeze().slice(HEADER..), crc, expected).map(Some)
    }

    /// The large frame whose payload is `payload`: a batch of raw pages keeps its
    /// pieces; anything else is read from one buffer.
    fn gathered(&self, payload: Rope, crc: u32, expected: u32) -> Result<Received, ProtoError> {
        if crc != expected {
            return Err(ProtoError::Checksum);
        }
        let prefix = payload.prefix(codec::MAX_PAGES_HEAD);
        if let Some(head) = codec::pages_head(&prefix)?.filter(|h| h.compression == Compression::None) {
            let head_len = head.len;
            let data_crc = tail_crc(crc, &prefix[..head_len], payload.len() - head_len);
            drop(prefix);
            let frame = head.frame(payload.split_from(head_len))?;
            return Ok(Received { frame, data_crc: Some(data_crc) });
        }
        drop(prefix);
        let mut flat = self.pool.take(payload.len());
        for piece in payload.pieces() {
            flat.extend_from_slice(piece);
        }
        checked(self.pool.share(flat), crc, expected)
    }
}

/// The frame `payload` holds, if `crc` (its CRC-32) is the one its header gave.
fn checked(payload: Bytes, crc: u32, expected: u32) -> Result<Received, ProtoError> {
    if crc != expected {
        return Err(ProtoError::Checksum);
    }
    let frame = codec::decode_shared(payload.clone())?;
    let data_crc = match &frame.message {
        Message::Pages { compression: Compression::None, data, .. } => Some(tail_crc(crc, &payload[..payload.len() - data.len()], data.len())),
        _ => None,
    };
    Ok(Received { frame, data_crc })
}

fn header_crc(frame: &[u8]) -> u32 {
    u32::from_le_bytes(frame[8..12].try_into().expect("4 bytes"))
}

/// The CRC-32 of the last `tail_len` bytes of a payload whose CRC-32 is `whole` and
/// which begins with `head`. CRC-32 is linear: the payload's CRC is the head's, shifted
/// past the tail, plus the tail's, so the head's part can be taken out again.
fn tail_crc(whole: u32, head: &[u8], tail_len: usize) -> u32 {
    let mut shifted = crc32fast::Hasher::new_with_initial_len(crc32fast::hash(head), head.len() as u64);
    shifted.combine(&crc32fast::Hasher::new_with_initial_len(0, tail_len as u64));
    whole ^ shifted.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Compression, Message, Role, PAGE_SIZE};

    fn frames() -> Vec<Frame> {
        let f = |message| Frame { generation: 3, message };
        vec![
            f(Message::Hello { version: 1, role: Role::Primary, fingerprint: 42 }),
            f(Message::Pages {
                epoch: 7,
                addresses: vec![0, 0x2000],
                compression: Compression::None,
                data: vec![0xab; 2 * PAGE_SIZE].into(),
            }),
            f(Message::EpochCommit { epoch: 7, pages: 2, checksum: 9 }),
            f(Message::Heartbeat { seq: 1 }),
            // Large enough to be assembled in a pooled buffer of its own.
            f(Message::Pages {
                epoch: 8,
                addresses: (0..40).map(|p| p * PAGE_SIZE as u64).collect(),
                compression: Compression::None,
                data: (0..40 * PAGE_SIZE).map(|i| (i * 7 / 3) as u8).collect::<Vec<u8>>().into(),
            }),
            f(Message::Heartbeat { seq: 2 }),
        ]
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let wire: Vec<u8> = frames().iter().flat_map(|f| encode(f).unwrap()).collect();
        for chunk in [1, 3, 12, 1000, 65_536, 100_000, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames(), "chunks of {chunk}");
        }
    }

    #[test]
    fn each_kind_of_damage_gets_its_own_error() {
        let good = encode(&frames()[1]).unwrap();
        let decode = |bytes: &[u8]| {
            let mut d = Decoder::default();
            d.push(bytes);
            d.next_frame()
        };
        assert_eq!(decode(b"GET / HTTP/1.1"), Err(ProtoError::BadMagic));
        let mut flipped = good.clone();
        flipped[200] ^= 1;
        assert_eq!(decode(&flipped), Err(ProtoError::Checksum));
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(ProtoError::TooLarge(u32::MAX as u64)));
        assert_eq!(decode(&good[..good.len() - 1]), Ok(None), "a partial frame waits");
        // A large frame, assembled apart, damaged in its middle.
        let mut large = encode(&frames()[4]).unwrap();
        assert!(large.len() >= LARGE_FRAME);
        large[100_000] ^= 1;
        let mut d = Decoder::default();
        for piece in large.chunks(4096) {
            d.push(piece);
        }
        assert_eq!(d.next_frame(), Err(ProtoError::Checksum));
    }

    #[test]
    fn a_large_batch_of_pages_comes_with_its_datas_crc() {
        let wire = encode(&frames()[4]).unwrap();
        let Message::Pages { data, .. } = &frames()[4].message else { unreachable!() };
        for chunk in [1, 13, 4096, 6000, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                got.extend(d.next_received().unwrap());
            }
            assert_eq!(got, [Received { frame: frames()[4].clone(), data_crc: Some(crc32fast::hash(&data.contiguous())) }], "chunks of {chunk}");
        }
        // Nor does a frame that is not a batch of raw pages say anything of its data.
        let mut d = Decoder::default();
        d.push(&encode(&frames()[2]).unwrap());
        assert_eq!(d.next_received().unwrap(), Some(frames()[2].clone().into()));
    }

    #[test]
    fn the_crc_of_a_tail_is_the_whole_crc_less_the_heads() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for split in [0, 1, 40, 4136, 9_999, 10_000] {
            let (head, tail) = bytes.split_at(split);
            assert_eq!(tail_crc(crc32fast::hash(&bytes), head, tail.len()), crc32fast::hash(tail), "split at {split}");
        }
    }

    #[test]
    fn a_large_batch_of_raw_pages_keeps_the_pieces_it_came_in() {
        let wire = Bytes::from(encode(&frames()[4]).unwrap());
        let mut d = Decoder::default();
        d.push_shared(wire.slice(..100));
        assert_eq!(d.next_frame(), Ok(None));
        let rest = wire.slice(100..);
        let within = rest.as_ptr() as usize..rest.as_ptr() as usize + rest.len();
        for at in (0..rest.len()).step_by(6000) {
            d.push_shared(rest.slice(at..rest.len().min(at + 6000)));
        }
        let frame = d.next_frame().unwrap().expect("whole");
        let Message::Pages { data, .. } = &frame.message else { panic!("{frame:?}") };
        assert!(data.pieces().len() > 1);
        for piece in data.pieces() {
            assert!(within.contains(&(piece.as_ptr() as usize)), "a piece was copied");
        }
        assert_eq!(frame, frames()[4]);
        assert!(d.is_empty());
    }

    #[test]
    fn short_pieces_of_a_large_batch_are_copied_not_kept() {
        let wire = Bytes::from(encode(&frames()[4]).unwrap());
        let mut d = Decoder::default();
        d.push_shared(wire.slice(..100));
        assert_eq!(d.next_frame(), Ok(None));
        // Short and long pieces alternating, each a slice of its own buffer.
        let (mut at, mut n, mut long) = (100, 0, 0);
        while at < wire.len() {
            let len = if n % 3 == 2 { 5000 } else { 7 + n % 500 };
            long += usize::from(len >= MIN_KEPT_PIECE);
            let end = wire.len().min(at + len);
            d.push_shared(Bytes::copy_from_slice(&wire[at..end]));
            (at, n) = (end, n + 1);
        }
        let frame = d.next_frame().unwrap().expect("whole");
        let Message::Pages { data, .. } = &frame.message else { panic!("{frame:?}") };
        // Each run of short pieces became one copy: at most one before each long one,
        // and one at the end.
        assert!(data.pieces().len() <= 2 * long + 2, "{} pieces from {n} pushes, {long} long", data.pieces().len());
        assert_eq!(frame, frames()[4]);
    }

    #[test]
    fn a_large_frame_read_in_one_piece_uses_its_buffer_again_once_gone() {
        // Compressed pages are decompressed from one buffer.
        let frame = Frame {
            generation: 3,
            message: Message::Pages {
                epoch: 8,
                addresses: (0..40).map(|p| p * PAGE_SIZE as u64).collect(),
                compression: Compression::Lz4,
                data: (0..100_000).map(|i| (i * 7 / 3) as u8).collect::<Vec<u8>>().into(),
            },
        };
        let wire = encode(&frame).unwrap();
        let mut d = Decoder::default();
        let mut at = None;
        for round in 0..3 {
            d.push(&wire[..100]);
            assert_eq!(d.next_frame(), Ok(None));
            d.push(&wire[100..]);
            let got = d.next_frame().unwrap().expect("whole");
            let Message::Pages { data, .. } = &got.message else { panic!("{got:?}") };
            assert_eq!(data.pieces().len(), 1);
            let here = data.pieces()[0].as_ptr() as usize;
            if round > 0 {
                assert_eq!(Some(here), at, "round {round}");
            }
            at = Some(here);
            assert_eq!(got, frame);
        }
        assert!(d.is_empty());
    }

    #[test]
    fn a_well_framed_but_invalid_message_is_refused() {
        let bad = Frame {
            generation: 1,
            message: Message::Pages { epoch: 1, addresses: vec![0x1001], compression: Compression::None, data: vec![0; PAGE_SIZE].into() },
        };
        let payload = codec::encode(&bad);
        let mut wire = MAGIC.to_vec();
        wire.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        wire.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        wire.extend_from_slice(&payload);
        let mut d = Decoder::default();
        d.push(&wire);
        assert!(matches!(d.next_frame(), Err(ProtoError::Invalid(m)) if m.contains("unaligned")));
    }

    /// Random bytes, raw and behind a valid header with a correct CRC (so the decoder
    /// itself is exercised): always an error or a wait, never a panic, and never an
    /// allocation beyond the frame limit (bincode's limit is the frame's size).
    #[test]
    fn garbage_is_refused_without_panicking() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..20_000 {
            let len = (next() % 600) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut d = Decoder::default();
            if case % 2 == 0 {
                d.push(&bytes);
            } else {
                d.push(&MAGIC);
                d.push(&(bytes.len() as u32).to_le_bytes());
                d.push(&crc32fast::hash(&bytes).to_le_bytes());
                d.push(&bytes);
            }
            // What does decode must be valid: decoding validates.
            if let Ok(Some(f)) = d.next_frame() {
                f.message.validate().unwrap();
            }
        }
    }
}
