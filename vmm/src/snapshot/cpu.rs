//! The CPU features a snapshot needs: a fingerprint of the CPUID the guest sees, plus the
//! instruction-set extensions the host CPU itself has (this host's KVM leaves SSE3–SSE4.2 out
//! of the CPUID it offers although ring-3 guest code uses them; see `vstate::vcpu`). A restore
//! refuses a host that lacks any of them, naming each.
//!
//! Both sides are read the same way: `KVM_GET_CPUID2` on a vCPU that was given KVM's supported
//! CPUID (at save, the saved vCPU; at restore, the new one before its state is loaded). On
//! this host (PVM) that differs from `KVM_GET_SUPPORTED_CPUID`: KVM merges in the host's own
//! bits, and what the vCPU reports is what the guest's `cpuid` returns.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// CPUID.1:ECX bits that describe the OS's set-up or the hypervisor, not the CPU: OSXSAVE (27)
/// and the hypervisor bit (31).
const LEAF1_ECX_DYNAMIC: u32 = (1 << 27) | (1 << 31);
/// CPUID.7.0:ECX bits that follow CR4: OSPKE (4).
const LEAF7_ECX_DYNAMIC: u32 = 1 << 4;

/// The features a guest could have used, as KVM offered them, and what the host CPU has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID.0 vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    pub leaf7_ebx: u32,
    pub leaf7_ecx: u32,
    pub leaf7_edx: u32,
    /// CPUID.0xD.0 EDX:EAX: the XSAVE state components (XCR0 bits) offered.
    pub xcr0_mask: u64,
    /// CPUID.0xD.0 ECX: the XSAVE area size for every offered component.
    pub xsave_size: u32,
    /// Instruction-set extensions the host CPU has (`is_x86_feature_detected!` names).
    pub host: Vec<String>,
}

impl CpuFeatures {
    /// The fingerprint of `cpuid` (a vCPU's, or KVM's supported CPUID) on this host.
    pub fn from_cpuid(cpuid: &CpuId) -> Self {
        let entry = |function: u32, index: u32| {
            cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
        };
        let mut f = CpuFeatures { host: host_features(), ..Default::default() };
        if let Some(e) = entry(0, 0) {
            let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            f.vendor = String::from_utf8_lossy(&bytes).into_owned();
        }
        if let Some(e) = entry(1, 0) {
            (f.leaf1_ecx, f.leaf1_edx) = (e.ecx & !LEAF1_ECX_DYNAMIC, e.edx);
        }
        if let Some(e) = entry(7, 0) {
            (f.leaf7_ebx, f.leaf7_ecx, f.leaf7_edx) = (e.ebx, e.ecx & !LEAF7_ECX_DYNAMIC, e.edx);
        }
        if let Some(e) = entry(0xD, 0) {
            f.xcr0_mask = u64::from(e.eax) | (u64::from(e.edx) << 32);
            f.xsave_size = e.ecx;
        }
        f
    }

    /// The fingerprint of what the vCPU `fd` reports (`KVM_GET_CPUID2`) on this host.
    pub fn of_vcpu(fd: &VcpuFd) -> Result<Self, SnapshotError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| SnapshotError::GetVcpu { what: "CPUID", source })?;
        Ok(Self::from_cpuid(&cpuid))
    }

    /// What `self` (a snapshot's needs) has that `host` lacks, by name.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        let mut missing = Vec::new();
        if self.vendor != host.vendor {
            missing.push(format!("a {} CPU (this host's is {})", self.vendor, host.vendor));
        }
        let words = [
            ("CPUID.1:ECX", self.leaf1_ecx, host.leaf1_ecx, LEAF1_ECX),
            ("CPUID.1:EDX", self.leaf1_edx, host.leaf1_edx, LEAF1_EDX),
            ("CPUID.7.0:EBX", self.leaf7_ebx, host.leaf7_ebx, LEAF7_EBX),
            ("CPUID.7.0:ECX", self.leaf7_ecx, host.leaf7_ecx, LEAF7_ECX),
            ("CPUID.7.0:EDX", self.leaf7_edx, host.leaf7_edx, &[]),
        ];
        for (register, needed, have, names) in words {
            missing.extend(missing_bits(u64::from(needed), u64::from(have), register, names));
        }
        missing.extend(missing_bits(self.xcr0_mask, host.xcr0_mask, "XCR0", XCR0));
        for feature in &self.host {
            if !host.host.contains(feature) {
                missing.push(feature.clone());
            }
        }
        missing
    }

    /// Refuses a host that lacks any of these features.
    pub fn check_on(&self, host: &CpuFeatures) -> Result<(), SnapshotError> {
        let missing = self.missing_on(host);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::CpuFeaturesMissing { missing: missing.join(", ") })
        }
    }
}

fn missing_bits(needed: u64, have: u64, register: &str, names: &[(u32, &str)]) -> Vec<String> {
    (0..64)
        .filter(|bit| needed & !have & (1u64 << bit) != 0)
        .map(|bit| match names.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => (*name).to_owned(),
            None => format!("{register}[bit {bit}]"),
        })
        .collect()
}

/// The host CPU's instruction-set extensions that guest code may use at ring 3.
fn host_features() -> Vec<String> {
    let mut have = Vec::new();
    macro_rules! detect {
        ($($name:tt),*) => {
            $(if std::arch::is_x86_feature_detected!($name) { have.push($name.to_owned()); })*
        };
    }
    detect!(
        "sse3",
        "ssse3",
        "sse4.1",
        "sse4.2",
        "popcnt",
        "pclmulqdq",
        "aes",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi1",
        "bmi2",
        "lzcnt",
        "movbe",
        "xsave",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "sha"
    );
    have
}

const LEAF1_ECX: &[(u32, &str)] = &[
    (0, "SSE3"),
    (1, "PCLMULQDQ"),
    (9, "SSSE3"),
    (12, "FMA"),
    (13, "CMPXCHG16B"),
    (19, "SSE4.1"),
    (20, "SSE4.2"),
    (22, "MOVBE"),
    (23, "POPCNT"),
    (25, "AES"),
    (26, "XSAVE"),
    (28, "AVX"),
    (29, "F16C"),
    (30, "RDRAND"),
];
const LEAF1_EDX: &[(u32, &str)] = &[
    (0, "FPU"),
    (4, "TSC"),
    (5, "MSR"),
    (15, "CMOV"),
    (19, "CLFLUSH"),
    (23, "MMX"),
    (24, "FXSR"),
    (25, "SSE"),
    (26, "SSE2"),
];
const LEAF7_EBX: &[(u32, &str)] = &[
    (0, "FSGSBASE"),
    (3, "BMI1"),
    (5, "AVX2"),
    (8, "BMI2"),
    (9, "ERMS"),
    (16, "AVX512F"),
    (17, "AVX512DQ"),
    (18, "RDSEED"),
    (19, "ADX"),
    (28, "AVX512CD"),
    (29, "SHA"),
    (30, "AVX512BW"),
    (31, "AVX512VL"),
];
const LEAF7_ECX: &[(u32, &str)] = &[
    (1, "AVX512_VBMI"),
    (8, "GFNI"),
    (9, "VAES"),
    (10, "VPCLMULQDQ"),
    (11, "AVX512_VNNI"),
    (14, "AVX512_VPOPCNTDQ"),
    (22, "RDPID"),
];
const XCR0: &[(u32, &str)] = &[
    (0, "XSAVE x87 state"),
    (1, "XSAVE SSE state"),
    (2, "XSAVE AVX state"),
    (5, "XSAVE AVX-512 opmask state"),
    (6, "XSAVE AVX-512 ZMM_Hi256 state"),
    (7, "XSAVE AVX-512 Hi16_ZMM state"),
    (9, "XSAVE PKRU state"),
    (17, "XSAVE AMX tile config"),
    (18, "XSAVE AMX tile data"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuFeatures {
        CpuFeatures {
            vendor: "GenuineIntel".into(),
            leaf1_ecx: (1 << 28) | (1 << 20),
            leaf1_edx: 1 << 26,
            leaf7_ebx: 1 << 5,
            leaf7_ecx: 0,
            leaf7_edx: 0,
            xcr0_mask: 0b111,
            xsave_size: 832,
            host: vec!["sse4.2".into(), "avx2".into()],
        }
    }

    #[test]
    fn a_host_with_the_same_features_passes() {
        assert!(sample().check_on(&sample()).is_ok());
    }

    #[test]
    fn missing_features_are_named() {
        let mut host = sample();
        host.leaf1_ecx &= !(1 << 28);
        host.leaf7_ebx = 0;
        host.xcr0_mask = 0b11;
        host.host.retain(|f| f != "avx2");
        host.leaf1_edx |= 1 << 25; // extra features on the host are fine
        let missing = sample().missing_on(&host);
        assert_eq!(missing, vec!["AVX", "AVX2", "XSAVE AVX state", "avx2"]);
        let err = sample().check_on(&host).unwrap_err().to_string();
        assert!(err.contains("lacks CPU features the snapshot was taken with: AVX, AVX2"), "{err}");
    }

    #[test]
    fn unnamed_bits_and_vendors_are_reported_too() {
        let mut needs = sample();
        needs.leaf7_edx = 1 << 3;
        let mut host = sample();
        host.vendor = "AuthenticAMD".into();
        let missing = needs.missing_on(&host);
        assert_eq!(missing, vec!["a GenuineIntel CPU (this host's is AuthenticAMD)", "CPUID.7.0:EDX[bit 3]"]);
    }
}
