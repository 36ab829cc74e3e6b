//! Guest kernel symbols: an ELF image's symbol table (a vmlinux, the
//! built-in probe) or a `System.map`, looked up by address, and the KASLR
//! offset of a relocated kernel.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

/// Largest symbol file read (a vmlinux with every symbol is tens of MB).
const MAX_FILE: u64 = 1 << 30;
/// How far past its start a symbol of unknown size that no other symbol
/// follows is taken to reach.
const LAST_SYMBOL_REACH: u64 = 64 << 10;
/// The system-call entry Linux writes to `MSR_LSTAR`.
pub const SYSCALL_ENTRY: &str = "entry_SYSCALL_64";
/// KASLR moves the x86-64 kernel by multiples of this
/// (`CONFIG_PHYSICAL_ALIGN` is at least 2 MiB there).
const KASLR_ALIGN: u64 = 2 << 20;

/// Whether the file at `path` starts like an ELF image.
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == ELF_MAGIC)
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Why symbols could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: larger than {MAX_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("{0}: not an ELF file: {1}")]
    Elf(String, String),
    #[error("{0}: no function symbols (a stripped ELF, or not a vmlinux or System.map)")]
    Empty(String),
}

/// One function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Symbol {
    start: u64,
    /// `None`: unknown (System.map, size-less ELF symbols): up to the next.
    size: Option<u64>,
    name: String,
}

/// Function symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    symbols: Vec<Symbol>,
    /// Where they came from, for the output.
    origin: String,
}

impl Symbols {
    /// Reads a vmlinux (or any ELF with a symbol table) or a `System.map`,
    /// told apart by the ELF magic.
    pub fn load(path: &Path) -> Result<Symbols, SymbolsError> {
        let io = |e| SymbolsError::Io(path.to_path_buf(), e);
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE {
            return Err(SymbolsError::TooLarge(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let name = path.display().to_string();
        if bytes.starts_with(ELF_MAGIC) {
            Symbols::from_elf(&bytes, &name)
        } else {
            Symbols::from_system_map(&String::from_utf8_lossy(&bytes), &name)
        }
    }

    /// The function symbols of an ELF image (`origin` names it).
    pub fn from_elf(bytes: &[u8], origin: &str) -> Result<Symbols, SymbolsError> {
        let file = object::File::parse(bytes)
            .map_err(|e| SymbolsError::Elf(origin.into(), e.to_string()))?;
        let mut symbols = Vec::new();
        for symbol in file.symbols() {
            // Functions, and the size-less labels assembly code defines in
            // executable sections (Linux's entry points are such).
            let code = match symbol.kind() {
                SymbolKind::Text => true,
                SymbolKind::Unknown | SymbolKind::Label => symbol
                    .section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .is_some_and(|s| s.kind() == SectionKind::Text),
                _ => false,
            };
            let Ok(name) = symbol.name() else { continue };
            if !code || name.is_empty() || symbol.address() == 0 {
                continue;
            }
            symbols.push(Symbol {
                start: symbol.address(),
                size: (symbol.size() > 0).then_some(symbol.size()),
                name: demangle(name),
            });
        }
        Symbols::sorted(symbols, format!("{origin} (ELF symbol table)"))
    }

    /// The text symbols (types `T`, `t`, `W`, `w`) of a `System.map`.
    pub fn from_system_map(text: &str, origin: &str) -> Result<Symbols, SymbolsError> {
        let symbols = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let address = u64::from_str_radix(words.next()?, 16).ok()?;
                let kind = words.next()?;
                let name = words.next()?;
                matches!(kind, "T" | "t" | "W" | "w").then(|| Symbol {
                    start: address,
                    size: None,
                    name: name.to_string(),
                })
            })
            .collect();
        Symbols::sorted(symbols, format!("{origin} (System.map)"))
    }

    fn sorted(mut symbols: Vec<Symbol>, origin: String) -> Result<Symbols, SymbolsError> {
        if symbols.is_empty() {
            return Err(SymbolsError::Empty(origin));
        }
        // Aliases at one address: the first with a size wins.
        symbols.sort_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then(b.size.is_some().cmp(&a.size.is_some()))
        });
        symbols.dedup_by_key(|s| s.start);
        Ok(Symbols { symbols, origin })
    }

    /// Where the symbols came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The function holding `address`.
    pub fn lookup(&self, address: u64) -> Option<&str> {
        let i = self.symbols.partition_point(|s| s.start <= address);
        let symbol = self.symbols.get(i.checked_sub(1)?)?;
        let reach = match symbol.size {
            Some(size) => size,
            None if i < self.symbols.len() => u64::MAX,
            None => LAST_SYMBOL_REACH,
        };
        (address - symbol.start < reach).then_some(symbol.name.as_str())
    }

    /// The address of the symbol called `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.start)
    }
}

/// A Rust symbol's path without its hash; other names as they are.
fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_string(),
    }
}

/// How far the running kernel sits from its symbols' addresses, and how
/// that was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocation {
    pub offset: u64,
    pub note: String,
}

/// The KASLR offset: `MSR_LSTAR` (the system-call entry the guest
/// installed) against the symbols' `entry_SYSCALL_64`. No offset when the
/// guest set none, the symbols lack the entry, or the difference is not
/// one KASLR could make (then the symbols are not this kernel's).
pub fn relocation(symbols: &Symbols, lstar: Option<u64>) -> Relocation {
    let none = |note: String| Relocation { offset: 0, note };
    let lstar = match lstar {
        None | Some(0) => {
            return none(
                "no KASLR offset applied: MSR_LSTAR is 0 (the guest set no system-call entry)"
                    .into(),
            )
        }
        Some(lstar) => lstar,
    };
    let Some(entry) = symbols.address_of(SYSCALL_ENTRY) else {
        return none(format!(
            "no KASLR offset applied: the symbols have no {SYSCALL_ENTRY} (MSR_LSTAR {lstar:#x})"
        ));
    };
    let offset = lstar.wrapping_sub(entry);
    if offset % KASLR_ALIGN != 0 {
        return none(format!(
            "no KASLR offset applied: MSR_LSTAR {lstar:#x} is not {SYSCALL_ENTRY} {entry:#x} \
             moved by a multiple of 2 MiB (symbols of another kernel?)"
        ));
    }
    let note = match offset {
        0 => format!("KASLR offset 0x0: MSR_LSTAR {lstar:#x} is {SYSCALL_ENTRY} (not relocated)"),
        _ => format!(
            "KASLR offset {offset:#x}: MSR_LSTAR {lstar:#x} against {SYSCALL_ENTRY} {entry:#x}"
        ),
    };
    Relocation { offset, note }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81000100 t do_one_initcall
ffffffff81000200 D some_data
ffffffff81000300 T entry_SYSCALL_64
ffffffff81000400 W weak_function
garbage line
ffffffff81000500 A absolute
";

    #[test]
    fn system_map_text_symbols_cover_up_to_the_next() {
        let s = Symbols::from_system_map(MAP, "System.map").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.lookup(0xffffffff81000000), Some("_stext"));
        assert_eq!(s.lookup(0xffffffff810000ff), Some("_stext"));
        // Data symbols are not functions: the text symbol before covers it.
        assert_eq!(s.lookup(0xffffffff81000250), Some("do_one_initcall"));
        assert_eq!(s.lookup(0xffffffff81000410), Some("weak_function"));
        assert_eq!(s.lookup(0xffffffff80ffffff), None);
        assert_eq!(s.lookup(0xffffffff81000400 + LAST_SYMBOL_REACH), None);
        assert_eq!(s.address_of("entry_SYSCALL_64"), Some(0xffffffff81000300));
        assert!(s.origin().contains("System.map"));
        assert!(matches!(
            Symbols::from_system_map("not a map\n", "x"),
            Err(SymbolsError::Empty(_))
        ));
    }

    #[test]
    fn the_probe_elf_has_its_functions_demangled_and_sized() {
        let s = Symbols::from_elf(
            include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf")),
            "probe",
        )
        .unwrap();
        assert!(s.len() > 10, "{} symbols", s.len());
        let start = s.address_of("_start").expect("_start");
        assert_eq!(s.lookup(start), Some("_start"));
        let main = s
            .symbols
            .iter()
            .find(|x| x.name.ends_with("probe_main"))
            .expect("probe_main");
        assert!(!main.name.contains("17h"), "hash left: {}", main.name);
        let size = main.size.expect("ELF functions have sizes");
        assert_eq!(s.lookup(main.start + size - 1), Some(main.name.as_str()));
        assert!(matches!(
            Symbols::from_elf(b"\x7fELF garbage", "bad"),
            Err(SymbolsError::Elf(..))
        ));
    }

    #[test]
    fn kaslr_offset_comes_from_lstar_against_the_syscall_entry() {
        let s = Symbols::from_system_map(MAP, "m").unwrap();
        let r = relocation(&s, Some(0xffffffff81000300 + 0x2e00000));
        assert_eq!(r.offset, 0x2e00000);
        assert!(r.note.contains("0x2e00000"), "{}", r.note);
        assert_eq!(relocation(&s, Some(0xffffffff81000300)).offset, 0);
        for lstar in [None, Some(0), Some(0xffffffff81000301), Some(0x1234)] {
            assert_eq!(relocation(&s, lstar).offset, 0, "{lstar:?}");
        }
        assert!(relocation(&s, Some(0x1234)).note.contains("not"));
        let probe = Symbols::from_system_map("0000000000200000 T _start\n", "p").unwrap();
        assert!(relocation(&probe, Some(0x200000))
            .note
            .contains("no entry_SYSCALL_64"));
    }
}
