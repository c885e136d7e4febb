//! The VM around its memory before any vCPU runs: what boot, restore and a standby's
//! takeover build, the standby ahead of time.

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::{cpuid, check_vcpus, FrozenTime, Spares, Vm, VmError};
use crate::boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::devices::bus::DeviceBus;
use crate::devices::serial::{IrqTrigger, SerialPort, COM1_IRQ};
use crate::devices::virtio::backends::Backends;
use crate::devices::Section;
use crate::kvm::{Hypervisor, KvmVcpu, VmHandle};
use crate::memory::GuestRam;
use crate::output::SharedSink;
use crate::state::MsrPlan;
use crate::vcpu::{VcpuSet, Waker};

/// A KVM VM with memory slots and vCPUs (their CPUID set), before anything runs.
struct Frame {
    kvm_vm: VmHandle,
    vcpus: Vec<KvmVcpu>,
    msrs: MsrPlan,
}

impl Frame {
    /// Boot, restore and takeover build the same machine this way: a VM must be
    /// restored onto the CPUID and memory layout it was captured with.
    fn build(kvm_device: &std::path::Path, ram: &GuestRam, vcpu_count: u8) -> Result<Self, VmError> {
        check_vcpus(u32::from(vcpu_count))?;
        let hypervisor = Hypervisor::open(kvm_device)?;
        if usize::from(vcpu_count) > hypervisor.max_vcpus() {
            return Err(VmError::HostVcpuLimit {
                asked: vcpu_count,
                max: hypervisor.max_vcpus(),
            });
        }
        let kvm_vm = hypervisor.create_vm(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS)?;
        ram.register(&kvm_vm)?;
        let base_cpuid = hypervisor.supported_cpuid()?;
        let host = cpuid::HostFeatures {
            tsc_deadline_timer: hypervisor.has_tsc_deadline_timer(),
        };
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for index in 0..vcpu_count {
            let vcpu = kvm_vm.create_vcpu(index)?;
            let mut cpuid = base_cpuid.clone();
            cpuid::configure(&mut cpuid, index, vcpu_count, host);
            vcpu.set_cpuid(&cpuid)?;
            vcpus.push(vcpu);
        }
        // Which of KVM's MSRs read back depends only on the host and the CPUID just set,
        // so it is found once here rather than inside every capture's stopped time.
        let msrs = match vcpus.first() {
            Some(vcpu) => MsrPlan::probe(vcpu, &hypervisor.msr_index_list()?),
            None => MsrPlan::default(),
        };
        Ok(Self { kvm_vm, vcpus, msrs })
    }
}

/// A VM before its vCPUs run: memory registered, vCPUs created with their CPUID.
pub(super) struct Shell {
    frame: Frame,
    pub(super) ram: GuestRam,
}

impl Shell {
    pub(super) fn build(kvm_device: &std::path::Path, mem_mib: u64, vcpu_count: u8) -> Result<Self, VmError> {
        Self::build_with(kvm_device, GuestRam::new(mem_mib)?, vcpu_count)
    }

    /// The same, around guest RAM that already holds the guest's pages.
    pub(super) fn build_with(kvm_device: &std::path::Path, ram: GuestRam, vcpu_count: u8) -> Result<Self, VmError> {
        let frame = Frame::build(kvm_device, &ram, vcpu_count)?;
        Ok(Self { frame, ram })
    }

    pub(super) fn kvm_vm(&self) -> &VmHandle {
        &self.frame.kvm_vm
    }

    pub(super) fn vcpus(&self) -> &[KvmVcpu] {
        &self.frame.vcpus
    }

    /// Wires the serial interrupt and the virtio devices, sets the devices' state when
    /// there is one to restore, starts the vCPUs and hands over the running VM.
    pub(super) fn start(self, frozen: Option<FrozenTime>, sink: SharedSink, backends: Backends, devices: Option<&[Section]>) -> Result<Vm, VmError> {
        let Self { frame, ram } = self;
        let line = frame.kvm_vm.irq_line(COM1_IRQ);
        let irq = IrqTrigger::new(move || line.pulse().map_err(std::io::Error::other));
        let mut bus = DeviceBus::new(SerialPort::new(irq, sink.clone()));
        let (virtio, virtio_devices) = backends.attach(&frame.kvm_vm, ram.memory())?;
        for device in virtio_devices {
            bus.add(device)?;
        }
        if let Some(sections) = devices {
            bus.restore(sections)?;
        }
        // The devices come paused (see `Backends::attach`); a VM that starts paused
        // keeps them so.
        if frozen.is_none() {
            virtio.resume();
        }
        let bus = Arc::new(Mutex::new(bus));
        let (exit_tx, exits) = channel();
        let waker = Waker::new(exit_tx.clone());
        let vcpus = VcpuSet::start(frame.vcpus, bus.clone(), exit_tx, frozen.is_some())?;
        let spares = Spares::new((ram.mem_mib() << 20) as usize);
        Ok(Vm {
            virtio,
            vcpus,
            bus,
            sink,
            exits,
            waker,
            kvm_vm: frame.kvm_vm,
            ram,
            msrs: frame.msrs,
            frozen,
            spares,
        })
    }
}

/// A standby's VM, built ahead of a takeover around the RAM its image is applied into:
/// creating a VM and its vCPUs costs milliseconds (more in the lab), which a takeover
/// would otherwise spend after deciding. What is left then is setting the machine state
/// and starting the vCPUs ([`Vm::resume_prepared`]).
pub struct Prepared {
    frame: Frame,
    /// The RAM the slots were registered over, by guest and host address and length:
    /// only that RAM may be resumed in this VM.
    slots: Vec<(u64, u64, u64)>,
}

fn slots(ram: &GuestRam) -> Vec<(u64, u64, u64)> {
    ram.memory().iter().map(|r| (r.start_addr().raw_value(), r.len(), r.as_ptr() as u64)).collect()
}

impl Prepared {
    /// Registers `ram` with a new VM. No vCPU of it runs, so nothing reads or writes that
    /// memory through KVM until [`Vm::resume_prepared`] hands the same RAM over, which
    /// it then owns.
    pub fn new(kvm_device: &std::path::Path, ram: &GuestRam, vcpus: u8) -> Result<Self, VmError> {
        let frame = Frame::build(kvm_device, ram, vcpus)?;
        Ok(Self { frame, slots: slots(ram) })
    }

    pub(super) fn into_shell(self, ram: GuestRam) -> Result<Shell, VmError> {
        if slots(&ram) != self.slots {
            return Err(VmError::Chain("the RAM to resume is not the RAM this VM was prepared around".into()));
        }
        Ok(Shell { frame: self.frame, ram })
    }

    pub fn vcpus(&self) -> usize {
        self.frame.vcpus.len()
    }
}

/// A VM with one vCPU that never runs, held open for as long as this value lives. In
/// the lab it keeps the lab kernel from patching its own code at every VM: KVM turns
/// static keys on when the first VM (preempt notifiers, in the scheduler's context
/// switch) or the first software-disabled LAPIC appears and off again when the last
/// goes, and each such patch is where the lab host froze (docs/lab.md).
pub struct IdleVm {
    _vcpu: KvmVcpu,
    _vm: VmHandle,
}

impl IdleVm {
    pub fn create(kvm_device: &std::path::Path) -> Result<Self, VmError> {
        let vm = Hypervisor::open(kvm_device)?.create_vm(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS)?;
        let vcpu = vm.create_vcpu(0)?;
        Ok(Self { _vcpu: vcpu, _vm: vm })
    }
}
