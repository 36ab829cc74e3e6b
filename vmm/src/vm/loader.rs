//! Kernel and initrd loading through the 64-bit boot protocol.
//!
//! Images are ELF (`vmlinux`, or the built-in probe) or bzImage. A bzImage is
//! best booted by its payload: the kernel's own ELF `vmlinux`, compressed
//! inside it. Its decompressor runs in the guest and is very slow on nested
//! hosts, so when the payload is lz4 or gzip we unpack it here and boot the
//! ELF with the bzImage's setup header. Other payloads enter the bzImage's
//! 64-bit entry and let the kernel decompress itself.
//!
//! Input files are hostile until checked: a kernel or initrd must be a
//! regular file (a FIFO, device or directory is refused before it is read,
//! so nothing here waits on a writer or reads an endless device) of at most
//! the guest's memory size; a payload may unpack to at most the guest's
//! memory size; and every kernel segment and the initrd must lie in guest
//! RAM, apart from each other and from the VMM's own boot structures
//! ([`layout::boot_structures`]). Each refusal is one line naming the file
//! and what is wrong (exit code 2).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{self, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
use crate::files::{self, FileError};

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
    #[error("{what} {path} is {kind}, not a regular file")]
    NotAFile {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {path} ({size}) does not fit in --memory {memory_mib} MiB")]
    FileTooLarge {
        what: &'static str,
        path: PathBuf,
        size: String,
        memory_mib: u64,
    },
    #[error("{path}: the bzImage payload unpacks to more than --memory {memory_mib} MiB can hold")]
    PayloadTooLarge { path: PathBuf, memory_mib: u64 },
    /// A placement conflict, described in full ("kernel X: ELF segment 1
    /// [a, b) overlaps the zero page [c, d)").
    #[error("{0}")]
    Overlap(String),
    #[error("stopped by signal {0} while loading the guest")]
    Signalled(i32),
}

/// Reads `path`, which must be a regular file of at most `max` bytes
/// ([`files::open_regular`], [`files::read_capped`]: checked before and
/// after the open, opened non-blocking, read to at most `max` bytes even if
/// it grows); with the opened file, kept by whoever needs to read it again
/// as it was.
pub fn read_regular_file(
    what: &'static str,
    path: &Path,
    max: u64,
) -> Result<(Vec<u8>, File), LoadError> {
    let error = |e| match e {
        FileError::Io(source) => LoadError::Read {
            what,
            path: path.to_path_buf(),
            source,
        },
        FileError::NotAFile(kind) => LoadError::NotAFile {
            what,
            path: path.to_path_buf(),
            kind,
        },
        FileError::TooLarge(size) => LoadError::FileTooLarge {
            what,
            path: path.to_path_buf(),
            size,
            memory_mib: max >> 20,
        },
    };
    let file = files::open_regular(path).map_err(error)?;
    let data = files::read_capped(&file, max).map_err(error)?;
    Ok((data, file))
}

/// A guest-physical range `[start, end)`, for messages.
fn range(start: u64, end: u64) -> String {
    format!("[{start:#x}, {end:#x})")
}

/// Whether `[start, end)` lies in the guest's RAM of `mem_size` bytes.
fn in_ram(mem_size: u64, start: u64, end: u64) -> bool {
    layout::ram_ranges(mem_size)
        .into_iter()
        .any(|(base, len)| start >= base && end <= base + len)
}

/// Checks that `regions` (named, `[start, end)`) lie in guest RAM, apart
/// from each other and from the VMM's boot structures.
fn check_placement(mem_size: u64, regions: &[(String, u64, u64)]) -> Result<(), LoadError> {
    for (what, start, end) in regions {
        if !in_ram(mem_size, *start, *end) {
            let hole = *end > MMIO_GAP_START && *start < MMIO_GAP_END;
            return Err(LoadError::Overlap(format!(
                "{what} {} {}",
                range(*start, *end),
                match hole {
                    true => format!(
                        "overlaps the MMIO hole {}",
                        range(MMIO_GAP_START, MMIO_GAP_END)
                    ),
                    false => format!("lies outside guest RAM (--memory {} MiB)", mem_size >> 20),
                }
            )));
        }
        for (name, s, e) in layout::boot_structures() {
            if *start < e && s < *end {
                return Err(LoadError::Overlap(format!(
                    "{what} {} overlaps {name} {}",
                    range(*start, *end),
                    range(s, e)
                )));
            }
        }
    }
    let mut sorted: Vec<&(String, u64, u64)> = regions.iter().collect();
    sorted.sort_by_key(|r| (r.1, r.2));
    for pair in sorted.windows(2) {
        let ((a, a_start, a_end), (b, b_start, b_end)) = (pair[0], pair[1]);
        if *b_start < *a_end {
            return Err(LoadError::Overlap(format!(
                "{a} {} overlaps {b} {}",
                range(*a_start, *a_end),
                range(*b_start, *b_end)
            )));
        }
    }
    Ok(())
}

/// How the kernel image was recognised and booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Elf,
    /// A 32-bit ELF with a Multiboot header, entered in protected mode.
    Multiboot,
    /// A bzImage booted through the ELF payload we unpacked.
    BzImagePayload,
    /// A bzImage entered at its 64-bit entry (the kernel decompresses).
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug)]
pub struct LoadedKernel {
    pub kind: ImageKind,
    pub entry: u64,
    pub header: Option<setup_header>,
    /// What it occupies in guest memory, named for messages ("kernel X:
    /// ELF segment 0"), `[start, end)`.
    pub regions: Vec<(String, u64, u64)>,
    /// The kernel file as it was opened and read (none for the built-in
    /// probe): the profiler reads its symbols from this, whatever the path
    /// names later.
    pub file: Option<File>,
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

fn read_all(source: &KernelSource, mem_size: u64) -> Result<(Vec<u8>, Option<File>), LoadError> {
    match source {
        KernelSource::Embedded { bytes, .. } => Ok((bytes.to_vec(), None)),
        // A kernel file larger than guest memory cannot be booted whatever
        // its format.
        KernelSource::File(path) => {
            read_regular_file("kernel", path, mem_size).map(|(image, file)| (image, Some(file)))
        }
    }
}

/// Loads a kernel image into guest memory of `mem_size` bytes.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    source: KernelSource,
) -> Result<LoadedKernel, LoadError> {
    let (image, file) = read_all(&source, mem_size)?;
    let mut loaded = load_image(mem, mem_size, &source, &image)?;
    loaded.file = file;
    Ok(loaded)
}

fn load_image(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    source: &KernelSource,
    image: &[u8],
) -> Result<LoadedKernel, LoadError> {
    let target = Target {
        mem,
        mem_size,
        path: source.name(),
    };
    if let Some(header) = super::multiboot::find_header(image) {
        return target.load_multiboot(image, &header);
    }
    if is_elf(image) {
        return target.load_checked_elf(image, ImageKind::Elf, None);
    }
    if !is_bzimage(image) {
        return Err(LoadError::UnknownFormat { path: target.path });
    }
    let header = read_setup_header(image);
    // The unpacked kernel must fit in guest memory: unpacking stops there.
    let unpacked = unpack_payload(image, &header, mem_size).map_err(|e| match e {
        Unpack::Invalid(reason) => target.invalid(reason),
        Unpack::TooLarge => LoadError::PayloadTooLarge {
            path: target.path.clone(),
            memory_mib: mem_size >> 20,
        },
        Unpack::Signalled(signal) => LoadError::Signalled(signal),
    })?;
    match unpacked {
        Some(vmlinux) if is_elf(&vmlinux) => {
            target.load_checked_elf(&vmlinux, ImageKind::BzImagePayload, Some(header))
        }
        _ => target.load_bzimage(image, &header),
    }
}

/// Where a kernel image goes: guest memory, its size, and the image's name
/// for errors.
struct Target<'a> {
    mem: &'a GuestMemoryMmap,
    mem_size: u64,
    path: PathBuf,
}

impl Target<'_> {
    fn invalid(&self, reason: String) -> LoadError {
        LoadError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }

    fn too_small(&self, end: u64) -> LoadError {
        LoadError::TooSmall {
            path: self.path.clone(),
            needed_mib: end.div_ceil(1 << 20) + 1,
            memory_mib: self.mem_size >> 20,
        }
    }

    /// An ELF image, its segments checked against guest memory, each other
    /// and the boot structures before it is copied in.
    fn load_checked_elf(
        &self,
        elf: &[u8],
        kind: ImageKind,
        header: Option<setup_header>,
    ) -> Result<LoadedKernel, LoadError> {
        let segments = elf_segments(elf).map_err(|e| self.invalid(e))?;
        let end = segments.iter().map(|s| s.1).max().unwrap_or(0);
        if end >= self.mem_size {
            return Err(self.too_small(end));
        }
        let what = match kind {
            ImageKind::Elf => "ELF segment",
            _ => "bzImage payload ELF segment",
        };
        let path = self.path.display();
        let regions: Vec<(String, u64, u64)> = segments
            .iter()
            .map(|&(index, start, end)| (format!("kernel {path}: {what} {index}"), start, end))
            .collect();
        check_placement(self.mem_size, &regions)?;
        let entry = load_elf(self.mem, elf).map_err(|e| self.invalid(e))?;
        Ok(LoadedKernel {
            kind,
            entry,
            header,
            regions,
            file: None,
        })
    }

    /// A Multiboot kernel: its 32-bit ELF segments, where it asked.
    fn load_multiboot(
        &self,
        image: &[u8],
        header: &super::multiboot::Header,
    ) -> Result<LoadedKernel, LoadError> {
        use super::multiboot;
        if let Some(why) = multiboot::unsupported(header) {
            return Err(self.invalid(format!("a Multiboot kernel vmm cannot boot: {why}")));
        }
        let segments = multiboot::elf32_segments(image).map_err(|e| self.invalid(e))?;
        let end = segments.iter().map(|s| s.end).max().unwrap_or(0);
        if end >= self.mem_size {
            return Err(self.too_small(end));
        }
        let path = self.path.display();
        let regions: Vec<(String, u64, u64)> = segments
            .iter()
            .map(|s| {
                let what = format!("kernel {path}: Multiboot ELF segment {}", s.index);
                (what, s.start, s.end)
            })
            .collect();
        check_placement(self.mem_size, &regions)?;
        multiboot::load_segments(self.mem, image, &segments).map_err(|e| self.invalid(e))?;
        Ok(LoadedKernel {
            kind: ImageKind::Multiboot,
            entry: multiboot::elf32_entry(image),
            header: None,
            regions,
            file: None,
        })
    }

    /// A bzImage whose payload is not unpacked here: the kernel decompresses
    /// itself in place, so it needs init_size bytes from its load address.
    fn load_bzimage(&self, image: &[u8], header: &setup_header) -> Result<LoadedKernel, LoadError> {
        let (code32_start, init_size) = (header.code32_start, header.init_size);
        let start = u64::from(code32_start);
        let end = start + u64::from(init_size).max(1);
        if end >= self.mem_size {
            return Err(self.too_small(end));
        }
        let name = format!(
            "kernel {}: bzImage (code32_start + init_size)",
            self.path.display()
        );
        let regions = vec![(name, start, end)];
        check_placement(self.mem_size, &regions)?;
        let mut file = memfd_with(image).map_err(|e| self.invalid(e.to_string()))?;
        let loaded = BzImage::load(self.mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| self.invalid(e.to_string()))?;
        Ok(LoadedKernel {
            kind: ImageKind::BzImage,
            entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            header: loaded.setup_header,
            regions,
            file: None,
        })
    }
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

/// The loadable segments `(index, start, end)` (physical addresses, memory
/// size), checking the image is an x86-64 ELF executable along the way.
fn elf_segments(image: &[u8]) -> Result<Vec<(usize, u64, u64)>, String> {
    if image[4] != ELF_CLASS_64 || u16_at(image, 18) != Some(EM_X86_64) {
        return Err("not a 64-bit x86-64 ELF image".into());
    }
    let bad = || "truncated ELF program headers".to_string();
    let phoff = u64_at(image, 32).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(image, 54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(image, 56).ok_or_else(bad)?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        if u32_at(image, ph).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        let paddr = u64_at(image, ph + 24).ok_or_else(bad)?;
        let filesz = u64_at(image, ph + 32).ok_or_else(bad)?;
        let memsz = u64_at(image, ph + 40).ok_or_else(bad)?;
        if filesz > memsz {
            return Err(format!("ELF segment {i} has more file than memory bytes"));
        }
        if memsz > 0 {
            segments.push((i, paddr, paddr.checked_add(memsz).ok_or_else(bad)?));
        }
    }
    if segments.is_empty() {
        return Err("ELF image has no loadable segment".into());
    }
    Ok(segments)
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

/// Why a payload was not unpacked.
#[derive(Debug, PartialEq)]
enum Unpack {
    Invalid(String),
    /// It unpacks to more than the limit.
    TooLarge,
    /// A termination signal came while unpacking.
    Signalled(i32),
}

impl From<String> for Unpack {
    fn from(reason: String) -> Self {
        Unpack::Invalid(reason)
    }
}

impl From<&str> for Unpack {
    fn from(reason: &str) -> Self {
        Unpack::Invalid(reason.into())
    }
}

/// The decompressed payload of a bzImage, when it is compressed in a format
/// we unpack (lz4 legacy frames, gzip), of at most `limit` bytes.
/// `Ok(None)` for other formats.
fn unpack_payload(
    image: &[u8],
    header: &setup_header,
    limit: u64,
) -> Result<Option<Vec<u8>>, Unpack> {
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, length) = (header.payload_offset, header.payload_length);
    let start = (setup_sects + 1) * 512 + offset as usize;
    let Some(payload) = image.get(start..start.saturating_add(length as usize)) else {
        return Err("bzImage payload lies outside the file".into());
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload, limit).map(Some),
        [0x1f, 0x8b, ..] => gunzip(payload, limit).map(Some),
        _ => Ok(None),
    }
}

/// Unpacks a gzip stream of at most `limit` bytes, a MiB at a time,
/// stopping for termination signals.
fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, Unpack> {
    let mut decoder = flate2::read::GzDecoder::new(data);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        crate::vm::signals::check().map_err(Unpack::Signalled)?;
        let n = match decoder.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("gzip payload: {e}").into()),
        };
        if out.len() + n > limit {
            return Err(Unpack::TooLarge);
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes lz4's legacy frame format (`lz4 -l`, used by the kernel): a magic
/// number, then blocks of at most 8 MiB each preceded by their compressed
/// size. The kernel appends the decompressed size as a 4-byte trailer.
fn lz4_legacy(data: &[u8], limit: usize) -> Result<Vec<u8>, Unpack> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    // The trailer says the size up front: a payload that claims more than
    // fits is refused before anything is unpacked.
    if let Some(claimed) = data.len().checked_sub(4).and_then(|at| u32_at(data, at)) {
        if claimed as usize > limit {
            return Err(Unpack::TooLarge);
        }
    }
    let mut out = Vec::new();
    let mut at = 4;
    while data.len().saturating_sub(at) > 4 {
        crate::vm::signals::check().map_err(Unpack::Signalled)?;
        let size = u32_at(data, at).ok_or("lz4: truncated block size")?;
        at += 4;
        if size == MAGIC {
            continue; // a concatenated stream starts
        }
        let block = data
            .get(at..at.saturating_add(size as usize))
            .ok_or("lz4: block runs past the payload")?;
        let start = out.len();
        // Room for one more block, but never beyond the limit.
        let room = BLOCK_MAX.min(limit - start);
        if room == 0 {
            return Err(Unpack::TooLarge);
        }
        out.resize(start + room, 0);
        let n = match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => n,
            // The block would unpack past the limit.
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) if room < BLOCK_MAX => {
                return Err(Unpack::TooLarge)
            }
            Err(e) => return Err(format!("lz4: {e}").into()),
        };
        out.truncate(start + n);
        at += size as usize;
    }
    if let Some(expected) = u32_at(data, at) {
        if expected as usize != out.len() {
            return Err(format!(
                "lz4: payload unpacked to {} bytes, header says {expected}",
                out.len()
            )
            .into());
        }
    }
    Ok(out)
}

/// Loads an initrd as high as the kernel allows; returns where it went. It
/// must not overlap the `kernel`'s regions.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<crate::arch::boot_params::InitrdPlacement, LoadError> {
    let initrd_addr_max = kernel.header.map_or(0, |h| h.initrd_addr_max);
    let (data, _) = read_regular_file("initrd", path, mem_size)?;
    let size = data.len() as u64;
    let too_large = || LoadError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        memory_mib: mem_size >> 20,
    };
    let address = crate::arch::boot_params::initrd_address(mem_size, size, initrd_addr_max)
        .ok_or_else(too_large)?;
    let mut regions = kernel.regions.clone();
    regions.push((
        format!("initrd {}", path.display()),
        address,
        address + size.max(1),
    ));
    check_placement(mem_size, &regions)?;
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
        assert_eq!(lz4_legacy(&frame, 1 << 20).unwrap(), original);
        // Not beyond the limit, whether the trailer says so or the blocks do.
        assert_eq!(lz4_legacy(&frame, 99_999), Err(Unpack::TooLarge));
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(lz4_legacy(&frame, 99_999), Err(Unpack::TooLarge));
        // A wrong trailer is caught.
        assert!(matches!(
            lz4_legacy(&frame, 1 << 20),
            Err(Unpack::Invalid(_))
        ));
    }

    #[test]
    fn gzip_unpacks_up_to_the_limit_only() {
        use flate2::write::GzEncoder;
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![0u8; 5 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip(&gz, 5 << 20).unwrap().len(), 5 << 20);
        assert_eq!(gunzip(&gz, (5 << 20) - 1), Err(Unpack::TooLarge));
    }

    #[test]
    fn placement_is_checked_against_ram_structures_and_each_other() {
        let mem = 64 << 20;
        let r = |what: &str, s: u64, e: u64| (what.to_string(), s, e);
        assert!(
            check_placement(mem, &[r("a", 1 << 20, 2 << 20), r("b", 2 << 20, 3 << 20)]).is_ok()
        );
        let err =
            |regions: &[(String, u64, u64)]| check_placement(mem, regions).unwrap_err().to_string();
        assert_eq!(
            err(&[r("seg 0", 0x7800, 0x7900)]),
            "seg 0 [0x7800, 0x7900) overlaps the zero page [0x7000, 0x8000)"
        );
        assert!(err(&[r("seg 0", 0xf0010, 0x100010)]).contains("overlaps the MP table"));
        assert!(err(&[r("seg 0", 0xe0000, 0xe0001)]).contains("overlaps the ACPI tables"));
        assert!(err(&[r("seg 0", 0x20010, 0x20020)]).contains("the kernel command line"));
        assert!(err(&[r("seg 0", 0x9000, 0xa000)]).contains("the boot page tables"));
        assert_eq!(
            err(&[r("b", 3 << 20, 5 << 20), r("a", 1 << 20, 4 << 20)]),
            "a [0x100000, 0x400000) overlaps b [0x300000, 0x500000)"
        );
        assert!(err(&[r("x", 60 << 20, 65 << 20)]).contains("lies outside guest RAM"));
        let big = 5u64 << 30;
        assert!(check_placement(big, &[r("x", 0xbff0_0000, 0xc000_1000)])
            .unwrap_err()
            .to_string()
            .contains("overlaps the MMIO hole"));
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, [1u8; 100]).unwrap();
        assert_eq!(
            read_regular_file("kernel", &file, 100).unwrap().0.len(),
            100
        );
        let e = read_regular_file("kernel", &file, 99)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("(100 bytes) does not fit in --memory 0 MiB"),
            "{e}"
        );
        let e = read_regular_file("kernel", dir.path(), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        let e = read_regular_file("initrd", Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "initrd /dev/zero is a character device, not a regular file"
        );
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
        assert!(elf_segments(&elf).is_err());
    }
}
