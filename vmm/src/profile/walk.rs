//! A guest's kernel stack, read from the host: guest-virtual addresses
//! translated through the guest's own page tables (from its CR3), then the
//! frame-pointer chain followed from RBP.
//!
//! The guest owns its page tables and its stack, so nothing read here is
//! trusted: every read goes through [`GuestPhys`], which answers `None`
//! outside guest memory; a walk is at most [`MAX_DEPTH`] frames of at most
//! two page-table walks each (four reads); and whatever stops it early (an
//! unmapped or non-canonical address, memory the guest does not have, a
//! misaligned frame pointer, a frame seen before) ends it with that reason,
//! so the stack is reported as truncated.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most frames of one stack, the sampled RIP included.
pub const MAX_DEPTH: usize = 64;

/// Physical address bits of a page-table entry (51:12).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
/// Page size bit of a PDPTE (1 GiB page) or PDE (2 MiB page).
const PAGE_SIZE: u64 = 1 << 7;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Offsets in Linux's `struct pt_regs` (x86-64), for frames Linux's entry
/// code marks (see [`walk`]).
const PT_REGS_BP: u64 = 4 * 8;
const PT_REGS_IP: u64 = 16 * 8;
const PT_REGS_CS: u64 = 17 * 8;

/// Guest physical memory, as the walk reads it.
pub trait GuestPhys {
    /// The little-endian u64 at guest-physical `gpa`; `None` where the guest
    /// has no memory.
    fn read_u64(&self, gpa: u64) -> Option<u64>;
}

impl GuestPhys for GuestMemoryMmap {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.read_obj::<u64>(GuestAddress(gpa)).ok()
    }
}

/// How the guest translates virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paging {
    /// Paging off: virtual is physical.
    Off,
    /// 4-level long-mode paging rooted at this CR3.
    Long { cr3: u64 },
    /// A mode the walk does not follow (32-bit or 5-level paging).
    Unsupported,
}

impl Paging {
    /// The mode the control registers say.
    pub fn from_registers(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Paging {
        if cr0 & CR0_PG == 0 {
            Paging::Off
        } else if efer & EFER_LMA == 0 || cr4 & CR4_LA57 != 0 {
            Paging::Unsupported
        } else {
            Paging::Long { cr3 }
        }
    }
}

/// Why a walk ended. Only [`End::Complete`] is a whole stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The chain ended the way stacks end: a null frame pointer or return
    /// address, or a Linux entry frame that came from user mode.
    Complete,
    /// [`MAX_DEPTH`] frames.
    Depth,
    /// A frame pointer seen before.
    Cycle,
    /// A frame pointer not 8-byte aligned (nor a Linux entry frame).
    Misaligned,
    /// An address no page-table entry maps.
    Unmapped,
    /// A virtual address that is not canonical.
    NonCanonical,
    /// A page-table entry or a frame outside guest memory.
    OutsideMemory,
    /// A paging mode the walk does not follow (32-bit, 5-level).
    UnsupportedPaging,
    /// The vCPU's registers could not be read.
    NoRegisters,
}

impl End {
    /// How a truncated stack is marked (`None`: it is complete).
    pub fn truncation(self) -> Option<&'static str> {
        Some(match self {
            End::Complete => return None,
            End::Depth => "depth limit",
            End::Cycle => "frame-pointer cycle",
            End::Misaligned => "misaligned frame pointer",
            End::Unmapped => "unmapped address",
            End::NonCanonical => "non-canonical address",
            End::OutsideMemory => "outside guest memory",
            End::UnsupportedPaging => "unsupported paging mode",
            End::NoRegisters => "no registers",
        })
    }
}

/// Reads guest-virtual u64s through the guest's page tables, remembering
/// the last page it translated.
pub struct Reader<'m, M: GuestPhys + ?Sized> {
    memory: &'m M,
    paging: Paging,
    /// (virtual page, physical page) of the last translation.
    last: Option<(u64, u64)>,
}

impl<'m, M: GuestPhys + ?Sized> Reader<'m, M> {
    pub fn new(memory: &'m M, paging: Paging) -> Self {
        Self {
            memory,
            paging,
            last: None,
        }
    }

    /// The guest-physical address of `va`.
    pub fn translate(&self, va: u64) -> Result<u64, End> {
        let cr3 = match self.paging {
            Paging::Off => return Ok(va),
            Paging::Unsupported => return Err(End::UnsupportedPaging),
            Paging::Long { cr3 } => cr3,
        };
        let top = (va as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(End::NonCanonical);
        }
        let mut table = cr3 & ADDR_MASK;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let index = (va >> shift) & 0x1ff;
            let entry = self
                .memory
                .read_u64(table + index * 8)
                .ok_or(End::OutsideMemory)?;
            if entry & PRESENT == 0 {
                return Err(End::Unmapped);
            }
            if (level == 3 || level == 2) && entry & PAGE_SIZE != 0 {
                let offset = (1u64 << shift) - 1;
                return Ok((entry & ADDR_MASK & !offset) | (va & offset));
            }
            table = entry & ADDR_MASK;
        }
        Ok(table | (va & 0xfff))
    }

    /// The 8-byte-aligned u64 at guest-virtual `va`.
    pub fn read(&mut self, va: u64) -> Result<u64, End> {
        if va & 7 != 0 {
            return Err(End::Misaligned);
        }
        let page = va & !0xfff;
        let physical = match self.last {
            Some((virt, phys)) if virt == page => phys,
            _ => {
                let phys = self.translate(page)?;
                self.last = Some((page, phys));
                phys
            }
        };
        self.memory
            .read_u64(physical | (va & 0xfff))
            .ok_or(End::OutsideMemory)
    }
}

/// A stack: the sampled RIP first, then each caller.
///
/// Caller frames hold the byte before their return address (inside the
/// call instruction, so that a call at the very end of a function is named
/// after that function); frames of an interrupted context hold its RIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub frames: Vec<u64>,
    pub end: End,
}

/// Walks the kernel stack of a vCPU stopped at `rip` with frame pointer
/// `rbp`.
///
/// Each frame is `[rbp]` = the caller's frame pointer, `[rbp + 8]` = the
/// return address. A frame pointer with bit 0 set is how Linux's entry
/// code (`ENCODE_FRAME_POINTER`) marks a `struct pt_regs` at `rbp - 1`:
/// the walk continues in the interrupted context (its RIP and RBP) if that
/// was kernel mode, and ends there if it was user mode.
pub fn walk<M: GuestPhys + ?Sized>(memory: &M, paging: Paging, rip: u64, rbp: u64) -> Stack {
    let mut frames = Vec::with_capacity(16);
    frames.push(rip);
    let mut reader = Reader::new(memory, paging);
    let end = follow(&mut reader, rbp, &mut frames);
    Stack { frames, end }
}

fn follow<M: GuestPhys + ?Sized>(
    reader: &mut Reader<'_, M>,
    rbp: u64,
    frames: &mut Vec<u64>,
) -> End {
    let mut seen = [0u64; MAX_DEPTH];
    let mut fp = rbp;
    for step in 0..MAX_DEPTH {
        if frames.len() >= MAX_DEPTH {
            return End::Depth;
        }
        if fp == 0 {
            return End::Complete;
        }
        if seen[..step].contains(&fp) {
            return End::Cycle;
        }
        seen[step] = fp;
        let next = if fp & 7 == 1 {
            let regs = fp - 1;
            let frame = reader
                .read(regs + PT_REGS_CS)
                .and_then(|cs| Ok((cs, reader.read(regs + PT_REGS_IP)?)))
                .and_then(|(cs, ip)| Ok((cs, ip, reader.read(regs + PT_REGS_BP)?)));
            match frame {
                Err(end) => return end,
                Ok((cs, _, _)) if cs & 3 != 0 => return End::Complete,
                Ok((_, ip, bp)) => {
                    frames.push(ip);
                    bp
                }
            }
        } else {
            let frame = reader
                .read(fp)
                .and_then(|next| Ok((next, reader.read(fp.wrapping_add(8))?)));
            match frame {
                Err(end) => return end,
                Ok((_, 0)) => return End::Complete,
                Ok((next, ret)) => {
                    frames.push(ret.wrapping_sub(1));
                    next
                }
            }
        };
        fp = next;
    }
    End::Depth
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sparse guest memory below `size`.
    struct Fake {
        size: u64,
        words: HashMap<u64, u64>,
        reads: std::cell::Cell<u64>,
    }

    impl Fake {
        fn new(size: u64) -> Self {
            Self {
                size,
                words: HashMap::new(),
                reads: std::cell::Cell::new(0),
            }
        }

        fn set(&mut self, gpa: u64, value: u64) {
            self.words.insert(gpa, value);
        }
    }

    impl GuestPhys for Fake {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            self.reads.set(self.reads.get() + 1);
            (gpa.checked_add(8)? <= self.size).then(|| self.words.get(&gpa).copied().unwrap_or(0))
        }
    }

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    /// Kernel-half mappings: 0xffff_8000_0000_0000 + 4 KiB pages at PT,
    /// a 2 MiB page and a 1 GiB page; identity-free.
    fn tables() -> Fake {
        let mut m = Fake::new(64 << 20);
        m.set(PML4 + 256 * 8, PDPT | 3);
        m.set(PDPT, PD | 3);
        // 1 GiB page: virtual 0xffff_8000_4000_0000 -> physical 0 (only
        // the first 64 MiB exist).
        m.set(PDPT + 8, PRESENT | PAGE_SIZE);
        m.set(PD, PT | 3);
        // 2 MiB page: virtual 0xffff_8000_0020_0000 -> physical 0x40_0000.
        m.set(PD + 8, 0x40_0000 | PRESENT | PAGE_SIZE);
        // 4 KiB: virtual 0xffff_8000_0000_{0,1}000 -> physical 0x10_{0,1}000.
        m.set(PT, 0x10_0000 | PRESENT);
        m.set(PT + 8, 0x10_1000 | PRESENT);
        m
    }

    const BASE: u64 = 0xffff_8000_0000_0000;
    const LONG: Paging = Paging::Long { cr3: PML4 };

    #[test]
    fn addresses_translate_through_4k_2m_and_1g_pages() {
        let m = tables();
        let r = Reader::new(&m, LONG);
        assert_eq!(r.translate(BASE + 0x123), Ok(0x10_0123));
        assert_eq!(r.translate(BASE + 0x1ff8), Ok(0x10_1ff8));
        assert_eq!(r.translate(BASE + 0x20_1234), Ok(0x40_1234));
        assert_eq!(r.translate(BASE + 0x4000_5678), Ok(0x5678));
        assert_eq!(r.translate(BASE + 0x2000), Err(End::Unmapped));
        assert_eq!(r.translate(0x1000), Err(End::Unmapped));
        assert_eq!(r.translate(0x0000_8000_0000_0000), Err(End::NonCanonical));
        // CR3 outside memory, or an entry pointing there.
        let far = Reader::new(&m, Paging::Long { cr3: 1 << 40 });
        assert_eq!(far.translate(BASE), Err(End::OutsideMemory));
        let mut m = tables();
        m.set(PT + 16, (1 << 45) | PRESENT);
        let mut r = Reader::new(&m, LONG);
        assert_eq!(r.read(BASE + 0x2000), Err(End::OutsideMemory));
        assert_eq!(Reader::new(&m, Paging::Off).translate(0x1234), Ok(0x1234));
        assert_eq!(
            Reader::new(&m, Paging::Unsupported).translate(0),
            Err(End::UnsupportedPaging)
        );
    }

    #[test]
    fn paging_modes_come_from_the_control_registers() {
        assert_eq!(Paging::from_registers(0, 0x1000, 0, 0), Paging::Off);
        let pg = CR0_PG | 1;
        assert_eq!(
            Paging::from_registers(pg, 0x1000, 0x20, EFER_LMA),
            Paging::Long { cr3: 0x1000 }
        );
        assert_eq!(
            Paging::from_registers(pg, 0x1000, 0x20, 0),
            Paging::Unsupported
        );
        assert_eq!(
            Paging::from_registers(pg, 0x1000, CR4_LA57, EFER_LMA),
            Paging::Unsupported
        );
    }

    /// A stack in the 4 KiB page at BASE (physical 0x10_0000): frames at
    /// the given offsets, each linking to the next, the last to 0.
    fn chain(m: &mut Fake, offsets: &[u64], rets: &[u64]) {
        for (i, off) in offsets.iter().enumerate() {
            let next = offsets.get(i + 1).map_or(0, |n| BASE + n);
            m.set(0x10_0000 + off, next);
            m.set(0x10_0000 + off + 8, rets[i]);
        }
    }

    #[test]
    fn a_frame_pointer_chain_is_followed_to_its_null_end() {
        let mut m = tables();
        chain(&mut m, &[0x100, 0x200, 0x300], &[0xa001, 0xb001, 0xc001]);
        let s = walk(&m, LONG, 0x9999, BASE + 0x100);
        assert_eq!(s.frames, vec![0x9999, 0xa000, 0xb000, 0xc000]);
        assert_eq!(s.end, End::Complete);
        assert_eq!(s.end.truncation(), None);
        // A null return address ends it too; rbp 0 is a leaf alone.
        m.set(0x10_0000 + 0x208, 0);
        assert_eq!(walk(&m, LONG, 1, BASE + 0x100).frames, vec![1, 0xa000]);
        assert_eq!(
            walk(&m, LONG, 1, 0),
            Stack {
                frames: vec![1],
                end: End::Complete
            }
        );
    }

    #[test]
    fn garbage_ends_the_walk_marked_truncated() {
        let mut m = tables();
        // A cycle: 0x100 -> 0x200 -> 0x100.
        m.set(0x10_0100, BASE + 0x200);
        m.set(0x10_0108, 0x1111);
        m.set(0x10_0200, BASE + 0x100);
        m.set(0x10_0208, 0x2222);
        let s = walk(&m, LONG, 7, BASE + 0x100);
        assert_eq!((s.frames.len(), s.end), (3, End::Cycle));
        // A frame pointing at itself.
        m.set(0x10_0300, BASE + 0x300);
        m.set(0x10_0308, 0x3333);
        assert_eq!(walk(&m, LONG, 7, BASE + 0x300).end, End::Cycle);
        // Misaligned, unmapped, non-canonical, outside memory.
        assert_eq!(walk(&m, LONG, 7, BASE + 0x104).end, End::Misaligned);
        assert_eq!(walk(&m, LONG, 7, BASE + 0x5000).end, End::Unmapped);
        assert_eq!(
            walk(&m, LONG, 7, 0x1234_5678_9abc_def0).end,
            End::NonCanonical
        );
        assert_eq!(
            walk(&m, Paging::Off, 7, (64 << 20) - 8).end,
            End::OutsideMemory
        );
        assert_eq!(
            walk(&m, Paging::Unsupported, 7, 8).end,
            End::UnsupportedPaging
        );
        // The last frame's return address is its second word: a frame at
        // the very end of memory ends the walk, it does not read past it.
        assert_eq!(
            walk(&m, Paging::Off, 7, u64::MAX - 7).end,
            End::OutsideMemory
        );
        for s in [
            walk(&m, LONG, 7, BASE + 0x104),
            walk(&m, LONG, 7, BASE + 0x5000),
        ] {
            assert_eq!(s.frames, vec![7], "only the sampled RIP");
            assert!(s.end.truncation().is_some());
        }
    }

    #[test]
    fn a_long_acyclic_chain_stops_at_the_depth_limit_with_bounded_reads() {
        let mut m = Fake::new(1 << 20);
        for i in 0..200u64 {
            m.set(0x1000 + i * 16, 0x1000 + (i + 1) * 16);
            m.set(0x1008 + i * 16, 0x5000 + i);
        }
        let s = walk(&m, Paging::Off, 1, 0x1000);
        assert_eq!((s.frames.len(), s.end), (MAX_DEPTH, End::Depth));
        assert!(
            m.reads.get() <= 2 * MAX_DEPTH as u64,
            "{} reads",
            m.reads.get()
        );
        // Through page tables: at most four more reads per page entered.
        let mut m = tables();
        let offsets: Vec<u64> = (0..100).map(|i| 0x10 + i * 16).collect();
        let rets: Vec<u64> = (0..100).map(|i| 0x7000 + i).collect();
        chain(&mut m, &offsets, &rets);
        let s = walk(&m, LONG, 1, BASE + 0x10);
        assert_eq!(s.end, End::Depth);
        assert!(
            m.reads.get() <= 2 * MAX_DEPTH as u64 + 4,
            "{} reads",
            m.reads.get()
        );
    }

    #[test]
    fn linux_entry_frames_continue_in_kernel_mode_and_end_in_user_mode() {
        let mut m = tables();
        // leaf frame at 0x100 -> pt_regs at 0x400 (encoded 0x401).
        m.set(0x10_0100, BASE + 0x401);
        m.set(0x10_0108, 0xaaa1);
        let regs = 0x10_0400;
        m.set(regs + PT_REGS_CS, 0x10);
        m.set(regs + PT_REGS_IP, 0xbbbb);
        m.set(regs + PT_REGS_BP, BASE + 0x800);
        m.set(0x10_0800, 0);
        m.set(0x10_0808, 0xccc1);
        let s = walk(&m, LONG, 0x9999, BASE + 0x100);
        assert_eq!(s.frames, vec![0x9999, 0xaaa0, 0xbbbb, 0xccc0]);
        assert_eq!(s.end, End::Complete);
        // Interrupted in user mode: the kernel stack ends there.
        m.set(regs + PT_REGS_CS, 0x33);
        let s = walk(&m, LONG, 0x9999, BASE + 0x100);
        assert_eq!(s.frames, vec![0x9999, 0xaaa0]);
        assert_eq!(s.end, End::Complete);
    }
}
