//! virtio-net through its virtio-mmio transport over a real TAP of this host, the driver
//! played by the test: frames the "guest" queues come out of the TAP, frames sent to the
//! TAP land in the guest's buffers. A packet socket on the TAP's interface is the host's
//! side. Needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_vmm::devices::serial::IrqTrigger;
use tandem_vmm::devices::virtio::mmio::MmioTransport;
use tandem_vmm::devices::virtio::net::{Net, CTRL, RX, TX};
use tandem_vmm::devices::Device;
use tandem_vmm::memory::GuestMemoryMmap;
use tandem_vmm::net::tap::{Tap, VNET_HDR_LEN};
use vm_memory::{Bytes, GuestAddress};

const BASE: u64 = 0xd000_0000;
/// IEEE's "local experimental" ethertype: nothing else on the host sends it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

struct MadeTap(String);

impl MadeTap {
    /// `tag` tells apart the TAPs of tests running at once in one process.
    fn new(tag: &str) -> Self {
        let name = format!("tnd{tag}{}", std::process::id() % 100_000);
        for args in [vec!["tuntap", "add", &name, "mode", "tap"], vec!["link", "set", &name, "up"]] {
            let out = Command::new("ip").args(&args).output().expect("running `ip`: install iproute2 (scripts/setup.sh does)");
            assert!(out.status.success(), "`ip {}` failed ({}): this test needs root and /dev/net/tun", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Self(name)
    }
}

impl Drop for MadeTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", &self.0, "mode", "tap"]).status();
    }
}

/// A raw packet socket on interface `name`, the host's end of the wire.
fn packet_socket(name: &str) -> OwnedFd {
    let index: i32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).unwrap().trim().parse().unwrap();
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(protocol)) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; its fields are set before use.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index;
    // SAFETY: bind reads one sockaddr_ll of the given size, during the call only.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// The driver's side, as Linux's virtio_mmio and virtio_net do it: status steps,
/// features (VERSION_1 and MAC), queue `i` of 8 entries at 0x10000 * (i + 1).
fn set_up(t: &mut MmioTransport<Net>) {
    let write = |t: &mut MmioTransport<Net>, offset: u64, value: u32| t.mmio_write(BASE + offset, &value.to_le_bytes());
    write(t, 0x070, 1 | 2);
    for (sel, half) in [(0, 1 << 5), (1, 1)] {
        write(t, 0x024, sel);
        write(t, 0x020, half);
    }
    write(t, 0x070, 1 | 2 | 8);
    for q in 0..2u32 {
        let at = 0x10000 * (q + 1);
        write(t, 0x030, q);
        write(t, 0x038, 8);
        for (reg, offset) in [(0x080, 0), (0x090, 0x1000), (0x0a0, 0x2000)] {
            write(t, reg, at + offset);
            write(t, reg + 4, 0);
        }
        write(t, 0x044, 1);
    }
    write(t, 0x070, 1 | 2 | 8 | 4);
}

/// Puts one buffer of `len` bytes at `data` on queue `q` as its `nth` entry (the
/// queue's 8 descriptors and ring slots are used round).
fn offer(mem: &GuestMemoryMmap, q: u64, nth: u16, data: u64, len: u32, device_writes: bool) {
    let base = 0x10000 * (q + 1);
    let slot = nth % 8;
    let desc = base + 16 * u64::from(slot);
    mem.write_obj(data, GuestAddress(desc)).unwrap();
    mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(if device_writes { 2u16 } else { 0 }, GuestAddress(desc + 12)).unwrap();
    mem.write_obj(slot, GuestAddress(base + 0x1004 + 2 * u64::from(slot))).unwrap();
    mem.write_obj(nth.wrapping_add(1), GuestAddress(base + 0x1002)).unwrap();
}

fn transport(tap: &MadeTap, mem: &GuestMemoryMmap) -> MmioTransport<Net> {
    let net = Net::new("net0", "52:54:00:12:34:56".parse().unwrap(), Tap::open(&tap.0).unwrap());
    let mut t = MmioTransport::new(net, BASE, IrqTrigger::new(|| Ok(())), mem.clone()).unwrap();
    set_up(&mut t);
    t
}

#[test]
fn a_frame_the_guest_queues_comes_out_of_the_tap() {
    let tap = MadeTap::new("t");
    let host = packet_socket(&tap.0);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
    let mut t = transport(&tap, &mem);
    let mut config = [0u8; 6];
    t.mmio_read(BASE + 0x100, &mut config);
    assert_eq!(config, GUEST_MAC);

    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(b"tandem says hello from the guest");
    mem.write_slice(&frame, GuestAddress(0x80000)).unwrap();
    offer(&mem, TX as u64, 0, 0x80000, frame.len() as u32, false);
    t.mmio_write(BASE + 0x050, &(TX as u32).to_le_bytes());
    assert_eq!(t.device().stats().tx_frames, 1);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x20000 + 0x2002)).unwrap(), 1, "the buffer went back to the guest");

    let want = &frame[VNET_HDR_LEN..];
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf, during the call only.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && buf[12..14] == ETHERTYPE {
            assert_eq!(&buf[..n as usize], want);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the frame never came out of the TAP");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_frame_sent_to_the_tap_lands_in_the_guests_buffer() {
    let tap = MadeTap::new("r");
    let host = packet_socket(&tap.0);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
    let mut t = transport(&tap, &mem);
    offer(&mem, RX as u64, 0, 0x90000, 2048, true);
    // The TAP has a carrier once a queue is attached, but the kernel starts sending
    // through it a moment later (link watch); a frame sent before is dropped.
    let start = Instant::now();
    while std::fs::read_to_string(format!("/sys/class/net/{}/operstate", tap.0)).unwrap().trim() != "up" {
        assert!(start.elapsed() < Duration::from_secs(5), "the TAP never came up");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut frame = GUEST_MAC.to_vec();
    frame.extend_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(b"and hello back from the host");
    let send = || {
        // SAFETY: send reads frame.len() bytes from frame, during the call only.
        let sent = unsafe { libc::send(host.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(sent, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    };

    // The host's own traffic (IPv6 neighbour discovery on a fresh link) may come first.
    // The frame goes again every 200 ms, in case the link dropped it while coming up.
    let start = Instant::now();
    let mut got = Vec::new();
    let mut sent_at = start - Duration::from_secs(1);
    while got.is_empty() {
        if sent_at.elapsed() >= Duration::from_millis(200) {
            send();
            sent_at = Instant::now();
        }
        t.process_queue(RX);
        let used = mem.read_obj::<u16>(GuestAddress(0x10000 + 0x2002)).unwrap();
        if used > 0 {
            // The used ring's newest element: (head, len) pairs of 8 bytes.
            let element = 0x10000 + 0x2004 + 8 * u64::from((used - 1) % 8);
            let len: u32 = mem.read_obj(GuestAddress(element + 4)).unwrap();
            let mut data = vec![0u8; len as usize];
            mem.read_slice(&mut data, GuestAddress(0x90000)).unwrap();
            if data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE {
                got = data;
            } else {
                // Hand the buffer back for the next frame.
                offer(&mem, RX as u64, used, 0x90000, 2048, true);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the frame never reached the guest");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(t.device().stats().rx_frames >= 1);
}

/// The frames of `ETHERTYPE` that reach the host's end within `wait`, by their last
/// byte.
fn frames_out(host: &OwnedFd, wait: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    while start.elapsed() < wait {
        // SAFETY: recv writes at most buf.len() bytes into buf, during the call only.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 14 && buf[12..14] == ETHERTYPE {
            seen.push(buf[n as usize - 1]);
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    seen
}

#[test]
fn a_protected_nic_holds_each_frame_until_its_epoch_is_committed() {
    let tap = MadeTap::new("h");
    let host = packet_socket(&tap.0);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
    let mut t = transport(&tap, &mem);
    t.device_mut().protect(1);
    let send = |t: &mut MmioTransport<Net>, nth: u16| {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ETHERTYPE);
        frame.extend_from_slice(&[b'x'; 40]);
        frame.push(nth as u8);
        let at = 0x80000 + 0x1000 * u64::from(nth);
        mem.write_slice(&frame, GuestAddress(at)).unwrap();
        offer(&mem, TX as u64, nth, at, frame.len() as u32, false);
        t.mmio_write(BASE + 0x050, &(TX as u32).to_le_bytes());
    };
    send(&mut t, 0);
    send(&mut t, 1);
    // Completed to the guest at once, but not on the wire.
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x20000 + 0x2002)).unwrap(), 2);
    assert!(t.device().waiting_for_epoch());
    t.device_mut().seal(1);
    send(&mut t, 2);
    assert_eq!(t.device().held(1, 1).len(), 2, "epoch 1's frames go to the standby with it");
    assert!(frames_out(&host, Duration::from_millis(200)).is_empty(), "nothing before the standby has epoch 1");
    assert_eq!(t.device_mut().commit(1), 2);
    assert_eq!(frames_out(&host, Duration::from_millis(500)), [0, 1], "epoch 1's frames, in order");
    // Frame 2 is epoch 2's; unprotected (the standby lost), it and later frames go.
    t.device_mut().unprotect();
    send(&mut t, 3);
    assert_eq!(frames_out(&host, Duration::from_millis(500)), [2, 3]);
    assert_eq!(t.device().stats().held_bytes, 0);
}

/// Puts a command on the control queue (queue 2, at 0x30000) as its `nth` entry: a
/// readable descriptor with `command` at `data`, chained to a writable byte for the
/// answer at `data + 0x100`.
fn command(mem: &GuestMemoryMmap, nth: u16, data: u64, command: [u8; 2]) {
    let base = 0x30000;
    mem.write_slice(&command, GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(data + 0x100)).unwrap();
    let (first, second) = (2 * nth % 8, 2 * nth % 8 + 1);
    for (slot, addr, len, flags, next) in [(first, data, 2u32, 1u16, second), (second, data + 0x100, 1, 2, 0)] {
        let desc = base + 16 * u64::from(slot);
        mem.write_obj(addr, GuestAddress(desc)).unwrap();
        mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
        mem.write_obj(next, GuestAddress(desc + 14)).unwrap();
    }
    mem.write_obj(first, GuestAddress(base + 0x1004 + 2 * u64::from(nth % 8))).unwrap();
    mem.write_obj(nth.wrapping_add(1), GuestAddress(base + 0x1002)).unwrap();
}

#[test]
fn after_a_takeover_the_driver_is_asked_to_announce_until_it_acknowledges() {
    let tap = MadeTap::new("c");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
    let net = Net::new("net0", "52:54:00:12:34:56".parse().unwrap(), Tap::open(&tap.0).unwrap());
    let mut t = MmioTransport::new(net, BASE, IrqTrigger::new(|| Ok(())), mem.clone()).unwrap();
    let write = |t: &mut MmioTransport<Net>, offset: u64, value: u32| t.mmio_write(BASE + offset, &value.to_le_bytes());
    let read = |t: &mut MmioTransport<Net>, offset: u64| {
        let mut v = [0u8; 4];
        t.mmio_read(BASE + offset, &mut v);
        u32::from_le_bytes(v)
    };
    // MAC, STATUS, CTRL_VQ, GUEST_ANNOUNCE; VERSION_1.
    write(&mut t, 0x070, 1 | 2);
    for (sel, half) in [(0, (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21)), (1, 1)] {
        write(&mut t, 0x024, sel);
        write(&mut t, 0x020, half);
    }
    write(&mut t, 0x070, 1 | 2 | 8);
    assert_eq!(read(&mut t, 0x070) & 8, 8, "the features are accepted");
    for q in 0..3u32 {
        let at = 0x10000 * (q + 1);
        write(&mut t, 0x030, q);
        write(&mut t, 0x038, 8);
        for (reg, offset) in [(0x080, 0), (0x090, 0x1000), (0x0a0, 0x2000)] {
            write(&mut t, reg, at + offset);
            write(&mut t, reg + 4, 0);
        }
        write(&mut t, 0x044, 1);
    }
    write(&mut t, 0x070, 1 | 2 | 8 | 4);
    let status = |t: &mut MmioTransport<Net>| {
        let mut s = [0u8; 2];
        t.mmio_read(BASE + 0x100 + 6, &mut s);
        u16::from_le_bytes(s)
    };
    assert_eq!(status(&mut t), 1, "link up, nothing to announce");

    let generation = read(&mut t, 0x0fc);
    t.device_mut().announce();
    t.config_changed();
    assert_eq!(read(&mut t, 0x060) & 2, 2, "a configuration-change interrupt");
    assert_ne!(read(&mut t, 0x0fc), generation);
    assert_eq!(status(&mut t), 1 | 2, "link up, announce");

    // A command the device does not offer is refused, and changes nothing.
    command(&mem, 0, 0x90000, [0, 0]);
    write(&mut t, 0x050, CTRL as u32);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x90100)).unwrap(), 1, "VIRTIO_NET_ERR");
    assert_eq!(status(&mut t), 1 | 2);
    // The acknowledgement ends the announcement.
    command(&mem, 1, 0x90000, [3, 0]);
    write(&mut t, 0x050, CTRL as u32);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x90100)).unwrap(), 0, "VIRTIO_NET_OK");
    assert_eq!(status(&mut t), 1);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x30000 + 0x2002)).unwrap(), 2, "both commands were used");
}
