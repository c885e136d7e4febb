//! The encoding of frames, and the only module that knows it is bincode 2 (pinned), so
//! it can be swapped in one place. Decoding runs under a byte limit and validates the
//! message, so a hostile length cannot make it allocate beyond the frame it came in.

use bytes::Bytes;

use crate::frame::MAX_FRAME_BYTES;
use crate::message::{Compression, Frame, Message, MAX_BATCH_PAGES};
use crate::rope::Rope;
use crate::ProtoError;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_FRAME_BYTES as usize }>()
}

pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(frame, &mut out);
    out
}

/// Appends `frame`'s encoding to `out`: a frame goes straight after its header, with
/// no copy of a large payload from one buffer into another.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    // Encoding plain data into a Vec cannot fail short of running out of memory; a
    // frame over the limit is caught by the framing, which refuses to send it.
    let start = out.len();
    if bincode::serde::encode_into_std_write(frame, out, config()).is_err() {
        out.truncate(start);
    }
}

/// `Message::Pages`'s index among the message kinds, as bincode numbers them.
const PAGES_VARIANT: u32 = 4;

/// Appends the encoding of a `Frame { generation, Message::Pages { .. } }` up to its
/// data, with the data's length left at zero, and returns where that length stands:
/// the caller then appends the data itself (straight from where the pages are, with no
/// batch assembled first) and calls [`end_pages`]. The same bytes as bincode's, as the
/// test below checks.
pub fn begin_pages(out: &mut Vec<u8>, generation: u64, epoch: u64, addresses: &[u64], compression: Compression) -> usize {
    out.reserve(36 + addresses.len() * 8);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&PAGES_VARIANT.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(addresses.len() as u64).to_le_bytes());
    for a in addresses {
        out.extend_from_slice(&a.to_le_bytes());
    }
    let compression: u32 = match compression {
        Compression::None => 0,
        Compression::Lz4 => 1,
    };
    out.extend_from_slice(&compression.to_le_bytes());
    let at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    at
}

/// Sets the length of the data appended since [`begin_pages`] returned `at`.
pub fn end_pages(out: &mut [u8], at: usize) {
    let len = out.len() - at - 8;
    pages_len(out, at, len);
}

/// Sets the length of the data of a pages frame begun with [`begin_pages`] (which
/// returned `at`) to `len` bytes that follow elsewhere: a frame sent in pieces.
pub fn pages_len(out: &mut [u8], at: usize, len: usize) {
    out[at..at + 8].copy_from_slice(&(len as u64).to_le_bytes());
}

/// The most a `Pages` frame's encoding takes before its data.
pub(crate) const MAX_PAGES_HEAD: usize = 40 + 8 * MAX_BATCH_PAGES;

/// What comes before a `Pages` frame's data.
pub(crate) struct PagesHead {
    generation: u64,
    epoch: u64,
    addresses: Vec<u64>,
    pub(crate) compression: Compression,
    data_len: u64,
    /// Bytes of the encoding before the data.
    pub(crate) len: usize,
}

impl PagesHead {
    /// The frame, with `data` (what followed the head) as its pages' bytes.
    pub(crate) fn frame(self, data: Rope) -> Result<Frame, ProtoError> {
        if self.data_len != data.len() as u64 {
            return Err(ProtoError::Decode(format!("{} bytes of pages where {} are left", self.data_len, data.len())));
        }
        let message = Message::Pages { epoch: self.epoch, addresses: self.addresses, compression: self.compression, data };
        message.validate()?;
        Ok(Frame { generation: self.generation, message })
    }
}

/// The head of a `Pages` frame whose encoding `bytes` begins (its first
/// [`MAX_PAGES_HEAD`] bytes are enough), read by hand; `None` for any other message.
pub(crate) fn pages_head(bytes: &[u8]) -> Result<Option<PagesHead>, ProtoError> {
    if bytes.get(8..12) != Some(&PAGES_VARIANT.to_le_bytes()[..]) {
        return Ok(None);
    }
    let short = || ProtoError::Decode("a pages frame cut short".into());
    let mut at = 0;
    let u64_at = |at: &mut usize| -> Result<u64, ProtoError> {
        let b = bytes.get(*at..*at + 8).ok_or_else(short)?;
        *at += 8;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let generation = u64_at(&mut at)?;
    at += 4;
    let epoch = u64_at(&mut at)?;
    let n = u64_at(&mut at)?;
    if n > MAX_BATCH_PAGES as u64 {
        return Err(ProtoError::Invalid(format!("a batch of {n} pages")));
    }
    let mut addresses = Vec::with_capacity(n as usize);
    for _ in 0..n {
        addresses.push(u64_at(&mut at)?);
    }
    let compression = match bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))) {
        Some(0) => Compression::None,
        Some(1) => Compression::Lz4,
        Some(other) => return Err(ProtoError::Decode(format!("compression {other}"))),
        None => return Err(short()),
    };
    at += 4;
    let data_len = u64_at(&mut at)?;
    Ok(Some(PagesHead { generation, epoch, addresses, compression, data_len, len: at }))
}

/// [`decode`] for a payload held as shared bytes: a `Pages` frame is read by hand and
/// its data left in place, a slice of `payload`, where bincode would copy it out.
pub fn decode_shared(payload: Bytes) -> Result<Frame, ProtoError> {
    match pages_head(&payload)? {
        Some(head) => {
            let at = head.len;
            head.frame(payload.slice(at..).into())
        }
        None => decode(&payload),
    }
}

/// Decodes exactly one frame that must take up all of `bytes`, and validates it.
pub fn decode(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtoError::Decode(format!("{} bytes left over", bytes.len() - used)));
    }
    frame.message.validate()?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PAGE_SIZE;

    #[test]
    fn pages_written_by_hand_are_what_bincode_writes() {
        for (addresses, compression, data) in [
            (vec![0u64], Compression::None, vec![7u8; PAGE_SIZE]),
            (vec![0x1000, 0xfff_f000, 0x2000], Compression::Lz4, vec![1, 2, 3]),
        ] {
            let frame = Frame { generation: 9, message: Message::Pages { epoch: 77, addresses: addresses.clone(), compression, data: data.clone().into() } };
            let mut by_hand = Vec::new();
            let at = begin_pages(&mut by_hand, 9, 77, &addresses, compression);
            by_hand.extend_from_slice(&data);
            end_pages(&mut by_hand, at);
            assert_eq!(by_hand, encode(&frame));
            assert_eq!(decode(&by_hand).unwrap(), frame);
            assert_eq!(decode_shared(Bytes::from(by_hand.clone())).unwrap(), frame);
            // Cut anywhere, or with a byte more: an error, never a panic.
            for cut in 0..by_hand.len() {
                assert!(decode_shared(Bytes::copy_from_slice(&by_hand[..cut])).is_err(), "cut at {cut}");
            }
            let mut longer = by_hand.clone();
            longer.push(0);
            assert!(decode_shared(Bytes::from(longer)).is_err());
        }
    }
}
