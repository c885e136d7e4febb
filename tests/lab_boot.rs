//! A stock Linux guest (the Debian cloud kernel) booted by tandem inside the lab, judged
//! by what the guest itself printed.

mod common;

use common::{images, lab, lab_guest, ticks};

/// One lab run, two guests in turn (each lab run boots a lab host, seconds of the
/// suite's time): one vCPU ticking 20 times, then four vCPUs.
#[test]
fn guests_with_one_and_four_vcpus_boot_print_and_power_off() {
    let run_guest = "tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio";
    let script = format!(
        "{run_guest} --append 'quiet tandem.workload=ticker tandem.ticks=20'; echo one-exit=$?; \
         {run_guest} --vcpus 4 --append 'quiet tandem.workload=none'; echo four-exit=$?"
    );
    lab(&[], &["sh", "-c", &script], |run| {
        assert!(run.says("one-exit=0"), "tandem must exit 0 when the guest powers off\n{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-READY"), "{}", run.dump());
        assert_eq!(ticks(run), (1..=20).collect::<Vec<_>>(), "{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-DONE rc=0"), "{}", run.dump());
        assert!(!run.stdout.contains("TANDEM-CLOCK-BACKWARDS"), "{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-CPUS=4"), "{}", run.dump());
        assert!(run.says("four-exit=0"), "{}", run.dump());
    });
}

/// One lab run: an operator's own kernel and initramfs (`--with`), the lab returning the
/// command's own status; and a guest kernel that panics. With no /init the kernel
/// panics, and `panic=1` reboots it a second later through the i8042 reset command
/// (the firmware tables advertise no 8042, only its reset is used): tandem exits 3.
#[test]
fn lab_with_files_runs_an_operators_kernel_and_a_panicking_guest_resets_and_exits_3() {
    let dir = images();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("guest-initrd.cpio");
    lab(
        &["--with", kernel.to_str().unwrap(), "--with", initrd.to_str().unwrap()],
        &["sh", "-c",
          "tandem run --kernel /with/vmlinuz --initrd /with/guest-initrd.cpio --append 'quiet tandem.workload=none'; \
           echo run-exit=$?; \
           tandem run --kernel /with/vmlinuz --initrd /with/guest-initrd.cpio --append 'rdinit=/nonexistent init=/nonexistent'; \
           echo panic-exit=$?; exit 7"],
        |run| {
        assert_eq!(run.code, 7, "the lab must return the command's status\n{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-READY"), "{}", run.dump());
        assert!(run.stdout.contains("run-exit=0"), "{}", run.dump());
        assert!(run.stdout.contains("Kernel panic"), "{}", run.dump());
        assert!(run.says("panic-exit=3"), "{}", run.dump());
        assert!(run.says("the guest reset itself (reset through the keyboard controller"), "{}", run.dump());
    });
}

#[test]
fn elf_vmlinux_boots_through_pvh() {
    lab_guest(
        &["--kernel", "/images/vmlinux", "--vcpus", "2"],
        "quiet tandem.workload=ticker tandem.ticks=3",
        |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-CPUS=2"), "{}", run.dump());
        assert_eq!(ticks(run), vec![1, 2, 3], "{}", run.dump());
    });
}

/// Parses `tandem: dirty phase=P pages=N ...` lines into (phase, pages).
fn dirty_reports(run: &common::Run) -> Vec<(String, u64)> {
    run.lines()
        .filter_map(|l| l.strip_prefix("tandem: dirty "))
        .map(|rest| {
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {rest}"))
                    .to_string()
            };
            (field("phase="), field("pages=").parse().unwrap())
        })
        .collect()
}

#[test]
fn dirty_page_api_reports_every_page_first_then_every_page_the_guest_dirties() {
    const RATE_MIB: u64 = 8;
    // tandem's reports go to a file and come out after the run: on the lab's one
    // console they would otherwise break into the guest's lines mid-line.
    let script = format!(
        "tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio --dirty-stats-ms 1000 \
         --append 'quiet tandem.workload=dirty tandem.dirty_mib={RATE_MIB} tandem.span_mib=32 tandem.seconds=6' 2>/tmp/err; \
         rc=$?; cat /tmp/err; exit $rc"
    );
    lab(&[], &["sh", "-c", &script], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        let reports = dirty_reports(run);

        // The first harvest starts tracking and reports every page of the 256 MiB guest
        // once: there is nothing earlier for it to be incremental to.
        let (phase, start_pages) = &reports[0];
        assert_eq!(phase, "start");
        assert_eq!(*start_pages, (256 << 20) / 4096, "{}", run.dump());

        // The guest writes RATE_MIB MiB of distinct pages per second (its 32 MiB span is
        // larger than a second's writes), so each page write it counts was in some interval.
        let guest_total: u64 = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("dirty "))
            .inspect(|l| assert!(l.ends_with("check=OK"), "guest memory check failed: {l}"))
            .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("pages=")))
            .map(|n| n.parse::<u64>().unwrap())
            .max()
            .unwrap_or_else(|| panic!("the dirty workload printed nothing\n{}", run.dump()));
        let run_reports: Vec<u64> = reports[1..].iter().map(|(_, p)| *p).collect();
        let seen: u64 = run_reports.iter().sum();
        assert!(guest_total >= 4 * RATE_MIB * 256, "the workload barely ran: {guest_total} pages\n{}", run.dump());
        assert!(seen >= guest_total, "tracked {seen} dirty pages, the guest wrote {guest_total}\n{}", run.dump());

        // And it is not simply reporting all memory. Boot (the kernel unpacking itself) and
        // the workload populating its span dirty many pages in their seconds, and a slow lab
        // stretches the boot over more of them (in one CI run, 7 of 12): so rather than the
        // median, the workload's steady seconds are counted. Of its 6 seconds, the first
        // may hold the span's population and the last is cut by the guest's exit; at least
        // 3 must come near the asked rate plus the kernel's own writes. Were every page
        // reported, none would.
        let per_second = RATE_MIB * 256;
        let steady = run_reports.iter().filter(|&&p| p >= per_second / 2 && p <= 2 * per_second + 1024).count();
        assert!(
            steady >= 3,
            "{steady} 1 s intervals near {per_second} dirty pages (the asked rate), want at least 3: {run_reports:?}"
        );
    });
}

/// A lab CPU stuck in the lab kernel: the lab's watcher reads the lockup report from the
/// kernel's log (here a forged one), passes it on and stops the lab with its own
/// status and report. The tests never retry it: no peer run has shown one (see
/// docs/lab.md). A real lockup once held a CI run's lab until its 400 s timeout, with
/// nothing to say where the CPU was stuck.
#[test]
fn a_lockup_of_the_lab_kernel_stops_the_lab_and_passes_on_its_report() {
    // Through `lab_run`, so that a lab that froze instead (its own fault, see
    // `common::checked`) is retried once and counted, as for every lab test. The report
    // goes into the run's output, for the check to read.
    let attempt = || {
        let (mut run, facts) = common::lab_run(
            &[],
            &["sh", "-c",
              "echo 'watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [forged:1]' >/dev/kmsg; \
               echo 'RIP: 0010:forged_function+0x1/0x2' >/dev/kmsg; echo waiting; sleep 600"],
        );
        run.stdout.push_str(&format!("\nlab_fault={}\n", facts.lab_fault));
        (run, facts)
    };
    common::checked(attempt, |run| {
        assert_eq!(run.code, 125, "{}", run.dump());
        assert!(run.says("lab_fault=locked_up"), "{}", run.dump());
        assert!(run.says("the lab host's kernel locked up"), "{}", run.dump());
        assert!(run.stdout.contains("waiting"), "{}", run.dump());
        assert!(run.stdout.contains("CPU#1 stuck for 22s! [forged:1]"), "{}", run.dump());
        assert!(run.stdout.contains("RIP: 0010:forged_function+0x1/0x2"), "{}", run.dump());
    });
}

/// The VMM's micro-guest tests (`vmm/tests/micro_guest.rs`) again, on the lab's
/// hardware-virtualised KVM. The host's PVM KVM differs where it matters: it moves
/// RIP past an I/O instruction before the exit reaches the VMM, as stock KVM does not,
/// so only here can the test of a pause landing mid-I/O fail.
#[test]
fn the_micro_guest_tests_pass_on_the_labs_kvm() {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let newest = std::fs::read_dir(&deps)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("micro_guest-") && !name.contains('.')
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no micro_guest test binary in {}: run the tests with cargo test --workspace", deps.display()));
    let binary = newest.path();
    let inside = format!("/with/{}", newest.file_name().to_string_lossy());
    // On nested paging, as on a host with hardware virtualisation: with the lab's
    // default shadow paging, KVM also reports the micro guest's code page dirty, and
    // these tests check the exact dirty set.
    let with = ["--with", binary.to_str().unwrap()];
    let command = [inside.as_str(), "--test-threads=1"];
    common::checked(|| common::lab_run_env(&[("TANDEM_LAB_NPT", "1")], &with, &command), |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        assert!(run.stdout.contains("a_paused_vcpu_never_shows_an_io_instruction_half_done ... ok"), "{}", run.dump());
        assert!(run.stdout.contains("test result: ok."), "{}", run.dump());
    });
}
