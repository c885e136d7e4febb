//! The two roles and the witness together, in virtual time, under many random
//! schedules of partitions: each of the three links cut and mended at random, the
//! primary dying at a random moment, the witness's asks and answers delayed. At no
//! millisecond may the old primary release output while the promoted standby runs
//! (with a witness under either policy, and without one under `pause`); and a standby
//! whose primary died is promoted once it can reach the witness.

use std::time::Duration;

use tandem_proto::role::primary::{self as p, Mode, Policy, PrimaryRole};
use tandem_proto::role::standby::{self as s, StandbyRole};
use tandem_proto::witness::{Answer, Arbiter, Ask};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const TIMEOUT: u64 = 600;
const LEASE: u64 = 1000;
const END: u64 = 30_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[derive(Clone, Copy, PartialEq)]
enum Host {
    P,
    S,
}

struct Flight {
    at: u64,
    from: Host,
    asked: u64,
    /// `None`: the ask itself, on its way to the witness.
    answer: Option<Answer>,
    ask: Ask,
}

/// Links P-S, P-W, S-W: up or not, as the schedule says at `t`.
struct Links {
    cuts: Vec<(u64, u64, usize)>,
}

impl Links {
    fn up(&self, link: usize, t: u64) -> bool {
        !self.cuts.iter().any(|&(from, to, l)| l == link && from <= t && t < to)
    }
}

/// One schedule; returns whether the standby was promoted, or the moment both sides
/// released output.
fn run(seed: u64, witness: bool, policy: Policy) -> Result<bool, String> {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let links = Links {
        cuts: (0..1 + rng.below(4))
            .map(|_| {
                let from = 1000 + rng.below(15_000);
                (from, from + 200 + rng.below(8000), rng.below(3) as usize)
            })
            .collect(),
    };
    let dies = if rng.below(2) == 0 { Some(2000 + rng.below(15_000)) } else { None };
    let mut arbiter = Arbiter::new(None, ms(0), ms(LEASE));
    let mut primary = PrimaryRole::new(policy, witness, 1, ms(300), ms(TIMEOUT), false);
    let mut standby = StandbyRole::new(1, witness, ms(300));
    standby.handle_following(1);
    standby.handle_committed(true);
    let (mut p_heard, mut s_heard) = (0u64, 0u64);
    let mut s_silence_reported = false;
    // The primary's link has found the standby silent and dropped the connection.
    let mut p_link_down = false;
    let mut p_stopped = false;
    let mut promoted: Option<u64> = None;
    let mut flights: Vec<Flight> = Vec::new();
    for t in 0..END {
        let p_alive = !p_stopped && dies.map_or(true, |d| t < d);
        let ps_up = links.up(0, t);
        if p_alive && ps_up {
            if promoted.is_some() {
                // The promoted standby turns the old primary away.
                p_stopped = true;
            } else {
                p_heard = t;
                s_heard = t;
                if primary.mode() != Mode::Protected || p_link_down {
                    primary.handle_standby_in_sync();
                }
                p_link_down = false;
                if s_silence_reported {
                    standby.handle_committed(true);
                }
            }
        }
        if p_alive && !p_stopped && !p_link_down && t - s_heard > TIMEOUT {
            p_link_down = true;
            primary.handle_link_down(ms(s_heard), ms(t));
        }
        if promoted.is_none() && !s_silence_reported && t - p_heard > TIMEOUT {
            s_silence_reported = true;
            standby.handle_silence(ms(t - p_heard), ms(t));
        }
        if p_alive && !p_stopped {
            primary.handle_timeout(ms(t));
        }
        standby.handle_timeout(ms(t));
        // Deliver what is due: an ask reaches the witness only over a link that is up,
        // and so does its answer.
        let (due, rest): (Vec<_>, Vec<_>) = flights.drain(..).partition(|f| f.at <= t);
        flights = rest;
        for f in due {
            let link = if f.from == Host::P { 1 } else { 2 };
            let answer = match f.answer {
                None if links.up(link, t) => {
                    let decision = arbiter.handle(&f.ask, if f.from == Host::P { "aa" } else { "bb" }, ms(t));
                    flights.push(Flight { at: t + rng.below(40), answer: Some(decision.answer), ..f });
                    continue;
                }
                // Lost on the way: the asker's timeout says so later.
                None => {
                    flights.push(Flight { at: t + 2000, answer: Some(Answer::Status { generation: 0, holder: String::new(), lease: None }), ..f });
                    continue;
                }
                Some(Answer::Status { .. }) => Err("no answer in time".to_string()),
                Some(_) if !links.up(link, t) => Err("the answer was lost".to_string()),
                Some(answer) => Ok(answer),
            };
            match f.from {
                Host::P if p_alive && !p_stopped => primary.handle_witness(answer, ms(f.asked), ms(t)),
                Host::P => {}
                Host::S => standby.handle_witness(answer, ms(t)),
            }
        }
        while let Some(a) = primary.poll() {
            match a {
                p::Action::AskWitness(ask) if witness => flights.push(Flight { at: t + rng.below(40), from: Host::P, asked: t, answer: None, ask }),
                p::Action::Stop(_) => p_stopped = true,
                _ => {}
            }
        }
        while let Some(a) = standby.poll() {
            match a {
                s::Action::AskWitness(ask) => flights.push(Flight { at: t + rng.below(40), from: Host::S, asked: t, answer: None, ask }),
                s::Action::Promote { .. } => {
                    promoted.get_or_insert(t);
                }
                s::Action::Rearm => s_silence_reported = false,
                _ => {}
            }
        }
        // The primary releases output in protected mode only on the standby's acks
        // (a live link, a standby not promoted), and unprotected at will.
        let p_releases = p_alive
            && !p_stopped
            && match primary.mode() {
                Mode::Protected => ps_up && promoted.is_none(),
                Mode::Unprotected => true,
                Mode::Paused => false,
            };
        if p_releases && promoted.is_some() {
            return Err(format!(
                "seed {seed} witness={witness} {policy:?}: at {t} ms the old primary releases output while the standby \
                 promoted at {promoted:?} runs; cuts {:?}, primary dies at {dies:?}",
                links.cuts
            ));
        }
    }
    if witness && promoted.is_none() {
        // Liveness: a primary that died with the standby able to reach the witness for
        // long enough afterwards is replaced.
        if let Some(d) = dies {
            let quiet_from = d + TIMEOUT + LEASE + 1000;
            let reachable = (quiet_from..END).filter(|&t| links.up(2, t)).count() as u64;
            assert!(reachable < 3000, "seed {seed}: the primary died at {d} ms and the standby was never promoted");
        }
    }
    Ok(promoted.is_some())
}

#[test]
fn with_a_witness_no_partition_lets_both_release_and_a_dead_primary_is_replaced() {
    for policy in [Policy::Pause, Policy::Continue] {
        let promoted = (1..=150).map(|seed| run(seed, true, policy).unwrap_or_else(|e| panic!("{e}"))).filter(|p| *p).count();
        assert!(promoted > 40, "{policy:?}: only {promoted} of 150 schedules promoted the standby");
    }
}

#[test]
fn without_a_witness_pause_is_safe_and_continue_is_not() {
    let promoted = (1..=150).map(|seed| run(seed, false, Policy::Pause).unwrap_or_else(|e| panic!("{e}"))).filter(|p| *p).count();
    assert!(promoted > 40, "only {promoted} of 150 schedules promoted the standby");
    // The risk the README states, found by the same simulation.
    let split = (1..=150).filter(|&seed| run(seed, false, Policy::Continue).is_err()).count();
    assert!(split > 10, "only {split} of 150 schedules without a witness under continue released on both sides");
}
