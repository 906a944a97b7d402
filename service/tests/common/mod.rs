//! What the end-to-end tests share: the binaries a jailed VMM needs (a static `cella-vmm` with
//! `cella-jailer` beside it), the real `cella serve` started as a child ([`Serve`] →
//! [`Server`]), a scratch folder that stops every VMM it holds when the test ends, and the
//! checks on a jailed VMM (its confinement, and what its jail left behind).

#![allow(dead_code)]

use cella_e2e::status_field;
use cella_service::client::ApiClient;
use serde_json::json;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `target/<profile>`, from this test executable's path (`target/<profile>/deps/<test>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo(args: &[&str], rustc_flags: &[&str]) {
    let profile = profile_dir();
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.args(args).arg("--quiet").arg("--manifest-path").arg(repo().join("Cargo.toml"));
    command.arg("--target-dir").arg(profile.parent().unwrap());
    if profile.file_name().and_then(|n| n.to_str()) == Some("release") {
        command.arg("--release");
    }
    if !rustc_flags.is_empty() {
        command.arg("--").args(rustc_flags);
    }
    assert!(command.status().unwrap().success(), "{command:?} failed");
}

/// A folder with a static `cella-vmm` and `cella-jailer` side by side (what a jailed VMM
/// needs: the jailer copies the VMM into the jail, which has no shared libraries), built once
/// per run.
pub fn vmm_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile = profile_dir();
        cargo(&["build", "-p", "cella-jailer", "--bin", "cella-jailer"], &[]);
        cargo(
            &["rustc", "-p", "cella-vmm", "--bin", "cella-vmm", "--features", "test-hooks"],
            &["-C", "target-feature=+crt-static", "-C", "strip=debuginfo"],
        );
        let dir = profile.join("service-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        for bin in ["cella-vmm", "cella-jailer"] {
            let tmp = dir.join(format!("{bin}.new.{}", std::process::id()));
            std::fs::copy(profile.join(bin), &tmp).unwrap();
            std::fs::rename(&tmp, dir.join(bin)).unwrap();
        }
        let scanner = repo().join("target/cella/cella-scanner");
        assert!(scanner.is_file(), "{} is missing: run `bash scripts/build-guest.sh`", scanner.display());
        dir
    })
}

pub fn vmm() -> PathBuf {
    vmm_dir().join("cella-vmm")
}

pub fn jailer() -> PathBuf {
    vmm_dir().join("cella-jailer")
}

/// Whether this process runs as root (the service's default is jailed then).
pub fn is_root() -> bool {
    status_field("/proc/self/status", "Uid").split_whitespace().nth(1) == Some("0")
}

/// The processes whose command line mentions `needle` (supervisors, VMMs, jailers).
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes().to_vec();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_slice())) {
            found.push(pid);
        }
    }
    found
}

/// A test's folder. Session VMMs outlive `serve` by design, so when the test ends (passed or
/// not) every process whose command line names this folder is asked to stop (SIGTERM: a
/// jail's supervisor stops the VM and removes the jail), killed if it has not after a few
/// seconds, and any jail left is cleaned up; then the folder is removed.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cella-se2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// Stops what runs from `dir` (see [`Scratch`]); returns how many processes it found.
pub fn stop_processes_in(dir: &Path) -> usize {
    let pids = processes_mentioning(dir);
    for pid in &pids {
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    }
    let start = Instant::now();
    while !processes_mentioning(dir).is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in processes_mentioning(dir) {
        let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
    }
    pids.len()
}

impl Drop for Scratch {
    fn drop(&mut self) {
        stop_processes_in(&self.0);
        if let Ok(sessions) = std::fs::read_dir(self.0.join("data/sessions")) {
            for entry in sessions.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(hex) = name.strip_prefix("session_").filter(|n| !n.contains('.')) {
                    let _ = Command::new(jailer())
                        .args(["cleanup", "--id", &format!("session-{hex}")])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
        }
        for mount in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mount points at or under `dir`, deepest first (as `umount` wants them).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// Mounts a tmpfs of `size` (`1M`) over `dir` (root only), so what is written there from now
/// on meets a disk that fills, for real. A [`Scratch`] unmounts it when it goes.
pub fn mount_small_disk(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs over {}", dir.display());
}

/// ENOSPC (the same on every Linux architecture).
const ENOSPC: i32 = 28;

/// Fills the filesystem of `dir` to the last byte (a file `filler`, written until ENOSPC in
/// ever smaller pieces).
pub fn fill_disk(dir: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join("filler")).unwrap();
    for size in [64 << 10, 4 << 10, 1] {
        let chunk = vec![0xa5u8; size];
        loop {
            match file.write(&chunk) {
                Ok(n) if n == size => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
    }
}

/// The jailed VMM under the supervisor `pid` (the process the service started): its child,
/// once that runs `cella-vmm`.
pub fn jailed_vmm(supervisor: u32) -> u32 {
    let start = Instant::now();
    loop {
        let children = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() == "cella-vmm"
            {
                return pid;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "supervisor {supervisor} runs no cella-vmm");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts that the VMM `pid` runs confined, as uid/gid `uid`: every thread with no effective
/// capability and a seccomp filter (mode 2). Returns the uid it runs as.
pub fn assert_confined(pid: u32) -> u32 {
    // The main, API and vCPU threads, each with the filter it installs when it starts.
    cella_e2e::wait_until_threads_confined(pid, 3);
    let tasks = cella_e2e::threads(pid);
    let mut uids = Vec::new();
    for task in &tasks {
        let status = format!("/proc/{pid}/task/{task}/status");
        assert_eq!(status_field(&status, "CapEff"), "0000000000000000", "CapEff of task {task}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "Seccomp of task {task}");
        let uid: Vec<u32> =
            status_field(&status, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
        let gid: Vec<u32> =
            status_field(&status, "Gid").split_whitespace().map(|g| g.parse().unwrap()).collect();
        assert!(uid.iter().all(|u| *u == uid[0]) && gid == uid, "task {task}: uid {uid:?} gid {gid:?}");
        uids.push(uid[0]);
    }
    uids.dedup();
    assert_eq!(uids.len(), 1, "{uids:?}");
    uids[0]
}

/// What the jail of session `session_id` left behind: its folder under the jailer's default
/// base, its cgroups.
pub fn jail_leftovers(session_id: &str) -> Vec<String> {
    jail_leftovers_of(&format!("session-{}", session_id.trim_start_matches("session_")))
}

/// What is left of the jail `id` (its folder, its cgroups).
#[allow(dead_code)]
pub fn jail_leftovers_of(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    let folder = Path::new("/dev/shm/cella-jailer/cella-vmm").join(id);
    if folder.exists() {
        found.push(format!("jail folder {}", folder.display()));
    }
    for parent in cella_e2e::cgroup_parents() {
        if parent.join(id).exists() {
            found.push(format!("cgroup {}", parent.join(id).display()));
        }
    }
    found
}

/// A small tar: `(path, contents)` pairs.
pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

/// Waits for a `cella serve` started with data folder `data` to write its URL (panics if it
/// exits or takes over 90 s); returns the URL and the CA certificate clients trust.
pub fn wait_for_serve(child: &mut std::process::Child, data: &Path) -> (String, Vec<u8>) {
    let start = Instant::now();
    let url = loop {
        if let Ok(url) = std::fs::read_to_string(data.join("serve.url")) {
            break url.trim().to_owned();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cella serve exited during start-up: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(90), "cella serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    (url, std::fs::read(data.join("tls/ca.pem")).unwrap())
}

/// The spare jails of `cella serve` process `pid` for `kind` (`job`: its worker's, `session`;
/// see the service's `spares` module).
pub fn spares_of(pid: u32, kind: &str) -> Vec<String> {
    let prefix = format!("spare-{pid}-{kind}");
    std::fs::read_dir("/dev/shm/cella-jailer/cella-vmm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 20 s) for a `kind` spare of `pid` not in `old`; returns its name.
pub async fn wait_for_spare(pid: u32, kind: &str, old: &[String]) -> String {
    let start = Instant::now();
    loop {
        if let Some(new) = spares_of(pid, kind).into_iter().find(|s| !old.contains(s)) {
            return new;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no spare jail appeared for worker {pid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `target/release/cella`, built now if its sources changed (as `scripts/setup.sh` builds it).
/// For tests that measure the server's throughput: in a debug build, TLS alone (ring's C
/// compiled without optimization, rustls unoptimized) costs many times what it does in the
/// build that runs in production.
pub fn release_cella() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = profile_dir().parent().unwrap().to_owned();
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command.args(["build", "--quiet", "--release", "-p", "cella-service", "--bin", "cella"]);
        command.arg("--manifest-path").arg(repo().join("Cargo.toml")).arg("--target-dir").arg(&target);
        assert!(command.status().unwrap().success(), "{command:?} failed");
        target.join("release/cella")
    })
}

/// The URL of a `#[sqlx::test]`'s own database (on the server of `DATABASE_URL`).
pub fn test_db_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").unwrap();
    let server =
        base.split_once('?').map_or(base.as_str(), |(s, _)| s).rsplit_once('/').unwrap().0.to_owned();
    format!("{server}/{}", pool.connect_options().get_database().unwrap())
}

/// `examples/sample-app` as a tar.
pub fn sample_tar() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all("sample-app", repo().join("examples/sample-app")).unwrap();
    tar.into_inner().unwrap()
}

/// `cella serve` on `data` with the database `db`, jailed when run as root, with a 2 s lease and
/// a 1 s drain (what the command-line end-to-end tests use).
pub fn serve_jailed(data: &Path, db: &str) -> Server {
    let jailed = if is_root() { "1" } else { "0" };
    Serve::new(data)
        .db(Some(db))
        .envs(&[("CELLA_JAILED", jailed), ("CELLA_LEASE_SECS", "2"), ("CELLA_DRAIN_SECS", "1")])
        .start()
}

/// Creates the tenant `name` with `cella tenant create` and returns its API key.
pub fn tenant_key(data: &Path, name: &str) -> String {
    let o = cella(data, None, &["tenant", "create", name]);
    assert!(o.status.success(), "cella tenant create: {}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().find_map(|l| l.strip_prefix("API key ")).expect("an API key line").trim().to_owned()
}

/// Runs the `cella` command line as a client of the `serve` whose data folder is `data` (it
/// finds the URL and CA there), with tenant API key `key`.
pub fn cella(data: &Path, key: Option<&str>, args: &[&str]) -> std::process::Output {
    // Files a command writes where it runs (`cella scan`'s default SARIF log) go next to the
    // data folder, in the test's scratch folder, never into the source tree.
    cella_in(data.parent().unwrap_or(data), data, key, args)
}

/// [`cella`], run in the folder `cwd` (`cella scan .`).
pub fn cella_in(cwd: &Path, data: &Path, key: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cella"));
    cmd.args(args).env("CELLA_DATA_DIR", data).env_remove("CELLA_URL").env_remove("CELLA_CA");
    cmd.current_dir(cwd);
    match key {
        Some(k) => cmd.env("CELLA_API_KEY", k),
        None => cmd.env_remove("CELLA_API_KEY"),
    };
    cmd.output().unwrap()
}

/// How to start the real `cella serve`: `--listen 127.0.0.1:0 --data-dir DATA`, the test's
/// static `cella-vmm` as `CELLA_VMM`, no inherited `DATABASE_URL` (the private PostgreSQL
/// unless [`Serve::db`] names one); more arguments, environment and an open-file limit as the
/// test needs.
#[derive(Debug)]
pub struct Serve {
    cmd: Command,
    data: PathBuf,
}

impl Serve {
    /// This test build's `cella`.
    pub fn new(data: &Path) -> Serve {
        Serve::binary(Path::new(env!("CARGO_BIN_EXE_cella")), data)
    }

    /// `cella` at `binary` (e.g. [`release_cella`]).
    pub fn binary(binary: &Path, data: &Path) -> Serve {
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data);
        cmd.env_remove("DATABASE_URL").env("CELLA_VMM", vmm()).stdout(Stdio::null()).stderr(Stdio::inherit());
        Serve { cmd, data: data.to_owned() }
    }

    /// PostgreSQL at `url` instead of the private cluster.
    pub fn db(mut self, url: Option<&str>) -> Serve {
        if let Some(url) = url {
            self.cmd.env("DATABASE_URL", url);
        }
        self
    }

    pub fn arg(mut self, arg: &str) -> Serve {
        self.cmd.arg(arg);
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Serve {
        self.cmd.env(name, value);
        self
    }

    /// Its stderr (the server log) to `file` instead of the test's.
    pub fn log_to(mut self, file: &Path) -> Serve {
        self.cmd.stderr(std::fs::File::create(file).unwrap());
        self
    }

    pub fn env_remove(mut self, name: &str) -> Serve {
        self.cmd.env_remove(name);
        self
    }

    pub fn envs(mut self, env: &[(&str, &str)]) -> Serve {
        self.cmd.envs(env.iter().copied());
        self
    }

    /// Starts `serve` with a soft and hard open-file limit of `n` (so its raise to the hard
    /// limit at start stays at `n`).
    pub fn open_files(mut self, n: u64) -> Serve {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
        // SAFETY: the closure runs in the forked child before exec and only calls setrlimit(2),
        // which is async-signal-safe; it allocates nothing and reads only its own copy of
        // `limit`.
        unsafe {
            self.cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    /// Starts it and waits until it serves.
    pub fn start(mut self) -> Server {
        let _ = std::fs::remove_file(self.data.join("serve.url"));
        let mut child = self.cmd.spawn().unwrap();
        let (url, ca) = wait_for_serve(&mut child, &self.data);
        Server { child: Some(child), data: self.data, url, ca }
    }
}

/// A running `cella serve`; SIGTERM when dropped.
#[derive(Debug)]
pub struct Server {
    pub child: Option<Child>,
    pub data: PathBuf,
    pub url: String,
    pub ca: Vec<u8>,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn admin(&self) -> ApiClient {
        let key = std::fs::read_to_string(self.data.join("admin.key")).unwrap();
        ApiClient::new(&self.url, key.trim(), Some(&self.ca)).unwrap()
    }

    /// A client with API key `key` (each a new connection pool).
    pub fn client(&self, key: &str) -> ApiClient {
        ApiClient::new(&self.url, key, Some(&self.ca)).unwrap()
    }

    /// A new tenant: its id, API key, and a client with that key.
    pub async fn tenant(&self, name: &str) -> (String, String, ApiClient) {
        let created = self.admin().post_json("/v1/admin/tenants", &json!({ "name": name })).await.unwrap();
        let key = created["key"]["api_key"].as_str().unwrap().to_owned();
        let client = self.client(&key);
        (created["tenant"]["id"].as_str().unwrap().to_owned(), key, client)
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(60) {
                    let _ = child.kill();
                    panic!("cella serve did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILL: nothing of `serve` gets to run (session VMMs are in sessions of their own).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }
}

/// Sends signal `sig` (`TERM`, `KILL`, ...) to `child`.
pub fn signal(child: &Child, sig: &str) {
    Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
}
