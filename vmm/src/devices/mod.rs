//! Emulated devices, each behind [`Device`]: where it sits on the port and MMIO buses,
//! what the guest's accesses do, and its own state as a versioned [`Section`] of a
//! snapshot, so that adding a device never changes another's format.
pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod held;
pub mod i8042;
pub mod outputs;
pub mod serial;
pub mod virtio;

use std::ops::Range;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::snapshot::codec;

/// What a device access asks of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    PowerOff,
    Reset,
}

/// One device's state in a snapshot: its bytes, in the layout `version` of the device
/// `id` names. Only the device reads them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub id: String,
    pub version: u16,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {id}: state version {found} is not one this tandem reads (it reads version {reads})")]
    Version { id: String, found: u16, reads: u16 },
    #[error("device {id}: its state does not decode: {why}")]
    Corrupt { id: String, why: String },
    #[error("the snapshot holds no state for device {0}")]
    Missing(String),
    #[error("the snapshot holds state for device {0}, which this VM does not have")]
    Unknown(String),
    #[error("the snapshot holds device {0} twice")]
    Twice(String),
}

/// An emulated device. Accesses carry absolute addresses (a port, a guest-physical
/// address) within the ranges the device claims; the bus sends it nothing else.
pub trait Device: Send {
    /// Names the device's section in snapshots: unique within a VM, and stable.
    fn id(&self) -> &str;

    /// The I/O ports it answers.
    fn ports(&self) -> Vec<Range<u16>> {
        Vec::new()
    }

    /// The guest-physical range it answers.
    fn mmio(&self) -> Option<Range<u64>> {
        None
    }

    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _port: u16, _data: &[u8]) -> Option<GuestRequest> {
        None
    }

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) -> Option<GuestRequest> {
        None
    }

    /// The device's state, for a snapshot; the vCPUs are paused, so no access is in
    /// flight.
    fn save(&self) -> Section;

    /// Sets the device's state from its section, refusing a version it cannot read.
    fn restore(&mut self, section: &Section) -> Result<(), DeviceError>;
}

/// A section holding `state` encoded by the snapshot codec.
pub fn section<T: Serialize>(id: &str, version: u16, state: &T) -> Section {
    // The codec only fails on sizes far beyond any device's registers.
    let bytes = codec::encode(state).expect("a device's state encodes");
    Section { id: id.to_string(), version, bytes }
}

/// The state in `section`, if it is of `version`.
pub fn state_of<T: DeserializeOwned>(section: &Section, version: u16) -> Result<T, DeviceError> {
    if section.version != version {
        return Err(DeviceError::Version { id: section.id.clone(), found: section.version, reads: version });
    }
    codec::decode(&section.bytes).map_err(|e| DeviceError::Corrupt { id: section.id.clone(), why: e.to_string() })
}
