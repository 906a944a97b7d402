//! Who a handed-off jail belongs to (`--hand-off`): with no supervisor staying behind, the
//! caller removes the jail when its VMM ends. A caller that is killed first cannot, so the jail
//! records its owner — the caller's pid and its start time, which a reused pid does not share —
//! in `<jail>/owner`, and [`sweep`] (run by the next caller on the host) removes the jails of
//! owners that are gone. The VMM itself never outlives its owner: its parent-death signal is
//! SIGKILL.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The file in a jail's folder naming its owner (outside the VMM's root: the VMM never sees it).
const OWNER_FILE: &str = "owner";

/// A process's start time (clock ticks after boot, field 22 of `/proc/PID/stat`), if it runs.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Records this process's parent as the owner of the jail in `jail_dir`.
pub(crate) fn record(jail_dir: &Path) -> io::Result<()> {
    // SAFETY: getppid(2) has no preconditions.
    let parent = unsafe { libc::getppid() };
    let started = start_time(parent).ok_or_else(|| io::Error::other("the caller is gone"))?;
    fs::write(jail_dir.join(OWNER_FILE), format!("{parent} {started}\n"))
}

/// Whether the owner recorded in `jail_dir` is gone (a jail with no owner record is a
/// supervised one, or one being made: never gone).
fn owner_gone(jail_dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(jail_dir.join(OWNER_FILE)) else { return false };
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(started)) =
        (parts.next().and_then(|p| p.parse().ok()), parts.next().and_then(|s| s.parse::<u64>().ok()))
    else {
        return false;
    };
    start_time(pid) != Some(started)
}

/// Removes the handed-off jails under `<chroot_base>/<exec_name>` whose owners are gone (their
/// cgroups too, killing anything left in them); returns what it removed. `cgroup_parent` is the
/// parent the jails were made under, if not the default.
pub fn sweep(chroot_base: &Path, exec_name: &str, cgroup_parent: Option<&str>) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(chroot_base.join(exec_name)) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if crate::config::validate_id(&id).is_ok() && owner_gone(&entry.path()) {
            if let Ok(paths) = crate::supervisor::cleanup(&id, chroot_base, exec_name, cgroup_parent) {
                removed.extend(paths);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_gone_when_its_pid_is_gone_or_started_at_another_time() {
        let dir = std::env::temp_dir().join(format!("cella-owner-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let me = std::process::id() as i32;
        let started = start_time(me).unwrap();
        fs::write(dir.join(OWNER_FILE), format!("{me} {started}\n")).unwrap();
        assert!(!owner_gone(&dir));
        fs::write(dir.join(OWNER_FILE), format!("{me} {}\n", started + 1)).unwrap();
        assert!(owner_gone(&dir), "a reused pid is not the owner");
        fs::write(dir.join(OWNER_FILE), "999999999 1\n").unwrap();
        assert!(owner_gone(&dir));
        fs::remove_file(dir.join(OWNER_FILE)).unwrap();
        assert!(!owner_gone(&dir), "no record: not a handed-off jail");
        let _ = fs::remove_dir_all(&dir);
    }
}
