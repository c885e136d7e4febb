//! The primary's line for `tandem ctl status`.

use std::time::Duration;

use tandem_proto::role::primary::Mode;

use super::Protector;
use super::link::LinkState;

impl Protector {
    /// One line for `tandem ctl status`.
    pub fn status(&self) -> String {
        let s = &self.link;
        let standby = match &s.state {
            LinkState::Protecting => "following".to_string(),
            LinkState::Connecting { .. } => match self.role.mode() {
                Mode::Protected => "reconnecting".into(),
                Mode::Paused => "lost(guest-paused)".into(),
                Mode::Unprotected if !self.history.is_empty() && self.full_epoch == 0 => "awaited(UNPROTECTED)".into(),
                Mode::Unprotected => "lost(UNPROTECTED)".into(),
            },
            LinkState::Refused(_) => "refused".into(),
            LinkState::Left => "left".into(),
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut stopped = self.stats.stopped.clone();
        stopped.sort();
        let pct = |p: f64| stopped.get(((stopped.len() as f64 - 1.0) * p).round() as usize).copied().map(ms).unwrap_or(0.0);
        let last = self.stats.stopped.last().copied().map(ms).unwrap_or(0.0);
        let ack = s.ack_latency.last().copied().map(ms).unwrap_or(0.0);
        format!(
            "role=primary generation={} standby={standby} epoch={} acked={} lag={} stopped_ms={last:.3} \
             stopped_p50_ms={:.3} stopped_p99_ms={:.3} dirty_pages={} bytes={} ack_ms={ack:.3} epochs={} \
             total_bytes={} stretched={} unchanged_pages={} held_bytes={}{}{}",
            s.generation(),
            s.next_epoch.saturating_sub(1),
            s.acked.map(|a| a.to_string()).unwrap_or_else(|| "none".into()),
            s.lag(),
            pct(0.5),
            pct(0.99),
            self.stats.last_pages,
            self.stats.last_bytes,
            self.stats.epochs,
            self.stats.bytes,
            self.stats.stretched,
            self.stats.unchanged,
            self.outputs.held_bytes(),
            if self.history.is_empty() { String::new() } else { format!(" history={}", self.history) },
            match self.role.lease_left(self.zero.elapsed()) {
                Some(left) => format!(" witness_lease_ms={}", left.as_millis()),
                None => String::new(),
            },
        )
    }
}
