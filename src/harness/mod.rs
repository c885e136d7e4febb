//! The test harness: the lab (Linux with real KVM under QEMU's emulated AMD-V), the
//! failover drill and the benchmarks. They drive the product from outside, as an
//! operator would (processes, control sockets, event files), and never reach into it;
//! `tandem lab|drill|bench` are their commands.

pub mod bench;
pub mod drill;
pub mod lab;
mod netlab;
pub(crate) mod ports;
mod proc;
mod relay;
mod watchdog;
