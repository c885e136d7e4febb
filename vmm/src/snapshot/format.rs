//! The frame around every snapshot file: what it is, which format version, how long,
//! and a checksum, all checked before the body is believed.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "TANDEMSS"
//!      8     2  format version (little-endian)
//!     10     1  kind: 0 full snapshot, 1 delta
//!     11     1  reserved, 0
//!     12     8  body length in bytes
//!     20     4  CRC-32 (IEEE) of bytes 0..20 and the body
//!     24     -  body
//! ```
//!
//! The checksum covers the header fields too, so no flipped bit anywhere (turning a
//! full snapshot into a delta, say) yields a file that reads as valid.
//!
//! The format version says how the body is laid out; it is raised on any change, and a
//! reader refuses every version it was not written for rather than guess.

use std::io::{self, Read, Write};

pub const MAGIC: [u8; 8] = *b"TANDEMSS";
/// 2: XSAVE areas of any size (`KVM_GET_XSAVE2`), where 1 held exactly 4 KiB.
/// 3: each device's state as its own versioned section.
pub const FORMAT_VERSION: u16 = 3;
pub const HEADER_LEN: usize = 24;

/// What a snapshot file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Everything needed to rebuild the VM.
    Full,
    /// Changes since the previous snapshot of a chain.
    Delta,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] io::Error),
    #[error("not a tandem snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported (this tandem reads version {FORMAT_VERSION})")]
    Version { found: u16 },
    #[error("unknown snapshot kind {0}")]
    UnknownKind(u8),
    #[error("snapshot header is corrupt (reserved byte is {0})")]
    Reserved(u8),
    #[error("snapshot body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("snapshot is truncated: {got} of {want} bytes present")]
    Truncated { want: u64, got: u64 },
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
}

/// Writes one framed body, given as consecutive parts so a caller never has to
/// assemble a body as large as guest memory just to frame it.
pub fn write(out: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[10] = match kind {
        Kind::Full => 0,
        Kind::Delta => 1,
    };
    header[12..20].copy_from_slice(&(len as u64).to_le_bytes());
    let crc = checksum(&header[..20], parts);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&header)?;
    parts.iter().try_for_each(|p| out.write_all(p))
}

fn checksum(fields: &[u8], body: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    body.iter().for_each(|p| h.update(p));
    h.finalize()
}

/// Reads up to `want` bytes, reporting how many there were.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads and checks one framed body of at most `max_body` bytes. Nothing is allocated
/// for the body before its length has been checked against `max_body`.
pub fn read(input: &mut impl Read, max_body: u64) -> Result<(Kind, Vec<u8>), FormatError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(input, &mut header)?;
    if got < HEADER_LEN {
        // Too short to even hold a header: say what it is not, if we can tell.
        if got >= MAGIC.len() && header[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::Truncated {
            want: HEADER_LEN as u64,
            got: got as u64,
        });
    }
    if header[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let kind = match header[10] {
        0 => Kind::Full,
        1 => Kind::Delta,
        other => return Err(FormatError::UnknownKind(other)),
    };
    if header[11] != 0 {
        return Err(FormatError::Reserved(header[11]));
    }
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if len > max_body {
        return Err(FormatError::TooLarge { len, max: max_body });
    }
    let stored = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
    let mut body = vec![0u8; len as usize];
    let got = read_up_to(input, &mut body)?;
    if (got as u64) < len {
        return Err(FormatError::Truncated {
            want: HEADER_LEN as u64 + len,
            got: (HEADER_LEN + got) as u64,
        });
    }
    let computed = checksum(&header[..20], &[&body]);
    if computed != stored {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok((kind, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn framed(kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, kind, &[body]).unwrap();
        out
    }

    #[test]
    fn a_body_in_parts_reads_back_whole() {
        let mut out = Vec::new();
        write(&mut out, Kind::Delta, &[b"state ", b"and ", b"pages"]).unwrap();
        assert_eq!(out, framed(Kind::Delta, b"state and pages"));
    }

    #[test]
    fn round_trip_both_kinds() {
        for kind in [Kind::Full, Kind::Delta] {
            let file = framed(kind, b"state and pages");
            let (k, body) = read(&mut &file[..], MAX).unwrap();
            assert_eq!((k, &body[..]), (kind, &b"state and pages"[..]));
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let file = framed(Kind::Full, &[7u8; 100]);
        for cut in 0..file.len() {
            let err = read(&mut &file[..cut], MAX).unwrap_err();
            assert!(matches!(err, FormatError::Truncated { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let file = framed(Kind::Full, &[0x5a; 64]);
        for byte in 0..file.len() {
            for bit in 0..8 {
                let mut bad = file.clone();
                bad[byte] ^= 1 << bit;
                assert!(read(&mut &bad[..], MAX).is_err(), "flip at byte {byte} bit {bit} was accepted");
            }
        }
    }

    #[test]
    fn specific_errors_say_what_is_wrong() {
        let file = framed(Kind::Full, b"x");
        let mut v = file.clone();
        v[8] = 1;
        assert!(read(&mut &v[..], MAX).unwrap_err().to_string().contains("format version 1 is not supported"));
        let mut m = file.clone();
        m[0] = b'X';
        assert!(matches!(read(&mut &m[..], MAX), Err(FormatError::BadMagic)));
        let mut k = file.clone();
        k[10] = 9;
        assert!(matches!(read(&mut &k[..], MAX), Err(FormatError::UnknownKind(9))));
        let mut c = file.clone();
        *c.last_mut().unwrap() ^= 0xff;
        assert!(matches!(read(&mut &c[..], MAX), Err(FormatError::Checksum { .. })));
        assert!(matches!(read(&mut &b"GIF89a..."[..], MAX), Err(FormatError::BadMagic)));
    }

    #[test]
    fn an_oversized_body_is_refused_before_allocating() {
        let mut file = framed(Kind::Full, b"x");
        file[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = read(&mut &file[..], MAX).unwrap_err();
        assert!(matches!(err, FormatError::TooLarge { len: u64::MAX, .. }), "{err}");
    }

    #[test]
    fn random_garbage_never_panics_or_passes() {
        for (n, mut bytes) in crate::snapshot::garbage(0x2545_f491_4f6c_dd1d, 5000, 80).enumerate() {
            if n % 3 == 0 && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&MAGIC); // get past the first check too
            }
            assert!(read(&mut &bytes[..], MAX).is_err());
        }
    }
}
