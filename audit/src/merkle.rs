//! RFC 6962 (and RFC 9162 section 2.1) Merkle trees over a chain's events.
//!
//! Leaf `i` (0-based) is event `seq = i + 1`; its leaf data is that event's 32-byte hash, so
//! the leaf hash is `SHA-256(0x00 || event_hash)` and an interior node is
//! `SHA-256(0x01 || left || right)`. Proofs are the RFC's audit paths and consistency proofs.

use ring::digest;

use crate::hash::Hash;

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    if data.len() == 32 {
        // The usual case (leaf data is an event hash): one buffer, one call.
        let mut buf = [0u8; 33];
        buf[1..].copy_from_slice(data);
        return crate::hash::sha256(&buf);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&[0]);
    ctx.update(data);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = 1;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    crate::hash::sha256(&buf)
}

fn finish(ctx: digest::Context) -> Hash {
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    crate::hash::sha256(&[])
}

/// Largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The perfect subtrees that make up a tree of `size` leaves, left to right: enough to extend
/// the tree leaf by leaf and to compute its root at any size, in `O(log n)` memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Roots of the perfect subtrees, largest (leftmost) first; one per set bit of `size`.
    peaks: Vec<Hash>,
}

impl CompactRange {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a range from its size and peaks; `None` if their number does not fit the size.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Option<Self> {
        (peaks.len() == size.count_ones() as usize).then_some(Self { size, peaks })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self.peaks.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            size >>= 1;
        }
        self.peaks.push(h);
        self.size += 1;
    }

    /// The RFC 6962 tree head of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(last) = iter.next() else { return empty_root() };
        iter.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

/// A whole tree kept level by level, for computing proofs at export time.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    /// `levels[0]` are the leaf hashes; `levels[l][j]` is the root of leaves
    /// `j * 2^l .. (j + 1) * 2^l`, present only for complete subtrees.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Builds the tree over `leaves` (leaf hashes).
    pub fn new(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let prev = levels.last().map(Vec::as_slice).unwrap_or_default();
            let next: Vec<Hash> = prev.chunks_exact(2).map(|p| node_hash(&p[0], &p[1])).collect();
            levels.push(next);
        }
        Self { levels }
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Root of leaves `a..b` as RFC 6962 defines it for that sub-list.
    fn range_root(&self, a: u64, b: u64) -> Hash {
        let n = b - a;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && a & (n - 1) == 0 {
            let level = n.trailing_zeros() as usize;
            return self.levels[level][(a >> level) as usize];
        }
        let k = split(n);
        node_hash(&self.range_root(a, a + k), &self.range_root(a + k, b))
    }

    /// The tree head of the first `size` leaves (`size <= self.size()`).
    pub fn root_at(&self, size: u64) -> Hash {
        self.range_root(0, size)
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 2.1.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Vec<Hash> {
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out);
        out
    }

    fn path(&self, m: u64, a: u64, b: u64, out: &mut Vec<Hash>) {
        let n = b - a;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, a, a + k, out);
            out.push(self.range_root(a + k, b));
        } else {
            self.path(m - k, a + k, b, out);
            out.push(self.range_root(a, a + k));
        }
    }

    /// The consistency proof from the tree of `old` leaves to the tree of `new` leaves
    /// (RFC 6962 2.1.2); empty when `old` is 0 or equals `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Vec<Hash> {
        let mut out = Vec::new();
        if old > 0 && old < new {
            self.subproof(old, 0, new, true, &mut out);
        }
        out
    }

    fn subproof(&self, m: u64, a: u64, b: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = b - a;
        if m == n {
            if !complete {
                out.push(self.range_root(a, b));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, a, a + k, complete, out);
            out.push(self.range_root(a + k, b));
        } else {
            self.subproof(m - k, a + k, b, false, out);
            out.push(self.range_root(a, a + k));
        }
    }
}

/// The leaf ranges `a..b` whose RFC 6962 roots make up the consistency proof from `old` to
/// `new` leaves, in proof order (the same recursion as [`MerkleTree::consistency_proof`], without
/// the tree). An export that streams its leaves uses this to know in advance which subtrees to
/// keep.
pub fn consistency_ranges(old: u64, new: u64) -> Vec<(u64, u64)> {
    fn sub(m: u64, a: u64, b: u64, complete: bool, out: &mut Vec<(u64, u64)>) {
        let n = b - a;
        if m == n {
            if !complete {
                out.push((a, b));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, a, a + k, complete, out);
            out.push((a + k, b));
        } else {
            sub(m - k, a + k, b, false, out);
            out.push((a, a + k));
        }
    }
    let mut out = Vec::new();
    if old > 0 && old < new {
        sub(old, 0, new, true, &mut out);
    }
    out
}

/// Computes the roots of chosen leaf ranges while the leaves stream past once, in
/// `O(log n + ranges)` memory: the leaves go into a compact range, and each perfect subtree that
/// one of the wanted ranges is made of is kept when the compact range completes it.
#[derive(Debug, Clone, Default)]
pub struct SubtreeCollector {
    size: u64,
    /// Perfect subtrees not yet merged, largest first: (level, root).
    stack: Vec<(u32, Hash)>,
    /// Wanted perfect subtrees (level, index) → their root once seen.
    wanted: std::collections::HashMap<(u32, u64), Option<Hash>>,
}

impl SubtreeCollector {
    /// A collector that will be able to answer [`SubtreeCollector::range_root`] for `ranges`.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut me = Self::default();
        for &(a, b) in ranges {
            me.want(a, b);
        }
        me
    }

    fn want(&mut self, a: u64, b: u64) {
        let n = b - a;
        if n == 0 {
            return;
        }
        if n.is_power_of_two() && a & (n - 1) == 0 {
            let level = n.trailing_zeros();
            self.wanted.insert((level, a >> level), None);
            return;
        }
        let k = split(n);
        self.want(a, a + k);
        self.want(a + k, b);
    }

    /// Number of wanted subtrees (what the collector keeps besides its `O(log n)` stack).
    pub fn kept(&self) -> usize {
        self.wanted.len()
    }

    /// Number of leaves pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The compact range of the leaves pushed so far.
    pub fn compact_range(&self) -> CompactRange {
        CompactRange { size: self.size, peaks: self.stack.iter().map(|(_, h)| *h).collect() }
    }

    fn completed(&mut self, level: u32, index: u64, hash: &Hash) {
        if let Some(slot) = self.wanted.get_mut(&(level, index)) {
            *slot = Some(*hash);
        }
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let index = self.size;
        self.completed(0, index, &leaf);
        let mut h = leaf;
        let mut level = 0;
        let mut size = self.size;
        while size & 1 == 1 {
            let (_, left) = self.stack.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            level += 1;
            size >>= 1;
            self.completed(level, index >> level, &h);
        }
        self.stack.push((level, h));
        self.size += 1;
    }

    /// The RFC 6962 root of leaves `a..b`, for a range given to [`SubtreeCollector::new`] whose
    /// leaves have all been pushed; `None` otherwise.
    pub fn range_root(&self, a: u64, b: u64) -> Option<Hash> {
        let n = b - a;
        if n == 0 {
            return Some(empty_root());
        }
        if n.is_power_of_two() && a & (n - 1) == 0 {
            let level = n.trailing_zeros();
            return self.wanted.get(&(level, a >> level)).copied().flatten();
        }
        let k = split(n);
        Some(node_hash(&self.range_root(a, a + k)?, &self.range_root(a + k, b)?))
    }
}

/// Checks an audit path (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks a consistency proof between two tree heads (RFC 9162 section 2.1.4.2).
pub fn verify_consistency(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else { return false };
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *old_root && sr == *new_root && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{sha256, to_hex};

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&sha256(&i.to_be_bytes()))).collect()
    }

    /// The RFC's recursive definition, written plainly, to check the fast paths against.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(
            to_hex(&CompactRange::new().root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn compact_range_and_tree_agree_with_the_rfc_definition() {
        let all = leaves(70);
        let tree = MerkleTree::new(all.clone());
        let mut range = CompactRange::new();
        for n in 1..=70u64 {
            range.push(all[n as usize - 1]);
            let want = reference_root(&all[..n as usize]);
            assert_eq!(range.root(), want, "compact range at size {n}");
            assert_eq!(tree.root_at(n), want, "tree at size {n}");
        }
    }

    #[test]
    fn inclusion_proofs_verify_for_every_leaf_and_size() {
        let all = leaves(33);
        let tree = MerkleTree::new(all.clone());
        for size in 1..=33 {
            let root = tree.root_at(size);
            for i in 0..size {
                let proof = tree.inclusion_proof(i, size);
                assert!(verify_inclusion(i, size, &all[i as usize], &proof, &root), "leaf {i} of {size}");
                assert!(!verify_inclusion(i, size, &all[(i as usize + 1) % 33], &proof, &root) || size == 1);
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_between_every_pair_of_sizes() {
        let tree = MerkleTree::new(leaves(40));
        for new in 1..=40 {
            for old in 1..=new {
                let proof = tree.consistency_proof(old, new);
                let (ro, rn) = (tree.root_at(old), tree.root_at(new));
                assert!(verify_consistency(old, new, &ro, &rn, &proof), "{old} -> {new}");
                if old < new {
                    let forged = sha256(b"forged");
                    assert!(!verify_consistency(old, new, &forged, &rn, &proof), "forged {old} -> {new}");
                }
            }
        }
    }

    #[test]
    fn compact_range_rebuilds_from_its_parts() {
        let all = leaves(13);
        let mut range = CompactRange::new();
        all.iter().for_each(|l| range.push(*l));
        let rebuilt = CompactRange::from_parts(13, range.peaks().to_vec()).unwrap();
        assert_eq!(rebuilt.root(), range.root());
        assert!(CompactRange::from_parts(12, range.peaks().to_vec()).is_none());
    }

    #[test]
    fn streamed_subtrees_give_the_same_consistency_proofs_as_the_whole_tree() {
        let all = leaves(70);
        let tree = MerkleTree::new(all.clone());
        for new in 1..=70 {
            for old in 1..=new {
                let ranges = consistency_ranges(old, new);
                let mut collector = SubtreeCollector::new(&ranges);
                all[..new as usize].iter().for_each(|l| collector.push(*l));
                let streamed: Vec<Hash> =
                    ranges.iter().map(|&(a, b)| collector.range_root(a, b).unwrap()).collect();
                assert_eq!(streamed, tree.consistency_proof(old, new), "{old} -> {new}");
                assert_eq!(collector.compact_range().root(), tree.root_at(new));
            }
        }
    }
}
