//! Emulated devices.
pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod serial;
