//! `tandem witness`: the arbiter on a third host (see `tandem_replication::witness`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_proto::witness::{Answer, Ask};
use tandem_proto::PROTOCOL_VERSION;
use tandem_replication::events::Events;
use tandem_replication::witness::{self, ServeConfig, WitnessLink};
use tandem_replication::tls;

#[derive(clap::Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct WitnessArgs {
    #[command(subcommand)]
    ask: Option<WitnessCmd>,
    /// Address to listen on (host:port, UDP).
    #[arg(long, value_name = "ADDR", required = true)]
    listen: Option<SocketAddr>,
    /// The witness's key pair (key.pem from `tandem keygen`).
    #[arg(long, value_name = "FILE", required = true)]
    key: Option<PathBuf>,
    /// A cluster host's certificate (its cert.pem); repeat for each host. Only these
    /// hosts are answered.
    #[arg(long = "peer-cert", value_name = "FILE", required = true)]
    peer_certs: Vec<PathBuf>,
    /// Where the witness keeps its record: the latest generation it granted, and to
    /// which host. A witness restarted on the same directory carries on from it.
    #[arg(long, value_name = "DIR", required = true)]
    state_dir: Option<PathBuf>,
    /// How long a lease lets a primary run on without its standby; it renews a third
    /// of the way in. A standby is promoted at most this long after the primary that
    /// held the lease died.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    lease_ms: u64,
    /// Write each question and answer to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
}

#[derive(clap::Subcommand, Clone, Debug)]
enum WitnessCmd {
    /// Ask a running witness, as one of its hosts, what it has decided: the latest
    /// generation granted and to which host, and any lease running.
    Status(StatusArgs),
}

#[derive(clap::Args, Clone, Debug)]
struct StatusArgs {
    /// The witness's address (host:port).
    #[arg(long, value_name = "ADDR")]
    witness: SocketAddr,
    /// The witness's certificate (its cert.pem).
    #[arg(long, value_name = "FILE")]
    witness_cert: PathBuf,
    /// This host's key pair, one the witness knows (`--peer-cert`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
}

pub fn witness(args: WitnessArgs) -> Result<u8> {
    if let Some(WitnessCmd::Status(status)) = args.ask {
        return ask_status(status);
    }
    // clap requires these without a subcommand.
    let (Some(listen), Some(key), Some(state_dir)) = (args.listen, args.key, args.state_dir) else {
        bail!("tandem witness needs --listen, --key, --peer-cert and --state-dir (or `tandem witness status`)");
    };
    if !(100..=600_000).contains(&args.lease_ms) {
        bail!("--lease-ms must be between 100 and 600000, got {}", args.lease_ms);
    }
    // Read now, so that a corrupt record is reported before the witness listens.
    witness::read_record(&state_dir)?;
    let hosts = args.peer_certs.iter().map(|p| tls::load_peer_cert(p)).collect::<Result<Vec<_>, _>>()?;
    let tls = tls::witness_server_config(tls::load_identity(&key)?, hosts)?;
    let events = match &args.events {
        Some(path) => Events::to_file(path)?,
        None => Events::none(),
    };
    witness::serve(ServeConfig { listen, tls, state_dir, lease: Duration::from_millis(args.lease_ms), events })?;
    Ok(0)
}

/// `tandem witness status`: one line of what the witness has decided.
fn ask_status(args: StatusArgs) -> Result<u8> {
    let identity = tls::load_identity(&args.key)?;
    let me = witness::host_id(&identity.cert);
    let tls = tls::witness_client_config(identity, tls::load_peer_cert(&args.witness_cert)?)?;
    let link = WitnessLink { addr: args.witness, tls };
    let answer = witness::ask_once(&link, Ask::Status { version: PROTOCOL_VERSION })
        .with_context(|| format!("asking the witness at {}", args.witness))?;
    let Answer::Status { generation, holder, lease } = answer else {
        bail!("the witness at {} did not answer with its status: {answer:?}", args.witness);
    };
    let whose = |host: &str| if host == me { " (this host)" } else { "" };
    let granted = match generation {
        0 => "generation=none".to_string(),
        g => format!("generation={g} holder={holder}{}", whose(&holder)),
    };
    let lease = match lease {
        Some((g, left)) => format!("lease=generation {g}, {left} ms left"),
        None => "lease=none".into(),
    };
    println!("witness={} {granted} {lease}", args.witness);
    Ok(0)
}
