//! Loading a Linux kernel, its initramfs and command line, and describing memory to it.
//!
//! Both kernel formats go through linux-loader: a bzImage is entered at its 64-bit
//! entry with a zero page, an ELF vmlinux through PVH when it carries the PVH note
//! (otherwise at its ELF entry, like a bzImage).

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use super::regs::EntryMode;
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)")]
    NotAKernel(String),
    #[error("cannot load kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("kernel {0} has no 64-bit entry point (needs boot protocol 2.12+ with XLF_KERNEL_64)")]
    No64BitEntry(String),
    #[error("guest memory ({mem_mib} MiB) is too small for {what}: {need_mib} MiB needed below {limit_mib} MiB")]
    TooSmall {
        mem_mib: u64,
        what: &'static str,
        need_mib: u64,
        limit_mib: u64,
    },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("cannot write {what} to guest memory: {source}")]
    Write {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// What the boot CPU needs to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub mode: EntryMode,
    pub entry: u64,
}

/// x86 boot protocol constants.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const XLF_KERNEL_64: u16 = 1;
/// 64-bit entry of a bzImage, relative to where its protected-mode part is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default highest address an initramfs may end at, for kernels that don't say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

const MIB: u64 = 1 << 20;

fn open(what: &'static str, path: &Path) -> Result<File, LoadError> {
    File::open(path).map_err(|source| LoadError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> LoadError {
    move |source| LoadError::Write { what, source }
}

/// The e820 map: low RAM, the reserved EBDA/BIOS area (MP and ACPI tables live there),
/// RAM from 1 MiB, and RAM above the MMIO gap if there is any.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// End of the RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
}

/// Loads `kernel` (and `initrd`) into `mem`, writes `cmdline` and the boot parameters, and
/// returns how to enter the kernel. `rsdp` is where the ACPI RSDP was written, if anywhere.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<GuestAddress>,
) -> Result<LoadedKernel, LoadError> {
    let kernel_name = kernel.display().to_string();
    let mut file = open("kernel", kernel)?;
    let mem_mib = (mem.iter().map(|r| r.len()).sum::<u64>()) / MIB;
    let low_end = low_ram_end(mem);

    // Refuse a kernel that cannot fit before loading it: linux-loader would otherwise
    // report a bare "guest memory error" from halfway through the copy.
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if HIMEM_START + file_len > low_end {
        return Err(LoadError::TooSmall {
            mem_mib,
            what: "the kernel",
            need_mib: (HIMEM_START + file_len).div_ceil(MIB),
            limit_mib: low_end / MIB,
        });
    }

    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut file, &mut magic)
        .map_err(|_| LoadError::NotAKernel(kernel_name.clone()))?;
    std::io::Seek::rewind(&mut file).map_err(|source| LoadError::Open {
        what: "kernel",
        path: kernel_name.clone(),
        source,
    })?;

    let (loaded, header, kernel_end) = if magic == *b"\x7fELF" {
        let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| classify(e, &kernel_name))?;
        let loaded = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => LoadedKernel {
                mode: EntryMode::Pvh,
                entry: addr.raw_value(),
            },
            _ => LoadedKernel {
                mode: EntryMode::Linux64,
                entry: result.kernel_load.raw_value(),
            },
        };
        (loaded, None, result.kernel_end)
    } else {
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| classify(e, &kernel_name))?;
        let header = result.setup_header.ok_or_else(|| LoadError::NotAKernel(kernel_name.clone()))?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LoadError::No64BitEntry(kernel_name));
        }
        // The decompressor needs `init_size` bytes from the load address to unpack into.
        let kernel_end = result.kernel_load.raw_value() + u64::from(header.init_size).max(result.kernel_end - result.kernel_load.raw_value());
        let loaded = LoadedKernel {
            mode: EntryMode::Linux64,
            entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
        };
        (loaded, Some(header), kernel_end)
    };
    if kernel_end > low_end {
        return Err(LoadError::TooSmall {
            mem_mib,
            what: "the unpacked kernel",
            need_mib: kernel_end.div_ceil(MIB),
            limit_mib: low_end / MIB,
        });
    }

    let initrd_range = match initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, header.as_ref(), mem_mib)?),
        None => None,
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.len() as u32 + 1;

    match loaded.mode {
        EntryMode::Linux64 => write_zero_page(mem, header, cmdline_len, initrd_range, rsdp)?,
        EntryMode::Pvh => write_pvh_info(mem, initrd_range, rsdp)?,
    }
    Ok(loaded)
}

fn classify(e: loader::Error, kernel: &str) -> LoadError {
    match e {
        loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)
        | loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)
        | loader::Error::Elf(loader::elf::Error::ReadElfHeader) => LoadError::NotAKernel(kernel.to_string()),
        other => LoadError::Kernel {
            path: kernel.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Places the initramfs as high as the kernel allows (below the gap and `initrd_addr_max`),
/// page aligned, and checks it stays clear of the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
    mem_mib: u64,
) -> Result<(u64, u64), LoadError> {
    let mut file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| LoadError::Open {
            what: "initrd",
            path: path.display().to_string(),
            source,
        })?
        .len();
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = low_ram_end(mem).min(addr_max + 1);
    let start = top.saturating_sub(size) & !(crate::memory::PAGE_SIZE - 1);
    if size > top || start < kernel_end {
        return Err(LoadError::TooSmall {
            mem_mib,
            what: "kernel and initrd",
            need_mib: (kernel_end + size).div_ceil(MIB),
            limit_mib: top / MIB,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(write_err("initrd"))?;
    Ok((start, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<(), LoadError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((start, size)) = initrd {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let map = e820_map(mem);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(write_err("zero page"))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<(), LoadError> {
    let map = e820_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + i as u64 * 24))
            .map_err(write_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.map(|a| a.raw_value()).unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((start, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: start,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ram(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::memory::ram_ranges(mib * MIB)).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("tandem-loader-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn e820_reserves_the_bios_area() {
        let map = e820_map(&ram(64));
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, 64 * MIB - HIMEM_START, E820_RAM));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_named_in_the_error() {
        let path = temp_file("junk", &[0x42; 8192]);
        let err = load_linux(&ram(32), &path, None, "console=ttyS0", None).unwrap_err();
        assert!(matches!(err, LoadError::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("is not a Linux kernel"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_kernel_is_a_clear_error() {
        let err = load_linux(&ram(32), Path::new("/nonexistent/vmlinuz"), None, "", None).unwrap_err();
        assert!(err.to_string().starts_with("cannot open kernel /nonexistent/vmlinuz"), "{err}");
    }

    #[test]
    fn a_kernel_larger_than_memory_is_refused_before_loading() {
        let path = temp_file("huge", &vec![0u8; 20 * MIB as usize]);
        let err = load_linux(&ram(16), &path, None, "", None).unwrap_err();
        assert!(matches!(err, LoadError::TooSmall { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
