//! `tandem net-client`: the client of the network drill and tests. It holds one TCP
//! connection to the guest's numbered-request server (`tandem-work net`), sends request
//! N every interval, and checks every reply: the verdict is whether the connection
//! outlived what happened to the guest's host, with no reply lost, repeated, out of
//! order or wrong, and no reset; and the longest the client waited between replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Clone, Debug)]
pub struct NetClientArgs {
    /// The guest's server (host:port).
    #[arg(long, value_name = "ADDR")]
    pub to: SocketAddr,
    /// One request every MS.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub every_ms: u64,
    /// Send requests for this long.
    #[arg(long, default_value_t = 20, value_name = "S")]
    pub seconds: u64,
    /// After the last request, wait this long for the replies still due.
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub reply_timeout_s: u64,
    /// Instead: download the guest's /blob over HTTP from --to (port 80) and check its
    /// hash.
    #[arg(long)]
    pub download: bool,
}

/// The size of the guest's /blob (tandem-work blob --mib 8).
const BLOB_MIB: u64 = 8;

/// tandem-work's splitmix64 finaliser.
pub(crate) fn mix64(n: u64) -> u64 {
    let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the guest's server answers to request `n`.
pub fn reply(n: u64) -> String {
    format!("{n} {:016x}", mix64(n))
}

/// Sends `count` requests on one connection, each after the last one's reply: the
/// round-trip times.
pub fn round_trips(to: SocketAddr, count: u32) -> Result<Vec<Duration>> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(10)).with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut times = Vec::with_capacity(count as usize);
    let mut line = String::new();
    for n in 1..=u64::from(count) {
        let sent = Instant::now();
        writer.write_all(format!("{n}\n").as_bytes())?;
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim_end() != reply(n) {
            bail!("request {n} was answered {:?}", line.trim_end());
        }
        times.push(sent.elapsed());
    }
    Ok(times)
}

/// Downloads the guest's blob over HTTP; returns its SHA-256 and how long it took.
pub fn download(to: SocketAddr) -> Result<(String, Duration)> {
    let began = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"GET /blob HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).context("reading the download")?;
    let body = all.windows(4).position(|w| w == b"\r\n\r\n").map(|i| &all[i + 4..]).context("no HTTP header in the download")?;
    Ok((sha256(body), began.elapsed()))
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of what `tandem-work blob` writes, computed here.
pub fn blob_sha256() -> String {
    let words = BLOB_MIB * 1024 * 1024 / 8;
    let bytes: Vec<u8> = (0..words).flat_map(|i| mix64(i).to_le_bytes()).collect();
    sha256(&bytes)
}


/// How the replies compare with the requests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub repeated: u64,
    pub out_of_order: u64,
    pub wrong: u64,
    /// The connection ended (reset, or closed) before every reply came.
    pub broken: Option<String>,
    /// The longest wait between two replies.
    pub gap: Duration,
}

impl Verdict {
    pub fn kept(&self) -> bool {
        self.lost == 0 && self.repeated == 0 && self.out_of_order == 0 && self.wrong == 0 && self.broken.is_none()
    }

    /// Judges `replies` (each line with when it came) against requests 1..=sent.
    pub fn of(sent: u64, replies: &[(String, Instant)], broken: Option<String>) -> Self {
        let mut v = Verdict { sent, answered: replies.len() as u64, broken, ..Verdict::default() };
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for (line, _) in replies {
            let n: u64 = line.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            if *line != reply(n) || n == 0 || n > sent {
                v.wrong += 1;
                continue;
            }
            if !seen.insert(n) {
                v.repeated += 1;
            } else if n != last + 1 {
                v.out_of_order += 1;
            }
            last = last.max(n);
        }
        v.lost = sent - seen.len() as u64;
        v.gap = replies.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default();
        v
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection={} sent={} answered={} lost={} repeated={} out_of_order={} wrong={} max_gap_ms={}{}",
            if self.kept() { "kept" } else { "BROKEN" },
            self.sent,
            self.answered,
            self.lost,
            self.repeated,
            self.out_of_order,
            self.wrong,
            self.gap.as_millis(),
            self.broken.as_deref().map(|b| format!(" ended: {b}")).unwrap_or_default()
        )
    }
}

/// Holds the connection for `args.seconds`, then judges it.
pub fn hold(args: &NetClientArgs) -> Result<Verdict> {
    if args.every_ms == 0 {
        bail!("--every-ms must be at least 1");
    }
    // A connection made after a kill waits out the takeover in its handshake: the gap
    // counts from here.
    let connecting = Instant::now();
    let stream = TcpStream::connect_timeout(&args.to, Duration::from_secs(30)).with_context(|| format!("connecting to {}", args.to))?;
    stream.set_nodelay(true)?;
    let reader = BufReader::new(stream.try_clone()?);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in reader.lines() {
            let end = line.is_err();
            if tx.send(line.map(|l| (l, Instant::now()))).is_err() || end {
                return;
            }
        }
        let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection")));
    });
    let mut writer = stream;
    let (mut replies, mut broken) = (Vec::new(), None);
    let start = Instant::now();
    let mut sent = 0;
    let collect = |until: Instant, replies: &mut Vec<(String, Instant)>, broken: &mut Option<String>| loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Ok(reply)) => replies.push(reply),
            Ok(Err(e)) => {
                *broken = Some(e.to_string());
                return;
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return,
        }
    };
    while broken.is_none() && start.elapsed() < Duration::from_secs(args.seconds) {
        sent += 1;
        if let Err(e) = writer.write_all(format!("{sent}\n").as_bytes()) {
            broken = Some(e.to_string());
            break;
        }
        collect(start + Duration::from_millis(sent * args.every_ms), &mut replies, &mut broken);
    }
    let deadline = Instant::now() + Duration::from_secs(args.reply_timeout_s);
    while broken.is_none() && (replies.len() as u64) < sent && Instant::now() < deadline {
        collect((Instant::now() + Duration::from_millis(100)).min(deadline), &mut replies, &mut broken);
    }
    let mut verdict = Verdict::of(sent, &replies, broken);
    if let Some((_, first)) = replies.first() {
        verdict.gap = verdict.gap.max(*first - connecting);
    }
    Ok(verdict)
}

pub fn run(args: &NetClientArgs) -> Result<u8> {
    if args.download {
        let (hash, took) = download(args.to)?;
        let whole = hash == blob_sha256();
        println!("net-client: download={} seconds={:.1}{}", if whole { "whole" } else { "WRONG" }, took.as_secs_f64(), if whole { String::new() } else { format!(" sha256={hash}") });
        return Ok(if whole { 0 } else { 1 });
    }
    let verdict = hold(args)?;
    println!("net-client: {verdict}");
    Ok(if verdict.kept() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_judged_one_by_one() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let r = |n: u64, ms: u64| (reply(n), at(ms));
        let v = Verdict::of(3, &[r(1, 0), r(2, 50), r(3, 400)], None);
        assert!(v.kept(), "{v}");
        assert_eq!(v.gap, Duration::from_millis(350));
        let v = Verdict::of(4, &[r(1, 0), r(3, 50), r(2, 60), r(3, 70), ("4 0".into(), at(80))], None);
        // 3 came before 2, and 2 after 3: both out of their place.
        assert_eq!((v.lost, v.repeated, v.out_of_order, v.wrong), (1, 1, 2, 1), "{v}");
        let v = Verdict::of(2, &[r(1, 0), r(2, 1)], Some("reset".into()));
        assert!(!v.kept());
        assert_eq!(reply(1), "1 910a2dec89025cc1");
    }

    #[test]
    fn the_blob_hash_is_the_guests() {
        // What `tandem-work blob --mib 8 | sha256sum` printed in the lab.
        assert_eq!(blob_sha256(), "476b47ea0a054241a97dd829c6aaf2f71927325a8c4fc8777c5456cc7a519049");
    }
}
