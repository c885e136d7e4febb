//! Whether the peer has fallen silent: the rule both sides' links judge by, with the
//! time passed in (a monotonic clock's reading as a [`Duration`] in production, a
//! simulated one in tests). Any frame from the peer counts as hearing from it, and so
//! does any packet at all: a peer whose frames wait behind a long epoch still
//! acknowledges what it receives, so its host and process live. And a check that
//! runs late says this host stalled (an overloaded or emulated machine): the frames
//! that waited meanwhile have not been read, so the peer's silence is not yet
//! evidence, and it is judged one heartbeat interval later.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    heard: Duration,
    /// Packets the transport had received at the last check.
    packets: u64,
    /// Set by a late check: no verdict of silence before this.
    grace: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// Silent this long, past the timeout.
    Silent(Duration),
}

impl Liveness {
    /// Counts from `now`, as if the peer had just been heard. `interval` is the
    /// heartbeat interval: a check later than that past its due time ran on a stalled
    /// host.
    pub fn new(now: Duration, interval: Duration, timeout: Duration) -> Self {
        Self { interval, timeout, heard: now, packets: 0, grace: None }
    }

    /// A new connection to the peer is open (which is hearing from it); its packets
    /// count from zero.
    pub fn opened(&mut self, now: Duration) {
        self.packets = 0;
        self.heard(now);
    }

    /// A frame (a heartbeat, or anything else) came from the peer.
    pub fn heard(&mut self, now: Duration) {
        self.heard = self.heard.max(now);
        self.grace = None;
    }

    /// When the peer was last heard.
    pub fn heard_at(&self) -> Duration {
        self.heard
    }

    /// When to check next: the timeout, or the end of a stall's grace.
    pub fn deadline(&self) -> Duration {
        (self.heard + self.timeout).max(self.grace.unwrap_or_default())
    }

    /// Judges the peer at `now`, in a check that was due at `due`; `packets_in` is the
    /// count of packets the transport has received from the peer on this connection,
    /// of any kind: more than at the last check is hearing from it now.
    pub fn check(&mut self, due: Duration, now: Duration, packets_in: u64) -> Verdict {
        if packets_in > self.packets {
            self.packets = packets_in;
            self.heard(now);
            return Verdict::Alive;
        }
        let quiet = now.saturating_sub(self.heard);
        if quiet <= self.timeout {
            return Verdict::Alive;
        }
        match self.grace {
            None if now.saturating_sub(due) > self.interval => {
                self.grace = Some(now + self.interval);
                Verdict::Alive
            }
            Some(until) if now < until => Verdict::Alive,
            _ => Verdict::Silent(quiet),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn silence_past_the_timeout_is_a_verdict() {
        let mut l = Liveness::new(MS(0), MS(100), MS(500));
        assert_eq!(l.deadline(), MS(500));
        assert_eq!(l.check(MS(500), MS(500), 0), Verdict::Alive);
        assert_eq!(l.check(MS(501), MS(501), 0), Verdict::Silent(MS(501)));
        l.heard(MS(450));
        assert_eq!(l.deadline(), MS(950));
        assert_eq!(l.check(MS(900), MS(900), 0), Verdict::Alive);
        assert_eq!(l.check(MS(951), MS(951), 0), Verdict::Silent(MS(501)));
    }

    #[test]
    fn any_packet_counts_as_hearing_the_peer() {
        let mut l = Liveness::new(MS(0), MS(100), MS(500));
        assert_eq!(l.check(MS(600), MS(600), 3), Verdict::Alive);
        assert_eq!(l.heard_at(), MS(600));
        assert_eq!(l.check(MS(1101), MS(1101), 3), Verdict::Silent(MS(501)));
    }

    #[test]
    fn a_late_check_gives_the_peer_one_more_interval() {
        let mut l = Liveness::new(MS(0), MS(100), MS(500));
        // Due at 500 ms, run at 3 s: this host stalled.
        assert_eq!(l.check(MS(500), MS(3000), 0), Verdict::Alive);
        assert_eq!(l.deadline(), MS(3100));
        assert_eq!(l.check(MS(3100), MS(3050), 0), Verdict::Alive);
        // The frames that waited are read: the peer lives.
        l.heard(MS(3060));
        assert_eq!(l.check(MS(3560), MS(3560), 0), Verdict::Alive);
        // Or they never come: silent, one interval later, however late this check.
        let mut l = Liveness::new(MS(0), MS(100), MS(500));
        assert_eq!(l.check(MS(500), MS(3000), 0), Verdict::Alive);
        assert_eq!(l.check(MS(3100), MS(3400), 0), Verdict::Silent(MS(3400)));
    }
}
