//! `tandem bench`: placeholder until the boot benchmark lands.
use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum BenchCmd {}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {}
}
