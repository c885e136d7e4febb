//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the registers a
//! driver finds the device by, negotiates features through and sets its queues up with,
//! and the interrupt it is told of used buffers by.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_superio::Trigger;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::serial::IrqTrigger;
use crate::devices::{Device, DeviceError, GuestRequest, Section};
use crate::memory::GuestMemoryMmap;

/// The register window each device has.
pub const WINDOW: u64 = 0x1000;
/// The register a driver writes a queue's index to, to kick it.
pub const QUEUE_NOTIFY: u64 = 0x050;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d44_4e54; // "TNDM"
const CONFIG: u64 = 0x100;

const STATUS_DRIVER_OK: u32 = 4;
/// VIRTIO_RING_F_EVENT_IDX: the driver says when it wants interrupts.
const RING_EVENT_IDX: u64 = 1 << 29;
const STATUS_FEATURES_OK: u32 = 8;
/// InterruptStatus: the device used buffers.
const INT_USED: u32 = 1;
/// InterruptStatus: the device's configuration changed.
const INT_CONFIG: u32 = 2;

/// What the transport keeps, saved as the first part of the device's section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<SavedQueue>,
}

/// One queue as the driver set it up, and where the device stands in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SavedQueue {
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
}

/// A virtio device shared between the bus, where the vCPUs reach it, and the event
/// loop, which reaches it through its own handle.
pub(crate) struct OnBus<D: VirtioDevice> {
    id: String,
    window: Range<u64>,
    device: Arc<Mutex<MmioTransport<D>>>,
}

impl<D: VirtioDevice> OnBus<D> {
    pub(crate) fn new(slot: &crate::boot::aml::MmioSlot, device: Arc<Mutex<MmioTransport<D>>>) -> Self {
        let id = device.lock().unwrap_or_else(|e| e.into_inner()).device().id().to_string();
        Self { id, window: slot.base..slot.base + slot.len, device }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport<D>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: VirtioDevice> Device for OnBus<D> {
    fn id(&self) -> &str {
        &self.id
    }

    fn mmio(&self) -> Option<Range<u64>> {
        Some(self.window.clone())
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.lock().mmio_read(addr, data)
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Option<GuestRequest> {
        self.lock().mmio_write(addr, data)
    }

    fn save(&self) -> Section {
        self.lock().save()
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        self.lock().restore(section)
    }
}

/// A virtio device on the MMIO bus at `base`.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    base: u64,
    irq: IrqTrigger,
    mem: GuestMemoryMmap,
    regs: Registers,
    queues: Vec<Queue>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, base: u64, irq: IrqTrigger, mem: GuestMemoryMmap) -> Result<Self, DeviceError> {
        let queues = new_queues(&device)?;
        Ok(Self { device, base, irq, mem, regs: Registers::default(), queues })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Has the device look at queue `index` as a kick would: what an event (a frame
    /// arriving on a TAP) calls.
    pub fn process_queue(&mut self, index: usize) {
        self.notify(index);
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.device.reset();
        self.regs = Registers::default();
        self.queues = new_queues(&self.device)?;
        Ok(())
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// Whether the driver may still change the selected queue: not once it is ready or
    /// the device is live.
    fn queue_settable(&self) -> bool {
        self.regs.status & STATUS_DRIVER_OK == 0 && self.queues.get(self.regs.queue_sel as usize).is_some_and(|q| !q.ready())
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn read_register(&self, offset: u64) -> u32 {
        let half = |features: u64, sel: u32| match sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let queue = self.queues.get(self.regs.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => half(self.device_features(), self.regs.device_features_sel),
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.regs.interrupt_status,
            0x070 => self.regs.status,
            0x0fc => self.regs.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) -> Result<(), DeviceError> {
        let settable = self.queue_settable();
        match offset {
            0x014 => self.regs.device_features_sel = value,
            0x020 => {
                let shift = match self.regs.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return Ok(()),
                };
                self.regs.driver_features = (self.regs.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            0x024 => self.regs.driver_features_sel = value,
            0x030 => self.regs.queue_sel = value,
            0x038 if settable => self.queue().into_iter().for_each(|q| q.set_size(value as u16)),
            0x044 if settable || value == 0 => {
                let mem = self.mem.clone();
                if let Some(q) = self.queue() {
                    // A queue the driver set up badly (size, alignment, outside memory)
                    // stays not ready, as the driver then sees.
                    q.set_ready(value == 1);
                    if value == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            QUEUE_NOTIFY => self.notify(value as usize),
            0x064 => self.regs.interrupt_status &= !value,
            0x070 => self.set_status(value)?,
            0x080 if settable => self.queue().into_iter().for_each(|q| q.set_desc_table_address(Some(value), None)),
            0x084 if settable => self.queue().into_iter().for_each(|q| q.set_desc_table_address(None, Some(value))),
            0x090 if settable => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 if settable => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 if settable => self.queue().into_iter().for_each(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 if settable => self.queue().into_iter().for_each(|q| q.set_used_ring_address(None, Some(value))),
            // Read-only registers, and writes the state forbids, are ignored.
            _ => {}
        }
        Ok(())
    }

    /// The driver writes status bits one step at a time; 0 resets the device.
    fn set_status(&mut self, value: u32) -> Result<(), DeviceError> {
        if value == 0 {
            return self.reset();
        }
        let adding = value & !self.regs.status;
        let mut value = value;
        if adding & STATUS_FEATURES_OK != 0 {
            // Only features the device offers, and virtio 1.x: otherwise FEATURES_OK does
            // not stick, which is how the driver learns of the refusal.
            let f = self.regs.driver_features;
            if f & !self.device_features() != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                value &= !STATUS_FEATURES_OK;
            }
        }
        if adding & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            let event_idx = self.regs.driver_features & RING_EVENT_IDX != 0;
            self.queues.iter_mut().for_each(|q| q.set_event_idx(event_idx));
            self.device.activate(self.regs.driver_features);
        }
        self.regs.status = value;
        Ok(())
    }

    /// A driver's kick: the device looks at the queue, and the driver hears of what it
    /// used.
    fn notify(&mut self, index: usize) {
        if self.regs.status & STATUS_DRIVER_OK == 0 || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        if self.device.process(index, &mut self.queues, &self.mem) {
            self.interrupt();
        }
    }

    /// Tells the driver the device used buffers (the device's own events, a frame
    /// received, come through here too).
    pub fn interrupt(&mut self) {
        self.raise(INT_USED);
    }

    /// Tells the driver the device's configuration changed (a NIC's status).
    pub fn config_changed(&mut self) {
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
    }

    fn raise(&mut self, why: u32) {
        self.regs.interrupt_status |= why;
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    fn saved_queues(&self) -> Vec<SavedQueue> {
        self.queues
            .iter()
            .map(|q| SavedQueue {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            })
            .collect()
    }
}

fn new_queues(device: &impl VirtioDevice) -> Result<Vec<Queue>, DeviceError> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).map_err(|e| DeviceError::Corrupt { id: device.id().to_string(), why: format!("queue of {max}: {e}") }))
        .collect()
}

/// The section: the transport's registers and queues, then the device's own section.
#[derive(Serialize, Deserialize)]
struct Saved {
    regs: Registers,
    device: Section,
}

/// The device's own section inside a transport's section.
pub(crate) fn device_section(section: &Section) -> Option<Section> {
    crate::devices::state_of::<Saved>(section, 1).ok().map(|saved| saved.device)
}

impl<D: VirtioDevice> Device for MmioTransport<D> {
    fn id(&self) -> &str {
        self.device.id()
    }

    fn mmio(&self) -> Option<Range<u64>> {
        Some(self.base..self.base + WINDOW)
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr - self.base;
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32 bits wide and read whole.
            data.fill(0);
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Option<GuestRequest> {
        let offset = addr - self.base;
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset % 4 == 0 {
                if let Err(e) = self.write_register(offset, u32::from_le_bytes(bytes)) {
                    tracing::warn!("virtio device {}: {e}", self.device.id());
                }
            }
        }
        None
    }

    fn save(&self) -> Section {
        let regs = Registers { queues: self.saved_queues(), ..self.regs.clone() };
        crate::devices::section(self.device.id(), 1, &Saved { regs, device: self.device.save() })
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        let saved: Saved = crate::devices::state_of(section, 1)?;
        let corrupt = |why: String| DeviceError::Corrupt { id: section.id.clone(), why };
        if saved.regs.queues.len() != self.queues.len() {
            return Err(corrupt(format!("{} queues where the device has {}", saved.regs.queues.len(), self.queues.len())));
        }
        let mut queues = new_queues(&self.device)?;
        for (q, s) in queues.iter_mut().zip(&saved.regs.queues) {
            if s.size > q.max_size() {
                return Err(corrupt(format!("a queue of {} where at most {} fit", s.size, q.max_size())));
            }
            q.set_size(s.size);
            q.set_desc_table_address(Some(s.desc_table as u32), Some((s.desc_table >> 32) as u32));
            q.set_avail_ring_address(Some(s.avail_ring as u32), Some((s.avail_ring >> 32) as u32));
            q.set_used_ring_address(Some(s.used_ring as u32), Some((s.used_ring >> 32) as u32));
            q.set_next_avail(s.next_avail);
            q.set_next_used(s.next_used);
            q.set_event_idx(s.event_idx);
            q.set_ready(s.ready);
        }
        self.device.restore(&saved.device)?;
        self.queues = queues;
        self.regs = Registers { queues: Vec::new(), ..saved.regs };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    const BASE: u64 = 0xd000_0000;

    /// A device with one queue that uses every buffer it is given.
    #[derive(Default)]
    struct Sink {
        activated: Option<u64>,
        used: u32,
    }

    impl VirtioDevice for Sink {
        fn id(&self) -> &str {
            "sink0"
        }
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(&mut self, features: u64) {
            self.activated = Some(features);
        }
        fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
            let q = &mut queues[index];
            let mut used = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                q.add_used(mem, chain.head_index(), 0).unwrap();
                self.used += 1;
                used = true;
            }
            used
        }
        fn reset(&mut self) {
            *self = Self::default();
        }
        fn save(&self) -> Section {
            crate::devices::section("sink0", 1, &self.used)
        }
        fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
            self.used = crate::devices::state_of(section, 1)?;
            Ok(())
        }
    }

    fn transport() -> (MmioTransport<Sink>, Arc<AtomicU32>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let raised = Arc::new(AtomicU32::new(0));
        let count = raised.clone();
        let irq = IrqTrigger::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        (MmioTransport::new(Sink::default(), BASE, irq, mem.clone()).unwrap(), raised, mem)
    }

    fn read(t: &mut MmioTransport<Sink>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.mmio_read(BASE + offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport<Sink>, offset: u64, value: u32) {
        t.mmio_write(BASE + offset, &value.to_le_bytes());
    }

    /// The driver's side of the setup, as Linux's virtio_mmio does it: status steps,
    /// features, one queue of 8 at 0x1000/0x2000/0x3000.
    fn set_up(t: &mut MmioTransport<Sink>, features: u64) {
        write(t, 0x070, 1);
        write(t, 0x070, 1 | 2);
        for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            write(t, 0x024, sel);
            write(t, 0x020, half);
        }
        write(t, 0x070, 1 | 2 | 8);
        write(t, 0x030, 0);
        write(t, 0x038, 8);
        for (reg, at) in [(0x080, 0x1000), (0x090, 0x2000), (0x0a0, 0x3000)] {
            write(t, reg, at);
            write(t, reg + 4, 0);
        }
        write(t, 0x044, 1);
        write(t, 0x070, 1 | 2 | 8 | 4);
    }

    /// Makes descriptor 0 (16 bytes at 0x4000) available on the queue.
    fn offer_buffer(mem: &GuestMemoryMmap, nth: u16) {
        use vm_memory::Bytes;
        mem.write_obj(0x4000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(16u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(nth % 8))).unwrap();
        mem.write_obj(nth + 1, GuestAddress(0x2002)).unwrap();
    }

    #[test]
    fn a_driver_finds_the_device_and_reads_its_config() {
        let (mut t, ..) = transport();
        assert_eq!(read(&mut t, 0x000), MAGIC);
        assert_eq!(read(&mut t, 0x004), 2);
        assert_eq!(read(&mut t, 0x008), 1);
        write(&mut t, 0x014, 1);
        assert_eq!(read(&mut t, 0x010), 1, "VERSION_1 in the high half");
        write(&mut t, 0x014, 0);
        assert_eq!(read(&mut t, 0x010), 1 << 5);
        assert_eq!(read(&mut t, 0x034), 16, "the queue's largest size");
        let mut config = [0u8; 2];
        t.mmio_read(BASE + 0x100 + 6, &mut config);
        assert_eq!(config, [6, 6]);
        assert_eq!(t.mmio(), Some(BASE..BASE + 0x1000));
    }

    #[test]
    fn features_the_device_lacks_or_a_legacy_driver_are_refused() {
        for bad in [1 << 5, VIRTIO_F_VERSION_1 | 1 << 7] {
            let (mut t, ..) = transport();
            set_up(&mut t, bad);
            assert_eq!(read(&mut t, 0x070) & STATUS_FEATURES_OK, 0, "features {bad:#x}");
            assert_eq!(t.device().activated, None);
        }
    }

    #[test]
    fn a_kick_has_the_device_use_buffers_and_interrupt_the_driver() {
        let (mut t, raised, mem) = transport();
        set_up(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1 | 1 << 5));
        assert_eq!(read(&mut t, 0x044), 1);
        // Once ready, the queue's set-up can no longer change.
        write(&mut t, 0x038, 4);
        assert_eq!(t.queues[0].size(), 8);

        offer_buffer(&mem, 0);
        write(&mut t, 0x050, 0);
        assert_eq!((t.device().used, raised.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(read(&mut t, 0x060), INT_USED);
        use vm_memory::Bytes;
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1, "the used ring moved on");
        write(&mut t, 0x064, INT_USED);
        assert_eq!(read(&mut t, 0x060), 0);
        // A kick with nothing new, or of a queue that does not exist, uses nothing.
        write(&mut t, 0x050, 0);
        write(&mut t, 0x050, 3);
        assert_eq!(raised.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn state_round_trips_and_the_restored_device_carries_on_where_it_was() {
        let (mut a, _, mem) = transport();
        set_up(&mut a, VIRTIO_F_VERSION_1);
        offer_buffer(&mem, 0);
        write(&mut a, 0x050, 0);
        let saved = a.save();

        let raised = Arc::new(AtomicU32::new(0));
        let count = raised.clone();
        let irq = IrqTrigger::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let mut b = MmioTransport::new(Sink::default(), BASE, irq, mem.clone()).unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert_eq!((read(&mut b, 0x070), read(&mut b, 0x044)), (1 | 2 | 8 | 4, 1));
        // The second buffer is the restored device's to use, not the first again.
        offer_buffer(&mem, 1);
        write(&mut b, 0x050, 0);
        assert_eq!(b.device().used, 2);
        assert_eq!(raised.load(Ordering::SeqCst), 1);

        let mut wrong = saved.clone();
        wrong.version = 2;
        assert!(matches!(b.restore(&wrong), Err(DeviceError::Version { .. })));
    }

    #[test]
    fn status_zero_resets_the_device_and_its_queues() {
        let (mut t, ..) = transport();
        set_up(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, 0x070, 0);
        assert_eq!((read(&mut t, 0x070), read(&mut t, 0x044)), (0, 0));
        assert_eq!(t.device().activated, None);
        assert_eq!(t.queues[0].size(), 16);
    }
}
