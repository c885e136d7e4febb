//! The standby: follows a primary epoch by epoch into a complete image of its VM
//! (memory and machine state), and takes over when the primary falls silent: raises
//! and records the generation, rebuilds the VM from the last committed epoch, and
//! resumes it. It never takes over without a committed epoch, and never from a partial
//! one: epochs are applied whole, after they verify, and acknowledged only then.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::handshake::Identity;
use tandem_proto::message::Role;
use tandem_vmm::console_log::ConsoleLog;
use tandem_vmm::devices::virtio::backends::Backends;
use tandem_vmm::output::SharedSink;
use tandem_vmm::snapshot::image::Image;
use tandem_vmm::snapshot::SnapshotError;
use tandem_vmm::vm::{config_fingerprint, Prepared, Vm};

use tandem_proto::role::standby::{Action, StandbyRole};

use crate::events::{Event, Events};
use crate::transport::standby::{self as link, Report, StandbyLink};
use crate::witness::{WitnessClient, WitnessLink};
use crate::{generation, Heartbeat, ReplicationError};

pub struct Config {
    pub listen: SocketAddr,
    pub tls: rustls::ServerConfig,
    /// The VM's shape, which the primary's must match.
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kvm_device: PathBuf,
    /// The NICs the VM gets at takeover, and the disks the image keeps up to date.
    pub backends: Backends,
    /// Where the generation number is kept.
    pub state_dir: PathBuf,
    pub heartbeat: Heartbeat,
    pub events: Events,
    /// With a witness, the standby promotes itself only with its grant.
    pub witness: Option<WitnessLink>,
}

/// How following ended.
pub enum Outcome {
    /// The primary said goodbye (its guest stopped, or its operator stopped it).
    PrimaryLeft(String),
    TookOver(Box<Takeover>),
}

/// The VM this host now runs, and how the takeover went.
pub struct Takeover {
    pub vm: Vm,
    pub generation: u64,
    /// The epoch the VM was rebuilt from.
    pub epoch: u64,
    /// How long the primary had been silent when the standby decided it was gone.
    pub detection: Duration,
    /// From that decision to the VM running.
    pub resume: Duration,
    /// Of `resume`, raising the generation (written and synced to disk) and shutting
    /// the old primary out; the rest is setting the machine state and starting the vCPUs.
    pub raise: Duration,
    pub epochs: u64,
    pub bytes: u64,
    /// Bytes of console output the primary had not released, printed here instead.
    pub unreleased: usize,
    /// NIC frames the primary had not released, sent here before the VM ran.
    pub unreleased_frames: usize,
    /// Keep it as long as the VM runs: a primary that comes back is told it has been
    /// replaced.
    pub _link: StandbyLink,
}

impl Takeover {
    /// The takeover as an event.
    pub fn event(&self) -> Event {
        Event::TookOver {
            generation: self.generation,
            epoch: self.epoch,
            unreleased_output_bytes: self.unreleased,
            unreleased_frames: self.unreleased_frames,
            detection_ms: self.detection.as_millis() as u64,
            resume_ms: self.resume.as_secs_f64() * 1e3,
            raise_ms: self.raise.as_secs_f64() * 1e3,
            epochs_received: self.epochs,
            bytes_received: self.bytes,
        }
    }

    pub fn report(&self) -> String {
        format!(
            "took over as primary: generation={} epoch={} unreleased_output_bytes={} unreleased_frames={} detection_ms={} resume_ms={:.2} (raise_ms={:.2}) epochs_received={} bytes_received={}",
            self.generation,
            self.epoch,
            self.unreleased,
            self.unreleased_frames,
            self.detection.as_millis(),
            self.resume.as_secs_f64() * 1e3,
            self.raise.as_secs_f64() * 1e3,
            self.epochs,
            self.bytes
        )
    }
}

/// Where a standby stands, for `tandem ctl status` while it follows.
#[derive(Clone, Debug, Default)]
pub struct StandbyStatus {
    pub generation: u64,
    pub committed: Option<u64>,
    pub epochs: u64,
    pub bytes: u64,
    /// Slices of the image compared with the primary's digest of them, and how many
    /// differed (each a full resync).
    pub checks: u64,
    pub mismatches: u64,
}

impl StandbyStatus {
    pub fn line(&self) -> String {
        format!(
            "role=standby generation={} committed={} epochs={} bytes={} replica_checks={} replica_mismatches={}",
            self.generation,
            self.committed.map_or("none".into(), |c| c.to_string()),
            self.epochs,
            self.bytes,
            self.checks,
            self.mismatches
        )
    }
}

/// How often, at most, [`follow`] hands its status to its caller between reports: the
/// caller answers `tandem ctl status` then.
const STATUS_TICK: Duration = Duration::from_millis(50);

/// Follows the primary until it leaves or falls silent. The console of a VM taken
/// over goes to `sink`, which writes into `log`: the log starts serving at a takeover,
/// from where the console stood. `on_tick` sees the standby's status after every
/// report, and at least every [`STATUS_TICK`].
pub fn follow(
    mut config: Config,
    sink: SharedSink,
    log: Arc<ConsoleLog>,
    on_tick: &mut dyn FnMut(&StandbyStatus),
) -> Result<Outcome, ReplicationError> {
    let mut generation = generation::read(&config.state_dir)?;
    let fingerprint = config_fingerprint(&config.kvm_device, config.mem_mib, config.vcpus, &config.backends.disks.sizes())?;
    let image = Image::new(config.mem_mib)?.with_disks(config.backends.disks.clone());
    // The VM a takeover runs is built now, around the image's RAM, so that deciding to
    // take over leaves only the machine state to set; and a host that cannot build it
    // says so before it claims to stand by.
    let mut prepared = Some(Prepared::new(&config.kvm_device, image.ram(), config.vcpus)?);
    let image = Arc::new(Mutex::new(Some(image)));
    let identity = Identity { role: Role::Standby, fingerprint, generation };
    let (reports_tx, reports) = channel();
    let wake = reports_tx.clone();
    let link = link::spawn(config.listen, config.tls, identity, config.heartbeat, image.clone(), reports_tx)?;
    tracing::info!("standing by on {} at generation {generation}", config.listen);
    let events = &config.events;
    events.emit(Event::StandingBy { listen: config.listen.to_string(), generation });

    let mut committed = None;
    let (mut epochs, mut bytes) = (0u64, 0u64);
    let (mut checks, mut mismatches) = (0u64, 0u64);
    let witness = match config.witness.clone() {
        Some(link) => Some(WitnessClient::start(link, Box::new(move || drop(wake.send(Report::WitnessAnswered))))?),
        None => None,
    };
    // Between the witness's refusals: a few heartbeats, so a primary that lives (and
    // renews its lease) is not pestered, and one that died is replaced soon after its
    // lease runs out.
    let mut role = StandbyRole::new(generation, witness.is_some(), config.heartbeat.interval * 5);
    let zero = Instant::now();
    loop {
        on_tick(&StandbyStatus { generation, committed, epochs, bytes, checks, mismatches });
        if let Some(reply) = witness.as_ref().and_then(|w| w.reply()) {
            role.handle_witness(reply.answer, zero.elapsed());
        }
        role.handle_timeout(zero.elapsed());
        // (how long the primary had been silent, the generation to run at)
        let mut decided: Option<(Duration, u64)> = None;
        while let Some(action) = role.poll() {
            match action {
                Action::AskWitness(ask) => {
                    if let Some(w) = &witness {
                        w.ask(ask);
                    }
                }
                Action::Promote { generation, detection } => decided = Some((detection, generation)),
                Action::Granted(granted) => events.emit(Event::PromotionGranted { generation: granted }),
                Action::Blocked(reason) => {
                    tracing::warn!("the primary is silent, but {reason}");
                    events.emit(Event::PromotionRefused { reason });
                }
                Action::GiveUp(reason) => {
                    events.emit(Event::NotPromoted { reason: reason.clone() });
                    return Err(ReplicationError::NotPromoted(reason));
                }
                Action::Rearm => {
                    tracing::info!("the primary was heard again: no promotion");
                    link.rearm_silence();
                }
            }
        }
        // The witness's answers come as reports too, so nothing here polls for them.
        let wait = role.next_timeout().map_or(STATUS_TICK, |t| t.saturating_sub(zero.elapsed()).min(STATUS_TICK));
        let report = match decided {
            Some(_) => None,
            None => match reports.recv_timeout(wait) {
                Ok(report) => Some(report),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ReplicationError::NotPromoted("the network thread stopped".into()));
                }
            },
        };
        match report {
            None => {}
            Some(Report::Following { peer, generation: theirs }) => {
                tracing::info!("following the primary at {peer} (generation {theirs})");
                events.emit(Event::Following { peer: peer.clone(), generation: theirs });
                role.handle_following(theirs);
                if theirs > generation {
                    generation = theirs;
                    generation::write(&config.state_dir, generation)?;
                }
            }
            Some(Report::Applied { epoch, full, pages, bytes: b }) => {
                if full || committed.is_none() {
                    tracing::info!("in sync with the primary: full epoch {epoch}, {pages} pages");
                    events.emit(Event::InSync { epoch, pages });
                }
                committed = Some(epoch);
                role.handle_committed(true);
                epochs += 1;
                bytes += b as u64;
            }
            Some(Report::Checked { epoch, first, pages, same }) => {
                checks += 1;
                events.emit(Event::ReplicaChecked { epoch, first, pages, same });
                if same {
                    tracing::debug!(epoch, first, pages, "replica check passed");
                } else {
                    mismatches += 1;
                    // The image is no copy of the guest: nothing to take over from
                    // until a full epoch has replaced it.
                    committed = None;
                    role.handle_committed(false);
                    tracing::error!(
                        "REPLICA MISMATCH: {pages} pages from {first:#x} of this standby's image differ from the primary's \
                         guest at epoch {epoch}; the image is discarded and a full resync follows (no takeover until then)"
                    );
                }
            }
            Some(Report::Dropped(why)) => {
                tracing::warn!("{why}");
                events.emit(Event::ConnectionDropped { reason: why });
            }
            Some(Report::Refused(why)) => {
                tracing::warn!("{why}");
                events.emit(Event::PeerRefused { reason: why });
            }
            Some(Report::Left(why)) => {
                events.emit(Event::PrimaryLeft { reason: why.clone() });
                return Ok(Outcome::PrimaryLeft(why));
            }
            // Taken at the top of the loop.
            Some(Report::WitnessAnswered) => {}
            Some(Report::Silent(quiet)) => {
                if witness.is_some() && committed.is_some() {
                    tracing::info!("the primary is silent ({} ms): asking the witness for generation {}", quiet.as_millis(), generation + 1);
                }
                role.handle_silence(quiet, zero.elapsed());
            }
        }
        // A promotion decided on this report is carried out on the next turn, after
        // the role's actions; one decided above, now.
        let Some((quiet, granted)) = decided else { continue };
        let Some(epoch) = committed else {
            let reason = format!(
                "the witness granted generation {granted}, but this standby's image had just been discarded (a replica \
                 mismatch) and holds no committed epoch: nothing to take over from"
            );
            events.emit(Event::NotPromoted { reason: reason.clone() });
            return Err(ReplicationError::NotPromoted(reason));
        };
        let decided = Instant::now();
        generation = granted;
        // No frame of the old generation is taken from here on, and the raise outlives
        // this process, before the VM runs anywhere here.
        let (console, frames) = link.promote(generation).ok_or_else(|| ReplicationError::NotPromoted("the network thread stopped".into()))?;
        generation::write(&config.state_dir, generation)?;
        let raise = decided.elapsed();
        let taken = image.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (ram, state) = taken.ok_or_else(|| SnapshotError::Corrupt("the image was taken already".into()))?.into_parts()?;
        log.seed(console.start, &console.released);
        let unreleased = console.unreleased;
        // The output the guest produced up to this epoch that the primary did not say
        // it released: the world sees it now, before what follows it (and a console
        // client, by its offset, only once).
        {
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            sink.continue_at(console.start + console.released.len() as u64);
            if let Err(e) = sink.emit(&unreleased).and_then(|()| sink.flush()) {
                tracing::warn!("console output: {e}");
            }
        }
        // Likewise the frames, and then the announcement that the guest's MACs are
        // behind this host's TAPs now, before the guest sends more.
        let backends = std::mem::replace(&mut config.backends, Backends::none());
        for (nic, frame) in &frames {
            if let Err(e) = backends.taps.send(*nic, frame) {
                tracing::warn!("a frame the primary had not released: {e}");
            }
        }
        backends.taps.announce();
        let prepared = prepared.take().ok_or_else(|| SnapshotError::Corrupt("the prepared VM was taken already".into()))?;
        let vm = Vm::resume_prepared(prepared, ram, &state, backends, sink)?;
        // The guest's own gratuitous ARP, for peers that keep the address and not
        // just the port.
        vm.announce_nics();
        let takeover = Takeover {
            vm,
            generation,
            epoch,
            unreleased: unreleased.len(),
            unreleased_frames: frames.len(),
            detection: quiet,
            resume: decided.elapsed(),
            raise,
            epochs,
            bytes,
            _link: link,
        };
        events.emit(takeover.event());
        return Ok(Outcome::TookOver(Box::new(takeover)));
    }
}
