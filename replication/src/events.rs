//! What a primary or a standby did, as JSON lines in a file (`--events FILE`): role
//! changes, commits, released output, takeovers. Operators' tools, the drill and the
//! tests read these, never the logs, so no outcome depends on `RUST_LOG`.
//!
//! Each line is one object: `t_ms` (wall-clock milliseconds since the Unix epoch, so
//! two processes' files interleave), `event` (the kind, snake_case) and its fields.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One event. The names and fields are an interface: add, never rename.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Standby: listening for a primary.
    StandingBy { listen: String, generation: u64 },
    /// Standby: a primary was accepted.
    Following { peer: String, generation: u64 },
    /// Standby: it holds a full epoch (the initial sync, or a resync): from here on it
    /// can take over.
    InSync { epoch: u64, pages: usize },
    /// Standby: a connection ended; an epoch in transfer, if any, was discarded.
    ConnectionDropped { reason: String },
    /// Standby: a peer was turned away (or turned this standby away).
    PeerRefused { reason: String },
    /// Standby: the primary said goodbye; no takeover.
    PrimaryLeft { reason: String },
    /// Standby: the primary fell silent before any epoch was committed here.
    NotPromoted { reason: String },
    /// Standby: a slice of its image was compared with the primary's digest of it at
    /// `epoch` (`same`: they agreed; else the image is discarded for a full resync).
    ReplicaChecked { epoch: u64, first: u64, pages: u32, same: bool },
    /// Standby: it is the primary now.
    TookOver {
        generation: u64,
        epoch: u64,
        unreleased_output_bytes: usize,
        unreleased_frames: usize,
        detection_ms: u64,
        resume_ms: f64,
        /// Of resume_ms, raising the generation on disk.
        raise_ms: f64,
        epochs_received: u64,
        bytes_received: u64,
    },
    /// Primary: a standby accepted this primary (`full_sync`: it needs everything).
    StandbyFollows { full_sync: bool },
    /// Primary: a full epoch went to the standby.
    FullSync { epoch: u64, pages: usize },
    /// Primary: the standby acknowledged the full epoch; output flows from here on.
    Protected { epoch: u64 },
    /// Primary: the guest's output up to this epoch reached the world.
    /// `lag_ms`: from the seal of the oldest epoch released to the release.
    /// `bytes`: console bytes; `frames`: NIC frames.
    Released { epoch: u64, bytes: usize, lag_ms: f64, frames: usize },
    /// Primary: the standby fell silent; `policy` says what the guest does now.
    StandbyLost { policy: LossPolicy, silent_ms: u64 },
    /// Primary: protected again after a loss (the same standby, or a new one in sync).
    Reprotected,
    /// Primary: a test's fault injection fired.
    FaultInjected { fault: Fault, epoch: u64 },
    /// Primary: the goodbye ended protection; `confirmed`: the standby has it, and the
    /// last output was released.
    Goodbye { confirmed: bool },
    /// Either role: the VM this process ran has ended.
    VmEnded { how: VmEnd, detail: String },
    /// Standby: the primary is silent, but the witness did not grant the promotion
    /// (or could not be asked): no takeover yet.
    PromotionRefused { reason: String },
    /// Standby: the witness granted this host `generation`.
    PromotionGranted { generation: u64 },
    /// Primary: the witness leased this primary time to run on without a standby
    /// (only the first lease after a loss, not each renewal).
    LeaseGranted { generation: u64, for_ms: u64 },
    /// Primary: no lease now (refused, lapsed, or the witness unreachable): the guest
    /// is paused and its output held.
    LeaseLost { reason: String },
    /// Witness: listening, from its record (generation 0 for a new witness); it
    /// grants nothing for `quiet_ms`, as a lease given before a restart may still run.
    WitnessStarted { generation: u64, holder: String, quiet_ms: u64 },
    /// Witness: a host's question and the answer, after it was made durable.
    WitnessAnswered { host: String, ask: String, answer: String },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossPolicy {
    Pause,
    Continue,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    DieMidEpoch,
    CorruptFrame,
}

/// How a VM ended, as an exit status tells it too.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmEnd {
    PowerOff,
    /// The guest asked for a reset (a reboot, or a panic with `panic=N`).
    Reset,
    /// The CPU could not deliver an exception at all (KVM's shutdown exit).
    TripleFault,
    /// The VMM stopped it (an error, or a refusal by a newer primary).
    Failed,
    /// The operator stopped it (`tandem ctl SOCKET stop`).
    Stopped,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the events file {path}: {source}")]
pub struct EventsError {
    path: String,
    source: std::io::Error,
}

/// Where events go: a file, or nowhere. Cheap to clone; every clone writes to the same
/// file, a whole line at a time.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Mutex<File>>>);

impl Events {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn to_file(path: &Path) -> Result<Self, EventsError> {
        let file = File::create(path).map_err(|source| EventsError { path: path.display().to_string(), source })?;
        Ok(Self(Some(Arc::new(Mutex::new(file)))))
    }

    /// Appends one line. A write that fails is reported in the log and otherwise
    /// ignored: events describe the VM, they must never stop it.
    pub fn emit(&self, event: Event) {
        let Some(file) = &self.0 else { return };
        let t_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut line = match serde_json::to_value(&event) {
            Ok(serde_json::Value::Object(fields)) => {
                let mut all = serde_json::Map::new();
                all.insert("t_ms".into(), t_ms.into());
                all.extend(fields);
                serde_json::Value::Object(all).to_string()
            }
            _ => return,
        };
        line.push('\n');
        // One write per line, unbuffered: a reader sees each event as it happens, and
        // a SIGKILL loses none that were emitted.
        if let Err(e) = file.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes()) {
            tracing::warn!("events file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_one_json_line_with_time_and_kind() {
        let dir = std::env::temp_dir().join(format!("tandem-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("e.jsonl");
        let events = Events::to_file(&path).unwrap();
        events.emit(Event::Protected { epoch: 3 });
        events.clone().emit(Event::VmEnded { how: VmEnd::TripleFault, detail: "vCPU 0".into() });
        Events::none().emit(Event::Reprotected);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "protected");
        assert_eq!(lines[0]["epoch"], 3);
        assert!(lines[0]["t_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(lines[1]["event"], "vm_ended");
        assert_eq!(lines[1]["how"], "triple_fault");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
