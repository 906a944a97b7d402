//! A repository's history, from a git bundle: every commit reachable from the bundle's
//! references is walked (parents before children), each distinct file content (blob) is
//! scanned once, and each finding is attributed to the commit that first holds it at its path.
//!
//! The bundle is read here, in the VM: its pack indexed and its deltas resolved with bounded
//! depth and memory ([`pack`]). A finding of the same secret at the same path in several
//! versions of a file is reported once, with the earliest commit. Once the whole artifact is
//! scanned, [`merge`] joins history to the working tree: a tree finding of a secret history
//! also holds at that path gets its commit, and a history finding whose secret is in neither
//! the tree nor the bundle's `HEAD` is marked as only in history (deleted, but still to be
//! rotated).

mod bundle;
mod delta;
mod graph;
mod incremental;
mod objects;
mod pack;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde::Serialize;

pub(crate) use bundle::is_bundle;
use graph::{first_appearances, head_blobs, read_graph, topological_order, Names};
use pack::{Pack, BLOB, NONE};

use crate::engine::Engine;
use crate::error::{ArtifactError, HistoryProblem};
use crate::finding::{to_hex, Finding, Report};
use crate::parallel::OneWorker;
use crate::Limits;

/// The path inside a scanned tree at which `cella scan` sends the folder's history: a bundle
/// there describes the tree it is in, so its findings carry the tree's own paths.
pub const HISTORY_ENTRY: &str = ".git/cella-history.bundle";

/// Why a history walk stopped: the bundle's fault, or the scan's (a limit, an engine error).
pub(crate) enum Stop {
    History(HistoryProblem),
    Artifact(ArtifactError),
}

impl From<HistoryProblem> for Stop {
    fn from(p: HistoryProblem) -> Self {
        Stop::History(p)
    }
}

impl From<ArtifactError> for Stop {
    fn from(e: ArtifactError) -> Self {
        Stop::Artifact(e)
    }
}

/// The commit that introduced a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// The commit's full SHA-1 (40 hex digits).
    pub commit: String,
    /// Its author, `Name <email>`.
    pub author: String,
    /// Its author date, RFC 3339 in the author's offset.
    pub date: String,
    /// Its committer, `Name <email>`, and commit date (they differ from the author's after a
    /// rebase or a cherry-pick).
    pub committer: String,
    pub committed: String,
    /// The first line of its message.
    pub subject: String,
    /// The secret is in no scanned file of the tree and not at the bundle's `HEAD`: it was
    /// deleted, but history still holds it (it still needs rotating).
    pub only_in_history: bool,
}

/// What the history scans of an artifact covered (the summary's `history`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HistorySummary {
    /// Bundles read.
    pub bundles: u64,
    /// References (branches, tags) they hold.
    pub refs: u64,
    /// Commits walked.
    pub commits: u64,
    /// Objects in their packs.
    pub objects: u64,
    /// Distinct file contents scanned.
    pub blobs_scanned: u64,
    /// Of those, versions scanned only where they differ from the version they were rebuilt
    /// from (the findings of what they share carried over).
    pub blobs_scanned_in_part: u64,
    /// Bytes of them scanned (counted in the scan's `bytes_scanned` too).
    pub bytes_scanned: u64,
    /// The history starts after some commits (a `--since` bundle, a shallow clone): older
    /// history was not scanned.
    pub partial: bool,
    /// Objects the history refers to that the bundle does not hold (before its start).
    pub objects_missing: u64,
}

/// One line for people: `history: 4 commits, 9 file versions scanned (1 bundle, 31 objects)`,
/// and what was not there.
impl core::fmt::Display for HistorySummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "history: {} commits, {} file versions scanned ({} bundle(s), {} objects)",
            self.commits, self.blobs_scanned, self.bundles, self.objects
        )?;
        if self.partial {
            f.write_str("; partial: history before the bundle's first commits was not scanned")?;
        }
        if self.objects_missing > 0 {
            write!(f, "; {} objects it names are not in the bundle", self.objects_missing)?;
        }
        Ok(())
    }
}

/// Pending findings held back from the report until the whole artifact is scanned, at most
/// this many times the findings cap.
const PENDING_PER_CAP: usize = 2;

/// The scan of a history's file versions, in delta order.
struct BlobScan<'e> {
    engine: &'e mut Engine,
    limits: &'e Limits,
    multiline: incremental::MultilineKeywords,
    /// The versions scanned on the path from the current delta chain's base: entry, path,
    /// all its findings and its multi-line clusters (what the versions rebuilt from it use).
    path: Vec<Scanned>,
    found: Found,
}

/// What scanning a history's versions found: one worker's, or all of theirs joined.
#[derive(Default)]
struct Found {
    /// Where the engine's findings land (drained after each version); its bytes scanned and
    /// versions skipped count.
    scratch: Report,
    /// Per (rule, secret, path): the finding of the earliest commit, its rank and slot.
    best: BTreeMap<(u32, String, String), (Finding, u32, u32)>,
    /// Secrets some version at `HEAD` holds.
    at_head_secrets: BTreeSet<(u32, String)>,
    blobs_scanned: u64,
    blobs_scanned_in_part: u64,
    dropped: u64,
    excluded: u64,
}

impl<'e> BlobScan<'e> {
    fn new(engine: &'e mut Engine, limits: &'e Limits, multiline: incremental::MultilineKeywords) -> Self {
        BlobScan { engine, limits, multiline, path: Vec::new(), found: Found::default() }
    }
}

/// A history with at least this many file versions is scanned by every worker the scan may
/// use (see [`crate::parallel`]); a smaller one is not worth waking them.
const PARALLEL_MIN_BLOBS: usize = 64;

/// Joins the workers' scans: per (rule, secret, path) the finding of the earliest commit, at
/// most the pending cap of them; the rest summed.
fn merge_scans(scans: Vec<BlobScan<'_>>, limits: &Limits) -> Found {
    let cap = limits.max_findings.saturating_mul(PENDING_PER_CAP);
    let mut merged = Found::default();
    for BlobScan { found, .. } in scans {
        merged.at_head_secrets.extend(found.at_head_secrets);
        merged.blobs_scanned += found.blobs_scanned;
        merged.blobs_scanned_in_part += found.blobs_scanned_in_part;
        merged.dropped += found.dropped;
        merged.excluded += found.excluded;
        merged.scratch.bytes_scanned += found.scratch.bytes_scanned;
        merged.scratch.skipped.extend(found.scratch.skipped);
        for (key, kept) in found.best {
            merged.keep(key, kept, cap);
        }
    }
    merged.scratch.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    merged
}

impl Found {
    /// Keeps `found` for `key` if it is the first of its key (while there is room under
    /// `cap`) or of an earlier commit than the one kept; counts it as dropped if there is no
    /// room.
    fn keep(&mut self, key: (u32, String, String), found: (Finding, u32, u32), cap: usize) {
        let room = self.best.len() < cap;
        match self.best.get_mut(&key) {
            Some(kept) if kept.1 > found.1 => *kept = found,
            Some(_) => {}
            None if room => {
                self.best.insert(key, found);
            }
            None => self.dropped += 1,
        }
    }
}

/// A version scanned, as the versions rebuilt from it need it.
struct Scanned {
    idx: u32,
    display: String,
    findings: Vec<Finding>,
    /// Its multi-line keywords and clusters; `None`: binary, or nothing can be carried over
    /// from it.
    multiline: Option<(incremental::Occurrences, Vec<(usize, usize)>)>,
}

/// Whether the engine reads `content` as binary (its printable strings, secrets only).
fn is_binary(content: &[u8]) -> bool {
    memchr::memchr(0, &content[..content.len().min(crate::BINARY_SNIFF_LEN)]).is_some()
}

impl BlobScan<'_> {
    /// Scans one version (`display` its path) of commit `slot` (ranked `rank`): only what
    /// changed from its base when the base was scanned at the same path, else whole.
    fn blob(
        &mut self,
        reached: pack::Reached<'_>,
        display: String,
        rank: u32,
        slot: u32,
        at_head: bool,
    ) -> Result<(), Stop> {
        let base = reached.from.as_ref().map(|f| f.base);
        while self.path.last().is_some_and(|top| Some(top.idx) != base) {
            self.path.pop();
        }
        if self.engine.excludes_path(&display) {
            self.found.excluded += 1;
            return Ok(());
        }
        let content = reached.content;
        let delta_scan = self.limits.history_delta_scan && !is_binary(content);
        let planned = match (self.path.last(), &reached.from) {
            (Some(top), Some(from)) if delta_scan && top.display == display => {
                top.multiline.as_ref().zip(delta::pieces(from.delta)).and_then(
                    |((occurrences, clusters), pieces)| {
                        let base = incremental::Base {
                            content: from.base_content,
                            findings: &top.findings,
                            occurrences,
                            clusters,
                        };
                        // Blanking moves later bytes forward: a NUL byte brought into the first
                        // BINARY_SNIFF_LEN would make the engine read the version as binary.
                        incremental::plan(&base, content, &pieces, &self.multiline)
                            .filter(|p| !is_binary(&p.text))
                    },
                )
            }
            _ => None,
        };
        let (findings, multiline) = match planned {
            Some(plan) => {
                self.engine.scan_file(&display, &plan.text, &mut self.found.scratch, self.limits)?;
                let mut all: Vec<Finding> = self.found.scratch.findings.drain(..).collect();
                all.extend(plan.carried);
                all.sort_by_key(|f| (f.line, f.column, f.end_line, f.end_column, f.rule_index));
                self.engine.renumber(&display, &mut all);
                self.found.blobs_scanned_in_part += 1;
                (all, Some((plan.occurrences, plan.clusters)))
            }
            None => {
                self.engine.scan_file(&display, content, &mut self.found.scratch, self.limits)?;
                let multiline = match delta_scan {
                    true => self.multiline.occurrences(content).map(|o| {
                        let clusters = incremental::MultilineKeywords::clusters(content, &o);
                        (o, clusters)
                    }),
                    false => None,
                };
                (self.found.scratch.findings.drain(..).collect(), multiline)
            }
        };
        self.found.blobs_scanned += 1;
        let cap = self.limits.max_findings.saturating_mul(PENDING_PER_CAP);
        for f in &findings {
            if at_head {
                self.found.at_head_secrets.insert((f.rule_index, f.fingerprint.clone()));
            }
            let key = (f.rule_index, f.fingerprint.clone(), f.path.clone());
            self.found.keep(key, (f.clone(), rank, slot), cap);
        }
        self.path.push(Scanned { idx: reached.idx, display, findings, multiline });
        Ok(())
    }
}

/// Reads the bundle `bytes` (the artifact entry `name`) and scans its history, reporting paths
/// under `path_prefix`. Findings wait in the report until [`merge`].
pub(crate) fn scan_bundle(
    bytes: &[u8],
    name: &str,
    path_prefix: &str,
    engine: &mut Engine,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), ArtifactError> {
    scan(bytes, path_prefix, engine, limits, report).map_err(|stop| match stop {
        Stop::History(problem) => ArtifactError::History { entry: String::from(name), problem },
        Stop::Artifact(e) => e,
    })
}

/// A bundle read: its pack indexed and resolved, its commit graph walked.
struct Read<'a> {
    header: bundle::Header,
    pack: Pack<'a>,
    graph: graph::Graph,
    /// Per pack entry: an index into `origins`, or [`NONE`] (see [`first_appearances`]).
    origin: Vec<u32>,
    origins: Vec<(u32, String)>,
    missing: u64,
    unresolved: u64,
    partial: bool,
    /// Each commit slot's place in topological order.
    rank: Vec<u32>,
}

impl Read<'_> {
    /// Which pack entries are blobs some commit holds.
    fn needed(&self) -> Vec<bool> {
        self.origin.iter().map(|o| *o != NONE).collect()
    }
}

/// Reads the bundle `bytes` as far as its blobs: every check and limit but the scan's.
fn read<'a>(bytes: &'a [u8], limits: &'a Limits) -> Result<(Read<'a>, Names), Stop> {
    let header = bundle::parse(bytes)?;
    let mut pack = Pack::index(&bytes[header.pack_offset..], limits)?;
    let workers = crate::parallel::workers();
    let unresolved = pack.resolve(workers)?;
    let partial = !header.prerequisites.is_empty();
    if unresolved > 0 && !partial {
        return Err(HistoryProblem::UnresolvedDeltas { count: unresolved }.into());
    }
    let n = pack.len();
    let names = Names(pack.names());
    let graph = read_graph(&pack, &names, workers)?;
    // A shallow clone's bundle lists no prerequisites: its cut shows in the commits.
    let partial = partial || graph.cut_off();
    let order = topological_order(&graph);
    let (origin, origins, missing) = first_appearances(&graph, &order, n);
    let mut rank = vec![0u32; graph.commits.len()];
    for (i, &slot) in order.iter().enumerate() {
        rank[slot as usize] = i as u32;
    }
    Ok((Read { header, pack, graph, origin, origins, missing, unresolved, partial, rank }, names))
}

/// Reads the bundle `bytes` (the artifact entry `name`) with every check and limit of a scan,
/// its blobs rebuilt but not scanned: what extracting an artifact does with a bundle (it holds
/// no files of the artifact's own).
pub(crate) fn check_bundle(bytes: &[u8], name: &str, limits: &Limits) -> Result<(), ArtifactError> {
    let checked = read(bytes, limits).and_then(|(r, _)| {
        let needed = r.needed();
        r.pack.for_each_parallel(|k| k == BLOB, &needed, &OneWorker, &mut [()], |_, _| Ok(()))
    });
    checked.map_err(|stop| match stop {
        Stop::History(problem) => ArtifactError::History { entry: String::from(name), problem },
        Stop::Artifact(e) => e,
    })
}

fn scan(
    bytes: &[u8],
    path_prefix: &str,
    engine: &mut Engine,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), Stop> {
    let (read, names) = read(bytes, limits)?;
    let Read { header, pack, graph, origin, origins, missing, unresolved, partial, rank } = read;
    let n = pack.len();
    let at_head = head_blobs(&graph, &header.refs, &names, n);

    // Scan each blob that appears in a commit, once, at its first path.
    let needed: Vec<bool> = origin.iter().map(|o| *o != NONE).collect();
    let bytes_before = report.bytes_scanned;
    let multiline = incremental::MultilineKeywords::new(engine.policy());
    let workers = match needed.iter().filter(|n| **n).count() >= PARALLEL_MIN_BLOBS {
        true => crate::parallel::workers(),
        false => &OneWorker,
    };
    let mut forks: Vec<Engine> = (1..workers.count()).map(|_| engine.fork()).collect();
    let mut scans: Vec<BlobScan<'_>> = core::iter::once(engine)
        .chain(forks.iter_mut())
        .map(|engine| BlobScan::new(engine, limits, multiline.clone()))
        .collect();
    let visit = |scan: &mut BlobScan<'_>, reached: pack::Reached<'_>| {
        let (slot, path) = &origins[origin[reached.idx as usize] as usize];
        let display = alloc::format!("{path_prefix}{path}");
        let head = at_head[reached.idx as usize];
        scan.blob(reached, display, rank[*slot as usize], *slot, head)
    };
    pack.for_each_parallel(|k| k == BLOB, &needed, workers, &mut scans, visit)?;
    let Found { best, at_head_secrets, blobs_scanned, blobs_scanned_in_part, dropped, excluded, scratch } =
        merge_scans(scans, limits);
    report.bytes_scanned += scratch.bytes_scanned;
    report.findings_dropped += dropped;
    report.files_excluded += excluded;
    for s in scratch.skipped {
        report.skip(&s.path, s.reason);
    }

    // One finding per secret and path: the earliest commit's, in commit order.
    let mut found: Vec<(Finding, u32, u32)> = best.into_values().collect();
    found.sort_by_key(|f| f.1);
    for (mut finding, _, slot) in found {
        let c = &graph.commits[slot as usize];
        let only_in_history = !at_head_secrets.contains(&(finding.rule_index, finding.fingerprint.clone()));
        finding.history = Some(alloc::boxed::Box::new(Origin {
            commit: to_hex(pack.oid(c.entry)),
            author: c.info.author.clone(),
            date: objects::rfc3339(c.info.author_time, c.info.author_offset),
            committer: c.info.committer.clone(),
            committed: objects::rfc3339(c.info.commit_time, c.info.commit_offset),
            subject: c.info.subject.clone(),
            only_in_history,
        }));
        report.pending_history.push(finding);
    }

    let summary = report.history.get_or_insert_with(HistorySummary::default);
    summary.bundles += 1;
    summary.refs += header.refs.len() as u64;
    summary.commits += graph.commits.len() as u64;
    summary.objects += n as u64;
    summary.blobs_scanned += blobs_scanned;
    summary.blobs_scanned_in_part += blobs_scanned_in_part;
    summary.bytes_scanned += report.bytes_scanned - bytes_before;
    summary.partial |= partial || unresolved > 0;
    summary.objects_missing += missing + unresolved;
    Ok(())
}

/// Joins the history findings held back to the report's (working-tree) findings: a tree
/// finding of a secret that history holds at the same path takes the commit that introduced
/// it; a history finding whose secret is anywhere in the tree is not only in history; the rest
/// are added.
pub(crate) fn merge(report: &mut Report, limits: &Limits) {
    let pending = core::mem::take(&mut report.pending_history);
    if pending.is_empty() {
        return;
    }
    let mut at_path: BTreeMap<(u32, String, String), usize> = BTreeMap::new();
    let mut in_tree: BTreeSet<(u32, String)> = BTreeSet::new();
    for (i, f) in report.findings.iter().enumerate() {
        if f.history.is_none() {
            at_path.entry((f.rule_index, f.fingerprint.clone(), f.path.clone())).or_insert(i);
            in_tree.insert((f.rule_index, f.fingerprint.clone()));
        }
    }
    for mut h in pending {
        let key = (h.rule_index, h.fingerprint.clone(), h.path.clone());
        if let Some(&i) = at_path.get(&key) {
            if let Some(mut origin) = h.history.take() {
                origin.only_in_history = false;
                report.findings[i].history = Some(origin);
            }
            continue;
        }
        if in_tree.contains(&(key.0, key.1)) {
            if let Some(origin) = h.history.as_mut() {
                origin.only_in_history = false;
            }
        }
        report.add(h, limits.max_findings);
    }
}
