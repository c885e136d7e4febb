//! The VM thread's view of its link to the standby, kept from what the link thread
//! tells it ([`LinkEvent`]s, in order). Nothing here is shared: the protocol machine
//! is the link thread's, and this side numbers and encodes the epochs it hands over.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tandem_proto::primary::{Ticket, Tickets};

use crate::transport::primary::LinkEvent;

/// How the link stands, as the VM thread sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling, or dialling again after `why`.
    Connecting { why: Option<String> },
    /// The standby follows.
    Protecting,
    /// The standby turned this primary down; nothing will change that.
    Refused(String),
    /// The goodbye went out and the standby closed the connection.
    Left,
}

pub struct LinkView {
    events: Receiver<LinkEvent>,
    pub state: LinkState,
    /// Bumped at each new standby connection: what a standby holds is known only for
    /// the connection it was learnt on.
    pub conn: u64,
    /// The standby needs a full epoch before any delta.
    pub need_full: bool,
    /// When the standby was last heard from, as of the last loss of the link.
    pub heard: Instant,
    /// Epochs handed to the link and not yet acknowledged, with when each was handed.
    unacked: VecDeque<(u64, Instant)>,
    pub acked: Option<u64>,
    /// The latest ack latencies, newest last.
    pub ack_latency: Vec<Duration>,
    /// Most epochs unacknowledged before the next waits (back-pressure).
    window: usize,
    /// The number the next epoch gets.
    pub next_epoch: u64,
    tickets: Tickets,
}

impl LinkView {
    pub fn new(events: Receiver<LinkEvent>, tickets: Tickets, window: usize) -> Self {
        Self {
            events,
            state: LinkState::Connecting { why: None },
            conn: 0,
            need_full: true,
            heard: Instant::now(),
            unacked: VecDeque::new(),
            acked: None,
            ack_latency: Vec::new(),
            window: window.max(1),
            next_epoch: 1,
            tickets,
        }
    }

    pub fn generation(&self) -> u64 {
        self.tickets.generation()
    }

    /// Takes in whatever the link thread has told since.
    pub fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.apply(event);
        }
    }

    /// Waits, at most `limit`, while `waiting` holds for the link's state; returns the
    /// state it found last. Woken by each event of the link thread, not by polling.
    pub fn wait_while(&mut self, limit: Duration, mut waiting: impl FnMut(&LinkState) -> bool) -> LinkState {
        let deadline = Instant::now() + limit;
        self.drain();
        while waiting(&self.state) {
            match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(event) => self.apply(event),
                Err(RecvTimeoutError::Timeout) => break,
                // The link thread has stopped: nothing will change any more.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.state.clone()
    }

    fn apply(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Following { full_sync } => {
                self.conn += 1;
                self.state = LinkState::Protecting;
                self.heard = Instant::now();
                if full_sync {
                    self.need_full = true;
                    self.unacked.clear();
                }
            }
            LinkEvent::Released(epoch) => {
                let now = Instant::now();
                while let Some(&(number, at)) = self.unacked.front() {
                    if number > epoch {
                        break;
                    }
                    self.unacked.pop_front();
                    self.ack_latency.push(now - at);
                }
                let excess = self.ack_latency.len().saturating_sub(256);
                self.ack_latency.drain(..excess);
                self.acked = Some(epoch);
            }
            LinkEvent::Down { why, heard } => {
                self.state = LinkState::Connecting { why: Some(why) };
                self.heard = heard;
            }
            LinkEvent::Refused(why) => self.state = LinkState::Refused(why),
            LinkEvent::Left => self.state = LinkState::Left,
        }
    }

    /// Whether another epoch may go now, or the guest must wait for acks.
    pub fn can_send(&self) -> bool {
        self.state == LinkState::Protecting && self.unacked.len() < self.window
    }

    /// Epochs handed over and not yet acknowledged.
    pub fn lag(&self) -> usize {
        self.unacked.len()
    }

    /// The encoding of the next epoch.
    pub fn ticket(&self) -> Ticket {
        self.tickets.ticket(self.next_epoch)
    }

    /// The next epoch goes to the link thread; a full one makes every earlier one moot.
    pub fn handed(&mut self, full: bool) {
        if full {
            self.unacked.clear();
            self.need_full = false;
        }
        self.unacked.push_back((self.next_epoch, Instant::now()));
        self.next_epoch += 1;
    }
}
