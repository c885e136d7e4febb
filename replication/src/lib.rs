//! Replication: the primary's epoch loop, output commit, the standby, heartbeats and
//! promotion. Only [`transport`] knows QUIC and tokio; [`tls`] holds the pinned-
//! certificate trust both ends use.

pub mod durable;
pub mod events;
pub mod generation;
pub mod pipeline;
pub mod primary;
pub mod standby;
pub mod tls;
pub mod transport;
pub mod witness;

use std::time::Duration;

/// How often each side sends a heartbeat, and how long a silent peer is given before
/// it counts as gone. See docs/design.md for why the defaults are what they are.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { interval: Duration::from_millis(100), timeout: Duration::from_millis(1000) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error(transparent)]
    Vm(#[from] tandem_vmm::vm::VmError),
    #[error(transparent)]
    Snapshot(#[from] tandem_vmm::snapshot::SnapshotError),
    #[error(transparent)]
    Generation(#[from] generation::GenerationError),
    #[error(transparent)]
    Witness(#[from] witness::WitnessError),
    #[error("{0}")]
    Protocol(#[from] tandem_proto::ProtoError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NoStandby(String),
    #[error("{0}")]
    NotPromoted(String),
}
