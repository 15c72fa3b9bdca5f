"""The ``sample`` and ``weighted`` selections on a real DuckDB file with hand-made scores, and training with
per-token weights on the tiny real model."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.ingest_helpers import insert_dataset
from tokenclean.tasks import storage, store
from tokenclean.tasks.store import INGEST_SCHEMA

DATASET, BASE, REF, SCORES = "d0", "b0", "c1", "e1"  # hand-made keys


def _pool(con, tmp_path, lengths: list[int], scores: list[list[float]]) -> None:
    """Samples of 2 prompt tokens + lengths[i] response tokens, whose token scores are ``scores[i]``
    (base loss 2.0, reference loss 2.0 - score: quarter multiples stay exact through the float32 losses)."""
    rows = [{"sample_id": i, "tokenization": "t", "uid": f"u{i}", "source": "t", "row_index": i, "part": 1,
             "task": None, "answer": None, "content_hash": str(i), "n_tokens": n + 2, "n_response": n,
             "truncated": False, "answer_start": -1, "answer_end": -1, "input_ids": [7 + (i + j) % 50
                                                                                      for j in range(n + 2)],
             "response_mask": [False, False] + [True] * n, "truth": [0] * (n + 2)} for i, n in enumerate(lengths)]
    insert_dataset(con, DATASET, pa.Table.from_pylist(rows, schema=INGEST_SCHEMA), [], {}, {})
    toks = [(i, 2 + j, s) for i, ss in enumerate(scores) for j, s in enumerate(ss)]
    for model, loss in ((BASE, lambda s: 2.0), (REF, lambda s: 2.0 - s)):
        sid, pos, sc = zip(*toks)
        table = pa.table({"sample_id": pa.array(sid, pa.int64()), "pos": pa.array(pos, pa.int32()),
                          "token_id": pa.array(pos, pa.int32()),
                          "loss": pa.array([loss(s) for s in sc], pa.float32())})
        path = tmp_path / f"{model}.parquet"
        storage.write_parquet(table, path)
        store.load_loss_shard(con, model, 0, path)
    store.ensure_scores(con, SCORES, BASE, REF, DATASET, [1])


def _select(con, name: str, method: str, k: float | None) -> dict:
    return store.write_selection(con, name, method, k, dataset=DATASET, parts=[1],
                                 pool=store.pool_digest(con, DATASET, [1]), scores=SCORES, seed=0)


def _kept(con, name: str) -> dict[tuple[int, int], float | None]:
    return {(s, p): w for s, p, w in con.execute("SELECT sample_id, pos, weight FROM selected_tokens "
                                                 "WHERE selection = ?", [name]).fetchall()}


def _random_pool(rng, n_samples: int) -> tuple[list[int], list[list[float]]]:
    """Random lengths; scores in quarters from a small range (ties, equal sample means) and a few NaN."""
    lengths = [int(x) for x in rng.integers(1, 25, n_samples)]
    scores = [[float(v) for v in rng.integers(-6, 7, n) / 4] for n in lengths]
    for ss in scores:
        for j in range(len(ss)):
            if rng.random() < 0.04:
                ss[j] = math.nan
    return lengths, scores


def _sample_rule(scores: list[list[float]], k: float) -> tuple[list[int], list[int], int, dict[int, int]]:
    """The ``sample`` rule in plain Python: (the mean-score ranking, its kept prefix, the budget, candidates per
    sample)."""
    cand = {i: [s for s in ss if math.isfinite(s)] for i, ss in enumerate(scores)}
    n_cand = {i: len(c) for i, c in cand.items() if c}
    order = sorted(n_cand, key=lambda i: (-(sum(cand[i]) / n_cand[i]), i))
    n_keep = round(k * sum(n_cand.values()))
    cums = list(itertools.accumulate(n_cand[i] for i in order))
    m = sum(1 for c in cums if c <= n_keep)  # the longest prefix within the budget
    below = cums[m - 1] if m else 0
    if m < len(order) and cums[m] - n_keep < n_keep - below:  # the crossing sample brings the total closer
        m += 1
    return order, order[:m], n_keep, n_cand


def _random_db(tmp_path, seed: int):
    """(the generator, a run database holding a random pool, the pool's scores per sample)."""
    rng = np.random.default_rng(seed)
    lengths, scores = _random_pool(rng, int(rng.integers(5, 60)))
    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, lengths, scores)
    return rng, con, scores


@pytest.mark.parametrize("seed", range(6))
def test_sample_keeps_whole_samples_a_prefix_of_the_mean_ranking_at_globals_budget(tmp_path, seed):
    rng, con, scores = _random_db(tmp_path, seed)
    for k in (float(rng.uniform(0.05, 0.95)), 0.5, 1.0):
        out = _select(con, f"s{k}", "sample", k)
        glob = _select(con, f"g{k}", "global", k)
        kept = _kept(con, f"s{k}")
        order, expect, n_keep, n_cand = _sample_rule(scores, k)
        assert out["n_candidates"] == glob["n_candidates"] and glob["n_kept"] == n_keep  # global's budget
        samples = {s for s, _ in kept}
        assert samples == set(expect), (k, n_keep)  # a prefix of the mean-score ranking
        for s in samples:  # whole samples: every finite-scored token of a kept sample
            assert {p for t, p in kept if t == s} == {2 + j for j, v in enumerate(scores[s]) if math.isfinite(v)}
        # the sample that crosses the budget: the last kept one when over it, else the first one left out
        if out["n_kept"] != n_keep:
            crossing = expect[-1] if out["n_kept"] > n_keep else order[len(expect)]
            assert abs(out["n_kept"] - n_keep) <= n_cand[crossing] / 2
        assert abs(out["n_kept"] - n_keep) <= max(n_cand.values())
        assert out["n_kept"] == len(kept) and set(kept.values()) == {None}
        assert store.selection_record(con, f"s{k}")["k"] == k
    con.close()


def test_sample_at_a_budget_between_two_samples_takes_the_closer_total(tmp_path):
    """Means 3 > 2 > 1 with 4, 6, 3 tokens (N = 13, prefix totals 4, 10, 13): budget 7 is 3 from 4 and from 10
    (a tie keeps 4); budget 8 is closer to 10; budget 12 to 13; budget 1 to 0."""
    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, [4, 6, 3], [[3.0] * 4, [2.0] * 6, [1.0] * 3])
    got = {n: _select(con, f"s{n}", "sample", n / 13)["n_kept"] for n in (7, 8, 12, 1)}
    assert got == {7: 4, 8: 10, 12: 13, 1: 0}
    con.close()


def test_sample_ties_in_mean_go_to_the_smaller_sample_id(tmp_path):
    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, [2, 2, 2, 2], [[1.0, 1.0], [0.5, 1.5], [2.0, 0.0], [0.0, 0.0]])
    _select(con, "s", "sample", 0.5)
    assert {s for s, _ in _kept(con, "s")} == {0, 1}
    con.close()


@pytest.mark.parametrize("seed", range(4))
def test_weighted_weights_are_the_average_rank_formula_and_average_one(tmp_path, seed):
    from scipy.stats import rankdata

    _, con, scores = _random_db(tmp_path, seed)
    out = _select(con, "w", "weighted", 0.3)
    kept = _kept(con, "w")
    cand = [(i, 2 + j, s) for i, ss in enumerate(scores) for j, s in enumerate(ss) if math.isfinite(s)]
    expect = (2 * rankdata([s for _, _, s in cand]) / (len(cand) + 1)).astype(np.float32)
    assert kept == {(i, p): float(w) for (i, p, _), w in zip(cand, expect)}
    assert out["n_kept"] == out["n_candidates"] == len(cand) and out["k"] is None
    w = np.array(list(kept.values()), np.float64)
    assert w.min() > 0 and w.max() < 2 and abs(w.mean() - 1) < 1e-6
    rec = store.selection_record(con, "w")
    assert rec["k"] is None and rec["scores"] == SCORES
    con.close()


def test_weighted_with_all_scores_equal_weighs_every_token_exactly_one(tmp_path):
    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, [3, 5, 1, 7], [[0.25] * 3, [0.25] * 5, [0.25], [0.25] * 7])
    _select(con, "w", "weighted", None)
    assert set(_kept(con, "w").values()) == {1.0} and len(_kept(con, "w")) == 16
    con.close()


def test_weighted_content_differs_from_full_and_unweighted_keys_are_unchanged(tmp_path):
    """Weighted keeps every token as full does: only its weights tell their adapters apart."""
    from tokenclean.tasks.keys import digest

    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, [3, 5, 2], [[0.5, 1.0, -0.25], [0.0] * 5, [2.0, 1.0]])
    _select(con, "f", "full", None)
    _select(con, "w", "weighted", None)
    assert set(_kept(con, "f")) == set(_kept(con, "w"))
    assert store.selection_content(con, "f") != store.selection_content(con, "w")
    assert not store.is_weighted(con, "f") and store.is_weighted(con, "w")
    # an unweighted selection's content key is what it was before weights existed (adapters keep their keys)
    n, md5 = con.execute("SELECT count(*), md5(string_agg(sample_id::VARCHAR || ':' || pos::VARCHAR, ',' "
                         "ORDER BY sample_id, pos)) FROM selected_tokens WHERE selection = 'f'").fetchone()
    assert store.selection_content(con, "f") == digest("kept-tokens", n, md5)
    con.close()


def test_weighted_training_set_and_export_carry_weights_aligned_with_labels(tmp_path):
    from tokenclean.tasks.export import EXPORT_SCHEMA, write_dataset
    from tokenclean.tasks.select import write_training_set
    from tokenclean.tasks.train import TRAINING_SCHEMA, WEIGHTED_TRAINING_SCHEMA

    rng = np.random.default_rng(3)
    lengths, scores = _random_pool(rng, 30)
    con = store.connect(tmp_path / "run.duckdb")
    _pool(con, tmp_path, lengths, scores)
    _select(con, "w", "weighted", None)
    _select(con, "g", "global", 0.5)
    kept = _kept(con, "w")
    write_training_set(con, "w", str(tmp_path / "w.parquet"))
    write_training_set(con, "g", str(tmp_path / "g.parquet"))
    assert pq.read_schema(tmp_path / "g.parquet") == TRAINING_SCHEMA  # unweighted sets keep their bytes
    train = pq.read_table(tmp_path / "w.parquet")
    assert train.schema == WEIGHTED_TRAINING_SCHEMA
    res = write_dataset([store.selection_reader(con.cursor(), "w", SCORES)], tmp_path / "export-w.parquet", "parquet")
    rows = pq.read_table(res["path"]).to_pylist()
    assert pq.read_schema(res["path"]) == EXPORT_SCHEMA and len(rows) == train.num_rows
    for r, t in zip(rows, train.to_pylist()):
        w, labels = np.array(r["token_weights"]), np.array(r["labels"])
        assert np.array_equal(w > 0, labels != -100), r["id"]
        assert all(w[p] == kept[(r["sample_id"], p)] for p in np.flatnonzero(labels != -100))
        assert t["labels"] == r["labels"] and np.array_equal(np.array(t["weights"], np.float32), w)
    plain = write_dataset([store.selection_reader(con.cursor(), "g", SCORES)], tmp_path / "export-g.parquet", "parquet")
    assert {r["token_weights"] is None for r in pq.read_table(plain["path"]).to_pylist()} == {True}
    con.close()


# ---- training with weights, on the tiny real model -------------------------------------------------------

def _train(tiny, samples, out):
    """Two optimiser steps (one per epoch) of two micro-batches: step 1's loss is over every sample."""
    from safetensors.torch import load_file

    from tokenclean.tasks.train import TrainJob, train_worker, training_table

    cfg = {"lr": 5e-3, "batch_size": 4, "per_device_batch_size": 2, "epochs": 2, "checkpoint_every": 0,
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    stats = train_worker(TrainJob(str(tiny.model), cfg, training_table(samples), str(out), str(out) + ".ckpt",
                                  key=out.name, device="cpu", dtype="float32"))
    return stats, load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def train_samples(tiny, tokenizer):
    from tests.ingest_helpers import ingest
    from tokenclean.tasks.train import TrainSample

    res = ingest([str(tiny.train)], [], tokenizer, max_length=256, eval_fraction=0.0, n_parts=2, seed=0)
    rng = np.random.default_rng(5)
    samples = [TrainSample(np.array(r["input_ids"], np.int32),
                           np.array(r["response_mask"]) & (rng.random(len(r["input_ids"])) < 0.7))
               for r in res.samples.to_pylist()[:4]]
    assert all(s.label_mask.any() for s in samples)
    return samples


def _weighted(samples, weights_of):
    from tokenclean.tasks.train import TrainSample

    return [TrainSample(s.input_ids, s.label_mask, np.where(s.label_mask, weights_of(s), 0).astype(np.float32))
            for s in samples]


@pytest.fixture(scope="module")
def runs(tiny, train_samples, tmp_path_factory):
    """The same rows trained without weights, with weights all 1.0, and with weights drawn in (0.1, 1.9)."""
    root, rng = tmp_path_factory.mktemp("weights"), np.random.default_rng(0)
    varied = _weighted(train_samples, lambda s: rng.uniform(0.1, 1.9, len(s.input_ids)))
    return {"plain": _train(tiny, train_samples, root / "plain"),
            "ones": _train(tiny, _weighted(train_samples, lambda s: 1.0), root / "ones"),
            "varied": _train(tiny, varied, root / "varied"), "varied_samples": varied}


def test_all_one_weights_train_exactly_as_no_weights(runs):
    (plain, plain_w), (ones, ones_w) = runs["plain"], runs["ones"]
    assert plain_w.keys() == ones_w.keys() and all(torch.equal(plain_w[n], ones_w[n]) for n in plain_w)  # bit for bit
    losses = ("first_loss", "final_loss", "train_loss")
    assert [plain[f] for f in losses] == [ones[f] for f in losses]


def test_unequal_weights_train_on_the_weighted_token_mean(tiny, runs):
    """Step 1 sees the base model (LoRA B starts at zero): its loss is sum_i w_i * nll_i over the kept tokens of
    the step divided by their count, not the plain mean; and the adapter is not the unweighted one."""
    from transformers import AutoModelForCausalLM

    (stats, weights), (_, plain_w) = runs["varied"], runs["plain"]
    assert any(not torch.equal(plain_w[n], weights[n]) for n in plain_w)
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    weighted = unweighted = 0.0
    n = 0
    with torch.no_grad():
        for s in runs["varied_samples"]:
            pos = np.flatnonzero(s.label_mask)
            logits = model(torch.tensor(s.input_ids[None].astype(np.int64))).logits[0, pos - 1].double()
            nll = -torch.log_softmax(logits, -1)[torch.arange(len(pos)), torch.tensor(s.input_ids[pos]).long()]
            weighted += float((nll * torch.tensor(s.weights[pos], dtype=torch.float64)).sum())
            unweighted += float(nll.sum())
            n += len(pos)
    assert stats["first_loss"] == pytest.approx(weighted / n, rel=1e-5)
    assert abs(weighted - unweighted) / n > 1e-3  # the weights matter at this tolerance
