//! A primary's lease from the witness: asked for when the standby is lost under
//! `--on-standby-loss continue`, renewed while the guest runs unprotected, and the
//! only thing that lets it run so (see [`tandem_proto::witness`]).

use std::time::{Duration, Instant};

use tandem_proto::witness::{Answer, Ask, Lease, Refusal};

use crate::witness::{WitnessClient, WitnessLink, WitnessError};

/// What changed at a [`LeaseKeeper::poll`].
#[derive(Debug, PartialEq, Eq)]
pub enum News {
    /// A lease is held now where none was.
    Granted { for_ms: u64 },
    /// The witness said no, or could not be asked: `why`, once per distinct reason.
    Trouble(String),
    /// The witness granted `current` to another host: this primary has been replaced.
    Superseded { current: u64 },
}

pub struct LeaseKeeper {
    client: WitnessClient,
    lease: Lease,
    zero: Instant,
    generation: u64,
    /// Between asks that got no lease.
    retry: Duration,
    /// Asking: the standby is lost and the policy is to run on.
    active: bool,
    trouble: String,
}

impl LeaseKeeper {
    pub fn start(link: WitnessLink, generation: u64, retry: Duration) -> Result<Self, WitnessError> {
        Ok(Self {
            client: WitnessClient::start(link)?,
            lease: Lease::default(),
            zero: Instant::now(),
            generation,
            retry,
            active: false,
            trouble: String::new(),
        })
    }

    fn now(&self) -> Duration {
        self.zero.elapsed()
    }

    /// The standby is lost: ask for a lease from now on.
    pub fn begin(&mut self) {
        self.active = true;
    }

    /// A standby follows again: no lease is needed, and none is asked for.
    pub fn end(&mut self) {
        self.active = false;
        self.lease.drop_lease();
        self.trouble.clear();
    }

    pub fn valid(&self) -> bool {
        self.lease.valid(self.now())
    }

    pub fn left(&self) -> Option<Duration> {
        self.lease.left(self.now())
    }

    /// Reads the witness's answer, if one came, and asks again if a renewal (or a
    /// retry) is due.
    pub fn poll(&mut self) -> Option<News> {
        let mut news = None;
        if let Some(reply) = self.client.reply() {
            if !self.active {
                return None;
            }
            let had = self.valid();
            match reply.answer {
                Ok(Answer::Leased { generation, for_ms }) if generation == self.generation => {
                    self.lease.granted(reply.asked.saturating_duration_since(self.zero), for_ms);
                    self.trouble.clear();
                    if !had && self.valid() {
                        news = Some(News::Granted { for_ms });
                    }
                }
                Ok(Answer::Refused(Refusal::Superseded { current })) => return Some(News::Superseded { current }),
                other => {
                    let why = match other {
                        Ok(Answer::Refused(r)) => format!("the witness refused the lease: {r}"),
                        Ok(a) => format!("the witness answered {a:?} to a lease"),
                        Err(e) => format!("the witness at {} could not be asked ({e})", self.client.addr()),
                    };
                    if why != self.trouble {
                        self.trouble = why.clone();
                        news = Some(News::Trouble(why));
                    }
                }
            }
        }
        let now = self.now();
        if self.active && !self.client.busy() && self.lease.renew_due(now) {
            self.lease.asked(now, self.retry);
            self.client.ask(Ask::Lease { version: tandem_proto::PROTOCOL_VERSION, generation: self.generation });
        }
        news
    }
}
