//! Kernel and initrd loading through the 64-bit boot protocol.
//!
//! Images are ELF (`vmlinux`, or the built-in probe) or bzImage. A bzImage is
//! best booted by its payload: the kernel's own ELF `vmlinux`, compressed
//! inside it. Its decompressor runs in the guest and is very slow on nested
//! hosts, so when the payload is lz4 or gzip we unpack it here and boot the
//! ELF with the bzImage's setup header. Other payloads enter the bzImage's
//! 64-bit entry and let the kernel decompress itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::HIMEM_START;

/// Errors loading guest images. All are the user's input being unusable.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an x86-64 ELF kernel nor a bzImage")]
    UnknownFormat { path: PathBuf },
    #[error("{path} needs {needed_mib} MiB of guest memory, more than --memory {memory_mib}")]
    TooSmall {
        path: PathBuf,
        needed_mib: u64,
        memory_mib: u64,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("initrd {path} ({size} bytes) does not fit below the kernel's initrd limit in --memory {memory_mib} MiB")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
}

/// How the kernel image was recognised and booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Elf,
    /// A bzImage booted through the ELF payload we unpacked.
    BzImagePayload,
    /// A bzImage entered at its 64-bit entry (the kernel decompresses).
    BzImage,
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub kind: ImageKind,
    pub entry: u64,
    pub header: Option<setup_header>,
}

/// Where a kernel image comes from.
pub enum KernelSource<'a> {
    /// An image in memory (the built-in probe), with a name for messages.
    Embedded {
        name: &'a str,
        bytes: &'a [u8],
    },
    File(&'a Path),
}

impl KernelSource<'_> {
    fn name(&self) -> PathBuf {
        match self {
            KernelSource::Embedded { name, .. } => PathBuf::from(name),
            KernelSource::File(p) => p.to_path_buf(),
        }
    }
}

const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_OFFSET: usize = 0x202;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

fn read_all(source: &KernelSource) -> Result<Vec<u8>, LoadError> {
    match source {
        KernelSource::Embedded { bytes, .. } => Ok(bytes.to_vec()),
        KernelSource::File(path) => std::fs::read(path).map_err(|source| LoadError::Read {
            what: "kernel",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads a kernel image into guest memory of `mem_size` bytes.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    source: KernelSource,
) -> Result<LoadedKernel, LoadError> {
    let path = source.name();
    let image = read_all(&source)?;
    let invalid = |reason: String| LoadError::Invalid {
        path: path.clone(),
        reason,
    };
    let too_small = |end: u64| LoadError::TooSmall {
        path: path.clone(),
        needed_mib: end.div_ceil(1 << 20) + 1,
        memory_mib: mem_size >> 20,
    };

    // An ELF image, checked against the memory size before it is copied in.
    let load_checked_elf = |elf: &[u8], kind: ImageKind, header: Option<setup_header>| {
        let end = elf_extent(elf).map_err(&invalid)?;
        if end >= mem_size {
            return Err(too_small(end));
        }
        let entry = load_elf(mem, elf).map_err(&invalid)?;
        Ok(LoadedKernel {
            kind,
            entry,
            header,
        })
    };

    if is_elf(&image) {
        return load_checked_elf(&image, ImageKind::Elf, None);
    }
    if !is_bzimage(&image) {
        return Err(LoadError::UnknownFormat { path });
    }

    let header = read_setup_header(&image);
    let (code32_start, init_size) = (header.code32_start, header.init_size);
    if let Some(vmlinux) = unpack_payload(&image, &header).map_err(&invalid)? {
        if is_elf(&vmlinux) {
            return load_checked_elf(&vmlinux, ImageKind::BzImagePayload, Some(header));
        }
    }
    // The kernel decompresses itself in place: it needs init_size bytes from
    // its load address.
    let end = u64::from(code32_start) + u64::from(init_size);
    if end >= mem_size {
        return Err(too_small(end));
    }
    let mut file = memfd_with(&image).map_err(|e| invalid(e.to_string()))?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| invalid(e.to_string()))?;
    Ok(LoadedKernel {
        kind: ImageKind::BzImage,
        entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        header: loaded.setup_header,
    })
}

fn is_elf(image: &[u8]) -> bool {
    image.len() >= 64 && &image[..4] == ELF_MAGIC
}

fn is_bzimage(image: &[u8]) -> bool {
    image.len() > HDRS_OFFSET + 4 && &image[HDRS_OFFSET..HDRS_OFFSET + 4] == b"HdrS"
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The end of the highest loadable segment, checking the image is an
/// x86-64 ELF executable along the way.
fn elf_extent(image: &[u8]) -> Result<u64, String> {
    if image[4] != ELF_CLASS_64 || u16_at(image, 18) != Some(EM_X86_64) {
        return Err("not a 64-bit x86-64 ELF image".into());
    }
    let bad = || "truncated ELF program headers".to_string();
    let phoff = u64_at(image, 32).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(image, 54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(image, 56).ok_or_else(bad)?);
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        if u32_at(image, ph).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        let paddr = u64_at(image, ph + 24).ok_or_else(bad)?;
        let memsz = u64_at(image, ph + 40).ok_or_else(bad)?;
        end = end.max(paddr.checked_add(memsz).ok_or_else(bad)?);
    }
    if end == 0 {
        return Err("ELF image has no loadable segment".into());
    }
    Ok(end)
}

fn load_elf(mem: &GuestMemoryMmap, image: &[u8]) -> Result<u64, String> {
    let mut file = memfd_with(image).map_err(|e| e.to_string())?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| e.to_string())?;
    Ok(loaded.kernel_load.0)
}

/// An anonymous file holding `bytes`: the loaders read from files.
fn memfd_with(bytes: &[u8]) -> std::io::Result<File> {
    let name = c"vmm-image";
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd
    // is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

fn read_setup_header(image: &[u8]) -> setup_header {
    let mut header = setup_header::default();
    let len = std::mem::size_of::<setup_header>();
    let bytes = vm_memory::ByteValued::as_mut_slice(&mut header);
    let avail = image.len().saturating_sub(SETUP_HEADER_OFFSET).min(len);
    bytes[..avail].copy_from_slice(&image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + avail]);
    header
}

/// The decompressed payload of a bzImage, when it is compressed in a format
/// we unpack (lz4 legacy frames, gzip). `Ok(None)` for other formats.
fn unpack_payload(image: &[u8], header: &setup_header) -> Result<Option<Vec<u8>>, String> {
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, length) = (header.payload_offset, header.payload_length);
    let start = (setup_sects + 1) * 512 + offset as usize;
    let Some(payload) = image.get(start..start + length as usize) else {
        return Err("bzImage payload lies outside the file".into());
    };
    match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload).map(Some),
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip payload: {e}"))?;
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

/// Decodes lz4's legacy frame format (`lz4 -l`, used by the kernel): a magic
/// number, then blocks of at most 8 MiB each preceded by their compressed
/// size. The kernel appends the decompressed size as a 4-byte trailer.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let mut out = Vec::new();
    let mut at = 4;
    while data.len() - at > 4 {
        let size = u32_at(data, at).ok_or("lz4: truncated block size")?;
        at += 4;
        if size == MAGIC {
            continue; // a concatenated stream starts
        }
        let block = data
            .get(at..at + size as usize)
            .ok_or("lz4: block runs past the payload")?;
        let start = out.len();
        out.resize(start + BLOCK_MAX, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| format!("lz4: {e}"))?;
        out.truncate(start + n);
        at += size as usize;
    }
    if let Some(expected) = u32_at(data, at) {
        if expected as usize != out.len() {
            return Err(format!(
                "lz4: payload unpacked to {} bytes, header says {expected}",
                out.len()
            ));
        }
    }
    Ok(out)
}

/// Loads an initrd as high as the kernel allows; returns where it went.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    initrd_addr_max: u32,
) -> Result<crate::arch::boot_params::InitrdPlacement, LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let too_large = || LoadError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        memory_mib: mem_size >> 20,
    };
    let address = crate::arch::boot_params::initrd_address(mem_size, size, initrd_addr_max)
        .ok_or_else(too_large)?;
    mem.write_slice(&data, GuestAddress(address))
        .map_err(|_| too_large())?;
    Ok(crate::arch::boot_params::InitrdPlacement { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_round_trip_with_size_trailer() {
        let original: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let block = lz4_flex::block::compress(&original);
        let mut frame = vec![0x02, 0x21, 0x4c, 0x18];
        frame.extend_from_slice(&(block.len() as u32).to_le_bytes());
        frame.extend_from_slice(&block);
        frame.extend_from_slice(&(original.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy(&frame).unwrap(), original);
        // A wrong trailer is caught.
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert!(lz4_legacy(&frame).is_err());
    }

    #[test]
    fn formats_are_told_apart() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        assert!(is_elf(&elf) && !is_bzimage(&elf));
        let mut bz = vec![0u8; 0x300];
        bz[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&bz) && !is_elf(&bz));
        elf[4] = 1; // 32-bit class
        assert!(elf_extent(&elf).is_err());
    }
}
