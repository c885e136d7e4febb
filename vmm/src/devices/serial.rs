//! COM1: a 16550A UART from vm-superio.

use std::io;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::output::{SharedSink, SinkWriter};

/// COM1's base port and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Ports 0x3f8..0x400.
pub const COM_PORT_LEN: u16 = 8;

/// Raises the UART's guest interrupt (in a VM, a `kvm::IrqLine` pulse).
pub struct IrqTrigger(Box<dyn Fn() -> io::Result<()> + Send>);

impl IrqTrigger {
    pub fn new(raise: impl Fn() -> io::Result<()> + Send + 'static) -> Self {
        Self(Box::new(raise))
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
}

impl SerialPort {
    pub fn new(irq: IrqTrigger, sink: SharedSink) -> Self {
        Self {
            uart: Serial::new(irq, SinkWriter(sink)),
        }
    }

    /// Rebuilds the port from saved registers and receive FIFO.
    pub fn from_state(
        state: &SerialState,
        irq: IrqTrigger,
        sink: SharedSink,
    ) -> Result<Self, SerialStateError> {
        Serial::from_state(state, irq, NoEvents, SinkWriter(sink))
            .map(|uart| Self { uart })
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
