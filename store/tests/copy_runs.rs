//! Large origin writes copy runs of chunks with one read and few writes.
//! The content must come out right in every case the batching meets: runs
//! longer than one copy buffer, a metadata chunk in the middle of a run of
//! COW chunks (the run splits there), two snapshots of different chunk
//! sizes, one of which already holds some of the chunks, a partial last
//! chunk of the origin; and the records must load back after a reopen.

mod common;

use cowsnap_store::{AlignedBuf, Origin, SnapshotOptions, Target};

const KIB: u64 = 1024;

#[test]
fn large_writes_copy_runs_with_the_right_content_in_every_snapshot() {
    let dir = common::scratch();
    // 3 MiB + 4 KiB: with 8 KiB chunks the last one is partial.
    let size = 3 * 1024 * KIB + 4 * KIB;
    let before = common::pattern(size as usize, 1);
    let origin_path = dir.path().join("origin.img");
    std::fs::write(&origin_path, &before).unwrap();
    let small = common::sparse_file(&dir.path().join("small.cow"), 8 * 1024 * KIB);
    let large = common::sparse_file(&dir.path().join("large.cow"), 8 * 1024 * KIB);
    let b = common::backend();
    let rt = common::runtime();
    let mut expect_large = before.clone();
    rt.block_on(async {
        let o = Origin::new(b.open(&origin_path, true).unwrap()).unwrap();
        // 4 KiB chunks: 256 records per area, so area 1 sits at chunk 258
        // and a run of COW chunks crosses it.
        let s4 = o
            .add_snapshot(
                b.open(&small, true).unwrap(),
                SnapshotOptions {
                    chunk_sectors: Some(8),
                    merging: false,
                    size: None,
                },
            )
            .await
            .unwrap()
            .id;
        let s64 = o
            .add_snapshot(
                b.open(&large, true).unwrap(),
                SnapshotOptions {
                    chunk_sectors: Some(128),
                    merging: false,
                    size: None,
                },
            )
            .await
            .unwrap()
            .id;
        // A write into the 64 KiB snapshot first: it owns that chunk, so
        // the big origin write below skips it there.
        let own = common::pattern(64 * KIB as usize, 2);
        o.write(
            Target::Snapshot(s64),
            128 * KIB,
            AlignedBuf::from_slice(&own),
            false,
        )
        .await
        .unwrap();
        expect_large[128 * KIB as usize..192 * KIB as usize].copy_from_slice(&own);

        // One write over everything but the first 4 KiB, then another over
        // the first 12 KiB (partly copied already).
        let after = common::pattern(size as usize, 3);
        o.write(
            Target::Origin,
            4 * KIB,
            AlignedBuf::from_slice(&after[4 * KIB as usize..]),
            false,
        )
        .await
        .unwrap();
        o.write(
            Target::Origin,
            0,
            AlignedBuf::from_slice(&after[..12 * KIB as usize]),
            true,
        )
        .await
        .unwrap();

        let read = |t| {
            let o = &o;
            async move { o.read(t, 0, size).await.unwrap().to_vec() }
        };
        assert!(
            read(Target::Snapshot(s4)).await == before,
            "4 KiB-chunk snapshot"
        );
        assert!(
            read(Target::Snapshot(s64)).await == expect_large,
            "64 KiB-chunk snapshot"
        );
        assert!(read(Target::Origin).await == after, "origin");
        // Every chunk of the small one was copied: 3 MiB + 4 KiB in 4 KiB
        // chunks; the large one got all but the chunk it owned.
        assert_eq!(o.status(s4).unwrap().exceptions, size / (4 * KIB));
        assert_eq!(o.status(s64).unwrap().exceptions, size.div_ceil(64 * KIB));
        o.shutdown().await.unwrap();
    });

    // The records load back: the same content after a reopen.
    rt.block_on(async {
        let o = Origin::new(b.open(&origin_path, true).unwrap()).unwrap();
        let s4 = o
            .add_snapshot(b.open(&small, true).unwrap(), SnapshotOptions::default())
            .await
            .unwrap()
            .id;
        let s64 = o
            .add_snapshot(b.open(&large, true).unwrap(), SnapshotOptions::default())
            .await
            .unwrap()
            .id;
        assert!(
            o.read(Target::Snapshot(s4), 0, size)
                .await
                .unwrap()
                .to_vec()
                == before
        );
        assert!(
            o.read(Target::Snapshot(s64), 0, size)
                .await
                .unwrap()
                .to_vec()
                == expect_large
        );
    });
}
