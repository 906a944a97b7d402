//! A vCPU's state: everything KVM needs to resume this CPL-3 guest exactly where it stopped.
//!
//! Saved: general and special registers; the extended (XSAVE) state, which holds the x87,
//! SSE and AVX registers the scanner uses (the legacy FPU/SSE image only when KVM offers no
//! XSAVE); XCR0; a set of MSRs; pending events; debug registers; the MP state; the TSC rate.
//! No LAPIC: the VM has no in-kernel irqchip.
//!
//! MSRs: the ones a ring-3 guest's execution depends on or can observe — the TSC (and its
//! adjust), TSC_AUX (`rdtscp`/`rdpid`), the syscall MSRs (STAR, LSTAR, CSTAR, SFMASK),
//! KERNEL_GS_BASE, SYSENTER_*, PAT, MISC_ENABLE, MTRR default type and SPEC_CTRL (not XSS:
//! supervisor state, which this host's KVM reads but refuses to set for a guest without
//! XSAVES in its CPUID). (Cella's
//! guest does not enter ring 0, but these are cheap and make the restored vCPU exact.) KVM
//! reads MSRs in order and stops at the first it refuses; a refused MSR is skipped and listed
//! in [`VcpuState::msrs_refused`], and reading goes on with the next.
//!
//! **Parking.** Save on the vCPU's own thread, after a `KVM_RUN` that returned `EINTR` because
//! `immediate_exit` was set, following the last handled exit: KVM completes an exit's port or
//! MMIO access (advancing RIP, delivering `in` data) only on the next `KVM_RUN`, and that
//! completion is not part of any state it reports. Saved before it, the restored guest would
//! execute its last I/O instruction again.
//!
//! **Restore order.** CPUID is set when the vCPU is created (it decides which CR4 and XCR0
//! bits and MSRs are valid). Then: special registers (EFER, CR0/CR4: MSRs and XSAVE state are
//! checked against them), general registers, XSAVE (or FPU), XCRs, MSRs, debug registers, MP
//! state, and vCPU events last (they may carry a pending exception that refers to all the rest),
//! as QEMU and Firecracker do.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::cpu::CpuFeatures;
use super::SnapshotError;

/// The MSRs saved (see the module docs).
pub const MSRS: &[(u32, &str)] = &[
    (0x3b, "IA32_TSC_ADJUST"),
    (0x10, "IA32_TSC"),
    (0x48, "IA32_SPEC_CTRL"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"),
    (0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
];

/// One saved MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// The legacy x87/SSE image (`KVM_GET_FPU`), kept only when XSAVE is unavailable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Result<kvm_fpu, SnapshotError> {
        let bad = || SnapshotError::BadVcpuState("the FPU image has the wrong number of registers".into());
        Ok(kvm_fpu {
            fpr: self.fpr.clone().try_into().map_err(|_| bad())?,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self.xmm.clone().try_into().map_err(|_| bad())?,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// Everything saved about one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPU features the guest was given (and the host had): what a restore needs.
    pub features: CpuFeatures,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The 4 KiB `KVM_GET_XSAVE` area, as 1024 words; `None` if KVM offers no XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// The legacy FPU image; saved only when `xsave` is `None`.
    pub fpu: Option<FpuState>,
    /// XCR0 (`None` if KVM offers no XCRs).
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<MsrValue>,
    /// MSRs of [`MSRS`] that KVM refused to read on this host.
    pub msrs_refused: Vec<u32>,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    pub mp_state: Option<kvm_mp_state>,
    /// The guest's TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Reads the state of the parked vCPU `fd` (see the module docs for when).
pub fn save(fd: &VcpuFd) -> Result<VcpuState, SnapshotError> {
    let get = |what| move |source| SnapshotError::GetVcpu { what, source };
    let features = CpuFeatures::of_vcpu(fd)?;
    let mp_state = fd.get_mp_state().ok();
    let regs = fd.get_regs().map_err(get("general registers"))?;
    let sregs = fd.get_sregs().map_err(get("special registers"))?;
    let (xsave, fpu) = match fd.get_xsave() {
        Ok(area) => (Some(area.region.to_vec()), None),
        Err(_) => (None, Some(FpuState::from(&fd.get_fpu().map_err(get("FPU state"))?))),
    };
    let xcrs = fd.get_xcrs().ok();
    let debug_regs = fd.get_debug_regs().map_err(get("debug registers"))?;
    let (msrs, msrs_refused) = save_msrs(fd)?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let events = fd.get_vcpu_events().map_err(get("pending events"))?;
    Ok(VcpuState {
        features,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        msrs,
        msrs_refused,
        events,
        debug_regs,
        mp_state,
        tsc_khz,
    })
}

/// Reads [`MSRS`], skipping those KVM refuses.
fn save_msrs(fd: &VcpuFd) -> Result<(Vec<MsrValue>, Vec<u32>), SnapshotError> {
    let mut saved = Vec::new();
    let mut refused = Vec::new();
    let mut rest: Vec<u32> = MSRS.iter().map(|(index, _)| *index).collect();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|index| kvm_msr_entry { index: *index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::BadVcpuState("too many MSRs for one KVM_GET_MSRS".into()))?;
        let read =
            fd.get_msrs(&mut msrs).map_err(|source| SnapshotError::GetVcpu { what: "MSRs", source })?;
        saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue { index: e.index, data: e.data }));
        if read < rest.len() {
            refused.push(rest[read]);
        }
        rest.drain(..(read + 1).min(rest.len()));
    }
    Ok((saved, refused))
}

/// Loads `state` into the fresh vCPU `fd` (created with this host's CPUID), in the order KVM
/// needs (see the module docs). The caller has checked the CPU features.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), SnapshotError> {
    let set = |what| move |source| SnapshotError::SetVcpu { what, source };
    fd.set_sregs(&state.sregs).map_err(set("special registers"))?;
    fd.set_regs(&state.regs).map_err(set("general registers"))?;
    match (&state.xsave, &state.fpu) {
        (Some(words), _) => {
            let region: [u32; 1024] = words.clone().try_into().map_err(|_| {
                SnapshotError::BadVcpuState(format!("XSAVE area of {} words, need 1024", words.len()))
            })?;
            let area = kvm_xsave { region, ..Default::default() };
            // SAFETY: `area` is a full 4 KiB kvm_xsave; KVM_SET_XSAVE reads exactly that much (the
            // extra words only matter for KVM_SET_XSAVE2 areas, which this VMM does not use).
            unsafe { fd.set_xsave(&area) }.map_err(set("XSAVE state"))?;
        }
        (None, Some(fpu)) => fd.set_fpu(&fpu.to_kvm()?).map_err(set("FPU state"))?,
        (None, None) => return Err(SnapshotError::BadVcpuState("neither XSAVE nor FPU state saved".into())),
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(set("XCRs"))?;
    }
    if let Some(khz) = state.tsc_khz {
        // A different TSC rate would make the guest's time run fast or slow; ask KVM to scale.
        // Not every KVM can (this host's cannot): the guest only measures durations with the
        // TSC, so a refusal is not fatal.
        if fd.get_tsc_khz().ok() != Some(khz) {
            let _ = fd.set_tsc_khz(khz);
        }
    }
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() })
        .collect();
    if !entries.is_empty() {
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::BadVcpuState(format!("{} MSRs saved, too many", entries.len())))?;
        let written = fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if written < entries.len() {
            return Err(SnapshotError::SetMsr { index: entries[written].index });
        }
    }
    fd.set_debug_regs(&state.debug_regs).map_err(set("debug registers"))?;
    if let Some(mp_state) = state.mp_state {
        fd.set_mp_state(mp_state).map_err(set("MP state"))?;
    }
    fd.set_vcpu_events(&state.events).map_err(set("pending events"))?;
    Ok(())
}
