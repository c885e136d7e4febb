//! `tandem bench pipeline`: the replication pipeline's throughput against plain QUIC
//! with the same TLS and settings, and the physical limits of this host (memcpy,
//! loopback TCP), measured in one run, for random, zero-heavy and sparse pages.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::ValueEnum;
use tandem_proto::message::PAGE_SIZE;
use tandem_replication::pipeline::{measure, measure_region, Figures, Mix, Params, Phase};
use tandem_vmm::snapshot::{page, Snapshot};

use super::{in_the_lab_sh, ms, read_snapshots, snapshots_then};

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
    /// The synthetic page mixes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "random,zero-heavy,sparse")]
    mixes: Vec<MixArg>,
    /// Also run the pipeline on the guest memory this tandem snapshot holds (repeatable).
    #[arg(long = "snapshot", value_name = "FILE")]
    snapshots: Vec<PathBuf>,
    /// Run inside the lab, adding the memory of a Linux guest snapshotted once booted.
    #[arg(long)]
    lab: bool,
    /// Runs of each mix, the pipeline and plain QUIC taking turns; the tables show each
    /// figure's median. This host is shared: one run's ratio swings by a fifth.
    #[arg(long, default_value_t = 3)]
    runs: u32,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum MixArg {
    Random,
    ZeroHeavy,
    Sparse,
}

impl From<MixArg> for Mix {
    fn from(m: MixArg) -> Self {
        match m {
            MixArg::Random => Mix::Random,
            MixArg::ZeroHeavy => Mix::ZeroHeavy,
            MixArg::Sparse => Mix::Sparse,
        }
    }
}

impl Default for PipelineArgs {
    fn default() -> Self {
        Self {
            mib: 256,
            epochs: 20,
            dirty_percent: 25,
            window: 4,
            mixes: vec![MixArg::Random, MixArg::ZeroHeavy, MixArg::Sparse],
            snapshots: Vec::new(),
            lab: false,
            runs: 3,
        }
    }
}

pub fn run(args: &PipelineArgs) -> Result<()> {
    if args.mib == 0 || args.mib > 16 << 10 || args.dirty_percent > 100 || args.window == 0 || args.runs == 0 {
        bail!("--mib must be 1..=16384, --dirty-percent at most 100, --window and --runs at least 1");
    }
    if args.lab {
        return via_lab(args);
    }
    let snapshots = read_snapshots(&args.snapshots)?;
    for mix in Mix::ALL.into_iter().filter(|m| args.mixes.iter().any(|&a| Mix::from(a) == *m)) {
        let params = Params { mib: args.mib, epochs: args.epochs, dirty_percent: args.dirty_percent, window: args.window, mix };
        let runs = (0..args.runs).map(|_| measure(params)).collect::<Result<Vec<_>, _>>()?;
        print(mix.describe(), args, &runs);
    }
    for (path, snapshot) in snapshots {
        let what = format!("guest memory from {}", path.display());
        let memory = memory_of(&snapshot);
        let runs = (0..args.runs)
            .map(|_| measure_region(memory.clone(), args.epochs, args.dirty_percent, args.window))
            .collect::<Result<Vec<_>, _>>()?;
        print(&what, args, &runs);
    }
    Ok(())
}

/// The median of a figure over the runs.
fn median<T: Copy + Ord>(runs: &[Figures], figure: impl Fn(&Figures) -> T) -> T {
    let mut all: Vec<T> = runs.iter().map(figure).collect();
    all.sort_unstable();
    all[all.len() / 2]
}

/// Each phase's figures as their medians over the runs (each figure on its own).
fn medians(runs: &[Figures]) -> Figures {
    let phase = |p: fn(&Figures) -> &Phase| Phase {
        pages: median(runs, |f| p(f).pages),
        wire: median(runs, |f| p(f).wire),
        pipeline: median(runs, |f| p(f).pipeline),
        pipeline_cpu: median(runs, |f| p(f).pipeline_cpu),
        pipeline_faults: median(runs, |f| p(f).pipeline_faults),
        quinn: median(runs, |f| p(f).quinn),
        quinn_cpu: median(runs, |f| p(f).quinn_cpu),
        quinn_faults: median(runs, |f| p(f).quinn_faults),
    };
    Figures {
        pages_in_region: runs[0].pages_in_region,
        sync: phase(|f| &f.sync),
        steady: phase(|f| &f.steady),
        memcpy: median(runs, |f| f.memcpy),
        tcp: median(runs, |f| f.tcp),
    }
}

/// The guest RAM a snapshot holds, as one flat region by guest-physical address (the
/// pages it leaves out are zero).
fn memory_of(snapshot: &Snapshot) -> Vec<u8> {
    let end = snapshot.pages.iter().map(|&a| a as usize + PAGE_SIZE).max().unwrap_or(0);
    let end = end.max((snapshot.state.mem_mib as usize) << 20).min(64 << 30);
    let mut memory = vec![0u8; end];
    for (i, &a) in snapshot.pages.iter().enumerate() {
        if let Some(to) = memory.get_mut(a as usize..a as usize + PAGE_SIZE) {
            to.copy_from_slice(page(&snapshot.data, i));
        }
    }
    memory
}

/// Boots the test guest in the lab, snapshots it once booted, and runs the pipeline
/// there on its memory, beside the synthetic mixes (lab figures are ratios).
fn via_lab(args: &PipelineArgs) -> Result<()> {
    let then = format!(
        "tandem bench pipeline --mib {} --epochs {} --dirty-percent {} --window {} --runs {} --mixes {} --snapshot booted.snap",
        args.mib,
        args.epochs,
        args.dirty_percent,
        args.window,
        args.runs,
        args.mixes.iter().map(|m| m.to_possible_value().map_or(String::new(), |v| v.get_name().to_string())).collect::<Vec<_>>().join(",")
    );
    let script = snapshots_then(&[("booted", 1)], &then);
    in_the_lab_sh(&script, Duration::from_secs(1800))
}

fn print(what: &str, args: &PipelineArgs, runs: &[Figures]) {
    let f = &medians(runs);
    println!(
        "pipeline, {what}: {} MiB region, window {}, the median of {} runs, the paths taking turns",
        (f.pages_in_region * PAGE_SIZE as u64) >> 20,
        args.window,
        runs.len()
    );
    println!("{:<38} {:>9} {:>8} {:>11} {:>9} {:>9} {:>9}", "path", "ms", "GiB/s", "pages/s", "vs memcpy", "CPU ms", "faults");
    let row = |name: &str, pages: u64, t: Duration, cpu: Option<(Duration, u64)>| {
        let secs = t.as_secs_f64();
        println!(
            "{name:<38} {:>9.1} {:>8.2} {:>11.0} {:>9.3} {:>9} {:>9}",
            ms(t),
            (pages * PAGE_SIZE as u64) as f64 / (1u64 << 30) as f64 / secs,
            pages as f64 / secs,
            (f.memcpy.as_secs_f64() * pages as f64 / f.steady.pages.max(1) as f64) / secs,
            cpu.map_or("-".into(), |(c, _)| format!("{:.0}", ms(c))),
            cpu.map_or("-".into(), |(_, n)| n.to_string())
        );
    };
    let phases = [
        (format!("initial sync, the full epoch ({} pages)", f.sync.pages), f.sync),
        (format!("steady state, {} deltas dirtying {}% each ({} pages)", args.epochs, args.dirty_percent, f.steady.pages), f.steady),
    ];
    for (name, p) in phases.iter().filter(|(_, p)| p.pages > 0) {
        println!("{name}:");
        row("  epoch pipeline (QUIC, mutual TLS)", p.pages, p.pipeline, Some((p.pipeline_cpu, p.pipeline_faults)));
        row("  plain QUIC bulk, same TLS/settings", p.pages, p.quinn, Some((p.quinn_cpu, p.quinn_faults)));
    }
    if f.steady.pages > 0 {
        row("  memcpy, one thread", f.steady.pages, f.memcpy, None);
        row("  loopback TCP (tokio)", f.steady.pages, f.tcp, None);
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    for (i, (name, p)) in phases.iter().enumerate().filter(|(_, (_, p))| p.pages > 0) {
        let name = name.split(',').next().unwrap_or_default();
        let each: Vec<String> = runs
            .iter()
            .map(|r| if i == 0 { &r.sync } else { &r.steady })
            .map(|r| format!("{:.2}", ratio(r.quinn, r.pipeline)))
            .collect();
        println!(
            "{name}: pipeline/plain QUIC {:.3} in time (runs: {}), {:.3} in CPU; bytes on the wire per page {:.0}",
            ratio(p.quinn, p.pipeline),
            each.join(" "),
            ratio(p.quinn_cpu, p.pipeline_cpu),
            p.wire as f64 / p.pages as f64
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_vmm::snapshot::{Kind, MachineState};

    #[test]
    fn a_snapshots_pages_land_at_their_addresses_and_the_rest_is_zero() {
        let dir = std::env::temp_dir().join(format!("tandem-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.snap");
        let mut data = vec![0x11u8; PAGE_SIZE];
        data.extend(vec![0x22u8; PAGE_SIZE]);
        let state = MachineState { mem_mib: 1, vcpus: 1, vcpu_states: vec![Default::default()], ..MachineState::default() };
        Snapshot { kind: Kind::Full, state, pages: vec![0x3000, 0x1000], data, page_crcs: Vec::new() }.write_to(&path).unwrap();
        let memory = memory_of(&Snapshot::read_from(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(memory.len(), 1 << 20);
        let page = |n: usize| &memory[n * PAGE_SIZE..(n + 1) * PAGE_SIZE];
        assert!(page(3).iter().all(|&b| b == 0x11) && page(1).iter().all(|&b| b == 0x22));
        assert!([0, 2, 4, 255].iter().all(|&n| page(n).iter().all(|&b| b == 0)));
    }
}
