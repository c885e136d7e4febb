//! Output a device holds per epoch, for the devices whose output is whole items (a
//! NIC's frames) rather than a byte stream (the console's, in `crate::output`).
//!
//! An item the guest sends during epoch N is held until the standby has acknowledged
//! N, then released in the order the guest sent it. The hold is bounded: an item that
//! would take it past its limit is dropped and counted, as Linux's sch_plug does, which
//! a network can afford (TCP sends again) and a console could not. Unprotected (no
//! standby, and the operator chose to carry on without one), items pass straight
//! through.

use std::collections::VecDeque;

/// What happened to an item given to [`EpochHold::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T> {
    /// Held for its epoch.
    Held,
    /// Unprotected: the caller sends it now.
    Through(T),
    /// The hold was full: the item is gone, and counted.
    Dropped,
}

pub struct EpochHold<T> {
    /// Items not yet released, oldest first, each with its epoch.
    held: VecDeque<(u64, T)>,
    held_bytes: usize,
    limit: usize,
    /// The epoch items given now belong to.
    current: u64,
    unprotected: bool,
    dropped: u64,
}

impl<T: AsRef<[u8]>> EpochHold<T> {
    /// Holds at most `limit` bytes; items from now on belong to `first_epoch`.
    pub fn new(first_epoch: u64, limit: usize) -> Self {
        Self { held: VecDeque::new(), held_bytes: 0, limit, current: first_epoch, unprotected: false, dropped: 0 }
    }

    pub fn push(&mut self, item: T) -> Pushed<T> {
        if self.unprotected {
            return Pushed::Through(item);
        }
        let len = item.as_ref().len();
        if self.held_bytes + len > self.limit {
            self.dropped += 1;
            return Pushed::Dropped;
        }
        self.held_bytes += len;
        self.held.push_back((self.current, item));
        Pushed::Held
    }

    /// Ends epoch `epoch` (while the guest is paused): everything held from it on,
    /// including items of an earlier attempt at it whose capture was dropped, is its;
    /// items from now on belong to the next.
    pub fn seal(&mut self, epoch: u64) {
        for (e, _) in self.held.iter_mut().rev() {
            if *e < epoch {
                break;
            }
            *e = epoch;
        }
        self.current = epoch + 1;
    }

    /// Releases the items of epochs up to and including `epoch`, oldest first.
    pub fn commit(&mut self, epoch: u64) -> Vec<T> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(e, _)| *e <= epoch) {
            if let Some((_, item)) = self.held.pop_front() {
                self.held_bytes -= item.as_ref().len();
                out.push(item);
            }
        }
        out
    }

    /// The items held for epochs `from..=through`, in order: what goes to the standby
    /// with those epochs, for it to release should it take over.
    pub fn items(&self, from: u64, through: u64) -> impl Iterator<Item = &T> {
        self.held.iter().filter(move |(e, _)| (from..=through).contains(e)).map(|(_, item)| item)
    }

    /// Releases everything held, oldest first, and passes items through from now on.
    pub fn unprotect(&mut self) -> Vec<T> {
        self.unprotected = true;
        self.commit(u64::MAX)
    }

    /// Holds items again, as part of `epoch` onwards.
    pub fn protect(&mut self, epoch: u64) {
        self.unprotected = false;
        self.current = epoch;
    }

    /// Whether items are held (protected), rather than passed through.
    pub fn holds(&self) -> bool {
        !self.unprotected
    }

    /// Whether items wait for the next epoch to be cut before they can go.
    pub fn waiting_for_epoch(&self) -> bool {
        self.held.back().is_some_and(|(e, _)| *e >= self.current)
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Items dropped because the hold was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    fn firsts(items: Vec<Vec<u8>>) -> Vec<u8> {
        items.iter().map(|f| f[0]).collect()
    }

    #[test]
    fn items_go_out_in_order_once_their_epoch_is_committed() {
        let mut hold = EpochHold::new(1, 1 << 20);
        assert_eq!(hold.push(frame(1, 60)), Pushed::Held);
        assert_eq!(hold.push(frame(2, 60)), Pushed::Held);
        assert!(hold.waiting_for_epoch());
        hold.seal(1);
        assert!(!hold.waiting_for_epoch());
        hold.push(frame(3, 60));
        hold.seal(2);
        hold.push(frame(4, 60));
        assert_eq!(firsts(hold.items(2, 3).cloned().collect()), [3, 4]);
        assert!(hold.commit(0).is_empty());
        assert_eq!(firsts(hold.commit(1)), [1, 2]);
        assert_eq!(hold.held_bytes(), 120);
        assert_eq!(firsts(hold.commit(2)), [3]);
        // Frame 4 belongs to epoch 3, not yet sealed, let alone acknowledged.
        assert!(hold.commit(2).is_empty());
        hold.seal(3);
        assert_eq!(firsts(hold.commit(3)), [4]);
        assert_eq!(hold.held_bytes(), 0);
    }

    #[test]
    fn an_epoch_sealed_again_takes_what_its_first_attempt_held() {
        let mut hold = EpochHold::new(5, 1 << 20);
        hold.push(frame(1, 10));
        hold.seal(5);
        hold.push(frame(2, 10));
        // Epoch 5's capture was dropped and is taken again: frame 2 joins it.
        hold.seal(5);
        assert_eq!(firsts(hold.items(5, 5).cloned().collect()), [1, 2]);
        assert_eq!(firsts(hold.commit(5)), [1, 2]);
    }

    #[test]
    fn a_full_hold_drops_and_counts_rather_than_grows() {
        let mut hold = EpochHold::new(1, 150);
        assert_eq!(hold.push(frame(1, 100)), Pushed::Held);
        assert_eq!(hold.push(frame(2, 100)), Pushed::Dropped);
        assert_eq!(hold.push(frame(3, 50)), Pushed::Held);
        assert_eq!(hold.dropped(), 1);
        hold.seal(1);
        assert_eq!(firsts(hold.commit(1)), [1, 3]);
        // Released, the room is there again.
        assert_eq!(hold.push(frame(4, 150)), Pushed::Held);
    }

    #[test]
    fn unprotected_items_pass_through_after_what_was_held() {
        let mut hold = EpochHold::new(1, 1 << 20);
        hold.push(frame(1, 10));
        assert_eq!(firsts(hold.unprotect()), [1]);
        assert_eq!(hold.push(frame(2, 10)), Pushed::Through(frame(2, 10)));
        assert!(!hold.waiting_for_epoch());
        hold.protect(9);
        hold.push(frame(3, 10));
        hold.seal(9);
        assert_eq!(firsts(hold.commit(9)), [3]);
    }
}
