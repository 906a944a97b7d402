//! The native scan benchmark: generates a corpus of source-like text with planted findings,
//! measures the engine's single-thread throughput and `ripgrep` (`rg -c -e … -e …` with the
//! same regex set, on the same bytes, in the same run), and how long building the engine takes
//! (every regex compiled eagerly, against the lazy engine the guest uses); then what
//! suppression costs: the same corpus as a tar of files scanned with no baseline or excludes,
//! with a 10,000-entry baseline, with many job excludes and with many pack excludes, side by
//! side. It prints figures; it asserts nothing. Run it with
//! `cargo run --release -p cella-policies --example bench_scan`.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cella_scan::{
    glob_to_regex, scan_artifact, Engine, FingerprintKey, FingerprintSet, Limits, Policy, Report, SliceSource,
};

use super::{load_packs, PolicyError, DEFAULT_PACKS};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Corpus size in MiB (the issue asks for at least 200).
    pub corpus_mib: usize,
    /// Where to write the corpus for ripgrep.
    pub corpus_path: PathBuf,
    /// Run ripgrep too.
    pub ripgrep: bool,
    /// Runs of each suppression variant (interleaved; medians reported); 0 skips them.
    pub suppression_runs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            corpus_mib: 200,
            corpus_path: std::env::temp_dir().join("cella-scan-bench-corpus.txt"),
            ripgrep: true,
            suppression_runs: 3,
        }
    }
}

/// One ripgrep run.
#[derive(Debug, Clone)]
pub struct RgRun {
    /// The flags used besides `-c` and the patterns.
    pub label: &'static str,
    /// Wall time.
    pub time: Duration,
    /// CPU time (user + system) of the rg process.
    pub cpu: Duration,
    /// Rules left out because ripgrep cannot compile their regex.
    pub left_out: usize,
    /// Matching lines reported by `rg -c`, or the error it printed.
    pub outcome: Result<u64, String>,
}

/// The figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Rules in the policy.
    pub rules: usize,
    /// Corpus size in bytes.
    pub corpus_bytes: u64,
    /// Findings planted in the corpus.
    pub planted: u64,
    /// Engine wall time for the whole corpus.
    pub engine_time: Duration,
    /// Engine CPU time for the whole corpus.
    pub engine_cpu: Duration,
    /// Findings the engine reported.
    pub engine_findings: u64,
    /// The same scan by a fresh engine reading the corpus file (in the page cache) as ripgrep
    /// and a VM do, rather than from memory: wall and CPU time, or why it could not run.
    pub engine_file: Result<(Duration, Duration), String>,
    /// Median time to build an engine compiling every regex up front.
    pub compile_eager: Duration,
    /// Median time to build the lazy engine from the serialized policy (what a VM pays at start).
    pub compile_lazy: Duration,
    /// Median time to build the lazy engine and scan a first 1 KiB file holding no findings
    /// (what a VM pays before its first result: this builds the line filter).
    pub first_scan: Duration,
    /// The same, with a file that triggers every rule once (every regex compiled on first use).
    pub first_scan_all_rules: Duration,
    /// Serialized policy size.
    pub policy_bytes: usize,
    /// ripgrep runs.
    pub ripgrep: Vec<RgRun>,
    /// What suppression costs (empty if not run).
    pub suppression: Vec<SuppressionRun>,
}

/// One way of scanning the corpus as files (see [`suppression_variants`]).
#[derive(Debug, Clone)]
pub struct SuppressionRun {
    pub label: String,
    /// Files in the tar, and the bytes of the tar.
    pub files: u64,
    pub tar_bytes: u64,
    /// Median wall and CPU time.
    pub time: Duration,
    pub cpu: Duration,
    /// Findings, and how many were suppressed or left out.
    pub findings: u64,
    pub suppressed: u64,
    pub files_excluded: u64,
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = self.corpus_bytes as f64 / 1e6;
        writeln!(f, "corpus: {mb:.1} MB of generated source-like text, {} planted findings", self.planted)?;
        writeln!(f, "policy: {} rules, {} bytes serialized", self.rules, self.policy_bytes)?;
        writeln!(
            f,
            "engine build: eager (all regexes compiled) {:.2} ms | lazy from serialized policy {:.3} ms",
            self.compile_eager.as_secs_f64() * 1e3,
            self.compile_lazy.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "first file (lazy build + scan 1 KiB): no findings {:.2} ms | triggering every rule {:.2} ms",
            self.first_scan.as_secs_f64() * 1e3,
            self.first_scan_all_rules.as_secs_f64() * 1e3
        )?;
        let eng = mbps(self.corpus_bytes, self.engine_time);
        let eng_cpu = mbps(self.corpus_bytes, self.engine_cpu);
        writeln!(
            f,
            "{:<30} {:>8} {:>9} {:>8} {:>9} {:>8}",
            "scanner", "wall s", "wall MB/s", "cpu s", "cpu MB/s", "count"
        )?;
        writeln!(
            f,
            "{:<30} {:>8.3} {:>9.1} {:>8.2} {:>9.1} {:>8}  findings",
            "cella-scan engine (1 thread)",
            self.engine_time.as_secs_f64(),
            eng,
            self.engine_cpu.as_secs_f64(),
            eng_cpu,
            self.engine_findings
        )?;
        match &self.engine_file {
            Ok((time, cpu)) => writeln!(
                f,
                "{:<30} {:>8.3} {:>9.1} {:>8.2} {:>9.1}",
                "  the same, reading the file",
                time.as_secs_f64(),
                mbps(self.corpus_bytes, *time),
                cpu.as_secs_f64(),
                mbps(self.corpus_bytes, *cpu)
            )?,
            Err(e) => writeln!(f, "  the same, reading the file: failed: {e}")?,
        }
        for r in &self.ripgrep {
            let rg = mbps(self.corpus_bytes, r.time);
            let rg_cpu = mbps(self.corpus_bytes, r.cpu);
            match &r.outcome {
                Ok(n) => writeln!(
                    f,
                    "{:<30} {:>8.3} {:>9.1} {:>8.2} {:>9.1} {:>8}  lines; engine/rg: wall {:.2}x, cpu {:.2}x",
                    format!("rg -c {}", r.label),
                    r.time.as_secs_f64(),
                    rg,
                    r.cpu.as_secs_f64(),
                    rg_cpu,
                    n,
                    eng / rg,
                    eng_cpu / rg_cpu
                )?,
                Err(e) => writeln!(f, "rg -c {}: failed: {e}", r.label)?,
            }
            if r.left_out > 0 {
                writeln!(f, "  ({} rules ripgrep cannot compile left out of its run)", r.left_out)?;
            }
        }
        if let Some(none) = self.suppression.first() {
            writeln!(
                f,
                "\nsuppression, same corpus as a tar of {} files ({:.1} MB), medians of interleaved runs:",
                none.files,
                none.tar_bytes as f64 / 1e6
            )?;
            writeln!(
                f,
                "{:<44} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
                "", "wall MB/s", "cpu MB/s", "findings", "suppressed", "excluded", "cpu cost"
            )?;
            for r in &self.suppression {
                writeln!(
                    f,
                    "{:<44} {:>9.1} {:>9.1} {:>9} {:>10} {:>9} {:>8.1}%",
                    r.label,
                    mbps(r.tar_bytes, r.time),
                    mbps(r.tar_bytes, r.cpu),
                    r.findings,
                    r.suppressed,
                    r.files_excluded,
                    (r.cpu.as_secs_f64() / none.cpu.as_secs_f64().max(1e-9) - 1.0) * 100.0
                )?;
            }
            writeln!(f, "(goal: each at most 10% over `none`)")?;
        }
        Ok(())
    }
}

/// A small deterministic PRNG (xorshift64*), so every run scans the same corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }

    fn token(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| alphabet[self.below(alphabet.len())] as char).collect()
    }
}

const WORDS: &[&str] = &[
    "buffer", "request", "handler", "config", "value", "index", "parse", "reader", "writer", "client",
    "server", "session", "cache", "queue", "worker", "result", "error", "state", "input", "output", "token",
    "header", "stream", "record", "policy", "tenant", "artifact", "engine", "match", "offset",
];
const TYPES: &[&str] = &["Vec<u8>", "String", "u64", "Option<usize>", "HashMap<String, u32>", "&str", "bool"];
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn filler_line(rng: &mut Rng, out: &mut String) {
    let a = rng.pick(WORDS);
    let b = rng.pick(WORDS);
    let c = rng.pick(WORDS);
    let n = rng.below(100_000);
    let line = match rng.below(12) {
        0 => format!("    let {a}_{b} = self.{c}.get({n}).unwrap_or_default();"),
        1 => format!("// The {a} is passed to the {b} before the {c} is flushed ({n} bytes at most)."),
        2 => format!("fn {a}_{b}(&mut self, {c}: {}) -> Result<(), Error> {{", rng.pick(TYPES)),
        3 => format!("        if {a}.len() > {n} {{ return Err(Error::{}); }}", capitalize(b)),
        4 => format!("    \"{a}_{b}\": {n},"),
        5 => format!("# {a} {b} {c}: see docs/{a}.md, section {n}"),
        6 => format!("    {a}.{b}_{c} = \"{a}-{b}\";"),
        7 => format!("    log::debug!(\"{a} {b} took {{}} ms\", {n});"),
        8 => format!("    let {a}_token = parse_{b}(&{c}_header)?; // version 1.{n}.0"),
        9 => format!("    timestamp = {}; id = {};", 1_600_000_000 + n as u64 * 37, n * 7919),
        10 => "    }".to_owned(),
        _ => format!("    assert_eq!({a}.{b}(), {c}::{});", capitalize(a)),
    };
    out.push_str(&line);
    out.push('\n');
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

fn planted_line(rng: &mut Rng, k: usize) -> String {
    match k % 10 {
        0 => format!("aws_access_key_id = AKIA{}", rng.token(UPPER32, 16)),
        1 => {
            // Well-formed: the rule drops a token whose checksum does not hold.
            let random = rng.token(ALNUM, 30);
            let check = cella_scan::checksum::base62_crc32_digits(random.as_bytes());
            format!("GITHUB_TOKEN=ghp_{random}{}", String::from_utf8_lossy(&check))
        }
        2 => format!("    maintainer: \"dev{}@corp-mail.net\"", rng.below(1000)),
        3 => "    card = \"4111 1111 1111 1111\"".to_owned(),
        4 => "ssn: 123-45-6789".to_owned(),
        5 => "iban = \"GB82 WEST 1234 5698 7654 32\"".to_owned(),
        6 => format!("SLACK_BOT_TOKEN=xoxb-1234567890-1234567890123-{}", rng.token(ALNUM, 24)),
        7 => format!("STRIPE_KEY=sk_live_{}", rng.token(ALNUM, 24)),
        8 => "// SPDX-License-Identifier: Apache-2.0".to_owned(),
        _ => "call +14155552671 for support".to_owned(),
    }
}

/// Generates `bytes` of corpus; returns it and the number of planted findings.
pub fn generate_corpus(bytes: usize) -> (Vec<u8>, u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(bytes + 256);
    let mut planted = 0u64;
    let mut next_plant = 64 * 1024;
    while out.len() < bytes {
        if out.len() >= next_plant {
            out.push_str(&planted_line(&mut rng, planted as usize));
            out.push('\n');
            planted += 1;
            next_plant += 64 * 1024;
        } else {
            filler_line(&mut rng, &mut out);
        }
    }
    (out.into_bytes(), planted)
}

/// CPU time (user + system) of this process and of its waited-for children, from
/// `/proc/self/stat` (clock ticks of 10 ms). On a shared machine CPU time is a steadier measure
/// than wall time; both are reported.
pub fn cpu_times() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15, cutime 16, cstime 17.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(4).map(|x| x.parse().unwrap_or(0)).collect();
    let tick = |t: u64| Duration::from_millis(t * 10);
    if f.len() < 4 {
        return (Duration::ZERO, Duration::ZERO);
    }
    (tick(f[0] + f[1]), tick(f[2] + f[3]))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, PolicyError> {
    let compiled = load_packs(DEFAULT_PACKS)?;
    let policy = compiled.policy().clone();

    let compile_eager = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let e = Engine::new(policy.clone());
                let d = t.elapsed();
                drop(e);
                d
            })
            .collect(),
    );
    let compile_lazy = median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                let e = Engine::from_policy_json(compiled.as_bytes());
                let d = t.elapsed();
                drop(e);
                d
            })
            .collect(),
    );

    let quiet: Vec<u8> = generate_corpus(1024).0;
    let mut noisy = Vec::new();
    for r in &policy.rules {
        for k in &r.keywords {
            noisy.extend_from_slice(k.as_bytes());
            noisy.push(b'\n');
        }
    }
    noisy.extend_from_slice(b"4111 1111 1111 1111 a@b.io +14155552671\n");
    let first = |data: &[u8]| {
        median(
            (0..11)
                .map(|_| {
                    let t = Instant::now();
                    if let Ok(mut e) = Engine::from_policy_json(compiled.as_bytes()) {
                        let mut r = Report::default();
                        let _ = scan_artifact(
                            &mut SliceSource(data),
                            "f.txt",
                            &mut e,
                            &Limits::default(),
                            &mut r,
                        );
                    }
                    t.elapsed()
                })
                .collect(),
        )
    };
    let first_scan = first(&quiet);
    let first_scan_all_rules = first(&noisy);

    let (corpus, planted) = generate_corpus(opts.corpus_mib << 20);

    let mut engine = Engine::from_policy_json(compiled.as_bytes())
        .map_err(|e| PolicyError::Malformed { pack: "bench".to_owned(), message: e.to_string() })?;
    let mut report = Report::default();
    let limits = Limits { max_findings: usize::MAX, ..Limits::default() };
    let c0 = cpu_times().0;
    let t = Instant::now();
    let r = scan_artifact(&mut SliceSource(&corpus), "corpus.txt", &mut engine, &limits, &mut report);
    let engine_time = t.elapsed();
    let engine_cpu = cpu_times().0.saturating_sub(c0);
    r.map_err(|e| PolicyError::Malformed { pack: "bench".to_owned(), message: e.to_string() })?;

    // The corpus as a file, for the engine reading it and for ripgrep; the page cache is warmed
    // first, so all of them read the same cached file.
    let written = std::fs::File::create(&opts.corpus_path)
        .and_then(|mut f| f.write_all(&corpus))
        .and_then(|()| std::fs::read(&opts.corpus_path).map(drop))
        .map_err(|e| format!("cannot write {}: {e}", opts.corpus_path.display()));
    let engine_file = written.clone().and_then(|()| scan_file(&opts.corpus_path, compiled.as_bytes()));
    let mut ripgrep = Vec::new();
    if opts.ripgrep {
        match written {
            Err(e) => ripgrep.push(RgRun {
                label: "",
                time: Duration::ZERO,
                cpu: Duration::ZERO,
                outcome: Err(e),
                left_out: 0,
            }),
            Ok(()) => {
                for (label, extra) in [("(default flags)", &[][..]), ("--no-unicode", &["--no-unicode"][..])]
                {
                    ripgrep.push(run_rg(label, extra, &policy, &opts.corpus_path));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&opts.corpus_path);
    let suppression = if opts.suppression_runs > 0 {
        suppression_variants(&corpus, &policy, opts.suppression_runs)?
    } else {
        Vec::new()
    };

    Ok(BenchReport {
        rules: policy.rules.len(),
        corpus_bytes: corpus.len() as u64,
        planted,
        engine_time,
        engine_cpu,
        engine_findings: report.findings_total(),
        engine_file,
        compile_eager,
        compile_lazy,
        first_scan,
        first_scan_all_rules,
        policy_bytes: compiled.as_bytes().len(),
        ripgrep,
        suppression,
    })
}

/// Bytes of each file the corpus is cut into for the suppression runs.
const FILE_BYTES: usize = 32 << 10;
/// Baseline entries in the baseline run.
const BASELINE_ENTRIES: usize = 10_000;
/// Globs in the excludes runs.
const EXCLUDE_GLOBS: usize = 200;

/// `n` globs of the shapes teams write (`vendor/`, `*.min.js`, `/build`, `docs/*.md`,
/// `**/testdata/**`, `[...]` sets), none of which matches a corpus file: every file is still
/// scanned, so the runs show the matching's own cost.
fn many_globs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 6 {
            0 => format!("vendor{i}/"),
            1 => format!("*.min{i}.js"),
            2 => format!("/build{i}"),
            3 => format!("docs{i}/*.md"),
            4 => format!("**/testdata{i}/**"),
            _ => format!("gen/[abc]{i}_*.pb.go"),
        })
        .collect()
}

/// A ustar header (enough for the engine's reader: name, size, type, checksum).
fn ustar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Scans `tar` once with `engine`; returns wall and CPU time and the report.
fn timed_scan(engine: &mut Engine, tar: &[u8]) -> Result<(Duration, Duration, Report), PolicyError> {
    let limits = Limits { max_findings: usize::MAX, ..Limits::default() };
    let mut report = Report::default();
    let c0 = cpu_times().0;
    let t = Instant::now();
    scan_artifact(&mut SliceSource(tar), "corpus.tar", engine, &limits, &mut report)
        .map_err(|e| PolicyError::Malformed { pack: "bench".to_owned(), message: e.to_string() })?;
    Ok((t.elapsed(), cpu_times().0.saturating_sub(c0), report))
}

/// The corpus as a tar of files, scanned (each run a fresh engine, as each job has) with no
/// suppression, with a 10,000-entry baseline (half the planted findings' fingerprints, the
/// rest random), with [`EXCLUDE_GLOBS`] job excludes, and with as many pack excludes on every
/// rule; runs interleaved, medians kept.
pub fn suppression_variants(
    corpus: &[u8],
    policy: &Policy,
    runs: usize,
) -> Result<Vec<SuppressionRun>, PolicyError> {
    let bench_error = |message: String| PolicyError::Malformed { pack: "bench".to_owned(), message };
    let mut tar = Vec::with_capacity(corpus.len() + corpus.len() / 32);
    let mut files = 0u64;
    for (i, chunk) in corpus.chunks(FILE_BYTES).enumerate() {
        ustar_entry(&mut tar, &format!("src/module{:03}/file{i:05}.rs", i / 64), chunk);
        files += 1;
    }
    tar.resize(tar.len() + 1024, 0);
    let key = FingerprintKey::new([0x42; 32]);
    let globs = many_globs(EXCLUDE_GLOBS);
    let mut pack_policy = policy.clone();
    let regexes = globs
        .iter()
        .map(|g| glob_to_regex(g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bench_error(e.to_string()))?;
    for rule in &mut pack_policy.rules {
        rule.allowlist.paths.extend(regexes.iter().cloned());
    }
    // The baseline: every other planted finding, found by an untimed scan, then random
    // fingerprints up to 10,000.
    let mut probe = Engine::new_lazy(policy.clone()).map_err(|e| bench_error(e.to_string()))?;
    probe.set_fingerprint_key(key.clone());
    let (_, _, first) = timed_scan(&mut probe, &tar)?;
    let mut entries: Vec<[u8; 32]> = first
        .findings
        .iter()
        .step_by(2)
        .filter_map(|f| FingerprintSet::parse_hex(&f.location_fingerprint))
        .collect();
    let mut rng = Rng(0x5eed_0bad_cafe_f00d);
    while entries.len() < BASELINE_ENTRIES {
        let mut fp = [0u8; 32];
        for chunk in fp.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        entries.push(fp);
    }
    let baseline = FingerprintSet::new(entries);

    let labels = [
        "none".to_owned(),
        format!("baseline of {} fingerprints", baseline.len()),
        format!("{EXCLUDE_GLOBS} job excludes (--exclude)"),
        format!("{EXCLUDE_GLOBS} pack excludes on every rule"),
    ];
    let mut samples: Vec<Vec<(Duration, Duration, Report)>> = vec![Vec::new(); labels.len()];
    for _ in 0..runs.max(1) {
        for (v, out) in samples.iter_mut().enumerate() {
            let variant_policy = if v == 3 { pack_policy.clone() } else { policy.clone() };
            let mut engine = Engine::new_lazy(variant_policy).map_err(|e| bench_error(e.to_string()))?;
            engine.set_fingerprint_key(key.clone());
            match v {
                1 => engine.set_baseline(baseline.clone()),
                2 => engine.set_excludes(&globs).map_err(|e| bench_error(e.to_string()))?,
                _ => {}
            }
            out.push(timed_scan(&mut engine, &tar)?);
        }
    }
    Ok(labels
        .into_iter()
        .zip(samples)
        .map(|(label, mut s)| {
            let time = median(s.iter().map(|(t, _, _)| *t).collect());
            let cpu = median(s.iter().map(|(_, c, _)| *c).collect());
            let (_, _, report) = s.swap_remove(0);
            SuppressionRun {
                label,
                files,
                tar_bytes: tar.len() as u64,
                time,
                cpu,
                findings: report.findings_total(),
                suppressed: report.suppressed_inline + report.suppressed_baseline,
                files_excluded: report.files_excluded,
            }
        })
        .collect())
}

/// A file read with `pread`, as the engine's [`cella_scan::Source`].
struct FileSource {
    file: std::fs::File,
    len: u64,
}

impl cella_scan::Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, cella_scan::SourceError> {
        use std::os::unix::fs::FileExt;
        self.file.read_at(buf, offset).map_err(|_| cella_scan::SourceError("pread failed"))
    }
}

/// Scans the file at `path` with a fresh engine built from the serialized `policy`, keeping
/// every finding; returns wall and CPU time.
pub fn scan_file(path: &std::path::Path, policy: &[u8]) -> Result<(Duration, Duration), String> {
    let limits = Limits { max_findings: usize::MAX, ..Limits::default() };
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut engine = Engine::from_policy_json(policy).map_err(|e| e.to_string())?;
    let mut report = Report::default();
    let c0 = cpu_times().0;
    let t = Instant::now();
    scan_artifact(&mut FileSource { file, len }, "corpus.txt", &mut engine, &limits, &mut report)
        .map_err(|e| e.to_string())?;
    Ok((t.elapsed(), cpu_times().0.saturating_sub(c0)))
}

fn run_rg(label: &'static str, extra: &[&str], policy: &cella_scan::Policy, path: &std::path::Path) -> RgRun {
    let mut cmd = Command::new("rg");
    // Hundreds of rules exceed ripgrep's default regex size limit: give it room.
    cmd.arg("-c").args(["--regex-size-limit", "2G", "--dfa-size-limit", "2G"]).args(extra);
    let mut left_out = 0;
    // A licence-text rule has no regex (it compares texts word by word): nothing to give rg.
    for r in policy.rules.iter().filter(|r| !r.license_texts) {
        // ripgrep refuses some rules' syntax (a newline in a multiline rule without -U, an
        // escaped quote): those are left out of its run and counted.
        let accepted = Command::new("rg")
            .args(extra)
            .args(["-q", "-e", &r.regex, "/dev/null"])
            .status()
            .is_ok_and(|s| s.code() != Some(2));
        if accepted {
            cmd.arg("-e").arg(&r.regex);
        } else {
            left_out += 1;
        }
    }
    cmd.arg(path);
    let c0 = cpu_times().1;
    let t = Instant::now();
    let out = cmd.output();
    let time = t.elapsed();
    let cpu = cpu_times().1.saturating_sub(c0);
    let outcome = match out {
        Err(e) => Err(format!("cannot run rg ({e}); install it with `apt-get install -y ripgrep`")),
        Ok(o) if o.status.success() || o.status.code() == Some(1) => {
            Ok(String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(0))
        }
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).lines().take(3).collect::<Vec<_>>().join(" / ")),
    };
    RgRun { label, time, cpu, outcome, left_out }
}
