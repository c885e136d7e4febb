//! Just enough of QEMU's QMP (JSON over a Unix socket) to drive a migration and read
//! its timings, for the benchmarks' side-by-side runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct Qmp {
    path: std::path::PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once QEMU has created the socket (within `limit`), and leaves
    /// capabilities negotiation so commands can be sent.
    pub fn connect(path: &Path, limit: Duration) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > limit => {
                    return Err(e).with_context(|| format!("QMP socket {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        qmp.read_message().context("QMP greeting")?;
        qmp.request("qmp_capabilities", &json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    /// Runs one command and returns its `return` value; events in between are skipped.
    /// QEMU 7.2 in the lab now and then resets a QMP connection in the middle of a
    /// migration (the VM carries on); the command is then sent once more on a new one.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        match self.request(command, &arguments) {
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => {
                eprintln!("QMP connection lost during {command} ({e}); reconnecting");
                *self = Self::connect(&self.path.clone(), Duration::from_secs(10))?;
                self.request(command, &arguments)
            }
            other => other,
        }
        .with_context(|| format!("QMP {command}"))
    }

    fn request(&mut self, command: &str, arguments: &Value) -> Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let mut reply = self.read_message()?;
            if let Some(v) = reply.get_mut("return") {
                return Ok(v.take());
            }
            if let Some(e) = reply.get("error") {
                bail!("{}", e["desc"].as_str().unwrap_or("error"));
            }
        }
    }
}
