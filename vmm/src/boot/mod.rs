//! Everything needed to put a Linux kernel into guest memory and the boot CPU at its entry.
pub mod layout;
