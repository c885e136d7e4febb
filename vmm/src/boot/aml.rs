//! The few AML objects the DSDT declares besides `\_S5`: one device per virtio-mmio
//! window, which Linux's virtio_mmio driver finds by its `_HID` (`LNRO0005`, the id
//! Firecracker and QEMU's microvm also use), with the window and its interrupt in
//! `_CRS`.

/// A virtio-mmio window as the guest is told of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

const SCOPE_OP: u8 = 0x10;
const NAME_OP: u8 = 0x08;
const BUFFER_OP: u8 = 0x11;
const BYTE_PREFIX: u8 = 0x0a;
const STRING_PREFIX: u8 = 0x0d;
const DEVICE_OP: [u8; 2] = [0x5b, 0x82];
const ROOT_CHAR: u8 = b'\\';

// Resource descriptors (ACPI 6.4, section 6.4).
const MEMORY32_FIXED: u8 = 0x86;
const MEMORY32_READ_WRITE: u8 = 1;
const EXTENDED_INTERRUPT: u8 = 0x89;
/// Consumer, edge-triggered, active-high, exclusive: the interrupt is a pulse on a
/// line of the device's own (KVM_IRQ_LINE up then down).
const INTERRUPT_FLAGS: u8 = 0b0000_0011;
const END_TAG: [u8; 2] = [0x79, 0x00];

/// `Scope (\_SB) { Device (VRnn) { ... } ... }` for every slot; nothing when there are
/// none.
pub fn virtio_mmio_devices(slots: &[MmioSlot]) -> Vec<u8> {
    if slots.is_empty() {
        return Vec::new();
    }
    let mut body = vec![ROOT_CHAR];
    body.extend_from_slice(b"_SB_");
    for (i, slot) in slots.iter().enumerate() {
        body.extend(device(i, slot));
    }
    package(&[SCOPE_OP], &body)
}

fn device(index: usize, slot: &MmioSlot) -> Vec<u8> {
    // A NameSeg is four characters, the first a letter: VR00, VR01, ... VRFF.
    let mut body = format!("VR{:02X}", index & 0xff).into_bytes();
    body.extend(name(b"_HID", &string("LNRO0005")));
    body.extend(name(b"_UID", &[BYTE_PREFIX, index as u8]));
    body.extend(name(b"_CRS", &buffer(&resources(slot))));
    package(&DEVICE_OP, &body)
}

fn resources(slot: &MmioSlot) -> Vec<u8> {
    let mut r = vec![MEMORY32_FIXED, 9, 0, MEMORY32_READ_WRITE];
    r.extend_from_slice(&(slot.base as u32).to_le_bytes());
    r.extend_from_slice(&(slot.len as u32).to_le_bytes());
    r.extend_from_slice(&[EXTENDED_INTERRUPT, 6, 0, INTERRUPT_FLAGS, 1]);
    r.extend_from_slice(&slot.gsi.to_le_bytes());
    r.extend_from_slice(&END_TAG);
    r
}

fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend_from_slice(seg);
    out.extend_from_slice(value);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out
}

fn buffer(bytes: &[u8]) -> Vec<u8> {
    // The BufferSize term: the descriptors are short, a ByteConst holds it.
    let mut body = vec![BYTE_PREFIX, u8::try_from(bytes.len()).expect("a short resource template")];
    body.extend_from_slice(bytes);
    package(&[BUFFER_OP], &body)
}

/// `op`, then a PkgLength counting itself and `body`, then `body`.
fn package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// The PkgLength encoding (ACPI 6.4, 20.2.4): one byte up to 63, else a lead byte
/// whose top two bits count the bytes that follow and whose low nibble is the length's
/// lowest four bits.
fn pkg_length(body: usize) -> Vec<u8> {
    if body < 0x3f {
        return vec![(body + 1) as u8];
    }
    let extra = if body + 2 <= 0xfff { 1 } else if body + 3 <= 0xf_ffff { 2 } else { 3 };
    let total = body + 1 + extra;
    let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
    for i in 0..extra {
        out.push((total >> (4 + 8 * i)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PkgLength at the start of `b`: (length, bytes it took).
    fn read_pkg_length(b: &[u8]) -> (usize, usize) {
        let extra = usize::from(b[0] >> 6);
        if extra == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut len = usize::from(b[0] & 0xf);
        for i in 0..extra {
            len |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (len, 1 + extra)
    }

    #[test]
    fn pkg_lengths_count_themselves_at_every_size() {
        for body in [0, 1, 61, 62, 63, 64, 300, 4093, 4094, 4095, 70_000] {
            let enc = pkg_length(body);
            let (len, took) = read_pkg_length(&enc);
            assert_eq!(took, enc.len(), "{body}");
            assert_eq!(len, body + took, "{body}");
        }
    }

    #[test]
    fn no_slots_no_scope() {
        assert!(virtio_mmio_devices(&[]).is_empty());
    }

    #[test]
    fn each_slot_is_a_device_with_its_window_and_interrupt() {
        let slots = [MmioSlot { base: 0xd000_0000, len: 0x1000, gsi: 16 }, MmioSlot { base: 0xd000_1000, len: 0x1000, gsi: 17 }];
        let aml = virtio_mmio_devices(&slots);
        assert_eq!(aml[0], SCOPE_OP);
        let (len, took) = read_pkg_length(&aml[1..]);
        assert_eq!(1 + len, aml.len(), "the scope covers everything");
        assert_eq!(&aml[1 + took..1 + took + 5], b"\\_SB_");
        let mut at = 1 + took + 5;
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(&aml[at..at + 2], &DEVICE_OP);
            let (len, took) = read_pkg_length(&aml[at + 2..]);
            let dev = &aml[at + 2 + took..at + 2 + len];
            assert_eq!(&dev[..4], format!("VR{i:02X}").as_bytes());
            let hid = dev.windows(9).position(|w| w == b"LNRO0005\0").expect("_HID");
            assert_eq!(&dev[hid - 6..hid - 1], b"\x08_HID");
            let crs = resources(slot);
            let at_crs = dev.windows(crs.len()).position(|w| w == crs.as_slice()).expect("_CRS");
            assert_eq!(u32::from_le_bytes(crs[4..8].try_into().unwrap()), slot.base as u32);
            assert_eq!(u32::from_le_bytes(crs[17..21].try_into().unwrap()), slot.gsi);
            assert_eq!(at_crs + crs.len(), dev.len(), "_CRS ends the device");
            at += 2 + len;
        }
        assert_eq!(at, aml.len());
    }
}
