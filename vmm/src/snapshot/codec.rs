//! The encoding of saved state, and the only module that knows it is bincode 2, so it
//! can be swapped in one place. Every decode runs under a byte limit, so a corrupt or
//! hostile length field cannot make it allocate more than that.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Most bytes one encoded state may take; VM and device state is a few hundred KiB.
pub const MAX_STATE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode state: {0}")]
    Encode(String),
    #[error("corrupt or incompatible state: {0}")]
    Decode(String),
    #[error("corrupt state: {0} bytes left over after decoding")]
    Trailing(usize),
}

/// Little-endian, fixed-width integers (decoding cost does not depend on the values),
/// and the byte limit above.
fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_STATE_BYTES>()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one value that must take up all of `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u32,
        name: String,
        pages: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            id: 7,
            name: "vcpu0".into(),
            pages: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Sample>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.push(0);
        assert!(matches!(decode::<Sample>(&bytes), Err(CodecError::Trailing(1))));
    }

    #[test]
    fn a_huge_declared_length_is_refused_without_allocating_it() {
        // A Vec<u64> whose length field claims 2^60 elements.
        let bytes = (1u64 << 60).to_le_bytes();
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }

    #[test]
    fn random_garbage_never_panics() {
        for bytes in crate::snapshot::garbage(0x9e37_79b9_7f4a_7c15, 5000, 64) {
            let _ = decode::<Sample>(&bytes);
        }
    }
}
