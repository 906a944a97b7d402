//! `bench snapshot`: what a snapshot costs, for the figures in the sessions issue. For each
//! memory size: build a runner VM (`hello`), fill some MiB of its memory with non-zero pages,
//! save its vCPU and devices, [`create`] the snapshot (time, on-disk size), [`load`] it (time),
//! run the restored VM to its exit, and remove the snapshot.
//!
//! Also the VM "parts" builder the snapshot tests use: the builder's steps with the vCPU left
//! as a bare `VcpuFd`, so a test can run it by hand and stop it at a chosen exit.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{create, load, remove, vcpu_state, RestoreOptions, SnapshotError, SnapshotMeta};
use crate::builder::BuildError;
use crate::devices::IoBus;
use crate::microvm::{GuestExit, RunError};
use crate::vmm_config::VmConfig;
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vm::Vm;

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot build the VM to snapshot")]
    Build(#[from] BuildError),
    #[error("snapshot failed")]
    Snapshot(#[from] SnapshotError),
    #[error("the restored VM failed")]
    Run(#[from] RunError),
    #[error("the restored VM ended with {0:?}, not exit 0")]
    Exit(GuestExit),
}

/// One row of the benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub mem_mib: u64,
    /// MiB of guest memory filled with non-zero pages before the snapshot.
    pub touched_mib: u64,
    /// `snapshot::create`, all of it (memory file, state file, fsyncs, renames).
    pub create_ms: f64,
    pub memory_ms: f64,
    pub state_ms: f64,
    pub state_bytes: u64,
    /// What `memory.bin` occupies on disk.
    pub memory_disk_bytes: u64,
    /// `snapshot::load`: state file read and checked, VM, memory mapped, vCPU, devices.
    pub load_ms: f64,
    /// From the start of `load` to the restored guest's first VM exit.
    pub restore_to_first_exit_ms: f64,
    /// `snapshot::remove`.
    pub remove_ms: f64,
    /// For comparison: a cold `build` + `run` of the same VM, from the start of `build` to the
    /// guest's first VM exit.
    pub cold_launch_to_first_exit_ms: f64,
}

/// Runs the benchmark for each `(mem_mib, touched_mib)` with the runner image `image`, writing
/// snapshots under `dir`.
pub fn run(image: &Path, dir: &Path, sizes: &[(u64, u64)]) -> Result<Vec<BenchRow>, BenchError> {
    let mut rows = Vec::new();
    for &(mem_mib, touched_mib) in sizes {
        let config = VmConfig { mem_mib, ..VmConfig::new(image, vec!["hello".into()]) };
        let parts = build_parts(&config, Box::new(std::io::sink()))?;
        touch(&parts.memory, 16 << 20, touched_mib << 20);
        let snap_dir = dir.join(format!("bench-{mem_mib}"));
        let state = vcpu_state::save(&parts.vcpu)?;
        let info = create(&snap_dir, state, &parts.bus, &parts.memory, SnapshotMeta::default())?;
        drop(parts);

        let started = Instant::now();
        let mut opts = RestoreOptions::new(Box::new(std::io::sink()));
        opts.launch_start = started;
        let vm = load(&snap_dir, opts)?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let report = vm.run()?;
        if report.exit != (GuestExit::Exited { code: 0 }) {
            return Err(BenchError::Exit(report.exit));
        }
        let removed = remove(&snap_dir)?;
        let cold_config = VmConfig { launch_start: Instant::now(), ..config };
        let cold = crate::build(&cold_config, Box::new(std::io::sink()))?.run()?;
        rows.push(BenchRow {
            mem_mib,
            touched_mib,
            create_ms: info.total_ms,
            memory_ms: info.memory_ms,
            state_ms: info.state_ms,
            state_bytes: info.state_bytes,
            memory_disk_bytes: info.memory_disk_bytes,
            load_ms,
            restore_to_first_exit_ms: report.launch_us as f64 / 1e3,
            remove_ms: removed.ms,
            cold_launch_to_first_exit_ms: cold.launch_us as f64 / 1e3,
        });
    }
    Ok(rows)
}

/// The rows as a table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "mem MiB  touched MiB  create ms  (memory ms  state ms)  state B  memory.bin on disk  load ms  \
         restore->first exit ms  cold launch->first exit ms  remove ms\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{:>7}  {:>11}  {:>9.1}  ({:>9.1}  {:>8.2})  {:>7}  {:>15.1} MiB  {:>7.2}  {:>22.2}  {:>26.2}  {:>9.1}\n",
            r.mem_mib,
            r.touched_mib,
            r.create_ms,
            r.memory_ms,
            r.state_ms,
            r.state_bytes,
            r.memory_disk_bytes as f64 / (1 << 20) as f64,
            r.load_ms,
            r.restore_to_first_exit_ms,
            r.cold_launch_to_first_exit_ms,
            r.remove_ms,
        ));
    }
    out
}

/// Fills `len` bytes of guest memory from `start` with non-zero, page-distinct bytes.
pub(crate) fn touch(memory: &GuestMemfd, start: u64, len: u64) {
    let mut page = vec![0u8; 4096];
    let mut at = start;
    while at < start + len && at + 4096 <= memory.size() {
        page.fill((at >> 12) as u8 | 1);
        page[..8].copy_from_slice(&at.to_le_bytes());
        let _ = memory.memory().write_slice(&page, GuestAddress(at));
        at += 4096;
    }
}

/// A built VM before it runs, with its vCPU as a bare `VcpuFd`.
#[derive(Debug)]
pub(crate) struct Parts {
    pub vcpu: VcpuFd,
    /// Held for the vCPU (dropped after it, before the memory is scrubbed).
    pub _vm: Vm,
    pub memory: GuestMemfd,
    pub bus: Arc<IoBus>,
}

/// `builder::build` stopping short of `MicroVm`, with the vCPU as a bare `VcpuFd` to run by
/// hand.
pub(crate) fn build_parts(
    config: &VmConfig,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Parts, BuildError> {
    let parts = crate::builder::build_parts(config, console)?;
    Ok(Parts { vcpu: parts.vcpu.into_fd(), _vm: parts.vm, memory: parts.memory, bus: parts.bus })
}
