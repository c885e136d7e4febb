//! ACPI tables: just enough for a stock Linux guest to find its CPUs and interrupt
//! controllers, and to power itself off through `\_S5`.
//!
//! Layout, from `layout::ACPI_START` (where Linux's RSDP scan of 0xe0000..0xfffff starts):
//! RSDP, FACS, XSDT, FADT, DSDT, MADT. Only the MADT's size depends on the vCPU count, so
//! it goes last and every other table sits at a fixed address.
//!
//! The platform is a full (not hardware-reduced) ACPI one: hardware-reduced ACPI has no
//! PM1 control register and would need the sleep control/status registers instead, which
//! older kernels do not use for S5. Full ACPI also requires a FACS, so one is provided even
//! though nothing here uses the global lock or waking vectors.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::aml::{self, MmioSlot};
use super::layout;
use super::tables::{checksum, put_u16, put_u32, put_u64};
use crate::memory::GuestMemoryMmap;

/// Why the ACPI tables could not be written.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    #[error("{0} CPUs is too many for xAPIC ids (at most {max})", max = MAX_CPUS)]
    TooManyCpus(u8),
    #[error("ACPI tables end at {end:#x}, past the ACPI area end {limit:#x}", limit = layout::ACPI_END)]
    DoesNotFit { end: u64 },
    #[error("writing ACPI tables to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// Local APIC ids are `0..num_cpus` and the IOAPIC takes id `num_cpus`; 0xff is the xAPIC
/// broadcast id, so 254 CPUs is the most that can be described without x2APIC entries.
pub const MAX_CPUS: u8 = 254;

const OEM_ID: &[u8; 6] = b"TANDEM";
const OEM_TABLE_ID: &[u8; 8] = b"TANDEMVM";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"TNDM";
const CREATOR_REVISION: u32 = 1;

const HEADER_SIZE: usize = 36;
const RSDP_SIZE: usize = 36;
const FACS_SIZE: usize = 64;
const FADT_SIZE: usize = 276;
const MADT_LAPIC_SIZE: usize = 8;
const MADT_IOAPIC_SIZE: usize = 12;

// Revisions of ACPI 6.0, the first to define the 276-byte FADT.
const RSDP_REVISION: u8 = 2;
const XSDT_REVISION: u8 = 1;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_VERSION: u8 = 0;
/// Revision 2 makes AML integers 64-bit; nothing here needs it, but it is the norm.
const DSDT_REVISION: u8 = 2;
const MADT_REVISION: u8 = 4;
const FACS_VERSION: u8 = 2;

/// The SCI is the ISA IRQ 9 of PC chipsets. Without an interrupt source override for it
/// Linux programs GSI 9 level-triggered, active-low; nothing raises it today.
const SCI_INT: u16 = 9;
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;

// IAPC_BOOT_ARCH. MSI is left "supported": there is no PCI bus, so the bit would change
// nothing today, and setting it would silently disable MSI-X if a PCI transport is added.
/// The UART and i8042 are ISA-style devices at their legacy ports.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// Left clear: our i8042 only implements the CPU-reset command, and a guest told there
/// is an 8042 probes it and waits out its timeouts (over a second of boot, measured in
/// the lab). `reboot=k` still writes the reset command to port 0x64 directly.
#[cfg(test)]
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// Nothing emulates ports 0x70/0x71; this keeps Linux from registering rtc_cmos.
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

// FADT flags.
const FADT_WBINVD: u32 = 1 << 0;
/// Set means "no fixed-feature power button" (control method or absent).
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;

/// Latencies above 100 us (C2) and 1000 us (C3) mean the state is not supported.
const P_LVL2_LAT_NONE: u16 = 101;
const P_LVL3_LAT_NONE: u16 = 1001;

const GAS_SYSTEM_IO: u8 = 1;
/// Access size "undefined (legacy)": the 32-bit twins carry no access size either, the
/// registers' natural 16-bit width applies, and ACPICA ignores the field for FADT blocks.
const GAS_ACCESS_LEGACY: u8 = 0;

const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_LAPIC_ENABLED: u32 = 1 << 0;

// SLP_TYP is a 3-bit field of PM1_CNT, and the AML below encodes it as a ByteConst.
const _: () = assert!(layout::ACPI_S5_SLP_TYP <= 7);
const S5_SLP_TYP: u8 = layout::ACPI_S5_SLP_TYP as u8;

/// `Name (_S5_, Package (4) { SLP_TYP, 0, 0, 0 })`, in AML:
///
/// - `08` NameOp, then the NameSeg `_S5_` (`5f 53 35 5f`); at the top of the DSDT it lands
///   in the root scope, i.e. `\_S5_`, which is what ACPICA looks up.
/// - `12` PackageOp, then PkgLength `07`: a one-byte PkgLength (bits 7:6 = 0) counting
///   itself (1), NumElements (1), BytePrefix + value (2) and three ZeroOps (3).
/// - `04` NumElements.
/// - `0a SLP_TYP`: BytePrefix and the value for PM1a_CNT.SLP_TYP; the second element is
///   SLP_TYPb for a PM1b block we do not have; the last two are reserved.
/// - `00 00 00` ZeroOp x3.
const S5_AML: [u8; 13] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, S5_SLP_TYP, 0x00, 0x00, 0x00,
];

/// Writes all the tables for `num_cpus` vCPUs and returns the RSDP's address (for
/// `boot_params.acpi_rsdp_addr`; Linux also finds it by scanning).
pub fn write_acpi_tables(mem: &GuestMemoryMmap, num_cpus: u8, virtio: &[MmioSlot]) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }

    let dsdt = build_dsdt(virtio);
    let madt = build_madt(num_cpus);
    let facs = build_facs();

    let mut alloc = Allocator {
        next: layout::ACPI_START,
    };
    // The RSDP must be 16-byte aligned and the FACS 64-byte aligned; the rest only need
    // natural alignment, 16 keeps them tidy in a hex dump.
    let rsdp_addr = alloc.take(RSDP_SIZE, 16);
    let facs_addr = alloc.take(facs.len(), 64);
    let xsdt_addr = alloc.take(HEADER_SIZE + 2 * 8, 16);
    let fadt_addr = alloc.take(FADT_SIZE, 16);
    let dsdt_addr = alloc.take(dsdt.len(), 16);
    let madt_addr = alloc.take(madt.len(), 16);
    if alloc.next > layout::ACPI_END {
        return Err(AcpiError::DoesNotFit { end: alloc.next });
    }

    let fadt = build_fadt(facs_addr, dsdt_addr);
    let xsdt = build_xsdt(&[fadt_addr, madt_addr]);
    let rsdp = build_rsdp(xsdt_addr);

    // One write of the whole area, gaps zeroed, so no stale bytes (say an old "RSD PTR ")
    // survive between tables.
    let mut area = vec![0u8; (alloc.next - layout::ACPI_START) as usize];
    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (facs_addr, &facs),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (dsdt_addr, &dsdt),
        (madt_addr, &madt),
    ] {
        let off = (addr - layout::ACPI_START) as usize;
        area[off..off + table.len()].copy_from_slice(table);
    }
    mem.write_slice(&area, GuestAddress(layout::ACPI_START))?;
    Ok(GuestAddress(rsdp_addr))
}

struct Allocator {
    next: u64,
}

impl Allocator {
    fn take(&mut self, size: usize, align: u64) -> u64 {
        let addr = self.next.next_multiple_of(align);
        self.next = addr + size as u64;
        addr
    }
}

fn build_rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(RSDP_SIZE);
    t.extend_from_slice(b"RSD PTR ");
    t.push(0); // ACPI 1.0 checksum over the first 20 bytes
    t.extend_from_slice(OEM_ID);
    t.push(RSDP_REVISION);
    put_u32(&mut t, 0); // no RSDT: every consumer we care about reads the XSDT
    put_u32(&mut t, RSDP_SIZE as u32);
    put_u64(&mut t, xsdt_addr);
    t.push(0); // extended checksum over all 36 bytes
    t.extend_from_slice(&[0; 3]);
    t[8] = checksum(&t[..20]);
    t[32] = checksum(&t);
    t
}

/// The FACS has no checksum and no standard header; all zero but for signature, length
/// and version, which is what "no waking vector, global lock free" looks like.
fn build_facs() -> Vec<u8> {
    let mut t = vec![0u8; FACS_SIZE];
    t[0..4].copy_from_slice(b"FACS");
    t[4..8].copy_from_slice(&(FACS_SIZE as u32).to_le_bytes());
    t[32] = FACS_VERSION;
    t
}

fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = header(b"XSDT", XSDT_REVISION);
    for e in entries {
        put_u64(&mut t, *e);
    }
    finish(t)
}

fn build_fadt(facs_addr: u64, dsdt_addr: u64) -> Vec<u8> {
    let evt = u32::from(layout::ACPI_PM1A_EVT_PORT);
    let cnt = u32::from(layout::ACPI_PM1A_CNT_PORT);

    let mut t = header(b"FACP", FADT_REVISION);
    put_u32(&mut t, facs_addr as u32); // FIRMWARE_CTRL
    put_u32(&mut t, dsdt_addr as u32); // DSDT
    t.push(0); // reserved (INT_MODEL in ACPI 1.0)
    t.push(0); // Preferred_PM_Profile: unspecified
    put_u16(&mut t, SCI_INT);
    // SMI_CMD = 0 says the platform has no SMM handshake: the OS finds it already in ACPI
    // mode (ACPICA checks exactly this before trying to read SCI_EN).
    put_u32(&mut t, 0);
    t.extend_from_slice(&[0, 0, 0, 0]); // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
    put_u32(&mut t, evt); // PM1a_EVT_BLK
    put_u32(&mut t, 0); // PM1b_EVT_BLK
    put_u32(&mut t, cnt); // PM1a_CNT_BLK
    put_u32(&mut t, 0); // PM1b_CNT_BLK
    put_u32(&mut t, 0); // PM2_CNT_BLK
    put_u32(&mut t, 0); // PM_TMR_BLK: none, the guest has kvmclock and the TSC
    put_u32(&mut t, 0); // GPE0_BLK
    put_u32(&mut t, 0); // GPE1_BLK
    t.extend_from_slice(&[PM1_EVT_LEN, PM1_CNT_LEN, 0, 0, 0, 0, 0, 0]); // .. GPE1_BASE, CST_CNT
    put_u16(&mut t, P_LVL2_LAT_NONE);
    put_u16(&mut t, P_LVL3_LAT_NONE);
    put_u16(&mut t, 0); // FLUSH_SIZE: unused with WBINVD
    put_u16(&mut t, 0); // FLUSH_STRIDE
    t.extend_from_slice(&[0, 0, 0, 0, 0]); // DUTY_OFFSET/WIDTH, alarms, CENTURY: no RTC
    put_u16(
        &mut t,
        BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC,
    );
    t.push(0); // reserved
    put_u32(&mut t, FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON);
    t.extend_from_slice(&[0; 12]); // RESET_REG: none, so Linux falls back to the i8042
    t.push(0); // RESET_VALUE
    put_u16(&mut t, 0); // ARM_BOOT_ARCH
    t.push(FADT_MINOR_VERSION);
    // ACPICA complains when a 64-bit field disagrees with its 32-bit twin, so the X_ fields
    // carry the same addresses and bit widths of 8 * the block lengths.
    put_u64(&mut t, facs_addr); // X_FIRMWARE_CTRL
    put_u64(&mut t, dsdt_addr); // X_DSDT
    put_gas_io(&mut t, evt, PM1_EVT_LEN); // X_PM1a_EVT_BLK
    put_gas_io(&mut t, 0, 0); // X_PM1b_EVT_BLK
    put_gas_io(&mut t, cnt, PM1_CNT_LEN); // X_PM1a_CNT_BLK
    for _ in 0..5 {
        // X_PM1b_CNT_BLK, X_PM2_CNT_BLK, X_PM_TMR_BLK, X_GPE0_BLK, X_GPE1_BLK
        put_gas_io(&mut t, 0, 0);
    }
    t.extend_from_slice(&[0; 24]); // SLEEP_CONTROL_REG, SLEEP_STATUS_REG: HW-reduced only
    t.extend_from_slice(&[0; 8]); // Hypervisor Vendor Identity
    debug_assert_eq!(t.len(), FADT_SIZE);
    finish(t)
}

fn build_dsdt(virtio: &[MmioSlot]) -> Vec<u8> {
    let mut t = header(b"DSDT", DSDT_REVISION);
    t.extend_from_slice(&S5_AML);
    t.extend(aml::virtio_mmio_devices(virtio));
    finish(t)
}

fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut t = header(b"APIC", MADT_REVISION);
    put_u32(&mut t, layout::APIC_START as u32);
    // PCAT_COMPAT: there are 8259s (KVM's in-kernel PIC) that the OS must mask when it
    // switches to the IOAPIC.
    put_u32(&mut t, MADT_PCAT_COMPAT);
    for id in 0..num_cpus {
        // ACPI processor UID = APIC id = vCPU index.
        t.extend_from_slice(&[MADT_TYPE_LAPIC, MADT_LAPIC_SIZE as u8, id, id]);
        put_u32(&mut t, MADT_LAPIC_ENABLED);
    }
    t.extend_from_slice(&[MADT_TYPE_IOAPIC, MADT_IOAPIC_SIZE as u8, num_cpus, 0]);
    put_u32(&mut t, layout::IOAPIC_START as u32);
    put_u32(&mut t, 0); // GSI base
                        // No interrupt source overrides. PC firmware usually declares ISA IRQ 0 -> GSI 2, but
                        // KVM's default routing sends the in-kernel PIT to IOAPIC pin 0, and every other ISA IRQ
                        // to its own pin, which is exactly the identity mapping the OS assumes by default (edge,
                        // active-high). The SCI gets Linux's implicit default (GSI 9, level, active-low).
    finish(t)
}

/// A standard table header with the length and checksum still zero.
fn header(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_SIZE);
    t.extend_from_slice(signature);
    put_u32(&mut t, 0); // length, set by finish()
    t.push(revision);
    t.push(0); // checksum, set by finish()
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    put_u32(&mut t, OEM_REVISION);
    t.extend_from_slice(CREATOR_ID);
    put_u32(&mut t, CREATOR_REVISION);
    t
}

/// Fills in a table's length and checksum.
fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(t.len()).expect("ACPI tables are small");
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a `len`-byte port I/O block (all zero for "none").
fn put_gas_io(t: &mut Vec<u8>, port: u32, len: u8) {
    if len == 0 {
        t.extend_from_slice(&[0; 12]);
        return;
    }
    t.extend_from_slice(&[GAS_SYSTEM_IO, len * 8, 0, GAS_ACCESS_LEGACY]);
    put_u64(t, u64::from(port));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tables::{sum, u16_at, u32_at, u64_at};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Reads a table through its header's length, checking signature, checksum and that
    /// it ends inside the ACPI area.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        assert!(addr >= layout::ACPI_START);
        let hdr = read(mem, addr, HEADER_SIZE);
        assert_eq!(&hdr[0..4], sig);
        let len = u32_at(&hdr, 4) as usize;
        assert!(
            addr + len as u64 <= layout::ACPI_END,
            "{sig:?} past ACPI_END"
        );
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "{sig:?} checksum");
        assert_eq!(&t[10..16], OEM_ID);
        assert_eq!(&t[16..24], OEM_TABLE_ID);
        assert_eq!(&t[28..32], CREATOR_ID);
        t
    }

    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    fn walk(num_cpus: u8) -> Tables {
        let mem = mem();
        let rsdp_addr = write_acpi_tables(&mem, num_cpus, &[]).unwrap();
        assert_eq!(rsdp_addr.0, layout::ACPI_START);
        assert_eq!(rsdp_addr.0 % 16, 0);

        let rsdp = read(&mem, rsdp_addr.0, RSDP_SIZE);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_SIZE);

        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_SIZE + 16);
        let fadt = table(&mem, u64_at(&xsdt, HEADER_SIZE), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, HEADER_SIZE + 8), b"APIC");

        assert_eq!(fadt.len(), FADT_SIZE);
        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_addr, "DSDT == X_DSDT");
        let dsdt = table(&mem, dsdt_addr, b"DSDT");

        let facs_addr = u64_at(&fadt, 132);
        assert_eq!(u64::from(u32_at(&fadt, 36)), facs_addr);
        assert_eq!(facs_addr % 64, 0);
        let facs = read(&mem, facs_addr, FACS_SIZE);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u32_at(&facs, 4) as usize, FACS_SIZE);
        assert_eq!(u32_at(&facs, 12), 0, "no waking vector");
        assert_eq!(u32_at(&facs, 16), 0, "global lock free");

        Tables { fadt, madt, dsdt }
    }

    #[test]
    fn fadt_describes_pm1a_blocks() {
        let Tables { fadt, .. } = walk(1);
        assert_eq!(fadt[8], FADT_REVISION);
        assert_eq!(u16_at(&fadt, 46), SCI_INT);
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(&fadt, 56), u32::from(layout::ACPI_PM1A_EVT_PORT));
        assert_eq!(u32_at(&fadt, 64), u32::from(layout::ACPI_PM1A_CNT_PORT));
        for off in [60, 68, 72, 76, 80, 84] {
            assert_eq!(u32_at(&fadt, off), 0, "block at {off} must be absent");
        }
        assert_eq!(&fadt[88..94], &[4, 2, 0, 0, 0, 0]);
        let flags = u32_at(&fadt, 112);
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        assert_eq!(flags & (1 << 10), 0, "no reset register");
        assert_ne!(flags & FADT_WBINVD, 0);
        assert_ne!(flags & FADT_PWR_BUTTON, 0);
        assert_ne!(flags & FADT_SLP_BUTTON, 0);
        let boot_arch = u16_at(&fadt, 109);
        assert_eq!(boot_arch & BOOT_ARCH_8042, 0, "no 8042 for the guest to probe");
        assert_ne!(boot_arch & BOOT_ARCH_NO_CMOS_RTC, 0);
        assert_eq!(boot_arch & (1 << 3), 0, "MSI not disabled");

        // The X_ blocks agree with the 32-bit ones, address and width.
        assert_eq!(&fadt[148..151], &[GAS_SYSTEM_IO, 32, 0]);
        assert_eq!(u64_at(&fadt, 152), u64::from(layout::ACPI_PM1A_EVT_PORT));
        assert_eq!(&fadt[172..175], &[GAS_SYSTEM_IO, 16, 0]);
        assert_eq!(u64_at(&fadt, 176), u64::from(layout::ACPI_PM1A_CNT_PORT));
        for off in [160, 184, 196, 208, 220, 232, 244, 256] {
            assert_eq!(
                &fadt[off..off + 12],
                &[0; 12],
                "GAS at {off} must be absent"
            );
        }
    }

    #[test]
    fn dsdt_carries_s5_package() {
        let Tables { dsdt, .. } = walk(1);
        let aml = &dsdt[HEADER_SIZE..];
        let s5 = [
            8, 0x5f, 0x53, 0x35, 0x5f, 0x12, 7, 4, 0x0a, S5_SLP_TYP, 0, 0, 0,
        ];
        assert_eq!(aml, &s5);
        // PkgLength counts from itself to the end of the package.
        assert_eq!(usize::from(aml[6]), aml.len() - 6);
    }

    fn check_madt(num_cpus: u8) {
        let Tables { madt, .. } = walk(num_cpus);
        assert_eq!(u32_at(&madt, 36), layout::APIC_START as u32);
        assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
        let (mut lapics, mut ioapics) = (0u8, 0);
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], usize::from(madt[off + 1]));
            match ty {
                MADT_TYPE_LAPIC => {
                    assert_eq!(len, MADT_LAPIC_SIZE);
                    assert_eq!(madt[off + 2], lapics, "processor UID");
                    assert_eq!(madt[off + 3], lapics, "APIC id");
                    assert_eq!(u32_at(&madt, off + 4), MADT_LAPIC_ENABLED);
                    lapics += 1;
                }
                MADT_TYPE_IOAPIC => {
                    assert_eq!(len, MADT_IOAPIC_SIZE);
                    assert_eq!(madt[off + 2], num_cpus);
                    assert_eq!(u32_at(&madt, off + 4), layout::IOAPIC_START as u32);
                    assert_eq!(u32_at(&madt, off + 8), 0);
                    ioapics += 1;
                }
                t => panic!("unexpected MADT entry type {t}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!((lapics, ioapics), (num_cpus, 1));
    }

    #[test]
    fn madt_lists_every_cpu_and_everything_fits() {
        for n in [1, 2, 8, MAX_CPUS] {
            check_madt(n);
        }
    }

    #[test]
    fn only_madt_moves_with_cpu_count() {
        let (a, b) = (mem(), mem());
        write_acpi_tables(&a, 1, &[]).unwrap();
        write_acpi_tables(&b, MAX_CPUS, &[]).unwrap();
        // Everything before the MADT is byte-identical: the MADT is last and nothing
        // records its length but itself.
        let xsdt = table(
            &a,
            u64_at(&read(&a, layout::ACPI_START, RSDP_SIZE), 24),
            b"XSDT",
        );
        let madt_addr = u64_at(&xsdt, HEADER_SIZE + 8);
        let len = (madt_addr - layout::ACPI_START) as usize;
        assert_eq!(
            read(&a, layout::ACPI_START, len),
            read(&b, layout::ACPI_START, len)
        );
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(
            write_acpi_tables(&mem(), 0, &[]),
            Err(AcpiError::NoCpus)
        ));
        assert!(matches!(
            write_acpi_tables(&mem(), 255, &[]),
            Err(AcpiError::TooManyCpus(255))
        ));
    }

    #[test]
    fn reports_unbacked_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa0000)]).unwrap();
        assert!(matches!(
            write_acpi_tables(&mem, 1, &[]),
            Err(AcpiError::Write(_))
        ));
    }
}
