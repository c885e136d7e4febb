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

/// Whether LZ4 is likely to make a batch's pages (`data`) worth sending compressed,
/// judged by its first and middle pages alone: random or encrypted data does not
/// shrink, and compressing a whole batch of it took longer than sending it
/// (`tandem bench pipeline`, random pages).
fn worth_compressing(data: &[u8]) -> bool {
    let pages = data.len() / PAGE_SIZE;
    if pages <= 2 {
        return true;
    }
    let page = |i: usize| &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
    let packed = lz4_flex::block::compress(page(0)).len() + lz4_flex::block::compress(page(pages / 2)).len();
    packed * 16 <= 2 * PAGE_SIZE * WORTH_IT_SIXTEENTHS
}

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
        let packed = (compress && worth_compressing(&rest_data)).then(|| lz4_flex::block::compress(&rest_data));
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
