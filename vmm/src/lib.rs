//! tandem's virtual machine monitor: guest memory, vCPUs, x86 boot and devices.
pub mod boot;
pub mod console_log;
pub mod devices;
pub mod disk;
pub mod kvm;
pub mod memory;
pub mod net;
pub mod output;
pub mod pieces;
pub mod slice;
pub mod snapshot;
pub mod state;
pub mod time;
pub mod vcpu;
pub mod vm;
