//! Replica verification: now and then the primary sends, with an epoch, a digest of a
//! slice of the guest (some of its pages, or of its disks' blocks) as they were at the
//! epoch's pause; the standby, having applied the epoch, digests the same slice of its
//! image. The two must agree: the image is the primary's guest at that epoch, by
//! construction. A disagreement means the standby's copy went wrong (a bug, a disk
//! that rotted, someone writing its disk image), which nothing else would notice until
//! a takeover ran a guest on it.

use xxhash_rust::xxh3::Xxh3;

/// The largest slice one epoch's check may cover: 256 MiB of pages.
pub const MAX_VERIFY_PAGES: u32 = 65_536;

/// The slice checked with an epoch: `pages` 4 KiB pages from address `first`, all in
/// one of the guest's RAM ranges or one of its disks, and their digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verify {
    pub first: u64,
    pub pages: u32,
    pub digest: u64,
}

/// The digest of a slice's bytes (its pages in address order).
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(bytes);
    h.digest()
}

/// Where the checks go next: a rotation over every page of the guest, disks first, a
/// slice at a time.
#[derive(Clone, Debug, Default)]
pub struct Rotation {
    /// The spans checked, as (first address, pages).
    spans: Vec<(u64, u64)>,
    span: usize,
    at: u64,
}

impl Rotation {
    pub fn new(spans: Vec<(u64, u64)>) -> Self {
        Self { spans: spans.into_iter().filter(|&(_, n)| n > 0).collect(), span: 0, at: 0 }
    }

    /// The next slice of at most `pages` pages, and moves on; `None` with no spans.
    pub fn next(&mut self, pages: u32) -> Option<(u64, u32)> {
        let &(first, len) = self.spans.get(self.span)?;
        let take = (len - self.at).min(u64::from(pages.clamp(1, MAX_VERIFY_PAGES)));
        let slice = (first + self.at * 4096, take as u32);
        self.at += take;
        if self.at == len {
            self.at = 0;
            self.span = (self.span + 1) % self.spans.len();
        }
        Some(slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_covers_every_span_a_slice_at_a_time_and_starts_again() {
        let mut r = Rotation::new(vec![(0x1000_0000, 5), (0, 0), (0x2000, 2)]);
        let slices: Vec<_> = (0..5).map(|_| r.next(2).unwrap()).collect();
        assert_eq!(slices, [(0x1000_0000, 2), (0x1000_2000, 2), (0x1000_4000, 1), (0x2000, 2), (0x1000_0000, 2)]);
        assert_eq!(Rotation::default().next(8), None);
    }

    #[test]
    fn a_digest_changes_with_any_byte() {
        let mut page = vec![0u8; 4096];
        let d = digest(&page);
        page[4095] = 1;
        assert_ne!(digest(&page), d);
    }
}
