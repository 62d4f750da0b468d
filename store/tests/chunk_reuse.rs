//! Data chunks allocated but never committed (a crash between a chunk's
//! copy and its commit) are handed out again after a reopen, lowest first,
//! so a COW device sized for every origin chunk holds every origin chunk
//! however many crashes it has seen; nothing committed is ever handed out
//! twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cowsnap_store::format::{Layout, Record};
use cowsnap_store::pstore::PStore;
use futures::future::join_all;

#[test]
fn chunks_lost_to_crashes_are_used_again() {
    let dir = common::scratch();
    let layout = Layout::new(8).unwrap(); // 4 KiB chunks, 256 records an area
    let origin_chunks = 1024u64; // four full areas
    // What the worker gives a default-sized snapshot: a header, every
    // origin chunk, their areas and the zeroed area after a full one.
    let areas = origin_chunks.div_ceil(layout.exceptions_per_area()) + 1;
    let cow_bytes = (1 + areas + origin_chunks) * layout.chunk_bytes();
    assert_eq!(layout.capacity(cow_bytes), origin_chunks);
    let cow = common::sparse_file(&dir.path().join("s.cow"), cow_bytes);
    let b = common::backend();
    let rt = common::runtime();
    rt.block_on(async {
        let open = || async {
            let mut loaded = BTreeMap::new();
            let o = PStore::open(
                b.open(&cow, true).unwrap(),
                Some(8),
                Some(origin_chunks * layout.chunk_bytes()),
                |r| loaded.insert(r.old, r.new).is_none(),
            )
            .await
            .unwrap();
            (o.store, loaded)
        };
        let mut committed: BTreeMap<u64, u64> = BTreeMap::new();
        let mut next_old = 0u64;
        let mut lost: Vec<u64> = Vec::new();
        for crash in 0..20u64 {
            let (store, loaded) = open().await;
            assert_eq!(loaded, committed, "after crash {crash}");
            assert_eq!(
                store.free_chunks(),
                lost.len() as u64,
                "after crash {crash}"
            );
            // 17 copies still in flight when the power goes: they take the
            // chunks the last crash lost, lowest first...
            let in_flight: Vec<u64> = (0..17).map(|_| store.prepare().expect("room")).collect();
            if crash > 0 {
                assert_eq!(in_flight, lost, "after crash {crash}");
            }
            // ...while later ones commit above them, in one group commit
            // (a commit waits for the copies in flight or a full batch).
            let batch: Vec<Record> = (0..32)
                .map(|i| Record {
                    old: next_old + i,
                    new: store.prepare().expect("room"),
                })
                .collect();
            next_old += 32;
            for r in join_all(batch.iter().map(|&r| store.commit(r))).await {
                r.unwrap();
            }
            committed.extend(batch.iter().map(|r| (r.old, r.new)));
            lost = in_flight;
        }
        // Every remaining origin chunk still fits.
        let (store, loaded) = open().await;
        assert_eq!(loaded, committed);
        while next_old < origin_chunks {
            let new = store
                .prepare()
                .unwrap_or_else(|e| panic!("origin chunk {next_old}: {e:?}"));
            store.commit(Record { old: next_old, new }).await.unwrap();
            committed.insert(next_old, new);
            next_old += 1;
        }
        assert!(store.prepare().is_err(), "the device is exactly full");
        let news: BTreeSet<u64> = committed.values().copied().collect();
        assert_eq!(
            news.len() as u64,
            origin_chunks,
            "no chunk handed out twice"
        );
        assert!(news.iter().all(|&c| !layout.is_metadata(c)));
        drop(store);
        let (store, loaded) = open().await;
        assert_eq!(loaded, committed);
        assert_eq!(store.free_chunks(), 0);
    });
}

#[test]
fn an_abandoned_chunk_is_handed_out_again() {
    let dir = common::scratch();
    let cow = common::sparse_file(&dir.path().join("s.cow"), 1024 * 1024);
    let b = common::backend();
    common::runtime().block_on(async {
        let store = PStore::open(b.open(&cow, true).unwrap(), Some(8), None, |_| true)
            .await
            .unwrap()
            .store;
        let first = store.prepare().unwrap();
        let second = store.prepare().unwrap();
        store.abandon(first);
        assert_eq!(store.free_chunks(), 1);
        assert_eq!(store.prepare().unwrap(), first);
        store.abandon(second);
        store.abandon(first);
        assert_eq!(store.prepare().unwrap(), first);
        assert_eq!(store.prepare().unwrap(), second);
        assert_eq!(store.free_chunks(), 0);
    });
}

/// A metadata write torn by a crash: a later block of the area landed, an
/// earlier one did not, so records follow the end of the list. The loader
/// reads up to the end (as the kernel does), hands out the chunks of the
/// records past it again, and the next commit writes zeros over them.
#[test]
fn a_torn_area_write_loads_up_to_the_end_of_the_list() {
    use std::os::unix::fs::FileExt;
    let dir = common::scratch();
    let cow = common::sparse_file(&dir.path().join("s.cow"), 1024 * 1024);
    let b = common::backend();
    let rt = common::runtime();
    let cb = 4096u64;
    let open = || async {
        let mut loaded = BTreeMap::new();
        let o = PStore::open(b.open(&cow, true).unwrap(), Some(8), None, |r| {
            loaded.insert(r.old, r.new).is_none()
        })
        .await
        .unwrap();
        (o.store, loaded)
    };
    rt.block_on(async {
        let (store, _) = open().await;
        for old in 0..4 {
            let new = store.prepare().unwrap();
            store.commit(Record { old, new }).await.unwrap();
        }
    });
    // Records 4..=5 of area 0 are missing, record 40 (in the area's second
    // 512-byte block) landed: chunk 42 for origin chunk 99.
    let f = std::fs::OpenOptions::new().write(true).open(&cow).unwrap();
    let mut rec = [0u8; 16];
    rec[..8].copy_from_slice(&99u64.to_le_bytes());
    rec[8..].copy_from_slice(&42u64.to_le_bytes());
    f.write_all_at(&rec, cb + 40 * 16).unwrap();
    f.sync_all().unwrap();
    rt.block_on(async {
        let (store, loaded) = open().await;
        assert_eq!(loaded, (0..4).map(|o| (o, o + 2)).collect());
        // Chunks 6..=41 were never allocated; 42 is past the end of the
        // list, so next_free is 6 and nothing holds 42.
        let new = store.prepare().unwrap();
        assert_eq!(new, 6);
        store.commit(Record { old: 4, new }).await.unwrap();
    });
    let mut area = vec![0u8; cb as usize];
    std::fs::File::open(&cow)
        .unwrap()
        .read_exact_at(&mut area, cb)
        .unwrap();
    assert!(
        area[5 * 16..].iter().all(|&b| b == 0),
        "the next commit wrote zeros over the torn tail"
    );
    rt.block_on(async {
        let (_, loaded) = open().await;
        assert_eq!(loaded.len(), 5);
    });
}
