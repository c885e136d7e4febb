//! Port I/O dispatch: the legacy devices a Linux guest finds at fixed ports.

use super::acpi_pm::{AcpiPm, PmEvent};
use super::i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use super::serial::{IrqTrigger, SerialPort, SerialStateError, COM1_PORT, COM_PORT_LEN};
use crate::output::SharedSink;
use vm_superio::serial::SerialState;

/// What a port access asks of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    PowerOff,
    Reset,
}

/// CMOS/RTC index and data ports. Reads return 0 so the "update in progress" bit is
/// never seen set; the kernel then reads a zero clock instead of spinning on it.
const CMOS_PORTS: std::ops::RangeInclusive<u16> = 0x70..=0x71;

/// Everything the port devices hold that a restored VM needs. The i8042 has nothing
/// beyond a reset request, which ends the VM before any snapshot could see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortBusState {
    pub serial: SerialRegisters,
    pub acpi_pm: AcpiPm,
}

/// vm-superio's `SerialState`, field for field, in a form the snapshot codec can carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegisters {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for SerialState {
    fn from(r: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        }
    }
}

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

    /// Device state for a snapshot; the vCPUs must be paused so no access is in flight.
    pub fn state(&self) -> PortBusState {
        PortBusState {
            serial: self.serial.state().into(),
            acpi_pm: self.acpi_pm.clone(),
        }
    }

    /// Rebuilds the devices of a restored VM; the serial port interrupts through `irq`
    /// and writes to `sink`.
    pub fn from_state(
        state: &PortBusState,
        irq: IrqTrigger,
        sink: SharedSink,
    ) -> Result<Self, SerialStateError> {
        Ok(Self {
            serial: SerialPort::from_state(&(&state.serial).into(), irq, sink)?,
            i8042: I8042::default(),
            acpi_pm: state.acpi_pm.clone(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::ACPI_PM1A_EVT_PORT;
    use crate::output::Passthrough;
    use std::sync::{Arc, Mutex};

    fn sink() -> SharedSink {
        Arc::new(Mutex::new(Passthrough::new(std::io::sink())))
    }

    fn irq() -> IrqTrigger {
        IrqTrigger::new(|| Ok(()))
    }

    #[test]
    fn state_round_trips_through_a_new_bus() {
        let mut bus = PortBus::new(SerialPort::new(irq(), sink()));
        bus.write(COM1_PORT + 7, &[0x42]);
        bus.write(ACPI_PM1A_EVT_PORT + 2, &[0x21, 0x00]); // PM1 enable
        let saved = bus.state();
        // Through the snapshot codec, as a file would carry it.
        let bytes = crate::snapshot::codec::encode(&saved).unwrap();
        let decoded: PortBusState = crate::snapshot::codec::decode(&bytes).unwrap();
        assert_eq!(decoded, saved);
        let mut restored = PortBus::from_state(&decoded, irq(), sink()).unwrap();
        assert_eq!(restored.state(), saved);
        let mut scratch = [0u8];
        restored.read(COM1_PORT + 7, &mut scratch);
        assert_eq!(scratch, [0x42]);
    }

    #[test]
    fn absent_ports_read_all_ones_and_cmos_reads_zero() {
        let mut bus = PortBus::new(SerialPort::new(irq(), sink()));
        let mut data = [0u8; 4];
        bus.read(0xcfc, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut cmos = [0xffu8];
        bus.read(0x71, &mut cmos);
        assert_eq!(cmos, [0]);
        assert_eq!(bus.write(0x64, &[0xfe]), Some(GuestRequest::Reset));
    }
}
