//! `tandem primary` and `tandem standby`: a VM protected by a standby on another host,
//! and the standby that takes it over.

use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_proto::handshake::Identity;
use tandem_proto::message::Role as ProtoRole;
use tandem_replication::events::Events;
use tandem_replication::primary::{self, Gate, Protector, StandbyLoss};
use tandem_replication::standby::{self, Outcome, Takeover};
use tandem_replication::transport::primary::Faults;
use tandem_replication::witness::WitnessLink;
use tandem_replication::{generation, tls, Heartbeat};
use tandem_vmm::devices::virtio::backends::Backends;
use tandem_vmm::disk::DiskConfig;
use tandem_vmm::net::NetConfig;
use tandem_vmm::vm::{check_vcpus, config_fingerprint, Vm};

use std::sync::{Arc, Mutex};

use tandem_vmm::console_log::{ConsoleLog, LogWriter};
use tandem_vmm::output::{EpochGate, SharedSink};

use crate::run::{supervise, Role, RunArgs};
use crate::{console, control};

/// How long a host whose guest's console ended gives console clients to read the end
/// before the process exits.
const CONSOLE_LINGER: Duration = Duration::from_millis(300);

/// Ends the console log and, if clients may be reading it, lets them finish.
fn close_console(log: &ConsoleLog, served: bool) {
    log.close();
    if served {
        std::thread::sleep(CONSOLE_LINGER);
    }
}

/// The keys and the heartbeat, alike on both sides.
#[derive(clap::Args, Clone, Debug)]
pub struct LinkArgs {
    /// This host's key pair (key.pem from `tandem keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The peer's certificate (its cert.pem): the only one accepted.
    #[arg(long, value_name = "FILE")]
    peer_cert: PathBuf,
    /// Where this host keeps its generation number.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Heartbeat interval.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    heartbeat_ms: u64,
    /// How long the peer may stay silent before it counts as gone.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    timeout_ms: u64,
    /// Write what this host does (role changes, commits, released output, takeover,
    /// how the VM ended) to FILE as JSON lines, for tools to follow.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Serve the guest's console to `tandem console` clients on ADDR (TCP): as
    /// released on a primary, and from the takeover on a standby, each byte with its
    /// offset so a client sees it exactly once across a takeover.
    #[arg(long, value_name = "ADDR")]
    console_listen: Option<SocketAddr>,
    /// The witness (`tandem witness` on a third host) that decides which side may run
    /// the guest when the two cannot hear each other: a standby promotes itself only
    /// with its grant, and a primary under --on-standby-loss continue runs on only
    /// under its lease. Without one, a cut link looks like a dead peer.
    #[arg(long, value_name = "ADDR", requires = "witness_cert")]
    witness: Option<SocketAddr>,
    /// The witness's certificate (its cert.pem): the only one accepted from it.
    #[arg(long, value_name = "FILE", requires = "witness")]
    witness_cert: Option<PathBuf>,
}

impl LinkArgs {
    fn heartbeat(&self) -> Result<Heartbeat> {
        if self.heartbeat_ms == 0 || self.timeout_ms < 2 * self.heartbeat_ms {
            bail!("--timeout-ms must be at least twice --heartbeat-ms, and both above 0");
        }
        Ok(Heartbeat { interval: Duration::from_millis(self.heartbeat_ms), timeout: Duration::from_millis(self.timeout_ms) })
    }

    fn events(&self) -> Result<Events> {
        Ok(match &self.events {
            Some(path) => Events::to_file(path)?,
            None => Events::none(),
        })
    }

    /// The console log, served on --console-listen if given.
    fn console_log(&self, live: bool) -> Result<Arc<ConsoleLog>> {
        let log = if live { ConsoleLog::live() } else { ConsoleLog::pending() };
        if let Some(addr) = self.console_listen {
            console::serve(addr, log.clone())?;
        }
        Ok(log)
    }

    fn witness(&self) -> Result<Option<WitnessLink>> {
        let (Some(addr), Some(cert)) = (self.witness, &self.witness_cert) else { return Ok(None) };
        let tls = tls::witness_client_config(tls::load_identity(&self.key)?, tls::load_peer_cert(cert)?)?;
        Ok(Some(WitnessLink { addr, tls }))
    }

    fn generation(&self) -> Result<u64> {
        Ok(match &self.state_dir {
            Some(dir) => generation::read(dir)?,
            None => 1,
        })
    }
}

/// The primary's defaults, which a standby that protects the guest after a takeover
/// (`--then-protect`) uses too.
const EPOCH_MS: u64 = 25;
const QUIET_EPOCH_MS: u64 = 100;
const WINDOW: usize = 4;
const VERIFY_EVERY: u32 = 8;
const VERIFY_PAGES: u32 = 256;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossPolicy {
    Pause,
    Continue,
}

impl LossPolicy {
    /// As `--on-standby-loss` takes it.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Continue => "continue",
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct PrimaryArgs {
    /// The standby's address (host:port).
    #[arg(long, value_name = "ADDR")]
    standby: SocketAddr,
    #[command(flatten)]
    link: LinkArgs,
    /// Epoch length: how often the guest's state goes to the standby, and so how long
    /// its output waits at most, plus the time to the standby and back.
    #[arg(long, default_value_t = EPOCH_MS, value_name = "MS")]
    epoch_ms: u64,
    /// Epoch length while the guest has written no output since the last epoch (never
    /// shorter than --epoch-ms): nothing waits on such an epoch, and a longer one costs
    /// a busy guest fewer write-protection faults and sends a page it keeps rewriting
    /// once. Output cuts it short, so output still waits at most --epoch-ms.
    #[arg(long, default_value_t = QUIET_EPOCH_MS, value_name = "MS")]
    quiet_epoch_ms: u64,
    /// Epochs on their way to the standby before the next one waits for an ack.
    #[arg(long, default_value_t = WINDOW)]
    window: usize,
    /// Every N epochs, the standby checks a slice of its image (disks first, then
    /// memory, a rotating slice at a time) against this host's digest of it at that
    /// epoch; a mismatch discards its image for a full resync. 0: never.
    #[arg(long, default_value_t = VERIFY_EVERY, value_name = "N")]
    verify_every: u32,
    /// Pages (4 KiB) in each such slice, at most 65536. They are copied while the
    /// guest is paused for the epoch: 256 pages cost about a millisecond.
    #[arg(long, default_value_t = VERIFY_PAGES, value_name = "PAGES")]
    verify_pages: u32,
    /// When the standby falls silent: pause the guest until a standby is in sync
    /// again, or let it continue and release its output unprotected.
    #[arg(long, value_enum, default_value_t = LossPolicy::Pause)]
    on_standby_loss: LossPolicy,
    /// How long to keep trying to reach the standby at start.
    #[arg(long, default_value_t = 30, value_name = "S")]
    connect_timeout_s: u64,
    /// Fault injection for tests: SIGKILL this process halfway through sending epoch N.
    #[arg(long, hide = true, value_name = "N")]
    debug_die_mid_epoch: Option<u64>,
    /// Fault injection for tests: SIGKILL this process halfway through sending the Nth
    /// epoch that carries frames from the guest's NICs.
    #[arg(long, hide = true, value_name = "N")]
    debug_die_mid_frames_epoch: Option<u64>,
    /// Fault injection for tests: corrupt a frame of epoch N on its first sending.
    #[arg(long, hide = true, value_name = "N")]
    debug_corrupt_epoch: Option<u64>,
    /// For tests: claim protocol version N in the hello.
    #[arg(long, hide = true, value_name = "N")]
    debug_protocol_version: Option<u16>,
    #[command(flatten)]
    vm: RunArgs,
}

pub fn primary(args: PrimaryArgs) -> Result<u8> {
    let config = args.vm.config()?;
    if args.vm.dirty_stats_ms.is_some() {
        bail!("--dirty-stats-ms cannot be used with replication: the epochs take the dirty pages");
    }

    if !(1..=10_000).contains(&args.epoch_ms) {
        bail!("--epoch-ms must be between 1 and 10000, got {}", args.epoch_ms);
    }
    if !(1..=10_000).contains(&args.quiet_epoch_ms) {
        bail!("--quiet-epoch-ms must be between 1 and 10000, got {}", args.quiet_epoch_ms);
    }
    if !(1..=64).contains(&args.window) {
        bail!("--window must be between 1 and 64, got {}", args.window);
    }
    if !(1..=tandem_proto::verify::MAX_VERIFY_PAGES).contains(&args.verify_pages) {
        bail!("--verify-pages must be between 1 and {}, got {}", tandem_proto::verify::MAX_VERIFY_PAGES, args.verify_pages);
    }
    let heartbeat = args.link.heartbeat()?;
    let generation = args.link.generation()?;
    let tls = tls::client_config(tls::load_identity(&args.link.key)?, tls::load_peer_cert(&args.link.peer_cert)?)?;
    // Held from the first epoch: no frame leaves before a standby holds its epoch.
    let backends = Backends::open(&args.vm.nets, &args.vm.disks)?.held_from(1);
    let fingerprint = config_fingerprint(&config.kvm_device, config.mem_mib, config.vcpus, &backends.disks.sizes())?;
    let control = args.vm.control.as_deref().map(control::listen).transpose()?;
    let events = args.link.events()?;
    let log = args.link.console_log(true)?;
    let (protector, sink) = Protector::start(
        primary::Config {
            standby: args.standby,
            tls,
            identity: Identity { role: ProtoRole::Primary, fingerprint, generation },
            epoch: Duration::from_millis(args.epoch_ms),
            quiet_epoch: Duration::from_millis(args.quiet_epoch_ms),
            window: args.window,
            verify_every: args.verify_every,
            verify_pages: args.verify_pages,
            heartbeat,
            on_standby_loss: match args.on_standby_loss {
                LossPolicy::Pause => StandbyLoss::Pause,
                LossPolicy::Continue => StandbyLoss::Continue,
            },
            witness: args.link.witness()?,
            connect_timeout: Duration::from_secs(args.connect_timeout_s),
            faults: Faults {
                die_mid_epoch: args.debug_die_mid_epoch,
                die_mid_frames_epoch: args.debug_die_mid_frames_epoch,
                corrupt_epoch: args.debug_corrupt_epoch,
                protocol_version: args.debug_protocol_version,
            },
            events: events.clone(),
        },
        Box::new(LogWriter::new(std::io::stdout(), log.clone())),
    )?;
    let vm = Vm::boot(config, backends, sink)?;
    let mut protector = protector;
    protector.attach(vm.waker(), vm.outputs(), vm.slices());
    let mut role = Role::Primary(Box::new(protector));
    let result = supervise(vm, None, control, &mut role, &events);
    finish(role, &result, &log, args.link.console_listen.is_some());
    result
}

/// The primary's VM has ended: says goodbye to the standby and, once the standby has
/// it and the last output is out, ends the console.
fn finish(role: Role, result: &Result<u8>, log: &ConsoleLog, serving: bool) {
    let Role::Primary(protector) = role else { return };
    let reason = match result {
        Ok(_) => "the guest stopped".to_string(),
        Err(e) => format!("the primary stopped: {e:#}"),
    };
    // A refusal means another host runs this VM now: no goodbye, nothing more out.
    let refused = result.as_ref().err().and_then(|e| e.downcast_ref::<tandem_replication::ReplicationError>());
    if !matches!(refused, Some(tandem_replication::ReplicationError::Refused(_))) && protector.finish(&reason) {
        // Everything is out and no standby takes over: the console has ended.
        close_console(log, serving);
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct StandbyArgs {
    /// Address to listen on for the primary (host:port, UDP).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    #[command(flatten)]
    link: LinkArgs,
    /// Guest memory in MiB: must match the primary's.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Number of vCPUs: must match the primary's.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The KVM device the VM is rebuilt on at takeover.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Open a control socket here for `tandem ctl`: `status` while standing by, every
    /// command once it has taken over.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The NICs the VM takes over on this host, as for `run`: the primary's MACs, on
    /// this host's TAP devices. Opened now, so that a missing TAP is found before any
    /// takeover.
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    nets: Vec<NetConfig>,
    /// After a takeover, protect the guest in turn: dial a standby at ADDR (the old
    /// primary's host, once `tandem standby --listen ADDR` runs there) until one
    /// answers, sync it while the guest runs, and from its acknowledgement on hold
    /// output again, as a primary does (25 ms epochs, a lost standby pauses the
    /// guest). Until then the guest runs unprotected. Failing back is the same move
    /// from the other host.
    #[arg(long, value_name = "ADDR")]
    then_protect: Option<SocketAddr>,
    /// This host's copies of the primary's disks, in the primary's order and of the
    /// same sizes. Each is overwritten: the first sync makes it the primary's disk, and
    /// every acknowledged epoch's writes are laid on it.
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<DiskConfig>,
}

pub fn standby(args: StandbyArgs) -> Result<u8> {
    if args.disks.iter().any(|d| d.readonly) {
        bail!("a standby's --disk is its copy of the primary's disk, which it writes: drop ,readonly");
    }
    let vcpus = check_vcpus(args.vcpus)?;
    let heartbeat = args.link.heartbeat()?;
    let Some(state_dir) = args.link.state_dir.clone() else {
        bail!("a standby needs --state-dir: the generation it raises when it takes over must outlive it");
    };
    // Read now so that a corrupt file is reported before anything starts.
    args.link.generation()?;
    let tls = tls::server_config(tls::load_identity(&args.link.key)?, tls::load_peer_cert(&args.link.peer_cert)?)?;
    let backends = Backends::open(&args.nets, &args.disks)?;
    let fingerprint = config_fingerprint(&args.kvm_device, args.mem_mib, vcpus, &backends.disks.sizes())?;
    let client_tls = match args.then_protect {
        Some(_) => Some(tls::client_config(tls::load_identity(&args.link.key)?, tls::load_peer_cert(&args.link.peer_cert)?)?),
        None => None,
    };
    let control = args.control.as_deref().map(control::listen).transpose()?;
    let events = args.link.events()?;
    let log = args.link.console_log(false)?;
    // The console of a VM taken over goes out at once, line by line, through the gate
    // a later protection holds it in.
    let out: Box<dyn Write + Send> = Box::new(LineWriter::new(LogWriter::new(std::io::stdout(), log.clone())));
    let gate: Gate = Arc::new(Mutex::new(EpochGate::new(out, 1)));
    gate.lock().unwrap_or_else(|e| e.into_inner()).unprotect()?;
    let sink: SharedSink = gate.clone();
    let outcome = standby::follow(
        standby::Config {
            listen: args.listen,
            tls,
            mem_mib: args.mem_mib,
            vcpus,
            kvm_device: args.kvm_device.clone(),
            backends,
            state_dir,
            heartbeat,
            events: events.clone(),
            witness: args.link.witness()?,
        },
        sink,
        log.clone(),
        // Until a takeover, the control socket answers `status` between reports.
        &mut |status| {
            let Some(control) = &control else { return };
            while let Ok(request) = control.requests.try_recv() {
                let reply = match request.line.as_str() {
                    "status" => status.line(),
                    _ => "error: standing by: only status is answered until a takeover".to_string(),
                };
                let _ = request.reply.send(reply);
            }
        },
    )
    .context("standby")?;
    match outcome {
        Outcome::PrimaryLeft(why) => {
            eprintln!("tandem: the primary said goodbye ({why}); not taking over");
            Ok(0)
        }
        Outcome::TookOver(takeover) => {
            let report = takeover.report();
            eprintln!("tandem: {report}");
            let how = format!("role=primary generation={} standby=none took_over_from_epoch={}", takeover.generation, takeover.epoch);
            let history = format!("standby@{},primary@{}(from_epoch_{})", takeover.generation - 1, takeover.generation, takeover.epoch);
            let Takeover { vm, _link, generation, .. } = *takeover;
            let (Some(addr), Some(tls)) = (args.then_protect, client_tls) else {
                let result = supervise(vm, None, control, &mut Role::TookOver(how), &events);
                close_console(&log, args.link.console_listen.is_some());
                return result;
            };
            let config = primary::Config {
                standby: addr,
                tls,
                identity: Identity { role: ProtoRole::Primary, fingerprint, generation },
                epoch: Duration::from_millis(EPOCH_MS),
                quiet_epoch: Duration::from_millis(QUIET_EPOCH_MS),
                window: WINDOW,
                verify_every: VERIFY_EVERY,
                verify_pages: VERIFY_PAGES,
                heartbeat,
                on_standby_loss: StandbyLoss::Pause,
                witness: None,
                connect_timeout: Duration::ZERO,
                faults: Faults::default(),
                events: events.clone(),
            };
            let mut protector = Protector::start_unprotected(config, gate)?;
            protector.set_history(history);
            protector.attach(vm.waker(), vm.outputs(), vm.slices());
            tracing::info!("the guest runs unprotected until a standby answers at {addr}");
            let mut role = Role::Primary(Box::new(protector));
            let result = supervise(vm, None, control, &mut role, &events);
            finish(role, &result, &log, args.link.console_listen.is_some());
            result
        }
    }
}
