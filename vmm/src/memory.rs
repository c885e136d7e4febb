//! Guest RAM and its dirty tracking.
//!
//! Two sources see guest writes: KVM's dirty log sees what the vCPUs write, and
//! vm-memory's per-region bitmap sees what the VMM itself writes (loading the kernel,
//! device emulation, later virtio rings). A checkpoint that consulted only one of them
//! would silently miss pages, so [`GuestRam::take_dirty`] returns their union.
//!
//! KVM's log is switched on by the first [`GuestRam::take_dirty`], not at boot, and
//! that first call reports every page. KVM maps a dirty-logged slot with 4 KiB pages
//! only; logging from boot made a guest take 28,700 nested page faults instead of 60
//! on its way to user space, and boot 1.4x slower in the lab. Nothing is lost by
//! starting late: before the first harvest there is no earlier capture to be
//! incremental to, so "every page" is the exact answer, and the log is on before that
//! answer is returned, so no write can fall between the two.

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

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
    Allocate { mib: u64, source: std::io::Error },
    #[error("cannot set up guest memory: {0}")]
    Regions(String),
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

/// Huge pages, and the alignment guest RAM needs to be mapped with them.
const HUGE_PAGE: usize = 2 << 20;

/// Anonymous memory at a 2 MiB-aligned address, unmapped on drop.
///
/// KVM maps a guest page with a 2 MiB nested-paging entry only when the guest-physical
/// and host-virtual addresses agree modulo 2 MiB; a plain mmap is merely 4 KiB aligned,
/// so every guest page would fault in separately (28,700 faults against QEMU's 424 for
/// one boot, measured in the lab, where each fault is costly).
struct AlignedMapping {
    addr: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving the owner between
// threads moves nothing but the address.
unsafe impl Send for AlignedMapping {}
// SAFETY: as above; all access to the bytes goes through vm-memory's volatile accessors.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    fn new(size: usize) -> std::io::Result<Self> {
        let reserve = size + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; no
        // existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = reserve - head - size;
        // SAFETY: both ranges lie inside the mapping made above and outside the part
        // kept; unmapping the slack cannot touch any other memory.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail);
            }
            // Where THP is "madvise" (Debian's default), only this asks for huge pages.
            // It is advice: failure leaves ordinary pages, so the result is ignored.
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        Ok(Self {
            addr: aligned as *mut u8,
            size,
        })
    }
}

impl AlignedMapping {
    /// Drops every page of the mapping: the next touch of any finds it zero.
    fn discard(&self) -> std::io::Result<()> {
        // SAFETY: the range is exactly the private anonymous mapping this value owns;
        // MADV_DONTNEED on such memory only replaces its pages with zero pages.
        let rc = unsafe { libc::madvise(self.addr.cast(), self.size, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and is owned by this value alone; the
        // GuestMemoryMmap that pointed into it is dropped first (see GuestRam).
        unsafe { libc::munmap(self.addr.cast(), self.size) };
    }
}

/// Plain memory laid out as guest RAM is (2 MiB-aligned, huge pages asked for), for
/// what stands in for guest RAM outside a VM: the pipeline benchmark's standby image,
/// which must fault in as a standby's RAM does, a huge page at a time, not 4 KiB.
pub struct HugeBuffer {
    map: AlignedMapping,
}

impl HugeBuffer {
    /// `len` zero bytes (rounded up to whole pages), backed only once touched.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        Ok(Self { map: AlignedMapping::new(len.max(1).next_multiple_of(PAGE_SIZE as usize))? })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `size` readable bytes owned by this value for its
        // whole life, and only `&mut self` hands out a mutable view of it.
        unsafe { std::slice::from_raw_parts(self.map.addr, self.map.size) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.map.addr, self.map.size) }
    }

    /// Makes every byte zero again without touching a page, as a standby's image is
    /// cleared.
    pub fn discard(&mut self) -> std::io::Result<()> {
        self.map.discard()
    }
}

/// A bitmap with one set bit for each of the `len / PAGE_SIZE` pages of a region.
fn all_pages(len: u64) -> Vec<u64> {
    let pages = len / PAGE_SIZE;
    let mut bits = vec![u64::MAX; pages.div_ceil(64) as usize];
    if pages % 64 != 0 {
        if let Some(last) = bits.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    bits
}

/// Guest RAM registered with KVM, plus the pages handed back by a failed capture.
pub struct GuestRam {
    // Field order is drop order: vm-memory's view goes before the mappings under it.
    mem: GuestMemoryMmap,
    _mappings: Vec<AlignedMapping>,
    /// Pages from a capture that did not complete: they must show up in the next one.
    carried: DirtyPages,
    /// Whether KVM's dirty log is on (from the first harvest onwards).
    logging: bool,
}

impl GuestRam {
    /// Allocates `mem_mib` MiB of anonymous guest memory.
    pub fn new(mem_mib: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(MemoryError::BadSize(mem_mib));
        }
        let mut mappings = Vec::new();
        let mut regions = Vec::new();
        for (guest_addr, size) in ram_ranges(mem_mib << 20) {
            let mapping = AlignedMapping::new(size)
                .map_err(|source| MemoryError::Allocate { mib: mem_mib, source })?;
            // SAFETY: `mapping` is a live mapping of exactly `size` bytes that outlives the
            // region (GuestRam drops `mem` before `_mappings`).
            let region = unsafe {
                MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                    .with_raw_mmap_pointer(mapping.addr)
            }
            .build()
            .map_err(|e| MemoryError::Regions(e.to_string()))?;
            regions.push(
                GuestRegionMmap::new(region, guest_addr)
                    .ok_or_else(|| MemoryError::Regions("region overflows".into()))?,
            );
            mappings.push(mapping);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))?;
        Ok(Self {
            mem,
            _mappings: mappings,
            carried: DirtyPages::default(),
            logging: false,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The size this RAM was made with.
    pub fn mem_mib(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum::<u64>() >> 20
    }

    /// Makes all of guest RAM zero again, without touching a page: a standby's image
    /// starting over from a full epoch.
    pub fn zero(&mut self) -> Result<(), MemoryError> {
        for mapping in &self._mappings {
            mapping.discard().map_err(|e| MemoryError::Regions(format!("cannot clear guest memory: {e}")))?;
        }
        Ok(())
    }

    /// Registers every region with KVM as slot 0, 1, ..., with dirty logging as it
    /// currently stands (off until the first harvest).
    pub fn register(&self, vm: &VmHandle) -> Result<(), MemoryError> {
        self.set_slots(vm, self.logging)
    }

    fn set_slots(&self, vm: &VmHandle, log_dirty: bool) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            // SAFETY: the mapping is owned by `self`, which the VM object owning both
            // keeps alive for as long as the KVM VM exists (see `Vm`'s field order).
            unsafe {
                vm.set_memory_slot(
                    slot as u32,
                    region.start_addr().raw_value(),
                    region.len(),
                    region.as_ptr() as u64,
                    log_dirty,
                )
            }?;
        }
        Ok(())
    }

    /// Every page of guest RAM, as a dirty set.
    pub fn every_page(&self) -> DirtyPages {
        DirtyPages {
            regions: self
                .mem
                .iter()
                .map(|region| (region.start_addr(), all_pages(region.len())))
                .collect(),
        }
    }

    /// Pages written since the previous call, by the guest (KVM's log) or by the VMM
    /// (vm-memory's bitmap), plus any pages handed back with [`GuestRam::give_back`].
    /// The first call turns KVM's log on and reports every page (see the module
    /// comment). Both logs are cleared: the caller now owns these pages until it either
    /// keeps them safely or gives them back.
    pub fn take_dirty(&mut self, vm: &VmHandle) -> Result<DirtyPages, MemoryError> {
        if !self.logging {
            self.set_slots(vm, true)?;
            self.logging = true;
            // What the VMM wrote so far is part of "every page"; start afresh.
            for region in self.mem.iter() {
                std::ops::Deref::deref(region).bitmap().reset();
            }
            self.carried = DirtyPages::default();
            return Ok(self.every_page());
        }
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

    /// How many pages were written since the last harvest, without consuming them:
    /// `None` while tracking has not started (every page counts then).
    pub fn pending_dirty(&mut self, vm: &VmHandle) -> Result<Option<u64>, MemoryError> {
        if !self.logging {
            return Ok(None);
        }
        let pages = self.take_dirty(vm)?;
        self.give_back(&pages);
        Ok(Some(pages.count()))
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
    fn guest_ram_is_mapped_at_huge_page_alignment() {
        let ram = GuestRam::new(64).unwrap();
        for region in ram.memory().iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        ram.memory().write_obj(1u64, GuestAddress((64 << 20) - 8)).unwrap();
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
    fn all_pages_sets_exactly_one_bit_per_page() {
        assert_eq!(all_pages(64 * PAGE_SIZE), vec![u64::MAX]);
        assert_eq!(all_pages(65 * PAGE_SIZE), vec![u64::MAX, 1]);
        let d = DirtyPages {
            regions: vec![(GuestAddress(0), all_pages(100 * PAGE_SIZE))],
        };
        assert_eq!(d.count(), 100);
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
