//! Everything needed to put a guest (a Linux kernel, or the built-in micro guest) into
//! guest memory and the boot CPU at its entry.
pub mod acpi;
pub mod aml;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod micro;
pub mod mptable;
pub mod msrs;
pub mod regs;
mod tables;
