//! Dispatch of port I/O and MMIO to the devices, and their state as snapshot sections.

use std::ops::Range;

use super::acpi_pm::AcpiPm;
use super::cmos::Cmos;
use super::i8042::I8042;
use super::serial::SerialPort;
use super::{Device, DeviceError, Section};

pub use super::GuestRequest;

/// The VM's devices. The console is held by name, for the host's input; every device,
/// the console included, is reached through [`Device`].
pub struct DeviceBus {
    serial: SerialPort,
    others: Vec<Box<dyn Device>>,
    /// Which device answers which ports (0 the console, then `others` in order): built
    /// once, as every console byte is a port access.
    ports: Vec<(Range<u16>, usize)>,
}

impl DeviceBus {
    /// The devices every VM has: the console on COM1, the i8042 (for reset), the ACPI
    /// PM1a registers (for power-off) and the CMOS ports.
    pub fn new(serial: SerialPort) -> Self {
        let mut bus = Self { serial, others: Vec::new(), ports: Vec::new() };
        bus.index(0);
        for device in [Box::new(I8042::default()) as Box<dyn Device>, Box::new(AcpiPm::new()), Box::new(Cmos)] {
            bus.push(device);
        }
        bus
    }

    fn push(&mut self, device: Box<dyn Device>) {
        self.others.push(device);
        self.index(self.others.len());
    }

    /// Records the ports of device `i`.
    fn index(&mut self, i: usize) {
        let ranges = self.device_mut(i).ports();
        self.ports.extend(ranges.into_iter().map(|r| (r, i)));
    }

    fn device_mut(&mut self, i: usize) -> &mut dyn Device {
        match i {
            0 => &mut self.serial,
            i => self.others[i - 1].as_mut(),
        }
    }

    fn at_port(&mut self, port: u16) -> Option<&mut dyn Device> {
        let i = self.ports.iter().find(|(r, _)| r.contains(&port))?.1;
        Some(self.device_mut(i))
    }

    /// Adds a device; its id must be new to the bus.
    pub fn add(&mut self, device: Box<dyn Device>) -> Result<(), DeviceError> {
        if self.devices().any(|d| d.id() == device.id()) {
            return Err(DeviceError::Twice(device.id().to_string()));
        }
        self.push(device);
        Ok(())
    }

    fn devices(&self) -> impl Iterator<Item = &dyn Device> {
        std::iter::once(&self.serial as &dyn Device).chain(self.others.iter().map(|d| d.as_ref()))
    }

    fn devices_mut(&mut self) -> impl Iterator<Item = &mut dyn Device> {
        std::iter::once(&mut self.serial as &mut dyn Device).chain(self.others.iter_mut().map(|d| d.as_mut() as &mut dyn Device))
    }

    /// Feeds host input to the guest's console; returns how many bytes fit.
    pub fn console_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_input(bytes)
    }

    /// Every device's section, for a snapshot; the vCPUs must be paused so no access is
    /// in flight.
    pub fn save(&self) -> Vec<Section> {
        self.devices().map(Device::save).collect()
    }

    /// Restores every device from its section. Each device must have exactly one, and
    /// every section a device: a snapshot of another machine is refused, not half used.
    pub fn restore(&mut self, sections: &[Section]) -> Result<(), DeviceError> {
        for (i, s) in sections.iter().enumerate() {
            if sections[..i].iter().any(|earlier| earlier.id == s.id) {
                return Err(DeviceError::Twice(s.id.clone()));
            }
            if !self.devices().any(|d| d.id() == s.id) {
                return Err(DeviceError::Unknown(s.id.clone()));
            }
        }
        for device in self.devices_mut() {
            let section = sections.iter().find(|s| s.id == device.id()).ok_or_else(|| DeviceError::Missing(device.id().to_string()))?;
            device.restore(section)?;
        }
        Ok(())
    }

    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match self.at_port(port) {
            Some(d) => d.pio_read(port, data),
            // Nothing there: an ISA/PCI bus with no device reads all ones.
            None => data.fill(0xff),
        }
    }

    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        self.at_port(port)?.pio_write(port, data)
    }

    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.devices_mut().find(|d| d.mmio().is_some_and(|r| r.contains(&addr))) {
            Some(d) => d.mmio_read(addr, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Option<GuestRequest> {
        self.devices_mut().find(|d| d.mmio().is_some_and(|r| r.contains(&addr)))?.mmio_write(addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::ACPI_PM1A_EVT_PORT;
    use crate::devices::serial::{IrqTrigger, COM1_PORT};
    use crate::output::{Passthrough, SharedSink};
    use std::ops::Range;
    use std::sync::{Arc, Mutex};

    fn bus() -> DeviceBus {
        let sink: SharedSink = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
        DeviceBus::new(SerialPort::new(IrqTrigger::new(|| Ok(())), sink))
    }

    /// A register at an MMIO address, as a NIC's would be.
    struct Reg {
        value: u8,
    }

    impl Device for Reg {
        fn id(&self) -> &str {
            "reg"
        }
        fn mmio(&self) -> Option<Range<u64>> {
            Some(0xd000_0000..0xd000_1000)
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn mmio_write(&mut self, _addr: u64, data: &[u8]) -> Option<GuestRequest> {
            self.value = data[0];
            None
        }
        fn save(&self) -> Section {
            crate::devices::section("reg", 7, &self.value)
        }
        fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
            self.value = crate::devices::state_of(section, 7)?;
            Ok(())
        }
    }

    #[test]
    fn sections_round_trip_through_a_new_bus() {
        let mut a = bus();
        a.add(Box::new(Reg { value: 0 })).unwrap();
        a.pio_write(COM1_PORT + 7, &[0x42]);
        a.pio_write(ACPI_PM1A_EVT_PORT + 2, &[0x21, 0x00]); // PM1 enable
        a.mmio_write(0xd000_0010, &[9]);
        let saved = a.save();
        // Through the snapshot codec, as a file would carry them.
        let bytes = crate::snapshot::codec::encode(&saved).unwrap();
        let decoded: Vec<Section> = crate::snapshot::codec::decode(&bytes).unwrap();
        assert_eq!(decoded, saved);
        let mut b = bus();
        b.add(Box::new(Reg { value: 0 })).unwrap();
        b.restore(&decoded).unwrap();
        assert_eq!(b.save(), saved);
        let mut scratch = [0u8];
        b.pio_read(COM1_PORT + 7, &mut scratch);
        assert_eq!(scratch, [0x42]);
        b.mmio_read(0xd000_0000, &mut scratch);
        assert_eq!(scratch, [9]);
    }

    #[test]
    fn a_snapshot_of_another_machine_is_refused_by_device() {
        let mut with_reg = bus();
        with_reg.add(Box::new(Reg { value: 1 })).unwrap();
        let saved = with_reg.save();
        let err = bus().restore(&saved).unwrap_err();
        assert!(matches!(&err, DeviceError::Unknown(id) if id == "reg"), "{err}");
        let mut b = bus();
        b.add(Box::new(Reg { value: 1 })).unwrap();
        let err = b.restore(&bus().save()).unwrap_err();
        assert!(matches!(&err, DeviceError::Missing(id) if id == "reg"), "{err}");
        let mut newer = saved.clone();
        newer.iter_mut().find(|s| s.id == "reg").unwrap().version = 8;
        let err = b.restore(&newer).unwrap_err();
        assert!(matches!(&err, DeviceError::Version { found: 8, reads: 7, .. }), "{err}");
        let mut twice = saved.clone();
        twice.push(saved[0].clone());
        assert!(matches!(b.restore(&twice).unwrap_err(), DeviceError::Twice(_)));
        assert!(matches!(b.add(Box::new(Reg { value: 2 })).unwrap_err(), DeviceError::Twice(_)));
    }

    #[test]
    fn absent_ports_and_addresses_read_all_ones_and_cmos_reads_zero() {
        let mut bus = bus();
        let mut data = [0u8; 4];
        bus.pio_read(0xcfc, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.mmio_read(0xfee0_0000, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(bus.mmio_write(0xfee0_0000, &[1]), None);
        let mut cmos = [0xffu8];
        bus.pio_read(0x71, &mut cmos);
        assert_eq!(cmos, [0]);
        assert_eq!(bus.pio_write(0x64, &[0xfe]), Some(GuestRequest::Reset));
    }
}
