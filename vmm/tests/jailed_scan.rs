//! `cella-vmm scan --jailed` end to end, against the real jailer: the VMM is a spare in its
//! cell, the job is served by the outer process over the channel it handed the VMM with the
//! artifact. Every test checks that no jail folder, mount, cgroup or socket folder (the spare's
//! control socket's) is left behind.
//!
//! The jail needs a statically linked `cella-vmm` and `cella-jailer`; [`binaries`] builds both
//! once per run (into this target folder) before any test starts a process.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A uid/gid pair for jailed VMMs in these tests (distinct from the jailer tests' 64001/64002).
const UID: u32 = 64_011;
const GID: u32 = 64_012;

/// The jailer and static VMM these tests run (see `common::jail_binaries`).
fn binaries() -> &'static JailBinaries {
    jail_binaries("jailed-scan-tests")
}

/// A fresh chroot base for one test (the jailer creates it).
fn chroot_base(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jails").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One scan's setup: its chroot base and the folder the outer process makes its socket folder in
/// (its `TMPDIR`), so the test can see that both end up empty.
struct Cell {
    base: PathBuf,
    tmp: PathBuf,
}

impl Cell {
    fn new(test: &str) -> Cell {
        let tmp = scratch(&format!("{test}-tmp"));
        Cell { base: chroot_base(test), tmp }
    }

    /// `cella-vmm scan --json --jailed ...` with this test's jailer, static VMM and chroot base.
    fn scan(&self, uid: u32, gid: u32, args: &[&str]) -> Command {
        let b = binaries();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cella-vmm"));
        command.args(["scan", "--json", "--jailed", "--jailer"]).arg(&b.jailer);
        command.arg("--vmm-binary").arg(&b.static_vmm).arg("--chroot-base").arg(&self.base);
        command.args(["--jail-uid", &uid.to_string(), "--jail-gid", &gid.to_string()]);
        command.args(args).env("TMPDIR", &self.tmp).stdin(Stdio::null());
        command
    }

    /// Asserts that nothing of the jail `id` is left: no jail folder, mount or cgroup, and no
    /// socket folder.
    fn assert_clean(&self, id: &str) {
        assert_eq!(residue(&self.base, id), Vec::<String>::new());
        let left: Vec<_> =
            std::fs::read_dir(&self.tmp).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
        assert_eq!(left, Vec::<PathBuf>::new(), "socket folders left behind");
    }
}

/// The output and the JSON report (last stdout line) of a finished scan.
fn report(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON; stderr: {}", stderr(output)));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON {last:?}: {e}"))
}

/// Everything the jail under `base` with this id might have left: its folder, mounts under
/// `base`, and cgroups named `id` (the jailer's parent cgroup is its own + `/cella`).
fn residue(base: &Path, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(base.join("cella-vmm")) {
        found.extend(entries.filter_map(|e| e.ok()).map(|e| format!("jail folder {}", e.path().display())));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let base_text = base.display().to_string();
    found.extend(mountinfo.lines().filter(|l| l.contains(&base_text)).map(|l| format!("mount {l}")));
    for parent in cella_e2e::cgroup_parents() {
        let cgroup = parent.join(id);
        if cgroup.exists() {
            found.push(format!("cgroup {}", cgroup.display()));
        }
    }
    found
}

/// `examples/sample-app` as a tar, entries under `sample-app/` in name order.
fn sample_app_tar() -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample-app");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = format!("sample-app/{}", path.strip_prefix(&root).unwrap().display());
                files.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    tar(&entries)
}

/// A plain-file artifact of `gib` GiB that costs no disk: a line of text, then a hole. The
/// runner reads all of it through virtio-blk, so the VM runs for seconds (~2 GiB/s here).
fn long_artifact(dir: &Path, gib: u64) -> PathBuf {
    let path = dir.join("long.txt");
    std::fs::write(&path, "plain text, then nothing\n").unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(gib << 30).unwrap();
    path
}

/// The jailed VMM of the outer `cella-vmm scan` process `outer` once it has exec'd: its pid and
/// uid. The jailer hands it off, so it is the outer process's own child (of any of its threads).
fn jailed_vmm(outer: u32) -> Option<(u32, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{outer}/task")).ok()?;
    let children: Vec<u32> = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<u32>>())
        .collect();
    children.into_iter().find_map(|vmm| {
        let comm = std::fs::read_to_string(format!("/proc/{vmm}/comm")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).ok()?;
        let uid =
            status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()?;
        // A child the outer process has just forked is called `cella-vmm` too, as root, until
        // it execs the jailer: the jailed VMM is the one that runs as its jail's uid.
        (comm.trim() == "cella-vmm" && uid != 0).then_some((vmm, uid))
    })
}

/// Waits until the outer process `child` has a jailed VMM running its guest; returns its pid.
fn wait_for_vmm(child: &mut Child) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((pid, _)) = jailed_vmm(child.id()) {
            // Past the exec, the VMM needs a moment to build the VM; the artifact keeps it busy
            // for seconds after that.
            std::thread::sleep(Duration::from_millis(300));
            return pid;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the scan ended before its VMM was seen ({status})");
        }
        assert!(Instant::now() < deadline, "the jailed VMM never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the jailed scan did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn without_duration(summary: &Value) -> Value {
    let mut summary = summary.clone();
    summary.as_object_mut().unwrap().remove("duration_ms");
    summary
}

#[test]
fn a_jailed_scan_of_the_sample_app_finds_what_an_unjailed_one_finds() {
    binaries();
    let dir = scratch("jailed-sample-app");
    let artifact = dir.join("sample-app.tar");
    std::fs::write(&artifact, sample_app_tar()).unwrap();
    let (plain_sarif, jailed_sarif) = (dir.join("plain.sarif"), dir.join("jailed.sarif"));
    // One fingerprint key for both scans (each would draw its own), so their results compare.
    let key = ("CELLA_FINGERPRINT_KEY", "0123456789abcdef".repeat(4));

    let plain = cella_vmm(&["scan", "--json", "--artifact", artifact.to_str().unwrap()])
        .args(["--sarif", plain_sarif.to_str().unwrap()])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    assert_eq!(code(&plain), 0, "{}", stderr(&plain));
    let plain = report(&plain);

    let cell = Cell::new("jailed-sample-app");
    let id = format!("jscan-app-{}", std::process::id());
    let output = cell
        .scan(UID, GID, &["--jail-id", &id, "--artifact", artifact.to_str().unwrap()])
        .args(["--sarif", jailed_sarif.to_str().unwrap()])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let jailed = report(&output);

    assert!(jailed["summary"]["findings"].as_u64().unwrap() > 0, "{jailed}");
    assert_eq!(without_duration(&jailed["summary"]), without_duration(&plain["summary"]));
    assert_eq!(jailed["exit"], serde_json::json!({"kind": "exited", "code": 0}));
    assert_scrubbed(&jailed);
    let keys =
        |v: &Value| v.as_object().unwrap().keys().filter(|k| *k != "sarif").cloned().collect::<Vec<_>>();
    assert_eq!(keys(&jailed), keys(&plain), "the jailed report has another shape");
    for key in ["launch_us", "run_us", "scan_ms", "in_vm_ms"] {
        assert!(jailed[key].as_f64().unwrap() > 0.0, "{key}: {jailed}");
    }
    // The outer process wrote the SARIF log, with the same results and the artifact's real
    // name (the jail only knows it as /disk).
    assert_eq!(jailed["sarif"], jailed_sarif.display().to_string());
    let sarif = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let (plain_sarif, jailed_sarif) = (sarif(&plain_sarif), sarif(&jailed_sarif));
    assert_eq!(jailed_sarif["runs"][0]["results"], plain_sarif["runs"][0]["results"]);
    let text = jailed_sarif.to_string();
    assert!(text.contains("sample-app/config/settings.yaml"), "{text}");
    assert!(!text.contains("/disk"), "{text}");
    cell.assert_clean(&id);
}

#[test]
fn a_large_history_is_scanned_on_two_vcpus_in_the_jail_and_finds_what_one_vcpu_finds() {
    binaries();
    let dir = scratch("jailed-helper-vcpu");
    // A small artifact gets one vCPU; past 8 MiB the VM gets a helper vCPU too, which the
    // history scan shares its work with.
    let (small, large) = (dir.join("small.tar"), dir.join("large.tar"));
    std::fs::write(&small, history_tar(&dir, 0)).unwrap();
    std::fs::write(&large, history_tar(&dir, 9 << 20)).unwrap();
    let key = ("CELLA_FINGERPRINT_KEY", "0123456789abcdef".repeat(4));

    let one = cella_vmm(&["scan", "--json", "--artifact", small.to_str().unwrap()])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    assert_eq!(code(&one), 0, "{}", stderr(&one));
    let one = report(&one);
    assert_eq!(one["vcpus"], 1, "{one}");

    let cell = Cell::new("jailed-helper-vcpu");
    let id = format!("jscan-helper-{}", std::process::id());
    let output = cell
        .scan(UID, GID, &["--jail-id", &id, "--artifact", large.to_str().unwrap()])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let two = report(&output);
    assert_eq!(two["vcpus"], 2, "{two}");
    assert_scrubbed(&two);

    let history = &two["summary"]["history"];
    assert!(history["blobs_scanned"].as_u64().unwrap() > 400, "{history}");
    assert_eq!(history, &one["summary"]["history"]);
    assert_eq!(two["summary"]["by_rule"], one["summary"]["by_rule"]);
    assert_eq!(two["summary"]["by_rule"]["stripe-secret-key"], 1, "{two}");
    cell.assert_clean(&id);
}

#[test]
fn a_jailed_scan_gets_its_baseline_and_excludes_through_the_outer_job_server() {
    binaries();
    let dir = scratch("jailed-baseline");
    let artifact = dir.join("sample-app.tar");
    std::fs::write(&artifact, sample_app_tar()).unwrap();
    let plain_sarif = dir.join("plain.sarif");
    let key = ("CELLA_FINGERPRINT_KEY", "fedcba9876543210".repeat(4));
    let plain = cella_vmm(&["scan", "--json", "--artifact", artifact.to_str().unwrap()])
        .args(["--sarif", plain_sarif.to_str().unwrap()])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    assert_eq!(code(&plain), 0, "{}", stderr(&plain));
    let log: Value = serde_json::from_slice(&std::fs::read(&plain_sarif).unwrap()).unwrap();
    let uris: Vec<&str> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap())
        .collect();
    let in_src = uris.iter().filter(|u| u.starts_with("sample-app/src/")).count() as u64;
    assert!(in_src > 0 && in_src < uris.len() as u64, "{uris:?}");

    let cell = Cell::new("jailed-baseline");
    let id = format!("jscan-base-{}", std::process::id());
    let args = [
        "--jail-id",
        &id,
        "--artifact",
        artifact.to_str().unwrap(),
        "--baseline",
        plain_sarif.to_str().unwrap(),
    ];
    let output = cell
        .scan(UID, GID, &args)
        .args(["--exclude", "src/", "--fail-on", "note"])
        .env(key.0, &key.1)
        .output()
        .unwrap();
    // Everything left is in the baseline: the gate passes.
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let summary = &report(&output)["summary"];
    assert_eq!(summary["files_excluded"], 2, "{summary}");
    assert_eq!(summary["suppressed"]["baseline"], uris.len() as u64 - in_src, "{summary}");
    assert_eq!(
        summary["unsuppressed"],
        serde_json::json!({"error": 0, "warning": 0, "note": 0}),
        "{summary}"
    );
    cell.assert_clean(&id);
}

#[test]
fn a_hostile_archive_is_refused_in_a_jailed_scan_naming_the_entry() {
    binaries();
    let dir = scratch("jailed-traversal");
    let artifact = dir.join("evil.tar");
    std::fs::write(&artifact, tar(&[("../../etc/passwd", b"root:x:0:0\n")])).unwrap();
    let cell = Cell::new("jailed-traversal");
    let id = format!("jscan-evil-{}", std::process::id());
    let output =
        cell.scan(UID, GID, &["--jail-id", &id, "--artifact", artifact.to_str().unwrap()]).output().unwrap();
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    let result = report(&output);
    assert_eq!(result["refused"]["kind"], "artifact");
    let message = result["refused"]["message"].as_str().unwrap();
    assert!(message.contains("../../etc/passwd"), "{message}");
    assert!(stderr(&output).contains("artifact refused:"), "{}", stderr(&output));
    assert_scrubbed(&result);
    cell.assert_clean(&id);
}

#[test]
fn two_jailed_scans_run_at_once_each_under_its_own_uid() {
    binaries();
    let dir = scratch("jailed-two");
    // Long enough that neither ends before the other has started, even on a loaded machine.
    let artifact = long_artifact(&dir, 12);
    let cells = [Cell::new("jailed-two-a"), Cell::new("jailed-two-b")];
    let uids = [64_021, 64_022];
    // Default jail ids (vm-<pid of the outer process>): unique per concurrent scan.
    let mut children: Vec<Child> = cells
        .iter()
        .zip(uids)
        .map(|(cell, uid)| {
            cell.scan(uid, uid, &["--timeout-ms", "120000", "--artifact", artifact.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Both VMMs are seen running at the same time, each as its own uid.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: Vec<_> = children.iter().map(|c| jailed_vmm(c.id())).collect();
        if let [Some((_, a)), Some((_, b))] = running[..] {
            assert_eq!([a, b], uids);
            break;
        }
        if let Some(i) = children.iter_mut().position(|c| c.try_wait().unwrap().is_some()) {
            let output = children.remove(i).wait_with_output().unwrap();
            panic!("a scan ended early ({}): {}", output.status, stderr(&output));
        }
        assert!(Instant::now() < deadline, "the two jailed VMMs never ran at the same time");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ids: Vec<String> = children.iter().map(|c| format!("vm-{}", c.id())).collect();
    for ((child, cell), id) in children.into_iter().zip(&cells).zip(&ids) {
        let output = child.wait_with_output().unwrap();
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        let result = report(&output);
        assert_eq!(result["exit"]["kind"], "exited", "{result}");
        assert_eq!(result["artifact_bytes"], 12u64 << 30);
        assert_scrubbed(&result);
        cell.assert_clean(id);
    }
}

#[test]
fn sigterm_to_a_jailed_scan_stops_the_vm_scrubs_it_and_removes_the_jail() {
    binaries();
    let dir = scratch("jailed-sigterm");
    let artifact = long_artifact(&dir, 64);
    let cell = Cell::new("jailed-sigterm");
    let id = format!("jscan-term-{}", std::process::id());
    let mut child = cell
        .scan(
            UID,
            GID,
            &["--jail-id", &id, "--timeout-ms", "120000", "--artifact", artifact.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_vmm(&mut child);
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_with_timeout(&mut child, Duration::from_secs(30));
    let output = child.wait_with_output().unwrap();
    assert_eq!(code(&output), 244, "{}", stderr(&output));
    let result = report(&output);
    assert_eq!(result["exit"]["kind"], "stopped", "{result}");
    assert_scrubbed(&result);
    cell.assert_clean(&id);
}

#[test]
fn a_jailed_scan_killed_with_sigkill_takes_its_vmm_down_and_the_next_launcher_its_jail() {
    binaries();
    let dir = scratch("jailed-sigkill");
    let artifact = long_artifact(&dir, 64);
    let cell = Cell::new("jailed-sigkill");
    let id = format!("jscan-kill-{}", std::process::id());
    let mut child = cell
        .scan(
            UID,
            GID,
            &["--jail-id", &id, "--timeout-ms", "120000", "--artifact", artifact.to_str().unwrap()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vmm = wait_for_vmm(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    // The jailer handed the VMM to the scan and is gone already; the VMM's parent-death signal
    // (SIGKILL) ends it with the scan.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = format!("/proc/{vmm}/status");
    while std::fs::read_to_string(&status).is_ok_and(|s| !s.contains("State:\tZ")) {
        assert!(Instant::now() < deadline, "the VMM outlived the killed scan");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its jail names the killed scan as its owner: the next launcher on the host sweeps it, as
    // it sweeps the killed process's folder of its spare's control socket.
    assert!(!residue(&cell.base, &id).is_empty(), "nothing to sweep: was the jail handed off?");
    let swept = cella_vmm::spare::sweep_stale_jails(&cell.base, "cella-vmm");
    assert!(swept.iter().any(|p| p.ends_with(&id)), "{swept:?}");
    cella_vmm::spare::sweep_stale(&cell.tmp);
    cell.assert_clean(&id);
}
