//! `tandem keygen`: a key pair for replication's mutual TLS.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tandem_replication::tls::{self, CERT_FILE, KEY_FILE};

#[derive(clap::Args, Clone, Debug)]
pub struct KeygenArgs {
    /// Directory to write key.pem and cert.pem into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Replace a key pair already there. Its certificate stops working at every peer
    /// that pinned it.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &KeygenArgs) -> Result<u8> {
    let key = args.out.join(KEY_FILE);
    if key.exists() && !args.force {
        bail!("{} already exists: peers may have pinned its certificate (use --force to replace it)", key.display());
    }
    let fingerprint = tls::keygen(&args.out)?;
    println!("wrote {} (private: keep it on this host) and {} (give it to the peer)", key.display(), args.out.join(CERT_FILE).display());
    println!("fingerprint {fingerprint}");
    Ok(0)
}
