//! A whole VM kept up to date capture by capture: every page of guest memory and the
//! latest machine state. It is what a standby holds, epoch after epoch. Its pages live
//! in guest RAM as a VM maps it, so a takeover hands that RAM to the new VM as it is
//! ([`Image::into_parts`] for `Vm::resume_prepared`): no copy, whatever the guest's size.

use vm_memory::{Bytes, GuestAddress};

use crate::disk::{DiskSet, DISK_SPACE};
use crate::memory::{ram_ranges, GuestRam, MAX_MEM_MIB, MIN_MEM_MIB, PAGE_SIZE};

use super::{codec, Kind, MachineState, SnapshotError};

const PAGE: usize = PAGE_SIZE as usize;

pub struct Image {
    mem_mib: u64,
    /// The guest's RAM ranges, as (start, end): a page must lie in one.
    ranges: Vec<(u64, u64)>,
    ram: GuestRam,
    /// The disks its blocks are laid down on, in place: a standby's own copies.
    disks: DiskSet,
    state: Option<MachineState>,
}

impl Image {
    /// An image of a `mem_mib` guest, all zeros and with no machine state yet.
    pub fn new(mem_mib: u64) -> Result<Self, SnapshotError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(SnapshotError::Corrupt(format!("an image of {mem_mib} MiB")));
        }
        let ranges = ram_ranges(mem_mib << 20).into_iter().map(|(base, len)| (base.0, base.0 + len as u64)).collect();
        // Allocated lazily by the kernel: pages never written cost nothing.
        let ram = GuestRam::new(mem_mib)?;
        Ok(Self { mem_mib, ranges, ram, disks: DiskSet::default(), state: None })
    }

    /// The image lays the guest's disk blocks on `disks`. Their contents are the
    /// image's from now on: a full capture makes them what it says.
    pub fn with_disks(self, disks: DiskSet) -> Self {
        Self { disks, ..self }
    }

    fn holds(&self, page: u64) -> bool {
        (page % PAGE_SIZE == 0 && self.ranges.iter().any(|&(start, end)| (start..end).contains(&page))) || self.disks.holds(page)
    }

    #[cfg(test)]
    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(start, end)| (start..end).step_by(PAGE))
    }

    /// The RAM the image is applied into, which a takeover's VM runs on as it is.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// A reader of the image's pages and disk blocks by address, for replica
    /// verification.
    pub fn slices(&self) -> crate::slice::SliceReader {
        crate::slice::SliceReader::new(self.ram.memory().clone(), self.disks.clone())
    }

    /// Whether a capture has been applied: an image without one cannot be restored.
    pub fn is_complete(&self) -> bool {
        self.state.is_some()
    }

    /// Lays `addresses` (with their `data`, page after page) over the image and takes
    /// `state` (encoded by the codec) as the machine's. A `Full` capture replaces the
    /// whole image: pages it leaves out are zeros. Everything is checked before
    /// anything is written, so a bad capture leaves the image as it was.
    pub fn apply(&mut self, kind: Kind, addresses: &[u64], data: &[u8], state: &[u8]) -> Result<(), SnapshotError> {
        self.apply_marked(kind, addresses, &[], &[data], state)
    }

    /// The same, where `zero` marks (per address, or not at all when empty) the pages
    /// that are all zeros and have no bytes in `data`, and the bytes are in pieces of
    /// any length, as a standby received them (see [`crate::pieces`]).
    pub fn apply_marked<D: AsRef<[u8]>>(&mut self, kind: Kind, addresses: &[u64], zero: &[bool], data: &[D], state: &[u8]) -> Result<(), SnapshotError> {
        self.check(addresses, zero, data)?;
        let state = self.machine_state(state)?;
        if kind == Kind::Full {
            self.empty()?;
        }
        let wrote_blocks = self.write(addresses, zero, data, kind == Kind::Full)?;
        self.settle(state, wrote_blocks || kind == Kind::Full)
    }

    /// Empties the image for a full capture laid down batch by batch as it arrives
    /// ([`Image::lay`], then [`Image::finish`]): a standby's first, which no earlier
    /// capture stands behind, so there is nothing to keep and no need to hold the
    /// whole guest aside until it is complete. The image is not restorable until
    /// [`Image::finish`].
    pub fn clear(&mut self) -> Result<(), SnapshotError> {
        self.state = None;
        self.empty()
    }

    /// Lays a batch of the full capture begun with [`Image::clear`]: pages marked zero
    /// are left as the clearing left them.
    pub fn lay<D: AsRef<[u8]>>(&mut self, addresses: &[u64], zero: &[bool], data: &[D]) -> Result<(), SnapshotError> {
        if self.state.is_some() {
            return Err(SnapshotError::Corrupt("pages laid on an image that holds a capture".into()));
        }
        self.check(addresses, zero, data)?;
        self.write(addresses, zero, data, true).map(drop)
    }

    /// Completes the capture laid down since [`Image::clear`] with its machine state.
    pub fn finish(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let state = self.machine_state(state)?;
        self.settle(state, true)
    }

    fn empty(&mut self) -> Result<(), SnapshotError> {
        self.ram.zero()?;
        self.disks.zero().map_err(|e| SnapshotError::Disk(format!("clearing the disks: {e}")))
    }

    fn machine_state(&self, state: &[u8]) -> Result<MachineState, SnapshotError> {
        let state: MachineState = codec::decode(state)?;
        if state.mem_mib != self.mem_mib {
            return Err(SnapshotError::Corrupt(format!("state of a {} MiB VM for a {} MiB image", state.mem_mib, self.mem_mib)));
        }
        Ok(state)
    }

    /// Everything is checked before anything is written, so a bad capture leaves the
    /// image as it was.
    fn check<D: AsRef<[u8]>>(&self, addresses: &[u64], zero: &[bool], data: &[D]) -> Result<(), SnapshotError> {
        if !zero.is_empty() && zero.len() != addresses.len() {
            return Err(SnapshotError::Corrupt(format!("{} zero marks for {} pages", zero.len(), addresses.len())));
        }
        let with_bytes = addresses.len() - zero.iter().filter(|&&z| z).count();
        let len: usize = data.iter().map(|d| d.as_ref().len()).sum();
        if len != with_bytes * PAGE {
            return Err(SnapshotError::Corrupt(format!("{len} bytes for {with_bytes} pages")));
        }
        if let Some(a) = addresses.iter().find(|&&a| !self.holds(a)) {
            return Err(SnapshotError::Corrupt(format!("page {a:#x} lies outside the guest's memory")));
        }
        Ok(())
    }

    /// Writes checked pages; a zero page is skipped on an image `cleared` for them.
    /// Returns whether any disk block was written.
    fn write<D: AsRef<[u8]>>(&mut self, addresses: &[u64], zero: &[bool], data: &[D], cleared: bool) -> Result<bool, SnapshotError> {
        static ZEROS: [u8; PAGE] = [0; PAGE];
        let mem = self.ram.memory();
        let disks = &mut self.disks;
        let mut wrote_blocks = false;
        let mut bounce = [0u8; PAGE];
        crate::pieces::each_page(addresses, zero, data, |a, parts| -> Result<(), SnapshotError> {
            let parts = match parts {
                None if cleared => return Ok(()),
                None => &[&ZEROS[..]][..],
                Some(parts) => parts,
            };
            if a >= DISK_SPACE {
                // A disk takes a block whole.
                let block = match parts {
                    [one] => *one,
                    _ => {
                        crate::pieces::gather(parts, &mut bounce);
                        &bounce[..]
                    }
                };
                disks.write_page(a, block).map_err(|e| SnapshotError::Disk(format!("writing a disk block: {e}")))?;
                wrote_blocks = true;
                return Ok(());
            }
            let mut at = a;
            for part in parts {
                mem.write_slice(part, GuestAddress(at))
                    .map_err(|_| SnapshotError::Corrupt(format!("page {a:#x} lies outside the guest's memory")))?;
                at += part.len() as u64;
            }
            Ok(())
        })?;
        Ok(wrote_blocks)
    }

    /// Takes `state` as the machine's, once the disk blocks written (if `blocks`) are
    /// on the standby's stable storage: the epoch is acknowledged after this returns,
    /// as the durability point promises.
    fn settle(&mut self, state: MachineState, blocks: bool) -> Result<(), SnapshotError> {
        if blocks && !self.disks.is_empty() {
            self.disks.sync().map_err(|e| SnapshotError::Disk(format!("syncing the disks: {e}")))?;
        }
        self.state = Some(state);
        Ok(())
    }

    /// The image as a full snapshot (its zero pages left out): how the tests read it.
    /// A takeover uses [`Image::into_parts`] instead, which copies nothing.
    #[cfg(test)]
    pub fn to_snapshot(&self) -> Result<super::Snapshot, SnapshotError> {
        let state = self.state.clone().ok_or_else(|| SnapshotError::Corrupt("no capture applied yet".into()))?;
        let mut pages = Vec::new();
        let mut data = Vec::new();
        let mut page = vec![0u8; PAGE];
        for a in self.pages() {
            self.ram
                .memory()
                .read_slice(&mut page, GuestAddress(a))
                .map_err(|_| SnapshotError::Corrupt(format!("page {a:#x} cannot be read")))?;
            if !super::is_zero_page(&page) {
                pages.push(a);
                data.extend_from_slice(&page);
            }
        }
        Ok(super::Snapshot { kind: Kind::Full, state, pages, data, page_crcs: Vec::new() })
    }

    /// The guest's RAM and machine state, for a VM that takes over from them.
    pub fn into_parts(self) -> Result<(GuestRam, MachineState), SnapshotError> {
        let state = self.state.ok_or_else(|| SnapshotError::Corrupt("no capture applied yet".into()))?;
        Ok((self.ram, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(mem_mib: u64, marker: u64) -> Vec<u8> {
        let mut s = MachineState { mem_mib, vcpus: 1, vcpu_states: vec![Default::default()], ..Default::default() };
        s.vm.clock.clock = marker;
        codec::encode(&s).unwrap()
    }

    #[test]
    fn captures_apply_in_order_and_the_last_state_wins() {
        let mut image = Image::new(16).unwrap();
        assert!(!image.is_complete());
        assert!(image.to_snapshot().is_err(), "nothing to restore yet");
        image.apply(Kind::Delta, &[0x1000, 0x3000], &[[1u8; PAGE], [2u8; PAGE]].concat(), &state(16, 1)).unwrap();
        image.apply(Kind::Delta, &[0x3000, 0x5000], &[[3u8; PAGE], [0u8; PAGE]].concat(), &state(16, 2)).unwrap();
        let snap = image.to_snapshot().unwrap();
        assert_eq!(snap.pages, [0x1000, 0x3000], "zero pages are left out");
        assert_eq!(snap.page_at(0x3000).unwrap(), &[3u8; PAGE][..]);
        assert_eq!(snap.state.vm.clock.clock, 2);
        assert_eq!(snap.kind, Kind::Full);
    }

    #[test]
    fn pages_marked_zero_carry_no_bytes_and_clear_what_the_image_held() {
        let mut image = Image::new(16).unwrap();
        image.apply(Kind::Delta, &[0x1000, 0x2000], &[[1u8; PAGE], [2u8; PAGE]].concat(), &state(16, 1)).unwrap();
        // 0x1000 becomes zero; 0x3000 comes with its bytes after a marked page.
        image.apply_marked(Kind::Delta, &[0x1000, 0x3000], &[true, false], &[&[3u8; PAGE][..]], &state(16, 2)).unwrap();
        let snap = image.to_snapshot().unwrap();
        assert_eq!(snap.pages, [0x2000, 0x3000]);
        assert_eq!(snap.page_at(0x3000).unwrap(), &[3u8; PAGE][..]);
        assert!(image.apply_marked(Kind::Delta, &[0x1000], &[true, true], &[] as &[&[u8]], &state(16, 3)).is_err(), "marks per page");
        assert!(image.apply_marked(Kind::Delta, &[0x1000], &[true], &[&[3u8; PAGE][..]], &state(16, 3)).is_err(), "bytes of a zero page");
        image.apply_marked(Kind::Full, &[0x1000, 0x2000], &[true, false], &[&[4u8; PAGE][..]], &state(16, 4)).unwrap();
        assert_eq!(image.to_snapshot().unwrap().pages, [0x2000]);
    }

    #[test]
    fn a_bad_capture_leaves_the_image_as_it_was() {
        let mut image = Image::new(16).unwrap();
        image.apply(Kind::Delta, &[0x1000], &[1u8; PAGE], &state(16, 1)).unwrap();
        let outside = 16 << 20;
        assert!(image.apply(Kind::Delta, &[0x1000, outside], &[[9u8; PAGE], [9u8; PAGE]].concat(), &state(16, 2)).is_err());
        assert!(image.apply(Kind::Delta, &[0x1001], &[9u8; PAGE], &state(16, 2)).is_err(), "a page off its boundary");
        assert!(image.apply(Kind::Delta, &[0x1000], &[9u8; 10], &state(16, 2)).is_err());
        assert!(image.apply(Kind::Delta, &[0x1000], &[9u8; PAGE], &state(32, 2)).is_err());
        assert!(image.apply(Kind::Delta, &[0x1000], &[9u8; PAGE], b"garbage").is_err());
        let snap = image.to_snapshot().unwrap();
        assert_eq!(snap.page_at(0x1000).unwrap(), &[1u8; PAGE][..]);
        assert_eq!(snap.state.vm.clock.clock, 1);
    }

    #[test]
    fn a_full_capture_laid_batch_by_batch_is_restorable_only_once_finished() {
        let mut image = Image::new(16).unwrap();
        image.apply(Kind::Delta, &[0x1000], &[9u8; PAGE], &state(16, 1)).unwrap();
        assert!(image.lay(&[0x2000], &[], &[&[5u8; PAGE][..]]).is_err(), "not over a capture");
        image.clear().unwrap();
        assert!(!image.is_complete());
        image.lay(&[0x2000, 0x3000], &[false, true], &[&[5u8; PAGE][..]]).unwrap();
        image.lay(&[0x4000], &[], &[&[6u8; PAGE][..]]).unwrap();
        assert!(image.lay(&[0x1001], &[], &[&[6u8; PAGE][..]]).is_err(), "unaligned");
        assert!(!image.is_complete() && image.to_snapshot().is_err());
        image.finish(&state(16, 2)).unwrap();
        let snap = image.to_snapshot().unwrap();
        assert_eq!(snap.pages, vec![0x2000, 0x4000], "what the clearing left, and the batches");
        assert_eq!(snap.data, [[5u8; PAGE], [6u8; PAGE]].concat());
        assert_eq!(snap.state.vm.clock.clock, 2);
    }

    #[test]
    fn a_full_capture_replaces_everything() {
        let mut image = Image::new(16).unwrap();
        image.apply(Kind::Delta, &[0x1000, 0x2000], &[[1u8; PAGE], [2u8; PAGE]].concat(), &state(16, 1)).unwrap();
        image.apply(Kind::Full, &[0x2000], &[5u8; PAGE], &state(16, 2)).unwrap();
        let snap = image.to_snapshot().unwrap();
        assert_eq!(snap.pages, [0x2000], "a page the full capture left out is zeros");
        assert_eq!(snap.page_at(0x2000).unwrap(), &[5u8; PAGE][..]);
    }

    #[test]
    fn the_parts_are_the_guests_ram_as_the_last_capture_left_it() {
        let mut image = Image::new(16).unwrap();
        assert!(Image::new(16).unwrap().into_parts().is_err(), "nothing to resume yet");
        image.apply(Kind::Delta, &[0x1000, 0x2000], &[[1u8; PAGE], [2u8; PAGE]].concat(), &state(16, 1)).unwrap();
        image.apply(Kind::Full, &[0x2000], &[5u8; PAGE], &state(16, 2)).unwrap();
        image.apply(Kind::Delta, &[0x3000], &[6u8; PAGE], &state(16, 3)).unwrap();
        let (ram, state) = image.into_parts().unwrap();
        assert_eq!((ram.mem_mib(), state.vm.clock.clock), (16, 3));
        let page = |a: u64| {
            let mut p = vec![0u8; PAGE];
            ram.memory().read_slice(&mut p, GuestAddress(a)).unwrap();
            p
        };
        assert_eq!(page(0x1000), vec![0u8; PAGE], "cleared by the full capture");
        assert_eq!((page(0x2000), page(0x3000)), (vec![5u8; PAGE], vec![6u8; PAGE]));
    }
}
