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
mod incremental;
mod objects;
mod pack;

use alloc::collections::{BTreeMap, BTreeSet, BinaryHeap};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

use serde::Serialize;

pub(crate) use bundle::is_bundle;
use objects::EntryKind;
use pack::{Oid, Pack, BLOB, COMMIT, NONE, TAG, TREE};

use crate::engine::Engine;
use crate::error::{ArtifactError, HistoryProblem};
use crate::finding::{to_hex, Finding, Report};
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
    /// Where the engine's findings land (drained after each version).
    scratch: Report,
    multiline: incremental::MultilineKeywords,
    /// The versions scanned on the path from the current delta chain's base: entry, path,
    /// all its findings and its multi-line clusters (what the versions rebuilt from it use).
    path: Vec<Scanned>,
    /// Per (rule, secret, path): the finding of the earliest commit, its rank and slot.
    best: BTreeMap<(u32, String, String), (Finding, u32, u32)>,
    /// Secrets some version at `HEAD` holds.
    at_head_secrets: BTreeSet<(u32, String)>,
    blobs_scanned: u64,
    blobs_scanned_in_part: u64,
    dropped: u64,
    excluded: u64,
}

/// A version scanned, as the versions rebuilt from it need it.
struct Scanned {
    idx: u32,
    display: String,
    findings: Vec<Finding>,
    /// `None`: binary, or nothing can be carried over from it.
    clusters: Option<Vec<(usize, usize)>>,
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
            self.excluded += 1;
            return Ok(());
        }
        let content = reached.content;
        let delta_scan = self.limits.history_delta_scan && !is_binary(content);
        let planned = match (self.path.last(), &reached.from) {
            (Some(top), Some(from)) if delta_scan && top.display == display => {
                top.clusters.as_deref().zip(delta::pieces(from.delta)).and_then(|(clusters, pieces)| {
                    let base =
                        incremental::Base { content: from.base_content, findings: &top.findings, clusters };
                    // Blanking moves later bytes forward: a NUL byte brought into the first
                    // BINARY_SNIFF_LEN would make the engine read the version as binary.
                    incremental::plan(&base, content, &pieces, &self.multiline)
                        .filter(|p| !is_binary(&p.text))
                })
            }
            _ => None,
        };
        let (findings, clusters) = match planned {
            Some(plan) => {
                self.engine.scan_file(&display, &plan.text, &mut self.scratch, self.limits)?;
                let mut all: Vec<Finding> = self.scratch.findings.drain(..).collect();
                all.extend(plan.carried);
                all.sort_by_key(|f| (f.line, f.column, f.end_line, f.end_column, f.rule_index));
                self.engine.renumber(&display, &mut all);
                self.blobs_scanned_in_part += 1;
                (all, Some(plan.clusters))
            }
            None => {
                self.engine.scan_file(&display, content, &mut self.scratch, self.limits)?;
                let clusters = if delta_scan { self.multiline.clusters(content) } else { None };
                (self.scratch.findings.drain(..).collect(), clusters)
            }
        };
        self.blobs_scanned += 1;
        let cap = self.limits.max_findings.saturating_mul(PENDING_PER_CAP);
        for f in &findings {
            if at_head {
                self.at_head_secrets.insert((f.rule_index, f.fingerprint.clone()));
            }
            let key = (f.rule_index, f.fingerprint.clone(), f.path.clone());
            let room = self.best.len() < cap;
            match self.best.get_mut(&key) {
                Some(kept) if kept.1 > rank => *kept = (f.clone(), rank, slot),
                Some(_) => {}
                None if room => {
                    self.best.insert(key, (f.clone(), rank, slot));
                }
                None => self.dropped += 1,
            }
        }
        self.path.push(Scanned { idx: reached.idx, display, findings, clusters });
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

/// A commit, as the walk needs it.
struct CommitNode {
    /// Its pack entry.
    entry: u32,
    /// Its root tree's pack entry ([`NONE`] if not in the pack).
    tree: u32,
    /// Its parents' pack entries (those in the pack).
    parents: Vec<u32>,
    author: String,
    author_time: i64,
    author_offset: i32,
    commit_time: i64,
    subject: String,
}

/// One entry of a tree, its name in [`Graph::names`].
#[derive(Clone, Copy)]
struct TreeItem {
    name: u32,
    name_len: u32,
    /// The pack entry it names ([`NONE`] if not in the pack).
    obj: u32,
    kind: EntryKind,
}

/// Commits, trees and tags of a pack, by pack entry.
struct Graph {
    commits: Vec<CommitNode>,
    /// Pack entry to commit slot.
    commit_of: Vec<u32>,
    /// Pack entry to its tree's items (`tree_items[start..start + len]`); `NONE` start if the
    /// entry is no tree.
    tree_of: Vec<(u32, u32)>,
    tree_items: Vec<TreeItem>,
    names: Vec<u8>,
    /// Annotated tags: pack entry to the entry it points to.
    tag_target: BTreeMap<u32, u32>,
}

impl Graph {
    fn items(&self, tree: u32) -> Option<&[TreeItem]> {
        let (start, len) = *self.tree_of.get(tree as usize)?;
        (start != NONE).then(|| &self.tree_items[start as usize..(start + len) as usize])
    }

    fn name(&self, item: &TreeItem) -> &[u8] {
        &self.names[item.name as usize..(item.name + item.name_len) as usize]
    }

    /// The commit a reference's object leads to, through annotated tags.
    fn peel(&self, mut entry: u32) -> Option<u32> {
        for _ in 0..16 {
            if let Some(&slot) = self.commit_of.get(entry as usize).filter(|s| **s != NONE) {
                return Some(slot);
            }
            entry = *self.tag_target.get(&entry)?;
        }
        None
    }
}

/// Reads the commits, trees and tags of `pack`.
fn read_graph(pack: &mut Pack<'_>, names: &Names) -> Result<Graph, Stop> {
    let n = pack.len();
    let mut graph = Graph {
        commits: Vec::new(),
        commit_of: vec![NONE; n],
        tree_of: vec![(NONE, 0); n],
        tree_items: Vec::new(),
        names: Vec::new(),
        tag_target: BTreeMap::new(),
    };
    let all = vec![true; n];
    let oids: Vec<Oid> = (0..n as u32).map(|i| *pack.oid(i)).collect();
    let oid_hex = |idx: u32| to_hex(&oids[idx as usize]);
    pack.for_each(|k| k != BLOB, &all, &mut |reached| {
        let (idx, kind, content) = (reached.idx, reached.kind, reached.content);
        let bad = |reason| Stop::History(HistoryProblem::BadObject { oid: oid_hex(idx), reason });
        match kind {
            COMMIT => {
                let c = objects::parse_commit(content)
                    .ok_or_else(|| bad("a commit without a valid tree line"))?;
                graph.commit_of[idx as usize] = graph.commits.len() as u32;
                graph.commits.push(CommitNode {
                    entry: idx,
                    tree: names.find(&c.tree),
                    parents: c.parents.iter().map(|p| names.find(p)).filter(|p| *p != NONE).collect(),
                    author: c.author,
                    author_time: c.author_time,
                    author_offset: c.author_offset,
                    commit_time: c.commit_time,
                    subject: c.subject,
                });
            }
            TREE => {
                let start = graph.tree_items.len();
                let ok = objects::parse_tree(content, |kind, name, oid| {
                    graph.tree_items.push(TreeItem {
                        name: graph.names.len() as u32,
                        name_len: name.len() as u32,
                        obj: names.find(oid),
                        kind,
                    });
                    graph.names.extend_from_slice(name);
                });
                if !ok {
                    return Err(bad("a tree entry is cut short or names `.`, `..` or a path with `/`"));
                }
                if graph.names.len() > u32::MAX as usize / 2 || graph.tree_items.len() > u32::MAX as usize / 2
                {
                    return Err(bad("the trees hold more entries than Cella indexes"));
                }
                graph.tree_of[idx as usize] = (start as u32, (graph.tree_items.len() - start) as u32);
            }
            TAG => {
                if let Some(target) = objects::parse_tag_target(content) {
                    graph.tag_target.insert(idx, names.find(&target));
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(graph)
}

/// Object names to pack entries.
struct Names(Vec<(Oid, u32)>);

impl Names {
    fn find(&self, oid: &Oid) -> u32 {
        match self.0.binary_search_by(|(o, _)| o.cmp(oid)) {
            Ok(i) => self.0[i].1,
            Err(_) => NONE,
        }
    }
}

/// Commit slots, parents before children; among commits ready at once, the oldest (by
/// committer date) first.
fn topological_order(graph: &Graph) -> Vec<u32> {
    let m = graph.commits.len();
    let mut pending = vec![0u32; m];
    let mut children: Vec<(u32, u32)> = Vec::new();
    for (slot, c) in graph.commits.iter().enumerate() {
        for &p in &c.parents {
            let parent = graph.commit_of[p as usize];
            if parent != NONE {
                pending[slot] += 1;
                children.push((parent, slot as u32));
            }
        }
    }
    children.sort_unstable();
    let mut ready: BinaryHeap<Reverse<(i64, u32)>> = (0..m as u32)
        .filter(|&s| pending[s as usize] == 0)
        .map(|s| Reverse((graph.commits[s as usize].commit_time, s)))
        .collect();
    let mut order = Vec::with_capacity(m);
    while let Some(Reverse((_, slot))) = ready.pop() {
        order.push(slot);
        let start = children.partition_point(|c| c.0 < slot);
        for &(_, child) in children[start..].iter().take_while(|c| c.0 == slot) {
            pending[child as usize] -= 1;
            if pending[child as usize] == 0 {
                ready.push(Reverse((graph.commits[child as usize].commit_time, child)));
            }
        }
    }
    order
}

/// FNV-1a of a path: subtrees already walked at the same path are skipped.
fn path_hash(path: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in path {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where each blob first appears: walks every commit's tree in `order`, skipping subtrees
/// seen before at the same path. Returns, per pack entry, an index into the returned list of
/// (commit slot, path), or [`NONE`]; and the number of missing objects met.
fn first_appearances(graph: &Graph, order: &[u32], n: usize) -> (Vec<u32>, Vec<(u32, String)>, u64) {
    let mut origin = vec![NONE; n];
    let mut origins: Vec<(u32, String)> = Vec::new();
    let mut seen: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut missing = 0u64;
    let mut stack: Vec<(u32, Vec<u8>)> = Vec::new();
    for &slot in order {
        let root = graph.commits[slot as usize].tree;
        stack.push((root, Vec::new()));
        while let Some((tree, prefix)) = stack.pop() {
            if tree == NONE {
                missing += 1;
                continue;
            }
            if !seen.insert((path_hash(&prefix), tree)) {
                continue;
            }
            let Some(items) = graph.items(tree) else {
                missing += 1;
                continue;
            };
            for item in items {
                let mut path = prefix.clone();
                path.extend_from_slice(graph.name(item));
                match item.kind {
                    EntryKind::Tree => {
                        path.push(b'/');
                        stack.push((item.obj, path));
                    }
                    EntryKind::Blob if item.obj == NONE => missing += 1,
                    EntryKind::Blob if origin[item.obj as usize] == NONE => {
                        origin[item.obj as usize] = origins.len() as u32;
                        origins.push((slot, String::from_utf8_lossy(&path).into_owned()));
                    }
                    _ => {}
                }
            }
        }
    }
    (origin, origins, missing)
}

/// The blobs of the tree of the bundle's `HEAD` (else of `main` or `master`).
fn head_blobs(graph: &Graph, refs: &[(String, Oid)], names: &Names, n: usize) -> Vec<bool> {
    let mut at_head = vec![false; n];
    let tip = ["HEAD", "refs/heads/main", "refs/heads/master"]
        .iter()
        .find_map(|want| refs.iter().find(|(name, _)| name == want))
        .and_then(|(_, oid)| graph.peel(names.find(oid)));
    let Some(slot) = tip else { return at_head };
    let mut stack = vec![graph.commits[slot as usize].tree];
    let mut trees = BTreeSet::new();
    while let Some(tree) = stack.pop() {
        if !trees.insert(tree) {
            continue;
        }
        for item in graph.items(tree).unwrap_or(&[]) {
            match item.kind {
                EntryKind::Tree if item.obj != NONE => stack.push(item.obj),
                EntryKind::Blob if item.obj != NONE => at_head[item.obj as usize] = true,
                _ => {}
            }
        }
    }
    at_head
}

fn scan(
    bytes: &[u8],
    path_prefix: &str,
    engine: &mut Engine,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), Stop> {
    let header = bundle::parse(bytes)?;
    let mut pack = Pack::index(&bytes[header.pack_offset..], limits)?;
    let unresolved = pack.resolve()?;
    let partial = !header.prerequisites.is_empty();
    if unresolved > 0 && !partial {
        return Err(HistoryProblem::UnresolvedDeltas { count: unresolved }.into());
    }
    let n = pack.len();
    let names = Names(pack.names());
    let graph = read_graph(&mut pack, &names)?;
    let order = topological_order(&graph);
    let (origin, origins, missing) = first_appearances(&graph, &order, n);
    let at_head = head_blobs(&graph, &header.refs, &names, n);
    let mut rank = vec![0u32; graph.commits.len()];
    for (i, &slot) in order.iter().enumerate() {
        rank[slot as usize] = i as u32;
    }

    // Scan each blob that appears in a commit, once, at its first path.
    let needed: Vec<bool> = origin.iter().map(|o| *o != NONE).collect();
    let multiline = incremental::MultilineKeywords::new(engine.policy());
    let mut scan = BlobScan {
        engine,
        limits,
        scratch: Report::default(),
        multiline,
        path: Vec::new(),
        best: BTreeMap::new(),
        at_head_secrets: BTreeSet::new(),
        blobs_scanned: 0,
        blobs_scanned_in_part: 0,
        dropped: 0,
        excluded: 0,
    };
    pack.for_each(|k| k == BLOB, &needed, &mut |reached| {
        let (slot, path) = &origins[origin[reached.idx as usize] as usize];
        let display = alloc::format!("{path_prefix}{path}");
        let head = at_head[reached.idx as usize];
        scan.blob(reached, display, rank[*slot as usize], *slot, head)
    })?;
    let BlobScan {
        scratch,
        best,
        at_head_secrets,
        blobs_scanned,
        blobs_scanned_in_part,
        dropped,
        excluded,
        ..
    } = scan;
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
            author: c.author.clone(),
            date: objects::rfc3339(c.author_time, c.author_offset),
            subject: c.subject.clone(),
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
