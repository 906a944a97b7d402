//! A git packfile held in memory: its objects indexed in one pass (git's `index-pack`, done in
//! the VM because the host never parses an artifact), delta chains resolved from each base
//! down, with bounded depth and memory, and every object named by its SHA-1.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_IGNORE_ADLER32, TINFL_FLAG_PARSE_ZLIB_HEADER, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use sha1::{Digest, Sha1};

use super::{delta, Stop};
use crate::error::HistoryProblem;
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

/// Told of each object a delta walk reaches (`pack, entry, type, content`); fills the last
/// argument with the entries to rebuild from it.
type ReachFn<'f> = dyn FnMut(&Pack<'_>, Reached<'_>, &mut Vec<u32>) -> Result<(), Stop> + 'f;

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

/// An indexed pack.
pub(super) struct Pack<'a> {
    /// The pack, from `PACK` to the end of its trailer.
    bytes: &'a [u8],
    entries: Vec<Entry>,
    /// Each entry's object name; meaningful once `kinds` says it is resolved.
    oids: Vec<Oid>,
    /// Each entry's object type once known (a delta's is its chain's base's); 0 until then.
    kinds: Vec<u8>,
    /// The base names of reference deltas.
    ref_bases: Vec<Oid>,
    /// Each delta's resolved base (an entry index), [`NONE`] for the rest.
    parents: Vec<u32>,
    /// Names to entries, sorted by name (built once every name is known).
    by_oid: Vec<(Oid, u32)>,
    inflater: Box<DecompressorOxide>,
    /// Bytes inflated and rebuilt so far.
    inflated: u64,
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
            oids: Vec::new(),
            kinds: Vec::new(),
            ref_bases: Vec::new(),
            parents: Vec::new(),
            by_oid: Vec::new(),
            inflater: Box::default(),
            inflated: 0,
            limits,
        };
        let too_many = |_| HistoryProblem::TooManyObjects { count, limit: limits.max_git_objects };
        pack.entries.try_reserve_exact(n).map_err(too_many)?;
        pack.oids.try_reserve_exact(n).map_err(too_many)?;
        pack.kinds.try_reserve_exact(n).map_err(too_many)?;
        let mut scratch = Vec::new();
        let mut pos = 12usize;
        for _ in 0..n {
            let entry = pack.header(&mut pos, body_end)?;
            let consumed = pack.inflate(&entry, &mut scratch)?;
            pos = entry.data as usize + consumed;
            let (oid, kind) =
                if entry.kind <= TAG { (object_id(entry.kind, &scratch), entry.kind) } else { ([0; 20], 0) };
            pack.entries.push(entry);
            pack.oids.push(oid);
            pack.kinds.push(kind);
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

    /// Inflates `entry`'s zlib stream into `out` (exactly its declared size); returns the
    /// compressed bytes it took.
    fn inflate(&mut self, entry: &Entry, out: &mut Vec<u8>) -> Result<usize, HistoryProblem> {
        let offset = entry.offset;
        self.inflated += entry.size;
        if self.inflated > self.limits.max_history_inflated {
            return Err(HistoryProblem::InflatedTotal { limit: self.limits.max_history_inflated });
        }
        let size = entry.size as usize;
        out.clear();
        // One byte more than declared: a stream that produces more is caught, not cut.
        out.try_reserve_exact(size + 1).map_err(|_| HistoryProblem::ObjectTooLarge {
            offset,
            size: entry.size,
            limit: self.limits.max_git_object,
        })?;
        out.resize(size + 1, 0);
        self.inflater.init();
        let input = &self.bytes[entry.data as usize..self.bytes.len() - 20];
        let flags = TINFL_FLAG_PARSE_ZLIB_HEADER
            | TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
            | TINFL_FLAG_IGNORE_ADLER32;
        let (status, consumed, written) = decompress(&mut self.inflater, input, out, 0, flags);
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
    pub(super) fn resolve(&mut self) -> Result<u64, Stop> {
        let n = self.len();
        self.parents = vec![NONE; n];
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
        let children_of = |pack: &Pack<'_>, idx: u32, out: &mut Vec<u32>| {
            out.clear();
            let start = ofs_children.partition_point(|c| c.0 < idx);
            out.extend(ofs_children[start..].iter().take_while(|c| c.0 == idx).map(|c| c.1));
            let oid = pack.oids[idx as usize];
            let start = ref_children.partition_point(|c| c.0 < oid);
            out.extend(ref_children[start..].iter().take_while(|c| c.0 == oid).map(|c| c.1));
            out.retain(|c| pack.kinds[*c as usize] == 0);
        };
        // One walk from each whole object: a reference delta whose base is itself a delta is
        // reached once that base is named, within the same walk.
        let mut children = Vec::new();
        for root in 0..n as u32 {
            if self.entries[root as usize].kind > TAG {
                continue;
            }
            children_of(self, root, &mut children);
            if children.is_empty() {
                continue;
            }
            self.descend(root, true, &mut |pack: &Pack<'_>, reached, out: &mut Vec<u32>| {
                children_of(pack, reached.idx, out);
                Ok(())
            })?;
        }
        let unresolved = self.kinds.iter().filter(|k| **k == 0).count() as u64;
        let mut by_oid: Vec<(Oid, u32)> = Vec::new();
        by_oid.try_reserve_exact(n).map_err(|_| HistoryProblem::TooManyObjects {
            count: n as u64,
            limit: self.limits.max_git_objects,
        })?;
        for i in 0..n {
            if self.kinds[i] != 0 {
                by_oid.push((self.oids[i], i as u32));
            }
        }
        // A name twice in the pack: the first copy stands for it.
        by_oid.sort_unstable();
        by_oid.dedup_by(|b, a| a.0 == b.0);
        self.by_oid = by_oid;
        Ok(unresolved)
    }

    /// Walks the delta tree under `root` depth first: inflates `root`, then rebuilds each
    /// child from its parent. `children(pack, idx, kind, content, out)` is told of each object
    /// reached (its content whole) and fills `out` with its children to rebuild. With `name`,
    /// each rebuilt object is named and its type and parent recorded.
    fn descend(&mut self, root: u32, name: bool, visit: &mut ReachFn<'_>) -> Result<(), Stop> {
        struct Frame {
            idx: u32,
            content: Vec<u8>,
            children: Vec<u32>,
            next: usize,
        }
        let root_entry = self.entries[root as usize];
        let kind = root_entry.kind;
        let mut content = Vec::new();
        self.inflate(&root_entry, &mut content)?;
        let mut children = Vec::new();
        visit(self, Reached { idx: root, kind, content: &content, from: None }, &mut children)?;
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
            if name && self.kinds[child as usize] != 0 {
                continue; // reached twice (a duplicated base name): already rebuilt
            }
            if stack.len() > self.limits.max_delta_depth as usize {
                return Err(HistoryProblem::DeltaTooDeep {
                    offset: entry.offset,
                    limit: self.limits.max_delta_depth,
                }
                .into());
            }
            self.inflate(&entry, &mut delta_buf)?;
            let top = stack.last().expect("the stack holds the parent");
            if let Some(size) = delta::result_size(&delta_buf) {
                if size > self.limits.max_git_object {
                    let limit = self.limits.max_git_object;
                    return Err(HistoryProblem::ObjectTooLarge { offset: entry.offset, size, limit }.into());
                }
                self.inflated += size;
                if self.inflated > self.limits.max_history_inflated {
                    return Err(
                        HistoryProblem::InflatedTotal { limit: self.limits.max_history_inflated }.into()
                    );
                }
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
            if name {
                self.oids[child as usize] = object_id(kind, &result);
                self.kinds[child as usize] = kind;
                self.parents[child as usize] = parent;
            }
            let mut children = Vec::new();
            let from = Rebuilt { base: parent, base_content: &top.content, delta: &delta_buf };
            visit(self, Reached { idx: child, kind, content: &result, from: Some(from) }, &mut children)?;
            held += result.len() as u64;
            stack.push(Frame { idx: child, content: result, children, next: 0 });
        }
        Ok(())
    }

    /// Calls `visit(idx, kind, content)` for every resolved object of a type `want` accepts
    /// and for which `needed` says yes, each once, rebuilding deltas from their bases (and
    /// only the chains that lead to a needed object).
    pub(super) fn for_each(
        &mut self,
        want: impl Fn(u8) -> bool,
        needed: &[bool],
        visit: &mut VisitFn<'_>,
    ) -> Result<(), Stop> {
        let n = self.len();
        // Which entries lead to a needed one (themselves included).
        let mut leads = vec![false; n];
        for (i, &need) in needed.iter().enumerate().take(n) {
            if !need || self.kinds[i] == 0 || !want(self.kinds[i]) {
                continue;
            }
            let mut j = i as u32;
            while j != NONE && !leads[j as usize] {
                leads[j as usize] = true;
                j = self.parents[j as usize];
            }
        }
        let mut kids: Vec<(u32, u32)> = (0..n as u32)
            .filter(|&i| leads[i as usize] && self.parents[i as usize] != NONE)
            .map(|i| (self.parents[i as usize], i))
            .collect();
        kids.sort_unstable();
        for root in 0..n as u32 {
            if !leads[root as usize] || self.parents[root as usize] != NONE {
                continue;
            }
            self.descend(root, false, &mut |_pack, reached, out| {
                out.clear();
                let idx = reached.idx;
                let start = kids.partition_point(|c| c.0 < idx);
                out.extend(kids[start..].iter().take_while(|c| c.0 == idx).map(|c| c.1));
                if needed[idx as usize] {
                    visit(reached)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Object names to entries, sorted by name (once [`Pack::resolve`] has named them).
    pub(super) fn names(&mut self) -> Vec<(Oid, u32)> {
        core::mem::take(&mut self.by_oid)
    }

    /// An entry's object name (meaningful when its type is known).
    pub(super) fn oid(&self, idx: u32) -> &Oid {
        &self.oids[idx as usize]
    }
}
