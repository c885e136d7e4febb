//! `tandem witness`: the arbiter on a third host (see `tandem_replication::witness`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use tandem_replication::events::Events;
use tandem_replication::witness::{self, ServeConfig};
use tandem_replication::tls;

#[derive(clap::Args, Clone, Debug)]
pub struct WitnessArgs {
    /// Address to listen on (host:port, UDP).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The witness's key pair (key.pem from `tandem keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// A cluster host's certificate (its cert.pem); repeat for each host. Only these
    /// hosts are answered.
    #[arg(long = "peer-cert", value_name = "FILE", required = true)]
    peer_certs: Vec<PathBuf>,
    /// Where the witness keeps its record: the latest generation it granted, and to
    /// which host. A witness restarted on the same directory carries on from it.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// How long a lease lets a primary run on without its standby; it renews a third
    /// of the way in. A standby is promoted at most this long after the primary that
    /// held the lease died.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    lease_ms: u64,
    /// Write each question and answer to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
}

pub fn witness(args: WitnessArgs) -> Result<u8> {
    if !(100..=600_000).contains(&args.lease_ms) {
        bail!("--lease-ms must be between 100 and 600000, got {}", args.lease_ms);
    }
    // Read now, so that a corrupt record is reported before the witness listens.
    witness::read_record(&args.state_dir)?;
    let hosts = args.peer_certs.iter().map(|p| tls::load_peer_cert(p)).collect::<Result<Vec<_>, _>>()?;
    let tls = tls::witness_server_config(tls::load_identity(&args.key)?, hosts)?;
    let events = match &args.events {
        Some(path) => Events::to_file(path)?,
        None => Events::none(),
    };
    witness::serve(ServeConfig {
        listen: args.listen,
        tls,
        state_dir: args.state_dir,
        lease: Duration::from_millis(args.lease_ms),
        events,
    })?;
    Ok(0)
}
