//! The control channel of a running VM: a Unix socket, one command line per connection,
//! one reply line back. Commands are executed by the thread that owns the VM (see
//! `run::supervise`), so the VM never has two masters.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_vmm::vcpu::Waker;

/// Longest command line accepted; anything longer is refused unread.
const MAX_COMMAND: u64 = 4096;

/// A command and where its reply goes.
pub struct Request {
    pub line: String,
    pub reply: Sender<String>,
}

/// A listening control socket; the file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    pub requests: Receiver<Request>,
    /// Nudges the VM's thread when a request comes, so it answers at once rather than
    /// at its next timer.
    waker: Arc<Mutex<Option<Waker>>>,
}

impl ControlSocket {
    /// Requests from now on wake the thread that waits on `waker`'s VM.
    pub fn wake_with(&self, waker: Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the control socket at `path`, usable by its owner only (mode 0600).
pub fn listen(path: &Path) -> Result<ControlSocket> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("control socket {} is in use by another VM", path.display());
        }
        // Left behind by a VM that was killed: nobody answers on it.
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot create control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    let (tx, requests) = channel();
    let waker: Arc<Mutex<Option<Waker>>> = Arc::default();
    let wake = waker.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &tx, &wake);
            }
        })
        .context("starting the control thread")?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
        requests,
        waker,
    })
}

fn serve(stream: UnixStream, to_vm: &Sender<Request>, waker: &Mutex<Option<Waker>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_COMMAND));
    let reply = match reader.read_line(&mut line) {
        Ok(_) if line.ends_with('\n') => {
            let (tx, rx) = channel();
            let request = Request {
                line: line.trim().to_string(),
                reply: tx,
            };
            let sent = to_vm.send(request).ok();
            if let Some(waker) = waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                waker.wake();
            }
            match sent.and_then(|()| rx.recv().ok()) {
                Some(reply) => reply,
                None => "error: the VM has stopped".into(),
            }
        }
        _ => "error: expected one command line".into(),
    };
    let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
}

/// `tandem ctl`: sends one command and returns the reply; an `error: ...` reply is an Err.
pub fn send(path: &Path, words: &[String]) -> Result<String> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the VM's control socket {}", path.display()))?;
    stream.write_all(format!("{}\n", words.join(" ")).as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream.take(1 << 16)).read_line(&mut reply)?;
    let reply = reply.trim_end().to_string();
    match reply.strip_prefix("error: ") {
        Some(why) => bail!("{why}"),
        None if reply.is_empty() => bail!("the VM closed the control connection without a reply"),
        None => Ok(reply),
    }
}
