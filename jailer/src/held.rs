//! Held spare jails: a jail made, and its VMM started in it, ahead of the launch.
//!
//! `cella-jailer --hold --id SPARE …` makes the jail as a launch would and starts the VMM
//! with `--await-go` first among its arguments and its standard input a Unix socket whose other
//! end this supervisor keeps. The VMM builds what needs nothing from its launch (VM, memory,
//! image, vCPU; see `cella_vmm::held`) and says it is ready (`R`); the supervisor then listens
//! at `<jail folder>/hold.sock` (root's, outside the VMM's root) and prints `ready` on its
//! standard output.
//!
//! A launch `cella-jailer --from-prepared SPARE …` that finds that socket connects, sends its
//! standard input, output and error (`SCM_RIGHTS`) and what its jail would be (its [`shape`]:
//! everything but the id), and waits. If the held jail has the same shape, the supervisor
//! binds the launch's files over the held ones (its `--ro-file` host files, its `--socket-dir`;
//! see [`crate::rebind`]), makes the jail's Landlock ruleset there, answers `taken`, hands the
//! descriptors and the ruleset to the VMM with `G` (the VMM enforces the ruleset on itself
//! first: a held VMM runs without Landlock until then, since Landlock rules hold on to the
//! files that exist when they are made), and supervises it as usual,
//! forwarding signals; the launcher forwards its own signals to the supervisor, and if the
//! launcher goes away the VMM is killed. When the VMM has ended and the jail is removed, the
//! supervisor sends the outcome ([`encode_outcome`]) and the launcher exits as a launch would.
//! A held jail of another shape answers `refused`, is discarded, and the launch makes its own
//! jail. The held jail keeps its spare's name for its folder and cgroups.
//!
//! A held spare is one launch's. It is discarded (VMM killed, jail removed) when its
//! supervisor gets SIGINT, SIGTERM or SIGHUP (also its parent-death signal), or when the VMM
//! ends before a launch.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::{JailConfig, SOCKET_DIR};
use crate::rebind::Bind;
use crate::supervisor::{step, JailError, Outcome, VmmStatus};
use crate::timing::Timings;
use crate::wait::{poll_read, read_signal, signal_fd};

/// The held jail's socket, in its folder beside `root`.
pub const HOLD_SOCKET: &str = "hold.sock";
/// The argument the held VMM gets first.
pub const AWAIT_GO: &str = "--await-go";
/// What the held VMM sends when it is ready, and what launches it (`cella_vmm::held`).
const READY: u8 = b'R';
const GO: u8 = b'G';
/// How long a held VMM may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest shape a launcher may send.
const SHAPE_MAX: u64 = 1 << 20;

/// What a jail is, but for its id and what a launch brings along (the host files behind its
/// `--ro-file` paths, its `--socket-dir`): two launches of the same shape may use the same held
/// jail. One `name: value` line per part, so a refusal can say which parts differ.
pub fn shape(config: &JailConfig) -> String {
    let parents: Vec<_> = config.cgroups.hierarchies.iter().map(|h| h.dir.parent()).collect();
    let ro_paths: Vec<&PathBuf> = config.ro_files.iter().map(|f| &f.jail).collect();
    let parts: [(&str, String); 12] = [
        ("exec-file", format!("{:?}", config.exec_file)),
        ("uid", config.uid.to_string()),
        ("gid", config.gid.to_string()),
        ("chroot-base", format!("{:?}", config.chroot_base)),
        ("cgroup", format!("{:?} {:?}", config.cgroups.settings, parents)),
        ("netns", format!("{:?}", config.netns)),
        ("new-pid-ns", config.new_pid_ns.to_string()),
        ("ro-file", format!("{ro_paths:?}")),
        ("bind-rw", format!("{:?}", config.bind_rw)),
        ("mount-proc", config.mount_proc.to_string()),
        ("rlimit", format!("{:?}", config.rlimits)),
        ("VMM arguments", format!("{:?}", config.vmm_args)),
    ];
    parts.iter().map(|(name, value)| format!("{name}: {value}\n")).collect()
}

/// What a launch brings into a held jail: `launch-file JAIL\tHOST` for each `--ro-file`,
/// `launch-sockets HOST` for its `--socket-dir`. None if a path holds a tab or a newline.
fn launch_binds(config: &JailConfig) -> Option<String> {
    let plain = |path: &Path| path.to_str().filter(|p| !p.contains(['\t', '\n'])).map(str::to_owned);
    let mut text = String::new();
    for file in &config.ro_files {
        text.push_str(&format!("launch-file {}\t{}\n", plain(&file.jail)?, plain(&file.host)?));
    }
    if let Some(dir) = &config.socket_dir {
        text.push_str(&format!("launch-sockets {}\n", plain(dir)?));
    }
    Some(text)
}

/// The binds a launch's request asks for, over what the held jail was made with: the files
/// whose host file differs, and the socket folder (given to the jail's uid/gid, as a launch's
/// child would).
fn binds_for(config: &JailConfig, request: &str) -> Result<(Vec<Bind>, Option<PathBuf>), String> {
    let mut binds = Vec::new();
    let mut socket_dir = None;
    for line in request.lines() {
        if let Some(spec) = line.strip_prefix("launch-file ") {
            let (jail, host) = spec.split_once('\t').ok_or("a bad launch-file line")?;
            let held =
                config.ro_files.iter().find(|f| f.jail == Path::new(jail)).ok_or("an unknown jail path")?;
            if held.host != Path::new(host) {
                binds.push(Bind { host: host.into(), jail: jail.into(), read_only: true });
            }
        } else if let Some(dir) = line.strip_prefix("launch-sockets ") {
            std::os::unix::fs::chown(dir, Some(config.uid), Some(config.gid))
                .map_err(|e| format!("cannot give {dir} to the jail's uid: {e}"))?;
            binds.push(Bind { host: dir.into(), jail: SOCKET_DIR.into(), read_only: false });
            socket_dir = Some(PathBuf::from(dir));
        }
    }
    Ok((binds, socket_dir))
}

/// The parts in which two shapes differ, by name.
fn differences(held: &str, wanted: &str) -> Vec<String> {
    let name = |line: &str| line.split_once(": ").map_or(line, |(n, _)| n).to_owned();
    let wanted: String =
        wanted.lines().filter(|l| !l.starts_with("launch-")).map(|l| format!("{l}\n")).collect();
    let mut names: Vec<String> =
        held.lines().zip(wanted.lines()).filter(|(a, b)| a != b).map(|(a, _)| name(a)).collect();
    if held.lines().count() != wanted.lines().count() {
        names.push("the jailer version".to_owned());
    }
    names
}

/// How a held spare's wait ended.
enum Held {
    /// A launcher of the same shape took it: the VMM runs for it; send it the outcome, and
    /// remove the launch's socket folder when the VMM is gone.
    Taken { launcher: UnixStream, socket_dir: Option<PathBuf> },
    /// Discarded (a signal, a launcher of another shape); the VMM must be killed.
    Discarded(&'static str),
    /// The VMM ended while held.
    VmmEnded(VmmStatus),
}

/// Holds the jail until a launch takes it: returns the launcher's connection and the socket
/// folder the launch brought (removed with the jail). A spare given up (discarded, or its VMM
/// gone) is an error; its VMM is killed and reaped by then, and the caller removes the jail.
pub(crate) fn until_launched(
    config: &JailConfig,
    pid: i32,
    vmm: &UnixStream,
    signals: &OwnedFd,
) -> Result<(UnixStream, Option<PathBuf>), JailError> {
    let give_up = |e: JailError| {
        // SAFETY: kill(2) to our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = crate::supervisor::wait_for(pid);
        e
    };
    match hold(config, pid, vmm, signals).map_err(give_up)? {
        Held::Taken { launcher, socket_dir } => Ok((launcher, socket_dir)),
        Held::Discarded(why) => Err(give_up(JailError::HeldDiscarded(why))),
        Held::VmmEnded(status) => {
            let ended = Outcome {
                status,
                pid,
                limits_hit: Vec::new(),
                timings: Timings::default(),
                cleanup_error: None,
            };
            Err(JailError::HeldVmmEnded(ended.describe(&config.id)))
        }
    }
}

/// The supervisor's side of a held spare, from the VMM's exec on: waits for the VMM to be
/// ready, says `ready` on stdout, and waits for a launch (see the module's text).
fn hold(config: &JailConfig, pid: i32, vmm: &UnixStream, signals: &OwnedFd) -> Result<Held, JailError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(step("await-ready", Path::new("/"))(io::ErrorKind::TimedOut.into()));
        }
        let ready = poll_read(&[vmm.as_raw_fd(), signals.as_raw_fd()], Some(left));
        if ready[1] {
            if let Some(held) = on_signal(pid, signals) {
                return Ok(held);
            }
        }
        if ready[0] {
            let mut byte = [0u8; 1];
            match (&*vmm).read(&mut byte) {
                Ok(1) if byte[0] == READY => break,
                // The VMM failed before it was ready (its message is on stderr).
                _ => return Ok(Held::VmmEnded(crate::supervisor::wait_for(pid))),
            }
        }
    }

    let path = config.jail_dir().join(HOLD_SOCKET);
    let listener = UnixListener::bind(&path).map_err(step("listen-for-launch", &path))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {}", config.id).and_then(|()| out.flush()).map_err(step("say-ready", &path))?;
    loop {
        let ready = poll_read(&[listener.as_raw_fd(), signals.as_raw_fd()], None);
        if ready[1] {
            if let Some(held) = on_signal(pid, signals) {
                return Ok(held);
            }
        }
        if ready[0] {
            if let Ok((conn, _)) = listener.accept() {
                let _ = std::fs::remove_file(&path);
                return Ok(launch(config, pid, vmm, conn));
            }
        }
    }
}

/// A signal while held: SIGCHLD if the VMM ended; any other discards the spare.
fn on_signal(pid: i32, signals: &OwnedFd) -> Option<Held> {
    match read_signal(signals)? {
        libc::SIGCHLD => crate::supervisor::try_wait(pid).map(Held::VmmEnded),
        _ => Some(Held::Discarded("a signal")),
    }
}

/// A launcher connected: checks it is root's and of this jail's shape, and launches the VMM
/// with its descriptors.
fn launch(config: &JailConfig, pid: i32, vmm: &UnixStream, conn: UnixStream) -> Held {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut header = [0u8; 8];
    let mut fds: [RawFd; 3] = [-1; 3];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() }];
    // SAFETY: `iov` points at `header`, which lives for the call and may hold any bytes.
    let received = unsafe { conn.recv_with_fds(&mut iov, &mut fds) };
    let count = received.as_ref().map_or(0, |&(_, count)| count);
    // SAFETY: the first `count` entries are new descriptors this process owns.
    let files: Vec<File> = fds[..count].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
    let refuse = |conn: &UnixStream, why: &str| {
        let _ = writeln!(&*conn, "refused {why}");
        Held::Discarded("a launcher it could not take")
    };
    if !matches!(received, Ok((8, 3))) || peer(&conn).map(|c| c.uid) != Some(0) {
        return refuse(&conn, "the launch request was not understood");
    }
    let len = u64::from_le_bytes(header);
    let mut wanted = String::new();
    if len > SHAPE_MAX || (&conn).take(len).read_to_string(&mut wanted).map_or(true, |n| n as u64 != len) {
        return refuse(&conn, "the launch request was not understood");
    }
    let differ = differences(&shape(config), &wanted);
    if !differ.is_empty() {
        return refuse(
            &conn,
            &format!("it was held for another jail (it differs in: {})", differ.join(", ")),
        );
    }
    let (binds, socket_dir) = match binds_for(config, &wanted) {
        Ok(binds) => binds,
        Err(why) => return refuse(&conn, &why),
    };
    let ruleset = crate::rebind::into_jail(pid, &binds, || {
        let exec_path = Path::new("/").join(&config.exec_name);
        let ro: Vec<PathBuf> = config.ro_files.iter().map(|f| f.jail.clone()).collect();
        let made = crate::confine::ruleset(&exec_path, &ro, config.bind_rw.as_deref(), config.mount_proc);
        let fd = made.ok().and_then(Option::<OwnedFd>::from);
        fd.ok_or_else(|| step("landlock", "/")(io::Error::other("this kernel does not enforce Landlock")))
    });
    let ruleset = match ruleset {
        Ok(fd) => fd,
        Err(e) => return refuse(&conn, &crate::error_chain(&e)),
    };
    let mut raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    raw.push(ruleset.as_raw_fd());
    if vmm.send_with_fds(&[&[GO][..]], &raw).is_err() {
        return refuse(&conn, "its VMM is gone");
    }
    let _ = conn.set_read_timeout(None);
    if writeln!(&conn, "taken").is_err() {
        return Held::Discarded("a launcher that went away");
    }
    Held::Taken { launcher: conn, socket_dir }
}

/// The peer's credentials (pid, uid) as the kernel recorded them when it connected.
fn peer(conn: &UnixStream) -> Option<libc::ucred> {
    // SAFETY: an all-zero ucred is valid; getsockopt fills at most `len` bytes of it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above; `cred` and `len` live for the call.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred)
}

/// The outcome as lines for the launcher: `status exited|killed N`, `pid N`, `limit …`,
/// `timings …`, `cleanup …`, then `end`.
pub(crate) fn encode_outcome(outcome: &Outcome) -> String {
    let mut text = match outcome.status {
        VmmStatus::Exited(code) => format!("status exited {code}\n"),
        VmmStatus::Killed(signal) => format!("status killed {signal}\n"),
    };
    text.push_str(&format!("pid {}\n", outcome.pid));
    for limit in &outcome.limits_hit {
        text.push_str(&format!("limit {}\n", limit.replace('\n', " ")));
    }
    text.push_str(&format!("timings {}\n", outcome.timings.line()));
    if let Some(e) = &outcome.cleanup_error {
        text.push_str(&format!("cleanup {}\n", crate::error_chain(e).replace('\n', " ")));
    }
    text.push_str("end\n");
    text
}

fn decode_outcome(text: &str) -> Option<Outcome> {
    let mut outcome = Outcome {
        status: VmmStatus::Exited(-1),
        pid: 0,
        limits_hit: Vec::new(),
        timings: Timings::default(),
        cleanup_error: None,
    };
    let mut status = None;
    let mut ended = false;
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "status" => {
                let (kind, n) = value.split_once(' ')?;
                let n: i32 = n.parse().ok()?;
                status = Some(if kind == "killed" { VmmStatus::Killed(n) } else { VmmStatus::Exited(n) });
            }
            "pid" => outcome.pid = value.parse().ok()?,
            "limit" => outcome.limits_hit.push(value.to_owned()),
            "timings" => outcome.timings = Timings::parse_line(value),
            "cleanup" => outcome.cleanup_error = Some(JailError::Reported(value.to_owned())),
            "end" => ended = true,
            _ => {}
        }
    }
    outcome.status = status?;
    ended.then_some(outcome)
}

/// What became of a launch's `--from-prepared` spare.
#[derive(Debug)]
pub enum Take {
    /// It is not a held spare (no such socket): take it as a prepared folder, if it is one.
    NotHeld,
    /// A held spare that could not be taken (the reason is printed); make the jail at launch.
    Refused,
    /// The held spare ran the VMM: this is how it ended.
    Ran(Outcome),
}

/// The launcher's side: takes the held spare `spare`, if there is one, for `config`'s launch.
pub fn take(config: &JailConfig, spare: &str, t: &mut Timings) -> Result<Take, JailError> {
    let path: PathBuf = config.chroot_base.join(&config.exec_name).join(spare).join(HOLD_SOCKET);
    let start = Instant::now();
    let Some(binds) = launch_binds(config) else {
        return Ok(Take::NotHeld);
    };
    let Ok(conn) = UnixStream::connect(&path) else {
        return Ok(Take::NotHeld);
    };
    // Signals are blocked from here and forwarded to the holder (they reach the VMM from there).
    let set = crate::wait::supervised_signals();
    let mut old = crate::wait::empty_sigset();
    // SAFETY: sigprocmask with a valid set; `old` receives the previous mask.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) };
    let result = take_blocked(config, &conn, &path, &binds, &set, start, t);
    // SAFETY: restores the mask saved above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

fn take_blocked(
    config: &JailConfig,
    conn: &UnixStream,
    path: &Path,
    binds: &str,
    set: &libc::sigset_t,
    start: Instant,
    t: &mut Timings,
) -> Result<Take, JailError> {
    let signals = signal_fd(set).map_err(step("take-held-jail", path))?;
    let wanted = shape(config) + binds;
    let header = (wanted.len() as u64).to_le_bytes();
    // Until it answers `taken`, a held spare that went away (another launch took it, it was
    // discarded) costs this launch its head start only.
    let sent = conn.send_with_fds(&[&header[..]], &[0, 1, 2]).is_ok()
        && (&*conn).write_all(wanted.as_bytes()).is_ok();
    let holder = peer(conn).map(|c| c.pid).filter(|&pid| pid > 0);
    let mut reader = BufReader::new(conn);
    let mut answer = String::new();
    if sent {
        let _ = reader.read_line(&mut answer);
    }
    match answer.trim_end().split_once(' ').map_or((answer.trim_end(), ""), |(a, b)| (a, b)) {
        ("taken", _) => {}
        ("refused", why) => {
            eprintln!("cella-jailer: not using the held spare jail: {why}; making the jail at launch");
            return Ok(Take::Refused);
        }
        _ => {
            eprintln!("cella-jailer: the held spare jail did not answer; making the jail at launch");
            return Ok(Take::Refused);
        }
    }
    t.record("take-held-jail", start);

    let mut text = String::new();
    loop {
        let ready = poll_read(&[conn.as_raw_fd(), signals.as_raw_fd()], None);
        if ready[1] {
            if let (Some(signal), Some(holder)) = (read_signal(&signals), holder) {
                if signal != libc::SIGCHLD {
                    // SAFETY: kill(2) to the holder, which forwards it to the VMM.
                    unsafe { libc::kill(holder, signal) };
                }
            }
        }
        if ready[0] {
            let mut chunk = String::new();
            match reader.read_line(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => text.push_str(&chunk),
            }
            if chunk == "end\n" {
                break;
            }
        }
    }
    let mut outcome = decode_outcome(&text).ok_or_else(|| {
        step("held-jail-outcome", path)(io::Error::other(
            "the held jail's supervisor ended without saying how the VMM ended",
        ))
    })?;
    t.steps.append(&mut outcome.timings.steps);
    outcome.timings = t.clone();
    Ok(Take::Ran(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_name_the_parts_that_differ() {
        let a = "uid: 1\nro-file: [a]\nVMM arguments: [x]\n";
        let b = "uid: 1\nro-file: [b]\nVMM arguments: [y]\n";
        assert_eq!(differences(a, a), Vec::<String>::new());
        assert_eq!(differences(a, b), vec!["ro-file", "VMM arguments"]);
        assert_eq!(differences(a, "uid: 1\n"), vec!["the jailer version"]);
    }

    #[test]
    fn outcomes_round_trip() {
        let mut timings = Timings::default();
        timings.push("vmm-run", 1.5);
        let outcome = Outcome {
            status: VmmStatus::Killed(libc::SIGSYS),
            pid: 42,
            limits_hit: vec!["the memory limit was hit".into()],
            timings,
            cleanup_error: Some(JailError::Reported("cannot remove x".into())),
        };
        let back = decode_outcome(&encode_outcome(&outcome)).unwrap();
        assert_eq!(back.status, outcome.status);
        assert_eq!((back.pid, back.limits_hit.clone()), (42, outcome.limits_hit.clone()));
        assert_eq!(back.timings.steps, outcome.timings.steps);
        assert_eq!(back.cleanup_error.map(|e| e.to_string()).as_deref(), Some("cannot remove x"));
        assert!(decode_outcome("status exited 0\npid 1\n").is_none(), "no `end`: cut short");
    }
}
