//! The worker's template: at start, a scanner VM with the service's default built-in packs'
//! engine built is snapshotted once (`cella-vmm template`, in a jail like a spare's when
//! jailed), and every spare is restored from it (`cella-vmm spare --template`). A job of that
//! policy then skips booting the runner, setting up its devices and building its engine; a job
//! of any other policy gets its policy over the channel as before. The template's id goes into
//! the job's report and its `job.succeeded` audit event.
//!
//! Templates are made when a worker starts (the built-in packs are those of the running
//! binary) and again when the scanner image changes (its size or modification time; checked
//! before each spare is made), each in a new `<data>/spares/spare-<pid>-template-<n>`: spares
//! restored from the old one keep their mappings, and the spare folder sweep removes what a
//! gone process left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use cella_host::template::TemplateIdentity;

use super::launch::Launcher;

/// A template this worker's spares are restored from.
#[derive(Debug, Clone)]
pub struct WorkerTemplate {
    pub dir: PathBuf,
    pub identity: TemplateIdentity,
    /// The built-in packs whose engine it holds (`secrets,pii,licenses`).
    pub policy: String,
    /// How long it took to make, in ms.
    pub build_ms: u64,
    /// The scanner image it was made from, and its size and modification time then.
    pub image: PathBuf,
    pub image_stamp: Option<(SystemTime, u64)>,
}

impl WorkerTemplate {
    /// Whether the scanner image has changed since the template was made.
    pub fn is_stale(&self) -> bool {
        image_stamp(&self.image) != self.image_stamp
    }
}

/// What the worker's template is made from, kept to make it again.
#[derive(Debug, Clone)]
pub struct TemplateRecipe {
    /// The built-in packs whose engine it holds.
    pub policy: String,
    /// The worker's spares' folder (root's, 0700): each template gets a folder in it.
    pub spares_dir: PathBuf,
    /// The uid its jail runs as.
    pub uid: u32,
}

/// A file's modification time and size.
fn image_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Makes the worker's template (blocking) and puts it in place of the one before, whose
/// folder is removed (spares restored from it keep their mappings). Says what happened on
/// stderr; without a template, spares boot the image.
pub fn make(launcher: &Launcher, recipe: &TemplateRecipe) {
    let dir = folder(&std::fs::canonicalize(&recipe.spares_dir).unwrap_or(recipe.spares_dir.clone()));
    match build(launcher, &recipe.policy, &dir, recipe.uid) {
        Ok(t) => {
            tracing::info!(
                template = &t.identity.id[..12],
                policy = %t.policy,
                build_ms = t.build_ms,
                "template made; spares are restored from it"
            );
            if let Some(old) = launcher.set_template(t) {
                let _ = std::fs::remove_dir_all(&old.dir);
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "no template; spares boot the scanner image");
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(old) = launcher.clear_template() {
                let _ = std::fs::remove_dir_all(&old.dir);
            }
        }
    }
}

/// Why the worker has no template (its spares then boot the image).
#[derive(Debug, thiserror::Error)]
pub enum TemplateBuildError {
    #[error("the policy `{policy}` cannot be made: {reason}")]
    Policy { policy: String, reason: String },
    #[error("cannot prepare the template folder {path}")]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("cannot run {program}")]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("`cella-vmm template` failed ({status}): {stderr}")]
    Failed { status: std::process::ExitStatus, stderr: String },
    #[error(transparent)]
    Identity(#[from] cella_host::template::BadIdentity),
    #[error("the template holds the engine of policy {held}, not of the worker's {wanted}")]
    OtherPolicy { held: String, wanted: String },
}

/// A new folder for a template of this worker process, under its spares' folder.
fn folder(spares: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    spares.join(format!("spare-{}-template-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Makes the template of the built-in packs `policy` in `dir` (replacing what is there).
/// Blocking: run it off the async runtime.
pub fn build(
    launcher: &Launcher,
    policy: &str,
    dir: &Path,
    uid: u32,
) -> Result<WorkerTemplate, TemplateBuildError> {
    use std::os::unix::fs::DirBuilderExt;
    let started = Instant::now();
    let image = launcher.scanner_image();
    let stamp = image_stamp(&image);
    let bytes = launcher
        .builtin_policy(policy)
        .map_err(|reason| TemplateBuildError::Policy { policy: policy.to_owned(), reason })?;
    let folder_error = |source| TemplateBuildError::Folder { path: dir.to_owned(), source };
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(folder_error(e)),
        _ => {}
    }
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir).map_err(folder_error)?;
    let policy_file = dir.join("policy.json");
    std::fs::write(&policy_file, bytes.as_slice()).map_err(folder_error)?;

    let mut command = template_command(launcher, dir, &policy_file, uid);
    let program = PathBuf::from(command.get_program());
    let output = command.output().map_err(|source| TemplateBuildError::Spawn { program, source })?;
    let _ = std::fs::remove_file(&policy_file);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(TemplateBuildError::Failed { status: output.status, stderr: tail.trim().to_owned() });
    }
    let identity = TemplateIdentity::read(dir)?;
    let wanted = cella_host::job::policy_sha256(&bytes);
    if identity.policy_sha256 != wanted {
        return Err(TemplateBuildError::OtherPolicy { held: identity.policy_sha256, wanted });
    }
    Ok(WorkerTemplate {
        dir: dir.to_owned(),
        identity,
        policy: policy.to_owned(),
        build_ms: started.elapsed().as_millis() as u64,
        image,
        image_stamp: stamp,
    })
}

/// `cella-vmm template`, in a cell of its own when the worker is jailed: the folder bound
/// read-write (and given back to root when the jail ends), the image read-only.
fn template_command(launcher: &Launcher, dir: &Path, policy_file: &Path, uid: u32) -> Command {
    let mem = launcher.mem_mib().to_string();
    let image = launcher.scanner_image();
    let template_args = |command: &mut Command, image: &Path| {
        command.arg("template").arg("--out").arg(dir).arg("--compiled-policy").arg(policy_file);
        command.arg("--image").arg(image).args(["--mem-mib", &mem]);
    };
    if !launcher.jailed() {
        let mut command = Command::new(launcher.vmm());
        template_args(&mut command, &image);
        return command;
    }
    let mut command = Command::new(launcher.vmm().with_file_name("cella-jailer"));
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    command.arg("--id").arg(id).arg("--exec-file").arg(launcher.vmm());
    command.arg("--uid").arg(uid.to_string()).arg("--gid").arg(uid.to_string()).arg("--new-pid-ns");
    command.arg("--cgroup").arg(format!("memory={}M", u64::from(launcher.mem_mib()) + 32));
    command.arg("--cgroup").arg("pids=16");
    let mut ro = std::path::absolute(&image).unwrap_or(image).into_os_string();
    ro.push("=/image");
    command.arg("--ro-file").arg(ro).arg("--bind-rw").arg(dir).arg("--");
    template_args(&mut command, Path::new("/image"));
    command
}
