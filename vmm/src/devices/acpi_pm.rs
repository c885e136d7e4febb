//! The ACPI PM1a fixed-hardware registers the FADT advertises: the event block (status +
//! enable) and the control block. Their one job is to turn the guest's `\_S5` sleep request
//! into a power-off; nothing here ever raises an SCI.

use std::ops::Range;

use super::{Device, DeviceError, GuestRequest, Section};
use crate::boot::layout::{ACPI_PM1A_CNT_PORT, ACPI_PM1A_EVT_PORT, ACPI_S5_SLP_TYP};

/// What a register write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmEvent {
    /// The guest entered S5 (soft off).
    PowerOff,
}

/// PM1_CNT.SCI_EN: the platform is in ACPI mode. There is no legacy (SMM) mode to leave,
/// so it always reads as set.
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1_CNT.GBL_RLS: write-only, would signal the global lock's release to firmware.
const PM1_CNT_GBL_RLS: u16 = 1 << 2;
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_TYP_MASK: u16 = 0b111 << PM1_CNT_SLP_TYP_SHIFT;
/// PM1_CNT.SLP_EN: write-only, triggers the transition to SLP_TYP.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// The PM1a register file. Plain data so that it can be snapshotted and restored as is.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct AcpiPm {
    /// PM1_STS: write-1-to-clear.
    pub status: u16,
    /// PM1_EN.
    pub enable: u16,
    /// PM1_CNT as last written, without its write-only bits.
    pub control: u16,
}

#[derive(Clone, Copy)]
enum Reg {
    Status,
    Enable,
    Control,
}

/// The register and byte within it that `port` addresses.
fn locate(port: u16) -> Option<(Reg, u16)> {
    let evt = port.wrapping_sub(ACPI_PM1A_EVT_PORT);
    let cnt = port.wrapping_sub(ACPI_PM1A_CNT_PORT);
    match (evt, cnt) {
        (0..=1, _) => Some((Reg::Status, evt)),
        (2..=3, _) => Some((Reg::Enable, evt - 2)),
        (_, 0..=1) => Some((Reg::Control, cnt)),
        _ => None,
    }
}

impl AcpiPm {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `port` is one of the six PM1a ports.
    pub fn handles(port: u16) -> bool {
        locate(port).is_some()
    }

    /// Port I/O read of `data.len()` bytes at absolute port `port`. Accesses are decoded
    /// byte by byte, so any width at any offset works; bytes past the blocks read as
    /// open bus (0xff).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match locate(port.wrapping_add(i as u16)) {
                Some((reg, idx)) => self.reg_value(reg).to_le_bytes()[usize::from(idx)],
                None => 0xff,
            };
        }
    }

    /// Port I/O write at absolute port `port`; returns the event a write to PM1_CNT with
    /// SLP_EN set asks for.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PmEvent> {
        // Gather the access into per-register (written bits, value) pairs first, so that a
        // 2- or 4-byte write acts on each 16-bit register once, as a whole.
        let mut writes = [(0u16, 0u16); 3];
        for (i, byte) in data.iter().enumerate() {
            if let Some((reg, idx)) = locate(port.wrapping_add(i as u16)) {
                let shift = idx * 8;
                let w = &mut writes[reg as usize];
                w.0 |= 0xff << shift;
                w.1 |= u16::from(*byte) << shift;
            }
        }

        let (mask, value) = writes[Reg::Status as usize];
        self.status &= !(value & mask);

        let (mask, value) = writes[Reg::Enable as usize];
        self.enable = (self.enable & !mask) | (value & mask);

        let (mask, value) = writes[Reg::Control as usize];
        if mask == 0 {
            return None;
        }
        let written = (self.control & !mask) | (value & mask);
        self.control = written & !(PM1_CNT_SLP_EN | PM1_CNT_GBL_RLS);
        if written & mask & PM1_CNT_SLP_EN == 0 {
            return None;
        }
        let slp_typ = (written & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT;
        if slp_typ == ACPI_S5_SLP_TYP {
            Some(PmEvent::PowerOff)
        } else {
            // Only \_S5 is advertised; a guest asking for another state gets nothing, the
            // same as if the chipset ignored it, and simply carries on running.
            tracing::debug!(slp_typ, "ignoring request for an unadvertised sleep state");
            None
        }
    }

    fn reg_value(&self, reg: Reg) -> u16 {
        match reg {
            Reg::Status => self.status,
            Reg::Enable => self.enable,
            Reg::Control => self.control | PM1_CNT_SCI_EN,
        }
    }
}

// `locate` assumes the 4-byte event block and the 2-byte control block do not overlap.
const _: () = assert!(
    ACPI_PM1A_CNT_PORT >= ACPI_PM1A_EVT_PORT + 4 || ACPI_PM1A_EVT_PORT >= ACPI_PM1A_CNT_PORT + 2
);

/// Its section (version 1) is the register file as it is.
impl Device for AcpiPm {
    fn id(&self) -> &str {
        "acpi-pm"
    }

    fn ports(&self) -> Vec<Range<u16>> {
        vec![ACPI_PM1A_EVT_PORT..ACPI_PM1A_EVT_PORT + 4, ACPI_PM1A_CNT_PORT..ACPI_PM1A_CNT_PORT + 2]
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.read(port, data);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        self.write(port, data).map(|PmEvent::PowerOff| GuestRequest::PowerOff)
    }

    fn save(&self) -> Section {
        super::section(self.id(), 1, self)
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        *self = super::state_of(section, 1)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVT: u16 = ACPI_PM1A_EVT_PORT;
    const CNT: u16 = ACPI_PM1A_CNT_PORT;
    const S5: u16 = (ACPI_S5_SLP_TYP << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN;

    fn read16(pm: &mut AcpiPm, port: u16) -> u16 {
        let mut b = [0u8; 2];
        pm.read(port, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn handles_exactly_six_ports() {
        let handled: Vec<u16> = (0..=u16::MAX).filter(|p| AcpiPm::handles(*p)).collect();
        let mut expected: Vec<u16> = (EVT..EVT + 4).chain(CNT..CNT + 2).collect();
        expected.sort_unstable();
        assert_eq!(handled, expected);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let mut pm = AcpiPm::new();
        assert_eq!(read16(&mut pm, CNT), PM1_CNT_SCI_EN);
        assert_eq!(pm.write(CNT, &0u16.to_le_bytes()), None);
        assert_eq!(read16(&mut pm, CNT), PM1_CNT_SCI_EN);
        let mut b = [0u8; 1];
        pm.read(CNT, &mut b);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn status_is_write_one_to_clear() {
        let mut pm = AcpiPm::new();
        pm.status = 0x8101;
        // Writing zeros changes nothing.
        pm.write(EVT, &[0, 0]);
        assert_eq!(read16(&mut pm, EVT), 0x8101);
        // Clear bit 0 with a 1-byte write, bit 15 with a 1-byte write to the high byte.
        pm.write(EVT, &[0x01]);
        assert_eq!(read16(&mut pm, EVT), 0x8100);
        pm.write(EVT + 1, &[0x80]);
        assert_eq!(read16(&mut pm, EVT), 0x0100);
        // ACPICA clears everything by writing all ones.
        pm.write(EVT, &[0xff, 0xff]);
        assert_eq!(pm.status, 0);
    }

    #[test]
    fn enable_is_read_write() {
        let mut pm = AcpiPm::new();
        pm.write(EVT + 2, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut pm, EVT + 2), 0x0120);
        pm.write(EVT + 3, &[0x03]);
        assert_eq!(read16(&mut pm, EVT + 2), 0x0320);
        pm.write(EVT + 2, &[0x00]);
        assert_eq!(read16(&mut pm, EVT + 2), 0x0300);
    }

    #[test]
    fn four_byte_event_access_covers_status_and_enable() {
        let mut pm = AcpiPm::new();
        pm.status = 0x0021;
        // Low half clears status bit 0, high half sets the enable register.
        pm.write(EVT, &0x0100_0001u32.to_le_bytes());
        let mut b = [0u8; 4];
        pm.read(EVT, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0100_0020);
        assert_eq!((pm.status, pm.enable), (0x0020, 0x0100));
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let mut pm = AcpiPm::new();
        // ACPICA's sequence: SLP_TYP alone, then SLP_TYP | SLP_EN.
        let typ_only = S5 & !PM1_CNT_SLP_EN | PM1_CNT_SCI_EN;
        assert_eq!(pm.write(CNT, &typ_only.to_le_bytes()), None);
        assert_eq!(read16(&mut pm, CNT), typ_only);
        assert_eq!(
            pm.write(CNT, &(typ_only | PM1_CNT_SLP_EN).to_le_bytes()),
            Some(PmEvent::PowerOff)
        );
        // SLP_EN is write-only.
        assert_eq!(read16(&mut pm, CNT) & PM1_CNT_SLP_EN, 0);
    }

    #[test]
    fn s5_through_high_byte_write_powers_off() {
        let mut pm = AcpiPm::new();
        assert_eq!(
            pm.write(CNT + 1, &[(S5 >> 8) as u8]),
            Some(PmEvent::PowerOff)
        );
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let mut pm = AcpiPm::new();
        for typ in (0..8).filter(|t| *t != ACPI_S5_SLP_TYP) {
            let v = (typ << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN;
            assert_eq!(pm.write(CNT, &v.to_le_bytes()), None, "SLP_TYP {typ}");
        }
    }

    #[test]
    fn slp_typ_without_slp_en_does_nothing() {
        let mut pm = AcpiPm::new();
        let v = ACPI_S5_SLP_TYP << PM1_CNT_SLP_TYP_SHIFT;
        assert_eq!(pm.write(CNT, &v.to_le_bytes()), None);
        // Rewriting only the low byte keeps SLP_TYP but SLP_EN was never written.
        assert_eq!(pm.write(CNT, &[0x01]), None);
    }

    #[test]
    fn bytes_outside_the_blocks_read_open_bus() {
        let mut pm = AcpiPm::new();
        let mut b = [0u8; 4];
        pm.read(CNT, &mut b);
        assert_eq!(b, [0x01, 0x00, 0xff, 0xff]);
        // And writes to them are dropped.
        assert_eq!(pm.write(CNT, &[0, 0, 0xff, 0xff]), None);
    }

    #[test]
    fn state_round_trips_through_clone() {
        let mut pm = AcpiPm::new();
        pm.write(EVT + 2, &[0x20, 0x01]);
        pm.write(
            CNT,
            &(ACPI_S5_SLP_TYP << PM1_CNT_SLP_TYP_SHIFT).to_le_bytes(),
        );
        let saved = pm.clone();
        let mut restored = saved.clone();
        assert_eq!(restored, pm);
        assert_eq!(read16(&mut restored, CNT), read16(&mut pm, CNT));
    }
}
