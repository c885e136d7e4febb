//! Heartbeats: when to send one, and whether the peer has fallen silent. Any frame from
//! the peer counts as hearing from it. Time is the caller's (a monotonic clock in
//! production, a simulated one in tests).

use std::time::Duration;

use crate::message::Message;

pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_heard: Duration,
    next_beat: Duration,
    seq: u64,
}

impl Liveness {
    /// Starts counting at `now`, as if the peer had just been heard.
    pub fn new(now: Duration, interval: Duration, timeout: Duration) -> Self {
        Self { interval, timeout, last_heard: now, next_beat: now, seq: 0 }
    }

    pub fn heard(&mut self, now: Duration) {
        self.last_heard = self.last_heard.max(now);
    }

    /// A heartbeat to send now, if one is due.
    pub fn due(&mut self, now: Duration) -> Option<Message> {
        if now < self.next_beat {
            return None;
        }
        self.next_beat = now + self.interval;
        self.seq += 1;
        Some(Message::Heartbeat { seq: self.seq })
    }

    /// How long the peer has been silent, once that is past the timeout.
    pub fn silent(&self, now: Duration) -> Option<Duration> {
        let quiet = now.saturating_sub(self.last_heard);
        (quiet > self.timeout).then_some(quiet)
    }

    /// When the caller should look again: the next heartbeat or the timeout.
    pub fn next_deadline(&self) -> Duration {
        self.next_beat.min(self.last_heard + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_on_the_interval_and_notices_silence_after_the_timeout() {
        let ms = Duration::from_millis;
        let mut l = Liveness::new(ms(0), ms(100), ms(500));
        assert!(matches!(l.due(ms(0)), Some(Message::Heartbeat { seq: 1 })));
        assert!(l.due(ms(50)).is_none());
        assert!(matches!(l.due(ms(100)), Some(Message::Heartbeat { seq: 2 })));
        assert_eq!(l.silent(ms(500)), None);
        assert_eq!(l.silent(ms(501)), Some(ms(501)));
        l.heard(ms(450));
        assert_eq!(l.silent(ms(900)), None);
        assert_eq!(l.silent(ms(951)), Some(ms(501)));
        assert_eq!(l.next_deadline(), ms(200));
    }
}
