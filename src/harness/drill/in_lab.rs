//! The drill inside the lab: the same command with `--here`, its output passed through.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::{DrillArgs, VERDICT_PREFIX};
use crate::harness::lab;

/// Runs the same drill inside the lab, passing its output through.
pub(super) fn run(args: &DrillArgs, seed: u64) -> Result<u8> {
    let mut command: Vec<String> = ["tandem", "drill", "--here", "--images", "/images"].map(String::from).to_vec();
    command.extend([
        format!("--kill-at={}", args.kill_at.join(",")),
        format!("--runs={}", args.runs),
        format!("--workload={}", args.workload),
        format!("--dirty-mib={}", args.dirty_mib),
        format!("--lines={}", args.lines),
        format!("--timeout-ms={}", args.timeout_ms),
        format!("--epoch-ms={}", args.epoch_ms),
        format!("--seed={seed}"),
    ]);
    if args.show_consoles {
        command.push("--show-consoles".into());
    }
    if args.watch {
        command.push("--watch".into());
    }
    if let Some(n) = args.corrupt_epoch {
        command.push(format!("--corrupt-epoch={n}"));
    }
    if let Some(n) = args.ping_pong {
        command.push(format!("--ping-pong={n}"));
    }
    if !args.partition.is_empty() {
        command.push(format!("--partition={}", args.partition.join(",")));
        command.push(format!("--on-standby-loss={}", args.on_standby_loss.as_arg()));
    }
    if args.witness {
        command.push("--witness".into());
    }
    if args.micro_guest {
        command.push("--micro-guest".into());
    }
    let opts = lab::LabOptions {
        images: args.images.clone().unwrap_or_else(lab::default_images_dir),
        // A minute a run, and room for one run that spends its bounded waits in full
        // before it is judged, so a hang is reported by the drill, not cut off.
        timeout: Duration::from_secs(120 + 60 * u64::from(args.runs) + 420),
        with: Vec::new(),
        with_qemu: false,
        mem_mib: 2048,
        cpus: 2,
    };
    let mut stdout = std::io::stdout();
    let report = lab::run_with_report(&opts, &command, &mut |line| {
        use std::io::Write;
        let _ = writeln!(stdout, "{line}");
    })?;
    // What the lab itself saw, for a harness to weigh (see docs/lab.md): a fault of the
    // lab (then the drill inside never got to its last verdict), and whether the lab
    // kernel patched its own text while the drill ran.
    println!(
        "{VERDICT_PREFIX}{}",
        json!({ "runs": args.runs, "lab_fault": report.lab_fault, "kernel_text_patches": report.kernel_text_patches })
    );
    Ok(report.status.clamp(0, 255) as u8)
}
