//! CRC-32 (the IEEE polynomial, crc32fast's) of pages joined one after another, from
//! each page's own CRC: a primary takes a page's CRC as it captures the page, while its
//! bytes are in cache, and the batch's checksum then never reads the pages again.
//! Reading them again cost more than the CRC itself (about 11 GB/s from memory on this
//! host, 60 GB/s from cache), and the capture has just read them.
//!
//! CRC-32 is linear: the CRC of `A` then `B` is the CRC of `A` times `x^(8|B|)` modulo
//! the polynomial, plus the CRC of `B` (the initial and final inversions cancel). For
//! `B` a page the product is by a constant, done here by four table look-ups.

use crate::message::PAGE_SIZE;

/// The polynomial, bit-reversed as the CRC is computed (bit 31 is `x^0`).
const POLY: u32 = 0xedb8_8320;

/// `a * b` modulo the polynomial.
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 0;
    while bit < 32 {
        if a & (1 << (31 - bit)) != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit += 1;
    }
    product
}

/// `x^(8 * bytes)` modulo the polynomial: what shifting a CRC past `bytes` bytes
/// multiplies it by.
const fn shift_of(bytes: u64) -> u32 {
    let (mut result, mut power, mut exponent) = (1u32 << 31, 1u32 << 30, bytes.wrapping_mul(8));
    while exponent > 0 {
        if exponent & 1 != 0 {
            result = multiply(result, power);
        }
        power = multiply(power, power);
        exponent >>= 1;
    }
    result
}

/// Multiplying by the page's shift, a byte of the CRC at a time: multiplication by a
/// constant is linear, so each byte's part comes from a table.
static PAGE_SHIFT: [[u32; 256]; 4] = {
    let shift = shift_of(PAGE_SIZE as u64);
    let mut tables = [[0u32; 256]; 4];
    let mut byte = 0;
    while byte < 4 {
        let mut value = 0;
        while value < 256 {
            tables[byte][value] = multiply(shift, (value as u32) << (8 * byte));
            value += 1;
        }
        byte += 1;
    }
    tables
};

/// The CRC of what `crc` covers followed by a page whose own CRC is `page_crc`.
pub fn then_page(crc: u32, page_crc: u32) -> u32 {
    let [b0, b1, b2, b3] = crc.to_le_bytes();
    PAGE_SHIFT[0][b0 as usize] ^ PAGE_SHIFT[1][b1 as usize] ^ PAGE_SHIFT[2][b2 as usize] ^ PAGE_SHIFT[3][b3 as usize] ^ page_crc
}

/// The CRC of a page of zeros: a page whose CRC differs is not one, and need not be
/// read to know it.
pub const ZERO_PAGE: u32 = {
    let mut crc = !0u32;
    let mut bit = 0;
    while bit < 8 * PAGE_SIZE {
        crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
        bit += 1;
    }
    !crc
};

/// A page's CRC, as [`then_page`] takes it.
pub fn page(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The CRC of pages one after another, from theirs, as a hasher that other CRCs
/// combine with.
pub fn of_pages(page_crcs: &[u32]) -> crc32fast::Hasher {
    let crc = page_crcs.iter().fold(0, |crc, &p| then_page(crc, p));
    crc32fast::Hasher::new_with_initial_len(crc, (page_crcs.len() * PAGE_SIZE) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The CRC of `a` followed by `b`, from the CRC of each and the length of `b`: the
    /// rule [`then_page`] applies with `b` a page, checked here for any length.
    fn concat(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
        multiply(shift_of(len_b), crc_a) ^ crc_b
    }

    #[test]
    fn the_crc_of_a_concatenation_comes_from_its_parts() {
        let all = bytes(7, 20_000);
        for split in [0, 1, 3, 64, 4095, 4096, 4097, 12_345, 20_000] {
            let (a, b) = all.split_at(split);
            assert_eq!(concat(crc32fast::hash(a), crc32fast::hash(b), b.len() as u64), crc32fast::hash(&all), "split at {split}");
        }
    }

    #[test]
    fn pages_joined_by_their_crcs_are_the_crc_of_the_pages() {
        for pages in [0, 1, 2, 7, 512] {
            let data = bytes(pages as u64 + 11, pages * PAGE_SIZE);
            let crcs: Vec<u32> = data.chunks_exact(PAGE_SIZE).map(page).collect();
            let joined = of_pages(&crcs);
            let mut direct = crc32fast::Hasher::new();
            direct.update(&data);
            assert_eq!(joined.clone().finalize(), direct.clone().finalize(), "{pages} pages");
            // And it combines as the hasher of the bytes does.
            let mut head = crc32fast::Hasher::new();
            head.update(b"head");
            let mut other = head.clone();
            head.combine(&joined);
            other.combine(&direct);
            assert_eq!(head.finalize(), other.finalize());
        }
        // A page of zeros, and one that differs in its last bit.
        let mut page_bytes = vec![0u8; PAGE_SIZE];
        let zero = page(&page_bytes);
        assert_eq!(zero, ZERO_PAGE);
        page_bytes[PAGE_SIZE - 1] = 1;
        assert_ne!(then_page(0, zero), then_page(0, page(&page_bytes)));
    }
}
