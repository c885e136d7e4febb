//! `tandem net-client`: the client of the network drill and tests. It holds one TCP
//! connection to the guest's numbered-request server (`tandem-work net`), sends request
//! N every interval, and checks every reply: the verdict is whether the connection
//! outlived what happened to the guest's host, with no reply lost, repeated, out of
//! order or wrong, and no reset; and the longest the client waited between replies.

use std::io::{BufRead, BufReader, Write};
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
}

/// What the guest's server answers to request `n`: tandem-work's splitmix64 finaliser.
pub fn reply(n: u64) -> String {
    let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{n} {:016x}", x ^ (x >> 31))
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
    let stream = TcpStream::connect_timeout(&args.to, Duration::from_secs(10)).with_context(|| format!("connecting to {}", args.to))?;
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
    Ok(Verdict::of(sent, &replies, broken))
}

pub fn run(args: &NetClientArgs) -> Result<u8> {
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
}
