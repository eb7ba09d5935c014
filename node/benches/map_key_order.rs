//! What automerge pays to apply one pushed change that puts one 230-byte value into a
//! map already holding `n` keys, when the new key sorts after every key there (a
//! timeline chunk keyed by plain `MessageId`s, as builds before newest-first keys
//! wrote: a new message has the greatest) and when it sorts before every key (a chunk
//! keyed by `MessageId::chunk_key`, as written now). Run:
//! `cargo bench -p parley-node --bench map_key_order`.
//!
//! automerge applies a change by walking the target map's ops in key order up to the
//! new key, so the first case grows with `n` and the second should not (BENCHMARKS.md
//! §3 has the figures and what they mean for the chunk's key encoding).

#![allow(clippy::unwrap_used)]

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ScalarValue, ROOT};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

/// The key of the `i`th entry: 32 hex digits like a `MessageId`, growing with `i`
/// (`last`) or shrinking (the complement, behind a `-` that sorts before any digit,
/// as `MessageId::chunk_key` writes it).
fn key(i: u64, last: bool) -> String {
    if last {
        format!("{:032x}", u128::from(i))
    } else {
        format!("-{:032x}", u128::MAX - u128::from(i))
    }
}

/// A saved document with `n` entries, and the change that adds entry `n`.
fn prepared(n: u64, last: bool) -> (Vec<u8>, Vec<u8>) {
    let mut writer = AutoCommit::new();
    let value = vec![7u8; 230];
    for i in 0..n {
        writer
            .put(ROOT, key(i, last), ScalarValue::Bytes(value.clone()))
            .unwrap();
    }
    let saved = writer.save();
    writer
        .put(ROOT, key(n, last), ScalarValue::Bytes(value))
        .unwrap();
    (saved, writer.save_incremental())
}

fn apply_one(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_one_put");
    group.sample_size(20);
    for n in [100u64, 1_000, 5_000] {
        for last in [true, false] {
            let (saved, change) = prepared(n, last);
            let name = if last {
                "new_key_sorts_last"
            } else {
                "new_key_sorts_first"
            };
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_batched(
                    || AutoCommit::load(&saved).unwrap(),
                    |mut doc| {
                        doc.load_incremental(&change).unwrap();
                        doc
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, apply_one);
criterion_main!(benches);
