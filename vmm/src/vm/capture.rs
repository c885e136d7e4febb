//! Capturing the machine, with the vCPUs stopped only for what must be atomic.
//!
//! A delta copies, while paused, the pages written since the previous capture. A full
//! snapshot of a running VM first copies every page while the guest runs, then the pages
//! written meanwhile, round after round until few are left (pre-copy, as live migration
//! does); only the last round happens while paused. A full snapshot leaves out the
//! pages that are all zeros, sorted out after the guest runs again.

use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes};

use super::page_crc::{crcs_while_copying, zero_page_crc};
use super::{Taken, Vm, VmError};

/// Disk blocks a capture took, as page addresses and their contents.
type Blocks = (Vec<u64>, Vec<u8>);
use crate::memory::{DirtyPages, GuestRam, PAGE_SIZE};
use crate::snapshot::{self, Kind, MachineState, Snapshot};
use crate::state::{StateError, VcpuState, VmState};
use crate::time;

const PAGE: usize = PAGE_SIZE as usize;
/// Pre-copy ends once a round leaves fewer pages than this for the paused copy, once a
/// round no longer halves what is left, or after this many rounds.
const PRECOPY_DONE_PAGES: u64 = 256;
const PRECOPY_ROUNDS: usize = 6;
/// Staging buffers [`Vm::recycle`] keeps: one per epoch a primary has in flight by
/// default (its window), and the one being filled.
const SPARES: usize = 5;

/// The pages a capture holds: every address, sorted, with a slot of data each.
struct Staging {
    addresses: Vec<u64>,
    data: Vec<u8>,
    /// Per slot: whether it may hold anything but zeros.
    nonzero: Vec<bool>,
    /// Per slot, if taken (see [`crcs_while_copying`]): the CRC-32 of what it
    /// holds, taken as the page is copied, while in cache, so that the epoch's checksums
    /// never read the page again. Empty when not taken.
    crcs: Vec<u32>,
    /// Whether `data` is fresh from the allocator, its slots zeros that cost nothing
    /// until written: a zero page then need not be written at all (most of a guest's
    /// memory, in a full capture).
    lazy: bool,
}

impl Staging {
    /// Fresh staging for `pages`, taking their CRCs if `crcs`.
    fn new(pages: &DirtyPages, crcs: bool) -> Self {
        Self::reusing(pages, Vec::new(), crcs)
    }

    /// Like [`Staging::new`], in `buf`'s memory: a buffer that held an earlier delta is
    /// already mapped, and its bytes are all overwritten by the copy. Takes the pages'
    /// CRCs if `crcs`.
    fn reusing(pages: &DirtyPages, mut buf: Vec<u8>, crcs: bool) -> Self {
        let addresses: Vec<u64> = pages.addresses().map(|a| a.raw_value()).collect();
        let len = addresses.len() * PAGE;
        let lazy = buf.capacity() == 0;
        if lazy {
            // Allocated lazily by the kernel: a slot costs memory once written.
            buf = vec![0; len];
        } else if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        let crcs = if crcs { vec![zero_page_crc(); addresses.len()] } else { Vec::new() };
        Self { data: buf, nonzero: vec![!lazy; addresses.len()], crcs, addresses, lazy }
    }

    /// Copies the current contents of `pages`, each of which must have a slot.
    fn copy(&mut self, ram: &GuestRam, pages: &DirtyPages) -> Result<(), VmError> {
        let mem = ram.memory();
        let mut bounce = [0u8; PAGE];
        for gpa in pages.addresses() {
            let slot = self
                .addresses
                .binary_search(&gpa.raw_value())
                .map_err(|_| VmError::Chain(format!("page {:#x} has no staging slot", gpa.raw_value())))?;
            let chunk = &mut self.data[slot * PAGE..(slot + 1) * PAGE];
            let read = |to: &mut [u8]| {
                mem.read_slice(to, gpa)
                    .map_err(|e| VmError::Chain(format!("reading guest page {:#x}: {e}", gpa.raw_value())))
            };
            if !self.lazy {
                read(chunk)?;
                self.nonzero[slot] = !snapshot::is_zero_page(chunk);
                if let Some(crc) = self.crcs.get_mut(slot) {
                    *crc = crc32fast::hash(chunk);
                }
                continue;
            }
            // Through a page that stays in cache, so that a zero page never touches
            // its slot: otherwise a full capture of a mostly empty guest would fault in
            // a staging copy of all its memory to send a few pages.
            read(&mut bounce)?;
            if !snapshot::is_zero_page(&bounce) {
                chunk.copy_from_slice(&bounce);
                self.nonzero[slot] = true;
                if let Some(crc) = self.crcs.get_mut(slot) {
                    *crc = crc32fast::hash(&bounce);
                }
            } else if std::mem::replace(&mut self.nonzero[slot], false) {
                chunk.fill(0);
                if let Some(crc) = self.crcs.get_mut(slot) {
                    *crc = zero_page_crc();
                }
            }
        }
        Ok(())
    }

    /// The pages and their CRCs (if taken), leaving out those that are all zeros when
    /// `drop_zeros`.
    fn into_pages(self, drop_zeros: bool) -> (Vec<u64>, Vec<u8>, Vec<u32>) {
        if !drop_zeros {
            return (self.addresses, self.data, self.crcs);
        }
        let (mut addresses, mut data, mut crcs) = (self.addresses, self.data, self.crcs);
        let mut kept = 0;
        for slot in 0..addresses.len() {
            if !self.nonzero[slot] {
                continue;
            }
            if kept != slot {
                data.copy_within(slot * PAGE..(slot + 1) * PAGE, kept * PAGE);
                addresses[kept] = addresses[slot];
                if !crcs.is_empty() {
                    crcs[kept] = crcs[slot];
                }
            }
            kept += 1;
        }
        addresses.truncate(kept);
        data.truncate(kept * PAGE);
        if !crcs.is_empty() {
            crcs.truncate(kept);
        }
        (addresses, data, crcs)
    }
}

/// Staging buffers kept for later deltas: copied into memory already mapped rather
/// than faulting a page at a time while the guest is stopped. Several, because a buffer
/// comes back only once the frames that carry its pages are gone, and a few epochs are
/// in flight at once: at most [`SPARES`] of them, the largest, and no more than a budget
/// in all. The memory follows what recent deltas needed: a capture takes the smallest
/// spare that holds it, a spare over twice the largest of the last [`IDLE_CAPTURES`]
/// deltas gives the rest back, and a spare no capture took for that long is freed, so
/// that a burst of large deltas costs no memory once it has passed, and small deltas
/// between large ones do not shrink the spares the large ones need.
pub struct Spares {
    /// Largest first, each with the capture count when it came back.
    buffers: Vec<(Vec<u8>, u64)>,
    budget: usize,
    captures: u64,
    /// The largest delta of the last [`IDLE_CAPTURES`] (about), in bytes, and when.
    peak: (usize, u64),
}

/// Captures a spare may wait unused before it is freed.
const IDLE_CAPTURES: u64 = 16;

impl Spares {
    pub fn new(budget: usize) -> Self {
        Self { buffers: Vec::new(), budget, captures: 0, peak: (0, 0) }
    }

    /// Keeps `buffer` if it is among the largest that fit the budget.
    pub fn keep(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() == 0 || buffer.capacity() > self.budget {
            return;
        }
        self.buffers.push((buffer, self.captures));
        self.buffers.sort_unstable_by_key(|(b, _)| std::cmp::Reverse(b.capacity()));
        let mut kept = 0;
        let keep = self
            .buffers
            .iter()
            .take(SPARES)
            .take_while(|(b, _)| {
                kept += b.capacity();
                kept <= self.budget
            })
            .count();
        self.buffers.truncate(keep);
    }

    /// A buffer for `len` bytes: the smallest spare that holds them, else the largest
    /// (grown by the caller), else a new empty one. A spare over twice as large as any
    /// recent delta is shrunk first: its tail goes back to the system, the head stays
    /// mapped.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        self.captures += 1;
        let now = self.captures;
        if len >= self.peak.0 || self.peak.1 + IDLE_CAPTURES < now {
            self.peak = (len, now);
        }
        self.buffers.retain(|&(_, back)| back + IDLE_CAPTURES >= now);
        if len == 0 {
            return Vec::new();
        }
        let fits = self.buffers.iter().rposition(|(b, _)| b.capacity() >= len);
        let Some(i) = fits.or((!self.buffers.is_empty()).then_some(0)) else {
            return Vec::new();
        };
        let mut buffer = self.buffers.remove(i).0;
        let peak = self.peak.0;
        if buffer.capacity() / 2 > peak {
            buffer.truncate(peak);
            buffer.shrink_to(peak);
        }
        buffer
    }
}

/// What a brief pause does, to find out which part of an epoch's work a host cannot
/// stand (the lab's bisection in docs/lab.md). Replication always does `Capture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseWork {
    /// Stop the vCPUs and let them go again.
    Nothing,
    /// Also read every device, VM and vCPU state, as a capture does.
    State,
    /// Also take (and drop) the dirty log, which write-protects the pages it reports.
    DirtyLog,
    /// A whole delta capture, copy included, then dropped.
    Capture,
    /// Only the VM-wide state (clock, PIT, interrupt controllers).
    VmState,
    /// Only each vCPU's state, on its own thread.
    VcpuState,
    /// The dirty log and a copy of the dirty pages, no machine state.
    Copy,
}

impl Vm {
    /// Pauses the vCPUs as an epoch does, does `work`, and resumes; returns how long
    /// the guest was stopped. What was read is dropped.
    pub fn pause_briefly(&mut self, work: PauseWork) -> Result<Duration, VmError> {
        if work == PauseWork::Capture {
            return self.capture_fenced(Kind::Delta, &mut || {}).map(|(_, _, stopped)| stopped);
        }
        let start = Instant::now();
        self.stop_guest()?;
        let result = match work {
            PauseWork::State => self.capture_paused(Kind::Delta, None, &mut DirtyPages::default(), false).map(drop),
            PauseWork::DirtyLog => self.ram.take_dirty(&self.kvm_vm).map(drop).map_err(VmError::from),
            PauseWork::VmState => VmState::capture(&self.kvm_vm).map(drop).map_err(VmError::from),
            PauseWork::VcpuState => {
                let msrs = self.msrs.clone();
                let states = self.vcpus.on_each_paused(move |_, vcpu| VcpuState::capture(vcpu, &msrs).map(drop))?;
                states.into_iter().collect::<Result<(), _>>().map_err(VmError::from)
            }
            PauseWork::Copy => self.ram.take_dirty(&self.kvm_vm).map_err(VmError::from).and_then(|dirty| {
                let mut staging = Staging::new(&dirty, crcs_while_copying(dirty.count() as usize));
                staging.copy(&self.ram, &dirty)
            }),
            PauseWork::Nothing | PauseWork::Capture => Ok(()),
        };
        self.run_guest();
        result.map(|()| start.elapsed())
    }

    /// Takes back a delta snapshot's page data once it is no longer needed, for a
    /// later delta to be copied into (see [`Spares`]: as much as recent deltas needed,
    /// at most the guest's memory in all).
    pub fn recycle(&mut self, data: Vec<u8>) {
        self.spares.keep(data);
    }

    /// Captures the whole machine and lets it run on (a VM the operator paused stays
    /// paused). Returns the snapshot, the pages whose dirty bits it consumed (hand them
    /// back with [`Vm::give_back_dirty`] if the snapshot cannot be kept) and how long the
    /// guest was stopped. Takes no page CRCs: a snapshot file checks itself.
    pub fn capture(&mut self, kind: Kind) -> Result<(Snapshot, Taken, Duration), VmError> {
        self.capture_with(kind, &mut || {}, false)
    }

    /// [`Vm::capture`] as replication takes an epoch: calling `fence` while the vCPUs
    /// are stopped (whatever the guest did before the fence is in the snapshot, and
    /// nothing it did after; replication moves its output gate to the next epoch
    /// there), and taking the pages' CRCs as it copies them where that pays (see
    /// [`crcs_while_copying`]), for the epoch's checksums.
    pub fn capture_fenced(&mut self, kind: Kind, fence: &mut dyn FnMut()) -> Result<(Snapshot, Taken, Duration), VmError> {
        self.capture_with(kind, fence, true)
    }

    fn capture_with(&mut self, kind: Kind, fence: &mut dyn FnMut(), crcs: bool) -> Result<(Snapshot, Taken, Duration), VmError> {
        // Replication begins with a full capture, whose pre-copy runs beside the guest:
        // the CRC's cost is measured there, before any delta's pause could need it (and
        // not when a VM starts, which would put it in a takeover's resume).
        if crcs && kind == Kind::Full {
            super::page_crc::crc_is_cheap();
        }
        let was_paused = self.vcpus.is_paused();
        let mut taken = Taken::default();
        let result = self.capture_into(kind, was_paused, &mut taken, fence, crcs);
        if result.is_err() {
            self.give_back_dirty(&taken);
        }
        let (state, staging, blocks, stopped) = result?;
        let (mut pages, mut data, mut page_crcs) = staging.into_pages(kind == Kind::Full);
        // Disk blocks sort after every page of memory (see `disk::DISK_SPACE`).
        let (block_pages, block_data) = blocks;
        pages.extend(block_pages);
        data.extend_from_slice(&block_data);
        // CRCs go with every page or with none.
        if !page_crcs.is_empty() {
            page_crcs.extend(block_data.chunks_exact(PAGE).map(crc32fast::hash));
        }
        Ok((Snapshot { kind, state, pages, data, page_crcs }, taken, stopped))
    }

    fn capture_into(
        &mut self,
        kind: Kind,
        was_paused: bool,
        taken: &mut Taken,
        fence: &mut dyn FnMut(),
        crcs: bool,
    ) -> Result<(MachineState, Staging, Blocks, Duration), VmError> {
        let (staging, disks) = match kind {
            Kind::Full if !was_paused => {
                let disks = self.virtio.disks.precopy(&mut taken.blocks).map_err(VmError::Disk)?;
                (Some(self.precopy(&mut taken.pages, crcs)?), Some(disks))
            }
            _ => (None, None),
        };
        let start = Instant::now();
        self.stop_guest()?;
        fence();
        let result = self.capture_paused(kind, staging, &mut taken.pages, crcs).and_then(|(state, staging)| {
            // Read while paused: no request is in flight, so the blocks are those the
            // guest's completed writes left.
            let (mut addresses, mut data) = (Vec::new(), Vec::new());
            let blocks = self.virtio.disks.capture(kind == Kind::Full, disks, &mut addresses, &mut data).map_err(VmError::Disk)?;
            taken.blocks.merge(blocks);
            Ok((state, staging, (addresses, data)))
        });
        // Only a pause of our own is undone. It is brief and leaves the guest clock
        // running, unlike an operator's.
        if !was_paused {
            self.run_guest();
        }
        let stopped = start.elapsed();
        tracing::debug!(stopped_us = stopped.as_micros() as u64, "capture");
        result.map(|(state, staging, blocks)| (state, staging, blocks, stopped))
    }

    /// Copies every page while the guest runs, then what it wrote meanwhile, until
    /// little is left for the paused copy; with their CRCs if `crcs`.
    fn precopy(&mut self, taken: &mut DirtyPages, crcs: bool) -> Result<Staging, VmError> {
        taken.merge(&self.ram.take_dirty(&self.kvm_vm)?);
        let every = self.ram.every_page();
        let mut staging = Staging::new(&every, crcs);
        staging.copy(&self.ram, &every)?;
        let mut left = u64::MAX;
        for round in 1..=PRECOPY_ROUNDS {
            let dirty = self.ram.take_dirty(&self.kvm_vm)?;
            taken.merge(&dirty);
            staging.copy(&self.ram, &dirty)?;
            let pages = dirty.count();
            tracing::debug!(round, pages, "pre-copy");
            if pages < PRECOPY_DONE_PAGES || pages > left / 2 {
                break;
            }
            left = pages;
        }
        Ok(staging)
    }

    /// The paused part of a capture; `crcs`: whether the pages' CRCs are wanted (a
    /// delta takes them only where [`crcs_while_copying`] says).
    fn capture_paused(
        &mut self,
        kind: Kind,
        staging: Option<Staging>,
        taken: &mut DirtyPages,
        crcs: bool,
    ) -> Result<(MachineState, Staging), VmError> {
        let phase = Instant::now();
        // Devices first: their state may still raise interrupts into the vCPU state.
        let devices = self.bus.lock().unwrap_or_else(|e| e.into_inner()).save();
        let (mut vm, clock) = VmState::capture(&self.kvm_vm)?;
        let vm_done = phase.elapsed();
        let msrs = self.msrs.clone();
        let mut vcpu_states = self
            .vcpus
            .on_each_paused(move |_, vcpu| {
                let mut state = VcpuState::capture(vcpu, &msrs)?;
                // The TSC as of the clock reading, so the two agree exactly.
                if let Some(tsc) = time::tsc_at(vcpu, clock.host_tsc) {
                    state.set_tsc(tsc);
                }
                Ok::<_, StateError>(state)
            })?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        // Paused by the operator: the guest's time is the frozen one.
        if let Some(frozen) = &self.frozen {
            vm.clock.clock = frozen.clock_ns;
            for (state, tsc) in vcpu_states.iter_mut().zip(&frozen.tsc) {
                if let Some(tsc) = *tsc {
                    state.set_tsc(tsc);
                }
            }
        }
        let vcpus_done = phase.elapsed();
        let dirty = self.ram.take_dirty(&self.kvm_vm)?;
        taken.merge(&dirty);
        let dirty_done = phase.elapsed();
        let staging = match (kind, staging) {
            // Pre-copied: only what the guest wrote since the last round.
            (Kind::Full, Some(mut staging)) => {
                staging.copy(&self.ram, &dirty)?;
                staging
            }
            (Kind::Full, None) => {
                let every = self.ram.every_page();
                let mut staging = Staging::new(&every, crcs);
                staging.copy(&self.ram, &every)?;
                staging
            }
            (Kind::Delta, _) => {
                let pages = dirty.count() as usize;
                let mut staging = Staging::reusing(&dirty, self.spares.take(pages * PAGE), crcs && crcs_while_copying(pages));
                staging.copy(&self.ram, &dirty)?;
                staging
            }
        };
        // Where the stopped time goes, for tuning it.
        tracing::debug!(
            vm_and_devices_us = vm_done.as_micros() as u64,
            vcpus_us = (vcpus_done - vm_done).as_micros() as u64,
            dirty_log_us = (dirty_done - vcpus_done).as_micros() as u64,
            copy_us = (phase.elapsed() - dirty_done).as_micros() as u64,
            pages = dirty.count(),
            "capture"
        );
        let state = MachineState {
            mem_mib: self.memory_mib(),
            vcpus: vcpu_states.len() as u8,
            vm,
            vcpu_states,
            devices,
        };
        Ok((state, staging))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn spare_buffers_are_the_largest_few_within_the_budget() {
        let kept = |budget: usize, sizes: &[usize]| {
            let mut spares = Spares::new(budget);
            sizes.iter().for_each(|&n| spares.keep(Vec::with_capacity(n)));
            std::iter::from_fn(|| Some(spares.take(usize::MAX).capacity()).filter(|&c| c > 0)).collect::<Vec<_>>()
        };
        let sizes = [5, 10, 40, 20, 30, 50, 60];
        assert_eq!(kept(1000, &sizes), [60, 50, 40, 30, 20], "at most five, the largest");
        assert_eq!(kept(120, &sizes), [60, 50], "no more than the budget in all");
        assert!(kept(10, &[60, 50]).is_empty());
    }

    #[test]
    fn spare_buffers_follow_what_recent_deltas_needed() {
        let mut spares = Spares::new(1 << 20);
        [4096, 8192, 65536].into_iter().for_each(|n| spares.keep(vec![7; n]));
        let small = spares.take(6000);
        assert_eq!(small.capacity(), 8192, "the smallest that holds the delta");
        let big = spares.take(20000);
        assert_eq!(big.capacity(), 20000, "over twice the largest recent delta: shrunk to it");
        spares.keep(big);
        assert_eq!(spares.take(30000).capacity(), 20000, "too small: the largest, for the caller to grow");
        assert_eq!(spares.take(0).capacity(), 0, "an empty delta takes nothing");

        // A spare cycled through small deltas keeps the size a recent large one needed,
        // and gives it back once the large ones are past; one left unused is freed.
        let mut spares = Spares::new(1 << 20);
        spares.keep(Vec::with_capacity(65536));
        spares.keep(Vec::with_capacity(50000));
        let large = spares.take(40000);
        assert_eq!(large.capacity(), 50000);
        spares.keep(large);
        let b = spares.take(3000);
        assert_eq!(b.capacity(), 50000, "within twice the recent peak: as it was");
        spares.keep(b);
        for _ in 0..IDLE_CAPTURES {
            let b = spares.take(3000);
            spares.keep(b);
        }
        assert_eq!(spares.take(3000).capacity(), 3000, "the peak is past: shrunk");
        assert_eq!(spares.take(10).capacity(), 0, "none left: the unused 64 KiB one was freed");
    }

    #[test]
    fn staging_keeps_the_latest_copy_and_drops_zero_pages_only_when_asked() {
        let ram = GuestRam::new(16).unwrap();
        let mem = ram.memory();
        mem.write_slice(&[1; 8], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2; 8], GuestAddress(0x3000)).unwrap();
        let every = ram.every_page();
        let mut staging = Staging::new(&every, true);
        staging.copy(&ram, &every).unwrap();
        // The guest moves on: one page changes, another becomes zero again. A second
        // round copies them again.
        mem.write_slice(&[3; 8], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0; 8], GuestAddress(0x3000)).unwrap();
        staging.copy(&ram, &every).unwrap();
        let (pages, data, crcs) = staging.into_pages(true);
        assert_eq!(pages, [0x1000]);
        assert_eq!(&data[..8], &[3; 8]);
        assert_eq!(data.len(), PAGE);
        assert_eq!(crcs, [crc32fast::hash(&data)], "the CRC of the copy kept");

        let mut all = Staging::new(&every, true);
        all.copy(&ram, &every).unwrap();
        let (pages, data, crcs) = all.into_pages(false);
        assert_eq!(pages.len() as u64, every.count());
        assert_eq!(data.len(), pages.len() * PAGE);
        assert_eq!(crcs, data.chunks(PAGE).map(crc32fast::hash).collect::<Vec<_>>());
    }

    #[test]
    fn a_page_that_became_zero_is_zeros_in_its_slot_in_fresh_and_reused_buffers() {
        let ram = GuestRam::new(16).unwrap();
        let mem = ram.memory();
        let every = ram.every_page();
        for buf in [Vec::new(), vec![7u8; every.count() as usize * PAGE]] {
            mem.write_slice(&[5; 8], GuestAddress(0x2000)).unwrap();
            let mut staging = Staging::reusing(&every, buf, true);
            staging.copy(&ram, &every).unwrap();
            mem.write_slice(&[0; 8], GuestAddress(0x2000)).unwrap();
            staging.copy(&ram, &every).unwrap();
            let (pages, data, crcs) = staging.into_pages(false);
            assert_eq!(pages.len() as u64, every.count());
            assert!(data.iter().all(|&b| b == 0), "a slot kept stale bytes");
            assert!(crcs.iter().all(|&c| c == zero_page_crc()), "a slot kept a stale CRC");
            assert_eq!(crcs.len(), pages.len());
        }
        // Not asked for (a small delta): none taken, and none kept through the drop.
        let mut staging = Staging::new(&every, false);
        mem.write_slice(&[5; 8], GuestAddress(0x2000)).unwrap();
        staging.copy(&ram, &every).unwrap();
        let (pages, _, crcs) = staging.into_pages(true);
        assert_eq!((pages, crcs), (vec![0x2000], vec![]));
    }
}
