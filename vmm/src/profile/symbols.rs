//! Guest kernel symbols: an ELF image's symbol table (a vmlinux, the
//! built-in probe) or a `System.map`, looked up by address, and the KASLR
//! offset of a relocated kernel.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

use crate::files::{self, FileError};

/// Largest symbol file read (a vmlinux with every symbol is tens of MB;
/// with its debug information, hundreds).
pub const MAX_FILE: u64 = 1 << 30;
/// Most function symbols kept (a vmlinux has about 100 000).
pub const MAX_SYMBOLS: usize = 1 << 21;
/// Longest name kept; longer ones are cut (Linux's own limit,
/// `KSYM_NAME_LEN`, is 512).
pub const MAX_NAME: usize = 512;
/// Most bytes of distinct names kept. Each distinct name is stored once,
/// however many symbols share it.
pub const MAX_NAME_BYTES: usize = 64 << 20;
/// How far past its start a symbol of unknown size that no other symbol
/// follows is taken to reach.
const LAST_SYMBOL_REACH: u64 = 64 << 10;
/// The system-call entry Linux writes to `MSR_LSTAR`.
pub const SYSCALL_ENTRY: &str = "entry_SYSCALL_64";
/// KASLR moves the x86-64 kernel by multiples of this
/// (`CONFIG_PHYSICAL_ALIGN` is at least 2 MiB there).
const KASLR_ALIGN: u64 = 2 << 20;

/// How an ELF file starts.
pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Why symbols could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    /// The file could not be opened or read, is not a regular file or is
    /// larger than [`MAX_FILE`].
    #[error("{0}: {1}")]
    File(String, FileError),
    #[error("{0}: not an ELF file: {1}")]
    Elf(String, String),
    #[error("{0}: no function symbols (a stripped ELF, or not a vmlinux or System.map)")]
    Empty(String),
    #[error("{0}: more than {MAX_SYMBOLS} function symbols")]
    TooMany(String),
    #[error("{0}: more than {MAX_NAME_BYTES} bytes of distinct symbol names")]
    NamesTooLarge(String),
}

/// One function symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Symbol {
    start: u64,
    /// `None`: unknown (System.map, size-less ELF symbols): up to the next.
    size: Option<u64>,
    /// Its name in [`Symbols::names`].
    name: Name,
}

/// A name's place in [`Symbols::names`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Name {
    at: u32,
    len: u32,
}

/// Function symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    symbols: Vec<Symbol>,
    /// Every distinct name once, back to back.
    names: String,
    /// Where they came from, for the output.
    origin: String,
}

/// Symbols as they are read: each distinct raw name is stored (demangled,
/// cut to [`MAX_NAME`]) once, so memory follows the distinct names, not
/// the symbols.
struct Builder<'a> {
    symbols: Vec<Symbol>,
    names: String,
    seen: HashMap<&'a str, Name>,
    origin: String,
}

impl<'a> Builder<'a> {
    fn new(origin: String) -> Self {
        Self {
            symbols: Vec::new(),
            names: String::new(),
            seen: HashMap::new(),
            origin,
        }
    }

    fn add(&mut self, start: u64, size: Option<u64>, raw: &'a str) -> Result<(), SymbolsError> {
        if self.symbols.len() >= MAX_SYMBOLS {
            return Err(SymbolsError::TooMany(self.origin.clone()));
        }
        let name = match self.seen.get(raw) {
            Some(&name) => name,
            None => {
                let text = demangle(raw);
                let text = cut(&text, MAX_NAME);
                if self.names.len() + text.len() > MAX_NAME_BYTES {
                    return Err(SymbolsError::NamesTooLarge(self.origin.clone()));
                }
                let name = Name {
                    at: self.names.len() as u32,
                    len: text.len() as u32,
                };
                self.names.push_str(text);
                self.seen.insert(raw, name);
                name
            }
        };
        self.symbols.push(Symbol { start, size, name });
        Ok(())
    }

    fn finish(mut self) -> Result<Symbols, SymbolsError> {
        if self.symbols.is_empty() {
            return Err(SymbolsError::Empty(self.origin));
        }
        // Aliases at one address: the first with a size wins.
        self.symbols.sort_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then(b.size.is_some().cmp(&a.size.is_some()))
        });
        self.symbols.dedup_by_key(|s| s.start);
        self.symbols.shrink_to_fit();
        self.names.shrink_to_fit();
        Ok(Symbols {
            symbols: self.symbols,
            names: self.names,
            origin: self.origin,
        })
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Symbols {
    /// Reads a vmlinux (or any ELF with a symbol table) or a `System.map`,
    /// told apart by the ELF magic. Only a regular file is opened (a FIFO
    /// or a device is refused before it is), and at most [`MAX_FILE`]
    /// bytes are read.
    pub fn load(path: &Path) -> Result<Symbols, SymbolsError> {
        let name = path.display().to_string();
        let file = files::open_regular(path).map_err(|e| SymbolsError::File(name.clone(), e))?;
        Symbols::from_file(&file, &name)
    }

    /// The symbols of an opened file (read from its start), which `origin`
    /// names.
    pub fn from_file(file: &File, origin: &str) -> Result<Symbols, SymbolsError> {
        let bytes =
            files::read_capped(file, MAX_FILE).map_err(|e| SymbolsError::File(origin.into(), e))?;
        if bytes.starts_with(ELF_MAGIC) {
            Symbols::from_elf(&bytes, origin)
        } else {
            Symbols::from_system_map(&String::from_utf8_lossy(&bytes), origin)
        }
    }

    /// The function symbols of an ELF image (`origin` names it).
    pub fn from_elf(bytes: &[u8], origin: &str) -> Result<Symbols, SymbolsError> {
        let file = object::File::parse(bytes)
            .map_err(|e| SymbolsError::Elf(origin.into(), e.to_string()))?;
        let mut symbols = Builder::new(format!("{origin} (ELF symbol table)"));
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
            let size = (symbol.size() > 0).then_some(symbol.size());
            symbols.add(symbol.address(), size, name)?;
        }
        symbols.finish()
    }

    /// The text symbols (types `T`, `t`, `W`, `w`) of a `System.map`.
    pub fn from_system_map(text: &str, origin: &str) -> Result<Symbols, SymbolsError> {
        let mut symbols = Builder::new(format!("{origin} (System.map)"));
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            let Ok(address) = u64::from_str_radix(address, 16) else {
                continue;
            };
            if matches!(kind, "T" | "t" | "W" | "w") {
                symbols.add(address, None, name)?;
            }
        }
        symbols.finish()
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

    /// Bytes of distinct names held.
    pub fn name_bytes(&self) -> usize {
        self.names.len()
    }

    fn name(&self, symbol: &Symbol) -> &str {
        let at = symbol.name.at as usize;
        &self.names[at..at + symbol.name.len as usize]
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
        (address - symbol.start < reach).then(|| self.name(symbol))
    }

    /// The address of the symbol called `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|s| self.name(s) == name)
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
            .find(|x| s.name(x).ends_with("probe_main"))
            .expect("probe_main");
        assert!(!s.name(main).contains("17h"), "hash left: {}", s.name(main));
        let size = main.size.expect("ELF functions have sizes");
        assert_eq!(s.lookup(main.start + size - 1), Some(s.name(main)));
        assert!(matches!(
            Symbols::from_elf(b"\x7fELF garbage", "bad"),
            Err(SymbolsError::Elf(..))
        ));
    }

    #[test]
    fn a_name_many_symbols_share_is_stored_once_and_long_names_are_cut() {
        let long = "x".repeat(16 << 10);
        let mut map = String::new();
        for i in 0..1000u64 {
            map.push_str(&format!("{:016x} T {long}\n", 0x1000 + 16 * i));
        }
        map.push_str("0000000000100000 T \u{e9}t\u{e9}\n");
        let s = Symbols::from_system_map(&map, "m").unwrap();
        assert_eq!(s.len(), 1001);
        // 16 MiB of names read; one 512-byte name and one short one kept.
        assert_eq!(s.name_bytes(), MAX_NAME + "\u{e9}t\u{e9}".len());
        assert_eq!(s.lookup(0x1000 + 16 * 999).map(str::len), Some(MAX_NAME));
        assert_eq!(s.lookup(0x100000), Some("\u{e9}t\u{e9}"));
        assert_eq!(cut("\u{e9}t\u{e9}", 1), "");
        assert_eq!(cut("\u{e9}t\u{e9}", 3), "\u{e9}t");
    }

    #[test]
    fn symbol_files_must_be_regular_files() {
        for (path, kind) in [("/dev/zero", "a character device"), ("/", "a directory")] {
            let e = Symbols::load(Path::new(path)).unwrap_err().to_string();
            assert_eq!(e, format!("{path}: {kind}, not a regular file"));
        }
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
