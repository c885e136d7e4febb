//! A VM's NICs together: each a virtio-net device in its own virtio-mmio window. The
//! virtio event loop waits on every TAP (and every queue's kick) and hands what
//! arrives to the guest, so a frame reaches the guest when it arrives.
//!
//! No NIC touches the guest while the VM is paused: a capture must see the guest's
//! memory and its devices as of one instant, and the operator's pause stops the NIC
//! as it stops the vCPUs. Frames that arrive meanwhile wait in the TAP.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::events::{KickError, Source};
use super::mmio::{MmioTransport, OnBus};
use super::net::{Net, NetStats, CTRL, RX, TX};
use super::slot;
use crate::devices::outputs::{EpochOutput, HeldOutput, Released};
use crate::devices::serial::IrqTrigger;
use crate::devices::{Device, DeviceError};
use crate::kvm::VmHandle;
use crate::memory::GuestMemoryMmap;
use crate::net::tap::{Tap, TapError};
use crate::net::{check_distinct, MacAddr, NetConfig, NetConfigError};

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error(transparent)]
    Config(#[from] NetConfigError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Kick(#[from] KickError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("there is no NIC {0}")]
    NoSuchNic(u8),
    #[error("sending on TAP {0}: {1}")]
    Send(String, std::io::Error),
}

/// The TAP devices of a VM's NICs, opened (and so checked) before the VM is built.
pub struct Taps(Vec<(MacAddr, Tap)>, Option<u64>);

impl Taps {
    pub fn none() -> Self {
        Self(Vec::new(), None)
    }

    /// The NICs hold the guest's frames from the start, as part of `epoch` onwards:
    /// a replicated VM's, so not one frame goes out before a standby holds it.
    pub fn held_from(self, epoch: u64) -> Self {
        Self(self.0, Some(epoch))
    }

    /// `Backends::open` has checked that the NICs and disks fit the VM's slots.
    pub fn open(nics: &[NetConfig]) -> Result<Self, NicError> {
        check_distinct(nics)?;
        let taps = nics.iter().map(|n| Ok((n.mac, Tap::open(&n.tap)?))).collect::<Result<_, NicError>>()?;
        Ok(Self(taps, None))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts each NIC on its window, from virtio slot `first` on; the event loop is to
    /// wait on the sources returned.
    pub(crate) fn attach(self, vm: &VmHandle, mem: &GuestMemoryMmap, first: usize) -> Result<Attached, NicError> {
        let mut nics = Vec::new();
        let mut devices: Vec<Box<dyn Device>> = Vec::new();
        let mut sources = Vec::new();
        for (i, (mac, tap)) in self.0.into_iter().enumerate() {
            let slot = slot(first + i);
            let line = vm.irq_line(slot.gsi);
            let irq = IrqTrigger::new(move || line.pulse().map_err(std::io::Error::other));
            let mut net = Net::new(&format!("net{i}"), mac, tap);
            if let Some(epoch) = self.1 {
                net.protect(epoch);
            }
            let fd = net.tap().as_raw_fd();
            let nic: Nic = Arc::new(Mutex::new(MmioTransport::new(net, slot.base, irq, mem.clone())?));
            sources.push(Source::readable(nic.clone(), RX, fd));
            for queue in [RX, TX, CTRL] {
                sources.push(Source::kick(vm, nic.clone(), slot.base, queue)?);
            }
            devices.push(Box::new(OnBus::new(&slot, nic.clone())));
            nics.push(nic);
        }
        Ok((Nics { nics: Arc::from(nics) }, devices, sources))
    }
}

type Nic = Arc<Mutex<MmioTransport<Net>>>;
/// The NICs, their devices for the bus, and what the event loop waits on for them.
type Attached = (Nics, Vec<Box<dyn Device>>, Vec<Source>);

fn lock(nic: &Nic) -> MutexGuard<'_, MmioTransport<Net>> {
    nic.lock().unwrap_or_else(|e| e.into_inner())
}

/// The attached NICs.
pub struct Nics {
    nics: Arc<[Nic]>,
}

impl Nics {
    /// Stops handing frames to the guest; returns once no frame is being handed.
    pub fn pause(&self) {
        for nic in self.nics.iter() {
            lock(nic).device_mut().set_paused(true);
        }
    }

    /// Hands the guest what arrived while paused, and what arrives from now on, and
    /// takes what it queued meanwhile: a kick that came as the VM paused was put off,
    /// and one a restored VM's guest gave its old host never reached this one.
    pub fn resume(&self) {
        for nic in self.nics.iter() {
            let mut nic = lock(nic);
            nic.device_mut().set_paused(false);
            for queue in [TX, CTRL, RX] {
                nic.process_queue(queue);
            }
        }
    }

    /// After a takeover: has each NIC's driver announce the guest's addresses, and
    /// looks at every queue, as the guest may have queued buffers the dead host never
    /// took.
    pub fn announce(&self) {
        for nic in self.nics.iter() {
            let mut nic = lock(nic);
            nic.device_mut().announce();
            nic.config_changed();
            nic.process_queue(TX);
            nic.process_queue(RX);
        }
    }

    pub fn stats(&self) -> Vec<NetStats> {
        self.nics.iter().map(|nic| lock(nic).device().stats()).collect()
    }

    /// Each NIC's held frames, for replication.
    pub fn outputs(&self) -> Vec<Arc<dyn EpochOutput>> {
        self.nics.iter().enumerate().map(|(i, nic)| Arc::new(HeldFrames { index: i as u8, nic: nic.clone() }) as Arc<dyn EpochOutput>).collect()
    }
}

/// The frames one NIC holds per epoch.
struct HeldFrames {
    index: u8,
    nic: Nic,
}

impl EpochOutput for HeldFrames {
    fn protect(&self, epoch: u64) {
        lock(&self.nic).device_mut().protect(epoch)
    }

    fn unprotect(&self) -> std::io::Result<()> {
        lock(&self.nic).device_mut().unprotect();
        Ok(())
    }

    fn seal(&self, epoch: u64) {
        lock(&self.nic).device_mut().seal(epoch)
    }

    /// A frame the TAP refuses is lost as a wire would lose it (see `Net::send`),
    /// so a commit never fails.
    fn commit(&self, epoch: u64) -> std::io::Result<Released> {
        let frames = lock(&self.nic).device_mut().commit(epoch);
        Ok(Released { frames, ..Released::default() })
    }

    fn held(&self, from: u64, through: u64) -> Vec<HeldOutput> {
        let frames = lock(&self.nic).device().held(from, through);
        if frames.is_empty() {
            return Vec::new();
        }
        vec![HeldOutput::Frames { nic: self.index, frames }]
    }

    fn waiting_for_epoch(&self) -> bool {
        lock(&self.nic).device().waiting_for_epoch()
    }

    fn held_bytes(&self) -> usize {
        lock(&self.nic).device().stats().held_bytes as usize
    }
}

impl Taps {
    /// Sends `frame` (led by its virtio-net header) on NIC `nic`'s TAP before the VM
    /// runs: a standby taking over sends the frames the primary may not have.
    pub fn send(&self, nic: u8, frame: &[u8]) -> Result<(), NicError> {
        let (_, tap) = self.0.get(usize::from(nic)).ok_or(NicError::NoSuchNic(nic))?;
        tap.send(frame).map(drop).map_err(|e| NicError::Send(tap.name().to_string(), e))
    }

    /// Tells the network that each NIC's MAC is behind this host's TAP now: a RARP
    /// broadcast from the MAC, as QEMU announces a migrated guest, which switches and
    /// bridges learn the new port from.
    pub fn announce(&self) {
        for (mac, tap) in &self.0 {
            if let Err(e) = tap.send(&rarp(*mac)) {
                tracing::warn!("announcing {mac} on {}: {e}", tap.name());
            }
        }
    }
}

/// A RARP request ("who has this MAC?") broadcast from `mac`, led by an empty
/// virtio-net header and padded to Ethernet's 60-byte minimum.
fn rarp(mac: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; crate::net::tap::VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, op 3 (reverse request).
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]);
    for _ in 0..2 {
        f.extend_from_slice(&mac.0);
        f.extend_from_slice(&[0; 4]);
    }
    f.resize(crate::net::tap::VNET_HDR_LEN + 60, 0);
    f
}
