//! The primary's standby-loss policy, and its lease from the witness.

use std::collections::VecDeque;
use std::time::Duration;

use crate::witness::{Answer, Ask, Lease, Refusal};

/// What the primary does when its standby falls silent past the heartbeat timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Pause the guest until a standby is in sync again: nothing runs that could not be
    /// taken over, and nothing is released (safe against split brain).
    Pause,
    /// Let the guest run on and release its output unprotected; with a witness, only
    /// while it leases this primary the time.
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A standby holds every epoch whose output goes out.
    Protected,
    /// The guest is paused, its output held (the policy, or no lease).
    Paused,
    /// The guest runs without a standby, its output written through.
    Unprotected,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    PauseGuest,
    ResumeGuest,
    /// Let every device's output straight through, what is held included.
    OpenOutputs,
    /// Hold output per epoch again, from the next epoch on.
    ProtectOutputs,
    /// Ask the witness this (a lease); its answer goes to [`PrimaryRole::handle_witness`]
    /// with when it was asked.
    AskWitness(Ask),
    /// Another host runs this VM now: stop it.
    Stop(String),
    Note(Note),
}

/// What happened, for the logs and the events.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// The standby was lost; the guest now is in `mode` (`Paused` under `Continue`
    /// means: until the witness leases the time).
    Lost { mode: Mode },
    Reprotected,
    LeaseGranted { for_ms: u64 },
    /// No lease, and why (each reason once in a row).
    NoLease(String),
    /// The lease ran out unrenewed: the guest is paused.
    LeaseLapsed,
}

pub struct PrimaryRole {
    policy: Policy,
    witness: bool,
    generation: u64,
    retry: Duration,
    /// How long the standby may be silent, its link down, before it counts as lost
    /// (the link itself drops a connection silent past the same timeout).
    timeout: Duration,
    /// When the standby was last heard, while its link is down.
    silent_since: Option<Duration>,
    mode: Mode,
    outputs_open: bool,
    leasing: bool,
    asking: bool,
    lease: Lease,
    trouble: String,
    actions: VecDeque<Action>,
}

impl PrimaryRole {
    /// A primary at `generation`, its guest `unprotected` at first (a promoted standby
    /// waiting for its own standby) or not. With a `witness`, `Continue` runs on only
    /// under its lease, asked for again every `retry` while there is none. A standby
    /// silent past `timeout` with its link down is lost.
    pub fn new(policy: Policy, witness: bool, generation: u64, retry: Duration, timeout: Duration, unprotected: bool) -> Self {
        Self {
            policy,
            witness,
            generation,
            retry,
            timeout,
            silent_since: None,
            mode: if unprotected { Mode::Unprotected } else { Mode::Protected },
            outputs_open: unprotected,
            leasing: false,
            asking: false,
            lease: Lease::default(),
            trouble: String::new(),
            actions: VecDeque::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The link to the standby is down, the standby last heard at `heard`: it is lost
    /// once silent past the timeout (see [`PrimaryRole::handle_timeout`]), unless it
    /// follows again first.
    pub fn handle_link_down(&mut self, heard: Duration, now: Duration) {
        if self.mode == Mode::Protected {
            self.silent_since = Some(heard);
            self.handle_timeout(now);
        }
    }

    /// The standby has been silent past the timeout.
    fn handle_standby_lost(&mut self, now: Duration) {
        self.silent_since = None;
        if self.mode != Mode::Protected {
            return;
        }
        match (self.policy, self.witness) {
            (Policy::Pause, _) => self.pause(),
            (Policy::Continue, false) => {
                self.open();
                self.mode = Mode::Unprotected;
            }
            (Policy::Continue, true) => {
                self.pause();
                self.leasing = true;
            }
        }
        self.actions.push_back(Action::Note(Note::Lost { mode: self.mode }));
        self.handle_timeout(now);
    }

    fn pause(&mut self) {
        self.actions.push_back(Action::PauseGuest);
        self.mode = Mode::Paused;
    }

    fn open(&mut self) {
        if !self.outputs_open {
            self.outputs_open = true;
            self.actions.push_back(Action::OpenOutputs);
        }
    }

    /// A standby follows (it may still need a full epoch): output is held from the
    /// next epoch on, and no lease is needed any more.
    pub fn handle_standby_following(&mut self) {
        self.silent_since = None;
        self.leasing = false;
        self.lease.drop_lease();
        self.trouble.clear();
        if self.outputs_open {
            self.outputs_open = false;
            self.actions.push_back(Action::ProtectOutputs);
        }
        if self.mode == Mode::Unprotected {
            self.mode = Mode::Protected;
            self.actions.push_back(Action::Note(Note::Reprotected));
        }
    }

    /// The standby holds what it needs to follow (no full epoch owed): a guest paused
    /// for its loss runs again.
    pub fn handle_standby_in_sync(&mut self) {
        self.handle_standby_following();
        if self.mode == Mode::Paused {
            self.mode = Mode::Protected;
            self.actions.push_back(Action::ResumeGuest);
            self.actions.push_back(Action::Note(Note::Reprotected));
        }
    }

    /// The witness's answer to a lease asked at `asked` (`Err`: it could not be asked).
    pub fn handle_witness(&mut self, answer: Result<Answer, String>, asked: Duration, now: Duration) {
        self.asking = false;
        if !self.leasing {
            return;
        }
        let why = match answer {
            Ok(Answer::Leased { generation, for_ms }) if generation == self.generation => {
                let had = self.lease.valid(now);
                self.lease.granted(asked, for_ms);
                self.trouble.clear();
                if self.lease.valid(now) && self.mode == Mode::Paused {
                    self.open();
                    self.mode = Mode::Unprotected;
                    self.actions.push_back(Action::ResumeGuest);
                }
                if !had && self.lease.valid(now) {
                    self.actions.push_back(Action::Note(Note::LeaseGranted { for_ms }));
                }
                return;
            }
            Ok(Answer::Refused(Refusal::Superseded { current })) => {
                self.leasing = false;
                self.actions.push_back(Action::Stop(format!(
                    "the witness granted generation {current} to another host: this primary has been replaced"
                )));
                return;
            }
            Ok(Answer::Refused(r)) => format!("the witness refused the lease: {r}"),
            Ok(other) => format!("the witness answered {other:?} to a lease"),
            Err(e) => format!("the witness could not be asked ({e})"),
        };
        if why != self.trouble {
            self.trouble = why.clone();
            self.actions.push_back(Action::Note(Note::NoLease(why)));
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if let Some(heard) = self.silent_since {
            if now.saturating_sub(heard) >= self.timeout {
                self.handle_standby_lost(now);
                return;
            }
        }
        if !self.leasing {
            return;
        }
        if self.mode == Mode::Unprotected && !self.lease.valid(now) {
            self.pause();
            self.actions.push_back(Action::Note(Note::LeaseLapsed));
        }
        if !self.asking && self.lease.renew_due(now) {
            self.asking = true;
            self.lease.asked(now, self.retry);
            self.actions.push_back(Action::AskWitness(Ask::Lease { version: crate::PROTOCOL_VERSION, generation: self.generation }));
        }
    }

    /// When [`PrimaryRole::handle_timeout`] has something to do, if ever.
    pub fn next_timeout(&self) -> Option<Duration> {
        if let Some(heard) = self.silent_since {
            return Some(heard + self.timeout);
        }
        if !self.leasing {
            return None;
        }
        self.lease.next_deadline()
    }

    /// What is left of the lease, when one is held.
    pub fn lease_left(&self, now: Duration) -> Option<Duration> {
        self.leasing.then(|| self.lease.left(now)).flatten()
    }

    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn drain(r: &mut PrimaryRole) -> Vec<Action> {
        std::iter::from_fn(|| r.poll()).collect()
    }

    fn lease_ask() -> Action {
        Action::AskWitness(Ask::Lease { version: crate::PROTOCOL_VERSION, generation: 1 })
    }

    #[test]
    fn pause_pauses_and_a_standby_in_sync_resumes() {
        let mut r = PrimaryRole::new(Policy::Pause, false, 1, MS(500), MS(1000), false);
        r.handle_link_down(MS(0), MS(900));
        assert!(drain(&mut r).is_empty(), "not silent long enough");
        r.handle_timeout(MS(1001));
        assert_eq!(drain(&mut r), vec![Action::PauseGuest, Action::Note(Note::Lost { mode: Mode::Paused })]);
        r.handle_standby_following();
        assert!(drain(&mut r).is_empty(), "still owed a full epoch: stays paused");
        r.handle_standby_in_sync();
        assert_eq!(drain(&mut r), vec![Action::ResumeGuest, Action::Note(Note::Reprotected)]);
    }

    #[test]
    fn continue_without_a_witness_opens_the_outputs_and_a_standby_closes_them() {
        let mut r = PrimaryRole::new(Policy::Continue, false, 1, MS(500), MS(1000), false);
        r.handle_link_down(MS(0), MS(1001));
        assert_eq!(drain(&mut r), vec![Action::OpenOutputs, Action::Note(Note::Lost { mode: Mode::Unprotected })]);
        r.handle_standby_following();
        assert_eq!(drain(&mut r), vec![Action::ProtectOutputs, Action::Note(Note::Reprotected)]);
    }

    #[test]
    fn continue_with_a_witness_runs_only_under_the_lease() {
        let mut r = PrimaryRole::new(Policy::Continue, true, 1, MS(500), MS(0), false);
        r.handle_link_down(MS(0), MS(0));
        assert_eq!(drain(&mut r), vec![Action::PauseGuest, Action::Note(Note::Lost { mode: Mode::Paused }), lease_ask()]);
        r.handle_witness(Ok(Answer::Leased { generation: 1, for_ms: 3000 }), MS(0), MS(20));
        assert_eq!(drain(&mut r), vec![Action::OpenOutputs, Action::ResumeGuest, Action::Note(Note::LeaseGranted { for_ms: 3000 })]);
        assert_eq!(r.next_timeout(), Some(MS(1000)));
        r.handle_timeout(MS(1000));
        assert_eq!(drain(&mut r), vec![lease_ask()]);
        r.handle_witness(Err("down".into()), MS(1000), MS(1010));
        assert!(matches!(drain(&mut r)[..], [Action::Note(Note::NoLease(_))]));
        r.handle_timeout(MS(1500));
        assert_eq!(drain(&mut r), vec![lease_ask()]);
        r.handle_witness(Err("down".into()), MS(1500), MS(1510));
        assert!(drain(&mut r).is_empty());
        // The lease, counted from the ask less a tenth, runs out at 2.7 s.
        r.handle_timeout(MS(2700));
        assert_eq!(drain(&mut r), vec![Action::PauseGuest, Action::Note(Note::LeaseLapsed), lease_ask()]);
        assert_eq!(r.mode(), Mode::Paused);
        r.handle_witness(Ok(Answer::Refused(Refusal::Superseded { current: 2 })), MS(2700), MS(2710));
        assert!(matches!(drain(&mut r)[..], [Action::Stop(_)]));
    }
}
