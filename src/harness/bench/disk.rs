//! `tandem bench disk`: what a guest's disk does, measured by the guest itself
//! (`tandem-work diskbench`) in one lab run: 4 KiB random writes with O_DIRECT, one at
//! a time (IOPS, p50 and p99 latency), and 1 MiB sequential writes then an fdatasync
//! (MB/s), for QEMU (microvm, virtio-blk on a raw image through the page cache, as
//! tandem's), tandem unreplicated, and tandem as a replicated primary whose epochs
//! carry the blocks written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{qemu_microvm, spawn, wait_for, Running, BASE_CMDLINE, GUEST_INITRD, GUEST_KERNEL, GUEST_VMLINUX};

#[derive(clap::Args, Clone)]
pub struct DiskArgs {
    /// Random 4 KiB writes measured per VMM.
    #[arg(long, default_value_t = 2000)]
    writes: u32,
    /// The replicated primary's epoch length.
    #[arg(long, default_value_t = 25, value_name = "MS")]
    epoch_ms: u64,
    /// Directory of built images (default: as for `tandem lab`).
    #[arg(long)]
    images: Option<PathBuf>,
}

impl DiskArgs {
    fn check(&self) -> Result<()> {
        if !(10..=100_000).contains(&self.writes) {
            bail!("--writes must be between 10 and 100000, got {}", self.writes);
        }
        if !(1..=10_000).contains(&self.epoch_ms) {
            bail!("--epoch-ms must be between 1 and 10000, got {}", self.epoch_ms);
        }
        Ok(())
    }
}

pub fn via_lab(args: &DiskArgs) -> Result<()> {
    args.check()?;
    let command: Vec<String> =
        ["bench", "disk-in-lab", "--writes", &args.writes.to_string(), "--epoch-ms", &args.epoch_ms.to_string()].map(String::from).to_vec();
    super::in_the_lab(args.images.clone(), Duration::from_secs(900), 3072, &command)
}

/// The disk each guest gets: 128 MiB of zeros (sparse), in the lab's memory.
const DISK_BYTES: u64 = 128 << 20;

fn disk(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.set_len(DISK_BYTES)?;
    Ok(path.display().to_string())
}

struct Measured {
    name: &'static str,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    seq_mb_s: f64,
}

/// The figure `key=` on the console line that starts with `prefix`.
fn figure(console: &str, prefix: &str, key: &str) -> Result<f64> {
    let line = console.lines().find(|l| l.starts_with(prefix)).with_context(|| format!("no {prefix:?} line on the guest's console"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .with_context(|| format!("no {key}= on {line:?}"))
}

fn measured(name: &'static str, log: &Path) -> Result<Measured> {
    let console = std::fs::read_to_string(log)?;
    let rand = "diskbench randwrite";
    Ok(Measured {
        name,
        iops: figure(&console, rand, "iops")?,
        p50_us: figure(&console, rand, "p50_us")?,
        p99_us: figure(&console, rand, "p99_us")?,
        seq_mb_s: figure(&console, "diskbench seqwrite", "mb_s")?,
    })
}

pub fn in_lab(args: &DiskArgs) -> Result<()> {
    args.check()?;
    let dir = std::env::temp_dir().join("tandem-bench-disk");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tandem = std::env::current_exe()?;
    let cmdline = format!("{BASE_CMDLINE} tandem.workload=diskbench tandem.records={}", args.writes);
    let limit = Duration::from_secs(300);
    let done = "TANDEM-DISKBENCH-DONE";
    let mut results = Vec::new();

    {
        let image = disk(&dir, "qemu.img")?;
        let mut q = qemu_microvm(&super::lab_qemu()?, 256, 1, &cmdline);
        q.args(["-drive", &format!("id=d0,file={image},format=raw,if=none")]).args(["-device", "virtio-blk-device,drive=d0"]);
        let log = dir.join("qemu.out");
        let _vm = Running(vec![spawn(q, &log)?]);
        wait_for(&log, done, limit)?;
        results.push(measured("qemu -M microvm", &log)?);
        eprintln!("qemu measured");
    }
    {
        let mut t = Command::new(&tandem);
        t.args(["run", "--kernel", GUEST_KERNEL, "--initrd", GUEST_INITRD, "--cmdline", &cmdline]).args(["--disk", &disk(&dir, "run.img")?]);
        let log = dir.join("run.out");
        let _vm = Running(vec![spawn(t, &log)?]);
        wait_for(&log, done, limit)?;
        results.push(measured("tandem", &log)?);
        eprintln!("tandem measured");
    }
    {
        let (pkeys, skeys) = (dir.join("pk"), dir.join("sk"));
        tandem_replication::tls::keygen(&pkeys)?;
        tandem_replication::tls::keygen(&skeys)?;
        let path = |p: PathBuf| p.display().to_string();
        let mut s = Command::new(&tandem);
        s.args(["standby", "--listen", "127.0.0.1:7191", "--state-dir", &path(dir.join("state"))])
            .args(["--key", &path(skeys.join("key.pem")), "--peer-cert", &path(pkeys.join("cert.pem"))])
            .args(["--disk", &disk(&dir, "standby.img")?]);
        let mut p = Command::new(&tandem);
        // vmlinux: a bzImage decompressing itself writes 50 MB the epochs must carry.
        p.args(["primary", "--standby", "127.0.0.1:7191", "--epoch-ms", &args.epoch_ms.to_string()])
            .args(["--key", &path(pkeys.join("key.pem")), "--peer-cert", &path(skeys.join("cert.pem"))])
            .args(["--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--cmdline", &cmdline])
            .args(["--disk", &disk(&dir, "primary.img")?]);
        let log = dir.join("primary.out");
        let standby = spawn(s, &dir.join("standby.out"))?;
        let _vms = Running(vec![standby, spawn(p, &log)?]);
        wait_for(&log, done, limit)?;
        results.push(measured("tandem primary", &log)?);
    }

    println!();
    println!(
        "disk: {} random 4 KiB O_DIRECT writes one at a time, then 32 MiB of 1 MiB writes and an fdatasync, \
         measured by the guest on a 128 MiB raw image in the lab's page cache; same lab run; the primary's epochs {} ms",
        args.writes, args.epoch_ms
    );
    println!("{:<18} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}", "VMM", "4k IOPS", "p50 us", "p99 us", "seq MB/s", "IOPS / qemu", "seq / qemu");
    let (qiops, qseq) = (results[0].iops, results[0].seq_mb_s);
    for r in &results {
        println!(
            "{:<18} {:>10.0} {:>10.0} {:>10.0} {:>12.1} {:>12.2} {:>12.2}",
            r.name, r.iops, r.p50_us, r.p99_us, r.seq_mb_s, r.iops / qiops, r.seq_mb_s / qseq
        );
    }
    println!("(in the lab, under emulation: compare the ratios, not the absolute figures)");
    Ok(())
}
