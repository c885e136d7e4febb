//! Snapshot files: a checked frame ([`format`]) around the machine state, encoded by
//! [`codec`], followed by guest memory pages.
//!
//! Body layout (little-endian):
//! ```text
//! u64 state length, state (codec-encoded MachineState)
//! u64 page count N, N x u64 guest-physical page addresses, N x 4096 bytes of page data
//! ```
//! A full snapshot holds every page that is not all zeros (a restored VM's memory starts
//! zeroed); a delta holds every page written since the snapshot before it, zero or not.
//! Both hold the complete (small) machine state.

pub mod codec;
pub mod compare;
pub mod image;
pub mod format;

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::devices::Section;
use crate::memory::{MAX_MEM_MIB, PAGE_SIZE};
use crate::state::{VcpuState, VmState};
pub use format::Kind;

/// Everything but memory that a restored VM needs.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct MachineState {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub vm: VmState,
    pub vcpu_states: Vec<VcpuState>,
    /// Each device's own state, in its own versioned section.
    pub devices: Vec<Section>,
}

/// One snapshot: the machine state and a set of pages.
pub struct Snapshot {
    pub kind: Kind,
    pub state: MachineState,
    /// Guest-physical address of each page in `data`, in order.
    pub pages: Vec<u64>,
    /// `pages.len() * PAGE_SIZE` bytes.
    pub data: Vec<u8>,
    /// Each page's CRC-32 (crc32fast's, the replication protocol's page CRC) where the
    /// capture took it as it copied the page; empty otherwise (a snapshot read from a
    /// file, say).
    pub page_crcs: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    // The cause is in the message and not a `source`: whoever prints the chain would
    // otherwise show it twice.
    #[error("cannot write snapshot {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("cannot open snapshot {path}: {error}")]
    Open { path: String, error: std::io::Error },
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Disk(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

const PAGE: usize = PAGE_SIZE as usize;
/// Largest body a snapshot can have: the state, and every page of the largest guest
/// with its address.
const MAX_BODY: u64 = 16 + codec::MAX_STATE_BYTES as u64 + (MAX_MEM_MIB << 20) / PAGE_SIZE * (PAGE_SIZE + 8);

impl Snapshot {
    /// Writes the snapshot to `path` through a temporary file renamed into place, so a
    /// crash mid-write never leaves a file that looks like a snapshot.
    pub fn write_to(&self, path: &Path) -> Result<(), SnapshotError> {
        let err = |error| SnapshotError::Write {
            path: path.display().to_string(),
            error,
        };
        let state = codec::encode(&self.state)?;
        let index: Vec<u8> = self.pages.iter().flat_map(|gpa| gpa.to_le_bytes()).collect();
        let parts: [&[u8]; 5] = [
            &(state.len() as u64).to_le_bytes(),
            &state,
            &(self.pages.len() as u64).to_le_bytes(),
            &index,
            &self.data,
        ];
        let tmp = path.with_extension("partial");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(err)?);
        format::write(&mut file, self.kind, &parts).map_err(err)?;
        let file = file.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn read_from(path: &Path) -> Result<Self, SnapshotError> {
        let mut file = std::fs::File::open(path).map_err(|error| SnapshotError::Open {
            path: path.display().to_string(),
            error,
        })?;
        Self::read(&mut file)
    }

    /// Reads and checks one snapshot; every length is checked before it is used. The
    /// page data stays in the buffer it was read into.
    pub fn read(input: &mut impl Read) -> Result<Self, SnapshotError> {
        let (kind, mut body) = format::read(input, MAX_BODY)?;
        let mut rest = &body[..];
        let state_len = take_u64(&mut rest)?;
        if state_len > codec::MAX_STATE_BYTES as u64 || state_len > rest.len() as u64 {
            return Err(SnapshotError::Corrupt(format!("state length {state_len}")));
        }
        let (state_bytes, after) = rest.split_at(state_len as usize);
        let state: MachineState = codec::decode(state_bytes)?;
        if state.mem_mib > MAX_MEM_MIB || state.vcpus == 0 || state.vcpu_states.len() != usize::from(state.vcpus) {
            return Err(SnapshotError::Corrupt("machine shape".into()));
        }
        rest = after;
        let count = take_u64(&mut rest)?;
        let max_pages = (state.mem_mib << 20) / PAGE_SIZE;
        if count > max_pages || rest.len() as u64 != count * (8 + PAGE_SIZE) {
            return Err(SnapshotError::Corrupt(format!("{count} pages in {} bytes", rest.len())));
        }
        let (index, data) = rest.split_at(count as usize * 8);
        let pages = index
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect::<Vec<_>>();
        if let Some(bad) = pages.iter().find(|&&p| p % PAGE_SIZE != 0) {
            return Err(SnapshotError::Corrupt(format!("unaligned page address {bad:#x}")));
        }
        let data_start = body.len() - data.len();
        body.drain(..data_start);
        Ok(Self {
            kind,
            state,
            pages,
            data: body,
            page_crcs: Vec::new(),
        })
    }
}

impl Snapshot {
    /// The data of the page at guest-physical `gpa`, if this snapshot holds it.
    pub fn page_at(&self, gpa: u64) -> Option<&[u8]> {
        self.pages.iter().position(|&p| p == gpa).map(|i| page(&self.data, i))
    }
}

fn take_u64(rest: &mut &[u8]) -> Result<u64, SnapshotError> {
    if rest.len() < 8 {
        return Err(SnapshotError::Corrupt("body ends early".into()));
    }
    let (head, tail) = rest.split_at(8);
    *rest = tail;
    Ok(u64::from_le_bytes(head.try_into().expect("8 bytes")))
}

/// Whether a page is all zeros.
pub fn is_zero_page(page: &[u8]) -> bool {
    page.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// Page data for the page at index `i` of a snapshot.
pub fn page(data: &[u8], i: usize) -> &[u8] {
    &data[i * PAGE..(i + 1) * PAGE]
}

/// Deterministic pseudo-random byte strings for the decoders' garbage tests (xorshift64).
#[cfg(test)]
pub(crate) fn garbage(seed: u64, cases: usize, max_len: u64) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed;
    (0..cases).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % max_len) as usize;
        (0..len).map(|i| (x.rotate_left(i as u32) & 0xff) as u8).collect()
    })
}
