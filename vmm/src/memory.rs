//! Guest RAM and its dirty tracking.
//!
//! Two sources see guest writes: KVM's dirty log sees what the vCPUs write, and
//! vm-memory's per-region bitmap sees what the VMM itself writes (loading the kernel,
//! device emulation, later virtio rings). A checkpoint that consulted only one of them
//! would silently miss pages, so [`GuestRam::take_dirty`] returns their union.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::kvm::{KvmError, VmHandle};

/// Guest memory as the VMM sees it: mmap-backed regions, each with a bitmap that records
/// the pages the VMM itself writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest page size used by every dirty bitmap.
pub const PAGE_SIZE: u64 = 4096;

/// Smallest guest the VMM accepts: room for the boot structures and a kernel.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest accepted; keeps the arithmetic and the e820 map simple.
pub const MAX_MEM_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {0} MiB")]
    BadSize(u64),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

/// The guest-physical ranges backing `mem_bytes` of RAM: below the 32-bit MMIO gap first,
/// the rest from 4 GiB up.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (mem_bytes - low) as usize));
    }
    ranges
}

/// Pages dirtied since some earlier point: one bitmap per RAM region, bit `i` of region
/// `r` standing for page `i` of that region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<(GuestAddress, Vec<u64>)>,
}

impl DirtyPages {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, bits)| bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Guest-physical address of every dirty page, in ascending order.
    pub fn addresses(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(|(base, bits)| {
            bits.iter().enumerate().flat_map(move |(word, &w)| {
                (0..64)
                    .filter(move |bit| w & (1 << bit) != 0)
                    .map(move |bit| base.unchecked_add((word as u64 * 64 + bit) * PAGE_SIZE))
            })
        })
    }

    /// Adds every page of `other` to `self`; both must describe the same regions.
    pub fn merge(&mut self, other: &DirtyPages) {
        if self.regions.is_empty() {
            self.regions = other.regions.clone();
            return;
        }
        for ((base, mine), (other_base, theirs)) in self.regions.iter_mut().zip(&other.regions) {
            debug_assert_eq!(base, other_base);
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= b;
            }
        }
    }
}

/// Guest RAM registered with KVM, plus the pages handed back by a failed capture.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// Pages from a capture that did not complete: they must show up in the next one.
    carried: DirtyPages,
}

impl GuestRam {
    /// Allocates `mem_mib` MiB of anonymous guest memory.
    pub fn new(mem_mib: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(MemoryError::BadSize(mem_mib));
        }
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib << 20))
            .map_err(|source| MemoryError::Allocate { mib: mem_mib, source })?;
        Ok(Self {
            mem,
            carried: DirtyPages::default(),
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Registers every region with KVM as slot 0, 1, ... with dirty logging enabled.
    pub fn register(&self, vm: &VmHandle) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            // SAFETY: the mapping is owned by `self.mem`, which the VM object owning both
            // keeps alive for as long as the KVM VM exists (see `Vm`'s field order).
            unsafe {
                vm.add_memory_slot(
                    slot as u32,
                    region.start_addr().raw_value(),
                    region.len(),
                    region.as_ptr() as u64,
                )
            }?;
        }
        Ok(())
    }

    /// Pages written since the previous call, by the guest (KVM's log) or by the VMM
    /// (vm-memory's bitmap), plus any pages handed back with [`GuestRam::give_back`].
    /// Both logs are cleared: the caller now owns these pages until it either keeps
    /// them safely or gives them back.
    pub fn take_dirty(&mut self, vm: &VmHandle) -> Result<DirtyPages, MemoryError> {
        let mut regions = Vec::with_capacity(self.mem.num_regions());
        for (slot, region) in self.mem.iter().enumerate() {
            let mut bits = vm.take_dirty_log(slot as u32, region.len() as usize)?;
            // The region's own bitmap (via Deref to its mapping), not the trait's slice view.
            let vmm_bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm_bits) {
                *k |= v;
            }
            regions.push((region.start_addr(), bits));
        }
        let mut dirty = DirtyPages { regions };
        dirty.merge(&std::mem::take(&mut self.carried));
        Ok(dirty)
    }

    /// Returns pages from a capture that failed, so the next [`GuestRam::take_dirty`]
    /// includes them again instead of losing them.
    pub fn give_back(&mut self, pages: &DirtyPages) {
        self.carried.merge(pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(big[0].1 + big[1].1, 4 << 30);
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(GuestRam::new(MAX_MEM_MIB + 1), Err(MemoryError::BadSize(_))));
    }

    #[test]
    fn vmm_writes_land_in_the_region_bitmap() {
        let ram = GuestRam::new(16).unwrap();
        ram.memory().write_obj(0xdead_u64, GuestAddress(5 * PAGE_SIZE + 8)).unwrap();
        let region = ram.memory().iter().next().unwrap();
        let bitmap = std::ops::Deref::deref(region).bitmap();
        let bits = bitmap.get_and_reset();
        assert_eq!(bits[0], 1 << 5);
        assert!(bitmap.get_and_reset().iter().all(|&w| w == 0));
    }

    #[test]
    fn dirty_pages_count_merge_and_list_addresses() {
        let mut a = DirtyPages {
            regions: vec![(GuestAddress(0), vec![0b101, 0]), (GuestAddress(MMIO_GAP_END), vec![1])],
        };
        let b = DirtyPages {
            regions: vec![(GuestAddress(0), vec![0b110, 1 << 63]), (GuestAddress(MMIO_GAP_END), vec![0])],
        };
        a.merge(&b);
        assert_eq!(a.count(), 5);
        let addrs: Vec<u64> = a.addresses().map(|g| g.raw_value()).collect();
        assert_eq!(addrs, vec![0, PAGE_SIZE, 2 * PAGE_SIZE, 127 * PAGE_SIZE, MMIO_GAP_END]);
        let mut empty = DirtyPages::default();
        empty.merge(&b);
        assert_eq!(empty, b);
    }
}
