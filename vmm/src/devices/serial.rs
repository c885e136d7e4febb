//! COM1: a 16550A UART from vm-superio, interrupting through an irqfd.

use std::io;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::output::{SharedSink, SinkWriter};

/// COM1's base port and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Ports 0x3f8..0x400.
pub const COM_PORT_LEN: u16 = 8;

/// Raises the guest interrupt by writing the eventfd KVM watches.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's console port.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SinkWriter>,
}

impl SerialPort {
    pub fn new(irq: EventFd, sink: SharedSink) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), SinkWriter(sink)),
        }
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
