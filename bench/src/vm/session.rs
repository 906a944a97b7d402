//! `cella-bench vm session`: what a session's lifecycle costs, for sessions of several guest
//! memory sizes, side by side in one run with the alternative a session exists to beat: a cold
//! launch that loads and indexes the same artifact again.
//!
//! For each size: cold launch (`cella-vmm session --artifact`, a new process) to the first
//! answer (`stats` over vsock); pause and resume latency over the control socket; snapshot
//! create time and on-disk size; restore (`cella-vmm session --restore`, a new process) to the
//! first answer, the first restore of a snapshot (its memory file never mapped before) and later
//! ones apart; and restore into a spare session VMM (`cella-vmm session --api-fd`, started and
//! confined ahead, untimed) that gets the snapshot's files as descriptors with `PUT
//! /snapshot/load`, to the first answer. Every timing is taken by this process, as a client
//! sees it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use cella_proto::{SessionRequest, SessionResult};
use cella_vmm::control::ControlClient;
use cella_vmm::session_client::GuestSession;
use cella_vmm::snapshot;
use clap::Args;
use serde::Serialize;

use super::{figures, Figures};
use crate::exit_code;

/// How long a session may take to answer its first request (a large artifact indexes first).
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct SessionBenchArgs {
    /// Sessions to measure, as GUEST_MIB:ARTIFACT_MIB pairs (the artifact is a tar of text files)
    #[arg(long, value_delimiter = ',', default_value = "64:8,512:64")]
    pub sizes: Vec<String>,
    /// Cold launches and restores measured per size
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Pause/resume cycles per size
    #[arg(long, default_value_t = 50)]
    pub cycles: usize,
    /// Scratch folder for artifacts, sockets and snapshots (on the disk snapshots would use)
    /// [default: a folder in the temporary folder]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Run every session VMM through cella-jailer (`session --jailed`) from a spare jail made
    /// ahead (untimed), as the service does
    #[arg(long)]
    pub jailed: bool,
    /// Print the figures as one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct SizeBench {
    jailed: bool,
    mem_mib: u64,
    artifact_mib: u64,
    files: u64,
    /// Spawn `session --artifact` → first `stats` answer (boot + read + index).
    cold_first_answer: Figures,
    pause: Figures,
    resume: Figures,
    /// `PUT /snapshot/create` as the client sees it.
    snapshot_create: Figures,
    /// What the snapshot occupies on disk (state.bin + the allocated blocks of memory.bin).
    snapshot_disk_mib: f64,
    /// Guest memory bytes the snapshot holds (non-zero pages).
    snapshot_data_mib: f64,
    /// Spawn `session --restore` → first `stats` answer, the snapshot's first restore.
    restore_first_answer_first: f64,
    /// The same, later restores of the same snapshot.
    restore_first_answer: Figures,
    /// cold p50 / restore p50.
    restore_speedup_p50: f64,
    /// `PUT /snapshot/load` with the files into a spare made ahead → first `stats` answer.
    spare_restore_first_answer: Figures,
}

pub fn main(args: SessionBenchArgs) -> ExitCode {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("cella-bench-session-{}", std::process::id())));
    let result = bench(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(rows) => {
            if args.json {
                println!("{}", serde_json::to_string(&rows).unwrap_or_default());
            } else {
                print_table(&rows);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cella-bench vm session: error: {e}");
            ExitCode::from(exit_code::VMM_FAILED)
        }
    }
}

fn bench(args: &SessionBenchArgs, dir: &Path) -> Result<Vec<SizeBench>, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut rows = Vec::new();
    for size in &args.sizes {
        let (mem_mib, artifact_mib) = parse_size(size)?;
        eprintln!("cella-bench vm session: {mem_mib} MiB guest, {artifact_mib} MiB artifact …");
        rows.push(bench_size(args, dir, mem_mib, artifact_mib)?);
    }
    Ok(rows)
}

fn parse_size(text: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--sizes: `{text}` is not GUEST_MIB:ARTIFACT_MIB (e.g. 512:64)");
    let (mem, artifact) = text.split_once(':').ok_or_else(bad)?;
    let mem: u64 = mem.trim().parse().map_err(|_| bad())?;
    let artifact: u64 = artifact.trim().parse().map_err(|_| bad())?;
    if artifact * 2 >= mem {
        return Err(format!("--sizes {text}: the index may use half the guest's heap; give the guest more than twice the artifact"));
    }
    Ok((mem, artifact))
}

fn bench_size(
    args: &SessionBenchArgs,
    dir: &Path,
    mem_mib: u64,
    artifact_mib: u64,
) -> Result<SizeBench, String> {
    // One folder holds the session's artifact, sockets and snapshot, as in the service: a jailed
    // session gets exactly that folder (0700, root's) bound into its cell.
    let work = dir.join(format!("{mem_mib}-{artifact_mib}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(|e| format!("{}: {e}", work.display()))?;
    }
    let (artifact, files) = write_artifact(&work, artifact_mib)?;
    let jailed = args.jailed;
    let runs = args.runs.max(1);

    // Cold launches; the last one stays up for the pause, resume and snapshot figures.
    let mut cold = Vec::new();
    let mut kept = None;
    for run in 0..runs {
        let spare = prepare_spare(jailed)?;
        let started = Instant::now();
        let mut session =
            Session::spawn(&work, mem_mib, ("--artifact", &artifact), jailed, spare.as_deref())?;
        session.first_answer()?;
        cold.push(ms(started));
        if run + 1 == runs {
            kept = Some(session);
        } else {
            session.stop()?;
        }
    }
    let mut session = kept.ok_or("no session was launched")?;
    let control = session.control();
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..args.cycles.max(1) {
        std::thread::sleep(Duration::from_millis(2));
        let t = Instant::now();
        control.pause().map_err(|e| e.to_string())?;
        pause.push(ms(t));
        let t = Instant::now();
        control.resume().map_err(|e| e.to_string())?;
        resume.push(ms(t));
    }

    let mut create = Vec::new();
    let snap = work.join("snapshot");
    let mut info = serde_json::Value::Null;
    for _ in 0..runs {
        control.pause().map_err(|e| e.to_string())?;
        let t = Instant::now();
        info = control.snapshot_create(&snap).map_err(|e| e.to_string())?;
        create.push(ms(t));
        control.resume().map_err(|e| e.to_string())?;
    }
    session.stop()?;
    let disk = info["memory_disk_bytes"].as_u64().unwrap_or(0) + info["state_bytes"].as_u64().unwrap_or(0);
    let data = info["memory_bytes_written"].as_u64().unwrap_or(0);

    let mut restores = Vec::new();
    for _ in 0..=runs {
        let spare = prepare_spare(jailed)?;
        let started = Instant::now();
        let mut restored = Session::spawn(&work, mem_mib, ("--restore", &snap), jailed, spare.as_deref())?;
        restored.first_answer()?;
        restores.push(ms(started));
        restored.stop()?;
    }
    let first_restore = restores.remove(0);
    let mut spare_restores = Vec::new();
    for n in 0..runs {
        let mut spare = SpareSession::start(&work, mem_mib, jailed, n)?;
        spare.wait_ready()?;
        let started = Instant::now();
        spare.load(&snap, &artifact)?;
        spare.first_answer()?;
        spare_restores.push(ms(started));
        spare.stop()?;
    }
    snapshot::remove(&snap).map_err(|e| cella_vmm::error_chain(&e))?;

    let cold = figures(cold);
    let restore = figures(restores);
    Ok(SizeBench {
        jailed,
        mem_mib,
        artifact_mib,
        files,
        restore_speedup_p50: cold.p50_ms / restore.p50_ms.max(1e-3),
        cold_first_answer: cold,
        pause: figures(pause),
        resume: figures(resume),
        snapshot_create: figures(create),
        snapshot_disk_mib: disk as f64 / (1 << 20) as f64,
        snapshot_data_mib: data as f64 / (1 << 20) as f64,
        restore_first_answer_first: first_restore,
        restore_first_answer: restore,
        spare_restore_first_answer: figures(spare_restores),
    })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A tar of `mib` MiB of the scan benchmark's corpus (source-like text with planted findings,
/// in 256 KiB files); returns its path and the number of files.
fn write_artifact(dir: &Path, mib: u64) -> Result<(PathBuf, u64), String> {
    let bytes = (mib as usize) << 20;
    let (corpus, _) = cella_policies::rules::bench::generate_corpus(bytes);
    let path = super::scan::tarball(&corpus, bytes, dir)?;
    Ok((path, bytes.div_ceil(256 << 10) as u64))
}

/// For a jailed launch, a spare jail made (untimed) the way the service keeps one ready:
/// `cella-jailer prepare`, with this executable as the VMM.
fn prepare_spare(jailed: bool) -> Result<Option<String>, String> {
    if !jailed {
        return Ok(None);
    }
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let exe = crate::binaries::sibling("cella-vmm")?;
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("bench-spare-{}-{n}", std::process::id());
    let out = Command::new(exe.with_file_name("cella-jailer"))
        .args(["prepare", "--id", &id, "--exec-file"])
        .arg(&exe)
        .output()
        .map_err(|e| format!("cannot run cella-jailer prepare: {e}"))?;
    if !out.status.success() {
        return Err(format!("cella-jailer prepare failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(Some(id))
}

/// A spare session VMM (`cella-vmm session --api-fd 3`), jailed (`cella-jailer`, its own cell:
/// no folder of the host bound, /proc for the scrub) or not, started ahead of its snapshot.
struct SpareSession {
    child: cella_host::spawn::Spawned,
    api: PathBuf,
    vsock: PathBuf,
    /// The listener handed over with the load (kept until the VMM has its own copy).
    listener: Option<std::os::unix::net::UnixListener>,
}

impl SpareSession {
    fn start(dir: &Path, mem_mib: u64, jailed: bool, n: usize) -> Result<SpareSession, String> {
        use std::os::fd::AsRawFd;
        let exe = crate::binaries::sibling("cella-vmm")?;
        let (api, vsock) = (dir.join("spare-api.sock"), dir.join("spare-vsock.sock"));
        let _ = std::fs::remove_file(&api);
        let listener =
            std::os::unix::net::UnixListener::bind(&api).map_err(|e| format!("{}: {e}", api.display()))?;
        let fd = cella_host::spawn::API_FD.to_string();
        let mut command = if jailed {
            let mut jailer = Command::new(exe.with_file_name("cella-jailer"));
            let uid = (64_900 + n).to_string();
            jailer.args(["--id", &format!("bench-sspare-{}-{n}", std::process::id()), "--exec-file"]);
            jailer.arg(&exe).args(["--uid", &uid, "--gid", &uid, "--new-pid-ns", "--mount-proc"]);
            jailer.args(["--cgroup", &format!("memory={}M", mem_mib + 256), "--cgroup", "pids=64"]);
            jailer.args(["--keep-fd", &fd, "--", "session", "--api-fd", &fd]);
            jailer
        } else {
            let mut vmm = Command::new(exe);
            vmm.args(["session", "--api-fd", &fd]);
            vmm
        };
        command.stdout(Stdio::null());
        let child = cella_host::spawn::Spawned::start(&command, listener.as_raw_fd(), false)
            .map_err(|e| format!("cannot start a spare session VMM: {e}"))?;
        Ok(SpareSession { child, api, vsock, listener: None })
    }

    /// Waits until it answers on its control socket (confined, waiting for a snapshot).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ControlClient::new(&self.api).state().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the spare session VMM did not answer".into());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the spare session VMM ended early ({status})"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Hands it the snapshot in `snap` (whose disk is `disk`) and a vsock listener bound here.
    fn load(&mut self, snap: &Path, disk: &Path) -> Result<(), String> {
        use std::os::fd::AsFd;
        let open = |path: &Path| std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()));
        let state = open(&snap.join(snapshot::STATE_FILE))?;
        let memory = open(&snap.join(snapshot::MEMORY_FILE))?;
        let disk = open(disk)?;
        let _ = std::fs::remove_file(&self.vsock);
        let listener = std::os::unix::net::UnixListener::bind(&self.vsock)
            .map_err(|e| format!("{}: {e}", self.vsock.display()))?;
        let files = cella_vmm::control::HandedSnapshotFiles {
            state: state.as_fd(),
            memory: memory.as_fd(),
            disk: Some(disk.as_fd()),
            vsock: Some(listener.as_fd()),
        };
        ControlClient::new(&self.api).snapshot_load_handed(&files, true, None).map_err(|e| e.to_string())?;
        self.listener = Some(listener);
        Ok(())
    }

    fn first_answer(&mut self) -> Result<(), String> {
        let mut guest = GuestSession::connect(&self.vsock, FIRST_ANSWER_TIMEOUT)
            .map_err(|e| cella_vmm::error_chain(&e))?;
        match guest
            .exec(&SessionRequest::Stats, None)
            .map_err(|e| cella_vmm::error_chain(&e))?
            .response
            .result
        {
            SessionResult::Stats(_) => Ok(()),
            other => Err(format!("stats answered {other:?}")),
        }
    }

    fn stop(&mut self) -> Result<(), String> {
        ControlClient::new(&self.api).stop().map_err(|e| e.to_string())?;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&self.vsock);
        let _ = std::fs::remove_file(&self.api);
        if status.success() {
            Ok(())
        } else {
            Err(format!("the spare session VMM ended with {status}"))
        }
    }
}

/// A `cella-vmm session` process of this executable.
struct Session {
    child: Option<Child>,
    api: PathBuf,
    vsock: PathBuf,
}

impl Session {
    fn spawn(
        dir: &Path,
        mem_mib: u64,
        source: (&str, &Path),
        jailed: bool,
        spare: Option<&str>,
    ) -> Result<Session, String> {
        let exe = crate::binaries::sibling("cella-vmm")?;
        let (api, vsock) = (dir.join("api.sock"), dir.join("vsock.sock"));
        let child = Command::new(exe)
            .args(["session", "--mem-mib", &mem_mib.to_string(), "--api-sock"])
            .arg(&api)
            .arg("--vsock")
            .arg(&vsock)
            .arg(source.0)
            .arg(source.1)
            .args(jailed.then_some("--jailed"))
            .args(spare.map(|id| ["--jail-prepared", id]).into_iter().flatten())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start a session: {e}"))?;
        Ok(Session { child: Some(child), api, vsock })
    }

    /// Connects over vsock as soon as the socket exists and asks for `stats`.
    fn first_answer(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + FIRST_ANSWER_TIMEOUT;
        while !self.vsock.exists() {
            if Instant::now() > deadline {
                return Err("the session never bound its vsock socket".into());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("the session process ended early ({status})"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut guest = GuestSession::connect(&self.vsock, FIRST_ANSWER_TIMEOUT)
            .map_err(|e| cella_vmm::error_chain(&e))?;
        match guest
            .exec(&SessionRequest::Stats, None)
            .map_err(|e| cella_vmm::error_chain(&e))?
            .response
            .result
        {
            SessionResult::Stats(_) => Ok(()),
            other => Err(format!("stats answered {other:?}")),
        }
    }

    fn control(&self) -> ControlClient {
        ControlClient::new(&self.api)
    }

    fn stop(&mut self) -> Result<(), String> {
        self.control().stop().map_err(|e| e.to_string())?;
        if let Some(mut child) = self.child.take() {
            child.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn print_table(rows: &[SizeBench]) {
    println!("session lifecycle (ms; p50 / p99 unless noted; each first answer is a `stats` over vsock)");
    for r in rows {
        println!();
        let how = if r.jailed { "jailed" } else { "unjailed" };
        println!("{} MiB guest, {} MiB artifact ({} files), {how}", r.mem_mib, r.artifact_mib, r.files);
        let row = |name: &str, f: &Figures| println!("  {name:<40} {:>9.2} / {:>9.2}", f.p50_ms, f.p99_ms);
        row("cold launch + load + index → answer", &r.cold_first_answer);
        row("pause (control socket)", &r.pause);
        row("resume (control socket)", &r.resume);
        row("snapshot create", &r.snapshot_create);
        println!(
            "  {:<40} {:>9.1} MiB on disk ({:.1} MiB of guest data)",
            "snapshot size", r.snapshot_disk_mib, r.snapshot_data_mib
        );
        println!("  {:<40} {:>9.2}", "restore (new process) → answer, first", r.restore_first_answer_first);
        row("restore (new process) → answer, later", &r.restore_first_answer);
        println!("  {:<40} {:>9.1}x", "cold p50 / restore p50", r.restore_speedup_p50);
        row("restore into a spare VMM → answer", &r.spare_restore_first_answer);
    }
}
