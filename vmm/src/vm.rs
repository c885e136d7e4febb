//! A whole virtual machine: memory, boot, devices and vCPUs, and its life cycle.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_lapic_state;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::boot::{acpi, cpuid, loader, msrs, mptable, regs};
use crate::devices::bus::PortBus;
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::kvm::{Hypervisor, KvmError, KvmVcpu, VmHandle};
use crate::memory::{DirtyPages, GuestRam, MemoryError};
use crate::output::SharedSink;
use crate::vcpu::{VcpuError, VcpuSet, VmExit};

/// Most vCPUs a tandem VM may have: the boot tables are sized for it and every pause
/// kicks each one, so a bound keeps both predictable.
pub const MAX_VCPUS: u8 = 32;

/// Everything needed to boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_device: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u32),
    #[error("this host's KVM allows at most {max} vCPUs, {asked} were asked for")]
    HostVcpuLimit { asked: u8, max: usize },
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("cannot set up boot registers: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("cannot write the MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Checks a requested vCPU count before any resource is taken.
pub fn check_vcpus(n: u32) -> Result<u8, VmError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(VmError::VcpuCount(n)),
    }
}

/// LAPIC local vector table registers and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as firmware would, so interrupts
/// from the legacy PIC reach the boot CPU before the kernel programs the IOAPIC.
fn set_lint(lapic: &mut kvm_lapic_state) {
    let mut update = |offset: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    update(APIC_LVT_LINT0, APIC_MODE_EXTINT);
    update(APIC_LVT_LINT1, APIC_MODE_NMI);
}

/// A booted VM. Field order is drop order: the vCPU threads end before the KVM VM is
/// closed, and the VM is closed before the memory it maps is unmapped.
pub struct Vm {
    vcpus: VcpuSet,
    bus: Arc<Mutex<PortBus>>,
    sink: SharedSink,
    exits: Receiver<VmExit>,
    kvm_vm: VmHandle,
    ram: GuestRam,
}

impl Vm {
    /// Builds the VM described by `config`, loads the kernel and starts the vCPUs.
    /// Guest console output goes to `sink`.
    pub fn boot(config: VmConfig, sink: SharedSink) -> Result<Self, VmError> {
        check_vcpus(u32::from(config.vcpus))?;
        let hypervisor = Hypervisor::open(&config.kvm_device)?;
        if usize::from(config.vcpus) > hypervisor.max_vcpus() {
            return Err(VmError::HostVcpuLimit {
                asked: config.vcpus,
                max: hypervisor.max_vcpus(),
            });
        }
        let ram = GuestRam::new(config.mem_mib)?;
        let kvm_vm = hypervisor.create_vm(KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS)?;
        ram.register(&kvm_vm)?;

        let mem = ram.memory();
        mptable::write_mptable(mem, config.vcpus)?;
        let rsdp = acpi::write_acpi_tables(mem, config.vcpus)?;
        let kernel = loader::load_linux(
            mem,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            Some(rsdp),
        )?;
        tracing::debug!(?kernel, "kernel loaded");

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        kvm_vm.register_irqfd(&irq, COM1_IRQ)?;
        let bus = Arc::new(Mutex::new(PortBus::new(SerialPort::new(irq, sink.clone()))));

        let base_cpuid = hypervisor.supported_cpuid()?;
        let host = cpuid::HostFeatures {
            tsc_deadline_timer: hypervisor.has_tsc_deadline_timer(),
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = kvm_vm.create_vcpu(index)?;
            let mut cpuid = base_cpuid.clone();
            cpuid::configure(&mut cpuid, index, config.vcpus, host);
            vcpu.set_cpuid(&cpuid)?;
            vcpu.set_msrs(&msrs::boot_msrs())?;
            let mut lapic = vcpu.lapic()?;
            set_lint(&mut lapic);
            vcpu.set_lapic(&lapic)?;
            vcpu.set_fpu(&regs::boot_fpu())?;
            // Only the boot CPU starts at the kernel; the others wait for the kernel's
            // INIT/SIPI in the in-kernel LAPIC, which resets their registers anyway.
            if index == 0 {
                set_boot_cpu(&vcpu, mem, kernel)?;
            }
            vcpus.push(vcpu);
        }

        let (exit_tx, exits) = channel();
        let vcpus = VcpuSet::start(vcpus, bus.clone(), exit_tx, false)?;
        tracing::info!(vcpus = config.vcpus, mem_mib = config.mem_mib, "guest started");
        Ok(Self {
            vcpus,
            bus,
            sink,
            exits,
            kvm_vm,
            ram,
        })
    }


    /// Waits up to `timeout` for the guest to stop the machine (or a vCPU to fail).
    /// Console output is flushed either way, so partial lines (a shell prompt) are not
    /// held back; once the machine has stopped, the vCPU threads are ended.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        let exit = match self.exits.recv_timeout(timeout) {
            Ok(exit) => exit,
            Err(RecvTimeoutError::Timeout) => {
                self.flush_output();
                return None;
            }
            Err(RecvTimeoutError::Disconnected) => VmExit::Failed("all vCPU threads ended".into()),
        };
        self.vcpus.stop();
        self.flush_output();
        Some(exit)
    }

    fn flush_output(&self) {
        if let Ok(mut sink) = self.sink.lock() {
            if let Err(e) = sink.flush() {
                tracing::warn!("console output: {e}");
            }
        }
    }

    /// Stops all vCPUs (see [`VcpuSet::pause`]); returns how long stopping took.
    pub fn pause(&self) -> Result<Duration, VmError> {
        Ok(self.vcpus.pause(Duration::from_secs(2))?)
    }

    pub fn resume(&self) {
        self.vcpus.resume();
    }



    /// Pages written since the last call, by the guest or by the VMM; the first call
    /// reports every page and starts tracking (see `memory`).
    pub fn take_dirty(&mut self) -> Result<DirtyPages, VmError> {
        Ok(self.ram.take_dirty(&self.kvm_vm)?)
    }

    /// Hands back pages from a capture that failed; the next `take_dirty` includes them.
    pub fn give_back_dirty(&mut self, pages: &DirtyPages) {
        self.ram.give_back(pages);
    }


    /// A handle that types bytes into the guest's console from any thread; it returns
    /// how many fit in the UART FIFO.
    pub fn console_input(&self) -> impl Fn(&[u8]) -> usize + Send + 'static {
        let bus = self.bus.clone();
        move |bytes| {
            bus.lock()
                .map(|mut b| b.serial.enqueue_input(bytes))
                .unwrap_or(0)
        }
    }
}

fn set_boot_cpu(
    vcpu: &KvmVcpu,
    mem: &crate::memory::GuestMemoryMmap,
    kernel: loader::LoadedKernel,
) -> Result<(), VmError> {
    let sregs = regs::setup_sregs(mem, kernel.mode, vcpu.sregs()?)?;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs::boot_regs(kernel.mode, kernel.entry))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_counts_outside_the_range_are_refused() {
        assert!(check_vcpus(0).is_err());
        assert!(check_vcpus(u32::from(MAX_VCPUS) + 1).is_err());
        assert!(check_vcpus(300).is_err());
        assert_eq!(check_vcpus(8).unwrap(), 8);
        assert!(check_vcpus(0).unwrap_err().to_string().contains("between 1 and 32"));
    }
}
