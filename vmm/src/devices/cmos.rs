//! The CMOS/RTC index and data ports, present only so that probing them is harmless.

use std::ops::Range;

use super::{Device, DeviceError, Section};

/// Reads return 0 so the "update in progress" bit is never seen set; the kernel then
/// reads a zero clock instead of spinning on it. It holds nothing.
#[derive(Default)]
pub struct Cmos;

const PORTS: Range<u16> = 0x70..0x72;

impl Device for Cmos {
    fn id(&self) -> &str {
        "cmos"
    }

    fn ports(&self) -> Vec<Range<u16>> {
        // A list of port ranges that happens to hold one.
        #[allow(clippy::single_range_in_vec_init)]
        let ranges = vec![PORTS];
        ranges
    }

    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn save(&self) -> Section {
        super::section(self.id(), 1, &())
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        super::state_of::<()>(section, 1)
    }
}
