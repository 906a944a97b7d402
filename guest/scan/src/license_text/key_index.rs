//! An open-addressing index over items keyed by a shingle hash (a `u64`), for the two tables
//! the matcher probes per shingle: the catalog's anchor postings and a known text's shingles.

use alloc::vec::Vec;

/// For each key, the position of its first item: slots hold a position + 1 (0: empty),
/// probed linearly from the key's low bits (the keys are hashes already).
pub(crate) struct KeyIndex {
    slots: Vec<u32>,
}

impl KeyIndex {
    /// Indexes `keys`, item `i` having key `keys[i]`; items of equal keys must be adjacent
    /// (sorted postings, or distinct keys): each run is found by its first item.
    pub fn new(keys: &[u64]) -> KeyIndex {
        let mut slots = alloc::vec![0u32; (keys.len() * 2).next_power_of_two().max(16)];
        let mask = slots.len() - 1;
        for (i, &key) in keys.iter().enumerate() {
            if i > 0 && keys[i - 1] == key {
                continue;
            }
            let mut at = (key as usize) & mask;
            while slots[at] != 0 {
                at = (at + 1) & mask;
            }
            slots[at] = i as u32 + 1;
        }
        KeyIndex { slots }
    }

    /// The position of the first item with `key`, `key_of` naming each position's key.
    #[inline]
    pub fn find(&self, key: u64, key_of: impl Fn(usize) -> u64) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut at = (key as usize) & mask;
        loop {
            let i = (self.slots[at] as usize).checked_sub(1)?;
            if key_of(i) == key {
                return Some(i);
            }
            at = (at + 1) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_finds_its_first_item_and_others_none() {
        // Colliding low bits (16 slots for 5 items) probe on.
        let keys = [3, 3, 19, 35, 35 + (1 << 40)];
        let index = KeyIndex::new(&keys);
        let find = |k| index.find(k, |i| keys[i]);
        assert_eq!([find(3), find(19), find(35), find(35 + (1 << 40))], [Some(0), Some(2), Some(3), Some(4)]);
        assert_eq!((find(4), find(51)), (None, None));
    }
}
