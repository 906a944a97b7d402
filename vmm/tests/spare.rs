//! `cella-vmm spare`: a VMM started ahead, confined before it serves anything, given its job's
//! artifact and channel as descriptors over its control socket (`PUT /vm`), and asked for its
//! report (`finish`). Driven through `cella_vmm::spare::Spare`, as a launcher does.

mod common;

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use cella_proto::{Job, SarifContext};
use cella_vmm::job::{JobFrames, ScanOutcome};
use cella_vmm::spare::{Spare, SpareJail, SpareOptions};
use cella_vmm::GuestExit;
use common::*;

const PLANTED: &[u8] = b"config:\n  stripe_key = \"sk_live_4eC39HqLyjWDarjtT1zdp7dc\"\n";

/// The static VMM every test here runs (built once; see `common::jail_binaries`, which relinks
/// `target/<profile>/cella-vmm`, so no test here runs that one).
fn binaries() -> &'static JailBinaries {
    jail_binaries("spare-tests")
}

fn options(name: &str) -> SpareOptions {
    SpareOptions {
        template: None,
        vmm: binaries().static_vmm.clone(),
        jail: None,
        image: None,
        mem_mib: 128,
        timeout: Duration::from_secs(30),
        seccomp: None,
        guest_args: Vec::new(),
        run_dir: scratch(name),
        capture_stderr: false,
    }
}

fn frames(artifact_name: &str, size: u64) -> JobFrames {
    let policy = cella_policies::rules::load_packs(&["secrets"]).unwrap();
    JobFrames {
        job: Job {
            artifact_name: artifact_name.into(),
            artifact_size: size,
            fingerprint_key: "00".repeat(32),
            excludes: Vec::new(),
            baseline: None,
            sarif: SarifContext::default(),
            policy_preloaded: false,
            license_policy: Default::default(),
        },
        policy: std::sync::Arc::new(cella_vmm::job::SerializedPolicy::new(policy.as_bytes().to_vec())),
        baseline: None,
    }
}

#[test]
fn a_spare_is_confined_before_it_serves_and_scans_an_artifact_handed_over_as_descriptors() {
    let options = options("spare-scan");
    let spare = Spare::start(&options).unwrap();
    // From outside, while it waits: every thread has no-new-privs and a seccomp filter.
    let waiting = wait_confined(spare.pid());
    for (name, status) in &waiting {
        assert_eq!(status_field(status, "NoNewPrivs"), "1", "{name}");
        assert_eq!(status_field(status, "Seccomp"), "2", "{name}");
    }
    assert!(waiting.iter().any(|(name, _)| name == "api"), "{waiting:?}");
    assert_eq!(spare.api().state().unwrap().state, cella_vmm::rpc_interface::VmState::NotStarted);

    let artifact_path = options.run_dir.join("app.tar");
    std::fs::write(&artifact_path, tar(&[("app/settings.yaml", PLANTED), ("app/README", b"hi\n")])).unwrap();
    let artifact = File::open(&artifact_path).unwrap();
    // The VMM never sees the path: remove it before the launch.
    std::fs::remove_file(&artifact_path).unwrap();
    let run = spare.run_job(&artifact, &frames("app.tar", artifact.metadata().unwrap().len())).unwrap();
    let job = run.job.unwrap();
    let ScanOutcome::Completed { sarif, summary } = job.outcome else { panic!("{:?}", job.outcome) };
    let summary: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert_eq!(summary["files_scanned"], 2, "{summary}");
    assert!(summary["by_category"]["secret"].as_u64().unwrap() >= 1, "{summary}");
    let sarif: serde_json::Value = serde_json::from_slice(&sarif).unwrap();
    assert_eq!(
        sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
        "app/settings.yaml"
    );
    let report = run.vm.unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_scrubbed(&serde_json::to_value(&report).unwrap());
    // Finish again: the same report (a client that lost the answer can ask once more) —
    // unless the VMM has exited already, which it does once it has answered.
    let status = spare.wait().unwrap().status;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_spare_refuses_a_launch_whose_descriptors_do_not_fit_and_keeps_waiting() {
    let options = options("spare-refuse");
    let spare = Spare::start(&options).unwrap();
    wait_confined(spare.pid());
    let api = spare.api();
    let socket = std::os::unix::net::UnixStream::pair().unwrap().0;
    let artifact = File::open(&binaries().static_vmm).unwrap();
    use std::os::fd::AsFd;
    // A socket as the disk, a file as the channel.
    let e = api.start_vm(Some(socket.as_fd()), &[(1024, artifact.as_fd())]).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("cannot be the disk"), "{e}");
    // Descriptors with a request that takes none.
    let (status, body) = api.request("GET", "/vm", None).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Finish before a start is the wrong state; the spare still waits.
    let e = api.finish(Duration::from_millis(10)).unwrap_err();
    assert!(e.is_wrong_state(), "{e}");
    assert_eq!(api.state().unwrap().state, cella_vmm::rpc_interface::VmState::NotStarted);
    // And a good launch after all that works.
    let artifact_path = options.run_dir.join("plain.env");
    std::fs::write(&artifact_path, PLANTED).unwrap();
    let artifact = File::open(&artifact_path).unwrap();
    let run = spare.run_job(&artifact, &frames("plain.env", PLANTED.len() as u64)).unwrap();
    assert!(matches!(run.job.unwrap().outcome, ScanOutcome::Completed { .. }));
    assert_eq!(run.vm.unwrap().exit, GuestExit::Exited { code: 0 });
}

#[test]
fn a_spare_times_out_from_its_start_and_a_discarded_spare_exits() {
    let mut options = options("spare-timeout");
    options.image = Some(runner_image());
    options.guest_args = vec!["spin".into()];
    options.timeout = Duration::from_millis(300);
    let spare = Spare::start(&options).unwrap();
    wait_confined(spare.pid());
    // Waiting longer than the timeout does not count: it runs from PUT /vm.
    std::thread::sleep(Duration::from_millis(400));
    let started = std::time::Instant::now();
    spare.api().start_vm(None, &[]).unwrap();
    let report = spare.api().finish(Duration::from_secs(5)).unwrap();
    assert_eq!(report.exit, GuestExit::TimedOut { timeout_ms: 300 });
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_scrubbed(&serde_json::to_value(&report).unwrap());

    // A spare that never gets its launch ends on SIGTERM, with the stopped status.
    let spare = Spare::start(&options).unwrap();
    wait_confined(spare.pid());
    // SAFETY: kill(2) on the spare's process.
    unsafe { libc::kill(spare.pid() as i32, libc::SIGTERM) };
    let status = spare.wait().unwrap().status;
    assert_eq!(status.code(), Some(cella_abi::exit::STOPPED as i32), "{status:?}");
}

#[test]
fn a_jailed_spare_waits_with_no_capabilities_under_its_own_uid_and_runs_a_job() {
    let mut options = options("spare-jailed");
    let (uid, gid) = (64_041, 64_042);
    let id = format!("spare-test-{}", std::process::id());
    options.jail = Some(SpareJail {
        jailer: binaries().jailer.clone(),
        id: id.clone(),
        uid,
        gid,
        chroot_base: None,
        memory_limit_mib: options.mem_mib + 32,
        cpus: None,
        pids_max: 16,
        from_prepared: None,
    });
    let spare = Spare::start(&options).unwrap();
    let vmm = handed_off_vmm(spare.pid());
    for (name, status) in wait_confined(vmm) {
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{name}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "{name}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&status, caps), "0000000000000000", "{name} {caps}");
        }
        let uids: Vec<String> = status_field(&status, "Uid").split_whitespace().map(str::to_owned).collect();
        assert!(uids.iter().all(|u| *u == uid.to_string()), "{name}: {uids:?}");
    }
    let artifact_path = options.run_dir.join("app.tar");
    std::fs::write(&artifact_path, tar(&[("app/settings.yaml", PLANTED)])).unwrap();
    let artifact = File::open(&artifact_path).unwrap();
    let run = spare.run_job(&artifact, &frames("app.tar", artifact.metadata().unwrap().len())).unwrap();
    let ScanOutcome::Completed { summary, .. } = run.job.unwrap().outcome else { panic!("no result") };
    let summary: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert!(summary["by_category"]["secret"].as_u64().unwrap() >= 1, "{summary}");
    let report = run.vm.unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_scrubbed(&serde_json::to_value(&report).unwrap());
    // Waiting removes the jail and gives the VMM's status.
    let status = spare.wait().unwrap().status;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let exec_name = binaries().static_vmm.file_name().unwrap().to_owned();
    let jail = Path::new("/dev/shm/cella-jailer").join(exec_name).join(&id);
    assert!(!jail.exists(), "{} left behind", jail.display());
}

/// `cella-vmm spare --test-open PATH`, through `cella-jailer` when `jailed`, with a control
/// socket of its own as descriptor 3: the output of a spare that tries to open PATH once it is
/// confined.
fn spare_opening(path: &str, jailed: bool, dir: &std::path::Path) -> std::process::Output {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let b = binaries();
    let listener = std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap();
    let image = runner_image();
    let mut command = if jailed {
        let mut c = std::process::Command::new(&b.jailer);
        c.args(["--id", &format!("spare-open-{}", std::process::id())]);
        c.arg("--exec-file").arg(&b.static_vmm).args(["--uid", "64043", "--gid", "64043", "--new-pid-ns"]);
        let mut ro = image.clone().into_os_string();
        ro.push("=/image");
        c.arg("--ro-file").arg(ro).args([
            "--keep-fd",
            "3",
            "--",
            "spare",
            "--api-fd",
            "3",
            "--image",
            "/image",
        ]);
        c
    } else {
        let mut c = std::process::Command::new(&b.static_vmm);
        c.args(["spare", "--api-fd", "3", "--image"]).arg(&image);
        c
    };
    command.args(["--test-open", path]);
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 (or, if the listener is descriptor 3 already, clearing its close-on-exec
    // flag) between fork and exec, on a descriptor the child has.
    unsafe {
        command.pre_exec(move || {
            let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) == 0 } else { libc::dup2(fd, 3) >= 0 };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command.output().unwrap()
}

#[test]
fn a_spare_cannot_open_any_path_once_confined_even_one_its_jail_lets_it_read() {
    let dir = scratch("spare-open");
    let image = runner_image();
    // Unjailed: the image it read at start, and any other file, are out of reach.
    for path in [image.to_str().unwrap(), "/etc/hostname", "/proc/self/status"] {
        let out = spare_opening(path, false, &dir);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {said}");
        assert!(said.contains(&format!("test-open {path}: Permission denied")), "{said}");
        std::fs::remove_file(dir.join("api.sock")).unwrap();
    }
    // Jailed: the jailer's own Landlock layer lets the VMM read /image; the spare's layer,
    // put on once it holds what it needs, refuses even that.
    let out = spare_opening("/image", true, &dir);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("test-open /image: Permission denied"), "{said}");
}
