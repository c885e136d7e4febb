//! A Linux guest's virtio NIC, in the lab: the lab host reaches the guest through a TAP
//! device, and the guest's servers (`tandem.workload=net`) answer.

mod common;

use common::{lab, section};

const MAC: &str = "52:54:00:00:00:02";
const GUEST_IP: &str = "10.0.0.2";

/// Creates tap0 (10.0.0.1/24) in the lab host; then `tandem ARGS` with a NIC on it and
/// the net workload, console to /tmp/out; waits for the guest's server.
fn guest_on_tap(tandem_args: &str) -> String {
    format!(
        "tunctl -t tap0 >/dev/null && ip addr add 10.0.0.1/24 dev tap0 && ip link set tap0 up || exit 1\n\
         : > /tmp/out\n\
         tandem {tandem_args} --net tap=tap0,mac={MAC} > /tmp/out 2>&1 & pid=$!\n\
         n=0; while ! grep -q TANDEM-NET-LISTENING /tmp/out; do sleep 0.1; n=$((n+1)); [ $n -lt 1200 ] || {{ cat /tmp/out; exit 1; }}; done\n"
    )
}

fn run_guest(control: &str) -> String {
    guest_on_tap(&format!(
        "run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio {control} \
         --append 'quiet tandem.workload=net tandem.ip={GUEST_IP}/24'"
    ))
}

/// splitmix64's finaliser, as tandem-work computes it.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the guest's server answers to request `n`.
fn reply(n: u64) -> String {
    format!("{n} {:016x}", mix64(n))
}

/// The SHA-256 of what `tandem-work blob --mib 8` writes, computed here.
fn blob_sha256() -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let words = 8 * 1024 * 1024 / 8;
    let mut chunk = Vec::with_capacity(8192 * 8);
    for i in 0..words as u64 {
        chunk.extend_from_slice(&mix64(i).to_le_bytes());
        if chunk.len() == chunk.capacity() {
            ctx.update(&chunk);
            chunk.clear();
        }
    }
    ctx.update(&chunk);
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_guest_nic_answers_ping_numbered_requests_and_http_with_the_right_bytes() {
    let script = format!(
        "{start}\
         echo '=== ping'; ping -c 3 -W 5 {GUEST_IP} | grep -c 'bytes from'\n\
         echo '=== requests'; printf '1\\n2\\n3\\n1000\\n' | nc -w 5 {GUEST_IP} 7000\n\
         echo '=== blob'; wget -q -O - http://{GUEST_IP}/blob | sha256sum\n\
         echo '=== neigh'; ip neigh show dev tap0\n\
         echo '=== console'; cat /tmp/out\n\
         kill -9 $pid; wait $pid; exit 0\n",
        start = run_guest(""),
    );
    lab(&[], &["sh", "-c", &script], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        let console = section(run, "console");
        assert!(console.iter().any(|l| *l == format!("TANDEM-GUEST-NET=eth0 {GUEST_IP}/24 {MAC}")), "{}", run.dump());
        assert_eq!(section(run, "ping"), ["3"], "{}", run.dump());
        let want: Vec<String> = [1, 2, 3, 1000].into_iter().map(reply).collect();
        assert_eq!(section(run, "requests"), want, "{}", run.dump());
        let blob = section(run, "blob");
        assert_eq!(blob.first().and_then(|l| l.split_whitespace().next()), Some(blob_sha256().as_str()), "{}", run.dump());
        // The host learnt the guest's address at the guest's MAC.
        assert!(section(run, "neigh").iter().any(|l| l.contains(GUEST_IP) && l.contains(MAC)), "{}", run.dump());
    });
}

/// A connection opened to the guest before a snapshot is answered by the VM restored
/// from it: the TCP state lives in guest memory, and the NIC's queues come back where
/// the driver left them.
#[test]
fn a_vm_with_a_nic_restores_identically_and_keeps_its_connection() {
    let script = format!(
        "{start}\
         mkfifo /tmp/req; nc {GUEST_IP} 7000 < /tmp/req > /tmp/conn & client=$!\n\
         exec 3>/tmp/req; echo 1 >&3\n\
         n=0; while ! grep -q '^1 ' /tmp/conn; do sleep 0.1; n=$((n+1)); [ $n -lt 300 ] || exit 1; done\n\
         tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/a || exit 1\n\
         kill -9 $pid; wait $pid\n\
         tandem restore --paused --snapshot /tmp/a --net tap=tap0,mac={MAC} --control /tmp/ctl2 > /tmp/out2 2>&1 & pid=$!\n\
         n=0; while ! tandem ctl /tmp/ctl2 status >/dev/null 2>&1; do sleep 0.05; n=$((n+1)); [ $n -lt 1200 ] || exit 1; done\n\
         tandem ctl /tmp/ctl2 snapshot /tmp/b || exit 1\n\
         echo '=== restored'; tandem inspect /tmp/b --against /tmp/a\n\
         tandem ctl /tmp/ctl2 resume || exit 1\n\
         echo 2 >&3; echo 3 >&3\n\
         n=0; while ! grep -q '^3 ' /tmp/conn; do sleep 0.1; n=$((n+1)); [ $n -lt 600 ] || break; done\n\
         exec 3>&-; kill $client\n\
         echo '=== connection'; cat /tmp/conn\n\
         echo '=== new connection'; printf '4\\n' | nc -w 5 {GUEST_IP} 7000\n\
         echo '=== console'; cat /tmp/out2\n\
         kill -9 $pid; wait $pid; exit 0\n",
        start = run_guest("--control /tmp/ctl"),
    );
    lab(&["--lab-mem-mib", "3072"], &["sh", "-c", &script], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        let restored = section(run, "restored");
        assert!(
            restored.iter().any(|l| l.starts_with("identical: ")) && !restored.iter().any(|l| l.starts_with("differs")),
            "{restored:#?}\n{}",
            run.dump()
        );
        let want: Vec<String> = [1, 2, 3].into_iter().map(reply).collect();
        assert_eq!(section(run, "connection"), want, "{}", run.dump());
        assert_eq!(section(run, "new connection"), [reply(4)], "{}", run.dump());
    });
}

/// `tandem drill --workload net` at five kill points (in a download, right after a
/// release, while idle, in the middle of sending an epoch of frames, at random into the
/// connection): the client's one TCP connection to the guest goes on on the
/// standby with every reply in order, and an HTTP download cut by the kill arrives
/// whole.
#[test]
fn a_clients_connection_survives_the_primarys_death_at_five_kill_points() {
    // The seed's random kill comes 0.3 s into the connection. (A fixed kill 0.5 s in
    // was dropped for the suite's time: it met the connection where this one does.)
    let kills = "download,after-release,idle,mid-epoch,random";
    common::drill(&[], &["--workload", "net", "--runs", "5", "--kill-at", kills, "--seed", "7"], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        let kept: Vec<&str> = run.lines().filter(|l| l.starts_with("run ") && l.contains("the connection survived")).collect();
        assert_eq!(kept.len(), 5, "{}", run.dump());
        // Every kill came after the guest's server had answered, and a takeover followed;
        // then the guest's gratuitous ARP, the bridge sent its frames to the standby, and
        // the client's neighbour table kept the guest's address at its MAC.
        assert!(kept.iter().all(|l| l.contains("took over as primary")), "{}", run.dump());
        assert!(kept.iter().all(|l| l.contains("the guest announced 10.77.0.2, the bridge found")), "{}", run.dump());
        assert_eq!(kept.iter().filter(|l| l.contains("the download across the takeover arrived whole")).count(), 1, "{}", run.dump());
        assert!(kept.iter().any(|l| l.contains("kill in the middle of sending epoch")), "{}", run.dump());
        // And each connection lived through the takeover: its longest wait was the
        // detection (the drill's 2 s timeout).
        for l in &kept {
            let gap: u64 = l.split("max_gap_ms=").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0);
            assert!(gap >= 1800, "a connection that did not wait out the takeover: {l}");
        }
        assert!(run.says("drill: 5/5 runs kept the connection"), "{}", run.dump());
        // The lab host froze in its kernel's patches of its own text, which a first UDP
        // socket with GRO, a first ICMP error or a first VM makes; /lab/run makes them
        // before the command, with one CPU online, and holds them (docs/lab.md). Five
        // takeovers with a client, a bridge and TAPs must then make none.
        let patches: Vec<u64> = common::drill_verdicts(run).iter().filter_map(|v| v["kernel_text_patches"].as_u64()).collect();
        assert_eq!(patches, [0], "the lab kernel patched its text while the drill ran: {}", run.dump());
    });
}
