//! `tandem inspect`: what a snapshot holds, or how it differs from another.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tandem_vmm::devices::virtio::block::described;
use tandem_vmm::disk::{locate, DISK_SPACE};
use tandem_vmm::snapshot::compare::compare;
use tandem_vmm::snapshot::{Kind, Snapshot};

/// Exit status when the snapshots differ, as cmp(1) uses.
pub const DIFFERENT: u8 = 1;

#[derive(clap::Args, Clone, Debug)]
pub struct InspectArgs {
    /// The snapshot (full or delta).
    file: PathBuf,
    /// Compare with this snapshot, state component by component and page by page.
    #[arg(long, value_name = "FILE")]
    against: Option<PathBuf>,
    /// Pages this delta holds may differ: the guest wrote them between the two
    /// snapshots (a delta taken when the --against snapshot was).
    #[arg(long, value_name = "DELTA", requires = "against")]
    written: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Snapshot> {
    Snapshot::read_from(path).with_context(|| format!("snapshot {}", path.display()))
}

pub fn run(args: &InspectArgs) -> Result<u8> {
    let a = read(&args.file)?;
    let Some(other) = &args.against else {
        describe(&a);
        return Ok(0);
    };
    let b = read(other)?;
    let written = args.written.as_deref().map(read).transpose()?;
    let c = compare(&a, &b, written.as_ref()).context("comparing the snapshots")?;
    for line in &c.differences {
        println!("differs: {line}");
    }
    let verdict = if c.identical() { "identical" } else { "DIFFERENT" };
    println!(
        "{verdict}: {} state components and {} pages equal, {} pages written by the guest, {} differences",
        c.same_components,
        c.same_pages,
        c.written_pages,
        c.differences.len()
    );
    Ok(if c.identical() { 0 } else { DIFFERENT })
}

fn describe(s: &Snapshot) {
    let st = &s.state;
    let kind = if s.kind == Kind::Full { "full" } else { "delta" };
    let memory_pages = s.pages.iter().filter(|&&a| a < DISK_SPACE).count();
    println!("kind={kind} mem_mib={} vcpus={} pages={memory_pages}", st.mem_mib, st.vcpus);
    // A snapshot holds its disks' blocks (a full one every block that is not zeros),
    // so a restore lays the disk down as it was with the memory.
    for section in st.devices.iter().filter(|d| d.id.starts_with("blk")) {
        let Some((size, readonly)) = described(section) else { continue };
        let disk: usize = section.id[3..].parse().unwrap_or(usize::MAX);
        let blocks = s.pages.iter().filter(|&&a| locate(a).is_some_and(|(d, _)| d == disk)).count();
        println!(
            "disk {disk}: {size} bytes{}, {blocks} blocks of 4 KiB held{}",
            if readonly { " read-only" } else { "" },
            if s.kind == Kind::Full { " (the rest zeros)" } else { " (written since the previous snapshot)" }
        );
    }
    println!("guest clock ns={}", st.vm.clock.clock);
    for (i, v) in st.vcpu_states.iter().enumerate() {
        println!(
            "vcpu {i}: rip={:#x} mp_state={} msrs={} xsave_bytes={} tsc={}",
            v.regs.rip,
            v.mp_state.mp_state,
            v.msrs.len(),
            v.xsave.len() * 4,
            v.tsc().map_or("-".into(), |t| t.to_string())
        );
    }
}
