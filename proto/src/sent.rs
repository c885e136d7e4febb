//! What the standby holds of each page, as a hash, so that a dirty page whose content is
//! what was last sent is not sent again. A booting Linux rewrites many pages with what
//! they already held (docs/design.md has the counts), and in the lab every byte on the
//! wire costs the emulated cipher twice.
//!
//! The table is only right while every epoch sent reaches the standby: the owner forgets
//! it whenever the link to the standby changes, and records an epoch's hashes only once
//! the epoch is queued on the link. A forgotten table sends every dirty page, as if there
//! were no table.

use std::collections::HashMap;

use crate::message::PAGE_SIZE;

/// 128 bits of XXH3: a changed page that hashes as unchanged would leave the standby
/// silently wrong, so the chance of that must be far below the machine's own error rate.
fn hash(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// Hashes of the pages the standby holds, by guest-physical address.
#[derive(Default)]
pub struct SentPages {
    hashes: HashMap<u64, u128>,
}

/// The hashes of an epoch's pages, to [`SentPages::record`] once the epoch is queued.
#[must_use]
pub struct Pending {
    /// Whether these pages are a full epoch's: all the standby will hold.
    full: bool,
    hashes: Vec<(u64, u128)>,
}

/// What [`SentPages::skip_unchanged`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub pages: usize,
}

impl SentPages {
    /// The standby's copy is no longer known: from here on every dirty page goes.
    pub fn forget(&mut self) {
        self.hashes.clear();
    }

    /// Pages of which a hash is held.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Drops from a delta's `addresses` and `data` (its pages, in order) each page the
    /// standby already holds as it is now, compacting `data` in place, and `crcs` (the
    /// pages' CRCs, where the capture took them: empty, or one per page) with it.
    pub fn skip_unchanged(&self, addresses: &mut Vec<u64>, data: &mut Vec<u8>, crcs: &mut Vec<u32>) -> (Skipped, Pending) {
        debug_assert_eq!(data.len(), addresses.len() * PAGE_SIZE);
        if crcs.len() != addresses.len() {
            crcs.clear();
        }
        let mut hashes = Vec::with_capacity(addresses.len());
        let mut kept = 0;
        for i in 0..addresses.len() {
            let at = i * PAGE_SIZE;
            let h = hash(&data[at..at + PAGE_SIZE]);
            if self.hashes.get(&addresses[i]) == Some(&h) {
                continue;
            }
            hashes.push((addresses[i], h));
            if kept != i {
                addresses[kept] = addresses[i];
                data.copy_within(at..at + PAGE_SIZE, kept * PAGE_SIZE);
                if !crcs.is_empty() {
                    crcs[kept] = crcs[i];
                }
            }
            kept += 1;
        }
        let skipped = Skipped { pages: addresses.len() - kept };
        addresses.truncate(kept);
        data.truncate(kept * PAGE_SIZE);
        crcs.truncate(kept);
        (skipped, Pending { full: false, hashes })
    }

    /// The hashes of a full epoch's pages: the standby will hold these and nothing else
    /// (a page a full epoch leaves out is zero, and is simply not known here).
    pub fn full(addresses: &[u64], data: &[u8]) -> Pending {
        let hashes = addresses.iter().zip(data.chunks_exact(PAGE_SIZE)).map(|(&a, p)| (a, hash(p))).collect();
        Pending { full: true, hashes }
    }

    /// The epoch these hashes came from is on its way to the standby.
    pub fn record(&mut self, pending: Pending) {
        if pending.full {
            self.hashes.clear();
        }
        self.hashes.extend(pending.hashes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(fill: &[u8]) -> Vec<u8> {
        fill.iter().flat_map(|&b| std::iter::repeat_n(b, PAGE_SIZE)).collect()
    }

    #[test]
    fn only_pages_whose_content_changed_since_they_were_sent_go_again() {
        let mut sent = SentPages::default();
        sent.record(SentPages::full(&[0, 4096, 8192], &pages(&[1, 2, 3])));
        let (mut addresses, mut data) = (vec![0, 4096, 8192, 12288], pages(&[1, 9, 3, 4]));
        let mut crcs = vec![11, 19, 13, 14];
        let (skipped, pending) = sent.skip_unchanged(&mut addresses, &mut data, &mut crcs);
        assert_eq!(skipped.pages, 2);
        assert_eq!(addresses, vec![4096, 12288]);
        assert_eq!(data, pages(&[9, 4]));
        assert_eq!(crcs, vec![19, 14], "each page's CRC stays with it");
        sent.record(pending);
        let (mut addresses, mut data) = (vec![4096, 12288, 0], pages(&[9, 4, 7]));
        let (skipped, _) = sent.skip_unchanged(&mut addresses, &mut data, &mut Vec::new());
        assert_eq!((skipped.pages, addresses, data), (2, vec![0], pages(&[7])));
    }

    #[test]
    fn an_epoch_never_recorded_or_a_forgotten_table_skips_nothing() {
        let mut sent = SentPages::default();
        sent.record(SentPages::full(&[0], &pages(&[1])));
        let (mut addresses, mut data) = (vec![0, 4096], pages(&[2, 2]));
        // Taken but never queued (the link changed): the standby still holds 1 at 0.
        let _dropped = sent.skip_unchanged(&mut addresses, &mut data, &mut Vec::new());
        let (mut addresses, mut data) = (vec![0], pages(&[1]));
        assert_eq!(sent.skip_unchanged(&mut addresses, &mut data, &mut Vec::new()).0.pages, 1);
        sent.forget();
        let (mut addresses, mut data) = (vec![0], pages(&[1]));
        assert_eq!(sent.skip_unchanged(&mut addresses, &mut data, &mut Vec::new()).0.pages, 0);
        assert_eq!(addresses, vec![0]);
    }

    #[test]
    fn a_full_epoch_replaces_what_was_known() {
        let mut sent = SentPages::default();
        sent.record(SentPages::full(&[0, 4096], &pages(&[1, 2])));
        sent.record(SentPages::full(&[0], &pages(&[1])));
        assert_eq!(sent.len(), 1);
        let (mut addresses, mut data) = (vec![4096], pages(&[2]));
        assert_eq!(sent.skip_unchanged(&mut addresses, &mut data, &mut Vec::new()).0.pages, 0);
    }
}
