//! What a replica pays to apply one pushed change (one 200-byte message) to a room
//! whose open chunk already holds `n` entries: decode, apply, find the new entries,
//! index them and flush (a real sled database in a temporary directory, fsync
//! included). Run: `cargo bench -p parley-node --bench apply_push`.
//!
//! The cost should not grow with `n`; when it does, every push to a busy room gets
//! slower as its chunk fills (BENCHMARKS.md §3, "Applying one push as the open chunk grows").

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use automerge::transaction::Transactable;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use parley_node::clock::Hlc;
use parley_node::delivery::Hub;
use parley_node::ids::{MessageId, RoomId};
use parley_node::replication::{ChunkLimits, Timelines};
use parley_node::store::Db;
use parley_proto::v1 as pb;
use prost::Message as _;

const ROOM: &str = "rm_00000000000000c0";

/// The room's writer: one automerge actor (as a home node's open chunk has), whose
/// changes a replica applies in order.
struct Writer {
    doc: automerge::AutoCommit,
    seq: u32,
}

impl Writer {
    fn new() -> Self {
        Self {
            doc: automerge::AutoCommit::new(),
            seq: 0,
        }
    }

    /// The change that adds the next 200-byte message, as the writer pushes it.
    fn next_change(&mut self) -> Vec<u8> {
        self.seq += 1;
        let id = MessageId::new(1_700_000_000_000, 0, 2, self.seq);
        let entry = pb::TimelineEntry {
            kind: Some(pb::timeline_entry::Kind::Message(pb::Message {
                id: id.to_string(),
                room_id: ROOM.into(),
                sender: "alice".into(),
                text: "x".repeat(200),
                ..Default::default()
            })),
        };
        self.doc
            .put(
                automerge::ROOT,
                id.chunk_key(),
                automerge::ScalarValue::Bytes(entry.encode_to_vec()),
            )
            .unwrap();
        self.doc.save_incremental()
    }
}

/// A replica (real sled in a temporary directory) whose open chunk holds `n` entries
/// from one writer, with that writer to make the next changes.
fn replica(
    rt: &tokio::runtime::Runtime,
    n: usize,
) -> (tempfile::TempDir, RoomId, Writer, Timelines) {
    let dir = tempfile::tempdir().unwrap();
    let room = RoomId::parse(ROOM).unwrap();
    let limits = ChunkLimits {
        max_entries: 100_000,
        max_bytes: 64 * 1024 * 1024,
        ..ChunkLimits::default()
    };
    let mut writer = Writer::new();
    let t = rt.block_on(async {
        let db = Db::open(dir.path()).unwrap();
        let t = Timelines::open(&db, Arc::new(Hlc::new(1, 0)), Hub::new(), limits).unwrap();
        t.ensure_loaded(&room).await.unwrap();
        let prefill: Vec<Vec<u8>> = (0..n).map(|_| writer.next_change()).collect();
        for batch in prefill.chunks(500) {
            assert!(t.apply_remote(&room, 0, batch).await.unwrap());
        }
        t
    });
    (dir, room, writer, t)
}

fn apply_push(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("apply_push");
    group.sample_size(20);
    for n in [0usize, 2_000, 8_000] {
        let (_dir, room, mut writer, t) = replica(&rt, n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let ch = writer.next_change();
                rt.block_on(t.apply_remote(&room, 0, &[ch])).unwrap()
            })
        });
    }
    group.finish();
}

/// Eight messages reaching a replica whose open chunk holds 800 entries: as eight
/// pushes of one change, and as one push of eight (what a pusher sends when changes
/// queued while its previous push was out; the replica loads them as one batch).
fn apply_eight(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("apply_eight_at_800");
    group.sample_size(20);
    group.throughput(criterion::Throughput::Elements(8));
    for together in [false, true] {
        let (_dir, room, mut writer, t) = replica(&rt, 800);
        let name = if together {
            "one_push_of_eight"
        } else {
            "eight_pushes_of_one"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let eight: Vec<Vec<u8>> = (0..8).map(|_| writer.next_change()).collect();
                rt.block_on(async {
                    if together {
                        assert!(t.apply_remote(&room, 0, &eight).await.unwrap());
                    } else {
                        for one in &eight {
                            assert!(t
                                .apply_remote(&room, 0, std::slice::from_ref(one))
                                .await
                                .unwrap());
                        }
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, apply_push, apply_eight);
criterion_main!(benches);
