//! How a batch of pages goes on the wire: all-zero pages as their addresses alone,
//! the rest as one LZ4 block when that is smaller by enough to pay for the work, else
//! as they are. A booting guest's memory is mostly zero pages and compressible text
//! and tables (docs/design.md has the measurements that chose this).
//!
//! The receiver decodes into a buffer whose size the addresses fix before anything is
//! read: garbage, truncated or overlong compressed data is an error, and can never make
//! it allocate more than the batch's pages.

use bytes::Bytes;

use crate::buffers::Pool;
use crate::epoch::EpochHasher;
use crate::message::{Compression, Frame, Message, MAX_BATCH_PAGES, PAGE_SIZE};
use crate::rope::Rope;
use crate::{codec, frame, ProtoError};

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

/// Encodes an epoch's page batches as frames of one generation, straight from where
/// the pages are.
pub struct BatchEncoder {
    generation: u64,
    epoch: u64,
    compress: bool,
    /// Gathers a batch's non-zero pages only when LZ4 needs them in one piece.
    scratch: Vec<u8>,
    /// The frames so far, in order, as the chunks that go on the stream one after the
    /// other (a frame of raw pages is its header and then slices of the pages).
    pub frames: Vec<Bytes>,
    /// The payload bytes they carry (addresses and page data as sent).
    pub wire: usize,
}

impl BatchEncoder {
    pub fn new(generation: u64, epoch: u64, compress: bool) -> Self {
        Self { generation, epoch, compress, scratch: Vec::new(), frames: Vec::new(), wire: 0 }
    }

    /// One batch (at most [`MAX_BATCH_PAGES`] pages, `data` a slice of the epoch's
    /// pages) as frames, in the order the receiver must apply them: a `ZeroPages`
    /// frame, then one `Pages` frame for the rest. Each is added to the epoch's
    /// checksum as the receiver will add it: over the raw pages, so the checksum
    /// vouches for the decompression too. Raw pages are not copied: their frame ends
    /// in slices of `data`. `crcs`, each page's CRC-32 if the caller has them, spare
    /// reading the pages for the checksums.
    pub fn batch(&mut self, addresses: &[u64], data: &Bytes, crcs: Option<&[u32]>, hasher: &mut EpochHasher) -> Result<(), ProtoError> {
        debug_assert!(addresses.len() <= MAX_BATCH_PAGES && data.len() == addresses.len() * PAGE_SIZE);
        debug_assert!(crcs.map_or(true, |c| c.len() == addresses.len()));
        // Zero pages go ahead of the rest of their batch: only when an address repeats
        // within it could that change which copy wins, so such a batch goes as it is.
        let unique = {
            let mut sorted = addresses.to_vec();
            sorted.sort_unstable();
            sorted.windows(2).all(|w| w[0] != w[1])
        };
        if !unique {
            return self.pages(addresses, vec![data.clone()], crcs.map(<[u32]>::to_vec), false, hasher);
        }
        let (mut zero, mut rest) = (Vec::new(), Vec::with_capacity(addresses.len()));
        let mut rest_crcs = crcs.map(|c| Vec::with_capacity(c.len()));
        // The non-zero pages as runs of neighbours, each one slice of `data`.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, (&address, page)) in addresses.iter().zip(data.chunks_exact(PAGE_SIZE)).enumerate() {
            // A page whose CRC is not a zero page's is not one: not read at all.
            let maybe_zero = crcs.map_or(true, |c| c[i] == crate::crc::ZERO_PAGE);
            if maybe_zero && is_zero(page) {
                zero.push(address);
                continue;
            }
            rest.push(address);
            if let (Some(kept), Some(crcs)) = (rest_crcs.as_mut(), crcs) {
                kept.push(crcs[i]);
            }
            match runs.last_mut() {
                Some((_, end)) if *end == i => *end = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        if !zero.is_empty() {
            hasher.zero_pages(&zero);
            self.wire += zero.len() * 8;
            let message = Message::ZeroPages { epoch: self.epoch, addresses: zero };
            self.frames.push(frame::encode_shared(&Frame { generation: self.generation, message })?);
        }
        if rest.is_empty() {
            return Ok(());
        }
        let runs = runs.into_iter().map(|(from, to)| data.slice(from * PAGE_SIZE..to * PAGE_SIZE)).collect();
        self.pages(&rest, runs, rest_crcs, self.compress, hasher)
    }

    /// One `Pages` frame of the pages in `runs` (in order) at `addresses`,
    /// LZ4-compressed if `compress` and it pays; `crcs` their CRCs, if known.
    fn pages(&mut self, addresses: &[u64], runs: Vec<Bytes>, crcs: Option<Vec<u32>>, compress: bool, hasher: &mut EpochHasher) -> Result<(), ProtoError> {
        let (generation, epoch) = (self.generation, self.epoch);
        // One CRC of the pages serves both checksums, the frame's and the epoch's:
        // from theirs where the capture took them, else in one pass over the pages.
        let crc = match crcs {
            Some(crcs) => crate::crc::of_pages(&crcs),
            None => {
                let mut crc = crc32fast::Hasher::new();
                runs.iter().for_each(|r| crc.update(r));
                crc
            }
        };
        hasher.addresses(addresses);
        hasher.data_crc(&crc);
        let raw = addresses.len() * PAGE_SIZE;
        let packed = if compress {
            let whole: &[u8] = match runs.as_slice() {
                [one] => one,
                _ => {
                    self.scratch.clear();
                    runs.iter().for_each(|r| self.scratch.extend_from_slice(r));
                    &self.scratch
                }
            };
            worth_compressing(whole).then(|| lz4_flex::block::compress(whole)).filter(|p| p.len() * 16 <= raw * WORTH_IT_SIXTEENTHS)
        } else {
            None
        };
        let head = 64 + addresses.len() * 8;
        match packed {
            Some(p) => {
                self.wire += addresses.len() * 8 + p.len();
                self.frames.push(frame::encode_with(head + p.len(), |buf| {
                    let at = codec::begin_pages(buf, generation, epoch, addresses, Compression::Lz4);
                    buf.extend_from_slice(&p);
                    codec::end_pages(buf, at);
                })?);
            }
            None => {
                self.wire += addresses.len() * 8 + raw;
                let write = |buf: &mut Vec<u8>| {
                    let at = codec::begin_pages(buf, generation, epoch, addresses, Compression::None);
                    codec::pages_len(buf, at, raw);
                };
                self.frames.extend(frame::encode_split(head, write, runs, &crc)?);
            }
        }
        Ok(())
    }
}

/// The raw pages of a batch that came as `data`: the very bytes when raw, with no copy,
/// else decompressed into a buffer of exactly `pages` pages from `pool`.
pub(crate) fn decode(pages: usize, compression: Compression, data: Rope, pool: &Pool) -> Result<Rope, ProtoError> {
    match compression {
        Compression::None if data.len() == pages * PAGE_SIZE => Ok(data),
        _ => {
            let mut out = pool.take(pages * PAGE_SIZE);
            decode_into(pages, compression, &data.contiguous(), &mut out)?;
            Ok(pool.share(out).into())
        }
    }
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
