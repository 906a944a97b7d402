//! `cella-vmm scan` end to end: the artifact goes in as the VM's disk, the policy over vsock,
//! and SARIF and the summary come back; hostile archives are refused inside the VM.

mod common;

use common::*;

fn scan(args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let mut all = vec!["scan", "--json"];
    all.extend_from_slice(args);
    let output = cella_vmm(&all).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON; stderr: {}", stderr(&output)));
    (output.clone(), serde_json::from_str(last).unwrap())
}

const PLANTED: &[u8] = b"config:\n  stripe_key = \"sk_live_4eC39HqLyjWDarjtT1zdp7dc\"\n  card: 4111 1111 1111 1111\n// SPDX-License-Identifier: Apache-2.0\n";

#[test]
fn scans_a_tarball_and_returns_sarif_and_a_summary() {
    let dir = scratch("scan-ok");
    let artifact = dir.join("app.tar");
    std::fs::write(&artifact, tar(&[("app/settings.yaml", PLANTED), ("app/README", b"nothing to see\n")]))
        .unwrap();
    let sarif_path = dir.join("out.sarif");
    let (output, result) =
        scan(&["--artifact", artifact.to_str().unwrap(), "--sarif", sarif_path.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let summary = &result["summary"];
    assert_eq!(summary["files_scanned"], 2, "{summary}");
    for category in ["secret", "pii", "license"] {
        assert!(summary["by_category"][category].as_u64().unwrap() >= 1, "no {category} finding: {summary}");
    }
    assert_scrubbed(&result);
    let sarif: serde_json::Value = serde_json::from_slice(&std::fs::read(&sarif_path).unwrap()).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len() as u64, summary["findings"].as_u64().unwrap());
    let text = std::fs::read_to_string(&sarif_path).unwrap();
    assert!(!text.contains("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), "SARIF carries the full secret");
    assert!(results.iter().all(|r| r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        .as_str()
        .unwrap()
        .starts_with("app/")));
}

#[test]
fn a_path_traversal_entry_is_refused_inside_the_vm_naming_the_entry() {
    let dir = scratch("scan-traversal");
    let artifact = dir.join("evil.tar");
    std::fs::write(&artifact, tar(&[("../../etc/passwd", b"root:x:0:0\n")])).unwrap();
    let (output, result) = scan(&["--artifact", artifact.to_str().unwrap()]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert_eq!(result["refused"]["kind"], "artifact");
    let message = result["refused"]["message"].as_str().unwrap();
    assert!(message.contains("../../etc/passwd"), "{message}");
    assert_scrubbed(&result);
}

#[test]
fn a_damaged_jar_inside_is_skipped_and_named_and_the_rest_is_scanned() {
    let dir = scratch("scan-skipped");
    let artifact = dir.join("app.tar");
    let jar = b"PK\x03\x04 not really a zip: no central directory at all ".repeat(20);
    std::fs::write(&artifact, tar(&[("lib/broken.jar", &jar), ("app/settings.yaml", PLANTED)])).unwrap();
    let sarif_path = dir.join("out.sarif");
    let (output, result) =
        scan(&["--artifact", artifact.to_str().unwrap(), "--sarif", sarif_path.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let summary = &result["summary"];
    assert_eq!(summary["entries_skipped"], 1, "{summary}");
    assert_eq!(summary["skipped"][0]["path"], "lib/broken.jar", "{summary}");
    assert!(summary["by_category"]["secret"].as_u64().unwrap() >= 1, "{summary}");
    let sarif: serde_json::Value = serde_json::from_slice(&std::fs::read(&sarif_path).unwrap()).unwrap();
    let note = &sarif["runs"][0]["invocations"][0]["toolExecutionNotifications"][0];
    assert_eq!(note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"], "lib/broken.jar");
    assert!(note["message"]["text"].as_str().unwrap().contains("lib/broken.jar"), "{note}");
    assert_scrubbed(&result);
}

#[test]
fn a_truncated_archive_is_refused() {
    let dir = scratch("scan-truncated");
    let artifact = dir.join("cut.tar");
    let mut bytes = tar(&[("a.txt", &[b'x'; 5000])]);
    bytes.truncate(1500);
    std::fs::write(&artifact, bytes).unwrap();
    let (output, result) = scan(&["--artifact", artifact.to_str().unwrap()]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert_eq!(result["refused"]["kind"], "artifact");
}

#[test]
fn unknown_policy_and_missing_artifact_are_refused_before_launch() {
    let output = cella_vmm(&["scan", "--artifact", "/nonexistent.tar"]).output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("cannot read artifact /nonexistent.tar"), "{}", stderr(&output));
    let dir = scratch("scan-policy");
    let artifact = dir.join("a.txt");
    std::fs::write(&artifact, "hi\n").unwrap();
    let output = cella_vmm(&["scan", "--artifact", artifact.to_str().unwrap(), "--policy", "secrets,gdpr"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("unknown rule pack `gdpr`"), "{}", stderr(&output));
}

#[test]
fn a_small_scan_touches_little_guest_memory() {
    let dir = scratch("scan-small");
    let artifact = dir.join("app.tar");
    std::fs::write(&artifact, tar(&[("app/settings.yaml", PLANTED)])).unwrap();
    let (output, result) = scan(&["--artifact", artifact.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_scrubbed(&result);
    // The image (~1.6 MiB) plus what the runner really uses: large zeroed buffers (disk window,
    // vsock receive buffers, the engine's chunk) come from untouched memory, and a small
    // artifact is scanned without building the line filter. It was 11 MB when every buffer
    // was filled with zeros and every rule compiled; 3–4 MB with the 71 built-in rules, 5.4 MB
    // with the 438 (the serialized policy is 280 KiB, and the keyword automaton of every rule
    // is built when the engine is); 7.1 MB since the image holds the SPDX License List's texts
    // (0.96 MiB compressed) and their anchors, which a file with a trigger word parses (the
    // texts themselves are inflated only when a candidate text needs comparing).
    let bytes = result["scrub"]["bytes"].as_u64().unwrap();
    assert!(bytes < 8 << 20, "a 1-file scan touched {bytes} bytes of guest memory");
}

#[test]
fn a_policy_file_is_validated_in_full_before_launch() {
    let dir = scratch("scan-policy-file");
    let artifact = dir.join("a.txt");
    std::fs::write(&artifact, "hi\n").unwrap();
    let pack = dir.join("tenant.toml");
    let rule = "[[rules]]\nid = \"acme\"\ndescription = \"ACME token\"\nregex = '''acme_([a-z]{16}'''\nkeywords = [\"acme_\"]\nhelp = \"Revoke it.\"\n";
    std::fs::write(
        &pack,
        format!("[pack]\nname = \"tenant\"\ncategory = \"secret\"\nseverity = \"error\"\n\n{rule}"),
    )
    .unwrap();
    let args = ["scan", "--artifact", artifact.to_str().unwrap(), "--policy-file", pack.to_str().unwrap()];
    let output = cella_vmm(&args).output().unwrap();
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(stderr(&output).contains("rule `acme`: regex does not compile"), "{}", stderr(&output));
    // The same pack, fixed, scans.
    std::fs::write(&pack, std::fs::read_to_string(&pack).unwrap().replace("{16}'''", "{16})'''")).unwrap();
    let (output, result) =
        scan(&["--artifact", artifact.to_str().unwrap(), "--policy-file", pack.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_scrubbed(&result);
}

#[test]
fn sigterm_stops_a_scan_and_its_memory_is_still_scrubbed() {
    let dir = scratch("scan-sigterm");
    // 64 GiB that cost no disk (a line, then a hole): the runner reads it for many seconds.
    let artifact = dir.join("long.txt");
    std::fs::write(&artifact, "plain text, then nothing\n").unwrap();
    std::fs::OpenOptions::new().write(true).open(&artifact).unwrap().set_len(64 << 30).unwrap();
    let child =
        cella_vmm(&["scan", "--json", "--timeout-ms", "120000", "--artifact", artifact.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    // Past the launch (policy compile and VM build take well under this here).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(code(&output), 244, "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["exit"]["kind"], "stopped", "{result}");
    assert_scrubbed(&result);
}

#[test]
fn a_compiled_policy_file_is_used_as_it_is() {
    use cella_policies::rules::tenant::{stored_pack, tenant_policy};
    let dir = scratch("scan-compiled-policy");
    let artifact = dir.join("a.txt");
    std::fs::write(
        &artifact,
        "deploy: acme_qwertyuiopasdfgh\nstripe_key = \"sk_live_4eC39HqLyjWDarjtT1zdp7dc\"\n",
    )
    .unwrap();
    let pack = "[pack]\nname = \"tenant\"\ncategory = \"secret\"\nseverity = \"error\"\n\n[[rules]]\nid = \"acme\"\ndescription = \"ACME token\"\nregex = '''acme_([a-z]{16})'''\nsecret_group = 1\nkeywords = [\"acme_\"]\nhelp = \"Revoke it.\"\n";
    let policy = tenant_policy(&["pii"], vec![stored_pack("tenant@2", pack).unwrap()]).unwrap();
    let file = dir.join("policy.json");
    std::fs::write(&file, policy.as_bytes()).unwrap();
    let (output, result) =
        scan(&["--artifact", artifact.to_str().unwrap(), "--compiled-policy", file.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    // Only the compiled policy's rules ran: the tenant's rule found its token, and the Stripe
    // key (a rule of `secrets`, not in this policy) went unreported.
    assert_eq!(result["summary"]["findings"], 1, "{result}");
    assert_eq!(result["summary"]["by_rule"]["acme"], 1, "{result}");
    assert_scrubbed(&result);
    // Not a policy: refused before launch.
    std::fs::write(&file, b"{\"format_version\": 1}").unwrap();
    let args =
        ["scan", "--artifact", artifact.to_str().unwrap(), "--compiled-policy", file.to_str().unwrap()];
    let output = cella_vmm(&args).output().unwrap();
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(stderr(&output).contains("policy.json"), "{}", stderr(&output));
}

/// `text`'s words re-wrapped at `width` columns.
fn rewrapped(text: &[u8], width: usize) -> Vec<u8> {
    let mut out = String::new();
    let mut column = 0;
    for word in String::from_utf8_lossy(text).split_whitespace() {
        if column > 0 && column + word.len() > width {
            out.push('\n');
            column = 0;
        }
        out.push_str(word);
        out.push(' ');
        column += word.len() + 1;
    }
    out.into_bytes()
}

#[test]
fn license_texts_are_found_whole_with_a_score_inside_the_vm() {
    let shipped = cella_scan::license_text::shipped();
    let text = |id: &str| {
        shipped.iter().find(|t| t.0 == id).unwrap_or_else(|| panic!("{id} not shipped")).1.as_slice()
    };
    // A third-party notices file: every shipped text one after another (5 MB).
    let mut notices = Vec::new();
    for (_, t, _) in &shipped {
        notices.extend_from_slice(t);
        notices.extend_from_slice(b"\n\n----------------------------------------\n\n");
    }
    let dir = scratch("scan-license-texts");
    let artifact = dir.join("app.tar");
    let files = [
        ("app/LICENSE", rewrapped(text("MIT"), 50)),
        ("app/vendor/codec/COPYING", text("GPL-3.0-only").to_vec()),
        ("app/THIRD-PARTY-NOTICES", notices),
    ];
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    std::fs::write(&artifact, tar(&files)).unwrap();
    let sarif_path = dir.join("out.sarif");
    let (output, result) =
        scan(&["--artifact", artifact.to_str().unwrap(), "--sarif", sarif_path.to_str().unwrap()]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_scrubbed(&result);
    let sarif: serde_json::Value = serde_json::from_slice(&std::fs::read(&sarif_path).unwrap()).unwrap();
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    let found = |path: &str| -> Vec<(String, u64)> {
        results
            .iter()
            .filter(|r| r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == path)
            .filter(|r| r["ruleId"] == "license-text")
            .map(|r| {
                let message = r["message"]["text"].as_str().unwrap();
                let id = message.split("license ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
                (id, r["properties"]["licenseScore"].as_u64().unwrap())
            })
            .collect()
    };
    // Re-wrapped, the title and copyright lines run into the text: a few words more than the
    // list's text has.
    let mit = found("app/LICENSE");
    assert!(mit.len() == 1 && mit[0].0 == "MIT" && mit[0].1 >= 95, "{mit:?}");
    assert_eq!(found("app/vendor/codec/COPYING"), [("GPL-3.0".to_owned(), 100)]);
    // The opening-lines rules give way to the whole texts found over them.
    let opening: Vec<_> = results
        .iter()
        .filter(|r| r["ruleId"].as_str().unwrap().starts_with("license-text-"))
        .filter(|r| {
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] != "app/THIRD-PARTY-NOTICES"
        })
        .collect();
    assert!(opening.is_empty(), "{opening:?}");
    // Hundreds of texts in one file: each found in its place, as itself.
    let notices = found("app/THIRD-PARTY-NOTICES");
    assert!(notices.len() > 600, "{} texts found in the notices file", notices.len());
    assert!(notices.iter().all(|(_, score)| *score >= 80), "{notices:?}");
}
