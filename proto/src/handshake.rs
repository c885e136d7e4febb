//! The first message each way. A standby accepts a primary only if it speaks the same
//! protocol version, runs the same VM configuration, and is not of an older generation
//! than the standby has seen: a promoted standby has raised the generation, so the old
//! primary it replaced is refused on every frame.

use serde::{Deserialize, Serialize};

use crate::message::{Frame, Message, Role, PROTOCOL_VERSION};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the peer speaks protocol version {theirs}, this tandem speaks {ours}")]
    Version { theirs: u16, ours: u16 },
    #[error("the peer runs a differently configured VM (fingerprint {theirs:#x}, here {ours:#x})")]
    Fingerprint { theirs: u64, ours: u64 },
    #[error("the peer's generation {theirs} is older than {ours}: a promoted standby has replaced it")]
    StaleGeneration { theirs: u64, ours: u64 },
    #[error("the peer is a {theirs:?}, but a {wanted:?} was expected")]
    Role { theirs: Role, wanted: Role },
    #[error("the peer did not begin with a hello")]
    NoHello,
}

/// Who this side is.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub role: Role,
    pub fingerprint: u64,
    pub generation: u64,
}

impl Identity {
    pub fn hello(&self) -> Frame {
        Frame {
            generation: self.generation,
            message: Message::Hello {
                version: PROTOCOL_VERSION,
                role: self.role,
                fingerprint: self.fingerprint,
            },
        }
    }

    /// Judges the peer's first frame. On success returns the generation the two now
    /// share: the newer of the two (a standby adopts a newer primary's generation).
    pub fn judge(&self, first: &Frame) -> Result<u64, Refusal> {
        let Message::Hello { version, role, fingerprint } = first.message else {
            return Err(Refusal::NoHello);
        };
        if version != PROTOCOL_VERSION {
            return Err(Refusal::Version { theirs: version, ours: PROTOCOL_VERSION });
        }
        let wanted = match self.role {
            Role::Primary => Role::Standby,
            Role::Standby => Role::Primary,
        };
        if role != wanted {
            return Err(Refusal::Role { theirs: role, wanted });
        }
        if fingerprint != self.fingerprint {
            return Err(Refusal::Fingerprint { theirs: fingerprint, ours: self.fingerprint });
        }
        // A primary must never carry on under a standby that has been promoted past
        // it, and a standby never follows a primary older than one it followed.
        let stale = match self.role {
            Role::Standby => first.generation < self.generation,
            Role::Primary => first.generation > self.generation,
        };
        if stale {
            let (theirs, ours) = match self.role {
                Role::Standby => (first.generation, self.generation),
                Role::Primary => (self.generation, first.generation),
            };
            return Err(Refusal::StaleGeneration { theirs, ours });
        }
        Ok(self.generation.max(first.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: Identity = Identity { role: Role::Primary, fingerprint: 7, generation: 5 };
    const STANDBY: Identity = Identity { role: Role::Standby, fingerprint: 7, generation: 5 };

    #[test]
    fn matching_peers_agree_on_the_newer_generation() {
        assert_eq!(STANDBY.judge(&PRIMARY.hello()), Ok(5));
        assert_eq!(PRIMARY.judge(&STANDBY.hello()), Ok(5));
        let fresh_standby = Identity { generation: 1, ..STANDBY };
        assert_eq!(fresh_standby.judge(&PRIMARY.hello()), Ok(5));
        assert_eq!(PRIMARY.judge(&fresh_standby.hello()), Ok(5));
    }

    #[test]
    fn each_mismatch_is_refused_by_name() {
        let mut hello = PRIMARY.hello();
        if let Message::Hello { version, .. } = &mut hello.message {
            *version = 99;
        }
        assert_eq!(STANDBY.judge(&hello), Err(Refusal::Version { theirs: 99, ours: PROTOCOL_VERSION }));
        let other_vm = Identity { fingerprint: 8, ..PRIMARY };
        assert_eq!(STANDBY.judge(&other_vm.hello()), Err(Refusal::Fingerprint { theirs: 8, ours: 7 }));
        assert_eq!(STANDBY.judge(&STANDBY.hello()), Err(Refusal::Role { theirs: Role::Standby, wanted: Role::Primary }));
        let beat = Frame { generation: 5, message: Message::Heartbeat { seq: 1 } };
        assert_eq!(STANDBY.judge(&beat), Err(Refusal::NoHello));
    }

    #[test]
    fn a_replaced_primary_is_refused_both_ways() {
        let promoted = Identity { role: Role::Standby, generation: 6, ..STANDBY };
        assert_eq!(promoted.judge(&PRIMARY.hello()), Err(Refusal::StaleGeneration { theirs: 5, ours: 6 }));
        assert_eq!(PRIMARY.judge(&promoted.hello()), Err(Refusal::StaleGeneration { theirs: 5, ours: 6 }));
        assert!(Refusal::StaleGeneration { theirs: 5, ours: 6 }.to_string().contains("promoted standby"));
    }
}
