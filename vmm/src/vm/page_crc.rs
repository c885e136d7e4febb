//! Which captures take their pages' CRC-32 as they copy them, and what a CRC costs here.

use std::time::{Duration, Instant};

const PAGE: usize = crate::memory::PAGE_SIZE as usize;

/// A delta of fewer pages leaves its CRCs to the encoding after the guest resumes: it
/// is still in cache then (this host's cores have 2 MiB of L2 each). See
/// [`crcs_while_copying`].
const CRC_WHILE_COPYING_PAGES: usize = 512;
/// A CRC this fast from cache (10 GB/s) costs a page about a tenth of its copy from
/// memory; natively crc32fast makes 60-70 GB/s. In the lab, whose QEMU 7.2 emulates
/// the carry-less multiplies bit by bit, it makes about 0.1 GB/s, more than the copy.
const CHEAP_CRC_PER_PAGE: Duration = Duration::from_nanos(400);

/// Whether a delta of `pages` pages takes each page's CRC as it copies it, inside the
/// pause, while the page is in cache, rather than leaving it to the encoding after the
/// guest resumes. Only a delta too large to stay in cache pays for it (the encoding
/// would read it again from memory, which cost more than the CRC itself), and only on
/// a host whose CRC is cheap beside the copy: the pause is the guest's to lose. A
/// full capture for replication takes them always, its pages being copied while the
/// guest runs; a snapshot for a file takes none ([`super::Vm::capture`]).
pub fn crcs_while_copying(pages: usize) -> bool {
    pages >= CRC_WHILE_COPYING_PAGES && crc_is_cheap()
}

/// Whether a page's CRC is cheap here ([`CHEAP_CRC_PER_PAGE`]), measured once per
/// process (at replication's first, full capture): the best of a few short rounds over
/// a page in cache.
pub(super) fn crc_is_cheap() -> bool {
    static CHEAP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHEAP.get_or_init(|| {
        let page = [0x5a_u8; PAGE];
        let best = (0..8)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..8 {
                    std::hint::black_box(crc32fast::hash(std::hint::black_box(&page)));
                }
                start.elapsed() / 8
            })
            .min()
            .unwrap_or(Duration::MAX);
        let cheap = best <= CHEAP_CRC_PER_PAGE;
        tracing::debug!(crc_ns_per_page = best.as_nanos() as u64, cheap, "page CRC measured");
        cheap
    })
}

/// The CRC-32 of a page of zeros.
pub(super) fn zero_page_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0; PAGE]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_delta_never_takes_crcs_in_its_pause() {
        assert!(!crcs_while_copying(CRC_WHILE_COPYING_PAGES - 1));
        // A large one does exactly where the CRC measured cheap.
        assert_eq!(crcs_while_copying(CRC_WHILE_COPYING_PAGES), crc_is_cheap());
        assert_eq!(zero_page_crc(), crc32fast::hash(&[0; PAGE]));
    }
}
