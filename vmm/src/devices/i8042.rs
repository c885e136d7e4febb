//! The PS/2 controller, only as far as Linux uses it to reset the machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::ops::Range;

use vm_superio::{I8042Device, Trigger};

use super::{Device, DeviceError, GuestRequest, Section};

/// Data (0x60) and command/status (0x64) ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Latches the reset request so the port bus can report it after the write.
#[derive(Clone, Default)]
pub struct ResetLatch(Arc<AtomicBool>);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetLatch>,
    latch: ResetLatch,
}

impl Default for I8042 {
    fn default() -> Self {
        let latch = ResetLatch::default();
        Self {
            dev: I8042Device::new(latch.clone()),
            latch,
        }
    }
}

impl I8042 {
    pub fn read(&mut self, port: u16) -> u8 {
        self.dev.read((port - I8042_DATA_PORT) as u8)
    }

    /// Returns true when the guest asked for a CPU reset.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        let _ = self.dev.write((port - I8042_DATA_PORT) as u8, value);
        self.latch.0.swap(false, Ordering::SeqCst)
    }
}

/// The controller keeps nothing a restored VM needs: a reset request ends the VM
/// before any snapshot could see it.
impl Device for I8042 {
    fn id(&self) -> &str {
        "i8042"
    }

    fn ports(&self) -> Vec<Range<u16>> {
        vec![I8042_DATA_PORT..I8042_DATA_PORT + 1, I8042_COMMAND_PORT..I8042_COMMAND_PORT + 1]
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.read(port);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        self.write(port, data[0]).then_some(GuestRequest::Reset)
    }

    fn save(&self) -> Section {
        super::section(self.id(), 1, &())
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        super::state_of::<()>(section, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_is_reported_once() {
        let mut kbd = I8042::default();
        assert!(!kbd.write(I8042_COMMAND_PORT, 0x20));
        assert!(kbd.write(I8042_COMMAND_PORT, 0xfe));
        assert!(!kbd.write(I8042_DATA_PORT, 0xfe));
    }
}
