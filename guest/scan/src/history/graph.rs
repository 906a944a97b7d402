//! The commit graph of a pack: commits, trees and tags read into compact form, commits put
//! in topological order, and where each file version (blob) first appears.

use alloc::collections::{BTreeMap, BTreeSet, BinaryHeap};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

use super::objects::{self, EntryKind};
use super::pack::{Oid, Pack, BLOB, COMMIT, NONE, TAG, TREE};
use super::Stop;
use crate::error::HistoryProblem;
use crate::finding::to_hex;
use crate::parallel::Workers;

/// A commit, as the walk needs it.
pub(super) struct CommitNode {
    /// Its pack entry.
    pub entry: u32,
    /// Its root tree's pack entry ([`NONE`] if not in the pack).
    pub tree: u32,
    /// Its parents' pack entries (those in the pack).
    pub parents: Vec<u32>,
    /// What the commit says (author, committer, dates, subject).
    pub info: objects::CommitObject,
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
pub(super) struct Graph {
    pub commits: Vec<CommitNode>,
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
    /// Whether a commit names a parent the pack does not hold: a shallow clone's boundary (or a
    /// bundle cut some other way), before which the history was not scanned.
    pub(super) fn cut_off(&self) -> bool {
        self.commits.iter().any(|c| c.parents.len() < c.info.parents.len())
    }

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

/// What one delta tree of the pack holds of the graph (read by one worker), in the order
/// the walk reached it; the parts are joined in the order of their roots.
struct Part {
    /// The tree's root entry.
    root: u32,
    commits: Vec<CommitNode>,
    /// (entry, start, len) of each tree object's items in `tree_items`.
    trees: Vec<(u32, u32, u32)>,
    tree_items: Vec<TreeItem>,
    names: Vec<u8>,
    /// (tag entry, the entry it points to).
    tags: Vec<(u32, u32)>,
}

impl Part {
    /// Reads one object into the part.
    fn read(&mut self, idx: u32, kind: u8, content: &[u8], names: &Names) -> Result<(), HistoryProblem> {
        let bad = |reason| HistoryProblem::BadObject { oid: String::new(), reason };
        match kind {
            COMMIT => {
                let c = objects::parse_commit(content)
                    .ok_or_else(|| bad("a commit without a valid tree line"))?;
                self.commits.push(CommitNode {
                    entry: idx,
                    tree: names.find(&c.tree),
                    parents: c.parents.iter().map(|p| names.find(p)).filter(|p| *p != NONE).collect(),
                    info: c,
                });
            }
            TREE => {
                let start = self.tree_items.len();
                let ok = objects::parse_tree(content, |kind, name, oid| {
                    self.tree_items.push(TreeItem {
                        name: self.names.len() as u32,
                        name_len: name.len() as u32,
                        obj: names.find(oid),
                        kind,
                    });
                    self.names.extend_from_slice(name);
                });
                if !ok {
                    return Err(bad("a tree entry is cut short or names `.`, `..` or a path with `/`"));
                }
                if self.names.len() > u32::MAX as usize / 2 || self.tree_items.len() > u32::MAX as usize / 2 {
                    return Err(bad("the trees hold more entries than Cella indexes"));
                }
                self.trees.push((idx, start as u32, (self.tree_items.len() - start) as u32));
            }
            TAG => {
                if let Some(target) = objects::parse_tag_target(content) {
                    self.tags.push((idx, names.find(&target)));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads the commits, trees and tags of `pack`, spread over `workers` (each reads whole delta
/// trees); the graph is the same as one worker's, in the same order.
pub(super) fn read_graph(pack: &Pack<'_>, names: &Names, workers: &dyn Workers) -> Result<Graph, Stop> {
    let n = pack.len();
    let all = vec![true; n];
    let mut parts: Vec<Vec<Part>> = (0..workers.count()).map(|_| Vec::new()).collect();
    pack.for_each_parallel(
        |k| k != BLOB,
        &all,
        workers,
        &mut parts,
        |parts, reached| {
            if reached.from.is_none() || parts.is_empty() {
                let root = reached.idx;
                parts.push(Part {
                    root,
                    commits: Vec::new(),
                    trees: Vec::new(),
                    tree_items: Vec::new(),
                    names: Vec::new(),
                    tags: Vec::new(),
                });
            }
            let part = parts.last_mut().expect("a part was just started");
            part.read(reached.idx, reached.kind, reached.content, names).map_err(|problem| match problem {
                HistoryProblem::BadObject { reason, .. } => {
                    Stop::History(HistoryProblem::BadObject { oid: to_hex(pack.oid(reached.idx)), reason })
                }
                other => Stop::History(other),
            })
        },
    )?;
    // One worker walks the trees in the order of their roots: join the parts in that order.
    let mut parts: Vec<Part> = parts.into_iter().flatten().collect();
    parts.sort_unstable_by_key(|p| p.root);
    let mut graph = Graph {
        commits: Vec::new(),
        commit_of: vec![NONE; n],
        tree_of: vec![(NONE, 0); n],
        tree_items: Vec::new(),
        names: Vec::new(),
        tag_target: BTreeMap::new(),
    };
    for part in parts {
        for commit in part.commits {
            graph.commit_of[commit.entry as usize] = graph.commits.len() as u32;
            graph.commits.push(commit);
        }
        let (items_base, names_base) = (graph.tree_items.len() as u32, graph.names.len() as u32);
        for (entry, start, len) in part.trees {
            graph.tree_of[entry as usize] = (items_base + start, len);
        }
        graph
            .tree_items
            .extend(part.tree_items.into_iter().map(|i| TreeItem { name: i.name + names_base, ..i }));
        graph.names.extend_from_slice(&part.names);
        if graph.names.len() > u32::MAX as usize / 2 || graph.tree_items.len() > u32::MAX as usize / 2 {
            return Err(Stop::History(HistoryProblem::BadObject {
                oid: to_hex(pack.oid(part.root)),
                reason: "the trees hold more entries than Cella indexes",
            }));
        }
        graph.tag_target.extend(part.tags);
    }
    Ok(graph)
}

/// Object names to pack entries.
pub(super) struct Names(pub Vec<(Oid, u32)>);

impl Names {
    pub(super) fn find(&self, oid: &Oid) -> u32 {
        match self.0.binary_search_by(|(o, _)| o.cmp(oid)) {
            Ok(i) => self.0[i].1,
            Err(_) => NONE,
        }
    }
}

/// Commit slots, parents before children; among commits ready at once, the oldest (by
/// committer date) first.
pub(super) fn topological_order(graph: &Graph) -> Vec<u32> {
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
        .map(|s| Reverse((graph.commits[s as usize].info.commit_time, s)))
        .collect();
    let mut order = Vec::with_capacity(m);
    while let Some(Reverse((_, slot))) = ready.pop() {
        order.push(slot);
        let start = children.partition_point(|c| c.0 < slot);
        for &(_, child) in children[start..].iter().take_while(|c| c.0 == slot) {
            pending[child as usize] -= 1;
            if pending[child as usize] == 0 {
                ready.push(Reverse((graph.commits[child as usize].info.commit_time, child)));
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
pub(super) fn first_appearances(
    graph: &Graph,
    order: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<(u32, String)>, u64) {
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
pub(super) fn head_blobs(graph: &Graph, refs: &[(String, Oid)], names: &Names, n: usize) -> Vec<bool> {
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
