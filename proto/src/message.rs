//! The messages, and the frame that carries each with its sender's generation.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// Bumped on any change to the messages, their encoding or the machine state they
/// carry (4: devices as sections; 5: NIC frames; 6: disks, replica verification;
/// 7: the witness); peers must match exactly.
pub const PROTOCOL_VERSION: u16 = 7;
/// Guest page size: every page in a [`Message::Pages`] batch is this long.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one batch (2 MiB), so a frame stays well under the frame limit.
pub const MAX_BATCH_PAGES: usize = 512;
/// Most bytes of encoded machine state in one epoch.
pub const MAX_STATE_BYTES: usize = 4 << 20;
/// Most bytes of console output in one message; an epoch's output may take several.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Most bytes of one NIC frame with its virtio-net header (a 64 KiB frame and more).
pub const MAX_FRAME_BYTES: usize = 65_562;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Standby,
}

/// How a batch of pages is encoded (see [`crate::pages`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    /// One LZ4 block of all the batch's pages.
    Lz4,
}

/// Whether an epoch carries every page of the guest (the first of an initial sync or
/// a re-sync) or those dirtied since the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EpochKind {
    Full,
    Delta,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// The first message each way: who the sender is and what it runs.
    Hello {
        version: u16,
        role: Role,
        /// Identifies the VM's configuration (memory, vCPUs, CPU model); a standby
        /// refuses a primary running another.
        fingerprint: u64,
    },
    /// The standby's answer to an acceptable hello: the last epoch it holds committed
    /// from this generation, if any.
    Welcome { committed: Option<u64> },
    Refused(crate::handshake::Refusal),
    EpochBegin { epoch: u64, kind: EpochKind },
    /// Pages of the current epoch: addresses, then their data in the same order.
    Pages {
        epoch: u64,
        addresses: Vec<u64>,
        compression: Compression,
        /// As one byte string (serde's bytes, as `serde_bytes` writes them); on a
        /// standby, the received pieces that carried it rather than a copy.
        data: crate::rope::Rope,
    },
    /// Pages of the current epoch that hold only zero bytes.
    ZeroPages { epoch: u64, addresses: Vec<u64> },
    /// The machine state (vCPUs, VM-wide KVM state, devices) as of the epoch's pause,
    /// encoded by the VMM's own codec.
    State {
        epoch: u64,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// Console output the guest produced during the epoch (all of it still unreleased,
    /// for a full epoch), in order. `offset`: where its first byte stands in the
    /// console's whole output since the guest started, so that a console client can
    /// resume on the standby exactly where it stopped. A standby that takes over prints
    /// the output the primary had not said it released, so none is lost.
    Output {
        epoch: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A frame NIC `nic` sent during the epoch (all frames still unreleased, for a full
    /// epoch), led by its virtio-net header. A standby that takes over sends the frames
    /// of its committed epochs the primary had not said it released: a peer may see
    /// one twice, as a network may show it, and never misses one the guest was told
    /// went.
    Frame {
        epoch: u64,
        nic: u8,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A digest of `pages` pages from `first` (guest memory or disk blocks) as they
    /// were at the epoch's pause, for the standby to compare with its image's once it
    /// has applied the epoch (see [`crate::verify`]).
    Verify { epoch: u64, first: u64, pages: u32, digest: u64 },
    /// Ends the epoch: how many pages it carried and a CRC-32 over all of it.
    EpochCommit { epoch: u64, pages: u64, checksum: u32 },
    /// The standby verified and applied the epoch.
    Ack { epoch: u64 },
    /// The primary has released the output of every epoch up to this one: sent after
    /// the release, so a standby that takes over may print again what was released
    /// just before the primary died, but never skips what was not.
    Released { epoch: u64 },
    /// Sent on a timer both ways; `seq` lets the receiver see order and loss.
    Heartbeat { seq: u64 },
    /// The sender is leaving on purpose (an operator stop), not dying.
    Goodbye { reason: String },
    /// A host's question to the witness (see [`crate::witness`]).
    WitnessAsk(crate::witness::Ask),
    /// The witness's answer.
    WitnessAnswer(crate::witness::Answer),
}

pub(crate) fn aligned(addresses: &[u64]) -> Result<(), ProtoError> {
    match addresses.iter().find(|&&a| a % PAGE_SIZE as u64 != 0) {
        Some(a) => Err(ProtoError::Invalid(format!("unaligned page address {a:#x}"))),
        None => Ok(()),
    }
}

/// One message as it goes on the wire, stamped with its sender's generation, so a peer
/// from an older generation (a primary that was replaced) is recognised on any frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub generation: u64,
    pub message: Message,
}

impl Message {
    /// About how many bytes the message takes encoded, so its buffer is allocated once.
    pub fn size_hint(&self) -> usize {
        64 + match self {
            Message::Pages { addresses, data, .. } => addresses.len() * 8 + data.len(),
            Message::ZeroPages { addresses, .. } => addresses.len() * 8,
            Message::State { state, .. } => state.len(),
            Message::Output { bytes, .. } | Message::Frame { bytes, .. } => bytes.len(),
            _ => 0,
        }
    }

    /// Checks what the encoding cannot: lengths that must agree and stay within the
    /// limits. Decoding calls this, so no invalid message leaves the codec.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let bad = |why: String| Err(ProtoError::Invalid(why));
        match self {
            Message::Pages { addresses, data, compression, .. } => {
                if addresses.is_empty() || addresses.len() > MAX_BATCH_PAGES {
                    return bad(format!("a batch of {} pages", addresses.len()));
                }
                let raw = addresses.len() * PAGE_SIZE;
                let fits = match compression {
                    Compression::None => data.len() == raw,
                    Compression::Lz4 => !data.is_empty() && data.len() < raw,
                };
                if !fits {
                    return bad(format!("{} bytes of {compression:?} data for {} pages", data.len(), addresses.len()));
                }
                aligned(addresses)
            }
            Message::ZeroPages { addresses, .. } => {
                if addresses.is_empty() || addresses.len() > MAX_BATCH_PAGES {
                    return bad(format!("a batch of {} zero pages", addresses.len()));
                }
                aligned(addresses)
            }
            Message::State { state, .. } if state.len() > MAX_STATE_BYTES => {
                bad(format!("{} bytes of machine state", state.len()))
            }
            Message::Output { bytes, .. } if bytes.is_empty() || bytes.len() > MAX_OUTPUT_BYTES => {
                bad(format!("{} bytes of output in one message", bytes.len()))
            }
            Message::Frame { bytes, .. } if bytes.is_empty() || bytes.len() > MAX_FRAME_BYTES => {
                bad(format!("a frame of {} bytes", bytes.len()))
            }
            Message::Goodbye { reason } if reason.len() > 1024 => bad("an overlong goodbye".into()),
            Message::WitnessAnswer(crate::witness::Answer::Status { holder, .. }) if holder.len() > 128 => {
                bad("an overlong holder".into())
            }
            Message::Verify { first, pages, .. } if *pages == 0 || *pages > crate::verify::MAX_VERIFY_PAGES || first % PAGE_SIZE as u64 != 0 => {
                bad(format!("a check of {pages} pages from {first:#x}"))
            }
            _ => Ok(()),
        }
    }
}
