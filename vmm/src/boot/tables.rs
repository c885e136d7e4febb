//! Little-endian byte building shared by the firmware tables (MP and ACPI) that the
//! VMM writes for the guest, and checks of what was written.

pub(crate) fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// The byte that makes `bytes` (with the checksum field still zero) sum to 0 mod 256.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    sum(bytes).wrapping_neg()
}

/// Byte sum mod 256: zero over a table whose checksum is right.
pub(crate) fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

#[cfg(test)]
pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[cfg(test)]
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[cfg(test)]
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_makes_the_sum_zero() {
        let mut t = vec![1u8, 2, 250, 0];
        t[3] = checksum(&t);
        assert_eq!(sum(&t), 0);
        let mut b = Vec::new();
        put_u16(&mut b, 0x0102);
        put_u32(&mut b, 0x0304_0506);
        put_u64(&mut b, 7);
        assert_eq!((u16_at(&b, 0), u32_at(&b, 2), u64_at(&b, 6)), (0x0102, 0x0304_0506, 7));
    }
}
