//! What a VM's virtio devices stand on in the host: the TAPs of its NICs and the
//! image files of its disks, opened (and so checked, and the images locked) before
//! KVM is touched, so every bad one is one line and no guest has run. Attaching them
//! puts each device in its window (NICs first, disks after) and starts the one thread
//! that serves them all.

use std::sync::Arc;

use super::block::Block;
use super::disks::Disks;
use super::events::{EventLoop, KickError, Source};
use super::mmio::{MmioTransport, OnBus};
use super::nics::{NicError, Nics, Taps};
use super::slot;
use crate::boot::aml::MmioSlot;
use crate::boot::layout::VIRTIO_SLOTS;
use crate::devices::serial::IrqTrigger;
use crate::devices::{Device, DeviceError};
use crate::disk::{check_distinct, DiskConfig, DiskError, DiskImage, DiskSet};
use crate::kvm::VmHandle;
use crate::memory::GuestMemoryMmap;
use crate::net::NetConfig;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Nic(#[from] NicError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{nics} NICs and {disks} disks asked for; a VM has room for {VIRTIO_SLOTS} virtio devices")]
    TooMany { nics: usize, disks: usize },
    #[error(transparent)]
    Kick(#[from] KickError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

pub struct Backends {
    pub taps: Taps,
    pub disks: DiskSet,
}

impl Backends {
    pub fn none() -> Self {
        Self { taps: Taps::none(), disks: DiskSet::default() }
    }

    pub fn open(nets: &[NetConfig], disks: &[DiskConfig]) -> Result<Self, BackendError> {
        if nets.len() + disks.len() > VIRTIO_SLOTS {
            return Err(BackendError::TooMany { nics: nets.len(), disks: disks.len() });
        }
        check_distinct(disks)?;
        let taps = Taps::open(nets)?;
        let disks = disks.iter().map(|d| DiskImage::open(d).map(Arc::new)).collect::<Result<_, _>>()?;
        Ok(Self { taps, disks: DiskSet(disks) })
    }

    /// The NICs hold the guest's frames from `epoch` on (see [`Taps::held_from`]).
    pub fn held_from(self, epoch: u64) -> Self {
        Self { taps: self.taps.held_from(epoch), ..self }
    }

    /// The windows the guest must be told of, in the DSDT.
    pub fn slots(&self) -> Vec<MmioSlot> {
        (0..self.taps.len() + self.disks.0.len()).map(slot).collect()
    }

    pub(crate) fn attach(self, vm: &VmHandle, mem: &GuestMemoryMmap) -> Result<(Attached, Vec<Box<dyn Device>>), BackendError> {
        let first_disk = self.taps.len();
        let (nics, mut devices, mut sources) = self.taps.attach(vm, mem, 0)?;
        let mut disks = Vec::new();
        for (i, image) in self.disks.0.into_iter().enumerate() {
            let slot = slot(first_disk + i);
            let line = vm.irq_line(slot.gsi);
            let irq = IrqTrigger::new(move || line.pulse().map_err(std::io::Error::other));
            let disk = Arc::new(std::sync::Mutex::new(MmioTransport::new(Block::new(&format!("blk{i}"), image), slot.base, irq, mem.clone())?));
            sources.push(Source::kick(vm, disk.clone(), slot.base, 0)?);
            devices.push(Box::new(OnBus::new(&slot, disk.clone())));
            disks.push(disk);
        }
        // Paused until the caller has set their state and says so (`Attached::resume`):
        // the event loop starts now, and a frame already waiting on a TAP must not reach
        // a device still to be restored, nor a VM that is to stay paused.
        let attached = Attached { nics, disks: Disks(disks), _events: None };
        attached.pause();
        let events = if sources.is_empty() { None } else { Some(EventLoop::start(sources)?) };
        Ok((Attached { _events: events, ..attached }, devices))
    }
}

/// The attached devices, and the thread that serves them (stopped when this drops).
pub struct Attached {
    pub nics: Nics,
    pub disks: Disks,
    _events: Option<EventLoop>,
}

impl Attached {
    pub fn pause(&self) {
        self.nics.pause();
        self.disks.pause();
    }

    pub fn resume(&self) {
        self.disks.resume();
        self.nics.resume();
    }
}
