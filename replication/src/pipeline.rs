//! The epoch pipeline's throughput on this host, without a guest: pages dirtied in a
//! memory region are staged, sent as epochs over loopback QUIC (pinned mutual TLS, as
//! in production) to a standby that verifies each epoch and applies it to its image,
//! and acknowledged. Measured beside a plain QUIC bulk transfer with the same TLS and
//! settings, memcpy and loopback TCP moving the same bytes in the same run: what the
//! pipeline is compared with.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::epoch::Epoch;
use tandem_proto::handshake::Identity as ProtoIdentity;
use tandem_proto::message::{EpochKind, Role, PAGE_SIZE};
use tandem_proto::{buffers, crc};
use tandem_proto::primary::{self, Primary};
use tandem_proto::standby::{self, Standby};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use tandem_vmm::memory::HugeBuffer;
use tandem_vmm::pieces::write_flat;
use tandem_vmm::vm::{crcs_while_copying, Spares};

use crate::tls;
use crate::transport::{self, Listener, TransportError};

/// What the region's pages hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Each page its own number and then zero bytes: what compression shrinks most.
    Sparse,
    /// Random bytes: nothing to shrink, every byte through the cipher.
    Random,
    /// Three pages in four all zeros, the rest random: memory a guest has freed and
    /// cleared (a booting Linux clears what it allocates), which goes as markers.
    ZeroHeavy,
}

impl Mix {
    /// In the order the benchmarks show them.
    pub const ALL: [Mix; 3] = [Mix::Random, Mix::ZeroHeavy, Mix::Sparse];

    pub fn describe(self) -> &'static str {
        match self {
            Mix::Random => "random pages (incompressible)",
            Mix::ZeroHeavy => "zero-heavy pages (3 in 4 all zeros, the rest random)",
            Mix::Sparse => "sparse pages (a number, then zeros)",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Size of the memory region, in MiB.
    pub mib: usize,
    /// Delta epochs after the initial full one.
    pub epochs: u32,
    /// Share of the region each delta dirties, in percent.
    pub dirty_percent: u32,
    /// Epochs in flight before the primary waits for acks.
    pub window: usize,
    pub mix: Mix,
}

/// One phase of a run: the pipeline moving its pages, and plain QUIC moving as many
/// bytes, one after the other in the same run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phase {
    /// Pages sent in the phase, all its epochs together.
    pub pages: u64,
    /// Payload bytes the pipeline put on the wire for them.
    pub wire: u64,
    pub pipeline: Duration,
    /// CPU time the whole process (both ends) spent on the pipeline, and on plain QUIC:
    /// steadier than wall time on a shared host, and what a real pair of hosts pays.
    pub pipeline_cpu: Duration,
    /// Page faults the process took on each: each is a page of memory first touched,
    /// dear in the lab and on this host.
    pub pipeline_faults: u64,
    /// Plain QUIC moving the pages' bytes.
    pub quinn: Duration,
    pub quinn_cpu: Duration,
    pub quinn_faults: u64,
}

impl Phase {
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }
}

/// What moved and how long each path took to move it: the initial sync (the full
/// epoch, acknowledged before any delta goes, so the two are measured apart) and the
/// steady state (the deltas), each beside plain QUIC moving as many bytes.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    /// Pages in the region (the full epoch).
    pub pages_in_region: u64,
    pub sync: Phase,
    pub steady: Phase,
    /// memcpy and loopback TCP moving the steady state's bytes.
    pub memcpy: Duration,
    pub tcp: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("loopback TCP: {0}")]
    Tcp(std::io::Error),
    #[error("cannot allocate the standby's image: {0}")]
    Image(std::io::Error),
    #[error("the pipeline failed: {0}")]
    Failed(String),
}

/// The next number of a deterministic xorshift sequence.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A deterministic choice of pages for each delta.
fn dirty_pages(pages: usize, percent: u32, epoch: u32) -> Vec<usize> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(epoch);
    let mut chosen: Vec<usize> = (0..pages).filter(|_| xorshift(&mut x) % 100 < u64::from(percent)).collect();
    chosen.dedup();
    chosen
}

/// `mib` MiB of pages of the given mix, the same on every call.
pub fn region(mib: usize, mix: Mix) -> Vec<u8> {
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let mut region = vec![0u8; pages * PAGE_SIZE];
    match mix {
        Mix::Sparse => {
            for (i, chunk) in region.chunks_mut(PAGE_SIZE).enumerate() {
                chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
        Mix::Random | Mix::ZeroHeavy => {
            let mut x = 0x2545_f491_4f6c_dd1d_u64;
            for (i, page) in region.chunks_mut(PAGE_SIZE).enumerate() {
                if mix == Mix::ZeroHeavy && i % 4 != 0 {
                    continue;
                }
                for word in page.chunks_mut(8) {
                    word.copy_from_slice(&xorshift(&mut x).to_le_bytes());
                }
            }
        }
    }
    region
}

pub fn measure(p: Params) -> Result<Figures, PipelineError> {
    measure_region(region(p.mib, p.mix), p.epochs, p.dirty_percent, p.window)
}

/// [`measure`] on the pages of `region` (a guest's memory, say): a full epoch of all of
/// it, then `epochs` deltas each dirtying `dirty_percent` of its pages, content unchanged.
pub fn measure_region(mut region: Vec<u8>, epochs: u32, dirty_percent: u32, window: usize) -> Result<Figures, PipelineError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(PipelineError::Runtime)?;
    region.truncate(region.len() / PAGE_SIZE * PAGE_SIZE);
    let pages = region.len() / PAGE_SIZE;
    let plan: Vec<Vec<usize>> = std::iter::once((0..pages).collect())
        .chain((1..=epochs).map(|e| dirty_pages(pages, dirty_percent, e)))
        .collect();

    let (mut sync, mut steady) = runtime.block_on(pipeline(&region, &plan, window))?;
    for phase in [&mut sync, &mut steady] {
        if phase.pages == 0 {
            continue;
        }
        let (cpu, faults) = (process_cpu(), minor_faults());
        phase.quinn = runtime.block_on(async {
            let (server, client) = (tls::ephemeral()?, tls::ephemeral()?);
            let (server_cert, client_cert) = (server.cert.clone(), client.cert.clone());
            // The region's own pages, so plain QUIC carries bytes of the same mix, read
            // from memory as the pipeline reads them.
            let took = transport::bulk(phase.bytes(), &region, tls::server_config(server, client_cert)?, tls::client_config(client, server_cert)?).await?;
            Ok::<_, PipelineError>(took)
        })?;
        (phase.quinn_cpu, phase.quinn_faults) = (process_cpu() - cpu, minor_faults() - faults);
    }
    let memcpy = copy_same_bytes(&mut region, steady.pages);
    let tcp = runtime.block_on(tcp_same_bytes(steady.bytes()))?;
    Ok(Figures { pages_in_region: pages as u64, sync, steady, memcpy, tcp })
}

fn process_cpu() -> Duration {
    transport::cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn minor_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage, which `u` is, and keeps no pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt as u64
}

/// memcpy of the same number of pages, page by page out of the region.
fn copy_same_bytes(region: &mut [u8], pages: u64) -> Duration {
    // Touched first, so the timing is of copying, not of the kernel's page faults.
    let mut out = vec![1u8; region.len()];
    let n = region.len() / PAGE_SIZE;
    let start = Instant::now();
    for i in 0..pages as usize {
        let at = (i % n) * PAGE_SIZE;
        out[at..at + PAGE_SIZE].copy_from_slice(&region[at..at + PAGE_SIZE]);
    }
    std::hint::black_box(&out);
    start.elapsed()
}

/// Loopback TCP carrying the same number of bytes, received into a buffer.
async fn tcp_same_bytes(bytes: u64) -> Result<Duration, PipelineError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(PipelineError::Tcp)?;
    let addr = listener.local_addr().map_err(PipelineError::Tcp)?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<_, std::io::Error>(got)
    });
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(PipelineError::Tcp)?;
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await.map_err(PipelineError::Tcp)?;
        sent += n as u64;
    }
    s.shutdown().await.map_err(PipelineError::Tcp)?;
    let got = receiver.await.map_err(|e| PipelineError::Failed(e.to_string()))?.map_err(PipelineError::Tcp)?;
    if got != bytes {
        return Err(PipelineError::Failed(format!("TCP delivered {got} of {bytes} bytes")));
    }
    Ok(start.elapsed())
}

/// Sends every epoch of `plan` (page numbers of `region`) and returns, for the full
/// epoch and then for the deltas, the time, CPU and faults from the first page staged
/// to the last epoch acknowledged, and the payload bytes sent.
async fn pipeline(region: &[u8], plan: &[Vec<usize>], window: usize) -> Result<(Phase, Phase), PipelineError> {
    let (primary_id, standby_id) = (tls::ephemeral()?, tls::ephemeral()?);
    let (primary_cert, standby_cert) = (primary_id.cert.clone(), standby_id.cert.clone());
    let listener = Listener::bind(([127, 0, 0, 1], 0).into(), tls::server_config(standby_id, primary_cert)?)?;
    let addr = listener.local_addr()?;
    let fingerprint = 0x7a4d;
    let last_epoch = plan.len() as u64;
    // Made as a standby makes its image, before any primary connects, and laid out as
    // guest RAM is: huge pages, which fault in 512 times less often.
    let mut image = HugeBuffer::zeroed(region.len()).map_err(PipelineError::Image)?;

    let mut standby = tokio::spawn(async move {
        let link = listener.accept().await?;
        let (mut tx, mut rx) = link.split();
        let mut machine = Standby::new(ProtoIdentity { role: Role::Standby, fingerprint, generation: 1 }, None);
        while let Some(received) = rx.recv_checked().await? {
            for event in machine.handle_received(received) {
                match event {
                    standby::Event::Send(f) => tx.send(&f).await?,
                    standby::Event::Clear => image.discard().map_err(|e| TransportError::Stream(format!("clearing the image: {e}")))?,
                    standby::Event::Lay(pages) => write_flat(image.as_mut_slice(), &pages.addresses, &pages.zero, &pages.pieces()),
                    standby::Event::Apply(epoch) => {
                        if !epoch.laid {
                            write_flat(image.as_mut_slice(), &epoch.addresses, &epoch.zero, &epoch.pieces());
                        }
                        machine.recycle(epoch);
                    }
                    standby::Event::PeerLeft(_) => return Ok(image),
                    standby::Event::Close(e) => return Err(TransportError::Proto(e)),
                }
            }
            if machine.committed() == Some(last_epoch) {
                // Let the last ack reach the primary before the connection goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(image);
            }
        }
        Ok(image)
    });

    let link = transport::connect(addr, tls::client_config(primary_id, standby_cert)?).await?;
    let (mut tx, mut rx) = link.split();
    let machine = Arc::new(Mutex::new(Primary::new(ProtoIdentity { role: Role::Primary, fingerprint, generation: 1 }, window)));
    let acked = Arc::new(Notify::new());
    let hello = lock(&machine).connect();
    tx.send(&hello).await?;
    let mut receiver = {
        let (machine, acked) = (machine.clone(), acked.clone());
        tokio::spawn(async move {
            let read = async {
                while let Some(frame) = rx.recv().await? {
                    let events = lock(&machine).handle(frame);
                    for event in events {
                        match event {
                            primary::Event::Released(e) if e == last_epoch => return Ok(()),
                            primary::Event::Close(e) => return Err(TransportError::Proto(e)),
                            _ => {}
                        }
                    }
                    acked.notify_one();
                }
                Ok::<(), TransportError>(())
            };
            let result = read.await;
            // Whatever ended the reading, the sender must not wait for acks any more.
            acked.notify_one();
            result
        })
    };

    let mut phase = Phase::default();
    let (mut start, mut cpu, mut faults) = (Instant::now(), process_cpu(), minor_faults());
    let mut sync = None;
    // Staging buffers come back once their frames are gone and are filled again, kept
    // as the VM keeps them (`Vm::recycle`: at most the guest's memory in all).
    let (give_back, returned) = buffers::returned();
    let mut spares = Spares::new(region.len());
    let mut epoch = Epoch::default();
    for (i, pages) in plan.iter().enumerate() {
        // Back-pressure: wait for acks while the window is full (or, for the first
        // epoch, for the standby's welcome).
        while !lock(&machine).can_send() {
            if receiver.is_finished() {
                return Err(stopped(&mut standby, &mut receiver).await);
            }
            acked.notified().await;
        }
        let kind = if i == 0 { EpochKind::Full } else { EpochKind::Delta };
        epoch.kind = Some(kind);
        epoch.addresses.clear();
        epoch.addresses.extend(pages.iter().map(|&p| (p * PAGE_SIZE) as u64));
        returned.try_iter().for_each(|buffer| spares.keep(buffer));
        epoch.data = spares.take(pages.len() * PAGE_SIZE);
        epoch.data.clear();
        epoch.data.reserve_exact(pages.len() * PAGE_SIZE);
        epoch.page_crcs.clear();
        // As the VM captures: a large delta's CRCs taken while each page's copy is in
        // cache (a full epoch's too, which the VM copies while the guest runs).
        let crcs = i == 0 || crcs_while_copying(pages.len());
        for &p in pages {
            let at = epoch.data.len();
            epoch.data.extend_from_slice(&region[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
            if crcs {
                epoch.page_crcs.push(crc::page(&epoch.data[at..]));
            }
        }
        epoch.state = vec![0; 64];
        let encoded = lock(&machine).send_epoch(&mut epoch, Some(&give_back)).map_err(|e| PipelineError::Failed(e.to_string()))?;
        phase.wire += encoded.wire_bytes() as u64;
        phase.pages += pages.len() as u64;
        for f in encoded.frames.iter() {
            tx.send_encoded(f.clone()).await?;
        }
        if i == 0 && plan.len() > 1 {
            // The initial sync ends once the standby holds the full epoch.
            while lock(&machine).acked() != Some(1) {
                if receiver.is_finished() {
                    return Err(stopped(&mut standby, &mut receiver).await);
                }
                acked.notified().await;
            }
            (phase.pipeline, phase.pipeline_cpu, phase.pipeline_faults) = (start.elapsed(), process_cpu() - cpu, minor_faults() - faults);
            sync = Some(std::mem::take(&mut phase));
            (start, cpu, faults) = (Instant::now(), process_cpu(), minor_faults());
        }
    }
    receiver.await.map_err(|e| PipelineError::Failed(e.to_string()))??;
    (phase.pipeline, phase.pipeline_cpu, phase.pipeline_faults) = (start.elapsed(), process_cpu() - cpu, minor_faults() - faults);
    let (sync, steady) = match sync {
        Some(sync) => (sync, phase),
        None => (phase, Phase::default()),
    };
    tx.close("done");
    let image = standby.await.map_err(|e| PipelineError::Failed(e.to_string()))??;
    if image.as_slice()[..region.len()] != *region {
        return Err(PipelineError::Failed("the standby's image differs from the region".into()));
    }
    Ok((sync, steady))
}

/// Why the primary's acknowledgements stopped before the last epoch's: the standby's
/// error where it has one (its end closing the connection is what the primary saw).
async fn stopped(standby: &mut JoinHandle<Result<HugeBuffer, TransportError>>, receiver: &mut JoinHandle<Result<(), TransportError>>) -> PipelineError {
    if standby.is_finished() {
        if let Ok(Err(e)) = standby.await {
            return e.into();
        }
    }
    match receiver.await {
        Ok(Err(e)) => e.into(),
        Ok(Ok(())) => PipelineError::Failed("the standby stopped acknowledging".into()),
        Err(e) => PipelineError::Failed(e.to_string()),
    }
}

fn lock(m: &Mutex<Primary>) -> std::sync::MutexGuard<'_, Primary> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_pipeline_delivers_every_page_intact() {
        for mix in [Mix::Sparse, Mix::Random, Mix::ZeroHeavy] {
            let f = measure(Params { mib: 4, epochs: 5, dirty_percent: 25, window: 2, mix }).unwrap();
            assert_eq!(f.sync.pages, 1024, "{f:?}");
            assert!(f.steady.pages > 1024, "{f:?}");
            for p in [f.sync, f.steady] {
                assert!(p.pipeline > Duration::ZERO && p.quinn > Duration::ZERO, "{f:?}");
                // Random pages cannot shrink; sparse ones must.
                let raw = p.bytes();
                match mix {
                    Mix::Sparse => assert!(p.wire * 4 < raw, "{f:?}"),
                    Mix::Random => assert!(p.wire >= raw, "{f:?}"),
                    Mix::ZeroHeavy => assert!(p.wire * 3 < raw && p.wire * 5 > raw, "{f:?}"),
                }
            }
            assert!(f.tcp > Duration::ZERO && f.memcpy > Duration::ZERO);
        }
    }
}
