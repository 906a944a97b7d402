//! A git packfile held in memory: its objects indexed in one pass (git's `index-pack`, done in
//! the VM because the host never parses an artifact), delta chains resolved from each base
//! down, with bounded depth and memory, and every object named by its SHA-1.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_IGNORE_ADLER32, TINFL_FLAG_PARSE_ZLIB_HEADER, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use sha1::{Digest, Sha1};

use super::{delta, Stop};
use crate::error::HistoryProblem;
use crate::parallel::{each_worker, Workers};
use crate::Limits;

/// A SHA-1 object name.
pub(super) type Oid = [u8; 20];

/// Object types, as a pack numbers them.
pub(super) const COMMIT: u8 = 1;
pub(super) const TREE: u8 = 2;
pub(super) const BLOB: u8 = 3;
pub(super) const TAG: u8 = 4;
const OFS_DELTA: u8 = 6;
const REF_DELTA: u8 = 7;

/// A pack with at least this many delta trees is resolved by every worker the scan may use;
/// a smaller one is not worth waking them.
const PARALLEL_MIN_ROOTS: usize = 16;

/// No entry (a delta's base not found, an object not in the pack).
pub(super) const NONE: u32 = u32::MAX;

/// One object of the pack, as its header says.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Where its header starts.
    offset: u64,
    /// Where its zlib stream starts.
    data: u64,
    /// Inflated size: of the object, or of a delta's instructions.
    size: u64,
    /// `COMMIT`..`TAG`, `OFS_DELTA` or `REF_DELTA`.
    kind: u8,
    /// An offset delta's base (an entry index); a reference delta's base name (an index into
    /// `ref_bases`); else [`NONE`].
    base: u32,
}

/// The name of an object's content of type `kind` (`blob 12\0...`).
pub(super) fn object_id(kind: u8, content: &[u8]) -> Oid {
    let mut h = Sha1::new();
    let name: &[u8] = match kind {
        COMMIT => b"commit",
        TREE => b"tree",
        BLOB => b"blob",
        _ => b"tag",
    };
    h.update(name);
    h.update(b" ");
    let mut digits = [0u8; 20];
    let mut n = content.len();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    h.update(&digits[i..]);
    h.update(b"\0");
    h.update(content);
    h.finalize().into()
}

/// Told of each object a delta walk reaches (with the names so far, when the walk names what
/// it rebuilds); fills the last argument with the entries to rebuild from it.
type ReachFn<'f> = dyn FnMut(Option<&Naming>, Reached<'_>, &mut Vec<u32>) -> Result<(), Stop> + 'f;

/// What naming the pack's objects finds out, per entry.
#[derive(Clone, Default)]
pub(super) struct Naming {
    /// Each entry's object name; meaningful once `kinds` says it is resolved.
    oids: Vec<Oid>,
    /// Each entry's object type once known (a delta's is its chain's base's); 0 until then.
    kinds: Vec<u8>,
    /// Each delta's resolved base (an entry index), [`NONE`] for the rest.
    parents: Vec<u32>,
}

/// An object a delta walk reached: its entry, type and content, and for a delta the object it
/// was rebuilt from and the delta's instructions.
pub(super) struct Reached<'a> {
    pub idx: u32,
    pub kind: u8,
    pub content: &'a [u8],
    pub from: Option<Rebuilt<'a>>,
}

/// What a delta's result was rebuilt from.
pub(super) struct Rebuilt<'a> {
    /// The base's entry and content.
    pub base: u32,
    pub base_content: &'a [u8],
    /// The delta's instructions (see [`super::delta::pieces`]).
    pub delta: &'a [u8],
}

/// Told of each object wanted (`entry, type, content`).
pub(super) type VisitFn<'f> = dyn FnMut(Reached<'_>) -> Result<(), Stop> + 'f;

/// A zlib inflater's state, one per walker.
#[derive(Default)]
struct Inflater(Box<DecompressorOxide>);

/// An indexed pack.
pub(super) struct Pack<'a> {
    /// The pack, from `PACK` to the end of its trailer.
    bytes: &'a [u8],
    entries: Vec<Entry>,
    naming: Naming,
    /// The base names of reference deltas.
    ref_bases: Vec<Oid>,
    /// Names to entries, sorted by name (built once every name is known).
    by_oid: Vec<(Oid, u32)>,
    /// Bytes inflated and rebuilt so far, by every worker.
    inflated: AtomicU64,
    limits: &'a Limits,
}

impl<'a> Pack<'a> {
    /// Indexes `bytes` (a whole pack): checks the trailer's SHA-1, reads every object's
    /// header and inflates it (to find where the next begins, and to name each whole object).
    pub(super) fn index(bytes: &'a [u8], limits: &'a Limits) -> Result<Self, HistoryProblem> {
        if bytes.len() < 32 || &bytes[..4] != b"PACK" {
            return Err(HistoryProblem::BadPack { offset: 0, reason: "it does not start with `PACK`" });
        }
        let version = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if version != 2 && version != 3 {
            return Err(HistoryProblem::BadPack { offset: 4, reason: "unknown pack version" });
        }
        let count = u64::from(u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]));
        if count > limits.max_git_objects {
            return Err(HistoryProblem::TooManyObjects { count, limit: limits.max_git_objects });
        }
        let body_end = bytes.len() - 20;
        // A fuzzer cannot make a SHA-1 match: its builds (`--cfg fuzzing`) read on without it.
        let sum: Oid = Sha1::digest(&bytes[..body_end]).into();
        if sum[..] != bytes[body_end..] && !cfg!(fuzzing) {
            return Err(HistoryProblem::PackChecksum);
        }
        let n = count as usize;
        let mut pack = Pack {
            bytes,
            entries: Vec::new(),
            naming: Naming::default(),
            ref_bases: Vec::new(),
            by_oid: Vec::new(),
            inflated: AtomicU64::new(0),
            limits,
        };
        let too_many = |_| HistoryProblem::TooManyObjects { count, limit: limits.max_git_objects };
        pack.entries.try_reserve_exact(n).map_err(too_many)?;
        pack.naming.oids.try_reserve_exact(n).map_err(too_many)?;
        pack.naming.kinds.try_reserve_exact(n).map_err(too_many)?;
        let mut scratch = Vec::new();
        let mut inflater = Inflater::default();
        let mut pos = 12usize;
        for _ in 0..n {
            let entry = pack.header(&mut pos, body_end)?;
            let consumed = pack.inflate(&mut inflater, &entry, &mut scratch)?;
            pos = entry.data as usize + consumed;
            let (oid, kind) =
                if entry.kind <= TAG { (object_id(entry.kind, &scratch), entry.kind) } else { ([0; 20], 0) };
            pack.entries.push(entry);
            pack.naming.oids.push(oid);
            pack.naming.kinds.push(kind);
        }
        if pos != body_end {
            return Err(HistoryProblem::BadPack {
                offset: pos as u64,
                reason: "bytes follow the last object it announces",
            });
        }
        Ok(pack)
    }

    /// Parses the object header at `*pos` (moving past it and a delta's base).
    fn header(&mut self, pos: &mut usize, end: usize) -> Result<Entry, HistoryProblem> {
        let offset = *pos as u64;
        let truncated = HistoryProblem::Truncated { offset };
        let bad = |reason| HistoryProblem::BadPack { offset, reason };
        let mut byte = *self.bytes[..end].get(*pos).ok_or(truncated.clone())?;
        *pos += 1;
        let kind = (byte >> 4) & 7;
        let mut size = u64::from(byte & 15);
        let mut shift = 4u32;
        while byte & 0x80 != 0 {
            byte = *self.bytes[..end].get(*pos).ok_or(truncated.clone())?;
            *pos += 1;
            if shift > 60 {
                return Err(bad("an object size field is too long"));
            }
            size |= u64::from(byte & 0x7f) << shift;
            shift += 7;
        }
        if size > self.limits.max_git_object {
            return Err(HistoryProblem::ObjectTooLarge { offset, size, limit: self.limits.max_git_object });
        }
        let base = match kind {
            COMMIT | TREE | BLOB | TAG => NONE,
            OFS_DELTA => {
                let mut byte = *self.bytes[..end].get(*pos).ok_or(truncated.clone())?;
                *pos += 1;
                let mut back = u64::from(byte & 0x7f);
                while byte & 0x80 != 0 {
                    byte = *self.bytes[..end].get(*pos).ok_or(truncated.clone())?;
                    *pos += 1;
                    if back >> 56 != 0 {
                        return Err(HistoryProblem::BaseOutOfRange { offset });
                    }
                    back = ((back + 1) << 7) | u64::from(byte & 0x7f);
                }
                let base_offset = offset.checked_sub(back).filter(|_| back > 0);
                let base = base_offset
                    .and_then(|b| self.entries.binary_search_by_key(&b, |e| e.offset).ok())
                    .ok_or(HistoryProblem::BaseOutOfRange { offset })?;
                base as u32
            }
            REF_DELTA => {
                let name = self.bytes[..end].get(*pos..*pos + 20).ok_or(truncated)?;
                *pos += 20;
                let mut oid = [0u8; 20];
                oid.copy_from_slice(name);
                self.ref_bases.push(oid);
                (self.ref_bases.len() - 1) as u32
            }
            _ => return Err(bad("an object has an unknown type")),
        };
        Ok(Entry { offset, data: *pos as u64, size, kind, base })
    }

    /// Counts `bytes` more inflated or rebuilt, against the limit on their total.
    fn count_inflated(&self, bytes: u64) -> Result<(), HistoryProblem> {
        let total = self.inflated.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
        if total > self.limits.max_history_inflated {
            return Err(HistoryProblem::InflatedTotal { limit: self.limits.max_history_inflated });
        }
        Ok(())
    }

    /// Inflates `entry`'s zlib stream into `out` (exactly its declared size) with `inflater`;
    /// returns the compressed bytes it took.
    fn inflate(
        &self,
        inflater: &mut Inflater,
        entry: &Entry,
        out: &mut Vec<u8>,
    ) -> Result<usize, HistoryProblem> {
        let offset = entry.offset;
        self.count_inflated(entry.size)?;
        let size = entry.size as usize;
        out.clear();
        // One byte more than declared: a stream that produces more is caught, not cut.
        out.try_reserve_exact(size + 1).map_err(|_| HistoryProblem::ObjectTooLarge {
            offset,
            size: entry.size,
            limit: self.limits.max_git_object,
        })?;
        out.resize(size + 1, 0);
        inflater.0.init();
        let input = &self.bytes[entry.data as usize..self.bytes.len() - 20];
        let flags = TINFL_FLAG_PARSE_ZLIB_HEADER
            | TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
            | TINFL_FLAG_IGNORE_ADLER32;
        let (status, consumed, written) = decompress(&mut inflater.0, input, out, 0, flags);
        out.truncate(written.min(size));
        match status {
            TINFLStatus::Done if written == size => Ok(consumed),
            TINFLStatus::Done => Err(HistoryProblem::BadPack {
                offset,
                reason: "an object inflates to less than its declared size",
            }),
            TINFLStatus::HasMoreOutput => Err(HistoryProblem::BadPack {
                offset,
                reason: "an object inflates to more than its declared size",
            }),
            TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
                Err(HistoryProblem::Truncated { offset })
            }
            _ => Err(HistoryProblem::BadPack { offset, reason: "an object's zlib stream is corrupt" }),
        }
    }

    /// Objects in the pack.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Resolves every delta whose chain reaches a base in the pack, naming its result; then
    /// builds the name index. Returns the number of deltas left unresolved (their base is not
    /// in the pack: a thin pack's prerequisite, or damage).
    pub(super) fn resolve(&mut self, workers: &dyn Workers) -> Result<u64, Stop> {
        let n = self.len();
        let mut naming = core::mem::take(&mut self.naming);
        naming.parents = vec![NONE; n];
        // Offset-delta children of each entry (CSR), and reference deltas by base name.
        let mut ofs_children: Vec<(u32, u32)> = Vec::new();
        let mut ref_children: Vec<(Oid, u32)> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            match e.kind {
                OFS_DELTA => ofs_children.push((e.base, i as u32)),
                REF_DELTA => ref_children.push((self.ref_bases[e.base as usize], i as u32)),
                _ => {}
            }
        }
        ofs_children.sort_unstable();
        ref_children.sort_unstable();
        let children_of = |naming: &Naming, idx: u32, out: &mut Vec<u32>| {
            out.clear();
            let start = ofs_children.partition_point(|c| c.0 < idx);
            out.extend(ofs_children[start..].iter().take_while(|c| c.0 == idx).map(|c| c.1));
            let oid = naming.oids[idx as usize];
            let start = ref_children.partition_point(|c| c.0 < oid);
            out.extend(ref_children[start..].iter().take_while(|c| c.0 == oid).map(|c| c.1));
            out.retain(|c| naming.kinds[*c as usize] == 0);
        };
        // One walk from each whole object that has deltas: a reference delta whose base is
        // itself a delta is reached once that base is named, within the same walk.
        let mut children = Vec::new();
        let roots: Vec<u32> = (0..n as u32)
            .filter(|&root| {
                self.entries[root as usize].kind <= TAG && {
                    children_of(&naming, root, &mut children);
                    !children.is_empty()
                }
            })
            .collect();
        let walk = |inflater: &mut Inflater, naming: &mut Naming, root: u32, children: &mut Vec<u32>| {
            // An earlier walk may have named them all (a base name the pack holds twice).
            children_of(naming, root, children);
            if children.is_empty() {
                return Ok(());
            }
            self.descend(inflater, root, Some(naming), &mut |naming, reached, out: &mut Vec<u32>| {
                if let Some(naming) = naming {
                    children_of(naming, reached.idx, out);
                }
                Ok(())
            })
        };
        if workers.count() == 1 || roots.len() < PARALLEL_MIN_ROOTS {
            let mut inflater = Inflater::default();
            for &root in &roots {
                walk(&mut inflater, &mut naming, root, &mut children)?;
            }
        } else {
            // Each worker names into its own copy; the copies are joined below.
            let next = AtomicUsize::new(0);
            let failed = AtomicBool::new(false);
            let mut runs: Vec<(Naming, Result<(), Stop>)> =
                (0..workers.count()).map(|_| (naming.clone(), Ok(()))).collect();
            each_worker(workers, &mut runs, |_, (local, result)| {
                let (mut inflater, mut children) = (Inflater::default(), Vec::new());
                while !failed.load(Ordering::Relaxed) {
                    let Some(&root) = roots.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    if let Err(stop) = walk(&mut inflater, local, root, &mut children) {
                        failed.store(true, Ordering::Relaxed);
                        *result = Err(stop);
                    }
                }
            });
            for (local, result) in runs {
                result?;
                // An object two walks named (its base name twice in the pack): the first
                // worker's naming stands.
                for i in 0..n {
                    if naming.kinds[i] == 0 && local.kinds[i] != 0 {
                        naming.kinds[i] = local.kinds[i];
                        naming.oids[i] = local.oids[i];
                        naming.parents[i] = local.parents[i];
                    }
                }
            }
        }
        self.naming = naming;
        let unresolved = self.naming.kinds.iter().filter(|k| **k == 0).count() as u64;
        let mut by_oid: Vec<(Oid, u32)> = Vec::new();
        by_oid.try_reserve_exact(n).map_err(|_| HistoryProblem::TooManyObjects {
            count: n as u64,
            limit: self.limits.max_git_objects,
        })?;
        for i in 0..n {
            if self.naming.kinds[i] != 0 {
                by_oid.push((self.naming.oids[i], i as u32));
            }
        }
        // A name twice in the pack: the first copy stands for it.
        by_oid.sort_unstable();
        by_oid.dedup_by(|b, a| a.0 == b.0);
        self.by_oid = by_oid;
        Ok(unresolved)
    }

    /// Walks the delta tree under `root` depth first with `inflater`: inflates `root`, then
    /// rebuilds each child from its parent. `visit` is told of each object reached (its content
    /// whole) and fills `out` with its children to rebuild. With `naming`, each rebuilt object
    /// is named there and its type and parent recorded.
    fn descend(
        &self,
        inflater: &mut Inflater,
        root: u32,
        mut naming: Option<&mut Naming>,
        visit: &mut ReachFn<'_>,
    ) -> Result<(), Stop> {
        struct Frame {
            idx: u32,
            content: Vec<u8>,
            children: Vec<u32>,
            next: usize,
        }
        let root_entry = self.entries[root as usize];
        let kind = root_entry.kind;
        let mut content = Vec::new();
        self.inflate(inflater, &root_entry, &mut content)?;
        let mut children = Vec::new();
        visit(naming.as_deref(), Reached { idx: root, kind, content: &content, from: None }, &mut children)?;
        let mut held = content.len() as u64;
        let mut stack = vec![Frame { idx: root, content, children, next: 0 }];
        let mut delta_buf = Vec::new();
        while let Some(top) = stack.last_mut() {
            let Some(&child) = top.children.get(top.next) else {
                held -= top.content.len() as u64;
                stack.pop();
                continue;
            };
            top.next += 1;
            let entry = self.entries[child as usize];
            if naming.as_ref().is_some_and(|n| n.kinds[child as usize] != 0) {
                continue; // reached twice (a duplicated base name): already rebuilt
            }
            if stack.len() > self.limits.max_delta_depth as usize {
                return Err(HistoryProblem::DeltaTooDeep {
                    offset: entry.offset,
                    limit: self.limits.max_delta_depth,
                }
                .into());
            }
            self.inflate(inflater, &entry, &mut delta_buf)?;
            let top = stack.last().expect("the stack holds the parent");
            if let Some(size) = delta::result_size(&delta_buf) {
                if size > self.limits.max_git_object {
                    let limit = self.limits.max_git_object;
                    return Err(HistoryProblem::ObjectTooLarge { offset: entry.offset, size, limit }.into());
                }
                self.count_inflated(size)?;
                if held + size > self.limits.max_delta_chain_bytes {
                    return Err(HistoryProblem::DeltaChainTooLarge {
                        offset: entry.offset,
                        limit: self.limits.max_delta_chain_bytes,
                    }
                    .into());
                }
            }
            let mut result = Vec::new();
            delta::apply(&top.content, &delta_buf, self.limits.max_git_object, entry.offset, &mut result)?;
            let parent = top.idx;
            if let Some(naming) = naming.as_deref_mut() {
                naming.oids[child as usize] = object_id(kind, &result);
                naming.kinds[child as usize] = kind;
                naming.parents[child as usize] = parent;
            }
            let mut children = Vec::new();
            let from = Rebuilt { base: parent, base_content: &top.content, delta: &delta_buf };
            let reached = Reached { idx: child, kind, content: &result, from: Some(from) };
            visit(naming.as_deref(), reached, &mut children)?;
            held += result.len() as u64;
            stack.push(Frame { idx: child, content: result, children, next: 0 });
        }
        Ok(())
    }

    /// Calls `visit(state, reached)` for every resolved object of a type `want` accepts and
    /// for which `needed` says yes, each once, rebuilding deltas from their bases (and only the
    /// chains that lead to a needed object). The delta trees are shared out whole over
    /// `workers`, each with its own state in `states` (one per worker), so a worker is told of
    /// each object of a tree it walks in depth-first order, after its base. The first error
    /// stops every worker before its next tree.
    pub(super) fn for_each_parallel<S: Send>(
        &self,
        want: impl Fn(u8) -> bool,
        needed: &[bool],
        workers: &dyn Workers,
        states: &mut [S],
        visit: impl Fn(&mut S, Reached<'_>) -> Result<(), Stop> + Sync,
    ) -> Result<(), Stop> {
        let (roots, kids) = self.walks(want, needed);
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let mut runs: Vec<(&mut S, Result<(), Stop>)> = states.iter_mut().map(|s| (s, Ok(()))).collect();
        each_worker(workers, &mut runs, |_, (state, result)| {
            let mut inflater = Inflater::default();
            while !failed.load(Ordering::Relaxed) {
                let Some(&root) = roots.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                let walked = self.walk(&mut inflater, root, &kids, needed, &mut |r| visit(state, r));
                if let Err(stop) = walked {
                    failed.store(true, Ordering::Relaxed);
                    *result = Err(stop);
                }
            }
        });
        runs.into_iter().try_for_each(|(_, result)| result)
    }

    /// The roots of the delta trees that lead to a needed object of a type `want` accepts,
    /// and the parent-to-child links within them, sorted.
    fn walks(&self, want: impl Fn(u8) -> bool, needed: &[bool]) -> (Vec<u32>, Vec<(u32, u32)>) {
        let n = self.len();
        let Naming { kinds, parents, .. } = &self.naming;
        // Which entries lead to a needed one (themselves included).
        let mut leads = vec![false; n];
        for (i, &need) in needed.iter().enumerate().take(n) {
            if !need || kinds[i] == 0 || !want(kinds[i]) {
                continue;
            }
            let mut j = i as u32;
            while j != NONE && !leads[j as usize] {
                leads[j as usize] = true;
                j = parents[j as usize];
            }
        }
        let mut kids: Vec<(u32, u32)> = (0..n as u32)
            .filter(|&i| leads[i as usize] && parents[i as usize] != NONE)
            .map(|i| (parents[i as usize], i))
            .collect();
        kids.sort_unstable();
        let roots = (0..n as u32).filter(|&i| leads[i as usize] && parents[i as usize] == NONE).collect();
        (roots, kids)
    }

    /// Walks the delta tree under `root` along `kids`, telling `visit` of each needed object.
    fn walk(
        &self,
        inflater: &mut Inflater,
        root: u32,
        kids: &[(u32, u32)],
        needed: &[bool],
        visit: &mut VisitFn<'_>,
    ) -> Result<(), Stop> {
        self.descend(inflater, root, None, &mut |_, reached, out| {
            out.clear();
            let idx = reached.idx;
            let start = kids.partition_point(|c| c.0 < idx);
            out.extend(kids[start..].iter().take_while(|c| c.0 == idx).map(|c| c.1));
            if needed[idx as usize] {
                visit(reached)?;
            }
            Ok(())
        })
    }

    /// Object names to entries, sorted by name (once [`Pack::resolve`] has named them).
    pub(super) fn names(&mut self) -> Vec<(Oid, u32)> {
        core::mem::take(&mut self.by_oid)
    }

    /// An entry's object name (meaningful when its type is known).
    pub(super) fn oid(&self, idx: u32) -> &Oid {
        &self.naming.oids[idx as usize]
    }
}
