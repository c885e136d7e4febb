//! The host side of a guest's disk: what the operator names on the command line
//! (`--disk PATH[,readonly]`) and the raw image file behind it, opened, checked and
//! locked before any guest runs, so that bad input is one line and two tandem
//! processes never write one image.
//!
//! The image is read and written through the page cache, not O_DIRECT: the guest's
//! flush becomes an `fdatasync`, which is the durability the guest asks for, and the
//! page cache lets a capture read back the blocks an epoch wrote without a disk read
//! (see `docs/design.md`, "The disk").

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// The guest's sector.
pub const SECTOR: u64 = 512;
/// The unit of dirty tracking and replication: a page, so that disk blocks travel as
/// pages do.
pub const BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("malformed --disk {0:?}: expected PATH or PATH,readonly")]
    Malformed(String),
    #[error("disk image {0}: no such file")]
    Missing(PathBuf),
    #[error("disk image {0} is a directory, not an image file")]
    Directory(PathBuf),
    #[error("disk image {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("disk image {0} cannot be opened for writing ({1}); add ,readonly to use it read-only")]
    NotWritable(PathBuf, io::Error),
    #[error("disk image {0}: {1}")]
    Open(PathBuf, io::Error),
    #[error("disk image {0} is {1} bytes, not a whole number of 512-byte sectors")]
    Size(PathBuf, u64),
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    #[error("disk image {0} is in use by another process (it holds the image's lock)")]
    Locked(PathBuf),
    #[error("the disk image {0} is given twice")]
    Twice(PathBuf),
}

/// One disk as the operator asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = DiskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, readonly) = match s.rsplit_once(',') {
            Some((path, "readonly")) => (path, true),
            Some(_) => return Err(DiskError::Malformed(s.to_string())),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(DiskError::Malformed(s.to_string()));
        }
        Ok(Self { path: PathBuf::from(path), readonly })
    }
}

impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.path.display(), if self.readonly { ",readonly" } else { "" })
    }
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    size: u64,
    readonly: bool,
}

impl DiskImage {
    pub fn open(config: &DiskConfig) -> Result<Self, DiskError> {
        let path = config.path.clone();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DiskError::Missing(path)),
            Err(e) => return Err(DiskError::Open(path, e)),
        };
        if meta.is_dir() {
            return Err(DiskError::Directory(path));
        }
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path));
        }
        let file = match OpenOptions::new().read(true).write(!config.readonly).open(&path) {
            Ok(file) => file,
            Err(e) if !config.readonly && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM)) => {
                return Err(DiskError::NotWritable(path, e))
            }
            Err(e) => return Err(DiskError::Open(path, e)),
        };
        let size = meta.len();
        if size == 0 {
            return Err(DiskError::Empty(path));
        }
        if size % SECTOR != 0 {
            return Err(DiskError::Size(path, size));
        }
        // Shared for a read-only disk, exclusive for a writable one: readers may share
        // an image, but no one reads or writes one another process writes.
        let how = if config.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock { DiskError::Locked(path) } else { DiskError::Open(path, e) });
        }
        Ok(Self { path, file, size, readonly: config.readonly })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes, a whole number of sectors.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Blocks, the last one possibly short.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Block `block` into `buf` (a block long), zeros past the image's end.
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let offset = block * BLOCK;
        let len = (self.size.saturating_sub(offset)).min(BLOCK) as usize;
        self.read_at(&mut buf[..len], offset)?;
        buf[len..].fill(0);
        Ok(())
    }

    /// Writes block `block` from `buf` (a block long), leaving out what lies past the
    /// image's end, which a disk of a size that is no whole number of blocks has.
    pub fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        let offset = block * BLOCK;
        let len = (self.size.saturating_sub(offset)).min(BLOCK) as usize;
        self.write_at(&buf[..len], offset)
    }

    /// Makes `len` bytes from `offset` zeros by punching a hole: no writes, and the
    /// space goes back to the host's file system.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (offset, len) = (i64::try_from(offset).map_err(io::Error::other)?, i64::try_from(len).map_err(io::Error::other)?);
        // SAFETY: fallocate on a descriptor this image owns; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // A file system without holes: write the zeros.
        let zeros = vec![0u8; BLOCK as usize];
        let (mut at, end) = (offset as u64, (offset + len) as u64);
        while at < end {
            let n = (end - at).min(BLOCK) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the whole image zeros, keeping its size, without writing them: a full
    /// copy then writes only the blocks that are not.
    pub fn zero(&self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(self.size)
    }

    /// Puts what was written on stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Where disk blocks live among a capture's pages: far above any guest memory, each
/// disk a 2^48-byte span of its own. A capture lists the blocks an epoch wrote there,
/// and every step pages take (zero pages as markers, compression, pages the standby
/// already holds left out, the epoch applied whole or not at all) carries them too.
pub const DISK_SPACE: u64 = 1 << 56;
const DISK_SPAN_BITS: u32 = 48;

/// The page address of block `block` of disk `disk`.
pub fn page_of(disk: usize, block: u64) -> u64 {
    DISK_SPACE | ((disk as u64) << DISK_SPAN_BITS) | (block * BLOCK)
}

/// The disk and block a page address names, if it names one.
pub fn locate(address: u64) -> Option<(usize, u64)> {
    if address < DISK_SPACE || address % BLOCK != 0 {
        return None;
    }
    let disk = ((address - DISK_SPACE) >> DISK_SPAN_BITS) as usize;
    Some((disk, (address & ((1 << DISK_SPAN_BITS) - 1)) / BLOCK))
}

/// A VM's disks, shared between the devices that serve the guest and whatever lays
/// captured blocks down on them (a restore, a standby's image).
#[derive(Clone, Debug, Default)]
pub struct DiskSet(pub Vec<Arc<DiskImage>>);

impl DiskSet {
    /// Whether `address` is a block of one of these disks.
    pub fn holds(&self, address: u64) -> bool {
        locate(address).is_some_and(|(d, b)| self.0.get(d).is_some_and(|disk| b < disk.blocks()))
    }

    /// Writes the page at `address`, a block of one of these disks.
    pub fn write_page(&self, address: u64, page: &[u8]) -> io::Result<()> {
        let (disk, block) = locate(address).filter(|_| self.holds(address)).ok_or_else(|| io::Error::other(format!("page {address:#x} is no block of this VM's disks")))?;
        self.0[disk].write_block(block, page)
    }

    /// Makes every disk zeros: a full capture's blocks are then written over them.
    pub fn zero(&self) -> io::Result<()> {
        self.0.iter().try_for_each(|d| d.zero())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.0.iter().try_for_each(|d| d.sync())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn sizes(&self) -> Vec<u64> {
        self.0.iter().map(|d| d.size()).collect()
    }
}

/// Refuses an image given twice.
pub fn check_distinct(disks: &[DiskConfig]) -> Result<(), DiskError> {
    for (i, d) in disks.iter().enumerate() {
        let same = |o: &DiskConfig| match (std::fs::canonicalize(&o.path), std::fs::canonicalize(&d.path)) {
            (Ok(a), Ok(b)) => a == b,
            _ => o.path == d.path,
        };
        if disks[..i].iter().any(same) {
            return Err(DiskError::Twice(d.path.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(tag: &str, len: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("tandem-disk-{tag}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        path
    }

    fn open(path: &Path, readonly: bool) -> Result<DiskImage, DiskError> {
        DiskImage::open(&DiskConfig { path: path.to_path_buf(), readonly })
    }

    #[test]
    fn blocks_have_page_addresses_of_their_own() {
        assert_eq!(locate(page_of(0, 0)), Some((0, 0)));
        assert_eq!(locate(page_of(3, 12345)), Some((3, 12345)));
        assert_eq!(locate(0x1000), None, "guest memory");
        assert_eq!(locate(page_of(1, 1) + 512), None, "off a block's start");
        let path = image("set", 3 * 4096);
        let set = DiskSet(vec![Arc::new(open(&path, false).unwrap())]);
        assert!(set.holds(page_of(0, 2)) && !set.holds(page_of(0, 3)) && !set.holds(page_of(1, 0)));
        set.write_page(page_of(0, 2), &[9u8; 4096]).unwrap();
        assert!(set.write_page(page_of(0, 3), &[9u8; 4096]).is_err());
        assert_eq!(std::fs::read(&path).unwrap()[2 * 4096], 9);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn the_flag_parses_and_prints_back() {
        assert_eq!("a.img".parse::<DiskConfig>().unwrap(), DiskConfig { path: "a.img".into(), readonly: false });
        assert_eq!("a,b.img,readonly".parse::<DiskConfig>().unwrap().to_string(), "a,b.img,readonly");
        assert!(matches!("a.img,rw".parse::<DiskConfig>(), Err(DiskError::Malformed(_))));
        assert!(matches!(",readonly".parse::<DiskConfig>(), Err(DiskError::Malformed(_))));
    }

    #[test]
    fn bad_images_are_refused_by_what_is_wrong() {
        let dir = std::env::temp_dir();
        assert!(matches!(open(&dir.join("tandem-no-such-disk"), false), Err(DiskError::Missing(_))));
        assert!(matches!(open(&dir, false), Err(DiskError::Directory(_))));
        let odd = image("odd", 1000);
        assert!(matches!(open(&odd, false), Err(DiskError::Size(_, 1000))));
        let empty = image("empty", 0);
        assert!(matches!(open(&empty, false), Err(DiskError::Empty(_))));
        let _ = std::fs::remove_file(odd);
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn a_writable_image_is_locked_against_every_other_opener() {
        let path = image("lock", 8192);
        let first = open(&path, false).unwrap();
        assert!(matches!(open(&path, false), Err(DiskError::Locked(_))));
        assert!(matches!(open(&path, true), Err(DiskError::Locked(_))));
        drop(first);
        let reader = open(&path, true).unwrap();
        let second_reader = open(&path, true).unwrap();
        assert!(matches!(open(&path, false), Err(DiskError::Locked(_))));
        drop((reader, second_reader));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn blocks_past_a_short_end_read_as_zeros_and_are_not_written() {
        let path = image("short", 4096 + 512);
        let disk = open(&path, false).unwrap();
        assert_eq!(disk.blocks(), 2);
        disk.write_block(1, &[7u8; 4096]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096 + 512);
        let mut buf = [1u8; 4096];
        disk.read_block(1, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 7) && buf[512..].iter().all(|&b| b == 0));
        disk.zero().unwrap();
        disk.read_block(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(path);
    }
}
