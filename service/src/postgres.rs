//! The private PostgreSQL `cella serve` runs when no `DATABASE_URL` is given: a cluster in
//! `<data dir>/postgres/`, listening only on a Unix socket in that folder, password-protected
//! (SCRAM, the password in `<data dir>/postgres.password`, 0600), started on `serve` and stopped
//! when it exits. PostgreSQL refuses to run as root, so under root it runs as the `postgres`
//! user that Debian's package creates.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::files;
use crate::ids;

/// The database Cella uses inside its private cluster.
const DATABASE: &str = "cella";
const ROLE: &str = "cella";

/// Why the private PostgreSQL could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "PostgreSQL's server programs are not installed (looked for /usr/lib/postgresql/*/bin/initdb): \
         install them (apt-get install postgresql) or set DATABASE_URL to an existing server"
    )]
    NotInstalled,
    #[error(
        "running as root, and PostgreSQL refuses to: there is no `postgres` user to run it as \
         (install Debian's postgresql package, or set DATABASE_URL)"
    )]
    NoPostgresUser,
    #[error(
        "the `postgres` user cannot reach {0}: choose a --data-dir whose parent folders it may \
         traverse (e.g. /var/lib/cella), or set DATABASE_URL"
    )]
    Unreachable(PathBuf),
    #[error(
        "the socket path {0} is longer than the 107 bytes a Unix socket allows: choose a shorter --data-dir"
    )]
    SocketPathTooLong(PathBuf),
    #[error(transparent)]
    File(#[from] files::FileError),
    #[error("cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{program} failed ({status}); see {log}: {stderr}")]
    Failed { program: String, status: std::process::ExitStatus, log: String, stderr: String },
    #[error("cannot create the `cella` database")]
    CreateDatabase(#[source] sqlx::Error),
    #[error("cannot read the password file {0}")]
    Password(PathBuf, #[source] std::io::Error),
}

/// A running private cluster.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    run_as: Option<(u32, u32)>,
    password: String,
}

impl PrivatePostgres {
    /// Initializes (first time) and starts the cluster under `data_dir`, and makes sure the
    /// `cella` database exists.
    pub async fn start(data_dir: &Path) -> Result<Self, PostgresError> {
        let bin = find_bin()?;
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        let dir = data_dir.join("postgres");
        let socket = dir.join(".s.PGSQL.5432");
        if socket.as_os_str().len() > 107 {
            return Err(PostgresError::SocketPathTooLong(socket));
        }
        let password_file = data_dir.join("postgres.password");
        if !dir.join("data").join("PG_VERSION").exists() {
            let password = ids::hex(&ids::random_bytes::<24>());
            files::write_private(&password_file, password.as_bytes())?;
            files::create_private_dir(&dir)?;
            if let Some((uid, gid)) = run_as {
                chown(&dir, uid, gid)?;
                check_reachable(&dir, uid)?;
            }
            // initdb reads the password from a file the postgres user can read, removed after.
            let pwfile = dir.join("initdb.pw");
            files::write_private(&pwfile, password.as_bytes())?;
            if let Some((uid, gid)) = run_as {
                chown(&pwfile, uid, gid)?;
            }
            let result = run(
                Command::new(bin.join("initdb"))
                    .arg("-D")
                    .arg(dir.join("data"))
                    .args(["-U", ROLE, "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
                    .args(["-E", "UTF8", "--locale=C", "--no-instructions"])
                    .arg(format!("--pwfile={}", pwfile.display())),
                run_as,
                &dir,
            );
            let _ = std::fs::remove_file(&pwfile);
            result?;
        }
        let password = std::fs::read_to_string(&password_file)
            .map_err(|e| PostgresError::Password(password_file.clone(), e))?
            .trim()
            .to_owned();
        let pg = Self { bin, dir, run_as, password };
        pg.pg_ctl_start()?;
        pg.create_database().await?;
        Ok(pg)
    }

    /// Connection options for the private cluster a `cella serve` with `data_dir` runs (for a
    /// `cella worker` on the same host); `None` if there is none.
    pub fn attach(data_dir: &Path) -> Option<PgConnectOptions> {
        let password = std::fs::read_to_string(data_dir.join("postgres.password")).ok()?;
        let dir = data_dir.join("postgres");
        dir.join(".s.PGSQL.5432").exists().then(|| {
            PgConnectOptions::new()
                .socket(&dir)
                .username(ROLE)
                .password(password.trim())
                .database(DATABASE)
                .disable_statement_logging()
        })
    }

    fn pg_ctl_start(&self) -> Result<(), PostgresError> {
        let status = Command::new(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("status")
            .current_dir(&self.dir)
            .with_user(self.run_as)
            .output()
            .map_err(|e| PostgresError::Spawn("pg_ctl status".into(), e))?;
        if status.status.success() {
            return Ok(()); // left running by a `serve` that was killed: reuse it
        }
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c unix_socket_permissions=0700 -c max_connections=200",
            self.dir.display()
        );
        run(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.log())
                .args(["-w", "-t", "60", "-o", &options, "start"]),
            self.run_as,
            &self.dir,
        )
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Connection options for `database`.
    fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.dir)
            .username(ROLE)
            .password(&self.password)
            .database(database)
            .disable_statement_logging()
    }

    /// Connection options for Cella's database.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options(DATABASE)
    }

    async fn create_database(&self) -> Result<(), PostgresError> {
        let mut conn = sqlx::PgConnection::connect_with(&self.options("postgres"))
            .await
            .map_err(PostgresError::CreateDatabase)?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut conn)
            .await
            .map_err(PostgresError::CreateDatabase)?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await
                .map_err(PostgresError::CreateDatabase)?;
        }
        Ok(())
    }

    /// Stops the cluster (fast shutdown: open transactions roll back).
    pub fn stop(&self) -> Result<(), PostgresError> {
        run(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "fast", "-w", "stop"]),
            self.run_as,
            &self.dir,
        )
    }
}

trait WithUser {
    fn with_user(&mut self, run_as: Option<(u32, u32)>) -> &mut Self;
}

impl WithUser for Command {
    fn with_user(&mut self, run_as: Option<(u32, u32)>) -> &mut Self {
        self.env_clear().env("LC_ALL", "C").env("PATH", "/usr/bin:/bin");
        if let Some((uid, gid)) = run_as {
            // std drops supplementary groups when a root parent sets a uid.
            self.uid(uid).gid(gid);
        }
        self
    }
}

fn run(cmd: &mut Command, run_as: Option<(u32, u32)>, dir: &Path) -> Result<(), PostgresError> {
    cmd.current_dir(dir).with_user(run_as);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| PostgresError::Spawn(program.clone(), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(PostgresError::Failed {
        program,
        status: out.status,
        log: dir.join("postgres.log").display().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// The newest installed server's `bin` folder.
fn find_bin() -> Result<PathBuf, PostgresError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PostgresError::NotInstalled)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or(PostgresError::NotInstalled)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), PostgresError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|_| PostgresError::NoPostgresUser)?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == "postgres").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .ok_or(PostgresError::NoPostgresUser)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), PostgresError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|source| files::FileError { action: "cannot chown", path: path.to_owned(), source }.into())
}

/// Every ancestor of `dir` must let `uid` through (execute for others, or owned by it).
fn check_reachable(dir: &Path, uid: u32) -> Result<(), PostgresError> {
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else { continue };
        let mode = meta.permissions().mode();
        if meta.uid() != uid && mode & 0o001 == 0 {
            return Err(PostgresError::Unreachable(ancestor.to_owned()));
        }
    }
    Ok(())
}
