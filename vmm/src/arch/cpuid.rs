//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID and the
//! topology (one package, `n` cores) a guest needs to see all its CPUs.
//! PMU leaves are left to the caller (the vPMU decides what they say).

use kvm_bindings::kvm_cpuid_entry2;
use vpmu::Vendor;

const AMD_ID: &[u8; 12] = b"AuthenticAMD";
const INTEL_ID: &[u8; 12] = b"GenuineIntel";

/// The vendor KVM reports in leaf 0 (it is the host's), if AMD or Intel.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<Vendor> {
    let e = entries.iter().find(|e| e.function == 0)?;
    vendor_of_leaf0(e.ebx, e.edx, e.ecx)
}

/// The vendor whose name leaf 0's EBX, EDX, ECX spell, if AMD or Intel.
pub fn vendor_of_leaf0(ebx: u32, edx: u32, ecx: u32) -> Option<Vendor> {
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&ebx.to_le_bytes());
    id[4..8].copy_from_slice(&edx.to_le_bytes());
    id[8..].copy_from_slice(&ecx.to_le_bytes());
    match &id {
        AMD_ID => Some(Vendor::Amd),
        INTEL_ID => Some(Vendor::Intel),
        _ => None,
    }
}

/// Presents `vendor` in leaf 0 (EBX, EDX, ECX), and in leaf 0x8000_0000,
/// which AMD fills with the same string and Intel leaves zero. Only the
/// name changes: features stay the host's, since the guest runs on it.
pub fn set_vendor(entries: &mut [kvm_cpuid_entry2], vendor: Vendor) {
    let id = match vendor {
        Vendor::Amd => AMD_ID,
        Vendor::Intel => INTEL_ID,
    };
    let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
    for e in entries.iter_mut() {
        let (ebx, edx, ecx) = match (e.function, vendor) {
            (0, _) | (0x8000_0000, Vendor::Amd) => (word(0), word(4), word(8)),
            (0x8000_0000, Vendor::Intel) => (0, 0, 0),
            _ => continue,
        };
        (e.ebx, e.edx, e.ecx) = (ebx, edx, ecx);
    }
}

/// KVM's paravirtual feature leaf (EAX: `KVM_FEATURE_*` bits).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_FEATURE_PV_SEND_IPI` and `KVM_FEATURE_PV_SCHED_YIELD`: IPIs and
/// yields by hypercall (`KVM_HC_SEND_IPI`, `KVM_HC_SCHED_YIELD`).
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// Hides the paravirtual features that work by hypercall from guest kernel
/// code. On the development hosts (nested kvm-pvm) a Linux guest's
/// `KVM_HC_SEND_IPI` never completes: with 2 vCPUs the woken CPU stopped at
/// the hypercall instruction in `kvm_hypercall4` (called by
/// `__send_ipi_mask`) while CPU 0 spun on a lock it held. Without the
/// feature Linux sends IPIs through the (in-kernel) local APIC, which works
/// everywhere; the yield hypercall takes the same path and goes too.
pub fn hide_kvm_hypercalls(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == KVM_CPUID_FEATURES)
    {
        e.eax &= !(KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
    }
}

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Sets APIC IDs and topology for vCPU `apic_id` of `num_cpus`.
pub fn apply_topology(entries: &mut [kvm_cpuid_entry2], apic_id: u8, num_cpus: u8) {
    let id = u32::from(apic_id);
    let n = u32::from(num_cpus);
    let core_bits = bits_for(n);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors.
                e.ebx = (e.ebx & 0xffff) | (id << 24) | (n.min(255) << 16);
                const EDX_HTT: u32 = 1 << 28;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1 (Intel).
                e.eax = (e.eax & 0x03ff_ffff) | ((n - 1) << 26);
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 threads (1 per core), level 1 cores.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // ECX[7:0]: cores - 1; [15:12]: APIC ID bits for cores (AMD).
                e.ecx = (e.ecx & !0xf0ff) | (n - 1) | (core_bits << 12);
            }
            0x8000_001e => {
                // Extended APIC ID, compute unit = core, one thread each.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0001_0800,
            ..Default::default()
        }
    }

    #[test]
    fn a_presented_vendor_reads_back_and_only_names_change() {
        let mut entries = [entry(0, 0), entry(1, 0), entry(0x8000_0000, 0)];
        entries[0].eax = 0x10;
        entries[2].eax = 0x8000_0022;
        set_vendor(&mut entries, Vendor::Amd);
        assert_eq!(vendor(&entries), Some(Vendor::Amd));
        assert_eq!(entries[2].ebx, entries[0].ebx);
        set_vendor(&mut entries, Vendor::Intel);
        assert_eq!(vendor(&entries), Some(Vendor::Intel));
        assert_eq!((entries[2].ebx, entries[2].ecx, entries[2].edx), (0, 0, 0));
        // Maximum leaves stay the host's; other leaves are untouched.
        assert_eq!((entries[0].eax, entries[2].eax), (0x10, 0x8000_0022));
        assert_eq!(entries[1], entry(1, 0));
    }

    #[test]
    fn hypercall_features_are_hidden_and_the_rest_kept() {
        // What the development hosts' KVM offers.
        let mut entries = [entry(KVM_CPUID_FEATURES, 0), entry(1, 0)];
        entries[0].eax = 0x0100_7efb;
        entries[1].eax = 0x0100_7efb;
        hide_kvm_hypercalls(&mut entries);
        assert_eq!(entries[0].eax, 0x0100_5efb & !KVM_FEATURE_PV_SEND_IPI);
        assert_eq!(entries[1].eax, 0x0100_7efb);
    }

    #[test]
    fn apic_ids_and_core_counts() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ];
        apply_topology(&mut e, 2, 3);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_eq!(e[1].edx, 2);
        assert_eq!((e[2].eax, e[2].ebx), (2, 3));
        assert_eq!(e[3].ecx & 0xff, 2);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
