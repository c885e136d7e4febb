//! A whole virtual machine: memory, boot, devices and vCPUs, and its life cycle.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_lapic_state;

use crate::boot::{acpi, cpuid, loader, micro, msrs, mptable, regs};
use crate::devices::bus::DeviceBus;
use crate::devices::virtio::backends::{Attached, BackendError, Backends};
use crate::devices::virtio::disks::TakenBlocks;
use crate::kvm::{Hypervisor, KvmError, KvmVcpu, VmHandle};
use crate::memory::{DirtyPages, GuestRam, MemoryError, PAGE_SIZE};
use crate::snapshot::{self, Kind, MachineState, Snapshot};
use crate::state::{MsrPlan, StateError, VcpuState};
use crate::time;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use crate::output::SharedSink;
use crate::vcpu::{Signal, VcpuError, VcpuSet, VmExit, Waker};

mod capture;
mod page_crc;
mod shell;
pub use capture::{PauseWork, Spares};
pub use page_crc::crcs_while_copying;
pub use shell::{IdleVm, Prepared};
use shell::Shell;

/// How long a pause waits for every vCPU to stop. A vCPU answers a kick within
/// microseconds on a real host; an emulated one (the lab) can stall for a second or two.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `e` is a capture that gave up on a slow vCPU: a pause that timed out, or a
/// paused vCPU that did not hand over its state in time. The vCPUs were let run on and
/// nothing was kept, so the capture can simply be tried again.
pub fn is_transient(e: &VmError) -> bool {
    matches!(e, VmError::Vcpu(VcpuError::PauseTimeout(..) | VcpuError::NoAnswer(..)))
}

/// Most vCPUs a tandem VM may have: the boot tables are sized for it and every pause
/// kicks each one, so a bound keeps both predictable.
pub const MAX_VCPUS: u8 = 32;

/// Everything needed to boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub guest: Guest,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_device: PathBuf,
}

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Guest {
    /// A Linux kernel (a bzImage, or an ELF vmlinux booted through PVH when it can be),
    /// its initramfs and command line.
    Linux { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
    /// The built-in micro guest (`boot::micro`): ticks on a timer, prints numbered lines
    /// and dirties memory, on any KVM, PVM included.
    Micro,
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
    #[error("cannot capture or restore state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("cannot restore: {0}")]
    Chain(String),
    #[error("cannot restore the devices: {0}")]
    Devices(#[from] crate::devices::DeviceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot read or write the disks: {0}")]
    Disk(std::io::Error),
}

/// Checks a requested vCPU count before any resource is taken.
pub fn check_vcpus(n: u32) -> Result<u8, VmError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(VmError::VcpuCount(n)),
    }
}

/// Identifies what a VM can be restored onto: its memory, its vCPUs, its disks' sizes,
/// the snapshot format and the CPU model KVM offers here. A standby must match its
/// primary exactly, or the VM it would take over could not run. FNV-1a, so the value is
/// the same in every build.
pub fn config_fingerprint(kvm_device: &std::path::Path, mem_mib: u64, vcpus: u8, disk_sizes: &[u64]) -> Result<u64, VmError> {
    let cpuid = Hypervisor::open(kvm_device)?.supported_cpuid()?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(mem_mib);
    eat(u64::from(vcpus));
    // A standby's disks take the primary's blocks as they are: same count, same sizes.
    for &size in disk_sizes {
        eat(size);
    }
    eat(u64::from(snapshot::format::FORMAT_VERSION));
    // The vendor, family and model, and the feature bits a guest may use. Not the
    // whole table: some fields describe the host CPU the ioctl happened to run on (its
    // APIC ID), and differ between two processes on one host.
    for e in cpuid.as_slice() {
        let fields = match (e.function, e.index) {
            (0x0, _) => [e.eax, e.ebx, e.ecx, e.edx],
            (0x1, _) => [e.eax, 0, e.ecx, e.edx],
            (0x7, 0) => [e.eax, e.ebx, e.ecx, e.edx],
            (0xd, 0 | 1) => [e.eax, 0, 0, e.edx],
            (0x8000_0001, _) => [0, 0, e.ecx, e.edx],
            (0x8000_0008, _) => [e.eax, 0, 0, 0],
            _ => continue,
        };
        eat(u64::from(e.function) << 32 | u64::from(e.index));
        for v in fields {
            eat(u64::from(v));
        }
    }
    Ok(hash)
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

/// What a capture took from the dirty logs: memory pages and disk blocks.
#[derive(Debug, Default)]
pub struct Taken {
    pages: DirtyPages,
    blocks: TakenBlocks,
}

/// A booted VM. Field order is drop order: the vCPU threads end before the KVM VM is
/// closed, and the VM is closed before the memory it maps is unmapped.
pub struct Vm {
    /// First to go: its thread writes into guest memory.
    virtio: Attached,
    vcpus: VcpuSet,
    bus: Arc<Mutex<DeviceBus>>,
    sink: SharedSink,
    exits: Receiver<Signal>,
    /// Keeps a sender for [`Vm::waker`]: the vCPUs hold the others.
    waker: Waker,
    kvm_vm: VmHandle,
    ram: GuestRam,
    /// The MSRs each capture saves on this host.
    msrs: MsrPlan,
    /// The guest's time while the operator holds the VM paused.
    frozen: Option<FrozenTime>,
    /// Deltas' staging buffers handed back by [`Vm::recycle`].
    spares: Spares,
}

/// The guest's clock and each vCPU's TSC as they were when the operator paused the VM.
/// Captures while paused record these, and resume sets them back, so a paused guest sees
/// no time pass, just as a VM saved and restored later does not; and two captures of
/// one paused VM are identical.
#[derive(Clone)]
struct FrozenTime {
    clock_ns: u64,
    /// Per vCPU; `None` where a restored state held no TSC to freeze at.
    tsc: Vec<Option<u64>>,
}

impl Vm {
    /// Builds the VM described by `config`, loads the kernel and starts the vCPUs.
    /// Guest console output goes to `sink`.
    pub fn boot(config: VmConfig, backends: Backends, sink: SharedSink) -> Result<Self, VmError> {
        let shell = Shell::build(&config.kvm_device, config.mem_mib, config.vcpus)?;
        let mem = shell.ram.memory();
        let kernel = match &config.guest {
            Guest::Linux { kernel, initrd, cmdline } => {
                mptable::write_mptable(mem, config.vcpus)?;
                let rsdp = acpi::write_acpi_tables(mem, config.vcpus, &backends.slots())?;
                let kernel = loader::load_linux(mem, kernel, initrd.as_deref(), cmdline, Some(rsdp))?;
                tracing::debug!(?kernel, "kernel loaded");
                Some(kernel)
            }
            Guest::Micro => {
                mem.write_slice(&micro::PROGRAM, GuestAddress(micro::ENTRY))
                    .map_err(|_| VmError::Chain("no room for the micro guest".into()))?;
                None
            }
        };
        for (index, vcpu) in shell.vcpus().iter().enumerate() {
            vcpu.set_msrs(&msrs::boot_msrs())?;
            let mut lapic = vcpu.lapic()?;
            set_lint(&mut lapic);
            vcpu.set_lapic(&lapic)?;
            vcpu.set_fpu(&regs::boot_fpu())?;
            // Only the boot CPU starts at the kernel; the others wait for the kernel's
            // INIT/SIPI in the in-kernel LAPIC, which resets their registers anyway.
            if index == 0 {
                match kernel {
                    Some(kernel) => set_boot_cpu(vcpu, mem, kernel)?,
                    None => {
                        let (sregs, regs) = regs::real_mode_entry(vcpu.sregs()?, micro::ENTRY);
                        vcpu.set_sregs(&sregs)?;
                        vcpu.set_regs(&regs)?;
                    }
                }
            }
        }
        let vm = shell.start(None, sink, backends, None)?;
        tracing::info!(vcpus = config.vcpus, mem_mib = config.mem_mib, "guest started");
        Ok(vm)
    }

    /// Rebuilds a VM from a full snapshot and the deltas taken after it, in order, and
    /// resumes it. Memory is laid down snapshot by snapshot; the machine state is the
    /// last one's. The order inside follows what must hold before a vCPU runs: memory,
    /// then VM-wide state (the clock before anything reads it), then devices, then each
    /// vCPU (see `VcpuState::restore`). With `paused`, the VM waits, time frozen, for
    /// [`Vm::resume`], as if the operator had paused it the moment it was captured.
    pub fn restore(
        chain: &[Snapshot],
        kvm_device: &std::path::Path,
        backends: Backends,
        paused: bool,
        sink: SharedSink,
    ) -> Result<Self, VmError> {
        let (first, last) = match (chain.first(), chain.last()) {
            (Some(f), Some(l)) if f.kind == Kind::Full => (f, l),
            _ => return Err(VmError::Chain("a restore starts from a full snapshot".into())),
        };
        if let Some(i) = chain.iter().skip(1).position(|s| s.kind != Kind::Delta) {
            return Err(VmError::Chain(format!("snapshot {} after the first is not a delta", i + 2)));
        }
        let shape = (first.state.mem_mib, first.state.vcpus);
        if chain.iter().any(|s| (s.state.mem_mib, s.state.vcpus) != shape) {
            return Err(VmError::Chain("the snapshots are of differently shaped VMs".into()));
        }
        let ram = GuestRam::new(shape.0)?;
        let mem = ram.memory();
        // The snapshot holds its disks' blocks: the disks given get them, so memory
        // is never paired with a disk of another moment.
        let disks = &backends.disks;
        if !disks.is_empty() {
            disks.zero().map_err(VmError::Disk)?;
        }
        for snap in chain {
            for (i, gpa) in snap.pages.iter().enumerate() {
                let page = snapshot::page(&snap.data, i);
                if *gpa >= crate::disk::DISK_SPACE {
                    if !disks.holds(*gpa) {
                        return Err(VmError::Chain(format!("the snapshot holds block {gpa:#x} of a disk this VM was not given (--disk)")));
                    }
                    disks.write_page(*gpa, page).map_err(VmError::Disk)?;
                    continue;
                }
                mem.write_slice(page, GuestAddress(*gpa))
                    .map_err(|_| VmError::Chain(format!("page {gpa:#x} lies outside the guest's memory")))?;
            }
        }
        Self::resume_from(Shell::build_with(kvm_device, ram, shape.1)?, &last.state, backends, paused, sink)
    }

    /// Takes over from guest RAM that already holds every page of the guest (a
    /// standby's image) and the machine state that goes with it, in a VM built ahead of
    /// time around that RAM ([`Prepared`]): the RAM becomes the new VM's as it is, and
    /// what is left is setting the machine state and starting the vCPUs, which costs
    /// the same whatever the guest's size.
    pub fn resume_prepared(prepared: Prepared, ram: GuestRam, state: &MachineState, backends: Backends, sink: SharedSink) -> Result<Self, VmError> {
        if ram.mem_mib() != state.mem_mib || prepared.vcpus() != usize::from(state.vcpus) {
            return Err(VmError::Chain(format!(
                "state of a {} MiB, {} vCPU VM for {} MiB of RAM and {} vCPUs",
                state.mem_mib,
                state.vcpus,
                ram.mem_mib(),
                prepared.vcpus()
            )));
        }
        Self::resume_from(prepared.into_shell(ram)?, state, backends, false, sink)
    }

    fn resume_from(shell: Shell, state: &MachineState, backends: Backends, paused: bool, sink: SharedSink) -> Result<Self, VmError> {
        let began = std::time::Instant::now();
        let shape = (state.mem_mib, state.vcpus);
        let mem = shell.ram.memory();
        // Setting the wall-clock MSR makes KVM write its own idea of the guest's boot
        // time into guest memory. The guest read that page when it booted; a restored
        // guest finds its memory exactly as it was captured, so the page goes back.
        let mut wall_clock = Vec::new();
        for gpa in state.vcpu_states.iter().flat_map(VcpuState::wall_clock_pages) {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|_| VmError::Chain(format!("page {gpa:#x} lies outside the guest's memory")))?;
            wall_clock.push((gpa, page));
        }
        let read = began.elapsed();
        let anchor = state.vm.restore(shell.kvm_vm())?;
        let vm_state = began.elapsed();
        for (vcpu, vcpu_state) in shell.vcpus().iter().zip(&state.vcpu_states) {
            vcpu_state.restore(vcpu)?;
            if let Some(tsc) = vcpu_state.tsc() {
                time::set_tsc(vcpu, tsc, anchor)?;
            }
        }
        for (gpa, page) in &wall_clock {
            mem.write_slice(page, GuestAddress(*gpa))
                .map_err(|_| VmError::Chain(format!("page {gpa:#x} lies outside the guest's memory")))?;
        }
        let vcpu_state = began.elapsed();
        let frozen = paused.then(|| FrozenTime {
            clock_ns: state.vm.clock.clock,
            tsc: state.vcpu_states.iter().map(VcpuState::tsc).collect(),
        });
        let vm = shell.start(frozen, sink, backends, Some(&state.devices))?;
        tracing::info!(
            vcpus = shape.1,
            mem_mib = shape.0,
            wall_clock_us = read.as_micros() as u64,
            vm_state_us = (vm_state - read).as_micros() as u64,
            vcpu_state_us = (vcpu_state - vm_state).as_micros() as u64,
            start_us = (began.elapsed() - vcpu_state).as_micros() as u64,
            "guest restored"
        );
        Ok(vm)
    }

    /// A handle that ends a [`Vm::wait_timeout`] early, from any thread.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Waits up to `timeout` for the guest to stop the machine (or a vCPU to fail), or
    /// for a [`Waker`]'s nudge.
    /// Console output is flushed either way, so partial lines (a shell prompt) are not
    /// held back; once the machine has stopped, the vCPU threads are ended.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        let mut signal = self.exits.recv_timeout(timeout);
        // Wakes may be queued ahead of an exit: look past them to what is there now,
        // so that a caller asking whether the guest just stopped hears that it did.
        while matches!(signal, Ok(Signal::Wake)) {
            match self.exits.try_recv() {
                Ok(next) => signal = Ok(next),
                Err(_) => break,
            }
        }
        let exit = match signal {
            Ok(Signal::Exit(exit)) => exit,
            Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) if !self.vcpus.all_ended() => {
                self.flush_output();
                return None;
            }
            // The waker keeps the channel open, so threads that ended without a word
            // (a panic) show as all ended rather than as a disconnection.
            Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                VmExit::Failed("all vCPU threads ended".into())
            }
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

    /// Stops all vCPUs (see [`VcpuSet::pause`]) and the guest's clock with them, as an
    /// operator expects of a paused machine; returns how long stopping took.
    pub fn pause(&mut self) -> Result<Duration, VmError> {
        let took = self.stop_guest()?;
        if self.frozen.is_none() {
            match self.read_time() {
                Ok(time) => self.frozen = Some(time),
                Err(e) => {
                    self.run_guest();
                    return Err(e);
                }
            }
        }
        Ok(took)
    }

    fn read_time(&self) -> Result<FrozenTime, VmError> {
        let clock = time::read_clock(&self.kvm_vm)?;
        let tsc = self
            .vcpus
            .on_each_paused(move |_, vcpu| match time::tsc_at(vcpu, clock.host_tsc) {
                Some(tsc) => Ok(Some(tsc)),
                None => time::read_tsc(vcpu).map(Some),
            })?
            .into_iter()
            .collect::<Result<Vec<_>, StateError>>()?;
        Ok(FrozenTime { clock_ns: clock.ns, tsc })
    }

    /// Sets the guest's clock and TSCs back to where the pause stopped them and lets
    /// the vCPUs run.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if let Some(frozen) = self.frozen.take() {
            // Resuming matters more than the time: a guest left paused is worse.
            if let Err(e) = self.set_time(frozen) {
                tracing::warn!("guest time not set back on resume: {e}");
            }
        }
        self.run_guest();
        Ok(())
    }

    /// Stops the vCPUs, then the virtio devices' work on guest memory and disks: from
    /// here until [`Vm::run_guest`] nothing changes the guest.
    fn stop_guest(&mut self) -> Result<Duration, VmError> {
        let took = self.vcpus.pause(PAUSE_TIMEOUT)?;
        self.virtio.pause();
        Ok(took)
    }

    fn run_guest(&mut self) {
        self.virtio.resume();
        self.vcpus.resume();
    }

    /// Has the guest announce itself on every NIC: a VM that now runs on another host.
    pub fn announce_nics(&self) {
        self.virtio.nics.announce();
    }

    /// The output its devices hold per epoch (each NIC's frames), for replication.
    pub fn outputs(&self) -> Vec<std::sync::Arc<dyn crate::devices::outputs::EpochOutput>> {
        self.virtio.nics.outputs()
    }

    /// Each NIC's frame counts, in the order the NICs were given.
    pub fn net_stats(&self) -> Vec<crate::devices::virtio::net::NetStats> {
        self.virtio.nics.stats()
    }

    /// A reader of the guest's pages and disk blocks by address, for replica
    /// verification: what it reads is the running guest's, so only a read while the VM
    /// is paused (in a capture's fence) is of one instant.
    pub fn slices(&self) -> crate::slice::SliceReader {
        crate::slice::SliceReader::new(self.ram.memory().clone(), self.virtio.disks.images())
    }

    /// Each disk's request counts, in the order the disks were given.
    pub fn disk_stats(&self) -> Vec<crate::devices::virtio::block::BlockStats> {
        self.virtio.disks.stats()
    }

    fn set_time(&self, time: FrozenTime) -> Result<(), VmError> {
        let anchor = time::set_clock(&self.kvm_vm, time.clock_ns)?;
        let tsc = time.tsc;
        self.vcpus
            .on_each_paused(move |i, vcpu| match tsc[i] {
                Some(tsc) => time::set_tsc(vcpu, tsc, anchor),
                None => Ok(()),
            })?
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    pub fn memory_mib(&self) -> u64 {
        self.ram.memory().iter().map(|r| r.len()).sum::<u64>() >> 20
    }



    /// Pages written since the last call, by the guest or by the VMM; the first call
    /// reports every page and starts tracking (see `memory`).
    pub fn take_dirty(&mut self) -> Result<DirtyPages, VmError> {
        Ok(self.ram.take_dirty(&self.kvm_vm)?)
    }

    /// Pages written since the last capture (`None` before the first one: all of them).
    pub fn pending_dirty(&mut self) -> Result<Option<u64>, VmError> {
        Ok(self.ram.pending_dirty(&self.kvm_vm)?)
    }

    /// Hands back what a capture that was dropped took: the next capture includes
    /// those pages and disk blocks.
    pub fn give_back_dirty(&mut self, taken: &Taken) {
        self.ram.give_back(&taken.pages);
        self.virtio.disks.give_back(&taken.blocks);
    }


    /// A handle that types bytes into the guest's console from any thread; it returns
    /// how many fit in the UART FIFO.
    pub fn console_input(&self) -> impl Fn(&[u8]) -> usize + Send + 'static {
        let bus = self.bus.clone();
        move |bytes| {
            bus.lock()
                .map(|mut b| b.console_input(bytes))
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

