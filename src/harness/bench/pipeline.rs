//! `tandem bench pipeline`: the replication pipeline's throughput against plain QUIC
//! with the same TLS and settings, and the physical limits of this host (memcpy,
//! loopback TCP), measured in one run, for random, zero-heavy and sparse pages.

use anyhow::{bail, Result};
use tandem_replication::pipeline::{measure, Mix, Params};

use super::ms;

#[derive(clap::Args, Clone)]
pub struct PipelineArgs {
    /// Size of the memory region, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Delta epochs after the initial full one.
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// Share of the region each delta dirties, in percent.
    #[arg(long, default_value_t = 25)]
    dirty_percent: u32,
    /// Epochs in flight before the primary waits for acknowledgements.
    #[arg(long, default_value_t = 4)]
    window: usize,
}

impl Default for PipelineArgs {
    fn default() -> Self {
        Self { mib: 256, epochs: 20, dirty_percent: 25, window: 4 }
    }
}

pub fn run(args: &PipelineArgs) -> Result<()> {
    if args.mib == 0 || args.mib > 16 << 10 || args.dirty_percent > 100 || args.window == 0 {
        bail!("--mib must be 1..=16384, --dirty-percent at most 100, --window at least 1");
    }
    for (mix, what) in [
        (Mix::Random, "random pages (incompressible)"),
        (Mix::ZeroHeavy, "zero-heavy pages (3 in 4 all zeros, the rest random)"),
        (Mix::Sparse, "sparse pages (a number, then zeros)"),
    ] {
        let params = Params { mib: args.mib, epochs: args.epochs, dirty_percent: args.dirty_percent, window: args.window, mix };
        let f = measure(params)?;
        let gib = f.bytes() as f64 / (1u64 << 30) as f64;
        println!(
            "pipeline, {what}: {} MiB region, a full epoch then {} deltas dirtying {}% each, window {}: {} pages ({gib:.2} GiB) through each path, same run",
            args.mib, args.epochs, args.dirty_percent, args.window, f.pages
        );
        println!("{:<38} {:>9} {:>8} {:>11} {:>9}", "path", "ms", "GiB/s", "pages/s", "vs memcpy");
        for (name, t) in [
            ("epoch pipeline (QUIC, mutual TLS)", f.pipeline),
            ("plain QUIC bulk, same TLS/settings", f.quinn),
            ("memcpy, one thread", f.memcpy),
            ("loopback TCP (tokio)", f.tcp),
        ] {
            let secs = t.as_secs_f64();
            println!(
                "{name:<38} {:>9.1} {:>8.2} {:>11.0} {:>9.3}",
                ms(t),
                gib / secs,
                f.pages as f64 / secs,
                f.memcpy.as_secs_f64() / secs
            );
        }
        println!(
            "pipeline/plain QUIC: {:.3}; pipeline/TCP: {:.3}; bytes on the wire per page: {:.0}\n",
            f.quinn.as_secs_f64() / f.pipeline.as_secs_f64(),
            f.tcp.as_secs_f64() / f.pipeline.as_secs_f64(),
            f.wire as f64 / f.pages as f64
        );
    }
    Ok(())
}
