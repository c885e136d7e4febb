//! The console endpoint (`--console-listen`) and its client (`tandem console`).
//!
//! A primary serves the console as it releases it; a standby serves nothing until it
//! takes over, and then serves from where the console stood at its last committed
//! epoch. A client names both hosts, asks each for the bytes from its own offset on,
//! and so sees every released byte exactly once across a takeover, whatever the
//! moment of the failure (plain stdout cannot promise that: see README.md).
//!
//! On the wire (TCP): the client sends `TANDEM-CONSOLE 1 FROM <offset>\n`; the host
//! answers with records `kind u8 | offset u64 | length u32 | payload` (little-endian):
//! kind 0 output at `offset`, 1 the console ended at `offset`, 2 an error (payload: why),
//! 3 this host is not serving (a standby before any takeover).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_vmm::console_log::{self, ConsoleLog};

const HELLO: &str = "TANDEM-CONSOLE 1 FROM ";
const OUTPUT: u8 = 0;
const ENDED: u8 = 1;
const ERROR: u8 = 2;
const NOT_SERVING: u8 = 3;
/// Most bytes in one record.
const RECORD_BYTES: usize = 64 << 10;

/// Serves `log` on `addr` until the process ends.
pub fn serve(addr: SocketAddr, log: Arc<ConsoleLog>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen for console clients on {addr}"))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("tandem-console".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = log.clone();
            let _ = std::thread::Builder::new().name("tandem-console-client".into()).spawn(move || {
                if let Err(e) = client(stream, &log) {
                    tracing::debug!("a console client went: {e}");
                }
            });
        }
    })?;
    Ok(local)
}

fn record(out: &mut impl Write, kind: u8, offset: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 13];
    head[0] = kind;
    head[1..9].copy_from_slice(&offset.to_le_bytes());
    head[9..13].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out.write_all(&head)?;
    out.write_all(payload)?;
    out.flush()
}

fn client(stream: TcpStream, log: &ConsoleLog) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.set_nodelay(true);
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).take(128).read_line(&mut line)?;
    let mut out = stream;
    let Some(mut offset) = line.trim_end().strip_prefix(HELLO).and_then(|o| o.parse::<u64>().ok()) else {
        return record(&mut out, ERROR, 0, b"not a console request");
    };
    loop {
        match log.read(offset, RECORD_BYTES, Duration::from_secs(1)) {
            console_log::Read::Bytes { offset: at, bytes } => {
                record(&mut out, OUTPUT, at, &bytes)?;
                offset = at + bytes.len() as u64;
            }
            console_log::Read::Ended { end } => return record(&mut out, ENDED, end, b""),
            console_log::Read::Ahead { end } => {
                let why = format!("offset {offset} is past the end of this console's output ({end})");
                return record(&mut out, ERROR, end, why.as_bytes());
            }
            console_log::Read::Nothing if !log.is_live() => return record(&mut out, NOT_SERVING, 0, b""),
            // Nothing new: a record of no bytes shows the client this host still lives.
            console_log::Read::Nothing => record(&mut out, OUTPUT, offset, b"")?,
        }
    }
}

/// What a client did.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    /// The console ended at this offset.
    Ended(u64),
}

/// Follows the console at `hosts` from `from`, writing each byte once to `out` (and
/// calling `seen` with the offset after each write), moving to the next host whenever
/// one goes. Gives up when no host has served for `patience`.
pub fn follow(hosts: &[SocketAddr], from: u64, out: &mut dyn Write, patience: Duration, seen: &mut dyn FnMut(u64)) -> Result<Followed> {
    if hosts.is_empty() {
        bail!("no console host given");
    }
    let mut offset = from;
    let mut served = Instant::now();
    let mut last_error = String::from("no host answered");
    for host in hosts.iter().cycle() {
        if served.elapsed() > patience {
            bail!("no console host served for {} s (last: {last_error}); the console stopped at offset {offset}", patience.as_secs());
        }
        match session(*host, &mut offset, out, &mut served, seen) {
            Ok(Some(end)) => return Ok(Followed::Ended(end)),
            Ok(None) => last_error = format!("{host} is not serving (a standby)"),
            Err(Refusal::Fatal(why)) => bail!("{host}: {why}"),
            Err(Refusal::Io(e)) => last_error = format!("{host}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!("cycle() never ends")
}

enum Refusal {
    Io(std::io::Error),
    Fatal(String),
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// One host's session: `Some(end)` once the console ended, `None` if the host does not
/// serve.
fn session(host: SocketAddr, offset: &mut u64, out: &mut dyn Write, served: &mut Instant, seen: &mut dyn FnMut(u64)) -> Result<Option<u64>, Refusal> {
    let mut stream = TcpStream::connect_timeout(&host, Duration::from_millis(500))?;
    // The host sends a record at least every second while it lives.
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let _ = stream.set_nodelay(true);
    stream.write_all(format!("{HELLO}{offset}\n").as_bytes())?;
    let mut stream = BufReader::new(stream);
    loop {
        let mut head = [0u8; 13];
        stream.read_exact(&mut head)?;
        let at = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
        if len > RECORD_BYTES {
            return Err(Refusal::Fatal(format!("a record of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload)?;
        match head[0] {
            OUTPUT => {
                *served = Instant::now();
                if at > *offset {
                    return Err(Refusal::Fatal(format!(
                        "bytes {}..{at} of the console are no longer kept by this host: this client fell behind by more than it keeps",
                        *offset
                    )));
                }
                let end = at + len as u64;
                if end > *offset {
                    out.write_all(&payload[(*offset - at) as usize..]).map_err(Refusal::Io)?;
                    out.flush().map_err(Refusal::Io)?;
                    *offset = end;
                    seen(end);
                }
            }
            ENDED => return Ok(Some(at)),
            NOT_SERVING => return Ok(None),
            ERROR => return Err(Refusal::Fatal(String::from_utf8_lossy(&payload).into_owned())),
            other => return Err(Refusal::Fatal(format!("a record of unknown kind {other}"))),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ConsoleArgs {
    /// A host's console endpoint (its --console-listen), host:port; give the primary's
    /// and the standby's, in any order.
    #[arg(long = "host", value_name = "ADDR", required = true)]
    hosts: Vec<SocketAddr>,
    /// Start at this offset of the console's whole output (bytes since the guest
    /// started), as a client that saw that much resumes.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Give up when no host has served for this long.
    #[arg(long, default_value_t = 30, value_name = "S")]
    patience_s: u64,
}

/// `tandem console`: the guest's console, each byte once, across takeovers.
pub fn run(args: ConsoleArgs) -> Result<u8> {
    let mut out = std::io::stdout();
    let Followed::Ended(end) = follow(&args.hosts, args.from, &mut out, Duration::from_secs(args.patience_s), &mut |_| {})?;
    eprintln!("tandem console: the guest's console ended at offset {end}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_client_moves_to_the_standby_and_sees_each_byte_once() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // A primary that serves two lines and then dies, as a killed host does.
        let primary = TcpListener::bind(any).unwrap();
        let paddr = primary.local_addr().unwrap();
        let dying = std::thread::spawn(move || {
            let (mut stream, _) = primary.accept().unwrap();
            let mut line = String::new();
            BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line, format!("{HELLO}0\n"));
            record(&mut stream, OUTPUT, 0, b"tick 1\ntick 2\n").unwrap();
        });
        let standby = ConsoleLog::pending();
        let saddr = serve(any, standby.clone()).unwrap();
        let got = Shared::default();
        let reader = {
            let mut got = got.clone();
            std::thread::spawn(move || follow(&[paddr, saddr], 0, &mut got, Duration::from_secs(20), &mut |_| {}))
        };
        dying.join().unwrap();
        while got.0.lock().unwrap().len() < 14 {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The standby committed the primary's last release and a line more, which it
        // printed at the takeover as it could not know whether the primary had.
        std::thread::sleep(Duration::from_millis(200));
        standby.seed(7, b"tick 2\n");
        standby.append(b"tick 3\n");
        standby.close();
        assert_eq!(reader.join().unwrap().unwrap(), Followed::Ended(21));
        assert_eq!(&*got.0.lock().unwrap(), b"tick 1\ntick 2\ntick 3\n");
    }
}
