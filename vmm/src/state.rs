//! The KVM-held state of a VM and its vCPUs: captured while paused, restored into a
//! fresh VM. (Guest memory and device state are captured by their own modules.)

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};

use crate::kvm::{KvmError, KvmVcpu, VmHandle};

/// In-kernel interrupt controller ids for `KVM_GET_IRQCHIP`.
const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

/// The MSRs of `candidates` (KVM's MSR index list) that this vCPU can read back. Some
/// listed MSRs are not readable on every host; asking for one makes KVM stop reading
/// the whole batch there, so they are found one by one, once per VM.
pub fn readable_msrs(vcpu: &KvmVcpu, candidates: &[u32]) -> Vec<u32> {
    candidates
        .iter()
        .copied()
        .filter(|&i| vcpu.msrs(&[i]).is_ok_and(|r| r.len() == 1))
        .collect()
}

/// Everything KVM holds for one vCPU. The x87/SSE state is inside the XSAVE area, so
/// it is not kept a second time as `kvm_fpu`.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
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
    pub fn capture(vcpu: &KvmVcpu, msr_indices: &[u32]) -> Result<Self, StateError> {
        let events = vcpu.events()?;
        let msrs = vcpu.msrs(msr_indices)?;
        if msrs.len() != msr_indices.len() {
            return Err(StateError::Msrs {
                what: "read",
                read: msrs.len(),
                wanted: msr_indices.len(),
            });
        }
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

/// Sets the guest clock to a value read earlier, so the guest does not see the time in
/// between (a saved VM, a paused one). The flags describe the clock as it was read and
/// KVM refuses them back.
pub fn set_guest_clock(vm: &VmHandle, clock: &kvm_clock_data) -> Result<(), KvmError> {
    vm.set_clock(&kvm_clock_data {
        clock: clock.clock,
        flags: 0,
        ..Default::default()
    })
}

/// VM-wide KVM state: interrupt controllers, PIT and the guest clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Captures the VM-wide state; the vCPUs must be paused.
    pub fn capture(vm: &VmHandle) -> Result<Self, StateError> {
        Ok(Self {
            pic_master: vm.irqchip(PIC_MASTER)?,
            pic_slave: vm.irqchip(PIC_SLAVE)?,
            ioapic: vm.irqchip(IOAPIC)?,
            pit: vm.pit()?,
            clock: vm.clock()?,
        })
    }

    /// Restores into a fresh VM before any vCPU state is restored or any vCPU runs:
    /// the PIT and the clock first (kvmclock pages the vCPUs read are derived from it),
    /// then the PICs and the IOAPIC, so interrupts routed during vCPU restore find
    /// their controllers as they were.
    pub fn restore(&self, vm: &VmHandle) -> Result<(), StateError> {
        vm.set_pit(&self.pit)?;
        set_guest_clock(vm, &self.clock)?;
        vm.set_irqchip(&self.pic_master)?;
        vm.set_irqchip(&self.pic_slave)?;
        vm.set_irqchip(&self.ioapic)?;
        Ok(())
    }
}
