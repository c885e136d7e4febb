//! COM1: a 16550A UART from vm-superio.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use super::{Device, DeviceError, GuestRequest, Section};
use crate::output::{SharedSink, SinkWriter};

/// COM1's base port and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Ports 0x3f8..0x400.
pub const COM_PORT_LEN: u16 = 8;

/// Raises a device's guest interrupt (in a VM, a `kvm::IrqLine` pulse).
#[derive(Clone)]
pub struct IrqTrigger(Arc<dyn Fn() -> io::Result<()> + Send + Sync>);

impl IrqTrigger {
    pub fn new(raise: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Self {
        Self(Arc::new(raise))
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        (self.0)()
    }
}

/// Saved serial state that cannot be loaded (e.g. a receive FIFO over 64 bytes).
#[derive(Debug, thiserror::Error)]
#[error("invalid serial port state: {0}")]
pub struct SerialStateError(String);

/// The guest's console port.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SinkWriter>,
    /// Kept to rebuild the UART around restored registers.
    irq: IrqTrigger,
    sink: SharedSink,
}

impl SerialPort {
    pub fn new(irq: IrqTrigger, sink: SharedSink) -> Self {
        Self { uart: Serial::new(irq.clone(), SinkWriter(sink.clone())), irq, sink }
    }

    /// Rebuilds the port from saved registers and receive FIFO.
    pub fn from_state(
        state: &SerialState,
        irq: IrqTrigger,
        sink: SharedSink,
    ) -> Result<Self, SerialStateError> {
        Serial::from_state(state, irq.clone(), NoEvents, SinkWriter(sink.clone()))
            .map(|uart| Self { uart, irq, sink })
            .map_err(|e| SerialStateError(e.to_string()))
    }

    /// Registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A failed output write is logged, not fatal: the guest must not stop because a
    /// terminal went away.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::warn!("serial write: {e:?}");
        }
    }

    /// Feeds host input to the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// vm-superio's `SerialState`, field for field, in a form the snapshot codec carries:
/// the port's section, version 1.
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

impl Device for SerialPort {
    fn id(&self) -> &str {
        "serial0"
    }

    fn ports(&self) -> Vec<Range<u16>> {
        // A list of port ranges that happens to hold one.
        #[allow(clippy::single_range_in_vec_init)]
        let ranges = vec![COM1_PORT..COM1_PORT + COM_PORT_LEN];
        ranges
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.read((port - COM1_PORT) as u8);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        self.write((port - COM1_PORT) as u8, data[0]);
        None
    }

    fn save(&self) -> Section {
        super::section(self.id(), 1, &SerialRegisters::from(self.state()))
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        let registers: SerialRegisters = super::state_of(section, 1)?;
        *self = Self::from_state(&(&registers).into(), self.irq.clone(), self.sink.clone())
            .map_err(|e| DeviceError::Corrupt { id: section.id.clone(), why: e.to_string() })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Passthrough;
    use std::sync::{Arc, Mutex};

    fn port() -> SerialPort {
        let sink: SharedSink = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
        SerialPort::new(IrqTrigger::new(|| Ok(())), sink)
    }

    #[test]
    fn state_round_trips_registers_and_pending_input() {
        let mut a = port();
        a.write(3, 0x03); // LCR: 8 data bits
        a.write(1, 0x01); // IER: received-data interrupt
        a.write(7, 0x5a); // scratch
        assert_eq!(a.enqueue_input(b"ls\n"), 3);
        let saved = a.state();
        let sink: SharedSink = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
        let mut b = SerialPort::from_state(&saved, IrqTrigger::new(|| Ok(())), sink).unwrap();
        assert_eq!(b.state(), saved);
        assert_eq!(b.read(7), 0x5a);
        assert_eq!([b.read(0), b.read(0), b.read(0)], *b"ls\n", "pending input survives");
    }

    #[test]
    fn an_oversized_fifo_is_refused() {
        let mut state = port().state();
        state.in_buffer = vec![0; 4096];
        let sink: SharedSink = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
        assert!(SerialPort::from_state(&state, IrqTrigger::new(|| Ok(())), sink).is_err());
    }
}
