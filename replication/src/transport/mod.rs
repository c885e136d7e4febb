//! The QUIC transport (quinn on tokio), and the only module that knows either. A
//! connection carries one bidirectional stream of protocol frames: epochs one way,
//! acknowledgements the other, heartbeats both ways. QUIC gives the stream its order
//! and integrity; the frames' own checks catch anything else.
//!
//! [`primary`] and [`standby`] run each side's connections on a thread of their own
//! and talk to the synchronous VM side through plain channels and shared state.

mod bulk;
pub mod primary;
pub mod standby;
pub mod witness;

pub use bulk::bulk;

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tandem_proto::frame::{self, Decoder, Received};
use tandem_proto::{Frame, ProtoError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot use {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("TLS setup: {0}")]
    Tls(String),
    /// `tls`: the handshake failed over a certificate (see [`TransportError::tls_refusal`]).
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: SocketAddr, why: String, tls: Option<TlsRefusal> },
    #[error("the connection failed: {0}")]
    Connection(quinn::ConnectionError),
    #[error("the stream failed: {0}")]
    Stream(String),
    #[error("the endpoint was closed")]
    Closed,
    #[error("cannot send a heartbeat: {0}")]
    Heartbeat(String),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

// A lost connection is one error however it was noticed, so that what ended it (the
// peer's close, its reason, a TLS alert) is shown and can be told apart.
impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::Connection(e)
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => Self::Connection(e),
            other => Self::Stream(other.to_string()),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(e) => Self::Connection(e),
            other => Self::Stream(other.to_string()),
        }
    }
}

/// A TLS handshake that failed, as a refusal of a certificate always makes it fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsRefusal {
    /// The peer refused this side (else this side refused the peer).
    pub by_peer: bool,
    /// Why, in the refusing side's words.
    pub reason: String,
}

/// The TLS refusal that ended a connection, if one did: QUIC carries the TLS alert as a
/// "crypto" error code, and quinn reports an alert-less TLS failure as a protocol
/// violation that names TLS.
fn tls_failure(e: &quinn::ConnectionError) -> Option<TlsRefusal> {
    let (by_peer, code, reason): (bool, u64, &[u8]) = match e {
        quinn::ConnectionError::ConnectionClosed(c) => (true, c.error_code.into(), &c.reason),
        quinn::ConnectionError::TransportError(t) => (false, t.code.into(), t.reason.as_bytes()),
        _ => return None,
    };
    if !(0x100..0x200).contains(&code) && !reason.starts_with(b"TLS error") {
        return None;
    }
    let reason = String::from_utf8_lossy(reason);
    // rustls's wording for a verifier's own error adds nothing.
    let reason = reason.strip_prefix("unexpected error: ").unwrap_or(&reason).to_string();
    Some(TlsRefusal { by_peer, reason })
}

/// Flow-control windows of 16 MiB: at QUIC's defaults (about 1 MiB) the sender
/// stalls on the receiver's window long before the link is full (measured on these
/// hosts, see shared/notes/environment.md); but larger windows than this let a standby
/// busy applying an epoch fall behind by more than QUIC buffers cheaply. At 128 MiB
/// `bench pipeline` (random pages) spent 3.9-5.6 s of CPU where 16 MiB spent 2.8-3.7 s:
/// quinn's receive buffers, fragmented by the backlog, were copied to defragment them
/// and their memory faulted in afresh. 16 MiB still covers 13 ms of round trip at
/// 10 Gb/s, and the epoch window (`--window`) bounds what is in flight anyway.
///
/// On loopback, datagrams of 6000 bytes from the first packet: per-datagram costs bind
/// QUIC there, five times fewer datagrams move several times the bytes (and in the
/// emulated lab, where every syscall is dear, far more). Not above 6500, where quinn's
/// GSO batches would exceed the kernel's 64 KiB and fall back to 1200-byte packets.
/// Elsewhere the path MTU is not known in advance, so QUIC starts small and probes.
fn transport_config(loopback: bool) -> Arc<quinn::TransportConfig> {
    let window: u32 = 16 << 20;
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(window.into())
        .receive_window(window.into())
        .send_window(u64::from(window));
    if loopback {
        t.initial_mtu(6000);
    }
    Arc::new(t)
}

/// Accepts datagrams as large as UDP allows, so the peer may send large ones.
fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(65527).expect("65527 is within QUIC's limits");
    config
}

/// The socket buffers an endpoint asks for: a standby busy applying an epoch, or a
/// primary busy capturing one, must not drop the datagrams that arrive meanwhile. At
/// Linux's default (208 KiB, some thirty 6000-byte datagrams) the lab's standby dropped
/// one datagram in twenty, and each loss halved QUIC's congestion window.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Asks for [`SOCKET_BUFFER`] each way: beyond `net.core.rmem_max`/`wmem_max` only a
/// privileged process (the VMM runs with /dev/kvm, usually as root) gets it, by the
/// FORCE options; otherwise the kernel's cap stands. Best effort: a smaller buffer
/// costs speed, not correctness.
fn widen_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let set = |option: libc::c_int| {
        // SAFETY: setsockopt on a socket this function borrows, with a pointer to a
        // c_int that lives across the call and its exact size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    let receive = set(libc::SO_RCVBUFFORCE) || set(libc::SO_RCVBUF);
    let send = set(libc::SO_SNDBUFFORCE) || set(libc::SO_SNDBUF);
    tracing::debug!(receive, send, bytes = SOCKET_BUFFER, "socket buffers widened");
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, TransportError> {
    let bind = |source| TransportError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    widen_buffers(&socket);
    let runtime = quinn::default_runtime().ok_or_else(|| bind(std::io::Error::other("no async runtime found")))?;
    quinn::Endpoint::new(endpoint_config(), server, socket, runtime).map_err(bind)
}

/// One connection's frame stream: a sending and a receiving half, which
/// [`Link::split`] hands to separate tasks.
pub struct Link {
    tx: LinkSender,
    rx: LinkReceiver,
}

impl Link {
    fn new(connection: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream, endpoint: quinn::Endpoint) -> Self {
        Self {
            tx: LinkSender { connection, send, endpoint: endpoint.clone() },
            rx: LinkReceiver { recv, decoder: Decoder::default(), _endpoint: endpoint },
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.tx.connection.remote_address()
    }

    /// The certificate the peer presented (one of those pinned), if the handshake
    /// kept it.
    pub fn peer_certificate(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        let any = self.tx.connection.peer_identity()?;
        let chain = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
        chain.first().cloned()
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        self.tx.send(frame).await
    }

    /// The next frame; `None` once the peer has finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Frame>, TransportError> {
        self.rx.recv().await
    }

    /// Ends the connection at once, telling the peer why.
    pub fn close(&self, why: &str) {
        self.tx.close(why);
    }

    /// Splits the link so one task can send while another receives.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.tx, self.rx)
    }
}

/// The sending half of a [`Link`].
pub struct LinkSender {
    connection: quinn::Connection,
    send: quinn::SendStream,
    /// Keeps the endpoint (and its socket) alive as long as either half.
    endpoint: quinn::Endpoint,
}

impl LinkSender {
    /// The connection's heartbeat channel, for a task of its own.
    pub fn pulse(&self) -> Pulse {
        Pulse { connection: self.connection.clone() }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        self.send_encoded(frame::encode_shared(frame)?).await
    }

    /// Sends a frame already encoded (with its header), handing QUIC the bytes
    /// themselves rather than a copy.
    pub async fn send_encoded(&mut self, bytes: bytes::Bytes) -> Result<(), TransportError> {
        self.send.write_chunk(bytes).await?;
        // With windows this large a write rarely waits, so an epoch of many frames
        // would go out in one poll; QUIC's own task (acknowledgements, heartbeats) and
        // the reader get their turn between frames instead.
        tokio::task::yield_now().await;
        Ok(())
    }

    pub fn close(&self, why: &str) {
        self.connection.close(0u32.into(), why.as_bytes());
    }

    /// QUIC's own view of the path (round trip, congestion window, losses), for logs.
    pub fn path_stats(&self) -> quinn::PathStats {
        self.connection.stats().path
    }

    /// Sends an encoded frame with one byte of its body flipped after the checksum was
    /// computed, as a fault on the wire would: for tests of the receiver's checks.
    pub async fn send_corrupted(&mut self, encoded: &[u8]) -> Result<(), TransportError> {
        let mut bytes = encoded.to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// Ends the stream in order: the peer reads what was sent, then its end.
    pub fn end_stream(&mut self) {
        let _ = self.send.finish();
    }

    /// Closes the connection saying `why`, and gives the close up to `grace` to reach
    /// the peer before this process may end.
    pub async fn close_and_flush(self, why: &str, grace: std::time::Duration) {
        self.connection.close(0u32.into(), why.as_bytes());
        let _ = tokio::time::timeout(grace, self.endpoint.wait_idle()).await;
    }

    /// Ends the stream in order and gives the peer up to `grace` to receive what was
    /// sent (a refusal, a goodbye) before the connection closes, which says `why`;
    /// true if the peer received it all, or closed the connection saying
    /// [`GOODBYE_RECEIVED`].
    pub async fn finish(mut self, grace: std::time::Duration, why: &str) -> bool {
        let _ = self.send.finish();
        let received = match tokio::time::timeout(grace, self.send.stopped()).await {
            Ok(Ok(None)) => true,
            Ok(Err(quinn::StoppedError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close)))) => {
                close.reason.as_ref() == GOODBYE_RECEIVED.as_bytes()
            }
            _ => false,
        };
        let _ = tokio::time::timeout(grace, self.connection.closed()).await;
        self.connection.close(0u32.into(), why.as_bytes());
        received
    }
}

/// Heartbeats, and the evidence that the peer is alive, apart from the frame stream: a
/// heartbeat queued behind a large epoch would reach the peer only after the epoch,
/// which on a slow link takes longer than the timeout.
#[derive(Clone)]
pub struct Pulse {
    connection: quinn::Connection,
}

impl Pulse {
    /// Sends `frame` (a heartbeat) as a datagram: unreliable, so a lost one is simply
    /// not there, as a late one would not be either.
    pub fn send(&self, frame: &Frame) -> Result<(), TransportError> {
        let bytes = frame::encode(frame)?;
        self.connection.send_datagram(bytes.into()).map_err(|e| match e {
            quinn::SendDatagramError::ConnectionLost(e) => TransportError::Connection(e),
            other => TransportError::Heartbeat(other.to_string()),
        })
    }

    /// Beats every `interval` for as long as the connection lasts, at the generation
    /// `current` returns (`None`: not now, as before the handshake); returns why a
    /// beat could not be sent.
    pub async fn beat(&self, interval: std::time::Duration, mut current: impl FnMut() -> Option<u64>) -> TransportError {
        let mut tick = tokio::time::interval(interval);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            if let Some(generation) = current() {
                seq += 1;
                tracing::trace!(seq, "heartbeat out");
                if let Err(e) = self.send(&Frame { generation, message: tandem_proto::message::Message::Heartbeat { seq } }) {
                    return e;
                }
            }
        }
    }

    /// The next datagram frame from the peer.
    pub async fn recv(&self) -> Result<Frame, TransportError> {
        let bytes = self.connection.read_datagram().await?;
        let mut decoder = Decoder::default();
        decoder.push(&bytes);
        match decoder.next_frame()? {
            Some(frame) if decoder.is_empty() => Ok(frame),
            _ => Err(ProtoError::Invalid("a datagram that is not exactly one frame".into()).into()),
        }
    }

    /// How many UDP datagrams this connection has received: any packet from the peer
    /// (an acknowledgement of this side's data included) shows its host and process are
    /// alive, however far behind its frames are.
    pub fn packets_in(&self) -> u64 {
        self.connection.stats().udp_rx.datagrams
    }
}

/// The receiving half of a [`Link`].
pub struct LinkReceiver {
    recv: quinn::RecvStream,
    decoder: Decoder,
    _endpoint: quinn::Endpoint,
}

impl LinkReceiver {
    /// The next frame; `None` once the peer has finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Frame>, TransportError> {
        Ok(self.recv_checked().await?.map(|r| r.frame))
    }

    /// [`LinkReceiver::recv`], with what checking the frame learnt (see
    /// [`Standby::handle_received`](tandem_proto::standby::Standby::handle_received)).
    pub async fn recv_checked(&mut self) -> Result<Option<Received>, TransportError> {
        // Frames already buffered would otherwise be handed out without a pause, and a
        // backlog of them checked in one poll, while QUIC's own task waits to
        // acknowledge the packets and read the heartbeats behind them.
        tokio::task::yield_now().await;
        loop {
            if let Some(received) = self.decoder.next_received()? {
                return Ok(Some(received));
            }
            match self.recv.read_chunk(1 << 20, true).await? {
                Some(chunk) => self.decoder.push_shared(chunk.bytes),
                None => return Ok(None),
            }
        }
    }
}

/// Reports, at debug level, each time this thread's runtime was kept from running its
/// tasks for a while: a blocked network thread stops acknowledging and beating, which
/// the peer takes for this host's death.
pub async fn watch_stalls(side: &'static str) {
    const TICK: std::time::Duration = std::time::Duration::from_millis(50);
    loop {
        let due = std::time::Instant::now() + TICK;
        let cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
        tokio::time::sleep(TICK).await;
        let late = due.elapsed();
        if late > std::time::Duration::from_millis(250) {
            // Busy (this thread ran something long) or starved (it was not scheduled).
            let busy_ms = (cpu_time(libc::CLOCK_THREAD_CPUTIME_ID) - cpu).as_millis() as u64;
            tracing::debug!(side, late_ms = late.as_millis() as u64, busy_ms, "the network thread was held up");
        }
    }
}

/// CPU time used so far, by this thread or this process as `clock` says
/// (CLOCK_THREAD_CPUTIME_ID, CLOCK_PROCESS_CPUTIME_ID).
pub(crate) fn cpu_time(clock: libc::clockid_t) -> std::time::Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `t` is, and keeps no pointer.
    unsafe { libc::clock_gettime(clock, &mut t) };
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The standby's listening endpoint.
pub struct Listener {
    endpoint: quinn::Endpoint,
}

impl Listener {
    pub fn bind(addr: SocketAddr, tls: rustls::ServerConfig) -> Result<Self, TransportError> {
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport_config(addr.ip().is_loopback()));
        let endpoint = endpoint(addr, Some(config))?;
        Ok(Self { endpoint })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|source| TransportError::Bind { addr: ([0, 0, 0, 0], 0).into(), source })
    }

    /// The next peer that completes the TLS handshake (presenting the pinned
    /// certificate) and opens its stream.
    pub async fn accept(&self) -> Result<Link, TransportError> {
        let incoming = self.endpoint.accept().await.ok_or(TransportError::Closed)?;
        let connection = incoming.await?;
        let (send, recv) = connection.accept_bi().await?;
        Ok(Link::new(connection, send, recv, self.endpoint.clone()))
    }
}

/// What a standby closes the connection with once it has read the primary's goodbye.
pub const GOODBYE_RECEIVED: &str = "goodbye received";

/// How long one attempt to reach the standby may take: on a LAN a QUIC handshake takes
/// a millisecond, and the caller tries again.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl TransportError {
    /// Whether the peer closed the connection to say it received a goodbye.
    pub fn is_goodbye_received(&self) -> bool {
        matches!(self, Self::Connection(quinn::ConnectionError::ApplicationClosed(c)) if c.reason.as_ref() == GOODBYE_RECEIVED.as_bytes())
    }

    /// Whether the peer turned this side's certificate down, or presented one that is
    /// not the pinned one: trying again cannot help. Under TLS 1.3 the client's
    /// handshake is done before the server has checked the client's certificate, so
    /// the server's refusal reaches the client only later, as the end of an
    /// established connection.
    pub fn tls_refusal(&self) -> Option<TlsRefusal> {
        match self {
            Self::Connect { tls, .. } => tls.clone(),
            Self::Connection(e) => tls_failure(e),
            _ => None,
        }
    }
}

/// Connects to the standby at `addr`; the stream is open once this returns, and the
/// standby sees it with the first frame sent.
pub async fn connect(addr: SocketAddr, tls: rustls::ClientConfig) -> Result<Link, TransportError> {
    let (connection, endpoint) = dial(addr, tls).await?;
    let (send, recv) = connection.open_bi().await?;
    Ok(Link::new(connection, send, recv, endpoint))
}

/// A connection to `addr` with this transport's settings, and the endpoint it lives on.
async fn dial(addr: SocketAddr, tls: rustls::ClientConfig) -> Result<(quinn::Connection, quinn::Endpoint), TransportError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let local: SocketAddr = if addr.is_ipv6() { ([0u16; 8], 0).into() } else { ([0, 0, 0, 0], 0).into() };
    let mut endpoint = endpoint(local, None)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(addr.ip().is_loopback()));
    endpoint.set_default_client_config(config);
    let failed = |why: String| TransportError::Connect { addr, why, tls: None };
    // The pinned certificate is the trust; the name is not checked.
    let connecting = endpoint.connect(addr, "tandem").map_err(|e| failed(e.to_string()))?;
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(done) => done.map_err(|e| TransportError::Connect { addr, why: e.to_string(), tls: tls_failure(&e) })?,
        Err(_) => return Err(failed("no answer".into())),
    };
    Ok((connection, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{self, CERT_FILE, KEY_FILE};
    use std::path::{Path, PathBuf};
    use tandem_proto::handshake::Identity;
    use tandem_proto::message::Role;

    fn keys(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-tls-{}-{name}", std::process::id()));
        tls::keygen(&dir).unwrap();
        dir
    }

    fn server(own: &Path, peer: &Path) -> Listener {
        let tls = tls::server_config(tls::load_identity(&own.join(KEY_FILE)).unwrap(), tls::load_peer_cert(&peer.join(CERT_FILE)).unwrap()).unwrap();
        Listener::bind(([127, 0, 0, 1], 0).into(), tls).unwrap()
    }

    fn client(own: &Path, peer: &Path) -> rustls::ClientConfig {
        tls::client_config(tls::load_identity(&own.join(KEY_FILE)).unwrap(), tls::load_peer_cert(&peer.join(CERT_FILE)).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn pinned_peers_exchange_frames() {
        let (a, b) = (keys("a1"), keys("b1"));
        let listener = server(&b, &a);
        let addr = listener.local_addr().unwrap();
        let hello = Identity { role: Role::Primary, fingerprint: 1, generation: 1 }.hello();
        let sent = hello.clone();
        let standby = tokio::spawn(async move {
            let mut link = listener.accept().await.unwrap();
            let got = link.recv().await.unwrap().unwrap();
            link.send(&got).await.unwrap();
            // Stay until the primary has read it and gone.
            let _ = link.recv().await;
            got
        });
        let mut link = connect(addr, client(&a, &b)).await.unwrap();
        link.send(&sent).await.unwrap();
        assert_eq!(link.recv().await.unwrap().unwrap(), hello);
        link.close("done");
        assert_eq!(standby.await.unwrap(), hello);
    }

    #[tokio::test]
    async fn a_heartbeat_overtakes_an_epoch_in_flight() {
        let (a, b) = (keys("a3"), keys("b3"));
        let listener = server(&b, &a);
        let addr = listener.local_addr().unwrap();
        let beat = Frame { generation: 1, message: tandem_proto::message::Message::Heartbeat { seq: 7 } };
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let standby = tokio::spawn(async move {
            let link = listener.accept().await.unwrap();
            let (_tx, rx) = link.split();
            let pulse = _tx.pulse();
            // The stream is not read at all: the epoch waits unread ahead of the beat,
            // and its packets, counted as they come, are signs of life.
            let counted = tokio::time::timeout(std::time::Duration::from_secs(20), async {
                while pulse.packets_in() <= 100 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(counted.is_ok(), "the epoch's packets count as signs of life");
            let _ = arrived_tx.send(());
            let got = tokio::time::timeout(std::time::Duration::from_secs(20), pulse.recv()).await;
            drop(rx);
            got
        });
        let link = connect(addr, client(&a, &b)).await.unwrap();
        let (mut tx, _rx) = link.split();
        let page = Frame {
            generation: 1,
            message: tandem_proto::message::Message::Pages {
                epoch: 1,
                addresses: (0..512).collect(),
                compression: tandem_proto::message::Compression::None,
                data: vec![0x5a; 512 * 4096].into(),
            },
        };
        let pulse = tx.pulse();
        let sender = tokio::spawn(async move {
            for _ in 0..20 {
                tx.send(&page).await.unwrap();
            }
            tx
        });
        // Some of the epoch is on its way before the beat goes.
        arrived.await.unwrap();
        pulse.send(&beat).unwrap();
        let got = standby.await.unwrap().expect("the heartbeat waited behind the epoch").unwrap();
        assert_eq!(got, beat);
        drop(sender);
    }

    #[tokio::test]
    async fn a_peer_with_another_certificate_is_refused_both_ways() {
        let (a, b, stranger) = (keys("a2"), keys("b2"), keys("s2"));
        // The standby pins `a`, but a stranger connects.
        let listener = server(&b, &a);
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        let result = async {
            let mut link = connect(addr, client(&stranger, &b)).await?;
            link.send(&Identity { role: Role::Primary, fingerprint: 1, generation: 1 }.hello()).await?;
            link.recv().await
        }
        .await;
        // The refusal reaches the stranger with the standby's reason.
        let refused = result.expect_err("the stranger got through").tls_refusal().expect("a TLS refusal");
        assert!(refused.by_peer && refused.reason.contains("not the pinned"), "{refused:?}");
        let refused = accepting.await.unwrap().unwrap_err().tls_refusal().expect("a TLS refusal");
        assert!(!refused.by_peer && refused.reason.contains("not the pinned"), "{refused:?}");

        // The primary pins `b`, but a stranger listens there.
        let listener = server(&stranger, &a);
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        let err = connect(addr, client(&a, &b)).await.err().expect("connected to a stranger");
        let refused = err.tls_refusal().expect("a TLS refusal");
        assert!(!refused.by_peer && refused.reason.contains("not the pinned"), "{err}");
        let refused = accepting.await.unwrap().unwrap_err().tls_refusal().expect("a TLS refusal");
        assert!(refused.by_peer, "{refused:?}");
    }
}
