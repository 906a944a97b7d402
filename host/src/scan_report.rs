//! `cella-vmm scan --json`: the one line a scan prints, as a type. The CLI writes it and the
//! worker reads it back (`cella serve`), so the two ends agree by construction.

use cella_proto::ErrorReport;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::report::{GuestExit, ScrubReport};

/// What one scan did: how its VM ended and what it cost, the scrub evidence, and the result
/// (a summary, the artifact's refusal, or why there is none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    /// How the VM ended.
    pub exit: GuestExit,
    /// From the start of the launch to the guest's first VM exit, in µs.
    pub launch_us: u64,
    /// The guest's run, in µs.
    pub run_us: u64,
    /// The VM was built ahead of its launch (a spare, `cella-vmm spare`).
    pub built_ahead: bool,
    /// vCPUs the guest ran on (see [`crate::report::RunReport::vcpus`]).
    #[serde(default = "crate::report::one_vcpu")]
    pub vcpus: u32,
    /// From starting the VM to having the results, in ms.
    #[serde(default)]
    pub scan_ms: u64,
    /// The memory scrub's evidence.
    pub scrub: ScrubReport,
    /// The artifact scanned (its path on this host). This and its size are empty when the VMM
    /// scanned nothing: a `cella-vmm run --json` report (the VM part alone) reads as a scan
    /// report without a result, which is how tests stand a spinning VM in for a long scan.
    #[serde(default)]
    pub artifact: String,
    #[serde(default)]
    pub artifact_bytes: u64,
    /// The scan's time inside the VM, in ms (when the runner answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_vm_ms: Option<f64>,
    /// The scan engine's version, as the runner reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    /// The template the VM was restored from (its id), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The runner held the job's engine already (built in the template), so the policy was
    /// not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_preloaded: Option<bool>,
    /// Where the SARIF log was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sarif: Option<String>,
    /// The scan's summary (counts by rule, category, level, suppression), when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
    /// `--fail-on` and how many unsuppressed findings are at or above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_on: Option<FailOnGate>,
    /// The runner refused the artifact, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ErrorReport>,
    /// Why the scan has no result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The gate of `--fail-on`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailOnGate {
    pub level: String,
    /// The least confidence a finding needs to count (`--min-confidence`).
    #[serde(default)]
    pub min_confidence: Option<String>,
    pub unsuppressed_at_or_above: Option<u64>,
}

impl ScanReport {
    /// The report's line, as `--json` prints it.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The last line of `stdout` that is a scan report, if any.
    pub fn from_stdout(stdout: &str) -> Option<ScanReport> {
        stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ScanReport {
        ScanReport {
            exit: GuestExit::Exited { code: 0 },
            launch_us: 5000,
            run_us: 9000,
            built_ahead: false,
            vcpus: 1,
            scan_ms: 14,
            scrub: ScrubReport {
                bytes: 4096,
                pages_verified: 1,
                verified_zero: true,
                released: true,
                blocks_after_release: 0,
                mem_bytes: 1 << 27,
                ranges: 1,
                ms: 0.5,
            },
            artifact: "/tmp/a.tar".into(),
            artifact_bytes: 10240,
            in_vm_ms: Some(7.5),
            engine_version: Some("0.1.0".into()),
            template: None,
            policy_preloaded: Some(false),
            sarif: None,
            summary: Some(serde_json::json!({"findings": 2})),
            fail_on: Some(FailOnGate {
                level: "error".into(),
                min_confidence: Some("medium".into()),
                unsuppressed_at_or_above: Some(1),
            }),
            refused: None,
            error: None,
        }
    }

    #[test]
    fn a_report_reads_back_from_the_last_report_line_of_stdout() {
        let report = sample();
        let stdout = format!("{{\"not\": \"a report\"}}\n{}\n", report.to_line());
        assert_eq!(ScanReport::from_stdout(&stdout), Some(report.clone()));
        let text = report.to_line();
        assert!(!text.contains("\"refused\":") && !text.contains("\"error\":"), "{text}");
        assert_eq!(ScanReport::from_stdout("{\"exit\": 1}\nnot json\n"), None);
    }

    #[test]
    fn a_run_report_reads_as_a_scan_without_a_result() {
        let mut run = serde_json::to_value(sample()).unwrap();
        for key in
            ["scan_ms", "artifact", "artifact_bytes", "in_vm_ms", "engine_version", "summary", "fail_on"]
        {
            run.as_object_mut().unwrap().remove(key);
        }
        run["exit"] = serde_json::json!({"kind": "stopped"});
        run["exits"] = 12.into();
        let read = ScanReport::from_stdout(&run.to_string()).expect("a report");
        assert_eq!((read.exit, read.summary, read.artifact_bytes), (GuestExit::Stopped, None, 0));
        assert!(read.scrub.verified_zero);
    }
}
