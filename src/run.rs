//! `tandem run`: boot a guest and stay with it until it stops.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_vmm::memory::PAGE_SIZE;
use tandem_vmm::output::{OutputSink, Passthrough};
use tandem_vmm::snapshot::{Kind, Snapshot};
use tandem_vmm::vcpu::VmExit;
use tandem_vmm::devices::virtio::backends::Backends;
use tandem_vmm::disk::DiskConfig;
use tandem_vmm::net::NetConfig;
use tandem_vmm::vm::{check_vcpus, is_transient, Guest, PauseWork, Vm, VmConfig};

use crate::{control, status};
use tandem_replication::events::{Event, Events, VmEnd};
use tandem_replication::primary::Protector;

/// The command line every guest gets unless `--cmdline` replaces it: console on COM1,
/// reboot through the keyboard controller, and a panic ends the VM instead of hanging.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off";

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Guest kernel: a bzImage, or an ELF vmlinux (booted through PVH when it supports it).
    #[arg(long, required_unless_present = "micro_guest")]
    pub kernel: Option<PathBuf>,
    /// Boot the built-in micro guest instead of a kernel: a few real-mode instructions
    /// that print `tick N` ten times a second and dirty a few pages. It runs on any
    /// KVM, where Linux cannot (a PVM host), to try replication and takeover there.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "append"])]
    pub micro_guest: bool,
    /// Initramfs to hand the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Extra kernel command line arguments, appended to --cmdline.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Open a control socket here (mode 0600) for `tandem ctl`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// A virtio NIC on the host's TAP device NAME, with Ethernet address MAC
    /// (repeatable). The TAP must exist: `ip tuntap add NAME mode tap`.
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    pub nets: Vec<NetConfig>,
    /// A virtio disk backed by the raw image file PATH (repeatable; the guest sees
    /// /dev/vda, /dev/vdb, ... in this order). The image is locked while the VM runs.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<DiskConfig>,
    /// Every N ms, report on stderr how many guest pages were dirtied since the last
    /// report. Tracking starts at boot with a report of every page; it slows the guest
    /// (KVM maps tracked memory in 4 KiB pages), so it is off unless asked for.
    #[arg(long, value_name = "MS")]
    pub dirty_stats_ms: Option<u64>,
    /// For the lab's bisection (docs/lab.md): pause the guest N times a second, as a
    /// primary's epochs would, doing --debug-pause-work at each pause.
    #[arg(long, hide = true, value_name = "N")]
    pub debug_pause_hz: Option<u32>,
    /// What each --debug-pause-hz pause does: nothing, state, dirty-log or capture.
    #[arg(long, hide = true, value_enum, default_value_t = DebugPauseWork::Capture)]
    pub debug_pause_work: DebugPauseWork,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DebugPauseWork {
    Nothing,
    State,
    DirtyLog,
    Capture,
    VmState,
    VcpuState,
    Copy,
}

impl RunArgs {
    pub fn config(&self) -> Result<VmConfig> {
        let vcpus = check_vcpus(self.vcpus)?;
        let shape = |guest| VmConfig { guest, mem_mib: self.mem_mib, vcpus, kvm_device: self.kvm_device.clone() };
        let Some(kernel) = self.kernel.clone().filter(|_| !self.micro_guest) else {
            return Ok(shape(Guest::Micro));
        };
        // Fail on unreadable files before touching KVM, so the message names the file.
        for (what, path) in [("kernel", Some(&kernel)), ("initrd", self.initrd.as_ref())] {
            if let Some(path) = path {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("cannot open {what} {}", path.display()))?;
                if !meta.is_file() {
                    bail!("{what} {} is not a regular file", path.display());
                }
            }
        }
        let mut cmdline = self.cmdline.clone();
        if let Some(extra) = &self.append {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        Ok(shape(Guest::Linux { kernel, initrd: self.initrd.clone(), cmdline }))
    }
}

/// Copies the host's stdin into the guest console until stdin ends.
fn forward_stdin(vm_input: impl Fn(&[u8]) -> usize + Send + 'static) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            // The UART FIFO is small; wait for the guest to drain it.
            while !rest.is_empty() {
                let took = vm_input(rest);
                rest = &rest[took..];
                if took == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
}

pub fn run(args: RunArgs) -> Result<u8> {
    let config = args.config()?;
    let control = args.control.as_deref().map(control::listen).transpose()?;
    let mut role = match args.debug_pause_hz {
        Some(hz) if (1..=1000).contains(&hz) => Role::Paced(Pacer {
            every: Duration::from_secs(1) / hz,
            work: match args.debug_pause_work {
                DebugPauseWork::Nothing => PauseWork::Nothing,
                DebugPauseWork::State => PauseWork::State,
                DebugPauseWork::DirtyLog => PauseWork::DirtyLog,
                DebugPauseWork::Capture => PauseWork::Capture,
                DebugPauseWork::VmState => PauseWork::VmState,
                DebugPauseWork::VcpuState => PauseWork::VcpuState,
                DebugPauseWork::Copy => PauseWork::Copy,
            },
            next: Instant::now(),
        }),
        Some(hz) => bail!("--debug-pause-hz must be between 1 and 1000, got {hz}"),
        None => Role::Solo,
    };
    if args.dirty_stats_ms.is_some() && matches!(role, Role::Paced(_)) {
        bail!("--dirty-stats-ms and --debug-pause-hz both take the dirty log; use one");
    }
    let backends = Backends::open(&args.nets, &args.disks)?;
    let vm = Vm::boot(config, backends, console())?;
    supervise(vm, args.dirty_stats_ms.map(Duration::from_millis), control, &mut role, &Events::none())
}

#[derive(clap::Args, Clone, Debug)]
pub struct RestoreArgs {
    /// A full snapshot written by `tandem ctl SOCKET snapshot FILE`.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Deltas taken after it, oldest first (repeatable).
    #[arg(long = "delta", value_name = "FILE")]
    pub deltas: Vec<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Open a control socket here (mode 0600) for `tandem ctl`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Keep the restored VM paused, its time frozen, until `tandem ctl PATH resume`
    /// (needs --control).
    #[arg(long, requires = "control")]
    pub paused: bool,
    /// The restored VM's NICs, as for `run` (the snapshot's NICs, in their order; the
    /// TAP may be another than the one the VM was captured on).
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    pub nets: Vec<NetConfig>,
    /// The restored VM's disks, as for `run`, in the snapshot's order. The snapshot
    /// holds their blocks: each image is rewritten to what the disk held at the
    /// snapshot, so memory and disk always match (it must be of the same size).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<DiskConfig>,
}

/// `tandem restore`: rebuilds the VM in this process and carries on as `run` does.
pub fn restore(args: RestoreArgs) -> Result<u8> {
    let mut chain = Vec::with_capacity(1 + args.deltas.len());
    for path in std::iter::once(&args.snapshot).chain(&args.deltas) {
        chain.push(Snapshot::read_from(path).with_context(|| format!("snapshot {}", path.display()))?);
    }
    let backends = Backends::open(&args.nets, &args.disks)?;
    let control = args.control.as_deref().map(control::listen).transpose()?;
    let vm = Vm::restore(&chain, &args.kvm_device, backends, args.paused, console())?;
    drop(chain);
    supervise(vm, None, control, &mut Role::Solo, &Events::none())
}

pub fn console() -> Arc<Mutex<dyn OutputSink>> {
    Arc::new(Mutex::new(Passthrough::new(std::io::stdout())))
}

/// Each NIC's and disk's counts, for `ctl status`: ` net0_tx=N net0_rx=N ...`;
/// `tx_dropped` counts frames a full hold dropped.
fn nic_status(vm: &Vm) -> String {
    let nics = vm.net_stats().into_iter().enumerate().map(|(i, s)| {
        format!(
            " net{i}_tx={} net{i}_rx={} net{i}_rx_dropped={} net{i}_tx_dropped={} net{i}_held_bytes={}",
            s.tx_frames, s.rx_frames, s.rx_dropped, s.tx_dropped, s.held_bytes
        )
    });
    let disks = vm.disk_stats().into_iter().enumerate().map(|(i, s)| {
        format!(" blk{i}_reads={} blk{i}_writes={} blk{i}_flushes={} blk{i}_errors={}", s.reads, s.writes, s.flushes, s.errors)
    });
    nics.chain(disks).collect()
}

/// What this VM is to replication.
pub enum Role {
    /// Not replicated.
    Solo,
    /// Protected by a standby: epochs are taken on this thread.
    Primary(Box<Protector>),
    /// A standby that took over; the line says how.
    TookOver(String),
    /// Not replicated, but paused as a primary's epochs would pause it.
    Paced(Pacer),
}

pub struct Pacer {
    every: Duration,
    work: PauseWork,
    next: Instant,
}

/// Stays with a running VM until it stops: forwards stdin, answers control commands,
/// reports dirty pages if asked, takes the epochs of a primary, and turns the way the
/// guest ended into an exit status (and an event).
pub fn supervise(
    mut vm: Vm,
    stats: Option<Duration>,
    control: Option<control::ControlSocket>,
    role: &mut Role,
    events: &Events,
) -> Result<u8> {
    forward_stdin(vm.console_input());
    if let Some(socket) = &control {
        socket.wake_with(vm.waker());
    }
    if stats.is_some() {
        // The first harvest starts tracking and counts every page once.
        let pages = vm.take_dirty()?.count();
        eprintln!("tandem: dirty phase=start pages={pages} bytes={}", pages * PAGE_SIZE);
    }
    let tick = stats.unwrap_or(Duration::from_millis(50));
    let mut last = Instant::now();
    let exit = loop {
        let wait = match role {
            Role::Primary(p) => p.next_wait().min(tick),
            Role::Paced(p) => p.next.saturating_duration_since(Instant::now()).min(tick),
            _ => tick,
        };
        let exit = vm.wait_timeout(wait);
        if stats.is_some() {
            let pages = vm.take_dirty()?.count();
            eprintln!(
                "tandem: dirty phase=run pages={pages} bytes={} interval_ms={}",
                pages * PAGE_SIZE,
                last.elapsed().as_millis()
            );
            last = Instant::now();
        }
        if let Some(exit) = exit {
            break Some(exit);
        }
        if let Role::Paced(p) = role {
            if Instant::now() >= p.next {
                p.next = Instant::now() + p.every;
                if let Err(e) = vm.pause_briefly(p.work) {
                    match vm.wait_timeout(Duration::ZERO) {
                        Some(exit) => break Some(exit),
                        None if is_transient(&e) => {}
                        None => return Err(e.into()),
                    }
                }
            }
        }
        if let Role::Primary(p) = role {
            if let Err(e) = p.poll(&mut vm) {
                // An epoch that failed because the guest had just stopped the machine
                // is not the story: how the guest ended is.
                match vm.wait_timeout(Duration::ZERO) {
                    Some(exit) => break Some(exit),
                    None => return Err(e.into()),
                }
            }
        }
        if let Some(socket) = &control {
            let mut stop = false;
            while let Ok(request) = socket.requests.try_recv() {
                let reply = if request.line.split_whitespace().eq(["stop"]) {
                    stop = true;
                    "ok stopping".to_string()
                } else {
                    command(&mut vm, &request.line, role).unwrap_or_else(|e| format!("error: {e:#}"))
                };
                let _ = request.reply.send(reply);
            }
            if stop {
                break None;
            }
        }
    };
    let Some(exit) = exit else {
        // The vCPUs stop as the VM is dropped; a primary then says goodbye, so its
        // standby does not take over, and releases the last output once it is confirmed.
        events.emit(Event::VmEnded { how: VmEnd::Stopped, detail: String::new() });
        return Ok(0);
    };
    let (how, detail, code) = match exit {
        VmExit::PowerOff => (VmEnd::PowerOff, String::new(), Ok(0)),
        VmExit::Reset(how) => {
            eprintln!("tandem: the guest reset itself ({how}); the VM has ended");
            (VmEnd::Reset, how, Ok(status::GUEST_RESET))
        }
        VmExit::TripleFault(at) => {
            eprintln!("tandem: triple fault on {at}: the guest could not deliver an exception; the VM has ended");
            (VmEnd::TripleFault, at, Ok(status::GUEST_TRIPLE_FAULT))
        }
        VmExit::Failed(why) => (VmEnd::Failed, why.clone(), Err(anyhow::anyhow!("the VM stopped: {why}"))),
    };
    events.emit(Event::VmEnded { how, detail });
    code
}

/// Executes one control command against the VM.
fn command(vm: &mut Vm, line: &str, role: &Role) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let (Role::Primary(_), ["snapshot", ..]) = (role, &words[..]) {
        // A snapshot would take the dirty pages the next epoch needs.
        bail!("snapshots are not taken of a replicated VM: its standby holds its state");
    }
    match words[..] {
        ["pause"] => Ok(format!("ok paused in {:.3} ms", vm.pause()?.as_secs_f64() * 1e3)),
        ["resume"] => {
            vm.resume()?;
            Ok("ok running".into())
        }
        ["status"] if !matches!(role, Role::Solo | Role::Paced(_)) => Ok(format!(
            "{} state={} vcpus={} mem_mib={}{}",
            match role {
                Role::Primary(p) => p.status(),
                Role::TookOver(how) => how.clone(),
                Role::Solo | Role::Paced(_) => String::new(),
            },
            if vm.is_paused() { "paused" } else { "running" },
            vm.vcpu_count(),
            vm.memory_mib(),
            nic_status(vm),
        )),
        ["status"] => Ok(format!(
            "state={} vcpus={} mem_mib={} dirty_pages={}{}",
            if vm.is_paused() { "paused" } else { "running" },
            vm.vcpu_count(),
            vm.memory_mib(),
            match vm.pending_dirty()? {
                Some(n) => n.to_string(),
                None => "all (no snapshot yet)".into(),
            },
            nic_status(vm),
        )),
        ["snapshot", path] | ["snapshot", path, "--delta"] => {
            let kind = if words.len() == 3 { Kind::Delta } else { Kind::Full };
            let start = Instant::now();
            let (snap, pages, stopped) = vm.capture(kind)?;
            let written = snap.write_to(std::path::Path::new(path));
            if let Err(e) = written {
                // The pages were not kept: the next capture must include them again.
                vm.give_back_dirty(&pages);
                return Err(e.into());
            }
            Ok(format!(
                "ok snapshot {path} kind={} pages={} stopped_ms={:.3} total_ms={:.3}",
                if kind == Kind::Full { "full" } else { "delta" },
                snap.pages.len(),
                stopped.as_secs_f64() * 1e3,
                start.elapsed().as_secs_f64() * 1e3
            ))
        }
        _ => bail!("unknown command {line:?}: expected pause, resume, status, stop, or snapshot FILE [--delta]"),
    }
}
