//! The one module that talks to KVM through kvm-ioctls.
//!
//! Everything else in the VMM sees `Hypervisor`, `VmHandle` and `VcpuHandle` and plain
//! kvm-bindings data, so a change of kvm-ioctls version (or of how an ioctl is issued)
//! stays in this file.

use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;


use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_bindings::{kvm_device_attr, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

/// Errors from KVM itself, each naming the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run inside `tandem lab`)")]
    Missing { path: String },
    #[error("permission denied opening {path}: add this user to the 'kvm' group or run as root")]
    PermissionDenied { path: String },
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("KVM API version {0} is not the stable version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability tandem needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM refused to create {what} (host limit is {max})")]
    TooMany { what: &'static str, max: usize },
    #[error("the saved XSAVE area is {saved} bytes, more than this host's {host}: it was captured on a CPU with state this one lacks")]
    XsaveTooLarge { saved: usize, host: usize },
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// An open `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
}

impl Hypervisor {
    /// Opens the KVM device at `path` and checks the capabilities every tandem VM relies on.
    pub fn open(path: &Path) -> Result<Self, KvmError> {
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => KvmError::Missing { path: shown.clone() },
                std::io::ErrorKind::PermissionDenied => KvmError::PermissionDenied {
                    path: shown.clone(),
                },
                _ => KvmError::Open {
                    path: shown.clone(),
                    source,
                },
            })?;
        // SAFETY: `file` is an open /dev/kvm descriptor that we own; ownership moves into Kvm.
        let kvm = unsafe { Kvm::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) };
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Pit2, "in-kernel PIT"),
            (Cap::UserMemory, "user memory slots"),
            (Cap::ImmediateExit, "immediate exit"),
            (Cap::SetTssAddr, "TSS address"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        Ok(Self { kvm })
    }

    /// Whether KVM emulates the LAPIC's TSC-deadline timer mode. Its CPUID bit is not
    /// in KVM's supported set even then: the VMM must turn it on itself.
    pub fn has_tsc_deadline_timer(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID leaves KVM can present to a guest, before any per-vCPU fix-ups.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Indices of every MSR KVM saves and restores.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// Creates an x86 VM with the in-kernel PIC/IOAPIC/LAPIC and PIT, the setup every
    /// tandem guest shares.
    pub fn create_vm(&self, tss: u64, identity_map: u64) -> Result<VmHandle, KvmError> {
        let fd = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(identity_map)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(tss as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // A dummy speaker port keeps the guest's PC-speaker probing off our port bus.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(VmHandle {
            fd: Arc::new(fd),
            max_vcpus: self.max_vcpus(),
        })
    }
}

/// A KVM VM: memory slots, interrupt routing and vCPU creation.
pub struct VmHandle {
    fd: Arc<VmFd>,
    max_vcpus: usize,
}

impl VmHandle {
    /// Registers (or re-registers) slot `slot` as `[guest_addr, guest_addr + size)`
    /// backed by host memory at `host_addr`, with KVM's dirty logging on or off.
    /// Turning logging on for a live slot is allowed while vCPUs run; KVM starts an
    /// empty log at that moment.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must stay mapped and owned by this VM for as long as
    /// the VM exists.
    pub unsafe fn set_memory_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Fetches and clears KVM's dirty bitmap for `slot` (one bit per 4 KiB page).
    pub fn take_dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, KvmError> {
        self.fd
            .get_dirty_log(slot, size)
            .map_err(ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// Has KVM signal `event` when the guest writes the 32-bit value `value` at
    /// guest-physical `addr`, with no exit to this process: the vCPU goes on at once,
    /// and whoever waits on `event` does the work.
    pub fn register_ioevent(&self, event: &EventFd, addr: u64, value: u32) -> Result<(), KvmError> {
        self.fd.register_ioevent(event, &IoEventAddress::Mmio(addr), value).map_err(ioctl("KVM_IOEVENTFD"))
    }

    /// A handle that raises guest interrupt line `gsi` from any thread.
    pub fn irq_line(&self, gsi: u32) -> IrqLine {
        IrqLine {
            fd: self.fd.clone(),
            gsi,
        }
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<KvmVcpu, KvmError> {
        if usize::from(id) >= self.max_vcpus {
            return Err(KvmError::TooMany {
                what: "vCPU",
                max: self.max_vcpus,
            });
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        // KVM_CAP_XSAVE2 gives the size of this VM's XSAVE area (0 where the ioctl is
        // missing); it can exceed the 4 KiB of the old `kvm_xsave` (AMX, for one).
        let xsave2 = usize::try_from(self.fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        let xsave_words = if xsave2 == 0 {
            None
        } else {
            Some(xsave2.max(LEGACY_XSAVE_BYTES).div_ceil(4))
        };
        Ok(KvmVcpu {
            fd,
            tsc_scaled: std::cell::Cell::new(false),
            xsave_words,
        })
    }

    /// One of the in-kernel interrupt controllers: 0 PIC master, 1 PIC slave, 2 IOAPIC.
    pub fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    pub fn set_irqchip(&self, chip: &kvm_irqchip) -> Result<(), KvmError> {
        self.fd.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))
    }

    pub fn pit(&self) -> Result<kvm_pit_state2, KvmError> {
        self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))
    }

    pub fn set_pit(&self, pit: &kvm_pit_state2) -> Result<(), KvmError> {
        self.fd.set_pit2(pit).map_err(ioctl("KVM_SET_PIT2"))
    }

    pub fn clock(&self) -> Result<kvm_clock_data, KvmError> {
        self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))
    }

    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), KvmError> {
        self.fd.set_clock(clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

/// Why `KVM_RUN` returned, in the VMM's own terms.
pub enum Exit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// The guest asked for a reset through a paravirtual path.
    Reset,
    /// A triple fault: the CPU could not deliver an exception at all.
    TripleFault,
    /// The guest asked to power off through a paravirtual path.
    Shutdown,
    /// Interrupted by a kick: the controller wants this vCPU's attention.
    Interrupted,
    /// Something KVM could not handle; the string says what.
    Failed(String),
}

/// An edge-triggered guest interrupt line, raised with `KVM_IRQ_LINE`. The interrupt is
/// in KVM's interrupt controllers when the call returns, so a vCPU that raised it and
/// then paused leaves it in the captured state. (An irqfd hands IOAPIC lines to a kernel
/// worker instead: a capture right after could miss the interrupt, and a guest restored
/// from it would wait forever for, say, its UART's transmit interrupt.)
#[derive(Clone)]
pub struct IrqLine {
    fd: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine {
    pub fn pulse(&self) -> Result<(), KvmError> {
        self.fd.set_irq_line(self.gsi, true).map_err(ioctl("KVM_IRQ_LINE"))?;
        self.fd.set_irq_line(self.gsi, false).map_err(ioctl("KVM_IRQ_LINE"))
    }
}

/// Size of the fixed `kvm_xsave` that `KVM_GET_XSAVE` fills.
const LEGACY_XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();
const LEGACY_XSAVE_WORDS: usize = LEGACY_XSAVE_BYTES / 4;

/// A zeroed XSAVE buffer of `words` 32-bit words (at least the fixed 4 KiB).
fn xsave_buffer(words: usize) -> Result<Xsave, KvmError> {
    Xsave::new(words.saturating_sub(LEGACY_XSAVE_WORDS)).map_err(|_| KvmError::TooMany {
        what: "XSAVE words",
        max: words,
    })
}

const KVMIO: u32 = 0xAE;
// kvm-ioctls wraps the vCPU device-attribute ioctls only for aarch64.
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

fn tsc_offset_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
        flags: 0,
    }
}

/// The host's TSC now.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no preconditions and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// One KVM vCPU; lives on its own thread.
pub struct KvmVcpu {
    fd: VcpuFd,
    /// Set once the vCPU's TSC rate was changed from the host's.
    tsc_scaled: std::cell::Cell<bool>,
    /// Length in 32-bit words of the XSAVE area `KVM_GET_XSAVE2` reads, where KVM has it.
    xsave_words: Option<usize>,
}

impl KvmVcpu {
    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), KvmError> {
        self.fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))
    }

    pub fn set_msrs(&self, msrs: &Msrs) -> Result<usize, KvmError> {
        self.fd.set_msrs(msrs).map_err(ioctl("KVM_SET_MSRS"))
    }

    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), KvmError> {
        self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))
    }

    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), KvmError> {
        self.fd.set_fpu(fpu).map_err(ioctl("KVM_SET_FPU"))
    }

    pub fn lapic(&self) -> Result<kvm_lapic_state, KvmError> {
        self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), KvmError> {
        self.fd.set_lapic(lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    pub fn mp_state(&self) -> Result<kvm_mp_state, KvmError> {
        self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))
    }

    pub fn set_mp_state(&self, state: kvm_mp_state) -> Result<(), KvmError> {
        self.fd.set_mp_state(state).map_err(ioctl("KVM_SET_MP_STATE"))
    }

    /// The vCPU's XSAVE area as 32-bit words: through `KVM_GET_XSAVE2` where KVM has it
    /// (the area may be larger than 4 KiB), else the 4 KiB of `KVM_GET_XSAVE`.
    pub fn xsave(&self) -> Result<Vec<u32>, KvmError> {
        let Some(words) = self.xsave_words else {
            let legacy = self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
            return Ok(legacy.region.to_vec());
        };
        let mut area = xsave_buffer(words)?;
        // SAFETY: `area` holds `words` words, the size KVM_CAP_XSAVE2 reported for this
        // VM; tandem asks for no dynamically enabled XSAVE features that could grow it.
        unsafe { self.fd.get_xsave2(&mut area) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
        let fam = area.as_fam_struct_ref();
        let mut out = fam.xsave.region.to_vec();
        out.extend_from_slice(area.as_slice());
        Ok(out)
    }

    /// Loads an XSAVE area read by [`KvmVcpu::xsave`], here or on another host. A shorter
    /// area is padded with zeros: the components its header does not list stay in their
    /// initial state. A longer one than this host's is refused.
    pub fn set_xsave(&self, saved: &[u32]) -> Result<(), KvmError> {
        let words = self.xsave_words.unwrap_or(LEGACY_XSAVE_WORDS);
        if saved.len() > words {
            return Err(KvmError::XsaveTooLarge {
                saved: saved.len() * 4,
                host: words * 4,
            });
        }
        let mut area = xsave_buffer(words)?;
        let (head, tail) = saved.split_at(saved.len().min(LEGACY_XSAVE_WORDS));
        // SAFETY: `kvm_xsave2` is plain data and this only writes its fixed region.
        unsafe { area.as_mut_fam_struct() }.xsave.region[..head.len()].copy_from_slice(head);
        area.as_mut_slice()[..tail.len()].copy_from_slice(tail);
        // SAFETY: `area` holds `words` words: the size KVM reads for this VM (the
        // KVM_CAP_XSAVE2 size, or the 4 KiB `kvm_xsave` where that capability is absent).
        unsafe { self.fd.set_xsave2(&area) }.map_err(ioctl("KVM_SET_XSAVE"))
    }

    pub fn xcrs(&self) -> Result<kvm_xcrs, KvmError> {
        self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))
    }

    pub fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), KvmError> {
        self.fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))
    }

    pub fn debug_regs(&self) -> Result<kvm_debugregs, KvmError> {
        self.fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))
    }

    pub fn set_debug_regs(&self, regs: &kvm_debugregs) -> Result<(), KvmError> {
        self.fd
            .set_debug_regs(regs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))
    }

    pub fn events(&self) -> Result<kvm_vcpu_events, KvmError> {
        self.fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))
    }

    pub fn set_events(&self, events: &kvm_vcpu_events) -> Result<(), KvmError> {
        self.fd
            .set_vcpu_events(events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }

    /// Reads the MSRs at `indices`; KVM stops at the first one it cannot read, so the
    /// result may be shorter than `indices`.
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::TooMany {
            what: "MSR entries in one request",
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..read].to_vec())
    }

    /// The guest TSC frequency, where KVM can report it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), KvmError> {
        let before = self.tsc_khz();
        self.fd.set_tsc_khz(khz).map_err(ioctl("KVM_SET_TSC_KHZ"))?;
        if before != Some(khz) {
            self.tsc_scaled.set(true);
        }
        Ok(())
    }

    /// The vCPU's TSC offset: its TSC is the host's plus this. `None` where KVM lacks
    /// `KVM_VCPU_TSC_OFFSET` (before Linux 5.16), and where the vCPU's TSC runs at
    /// another rate than the host's, so the offset alone does not give it.
    pub fn tsc_offset(&self) -> Option<u64> {
        if self.tsc_scaled.get() {
            return None;
        }
        let mut offset = 0u64;
        let attr = tsc_offset_attr(&mut offset);
        // SAFETY: KVM_GET_DEVICE_ATTR writes one u64 at `attr.addr`, which points at
        // `offset`, alive for the whole call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DEVICE_ATTR(), &attr) };
        (ret == 0).then_some(offset)
    }

    /// Sets the TSC offset (see [`KvmVcpu::tsc_offset`]); `false` where that cannot be
    /// done, and the caller must fall back on writing MSR_IA32_TSC.
    pub fn set_tsc_offset(&self, mut offset: u64) -> bool {
        if self.tsc_scaled.get() {
            return false;
        }
        let attr = tsc_offset_attr(&mut offset);
        // SAFETY: KVM_SET_DEVICE_ATTR reads one u64 at `attr.addr`, which points at
        // `offset`, alive for the whole call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_SET_DEVICE_ATTR(), &attr) };
        ret == 0
    }

    /// Where the kick handler writes to make the next (or current) `KVM_RUN` return at once.
    pub fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &mut self.fd.get_kvm_run().immediate_exit
    }

    pub fn set_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
    }

    pub fn clear_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the vCPU until the next exit that needs the VMM.
    pub fn run(&mut self) -> Exit<'_> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn(port, data),
            Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite(addr, data),
            Ok(VcpuExit::Shutdown) => Exit::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Exit::Shutdown,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Exit::Reset,
                other => Exit::Failed(format!("unexpected system event {other}")),
            },
            // With the in-kernel LAPIC, HLT is handled by KVM and only shows up if the
            // guest halted with interrupts off forever: treat it as a stopped machine.
            Ok(VcpuExit::Hlt) => Exit::Shutdown,
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Failed(format!(
                "VM entry failed on cpu {cpu}: hardware reason {reason:#x}"
            )),
            Ok(VcpuExit::InternalError) => Exit::Failed("KVM internal error (emulation failure)".into()),
            Ok(other) => Exit::Failed(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => Exit::Failed(format!("KVM_RUN: {e}")),
        }
    }
}
