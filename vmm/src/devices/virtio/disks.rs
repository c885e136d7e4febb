//! A VM's disks together, each a virtio-blk device in its own virtio-mmio window: what
//! the VM pauses and resumes with its vCPUs, and what a capture takes the written
//! blocks of.

use std::sync::{Arc, Mutex, MutexGuard};

use super::block::{Block, BlockStats};
use super::mmio::MmioTransport;
use crate::disk::{page_of, DiskImage, BLOCK};
use crate::snapshot::{is_zero_page, page};

pub(crate) type Disk = Arc<Mutex<MmioTransport<Block>>>;

fn lock(disk: &Disk) -> MutexGuard<'_, MmioTransport<Block>> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

/// The blocks a capture took, per disk, to be marked written again if the capture is
/// dropped.
#[derive(Debug, Default)]
pub struct TakenBlocks(Vec<Vec<u64>>);

/// Blocks a full capture copied while the guest ran, in address order.
#[derive(Default)]
pub(crate) struct Precopied {
    addresses: Vec<u64>,
    data: Vec<u8>,
}

impl TakenBlocks {
    /// Adds disk `disk`'s `blocks` to what was taken.
    fn absorb(&mut self, disk: usize, blocks: Vec<u64>) {
        if self.0.len() <= disk {
            self.0.resize(disk + 1, Vec::new());
        }
        self.0[disk].extend(blocks);
    }

    /// Adds everything `other` took.
    pub(crate) fn merge(&mut self, other: TakenBlocks) {
        for (disk, blocks) in other.0.into_iter().enumerate() {
            self.absorb(disk, blocks);
        }
    }
}

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

    /// Copies every block that is not zeros while the guest runs, for a full capture:
    /// what the guest writes meanwhile is marked as ever, and the paused part of the
    /// capture reads only that again (see [`Disks::capture`]). The disks are not
    /// paused: each block is read with `pread`, and one the guest writes during the
    /// read is marked, so read again.
    /// The marks it took go into `taken` at once, so a capture that fails after it
    /// hands them back.
    pub(crate) fn precopy(&self, taken: &mut TakenBlocks) -> std::io::Result<Precopied> {
        let mut pre = Precopied::default();
        let mut block = vec![0u8; BLOCK as usize];
        for (i, disk) in self.0.iter().enumerate() {
            // Marks from here on are writes the copy below may have missed.
            let (dirty, image) = {
                let mut disk = lock(disk);
                (disk.device_mut().take_dirty(), disk.device().image())
            };
            taken.absorb(i, dirty);
            for b in 0..image.blocks() {
                image.read_block(b, &mut block)?;
                if !is_zero_page(&block) {
                    pre.addresses.push(page_of(i, b));
                    pre.data.extend_from_slice(&block);
                }
            }
        }
        Ok(pre)
    }

    /// The blocks written since the last capture, as pages: their addresses and
    /// contents appended to `addresses` and `data` in address order. For a full
    /// capture, every block that is not zeros (as a full capture leaves out pages of
    /// zeros): those `pre` copied while the guest ran, with the ones written since read
    /// again, or all of them read now. Called while the VM is paused.
    pub(crate) fn capture(&self, full: bool, pre: Option<Precopied>, addresses: &mut Vec<u64>, data: &mut Vec<u8>) -> std::io::Result<TakenBlocks> {
        let mut taken = TakenBlocks::default();
        let (mut again, mut again_data) = (Vec::new(), Vec::new());
        let mut block = vec![0u8; BLOCK as usize];
        let everything = full && pre.is_none();
        for (i, disk) in self.0.iter().enumerate() {
            let mut disk = lock(disk);
            let dirty = disk.device_mut().take_dirty();
            let image: &DiskImage = disk.device().disk();
            let blocks: Box<dyn Iterator<Item = u64>> = if everything { Box::new(0..image.blocks()) } else { Box::new(dirty.iter().copied()) };
            let result = blocks.into_iter().try_for_each(|b| {
                image.read_block(b, &mut block)?;
                // Read for a full capture with nothing copied before, a block of zeros
                // is left out at once; one written since a pre-copy stays, to replace
                // its copy.
                if !(everything && is_zero_page(&block)) {
                    again.push(page_of(i, b));
                    again_data.extend_from_slice(&block);
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
        let Some(pre) = pre else {
            addresses.extend(again);
            data.extend_from_slice(&again_data);
            return Ok(taken);
        };
        // Both lists are in address order: merge them, the block read now winning,
        // and left out if it is zeros now.
        let (mut p, mut n) = (0, 0);
        while p < pre.addresses.len() || n < again.len() {
            let (pa, na) = (pre.addresses.get(p).copied().unwrap_or(u64::MAX), again.get(n).copied().unwrap_or(u64::MAX));
            if na <= pa {
                let block = page(&again_data, n);
                if !is_zero_page(block) {
                    addresses.push(na);
                    data.extend_from_slice(block);
                }
                n += 1;
                p += usize::from(na == pa);
            } else {
                addresses.push(pa);
                data.extend_from_slice(page(&pre.data, p));
                p += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::IrqTrigger;
    use crate::disk::DiskConfig;
    use crate::memory::GuestRam;

    #[test]
    fn a_full_capture_after_a_precopy_takes_what_was_written_since_and_drops_what_became_zeros() {
        let path = std::env::temp_dir().join(format!("tandem-disks-precopy-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(4 * BLOCK).unwrap();
        let image = Arc::new(DiskImage::open(&DiskConfig { path: path.clone(), readonly: false }).unwrap());
        let ram = GuestRam::new(16).unwrap();
        let block = Block::new("blk0", image.clone());
        let transport = MmioTransport::new(block, 0xd000_0000, IrqTrigger::new(|| Ok(())), ram.memory().clone()).unwrap();
        let disks = Disks(vec![Arc::new(Mutex::new(transport))]);
        let fill = |b: u64, v: u8| image.write_block(b, &[v; BLOCK as usize]).unwrap();
        fill(0, 1);
        fill(2, 2);
        let mut taken = TakenBlocks::default();
        let pre = disks.precopy(&mut taken).unwrap();
        assert_eq!(pre.addresses, [page_of(0, 0), page_of(0, 2)]);
        // The guest writes while the copy goes on: block 2 becomes zeros, 3 gets data.
        fill(2, 0);
        fill(3, 3);
        lock(&disks.0[0]).device_mut().give_back(&[2, 3]);
        let (mut addresses, mut data) = (Vec::new(), Vec::new());
        let again = disks.capture(true, Some(pre), &mut addresses, &mut data).unwrap();
        assert_eq!(addresses, [page_of(0, 0), page_of(0, 3)]);
        assert_eq!((data[0], data[BLOCK as usize]), (1, 3));
        assert_eq!(again.0, [vec![2, 3]]);
        // A delta now has nothing to take: every mark was consumed.
        let (mut addresses, mut data) = (Vec::new(), Vec::new());
        disks.capture(false, None, &mut addresses, &mut data).unwrap();
        assert!(addresses.is_empty());
        let _ = std::fs::remove_file(path);
    }
}
