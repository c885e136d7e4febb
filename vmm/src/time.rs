//! The guest's time: its kvmclock and each vCPU's TSC, read as of one instant and set
//! back as of one, so the two stay in step across a pause or a restore. (Read or set
//! one after the other, they drift apart by the latency of the calls in between, and
//! Linux's clocksource watchdog then marks the TSC unstable.)
//!
//! The instant is a host TSC reading: KVM reports the one its clock was read at (or we
//! take one right after), and where KVM exposes a vCPU's TSC offset (Linux 5.16+) the
//! vCPU's TSC at that reading is exact arithmetic. Elsewhere MSR_IA32_TSC is read and
//! written directly, which is close but not exact.

use kvm_bindings::{kvm_clock_data, KVM_CLOCK_HOST_TSC};

use crate::kvm::{host_tsc, KvmError, KvmVcpu, VmHandle};
use crate::state::{write_msr, StateError};

/// MSR_IA32_TSC: the vCPU's time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The guest clock in ns, and the host TSC at the instant it had that value.
#[derive(Clone, Copy, Debug)]
pub struct ClockReading {
    pub ns: u64,
    pub host_tsc: u64,
}

pub fn read_clock(vm: &VmHandle) -> Result<ClockReading, KvmError> {
    let data = vm.clock()?;
    let host_tsc = if data.flags & KVM_CLOCK_HOST_TSC != 0 {
        data.host_tsc
    } else {
        host_tsc()
    };
    Ok(ClockReading { ns: data.clock, host_tsc })
}

/// Where the guest clock stood just after [`set_clock`]: how far it had moved on from
/// the value set, and the host TSC at that instant.
#[derive(Clone, Copy, Debug)]
pub struct Anchor {
    pub since_set_ns: u64,
    pub host_tsc: u64,
}

/// Sets the guest clock to `ns`, and returns the anchor to set the TSCs in step with
/// ([`set_tsc`]). Only the time is set: a reading's flags, host realtime and host TSC
/// describe the host at that moment, and KVM refuses the flags back.
pub fn set_clock(vm: &VmHandle, ns: u64) -> Result<Anchor, KvmError> {
    vm.set_clock(&kvm_clock_data {
        clock: ns,
        ..Default::default()
    })?;
    let now = read_clock(vm)?;
    Ok(Anchor {
        since_set_ns: now.ns.saturating_sub(ns),
        host_tsc: now.host_tsc,
    })
}

/// A vCPU's TSC when the host TSC read `host_tsc`, where its offset is known.
pub fn tsc_at(vcpu: &KvmVcpu, host_tsc: u64) -> Option<u64> {
    vcpu.tsc_offset().map(|offset| host_tsc.wrapping_add(offset))
}

/// Reads a vCPU's TSC through MSR_IA32_TSC; must run on the vCPU's own thread.
pub fn read_tsc(vcpu: &KvmVcpu) -> Result<u64, StateError> {
    match vcpu.msrs(&[MSR_IA32_TSC])?.first() {
        Some(entry) => Ok(entry.data),
        None => Err(StateError::Msrs { what: "read", read: 0, wanted: 1 }),
    }
}

/// Sets a vCPU's TSC to `tsc`, its value when the guest clock read what [`set_clock`]
/// set, placed at `anchor`; must run on the vCPU's own thread once it has one.
pub fn set_tsc(vcpu: &KvmVcpu, tsc: u64, anchor: Anchor) -> Result<(), StateError> {
    let khz = u64::from(vcpu.tsc_khz().unwrap_or(0));
    let target = tsc.wrapping_add(anchor.since_set_ns.saturating_mul(khz) / 1_000_000);
    if vcpu.set_tsc_offset(target.wrapping_sub(anchor.host_tsc)) {
        return Ok(());
    }
    tracing::debug!("KVM_VCPU_TSC_OFFSET unavailable; setting the TSC through its MSR");
    let since = host_tsc().wrapping_sub(anchor.host_tsc);
    write_msr(vcpu, MSR_IA32_TSC, target.wrapping_add(since))
}
