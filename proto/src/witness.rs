//! The witness: a third party that decides, for a two-node cluster, which side may run
//! the guest when the two cannot hear each other. Losing heartbeats does not tell a
//! dead peer from a cut link; the witness turns that guess into a rule.
//!
//! - A standby becomes primary at generation g+1 only with the witness's **grant** for
//!   g+1. The witness grants each generation once, and records it before it answers.
//! - A primary that has lost its standby releases output unprotected only while it
//!   holds the witness's **lease** for its generation, which the witness gives only if
//!   it has granted no later generation, and refuses every grant while a lease runs.
//!
//! So at any moment at most one side may release output. The [`Arbiter`] is the
//! witness's rule, the [`Lease`] is the primary's view of its lease; both take time as
//! an argument and do no I/O.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a host asks the witness. The asker's identity is not in the message: the
/// witness takes it from the certificate the host presented.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// A standby at generation `from` asks to become primary at `from + 1`.
    Promote { version: u16, from: u64 },
    /// A primary at `generation` that has lost its standby asks to run on without it
    /// (or to renew the lease it holds).
    Lease { version: u16, generation: u64 },
    /// Where the witness stands, for an operator.
    Status { version: u16 },
}

impl Ask {
    pub fn version(&self) -> u16 {
        match self {
            Ask::Promote { version, .. } | Ask::Lease { version, .. } | Ask::Status { version } => *version,
        }
    }
}

/// Why the witness said no.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("generation {current} is already granted to another host: this one has been replaced")]
    Superseded { current: u64 },
    #[error("the primary at generation {generation} holds a lease for {left_ms} ms more: it is alive and runs the guest")]
    LeaseHeld { generation: u64, left_ms: u64 },
    #[error("the witness restarted {since_ms} ms ago and grants nothing for {left_ms} ms more (a lease it gave before may still run)")]
    Recovering { since_ms: u64, left_ms: u64 },
    #[error("the witness speaks protocol version {ours}, the host {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("the witness cannot record its decision: {0}")]
    Storage(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The asker is primary at `generation` now.
    Granted { generation: u64 },
    /// The asker may run on unprotected for `for_ms` from when it asked.
    Leased { generation: u64, for_ms: u64 },
    Refused(Refusal),
    Status { generation: u64, holder: String, lease: Option<(u64, u64)> },
}

/// What the witness keeps on disk: the latest generation it granted (or saw leased),
/// and which host holds it. Written and synced before any answer that depends on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub holder: String,
}

impl Record {
    pub fn to_text(&self) -> String {
        format!("generation={} holder={}\n", self.generation, self.holder)
    }

    /// Parses [`Record::to_text`]'s output; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut generation = None;
        let mut holder = None;
        for field in text.split_whitespace() {
            match field.split_once('=')? {
                ("generation", g) => generation = Some(g.parse().ok()?),
                ("holder", h) if !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()) => holder = Some(h.to_string()),
                _ => return None,
            }
        }
        Some(Self { generation: generation?, holder: holder? })
    }
}

#[derive(Clone)]
struct Held {
    holder: String,
    generation: u64,
    until: Duration,
}

/// The witness's rule. `now` is the witness's monotonic clock.
#[derive(Clone)]
pub struct Arbiter {
    record: Record,
    lease: Option<Held>,
    lease_len: Duration,
    started: Duration,
    /// No grant before this: a lease given before a restart is not on disk, and may
    /// still run for up to `lease_len`.
    quiet_until: Duration,
}

/// What the witness does with an ask: persist `record` (when `Some`) and only then
/// send `answer`.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    pub persist: Option<Record>,
}

impl Arbiter {
    /// A witness starting at `now` from what it had on disk (`None`: a new witness).
    pub fn new(record: Option<Record>, now: Duration, lease_len: Duration) -> Self {
        let fresh = record.is_none();
        Self {
            record: record.unwrap_or_default(),
            lease: None,
            lease_len,
            started: now,
            // A new witness has given no lease yet.
            quiet_until: if fresh { now } else { now + lease_len },
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Decides on `ask` from `holder` (the fingerprint of the certificate it presented).
    pub fn handle(&mut self, ask: &Ask, holder: &str, now: Duration) -> Decision {
        let answer = |answer| Decision { answer, persist: None };
        let refuse = |r| Decision { answer: Answer::Refused(r), persist: None };
        if ask.version() != crate::PROTOCOL_VERSION {
            return refuse(Refusal::Version { ours: crate::PROTOCOL_VERSION, theirs: ask.version() });
        }
        let lease_left = self.lease.as_ref().filter(|l| l.until > now).map(|l| (l.holder.clone(), l.generation, l.until - now));
        match *ask {
            Ask::Status { .. } => answer(Answer::Status {
                generation: self.record.generation,
                holder: self.record.holder.clone(),
                lease: lease_left.map(|(_, g, left)| (g, left.as_millis() as u64)),
            }),
            Ask::Promote { from, .. } => {
                let target = from.saturating_add(1);
                if self.record.generation >= target {
                    // The same host asking again (its answer was lost) gets the same yes.
                    if self.record.generation == target && self.record.holder == holder {
                        return answer(Answer::Granted { generation: target });
                    }
                    return refuse(Refusal::Superseded { current: self.record.generation });
                }
                if let Some((_, generation, left)) = lease_left.filter(|(who, ..)| who != holder) {
                    return refuse(Refusal::LeaseHeld { generation, left_ms: left.as_millis() as u64 });
                }
                if now < self.quiet_until {
                    return refuse(Refusal::Recovering {
                        since_ms: (now - self.started).as_millis() as u64,
                        left_ms: (self.quiet_until - now).as_millis() as u64,
                    });
                }
                self.record = Record { generation: target, holder: holder.to_string() };
                self.lease = None;
                Decision { answer: Answer::Granted { generation: target }, persist: Some(self.record.clone()) }
            }
            Ask::Lease { generation, .. } => {
                if self.record.generation > generation {
                    return refuse(Refusal::Superseded { current: self.record.generation });
                }
                if let Some((_, g, left)) = lease_left.filter(|(who, ..)| who != holder) {
                    return refuse(Refusal::LeaseHeld { generation: g, left_ms: left.as_millis() as u64 });
                }
                let persist = (self.record.generation != generation || self.record.holder != holder).then(|| {
                    self.record = Record { generation, holder: holder.to_string() };
                    self.record.clone()
                });
                self.lease = Some(Held { holder: holder.to_string(), generation, until: now + self.lease_len });
                Decision { answer: Answer::Leased { generation, for_ms: self.lease_len.as_millis() as u64 }, persist }
            }
        }
    }
}

/// The primary's view of its lease. It counts the lease from when it *asked*, not
/// from when the answer came, and gives up a margin, so it always ends before the
/// witness's view of it does (the two clocks only need to tick at about one rate).
#[derive(Clone, Copy, Debug, Default)]
pub struct Lease {
    until: Option<Duration>,
    renew_at: Option<Duration>,
}

impl Lease {
    /// The witness leased `for_ms` to an ask sent at `asked`.
    pub fn granted(&mut self, asked: Duration, for_ms: u64) {
        let length = Duration::from_millis(for_ms);
        let until = asked + length - length / 10;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        // Renewed a third of the way in: two more tries before it runs out.
        self.renew_at = Some(asked + length / 3);
    }

    pub fn valid(&self, now: Duration) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Whether to ask again now: a lease held and a third spent, or none held.
    pub fn renew_due(&self, now: Duration) -> bool {
        self.renew_at.map_or(true, |r| now >= r)
    }

    /// An ask went out at `now` and must not be repeated before `retry` has passed.
    pub fn asked(&mut self, now: Duration, retry: Duration) {
        self.renew_at = Some(now + retry);
    }

    /// When something changes: the lease runs out, or a renewal is due.
    pub fn next_deadline(&self) -> Option<Duration> {
        match (self.until, self.renew_at) {
            (Some(u), Some(r)) => Some(u.min(r)),
            (u, r) => u.or(r),
        }
    }

    pub fn left(&self, now: Duration) -> Option<Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }

    pub fn drop_lease(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTOCOL_VERSION as V;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn promote(from: u64) -> Ask {
        Ask::Promote { version: V, from }
    }
    fn lease(generation: u64) -> Ask {
        Ask::Lease { version: V, generation }
    }

    #[test]
    fn a_generation_is_granted_once_and_again_only_to_its_holder() {
        let mut w = Arbiter::new(None, MS(0), MS(2000));
        let d = w.handle(&promote(1), "aa", MS(10));
        assert_eq!(d.answer, Answer::Granted { generation: 2 });
        assert_eq!(d.persist, Some(Record { generation: 2, holder: "aa".into() }));
        assert_eq!(w.handle(&promote(1), "aa", MS(20)).answer, Answer::Granted { generation: 2 });
        assert_eq!(w.handle(&promote(1), "bb", MS(20)).answer, Answer::Refused(Refusal::Superseded { current: 2 }));
        // The replaced primary may not run on.
        assert_eq!(w.handle(&lease(1), "bb", MS(30)).answer, Answer::Refused(Refusal::Superseded { current: 2 }));
    }

    #[test]
    fn a_running_lease_blocks_promotion_until_it_ends() {
        let mut w = Arbiter::new(None, MS(0), MS(2000));
        assert_eq!(w.handle(&lease(1), "pp", MS(0)).answer, Answer::Leased { generation: 1, for_ms: 2000 });
        assert!(matches!(w.handle(&promote(1), "ss", MS(1999)).answer, Answer::Refused(Refusal::LeaseHeld { generation: 1, left_ms: 1 })));
        assert_eq!(w.handle(&promote(1), "ss", MS(2000)).answer, Answer::Granted { generation: 2 });
    }

    #[test]
    fn a_restarted_witness_grants_nothing_for_a_lease_length() {
        let rec = Record { generation: 3, holder: "ab12".into() };
        assert_eq!(Record::parse(&rec.to_text()), Some(rec.clone()));
        assert_eq!(Record::parse("generation=x holder=pp"), None);
        let mut w = Arbiter::new(Some(rec), MS(100), MS(2000));
        assert!(matches!(w.handle(&promote(3), "ss", MS(500)).answer, Answer::Refused(Refusal::Recovering { .. })));
        assert_eq!(w.handle(&promote(3), "ss", MS(2100)).answer, Answer::Granted { generation: 4 });
        assert!(matches!(w.handle(&Ask::Status { version: V + 1 }, "ss", MS(0)).answer, Answer::Refused(Refusal::Version { .. })));
    }

    #[test]
    fn the_primarys_lease_ends_before_the_witnesss() {
        let mut l = Lease::default();
        assert!(l.renew_due(MS(0)) && !l.valid(MS(0)));
        l.granted(MS(100), 3000);
        assert!(l.valid(MS(2799)) && !l.valid(MS(2800)));
        assert!(!l.renew_due(MS(1099)) && l.renew_due(MS(1100)));
        assert_eq!(l.next_deadline(), Some(MS(1100)));
    }
}
