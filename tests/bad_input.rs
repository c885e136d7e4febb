//! Bad input gets one clear line on stderr and a non-zero exit, never a panic. These
//! run on the host: each is refused before a guest would run.

mod common;

use common::{assert_refused, images, tandem};

fn refused(args: &[&str], expect: &str) {
    assert_refused(&tandem(args), expect);
}

#[test]
fn missing_kernel_file() {
    refused(&["run", "--kernel", "/nonexistent/vmlinuz"], "cannot open kernel /nonexistent/vmlinuz");
}

#[test]
fn missing_initrd_file() {
    refused(&["run", "--kernel", "/bin/sh", "--initrd", "/nonexistent.cpio"], "cannot open initrd /nonexistent.cpio");
}

#[test]
fn a_file_that_is_not_a_kernel() {
    refused(&["run", "--kernel", "/etc/hostname"], "is not a Linux kernel");
}

#[test]
fn a_directory_as_kernel() {
    refused(&["run", "--kernel", "/etc"], "is not a regular file");
}

#[test]
fn zero_and_too_many_vcpus() {
    refused(&["run", "--kernel", "/bin/sh", "--vcpus", "0"], "--vcpus must be between 1 and 32");
    refused(&["run", "--kernel", "/bin/sh", "--vcpus", "33"], "--vcpus must be between 1 and 32");
}

#[test]
fn memory_out_of_range() {
    refused(&["run", "--kernel", "/bin/sh", "--mem-mib", "0"], "guest memory must be between");
}

#[test]
fn memory_too_small_for_kernel_and_initrd() {
    let dir = images();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("guest-initrd.cpio");
    refused(
        &["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--mem-mib", "24"],
        "is too small for",
    );
}

#[test]
fn the_micro_guest_with_a_kernel_or_bad_sizes() {
    let run = tandem(&["run", "--micro-guest", "--kernel", "/bin/sh"]);
    assert_eq!(run.code, 2, "a guest is a kernel or the micro guest, not both\n{}", run.dump());
    refused(&["run", "--micro-guest", "--mem-mib", "0"], "guest memory must be between");
    refused(&["bench", "takeover", "--mem-mib", "256,0"], "--mem-mib must be between 16 and");
    refused(&["bench", "takeover", "--runs", "0"], "--runs, --lines and --mem-mib need at least one");
}

#[test]
fn bench_encoding_and_pipeline_with_a_bad_size_or_snapshot() {
    refused(&["bench", "encoding", "--mib", "0"], "--mib must be 1..=4096");
    refused(&["bench", "encoding", "--snapshot", "/nonexistent.snap"], "cannot open snapshot /nonexistent.snap");
    refused(&["bench", "encoding", "--snapshot", "/etc/hostname"], "snapshot /etc/hostname: snapshot is truncated");
    refused(&["bench", "pipeline", "--snapshot", "/nonexistent.snap"], "cannot open snapshot /nonexistent.snap");
}

#[test]
fn kvm_device_absent() {
    refused(&["run", "--kernel", "/bin/sh", "--kvm-device", "/nonexistent/kvm"], "/nonexistent/kvm does not exist");
}

#[test]
fn unknown_flags_and_bad_numbers_are_usage_errors() {
    let run = tandem(&["run", "--kernel", "/bin/sh", "--vcpus", "many"]);
    assert_eq!(run.code, 2, "{}", run.dump());
    assert!(run.stderr.contains("invalid value 'many'"), "{}", run.dump());
    assert_eq!(tandem(&["run", "--bogus"]).code, 2);
}

#[test]
fn a_replica_check_of_no_pages_or_too_many_is_refused() {
    for pages in ["0", "65537"] {
        let args = ["primary", "--standby", "127.0.0.1:1", "--key", "/k", "--peer-cert", "/c", "--micro-guest", "--verify-pages", pages];
        refused(&args, &format!("--verify-pages must be between 1 and 65536, got {pages}"));
    }
}

#[test]
fn lab_without_qemu_names_the_package() {
    let out = std::process::Command::new(common::TANDEM)
        .args(["lab", "--", "true"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("install the Debian package qemu-system-x86"), "{stderr}");
}

#[test]
fn lab_without_images_says_how_to_build_them() {
    refused(&["lab", "--images", "/nonexistent", "--", "true"], "guest-images/build.sh");
}

#[test]
fn keygen_writes_a_private_key_pair_and_never_overwrites_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tandem-keygen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let run = tandem(&["keygen", "--out", out]);
    assert_eq!(run.code, 0, "{}", run.dump());
    assert!(run.stdout.contains("fingerprint SHA256:"), "{}", run.dump());
    let mode = std::fs::metadata(dir.join("key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem must be private");
    assert!(std::fs::read_to_string(dir.join("cert.pem")).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_refused(&tandem(&["keygen", "--out", out]), "already exists");
    assert_eq!(tandem(&["keygen", "--out", out, "--force"]).code, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TAP device made for one test with iproute2 (root and /dev/net/tun), removed after.
struct TestTap(String);

impl TestTap {
    fn new(tag: &str) -> Self {
        let name = format!("tndcli{tag}{}", std::process::id() % 10_000);
        let out = std::process::Command::new("ip").args(["tuntap", "add", &name, "mode", "tap"]).output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "cannot make TAP {name} with `ip tuntap add` ({out:?}): these tests need root, iproute2 and /dev/net/tun"
        );
        Self(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["tuntap", "del", &self.0, "mode", "tap"]).status();
    }
}

/// `tandem run --micro-guest` with these NIC arguments.
fn with<'a>(net: &[&'a str]) -> Vec<&'a str> {
    [&["run", "--micro-guest"][..], net].concat()
}

#[test]
fn bad_nics_are_refused_before_the_guest_runs() {
    refused(&with(&["--net", "tap=tndnosuch0,mac=52:54:00:00:00:01"]), "there is no network interface tndnosuch0");
    assert_eq!(tandem(&with(&["--net", "tap=tap0,mac=52:54:00:00:01"])).code, 2, "a malformed MAC is a usage error");
    let run = tandem(&with(&["--net", "tap=tap0,mac=52:54:00:00:01"]));
    assert!(run.stderr.contains("malformed MAC address"), "{}", run.dump());
    let run = tandem(&with(&["--net", "tap0"]));
    assert!(run.stderr.contains("expected tap=NAME,mac=MAC"), "{}", run.dump());
    refused(&with(&["--net", "tap=lo,mac=52:54:00:00:00:01"]), "lo is not a TAP device");

    let (a, b) = (TestTap::new("a"), TestTap::new("b"));
    let nic = |tap: &str, mac: &str| format!("tap={tap},mac={mac}");
    refused(
        &with(&["--net", &nic(&a.0, "52:54:00:00:00:01"), "--net", &nic(&b.0, "52:54:00:00:00:01")]),
        "two NICs have the MAC address 52:54:00:00:00:01",
    );
    refused(&with(&["--net", &nic(&a.0, "52:54:00:00:00:01"), "--net", &nic(&a.0, "52:54:00:00:00:02")]), "two NICs use the TAP device");
    // A TAP another process holds.
    let held = tandem_vmm::net::tap::Tap::open(&a.0).expect("the test opens its TAP");
    refused(&with(&["--net", &nic(&a.0, "52:54:00:00:00:01")]), "in use");
    drop(held);
}

/// A disk image of `len` bytes in a directory of its own, removed on drop.
struct TestImage(std::path::PathBuf);

impl TestImage {
    fn new(tag: &str, len: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-bad-disk-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Self(path)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn bad_disks_are_refused_before_the_guest_runs() {
    let disk = |arg: &str| with(&["--disk"]).into_iter().map(String::from).chain([arg.to_string()]).collect::<Vec<_>>();
    let refused_disk = |arg: &str, expect: &str| {
        let args = disk(arg);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), expect);
    };
    refused_disk("/nonexistent/disk.img", "disk image /nonexistent/disk.img: no such file");
    refused_disk("/etc", "disk image /etc is a directory");
    let odd = TestImage::new("odd", 1000);
    refused_disk(&odd.arg(), "is 1000 bytes, not a whole number of 512-byte sectors");
    let empty = TestImage::new("empty", 0);
    refused_disk(&empty.arg(), "is empty");
    let run = tandem(&with(&["--disk", "/tmp/x.img,rw"]));
    assert_eq!(run.code, 2, "a malformed --disk is a usage error: {}", run.dump());
    assert!(run.stderr.contains("expected PATH or PATH,readonly"), "{}", run.dump());

    let good = TestImage::new("good", 1 << 20);
    refused(&with(&["--disk", &good.arg(), "--disk", &good.arg()]), "is given twice");
    let nine: Vec<TestImage> = (0..9).map(|i| TestImage::new(&format!("nine{i}"), 4096)).collect();
    let mut args = with(&[]);
    let paths: Vec<String> = nine.iter().map(TestImage::arg).collect();
    for p in &paths {
        args.extend(["--disk", p.as_str()]);
    }
    refused(&args, "0 NICs and 9 disks asked for; a VM has room for 8 virtio devices");
    // An image another process holds: no second writer, and no reader of it either.
    let held = tandem_vmm::disk::DiskImage::open(&good.arg().parse().unwrap()).expect("the test opens its image");
    refused(&with(&["--disk", &good.arg()]), "is in use by another process");
    refused(&with(&["--disk", &format!("{},readonly", good.arg())]), "is in use by another process");
    drop(held);
    refused(&["standby", "--listen", "127.0.0.1:1", "--key", "/k", "--peer-cert", "/c", "--state-dir", "/tmp", "--disk", &format!("{},readonly", good.arg())], "drop ,readonly");
}

/// A read-only image asked for read-write, by a user who may not write it (as root,
/// every file is writable, so the check runs as `nobody`).
#[test]
fn a_disk_this_user_may_not_write_is_refused_with_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let image = TestImage::new("ro", 1 << 20);
    let dir = image.0.parent().unwrap().to_path_buf();
    let exe = dir.join("tandem");
    std::fs::copy(env!("CARGO_BIN_EXE_tandem"), &exe).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&image.0, std::fs::Permissions::from_mode(0o444)).unwrap();
    let run = |disk: String| std::process::Command::new(&exe).args(["run", "--micro-guest", "--disk", &disk]).uid(65534).gid(65534).output().unwrap();
    let out = run(image.arg());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be opened for writing") && stderr.contains("add ,readonly"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    // Read-only, it gets past the disk (and fails later, on this host's KVM, or runs).
    let out = run(format!("{},readonly", image.arg()));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("disk image"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_witness_with_a_corrupt_record_bad_lease_or_half_its_flags_is_refused() {
    let dir = std::env::temp_dir().join(format!("tandem-bad-witness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys = dir.join("w").display().to_string();
    assert_eq!(tandem(&["keygen", "--out", &keys]).code, 0);
    let (key, cert) = (format!("{keys}/key.pem"), format!("{keys}/cert.pem"));
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("witness"), "generation=two holder=zz\n").unwrap();
    let state = state.display().to_string();
    let witness = |extra: &[&str]| {
        let mut args = vec!["witness", "--listen", "127.0.0.1:0", "--key", &key, "--peer-cert", &cert, "--state-dir", &state];
        args.extend_from_slice(extra);
        tandem(&args)
    };
    assert_refused(&witness(&[]), "is not a witness record");
    assert_refused(&witness(&["--lease-ms", "5"]), "--lease-ms must be between 100 and 600000");
    // A host given the witness's address but not its certificate, or the other way: a
    // usage error.
    for args in [
        vec!["standby", "--listen", "127.0.0.1:0", "--key", &key, "--peer-cert", &cert, "--witness", "127.0.0.1:9"],
        vec!["primary", "--standby", "127.0.0.1:9", "--key", &key, "--peer-cert", &cert, "--witness-cert", &cert],
    ] {
        let run = tandem(&args);
        assert_eq!(run.code, 2, "{}", run.dump());
        assert!(run.stderr.contains("--witness"), "{}", run.dump());
    }
    // Asking a witness that is not there, or with a key that is not one: one line, why.
    let status = |key: &str| tandem(&["witness", "status", "--witness", "127.0.0.1:9", "--witness-cert", &cert, "--key", key]);
    assert_refused(&status(&key), "asking the witness at 127.0.0.1:9");
    assert_refused(&status(&state), "cannot read");
    let _ = std::fs::remove_dir_all(&dir);
}
