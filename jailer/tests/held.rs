//! Held spare jails (`cella-jailer --hold`): a jail made and its VMM started ahead, launched by
//! a later `--from-prepared`, against real processes on this machine.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Starts a held spare with `extra` jailer arguments and `vmm` VMM arguments (after `run
/// --image /image`), and waits until it says `ready`. Returns the holder and its VMM's pid.
fn hold(base: &Path, spare: &str, extra: &[&str], vmm: &[&str]) -> (Child, i32) {
    let mut args = vec!["--hold"];
    args.extend_from_slice(extra);
    let mut holder = jailed(base, spare, &args, vmm)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cella-jailer starts");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    if line.trim() != format!("ready {spare}") {
        let _ = holder.kill();
        let mut err = String::new();
        holder.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("the held spare did not get ready (it said {line:?}): {err}");
    }
    let pid = vmm_pid(holder.id() as i32).expect("the held VMM runs");
    (holder, pid)
}

/// Waits for a holder; returns its exit code and stderr.
fn end_of(mut holder: Child) -> (Option<i32>, String) {
    let status = wait_with_timeout(&mut holder, Duration::from_secs(30));
    let mut err = String::new();
    holder.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

fn launch(base: &Path, id: &str, spare: &str, extra: &[&str], vmm: &[&str]) -> std::process::Output {
    let mut args = vec!["--from-prepared", spare];
    args.extend_from_slice(extra);
    output(&mut jailed(base, id, &args, vmm))
}

#[test]
fn a_held_vmm_waits_confined_then_runs_its_launch_with_the_launchers_stdio_and_leaves_nothing() {
    let base = chroot_base("held");
    let spare = jail_id("held-spare");
    let id = jail_id("held-launch");
    let vmm = ["--json", "--", "hello"];
    let (holder, pid) = hold(&base, &spare, &[], &vmm);
    // While it waits: in its jail, its own namespaces, no capabilities, no new privileges.
    let jail_root = base.join("cella-vmm").join(&spare).join("root");
    assert_eq!(inode(Path::new(&format!("/proc/{pid}/root/"))), inode(&jail_root));
    let status = format!("/proc/{pid}/status");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Uid").split_whitespace().next(), Some(UID.to_string().as_str()));
    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "{ns}");
    }

    let out = launch(&base, &id, &spare, &["--timings"], &vmm);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // The guest's console went to the launcher's stderr, the VMM's report to its stdout.
    assert!(err.contains("hello from cella-runner"), "{err}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(r#""exit":{"kind":"exited","code":0}"#), "{report}");
    assert!(report.contains(r#""verified_zero":true"#), "{report}");
    assert!(!err.contains("making the jail at launch"), "{err}");
    // Its timings are those of the launch: the jail was made ahead.
    let timings = err.lines().find_map(|l| l.strip_prefix("cella-jailer: timings: ")).unwrap_or_default();
    assert!(timings.contains("take-held-jail=") && timings.contains("vmm-run="), "{timings}");
    assert!(!timings.contains("clone="), "{timings}");

    let (code, holder_err) = end_of(holder);
    assert_eq!(code, Some(0), "{holder_err}");
    assert_eq!(residue(&base, &spare), Vec::<String>::new());
    assert_eq!(residue(&base, &id), Vec::<String>::new());

    // A held spare is one launch's: the next launch naming it makes its own jail.
    let again = jail_id("held-again");
    let out = launch(&base, &again, &spare, &[], &vmm);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("making the jail at launch"), "{}", stderr(&out));
    assert_eq!(residue(&base, &again), Vec::<String>::new());
}

#[test]
fn a_launched_held_vmm_enforces_the_jails_landlock_rules() {
    let base = chroot_base("held-landlock");
    // The jail's root is listable by its mode (0755); only Landlock refuses it. Its image is
    // readable: a rule allows it.
    for (path, code, says) in
        [("/", 1, "test-open /: Permission denied"), ("/image", 0, "test-open /image: opened")]
    {
        let spare = jail_id("held-ll-spare");
        let vmm = ["--test-open", path, "--", "hello"];
        let (holder, _) = hold(&base, &spare, &[], &vmm);
        let out = launch(&base, &jail_id("held-ll"), &spare, &[], &vmm);
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert_eq!(end_of(holder).0, Some(code));
    }
    assert_eq!(residue(&base, "held-ll"), Vec::<String>::new());
}

#[test]
fn a_launch_of_another_shape_is_refused_and_the_held_jail_discarded() {
    let base = chroot_base("held-shape");
    let spare = jail_id("held-shape-spare");
    let (holder, _) = hold(&base, &spare, &[], &["--", "hello"]);
    // Other VMM arguments: the launch makes its own jail and runs as asked.
    let out = launch(&base, &jail_id("held-shape"), &spare, &[], &["--", "exit", "3"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(
            "not using the held spare jail: it was held for another jail (it differs in: VMM arguments); \
             making the jail at launch"
        ),
        "{err}"
    );
    let (code, holder_err) = end_of(holder);
    assert_eq!(code, Some(0), "{holder_err}");
    assert!(holder_err.contains("the held spare was discarded before a launch took it"), "{holder_err}");
    assert_eq!(residue(&base, "held-shape"), Vec::<String>::new());

    // --hold passes no descriptors on, and cannot take a spare itself.
    let out = output(&mut jailed(&base, &spare, &["--hold", "--keep-fd", "1"], &["--", "hello"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--hold cannot pass descriptors on"), "{}", stderr(&out));
    let out = output(&mut jailed(&base, &spare, &["--hold", "--from-prepared", "x"], &["--", "hello"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!base.join("cella-vmm").join(&spare).exists());
}

#[test]
fn a_launch_binds_its_own_files_and_socket_folder_into_the_held_jail() {
    let base = chroot_base("held-binds");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("held-binds");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (placeholder, data) = (tmp.join("placeholder"), tmp.join("data"));
    std::fs::write(&placeholder, "held").unwrap();
    std::fs::write(&data, "launch").unwrap();
    // The launch's socket folder, with the caller's listener for vsock port 1024 in it.
    let sockets = tmp.join("sockets");
    std::fs::DirBuilder::new().mode(0o700).create(&sockets).unwrap();
    let listen_at = sockets.join("v.sock_1024");
    let listener = std::os::unix::net::UnixListener::bind(&listen_at).unwrap();
    std::os::unix::fs::chown(&listen_at, Some(UID), Some(GID)).unwrap();
    std::fs::set_permissions(&listen_at, std::fs::Permissions::from_mode(0o600)).unwrap();
    listener.set_nonblocking(true).unwrap();

    let spare = jail_id("held-binds-spare");
    let vmm = ["--vsock", "/run/v.sock", "--timeout-ms", "20000", "--", "vsock-echo", "1024"];
    let held_file = format!("{}=/data", placeholder.display());
    let (holder, pid) = hold(&base, &spare, &["--ro-file", &held_file], &vmm);
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/root/data")).unwrap(), "held");

    let launch_file = format!("{}=/data", data.display());
    let extra = ["--ro-file", launch_file.as_str(), "--socket-dir", sockets.to_str().unwrap()];
    let mut args = vec!["--from-prepared", spare.as_str()];
    args.extend_from_slice(&extra);
    let mut launcher = jailed(&base, &jail_id("held-binds"), &args, &vmm)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the held VMM's guest never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    // The VMM sees the launch's file and socket folder (given to its uid), not the held ones.
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/root/data")).unwrap(), "launch");
    assert_eq!(inode(Path::new(&format!("/proc/{pid}/root/run"))), inode(&sockets));
    assert_eq!(std::fs::metadata(&sockets).unwrap().uid(), UID);
    stream.set_nonblocking(false).unwrap();
    stream.write_all(b"ping").unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping");
    drop(stream);

    let status = wait_with_timeout(&mut launcher, Duration::from_secs(30));
    let mut err = String::new();
    launcher.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(end_of(holder).0, Some(0));
    // Nothing of it shows on the host, and the socket folder went with the jail.
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&tmp.display().to_string()));
    assert!(!sockets.exists(), "the socket folder outlived its jail");
    assert_eq!(residue(&base, "held-binds"), Vec::<String>::new());
}

#[test]
fn signals_reach_a_held_vmm_through_its_launcher_and_a_killed_launcher_takes_the_vm_with_it() {
    let base = chroot_base("held-signals");
    let vmm = ["--timeout-ms", "20000", "--", "spin"];
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let spare = jail_id(&format!("held-sig{signal}-spare"));
        let (holder, pid) = hold(&base, &spare, &[], &vmm);
        let mut launcher = jailed(&base, &jail_id("held-sig"), &["--from-prepared", &spare], &vmm)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the guest runs: the vCPU thread exists and every thread is confined.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !guest_runs_confined(pid) {
            assert!(Instant::now() < deadline, "the held VMM was never launched, or runs unconfined");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: kill(2) to our own child process.
        unsafe { libc::kill(launcher.id() as i32, signal) };
        let status = wait_with_timeout(&mut launcher, Duration::from_secs(20));
        if signal == libc::SIGTERM {
            assert_eq!(status.code(), Some(244), "the VMM reports `stopped by a signal`");
        }
        let (_, err) = end_of(holder);
        if signal == libc::SIGKILL {
            assert!(err.contains("killed by SIGKILL"), "{err}");
        }
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the VMM outlived its launch");
        assert_eq!(residue(&base, &spare), Vec::<String>::new());
    }
}

#[test]
fn a_held_jail_is_discarded_by_sigterm_or_when_its_vmm_dies_and_leaves_nothing() {
    let base = chroot_base("held-discard");
    let spare = jail_id("held-discard-term");
    let (holder, pid) = hold(&base, &spare, &[], &["--", "hello"]);
    // SAFETY: kill(2) to our own child process.
    unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) };
    let (code, err) = end_of(holder);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the held spare was discarded before a launch took it: a signal"), "{err}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(residue(&base, &spare), Vec::<String>::new());

    let spare = jail_id("held-discard-vmm");
    let (holder, pid) = hold(&base, &spare, &[], &["--", "hello"]);
    // SAFETY: kill(2) to the held VMM, a grandchild of this test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (code, err) = end_of(holder);
    assert_eq!(code, Some(247), "{err}");
    assert!(err.contains("the held spare's VMM ended before a launch took it"), "{err}");
    assert_eq!(residue(&base, &spare), Vec::<String>::new());
    // A launch naming it finds no spare and makes its own jail.
    let out = launch(&base, &jail_id("held-discard"), &spare, &[], &["--", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("making the jail at launch"), "{}", stderr(&out));
}
