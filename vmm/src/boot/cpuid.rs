//! Per-vCPU CPUID: KVM's supported set with the leaves Linux reads for topology fixed up.
//!
//! `KVM_GET_SUPPORTED_CPUID` describes what the host can offer, not one particular
//! machine: the APIC ids, core counts and cache sharing in it belong to nobody. Linux
//! builds its topology from these leaves, so each vCPU gets them rewritten to describe
//! one socket with `vcpus` single-threaded cores, this vCPU being core `index`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31, "running under a hypervisor": lets the kernel pick paravirtual
/// clocks and skip work that is pointless in a VM.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, HTT: the package may have more than one logical processor.
const HTT_BIT: u32 = 1 << 28;
/// CPUID.1:ECX bit 24, TSC-deadline timer. Without it Linux calibrates the LAPIC timer
/// against the PIT and programs it through MMIO; measured in the lab, that cost a guest
/// about a second of boot.
const TSC_DEADLINE_BIT: u32 = 1 << 24;
/// CPUID.6:ECX bit 3, energy-performance bias: there is no such MSR to back it.
const EPB_BIT: u32 = 1 << 3;

/// Leaf 0xB / 0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// What the host's KVM offers beyond its supported CPUID.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostFeatures {
    pub tsc_deadline_timer: bool,
}

/// Fixes up `cpuid` in place for vCPU `index` of `vcpus`.
pub fn configure(cpuid: &mut CpuId, index: u8, vcpus: u8, host: HostFeatures) {
    let index = u32::from(index);
    let vcpus = u32::from(vcpus);
    // Bits needed to hold a core id, as leaf 0xB's shift counts want it.
    let core_bits = 32 - (vcpus.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        fix_entry(entry, index, vcpus, core_bits);
        if entry.function == 0x1 && host.tsc_deadline_timer {
            entry.ecx |= TSC_DEADLINE_BIT;
        }
    }
}

fn fix_entry(entry: &mut kvm_cpuid_entry2, index: u32, vcpus: u32, core_bits: u32) {
    match entry.function {
        0x1 => {
            entry.ecx |= HYPERVISOR_BIT;
            // EBX: [31:24] initial APIC id, [23:16] logical processors in the package,
            // [15:8] CLFLUSH line size in 8-byte units.
            entry.ebx = (index << 24) | (vcpus << 16) | (8 << 8);
            if vcpus > 1 {
                entry.edx |= HTT_BIT;
            } else {
                entry.edx &= !HTT_BIT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1,
            // EAX[25:14] = logical processors sharing this cache - 1. Caches from
            // L3 up are shared by the whole package, lower ones are per core.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { vcpus - 1 } else { 0 };
            entry.eax &= 0x3fff;
            entry.eax |= ((vcpus - 1) << 26) | (sharing << 14);
        }
        0x6 => entry.ecx &= !EPB_BIT,
        0xb | 0x1f => {
            // Extended topology: sub-leaf 0 is the SMT level (one thread per core),
            // sub-leaf 1 the core level, the rest invalid.
            entry.edx = index;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = LEVEL_TYPE_SMT << 8;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = vcpus;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                }
                n => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = n;
                }
            }
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] = threads in the package - 1, [15:12] = APIC id size.
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (vcpus - 1);
        }
        0x8000_001e => {
            // AMD extended APIC id / compute unit: one thread per core, one node.
            entry.eax = index;
            entry.ebx = index & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_n_cores() {
        let entries = [leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2), leaf(4, 0)];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure(&mut cpuid, 3, 4, HostFeatures { tsc_deadline_timer: true });
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        assert_ne!(l1.ecx & TSC_DEADLINE_BIT, 0);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx), (0, 0));
        assert_eq!(find(&cpuid, 4, 0).eax >> 26, 3);
    }

    #[test]
    fn a_single_vcpu_has_no_htt() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0)]).unwrap();
        cpuid.as_mut_slice()[0].edx = HTT_BIT;
        configure(&mut cpuid, 0, 1, HostFeatures::default());
        assert_eq!(find(&cpuid, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(find(&cpuid, 1, 0).ecx & TSC_DEADLINE_BIT, 0, "only where KVM has it");
    }
}
