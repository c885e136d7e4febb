//! Intel MultiProcessor Specification 1.4 tables.
//!
//! A Linux guest that finds ACPI tables takes its CPU and interrupt topology from the MADT
//! and only reserves these. They are still written so that a guest booted with `acpi=off`
//! (or a kernel built without ACPI) can bring up its application processors.
//!
//! Everything is laid out in the 1 KiB between `layout::MPTABLE_START` (0x9fc00, one of the
//! places Linux scans for `_MP_`) and the end of conventional memory at 0xa0000: the
//! floating pointer first, the configuration table right after it.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout;
use super::tables::{checksum, put_u16, put_u32};
use crate::memory::GuestMemoryMmap;

/// Why the MP tables could not be written.
#[derive(Debug, Error)]
pub enum MptableError {
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    #[error("{0} CPUs do not fit in the MP table area (at most {max})", max = MAX_CPUS)]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// The table must end at 0xa0000, where the legacy VGA hole starts: that leaves room for
/// `(0xa0000 - MPTABLE_START - fixed part) / processor entry` CPUs.
pub const MAX_CPUS: u8 = {
    let room = (MPTABLE_END - layout::MPTABLE_START) as usize - FIXED_SIZE;
    let n = room / PROCESSOR_ENTRY_SIZE;
    assert!(n >= 1 && n <= 254);
    n as u8
};

const MPTABLE_END: u64 = 0xa0000;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes.
const SMALL_ENTRY_SIZE: usize = 8;
const ISA_IRQS: u8 = 16;
/// One bus, one IOAPIC, 16 I/O interrupts and two local interrupts.
const SMALL_ENTRIES: usize = 1 + 1 + ISA_IRQS as usize + 2;
const FIXED_SIZE: usize = FLOATING_POINTER_SIZE + HEADER_SIZE + SMALL_ENTRIES * SMALL_ENTRY_SIZE;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_FLAG_ENABLED: u8 = 1 << 0;
const CPU_FLAG_BSP: u8 = 1 << 1;
const IOAPIC_FLAG_ENABLED: u8 = 1 << 0;

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
/// An integrated (on-die) local APIC, which is what KVM's in-kernel LAPIC reports.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, model 0, stepping 0. Only informational: Linux prints it and moves on.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX bits FPU (0) and APIC (9), the minimum that makes the entry plausible.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// "Conforms to the bus specification" for both polarity and trigger mode: ISA means
/// active-high, edge-triggered.
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Destination local APIC id meaning "every local APIC".
const ALL_LAPICS: u8 = 0xff;

const OEM_ID: &[u8; 8] = b"TANDEM  ";
const PRODUCT_ID: &[u8; 12] = b"TANDEMVM    ";

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs, APIC ids
/// `0..num_cpus`, CPU 0 being the bootstrap processor.
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus)?;
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_START))?;
    Ok(())
}

/// The whole area as it goes into guest memory: floating pointer, then configuration table.
fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let config_addr = layout::MPTABLE_START + FLOATING_POINTER_SIZE as u64;

    // The configuration table, header first with its length, count and checksum patched in
    // once the entries are known.
    let mut cfg = Vec::with_capacity(FIXED_SIZE + usize::from(num_cpus) * PROCESSOR_ENTRY_SIZE);
    cfg.extend_from_slice(b"PCMP");
    put_u16(&mut cfg, 0); // base table length, patched below
    cfg.push(SPEC_REV);
    cfg.push(0); // checksum, patched below
    cfg.extend_from_slice(OEM_ID);
    cfg.extend_from_slice(PRODUCT_ID);
    put_u32(&mut cfg, 0); // no OEM table
    put_u16(&mut cfg, 0); // OEM table size
    put_u16(&mut cfg, 0); // entry count, patched below
    put_u32(&mut cfg, layout::APIC_START as u32);
    put_u16(&mut cfg, 0); // no extended table
    cfg.push(0); // extended table checksum
    cfg.push(0); // reserved
    debug_assert_eq!(cfg.len(), HEADER_SIZE);

    let mut entries: u16 = 0;
    for id in 0..num_cpus {
        let flags = if id == 0 {
            CPU_FLAG_ENABLED | CPU_FLAG_BSP
        } else {
            CPU_FLAG_ENABLED
        };
        cfg.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        put_u32(&mut cfg, CPU_SIGNATURE);
        put_u32(&mut cfg, CPU_FEATURES);
        cfg.extend_from_slice(&[0; 8]);
        entries += 1;
    }

    cfg.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    cfg.extend_from_slice(b"ISA   ");
    entries += 1;

    cfg.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_FLAG_ENABLED]);
    put_u32(&mut cfg, layout::IOAPIC_START as u32);
    entries += 1;

    // KVM's default GSI routing wires ISA IRQ n to both the PIC and IOAPIC pin n (the
    // in-kernel PIT included, on pin 0), so unlike most PC firmware there is no IRQ0 -> pin 2
    // redirection to describe.
    for irq in 0..ISA_IRQS {
        cfg.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        put_u16(&mut cfg, INT_FLAGS_CONFORM);
        cfg.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        entries += 1;
    }

    // Virtual-wire mode: the 8259 reaches the CPUs through LINT0, NMIs through LINT1.
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        cfg.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type]);
        put_u16(&mut cfg, INT_FLAGS_CONFORM);
        cfg.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        entries += 1;
    }

    let cfg_len = u16::try_from(cfg.len()).expect("bounded by MAX_CPUS");
    cfg[4..6].copy_from_slice(&cfg_len.to_le_bytes());
    cfg[34..36].copy_from_slice(&entries.to_le_bytes());
    cfg[7] = checksum(&cfg);

    let mut area = Vec::with_capacity(FLOATING_POINTER_SIZE + cfg.len());
    area.extend_from_slice(b"_MP_");
    put_u32(&mut area, config_addr as u32);
    area.push(1); // length in 16-byte paragraphs
    area.push(SPEC_REV);
    area.push(0); // checksum, patched below
                  // Feature byte 1 = 0: a configuration table is present (no default configuration).
                  // Feature byte 2 bit 7 (IMCRP) clear: virtual-wire mode, so the guest does not poke the
                  // IMCR at ports 0x22/0x23, which nothing emulates.
    area.extend_from_slice(&[0; 5]);
    area[10] = checksum(&area);
    debug_assert_eq!(area.len(), FLOATING_POINTER_SIZE);
    area.extend_from_slice(&cfg);

    debug_assert!(layout::MPTABLE_START + area.len() as u64 <= MPTABLE_END);
    Ok(area)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tables::{sum, u16_at, u32_at};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Reads back the floating pointer and configuration table from guest memory.
    fn read_back(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>) {
        let mut fp = vec![0u8; FLOATING_POINTER_SIZE];
        mem.read_slice(&mut fp, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        let cfg_addr = u64::from(u32_at(&fp, 4));
        let mut hdr = vec![0u8; HEADER_SIZE];
        mem.read_slice(&mut hdr, GuestAddress(cfg_addr)).unwrap();
        let mut cfg = vec![0u8; usize::from(u16_at(&hdr, 4))];
        mem.read_slice(&mut cfg, GuestAddress(cfg_addr)).unwrap();
        (fp, cfg)
    }

    fn check(num_cpus: u8) {
        let mem = mem();
        write_mptable(&mem, num_cpus).unwrap();
        let (fp, cfg) = read_back(&mem);

        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], SPEC_REV);
        assert_eq!(sum(&fp), 0);
        let cfg_addr = u64::from(u32_at(&fp, 4));
        assert_eq!(cfg_addr % 16, 0);
        assert!(cfg_addr + cfg.len() as u64 <= 0xa0000);

        assert_eq!(&cfg[0..4], b"PCMP");
        assert_eq!(sum(&cfg), 0);
        assert_eq!(&cfg[8..16], OEM_ID);
        assert_eq!(&cfg[16..28], PRODUCT_ID);
        assert_eq!(u32_at(&cfg, 36), layout::APIC_START as u32);
        let count = u16_at(&cfg, 34);
        assert_eq!(usize::from(count), usize::from(num_cpus) + SMALL_ENTRIES);

        // Walk the entries by type, which also checks the declared length is exact.
        let (mut cpus, mut buses, mut ioapics, mut ioints, mut lints) = (0u8, 0, 0, 0u8, 0);
        let mut off = HEADER_SIZE;
        for _ in 0..count {
            match cfg[off] {
                ENTRY_PROCESSOR => {
                    assert_eq!(cfg[off + 1], cpus, "APIC id = index");
                    let flags = cfg[off + 3];
                    assert_ne!(flags & CPU_FLAG_ENABLED, 0);
                    assert_eq!(flags & CPU_FLAG_BSP != 0, cpus == 0);
                    cpus += 1;
                    off += PROCESSOR_ENTRY_SIZE;
                }
                ENTRY_BUS => {
                    assert_eq!(&cfg[off + 2..off + 8], b"ISA   ");
                    buses += 1;
                    off += SMALL_ENTRY_SIZE;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(cfg[off + 1], num_cpus);
                    assert_eq!(cfg[off + 2], IOAPIC_VERSION);
                    assert_eq!(u32_at(&cfg, off + 4), layout::IOAPIC_START as u32);
                    ioapics += 1;
                    off += SMALL_ENTRY_SIZE;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(cfg[off + 1], INT_TYPE_INT);
                    assert_eq!(cfg[off + 5], ioints, "source IRQ");
                    assert_eq!(cfg[off + 6], num_cpus, "destination IOAPIC");
                    assert_eq!(cfg[off + 7], ioints, "identity pin");
                    ioints += 1;
                    off += SMALL_ENTRY_SIZE;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    let expected = if lints == 0 {
                        INT_TYPE_EXTINT
                    } else {
                        INT_TYPE_NMI
                    };
                    assert_eq!(cfg[off + 1], expected);
                    assert_eq!(cfg[off + 7], lints);
                    lints += 1;
                    off += SMALL_ENTRY_SIZE;
                }
                t => panic!("unexpected entry type {t}"),
            }
        }
        assert_eq!(off, cfg.len());
        assert_eq!(
            (cpus, buses, ioapics, ioints, lints),
            (num_cpus, 1, 1, 16, 2)
        );
    }

    #[test]
    fn one_cpu() {
        check(1);
    }

    #[test]
    fn four_cpus() {
        check(4);
    }

    #[test]
    fn eight_cpus() {
        check(8);
    }

    #[test]
    fn max_cpus_fit_below_vga_hole() {
        check(MAX_CPUS);
    }

    #[test]
    fn rejects_zero_cpus() {
        assert!(matches!(
            write_mptable(&mem(), 0),
            Err(MptableError::NoCpus)
        ));
    }

    #[test]
    fn rejects_too_many_cpus() {
        assert!(matches!(
            write_mptable(&mem(), MAX_CPUS + 1),
            Err(MptableError::TooManyCpus(_))
        ));
        assert!(matches!(
            write_mptable(&mem(), 255),
            Err(MptableError::TooManyCpus(255))
        ));
    }

    #[test]
    fn reports_unbacked_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_mptable(&mem, 1),
            Err(MptableError::Write(_))
        ));
    }
}
