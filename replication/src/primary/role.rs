//! The primary carrying out what its role ([`PrimaryRole`](tandem_proto::role::primary::PrimaryRole))
//! decided: the guest paused or resumed, the outputs opened or held, the witness asked,
//! and what happened said in the log and the events.

use tandem_proto::role::primary::{Action, Mode, Note};
use tandem_vmm::vm::Vm;

use super::{Protector, StandbyLoss};
use crate::events::{self, Event};
use crate::ReplicationError;

impl Protector {
    /// Does what the role decided.
    pub(super) fn carry_out(&mut self, vm: &mut Vm) -> Result<(), ReplicationError> {
        while let Some(action) = self.role.poll() {
            match action {
                Action::PauseGuest => {
                    vm.pause()?;
                }
                Action::ResumeGuest => vm.resume()?,
                Action::OpenOutputs => {
                    self.outputs.unprotect().map_err(|e| ReplicationError::NoStandby(format!("releasing held output: {e}")))?
                }
                Action::ProtectOutputs => {
                    let next = self.link.next_epoch;
                    self.outputs.protect(next);
                }
                Action::AskWitness(ask) => {
                    if let Some(w) = &self.witness {
                        w.ask(ask);
                    }
                }
                Action::Stop(why) => return Err(ReplicationError::Refused(why)),
                Action::Note(note) => self.note(note),
            }
        }
        Ok(())
    }

    fn note(&mut self, note: Note) {
        let (why, quiet) = (&self.lost.0, self.lost.1.as_millis());
        match note {
            Note::Lost { mode } => {
                let policy = match self.role.policy() {
                    StandbyLoss::Pause => events::LossPolicy::Pause,
                    StandbyLoss::Continue => events::LossPolicy::Continue,
                };
                self.events.emit(Event::StandbyLost { policy, silent_ms: quiet as u64 });
                match (mode, self.witness.is_some()) {
                    (Mode::Unprotected, _) => tracing::error!(
                        "lost the standby ({why}; silent for {quiet} ms): the guest runs UNPROTECTED and its output is released at once; a \
                         failure of this host now loses it (--on-standby-loss=continue)"
                    ),
                    (_, true) => tracing::error!(
                        "lost the standby ({why}; silent for {quiet} ms): the guest is paused and its output held until the witness leases \
                         this primary time to run on (--on-standby-loss=continue with a witness)"
                    ),
                    _ => tracing::error!(
                        "lost the standby ({why}; silent for {quiet} ms): the guest is paused and its output held until a standby is in sync \
                         (--on-standby-loss=pause)"
                    ),
                }
            }
            Note::Reprotected => {
                tracing::warn!("a standby at {} is in sync again: output is protected once more", self.standby);
                self.events.emit(Event::Reprotected);
            }
            Note::LeaseGranted { for_ms } => {
                tracing::error!("the witness leases this primary time: the guest runs UNPROTECTED and its output is released at once");
                self.events.emit(Event::LeaseGranted { generation: self.link.generation(), for_ms });
            }
            Note::NoLease(reason) => {
                tracing::warn!("no lease: {reason}");
                self.events.emit(Event::LeaseLost { reason });
            }
            Note::LeaseLapsed => {
                tracing::error!("the witness's lease ran out unrenewed: the guest is paused until it is renewed or a standby follows");
                self.events.emit(Event::LeaseLost { reason: "the lease ran out unrenewed".into() });
            }
        }
    }
}
