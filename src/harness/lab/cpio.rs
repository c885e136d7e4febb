//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Linux accepts several archives back to back, so the lab appends one of these, built
//! fresh per run (the tandem binary changes on every build), to the cached base image.

use std::io::{self, Write};

/// Builds an archive in memory; directories are added on demand, parents first.
#[derive(Default)]
pub struct Archive {
    buf: Vec<u8>,
    dirs: std::collections::BTreeSet<String>,
    ino: u32,
}

const DIR_MODE: u32 = 0o040_755;

impl Archive {
    fn header(&mut self, name: &str, mode: u32, size: usize) {
        self.ino += 1;
        let fields = [
            self.ino, mode, 0, 0, 1, 0, size as u32, 0, 0, 0, 0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn ensure_parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let dir = prefix.clone();
                self.header(&dir, DIR_MODE, 0);
            }
        }
    }

    /// Adds a regular file at `path` (absolute inside the archive) with `mode` bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        self.ensure_parents(path);
        self.header(path, 0o100_000 | (mode & 0o7777), data.len());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Finishes the archive and writes it out.
    pub fn finish(mut self, out: &mut impl Write) -> io::Result<()> {
        self.header("TRAILER!!!", 0, 0);
        out.write_all(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut a = Archive::default();
        a.file("/lab/run", 0o755, b"#!/bin/sh\n");
        a.file("/lab/other", 0o644, b"x");
        let mut out = Vec::new();
        a.finish(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let dir = text.find("lab\0").unwrap();
        let file = text.find("lab/run\0").unwrap();
        assert!(dir < file);
        assert_eq!(text.matches("lab\0").count(), 1, "directory added once");
        assert!(text.contains("TRAILER!!!"));
        assert!(out.starts_with(b"070701"));
    }
}
