//! Tenant rule packs (issue 15): a tenant uploads its own rules (Cella's pack TOML, or a
//! gitleaks configuration converted on upload), validated by `cella-policies` with every problem
//! located by line, stored in `tenant_packs` (migration 0006) with a version per name that only
//! goes up and the SHA-256 of the text; lists, reads and deletes them (a deleted version keeps
//! its row for the record and can no longer be selected); keeps the tenant's default policy; and
//! resolves what a job or a session scan names (`secrets,mypack,other@3`) into built-in packs and
//! exact versions, which the job records so that a retry runs the same rules. Each change is
//! audited on the tenant's chain (`pack.created`, `pack.deleted`,
//! `tenant.default_policy_changed`).

use std::sync::Arc;

use cella_audit::Actor;
use cella_host::job::SerializedPolicy;
use cella_policies::rules::tenant::{self, PackFormat, PackLimits};
use cella_policies::rules::BUILTIN_PACKS;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;

use crate::audit_log::tenant_event;
use crate::error::ServiceError;
use crate::ids;
use crate::jobs::{actor_id, rfc3339};
use crate::quotas::{self, Quotas};

/// How big one pack may be (bytes, rules, one regex compiled).
pub fn limits() -> PackLimits {
    PackLimits::default()
}

/// A pack name: 1-64 of lowercase letters, digits, `-` and `_`, starting with a letter or digit,
/// and not a built-in pack's.
pub fn check_name(name: &str) -> Result<(), ServiceError> {
    let valid = (1..=64).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
    if !valid {
        return Err(ServiceError::Unprocessable(format!(
            "pack name {name:?} is not valid: use 1-64 lowercase letters, digits, '-' or '_', starting with a letter \
             or digit"
        )));
    }
    if is_builtin(name) {
        return Err(ServiceError::Unprocessable(format!(
            "pack name {name:?} is a built-in pack's ({}): choose another",
            builtin_names().join(", ")
        )));
    }
    Ok(())
}

fn is_builtin(name: &str) -> bool {
    BUILTIN_PACKS.iter().any(|(n, _)| *n == name)
}

fn builtin_names() -> Vec<&'static str> {
    BUILTIN_PACKS.iter().map(|(n, _)| *n).collect()
}

/// One version of a pack, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PackVersion {
    pub name: String,
    pub version: i32,
    /// `cella` or `gitleaks` (as uploaded; a gitleaks configuration was converted).
    pub format: String,
    /// SHA-256 of the text as uploaded, hex.
    pub sha256: String,
    pub rules: i32,
    pub rule_ids: Vec<String>,
    /// What its regexes take compiled, in bytes (counts against the `pack_compiled_bytes` quota
    /// while the version is live).
    pub compiled_bytes: i64,
    /// The API key that uploaded it.
    pub created_by: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    /// When it was deleted (it can no longer be selected).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deleted_at: Option<String>,
}

/// A version with its texts.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PackVersionDetail {
    #[serde(flatten)]
    pub version: PackVersion,
    /// The text as uploaded.
    pub source: String,
    /// The pack as Cella's TOML: the source itself, or what the gitleaks configuration became.
    pub cella_toml: String,
}

/// A pack: its live versions in a listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PackSummary {
    pub name: String,
    /// What `name` alone selects.
    pub latest_version: i32,
    /// Its live versions, oldest first.
    pub versions: Vec<i32>,
    /// Rules of the latest version.
    pub rules: i32,
    /// SHA-256 of the latest version's text.
    pub sha256: String,
}

/// The tenant's packs.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PackList {
    pub packs: Vec<PackSummary>,
}

/// A pack with every version it had (deleted ones too).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PackHistory {
    pub name: String,
    /// What `name` alone selects (none when every version was deleted).
    pub latest_version: Option<i32>,
    pub versions: Vec<PackVersion>,
}

/// What a `DELETE` removed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    pub name: String,
    pub versions: Vec<i32>,
}

const VERSION_COLUMNS: &str =
    "name, version, format, source_sha256, rules, rule_ids, compiled_bytes, created_by, created_at, deleted_at";

fn version_from_row(row: &PgRow) -> Result<PackVersion, sqlx::Error> {
    Ok(PackVersion {
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        format: row.try_get("format")?,
        sha256: ids::hex(row.try_get::<&[u8], _>("source_sha256")?),
        rules: row.try_get("rules")?,
        rule_ids: row.try_get("rule_ids")?,
        compiled_bytes: row.try_get("compiled_bytes")?,
        created_by: row.try_get("created_by")?,
        created_at: rfc3339(row.try_get("created_at")?),
        deleted_at: row.try_get::<Option<OffsetDateTime>, _>("deleted_at")?.map(rfc3339),
    })
}

/// An upload: the body and what the query said.
#[derive(Debug)]
pub struct Upload<'a> {
    pub name: Option<&'a str>,
    pub format: Option<&'a str>,
    pub body: &'a [u8],
}

/// Validates and stores a new version of a pack, audited (`pack.created`). 422 for a pack that
/// does not pass (the detail says where), 409 past the tenant's pack quotas.
pub async fn create(
    pool: &PgPool,
    tenant: &str,
    key_id: &str,
    actor: &Actor,
    quotas: &Quotas,
    upload: Upload<'_>,
) -> Result<PackVersion, ServiceError> {
    let format = match upload.format {
        Some(f) => PackFormat::parse(f).ok_or_else(|| {
            ServiceError::Unprocessable(format!("format {f:?} is unknown: use cella or gitleaks"))
        })?,
        None => PackFormat::guess(std::str::from_utf8(upload.body).unwrap_or("")),
    };
    let text = std::str::from_utf8(upload.body)
        .map_err(|e| {
            ServiceError::Unprocessable(format!("the pack is not UTF-8 text (byte {})", e.valid_up_to()))
        })?
        .to_owned();
    if let Some(name) = upload.name {
        check_name(name)?;
    } else if format == PackFormat::Gitleaks {
        return Err(ServiceError::Unprocessable(
            "name the pack: a gitleaks configuration has no pack name (?name=NAME)".into(),
        ));
    }
    let name = upload.name.map(str::to_owned);
    // Compiling every regex takes a while for a big pack: off the async threads.
    let validated = tokio::task::spawn_blocking(move || {
        tenant::validate(&text, format, name.as_deref(), &limits()).map(|v| (v, text))
    })
    .await
    .map_err(|e| ServiceError::Internal(format!("validating a pack: {e}")))?
    .map_err(|e| ServiceError::Unprocessable(format!("the pack is refused: {e}")))?;
    let (validated, text) = validated;
    let name = validated.pack.name.clone();
    if upload.name.is_none() {
        check_name(&name)?;
    }
    let sha256 = ids::sha256(text.as_bytes());
    let compiled = i64::try_from(validated.compiled_bytes).unwrap_or(i64::MAX);

    let mut tx = pool.begin().await?;
    crate::tenants::recheck_key(&mut tx, key_id).await?;
    // One pack change of a tenant at a time: versions and quotas are counted under this lock.
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE").bind(tenant).execute(&mut *tx).await?;
    let usage = quotas::usage(&mut *tx, tenant).await?;
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tenant_packs WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL)",
    )
    .bind(tenant)
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
    if !live && usage.packs >= u64::from(quotas.packs) {
        return Err(ServiceError::Conflict(format!(
            "this would exceed your tenant's packs quota: you keep {} of {} packs; delete one (cella pack rm NAME) \
             or ask your operator to raise it",
            usage.packs, quotas.packs
        )));
    }
    if usage.pack_compiled_bytes + validated.compiled_bytes > quotas.pack_compiled_bytes {
        return Err(quotas::exceeded(
            "pack_compiled_bytes (delete old pack versions with `cella pack rm NAME@VERSION`)",
            validated.compiled_bytes,
            usage.pack_compiled_bytes,
            quotas.pack_compiled_bytes,
            "bytes",
        ));
    }
    let row = sqlx::query(&format!(
        "INSERT INTO tenant_packs (tenant_id, name, version, format, source, source_sha256, cella_toml, rules,
                                   rule_ids, compiled_bytes, created_by)
         SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4, $5, $6, $7, $8, $9, $10
         FROM tenant_packs WHERE tenant_id = $1 AND name = $2
         RETURNING {VERSION_COLUMNS}"
    ))
    .bind(tenant)
    .bind(&name)
    .bind(format.as_str())
    .bind(&text)
    .bind(&sha256[..])
    .bind(&validated.cella_toml)
    .bind(i32::try_from(validated.pack.rules.len()).unwrap_or(i32::MAX))
    .bind(validated.rule_ids())
    .bind(compiled)
    .bind(actor_id(actor))
    .fetch_one(&mut *tx)
    .await?;
    let version = version_from_row(&row)?;
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "pack.created",
        ("pack", &format!("{}@{}", version.name, version.version)),
        json!({
            "name": version.name,
            "version": version.version,
            "format": version.format,
            "sha256": version.sha256,
            "rules": version.rules,
            "compiled_bytes": version.compiled_bytes,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(version)
}

/// The tenant's packs with a live version, by name.
pub async fn list(pool: &PgPool, tenant: &str) -> Result<PackList, ServiceError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (name) name, version, rules, source_sha256,
                array_agg(version) OVER (PARTITION BY name ORDER BY version
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS versions
         FROM tenant_packs WHERE tenant_id = $1 AND deleted_at IS NULL
         ORDER BY name, version DESC",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    let packs = rows
        .iter()
        .map(|r| {
            Ok(PackSummary {
                name: r.try_get("name")?,
                latest_version: r.try_get("version")?,
                versions: r.try_get("versions")?,
                rules: r.try_get("rules")?,
                sha256: ids::hex(r.try_get::<&[u8], _>("source_sha256")?),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(PackList { packs })
}

fn no_pack(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("pack {name:?} (see your packs with `cella pack ls` or GET /v1/packs)"))
}

/// Every version pack `name` had (404: the tenant never had it).
pub async fn history(pool: &PgPool, tenant: &str, name: &str) -> Result<PackHistory, ServiceError> {
    let rows = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM tenant_packs WHERE tenant_id = $1 AND name = $2 ORDER BY version"
    ))
    .bind(tenant)
    .bind(name)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Err(no_pack(name));
    }
    let versions = rows.iter().map(version_from_row).collect::<Result<Vec<_>, _>>()?;
    let latest_version = versions.iter().rev().find(|v| v.deleted_at.is_none()).map(|v| v.version);
    Ok(PackHistory { name: name.to_owned(), latest_version, versions })
}

/// One version with its texts (a deleted one too: it says when it was deleted).
pub async fn version(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    version: i32,
) -> Result<PackVersionDetail, ServiceError> {
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS}, source, cella_toml FROM tenant_packs
         WHERE tenant_id = $1 AND name = $2 AND version = $3"
    ))
    .bind(tenant)
    .bind(name)
    .bind(version)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| no_pack(&format!("{name}@{version}")))?;
    Ok(PackVersionDetail {
        version: version_from_row(&row)?,
        source: row.try_get("source")?,
        cella_toml: row.try_get("cella_toml")?,
    })
}

/// Deletes version `version` of pack `name`, or all its live versions, audited (`pack.deleted`).
/// 404 for nothing live to delete; 409 when the tenant's default policy would no longer resolve.
pub async fn delete(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    version: Option<i32>,
    actor: &Actor,
) -> Result<Deleted, ServiceError> {
    let mut tx = pool.begin().await?;
    let default: Option<String> =
        sqlx::query_scalar("SELECT default_policy FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
    let versions: Vec<i32> = sqlx::query_scalar(
        "UPDATE tenant_packs SET deleted_at = now(), deleted_by = $4
         WHERE tenant_id = $1 AND name = $2 AND ($3::int4 IS NULL OR version = $3) AND deleted_at IS NULL
         RETURNING version",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .bind(actor_id(actor))
    .fetch_all(&mut *tx)
    .await?;
    if versions.is_empty() {
        let what = version.map_or_else(|| name.to_owned(), |v| format!("{name}@{v}"));
        return Err(ServiceError::NotFound(format!(
            "a live version of pack {what:?} (see `cella pack show {name}`)"
        )));
    }
    if let Some(default) = default.filter(|d| mentions(d, name)) {
        if let Err(e) = resolve_text(&mut tx, tenant, &default).await {
            return Err(ServiceError::Conflict(format!(
                "your default policy {default:?} needs this pack ({e}): set another default first (`cella pack \
                 default set POLICY`, or PUT /v1/tenant/default-policy)"
            )));
        }
    }
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "pack.deleted",
        ("pack", name),
        json!({ "name": name, "versions": sorted }),
    )
    .await?;
    tx.commit().await?;
    Ok(Deleted { name: name.to_owned(), versions: sorted })
}

/// Whether policy text `policy` names pack `name` (pinned or not).
fn mentions(policy: &str, name: &str) -> bool {
    policy.split(',').map(str::trim).any(|e| e.split_once('@').map_or(e, |(n, _)| n) == name)
}

/// A tenant pack version a policy selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PackRef {
    pub name: String,
    pub version: i32,
    /// SHA-256 of its text as uploaded, hex.
    pub sha256: String,
}

/// Where a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// The request named it.
    Request,
    /// The tenant's default policy.
    TenantDefault,
    /// The server's `jobs.default_policy`.
    ServerDefault,
}

/// A policy resolved to built-in packs and exact versions of the tenant's packs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ResolvedPolicy {
    /// The packs in order: built-in names and `name@version` (what a job records).
    pub policy: Vec<String>,
    pub source: PolicySource,
    /// The tenant's packs among them.
    pub packs: Vec<PackRef>,
}

impl ResolvedPolicy {
    /// As the `jobs.policy` column keeps it.
    pub fn text(&self) -> String {
        self.policy.join(",")
    }
}

/// Resolves `requested` (none or empty: the tenant's default policy, else `server_default`).
/// Unknown names, deleted versions and two packs with one rule id answer 422, by name.
pub async fn resolve(
    pool: &PgPool,
    tenant: &str,
    requested: Option<&str>,
    server_default: &str,
) -> Result<ResolvedPolicy, ServiceError> {
    let requested = requested.map(str::trim).filter(|s| !s.is_empty());
    let (text, source) = match requested {
        Some(r) => (r.to_owned(), PolicySource::Request),
        None => {
            let own: Option<String> = sqlx::query_scalar("SELECT default_policy FROM tenants WHERE id = $1")
                .bind(tenant)
                .fetch_optional(pool)
                .await?
                .flatten();
            match own {
                Some(own) => (own, PolicySource::TenantDefault),
                None => (server_default.to_owned(), PolicySource::ServerDefault),
            }
        }
    };
    let mut conn = pool.acquire().await?;
    let (policy, packs) = resolve_text(&mut conn, tenant, &text).await.map_err(|e| match source {
        PolicySource::TenantDefault => ServiceError::Unprocessable(format!(
            "your default policy {text:?} does not resolve: {e}; set another (`cella pack default set POLICY`)"
        )),
        _ => ServiceError::Unprocessable(e),
    })?;
    Ok(ResolvedPolicy { policy, source, packs })
}

/// One entry of a policy: a built-in pack, or a tenant pack by name (latest) or `name@version`.
fn parse_entry(entry: &str) -> Result<(&str, Option<i32>), String> {
    match entry.split_once('@') {
        None => Ok((entry, None)),
        Some((name, v)) => match v.parse::<i32>() {
            Ok(v) if v >= 1 => Ok((name, Some(v))),
            _ => Err(format!("{entry:?}: a version is a number from 1 (`name@3`)")),
        },
    }
}

/// Resolves policy text; the error says which entry is wrong and what exists.
async fn resolve_text(
    db: &mut PgConnection,
    tenant: &str,
    text: &str,
) -> Result<(Vec<String>, Vec<PackRef>), String> {
    let mut policy: Vec<String> = Vec::new();
    let mut packs: Vec<(PackRef, Vec<String>)> = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(format!("policy {text:?} has an empty entry"));
        }
        let (name, version) = parse_entry(entry)?;
        if version.is_none() && is_builtin(name) {
            if !policy.iter().any(|p| p == name) {
                policy.push(name.to_owned());
            }
            continue;
        }
        let row = sqlx::query(
            "SELECT version, source_sha256, rule_ids, deleted_at FROM tenant_packs
             WHERE tenant_id = $1 AND name = $2 AND ($3::int4 IS NULL OR version = $3)
             ORDER BY (deleted_at IS NULL) DESC, version DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(name)
        .bind(version)
        .fetch_optional(&mut *db)
        .await
        .map_err(|e| format!("reading pack {name:?}: {e}"))?;
        let row = match row {
            Some(r) if r.try_get::<Option<OffsetDateTime>, _>("deleted_at").ok().flatten().is_none() => r,
            Some(r) => {
                let at = r.try_get::<Option<OffsetDateTime>, _>("deleted_at").ok().flatten().map(rfc3339);
                return Err(format!(
                    "pack {entry:?} was deleted{}: select a live version (`cella pack ls`)",
                    at.map(|a| format!(" at {a}")).unwrap_or_default()
                ));
            }
            None => {
                let mine = live_names(&mut *db, tenant).await.unwrap_or_default();
                return Err(format!(
                    "unknown policy {entry:?}: the built-in packs are {}; your packs are {} (`cella pack ls`)",
                    builtin_names().join(", "),
                    if mine.is_empty() { "none yet".to_owned() } else { mine.join(", ") }
                ));
            }
        };
        let found = PackRef {
            name: name.to_owned(),
            version: row.try_get("version").map_err(|e| e.to_string())?,
            sha256: ids::hex(row.try_get::<&[u8], _>("source_sha256").map_err(|e| e.to_string())?),
        };
        let rule_ids: Vec<String> = row.try_get("rule_ids").map_err(|e| e.to_string())?;
        if let Some((other, _)) = packs.iter().find(|(p, _)| p.name == found.name) {
            if other.version == found.version {
                continue;
            }
            return Err(format!(
                "pack {name:?} is selected twice ({name}@{} and {name}@{}): select one version",
                other.version, found.version
            ));
        }
        for (other, ids) in &packs {
            if let Some(rule) = rule_ids.iter().find(|r| ids.contains(r)) {
                return Err(format!(
                    "rule `{rule}` is in both {}@{} and {}@{}: select one of them, or rename the rule",
                    other.name, other.version, found.name, found.version
                ));
            }
        }
        policy.push(format!("{}@{}", found.name, found.version));
        packs.push((found, rule_ids));
    }
    Ok((policy, packs.into_iter().map(|(p, _)| p).collect()))
}

async fn live_names(db: &mut PgConnection, tenant: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT name FROM tenant_packs WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY name",
    )
    .bind(tenant)
    .fetch_all(db)
    .await
}

/// The tenant's default policy.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DefaultPolicy {
    /// The tenant's own (null: the server's applies).
    pub policy: Option<String>,
    /// The server's `jobs.default_policy`.
    pub server_default: String,
    /// What a job without `policy` runs now.
    pub resolved: ResolvedPolicy,
}

/// The tenant's default policy and what it resolves to now.
pub async fn default_policy(
    pool: &PgPool,
    tenant: &str,
    server_default: &str,
) -> Result<DefaultPolicy, ServiceError> {
    let own: Option<String> = sqlx::query_scalar("SELECT default_policy FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await?;
    Ok(DefaultPolicy {
        policy: own,
        server_default: server_default.to_owned(),
        resolved: resolve(pool, tenant, None, server_default).await?,
    })
}

/// Sets (or with `None` clears) the tenant's default policy, audited
/// (`tenant.default_policy_changed`). It must resolve now (422 otherwise); `name` entries keep
/// meaning the latest version at each submission.
pub async fn set_default_policy(
    pool: &PgPool,
    tenant: &str,
    actor: &Actor,
    policy: Option<&str>,
    server_default: &str,
) -> Result<DefaultPolicy, ServiceError> {
    let policy = policy.map(str::trim).filter(|p| !p.is_empty());
    let mut tx = pool.begin().await?;
    let before: Option<String> =
        sqlx::query_scalar("SELECT default_policy FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
    let canonical = match policy {
        Some(p) => {
            resolve_text(&mut tx, tenant, p).await.map_err(ServiceError::Unprocessable)?;
            Some(p.split(',').map(str::trim).collect::<Vec<_>>().join(","))
        }
        None => None,
    };
    sqlx::query("UPDATE tenants SET default_policy = $2 WHERE id = $1")
        .bind(tenant)
        .bind(&canonical)
        .execute(&mut *tx)
        .await?;
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "tenant.default_policy_changed",
        ("tenant", tenant),
        json!({ "before": before, "after": canonical }),
    )
    .await?;
    tx.commit().await?;
    default_policy(pool, tenant, server_default).await
}

/// Why a job's policy could not be built when the job was about to run.
#[derive(Debug, thiserror::Error)]
pub enum JobPolicyError {
    /// A version the job recorded was deleted after it was queued.
    #[error(
        "rule pack {0} was deleted after the job was queued; submit the job again with a live version \
         (`cella pack ls`)"
    )]
    Deleted(String),
    /// The job's policy text is not one this server wrote.
    #[error("the job's policy {0:?} is malformed")]
    Malformed(String),
    /// A stored pack no longer parses or combines (never expected: it passed at upload).
    #[error("the job's rule packs do not combine")]
    Invalid(#[from] cella_policies::rules::PolicyError),
    #[error("reading the job's rule packs")]
    Database(#[from] sqlx::Error),
}

impl JobPolicyError {
    /// Whether trying again later may help (the database was away).
    pub fn retryable(&self) -> bool {
        matches!(self, JobPolicyError::Database(_))
    }
}

/// The compiled policy of a recorded policy (`secrets,mypack@3`), or `None` when it names only
/// built-in packs (then `cella-vmm scan --policy` compiles it as it always has). A version
/// deleted since the job was queued fails the job. The packs are read every time (a deleted
/// version must fail the job); the same packs are combined once ([`CompiledPolicies`]).
pub async fn compiled_policy(
    pool: &PgPool,
    tenant: &str,
    policy: &str,
) -> Result<Option<Arc<SerializedPolicy>>, JobPolicyError> {
    if !policy.contains('@') {
        return Ok(None);
    }
    let mut builtin = Vec::new();
    let mut stored = Vec::new();
    for entry in policy.split(',') {
        let Some((name, version)) = entry.split_once('@') else {
            builtin.push(entry);
            continue;
        };
        let version: i32 = version.parse().map_err(|_| JobPolicyError::Malformed(policy.to_owned()))?;
        let row: Option<(String, Option<OffsetDateTime>)> = sqlx::query_as(
            "SELECT cella_toml, deleted_at FROM tenant_packs WHERE tenant_id = $1 AND name = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(name)
        .bind(version)
        .fetch_optional(pool)
        .await?;
        match row {
            Some((toml, None)) => stored.push((entry, toml)),
            _ => return Err(JobPolicyError::Deleted(entry.to_owned())),
        }
    }
    COMPILED.get_or_compile(&builtin, &stored).map(Some)
}

/// Combined policies by what they were combined from, the most recently used last: combining
/// the built-in packs with a tenant's takes ~12 ms of CPU, and a tenant runs the same packs
/// job after job. The bytes are a function of the packs' names and texts alone, which is the
/// key, so an entry serves only jobs whose packs are exactly those.
struct CompiledPolicies {
    entries: std::sync::Mutex<Vec<([u8; 32], Arc<SerializedPolicy>)>>,
}

/// How many combined policies are kept.
const COMPILED_KEPT: usize = 8;

static COMPILED: CompiledPolicies = CompiledPolicies { entries: std::sync::Mutex::new(Vec::new()) };

impl CompiledPolicies {
    fn get_or_compile(
        &self,
        builtin: &[&str],
        stored: &[(&str, String)],
    ) -> Result<Arc<SerializedPolicy>, JobPolicyError> {
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        for name in builtin {
            hasher.update(format!("builtin {}\n{name}", name.len()).as_bytes());
        }
        for (entry, toml) in stored {
            hasher.update(format!("stored {} {}\n{entry}", entry.len(), toml.len()).as_bytes());
            hasher.update(toml.as_bytes());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(hasher.finish().as_ref());
        let lock = || self.entries.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut entries = lock();
            if let Some(at) = entries.iter().position(|(k, _)| *k == key) {
                let entry = entries.remove(at);
                let policy = entry.1.clone();
                entries.push(entry);
                return Ok(policy);
            }
        }
        let packs = stored
            .iter()
            .map(|(entry, toml)| tenant::stored_pack(entry, toml))
            .collect::<Result<Vec<_>, _>>()?;
        let policy = Arc::new(SerializedPolicy::new(tenant::tenant_policy(builtin, packs)?.into_bytes()));
        let mut entries = lock();
        entries.push((key, policy.clone()));
        let over = entries.len().saturating_sub(COMPILED_KEPT);
        entries.drain(..over);
        Ok(policy)
    }
}

/// A session scan's policy: resolved as a job's is (`requested`, else the tenant's default, else
/// the server's), and compiled for the guest. Returns the resolved policy text and the bytes.
pub async fn session_policy(
    pool: &PgPool,
    tenant: &str,
    requested: Option<&str>,
    server_default: &str,
) -> Result<(String, Vec<u8>), ServiceError> {
    let text = resolve(pool, tenant, requested, server_default).await?.text();
    let compiled = match compiled_policy(pool, tenant, &text).await {
        Ok(Some(policy)) => policy.bytes().to_vec(),
        Ok(None) => {
            let names: Vec<&str> = text.split(',').collect();
            cella_policies::rules::load_packs(&names)
                .map_err(|e| {
                    ServiceError::Internal(format!(
                        "compiling policy {text}: {}",
                        crate::error::error_chain(&e)
                    ))
                })?
                .into_bytes()
        }
        Err(JobPolicyError::Database(e)) => return Err(e.into()),
        Err(e @ JobPolicyError::Deleted(_)) => return Err(ServiceError::Unprocessable(e.to_string())),
        Err(e) => {
            return Err(ServiceError::Internal(format!(
                "compiling policy {text}: {}",
                crate::error::error_chain(&e)
            )))
        }
    };
    Ok((text, compiled))
}

/// What a job's evidence says of each pack it ran: built-in packs' name, version (Cella's) and
/// SHA-256, tenant packs' name, version and the SHA-256 of the text as uploaded.
pub async fn evidence(db: &mut PgConnection, tenant: &str, policy: &str) -> Result<Vec<Value>, ServiceError> {
    let mut out = Vec::new();
    for entry in policy.split(',') {
        let identity = match entry.split_once('@') {
            None => match cella_policies::rules::builtin_pack_identity(entry) {
                Ok(identity) => json!(identity),
                Err(_) => json!({ "name": entry }),
            },
            Some((name, version)) => {
                let sha: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT source_sha256 FROM tenant_packs WHERE tenant_id = $1 AND name = $2 AND version = $3",
                )
                .bind(tenant)
                .bind(name)
                .bind(version.parse::<i32>().unwrap_or(0))
                .fetch_optional(&mut *db)
                .await?;
                json!({
                    "name": name,
                    "version": version,
                    "sha256": sha.map(|s| ids::hex(&s)),
                    "tenant_pack": true,
                })
            }
        };
        out.push(identity);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_names_are_checked() {
        assert!(check_name("acme-secrets_2").is_ok());
        for bad in ["", "-x", "Acme", "a@b", "a,b", "a b", &"x".repeat(65)] {
            assert!(matches!(check_name(bad), Err(ServiceError::Unprocessable(_))), "{bad:?}");
        }
        let e = check_name("secrets").unwrap_err().to_string();
        assert!(e.contains("built-in"), "{e}");
    }

    #[test]
    fn entries_parse_and_policies_name_their_packs() {
        assert_eq!(parse_entry("a@3"), Ok(("a", Some(3))));
        assert_eq!(parse_entry("a"), Ok(("a", None)));
        assert!(parse_entry("a@0").is_err() && parse_entry("a@x").is_err());
        assert!(mentions("secrets, acme@2", "acme") && mentions("acme", "acme"));
        assert!(!mentions("acme-two", "acme"));
    }
}
