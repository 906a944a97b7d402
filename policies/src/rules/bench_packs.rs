//! What tenant rule packs cost a scan: the engine's throughput with the built-in packs alone and
//! with 1 and 10 tenant packs of 50 rules each added, on the same corpus, in the same run
//! (interleaved, medians), side by side; plus what a pack costs to validate at upload and what
//! the policy costs to load. It prints figures; it asserts nothing. Run it with
//! `cargo run --release -p cella-policies --example bench_packs -- [MiB] [runs]`.
//!
//! The tenant packs are written here: 50 token formats of the kinds vendors issue (prefixed API
//! keys, personal access tokens, webhook secrets, connection strings, assignments to a
//! vendor-named variable, …), each with its keywords, instantiated for ten made-up
//! organisations (`acme`, `borealis`, …) so no two packs share a rule id or a keyword. The
//! corpus is the scan benchmark's ([`super::bench::generate_corpus`]) with a line holding one of
//! those tokens planted every 64 KiB, between the built-in findings: every configuration scans
//! the same bytes.

use std::fmt;
use std::time::{Duration, Instant};

use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};

use super::bench::{cpu_times, generate_corpus};
use super::tenant::{self, PackFormat, PackLimits};
use super::{PolicyError, DEFAULT_PACKS};

/// The made-up organisations the ten packs are written for.
pub const ORGS: [&str; 10] =
    ["acme", "borealis", "cinder", "dovetail", "ember", "fjord", "gantry", "halyard", "isobar", "juniper"];

/// One token format: a kind (the rule id's suffix), a description, the regex, the keywords and
/// the secret group, with `{o}` for the organisation (lowercase) and `{O}` (uppercase).
struct Shape {
    kind: &'static str,
    what: &'static str,
    regex: &'static str,
    keywords: &'static [&'static str],
    group: u32,
}

const fn shape(
    kind: &'static str,
    what: &'static str,
    regex: &'static str,
    keywords: &'static [&'static str],
    group: u32,
) -> Shape {
    Shape { kind, what, regex, keywords, group }
}

const SHAPES: [Shape; 50] = [
    shape("live-key", "live API key", r"\b({o}_live_[A-Za-z0-9]{32})\b", &["{o}_live_"], 1),
    shape("test-key", "test API key", r"\b({o}_test_[A-Za-z0-9]{32})\b", &["{o}_test_"], 1),
    shape("pat", "personal access token", r"\b({o}pat_[A-Za-z0-9]{40})\b", &["{o}pat_"], 1),
    shape("client-secret", "OAuth client secret", r"\b({o}cs_[A-Za-z0-9_-]{43})", &["{o}cs_"], 1),
    shape("refresh-token", "OAuth refresh token", r"\b({o}rt_[A-Za-z0-9]{48})\b", &["{o}rt_"], 1),
    shape("webhook-secret", "webhook signing secret", r"\b(whsec_{o}_[A-Za-z0-9+/]{32})", &["whsec_{o}_"], 1),
    shape("service-account", "service account key id", r"\b({O}SA[A-Z0-9]{17})\b", &["{o}sa"], 1),
    shape("deploy-key", "deploy key", r"\b({o}_dk_[0-9a-f]{40})\b", &["{o}_dk_"], 1),
    shape(
        "db-url",
        "database URL with a password",
        r#"\b{o}db://[A-Za-z0-9_.-]{1,32}:([^@\s"']{8,64})@[A-Za-z0-9.-]+"#,
        &["{o}db://"],
        1,
    ),
    shape(
        "session-cookie",
        "session cookie",
        r"\b{o}_session=([A-Za-z0-9%._-]{32,128})",
        &["{o}_session="],
        1,
    ),
    shape(
        "jwt",
        "signed token",
        r"\b({o}_jwt_[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,})",
        &["{o}_jwt_"],
        1,
    ),
    shape("private-key", "private key block", r"-----BEGIN {O} PRIVATE KEY-----", &["begin {o} private"], 0),
    shape("license-key", "license key", r"\b({O}LK-[A-Z0-9]{5}(?:-[A-Z0-9]{5}){3})\b", &["{o}lk-"], 1),
    shape(
        "signing-secret",
        "signing secret in an assignment",
        r#"(?i){o}[\w.-]{0,20}signing[\w.-]{0,10}\s*[:=]\s*["']?([A-Za-z0-9+/]{32,64})"#,
        &["{o}"],
        1,
    ),
    shape(
        "api-secret",
        "API secret in an assignment",
        r#"(?i){o}[\w.-]{0,20}(?:api[_-]?secret|secret[_-]?key)\s*[:=]\s*["']?([A-Za-z0-9]{40})"#,
        &["{o}"],
        1,
    ),
    shape(
        "access-token",
        "access token in an assignment",
        r#"(?i){o}[\w.-]{0,20}access[_-]?token\s*[:=]\s*["']?([A-Za-z0-9._-]{32,80})"#,
        &["{o}"],
        1,
    ),
    shape(
        "encryption-key",
        "encryption key in an assignment",
        r#"(?i){o}[\w.-]{0,20}(?:enc|encryption)[_-]?key\s*[:=]\s*["']?([0-9a-f]{64})"#,
        &["{o}"],
        1,
    ),
    shape("access-key-id", "access key id", r"\b({O}AK[A-Z2-7]{18})\b", &["{o}ak"], 1),
    shape(
        "secret-access-key",
        "secret access key in an assignment",
        r#"(?i){o}[\w.-]{0,20}secret[_-]?access[_-]?key\s*[:=]\s*["']?([A-Za-z0-9/+]{40})"#,
        &["{o}"],
        1,
    ),
    shape(
        "bot-token",
        "chat bot token",
        r"\b({o}b-[0-9]{10,13}-[0-9]{10,13}-[A-Za-z0-9]{24})\b",
        &["{o}b-"],
        1,
    ),
    shape(
        "app-token",
        "chat app token",
        r"\b({o}a-[0-9]-[A-Z0-9]{11}-[0-9]{13}-[a-f0-9]{64})\b",
        &["{o}a-"],
        1,
    ),
    shape(
        "webhook-url",
        "incoming webhook URL",
        r"https://hooks\.{o}\.io/services/[A-Z0-9]{9}/[A-Z0-9]{11}/([A-Za-z0-9]{24})",
        &["hooks.{o}.io"],
        1,
    ),
    shape("npm-token", "package registry token", r"\b({o}_npm_[A-Za-z0-9]{36})\b", &["{o}_npm_"], 1),
    shape("upload-token", "package upload token", r"\b({o}-upload-[A-Za-z0-9_-]{50,})", &["{o}-upload-"], 1),
    shape(
        "registry-auth",
        "container registry auth",
        r#""auth"\s*:\s*"({o}[A-Za-z0-9+/]{30,}={0,2})""#,
        &["\"auth\""],
        1,
    ),
    shape("installation-token", "installation token", r"\b({o}ghs_[A-Za-z0-9]{36})\b", &["{o}ghs_"], 1),
    shape("ci-token", "CI token", r"\b({o}ci_[A-Za-z0-9]{20,40})\b", &["{o}ci_"], 1),
    shape(
        "iac-token",
        "infrastructure API token",
        r"\b([A-Za-z0-9]{14}\.{o}tf\.[A-Za-z0-9_-]{60,70})",
        &[".{o}tf."],
        1,
    ),
    shape("vault-token", "secrets vault token", r"\b({o}vs\.[A-Za-z0-9_-]{24,100})", &["{o}vs."], 1),
    shape(
        "cluster-token",
        "cluster token in an assignment",
        r#"(?i){o}[\w.-]{0,20}kube[\w.-]{0,10}token\s*[:=]\s*["']?([A-Za-z0-9._-]{40,})"#,
        &["{o}"],
        1,
    ),
    shape(
        "smtp-password",
        "SMTP password in an assignment",
        r#"(?i){o}[\w.-]{0,10}smtp[\w.-]{0,10}pass(?:word)?\s*[:=]\s*["']?([^\s"']{8,64})"#,
        &["smtp"],
        1,
    ),
    shape(
        "ldap-password",
        "directory bind password in an assignment",
        r#"(?i){o}[\w.-]{0,10}ldap[\w.-]{0,10}(?:bind[_-]?)?pass(?:word)?\s*[:=]\s*["']?([^\s"']{8,64})"#,
        &["ldap"],
        1,
    ),
    shape(
        "hmac-key",
        "HMAC key in an assignment",
        r#"(?i){o}[\w.-]{0,20}hmac[\w.-]{0,10}\s*[:=]\s*["']?([A-Za-z0-9+/]{43}=)"#,
        &["hmac"],
        1,
    ),
    shape("key-id", "signing key id", r"\b({o}kid_[0-9a-f]{32})\b", &["{o}kid_"], 1),
    shape(
        "publishable-key",
        "payment publishable key",
        r"\b({o}_pk_live_[A-Za-z0-9]{24,99})",
        &["{o}_pk_live_"],
        1,
    ),
    shape(
        "restricted-key",
        "payment restricted key",
        r"\b({o}_rk_live_[A-Za-z0-9]{24,99})",
        &["{o}_rk_live_"],
        1,
    ),
    shape("push-key", "mobile push server key", r"\b({o}push_[A-Za-z0-9_-]{140,160})", &["{o}push_"], 1),
    shape(
        "write-key",
        "analytics write key in an assignment",
        r#"(?i){o}[\w.-]{0,20}write[_-]?key\s*[:=]\s*["']?([A-Za-z0-9]{32})"#,
        &["write_key", "writekey", "write-key"],
        1,
    ),
    shape("maps-key", "maps API key", r"\b({O}Iza[0-9A-Za-z_-]{35})\b", &["{o}iza"], 1),
    shape(
        "sas-token",
        "storage access signature",
        r#"\b{o}sas_sv=[0-9-]{10}&[^\s"']{0,200}sig=([A-Za-z0-9%+/=]{40,})"#,
        &["{o}sas_"],
        1,
    ),
    shape(
        "bus-connection",
        "message bus connection string",
        r"Endpoint=sb://[a-z0-9-]+\.{o}bus\.net/;SharedAccessKeyName=[^;]+;SharedAccessKey=([A-Za-z0-9+/=]{44})",
        &["{o}bus.net"],
        1,
    ),
    shape(
        "cache-url",
        "cache URL with a password",
        r#"\brediss?://:([^@\s"']{16,64})@[a-z0-9.-]*{o}"#,
        &["redis"],
        1,
    ),
    shape("mail-key", "mail API key", r"\b(key-{o}[0-9a-f]{32})\b", &["key-{o}"], 1),
    shape(
        "mail-token",
        "mail delivery token",
        r"\b(SG{o}\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})",
        &["sg{o}."],
        1,
    ),
    shape("account-sid", "telephony account SID", r"\b({O}AC[0-9a-f]{32})\b", &["{o}ac"], 1),
    shape(
        "sdk-key",
        "feature flag SDK key",
        r"\b({o}-sdk-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b",
        &["{o}-sdk-"],
        1,
    ),
    shape("ingest-key", "telemetry ingest key", r"\b({o}_ingest_[A-Za-z0-9]{40})\b", &["{o}_ingest_"], 1),
    shape(
        "datasource-password",
        "data source password in a properties file",
        r"(?i)^\s*{o}\.(?:datasource|db)\.password\s*[=:]\s*([^\s$]{8,64})$",
        &["{o}.datasource", "{o}.db"],
        1,
    ),
    shape(
        "basic-auth",
        "basic authorization header",
        r"(?i)authorization:\s*basic\s+({o}[A-Za-z0-9+/]{20,}={0,2})",
        &["authorization"],
        1,
    ),
    shape(
        "registry-npmrc",
        "registry token in an .npmrc",
        r"//registry\.{o}\.dev/:_authToken=([A-Za-z0-9_-]{36,})",
        &["registry.{o}.dev"],
        1,
    ),
];

fn fill(template: &str, org: &str) -> String {
    template.replace("{o}", org).replace("{O}", &org.to_ascii_uppercase())
}

fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string()
}

/// The 50-rule pack of organisation `org`, in Cella's pack format.
pub fn tenant_pack(org: &str) -> String {
    let mut out = format!("[pack]\nname = \"{org}\"\ncategory = \"secret\"\nseverity = \"error\"\n");
    for s in &SHAPES {
        let keywords: Vec<String> = s.keywords.iter().map(|k| quote(&fill(k, org))).collect();
        out.push_str(&format!(
            "\n[[rules]]\nid = \"{org}-{}\"\ndescription = {}\nregex = {}\n",
            s.kind,
            quote(&format!("{} {}", capitalized(org), s.what)),
            quote(&fill(s.regex, org)),
        ));
        if s.group != 0 {
            out.push_str(&format!("secret_group = {}\n", s.group));
        }
        out.push_str(&format!(
            "keywords = [{}]\nhelp = {}\n",
            keywords.join(", "),
            quote(&format!(
                "Revoke it in the {} console and load it from the secret store.",
                capitalized(org)
            ))
        ));
    }
    out
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

/// Lines holding tokens of the tenant packs' formats (the first shapes; `{o}` filled in).
const TOKENS: &[&str] = &[
    "API_KEY={o}_live_Q7dX2mP9vL4kR8sT1wY6zB3nC5hJ0aE2",
    "token: {o}pat_9fK2mQ7xL4vB8nR1tY6wZ3cH5jD0aE2gS4uI7oPq",
    "DEPLOY_KEY={o}_dk_4c1d9e07b2a85f36e0d14c9b7a2f58e3d6c0b914",
    "{o}.signing_secret = \"Zq3Lm9Xv2Rt7Kp4Wn8Bc5Hy1Jd6Fg0Ts\"",
    "url = \"{o}db://app_user:Tr0ub4dor-and-3@db.internal\"",
    "    sdk: \"{o}-sdk-1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d\",",
];

/// The benchmark corpus of `bytes` with a tenant token line planted every 64 KiB (between the
/// built-in findings); returns it and the number of tenant tokens planted.
pub fn corpus(bytes: usize) -> (Vec<u8>, u64) {
    let (base, _) = generate_corpus(bytes);
    let mut out = Vec::with_capacity(base.len() + base.len() / 1024);
    let mut planted = 0u64;
    let mut next = 32 * 1024;
    for line in base.split_inclusive(|b| *b == b'\n') {
        if out.len() >= next {
            let org = ORGS[planted as usize % ORGS.len()];
            let token = TOKENS[(planted as usize / ORGS.len()) % TOKENS.len()];
            out.extend_from_slice(fill(token, org).as_bytes());
            out.push(b'\n');
            planted += 1;
            next += 64 * 1024;
        }
        out.extend_from_slice(line);
    }
    (out, planted)
}

/// One configuration's figures.
#[derive(Debug, Clone)]
pub struct Row {
    /// Tenant packs added to the built-in ones.
    pub packs: usize,
    pub rules: usize,
    pub policy_bytes: usize,
    /// Median time to build the lazy engine from the serialized policy (a VM's start).
    pub load: Duration,
    /// Median time to build the engine and scan a 1 KiB file with no findings.
    pub first_file: Duration,
    /// Median wall and CPU time of the whole corpus.
    pub wall: Duration,
    pub cpu: Duration,
    pub findings: u64,
}

/// The figures of every configuration, and what a pack costs at upload.
#[derive(Debug, Clone)]
pub struct PacksReport {
    pub corpus_bytes: u64,
    pub planted_tenant: u64,
    pub runs: usize,
    /// Validating one 50-rule pack in full (what `POST /v1/packs` does), median.
    pub validate: Duration,
    /// What one 50-rule pack's regexes take compiled.
    pub pack_compiled_bytes: u64,
    pub rows: Vec<Row>,
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

impl fmt::Display for PacksReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "corpus: {:.1} MB (the scan benchmark's, plus {} tenant tokens); medians of {} interleaved runs",
            self.corpus_bytes as f64 / 1e6,
            self.planted_tenant,
            self.runs
        )?;
        writeln!(
            f,
            "one 50-rule pack: validated in full (upload) in {:.1} ms; its regexes take {} KiB compiled",
            self.validate.as_secs_f64() * 1e3,
            self.pack_compiled_bytes >> 10
        )?;
        writeln!(
            f,
            "{:<28} {:>6} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9}",
            "policy",
            "rules",
            "JSON KiB",
            "load ms",
            "1st ms",
            "wall s",
            "wall MB/s",
            "cpu MB/s",
            "cost",
            "findings"
        )?;
        let base = self.rows.first().map(|r| r.cpu).unwrap_or_default();
        for r in &self.rows {
            let name = match r.packs {
                0 => "built-in packs, no tenant's".to_owned(),
                n => format!("built-in + {n} tenant pack(s)"),
            };
            let cost = (r.cpu.as_secs_f64() / base.as_secs_f64().max(1e-9) - 1.0) * 100.0;
            writeln!(
                f,
                "{name:<28} {:>6} {:>9} {:>8.2} {:>9.2} {:>8.3} {:>9.1} {:>9.1} {:>7.1}% {:>9}",
                r.rules,
                r.policy_bytes >> 10,
                r.load.as_secs_f64() * 1e3,
                r.first_file.as_secs_f64() * 1e3,
                r.wall.as_secs_f64(),
                mbps(self.corpus_bytes, r.wall),
                mbps(self.corpus_bytes, r.cpu),
                cost,
                r.findings
            )?;
        }
        writeln!(
            f,
            "cost: CPU time of the scan against the built-in packs alone (goal: at most 10% for 10 packs)"
        )
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs the benchmark on a corpus of `corpus_mib` MiB, `runs` times per configuration.
pub fn run(corpus_mib: usize, runs: usize) -> Result<PacksReport, PolicyError> {
    let runs = runs.max(1);
    let limits = PackLimits::default();
    let texts: Vec<String> = ORGS.iter().map(|o| tenant_pack(o)).collect();
    let invalid =
        |e: tenant::PackError| PolicyError::Malformed { pack: "bench".into(), message: e.to_string() };
    let validate = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = tenant::validate(&texts[0], PackFormat::Cella, None, &limits);
                t.elapsed()
            })
            .collect(),
    );
    let first = tenant::validate(&texts[0], PackFormat::Cella, None, &limits).map_err(invalid)?;
    let mut packs = Vec::new();
    for text in &texts {
        packs.push(tenant::validate(text, PackFormat::Cella, None, &limits).map_err(invalid)?.pack);
    }
    let builtin: Vec<&str> = DEFAULT_PACKS.to_vec();
    let policies = [0usize, 1, 10]
        .iter()
        .map(|&n| Ok((n, tenant::tenant_policy(&builtin, packs[..n].to_vec())?)))
        .collect::<Result<Vec<_>, PolicyError>>()?;

    let (corpus, planted_tenant) = corpus(corpus_mib << 20);
    let quiet = generate_corpus(1024).0;
    let scan_limits = Limits { max_findings: usize::MAX, ..Limits::default() };
    let mut rows: Vec<Row> = policies
        .iter()
        .map(|(n, p)| Row {
            packs: *n,
            rules: p.policy().rules.len(),
            policy_bytes: p.as_bytes().len(),
            load: Duration::ZERO,
            first_file: Duration::ZERO,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
            findings: 0,
        })
        .collect();
    let mut walls = vec![Vec::new(); policies.len()];
    let mut cpus = vec![Vec::new(); policies.len()];
    for _ in 0..runs {
        for (i, (_, policy)) in policies.iter().enumerate() {
            let mut engine = Engine::from_policy_json(policy.as_bytes())
                .map_err(|e| PolicyError::Malformed { pack: "bench".into(), message: e.to_string() })?;
            let mut report = Report::default();
            let c0 = cpu_times().0;
            let t = Instant::now();
            scan_artifact(&mut SliceSource(&corpus), "corpus.txt", &mut engine, &scan_limits, &mut report)
                .map_err(|e| PolicyError::Malformed { pack: "bench".into(), message: e.to_string() })?;
            walls[i].push(t.elapsed());
            cpus[i].push(cpu_times().0.saturating_sub(c0));
            rows[i].findings = report.findings.len() as u64 + report.findings_dropped;
        }
    }
    for (i, (_, policy)) in policies.iter().enumerate() {
        rows[i].wall = median(std::mem::take(&mut walls[i]));
        rows[i].cpu = median(std::mem::take(&mut cpus[i]));
        rows[i].load = median(
            (0..11)
                .map(|_| {
                    let t = Instant::now();
                    let e = Engine::from_policy_json(policy.as_bytes());
                    let d = t.elapsed();
                    drop(e);
                    d
                })
                .collect(),
        );
        rows[i].first_file = median(
            (0..11)
                .map(|_| {
                    let t = Instant::now();
                    if let Ok(mut e) = Engine::from_policy_json(policy.as_bytes()) {
                        let mut r = Report::default();
                        let _ = scan_artifact(
                            &mut SliceSource(&quiet),
                            "f.txt",
                            &mut e,
                            &Limits::default(),
                            &mut r,
                        );
                    }
                    t.elapsed()
                })
                .collect(),
        );
    }
    Ok(PacksReport {
        corpus_bytes: corpus.len() as u64,
        planted_tenant,
        runs,
        validate,
        pack_compiled_bytes: first.compiled_bytes,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_packs_pass_validation_together_and_find_their_tokens() {
        let packs: Vec<_> = ORGS
            .iter()
            .map(|o| {
                tenant::validate(&tenant_pack(o), PackFormat::Cella, None, &PackLimits::default())
                    .unwrap()
                    .pack
            })
            .collect();
        assert!(packs.iter().all(|p| p.rules.len() == 50));
        let policy = tenant::tenant_policy(&[], packs).unwrap();
        let mut engine = Engine::new(policy.policy().clone()).unwrap();
        let mut text = String::new();
        for token in TOKENS {
            text.push_str(&fill(token, "gantry"));
            text.push('\n');
        }
        let mut report = Report::default();
        scan_artifact(
            &mut SliceSource(text.as_bytes()),
            "t.env",
            &mut engine,
            &Limits::default(),
            &mut report,
        )
        .unwrap();
        let found: Vec<&str> = report.findings.iter().map(|f| f.rule_id.as_str()).collect();
        assert_eq!(
            found,
            [
                "gantry-live-key",
                "gantry-pat",
                "gantry-deploy-key",
                "gantry-signing-secret",
                "gantry-db-url",
                "gantry-sdk-key"
            ]
        );
    }
}
