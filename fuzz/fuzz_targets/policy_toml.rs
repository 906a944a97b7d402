//! The rule-pack loader (`cella_policies::rules`): a pack file parsed and validated
//! (`parse_pack`, every regex compiled), combined into a policy (`compile`), and the policy the
//! host would send loaded as the guest loads it (`Engine::from_policy_json`) and used for a
//! scan: whatever the host accepts, the guest must load and run.
#![no_main]

use cella_policies::rules::{compile, parse_pack};
use cella_scan::{Engine, Report};

const SAMPLE: &[u8] = b"aws_access_key_id = AKIAIOSFODNN7EXAMPLE\nmail bob@example.org, SSN 078-05-1120\n\
SPDX-License-Identifier: GPL-3.0-only\nghp_0123456789abcdefghijklmnopqrstuvwxyzAB\n";

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(pack) = parse_pack("fuzz.toml", text) else { return };
    let Ok(policy) = compile(&[pack]) else { return };
    let mut engine =
        Engine::from_policy_json(policy.as_bytes()).expect("a policy the host compiled loads in the guest");
    let mut report = Report::default();
    let limits = cella_scan::Limits { max_findings: 100, ..cella_scan::Limits::default() };
    engine.scan_file("sample.txt", SAMPLE, &mut report, &limits).expect("a policy the host compiled scans");
    let _ = cella_scan::sarif::to_json(engine.policy(), &report, &cella_scan::sarif::RunDetails::default());
});
