//! How a batch of pages goes on the wire: all-zero pages as their addresses alone,
//! the rest as one LZ4 block when that is smaller by enough to pay for the work, else
//! as they are. A booting guest's memory is mostly zero pages and compressible text
//! and tables (docs/design.md has the measurements that chose this).
//!
//! The receiver decodes into a buffer whose size the addresses fix before anything is
//! read: garbage, truncated or overlong compressed data is an error, and can never make
//! it allocate more than the batch's pages.

use crate::epoch::EpochHasher;
use crate::message::{Compression, Message, MAX_BATCH_PAGES, PAGE_SIZE};
use crate::ProtoError;

/// Compressed data is sent only when at most this share (in 1/16ths) of the raw size:
/// below that the receiver's work is not worth the bytes saved.
const WORTH_IT_SIXTEENTHS: usize = 14;

/// Whether a page holds nothing but zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // Word by word: the common non-zero page fails in its first few words.
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 is sound for any bit pattern,
        // and align_to only yields the correctly aligned middle part as u64s.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The messages for one batch (at most [`MAX_BATCH_PAGES`] pages, addresses unique),
/// in the order the receiver must apply them, each added to the epoch's checksum as
/// the receiver will add it: over the raw pages, so the checksum vouches for the
/// decompression too.
pub fn encode_batch(epoch: u64, addresses: &[u64], data: &[u8], compress: bool, hasher: &mut EpochHasher) -> Vec<Message> {
    debug_assert!(addresses.len() <= MAX_BATCH_PAGES && data.len() == addresses.len() * PAGE_SIZE);
    let mut zero = Vec::new();
    let (mut rest, mut rest_data) = (Vec::with_capacity(addresses.len()), Vec::with_capacity(data.len()));
    for (&address, page) in addresses.iter().zip(data.chunks_exact(PAGE_SIZE)) {
        if is_zero(page) {
            zero.push(address);
        } else {
            rest.push(address);
            rest_data.extend_from_slice(page);
        }
    }
    let mut out = Vec::with_capacity(2);
    if !zero.is_empty() {
        hasher.zero_pages(&zero);
        out.push(Message::ZeroPages { epoch, addresses: zero });
    }
    if !rest.is_empty() {
        hasher.pages(&rest, &rest_data);
        let packed = compress.then(|| lz4_flex::block::compress(&rest_data));
        match packed {
            Some(packed) if packed.len() * 16 <= rest_data.len() * WORTH_IT_SIXTEENTHS => {
                out.push(Message::Pages { epoch, addresses: rest, compression: Compression::Lz4, data: packed });
            }
            _ => out.push(Message::Pages { epoch, addresses: rest, compression: Compression::None, data: rest_data }),
        }
    }
    out
}

/// The raw pages of a batch, into `out` (which grows by exactly `pages * PAGE_SIZE`
/// bytes, or not at all on an error).
pub fn decode_into(pages: usize, compression: Compression, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let raw = pages * PAGE_SIZE;
    match compression {
        Compression::None => {
            if data.len() != raw {
                return Err(ProtoError::Invalid(format!("{} bytes of data for {pages} pages", data.len())));
            }
            out.extend_from_slice(data);
        }
        Compression::Lz4 => {
            let start = out.len();
            out.resize(start + raw, 0);
            match lz4_flex::block::decompress_into(data, &mut out[start..]) {
                Ok(n) if n == raw => {}
                Ok(n) => {
                    out.truncate(start);
                    return Err(ProtoError::Invalid(format!("compressed pages decode to {n} bytes, not {raw}")));
                }
                Err(e) => {
                    out.truncate(start);
                    return Err(ProtoError::Invalid(format!("compressed pages do not decode: {e}")));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift, for reproducible random input.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// A page of one of the kinds a guest has: zero, text-like, random, or one byte set.
    fn page(rng: &mut Rng) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        match rng.next() % 4 {
            0 => {}
            1 => p.iter_mut().enumerate().for_each(|(i, b)| *b = b"tick 42 \n"[i % 9]),
            2 => p.iter_mut().for_each(|b| *b = rng.next() as u8),
            _ => p[(rng.next() % PAGE_SIZE as u64) as usize] = 1,
        }
        p
    }

    fn decode(messages: &[Message]) -> (Vec<u64>, Vec<u8>) {
        let (mut addresses, mut data) = (Vec::new(), Vec::new());
        for m in messages {
            m.validate().unwrap();
            match m {
                Message::ZeroPages { addresses: a, .. } => {
                    addresses.extend(a);
                    data.resize(data.len() + a.len() * PAGE_SIZE, 0);
                }
                Message::Pages { addresses: a, compression, data: d, .. } => {
                    addresses.extend(a);
                    decode_into(a.len(), *compression, d, &mut data).unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
        (addresses, data)
    }

    #[test]
    fn random_batches_come_back_as_they_went() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let n = 1 + (rng.next() % MAX_BATCH_PAGES as u64) as usize;
            let addresses: Vec<u64> = (0..n as u64).map(|i| (i * 7 + round) * PAGE_SIZE as u64).collect();
            let data: Vec<u8> = (0..n).flat_map(|_| page(&mut rng)).collect();
            let messages = encode_batch(1, &addresses, &data, round % 3 != 0, &mut EpochHasher::new(1));
            let (got_addresses, got_data) = decode(&messages);
            // Zero pages come first; every page comes back with its content.
            let want: std::collections::BTreeMap<u64, &[u8]> = addresses.iter().copied().zip(data.chunks(PAGE_SIZE)).collect();
            let got: std::collections::BTreeMap<u64, &[u8]> = got_addresses.iter().copied().zip(got_data.chunks(PAGE_SIZE)).collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    #[test]
    fn zero_and_compressible_pages_shrink() {
        let addresses: Vec<u64> = (0..64).map(|i| i * PAGE_SIZE as u64).collect();
        let data = vec![0u8; 64 * PAGE_SIZE];
        assert!(matches!(&encode_batch(1, &addresses, &data, true, &mut EpochHasher::new(1))[..], [Message::ZeroPages { .. }]));
        let text: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| b"tick 42 \n"[i % 9]).collect();
        match &encode_batch(1, &addresses, &text, true, &mut EpochHasher::new(1))[..] {
            [Message::Pages { compression: Compression::Lz4, data, .. }] => assert!(data.len() < text.len() / 10),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_truncated_or_overlong_compressed_data_is_an_error() {
        let mut rng = Rng(7);
        let text: Vec<u8> = (0..8 * PAGE_SIZE).map(|i| b"tick 42 \n"[i % 9]).collect();
        let packed = lz4_flex::block::compress(&text);
        let mut out = vec![9u8; 3];
        // Claims of more or fewer pages than the data holds.
        assert!(decode_into(9, Compression::Lz4, &packed, &mut out).is_err());
        assert!(decode_into(7, Compression::Lz4, &packed, &mut out).is_err());
        assert!(decode_into(8, Compression::Lz4, &packed[..packed.len() - 3], &mut out).is_err());
        for _ in 0..2000 {
            let len = (rng.next() % 512) as usize;
            let garbage: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let pages = 1 + (rng.next() % 4) as usize;
            let _ = decode_into(pages, Compression::Lz4, &garbage, &mut out);
            assert_eq!(out, vec![9u8; 3], "a failed decode leaves nothing behind");
        }
        // Flipped bytes in good data: an error or other bytes, never a panic or more.
        for i in 0..packed.len() {
            let mut bad = packed.clone();
            bad[i] ^= 0xa5;
            let mut out = Vec::new();
            if decode_into(8, Compression::Lz4, &bad, &mut out).is_ok() {
                assert_eq!(out.len(), 8 * PAGE_SIZE);
            }
        }
        decode_into(8, Compression::Lz4, &packed, &mut out).unwrap();
        assert_eq!(&out[3..], &text[..]);
    }
}
