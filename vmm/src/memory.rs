//! Guest RAM and its dirty tracking.

/// Guest memory as the VMM sees it: mmap-backed regions, each with a bitmap that records
/// the pages the VMM itself writes (KVM's dirty log cannot see those).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
