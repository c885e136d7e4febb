//! A TAP device the operator made, opened as virtio-net's backend: frames carry a
//! virtio-net header (IFF_VNET_HDR) and no packet information (IFF_NO_PI).
//!
//! tandem never creates the TAP: which bridge it joins and who may use it are the
//! host's network setup, so a missing TAP is an error that says how to make one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// `_IOW('T', 202, int)` and `_IOW('T', 216, int)` of linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `struct virtio_net_hdr_v1`, which virtio 1.0 devices use (it holds `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("there is no network interface {0} (make the TAP first: ip tuntap add {0} mode tap)")]
    Missing(String),
    #[error("{0} is not a TAP device (make one: ip tuntap add NAME mode tap)")]
    NotTap(String),
    #[error("TAP {0} is in use by another process")]
    InUse(String),
    #[error("no permission to use TAP {name}: {error} (run as root, or make it yours: ip tuntap add {name} mode tap user $USER)")]
    Permission { name: String, error: io::Error },
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded? modprobe tun)")]
    NoTun(io::Error),
    #[error("TAP {name}: {what}: {error}")]
    Io { name: String, what: &'static str, error: io::Error },
}

/// Whether `name` can be a network interface's name: 1 to 15 bytes, none of them a
/// slash, a colon or white space, and not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    (1..IFNAMSIZ).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, in a 40-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _rest: [u8; 22],
}

/// An open TAP queue, non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::Missing(name.to_string()));
        }
        // Only TUN and TAP devices have tun_flags; a TUN (IP packets, no Ethernet) has
        // IFF_TUN instead of IFF_TAP.
        let flags = std::fs::read_to_string(sys.join("tun_flags")).map_err(|_| TapError::NotTap(name.to_string()))?;
        let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & i64::from(IFF_TAP) == 0 {
            return Err(TapError::NotTap(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => TapError::Permission { name: name.to_string(), error: e },
                _ => TapError::NoTun(e),
            })?;
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out
        // as (40 bytes), for the duration of the call only.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let error = io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EBUSY) => TapError::InUse(name.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name: name.to_string(), error },
                _ => TapError::Io { name: name.to_string(), what: "attaching", error },
            });
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is, during the call only.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            let error = io::Error::last_os_error();
            return Err(TapError::Io { name: name.to_string(), what: "setting the virtio-net header size", error });
        }
        Ok(Self { file, name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame, led by its virtio-net header, to the host's network.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Takes one frame the host sent, led by its virtio-net header; `WouldBlock` when
    /// none is waiting.
    pub fn receive(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_anything_is_opened() {
        for good in ["tap0", "a", "tandem-tap-1234"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "sixteen-letters!"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
