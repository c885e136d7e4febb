//! tandem's virtual machine monitor: guest memory, vCPUs, x86 boot and devices.
pub mod boot;
pub mod devices;
pub mod memory;
