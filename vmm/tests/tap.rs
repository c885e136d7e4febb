//! The TAP backend against real TAP devices of this host: made with iproute2, as an
//! operator would, and removed after. Needs root (CAP_NET_ADMIN) and /dev/net/tun.

use std::process::Command;

use tandem_vmm::net::tap::{Tap, TapError, VNET_HDR_LEN};

/// A TAP (or TUN) device made for one test and removed when dropped.
struct Made {
    name: String,
    mode: &'static str,
}

impl Made {
    fn new(tag: &str, mode: &'static str) -> Self {
        let name = format!("tnd{tag}{}", std::process::id() % 100_000);
        let out = Command::new("ip").args(["tuntap", "add", &name, "mode", mode]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "cannot make a {mode} device for the test (`ip tuntap add {name} mode {mode}`: {}); \
                 these tests need root and /dev/net/tun (modprobe tun)",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run `ip` ({e}): install iproute2 (scripts/setup.sh does)"),
        }
        Self { name, mode }
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", &self.name, "mode", self.mode]).status();
    }
}

#[test]
fn an_existing_tap_opens_once_and_takes_a_frame() {
    let made = Made::new("a", "tap");
    let up = Command::new("ip").args(["link", "set", &made.name, "up"]).status().unwrap();
    assert!(up.success());
    let tap = Tap::open(&made.name).unwrap();
    assert_eq!(tap.name(), made.name);

    // A second open of a single-queue TAP is refused while the first holds it.
    let again = Tap::open(&made.name).err().expect("a TAP in use opened twice");
    assert!(matches!(&again, TapError::InUse(n) if *n == made.name), "{again}");
    assert_eq!(again.to_string(), format!("TAP {} is in use by another process", made.name));

    // A broadcast ARP request from 52:54:00:00:00:01, led by an all-zero virtio-net header.
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    frame.resize(VNET_HDR_LEN + 60, 0);
    assert_eq!(tap.send(&frame).unwrap(), frame.len());

    // Closed, it can be opened again.
    drop(tap);
    Tap::open(&made.name).unwrap();
}

#[test]
fn a_missing_interface_or_one_that_is_not_a_tap_is_refused_by_name() {
    let err = Tap::open("tndnosuch0").err().unwrap();
    assert!(matches!(err, TapError::Missing(_)));
    assert_eq!(
        err.to_string(),
        "there is no network interface tndnosuch0 (make the TAP first: ip tuntap add tndnosuch0 mode tap)"
    );
    assert!(matches!(Tap::open("lo").err().unwrap(), TapError::NotTap(_)));
    let tun = Made::new("u", "tun");
    let err = Tap::open(&tun.name).err().unwrap();
    assert!(matches!(&err, TapError::NotTap(n) if *n == tun.name), "{err}");
    assert!(matches!(Tap::open("../etc").err().unwrap(), TapError::Missing(_)));
}

/// Set in the copy of this test that runs as `nobody`: the TAP it must fail to open.
const AS_NOBODY: &str = "TANDEM_TEST_TAP_AS_NOBODY";

#[test]
fn a_tap_this_user_may_not_open_is_refused_with_what_to_do() {
    if let Ok(name) = std::env::var(AS_NOBODY) {
        let err = Tap::open(&name).err().expect("nobody opened a TAP");
        assert!(matches!(&err, TapError::Permission { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("no permission to use TAP {name}: ")), "{err}");
        return;
    }
    let made = Made::new("p", "tap");
    // This test binary, copied where `nobody` may run it, runs just this test as
    // `nobody` (uid and gid 65534).
    let dir = std::env::temp_dir().join(format!("tandem-tap-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("tap-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for path in [&dir, &exe] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    use std::os::unix::process::CommandExt;
    let out = Command::new(&exe)
        .args(["--exact", "a_tap_this_user_may_not_open_is_refused_with_what_to_do", "--test-threads=1"])
        .env(AS_NOBODY, &made.name)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "as nobody:\n{said}");
    assert!(said.contains("1 passed"), "as nobody, the test did not run:\n{said}");
}
