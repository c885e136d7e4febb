//! `tandem bench encoding`: what each way of putting pages on the wire costs and saves,
//! on synthetic mixes and on the memory of real guests (snapshots), beside the cipher
//! every byte sent goes through twice (AES-128-GCM, sealed on the primary and opened on
//! the standby) and memcpy, measured in the same run.
//!
//! A codec pays when the CPU it spends compressing and decompressing a page is less
//! than the cipher time it saves on both hosts: the `cost` column adds the three, per
//! page, so the cheapest row is the one to send with. In the lab the cipher runs about
//! 150 times slower than natively (docs/lab.md) and the compressors about 10 times, so
//! the answer can differ between the two; both are ratios of one run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use tandem_proto::epoch::EpochHasher;
use tandem_proto::message::{MAX_BATCH_PAGES, PAGE_SIZE};
use tandem_proto::pages::{is_zero, BatchEncoder};
use tandem_replication::pipeline::{region, Mix};

use super::{in_the_lab_sh, read_snapshots, snapshots_then};

#[derive(clap::Args, Clone)]
pub struct EncodingArgs {
    /// Size of each synthetic mix, in MiB.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Also measure the memory held by this tandem snapshot (repeatable).
    #[arg(long = "snapshot", value_name = "FILE")]
    snapshots: Vec<PathBuf>,
    /// Measure, inside the lab, the memory of a Linux guest snapshotted once booted
    /// and once more while its dirty workload runs (as well as the synthetic mixes).
    #[arg(long)]
    lab: bool,
}

/// Codecs tried on the non-zero pages of each batch.
#[derive(Clone, Copy)]
enum Codec {
    Lz4,
    Zstd(i32),
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::Lz4 => "LZ4 (lz4_flex)".into(),
            Codec::Zstd(level) => format!("zstd level {level}"),
        }
    }
}

const CODECS: [Codec; 3] = [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)];

pub fn run(args: &EncodingArgs) -> Result<()> {
    if args.mib == 0 || args.mib > 4096 {
        bail!("--mib must be 1..=4096");
    }
    if args.lab {
        return via_lab(args);
    }
    let snapshots = read_snapshots(&args.snapshots)?;
    let cipher = cipher_mb_per_s()?;
    let memcpy = memcpy_mb_per_s();
    println!("peers, this run: AES-128-GCM {cipher:.0} MB/s (one core; each byte sent is sealed once and opened once); memcpy {memcpy:.0} MB/s");
    let crc = page_pass_mb_per_s(|page| u64::from(crc32fast::hash(page)));
    let xxh3 = page_pass_mb_per_s(|page| xxhash_rust::xxh3::xxh3_128(page) as u64);
    println!("and the primary's passes over each dirty page, a page at a time: CRC-32 {crc:.0} MB/s (frames, the epoch's checksum), XXH3-128 {xxh3:.0} MB/s (what the standby holds)\n");
    for mix in Mix::ALL {
        table(mix.describe(), &region(args.mib, mix), cipher)?;
    }
    for (path, snapshot) in snapshots {
        table(&format!("guest memory from {}", path.display()), &snapshot.data, cipher)?;
    }
    Ok(())
}

/// Boots the test guest in the lab, snapshots it booted and busy, and measures both
/// there, with the synthetic mixes for scale.
fn via_lab(args: &EncodingArgs) -> Result<()> {
    let then = format!("tandem bench encoding --mib {} --snapshot booted.snap --snapshot busy.snap", args.mib);
    let script = snapshots_then(&[("booted", 1), ("busy", 12)], &then);
    in_the_lab_sh(&script, Duration::from_secs(900))
}

/// One mix's table: tandem's encoding as sent, then each codec over the batches'
/// non-zero pages.
fn table(what: &str, memory: &[u8], cipher: f64) -> Result<()> {
    let pages = memory.len() / PAGE_SIZE;
    if pages == 0 {
        bail!("{what}: no pages");
    }
    let batches: Vec<&[u8]> = memory[..pages * PAGE_SIZE].chunks(MAX_BATCH_PAGES * PAGE_SIZE).collect();
    // The non-zero pages of each batch in one piece, as the encoder gathers them.
    let dense: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| b.chunks_exact(PAGE_SIZE).filter(|p| !is_zero(p)).flatten().copied().collect())
        .collect();
    let nonzero: usize = dense.iter().map(|d| d.len() / PAGE_SIZE).sum();
    println!(
        "{what}: {pages} pages, {nonzero} not all zeros ({:.1}%); zero pages go as 8-byte markers",
        100.0 * nonzero as f64 / pages as f64
    );
    println!("{:<28} {:>7} {:>13} {:>15} {:>12} {:>12}", "encoding of non-zero pages", "ratio", "compress MB/s", "decompress MB/s", "wire B/page", "cost us/page");
    let per_page = |wire: f64, work: Duration| {
        // Wire bytes sealed on one host and opened on the other, plus the codec's work,
        // per page of the mix (zero pages included).
        (work.as_secs_f64() * 1e6 + 2.0 * wire / cipher) / pages as f64
    };
    let raw = nonzero * PAGE_SIZE;
    // Every page's address goes with it, zero or not.
    let markers = pages * 8;
    let raw_wire = (raw + markers) as f64;
    println!(
        "{:<28} {:>7.3} {:>13} {:>15} {:>12.0} {:>12.3}",
        "none (raw)", 1.0, "-", "-", raw_wire / pages as f64, per_page(raw_wire, Duration::ZERO)
    );

    // tandem as it sends today: BatchEncoder's own choice per batch (LZ4 when it pays),
    // with both checksums in its time (raw pages go into frames without a copy).
    let shared = bytes::Bytes::copy_from_slice(&memory[..pages * PAGE_SIZE]);
    let start = Instant::now();
    let mut wire = 0usize;
    for (i, b) in batches.iter().enumerate() {
        let addresses: Vec<u64> = (0..b.len() / PAGE_SIZE).map(|p| ((i * MAX_BATCH_PAGES + p) * PAGE_SIZE) as u64).collect();
        let mut encoder = BatchEncoder::new(1, 1, true);
        let from = i * MAX_BATCH_PAGES * PAGE_SIZE;
        encoder.batch(&addresses, &shared.slice(from..from + b.len()), None, &mut EpochHasher::new(1))?;
        wire += encoder.wire;
    }
    let took = start.elapsed();
    println!(
        "{:<28} {:>7} {:>13} {:>15} {:>12.0} {:>12.3}",
        "tandem's encoder, as sent", "-", "-", "-", wire as f64 / pages as f64, per_page(wire as f64, took)
    );

    for codec in CODECS {
        let (packed, compress, decompress) = measure(codec, &dense)?;
        let wire = (packed + markers) as f64;
        println!(
            "{:<28} {:>7.3} {:>13.0} {:>15.0} {:>12.0} {:>12.3}",
            codec.name(),
            packed as f64 / raw.max(1) as f64,
            mb_per_s(raw, compress),
            mb_per_s(raw, decompress),
            wire / pages as f64,
            per_page(wire, compress + decompress)
        );
    }
    println!();
    Ok(())
}

/// Compresses every batch, then decompresses each and checks it: the bytes out and
/// the time each way.
fn measure(codec: Codec, batches: &[Vec<u8>]) -> Result<(usize, Duration, Duration)> {
    let mut packed: Vec<Vec<u8>> = Vec::with_capacity(batches.len());
    let start = Instant::now();
    match codec {
        Codec::Lz4 => packed.extend(batches.iter().map(|b| lz4_flex::block::compress(b))),
        Codec::Zstd(level) => {
            let mut c = zstd::bulk::Compressor::new(level)?;
            for b in batches {
                packed.push(c.compress(b)?);
            }
        }
    }
    let compress = start.elapsed();
    let mut out = vec![0u8; MAX_BATCH_PAGES * PAGE_SIZE];
    let start = Instant::now();
    let mut d = zstd::bulk::Decompressor::new()?;
    for (p, b) in packed.iter().zip(batches) {
        let n = match codec {
            Codec::Lz4 => lz4_flex::block::decompress_into(p, &mut out[..b.len()]).context("LZ4 did not decode its own output")?,
            Codec::Zstd(_) => d.decompress_to_buffer(p, &mut out[..b.len()])?,
        };
        if out[..n] != b[..] {
            bail!("{} did not give back what it was given", codec.name());
        }
    }
    let decompress = start.elapsed();
    Ok((packed.iter().map(Vec::len).sum(), compress, decompress))
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// AES-128-GCM sealing 64 KiB records, in MB/s, as QUIC's packets are sealed.
fn cipher_mb_per_s() -> Result<f64> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).map_err(|_| anyhow::anyhow!("no AES-128-GCM key"))?);
    let mut record = vec![0x5au8; 64 << 10];
    let (mut bytes, start) = (0usize, Instant::now());
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_le_bytes());
        n += 1;
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut record)
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let _ = std::hint::black_box(tag);
        bytes += record.len();
    }
    Ok(mb_per_s(bytes, start.elapsed()))
}

/// `pass` over 64 MiB of pages, 4 KiB at a time, in MB/s: more than the caches hold, as
/// an epoch's pages are read after their capture.
fn page_pass_mb_per_s(pass: impl Fn(&[u8]) -> u64) -> f64 {
    let pages = vec![0x5au8; 64 << 20];
    let start = Instant::now();
    for page in pages.chunks(4096) {
        std::hint::black_box(pass(std::hint::black_box(page)));
    }
    mb_per_s(pages.len(), start.elapsed())
}

fn memcpy_mb_per_s() -> f64 {
    let from = vec![1u8; 64 << 20];
    let mut to = vec![0u8; 64 << 20];
    to.copy_from_slice(&from); // faulted in first: the copy, not the kernel, is timed
    let start = Instant::now();
    for _ in 0..4 {
        std::hint::black_box(&mut to).copy_from_slice(std::hint::black_box(&from));
    }
    mb_per_s(4 * from.len(), start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_codec_gives_back_its_input_and_shrinks_only_what_can_shrink() {
        let batches = |mix| -> Vec<Vec<u8>> { region(4, mix).chunks(MAX_BATCH_PAGES * PAGE_SIZE).map(<[u8]>::to_vec).collect() };
        let (random, sparse) = (batches(Mix::Random), batches(Mix::Sparse));
        let raw = 4 << 20;
        for codec in CODECS {
            let (packed, ..) = measure(codec, &random).unwrap();
            assert!(packed >= raw, "{}: random pages to {packed} bytes", codec.name());
            let (packed, ..) = measure(codec, &sparse).unwrap();
            assert!(packed * 20 < raw, "{}: sparse pages to {packed} bytes", codec.name());
        }
    }
}
