//! The engine's I/O counters: reads and writes as callers issued them, and
//! the commit counters of every snapshot it has had, which keep counting
//! after the snapshot is deleted or merged away (they only grow).

mod common;

use cowsnap_store::{AlignedBuf, IoStats, Origin, SnapshotOptions, Target};

const MIB: u64 = 1 << 20;

#[test]
fn io_stats_count_reads_writes_and_commits_of_gone_snapshots() {
    let dir = common::scratch();
    let origin_path = common::sparse_file(&dir.path().join("origin.img"), 4 * MIB);
    let cow_path = common::sparse_file(&dir.path().join("cow.img"), 2 * MIB);
    let cow2_path = common::sparse_file(&dir.path().join("cow2.img"), 2 * MIB);
    common::runtime().block_on(async {
        let b = common::backend();
        let o = Origin::new(b.open(&origin_path, true).unwrap()).unwrap();
        assert_eq!(o.io_stats(), IoStats::default());
        let opts = SnapshotOptions {
            chunk_sectors: Some(8),
            merging: false,
            size: None,
        };
        let s1 = o
            .add_snapshot(b.open(&cow_path, true).unwrap(), opts)
            .await
            .unwrap()
            .id;

        // 16 KiB over 4 KiB chunks: four exceptions, in one or more commits.
        o.write(
            Target::Origin,
            0,
            AlignedBuf::from_slice(&[7; 16384]),
            false,
        )
        .await
        .unwrap();
        // The write was held (write-back): FLUSH puts it on the device.
        o.flush().await.unwrap();
        o.read(Target::Snapshot(s1), 0, 8192).await.unwrap();
        o.read(Target::Origin, 4096, 4096).await.unwrap();
        let st = o.io_stats();
        assert_eq!((st.writes, st.write_bytes), (1, 16384));
        assert_eq!((st.reads, st.read_bytes), (2, 12288));
        assert_eq!(st.exceptions, 4);
        assert!((1..=4).contains(&st.commits), "{st:?}");

        // A failed I/O counts nothing.
        assert!(o.read(Target::Origin, 1, 4096).await.is_err());
        assert_eq!(o.io_stats().reads, 2);

        // Deleting the snapshot keeps its commits in the totals.
        o.delete_snapshot(s1).await.unwrap();
        let after = o.io_stats();
        assert_eq!(after.exceptions, 4);
        assert_eq!(after.commits, st.commits);

        // A second snapshot adds to them, and so does merging it away.
        let s2 = o
            .add_snapshot(b.open(&cow2_path, true).unwrap(), opts)
            .await
            .unwrap()
            .id;
        o.write(
            Target::Origin,
            MIB,
            AlignedBuf::from_slice(&[9; 4096]),
            true,
        )
        .await
        .unwrap();
        assert_eq!(o.io_stats().exceptions, 5);
        o.start_merge(s2).await.unwrap();
        o.merge(s2, |_| {}).await.unwrap();
        let end = o.io_stats();
        assert!(o.snapshot_ids().is_empty());
        assert_eq!(end.exceptions, 5);
        assert_eq!(end.commits, st.commits + 1);
        assert_eq!((end.writes, end.write_bytes), (2, 16384 + 4096));
    });
}
