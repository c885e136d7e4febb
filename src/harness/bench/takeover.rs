//! `tandem bench takeover`: takeovers on this host, with the micro guest on its own
//! /dev/kvm (PVM here, where Linux cannot run, but the micro guest can): a primary and a
//! standby as two processes over loopback QUIC, the primary killed with SIGKILL, the
//! standby's detection and resume as its `took_over` event reports them, and the gap a
//! console reader sees. Beside them, measured in the same run at each size: what a
//! resume cost when it built its VM after deciding, and what copying the image into
//! new guest RAM would cost. Each size runs without a witness and with one (the
//! standby then waits for the witness's grant), and after each takeover the old
//! primary's host stands by again: the time until the guest is protected once more is
//! the re-protection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_vmm::memory::{ram_ranges, GuestRam, MAX_MEM_MIB, MIN_MEM_MIB};
use tandem_vmm::vm::Prepared;
use vm_memory::{Address, Bytes};

use super::ms;
use crate::harness::drill::check::numbers;
use crate::harness::proc::{free_addr, start_witness, Proc};

#[derive(clap::Args, Clone)]
pub struct TakeoverArgs {
    /// Guest sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 2048])]
    mem_mib: Vec<u64>,
    /// Takeovers per size.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// How long each side waits for a silent peer (both sides' --timeout-ms).
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Lines the primary releases before it is killed.
    #[arg(long, default_value_t = 15)]
    lines: u32,
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
}

/// One takeover, as the standby reported it and a console reader saw it.
struct Sample {
    detection: f64,
    resume: f64,
    raise: f64,
    /// From the SIGKILL to the first line the primary had not printed, on the standby.
    gap: f64,
    /// From the new standby's start to the guest protected again.
    reprotect: f64,
}

pub fn run(args: &TakeoverArgs) -> Result<()> {
    if args.runs == 0 || args.mem_mib.is_empty() || args.lines == 0 {
        bail!("--runs, --lines and --mem-mib need at least one");
    }
    if let Some(bad) = args.mem_mib.iter().find(|m| !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(*m)) {
        bail!("--mem-mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} for each size, got {bad}");
    }
    if !(100..=60_000).contains(&args.timeout_ms) {
        bail!("--timeout-ms must be between 100 and 60000, got {}", args.timeout_ms);
    }
    std::fs::metadata(&args.kvm_device)
        .with_context(|| format!("this benchmark runs the micro guest on {}: is KVM loaded here?", args.kvm_device.display()))?;
    println!(
        "takeover, micro guest on {} with {} ms heartbeat timeout: primary killed (SIGKILL) after {} released lines, {} runs per size",
        args.kvm_device.display(),
        args.timeout_ms,
        args.lines,
        args.runs
    );
    println!(
        "{:>8} {:>8} {:>14} {:>14} {:>10} {:>12} {:>14} {:>13} | {:>13} {:>13}",
        "mem MiB", "witness", "detection ms", "resume ms", "raise ms", "restore ms", "reader gap ms", "reprotect ms", "VM built ms", "image copy ms"
    );
    println!(
        "{:>8} {:>8} {:>14} {:>14} {:>10} {:>12} {:>14} {:>13} | {:>13} {:>13}",
        "", "", "p50 / max", "p50 / max", "p50", "p50", "p50 / max", "p50", "(peer)", "(peer)"
    );
    for (mib, witness) in args.mem_mib.iter().flat_map(|&m| [(m, false), (m, true)]) {
        let mut samples = Vec::new();
        for n in 0..args.runs {
            samples.push(
                one_takeover(args, mib, n, witness).with_context(|| format!("takeover {} of {} at {mib} MiB", n + 1, args.runs))?,
            );
        }
        let built = vm_build_ms(&args.kvm_device, mib)?;
        let copied = image_copy_ms(mib)?;
        let pick = |f: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            (v[(v.len() - 1) / 2], v[v.len() - 1])
        };
        let (det, det_max) = pick(|s| s.detection);
        let (res, res_max) = pick(|s| s.resume);
        let (raise, _) = pick(|s| s.raise);
        let (restore, _) = pick(|s| s.resume - s.raise);
        let (gap, gap_max) = pick(|s| s.gap);
        let (reprotect, _) = pick(|s| s.reprotect);
        println!(
            "{mib:>8} {:>8} {:>14} {:>14} {raise:>10.2} {restore:>12.2} {:>14} {reprotect:>13.0} | {built:>13.2} {copied:>13.1}",
            if witness { "yes" } else { "no" },
            format!("{det:.0} / {det_max:.0}"),
            format!("{res:.2} / {res_max:.2}"),
            format!("{gap:.0} / {gap_max:.0}"),
        );
    }
    println!(
        "resume: from the standby's decision to the vCPUs running = raise (the generation written and synced) + restore \
         (machine state set in the VM built while standing by, vCPUs started). Peers, same run: building that VM after \
         deciding (what resume cost before), and copying the image into new guest RAM. With a witness, detection \
         includes asking it for the promotion. reprotect: from a standby started on the old primary's host to the \
         guest protected again (a full sync while the guest runs; the micro guest's memory is mostly zero pages)."
    );
    Ok(())
}

fn tick_numbers(console: &str) -> Vec<u32> {
    numbers(console, "tick ")
}

fn one_takeover(args: &TakeoverArgs, mib: u64, n: u32, witness: bool) -> Result<Sample> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-takeover-{}-{mib}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = takeover_in(args, mib, &dir, witness);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn takeover_in(args: &TakeoverArgs, mib: u64, dir: &Path, with_witness: bool) -> Result<Sample> {
    let (pkeys, skeys, wkeys) = (dir.join("primary-keys"), dir.join("standby-keys"), dir.join("witness-keys"));
    for keys in [&pkeys, &skeys, &wkeys] {
        tandem_replication::tls::keygen(keys)?;
    }
    let (addr, back, waddr) = (free_addr()?.to_string(), free_addr()?.to_string(), free_addr()?);
    let path = |p: PathBuf| p.display().to_string();
    let _witness = with_witness.then(|| start_witness(dir, waddr, &wkeys, [&pkeys, &skeys], None)).transpose()?;
    let common = |keys: &Path, peer: &Path, state: &str| {
        vec![
            "--key".to_string(),
            path(keys.join("key.pem")),
            "--peer-cert".into(),
            path(peer.join("cert.pem")),
            "--state-dir".into(),
            path(dir.join(state)),
            "--timeout-ms".into(),
            args.timeout_ms.to_string(),
            "--mem-mib".into(),
            mib.to_string(),
            "--kvm-device".into(),
            path(args.kvm_device.clone()),
        ]
        .into_iter()
        .chain(with_witness.then(|| ["--witness".into(), waddr.to_string(), "--witness-cert".into(), path(wkeys.join("cert.pem"))]).into_iter().flatten())
        .collect::<Vec<String>>()
    };
    let mut standby_args = vec!["standby".to_string(), "--listen".into(), addr.clone(), "--then-protect".into(), back.clone()];
    standby_args.extend(common(&skeys, &pkeys, "standby-state"));
    let mut standby = Proc::start(&standby_args, dir, "standby")?;
    let mut primary_args = vec!["primary".to_string(), "--standby".into(), addr, "--micro-guest".into()];
    primary_args.extend(common(&pkeys, &skeys, "primary-state"));
    let mut primary = Proc::start(&primary_args, dir, "primary")?;

    let limit = Duration::from_secs(60);
    if !primary.wait_for("protected", limit) {
        bail!("the primary was not protected within {limit:?}: {}", last_line(&primary.log()));
    }
    let began = Instant::now();
    while (tick_numbers(&primary.console()).len() as u32) < args.lines {
        if began.elapsed() > limit {
            bail!("the primary released fewer than {} lines in {limit:?}", args.lines);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = primary.end();
    let killed = Instant::now();
    let last = tick_numbers(&primary.console()).last().copied().unwrap_or(0);
    let gap = loop {
        if tick_numbers(&standby.console()).contains(&(last + 1)) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_millis(args.timeout_ms) + limit {
            bail!("the standby printed no line after {last} within {limit:?}: {}", last_line(&standby.log()));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = standby.event("took_over").context("the standby's guest runs, yet it reported no takeover")?;
    // What the reader saw must be one sequence: the standby starts at or before the
    // first line the primary had not printed (it may repeat what the primary released
    // last, see README.md) and goes on from there without a gap.
    let after = tick_numbers(&standby.console());
    if after.first().map_or(true, |&f| f > last + 1) || after.windows(2).any(|w| w[1] != w[0] + 1) {
        bail!("the console broke at the takeover: the primary printed up to {last}, the standby {after:?}");
    }
    // The old primary's host stands by again, and the guest is synced to it as it runs.
    drop(primary);
    let mut again = vec!["standby".to_string(), "--listen".into(), back];
    again.extend(common(&pkeys, &skeys, "primary-state"));
    let started = Instant::now();
    let mut new_standby = Proc::start(&again, dir, "new-standby")?;
    if !standby.wait_for("protected", limit) {
        bail!("the guest was not protected again within {limit:?}: {}", last_line(&standby.log()));
    }
    let reprotect = ms(started.elapsed());
    let _ = new_standby.end();
    let _ = standby.end();
    let field = |k: &str| took[k].as_f64().with_context(|| format!("the took_over event has no {k}"));
    Ok(Sample { detection: field("detection_ms")?, resume: field("resume_ms")?, raise: field("raise_ms")?, gap: ms(gap), reprotect })
}

fn last_line(log: &str) -> String {
    log.lines().last().unwrap_or("(nothing in its log)").to_string()
}

/// The median time to build the VM a takeover runs, as a resume did after deciding.
fn vm_build_ms(kvm_device: &Path, mib: u64) -> Result<f64> {
    let ram = GuestRam::new(mib)?;
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            Prepared::new(kvm_device, &ram, 1).map(|vm| {
                let took = ms(start.elapsed());
                drop(vm);
                took
            })
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Copying a full image into new guest RAM, as a takeover that does not run on the
/// image's own memory must.
fn image_copy_ms(mib: u64) -> Result<f64> {
    let image = vec![0x5au8; (mib as usize) << 20];
    let ram = GuestRam::new(mib)?;
    let start = Instant::now();
    let mut from = 0usize;
    for (at, len) in ram_ranges(mib << 20) {
        for (i, chunk) in image[from..from + len].chunks(2 << 20).enumerate() {
            ram.memory().write_slice(chunk, at.unchecked_add((i << 21) as u64)).context("copying into guest RAM")?;
        }
        from += len;
    }
    Ok(ms(start.elapsed()))
}
