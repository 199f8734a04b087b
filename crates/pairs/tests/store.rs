//! The pair store end to end: round trips, durability under kill -9, corrupt input, readers
//! other than ours, filters, shuffling and the async writer.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::{jpeg, png, record};
use pairs::import::{import_pickapic, ImportOptions};
use pairs::inspect::{summarize, validate};
use pairs::{batch_to_records, Columns};
use pairs::{
    col, recover_dir, recover_store, AsyncPairWriter, ImageFormat, Label, PairFilter, PairReader,
    PairRecord, PairStoreWriter, PairsError, ReadOptions, Source, WriterOptions,
};

fn write_all(
    dir: &Path,
    run: &str,
    ids: std::ops::Range<i64>,
    flush: usize,
    shard_rows: usize,
) -> Vec<PairRecord> {
    let mut w = PairStoreWriter::open(WriterOptions {
        flush_every_pairs: flush,
        max_shard_rows: shard_rows,
        ..WriterOptions::new(dir, run)
    })
    .unwrap();
    let records: Vec<_> = ids.map(|i| record(run, i)).collect();
    for r in &records {
        w.append(r.clone()).unwrap();
    }
    w.close().unwrap();
    records
}

fn read_records(paths: &[PathBuf], opts: ReadOptions) -> Vec<PairRecord> {
    PairReader::open(paths, opts)
        .unwrap()
        .flat_map(|b| batch_to_records(&b.unwrap(), 0).unwrap())
        .collect()
}

fn shard_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn every_column_round_trips_across_rotated_shards() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_all(dir.path(), "run-a", 0..23, 5, 8);
    // 23 pairs, row groups of 5, shards rotate at ≥ 8 rows: 10, 10, 3.
    assert_eq!(
        shard_names(dir.path()),
        [
            "run-a-000000.parquet",
            "run-a-000001.parquet",
            "run-a-000002.parquet"
        ]
    );
    let back = read_records(&[dir.path().to_owned()], ReadOptions::default());
    assert_eq!(back, written);
}

#[test]
fn reopening_continues_shard_numbers_and_pair_ids() {
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), "run-a", 0..7, 4, 100);
    let w = PairStoreWriter::open(WriterOptions::new(dir.path(), "run-a")).unwrap();
    assert_eq!(w.next_pair_id(), 7);
    drop(w);
    write_all(dir.path(), "run-a", 7..9, 4, 100);
    let w = PairStoreWriter::open(WriterOptions::new(dir.path(), "other")).unwrap();
    assert_eq!(w.next_pair_id(), 0, "pair ids are per run");
    drop(w);
    assert_eq!(
        shard_names(dir.path()),
        ["run-a-000000.parquet", "run-a-000001.parquet"]
    );
}

#[test]
fn a_second_writer_of_the_same_shards_is_refused_and_ranks_write_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let _first = PairStoreWriter::open(WriterOptions::new(dir.path(), "a")).unwrap();
    let err = PairStoreWriter::open(WriterOptions::new(dir.path(), "a"))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("another process is writing pairs"),
        "{err}"
    );
    // The ranks of one data-parallel run: one writer each, ids continuing per rank.
    let mut ranks: Vec<PairStoreWriter> = (0..2)
        .map(|r| PairStoreWriter::open(WriterOptions::new(dir.path(), "dp").for_rank(r)).unwrap())
        .collect();
    for (r, w) in ranks.iter_mut().enumerate() {
        for id in [r as i64, r as i64 + 2] {
            let mut rec = record("dp", id);
            rec.prompt = format!("rank {r}");
            w.append(rec).unwrap();
        }
        w.flush().unwrap();
    }
    // Dropped unclosed, as by a crash: each shard stays open. Reopening rank 0 recovers its own
    // shard only, since rank 1 could still be writing.
    drop(ranks);
    let again = PairStoreWriter::open(WriterOptions::new(dir.path(), "dp").for_rank(0)).unwrap();
    assert_eq!(again.next_pair_id(), 3);
    assert!(dir.path().join("dp-rank000-000000.parquet").exists());
    assert!(dir.path().join("dp-rank001-000000.parquet.tmp").exists());
    drop(again);
    let one = PairStoreWriter::open(WriterOptions::new(dir.path(), "dp").for_rank(1)).unwrap();
    assert_eq!(one.next_pair_id(), 4);
    drop(one);
    let names = shard_names(dir.path());
    assert!(
        names.contains(&"dp-rank000-000000.parquet".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"dp-rank001-000000.parquet".to_string()),
        "{names:?}"
    );
}

#[test]
fn invalid_records_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = PairStoreWriter::open(WriterOptions::new(dir.path(), "r")).unwrap();
    let mut bad = record("r", 0);
    bad.sides[1].score = f32::NAN;
    let err = w.append(bad).unwrap_err().to_string();
    assert!(
        err.contains("score_1") && err.contains("not finite"),
        "{err}"
    );
    let mut bad = record("r", 0);
    bad.latents.as_mut().unwrap().final_latents[0].pop();
    let err = w.append(bad).unwrap_err().to_string();
    assert!(
        err.contains("latents_0") && err.contains("expected 512"),
        "{err}"
    );
    let mut bad = record("r", 0);
    bad.sides[0].image = b"GIF89a".to_vec();
    let err = w.append(bad).unwrap_err().to_string();
    assert!(
        err.contains("image_0") && err.contains("png signature"),
        "{err}"
    );
    let err = w.append(record("other-run", 1)).unwrap_err().to_string();
    assert!(err.contains("run id `other-run`"), "{err}");
}

#[test]
fn projection_returns_only_the_asked_columns_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_all(dir.path(), "r", 0..9, 4, 100);
    let opts = ReadOptions {
        columns: Some(vec![col::SCORE_1.into(), col::PROMPT.into()]),
        filter: PairFilter {
            skip_ties: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let batches: Vec<RecordBatch> = PairReader::open(&[dir.path().to_owned()], opts)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let names: Vec<_> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [col::SCORE_1, col::PROMPT],
        "filter columns must not leak"
    );
    let prompts: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let c = Columns::new(b).unwrap();
            (0..b.num_rows())
                .map(move |i| c.req_str(col::PROMPT, i).unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let want: Vec<String> = written
        .iter()
        .filter(|r| r.label != Label::Tie)
        .map(|r| r.prompt.clone())
        .collect();
    assert_eq!(prompts, want);
    let err = PairReader::open(
        &[dir.path().to_owned()],
        ReadOptions {
            columns: Some(vec!["jpg_0".into()]),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("unknown pair column `jpg_0`"),
        "{err}"
    );
}

#[test]
fn filters_keep_exactly_the_matching_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_all(dir.path(), "r", 0..40, 7, 15);
    type Keep = Box<dyn Fn(&PairRecord) -> bool>;
    let cases: Vec<(PairFilter, Keep)> = vec![
        (
            PairFilter {
                policy_version: Some((2, 5)),
                ..Default::default()
            },
            Box::new(|r| r.policy_version.is_some_and(|v| (2..=5).contains(&v))),
        ),
        (
            PairFilter {
                min_score_margin: Some(2.0),
                ..Default::default()
            },
            Box::new(|r| (r.sides[0].score - r.sides[1].score).abs() >= 2.0),
        ),
        (
            PairFilter {
                skip_ties: true,
                ..Default::default()
            },
            Box::new(|r| r.label != Label::Tie),
        ),
        (
            PairFilter {
                sources: Some(vec![Source::Relabelled]),
                skip_ties: true,
                ..Default::default()
            },
            Box::new(|r| r.source == Source::Relabelled && r.label != Label::Tie),
        ),
    ];
    for (filter, keep) in cases {
        let want: Vec<i64> = written
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.pair_id)
            .collect();
        assert!(
            !want.is_empty() && want.len() < written.len(),
            "{filter:?} must select a strict subset"
        );
        let got: Vec<i64> = read_records(
            &[dir.path().to_owned()],
            ReadOptions {
                filter: filter.clone(),
                batch_size: 3,
                ..Default::default()
            },
        )
        .iter()
        .map(|r| r.pair_id)
        .collect();
        assert_eq!(got, want, "{filter:?}");
    }
}

#[test]
fn shuffling_is_seeded_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), "r", 0..60, 6, 12);
    let ids = |seed: Option<u64>| -> Vec<i64> {
        read_records(
            &[dir.path().to_owned()],
            ReadOptions {
                shuffle_seed: seed,
                batch_size: 4,
                ..Default::default()
            },
        )
        .iter()
        .map(|r| r.pair_id)
        .collect()
    };
    let ordered = ids(None);
    assert_eq!(ordered, (0..60).collect::<Vec<_>>());
    let a = ids(Some(1));
    assert_eq!(a, ids(Some(1)), "same seed, same order");
    assert_ne!(a, ordered);
    assert_ne!(a, ids(Some(2)));
    assert_eq!(
        a.iter().copied().collect::<BTreeSet<_>>(),
        ordered.iter().copied().collect()
    );
}

/// The child half of the kill -9 test: writes pairs forever, reporting each durable count.
#[test]
fn child_writer_for_kill_test() {
    let Some(dir) = std::env::var_os("PSO_TEST_CHILD_DIR") else {
        return; // only runs when spawned by `kill_9_at_any_moment_loses_no_flushed_pair`
    };
    let mut w = PairStoreWriter::open(WriterOptions {
        flush_every_pairs: 3,
        max_shard_rows: 7,
        ..WriterOptions::new(PathBuf::from(dir), "crash")
    })
    .unwrap();
    let mut id = w.next_pair_id();
    loop {
        w.append(record("crash", id)).unwrap();
        id += 1;
        if w.buffered() == 0 {
            println!("durable {}", w.stats().pairs);
        }
    }
}

#[test]
fn kill_9_at_any_moment_loses_no_flushed_pair() {
    let dir = tempfile::tempdir().unwrap();
    let mut durable_total = 0u64;
    let mut rounds_with_recovery = 0;
    // Kill after a varying number of flushes plus a varying delay, so kills land inside
    // appends, flushes, footer-sidecar replacements and rotations.
    for (round, (flushes, delay_us)) in [(1, 0), (2, 150), (4, 900), (3, 2500), (6, 60), (5, 4000)]
        .into_iter()
        .enumerate()
    {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_writer_for_kill_test",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PSO_TEST_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        let mut durable_this_round = 0;
        while seen < flushes {
            let line = lines.next().expect("child ended early").unwrap();
            if let Some(n) = line.strip_prefix("durable ") {
                durable_this_round = n.parse::<u64>().unwrap();
                seen += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        durable_total += durable_this_round;

        // Recovery completes every open shard: no .tmp left, every file readable, every pair
        // reported durable is there, ids contiguous from 0.
        let report = recover_dir(dir.path()).unwrap();
        rounds_with_recovery += report.recovered.iter().any(|(_, pairs, _)| *pairs > 0) as usize;
        let w = PairStoreWriter::open(WriterOptions::new(dir.path(), "crash")).unwrap();
        let next = w.next_pair_id();
        drop(w);
        assert!(
            shard_names(dir.path())
                .iter()
                .all(|n| n.ends_with(".parquet")),
            "round {round}: {:?}",
            shard_names(dir.path())
        );
        let ids: Vec<i64> = read_records(&[dir.path().to_owned()], ReadOptions::default())
            .iter()
            .map(|r| r.pair_id)
            .collect();
        assert_eq!(
            ids,
            (0..next).collect::<Vec<_>>(),
            "round {round}: ids must be contiguous"
        );
        assert!(
            next as u64 >= durable_total,
            "round {round}: {next} pairs recovered, {durable_total} were reported durable"
        );
        durable_total = next as u64;
        let (_, rows, problems) = validate(&[dir.path().to_owned()]).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rows, next as u64);
    }
    assert!(
        rounds_with_recovery >= 3,
        "only {rounds_with_recovery} kills left a shard to recover"
    );
}

#[test]
fn truncated_and_foreign_files_are_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), "r", 0..6, 3, 100);
    let good = dir.path().join("r-000000.parquet");
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_records_err(&truncated);
    assert!(
        err.contains("truncated.parquet") && err.contains("no Parquet magic"),
        "{err}"
    );

    // Right magic, garbage footer.
    let mut garbled = bytes.clone();
    let n = garbled.len();
    for b in &mut garbled[n - 200..n - 8] {
        *b ^= 0xA5;
    }
    let garbled_path = dir.path().join("garbled.parquet");
    std::fs::write(&garbled_path, &garbled).unwrap();
    let err = read_records_err(&garbled_path);
    assert!(
        err.contains("garbled.parquet") && err.contains("not a readable pair shard"),
        "{err}"
    );

    // A valid Parquet file of another schema.
    let foreign = dir.path().join("foreign.parquet");
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from(vec!["a"])) as ArrayRef],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&foreign).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = read_records_err(&foreign);
    assert!(
        err.contains("foreign.parquet is not a pair-store file")
            && err.contains("pso.pairs.schema_version"),
        "{err}"
    );

    let (files, _, problems) = validate(&[dir.path().to_owned()]).unwrap();
    assert_eq!(files, 4);
    let bad: BTreeSet<String> = problems
        .iter()
        .map(|p| p.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        bad,
        ["foreign.parquet", "garbled.parquet", "truncated.parquet"]
            .map(String::from)
            .into()
    );
}

fn read_records_err(path: &Path) -> String {
    match PairReader::open(&[path.to_owned()], ReadOptions::default()) {
        Err(e) => e.to_string(),
        Ok(mut r) => r
            .find_map(|b| b.err())
            .expect("reading must fail")
            .to_string(),
    }
}

#[test]
fn pyarrow_pandas_polars_and_duckdb_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_all(dir.path(), "r", 0..9, 4, 100);
    let out = common::oracle("read_pairs.py", &[dir.path().as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema_version"], "1");
    for reader in ["pyarrow", "pandas", "polars", "duckdb"] {
        assert_eq!(v[reader]["rows"], 9, "{reader}: {v}");
    }
    let arrow = &v["pyarrow"];
    assert_eq!(arrow["types"]["created_at"], "timestamp[us, tz=UTC]");
    assert_eq!(arrow["types"]["image_0"], "large_binary");
    assert_eq!(arrow["types"]["timesteps"], "list<item: int32 not null>");
    let prompts: Vec<&str> = arrow["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        prompts,
        written
            .iter()
            .map(|r| r.prompt.as_str())
            .collect::<Vec<_>>()
    );
    let labels: Vec<i64> = arrow["label"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_i64().unwrap())
        .collect();
    assert_eq!(
        labels,
        written
            .iter()
            .map(|r| r.label.code() as i64)
            .collect::<Vec<_>>()
    );
    let seeds: Vec<serde_json::Value> = arrow["seed_0"].as_array().unwrap().clone();
    assert_eq!(seeds[3], serde_json::json!(u64::MAX - 3));
    // The images PIL decodes are the ones we stored.
    assert_eq!(arrow["image_0_size"][1], serde_json::json!([24, 16]));
    assert_eq!(
        v["duckdb"]["ties"],
        written.iter().filter(|r| r.label == Label::Tie).count()
    );
}

#[test]
fn flush_makes_pairs_durable_and_close_completes_the_shard() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let w = AsyncPairWriter::spawn(WriterOptions {
            flush_every_pairs: 1000,
            flush_interval: Duration::from_secs(3600),
            channel_capacity: 2,
            ..WriterOptions::new(dir.path(), "a")
        })
        .unwrap();
        for i in 0..5 {
            w.send(record("a", i)).await.unwrap();
        }
        w.flush().await.unwrap();
        // Durable now: a copy of the directory taken at this instant recovers all 5.
        assert_eq!(recovered_copy_count(dir.path()), 5);
        for i in 5..8 {
            w.send(record("a", i)).await.unwrap();
        }
        let stats = w.close().await.unwrap();
        assert_eq!((stats.pairs, stats.shards_closed), (8, 1));
    });
    assert_eq!(
        read_records(&[dir.path().to_owned()], ReadOptions::default()).len(),
        8
    );
}

#[test]
fn the_flush_interval_bounds_how_long_a_pair_stays_in_memory() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let w = AsyncPairWriter::spawn(WriterOptions {
            flush_every_pairs: 1000,
            flush_interval: Duration::from_millis(50),
            ..WriterOptions::new(dir.path(), "a")
        })
        .unwrap();
        w.send(record("a", 0)).await.unwrap();
        let mut durable = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            durable = recovered_copy_count(dir.path());
            if durable == 1 {
                break;
            }
        }
        assert_eq!(durable, 1, "the timer never flushed the lone pair");
        w.close().await.unwrap();
    });
}

/// Copies the store as it is on disk now (as a crash would leave it) and counts what recovery
/// keeps.
fn recovered_copy_count(dir: &Path) -> usize {
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    recover_store(copy.path()).unwrap();
    read_records(&[copy.path().to_owned()], ReadOptions::default()).len()
}

/// caption, jpg_0, jpg_1, label_0, label_1
type PickRow<'a> = (&'a str, Vec<u8>, Vec<u8>, f64, f64);

fn write_pickapic(path: &Path, rows: &[PickRow]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("caption", DataType::Utf8, false),
        Field::new("jpg_0", DataType::Binary, false),
        Field::new("jpg_1", DataType::Binary, false),
        Field::new("label_0", DataType::Float64, false),
        Field::new("label_1", DataType::Float64, false),
        Field::new("best_image_uid", DataType::Utf8, false),
    ]));
    let col_bytes = |i: usize| -> ArrayRef {
        Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| {
            if i == 0 {
                r.1.clone()
            } else {
                r.2.clone()
            }
        })))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            col_bytes(0),
            col_bytes(1),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|_| "ignored"),
            )),
        ],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn pickapic_import_keeps_winners_skips_ties_and_records_formats() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("train-0000.parquet");
    write_pickapic(
        &input,
        &[
            ("a cat", jpeg(1, 32, 24), jpeg(2, 32, 24), 1.0, 0.0),
            ("a dog", jpeg(3, 32, 24), jpeg(4, 32, 24), 0.0, 1.0),
            ("a tie", jpeg(5, 32, 24), jpeg(6, 32, 24), 0.5, 0.5),
            ("mixed", png(7, 20, 10), jpeg(8, 20, 10), 0.0, 1.0),
        ],
    );
    let out = dir.path().join("store");
    let opts = ImportOptions {
        out: out.clone(),
        run_id: "pick".into(),
        keep_ties: false,
        reencode_png: false,
    };
    let report = import_pickapic(
        std::slice::from_ref(&input),
        &opts,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(
        (report.rows, report.imported, report.ties_skipped),
        (4, 3, 1)
    );
    let recs = read_records(std::slice::from_ref(&out), ReadOptions::default());
    let summary: Vec<_> = recs
        .iter()
        .map(|r| {
            (
                r.prompt.as_str(),
                r.label,
                r.image_format,
                r.width,
                r.height,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a cat", Label::Side0, ImageFormat::Jpeg, 32, 24),
            ("a dog", Label::Side1, ImageFormat::Jpeg, 32, 24),
            ("mixed", Label::Side1, ImageFormat::Png, 20, 10),
        ]
    );
    assert_eq!(
        recs[0].sides[0].image,
        jpeg(1, 32, 24),
        "JPEG bytes are kept as they were"
    );
    assert!(recs.iter().all(|r| r.source == Source::Imported
        && r.policy_version.is_none()
        && r.scorer == "human"));
    assert_eq!((recs[1].sides[0].score, recs[1].sides[1].score), (0.0, 1.0));

    // Again with ties kept and PNG re-encoding, into the same store: ids continue.
    let opts = ImportOptions {
        keep_ties: true,
        reencode_png: true,
        ..opts
    };
    import_pickapic(&[input], &opts, &indicatif::ProgressBar::hidden()).unwrap();
    let recs = read_records(std::slice::from_ref(&out), ReadOptions::default());
    assert_eq!(
        recs.iter().map(|r| r.pair_id).collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>()
    );
    assert!(recs[3..].iter().all(|r| r.image_format == ImageFormat::Png));
    assert_eq!(recs[5].label, Label::Tie);
    assert_eq!(summarize(&[out]).unwrap().ties, 1);
}

#[test]
fn pickapic_import_names_the_bad_row_and_the_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.parquet");
    write_pickapic(
        &input,
        &[
            ("ok", jpeg(1, 8, 8), jpeg(2, 8, 8), 1.0, 0.0),
            ("bad", jpeg(3, 8, 8), jpeg(4, 8, 8), 0.7, 0.3),
        ],
    );
    let opts = ImportOptions {
        out: dir.path().join("s"),
        run_id: "p".into(),
        keep_ties: false,
        reencode_png: false,
    };
    let err = import_pickapic(&[input], &opts, &indicatif::ProgressBar::hidden()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.parquet") && msg.contains("row 1") && msg.contains("label_0=0.7"),
        "{msg}"
    );

    let foreign = dir.path().join("foreign.parquet");
    let schema = Arc::new(Schema::new(vec![Field::new(
        "caption",
        DataType::Utf8,
        false,
    )]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from(vec!["a"])) as ArrayRef],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&foreign).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = import_pickapic(&[foreign], &opts, &indicatif::ProgressBar::hidden()).unwrap_err();
    assert!(matches!(err, PairsError::WrongSchema { .. }), "{err}");
    assert!(
        err.to_string().contains("column `jpg_0` is missing"),
        "{err}"
    );

    // Integer captions would become prompts like "42": refused, not imported silently.
    let numbers = dir.path().join("numbers.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("caption", DataType::Int64, false),
        Field::new("jpg_0", DataType::Binary, false),
        Field::new("jpg_1", DataType::Binary, false),
        Field::new("label_0", DataType::Float64, false),
        Field::new("label_1", DataType::Float64, false),
    ]));
    let (a, b) = (jpeg(1, 8, 8), jpeg(2, 8, 8));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow::array::Int64Array::from(vec![42])) as ArrayRef,
            Arc::new(BinaryArray::from(vec![a.as_slice()])),
            Arc::new(BinaryArray::from(vec![b.as_slice()])),
            Arc::new(Float64Array::from(vec![1.0])),
            Arc::new(Float64Array::from(vec![0.0])),
        ],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&numbers).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = import_pickapic(&[numbers], &opts, &indicatif::ProgressBar::hidden()).unwrap_err();
    assert!(
        err.to_string().contains("numbers.parquet")
            && err
                .to_string()
                .contains("column `caption` holds Int64, not text"),
        "{err}"
    );
}

#[test]
fn pickapic_files_written_by_pyarrow_import() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pyarrow.parquet");
    common::oracle("make_pickapic.py", &[input.as_os_str(), "6".as_ref()]);
    let opts = ImportOptions {
        out: dir.path().join("s"),
        run_id: "p".into(),
        keep_ties: false,
        reencode_png: false,
    };
    let report = import_pickapic(&[input], &opts, &indicatif::ProgressBar::hidden()).unwrap();
    // make_pickapic.py writes every third row as a tie.
    assert_eq!(
        (report.rows, report.imported, report.ties_skipped),
        (6, 4, 2)
    );
    let s = summarize(&[dir.path().join("s")]).unwrap();
    assert_eq!(s.pairs, 4);
    assert_eq!(s.sources["imported"], 4);
}

/// A store a writer crashed on (an open shard with a flushed row group and its footer sidecar)
/// is not "ok": inspect names the open shard, validate reports it, and `recover_store` closes it
/// with its flushed pairs, after which validate passes.
#[test]
fn a_crashed_store_is_reported_until_recovered() {
    let live = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let mut w = PairStoreWriter::open(WriterOptions::new(live.path(), "crash")).unwrap();
    for id in 0..3 {
        w.append(record("crash", id)).unwrap();
    }
    w.flush().unwrap();
    // The files as a writer killed now leaves them (its lock dies with it).
    for name in shard_names(live.path()) {
        std::fs::copy(live.path().join(&name), crashed.path().join(&name)).unwrap();
    }
    drop(w);
    let paths = [crashed.path().to_owned()];
    let summary = summarize(&paths).unwrap();
    assert_eq!((summary.files, summary.pairs), (0, 0));
    assert_eq!(summary.open_shards.len(), 1, "{summary:?}");
    assert!(summary.to_text().contains("pso pairs recover"));
    let (_, _, problems) = validate(&paths).unwrap();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].to_string().contains("pso pairs recover"),
        "{}",
        problems[0]
    );

    let report = recover_store(crashed.path()).unwrap();
    assert_eq!(report.recovered.len(), 1);
    assert_eq!(report.recovered[0].1, 3);
    let (files, rows, problems) = validate(&paths).unwrap();
    assert_eq!((files, rows), (1, 3));
    assert!(problems.is_empty(), "{problems:?}");
    // A store whose writer is alive, with a shard open, is not touched.
    let mut w = PairStoreWriter::open(WriterOptions::new(crashed.path(), "crash")).unwrap();
    w.append(record("crash", 3)).unwrap();
    w.flush().unwrap();
    let e = recover_store(crashed.path()).unwrap_err().to_string();
    assert!(e.contains("another process is writing"), "{e}");
}

/// Labels are checked against scores: a flipped label (against the direction every other pair
/// of its scorer follows), a tie with unequal scores and a winner with equal ones are reported
/// by row; a consistent store, lower-is-better scorers included, passes.
#[test]
fn validate_reports_labels_that_contradict_the_scores() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = PairStoreWriter::open(WriterOptions::new(dir.path(), "labels")).unwrap();
    let mut expected = BTreeSet::new();
    for i in 0..12 {
        let mut r = record("labels", i);
        let (s0, s1) = (r.sides[0].score, r.sides[1].score);
        match i {
            3 | 7 => {
                r.label = Label::from_scores(s0, s1, false);
                expected.insert((i as usize, "makes the lower score the winner"));
            }
            5 => {
                assert_eq!(s0, s1, "the fixture ties every fifth pair");
                r.label = Label::Side1;
                expected.insert((5, "side 1 won, but both scores are"));
            }
            9 => {
                r.label = Label::Tie;
                expected.insert((9, "a tie (-1), but the scores differ"));
            }
            _ => {}
        }
        w.append(r).unwrap();
    }
    // A lower-is-better scorer whose labels all agree with each other is consistent.
    for i in 12..16 {
        let mut r = record("labels", i);
        r.scorer = "distance".into();
        r.label = Label::from_scores(r.sides[0].score, r.sides[1].score, false);
        w.append(r).unwrap();
    }
    w.close().unwrap();
    let (_, rows, problems) = validate(&[dir.path().to_owned()]).unwrap();
    assert_eq!(rows, 16);
    let found: BTreeSet<(usize, &str)> = problems
        .iter()
        .map(|p| {
            let (_, what) = expected
                .iter()
                .find(|(row, what)| Some(*row) == p.row && p.why.contains(what))
                .unwrap_or_else(|| panic!("unexpected problem: {p}"));
            (p.row.unwrap(), *what)
        })
        .collect();
    assert_eq!(found, expected, "{problems:#?}");
    assert!(problems[0].to_string().contains("label"), "{}", problems[0]);
}

/// A store rewritten by pyarrow with its defaults (list elements named `element`, nullable) is
/// still a store: it reads, validates and holds exactly the rows pyarrow kept.
#[test]
fn a_store_rewritten_by_pyarrow_with_its_defaults_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_all(dir.path(), "r", 0..9, 100, 100);
    let out = common::oracle("rewrite_pairs.py", &[dir.path().as_os_str()]);
    let types: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        types
            .as_object()
            .unwrap()
            .values()
            .all(|t| t == "list<element: int32>"),
        "pyarrow's defaults changed: {types}"
    );
    let read = read_records(&[dir.path().to_owned()], ReadOptions::default());
    let kept: Vec<PairRecord> = written.into_iter().step_by(2).collect();
    assert_eq!(read, kept);
    let (_, rows, problems) = validate(&[dir.path().to_owned()]).unwrap();
    assert_eq!((rows, problems), (5, vec![]));
}
