//! Port I/O dispatch: the legacy devices a Linux guest finds at fixed ports.

use super::acpi_pm::{AcpiPm, PmEvent};
use super::i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use super::serial::{SerialPort, COM1_PORT, COM_PORT_LEN};

/// What a port access asks of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    PowerOff,
    Reset,
}

/// CMOS/RTC index and data ports. Reads return 0 so the "update in progress" bit is
/// never seen set; the kernel then reads a zero clock instead of spinning on it.
const CMOS_PORTS: std::ops::RangeInclusive<u16> = 0x70..=0x71;

/// The devices on the port bus.
pub struct PortBus {
    pub serial: SerialPort,
    pub i8042: I8042,
    pub acpi_pm: AcpiPm,
}

impl PortBus {
    pub fn new(serial: SerialPort) -> Self {
        Self {
            serial,
            i8042: I8042::default(),
            acpi_pm: AcpiPm::new(),
        }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_PORT..COM1_PORT + COM_PORT_LEN).contains(&p) => {
                data[0] = self.serial.read((p - COM1_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => data[0] = self.i8042.read(port),
            p if AcpiPm::handles(p) => self.acpi_pm.read(p, data),
            p if CMOS_PORTS.contains(&p) => data.fill(0),
            // Nothing there: an ISA/PCI bus with no device reads all ones.
            _ => data.fill(0xff),
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        match port {
            p if (COM1_PORT..COM1_PORT + COM_PORT_LEN).contains(&p) => {
                self.serial.write((p - COM1_PORT) as u8, data[0]);
                None
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                self.i8042.write(port, data[0]).then_some(GuestRequest::Reset)
            }
            p if AcpiPm::handles(p) => self
                .acpi_pm
                .write(p, data)
                .map(|PmEvent::PowerOff| GuestRequest::PowerOff),
            _ => None,
        }
    }
}
