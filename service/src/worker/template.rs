//! The worker's templates. A template is a scanner VM with one policy's engine built, parked and
//! snapshotted (`cella-vmm template`, in a jail like a spare's when jailed); a spare restored
//! from it skips booting the runner, setting up its devices and building its engine, for jobs of
//! that policy. A job of another policy gets its policy over the channel and builds its engine
//! in the VM. The template's id goes into the job's report and its `job.succeeded` audit event.
//!
//! The worker keeps a [`Shelf`] of them:
//! - the **default** template, of the service's default built-in packs, made when the worker
//!   starts and again when the scanner image changes (its size or modification time; checked
//!   before each spare is made);
//! - up to `worker.policy_templates` more, one per other policy a job used, made in the
//!   background the first time a job of that policy runs (one build at a time), the least
//!   recently used put away when there are more. A policy whose template cannot be made is not
//!   tried again by this worker.
//!
//! A template made from a tenant's own packs holds that tenant's rules, so it is the tenant's:
//! a VM restored from it runs that tenant's jobs only ([`PolicyKey::may_run`]); one of built-in
//! packs only is shared. Each template lives in a new `<data>/spares/spare-<pid>-template-<n>`,
//! removed once the shelf has let it go and no spare is being started from it
//! ([`TemplateFolder`]): spares restored from it keep their memory mapped from the file. The
//! spare folder sweep removes what a gone process left.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use cella_host::job::SerializedPolicy;
use cella_host::template::TemplateIdentity;

use super::launch::Launcher;

/// Whose packs a template's engine holds, and so whose jobs its VMs may run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TemplateOwner {
    /// Built-in packs only: any tenant's jobs.
    Shared,
    /// Packs the tenant uploaded: that tenant's jobs only.
    Tenant(String),
}

/// The policy a job runs (or a template's engine holds), and whose it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub owner: TemplateOwner,
    /// SHA-256 (hex) of the serialized policy ([`cella_host::job::policy_sha256`]).
    pub policy_sha256: String,
}

impl PolicyKey {
    /// The key of a job of `tenant` under `policy` (its text: built-in names, `name@version`
    /// for the tenant's packs), serialized as `serialized`.
    pub fn of_job(tenant: &str, policy: &str, serialized: &SerializedPolicy) -> Self {
        let owner = match policy.contains('@') {
            true => TemplateOwner::Tenant(tenant.to_owned()),
            false => TemplateOwner::Shared,
        };
        PolicyKey { owner, policy_sha256: serialized.sha256().to_owned() }
    }

    /// Whether a job of this key may run in a VM restored from a template of `held`: one of
    /// built-in packs, or one of this job's tenant's own. Never another tenant's: its VM's
    /// memory holds that tenant's rules.
    pub fn may_run_in(&self, held: &PolicyKey) -> bool {
        match &held.owner {
            TemplateOwner::Shared => true,
            owner => *owner == self.owner,
        }
    }
}

/// A template's folder, removed when the last holder lets it go: the shelf, or a spare being
/// started from it (which reads the files).
#[derive(Debug)]
pub struct TemplateFolder(PathBuf);

impl TemplateFolder {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TemplateFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A template spares can be restored from.
#[derive(Debug, Clone)]
pub struct WorkerTemplate {
    pub folder: Arc<TemplateFolder>,
    pub identity: TemplateIdentity,
    pub key: PolicyKey,
    /// The policy as jobs name it (`secrets,pii,licenses`, `secrets,acme@3`), for the log.
    pub policy: String,
    /// How long it took to make, in ms.
    pub build_ms: u64,
    /// The scanner image it was made from, and its size and modification time then.
    pub image: PathBuf,
    pub image_stamp: Option<(SystemTime, u64)>,
}

impl WorkerTemplate {
    pub fn dir(&self) -> &Path {
        self.folder.path()
    }

    /// Whether the scanner image has changed since the template was made.
    pub fn is_stale(&self) -> bool {
        image_stamp(&self.image) != self.image_stamp
    }
}

/// What a spare restored from a template holds: the template's id (for the job's report and
/// audit event) and its policy.
#[derive(Debug, Clone)]
pub struct RestoredFrom {
    pub id: String,
    pub key: PolicyKey,
}

/// What the worker's default template is made from, kept to make it again.
#[derive(Debug, Clone)]
pub struct TemplateRecipe {
    /// The built-in packs whose engine it holds.
    pub policy: String,
    /// The worker's spares' folder (root's, 0700): each template gets a folder in it.
    pub spares_dir: PathBuf,
    /// The uid its jail runs as.
    pub uid: u32,
}

/// The worker's templates: the default one and those of other policies (see the module's
/// documentation).
#[derive(Debug, Default)]
pub struct Shelf {
    default: Option<WorkerTemplate>,
    /// Other policies' templates, the most recently used last.
    others: Vec<WorkerTemplate>,
    /// How many `others` are kept.
    capacity: usize,
    /// The policy whose template is being made, if one is.
    building: Option<PolicyKey>,
    /// Policies whose template could not be made.
    refused: HashSet<PolicyKey>,
    /// Set when the worker stops: nothing is put on the shelf any more.
    closed: bool,
}

impl Shelf {
    /// A shelf keeping up to `capacity` templates besides the default.
    pub fn new(capacity: usize) -> Self {
        Shelf { capacity, ..Shelf::default() }
    }

    pub fn default_template(&self) -> Option<&WorkerTemplate> {
        self.default.as_ref()
    }

    /// Puts `template` in place of the default; returns the one before.
    pub fn set_default(&mut self, template: WorkerTemplate) -> Option<WorkerTemplate> {
        if self.closed {
            return Some(template);
        }
        self.default.replace(template)
    }

    pub fn clear_default(&mut self) -> Option<WorkerTemplate> {
        self.default.take()
    }

    /// The template a spare for jobs of `key` is restored from: that policy's own (now the
    /// most recently used), else the default. Templates of a changed image are put away.
    pub fn for_key(&mut self, key: &PolicyKey) -> Option<WorkerTemplate> {
        self.others.retain(|t| !t.is_stale());
        if let Some(at) = self.others.iter().position(|t| t.key == *key) {
            let template = self.others.remove(at);
            self.others.push(template.clone());
            return Some(template);
        }
        self.default.clone()
    }

    /// Whether a template of `key` should be made now: not the default's, not on the shelf,
    /// not refused before, room for one, and no other being made. If so, it is marked as
    /// being made; the caller then calls [`Shelf::built`].
    pub fn start_building(&mut self, key: &PolicyKey) -> bool {
        let wanted = !self.closed
            && self.capacity > 0
            && self.building.is_none()
            && self.default.as_ref().is_none_or(|d| d.key != *key)
            && !self.others.iter().any(|t| t.key == *key)
            && !self.refused.contains(key);
        if wanted {
            self.building = Some(key.clone());
        }
        wanted
    }

    /// The end of a build [`Shelf::start_building`] allowed: the template is shelved (the
    /// least recently used put away if there are more than the capacity), or its policy is
    /// not tried again.
    pub fn built(&mut self, key: &PolicyKey, template: Option<WorkerTemplate>) {
        self.building = None;
        match template {
            Some(t) if !self.closed => {
                self.others.push(t);
                let over = self.others.len().saturating_sub(self.capacity);
                self.others.drain(..over);
            }
            Some(_) => {}
            None => {
                self.refused.insert(key.clone());
            }
        }
    }

    /// Lets every template go (when the worker stops); their folders go with their last spare.
    pub fn close(&mut self) {
        self.closed = true;
        self.default = None;
        self.others.clear();
    }
}

/// A file's modification time and size.
fn image_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Makes the worker's default template (blocking) and puts it in place of the one before.
/// Says what happened in the log; without a template, spares boot the image.
pub fn make(launcher: &Launcher, recipe: &TemplateRecipe) {
    let made = launcher
        .builtin_policy(&recipe.policy)
        .map_err(|reason| TemplateBuildError::Policy { policy: recipe.policy.clone(), reason })
        .and_then(|serialized| {
            let key =
                PolicyKey { owner: TemplateOwner::Shared, policy_sha256: serialized.sha256().to_owned() };
            build(launcher, key, &recipe.policy, serialized.bytes(), &recipe.spares_dir, recipe.uid)
        });
    match made {
        Ok(t) => {
            tracing::info!(
                template = &t.identity.id[..12],
                policy = %t.policy,
                build_ms = t.build_ms,
                "template made; spares are restored from it"
            );
            launcher.shelf().set_default(t);
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "no template; spares boot the scanner image");
            launcher.shelf().clear_default();
        }
    }
}

/// Why a template could not be made.
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
    let spares = std::fs::canonicalize(spares).unwrap_or(spares.to_owned());
    spares.join(format!("spare-{}-template-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Makes a template of `key`, whose serialized policy is `bytes` (named `policy` in the log),
/// in a new folder under `spares_dir`. Blocking: run it off the async runtime.
pub fn build(
    launcher: &Launcher,
    key: PolicyKey,
    policy: &str,
    bytes: &[u8],
    spares_dir: &Path,
    uid: u32,
) -> Result<WorkerTemplate, TemplateBuildError> {
    use std::os::unix::fs::DirBuilderExt;
    let started = Instant::now();
    let image = launcher.scanner_image();
    let stamp = image_stamp(&image);
    let dir = folder(spares_dir);
    let folder_error = |source| TemplateBuildError::Folder { path: dir.clone(), source };
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&dir).map_err(folder_error)?;
    // Removed with the folder, whatever happens from here on.
    let folder = Arc::new(TemplateFolder(dir.clone()));
    let policy_file = dir.join("policy.json");
    std::fs::write(&policy_file, bytes).map_err(folder_error)?;

    let mut command = template_command(launcher, &dir, &policy_file, uid);
    let program = PathBuf::from(command.get_program());
    let output = command.output().map_err(|source| TemplateBuildError::Spawn { program, source })?;
    let _ = std::fs::remove_file(&policy_file);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(TemplateBuildError::Failed { status: output.status, stderr: tail.trim().to_owned() });
    }
    let identity = TemplateIdentity::read(&dir)?;
    if identity.policy_sha256 != key.policy_sha256 {
        return Err(TemplateBuildError::OtherPolicy {
            held: identity.policy_sha256,
            wanted: key.policy_sha256,
        });
    }
    Ok(WorkerTemplate {
        folder,
        identity,
        key,
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
        cella_log::words_for_people(&mut command);
        template_args(&mut command, &image);
        return command;
    }
    let mut command = Command::new(launcher.vmm().with_file_name("cella-jailer"));
    cella_log::words_for_people(&mut command);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(owner: TemplateOwner, policy: &str) -> PolicyKey {
        PolicyKey { owner, policy_sha256: cella_host::job::policy_sha256(policy.as_bytes()) }
    }

    fn tenant(name: &str) -> TemplateOwner {
        TemplateOwner::Tenant(name.to_owned())
    }

    fn template(dir: &Path, key: &PolicyKey) -> WorkerTemplate {
        WorkerTemplate {
            folder: Arc::new(TemplateFolder(dir.join(&key.policy_sha256[..8]))),
            identity: TemplateIdentity::new(key.policy_sha256.as_bytes(), b"image", 64, "0"),
            key: key.clone(),
            policy: "p".into(),
            build_ms: 1,
            image: dir.join("image"),
            image_stamp: image_stamp(&dir.join("image")),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cella-shelf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("image"), b"image").unwrap();
        dir
    }

    #[test]
    fn a_job_runs_in_shared_templates_and_its_own_tenants_never_anothers() {
        let acme = key(tenant("acme"), "acme@1");
        let builtin = key(TemplateOwner::Shared, "secrets");
        assert!(acme.may_run_in(&builtin));
        assert!(acme.may_run_in(&key(tenant("acme"), "acme@2")));
        assert!(!acme.may_run_in(&key(tenant("globex"), "acme@1")));
        assert!(!builtin.may_run_in(&acme));
        // The same bytes under another tenant's name are still another tenant's template.
        assert!(!key(tenant("globex"), "acme@1").may_run_in(&acme));
    }

    #[test]
    fn only_a_policy_with_at_in_its_name_is_a_tenants() {
        let serialized = SerializedPolicy::new(b"x".to_vec());
        let builtin = PolicyKey::of_job("t1", "secrets,pii", &serialized);
        assert_eq!(builtin.owner, TemplateOwner::Shared);
        let own = PolicyKey::of_job("t1", "secrets,acme@3", &serialized);
        assert_eq!(own.owner, tenant("t1"));
        assert_eq!(own.policy_sha256, builtin.policy_sha256);
    }

    #[test]
    fn a_policy_gets_its_template_once_the_default_otherwise() {
        let dir = scratch("lookup");
        let mut shelf = Shelf::new(2);
        let default = key(TemplateOwner::Shared, "secrets,pii,licenses");
        let acme = key(tenant("acme"), "acme@1");
        assert!(shelf.for_key(&acme).is_none());
        shelf.set_default(template(&dir, &default));
        assert_eq!(shelf.for_key(&acme).unwrap().key, default);
        // The default's own policy is never built again; another is, once at a time.
        assert!(!shelf.start_building(&default));
        assert!(shelf.start_building(&acme));
        assert!(!shelf.start_building(&key(tenant("globex"), "g@1")));
        assert!(!shelf.start_building(&acme));
        shelf.built(&acme, Some(template(&dir, &acme)));
        assert_eq!(shelf.for_key(&acme).unwrap().key, acme);
        assert!(!shelf.start_building(&acme), "already on the shelf");
    }

    #[test]
    fn a_policy_whose_template_failed_is_not_tried_again() {
        let mut shelf = Shelf::new(2);
        let acme = key(tenant("acme"), "acme@1");
        assert!(shelf.start_building(&acme));
        shelf.built(&acme, None);
        assert!(!shelf.start_building(&acme));
        assert!(shelf.start_building(&key(tenant("acme"), "acme@2")));
    }

    #[test]
    fn the_least_recently_used_goes_and_its_folder_with_its_last_holder() {
        let dir = scratch("lru");
        let mut shelf = Shelf::new(2);
        let keys: Vec<PolicyKey> = (1..=3).map(|v| key(tenant("acme"), &format!("acme@{v}"))).collect();
        for k in &keys[..2] {
            assert!(shelf.start_building(k));
            let t = template(&dir, k);
            std::fs::create_dir_all(t.dir()).unwrap();
            shelf.built(k, Some(t));
        }
        // acme@1 used again: acme@2 is now the least recently used, and a spare being started
        // holds it.
        shelf.for_key(&keys[0]);
        let held = shelf.for_key(&keys[1]);
        shelf.for_key(&keys[0]);
        assert!(shelf.start_building(&keys[2]));
        shelf.built(&keys[2], Some(template(&dir, &keys[2])));
        assert_eq!(shelf.for_key(&keys[1]).map(|t| t.key), None, "acme@2 put away");
        assert_eq!(shelf.for_key(&keys[0]).unwrap().key, keys[0]);
        let folder = held.as_ref().unwrap().dir().to_owned();
        assert!(folder.is_dir(), "a spare being started holds it");
        drop(held);
        assert!(!folder.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn templates_of_a_changed_image_are_put_away_and_nothing_is_shelved_after_close() {
        let dir = scratch("stale");
        let mut shelf = Shelf::new(2);
        let acme = key(tenant("acme"), "acme@1");
        assert!(shelf.start_building(&acme));
        shelf.built(&acme, Some(template(&dir, &acme)));
        std::fs::write(dir.join("image"), b"another image").unwrap();
        assert!(shelf.for_key(&acme).is_none());
        assert!(shelf.start_building(&acme));
        shelf.close();
        shelf.built(&acme, Some(template(&dir, &acme)));
        assert!(shelf.for_key(&acme).is_none());
        assert!(shelf.set_default(template(&dir, &acme)).is_some(), "handed back, not kept");
        assert!(shelf.default_template().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
