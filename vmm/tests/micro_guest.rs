//! The vCPU state machine and dirty tracking, driven with a tiny real-mode guest that
//! runs directly on this host's /dev/kvm (PVM here; it cannot run Linux, but it runs
//! this). Linux guests are tested in the lab, by the root package's tests.

use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_vmm::boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use tandem_vmm::devices::bus::DeviceBus;
use tandem_vmm::devices::serial::{IrqTrigger, SerialPort};
use tandem_vmm::kvm::{Hypervisor, VmHandle};
use tandem_vmm::memory::{GuestRam, PAGE_SIZE};
use tandem_vmm::output::{OutputSink, Passthrough};
use tandem_vmm::snapshot::codec;
use tandem_vmm::state::{MsrPlan, VcpuState, VmState};
use tandem_vmm::vcpu::VcpuSet;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x5000;

/// `xor ax,ax; mov ds,ax; l: inc word [0x5000]; jmp l` — spins forever dirtying one page
/// and never exits to the VMM, so only a kick can get the vCPU out.
const SPIN: [u8; 10] = [0x31, 0xc0, 0x8e, 0xd8, 0xff, 0x06, 0x00, 0x50, 0xeb, 0xfa];

fn hypervisor() -> Hypervisor {
    Hypervisor::open(Path::new("/dev/kvm")).unwrap_or_else(|e| {
        panic!("these tests need /dev/kvm on the host (any KVM, PVM included): {e}")
    })
}

/// `xor ax,ax; xor bx,bx; mov dx,0x3ff; l: inc ax; out dx,al; inc bx; jmp l` — writes
/// a counter to the UART's scratch register, one I/O exit per loop, counting each
/// completed write in bx.
const OUT_LOOP: [u8; 13] = [0x31, 0xc0, 0x31, 0xdb, 0xba, 0xff, 0x03, 0x40, 0xee, 0x43, 0xeb, 0xfb, 0x90];
/// Where OUT_LOOP's `out` is.
const OUT_AT: u64 = CODE + 8;

struct Micro {
    vcpus: VcpuSet,
    vm: VmHandle,
    ram: GuestRam,
    bus: Arc<Mutex<DeviceBus>>,
}

fn start(n: u8) -> Micro {
    start_with(n, &SPIN)
}

fn start_with(n: u8, code: &[u8]) -> Micro {
    let hv = hypervisor();
    let ram = GuestRam::new(16).unwrap();
    let vm = hv.create_vm(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS).unwrap();
    ram.register(&vm).unwrap();
    ram.memory().write_slice(code, GuestAddress(CODE)).unwrap();
    let sink: Arc<Mutex<dyn OutputSink>> = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
    let bus = Arc::new(Mutex::new(DeviceBus::new(SerialPort::new(
        IrqTrigger::new(|| Ok(())),
        sink,
    ))));
    let mut vcpus = Vec::new();
    for i in 0..n {
        let vcpu = vm.create_vcpu(i).unwrap();
        let mut sregs = vcpu.sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.regs().unwrap();
        regs.rip = CODE;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        vcpus.push(vcpu);
    }
    let (tx, _rx) = channel();
    let vcpus = VcpuSet::start(vcpus, bus.clone(), tx, false).unwrap();
    Micro { vcpus, vm, ram, bus }
}

fn counter(m: &Micro) -> u16 {
    m.ram.memory().read_obj(GuestAddress(COUNTER)).unwrap()
}

fn wait_for_progress(m: &Micro) -> u16 {
    let before = counter(m);
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(5));
        if counter(m) != before {
            return counter(m);
        }
    }
    panic!("the guest made no progress in 2 s");
}

#[test]
fn pause_stops_a_spinning_guest_and_resume_restarts_it() {
    let m = start(1);
    wait_for_progress(&m);
    for round in 0..50 {
        let took = m.vcpus.pause(Duration::from_secs(2)).unwrap();
        assert!(m.vcpus.is_paused());
        let frozen = counter(&m);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(counter(&m), frozen, "round {round}: guest ran while paused (pause took {took:?})");
        m.vcpus.resume();
        assert!(!m.vcpus.is_paused());
        wait_for_progress(&m);
    }
}

/// KVM completes an I/O exit (RIP past the `out`) only at the next KVM_RUN; a pause
/// that caught a vCPU between the two would capture the `out` as not yet done while
/// the device already has its byte, and a restore would write it again.
#[test]
fn a_paused_vcpu_never_shows_an_io_instruction_half_done() {
    let m = start_with(1, &OUT_LOOP);
    let mut at_out = 0;
    for round in 0..1000 {
        std::thread::sleep(Duration::from_micros(200));
        m.vcpus.pause(Duration::from_secs(2)).unwrap();
        let regs = m.vcpus.on_each_paused(|_, vcpu| vcpu.regs().unwrap()).unwrap().remove(0);
        // The UART's scratch register, which reads back without side effects.
        let mut scratch = [0u8];
        m.bus.lock().unwrap().pio_read(0x3f8 + 7, &mut scratch);
        let written = scratch[0];
        let (ax, bx) = (regs.rax as u8, regs.rbx as u8);
        // Done writes so far, as the guest's registers tell them: bx, plus one if the
        // vCPU stands just after an `out` whose `inc bx` has not run.
        let expect = if regs.rip == OUT_AT + 1 { ax } else { bx };
        assert_eq!(written, expect, "round {round}: rip={:#x} ax={ax} bx={bx}, the UART holds {written}", regs.rip);
        if regs.rip == OUT_AT {
            at_out += 1;
        }
        m.vcpus.resume();
    }
    eprintln!("{at_out} of 1000 pauses found the vCPU at the out instruction");
}

#[test]
fn pause_waits_for_every_vcpu() {
    let m = start(4);
    wait_for_progress(&m);
    for _ in 0..20 {
        m.vcpus.pause(Duration::from_secs(2)).unwrap();
        let frozen = counter(&m);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(counter(&m), frozen, "some vCPU kept running");
        m.vcpus.resume();
    }
}

#[test]
fn dirty_pages_are_the_union_of_guest_and_vmm_writes() {
    let mut m = start(1);
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    // The first harvest turns KVM's log on and reports every page: there is no earlier
    // capture for it to be incremental to.
    let first = m.ram.take_dirty(&m.vm).unwrap();
    assert_eq!(first.count(), (16 << 20) / PAGE_SIZE);

    // From then on it is exact: the guest's counter page, once it has run again.
    m.vcpus.resume();
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    let guest = m.ram.take_dirty(&m.vm).unwrap();
    assert_eq!(guest.addresses().map(|a| a.0).collect::<Vec<_>>(), vec![COUNTER]);

    // Paused: nothing new, except what the VMM writes now.
    m.ram.memory().write_obj(7u64, GuestAddress(0x9000)).unwrap();
    let second = m.ram.take_dirty(&m.vm).unwrap();
    assert_eq!(second.addresses().map(|a| a.0).collect::<Vec<_>>(), vec![0x9000]);

    // A capture that failed gives its pages back; they come out again next time.
    m.ram.give_back(&second);
    m.vcpus.resume();
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    let third = m.ram.take_dirty(&m.vm).unwrap();
    let pages: Vec<u64> = third.addresses().map(|a| a.0).collect();
    assert_eq!(pages, vec![COUNTER, 0x9000]);
    assert_eq!(third.count() * PAGE_SIZE, 2 * PAGE_SIZE);
}

/// Captures KVM and vCPU state of a paused guest (on each vCPU's own thread).
fn capture(m: &Micro, msrs: Vec<u32>) -> (VmState, Vec<VcpuState>) {
    let (vm_state, _) = VmState::capture(&m.vm).unwrap();
    let vcpus = m
        .vcpus
        .on_each_paused(move |_, vcpu| {
            // This guest never touches the SYSENTER MSRs the plan probes by writing.
            let plan = MsrPlan::probe(vcpu, &msrs);
            VcpuState::capture(vcpu, &plan).unwrap()
        })
        .unwrap();
    (vm_state, vcpus)
}

#[test]
fn state_through_the_codec_into_a_fresh_vm_captures_the_same_and_runs_on() {
    let msrs = hypervisor().msr_index_list().unwrap();
    let m = start(1);
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    let (vm_state, vcpu_states) = capture(&m, msrs.clone());
    // Through the snapshot codec and back, as a file would carry them.
    let bytes = codec::encode(&(&vm_state, &vcpu_states)).unwrap();
    let (vm_state, vcpu_states): (VmState, Vec<VcpuState>) = codec::decode(&bytes).unwrap();
    let mut image = vec![0u8; 16 << 20];
    m.ram.memory().read_slice(&mut image, GuestAddress(0)).unwrap();
    let saved_counter = counter(&m);
    drop(m);

    // A new VM from the saved pieces: memory, then VM-wide state, then the vCPU.
    let hv = hypervisor();
    let ram = GuestRam::new(16).unwrap();
    let vm = hv.create_vm(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS).unwrap();
    ram.register(&vm).unwrap();
    ram.memory().write_slice(&image, GuestAddress(0)).unwrap();
    vm_state.restore(&vm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu_states[0].restore(&vcpu).unwrap();
    let sink: Arc<Mutex<dyn OutputSink>> = Arc::new(Mutex::new(Passthrough::new(std::io::sink())));
    let bus = Arc::new(Mutex::new(DeviceBus::new(SerialPort::new(IrqTrigger::new(|| Ok(())), sink))));
    let (tx, _rx) = channel();
    let restored = Micro {
        vcpus: VcpuSet::start(vec![vcpu], bus.clone(), tx, true).unwrap(),
        vm,
        ram,
        bus,
    };
    restored.vcpus.pause(Duration::from_secs(2)).unwrap();

    // save -> restore -> save: the same registers, segments, LAPIC and MSRs.
    let (_, again) = capture(&restored, msrs);
    let (a, b) = (&vcpu_states[0], &again[0]);
    assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs));
    assert_eq!(format!("{:?}", a.sregs), format!("{:?}", b.sregs));
    assert_eq!(a.lapic.regs[..], b.lapic.regs[..]);
    let tsc = 0x10;
    let without_tsc = |s: &VcpuState| -> Vec<(u32, u64)> {
        s.msrs.iter().filter(|e| e.index != tsc).map(|e| (e.index, e.data)).collect()
    };
    assert_eq!(without_tsc(a), without_tsc(b));

    // And the guest carries on from where it was.
    assert_eq!(counter(&restored), saved_counter);
    restored.vcpus.resume();
    wait_for_progress(&restored);
}

#[test]
fn counting_pending_dirty_pages_does_not_consume_them() {
    let mut m = start(1);
    assert_eq!(m.ram.pending_dirty(&m.vm).unwrap(), None, "before the first harvest");
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    m.ram.take_dirty(&m.vm).unwrap();
    m.vcpus.resume();
    wait_for_progress(&m);
    m.vcpus.pause(Duration::from_secs(2)).unwrap();
    assert_eq!(m.ram.pending_dirty(&m.vm).unwrap(), Some(1));
    assert_eq!(m.ram.pending_dirty(&m.vm).unwrap(), Some(1), "still there after counting");
    let taken = m.ram.take_dirty(&m.vm).unwrap();
    assert_eq!(taken.addresses().map(|a| a.0).collect::<Vec<_>>(), vec![COUNTER]);
}
