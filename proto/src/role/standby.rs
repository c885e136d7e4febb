//! The standby's decision to become primary.

use std::collections::VecDeque;
use std::time::Duration;

use crate::witness::{Answer, Ask};

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the witness this (a promotion); its answer goes to
    /// [`StandbyRole::handle_witness`].
    AskWitness(Ask),
    /// Take over now, at `generation`; the primary had been silent `detection` when
    /// the decision fell.
    Promote { generation: u64, detection: Duration },
    /// The witness granted `generation`.
    Granted(u64),
    /// No promotion for now, and why (each reason once in a row).
    Blocked(String),
    /// The primary fell silent before any epoch was committed here: nothing to take
    /// over from, ever, from this image. The standby ends.
    GiveUp(String),
    /// The silence was reported but not acted on, and the primary is heard again:
    /// judge its next silence afresh.
    Rearm,
}

enum State {
    Following,
    /// The primary is silent; the witness is being asked.
    Asking { quiet: Duration, since: Duration, next_ask: Duration, in_flight: bool, last: String },
    Done,
}

pub struct StandbyRole {
    generation: u64,
    witness: bool,
    retry: Duration,
    committed: bool,
    followed: bool,
    state: State,
    actions: VecDeque<Action>,
}

impl StandbyRole {
    /// A standby at `generation`; with `witness`, promotions wait for its grant, asked
    /// again every `retry` while refused.
    pub fn new(generation: u64, witness: bool, retry: Duration) -> Self {
        Self { generation, witness, retry, committed: false, followed: false, state: State::Following, actions: VecDeque::new() }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A primary was accepted, at `generation`.
    pub fn handle_following(&mut self, generation: u64) {
        self.followed = true;
        self.generation = self.generation.max(generation);
        self.heard();
    }

    /// Whether the image holds a committed epoch to take over from (an applied epoch
    /// makes it so; a replica mismatch undoes it).
    pub fn handle_committed(&mut self, committed: bool) {
        self.committed = committed;
        if committed {
            self.heard();
        }
    }

    fn heard(&mut self) {
        if let State::Asking { .. } = self.state {
            // An answer still on its way is read, and ignored, when it comes.
            self.state = State::Following;
            self.actions.push_back(Action::Rearm);
        }
    }

    /// The primary has been silent `quiet`, past the timeout.
    pub fn handle_silence(&mut self, quiet: Duration, now: Duration) {
        if !matches!(self.state, State::Following) {
            return;
        }
        if !self.committed {
            if self.followed {
                self.state = State::Done;
                self.actions.push_back(Action::GiveUp(format!(
                    "the primary fell silent ({} ms) before this standby held a committed epoch: the initial sync \
                     had not completed, so there is nothing to take over from; not promoting",
                    quiet.as_millis()
                )));
            }
            return;
        }
        if !self.witness {
            self.promote(self.generation + 1, quiet);
            return;
        }
        self.state = State::Asking { quiet, since: now, next_ask: now, in_flight: false, last: String::new() };
        self.handle_timeout(now);
    }

    fn promote(&mut self, generation: u64, detection: Duration) {
        self.generation = generation;
        self.state = State::Done;
        self.actions.push_back(Action::Promote { generation, detection });
    }

    /// The witness's answer to the promotion asked (`Err`: it could not be asked).
    pub fn handle_witness(&mut self, answer: Result<Answer, String>, now: Duration) {
        let State::Asking { quiet, since, next_ask, in_flight, last } = &mut self.state else {
            // Heard from the primary since: a grant is still a grant (the witness
            // recorded it, and will refuse the old primary a lease), and it is this
            // standby's to use when the primary next falls silent.
            return;
        };
        *in_flight = false;
        let reason = match answer {
            Ok(Answer::Granted { generation }) if generation == self.generation + 1 => {
                let detection = *quiet + now.saturating_sub(*since);
                self.actions.push_back(Action::Granted(generation));
                self.promote(generation, detection);
                return;
            }
            Ok(Answer::Refused(r)) => format!("the witness refused the promotion: {r}"),
            Ok(other) => format!("the witness answered {other:?} to a promotion"),
            Err(e) => format!("the witness could not be asked ({e}): no promotion without its grant"),
        };
        *next_ask = now + self.retry;
        if reason != *last {
            *last = reason.clone();
            self.actions.push_back(Action::Blocked(reason));
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        let generation = self.generation;
        if let State::Asking { next_ask, in_flight, .. } = &mut self.state {
            if !*in_flight && now >= *next_ask {
                *in_flight = true;
                self.actions.push_back(Action::AskWitness(Ask::Promote { version: crate::PROTOCOL_VERSION, from: generation }));
            }
        }
    }

    /// When [`StandbyRole::handle_timeout`] has something to do, if ever.
    pub fn next_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Asking { next_ask, in_flight: false, .. } => Some(*next_ask),
            _ => None,
        }
    }

    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::Refusal;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn drain(r: &mut StandbyRole) -> Vec<Action> {
        std::iter::from_fn(|| r.poll()).collect()
    }

    #[test]
    fn without_a_witness_silence_with_a_committed_epoch_promotes_at_once() {
        let mut r = StandbyRole::new(3, false, MS(500));
        r.handle_following(3);
        r.handle_committed(true);
        r.handle_silence(MS(1000), MS(5000));
        assert_eq!(drain(&mut r), vec![Action::Promote { generation: 4, detection: MS(1000) }]);
    }

    #[test]
    fn silence_before_any_commit_gives_up_and_before_any_primary_waits() {
        let mut r = StandbyRole::new(1, false, MS(500));
        r.handle_silence(MS(1000), MS(0));
        assert!(drain(&mut r).is_empty());
        r.handle_following(1);
        r.handle_silence(MS(1000), MS(0));
        assert!(matches!(drain(&mut r)[..], [Action::GiveUp(_)]));
    }

    #[test]
    fn with_a_witness_it_asks_retries_and_promotes_only_on_the_grant() {
        let mut r = StandbyRole::new(1, true, MS(500));
        r.handle_following(1);
        r.handle_committed(true);
        r.handle_silence(MS(1000), MS(0));
        let ask = Ask::Promote { version: crate::PROTOCOL_VERSION, from: 1 };
        assert_eq!(drain(&mut r), vec![Action::AskWitness(ask.clone())]);
        r.handle_witness(Err("down".into()), MS(10));
        assert!(matches!(drain(&mut r)[..], [Action::Blocked(_)]));
        assert_eq!(r.next_timeout(), Some(MS(510)));
        r.handle_timeout(MS(509));
        assert!(drain(&mut r).is_empty());
        r.handle_timeout(MS(510));
        assert_eq!(drain(&mut r), vec![Action::AskWitness(ask)]);
        // The same refusal again is not news.
        r.handle_witness(Err("down".into()), MS(520));
        assert!(drain(&mut r).is_empty());
        r.handle_timeout(MS(1020));
        drain(&mut r);
        r.handle_witness(Ok(Answer::Refused(Refusal::LeaseHeld { generation: 1, left_ms: 5 })), MS(1030));
        assert!(matches!(drain(&mut r)[..], [Action::Blocked(_)]));
        r.handle_timeout(MS(1530));
        drain(&mut r);
        r.handle_witness(Ok(Answer::Granted { generation: 2 }), MS(1540));
        assert_eq!(drain(&mut r), vec![Action::Granted(2), Action::Promote { generation: 2, detection: MS(2540) }]);
    }

    #[test]
    fn a_primary_heard_again_cancels_the_asking_and_rearms_the_silence() {
        let mut r = StandbyRole::new(1, true, MS(500));
        r.handle_following(1);
        r.handle_committed(true);
        r.handle_silence(MS(1000), MS(0));
        drain(&mut r);
        r.handle_committed(true);
        assert_eq!(drain(&mut r), vec![Action::Rearm]);
        r.handle_witness(Ok(Answer::Granted { generation: 2 }), MS(5));
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.next_timeout(), None);
    }
}
