//! The table of one snapshot's completed exceptions: origin chunk → COW
//! chunk. Sharded by a hash of the origin chunk, so that loading a COW
//! device with millions of records builds the shards on several threads at
//! once, each at its final size (growing one table record by record rehashes
//! it some twenty times for a million records, and every insert is a cache
//! miss in a table of tens of megabytes).

use hashbrown::HashMap;

const SHARD_BITS: u32 = 4;
const SHARDS: usize = 1 << SHARD_BITS;

fn shard_of(old: u64) -> usize {
    (old.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SHARD_BITS)) as usize
}

#[derive(Debug)]
pub struct ExceptionTable {
    shards: Vec<HashMap<u64, u64>>,
    len: usize,
}

impl Default for ExceptionTable {
    fn default() -> Self {
        ExceptionTable {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }
}

/// Up to this many records a table is built on the calling thread:
/// starting threads would cost more than they save (a new snapshot has no
/// records at all).
pub const BUILD_INLINE_MAX: usize = 1 << 14;

impl ExceptionTable {
    /// Builds the table from loaded records, on up to as many threads as
    /// the machine has cores (on the calling thread alone up to
    /// [`BUILD_INLINE_MAX`] records). Fails with the first origin chunk
    /// that two records map.
    pub fn build(records: Vec<(u64, u64)>) -> Result<ExceptionTable, u64> {
        if records.len() <= BUILD_INLINE_MAX {
            let mut t = ExceptionTable::default();
            for (old, new) in records {
                if t.insert(old, new).is_some() {
                    return Err(old);
                }
            }
            return Ok(t);
        }
        let mut parts: Vec<Vec<(u64, u64)>> = (0..SHARDS)
            .map(|_| Vec::with_capacity(records.len() / SHARDS + 64))
            .collect();
        for r in records {
            parts[shard_of(r.0)].push(r);
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, SHARDS);
        let per = SHARDS.div_ceil(threads);
        let built: Vec<Result<HashMap<u64, u64>, u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .chunks(per)
                .map(|group| {
                    scope.spawn(move || {
                        group
                            .iter()
                            .map(|part| {
                                let mut m = HashMap::with_capacity(part.len());
                                for &(old, new) in part {
                                    if m.insert(old, new).is_some() {
                                        return Err(old);
                                    }
                                }
                                Ok(m)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("table builder thread"))
                .collect()
        });
        let shards = built.into_iter().collect::<Result<Vec<_>, u64>>()?;
        let len = shards.iter().map(|s| s.len()).sum();
        Ok(ExceptionTable { shards, len })
    }

    pub fn get(&self, old: &u64) -> Option<&u64> {
        self.shards[shard_of(*old)].get(old)
    }

    pub fn contains_key(&self, old: &u64) -> bool {
        self.shards[shard_of(*old)].contains_key(old)
    }

    pub fn insert(&mut self, old: u64, new: u64) -> Option<u64> {
        let prev = self.shards[shard_of(old)].insert(old, new);
        if prev.is_none() {
            self.len += 1;
        }
        prev
    }

    pub fn remove(&mut self, old: &u64) -> Option<u64> {
        let prev = self.shards[shard_of(*old)].remove(old);
        if prev.is_some() {
            self.len -= 1;
        }
        prev
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (origin chunk, COW chunk) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(&o, &n)| (o, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_get_insert_remove() {
        let recs: Vec<(u64, u64)> = (0..10_000u64)
            .map(|i| (i * 7919 % 100_003, i + 2))
            .collect();
        let mut t = ExceptionTable::build(recs.clone()).unwrap();
        assert_eq!(t.len(), recs.len());
        for &(o, n) in &recs {
            assert_eq!(t.get(&o), Some(&n));
        }
        assert_eq!(t.get(&100_004), None);
        assert_eq!(t.insert(100_004, 5), None);
        assert_eq!(t.insert(100_004, 6), Some(5));
        assert_eq!(t.len(), recs.len() + 1);
        assert_eq!(t.remove(&recs[0].0), Some(recs[0].1));
        assert_eq!(t.remove(&recs[0].0), None);
        assert_eq!(t.len(), recs.len());
        assert_eq!(t.iter().count(), t.len());
    }

    #[test]
    fn duplicate_origin_chunk_is_reported() {
        assert_eq!(
            ExceptionTable::build(vec![(1, 2), (5, 3), (1, 4)]).unwrap_err(),
            1
        );
    }

    /// Past `BUILD_INLINE_MAX` records the table is built on threads: the
    /// same table, and the same refusal of a duplicate.
    #[test]
    fn a_large_table_is_built_on_threads_alike() {
        let n = BUILD_INLINE_MAX as u64 * 3;
        let recs: Vec<(u64, u64)> = (0..n).map(|i| (i * 7919 % 1_000_003, i + 2)).collect();
        let t = ExceptionTable::build(recs.clone()).unwrap();
        assert_eq!(t.len(), recs.len());
        assert!(recs.iter().all(|(o, n)| t.get(o) == Some(n)));
        let mut dup = recs;
        dup.push((dup[12_345].0, 1));
        assert_eq!(
            ExceptionTable::build(dup.clone()).unwrap_err(),
            dup[12_345].0
        );
    }
}
