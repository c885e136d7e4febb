//! virtio-blk over a raw image file: one queue of requests, each a header (type and
//! sector), the data, and a status byte the device writes. Read, write, flush, get-id,
//! discard and write-zeroes are served; anything else is answered "unsupported".
//!
//! A write goes to the image at once and completes to the guest at once: what the
//! world could learn of it reaches the world only through output, which a replicated
//! VM holds until its epoch is acknowledged. Each write marks the 4 KiB blocks it
//! touched, which the next capture takes (as KVM's dirty log marks pages), so an
//! epoch carries the disk blocks it changed beside the memory pages it changed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::{DeviceError, Section};
use crate::disk::{DiskImage, BLOCK, SECTOR};
use crate::memory::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Sectors one discard or write-zeroes segment may span (1 GiB), one segment a request.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Data segments a request may have: the ring's size, less the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
/// The most bytes one request moves; past it the request is refused rather than
/// buffered.
const MAX_REQUEST: u64 = 4 << 20;

/// Requests served, for `ctl status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

pub struct Block {
    id: String,
    disk: Arc<DiskImage>,
    /// A bit per 4 KiB block written since the last capture took them.
    dirty: Vec<u64>,
    stats: BlockStats,
    paused: bool,
    buf: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    /// The disk's size: a snapshot restores only onto a disk of the same.
    size: u64,
    readonly: bool,
    stats: BlockStats,
}

/// What went wrong with a request, answered to the guest as its status.
enum Failed {
    Io,
    Unsupported,
}

impl Block {
    pub fn new(id: &str, disk: Arc<DiskImage>) -> Self {
        let words = disk.blocks().div_ceil(64) as usize;
        Self { id: id.to_string(), disk, dirty: vec![0; words], stats: BlockStats::default(), paused: false, buf: Vec::new() }
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    pub fn image(&self) -> Arc<DiskImage> {
        self.disk.clone()
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// The blocks written since the last call, in order, and forgets them.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        let mut blocks = Vec::new();
        for (w, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                blocks.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        blocks
    }

    /// Marks `blocks` written again: a capture that took them was dropped.
    pub fn give_back(&mut self, blocks: &[u64]) {
        blocks.iter().for_each(|&b| self.set_dirty(b));
    }

    fn set_dirty(&mut self, block: u64) {
        if let Some(word) = self.dirty.get_mut((block / 64) as usize) {
            *word |= 1 << (block % 64);
        }
    }

    /// Marks the blocks `len` bytes from `offset` touch.
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        (offset / BLOCK..(offset + len).div_ceil(BLOCK)).for_each(|b| self.set_dirty(b));
    }

    /// Serves one request; returns the bytes written into the guest's buffers, the
    /// status included.
    fn serve(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let descriptors: Vec<_> = chain.collect();
        let (Some(head), Some(status)) = (descriptors.first(), descriptors.last()) else { return 0 };
        if descriptors.len() < 2 || !status.is_write_only() || status.len() < 1 || head.is_write_only() || head.len() < 16 {
            self.stats.errors += 1;
            tracing::debug!("{}: a malformed request", self.id);
            return 0;
        }
        let mut header = [0u8; 16];
        if mem.read_slice(&mut header, head.addr()).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let data = &descriptors[1..descriptors.len() - 1];
        let mut written = 0u32;
        let result = match kind {
            T_IN => self.read(sector, data, mem).map(|n| written = n),
            T_OUT => self.write(sector, data, mem),
            T_FLUSH => self.disk.sync().map_err(|e| self.failed("flushing", e)).map(|_| self.stats.flushes += 1),
            T_GET_ID => self.get_id(data, mem).map(|n| written = n),
            T_DISCARD | T_WRITE_ZEROES if !self.disk.readonly() => self.zero_ranges(data, mem),
            _ => Err(Failed::Unsupported),
        };
        let code = match result {
            Ok(()) => S_OK,
            Err(Failed::Io) => {
                self.stats.errors += 1;
                S_IOERR
            }
            Err(Failed::Unsupported) => S_UNSUPP,
        };
        if mem.write_slice(&[code], status.addr()).is_err() {
            return written;
        }
        written + 1
    }

    fn failed(&self, what: &str, e: std::io::Error) -> Failed {
        tracing::warn!("{}: {what} {}: {e}", self.id, self.disk.path().display());
        Failed::Io
    }

    /// Where `len` bytes from `sector` lie, if they lie within the disk and `len` is
    /// at most `max`.
    fn span(&self, sector: u64, len: u64, max: u64) -> Result<u64, Failed> {
        let offset = sector.checked_mul(SECTOR).ok_or(Failed::Io)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() && len <= max => Ok(offset),
            _ => Err(Failed::Io),
        }
    }

    fn read(&mut self, sector: u64, data: &[virtio_queue::desc::split::Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Failed> {
        let len: usize = data.iter().map(|d| d.len() as usize).sum();
        if data.iter().any(|d| !d.is_write_only()) {
            return Err(Failed::Io);
        }
        let mut offset = self.span(sector, len as u64, MAX_REQUEST)?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut result = Ok(len as u32);
        for d in data {
            buf.resize(d.len() as usize, 0);
            if let Err(e) = self.disk.read_at(&mut buf, offset) {
                result = Err(self.failed("reading", e));
                break;
            }
            if mem.write_slice(&buf, d.addr()).is_err() {
                result = Err(Failed::Io);
                break;
            }
            offset += u64::from(d.len());
        }
        self.buf = buf;
        self.stats.reads += 1;
        result
    }

    fn write(&mut self, sector: u64, data: &[virtio_queue::desc::split::Descriptor], mem: &GuestMemoryMmap) -> Result<(), Failed> {
        if self.disk.readonly() {
            return Err(Failed::Io);
        }
        let len: usize = data.iter().map(|d| d.len() as usize).sum();
        if data.iter().any(|d| d.is_write_only()) {
            return Err(Failed::Io);
        }
        let start = self.span(sector, len as u64, MAX_REQUEST)?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut offset = start;
        let mut result = Ok(());
        for d in data {
            buf.resize(d.len() as usize, 0);
            if mem.read_slice(&mut buf, d.addr()).is_err() {
                result = Err(Failed::Io);
                break;
            }
            if let Err(e) = self.disk.write_at(&buf, offset) {
                result = Err(self.failed("writing", e));
                break;
            }
            offset += u64::from(d.len());
        }
        self.buf = buf;
        // Whatever reached the image is marked, even if the request then failed.
        self.mark(start, offset - start);
        self.stats.writes += 1;
        result
    }

    /// Discard and write-zeroes alike: each range (a 16-byte segment: sector, sectors,
    /// flags) becomes a hole in the image, which reads as zeros and frees its space.
    /// The blocks are marked written, so replication carries the zeros.
    fn zero_ranges(&mut self, data: &[virtio_queue::desc::split::Descriptor], mem: &GuestMemoryMmap) -> Result<(), Failed> {
        for d in data {
            if d.is_write_only() || d.len() % 16 != 0 {
                return Err(Failed::Io);
            }
            for i in 0..u64::from(d.len() / 16) {
                let mut segment = [0u8; 16];
                mem.read_slice(&mut segment, GuestAddress(d.addr().0 + i * 16)).map_err(|_| Failed::Io)?;
                let sector = u64::from_le_bytes(segment[..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap_or_default());
                let len = u64::from(sectors) * SECTOR;
                let offset = self.span(sector, len, u64::from(MAX_DISCARD_SECTORS) * SECTOR)?;
                self.disk.zero_range(offset, len).map_err(|e| self.failed("zeroing", e))?;
                self.mark(offset, len);
            }
        }
        self.stats.writes += 1;
        Ok(())
    }

    fn get_id(&mut self, data: &[virtio_queue::desc::split::Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Failed> {
        let d = data.first().filter(|d| d.is_write_only()).ok_or(Failed::Io)?;
        let mut id = [0u8; ID_BYTES];
        let name = format!("tandem-{}", self.id);
        id[..name.len().min(ID_BYTES)].copy_from_slice(&name.as_bytes()[..name.len().min(ID_BYTES)]);
        let n = (d.len() as usize).min(ID_BYTES);
        mem.write_slice(&id[..n], d.addr()).map_err(|_| Failed::Io)?;
        Ok(n as u32)
    }
}

/// The size and read-only flag of the disk a device section describes, if it is a
/// disk's (for `tandem inspect`).
pub fn described(section: &Section) -> Option<(u64, bool)> {
    // The transport's section holds the device's own.
    let inner: Saved = crate::devices::state_of(&super::mmio::device_section(section)?, 1).ok()?;
    Some((inner.size, inner.readonly))
}

impl VirtioDevice for Block {
    fn id(&self) -> &str {
        &self.id
    }

    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        let writes = if self.disk.readonly() { VIRTIO_BLK_F_RO } else { VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | writes
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// capacity (in sectors) at 0, seg_max at 12, then the discard and write-zeroes
    /// limits at 36..57 (one segment of up to 1 GiB, aligned to 4 KiB, which may
    /// unmap); the rest zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 60];
        config[..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&1u32.to_le_bytes());
        config[44..48].copy_from_slice(&((BLOCK / SECTOR) as u32).to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&1u32.to_le_bytes());
        config[56] = 1;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _features: u64) {}

    /// Nothing while the VM is paused: a capture may be reading the ring and the disk.
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        if self.paused || index != 0 {
            return false;
        }
        let Some(queue) = queues.first_mut() else { return false };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = self.serve(chain, mem);
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn reset(&mut self) {}

    fn save(&self) -> Section {
        crate::devices::section(&self.id, 1, &Saved { size: self.disk.size(), readonly: self.disk.readonly(), stats: self.stats })
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        let saved: Saved = crate::devices::state_of(section, 1)?;
        if saved.size != self.disk.size() {
            return Err(DeviceError::Corrupt {
                id: self.id.clone(),
                why: format!("it was a disk of {} bytes, and {} is {} bytes", saved.size, self.disk.path().display(), self.disk.size()),
            });
        }
        self.stats = saved.stats;
        Ok(())
    }
}
