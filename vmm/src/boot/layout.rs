//! Guest-physical layout of the low megabyte and the boot structures.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB, where
//! neither the kernel nor the initramfs is loaded. The region from `EBDA_START` to 1 MiB
//! is reported reserved in the e820 map so the guest never hands it out as RAM.

/// GDT used for the 64-bit and PVH entry paths.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (the initramfs), after room for 32 memory-map entries.
pub const PVH_MODLIST_START: u64 = 0x6400;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables for the 64-bit entry (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line; `CMDLINE_MAX_SIZE` bytes including the terminating NUL.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area: from here to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table live at the start of the EBDA.
pub const MPTABLE_START: u64 = EBDA_START;
/// ACPI tables (RSDP first) in the BIOS read-only area, where the kernel also scans.
pub const ACPI_START: u64 = 0xe0000;
/// Upper bound of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where the protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x100000;
/// 32-bit MMIO hole below 4 GiB: RAM beyond this continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The virtio-mmio windows, one 4 KiB page each, in the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Their interrupts: IOAPIC pins 16-23, which no ISA device claims.
pub const VIRTIO_GSI_START: u32 = 16;
pub const VIRTIO_SLOTS: usize = 8;
/// The local APIC and IOAPIC, at their architectural addresses inside the MMIO gap.
pub const APIC_START: u64 = 0xfee0_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// KVM needs three pages for the TSS and one for the identity map, out of the guest's way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// ACPI PM1a event block (status + enable), 4 bytes of port I/O.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block, 2 bytes of port I/O; a write with SLP_EN set enters the sleep state.
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// The `\_S5` sleep type value our DSDT advertises.
pub const ACPI_S5_SLP_TYP: u16 = 5;
