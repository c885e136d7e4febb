//! Pages whose bytes are held in pieces of any length, one page after the other: how a
//! standby receives them (slices of QUIC's receive buffers, about a datagram each), so
//! that the image is their first and only copy. A page may straddle two or more
//! pieces; it is written part by part.

use crate::memory::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// Walks `pieces`, handing out each whole page as the parts of the pieces it lies in.
pub struct PageCursor<'a, D> {
    pieces: &'a [D],
    /// The piece the next page starts in, and where in it.
    piece: usize,
    at: usize,
}

impl<'a, D: AsRef<[u8]>> PageCursor<'a, D> {
    pub fn new(pieces: &'a [D]) -> Self {
        Self { pieces, piece: 0, at: 0 }
    }

    /// Sets `parts` to the next page's parts, in order, which add up to one page;
    /// false (and `parts` empty) when no whole page is left.
    pub fn next_page(&mut self, parts: &mut Vec<&'a [u8]>) -> bool {
        parts.clear();
        let mut need = PAGE;
        let (mut piece, mut at) = (self.piece, self.at);
        while need > 0 {
            let Some(p) = self.pieces.get(piece) else {
                parts.clear();
                return false;
            };
            let p = p.as_ref();
            let take = need.min(p.len() - at);
            if take > 0 {
                parts.push(&p[at..at + take]);
            }
            need -= take;
            at += take;
            if at == p.len() {
                piece += 1;
                at = 0;
            }
        }
        (self.piece, self.at) = (piece, at);
        true
    }
}

/// Calls `write` for each of `addresses` in order, with its page's parts, or `None`
/// for a page `zero` marks (all zeros, no bytes held; `zero` empty: none is). A page
/// with no bytes left in `pieces` comes as `None` too: callers check the length first.
pub fn each_page<'a, D: AsRef<[u8]>, E>(
    addresses: &[u64],
    zero: &[bool],
    pieces: &'a [D],
    mut write: impl FnMut(u64, Option<&[&'a [u8]]>) -> Result<(), E>,
) -> Result<(), E> {
    let mut cursor = PageCursor::new(pieces);
    let mut parts = Vec::with_capacity(4);
    for (i, &a) in addresses.iter().enumerate() {
        if zero.get(i).copied().unwrap_or(false) || !cursor.next_page(&mut parts) {
            write(a, None)?;
        } else {
            write(a, Some(&parts))?;
        }
    }
    Ok(())
}

/// Copies a page's `parts` one after the other into `to`, which is one page long.
pub fn gather(parts: &[&[u8]], to: &mut [u8]) {
    let mut at = 0;
    for part in parts {
        to[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
}

/// Writes the pages into `memory`, a flat image addressed from 0 (a zero mark clears
/// its page).
pub fn write_flat<D: AsRef<[u8]>>(memory: &mut [u8], addresses: &[u64], zero: &[bool], pieces: &[D]) {
    let _ = each_page(addresses, zero, pieces, |a, parts| -> Result<(), ()> {
        let to = &mut memory[a as usize..a as usize + PAGE];
        match parts {
            Some(parts) => gather(parts, to),
            None => to.fill(0),
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut pieces = Vec::new();
        let mut rest = bytes;
        for &s in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let take = s.min(rest.len());
            pieces.push(rest[..take].to_vec());
            rest = &rest[take..];
        }
        pieces
    }

    #[test]
    fn pages_come_whole_however_the_pieces_are_cut() {
        let bytes: Vec<u8> = (0..5 * PAGE).map(|i| (i * 31 / 7) as u8).collect();
        for sizes in [&[PAGE][..], &[6000], &[1], &[4095, 4097, 3], &[5 * PAGE], &[100, 9000, 17]] {
            let pieces = cut(&bytes, sizes);
            let mut cursor = PageCursor::new(&pieces);
            let mut parts = Vec::new();
            let mut pages = Vec::new();
            while cursor.next_page(&mut parts) {
                assert!(parts.iter().all(|p| !p.is_empty()));
                pages.push(parts.concat());
            }
            assert_eq!(pages.concat(), bytes, "pieces of {sizes:?}");
            assert_eq!(pages.len(), 5);
        }
    }

    #[test]
    fn a_partial_page_at_the_end_is_not_handed_out() {
        let pieces = [vec![1u8; PAGE + 10]];
        let mut cursor = PageCursor::new(&pieces);
        let mut parts = Vec::new();
        assert!(cursor.next_page(&mut parts));
        assert!(!cursor.next_page(&mut parts) && parts.is_empty());
    }

    #[test]
    fn a_flat_image_takes_pages_and_zero_marks_in_order() {
        let mut memory = vec![9u8; 4 * PAGE];
        let data: Vec<u8> = [[1u8; PAGE], [2u8; PAGE]].concat();
        // Page 1 twice: its later copy (a zero mark) wins.
        write_flat(&mut memory, &[PAGE as u64, 3 * PAGE as u64, PAGE as u64], &[false, false, true], &cut(&data, &[5000]));
        assert!(memory[..PAGE].iter().all(|&b| b == 9));
        assert!(memory[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(memory[3 * PAGE..].iter().all(|&b| b == 2));
    }
}
