//! vCPU threads and the state machine that starts, pauses, resumes and stops them.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread. To pause, the controller
//! records the wish under a lock, then kicks every thread with a real-time signal whose
//! handler sets the thread's `immediate_exit` flag in its `kvm_run` page: if the signal
//! lands while the thread is inside `KVM_RUN`, the ioctl returns `EINTR`; if it lands
//! just before, the flag makes the next `KVM_RUN` return at once. Either way the thread
//! reaches its check point, reports itself parked and waits. No window exists in which
//! a kick can be lost, so a pause completes in one round of signals.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::bus::{DeviceBus, GuestRequest};
use crate::kvm::{Exit, KvmVcpu};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot start vCPU thread {index}: {source}")]
    Spawn { index: usize, source: std::io::Error },
    #[error("vCPUs did not pause within {0:?} ({1} of {2} parked)")]
    PauseTimeout(Duration, usize, usize),
    #[error("cannot kick vCPU {0}: {1}")]
    Kick(usize, vmm_sys_util::errno::Error),
    #[error("the vCPUs must be paused for this")]
    NotPaused,
    #[error("vCPU {0} did not answer within {1:?}")]
    NoAnswer(usize, Duration),
    #[error("vCPU {0} has stopped the machine (the guest powered off, reset or failed)")]
    MachineStopped(usize),
}

/// Work for one paused vCPU, run on that vCPU's own thread (KVM wants most per-vCPU
/// state read and written by the thread that runs the vCPU).
type Job = Box<dyn FnOnce(&mut KvmVcpu) + Send>;

/// Why the VM stopped running guest code for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset itself; the string says how (a reboot, or a reset request).
    Reset(String),
    /// The CPU could not deliver an exception at all; the string says where.
    TripleFault(String),
    /// A vCPU hit something the VMM cannot continue from.
    Failed(String),
}

/// What reaches the thread that waits on a VM: a vCPU's report that the machine
/// stopped, or a [`Waker`]'s nudge that something outside the VM needs a look.
pub enum Signal {
    Exit(VmExit),
    Wake,
}

/// Wakes the thread waiting in [`crate::vm::Vm::wait_timeout`] early, so that what
/// drives the VM from outside (the replication's acknowledgements) is handled as it
/// happens rather than found by polling.
#[derive(Clone)]
pub struct Waker(Sender<Signal>);

impl Waker {
    pub fn new(tx: Sender<Signal>) -> Self {
        Self(tx)
    }

    pub fn wake(&self) {
        // A VM that is gone needs no waking.
        let _ = self.0.send(Signal::Wake);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Control {
    want: Want,
    /// Threads not executing guest code: paused, finished, or waiting to be stopped.
    parked: usize,
    /// One slot per vCPU for a job to run while paused.
    jobs: Vec<Option<Job>>,
    /// Per vCPU: it reported why the machine must stop and runs no more jobs.
    ended: Vec<bool>,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        // A vCPU thread that panicked leaves the state as valid as it was: keep going.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler to set.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread to the immediate_exit byte of its own
        // kvm_run mapping, and cleared before that mapping goes away. Only this thread
        // reads it here, and a volatile byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// The running vCPUs of one VM.
pub struct VcpuSet {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, running the guest at once unless `paused` (then the
    /// first [`VcpuSet::resume`] starts it). Port I/O goes to `bus`; the first request to
    /// stop the machine goes to `exits`.
    pub fn start(
        vcpus: Vec<KvmVcpu>,
        bus: Arc<Mutex<DeviceBus>>,
        exits: Sender<Signal>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        static HANDLER: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
            std::sync::OnceLock::new();
        (*HANDLER.get_or_init(|| register_signal_handler(kick_signal(), kick_handler)))
            .map_err(VcpuError::Signal)?;

        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                want: if paused { Want::Pause } else { Want::Run },
                parked: 0,
                jobs: (0..vcpus.len()).map(|_| None).collect(),
                ended: vec![false; vcpus.len()],
            }),
            changed: Condvar::new(),
        });
        let mut set = Self {
            shared: shared.clone(),
            threads: Vec::with_capacity(vcpus.len()),
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let runner = Runner {
                index,
                vcpu,
                io_pending: false,
                bus: bus.clone(),
                exits: exits.clone(),
                shared: shared.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || runner.run())
                .map_err(|source| VcpuError::Spawn { index, source });
            match handle {
                Ok(h) => set.threads.push(h),
                Err(e) => {
                    set.stop();
                    return Err(e);
                }
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    fn kick_all(&self) -> Result<(), VcpuError> {
        for (i, t) in self.threads.iter().enumerate() {
            // SAFETY: the pthread handle belongs to a thread we spawned and have not
            // joined, so it is valid; the signal has a handler installed.
            let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if rc != 0 {
                return Err(VcpuError::Kick(i, vmm_sys_util::errno::Error::new(rc)));
            }
        }
        Ok(())
    }

    /// Stops every vCPU out of `KVM_RUN` and waits until all have acknowledged; returns
    /// how long that took. On timeout the vCPUs are resumed and an error returned, so a
    /// failed pause never leaves the guest stopped.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, VcpuError> {
        let start = Instant::now();
        let n = self.threads.len();
        {
            let mut c = self.shared.lock();
            if c.want == Want::Run {
                c.want = Want::Pause;
            }
        }
        self.kick_all()?;
        let c = self.shared.lock();
        let (c, wait) = self
            .shared
            .changed
            .wait_timeout_while(c, timeout, |c| c.parked < n)
            .unwrap_or_else(|e| e.into_inner());
        if wait.timed_out() {
            let parked = c.parked;
            drop(c);
            self.resume();
            return Err(VcpuError::PauseTimeout(timeout, parked, n));
        }
        Ok(start.elapsed())
    }

    /// Lets paused vCPUs run the guest again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause {
            c.want = Want::Run;
            self.shared.changed.notify_all();
        }
    }

    /// Runs `f` on every vCPU's own thread while all are paused, and returns the results
    /// in vCPU order.
    pub fn on_each_paused<R, F>(&self, f: F) -> Result<Vec<R>, VcpuError>
    where
        R: Send + 'static,
        F: Fn(usize, &mut KvmVcpu) -> R + Send + Sync + 'static,
    {
        let n = self.threads.len();
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut c = self.shared.lock();
            if c.want != Want::Pause || c.parked < n {
                return Err(VcpuError::NotPaused);
            }
            // A vCPU that stopped the machine will never pick its job up: say so now,
            // not after a timeout that reads like a hang.
            if let Some(index) = c.ended.iter().position(|e| *e) {
                return Err(VcpuError::MachineStopped(index));
            }
            for (index, slot) in c.jobs.iter_mut().enumerate() {
                let (f, tx) = (f.clone(), tx.clone());
                *slot = Some(Box::new(move |vcpu: &mut KvmVcpu| {
                    let _ = tx.send((index, f(index, vcpu)));
                }));
            }
            self.shared.changed.notify_all();
        }
        // Only the jobs hold senders now: a job dropped unrun ends the wait at once.
        drop(tx);
        let timeout = Duration::from_secs(2);
        let mut results: Vec<Option<R>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            match rx.recv_timeout(timeout) {
                Ok((index, r)) => results[index] = Some(r),
                Err(_) => {
                    let missing = results.iter().position(Option::is_none).unwrap_or(0);
                    // Withdraw jobs nobody picked up, so none runs late.
                    let mut c = self.shared.lock();
                    c.jobs.iter_mut().for_each(|j| *j = None);
                    if c.ended[missing] {
                        return Err(VcpuError::MachineStopped(missing));
                    }
                    return Err(VcpuError::NoAnswer(missing, timeout));
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// True while the vCPUs are held paused.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().want == Want::Pause
    }

    /// Whether every vCPU thread has ended (or none was started): with a [`Waker`]
    /// keeping the channel open, an ended thread that sent nothing shows only here.
    pub fn all_ended(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Ends every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.shared.changed.notify_all();
        let _ = self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a vCPU thread does after its check point.
enum Next {
    Run,
    /// Complete an I/O exit before parking (see `Runner::complete_io`).
    FinishIo,
    Stop,
}

struct Runner {
    index: usize,
    vcpu: KvmVcpu,
    /// The last exit was an I/O access that KVM completes at the next `KVM_RUN`.
    io_pending: bool,
    bus: Arc<Mutex<DeviceBus>>,
    exits: Sender<Signal>,
    shared: Arc<Shared>,
}

impl Runner {
    fn run(mut self) {
        let flag = self.vcpu.immediate_exit_ptr();
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        let _span = tracing::debug_span!("vcpu", index = self.index).entered();
        loop {
            let exit = match self.check_point() {
                Next::Stop => break,
                Next::FinishIo => self.complete_io(),
                Next::Run => self.run_once(),
            };
            if let Some(exit) = exit {
                // Only the first report matters; the VM may already be gone.
                let _ = self.exits.send(Signal::Exit(exit));
                self.park_until_stopped();
                break;
            }
        }
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
    }

    /// Honours a pause or stop request, running any job handed to this vCPU while it
    /// is paused; says what the thread does next.
    fn check_point(&mut self) -> Next {
        let shared = self.shared.clone();
        let mut c = shared.lock();
        if c.want != Want::Run && self.io_pending {
            return Next::FinishIo;
        }
        if c.want == Want::Pause {
            c.parked += 1;
            shared.changed.notify_all();
            while c.want == Want::Pause {
                if let Some(job) = c.jobs[self.index].take() {
                    job(&mut self.vcpu);
                    continue;
                }
                c = shared.changed.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            c.parked -= 1;
        }
        if c.want == Want::Stop {
            Next::Stop
        } else {
            Next::Run
        }
    }

    /// KVM finishes an I/O exit (moves RIP past the instruction, stores an IN's value)
    /// only at the next `KVM_RUN`. A vCPU about to park enters once more with an
    /// immediate exit, so that no state captured meanwhile shows the instruction half
    /// done: restored elsewhere, it would run again (a console byte printed twice).
    /// A string instruction may need further exits first, each handled as usual.
    fn complete_io(&mut self) -> Option<VmExit> {
        while self.io_pending {
            self.vcpu.set_immediate_exit();
            if let Some(exit) = self.run_once() {
                return Some(exit);
            }
        }
        None
    }

    /// A vCPU whose guest stopped the machine stays parked (and counts as paused) until
    /// the VM is torn down.
    fn park_until_stopped(&self) {
        let mut c = self.shared.lock();
        c.parked += 1;
        c.ended[self.index] = true;
        // A job handed out before this vCPU ended would never run.
        c.jobs[self.index] = None;
        self.shared.changed.notify_all();
        while c.want != Want::Stop {
            c = self.shared.changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs the guest until one exit is handled; returns why the machine must stop, if it must.
    fn run_once(&mut self) -> Option<VmExit> {
        let bus = &self.bus;
        let lock = || bus.lock().unwrap_or_else(|e| e.into_inner());
        let exit = self.vcpu.run();
        self.io_pending = matches!(exit, Exit::IoIn(..) | Exit::IoOut(..) | Exit::MmioRead(..) | Exit::MmioWrite(..));
        match exit {
            Exit::IoIn(port, data) => lock().pio_read(port, data),
            Exit::IoOut(port, data) => return request(lock().pio_write(port, data)),
            Exit::MmioRead(addr, data) => lock().mmio_read(addr, data),
            Exit::MmioWrite(addr, data) => return request(lock().mmio_write(addr, data)),
            Exit::Interrupted => self.vcpu.clear_immediate_exit(),
            Exit::Reset => return Some(VmExit::Reset("reset requested".into())),
            Exit::TripleFault => {
                let at = match (self.vcpu.regs(), self.vcpu.sregs()) {
                    (Ok(r), Ok(s)) => format!("rip={:#x} rsp={:#x} cr3={:#x}", r.rip, r.rsp, s.cr3),
                    _ => "an unreadable state".into(),
                };
                return Some(VmExit::TripleFault(format!("vCPU {} at {at}", self.index)));
            }
            Exit::Shutdown => return Some(VmExit::PowerOff),
            Exit::Failed(why) => return Some(VmExit::Failed(format!("vCPU {}: {why}", self.index))),
        }
        None
    }
}

/// What a device's request means for the VM.
fn request(r: Option<GuestRequest>) -> Option<VmExit> {
    match r? {
        GuestRequest::PowerOff => Some(VmExit::PowerOff),
        GuestRequest::Reset => Some(VmExit::Reset("reset through the keyboard controller (reboot)".into())),
    }
}
