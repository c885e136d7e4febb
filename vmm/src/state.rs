//! The KVM-held state of a VM and its vCPUs: captured while paused, restored into a
//! fresh VM. (Guest memory and device state are captured by their own modules.)

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
};
use serde::{Deserialize, Serialize};

use crate::kvm::{KvmError, KvmVcpu, VmHandle};
use crate::time::{self, MSR_IA32_TSC};

/// In-kernel interrupt controller ids for `KVM_GET_IRQCHIP`.
const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

/// KVM's Hyper-V MSRs. tandem's CPUID has no Hyper-V leaves, so no guest uses them, and
/// two are host counters that change while a VM sits paused (VP_RUNTIME, the vCPU
/// thread's run time, and TIME_REF_COUNT, which KVM ignores when it is set): saving them
/// would only make two captures of one paused VM differ.
const HYPERV_MSRS: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;

/// SYSENTER_ESP and SYSENTER_EIP.
const SYSENTER_STACK_AND_ENTRY: [u32; 2] = [0x175, 0x176];

/// Which MSRs a capture saves on this host, and which bits of each a restore can set
/// back. Found once per VM, on a vCPU that has not run (probing writes to it).
#[derive(Clone, Debug, Default)]
pub struct MsrPlan {
    indices: Vec<u32>,
    /// `(index, settable bits)` for MSRs whose saved value is cut to what sets back.
    masks: Vec<(u32, u64)>,
}

impl MsrPlan {
    /// The MSRs of `candidates` (KVM's MSR index list) that this vCPU can read back and
    /// a guest of tandem's can use. Some listed MSRs are not readable on every host;
    /// asking for one makes KVM stop reading the whole batch there, so they are found
    /// one by one.
    pub fn probe(vcpu: &KvmVcpu, candidates: &[u32]) -> Self {
        let indices: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|i| !HYPERV_MSRS.contains(i))
            .filter(|&i| vcpu.msrs(&[i]).is_ok_and(|r| r.len() == 1))
            .collect();
        // Where SYSENTER does not exist in 64-bit mode (CPUs not Intel's), KVM keeps only
        // the low 32 bits of these when user space sets them, while a guest's own write,
        // which goes to the hardware, keeps all 64. Saving only what a restore can set
        // back means a restored VM captures exactly as the original did.
        let probe = 0xffff_fffe_0000_3000;
        let masks = SYSENTER_STACK_AND_ENTRY
            .into_iter()
            .filter(|i| indices.contains(i))
            .filter_map(|index| {
                let before = vcpu.msrs(&[index]).ok()?.first()?.data;
                write_msr(vcpu, index, probe).ok()?;
                let back = vcpu.msrs(&[index]).ok()?.first()?.data;
                let _ = write_msr(vcpu, index, before);
                (back != probe).then_some((index, u64::from(u32::MAX)))
            })
            .collect();
        Self { indices, masks }
    }

    /// Reads the planned MSRs of a paused vCPU, on its own thread.
    fn capture(&self, vcpu: &KvmVcpu) -> Result<Vec<kvm_msr_entry>, StateError> {
        let mut msrs = vcpu.msrs(&self.indices)?;
        if msrs.len() != self.indices.len() {
            return Err(StateError::Msrs {
                what: "read",
                read: msrs.len(),
                wanted: self.indices.len(),
            });
        }
        for m in &mut msrs {
            if let Some((_, bits)) = self.masks.iter().find(|(i, _)| *i == m.index) {
                m.data &= bits;
            }
        }
        Ok(msrs)
    }
}

/// Everything KVM holds for one vCPU. The x87/SSE state is inside the XSAVE area, so
/// it is not kept a second time as `kvm_fpu`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as KVM lays it out, 4 KiB or more (`KVM_GET_XSAVE2`).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("only {read} of {wanted} MSRs could be {what}")]
    Msrs {
        what: &'static str,
        read: usize,
        wanted: usize,
    },
}

impl VcpuState {
    /// Captures a paused vCPU; must run on the vCPU's own thread.
    pub fn capture(vcpu: &KvmVcpu, msrs: &MsrPlan) -> Result<Self, StateError> {
        let events = vcpu.events()?;
        let msrs = msrs.capture(vcpu)?;
        Ok(Self {
            mp_state: vcpu.mp_state()?,
            regs: vcpu.regs()?,
            sregs: vcpu.sregs()?,
            xsave: vcpu.xsave()?,
            xcrs: vcpu.xcrs()?,
            debug_regs: vcpu.debug_regs()?,
            lapic: vcpu.lapic()?,
            msrs,
            events,
            tsc_khz: vcpu.tsc_khz(),
        })
    }

    /// Restores into a vCPU that has not run yet, in the order that was measured to
    /// resume correctly on these hosts (shared/notes/environment.md). Some steps must
    /// come before others: the TSC frequency comes before the MSRs, because
    /// MSR_IA32_TSC is scaled by it. The LAPIC comes before the MSRs, because the
    /// TSC-deadline MSR is only accepted once the LAPIC timer is in that mode. The
    /// events come last, because they name pending exceptions and NMIs on top of
    /// everything else.
    pub fn restore(&self, vcpu: &KvmVcpu) -> Result<(), StateError> {
        if let Some(khz) = self.tsc_khz {
            // Not every host can scale the TSC (PVM cannot); the guest then sees the
            // host's rate, as it did before.
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                tracing::debug!("TSC frequency not restored: {e}");
            }
        }
        vcpu.set_mp_state(self.mp_state)?;
        vcpu.set_regs(&self.regs)?;
        vcpu.set_sregs(&self.sregs)?;
        vcpu.set_xsave(&self.xsave)?;
        vcpu.set_xcrs(&self.xcrs)?;
        vcpu.set_debug_regs(&self.debug_regs)?;
        vcpu.set_lapic(&self.lapic)?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::Msrs {
            what: "packed",
            read: 0,
            wanted: self.msrs.len(),
        })?;
        let written = vcpu.set_msrs(&msrs)?;
        if written != self.msrs.len() {
            return Err(StateError::Msrs {
                what: "written",
                read: written,
                wanted: self.msrs.len(),
            });
        }
        vcpu.set_events(&self.events)?;
        Ok(())
    }
}

pub(crate) fn write_msr(vcpu: &KvmVcpu, index: u32, data: u64) -> Result<(), StateError> {
    let entry = kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[entry]).map_err(|_| StateError::Msrs { what: "packed", read: 0, wanted: 1 })?;
    match vcpu.set_msrs(&msrs)? {
        1 => Ok(()),
        n => Err(StateError::Msrs { what: "written", read: n, wanted: 1 }),
    }
}

impl VcpuState {
    /// The TSC this state holds, if its MSRs include it.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data)
    }

    /// The pages holding the guest's kvmclock wall-clock structure, if it set one up.
    pub fn wall_clock_pages(&self) -> Vec<u64> {
        const WALL_CLOCK_MSRS: [u32; 2] = [0x11, 0x4b56_4d00];
        /// `struct pvclock_wall_clock`: version, seconds, nanoseconds.
        const WALL_CLOCK_BYTES: u64 = 12;
        let mut pages: Vec<u64> = self
            .msrs
            .iter()
            .filter(|m| WALL_CLOCK_MSRS.contains(&m.index) && m.data != 0)
            .flat_map(|m| [m.data, m.data.saturating_add(WALL_CLOCK_BYTES - 1)])
            .map(|gpa| gpa & !(crate::memory::PAGE_SIZE - 1))
            .collect();
        pages.dedup();
        pages
    }

    /// Replaces the saved TSC (a paused VM's, frozen at the pause).
    pub fn set_tsc(&mut self, tsc: u64) {
        if let Some(m) = self.msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC) {
            m.data = tsc;
        }
    }
}

/// VM-wide KVM state: interrupt controllers, PIT and the guest clock.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Captures the VM-wide state; the vCPUs must be paused. Also returns the clock
    /// reading's host TSC, to read the vCPUs' TSCs at the same instant.
    pub fn capture(vm: &VmHandle) -> Result<(Self, time::ClockReading), StateError> {
        let clock = time::read_clock(vm)?;
        let mut pit = vm.pit()?;
        // The host time each channel was last loaded at: KVM_SET_PIT2 ignores it and
        // restarts the counts at the moment of the call, so keeping it would only make
        // two captures of one state differ.
        for channel in &mut pit.channels {
            channel.count_load_time = 0;
        }
        let state = Self {
            pic_master: vm.irqchip(PIC_MASTER)?,
            pic_slave: vm.irqchip(PIC_SLAVE)?,
            ioapic: vm.irqchip(IOAPIC)?,
            pit,
            clock: kvm_clock_data { clock: clock.ns, ..Default::default() },
        };
        Ok((state, clock))
    }

    /// Restores into a fresh VM before any vCPU state is restored or any vCPU runs:
    /// the PIT and the clock first (kvmclock pages the vCPUs read are derived from it),
    /// then the PICs and the IOAPIC, so interrupts routed during vCPU restore find
    /// their controllers as they were. Returns the reading that each vCPU's TSC is then
    /// set in step with (`time::set_tsc`).
    pub fn restore(&self, vm: &VmHandle) -> Result<time::Anchor, StateError> {
        vm.set_pit(&self.pit)?;
        let anchor = time::set_clock(vm, self.clock.clock)?;
        vm.set_irqchip(&self.pic_master)?;
        vm.set_irqchip(&self.pic_slave)?;
        vm.set_irqchip(&self.ioapic)?;
        Ok(anchor)
    }
}
