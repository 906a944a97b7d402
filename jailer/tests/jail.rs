//! The jailer against real processes on this machine: a real static `cella-vmm`, real KVM,
//! real namespaces, cgroups, Landlock and seccomp.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn every_thread_of_a_jailed_vmm_is_confined_in_its_own_root_uid_and_pid_namespace() {
    let base = chroot_base("confined");
    let id = jail_id("confined");
    let (mut jailer, pid) = start_spinning(&base, &id);

    let tasks = tasks(pid);
    assert!(tasks.len() >= 2, "expected the main and the vCPU thread, got {tasks:?}");
    for task in &tasks {
        let status = format!("/proc/{pid}/task/{task}/status");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&status, cap), "0000000000000000", "{cap} of task {task}");
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "task {task}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "task {task}");
        let uid = UID.to_string();
        let gid = GID.to_string();
        assert_eq!(
            status_field(&status, "Uid").split_whitespace().collect::<Vec<_>>(),
            [&uid; 4],
            "task {task}"
        );
        assert_eq!(
            status_field(&status, "Gid").split_whitespace().collect::<Vec<_>>(),
            [&gid; 4],
            "task {task}"
        );
        assert_eq!(status_field(&status, "Groups"), "", "task {task}");
    }
    // Its root is the jail's root folder, which holds no copy of the VMM binary: the VMM runs
    // the host's binary, exec'd from a descriptor (nothing in the jail leads to it).
    let jail_root = base.join("cella-vmm").join(&id).join("root");
    assert_eq!(inode(Path::new(&format!("/proc/{pid}/root/"))), inode(&jail_root));
    let mut in_root: Vec<String> = std::fs::read_dir(&jail_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    in_root.sort();
    assert_eq!(in_root, ["dev", "image"]);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, std::fs::canonicalize(static_vmm()).unwrap());
    // It is PID 1 of its own PID namespace, and has its own mount, network, IPC and UTS ones.
    let nspid = status_field(&format!("/proc/{pid}/status"), "NSpid");
    assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), [pid.to_string().as_str(), "1"]);
    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace is shared with the host");
    }
    // Its mounts are not the host's: nothing under the jail shows up in ours.
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&base.display().to_string()));

    // SIGTERM to the supervisor reaches the VMM, which stops and scrubs; the jail goes away.
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut jailer, Duration::from_secs(20));
    assert_eq!(status.code(), Some(244), "the VMM reports `stopped by a signal`");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_and_the_supervisor_reports_seccomp() {
    let base = chroot_base("seccomp");
    let id = jail_id("seccomp");
    let out = output(&mut jailed(&base, &id, &[], &["--test-forbidden-syscall", "--", "hello"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(245), "{err}");
    assert!(err.contains("killed by SIGSYS"), "{err}");
    assert!(err.contains("seccomp filter forbids"), "{err}");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn a_vmm_stopped_and_continued_goes_on_and_still_stops_cleanly() {
    // SIGSTOP interrupts every thread's wait; after SIGCONT the kernel resumes the timed ones
    // (the run loop's poll, a channel's recv_timeout) through restart_syscall(2), as it does for
    // a thread woken by a signal another thread took. Every thread's seccomp filter must allow
    // it: otherwise the VMM dies as a seccomp kill (245) instead of running on.
    let base = chroot_base("stop-continue");
    let id = jail_id("stop-continue");
    let (mut child, pid) = start_spinning(&base, &id);
    for _ in 0..3 {
        // SAFETY: kill(2) to the VMM of a jail this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(child.try_wait().unwrap(), None, "the VMM did not run on after SIGCONT");
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(244), "stopped and continued, then SIGTERM");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn landlock_refuses_host_files_and_jail_paths_the_vmm_could_otherwise_reach() {
    let base = chroot_base("landlock");
    // A host folder with a world-readable file, reachable from inside the jail through a
    // descriptor the jail is given: only Landlock stands between the VMM and the file.
    let host = Path::new(env!("CARGO_TARGET_TMPDIR")).join("landlock-host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("secret.txt"), "host data").unwrap();
    let world_readable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
    std::fs::set_permissions(host.join("secret.txt"), world_readable).unwrap();
    let dir = std::fs::File::open(&host).unwrap();
    let fd = dir.as_raw_fd();
    // SAFETY: clears close-on-exec on our own descriptor so the jailer inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let fd_text = fd.to_string();

    // Without the jail the same VMM binary opens the file through that descriptor.
    let control = output(
        std::process::Command::new(static_vmm())
            .args(["run", "--test-open", "secret.txt", "--test-open-dirfd", &fd_text, "--", "hello"])
            .env("CELLA_RUNNER_IMAGE", runner_image()),
    );
    assert_eq!(control.status.code(), Some(0), "{}", stderr(&control));

    let id = jail_id("landlock");
    let keep = ["--keep-fd", fd_text.as_str()];
    let vmm = ["--test-open", "secret.txt", "--test-open-dirfd", &fd_text, "--", "hello"];
    let out = output(&mut jailed(&base, &id, &keep, &vmm));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("test-open secret.txt: Permission denied"), "{err}");

    // Inside the jail, its root folder is not listable either (DAC would allow it: 0755).
    let id = jail_id("landlock-root");
    let out = output(&mut jailed(&base, &id, &[], &["--test-open", "/", "--", "hello"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("test-open /: Permission denied"), "{err}");
    drop(dir);
    assert_eq!(residue(&base, "landlock"), Vec::<String>::new());
}

#[test]
fn guest_memory_above_the_memory_limit_is_refused_before_launch_and_killed_at_the_limit() {
    let base = chroot_base("memory");
    // Through `cella-vmm run --jailed`: refused up front, with the limit in the message.
    let out = output(
        std::process::Command::new(static_vmm())
            .args(["run", "--jailed", "--jailer"])
            .arg(jailer())
            .arg("--chroot-base")
            .arg(&base)
            .args(["--mem-mib", "512", "--memory-limit-mib", "256", "--", "hello"])
            .env("CELLA_RUNNER_IMAGE", runner_image()),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("more than the memory limit of 256 MiB"), "{err}");
    assert!(!base.exists(), "nothing may be created for a refused launch");

    // Straight through the jailer with a limit below what the guest touches: the cgroup holds,
    // the VMM is killed, and the supervisor says it was the memory limit.
    let id = jail_id("memory");
    let mut command =
        jailed(&base, &id, &["--cgroup", "memory=48M"], &["--mem-mib", "128", "--", "fill-canary"]);
    let out = output(&mut command);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(246), "{err}");
    assert!(err.contains("the memory limit of 50331648 bytes (48 MiB) was reached"), "{err}");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn the_pids_limit_holds() {
    let base = chroot_base("pids");
    let id = jail_id("pids");
    // One task: the VMM's main thread. Its vCPU thread cannot start.
    let out = output(&mut jailed(&base, &id, &["--cgroup", "pids=1"], &["--", "hello"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(243), "{err}");
    assert!(err.contains("cannot start the vCPU thread"), "{err}");
    assert!(err.contains("the pids limit of 1 refused 1 new task(s)"), "{err}");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn log_lines_are_json_objects_with_the_jails_id_when_asked() {
    let base = chroot_base("json-log");
    let id = jail_id("json-log");
    // The jailer reads its format from the environment; the VMM, whose environment is empty,
    // from its command line.
    let mut command = jailed(&base, &id, &["--cgroup", "pids=1"], &["--log-format", "json", "--", "hello"]);
    let out = output(command.env("CELLA_LOG_FORMAT", "json"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(243), "{err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: a line that is not JSON: {line}"))
        })
        .collect();
    let said = |words: &str| lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.contains(words)));
    let vmm = said("cannot start the vCPU thread").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(vmm["level"], "ERROR", "{vmm}");
    let jailer = said("the pids limit of 1 refused 1 new task(s)").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(
        (jailer["level"].as_str(), jailer["span"]["jail"].as_str()),
        (Some("WARN"), Some(id.as_str()))
    );
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

/// Soft and hard open-file limit `n` for the process `command` starts.
fn with_open_file_limit(command: &mut std::process::Command, n: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit(2),
    // which is async-signal-safe; it allocates nothing and reads only its own copy of `limit`.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The VMM `pid`'s soft and hard open-file limits.
fn open_file_limits(pid: i32) -> Vec<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().skip(3).take(2).map(str::to_owned).collect()
}

#[test]
fn rlimits_never_raise_the_jailers_own_hard_limit() {
    // A jailer started with 256 open files (a service under a low limit, where root may lack
    // CAP_SYS_RESOURCE): its VMM starts, with 256, not the default 1024.
    let base = chroot_base("low-nofile");
    let id = jail_id("low-nofile");
    let mut command = jailed(&base, &id, &[], &["--timeout-ms", "20000", "--", "spin"]);
    with_open_file_limit(&mut command, 256);
    let (mut jailer, pid) = start_spinning_from(command);
    assert_eq!(open_file_limits(pid), ["256", "256"]);
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_with_timeout(&mut jailer, Duration::from_secs(20)).code(), Some(244));
    // A lower --rlimit still lowers it.
    let mut command =
        jailed(&base, &id, &["--rlimit", "no-file=100"], &["--timeout-ms", "20000", "--", "spin"]);
    with_open_file_limit(&mut command, 256);
    let (mut jailer, pid) = start_spinning_from(command);
    assert_eq!(open_file_limits(pid), ["100", "100"]);
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_with_timeout(&mut jailer, Duration::from_secs(20)).code(), Some(244));
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn bad_ids_and_paths_are_refused_before_anything_is_created() {
    let base = chroot_base("refused");
    let image = runner_image();
    let link = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cella-vmm-link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(static_vmm(), &link).unwrap();
    let long_id = "a".repeat(65);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--id".into(), "../x".into()], "may only hold letters, digits and hyphens"),
        (vec!["--id".into(), long_id.clone()], "65 characters long"),
        (vec!["--exec-file".into(), link.display().to_string()], "is a symbolic link"),
        (vec!["--ro-file".into(), "/nonexistent/cella-runner=/image".into()], "cannot be read"),
        (vec!["--ro-file".into(), format!("{}=/../etc/image", image.display())], "must be absolute"),
        (vec!["--uid".into(), "0".into()], "must not run as root"),
    ];
    for (override_args, message) in cases {
        let mut args = vec![
            "--id".to_owned(),
            jail_id("refused"),
            "--exec-file".into(),
            static_vmm().display().to_string(),
            "--uid".into(),
            UID.to_string(),
            "--ro-file".into(),
            format!("{}=/image", image.display()),
        ];
        for pair in override_args.chunks(2) {
            let at = args.iter().position(|a| *a == pair[0]).unwrap();
            args[at + 1] = pair[1].clone();
        }
        let out = output(
            std::process::Command::new(jailer())
                .args(&args)
                .args(["--gid", &GID.to_string(), "--cgroup", "pids=8", "--chroot-base"])
                .arg(&base)
                .args(["--", "run", "--image", "/image", "--", "hello"]),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("refused (nothing was created)") && err.contains(message), "{args:?}: {err}");
        assert!(!base.exists(), "{args:?} created {}", base.display());
    }
    assert_eq!(residue(&base, &jail_id("refused")), Vec::<String>::new());
    assert_eq!(residue(&base, &long_id), Vec::<String>::new());
}

#[test]
fn a_hundred_jailed_launches_some_killed_leave_no_jail_folders_mounts_or_cgroups() {
    let base = chroot_base("hundred");
    let prefix = jail_id("hundred");
    const BATCH: usize = 4;
    let mut killed = 0;
    for batch in 0..100 / BATCH {
        let mut running = Vec::new();
        for j in 0..BATCH {
            let n = batch * BATCH + j;
            let id = format!("{prefix}-{n}");
            if n % 10 == 3 {
                // Killed with SIGKILL while the guest runs.
                let (jailer, pid) = start_spinning(&base, &id);
                // SAFETY: SIGKILL to the jailed VMM, a descendant of this test.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
                running.push((jailer, Some(246)));
            } else {
                let child = jailed(&base, &id, &[], &["--", "hello"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                running.push((child, Some(0)));
            }
        }
        for (mut child, expected) in running {
            let status = wait_with_timeout(&mut child, Duration::from_secs(30));
            assert_eq!(status.code(), expected);
        }
    }
    assert_eq!(killed, 10);
    assert_eq!(residue(&base, &prefix), Vec::<String>::new());
}

#[test]
fn a_controller_only_cgroup2_offers_is_used_there_and_removed_afterwards() {
    // This host is a v1 hybrid; production hosts are v2. Use a controller that only the cgroup2
    // mount offers here, so the v2 path runs for real next to the v1 memory and pids cgroups.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let v1: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup"))
        .flat_map(|l| l.split_whitespace().nth(3).unwrap_or("").split(','))
        .collect();
    let Some(v2_mount) = mounts.lines().find(|l| l.split_whitespace().nth(2) == Some("cgroup2")) else {
        eprintln!("skipped: no cgroup2 mount on this host");
        return;
    };
    let v2_mount = Path::new(v2_mount.split_whitespace().nth(1).unwrap());
    let offered = std::fs::read_to_string(v2_mount.join("cgroup.controllers")).unwrap_or_default();
    let known = [("hugetlb", "hugetlb.2MB.max=max"), ("pids", "pids.max=max"), ("memory", "memory.max=max")];
    let Some((controller, setting)) =
        known.into_iter().find(|(c, _)| offered.split_whitespace().any(|o| o == *c) && !v1.contains(c))
    else {
        eprintln!(
            "skipped: every controller cgroup2 offers here is also a v1 hierarchy (offered: {offered:?})"
        );
        return;
    };
    let base = chroot_base("cgroup2");
    let id = jail_id("cgroup2");
    let (mut child, pid) = start_spinning_with(&base, &id, &["--cgroup", setting]);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unified = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned();
    assert!(unified.ends_with(&format!("/cella/{id}")), "{controller} via cgroup2: {cgroups}");
    assert!(
        cgroups.lines().any(|l| l.contains(":memory:") && l.ends_with(&format!("/cella/{id}"))),
        "{cgroups}"
    );
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(20)).code(), Some(244));
    assert!(!v2_mount.join(unified.trim_start_matches('/')).exists(), "the cgroup2 cgroup is left behind");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn cleanup_removes_what_a_killed_supervisor_left_behind() {
    let base = chroot_base("orphan");
    let id = jail_id("orphan");
    let (mut supervisor, vmm) = start_spinning(&base, &id);
    // Kill the supervisor itself: the VMM follows it (parent-death signal), but nobody is left
    // to remove the jail.
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    let status = format!("/proc/{vmm}/status");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&status).exists() && !status_field(&status, "State").starts_with('Z') {
        assert!(std::time::Instant::now() < deadline, "the VMM outlived its supervisor");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!residue(&base, &id).is_empty(), "a killed supervisor leaves its jail behind");

    let out = output(
        std::process::Command::new(jailer()).args(["cleanup", "--id", &id, "--chroot-base"]).arg(&base),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("removed"), "{}", stderr(&out));
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn a_step_that_fails_after_validation_is_named_and_leaves_nothing_behind() {
    let base = chroot_base("failing-step");
    let id = jail_id("failing-step");
    // A file that exists (validation passes) but is no network namespace: setns fails in the
    // child, after the jail folder, the copy, the mounts and the cgroups were made.
    let not_a_netns = runner_image();
    let extra = ["--netns", not_a_netns.to_str().unwrap()];
    let out = output(&mut jailed(&base, &id, &extra, &["--", "hello"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(247), "{err}");
    let expected = format!("nothing is left behind: step `join-netns` failed on {}", not_a_netns.display());
    assert!(err.contains(&expected), "{err}");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

/// A fresh `--bind-rw` folder (mode 0700, root's) with one file in it.
fn rw_folder(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    std::fs::write(dir.join("in.txt"), "session data").unwrap();
    dir
}

#[test]
fn a_bind_rw_folder_and_proc_give_the_vmm_its_folder_and_its_own_process_only() {
    use std::os::unix::fs::MetadataExt;

    let base = chroot_base("bind-rw-proc");
    let dir = rw_folder("bind-rw-proc");
    // A world-readable host file, reachable through a descriptor the jail is given, which the
    // jail's /proc turns into a path (/proc/self/fd/N/...): only Landlock stands in the way.
    let host = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bind-rw-proc-host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("secret.txt"), "host data").unwrap();
    let world_readable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
    std::fs::set_permissions(host.join("secret.txt"), world_readable).unwrap();
    let host_fd = std::fs::File::open(&host).unwrap();
    let fd = host_fd.as_raw_fd();
    // SAFETY: clears close-on-exec on our own descriptor so the jailer inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);

    let inside = dir.join("in.txt");
    let through_fd = format!("/proc/self/fd/{fd}/secret.txt");
    let cases = [
        // The folder, at its own path.
        (inside.to_str().unwrap(), "opened"),
        // The VMM's own pagemap (a restored VM's scrub reads it).
        ("/proc/self/pagemap", "opened"),
        // PID 1 of the jail's namespace is the VMM itself: its root is the jail, which has no
        // /etc; the host's processes are not there at all.
        ("/proc/1/root/etc/shadow", "No such file or directory"),
        ("/proc/2/status", "No such file or directory"),
        // subset=pid: no /proc/sys, /proc/kcore...
        ("/proc/sys/kernel/hostname", "No such file or directory"),
        ("/proc/kcore", "No such file or directory"),
        // Listing /proc is not granted, and a host folder behind a descriptor stays closed.
        ("/proc", "Permission denied"),
        (through_fd.as_str(), "Permission denied"),
    ];
    for (i, (path, expected)) in cases.iter().enumerate() {
        let id = jail_id(&format!("bind-rw-proc-{i}"));
        let extra = ["--bind-rw", dir.to_str().unwrap(), "--mount-proc", "--keep-fd", &fd.to_string()];
        let out = output(&mut jailed(&base, &id, &extra, &["--test-open", path, "--", "hello"]));
        let err = stderr(&out);
        assert!(err.contains(&format!("test-open {path}: {expected}")), "{path}: {err}");
        assert_eq!(residue(&base, &id), Vec::<String>::new());
    }
    drop(host_fd);
    // The folder is root's again, with what is in it.
    for path in [&dir, &inside] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bind_rw_folder_belongs_to_the_jail_uid_while_the_vmm_runs() {
    use std::os::unix::fs::MetadataExt;

    let base = chroot_base("bind-rw-owner");
    let dir = rw_folder("bind-rw-owner");
    let id = jail_id("bind-rw-owner");
    let (mut jailer, pid) = start_spinning_with(&base, &id, &["--bind-rw", dir.to_str().unwrap()]);
    for path in [dir.clone(), dir.join("in.txt")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{}", path.display());
    }
    // The VMM sees the folder at the same path, and no /proc unless asked.
    let root = format!("/proc/{pid}/root");
    assert!(Path::new(&root).join(dir.strip_prefix("/").unwrap()).join("in.txt").exists());
    assert!(!Path::new(&root).join("proc/self").exists());
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) };
    wait_with_timeout(&mut jailer, Duration::from_secs(20));
    assert_eq!(std::fs::metadata(dir.join("in.txt")).unwrap().uid(), 0);
    assert_eq!(residue(&base, &id), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bind_rw_folders_that_are_open_links_or_hold_links_and_proc_without_a_pid_ns_are_refused() {
    use std::os::unix::fs::PermissionsExt;

    let base = chroot_base("bind-rw-refused");
    let id = jail_id("bind-rw-refused");
    let open = rw_folder("bind-rw-refused-open");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let holds_link = rw_folder("bind-rw-refused-link");
    std::os::unix::fs::symlink("/etc/shadow", holds_link.join("evil")).unwrap();
    let good = rw_folder("bind-rw-refused-good");
    let link = good.with_file_name("bind-rw-refused-symlink");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&good, &link).unwrap();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--bind-rw".into(), open.display().to_string()], "must be closed to everyone but its owner"),
        (vec!["--bind-rw".into(), holds_link.display().to_string()], "evil, a symbolic link"),
        (vec!["--bind-rw".into(), link.display().to_string()], "is not a real folder at that path"),
        (vec!["--bind-rw".into(), "/run".into()], "is taken"),
        (vec!["--bind-rw".into(), "/".into()], "cannot be `/`"),
    ];
    for (extra, says) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = output(&mut jailed(&base, &id, &extra, &["--", "hello"]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: expected {says:?} in {err}");
        assert!(!base.exists(), "{extra:?}: a refused request created the jail base");
    }
    // Without --new-pid-ns, a procfs would show the host's processes.
    let mut command = std::process::Command::new(jailer());
    command.args(["--id", &id, "--exec-file"]).arg(static_vmm());
    command.args(["--uid", &UID.to_string(), "--gid", &GID.to_string(), "--chroot-base"]).arg(&base);
    command.args(["--mount-proc", "--", "run", "--", "hello"]);
    let out = output(&mut command);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--mount-proc needs --new-pid-ns"), "{}", stderr(&out));
    assert_eq!(
        std::fs::metadata(holds_link.join("in.txt"))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap(),
        0
    );
    for dir in [&open, &holds_link, &good] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    std::fs::remove_file(&link).unwrap();
}

#[test]
fn cleanup_gives_a_bind_rw_folder_back_when_the_supervisor_was_killed() {
    use std::os::unix::fs::MetadataExt;

    let base = chroot_base("orphan-rw");
    let id = jail_id("orphan-rw");
    let dir = rw_folder("orphan-rw");
    let (mut supervisor, vmm) = start_spinning_with(&base, &id, &["--bind-rw", dir.to_str().unwrap()]);
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    let status = format!("/proc/{vmm}/status");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&status).exists() && !status_field(&status, "State").starts_with('Z') {
        assert!(std::time::Instant::now() < deadline, "the VMM outlived its supervisor");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(std::fs::metadata(dir.join("in.txt")).unwrap().uid(), UID, "nobody gave the folder back");

    let mut cleanup = std::process::Command::new(jailer());
    cleanup.args(["cleanup", "--id", &id, "--chroot-base"]).arg(&base).arg("--bind-rw").arg(&dir);
    let out = output(&mut cleanup);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("back to root"), "{}", stderr(&out));
    for path in [&dir, &dir.join("in.txt")] {
        assert_eq!(std::fs::metadata(path).unwrap().uid(), 0, "{}", path.display());
    }
    assert_eq!(residue(&base, &id), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `cella-jailer prepare` for a spare under `base`; returns its folder.
fn prepare_spare(base: &Path, spare: &str) -> std::path::PathBuf {
    let out = output(
        std::process::Command::new(jailer())
            .args(["prepare", "--id", spare, "--exec-file"])
            .arg(static_vmm())
            .arg("--chroot-base")
            .arg(base),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dir = base.join("cella-vmm").join(spare);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), dir.display().to_string());
    dir
}

#[test]
fn a_prepared_jail_is_taken_once_with_its_own_netns_and_leaves_nothing_behind() {
    let base = chroot_base("prepared");
    let spare = jail_id("spare");
    let id = jail_id("prepared");
    let dir = prepare_spare(&base, &spare);
    // The spare holds an empty root and a network namespace mounted beside it.
    assert_eq!(std::fs::read_dir(dir.join("root")).unwrap().count(), 0);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo.contains(&dir.join("netns").display().to_string()), "no netns mount: {mountinfo}");

    let (mut supervisor, pid) = start_spinning_with(&base, &id, &["--from-prepared", &spare]);
    assert!(!dir.exists(), "the spare was renamed to the jail");
    let jail_root = base.join("cella-vmm").join(&id).join("root");
    assert_eq!(inode(Path::new(&format!("/proc/{pid}/root/"))), inode(&jail_root));
    // The VMM sits in the spare's netns, which is not the host's.
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(theirs, std::fs::read_link("/proc/self/ns/net").unwrap());
    assert_eq!(
        inode(Path::new(&format!("/proc/{pid}/ns/net"))),
        inode(&base.join("cella-vmm").join(&id).join("netns"))
    );
    for task in tasks(pid) {
        assert_eq!(status_field(&format!("/proc/{pid}/task/{task}/status"), "CapEff"), "0000000000000000");
        assert_eq!(status_field(&format!("/proc/{pid}/task/{task}/status"), "Seccomp"), "2");
    }
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(supervisor.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut supervisor, Duration::from_secs(20));
    assert_eq!(status.code(), Some(244), "the VMM reports `stopped by a signal`");
    assert_eq!(residue(&base, &id), Vec::<String>::new());

    // A spare is one launch's: a launch naming it again says so and makes its own jail.
    let out = output(&mut jailed(&base, &jail_id("again"), &["--from-prepared", &spare], &["--", "hello"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want = format!(
        "not using the spare jail: spare jail {} does not exist; making the jail at launch",
        dir.display()
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    assert_eq!(residue(&base, "again"), Vec::<String>::new());
}

#[test]
fn an_exec_file_others_can_change_is_refused_and_cleanup_removes_unused_spares() {
    let base = chroot_base("exec-file");
    // The VMM runs the exec-file itself (no copy): one that its group or others could write is
    // refused before the VMM is cloned.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("writable-exec-file");
    std::fs::create_dir_all(&dir).unwrap();
    let other = dir.join("cella-vmm");
    let _ = std::fs::remove_file(&other);
    std::fs::copy(static_vmm(), &other).unwrap();
    for mode in [0o775, 0o757] {
        std::fs::set_permissions(&other, <std::fs::Permissions as PermissionsExt>::from_mode(mode)).unwrap();
        let id = jail_id("exec-file");
        let command = jailed(&base, &id, &[], &["--", "hello"]);
        let args: Vec<std::ffi::OsString> = command
            .get_args()
            .map(
                |a| if a == static_vmm().as_os_str() { other.clone().into_os_string() } else { a.to_owned() },
            )
            .collect();
        let out = output(std::process::Command::new(jailer()).args(args));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(247), "{err}");
        assert!(
            err.contains("step `open-exec-file` failed")
                && err.contains("writable by its group or by others"),
            "{err}"
        );
        assert_eq!(residue(&base, &id), Vec::<String>::new());
    }
    std::fs::remove_file(&other).unwrap();

    // An unused spare goes with `cleanup`, its netns mount included.
    let spare = jail_id("unused");
    prepare_spare(&base, &spare);
    let out = output(
        std::process::Command::new(jailer()).args(["cleanup", "--id", &spare, "--chroot-base"]).arg(&base),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(residue(&base, &spare), Vec::<String>::new());
}

#[test]
fn a_spare_cannot_be_the_jails_own_id_or_a_bad_id() {
    let base = chroot_base("spare-ids");
    let id = jail_id("spare-ids");
    for (spare, want) in
        [(id.as_str(), "is the jail's own --id"), ("../x", "may only hold letters, digits and hyphens")]
    {
        let out = output(&mut jailed(&base, &id, &["--from-prepared", spare], &["--", "hello"]));
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(want), "{spare}: {}", stderr(&out));
    }
    assert!(!base.exists(), "nothing was created");
}

/// A close-on-exec pipe: (read, write).
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new and owned here.
    unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
}

/// `command` with `--hand-off 4` and the write end of a pipe as its descriptor 4; returns the
/// read end (the pid comes there).
fn handing_off(command: &mut std::process::Command) -> std::fs::File {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (read, write) = pipe();
    let fd = write.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; the descriptor lives until the spawn returns (the
    // closure owns `write`).
    unsafe {
        command.pre_exec(move || {
            let _keep = &write;
            // dup2 onto itself would keep the close-on-exec flag: clear it instead.
            let r = if fd == 4 { libc::fcntl(4, libc::F_SETFD, 0) } else { libc::dup2(fd, 4) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    read
}

/// Reaps our child `pid`: its wait status.
fn reap(pid: i32, flags: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a local status word.
    (unsafe { libc::waitpid(pid, &mut status, flags) } == pid).then_some(status)
}

#[test]
fn a_handed_off_vmm_is_the_callers_own_confined_child_and_its_jail_the_callers_to_remove() {
    use cella_jailer::supervisor::{parse_hand_off, HandedOff};
    use cella_jailer::VmmStatus;
    let base = chroot_base("hand-off");
    let id = jail_id("hand-off");
    let mut command = jailed(&base, &id, &["--hand-off", "4"], &["--timeout-ms", "20000", "--", "spin"]);
    let mut read = handing_off(&mut command);
    // The VMM keeps the jailer's stdout and stderr: don't wait for them to close.
    let status = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    drop(command);
    assert_eq!(status.code(), Some(0));
    let mut said = String::new();
    std::io::Read::read_to_string(&mut read, &mut said).unwrap();
    let pid = parse_hand_off(&said).unwrap_or_else(|| panic!("no pid in {said:?}"));
    // The jailer is gone; the VMM is this process's child, confined on every thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !guest_runs_confined(pid) {
        assert!(std::time::Instant::now() < deadline, "the handed-off VMM never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    for task in tasks(pid) {
        let status = format!("/proc/{pid}/task/{task}/status");
        assert_eq!(status_field(&status, "PPid"), std::process::id().to_string());
        assert_eq!(status_field(&status, "Seccomp"), "2");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
        assert!(status_field(&status, "Uid").split_whitespace().all(|u| u == UID.to_string()));
    }
    // The jail stays, naming its owner, until the caller removes it.
    let owner = std::fs::read_to_string(base.join("cella-vmm").join(&id).join("owner")).unwrap();
    assert!(owner.starts_with(&format!("{} ", std::process::id())), "{owner}");
    assert!(!residue(&base, &id).is_empty());
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let wait_status = reap(pid, 0).expect("our child");
    let cell = HandedOff {
        id: id.clone(),
        chroot_base: base.clone(),
        exec_name: "cella-vmm".into(),
        cgroup_parent: None,
    };
    let outcome = cell.ended(pid, wait_status);
    assert_eq!(outcome.status, VmmStatus::Killed(libc::SIGKILL));
    assert_eq!(outcome.exit_code(), cella_abi::exit::VMM_KILLED);
    assert!(outcome.cleanup_error.is_none(), "{:?}", outcome.cleanup_error);
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn a_handed_off_launch_that_fails_in_the_child_leaves_the_caller_only_a_process_to_reap() {
    let base = chroot_base("hand-off-failing");
    let id = jail_id("hand-off-failing");
    let not_a_netns = runner_image();
    let extra = ["--netns", not_a_netns.to_str().unwrap(), "--hand-off", "4"];
    let mut command = jailed(&base, &id, &extra, &["--", "hello"]);
    let mut read = handing_off(&mut command);
    let out = output(&mut command);
    drop(command);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(247), "{err}");
    assert!(err.contains("step `join-netns` failed"), "{err}");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut read, &mut said).unwrap();
    let pid = cella_jailer::supervisor::parse_hand_off(&said).expect("the pid is told before the steps");
    // It has ended already (the jailer waited for that before removing the jail).
    let status = reap(pid, libc::WNOHANG).expect("an ended child to reap");
    assert!(libc::WIFEXITED(status), "{status}");
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}

#[test]
fn a_hand_off_descriptor_that_is_not_open_or_is_kept_for_the_vmm_is_refused() {
    let base = chroot_base("hand-off-refused");
    let id = jail_id("hand-off-refused");
    let out = output(&mut jailed(&base, &id, &["--hand-off", "97"], &["--", "hello"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("descriptor 97"), "{}", stderr(&out));
    let mut command = jailed(&base, &id, &["--hand-off", "4", "--keep-fd", "4"], &["--", "hello"]);
    let _read = handing_off(&mut command);
    let out = output(&mut command);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("also a --keep-fd"), "{}", stderr(&out));
    assert_eq!(residue(&base, &id), Vec::<String>::new());
}
