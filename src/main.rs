//! `tandem`: run a Linux VM, and (soon) keep it running across the loss of its host.

mod console;
mod control;
mod harness;
mod inspect;
mod keygen;
mod replicate;
mod run;
mod witness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Exit statuses beyond 0 (guest powered off) and 1 (error).
pub mod status {
    /// The guest reset itself: a reboot, or a kernel panic with `panic=N`.
    pub const GUEST_RESET: u8 = 3;
    /// The guest triple-faulted: its CPU could not deliver an exception (KVM's
    /// shutdown exit). Real hardware would reset; tandem ends the VM and says so.
    pub const GUEST_TRIPLE_FAULT: u8 = 4;
}

#[derive(Parser)]
#[command(name = "tandem", version, about = "A micro-VMM that keeps a Linux VM running across the loss of its host")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux guest; its serial console is on stdout. Exits 0 when the guest
    /// powers off, 3 when it resets (reboot or panic), 4 when it triple-faults, 1 on
    /// error.
    Run(run::RunArgs),
    /// Boot a guest protected by a standby: every epoch its state goes to the standby,
    /// and its console output is released only once the standby holds it.
    Primary(Box<replicate::PrimaryArgs>),
    /// Follow a primary, and take its VM over when it falls silent.
    Standby(Box<replicate::StandbyArgs>),
    /// Show a replicated guest's console from the hosts' --console-listen endpoints:
    /// each byte exactly once, across a takeover.
    Console(console::ConsoleArgs),
    /// A failover drill: primary and standby run the ticker guest (in the lab unless
    /// --here), the primary is killed, and the console must continue on the standby
    /// with no line lost or repeated.
    Drill(Box<harness::drill::DrillArgs>),
    /// The network drill's client: hold one TCP connection to the guest's
    /// numbered-request server (tandem.workload=net), send a request every interval,
    /// and check every reply. Exits 0 when the connection was kept, with no reply lost,
    /// repeated or out of order.
    NetClient(harness::drill::net_client::NetClientArgs),
    /// Rebuild a VM from a snapshot (and deltas) in this process and carry on running it.
    Restore(run::RestoreArgs),
    /// Drive a running VM through its control socket: pause, resume, status,
    /// snapshot FILE [--delta].
    Ctl {
        /// The VM's control socket (`tandem run --control PATH`).
        socket: PathBuf,
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Show what a snapshot holds, or compare it with another (--against): exits 0 when
    /// they are identical, 1 when they differ.
    Inspect(inspect::InspectArgs),
    /// Write a key pair for replication's mutual TLS into DIR: key.pem (private, mode
    /// 0600) and cert.pem (give it to the peer); prints the certificate's fingerprint.
    Keygen(keygen::KeygenArgs),
    /// The witness, on a third host: grants a standby its promotion and leases a
    /// primary that lost its standby time to run on, never both at once, so a cut link
    /// cannot leave two hosts running the guest. Its record outlives restarts.
    Witness(witness::WitnessArgs),
    /// Run COMMAND inside the lab: a Linux host with real KVM under QEMU's emulated AMD-V.
    /// Guest images are at /images, `--with` files at /with/NAME. Exits with COMMAND's
    /// status, 124 on timeout, 125 if the lab host itself failed (its kernel locked up or crashed).
    Lab(LabArgs),
    /// Benchmarks, printed as tables beside a peer measured in the same run.
    #[command(subcommand)]
    Bench(harness::bench::BenchCmd),
    /// Inside the lab, before the command: hold what makes the lab kernel patch its
    /// text on first use (an idle VM, UDP sockets with GRO) until killed.
    #[command(hide = true)]
    LabHold {
        /// An address in another network namespace with nothing listening on port 9.
        #[arg(long)]
        icmp_from: Option<std::net::Ipv4Addr>,
    },
}

#[derive(clap::Args)]
struct LabArgs {
    /// Stop the lab after this many seconds (exit status 124).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Make a host file available inside the lab as /with/NAME (repeatable).
    #[arg(long = "with", value_name = "FILE")]
    with: Vec<PathBuf>,
    /// Also put qemu-system-x86_64 into the lab (to compare with QEMU on the same guest).
    #[arg(long)]
    with_qemu: bool,
    /// Directory of built images (default: $TANDEM_IMAGES, else ~/.cache/tandem/images).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Memory of the lab host in MiB.
    #[arg(long, default_value_t = 2048)]
    lab_mem_mib: u32,
    /// CPUs of the lab host.
    #[arg(long, default_value_t = 2)]
    lab_cpus: u32,
    /// Also write how the run went to FILE as JSON: the status, a fault of the lab
    /// itself (never_started, locked_up) and the guest triple faults its kernel saw.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// The command to run inside the lab, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl LabArgs {
    fn options(&self) -> harness::lab::LabOptions {
        harness::lab::LabOptions {
            images: self.images.clone().unwrap_or_else(harness::lab::default_images_dir),
            timeout: Duration::from_secs(self.timeout),
            with: self.with.clone(),
            with_qemu: self.with_qemu,
            mem_mib: self.lab_mem_mib,
            cpus: self.lab_cpus,
        }
    }
}

/// Has the allocator keep freed memory for the next allocation rather than hand it
/// back to the kernel. Epochs go round and round through buffers of a few MiB each
/// (QUIC's receive buffers, which a standby keeps until an epoch commits; frames;
/// staging): given back and faulted in again, every page of them costs a fault per
/// epoch, about 5 % of `bench pipeline`'s steady state and two thirds of its faults
/// (docs/design.md). The process keeps its high-water mark of such buffers instead,
/// tens of MiB beside the guest's memory, which is mapped apart and not affected.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets glibc's allocator parameters; called before any thread
    // exists, and a refused value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        // Above 32 MiB (glibc's ceiling) an allocation is still mapped on its own.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tandem_replication=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Cmd::Run(args) => run::run(args),
        Cmd::Restore(args) => run::restore(args),
        Cmd::Drill(args) => harness::drill::run(&args),
        Cmd::NetClient(args) => harness::drill::net_client::run(&args),
        Cmd::Primary(args) => replicate::primary(*args),
        Cmd::Standby(args) => replicate::standby(*args),
        Cmd::Console(args) => console::run(args),
        Cmd::Ctl { socket, command } => control::send(&socket, &command).map(|reply| {
            println!("{reply}");
            0
        }),
        Cmd::Inspect(args) => inspect::run(&args),
        Cmd::Keygen(args) => keygen::run(&args),
        Cmd::Witness(args) => witness::witness(args),
        Cmd::Lab(args) => {
            let mut stdout = std::io::stdout();
            harness::lab::run_with_report(&args.options(), &args.command, &mut |line| {
                use std::io::Write;
                let _ = writeln!(stdout, "{line}");
            })
            .and_then(|report| {
                if let Some(path) = &args.report {
                    let json = serde_json::to_string(&report).unwrap_or_default();
                    std::fs::write(path, json + "\n").map_err(|e| anyhow::anyhow!("--report {}: {e}", path.display()))?;
                }
                Ok(report.status.clamp(0, 255) as u8)
            })
        }
        Cmd::Bench(cmd) => harness::bench::run(cmd).map(|()| 0),
        Cmd::LabHold { icmp_from } => harness::lab::hold(icmp_from),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
