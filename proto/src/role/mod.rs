//! The two roles' decisions, without I/O: what a standby does when its primary falls
//! silent (take over, or first ask the witness), and what a primary does when it
//! loses its standby (pause, or run on, under the witness's lease if there is one).
//! Time comes in as an argument (`now`, a monotonic clock's reading as a
//! [`std::time::Duration`]); the caller carries out each action the machine returns
//! from `poll`, quinn-proto style: `handle_*` in, `poll` out, `next_timeout` for when
//! to call `handle_timeout`.

pub mod primary;
pub mod standby;
