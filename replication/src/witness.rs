//! The witness (`tandem witness`) and the hosts' handle on it. The rule is
//! [`tandem_proto::witness`]'s; here are its record on disk, its server, and the thread
//! a primary or standby asks it through without blocking the VM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tandem_proto::witness::{Answer, Arbiter, Ask, Record, Refusal};

use crate::events::{Event, Events};
use crate::transport::{self, witness as wire, TransportError};

const FILE: &str = "witness";

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot use the witness's state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a witness record (generation=N holder=HEX): {text:?}")]
    Corrupt { path: PathBuf, text: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot start the witness's network thread: {0}")]
    Thread(std::io::Error),
}

/// The record in `dir`, `None` for a witness that has decided nothing yet.
pub fn read_record(dir: &Path) -> Result<Option<Record>, WitnessError> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Record::parse(&text).map(Some).ok_or_else(|| WitnessError::Corrupt { path, text: text.chars().take(60).collect() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(WitnessError::Io { path, source }),
    }
}

/// Records `record` in `dir` durably (see [`crate::durable::write`]).
pub fn write_record(dir: &Path, record: &Record) -> Result<(), WitnessError> {
    crate::durable::write(dir, FILE, record.to_text().as_bytes()).map_err(|source| WitnessError::Io { path: dir.to_path_buf(), source })
}

/// A host as the witness names it: the first 8 bytes of its certificate's SHA-256.
pub fn host_id(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub tls: rustls::ServerConfig,
    pub state_dir: PathBuf,
    pub lease: Duration,
    pub events: Events,
}

/// Runs the witness until the process ends. Each decision that changes the record is
/// on disk before its answer leaves.
pub fn serve(config: ServeConfig) -> Result<(), WitnessError> {
    let record = read_record(&config.state_dir)?;
    let start = Instant::now();
    match &record {
        Some(r) => tracing::info!(
            "witness on {}: generation {} held by {}; granting nothing for {} ms (a lease given before a restart may still run)",
            config.listen,
            r.generation,
            r.holder,
            config.lease.as_millis()
        ),
        None => tracing::info!("witness on {}: a new witness, nothing decided yet", config.listen),
    }
    config.events.emit(Event::WitnessStarted {
        generation: record.as_ref().map_or(0, |r| r.generation),
        holder: record.as_ref().map(|r| r.holder.clone()).unwrap_or_default(),
        quiet_ms: if record.is_some() { config.lease.as_millis() as u64 } else { 0 },
    });
    let mut arbiter = Arbiter::new(record, Duration::ZERO, config.lease);
    let (dir, events) = (config.state_dir.clone(), config.events.clone());
    let decide = move |ask: &Ask, cert: &CertificateDer<'static>| -> Answer {
        let host = host_id(cert);
        let before = arbiter.clone();
        let decision = arbiter.handle(ask, &host, start.elapsed());
        let answer = match decision.persist.map(|r| write_record(&dir, &r)) {
            Some(Err(e)) => {
                tracing::error!("{e}: refusing, and the decision is undone");
                arbiter = before;
                Answer::Refused(Refusal::Storage(e.to_string()))
            }
            _ => decision.answer,
        };
        tracing::info!(host, ?ask, ?answer, "witness decision");
        events.emit(Event::WitnessAnswered { host, ask: format!("{ask:?}"), answer: format!("{answer:?}") });
        answer
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WitnessError::Thread)?;
    let listener = {
        let _inside = runtime.enter();
        transport::Listener::bind(config.listen, config.tls)?
    };
    runtime.block_on(wire::serve(listener, Arc::new(Mutex::new(decide))));
    Ok(())
}

/// Where a host finds its witness.
#[derive(Clone)]
pub struct WitnessLink {
    pub addr: SocketAddr,
    pub tls: rustls::ClientConfig,
}

/// Asks the witness one question and waits for its answer (for `tandem witness
/// status`; the hosts ask through a [`WitnessClient`]).
pub fn ask_once(link: &WitnessLink, question: Ask) -> Result<Answer, WitnessError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(WitnessError::Thread)?;
    Ok(runtime.block_on(wire::ask(link.addr, link.tls.clone(), question))?)
}

/// One question's outcome: `asked` is when it went out (a lease counts from then).
pub struct Reply {
    pub asked: Instant,
    pub answer: Result<Answer, String>,
}

/// A thread that asks the witness, one question at a time and the answers in order, so
/// that the VM thread and the standby's loop never wait on the network: each answer
/// comes with a call of `answered`, which wakes whoever waits for it. Whether a
/// question is on its way is the role's to know (`tandem_proto::role`).
pub struct WitnessClient {
    asks: Sender<Ask>,
    replies: Receiver<Reply>,
}

impl WitnessClient {
    pub fn start(link: WitnessLink, answered: Box<dyn Fn() + Send>) -> Result<Self, WitnessError> {
        let (asks, questions) = channel::<Ask>();
        let (answers, replies) = channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(WitnessError::Thread)?;
        std::thread::Builder::new()
            .name("tandem-witness".into())
            .spawn(move || {
                while let Ok(question) = questions.recv() {
                    let asked = Instant::now();
                    let answer = runtime
                        .block_on(wire::ask(link.addr, link.tls.clone(), question))
                        .map_err(|e| e.to_string());
                    if answers.send(Reply { asked, answer }).is_err() {
                        return;
                    }
                    answered();
                }
            })
            .map_err(WitnessError::Thread)?;
        Ok(Self { asks, replies })
    }

    pub fn ask(&self, question: Ask) {
        // The thread ends only with this client: a send cannot fail while it lives.
        let _ = self.asks.send(question);
    }

    /// The next answer, if one has come.
    pub fn reply(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}
