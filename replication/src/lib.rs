//! Replication: the primary's epoch loop, output commit, the standby, heartbeats and
//! promotion. Only [`transport`] knows QUIC and tokio; [`tls`] holds the pinned-
//! certificate trust both ends use.

pub mod pipeline;
pub mod tls;
pub mod transport;
