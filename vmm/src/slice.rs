//! Reading a guest by page address, RAM and disks alike: what replica verification
//! digests on each side (the primary's running guest at a pause, the standby's image).

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::disk::{locate, page_of, DiskSet, BLOCK};
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

#[derive(Clone)]
pub struct SliceReader {
    mem: GuestMemoryMmap,
    disks: DiskSet,
}

impl SliceReader {
    pub fn new(mem: GuestMemoryMmap, disks: DiskSet) -> Self {
        Self { mem, disks }
    }

    /// Every span of pages there is, as (first address, pages): the disks first (where
    /// a copy most often goes wrong unnoticed), then the RAM ranges.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        let disks = self.disks.0.iter().enumerate().map(|(i, d)| (page_of(i, 0), d.blocks()));
        let ram = self.mem.iter().map(|r| (r.start_addr().0, r.len() / PAGE_SIZE));
        disks.chain(ram).collect()
    }

    /// `pages` pages from `first`, which must lie in one span.
    pub fn read(&self, first: u64, pages: u32) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; pages as usize * PAGE_SIZE as usize];
        if let Some((disk, block)) = locate(first) {
            let image = self.disks.0.get(disk).filter(|d| block + u64::from(pages) <= d.blocks());
            let image = image.ok_or_else(|| io::Error::other(format!("blocks {first:#x}+{pages} are not on this guest's disks")))?;
            for (i, page) in out.chunks_mut(BLOCK as usize).enumerate() {
                image.read_block(block + i as u64, page)?;
            }
            return Ok(out);
        }
        self.mem
            .read_slice(&mut out, GuestAddress(first))
            .map_err(|e| io::Error::other(format!("pages {first:#x}+{pages} are not in this guest's memory: {e}")))?;
        Ok(out)
    }
}
