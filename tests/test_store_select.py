"""DuckDB store and SQL selection on a real database file, with hand-made scores."""
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from tests.ingest_helpers import insert_dataset, sample_arrays
from tests.store_reads import load_selected
from tokenclean.tasks import storage, store
from tokenclean.tasks.store import INGEST_SCHEMA

DATASET, BASE, REF, SCORES = "d0", "b0", "c1", "e1"  # hand-made keys


def _samples(n_samples: int, n_resp: int, rng) -> pa.Table:
    """Samples of 2 prompt tokens + n_resp response tokens, random truth labels (other, informative,
    corrupted: ``tasks.template.TRUTH_*``)."""
    rows = []
    for i in range(n_samples):
        n = 2 + n_resp
        rows.append({"sample_id": i, "tokenization": "t", "uid": f"u{i}", "source": "t", "row_index": i,
                     "part": i % 2, "task": None, "answer": None,
                     "content_hash": str(i), "n_tokens": n, "n_response": n_resp, "truncated": False,
                     "answer_start": -1, "answer_end": -1, "input_ids": list(range(n)),
                     "response_mask": [False, False] + [True] * n_resp,
                     "truth": [0, 0] + [int(x) for x in rng.integers(0, 3, n_resp)]})
    return pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)


def select_tokens(con, name, method, k, parts, iteration=None, seed=0):
    """One selection over the hand-made dataset; ``iteration`` given = rank the stored scores."""
    return store.write_selection(con, name, method, k, dataset=DATASET, parts=parts,
                                 pool=store.pool_digest(con, DATASET, parts),
                                 scores=SCORES if iteration is not None else None, seed=seed)


def _losses(model, scores_by_token):
    sid, pos, loss = zip(*scores_by_token)
    return pa.table({"sample_id": pa.array(sid, pa.int64()), "pos": pa.array(pos, pa.int32()),
                     "token_id": pa.array(pos, pa.int32()), "loss": pa.array(loss, pa.float32())})


@pytest.fixture
def db(tmp_path):
    rng = np.random.default_rng(0)
    con = store.connect(tmp_path / "run.duckdb")
    insert_dataset(con, DATASET, _samples(10, 5, rng), [{"source": "t", "row_index": 99, "reason": "bad",
                                                                "raw": "x"}], {}, {})
    # base loss 2.0 everywhere; reference loss makes score = a distinct value per token
    toks = [(s, p) for s in range(10) for p in range(2, 7)]
    score = {t: float(i % 17) / 4 for i, t in enumerate(toks)}
    for model, f in ((BASE, lambda t: 2.0), (REF, lambda t: 2.0 - score[t])):
        path = tmp_path / f"{model}.parquet"
        storage.write_parquet(_losses(model, [(s, p, f((s, p))) for s, p in toks]), path)
        store.load_loss_shard(con, model, 0, path)
    store.ensure_scores(con, SCORES, BASE, REF, DATASET, [0, 1])
    yield con, score
    con.close()


def test_response_token_pool_and_quarantine(db):
    con, _ = db
    assert con.execute("SELECT count(*) FROM response_tokens").fetchone()[0] == 50
    assert con.execute("SELECT min(pos) FROM response_tokens").fetchone()[0] == 2
    assert con.execute("SELECT reason FROM quarantine").fetchall() == [("bad",)]


def test_loading_a_shard_twice_never_duplicates(db, tmp_path):
    con, _ = db
    store.load_loss_shard(con, BASE, 0, tmp_path / f"{BASE}.parquet")
    n, distinct = con.execute("SELECT count(*), count(DISTINCT (sample_id, pos)) FROM token_losses "
                              "WHERE model = ?", [BASE]).fetchone()
    assert n == distinct == 50


def test_scores_are_base_minus_reference(db):
    con, score = db
    rows = con.execute("SELECT sample_id, pos, base_loss, ref_loss, score FROM token_scores").fetchall()
    assert len(rows) == 50
    again = store.ensure_scores(con, SCORES, BASE, REF, DATASET, [0, 1])  # complete under its key: nothing added
    assert again["n_added"] == 0 and again["n_scores"] == 50
    for s, p, b, r, sc in rows:
        assert sc == pytest.approx(b - r) and sc == pytest.approx(score[(s, p)], abs=1e-6)


def test_global_keeps_exact_top_k_with_deterministic_ties(db):
    con, score = db
    out = select_tokens(con, "g", "global", 0.3, [0, 1], iteration=1)
    assert out["n_kept"] == 15 and out["n_candidates"] == 50
    kept = set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = 'g'").fetchall())
    expected = sorted(score, key=lambda t: (-score[t], t[0], t[1]))[:15]
    assert kept == set(expected)
    assert out["threshold"] == pytest.approx(min(score[t] for t in expected))
    # global selection can empty a sample entirely
    per_sample = dict(con.execute("SELECT sample_id, count(*) FROM selected_tokens WHERE selection='g' "
                                  "GROUP BY 1").fetchall())
    assert len(per_sample) < 10


def _apportioned(k: float, lengths) -> dict[int, int]:
    """Largest-remainder quotas in exact rational arithmetic: floor(k n_i), then one more for the
    samples with the largest remainders (ties to the smaller sample id) until round(k N) is spent."""
    from fractions import Fraction

    kk = Fraction(str(k))
    quota = {i: math.floor(kk * int(n)) for i, n in enumerate(lengths)}
    spare = round(k * int(sum(lengths))) - sum(quota.values())
    by_rest = sorted((i for i, n in enumerate(lengths) if kk * int(n) % 1), key=lambda i: (-(kk * int(lengths[i]) % 1), i))
    for i in by_rest[:spare]:
        quota[i] += 1
    return quota


@pytest.mark.parametrize("k,lengths", [(0.3, None), (0.29, None), (0.6, None), (0.77, None), (0.1, None),
                                       (0.6, [2, 7, 12]),  # remainders all exactly 0.2: the id decides
                                       (0.6, [12, 7, 2, 7, 12, 2])])
def test_local_spends_the_global_budget_top_per_sample(tmp_path, k, lengths):
    """Local keeps exactly round(k * N) tokens, as global does; each sample its best floor(k n_i), and one
    more for the largest remainders k n_i - floor(k n_i), equal remainders going to the smaller sample id."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 23, 40) if lengths is None else np.array(lengths)
    rows = []
    for i, n_resp in enumerate(lengths):
        rows.append({"sample_id": i, "tokenization": "t", "uid": f"u{i}", "source": "t", "row_index": i, "part": 0,
                     "task": None, "answer": None, "content_hash": str(i), "n_tokens": 2 + int(n_resp),
                     "n_response": int(n_resp), "truncated": False, "answer_start": -1, "answer_end": -1,
                     "input_ids": list(range(2 + n_resp)), "response_mask": [False, False] + [True] * int(n_resp),
                     "truth": None})
    con = store.connect(tmp_path / "run.duckdb")
    insert_dataset(con, DATASET, pa.Table.from_pylist(rows, schema=INGEST_SCHEMA), [], {}, {})
    toks = [(s, p) for s, n in enumerate(lengths) for p in range(2, 2 + n)]
    score = {t: float(v) for t, v in zip(toks, rng.permutation(len(toks)))}
    for model, f in ((BASE, lambda t: 2.0), (REF, lambda t: 2.0 - score[t] / 100)):
        path = tmp_path / f"{model}.parquet"
        storage.write_parquet(_losses(model, [(s, p, f((s, p))) for s, p in toks]), path)
        store.load_loss_shard(con, model, 0, path)
    store.ensure_scores(con, SCORES, BASE, REF, DATASET, [0])
    loc = select_tokens(con, "l", "local", k, [0], iteration=1)
    glo = select_tokens(con, "g", "global", k, [0], iteration=1)
    assert loc["n_kept"] == glo["n_kept"] == round(k * len(toks))
    quotas = _apportioned(k, lengths)
    for s, n in enumerate(lengths):
        kept = {p for (p,) in con.execute("SELECT pos FROM selected_tokens WHERE selection='l' AND sample_id=?",
                                          [s]).fetchall()}
        assert len(kept) == quotas[s], (s, n, len(kept), quotas[s])
        best = sorted(range(2, 2 + n), key=lambda p: -score[(s, p)])[:len(kept)]
        assert kept == set(best)
    con.close()


def test_random_is_exact_count_and_seeded(db):
    con, _ = db
    a = select_tokens(con, "r0", "random", 0.5, [0, 1], seed=0)
    select_tokens(con, "r0b", "random", 0.5, [0, 1], seed=0)
    select_tokens(con, "r1", "random", 0.5, [0, 1], seed=1)
    def get(n):
        return set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection=?", [n]).fetchall())

    assert a["n_kept"] == 25 and get("r0") == get("r0b") and get("r0") != get("r1")


def _truth_by_token(parts) -> dict[tuple[int, int], int]:
    """The fixture's labels counted from the table it ingested (not from the database): (sample, pos) -> label."""
    rows = _samples(10, 5, np.random.default_rng(0)).to_pylist()  # the db fixture's draw
    return {(r["sample_id"], p): r["truth"][p] for r in rows if r["part"] in parts
            for p in range(len(r["truth"])) if r["response_mask"][p]}


def _quality(kept: set, truth: dict) -> dict:
    from tokenclean.tasks.template import TRUTH_CORRUPTED, TRUTH_INFORMATIVE

    inf = {t for t, lab in truth.items() if lab == TRUTH_INFORMATIVE}
    bad = {t for t, lab in truth.items() if lab == TRUTH_CORRUPTED}
    return {"precision": len(kept & inf) / len(kept), "recall": len(kept & inf) / len(inf),
            "corrupted_kept": len(kept & bad) / len(bad)}


@pytest.mark.parametrize("method,k", [("full", 1.0), ("global", 0.3), ("local", 0.3), ("random", 0.5)])
def test_precision_recall_and_corrupted_kept_against_hand_counted_truth(db, method, k):
    """Each selection kind over part 0 only: its kept tokens lie in the pool, and precision (informative share
    of the kept), recall (share of the informative kept) and corrupted-kept (share of the corrupted kept)
    equal the counts over the labels as ingested, in the result and in the stored record."""
    con, _ = db
    truth = _truth_by_token([0])
    assert len(truth) == 25 and set(truth.values()) == {0, 1, 2}  # samples 0,2,4,6,8; all three labels
    out = select_tokens(con, method, method, k, [0], iteration=1 if method in ("global", "local") else None)
    kept = set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = ?", [method]).fetchall())
    assert kept <= set(truth) and out["n_kept"] == len(kept) == round(k * 25)
    want = _quality(kept, truth)
    if method != "full":  # the instance tells recall from the kept share, corrupted-kept from the corrupted share
        assert want["recall"] != len(kept) / len(truth)
        assert want["corrupted_kept"] != len(kept & {t for t, lab in truth.items() if lab == 2}) / len(kept)
    record = store.selection_record(con, method)
    for name, value in want.items():
        assert out[name] == pytest.approx(value, rel=1e-12), name
    assert (record["precision"], record["recall"]) == pytest.approx((want["precision"], want["recall"]), rel=1e-6)
    # recorded as the key sees them: k except for full, the seed for random only, the scores for ranked methods
    ranked = method in ("global", "local")
    assert (out["k"], record["k"]) == ((None, None) if method == "full" else (k, k))
    assert record["seed"] == (0 if method == "random" else None)
    assert record["scores"] == (SCORES if ranked else None)
    assert out["n_nonfinite_skipped"] == record["n_nonfinite"] == 0 and record["n_kept"] == len(kept)


def test_quality_of_several_selections_is_that_of_their_union(db):
    """Self-evolving iterations each select from their own part; their quality is the union's over both parts."""
    con, _ = db
    select_tokens(con, "it0", "global", 0.4, [0], iteration=1)
    select_tokens(con, "it1", "random", 0.6, [1], seed=3)
    kept = set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection IN ('it0', 'it1')").fetchall())
    want = _quality(kept, _truth_by_token([0, 1]))
    got = store.selection_quality(con, ["it0", "it1"], DATASET, [0, 1])
    assert got == pytest.approx(want, rel=1e-12)
    assert want != pytest.approx(_quality(kept & set(_truth_by_token([0])), _truth_by_token([0])))


def test_nonfinite_scores_are_reported_not_ranked(db, tmp_path):
    con, _ = db
    con.execute("UPDATE token_scores SET score = 'nan'::FLOAT WHERE sample_id = 3 AND pos = 2")
    con.execute("UPDATE token_scores SET score = 'inf'::FLOAT WHERE sample_id = 4 AND pos = 2")
    out = select_tokens(con, "g2", "global", 1.0, [0, 1], iteration=1)
    assert out["n_candidates"] == 48 and out["n_nonfinite_skipped"] == 2
    kept = set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection='g2'").fetchall())
    assert (3, 2) not in kept and (4, 2) not in kept
    # random ranks no score: given the scores all the same, it skips nothing and may keep those tokens
    out = store.write_selection(con, "r2", "random", 1.0, dataset=DATASET, parts=[0, 1],
                                pool=store.pool_digest(con, DATASET, [0, 1]), scores=SCORES, seed=0)
    assert out["n_candidates"] == out["n_kept"] == 50 and out["n_nonfinite_skipped"] == 0


def test_load_selected_builds_label_masks_and_drops_empty_samples(db):
    con, _ = db
    con.execute("INSERT INTO selected_tokens (selection, sample_id, pos) VALUES ('m', 1, 3), ('m', 1, 5), ('m', 4, 2)")
    samples = load_selected(con, "m")
    assert len(samples) == 2
    assert samples[0].label_mask.nonzero()[0].tolist() == [3, 5]
    assert samples[1].label_mask.nonzero()[0].tolist() == [2]
    for s in samples:  # the sample's own ids, as the array training_table reads
        assert s.input_ids.dtype == np.int32 and s.input_ids.tolist() == list(range(7))


def test_the_training_set_is_streamed_in_batches_and_equals_the_in_memory_one(db, tmp_path, monkeypatch):
    """``write_training_set`` (what training reads) streams the one selection reader a batch at a time into
    Parquet, and holds the same rows as the in-memory path; an empty selection writes no file."""
    import pyarrow.parquet as pq

    from tokenclean.tasks import select
    from tokenclean.tasks.train import training_table

    con, _ = db
    select_tokens(con, "g", "global", 0.6, [0, 1], iteration=1)
    path = str(tmp_path / "g.parquet")
    rows = select.write_training_set(con, "g", path)
    got = pq.read_table(path)
    assert rows == got.num_rows == len(load_selected(con, "g")) > 1
    assert got.equals(training_table(load_selected(con, "g")))
    seen = []
    real = store.selection_reader
    # small batches: the file is written as they come, never gathered first
    monkeypatch.setattr(store, "selection_reader",
                        lambda c, s: (seen.append(b.num_rows) or b for b in real(c, s, batch_rows=2)))
    select.write_training_set(con, "g", str(tmp_path / "g2.parquet"))
    assert len(seen) > 1 and max(seen) <= 2 and pq.ParquetFile(tmp_path / "g2.parquet").metadata.num_row_groups > 1
    with pytest.raises(ValueError, match="nothing to train on"):
        select.write_training_set(con, "no-such-selection", str(tmp_path / "none.parquet"))
    assert not (tmp_path / "none.parquet").exists() and not list(tmp_path.glob("none.parquet*"))


def test_writing_a_selection_again_replaces_its_tokens(db):
    """A selection recomputed under the same name holds the new kept set only, not the union with the old."""
    con, _ = db
    select_tokens(con, "s", "global", 0.6, [0, 1], iteration=1)
    out = select_tokens(con, "s", "global", 0.2, [0, 1], iteration=1)
    kept = con.execute("SELECT count(*) FROM selected_tokens WHERE selection = 's'").fetchone()[0]
    assert out["n_kept"] == kept == 10 and store.selection_record(con, "s")["n_kept"] == 10


def test_reingesting_the_same_samples_writes_nothing_new(db):
    """Samples are content-addressed: a second dataset holding the same samples shares their rows."""
    con, _ = db
    rng = np.random.default_rng(0)
    out = insert_dataset(con, "d1", _samples(12, 5, rng), [], {}, {})
    assert out == {"new_samples": 2, "known_samples": 10}
    assert con.execute("SELECT count(*) FROM response_tokens").fetchone()[0] == 60
    assert store.pool_digest(con, "d1", [0]) != store.pool_digest(con, DATASET, [0])  # sample 10 joined D0
    assert store.pool_digest(con, "d1", [1]) != store.pool_digest(con, DATASET, [1])  # sample 11 joined D1
    assert store.pool_digest(con, DATASET, [0]) == store.pool_digest(con, DATASET, [0])


def test_database_of_another_schema_is_refused(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    old = duckdb.connect(str(path))
    old.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    old.execute("CREATE TABLE token_losses (model VARCHAR, loss FLOAT)")
    old.close()
    with pytest.raises(store.SchemaMismatch, match="another tokenclean version"):
        store.connect(path)


def test_second_process_gets_database_busy(tmp_path):
    path = tmp_path / "busy.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(path)!r}); "
                               "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(store.DatabaseBusy, match="database busy"):
            store.connect(path, wait_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    store.connect(path).close()  # free again once the holder is gone


def test_schema_2_database_is_upgraded_in_place(tmp_path):
    """A run written before samples carried their text opens, keeps its rows, and gains the new columns."""
    import duckdb

    from tokenclean.tasks.store import db as store_db

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(store_db.SCHEMA.replace(", text VARCHAR, char_start INTEGER[], char_end INTEGER[]", ""))
    con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    con.execute("INSERT INTO samples (sample_id, uid, input_ids) VALUES (7, 'u7', [1, 2, 3])")
    con.close()
    with pytest.raises(store.SchemaMismatch):  # read-only cannot upgrade: refused, not misread
        store.connect(path, read_only=True)
    con = store.connect(path)
    assert con.execute("SELECT uid, input_ids, text, char_start FROM samples").fetchall() == [("u7", [1, 2, 3], None,
                                                                                               None)]
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == store_db.SCHEMA_VERSION
    con.close()


def test_schema_3_database_gains_the_reasoning_mask_and_reports_its_samples_as_unrecorded(tmp_path):
    """A run written before samples recorded their reasoning targets opens with its rows; the report counts
    those samples apart (their targets as answer), never as reasoning."""
    import duckdb

    from tokenclean.tasks.store import db as store_db

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    schema_3 = store_db.SCHEMA.replace(", reasoning_mask BOOLEAN[]", "")
    assert "reasoning_mask" not in schema_3
    con.execute(schema_3)
    con.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    con.close()
    con = store.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == store_db.SCHEMA_VERSION
    insert_dataset(con, DATASET, _samples(4, 3, np.random.default_rng(0)), [], {}, {})
    select_tokens(con, "all", "full", 1.0, [0, 1])
    assert store.report.kept_reasoning(con, "all", DATASET, [0, 1]) == {
        "reasoning": 0, "reasoning_kept": 0, "answer": 12, "answer_kept": 12, "unrecorded": 4}
    con.close()


def test_sample_batch_is_the_per_sample_arrays_flattened(tmp_path):
    """The flat arrays a scoring task receives hold exactly each sample's tokens and mask, in id order."""
    from tokenclean.tasks.score import SampleBatch

    rng = np.random.default_rng(1)
    rows = _samples(40, 5, rng).to_pylist()
    for r in rows:  # varied lengths, so offsets matter
        n = int(rng.integers(3, 30))
        r["input_ids"] = [int(x) for x in rng.integers(0, 1000, n)]
        r["response_mask"] = [bool(x) for x in rng.integers(0, 2, n)]
        r["truth"], r["n_tokens"] = [0] * n, n
    con = store.connect(tmp_path / "run.duckdb")
    insert_dataset(con, DATASET, pa.Table.from_pylist(rows, schema=INGEST_SCHEMA), [], {}, {})
    con.execute("SELECT 1").fetchone()  # an unfinished result on the connection must not matter
    ids = [int(x) for x in rng.choice(40, 17, replace=False)]
    batch = SampleBatch(*store.sample_batch(con, np.array(ids)))
    expect = sample_arrays(con, ids)
    assert len(batch) == 17 and batch.n_tokens == sum(len(a) for _, a, _ in expect)
    for got, (sid, toks, mask) in zip(batch.samples(), expect, strict=True):
        assert got.sample_id == sid and got.input_ids.dtype == np.int32 and got.target.dtype == bool
        assert np.array_equal(got.input_ids, toks) and np.array_equal(got.target, mask)
    assert len(SampleBatch(*store.sample_batch(con, []))) == 0
    con.close()


@pytest.mark.parametrize("seed", range(5))
def test_shards_cover_every_sample_once_within_their_budgets(seed):
    from tokenclean.flows.scoring import MIN_SHARD_TOKENS, chunk_shards, shard_token_budget

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    ids = np.sort(rng.choice(10**6, n, replace=False)).astype(np.int64)
    lengths = rng.integers(1, 5000, n).astype(np.int64)
    slots, cap = int(rng.integers(1, 9)), int(rng.choice([20000, 10**6, 4_194_304]))
    budget = shard_token_budget(int(lengths.sum()), slots, cap)
    assert min(cap, MIN_SHARD_TOKENS) <= budget <= cap
    max_samples = [None, int(rng.integers(1, 50))][seed % 2]
    shards = chunk_shards(ids, lengths, 7, budget, max_samples)
    assert [s for s, _ in shards] == list(range(7, 7 + len(shards)))
    assert np.array_equal(np.concatenate([c for _, c in shards]), ids)  # each id once, in order
    size = dict(zip(ids.tolist(), lengths.tolist()))
    for _, chunk in shards:
        tokens = sum(size[i] for i in chunk.tolist())
        assert tokens <= budget or len(chunk) == 1  # a longer sample is a shard of its own
        assert max_samples is None or len(chunk) <= max_samples
    if max_samples is None and budget > MIN_SHARD_TOKENS and budget < cap:
        # sized from the pool: about 4 shards per slot (more only from samples that do not fit evenly)
        assert len(shards) <= 4 * slots + int(np.ceil(lengths.max() * len(shards) / budget))


def test_a_shard_file_computed_otherwise_than_its_key_says_is_never_recovered(db, tmp_path):
    """An orphan shard (written, never loaded: the driver stopped) is recovered only if the numerics and
    kernel its file records are the key's; otherwise it is deleted and its samples are scored again."""
    import json

    from tokenclean.flows.scoring import recover_orphan_shards
    from tokenclean.tasks.steps import SHARD_META

    con, _ = db
    key = "f0"
    scorer = {"numerics": ["cpu", "float32"], "backend": "transformers", "compile": False}
    toks = [(s, p, 1.0) for s in range(3) for p in range(2, 7)]
    for shard, made in ((0, {"numerics": ["cpu", "bfloat16"]}), (1, {"numerics": ["cpu", "float32"],
                                                                     "linear_ce": "liger"})):
        table = _losses(key, [t for t in toks if t[0] == shard])
        storage.write_parquet(table.replace_schema_metadata({SHARD_META: json.dumps(made)}),
                              storage.shard_path(str(tmp_path / "shards"), shard))
    good = _losses(key, [t for t in toks if t[0] == 2]).replace_schema_metadata(
        {SHARD_META: json.dumps({"numerics": ["cpu", "float32"], "linear_ce": "chunked"})})
    storage.write_parquet(good, storage.shard_path(str(tmp_path / "shards"), 2))
    assert recover_orphan_shards(con, key, str(tmp_path / "shards"), scorer) == (1, 1)
    assert storage.shard_files(str(tmp_path / "shards")) == [storage.shard_path(str(tmp_path / "shards"), 2)]
    assert con.execute("SELECT DISTINCT sample_id FROM token_losses WHERE model = ?", [key]).fetchall() == [(2,)]
