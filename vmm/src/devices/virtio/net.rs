//! virtio-net over a TAP device: queue 0 takes frames from the host to the guest,
//! queue 1 from the guest to the host, and queue 2 the driver's commands, of which
//! the only one offered is the acknowledgement of an announcement: after a takeover
//! the device sets VIRTIO_NET_S_ANNOUNCE, and the driver sends a gratuitous ARP (and
//! IPv6 neighbour advertisements) for each of its addresses, then acknowledges.
//!
//! Each frame on either side is led by the 12-byte `virtio_net_hdr_v1`, which the TAP
//! (IFF_VNET_HDR) speaks too, so headers pass as they are. The guest may hand over
//! frames with their checksum left to do and TCP segments of up to 64 KiB (CSUM,
//! HOST_TSO4/6): the header says so and the TAP, taking such a frame, finishes the
//! checksum or cuts the segment where the host's network needs it. What the TAP gives
//! the guest is always whole (no GUEST_ offloads: they would need receive buffers of
//! 64 KiB or mergeable ones), so that header is zeros but for `num_buffers`.
//!
//! Frames the guest sends go through an [`EpochHold`]: out at once for a VM no standby
//! protects, held until the standby has acknowledged their epoch for one it does.

use std::io::{self, ErrorKind};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::held::{EpochHold, Pushed};
use crate::devices::{DeviceError, Section};
use crate::memory::GuestMemoryMmap;
use crate::net::tap::{Tap, VNET_HDR_LEN};
use crate::net::MacAddr;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const CTRL: usize = 2;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
const LINK_UP: u16 = 1;
const STATUS_ANNOUNCE: u16 = 2;
/// The one command class and command answered: VIRTIO_NET_CTRL_ANNOUNCE_ACK.
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
/// The largest frame with its header: a TSO segment (an IP packet of up to 64 KiB) in
/// an Ethernet frame, and the header.
const MAX_FRAME: usize = 65562;

/// Most bytes of frames held for epochs not yet acknowledged, per NIC: at 25 ms epochs
/// and a few epochs in flight, room for a gigabit's worth; past it frames are dropped
/// and counted, as sch_plug does, and TCP sends them again.
pub const HOLD_LIMIT: usize = 16 << 20;

/// Frames counted, for `ctl status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames from the host dropped because they did not fit the guest's buffer.
    pub rx_dropped: u64,
    /// Frames from the guest dropped because the hold for unacknowledged epochs was
    /// full.
    #[serde(skip)]
    pub tx_dropped: u64,
    /// Bytes held now, waiting for their epoch to be acknowledged.
    #[serde(skip)]
    pub held_bytes: u64,
}

pub struct Net {
    id: String,
    mac: MacAddr,
    tap: Tap,
    /// A frame read from the TAP that waits for the guest to offer a buffer.
    waiting: Option<Vec<u8>>,
    buf: Vec<u8>,
    stats: NetStats,
    /// The VM is paused: nothing is written into the guest.
    paused: bool,
    /// Frames the guest sent, until they may go out.
    hold: EpochHold<Vec<u8>>,
    /// VIRTIO_NET_S_ANNOUNCE is set: the driver is to announce the guest's addresses.
    announcing: bool,
}

/// The device's own state in a snapshot.
#[derive(Serialize, Deserialize)]
struct Saved {
    stats: NetStats,
    announcing: bool,
}

impl Net {
    /// A NIC whose frames go out as sent, until [`Net::protect`].
    pub fn new(id: &str, mac: MacAddr, tap: Tap) -> Self {
        let mut hold = EpochHold::new(0, HOLD_LIMIT);
        hold.unprotect();
        Self { id: id.to_string(), mac, tap, waiting: None, buf: vec![0; MAX_FRAME], stats: NetStats::default(), paused: false, hold, announcing: false }
    }

    pub fn stats(&self) -> NetStats {
        NetStats { tx_dropped: self.hold.dropped(), held_bytes: self.hold.held_bytes() as u64, ..self.stats }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Holds frames from now on, as part of `epoch` onwards.
    pub fn protect(&mut self, epoch: u64) {
        self.hold.protect(epoch);
    }

    /// Sends what is held and every frame from now on at once.
    pub fn unprotect(&mut self) {
        for frame in self.hold.unprotect() {
            self.send(&frame);
        }
    }

    /// Ends `epoch` at the VM's pause: frames from now on are the next epoch's.
    pub fn seal(&mut self, epoch: u64) {
        self.hold.seal(epoch);
    }

    /// Sends the frames of epochs up to `epoch`, which the standby holds; returns how
    /// many.
    pub fn commit(&mut self, epoch: u64) -> usize {
        let frames = self.hold.commit(epoch);
        for frame in &frames {
            self.send(frame);
        }
        frames.len()
    }

    /// The frames held for epochs `from..=through`, for the standby to send should it
    /// take over.
    pub fn held(&self, from: u64, through: u64) -> Vec<Vec<u8>> {
        self.hold.items(from, through).cloned().collect()
    }

    pub fn waiting_for_epoch(&self) -> bool {
        self.hold.waiting_for_epoch()
    }

    /// Asks the driver to announce the guest's addresses; the transport then tells it
    /// the configuration changed.
    pub fn announce(&mut self) {
        self.announcing = true;
    }

    /// Answers the driver's commands: the acknowledgement of an announcement, and an
    /// error for anything else (no other command's feature is offered).
    fn control(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut command = [0u8; 2];
            let mut ack = None;
            let mut read = 0;
            for desc in chain {
                if desc.is_write_only() {
                    ack = Some(desc.addr());
                } else if read < 2 {
                    let n = (desc.len() as usize).min(2 - read);
                    if mem.read_slice(&mut command[read..read + n], desc.addr()).is_ok() {
                        read += n;
                    }
                }
            }
            let status = if read == 2 && command == [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK] {
                self.announcing = false;
                CTRL_OK
            } else {
                CTRL_ERR
            };
            let written = ack.is_some_and(|at| mem.write_obj(status, at).is_ok());
            if queue.add_used(mem, head, u32::from(written)).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn send(&mut self, frame: &[u8]) {
        match self.tap.send(frame) {
            Ok(_) => self.stats.tx_frames += 1,
            // A TAP that is down or full drops the frame, as a wire would.
            Err(e) => tracing::debug!("{}: a frame was not sent: {e}", self.id),
        }
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Sends every frame the guest has made available on the transmit queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0;
            for desc in chain.readable() {
                let n = (desc.len() as usize).min(MAX_FRAME - len);
                if mem.read_slice(&mut self.buf[len..len + n], desc.addr()).is_err() {
                    len = 0;
                    break;
                }
                len += n;
            }
            // A frame shorter than its header, or not in guest memory, is the driver's
            // error: it is used (so the driver gets its buffer back) and not sent.
            if len > VNET_HDR_LEN {
                if self.hold.holds() {
                    // Completed to the guest now either way: holding it is the host's
                    // business, and a full hold is a lost frame, as on a wire.
                    if let Pushed::Through(frame) = self.hold.push(self.buf[..len].to_vec()) {
                        self.send(&frame);
                    }
                } else {
                    // Out at once, from the buffer it was read into: no copy.
                    let buf = std::mem::take(&mut self.buf);
                    self.send(&buf[..len]);
                    self.buf = buf;
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Hands the guest what the TAP has, while it has buffers for it.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let mut frame = match self.waiting.take() {
                Some(f) => f,
                None => match self.tap.receive(&mut self.buf) {
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("{}: reading the TAP: {e}", self.id);
                        break;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.waiting = Some(frame);
                break;
            };
            let head = chain.head_index();
            match write_frame(&mut frame, chain.writable().map(|d| (d.addr(), d.len() as usize)), mem) {
                Ok(len) => {
                    self.stats.rx_frames += 1;
                    if queue.add_used(mem, head, len as u32).is_err() {
                        break;
                    }
                }
                Err(_) => {
                    self.stats.rx_dropped += 1;
                    if queue.add_used(mem, head, 0).is_err() {
                        break;
                    }
                }
            }
            used = true;
        }
        used
    }
}

/// Writes `frame` (header first) across the writable buffers, setting its header's
/// `num_buffers` to 1; a frame that does not fit is refused whole.
fn write_frame(frame: &mut [u8], buffers: impl Iterator<Item = (GuestAddress, usize)>, mem: &GuestMemoryMmap) -> io::Result<usize> {
    let buffers: Vec<_> = buffers.collect();
    if buffers.iter().map(|(_, l)| l).sum::<usize>() < frame.len() || frame.len() < VNET_HDR_LEN {
        return Err(io::Error::new(ErrorKind::InvalidInput, "frame larger than the guest's buffer"));
    }
    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut at = 0;
    for (addr, len) in buffers {
        let n = len.min(frame.len() - at);
        mem.write_slice(&frame[at..at + n], addr).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        at += n;
        if at == frame.len() {
            break;
        }
    }
    Ok(frame.len())
}

impl VirtioDevice for Net {
    fn id(&self) -> &str {
        &self.id
    }

    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_GUEST_ANNOUNCE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, 64]
    }

    /// `struct virtio_net_config`: the MAC, then the status (link always up; announce
    /// while asked to).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        let status = LINK_UP | if self.announcing { STATUS_ANNOUNCE } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _features: u64) {}

    /// Nothing while the VM is paused: a capture may be reading the rings.
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        if self.paused {
            return false;
        }
        match (index, queues) {
            (RX, [rx, ..]) => self.receive(rx, mem),
            (TX, [_, tx, ..]) => self.transmit(tx, mem),
            (CTRL, [_, _, ctrl, ..]) => self.control(ctrl, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.waiting = None;
        self.announcing = false;
    }

    /// The counters and a pending announcement: a frame waiting for a buffer is one
    /// the wire could have lost, and held frames go with the epochs, not the state.
    fn save(&self) -> Section {
        crate::devices::section(&self.id, 2, &Saved { stats: self.stats, announcing: self.announcing })
    }

    fn restore(&mut self, section: &Section) -> Result<(), DeviceError> {
        let saved: Saved = crate::devices::state_of(section, 2)?;
        self.stats = saved.stats;
        self.announcing = saved.announcing;
        Ok(())
    }
}
