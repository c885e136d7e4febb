//! The journal workload's disk, from the host's side: the empty images each host's VM
//! gets, and the check of what a disk holds once the guest is done. The guest
//! (`tandem-work journal`) writes record n at sector n; the same bytes are built
//! here, so a record on disk is whole or it is not.

use std::path::Path;

use anyhow::Result;

use super::net_client::mix64;

/// Each host's disk: room for the records and the rest of the sectors zeros.
pub const DISK_BYTES: u64 = 8 << 20;
const SECTOR: usize = 512;

/// A fresh disk of zeros (sparse).
pub fn make_disk(path: &Path) -> Result<()> {
    std::fs::File::create(path)?.set_len(DISK_BYTES)?;
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Record `n` as the guest writes it.
pub fn record(n: u64) -> Vec<u8> {
    let mut rec = Vec::with_capacity(SECTOR);
    rec.extend_from_slice(&0x4a44_4e54u64.to_le_bytes());
    rec.extend_from_slice(&n.to_le_bytes());
    for i in 2..SECTOR as u64 / 8 - 1 {
        rec.extend_from_slice(&mix64(n ^ i).to_le_bytes());
    }
    let hash = fnv1a(&rec);
    rec.extend_from_slice(&hash.to_le_bytes());
    rec
}

/// Whether the disk at `path` holds records 1..=`records`, each whole, and nothing
/// else: sector 0 and every sector after the last record zeros.
pub fn verify(path: &Path, records: u32) -> Result<String, String> {
    let disk = std::fs::read(path).map_err(|e| format!("reading the disk {}: {e}", path.display()))?;
    let sector = |i: usize| disk.get(i * SECTOR..(i + 1) * SECTOR).unwrap_or(&[]);
    let mut bad = Vec::new();
    for n in 1..=records as usize {
        if sector(n) != record(n as u64).as_slice() {
            bad.push(n);
        }
    }
    let stray = disk.chunks(SECTOR).enumerate().filter(|(i, s)| (*i == 0 || *i > records as usize) && s.iter().any(|&b| b != 0)).count();
    if bad.is_empty() && stray == 0 {
        return Ok(format!("the standby's disk holds records 1-{records}, each whole, and nothing else"));
    }
    Err(format!(
        "the standby's disk is wrong: {} of records 1-{records} missing or torn (first {:?}), {stray} stray sectors",
        bad.len(),
        bad.first()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_judged_record_by_record() {
        let path = std::env::temp_dir().join(format!("tandem-journal-check-{}", std::process::id()));
        make_disk(&path).unwrap();
        assert!(verify(&path, 0).is_ok(), "an empty journal");
        assert!(verify(&path, 3).is_err(), "records missing");
        let mut disk = std::fs::read(&path).unwrap();
        for n in 1..=3 {
            disk[n * SECTOR..(n + 1) * SECTOR].copy_from_slice(&record(n as u64));
        }
        std::fs::write(&path, &disk).unwrap();
        assert!(verify(&path, 3).is_ok());
        assert!(verify(&path, 2).is_err(), "a record past the end is stray");
        disk[2 * SECTOR + 100] ^= 1;
        std::fs::write(&path, &disk).unwrap();
        assert!(verify(&path, 3).unwrap_err().contains("first Some(2)"));
        let _ = std::fs::remove_file(path);
    }
}
