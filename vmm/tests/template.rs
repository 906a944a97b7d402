//! Templates (`cella_vmm::template`): a scanner VM with its devices set up and its engine built,
//! parked and snapshotted once; each job's VM a fresh, private restore of it. A job from a
//! template finds what a booted VM finds, holds no byte of another job, and a jailed spare
//! restored from one is confined like any spare.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_proto::{Job, SarifContext};
use cella_vmm::builder::HostEnds;
use cella_vmm::devices::virtio::block::Block;
use cella_vmm::devices::virtio::vsock::Vsock;
use cella_vmm::job::{JobFrames, ScanOutcome};
use cella_vmm::scan::{self, ScanRequest};
use cella_vmm::spare::{Spare, SpareJail, SpareOptions};
use cella_vmm::template::{self, TemplateError, TemplateVm};
use cella_vmm::{GuestExit, SharedBuffer, VmConfig};
use common::*;

const PLANTED: &[u8] = b"config:\n  stripe_key = \"sk_live_4eC39HqLyjWDarjtT1zdp7dc\"\n  owner = priya.raman@northwind-trading.com\n";
const MEM_MIB: u64 = 128;

/// The service's scanner image: no test modes in it.
fn production_scanner_image() -> PathBuf {
    cella_vmm::default_scanner_image().unwrap_or_else(|e| panic!("{e}; run scripts/setup.sh first"))
}

/// The scanner with the test modes as well (`heap-hash`, `fill-canary`), which the tests here
/// restore templates into: built beside the production one by scripts/build-guest.sh.
fn scanner_image() -> PathBuf {
    let image = production_scanner_image().with_file_name("cella-scanner-test");
    assert!(image.is_file(), "no {}; run scripts/setup.sh first", image.display());
    image
}

fn default_policy() -> Vec<u8> {
    load_packs(DEFAULT_PACKS).unwrap().as_bytes().to_vec()
}

/// One template of the built-in packs, built once for the tests here.
fn built_template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("template-built");
        let built = template::build(&scanner_image(), MEM_MIB, &default_policy(), &dir).unwrap();
        assert_eq!(built.identity.policy_sha256, cella_vmm::job::policy_sha256(&default_policy()));
        assert_eq!(built.identity.mem_mib, MEM_MIB);
        assert!(built.memory_bytes > 0, "{built:?}");
        dir
    })
}

fn request(artifact: &Path, policy: Vec<u8>, template: Option<&Path>) -> ScanRequest {
    ScanRequest {
        image: scanner_image(),
        template: template.map(Path::to_owned),
        artifact: artifact.to_owned(),
        policy,
        mem_mib: MEM_MIB,
        timeout: Duration::from_secs(60),
        launch_start: Instant::now(),
        cancel: None,
        fingerprint_key: "11".repeat(32),
        options: Default::default(),
    }
}

/// (rule, uri, line) of every result, and whether the runner held the policy's engine.
fn results(request: &ScanRequest) -> (Vec<(String, String, u64)>, bool) {
    let run = scan::run(request, Box::new(std::io::sink())).unwrap();
    assert_eq!(run.vm.exit, GuestExit::Exited { code: 0 });
    assert_scrubbed(&serde_json::to_value(&run.vm).unwrap());
    let job = run.job.unwrap();
    let ScanOutcome::Completed { sarif, .. } = job.outcome else { panic!("{:?}", job.outcome) };
    let sarif: serde_json::Value = serde_json::from_slice(&sarif).unwrap();
    let mut found: Vec<(String, String, u64)> = sarif["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let location = &r["locations"][0]["physicalLocation"];
            (
                r["ruleId"].as_str().unwrap().to_owned(),
                location["artifactLocation"]["uri"].as_str().unwrap().to_owned(),
                location["region"]["startLine"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    (found, job.policy_preloaded)
}

#[test]
fn a_job_restored_from_a_template_finds_what_a_booted_vm_finds() {
    let dir = scratch("template-scan");
    let artifact = dir.join("app.tar");
    std::fs::write(&artifact, tar(&[("app/settings.yaml", PLANTED), ("app/README", b"hi\n")])).unwrap();
    let template = built_template();

    let (booted, preloaded) = results(&request(&artifact, default_policy(), None));
    assert!(!preloaded);
    assert!(
        booted.iter().any(|(rule, uri, _)| rule.contains("stripe") && uri == "app/settings.yaml"),
        "{booted:?}"
    );
    assert!(booted.iter().any(|(rule, _, _)| rule.contains("email")), "{booted:?}");
    let (restored, preloaded) = results(&request(&artifact, default_policy(), Some(template)));
    assert!(preloaded, "the template's engine is the job's: no policy is sent");
    assert_eq!(restored, booted);

    // Another policy: the template's runner gets it and builds that engine instead.
    let pii = load_packs(&["pii"]).unwrap().as_bytes().to_vec();
    let (booted_pii, _) = results(&request(&artifact, pii.clone(), None));
    let (restored_pii, preloaded) = results(&request(&artifact, pii, Some(template)));
    assert!(!preloaded);
    assert_eq!(restored_pii, booted_pii);
    assert!(restored_pii.iter().all(|(rule, _, _)| !rule.contains("stripe")), "{restored_pii:?}");
}

#[test]
fn a_large_job_restored_from_a_template_gets_a_helper_vcpu_and_finds_what_one_vcpu_finds() {
    let dir = scratch("template-helper");
    let (small, large) = (dir.join("small.tar"), dir.join("large.tar"));
    std::fs::write(&small, history_tar(&dir, 0)).unwrap();
    std::fs::write(&large, history_tar(&dir, 9 << 20)).unwrap();
    let template = built_template();
    let vcpus = |request: &ScanRequest| scan::run(request, Box::new(std::io::sink())).unwrap().vm.vcpus;

    // The template's VM had one vCPU; the job's VM restored from it gets the helper its
    // artifact's size calls for, started at the image's entry, told so in its boot info.
    assert_eq!(vcpus(&request(&small, default_policy(), Some(template))), 1);
    assert_eq!(vcpus(&request(&large, default_policy(), Some(template))), 2);
    let (one, _) = results(&request(&small, default_policy(), None));
    let (two, preloaded) = results(&request(&large, default_policy(), Some(template)));
    assert!(preloaded);
    assert!(
        one.iter().any(|(rule, uri, _)| rule == "stripe-secret-key" && uri.contains("payments.env")),
        "{one:?}"
    );
    assert_eq!(two, one);
}

/// What `heap-hash` printed: (hash, canary words).
fn heap_hash(console: &str) -> (String, u64) {
    let line = console.lines().find(|l| l.starts_with("heap: ")).unwrap_or_else(|| panic!("{console}"));
    let hash = line.split("fnv1a64 ").nth(1).unwrap().split(',').next().unwrap().to_owned();
    let canary = line.rsplit("canary words ").next().unwrap().trim().parse().unwrap();
    (hash, canary)
}

/// A VM restored from the template with `args`, and where its console goes.
fn restored(args: &[&str], scratch_dir: &Path) -> (cella_vmm::MicroVm, SharedBuffer) {
    restored_from(built_template(), args, scratch_dir)
}

/// A VM restored from the template in `template` with `args`, and where its console goes.
fn restored_from(template: &Path, args: &[&str], scratch_dir: &Path) -> (cella_vmm::MicroVm, SharedBuffer) {
    let disk_path = scratch_dir.join(format!("disk-{}", args.join("-")));
    std::fs::write(&disk_path, [0u8; 512]).unwrap();
    let ends = HostEnds {
        disk: Some(Block::from_file(File::open(&disk_path).unwrap()).unwrap()),
        vsock: Some(Vsock::with_channels(Vec::new()).unwrap()),
    };
    let config = VmConfig {
        timeout: Some(Duration::from_secs(30)),
        ..VmConfig::new("template", args.iter().map(|a| (*a).to_owned()).collect())
    };
    let console = SharedBuffer::default();
    let vm = TemplateVm::load(template).unwrap().finish(&config, ends, Box::new(console.clone())).unwrap();
    (vm, console)
}

/// The image the service restores every job from has none of the guests that misbehave or
/// report memory on purpose: asked for one (from its template, as a job's VM starts, or booted),
/// it refuses by name and exits with the usage status.
#[test]
fn the_services_scanner_image_has_no_test_modes() {
    let dir = scratch("template-production");
    let template = dir.join("template");
    template::build(&production_scanner_image(), MEM_MIB, &default_policy(), &template).unwrap();
    let no_test_modes = "this image has no test modes";
    for mode in ["heap-hash", "fill-canary", "spin", "fault"] {
        let (vm, console) = restored_from(&template, &[mode], &dir);
        let report = vm.run().unwrap();
        assert_eq!(
            report.exit,
            GuestExit::Exited { code: cella_abi::status::USAGE },
            "{mode}: {}",
            console.text()
        );
        assert!(console.text().contains(no_test_modes), "{mode}: {}", console.text());
    }
    let booted = VmConfig {
        timeout: Some(Duration::from_secs(30)),
        ..VmConfig::new(production_scanner_image(), vec!["spin".into()])
    };
    let console = SharedBuffer::default();
    let report = cella_vmm::build(&booted, Box::new(console.clone())).unwrap().run().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: cella_abi::status::USAGE }, "{}", console.text());
    assert!(console.text().contains(no_test_modes), "{}", console.text());
}

#[test]
fn no_job_restored_from_a_template_sees_another_jobs_bytes() {
    let dir = scratch("template-canary");
    // A job's heap as the template left it.
    let (vm, console) = restored(&["heap-hash"], &dir);
    let report = vm.run().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 }, "{}", console.text());
    let (template_hash, canary) = heap_hash(&console.text());
    assert_eq!(canary, 0);

    // A job fills its whole heap with the canary and has ended, its memory not yet scrubbed.
    let (vm, console) = restored(&["fill-canary"], &dir);
    let mut filler = vm.start().unwrap();
    assert!(filler.wait(Duration::from_secs(30)), "fill-canary did not end");
    // Meanwhile, and after it is gone, a new job reads its whole heap: the template's bytes,
    // not one word of the other job's.
    for _ in 0..2 {
        let (vm, reader) = restored(&["heap-hash"], &dir);
        let report = vm.run().unwrap();
        assert_eq!(report.exit, GuestExit::Exited { code: 0 }, "{}", reader.text());
        assert_eq!(heap_hash(&reader.text()), (template_hash.clone(), 0));
        if filler.has_ended() {
            let report = filler.finish().unwrap();
            assert_eq!(report.exit, GuestExit::Exited { code: 0 });
            assert!(console.text().contains("filled"), "{}", console.text());
            assert_scrubbed(&serde_json::to_value(&report).unwrap());
            // Only checked once: the filler is gone now.
            let (vm, reader) = restored(&["heap-hash"], &dir);
            vm.run().unwrap();
            assert_eq!(heap_hash(&reader.text()), (template_hash.clone(), 0));
            return;
        }
    }
    unreachable!("the filler had ended");
}

#[test]
fn a_template_is_refused_by_name_when_it_cannot_be_built_or_is_damaged() {
    let dir = scratch("template-bad");
    // A policy the runner cannot build an engine from: the build says why, from the guest.
    let e =
        template::build(&scanner_image(), MEM_MIB, b"{\"not\": \"a policy\"}", &dir.join("bad")).unwrap_err();
    let TemplateError::DidNotPark { console, .. } = &e else { panic!("{e:?}") };
    assert!(console.contains("template policy"), "{console}");

    // A copy of the good template, then damaged three ways.
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for name in ["state.bin", "memory.bin", "template.json"] {
        std::fs::copy(built_template().join(name), copy.join(name)).unwrap();
    }
    assert!(TemplateVm::load(&copy).is_ok());
    let memory = std::fs::OpenOptions::new().write(true).open(copy.join("memory.bin")).unwrap();
    memory.set_len(4096).unwrap();
    let e = TemplateVm::load(&copy).unwrap_err();
    assert!(e.is_bad_input(), "{e:?}");
    assert!(cella_vmm::error_chain(&e).contains("memory file"), "{}", cella_vmm::error_chain(&e));
    std::fs::write(copy.join("template.json"), b"{}").unwrap();
    let e = TemplateVm::load(&copy).unwrap_err();
    assert!(matches!(e, TemplateError::BadIdentity(_)), "{e:?}");
    std::fs::remove_file(copy.join("template.json")).unwrap();
    assert!(matches!(TemplateVm::load(&copy), Err(TemplateError::BadIdentity(_))));

    // A runner that parks outside a template build ends the VM; it does not wait.
    let disk = dir.join("policy.disk");
    let policy = default_policy();
    let mut bytes = (policy.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&policy);
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    std::fs::write(&disk, bytes).unwrap();
    let config = VmConfig {
        mem_mib: MEM_MIB,
        disk: Some(disk),
        vsock_uds: Some(dir.join("v.sock")),
        timeout: Some(Duration::from_secs(30)),
        ..VmConfig::new(scanner_image(), vec!["template".into()])
    };
    let report = cella_vmm::build(&config, Box::new(std::io::sink())).unwrap().run().unwrap();
    assert!(
        matches!(&report.exit, GuestExit::Crashed { reason, .. } if reason.contains("not building a template")),
        "{:?}",
        report.exit
    );
}

#[test]
fn a_jailed_spare_restored_from_a_template_is_confined_and_runs_its_job_with_the_templates_engine() {
    let binaries = jail_binaries("template-tests");
    let dir = scratch("template-spare");
    let (uid, gid) = (64_051, 64_052);
    let options = SpareOptions {
        vmm: binaries.static_vmm.clone(),
        jail: Some(SpareJail {
            jailer: binaries.jailer.clone(),
            id: format!("template-test-{}", std::process::id()),
            uid,
            gid,
            chroot_base: None,
            memory_limit_mib: MEM_MIB + 32,
            cpus: None,
            pids_max: 16,
            from_prepared: None,
        }),
        image: None,
        template: Some(built_template().to_owned()),
        mem_mib: MEM_MIB,
        timeout: Duration::from_secs(30),
        seccomp: None,
        guest_args: Vec::new(),
        run_dir: dir.clone(),
        capture_stderr: true,
    };
    let spare = Spare::start(&options).unwrap();
    let vmm = handed_off_vmm(spare.pid());
    // From outside, while it waits: every thread confined, no capability, the jail's uid.
    let threads = wait_confined(vmm);
    for (name, status) in &threads {
        assert_eq!(status_field(status, "NoNewPrivs"), "1", "{name}");
        for caps in ["CapPrm", "CapEff", "CapBnd"] {
            assert_eq!(status_field(status, caps), "0000000000000000", "{name} {caps}");
        }
        assert!(status_field(status, "Uid").split_whitespace().all(|u| u == uid.to_string()), "{name}");
    }
    let artifact_path = dir.join("settings.yaml");
    std::fs::write(&artifact_path, PLANTED).unwrap();
    let artifact = File::open(&artifact_path).unwrap();
    let frames = JobFrames {
        job: Job {
            artifact_name: "settings.yaml".into(),
            artifact_size: PLANTED.len() as u64,
            fingerprint_key: "00".repeat(32),
            excludes: Vec::new(),
            baseline: None,
            sarif: SarifContext::default(),
            policy_preloaded: false,
            license_policy: Default::default(),
        },
        policy: std::sync::Arc::new(cella_vmm::job::SerializedPolicy::new(default_policy())),
        baseline: None,
    };
    let run = spare.run_job(&artifact, &frames).unwrap();
    let job = run.job.unwrap();
    assert!(job.policy_preloaded);
    let ScanOutcome::Completed { summary, .. } = job.outcome else { panic!("{:?}", job.outcome) };
    let summary: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert!(summary["by_category"]["secret"].as_u64().unwrap() >= 1, "{summary}");
    let report = run.vm.unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert!(report.built_ahead);
    assert_scrubbed(&serde_json::to_value(&report).unwrap());
    let end = spare.wait().unwrap();
    assert_eq!(end.status.code(), Some(0), "{}", end.stderr);
}
