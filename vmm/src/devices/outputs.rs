//! The output a VM's devices hold per epoch, behind one interface, so replication
//! treats the console, the NICs and whatever device talks to the world next alike:
//! each holds what the guest sends from the moment a standby protects it, seals the
//! epoch at the pause, releases an epoch's output when the standby acknowledges it,
//! and hands what it holds to the standby with the epoch, for the standby to release
//! should it take over.

use std::io;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// What a device holds for some epochs, as it travels to the standby.
#[derive(Debug, PartialEq, Eq)]
pub enum HeldOutput {
    /// Console bytes, and where the first stands in the whole output since the guest
    /// started (a consumer that reconnects resumes from such an offset).
    Console { offset: u64, bytes: Vec<u8> },
    /// Frames of NIC `nic`, in the order the guest sent them.
    Frames { nic: u8, frames: Vec<Vec<u8>> },
}

/// What a commit released.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Released {
    /// Console bytes.
    pub bytes: usize,
    /// Frames.
    pub frames: usize,
    /// How long the oldest output released had waited since its epoch was sealed.
    pub lag: Option<Duration>,
}

impl Released {
    fn add(&mut self, other: Released) {
        self.bytes += other.bytes;
        self.frames += other.frames;
        self.lag = self.lag.max(other.lag);
    }
}

/// A device's output, held per epoch. The calls come from the threads replication runs
/// on: `seal` from the VM's at the pause, `commit` from the link's on an
/// acknowledgement; so each device locks what it needs.
pub trait EpochOutput: Send + Sync {
    /// Holds output from now on, as part of `epoch` onwards.
    fn protect(&self, epoch: u64);
    /// Releases everything held, and passes output through from now on.
    fn unprotect(&self) -> io::Result<()>;
    /// Ends `epoch` (the guest is paused): what was held from it on is its.
    fn seal(&self, epoch: u64);
    /// Releases the output of epochs up to and including `epoch`.
    fn commit(&self, epoch: u64) -> io::Result<Released>;
    /// What is held for epochs `from..=through`.
    fn held(&self, from: u64, through: u64) -> Vec<HeldOutput>;
    /// Whether output waits for the next epoch to be cut before it can go.
    fn waiting_for_epoch(&self) -> bool;
    fn held_bytes(&self) -> usize;
}

/// Every device's output of one VM. Devices join as they are attached (the console
/// before the VM is built, its NICs after); every call goes to all of them.
#[derive(Clone, Default)]
pub struct Outputs(Arc<RwLock<Vec<Arc<dyn EpochOutput>>>>);

impl Outputs {
    pub fn add(&self, output: Arc<dyn EpochOutput>) {
        self.0.write().unwrap_or_else(PoisonError::into_inner).push(output);
    }

    fn each<R>(&self, f: impl FnMut(&Arc<dyn EpochOutput>) -> R) -> Vec<R> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).iter().map(f).collect()
    }

    pub fn protect(&self, epoch: u64) {
        self.each(|o| o.protect(epoch));
    }

    /// Releases what every device holds; the first error is returned once all have
    /// been tried.
    pub fn unprotect(&self) -> io::Result<()> {
        self.each(|o| o.unprotect()).into_iter().collect()
    }

    pub fn seal(&self, epoch: u64) {
        self.each(|o| o.seal(epoch));
    }

    /// Releases epochs up to `epoch` on every device, whichever fails.
    pub fn commit(&self, epoch: u64) -> io::Result<Released> {
        let mut total = Released::default();
        let mut first_error = None;
        for result in self.each(|o| o.commit(epoch)) {
            match result {
                Ok(released) => total.add(released),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(total), Err)
    }

    pub fn held(&self, from: u64, through: u64) -> Vec<HeldOutput> {
        self.each(|o| o.held(from, through)).into_iter().flatten().collect()
    }

    pub fn waiting_for_epoch(&self) -> bool {
        self.each(|o| o.waiting_for_epoch()).contains(&true)
    }

    pub fn held_bytes(&self) -> usize {
        self.each(|o| o.held_bytes()).into_iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::held::{EpochHold, Pushed};
    use crate::output::{EpochGate, HeldConsole, OutputSink};

    /// A device whose output is whole items, as a NIC's is.
    struct Items(Mutex<EpochHold<Vec<u8>>>, Mutex<Vec<Vec<u8>>>);

    impl EpochOutput for Items {
        fn protect(&self, epoch: u64) {
            self.0.lock().unwrap().protect(epoch)
        }
        fn unprotect(&self) -> io::Result<()> {
            let out = self.0.lock().unwrap().unprotect();
            self.1.lock().unwrap().extend(out);
            Ok(())
        }
        fn seal(&self, epoch: u64) {
            self.0.lock().unwrap().seal(epoch)
        }
        fn commit(&self, epoch: u64) -> io::Result<Released> {
            let out = self.0.lock().unwrap().commit(epoch);
            let frames = out.len();
            self.1.lock().unwrap().extend(out);
            Ok(Released { frames, ..Released::default() })
        }
        fn held(&self, from: u64, through: u64) -> Vec<HeldOutput> {
            vec![HeldOutput::Frames { nic: 0, frames: self.0.lock().unwrap().items(from, through).cloned().collect() }]
        }
        fn waiting_for_epoch(&self) -> bool {
            self.0.lock().unwrap().waiting_for_epoch()
        }
        fn held_bytes(&self) -> usize {
            self.0.lock().unwrap().held_bytes()
        }
    }

    #[test]
    fn console_and_frames_are_sealed_carried_and_released_together() {
        let gate = Arc::new(Mutex::new(EpochGate::new(Vec::new(), 1)));
        let items = Arc::new(Items(Mutex::new(EpochHold::new(0, 1 << 20)), Mutex::default()));
        let outputs = Outputs::default();
        outputs.add(Arc::new(HeldConsole(gate.clone())));
        outputs.add(items.clone());
        outputs.protect(1);
        gate.lock().unwrap().emit(b"one\n").unwrap();
        assert_eq!(items.0.lock().unwrap().push(b"frame".to_vec()), Pushed::Held);
        assert!(outputs.waiting_for_epoch());
        outputs.seal(1);
        assert!(!outputs.waiting_for_epoch());
        gate.lock().unwrap().emit(b"two\n").unwrap();
        assert_eq!(
            outputs.held(1, 1),
            [HeldOutput::Console { offset: 0, bytes: b"one\n".to_vec() }, HeldOutput::Frames { nic: 0, frames: vec![b"frame".to_vec()] }]
        );
        assert_eq!(outputs.held_bytes(), 13);
        let released = outputs.commit(1).unwrap();
        assert_eq!((released.bytes, released.frames), (4, 1));
        assert!(released.lag.is_some());
        assert_eq!(items.1.lock().unwrap().len(), 1);
        // "two" belongs to epoch 2, which no one acknowledged: unprotecting releases it.
        outputs.unprotect().unwrap();
        assert_eq!(outputs.held_bytes(), 0);
    }
}
