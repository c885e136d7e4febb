//! A VM's disks together, each a virtio-blk device in its own virtio-mmio window: what
//! the VM pauses and resumes with its vCPUs, and what a capture takes the written
//! blocks of.

use std::sync::{Arc, Mutex, MutexGuard};

use super::block::{Block, BlockStats};
use super::mmio::MmioTransport;
use crate::disk::{page_of, DiskImage, BLOCK};

pub(crate) type Disk = Arc<Mutex<MmioTransport<Block>>>;

fn lock(disk: &Disk) -> MutexGuard<'_, MmioTransport<Block>> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

/// The blocks a capture took, per disk, to be marked written again if the capture is
/// dropped.
#[derive(Debug, Default)]
pub struct TakenBlocks(Vec<Vec<u64>>);

#[derive(Default)]
pub struct Disks(pub(crate) Vec<Disk>);

impl Disks {
    /// Serves no request until [`Disks::resume`]; returns once none is being served.
    pub fn pause(&self) {
        self.0.iter().for_each(|d| lock(d).device_mut().set_paused(true));
    }

    /// Serves what the guest queued meanwhile, and what it queues from now on.
    pub fn resume(&self) {
        for disk in &self.0 {
            let mut disk = lock(disk);
            disk.device_mut().set_paused(false);
            disk.process_queue(0);
        }
    }

    /// The blocks written since the last capture (every block, for a full one), as
    /// pages: their addresses and contents appended to `addresses` and `data`. A full
    /// capture leaves out blocks of zeros, as it leaves out pages of zeros. Called while
    /// the VM is paused.
    pub(crate) fn capture(&self, full: bool, addresses: &mut Vec<u64>, data: &mut Vec<u8>) -> std::io::Result<TakenBlocks> {
        let mut taken = TakenBlocks::default();
        let mut block = vec![0u8; BLOCK as usize];
        for (i, disk) in self.0.iter().enumerate() {
            let mut disk = lock(disk);
            let dirty = disk.device_mut().take_dirty();
            let image: &DiskImage = disk.device().disk();
            let blocks: Box<dyn Iterator<Item = u64>> = if full { Box::new(0..image.blocks()) } else { Box::new(dirty.iter().copied()) };
            let result = blocks.into_iter().try_for_each(|b| {
                image.read_block(b, &mut block)?;
                if !(full && crate::snapshot::is_zero_page(&block)) {
                    addresses.push(page_of(i, b));
                    data.extend_from_slice(&block);
                }
                Ok(())
            });
            taken.0.push(dirty);
            if let Err(e) = result {
                drop(disk);
                self.give_back(&taken);
                return Err(e);
            }
        }
        Ok(taken)
    }

    /// Marks the blocks of a dropped capture written again.
    pub(crate) fn give_back(&self, taken: &TakenBlocks) {
        for (disk, blocks) in self.0.iter().zip(&taken.0) {
            lock(disk).device_mut().give_back(blocks);
        }
    }

    /// The images behind the disks, in order.
    pub fn images(&self) -> crate::disk::DiskSet {
        crate::disk::DiskSet(self.0.iter().map(|d| lock(d).device().image()).collect())
    }

    pub fn stats(&self) -> Vec<BlockStats> {
        self.0.iter().map(|d| lock(d).device().stats()).collect()
    }
}
