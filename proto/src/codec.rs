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
    let mut out = Vec::new();
    encode_into(frame, &mut out);
    out
}

/// Appends `frame`'s encoding to `out`: a frame goes straight after its header, with
/// no copy of a large payload from one buffer into another.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    // Encoding plain data into a Vec cannot fail short of running out of memory; a
    // frame over the limit is caught by the framing, which refuses to send it.
    let start = out.len();
    if bincode::serde::encode_into_std_write(frame, out, config()).is_err() {
        out.truncate(start);
    }
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
