//! The replication protocol between a primary and its standby, without I/O: no
//! sockets, no clocks. The transport hands bytes in and takes frames out; time comes in
//! as an argument. That keeps every rule here testable deterministically, loss,
//! reordering and garbage included.
//!
//! A connection is a stream of [`frame`]s, each a checked envelope around one encoded
//! [`message::Frame`]: the sender's generation and a message. It starts with a
//! [`handshake`]; then the primary streams epochs (begin, pages, state, commit) and the
//! standby acknowledges each one it has verified and applied ([`standby`], [`primary`]);
//! both send heartbeats ([`liveness`]).

pub mod buffers;
pub mod codec;
pub mod crc;
pub mod epoch;
pub mod frame;
pub mod handshake;
pub mod liveness;
pub mod message;
pub mod pages;
pub mod primary;
pub mod role;
pub mod rope;
pub mod sent;
pub mod standby;
pub mod verify;
pub mod witness;

pub use message::{Frame, Message, PROTOCOL_VERSION};

/// Everything that can be wrong with what a peer sent. Each is the end of the
/// connection: the receiver drops it, and nothing of an unfinished epoch is applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("not a tandem replication stream (bad magic)")]
    BadMagic,
    #[error("frame of {0} bytes exceeds the limit of {max}", max = frame::MAX_FRAME_BYTES)]
    TooLarge(u64),
    #[error("frame checksum mismatch: corrupted on the way")]
    Checksum,
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("refused: {0}")]
    Refused(#[from] handshake::Refusal),
    #[error("message out of order: {0}")]
    OutOfOrder(String),
    #[error("epoch {epoch} failed verification: {why}")]
    BadEpoch { epoch: u64, why: String },
}
