//! `cella-vmm run` end to end against the real /dev/kvm: each guest mode, each exit kind,
//! the scrub evidence, the console bounds, and bad input.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn hello_prints_its_line_and_exits_zero() {
    let (output, report) = run_json(&[], &["hello"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stderr(&output).contains("hello from cella-runner\n"), "{}", stderr(&output));
    assert_eq!(report["exit"], serde_json::json!({"kind": "exited", "code": 0}));
    assert!(report["launch_us"].as_u64().unwrap() > 0);
    assert!(report["run_us"].as_u64().unwrap() > 0);
    assert_scrubbed(&report);
}

#[test]
fn exit_7_exits_7() {
    let (output, report) = run_json(&[], &["exit", "7"]);
    assert_eq!(code(&output), 7);
    assert_eq!(report["exit"], serde_json::json!({"kind": "exited", "code": 7}));
}

#[test]
fn exit_status_above_239_is_reported_exactly_in_json() {
    let (output, report) = run_json(&[], &["exit", "100000"]);
    assert_eq!(code(&output), 240);
    assert_eq!(report["exit"]["code"], 100_000);
}

#[test]
fn fault_is_reported_as_crashed_with_its_rip() {
    let (output, report) = run_json(&[], &["fault"]);
    assert_crashed_in_the_image(&output, &report);
}

/// The VM ended as crashed (exit 241) with a triple fault at a RIP inside the runner image,
/// and was scrubbed.
fn assert_crashed_in_the_image(output: &std::process::Output, report: &serde_json::Value) {
    assert_eq!(code(output), 241, "{}", stderr(output));
    assert_eq!(report["exit"]["kind"], "crashed", "{report}");
    assert!(report["exit"]["reason"].as_str().unwrap().contains("triple fault"), "{report}");
    let rip = report["exit"]["rip"].as_str().unwrap();
    let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16).unwrap();
    let image = cella_vmm::loader::GuestImage::open(&runner_image()).unwrap();
    assert!((image.start()..image.end()).contains(&rip), "rip {rip:#x} outside the image");
    assert_scrubbed(report);
}

#[test]
fn spin_times_out_within_a_small_margin() {
    let started = Instant::now();
    let (output, report) = run_json(&["--timeout-ms", "500"], &["spin"]);
    let wall = started.elapsed();
    assert_eq!(code(&output), 242, "{}", stderr(&output));
    assert_eq!(report["exit"], serde_json::json!({"kind": "timed_out", "timeout_ms": 500}));
    let run = Duration::from_micros(report["run_us"].as_u64().unwrap());
    // run_us starts at the first KVM_RUN, the deadline when the vCPU thread is started.
    assert!(run >= Duration::from_millis(450) && run < Duration::from_millis(650), "ran {run:?}");
    assert!(wall < Duration::from_millis(1500), "whole process took {wall:?}");
    assert_scrubbed(&report);
}

#[test]
fn fill_canary_leaves_every_touched_page_verified_zero_and_released() {
    let (output, report) = run_json(&["--mem-mib", "64"], &["fill-canary"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stderr(&output).contains("with the canary"));
    assert_scrubbed(&report);
    let bytes = report["scrub"]["bytes"].as_u64().unwrap();
    // The heap is all of memory but the 2 MiB below the image and the 1 MiB stack.
    assert!(bytes >= 60 << 20, "only {bytes} bytes scrubbed after filling a 61 MiB heap");
}

#[test]
fn scrub_cost_follows_touched_memory_not_guest_size() {
    let (_, small) = run_json(&["--mem-mib", "64"], &["hello"]);
    let (_, huge) = run_json(&["--mem-mib", "16384"], &["hello"]);
    let (a, b) = (small["scrub"]["bytes"].as_u64().unwrap(), huge["scrub"]["bytes"].as_u64().unwrap());
    assert!(b < 1 << 20, "a 16 GiB hello scrubbed {b} bytes");
    assert!(b <= a + (256 << 10), "16 GiB scrubbed {b}, 64 MiB scrubbed {a}");
    assert_eq!(huge["scrub"]["mem_bytes"], 16u64 << 30);
}

#[test]
fn sigterm_stops_the_vm_and_still_scrubs() {
    let child = cella_vmm(&["run", "--json", "--", "spin"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    assert_eq!(code(&output), 244, "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["exit"]["kind"], "stopped");
    assert_scrubbed(&report);
}

#[test]
fn console_flood_is_bounded_and_the_drop_is_reported() {
    let (output, report) = run_json(&[], &["flood", "2000"]);
    assert_eq!(code(&output), 0);
    let (passed, dropped) =
        (report["console"]["bytes"].as_u64().unwrap(), report["console"]["dropped"].as_u64().unwrap());
    assert!(passed <= (256 << 10) + (64 << 10), "passed {passed} bytes of an 8 MB flood");
    assert!(dropped >= 7 << 20, "dropped only {dropped}");
    let err = stderr(&output);
    assert!(err.contains("guest console over its limit"), "no drop note");
    assert!(err.len() < 512 << 10, "stderr grew to {} bytes", err.len());
}

#[test]
fn unknown_guest_mode_gets_the_runner_usage() {
    let (output, report) = run_json(&[], &["jump"]);
    assert_eq!(code(&output), 121);
    assert_eq!(report["exit"]["code"], 121);
    assert!(stderr(&output).contains("unknown mode `jump`"), "{}", stderr(&output));
}

#[test]
fn missing_image_is_refused_with_its_path() {
    let output = cella_vmm(&["run", "--image", "/nonexistent/runner", "--", "hello"]).output().unwrap();
    assert_eq!(code(&output), 2);
    let err = stderr(&output);
    assert!(err.contains("cannot read guest image /nonexistent/runner"), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn log_lines_are_text_by_default_and_json_objects_on_request() {
    let refused = |extra: &[&str], env: Option<&str>| {
        let mut command =
            cella_vmm(&[&["run", "--image", "/nonexistent/runner"], extra, &["--", "hello"]].concat());
        command.env_remove(cella_log::FORMAT_ENV).env_remove(cella_log::FILTER_ENV);
        if let Some(format) = env {
            command.env(cella_log::FORMAT_ENV, format);
        }
        let output = command.output().unwrap();
        assert_eq!(code(&output), 2, "{}", stderr(&output));
        stderr(&output)
    };
    let text = refused(&[], None);
    assert!(
        text.starts_with("cella-vmm: error: bad guest image: cannot read guest image /nonexistent/runner")
    );
    for json in [refused(&["--log-format", "json"], None), refused(&[], Some("json"))] {
        let line: serde_json::Value =
            serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(line["level"], "ERROR", "{line}");
        assert!(line["message"]
            .as_str()
            .unwrap()
            .starts_with("bad guest image: cannot read guest image /nonexistent"));
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
    // A filter above error writes nothing; a bad filter or format is refused by name.
    assert_eq!(refused(&["--log-filter", "off"], None), "");
    let bad = cella_vmm(&["--log-filter", "loud", "run", "--", "hello"]).output().unwrap();
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("`loud` is not a level"), "{}", stderr(&bad));
    let bad = cella_vmm(&["run", "--", "hello"]).env(cella_log::FORMAT_ENV, "xml").output().unwrap();
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("`xml` is not a log format"), "{}", stderr(&bad));
}

#[test]
fn a_file_that_is_not_an_elf_is_refused() {
    let dir = scratch("not-elf");
    let path = dir.join("script.sh");
    std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
    let output = cella_vmm(&["run", "--image", path.to_str().unwrap(), "--", "hello"]).output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("is not an ELF file"), "{}", stderr(&output));
}

#[test]
fn an_elf_that_does_not_fit_in_guest_memory_is_refused() {
    let dir = scratch("too-big");
    let path = dir.join("big.elf");
    write_elf(&path, 64 << 20);
    let output = cella_vmm(&["run", "--mem-mib", "32", "--image", path.to_str().unwrap(), "--", "hello"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 2);
    let err = stderr(&output);
    assert!(err.contains("needs at least 68 MiB of guest memory, but the VM has 32 MiB"), "{err}");
}

#[test]
fn absurd_mem_mib_is_refused() {
    for mib in ["0", "4", "1000000000"] {
        let output = cella_vmm(&["run", "--mem-mib", mib, "--", "hello"]).output().unwrap();
        assert_eq!(code(&output), 2, "--mem-mib {mib}");
        let err = stderr(&output);
        assert!(err.contains(&format!("guest memory of {mib} MiB is out of range")), "{err}");
    }
    let output = cella_vmm(&["run", "--mem-mib", "lots", "--", "hello"]).output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("invalid value 'lots'"));
}

#[test]
fn help_documents_the_exit_codes() {
    let output = cella_vmm(&["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for line in
        ["241    the guest crashed", "242    the guest ran past --timeout-ms", "243    the VMM failed"]
    {
        assert!(text.contains(line), "--help lacks {line:?}:\n{text}");
    }
}

/// A disk large enough for the VMM to give the VM a helper vCPU (8 MiB and more), or not.
fn helper_disk(name: &str, bytes: u64) -> std::path::PathBuf {
    let path = scratch(name).join("disk");
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

#[test]
fn a_vm_with_a_large_disk_runs_guest_code_on_a_helper_vcpu_too() {
    let sums = |name: &str, bytes: u64, vcpus: u64| -> (u64, u64) {
        let disk = helper_disk(name, bytes);
        let (output, report) = run_json(&["--disk", disk.to_str().unwrap()], &["helper", "sum"]);
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        assert_eq!(report["vcpus"], vcpus, "{report}");
        assert_scrubbed(&report);
        let text = stderr(&output);
        let line = text.lines().find_map(|l| l.strip_prefix(&format!("vcpus {vcpus}: sums ")));
        let sums: Vec<u64> = line
            .unwrap_or_else(|| panic!("no sums: {text}"))
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        (sums[0], sums[1])
    };
    // One vCPU adds the whole series; with a helper, each adds its share, together all of it.
    let (whole, none) = sums("helper-small", 1 << 20, 1);
    assert_eq!(none, 0);
    let (boot, helper) = sums("helper-large", 8 << 20, 2);
    assert!(boot > 0 && helper > 0, "{boot} {helper}");
    assert_eq!(boot.wrapping_add(helper), whole);
}

#[test]
fn a_fault_on_the_helper_vcpu_ends_the_vm_as_crashed() {
    let disk = helper_disk("helper-fault", 8 << 20);
    let (output, report) = run_json(&["--disk", disk.to_str().unwrap()], &["helper", "fault"]);
    assert_eq!(report["vcpus"], 2);
    assert_crashed_in_the_image(&output, &report);
}

#[test]
fn a_helper_vcpu_that_spins_forever_times_out_with_the_vm() {
    let disk = helper_disk("helper-spin", 8 << 20);
    let started = Instant::now();
    let (output, report) =
        run_json(&["--disk", disk.to_str().unwrap(), "--timeout-ms", "500"], &["helper", "spin"]);
    assert_eq!(code(&output), 242, "{}", stderr(&output));
    assert_eq!(report["exit"], serde_json::json!({"kind": "timed_out", "timeout_ms": 500}));
    assert_eq!(report["vcpus"], 2);
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
    assert_scrubbed(&report);
}
