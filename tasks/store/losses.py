"""Per-token losses of models and the scores derived from them, all under model keys.

A model key names base weights (+ one adapter's saved weights) exactly, so losses
stored under it are valid for as long as the samples exist: they are never deleted or
overwritten by a retraining, which writes under a new key instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tokenclean.tasks.store.data import pool_relation
from tokenclean.tasks.store.db import sql_key, transaction


def record_model(con, model: str, kind: str, inputs: dict) -> None:
    con.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, now())", [model, kind, json.dumps(inputs)])


def model_inputs(con, model: str) -> dict | None:
    row = con.execute("SELECT inputs FROM models WHERE model = ?", [model]).fetchone()
    return json.loads(row[0]) if row else None


def unscored_lengths(con, model: str, dataset: str, parts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Samples of the pool with no loss yet under ``model`` (a shard loads all of a sample's losses or none),
    in pool order, with each sample's token count: two int64 arrays (what shard planning needs)."""
    got = con.execute(
        f"""SELECT p.sample_id, s.n_tokens FROM {pool_relation(dataset, parts)} p JOIN samples s USING (sample_id)
            WHERE NOT EXISTS (SELECT 1 FROM token_losses t WHERE t.model = ? AND t.sample_id = p.sample_id)
            ORDER BY p.part, p.sample_id""", [model]).fetchnumpy()
    return (np.asarray(got["sample_id"], dtype=np.int64), np.asarray(got["n_tokens"], dtype=np.int64))


def next_shard(con, model: str) -> int:
    return con.execute("SELECT coalesce(max(shard) + 1, 0) FROM shards_done WHERE model = ?", [model]).fetchone()[0]


def loaded_shards(con, model: str) -> set[int]:
    return {r[0] for r in con.execute("SELECT shard FROM shards_done WHERE model = ?", [model]).fetchall()}


def count_scored(con, model: str, sample_ids: list[int]) -> int:
    """How many of ``sample_ids`` already have losses under ``model``."""
    return con.execute("SELECT count(DISTINCT sample_id) FROM token_losses WHERE model = ? "
                       "AND sample_id IN (SELECT unnest(?))", [model, sample_ids]).fetchone()[0]


def load_loss_shard(con, model: str, shard: int, source) -> int:
    """Idempotent: a shard loaded twice leaves exactly one copy of its rows.

    ``source`` is a local Parquet path (read by DuckDB itself) or an Arrow table (a shard
    read from object storage by the caller).
    """
    with transaction(con):
        con.execute("DELETE FROM token_losses WHERE model = ? AND shard = ?", [model, shard])
        if isinstance(source, (str, Path)):
            con.execute(
                "INSERT INTO token_losses SELECT ?, ?, sample_id, pos, token_id, loss FROM read_parquet(?)",
                [model, shard, str(source)],
            )
        else:
            con.register("_shard_rows", source)
            try:
                con.execute("INSERT INTO token_losses SELECT ?, ?, sample_id, pos, token_id, loss FROM _shard_rows",
                            [model, shard])
            finally:
                con.unregister("_shard_rows")
        n = con.execute("SELECT count(*) FROM token_losses WHERE model = ? AND shard = ?", [model, shard]).fetchone()[0]
        con.execute("INSERT OR REPLACE INTO shards_done VALUES (?, ?, ?, now())", [model, shard, n])
    return n


def check_integrity(con, model: str, dataset: str, parts: list[int]) -> dict:
    """Every response token of the pool has exactly one loss under ``model``: no gaps, no duplicates."""
    pool = pool_relation(dataset, parts)
    missing, dupes, extra = con.execute(
        f"""
        WITH expected AS (SELECT rt.sample_id, rt.pos FROM response_tokens rt JOIN {pool} p USING (sample_id)),
             got AS (SELECT sample_id, pos, count(*) AS n FROM token_losses WHERE model = ?
                     AND sample_id IN (SELECT sample_id FROM {pool}) GROUP BY ALL)
        SELECT (SELECT count(*) FROM expected e ANTI JOIN got g USING (sample_id, pos)),
               (SELECT count(*) FROM got WHERE n > 1),
               (SELECT count(*) FROM got g ANTI JOIN expected e USING (sample_id, pos))
        """, [model]).fetchone()
    return {"model": model, "missing": missing, "duplicated": dupes, "unexpected": extra,
            "ok": missing == 0 and dupes == 0 and extra == 0}


def ensure_scores(con, scores: str, base_model: str, ref_model: str, dataset: str, parts: list[int]) -> dict:
    """token_scores under ``scores`` for every pool sample that has none yet (base computed once, reused).

    Scores are a pure function of two models' losses, which never change under their
    keys, so rows already stored under ``scores`` stay valid and only new samples are added.
    """
    pool = pool_relation(dataset, parts)
    with transaction(con):
        before = con.execute("SELECT count(*) FROM token_scores WHERE scores = ?", [scores]).fetchone()[0]
        con.execute(
            f"""INSERT INTO token_scores
                SELECT ?, b.sample_id, b.pos, b.loss, r.loss, b.loss - r.loss
                FROM token_losses b JOIN token_losses r ON r.sample_id = b.sample_id AND r.pos = b.pos AND r.model = ?
                WHERE b.model = ? AND b.sample_id IN (SELECT sample_id FROM {pool})
                  AND NOT EXISTS (SELECT 1 FROM token_scores ts WHERE ts.scores = ? AND ts.sample_id = b.sample_id)""",
            [scores, ref_model, base_model, scores])
        added = con.execute("SELECT count(*) FROM token_scores WHERE scores = ?", [scores]).fetchone()[0] - before
    n, bad = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE score IS NULL OR NOT isfinite(score)) FROM token_scores "
        f"WHERE scores = ? AND sample_id IN (SELECT sample_id FROM {pool})", [scores]).fetchone()
    return {"n_scores": n, "n_added": added, "n_nonfinite": bad}


def scores_relation(scores: str, dataset: str, parts: list[int], finite_only: bool = True) -> str:
    """SQL relation (sample_id, pos, score) of a pool's scores under ``scores``."""
    fin = "AND isfinite(ts.score)" if finite_only else ""
    return (f"SELECT ts.sample_id, ts.pos, ts.score FROM token_scores ts WHERE ts.scores = {sql_key(scores)} "
            f"AND ts.sample_id IN (SELECT sample_id FROM {pool_relation(dataset, parts)}) {fin}")


def sample_scores(con, scores: str, sample_id: int) -> dict[int, float]:
    return dict(con.execute("SELECT pos, score FROM token_scores WHERE scores = ? AND sample_id = ?",
                            [scores, sample_id]).fetchall())
