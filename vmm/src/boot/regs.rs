//! The boot CPU's registers at the kernel's entry point, and the structures they point at.
//!
//! Two entry paths: the 64-bit Linux boot protocol (long mode, identity-mapped paging,
//! `rsi` = zero page) and PVH (32-bit protected mode, paging off, `rbx` = start info).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot {what} to guest memory: {source}")]
    Write {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit entry of the Linux boot protocol.
    Linux64,
    /// Xen PVH entry, 32-bit protected mode without paging.
    Pvh,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors: 0 null, 1 code, 2 data, 3 TSS.
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

/// Packs a segment descriptor (flags in the 12-bit access+flags layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn gdt_table(mode: EntryMode) -> [u64; 4] {
    // Long mode wants L=1 (0xa09b); PVH wants a flat 32-bit code segment (0xc09b).
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Turns a GDT entry back into the segment register KVM wants to see.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // With G=1 the limit counts 4 KiB pages.
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    value: T,
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::Write { what, source })
}

/// Writes the GDT, the empty IDT and (for 64-bit entry) identity page tables covering the
/// first GiB, and returns the special registers that use them.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = gdt_table(mode);
    for (i, entry) in gdt.iter().enumerate() {
        write(mem, *entry, BOOT_GDT_START + i as u64 * 8, "GDT")?;
    }
    write(mem, 0u64, BOOT_IDT_START, "IDT")?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment(gdt[1], CODE_SELECTOR);
    let data = segment(gdt[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], TSS_SELECTOR);

    match mode {
        EntryMode::Linux64 => {
            // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 512 x 2 MiB = the first GiB, which
            // covers everything the decompressor touches before it builds its own tables.
            write(mem, PDPTE_START | 0x03, PML4_START, "PML4")?;
            write(mem, PDE_START | 0x03, PDPTE_START, "PDPT")?;
            for i in 0..512u64 {
                write(mem, (i << 21) | 0x83, PDE_START + i * 8, "page directory")?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// General-purpose registers at the entry point.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and reads as 1
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Real mode at `entry` with every segment at base 0: the reset state, moved from the
/// top of the first megabyte (where firmware would be) to a program in low memory.
pub fn real_mode_entry(mut sregs: kvm_sregs, entry: u64) -> (kvm_sregs, kvm_regs) {
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss, &mut sregs.fs, &mut sregs.gs] {
        seg.base = 0;
        seg.selector = 0;
    }
    (sregs, kvm_regs { rflags: 0x2, rip: entry, ..Default::default() })
}

/// x87/SSE state at reset, as the kernel expects it (FCW 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let gdt = gdt_table(EntryMode::Linux64);
        let cs = segment(gdt[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let pvh = segment(gdt_table(EntryMode::Pvh)[1], CODE_SELECTOR);
        assert_eq!((pvh.l, pvh.db), (0, 1));
        let null = segment(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sregs = setup_sregs(&mem, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let regs = boot_regs(EntryMode::Linux64, 0x100200);
        assert_eq!((regs.rip, regs.rsi), (0x100200, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_starts_in_protected_mode_without_paging() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sregs = setup_sregs(&mem, EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(boot_regs(EntryMode::Pvh, 0x1000000).rbx, PVH_INFO_START);
    }
}
