//! The host side of a guest's NIC: what the operator names on the command line
//! (`--net tap=NAME,mac=MAC`) and the TAP device behind it. The virtio-net device that
//! will sit on top is issue 11's next step; these are checked first so that bad input
//! is refused with one line before any guest runs.

pub mod tap;

use std::fmt;
use std::str::FromStr;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    #[error("malformed MAC address {0:?}: expected six hex pairs like 52:54:00:12:34:56")]
    MalformedMac(String),
    #[error("MAC address {0} is a multicast address, which a NIC cannot have")]
    MulticastMac(MacAddr),
    #[error("malformed --net {0:?}: expected tap=NAME,mac=MAC")]
    Malformed(String),
    #[error("two NICs have the MAC address {0}")]
    SameMac(MacAddr),
    #[error("two NICs use the TAP device {0}")]
    SameTap(String),
}

/// A NIC's Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || NetConfigError::MalformedMac(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            // from_str_radix alone would take "+f".
            let part = parts.next().filter(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit())).ok_or_else(malformed)?;
            *b = u8::from_str_radix(part, 16).map_err(|_| malformed())?;
        }
        if parts.next().is_some() {
            return Err(malformed());
        }
        let mac = MacAddr(bytes);
        // The group bit of the first octet: frames to it go to many, from it are bogus.
        if bytes[0] & 1 == 1 {
            return Err(NetConfigError::MulticastMac(mac));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// One NIC as the operator asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host's TAP device, which must exist already.
    pub tap: String,
    pub mac: MacAddr,
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || NetConfigError::Malformed(s.to_string());
        let (mut tap, mut mac) = (None, None);
        for field in s.split(',') {
            match field.split_once('=').ok_or_else(malformed)? {
                ("tap", name) if tap.is_none() && tap::valid_name(name) => tap = Some(name.to_string()),
                ("mac", m) if mac.is_none() => mac = Some(m.parse()?),
                _ => return Err(malformed()),
            }
        }
        Ok(NetConfig { tap: tap.ok_or_else(malformed)?, mac: mac.ok_or_else(malformed)? })
    }
}

/// Refuses NICs that would share a MAC address or a TAP device.
pub fn check_distinct(nics: &[NetConfig]) -> Result<(), NetConfigError> {
    for (i, a) in nics.iter().enumerate() {
        for b in &nics[..i] {
            if a.mac == b.mac {
                return Err(NetConfigError::SameMac(a.mac));
            }
            if a.tap == b.tap {
                return Err(NetConfigError::SameTap(a.tap.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print_back() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:00", "52-54-00-ab-cd-0f", "52:54:00:ab:cd:g0", "5:254:00:ab:cd:0f", "52:54:00:ab:cd:+f"] {
            assert_eq!(bad.parse::<MacAddr>(), Err(NetConfigError::MalformedMac(bad.into())), "{bad}");
        }
        assert!(matches!("01:00:5e:00:00:01".parse::<MacAddr>(), Err(NetConfigError::MulticastMac(_))));
        assert!(matches!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>(), Err(NetConfigError::MulticastMac(_))));
    }

    #[test]
    fn a_nic_is_a_tap_and_a_mac_in_either_order() {
        let want = NetConfig { tap: "tap0".into(), mac: "52:54:00:00:00:01".parse().unwrap() };
        assert_eq!("tap=tap0,mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap(), want);
        assert_eq!("mac=52:54:00:00:00:01,tap=tap0".parse::<NetConfig>().unwrap(), want);
        for bad in ["tap=tap0", "mac=52:54:00:00:00:01", "tap=tap0,mac=52:54:00:00:00:01,tap=tap1", "tap=,mac=52:54:00:00:00:01", "tap=a/b,mac=52:54:00:00:00:01", "tap=tap0,mac=52:54:00:00:00:01,x=1", "tap0"] {
            assert!(matches!(bad.parse::<NetConfig>(), Err(NetConfigError::Malformed(_))), "{bad}");
        }
        assert!(matches!("tap=tap0,mac=zz".parse::<NetConfig>(), Err(NetConfigError::MalformedMac(_))));
    }

    #[test]
    fn two_nics_never_share_a_mac_or_a_tap() {
        let nic = |tap: &str, mac: &str| NetConfig { tap: tap.into(), mac: mac.parse().unwrap() };
        assert_eq!(check_distinct(&[nic("a", "52:54:00:00:00:01"), nic("b", "52:54:00:00:00:02")]), Ok(()));
        assert!(matches!(check_distinct(&[nic("a", "52:54:00:00:00:01"), nic("b", "52:54:00:00:00:01")]), Err(NetConfigError::SameMac(_))));
        assert!(matches!(check_distinct(&[nic("a", "52:54:00:00:00:01"), nic("a", "52:54:00:00:00:02")]), Err(NetConfigError::SameTap(_))));
    }
}
