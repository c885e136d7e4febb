//! The witness's rule under many random schedules in virtual time: asks and answers
//! delayed or lost, the witness restarting from its record, the primary dying. At no
//! moment may the primary release output under its lease while the standby runs as
//! primary; and once the primary is dead and the witness reachable, the standby is
//! promoted.

use std::time::Duration;

use tandem_proto::witness::{Answer, Arbiter, Ask, Lease, Record, Refusal};
use tandem_proto::PROTOCOL_VERSION as V;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Primary,
    Standby,
}

enum InFlight {
    Ask { at: u64, who: Who, ask: Ask, asked: u64 },
    Answer { at: u64, who: Who, answer: Answer, asked: u64 },
}

const LEASE_MS: u64 = 2000;
const RETRY_MS: u64 = 200;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One schedule; returns when the standby was promoted, if it was.
fn run(seed: u64) -> Option<u64> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut witness = Arbiter::new(None, ms(0), ms(LEASE_MS));
    let mut disk: Option<Record> = None;
    let mut flight: Vec<InFlight> = Vec::new();
    let mut lease = Lease::default();
    let mut primary_fenced = false;
    let mut primary_asking = false;
    let mut standby_next = rng.below(500);
    let mut promoted: Option<u64> = None;
    let primary_dies = 1000 + rng.below(8000);
    let loss = rng.below(40);
    let restarts: Vec<u64> = (0..rng.below(3)).map(|_| rng.below(12_000)).collect();
    let end = 20_000;
    for t in 0..end {
        if restarts.contains(&t) {
            witness = Arbiter::new(disk.clone(), ms(t), ms(LEASE_MS));
        }
        let alive = t < primary_dies;
        // The primary asks for (or renews) its lease, one ask at a time.
        if alive && !primary_fenced && !primary_asking && lease.renew_due(ms(t)) {
            primary_asking = true;
            lease.asked(ms(t), ms(RETRY_MS));
            if rng.below(100) >= loss {
                flight.push(InFlight::Ask { at: t + rng.below(300), who: Who::Primary, ask: Ask::Lease { version: V, generation: 1 }, asked: t });
            } else {
                // Lost: the primary retries after RETRY_MS.
                flight.push(InFlight::Answer { at: t + RETRY_MS, who: Who::Primary, answer: Answer::Refused(Refusal::Recovering { since_ms: 0, left_ms: 0 }), asked: t });
            }
        }
        if promoted.is_none() && t >= standby_next {
            standby_next = t + 300;
            if rng.below(100) >= loss {
                flight.push(InFlight::Ask { at: t + rng.below(300), who: Who::Standby, ask: Ask::Promote { version: V, from: 1 }, asked: t });
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) = flight.drain(..).partition(|f| match f {
            InFlight::Ask { at, .. } | InFlight::Answer { at, .. } => *at <= t,
        });
        flight = rest;
        for f in due {
            match f {
                InFlight::Ask { who, ask, asked, .. } => {
                    let holder = if who == Who::Primary { "aa" } else { "bb" };
                    let decision = witness.handle(&ask, holder, ms(t));
                    if let Some(r) = decision.persist {
                        disk = Some(r);
                    }
                    if rng.below(100) >= loss {
                        flight.push(InFlight::Answer { at: t + rng.below(300), who, answer: decision.answer, asked });
                    } else if who == Who::Primary {
                        flight.push(InFlight::Answer { at: t + RETRY_MS, who, answer: Answer::Refused(Refusal::Recovering { since_ms: 0, left_ms: 0 }), asked });
                    }
                }
                InFlight::Answer { who: Who::Primary, answer, asked, .. } => {
                    primary_asking = false;
                    match answer {
                        Answer::Leased { for_ms, .. } => lease.granted(ms(asked), for_ms),
                        Answer::Refused(Refusal::Superseded { .. }) => {
                            primary_fenced = true;
                            lease.drop_lease();
                        }
                        _ => {}
                    }
                }
                InFlight::Answer { who: Who::Standby, answer, .. } => {
                    if let Answer::Granted { generation: 2 } = answer {
                        promoted.get_or_insert(t);
                    }
                }
            }
        }
        let primary_releases = alive && !primary_fenced && lease.valid(ms(t));
        assert!(
            !(primary_releases && promoted.is_some_and(|p| p <= t)),
            "seed {seed}: at {t} ms the primary holds a lease while the standby runs as primary (promoted at {promoted:?})"
        );
    }
    // Liveness, when the witness could hear the standby at all.
    if loss < 20 {
        assert!(promoted.is_some(), "seed {seed}: the primary died at {primary_dies} ms and the standby was never promoted");
    }
    promoted
}

#[test]
fn no_schedule_lets_a_leased_primary_and_a_promoted_standby_run_at_once() {
    let promoted = (1..=400).filter(|&seed| run(seed).is_some()).count();
    assert!(promoted > 300, "only {promoted} of 400 schedules promoted the standby");
}
