//! Counter value arithmetic: widths, wrap-around and write conversions.

/// The value mask of a `width`-bit counter.
pub(crate) const fn width_mask(width: u8) -> u64 {
    low_bits(width as u32)
}

/// `(1 << bits) - 1` without overflow at 64.
pub(crate) const fn low_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Adds `delta` to `value` modulo `mask + 1`; returns the new value and how
/// many times the counter overflowed (crossed from all-ones to zero).
pub(crate) fn advance(value: u64, delta: u64, mask: u64) -> (u64, u64) {
    let modulus = mask as u128 + 1;
    let total = (value & mask) as u128 + delta as u128;
    ((total % modulus) as u64, (total / modulus) as u64)
}

/// Events left before a counter holding `value` overflows (at least 1).
pub(crate) fn distance_to_overflow(value: u64, mask: u64) -> u64 {
    mask - (value & mask) + 1
}

/// Intel legacy `IA32_PMCx` write: bits 31:0 sign-extended to the width.
pub(crate) fn sign_extend_32(value: u64, mask: u64) -> u64 {
    (value as u32 as i32 as i64 as u64) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    const M48: u64 = (1 << 48) - 1;

    #[test]
    fn advance_wraps_and_counts_overflows() {
        assert_eq!(advance(M48 - 1, 1, M48), (M48, 0));
        assert_eq!(advance(M48 - 1, 3, M48), (1, 1));
        assert_eq!(advance(0, u64::MAX, M48), (M48, (1 << 16) - 1));
    }

    #[test]
    fn distance_counts_to_the_wrap() {
        assert_eq!(distance_to_overflow(M48, M48), 1);
        assert_eq!(distance_to_overflow(0, M48), 1 << 48);
        assert_eq!(distance_to_overflow(M48 - 99, M48), 100);
    }

    #[test]
    fn sign_extension_uses_bit_31_only() {
        assert_eq!(sign_extend_32(0x8000_0000, M48), 0xFFFF_8000_0000);
        assert_eq!(sign_extend_32(0x7FFF_FFFF, M48), 0x7FFF_FFFF);
        assert_eq!(sign_extend_32(0xDEAD_0000_0000_FFFF, M48), 0xFFFF);
    }
}
