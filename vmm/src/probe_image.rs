pub static PROBE_ELF: &[u8] = &[];
