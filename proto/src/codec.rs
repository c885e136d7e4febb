//! The encoding of frames, and the only module that knows it is bincode 2 (pinned), so
//! it can be swapped in one place. Decoding runs under a byte limit and validates the
//! message, so a hostile length cannot make it allocate beyond the frame it came in.

use crate::frame::MAX_FRAME_BYTES;
use crate::message::Frame;
use crate::ProtoError;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_FRAME_BYTES as usize }>()
}

pub fn encode(frame: &Frame) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail short of running out of memory; a
    // frame over the limit is caught by the framing, which refuses to send it.
    bincode::serde::encode_to_vec(frame, config()).unwrap_or_default()
}

/// Decodes exactly one frame that must take up all of `bytes`, and validates it.
pub fn decode(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtoError::Decode(format!("{} bytes left over", bytes.len() - used)));
    }
    frame.message.validate()?;
    Ok(frame)
}
