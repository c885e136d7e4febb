//! virtio-blk through its virtio-mmio transport over a real image file, the driver
//! played by the test: requests are chains of descriptors (header, data, status) as
//! Linux's virtio_blk builds them.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use tandem_vmm::devices::serial::IrqTrigger;
use tandem_vmm::devices::virtio::block::Block;
use tandem_vmm::devices::virtio::mmio::MmioTransport;
use tandem_vmm::devices::Device;
use tandem_vmm::disk::{DiskConfig, DiskImage};
use tandem_vmm::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const BASE: u64 = 0xd000_0000;
/// The queue's descriptor table, available ring and used ring.
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HEADER: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;

struct Image(PathBuf);

impl Image {
    fn new(tag: &str, len: u64) -> Self {
        let path = std::env::temp_dir().join(format!("tandem-blk-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Driver {
    t: MmioTransport<Block>,
    mem: GuestMemoryMmap,
    next: u16,
}

impl Driver {
    /// Linux's steps: status, features (all offered), one queue of 16 entries.
    fn new(image: &Image, readonly: bool) -> Self {
        let disk = Arc::new(DiskImage::open(&DiskConfig { path: image.0.clone(), readonly }).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let mut t = MmioTransport::new(Block::new("blk0", disk), BASE, IrqTrigger::new(|| Ok(())), mem.clone()).unwrap();
        fn write(t: &mut MmioTransport<Block>, offset: u64, value: u32) {
            t.mmio_write(BASE + offset, &value.to_le_bytes());
        }
        write(&mut t, 0x070, 1 | 2);
        let mut features = [0u32; 2];
        for (sel, half) in features.iter_mut().enumerate() {
            write(&mut t, 0x014, sel as u32);
            let mut v = [0u8; 4];
            t.mmio_read(BASE + 0x010, &mut v);
            *half = u32::from_le_bytes(v);
        }
        let mut write = |offset: u64, value: u32| write(&mut t, offset, value);
        for (sel, half) in features.iter().enumerate() {
            write(0x024, sel as u32);
            write(0x020, *half);
        }
        write(0x070, 1 | 2 | 8);
        write(0x030, 0);
        write(0x038, 16);
        for (reg, at) in [(0x080, DESC), (0x090, AVAIL), (0x0a0, USED)] {
            write(reg, at as u32);
            write(reg + 4, 0);
        }
        write(0x044, 1);
        write(0x070, 1 | 2 | 8 | 4);
        Self { t, mem, next: 0 }
    }

    fn config_u32(&mut self, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        self.t.mmio_read(BASE + 0x100 + offset, &mut v);
        u32::from_le_bytes(v)
    }

    /// Sends one request: a header of `kind` and `sector`, `data` (read by the device,
    /// or `len` bytes it writes), a status byte; returns the status and the bytes the
    /// device wrote, with the length it reported.
    fn request(&mut self, kind: u32, sector: u64, data: Option<&[u8]>, len: u32) -> (u8, Vec<u8>, u32) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let writes = data.is_none();
        if let Some(data) = data {
            self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        }
        let len = data.map_or(len, |d| d.len() as u32);
        // Descriptors 0, 1, 2 chained (NEXT = 1, WRITE = 2); a request without data
        // (a flush) skips the middle one.
        let mut chain = vec![(HEADER, 16u32, 0u16)];
        if len > 0 {
            chain.push((DATA, len, if writes { 2 } else { 0 }));
        }
        chain.push((STATUS, 1, 2));
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let desc = DESC + 16 * i as u64;
            let last = i + 1 == chain.len();
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(flags | if last { 0 } else { 1 }, GuestAddress(desc + 12)).unwrap();
            self.mem.write_obj(i as u16 + 1, GuestAddress(desc + 14)).unwrap();
        }
        let slot = self.next % 16;
        self.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot))).unwrap();
        self.next = self.next.wrapping_add(1);
        self.mem.write_obj(self.next, GuestAddress(AVAIL + 2)).unwrap();
        self.t.mmio_write(BASE + 0x050, &0u32.to_le_bytes());
        assert_eq!(self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), self.next, "the request was used");
        let used_len = self.mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * u64::from(slot) + 4)).unwrap();
        let mut out = vec![0u8; if writes { len as usize } else { 0 }];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), out, used_len)
    }
}

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

#[test]
fn writes_read_back_flush_and_id_and_every_write_is_marked_for_the_next_epoch() {
    let image = Image::new("rw", 1 << 20);
    let mut d = Driver::new(&image, false);
    assert_eq!(d.config_u32(0), 2048, "capacity in sectors");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(d.request(OUT, 9, Some(&data), 0).0, OK);
    let (status, back, used) = d.request(IN, 9, None, 8192);
    assert_eq!((status, used), (OK, 8193), "data and the status byte written");
    assert_eq!(back, data);
    let on_disk = std::fs::read(&image.0).unwrap();
    assert_eq!(&on_disk[9 * 512..9 * 512 + 8192], &data[..]);
    assert_eq!(d.request(FLUSH, 0, None, 0).0, OK);
    let (status, id, _) = d.request(GET_ID, 0, None, 20);
    assert_eq!(status, OK);
    assert!(id.starts_with(b"tandem-blk0"), "{id:?}");
    // Sectors 9..25 are bytes 4608..12800: blocks 1, 2 and 3.
    assert_eq!(d.t.device_mut().take_dirty(), [1, 2, 3]);
    assert!(d.t.device_mut().take_dirty().is_empty(), "taken once");
    let stats = d.t.device().stats();
    assert_eq!((stats.reads, stats.writes, stats.flushes, stats.errors), (1, 1, 1, 0));
}

#[test]
fn requests_past_the_end_on_a_read_only_disk_or_unknown_are_refused_with_a_status() {
    let image = Image::new("bad", 1 << 20);
    let mut d = Driver::new(&image, false);
    assert_eq!(d.request(IN, 2047, None, 1024).0, IOERR, "past the end");
    assert_eq!(d.request(OUT, u64::MAX / 256, Some(&[1; 512]), 0).0, IOERR, "an offset that overflows");
    assert_eq!(d.request(99, 0, None, 512).0, UNSUPP);
    assert!(d.t.device_mut().take_dirty().is_empty(), "nothing was written");
    drop(d);
    let mut ro = Driver::new(&image, true);
    assert_eq!(ro.request(OUT, 0, Some(&[1; 512]), 0).0, IOERR);
    assert_eq!(ro.request(IN, 0, None, 512).0, OK);
    assert!(std::fs::read(&image.0).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_discard_punches_a_hole_that_reads_as_zeros_and_is_marked() {
    let image = Image::new("discard", 1 << 20);
    let mut d = Driver::new(&image, false);
    assert_eq!(d.config_u32(36), 1 << 21, "max_discard_sectors");
    assert_eq!(d.request(OUT, 0, Some(&vec![7u8; 64 << 10]), 0).0, OK);
    d.t.device_mut().take_dirty();
    let blocks_before = std::fs::metadata(&image.0).unwrap().blocks();
    // One segment: 64 sectors from sector 16 (bytes 8192..40960, blocks 2..9).
    let mut segment = [0u8; 16];
    segment[..8].copy_from_slice(&16u64.to_le_bytes());
    segment[8..12].copy_from_slice(&64u32.to_le_bytes());
    assert_eq!(d.request(DISCARD, 0, Some(&segment), 0).0, OK);
    let on_disk = std::fs::read(&image.0).unwrap();
    assert!(on_disk[..8192].iter().all(|&b| b == 7) && on_disk[40960..65536].iter().all(|&b| b == 7));
    assert!(on_disk[8192..40960].iter().all(|&b| b == 0));
    assert!(std::fs::metadata(&image.0).unwrap().blocks() < blocks_before, "the space went back");
    assert_eq!(d.t.device_mut().take_dirty(), (2..10).collect::<Vec<u64>>());
    segment[..8].copy_from_slice(&2040u64.to_le_bytes());
    assert_eq!(d.request(DISCARD, 0, Some(&segment), 0).0, IOERR, "past the end");
}
