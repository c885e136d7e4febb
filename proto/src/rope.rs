//! Bytes held in the pieces they arrived in. A standby keeps a batch of raw pages as
//! the slices of QUIC's receive buffers that carried it, not as a copy: its pages are
//! read once, when the epoch commits and they go into the image. Pieces have any
//! length (about a datagram's payload, 6000 bytes on loopback), so a page may straddle
//! two or more of them (the image takes them as they are, `tandem_vmm::pieces`).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte string as a sequence of shared pieces. Two ropes are equal when their bytes
/// are, however they are cut.
#[derive(Clone, Debug, Default)]
pub struct Rope {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Rope {
    /// The bytes of `pieces`, one after the other (empty ones dropped).
    pub fn from_pieces(pieces: Vec<Bytes>) -> Self {
        let pieces: Vec<Bytes> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let len = pieces.iter().map(Bytes::len).sum();
        Self { pieces, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    pub fn into_pieces(self) -> Vec<Bytes> {
        self.pieces
    }

    /// The first `n` bytes (all of them, if fewer) in one slice: borrowed when the
    /// first piece holds them, else copied.
    pub fn prefix(&self, n: usize) -> Cow<'_, [u8]> {
        let n = n.min(self.len);
        match self.pieces.first() {
            Some(first) if first.len() >= n => Cow::Borrowed(&first[..n]),
            _ => Cow::Owned(self.pieces.iter().flat_map(|p| p.iter().copied()).take(n).collect()),
        }
    }

    /// What follows the first `n` bytes (nothing, if there are fewer), without a copy.
    pub fn split_from(mut self, mut n: usize) -> Rope {
        let mut pieces = std::mem::take(&mut self.pieces).into_iter();
        let mut rest = Vec::new();
        for p in pieces.by_ref() {
            if n < p.len() {
                rest.push(p.slice(n..));
                break;
            }
            n -= p.len();
        }
        rest.extend(pieces);
        Rope::from_pieces(rest)
    }

    /// The bytes in one slice: borrowed when they are one piece, else copied.
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        match &self.pieces[..] {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(&one[..]),
            many => Cow::Owned(many.iter().flat_map(|p| p.iter().copied()).collect()),
        }
    }
}

impl From<Bytes> for Rope {
    fn from(bytes: Bytes) -> Self {
        Self::from_pieces(vec![bytes])
    }
}

impl From<Vec<u8>> for Rope {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes::from(bytes).into()
    }
}

impl PartialEq for Rope {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.pieces.iter().flat_map(|p| p.iter()).eq(other.pieces.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Rope {}

/// Encoded as one byte string, as `Bytes` is: the wire does not show the pieces.
impl Serialize for Rope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.contiguous())
    }
}

impl<'de> Deserialize<'de> for Rope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Bytes::deserialize(deserializer).map(Rope::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ropes_compare_by_content_and_encode_as_one_string() {
        let a = Rope::from_pieces(vec![Bytes::from_static(b"ab"), Bytes::new(), Bytes::from_static(b"c")]);
        assert_eq!(a, Rope::from(b"abc".to_vec()));
        assert_ne!(a, Rope::from(b"abd".to_vec()));
        assert_eq!(a.pieces().len(), 2);
        assert_eq!(&a.prefix(1)[..], b"a");
        assert_eq!(&a.prefix(3)[..], b"abc");
        assert_eq!(&a.prefix(9)[..], b"abc");
        assert_eq!(a.clone().split_from(1), Rope::from(b"bc".to_vec()));
        assert_eq!(a.clone().split_from(2), Rope::from(b"c".to_vec()));
        assert!(a.clone().split_from(3).is_empty() && a.clone().split_from(7).is_empty());
        let config = bincode::config::standard();
        let encoded = bincode::serde::encode_to_vec(&a, config).unwrap();
        assert_eq!(encoded, bincode::serde::encode_to_vec(Bytes::from_static(b"abc"), config).unwrap());
        let (back, _): (Rope, usize) = bincode::serde::decode_from_slice(&encoded, config).unwrap();
        assert_eq!(back, a);
    }
}
