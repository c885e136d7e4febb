//! Virtio devices and their transport.
//!
//! The transport is virtio-mmio (version 2, "modern"), each device a 4 KiB register
//! window and one interrupt line, declared to the guest in the ACPI DSDT as
//! `LNRO0005` (as Firecracker and QEMU's microvm do). Not virtio-pci: tandem has no PCI
//! bus, and emulating one (config space, BARs, MSI-X) would be more device state to
//! save, restore and replicate for what a NIC and a disk need; one interrupt line per
//! device is enough for them.

pub mod backends;
pub mod block;
pub mod disks;
pub(crate) mod events;
pub mod mmio;
pub mod net;
pub mod nics;

use virtio_queue::Queue;

use super::{DeviceError, Section};
use crate::boot::aml::MmioSlot;
use crate::boot::layout::{VIRTIO_GSI_START, VIRTIO_MMIO_START};
use crate::memory::GuestMemoryMmap;

/// Virtio slot `i`: its register window and interrupt line. NICs take the first
/// slots, disks the next.
pub(crate) fn slot(i: usize) -> MmioSlot {
    MmioSlot { base: VIRTIO_MMIO_START + i as u64 * mmio::WINDOW, len: mmio::WINDOW, gsi: VIRTIO_GSI_START + i as u32 }
}

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x, which the mmio transport's
/// version 2 requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a virtio device gives its transport; the transport owns the queues and the
/// registers, the device what is behind them.
pub trait VirtioDevice: Send {
    /// Names the device in snapshots (`net0`, say).
    fn id(&self) -> &str;
    /// The virtio device type (1 network card, 2 block device).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver has set the device up (DRIVER_OK) with `features`.
    fn activate(&mut self, features: u64);
    /// Buffers may be waiting on queue `index`; returns whether any were used (and so
    /// the driver should be interrupted).
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// Back to as it was before the driver found it.
    fn reset(&mut self);
    /// The device's own state (not the transport's), for a snapshot.
    fn save(&self) -> Section;
    fn restore(&mut self, section: &Section) -> Result<(), DeviceError>;
}
