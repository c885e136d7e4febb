//! One thread that does every virtio device's work as it comes: a frame arriving on a
//! TAP, a guest's kick of a queue (which KVM signals through an ioeventfd, without
//! stopping the vCPU). The vCPU threads never do a device's I/O.
//!
//! Devices decline work while the VM is paused (a capture may be reading their rings
//! and their backing), and look at every queue when it resumes, so nothing the thread
//! puts off is lost.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, QUEUE_NOTIFY};
use super::VirtioDevice;
use crate::kvm::{KvmError, VmHandle};

/// A device the loop can hand work to.
pub(crate) trait Serviced: Send {
    fn process_queue(&mut self, index: usize);
}

impl<D: VirtioDevice> Serviced for MmioTransport<D> {
    fn process_queue(&mut self, index: usize) {
        MmioTransport::process_queue(self, index)
    }
}

pub(crate) type Handle = Arc<Mutex<dyn Serviced>>;

/// Something to wait on, and the queue of the device it concerns.
pub(crate) struct Source {
    device: Handle,
    queue: usize,
    what: What,
}

enum What {
    /// A TAP's descriptor: readable when frames wait. Edge-triggered, as a TAP stays
    /// readable while the guest has no buffer for what waits in it, and the guest's
    /// kick for more buffers drains it.
    Readable(RawFd),
    Kick(EventFd),
}

impl Source {
    /// Frames arriving on `fd` go to `device`'s queue `queue`.
    pub(crate) fn readable(device: Handle, queue: usize, fd: RawFd) -> Self {
        Self { device, queue, what: What::Readable(fd) }
    }

    /// The guest's kicks of queue `queue` of the device whose window starts at `base`,
    /// which from now on KVM signals here rather than as an exit.
    pub(crate) fn kick(vm: &VmHandle, device: Handle, base: u64, queue: usize) -> Result<Self, KickError> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(KickError::EventFd)?;
        vm.register_ioevent(&event, base + QUEUE_NOTIFY, queue as u32)?;
        Ok(Self { device, queue, what: What::Kick(event) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("cannot make an eventfd for a virtio queue: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("cannot start the virtio devices' event loop: {0}")]
    Start(std::io::Error),
}

/// The thread; dropping this stops it.
pub(crate) struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub(crate) fn start(sources: Vec<Source>) -> Result<Self, KickError> {
        Self::spawn(sources).map_err(KickError::Start)
    }

    fn spawn(sources: Vec<Source>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        for (token, source) in sources.iter().enumerate() {
            let (fd, set) = match &source.what {
                What::Readable(fd) => (*fd, EventSet::IN | EventSet::EDGE_TRIGGERED),
                What::Kick(event) => (event.as_raw_fd(), EventSet::IN),
            };
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, sources.len() as u64))?;
        let thread = std::thread::Builder::new().name("virtio".into()).spawn(move || {
            let mut events = vec![EpollEvent::default(); sources.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("the virtio devices' event loop failed: {e}");
                        return;
                    }
                };
                for event in &events[..n] {
                    let Some(source) = sources.get(event.data() as usize) else { return };
                    if let What::Kick(kick) = &source.what {
                        // Read first: a kick after the read is seen at the next wait.
                        let _ = kick.read();
                    }
                    source.device.lock().unwrap_or_else(|e| e.into_inner()).process_queue(source.queue);
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
