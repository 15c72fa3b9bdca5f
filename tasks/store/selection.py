"""Token selections as SQL: global top-k and the baselines, written under the selection key.

* ``global``: the paper's rule. Rank every candidate token of the pool by score and keep
  exactly round(k * N); a sample may lose all its tokens.
* ``local``: RHO-1 style, top ceil(k * n_i) tokens within each sample.
* ``random``: exactly round(k * N) tokens chosen by a seeded md5 order (reproducible anywhere).
* ``full``: every response token.

Ties are broken by (sample_id, pos); sample ids are content-addressed, so a selection is
a pure function of its inputs and the same in any database that holds those samples.
Tokens whose score is NaN/inf are never ranked; they are counted and reported.
"""
from __future__ import annotations

import math

from tokenclean.tasks.store.data import pool_relation
from tokenclean.tasks.store.db import sql_parts, transaction
from tokenclean.tasks.store.losses import scores_relation
from tokenclean.tasks.store.ranking import global_threshold, global_topk_sql

METHODS = ("global", "local", "random", "full")


def selection_record(con, selection: str) -> dict | None:
    """The stored summary of a complete selection, or None."""
    cur = con.execute("SELECT * FROM selections WHERE selection = ?", [selection])
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row)) if row else None


def _candidates_sql(dataset: str, parts: list[int], scores: str | None) -> str:
    """Candidate tokens of the pool: with finite scores when ``scores`` is given, else every response token."""
    if scores is None:
        return (f"SELECT rt.sample_id, rt.pos, NULL::FLOAT AS score FROM response_tokens rt "
                f"WHERE rt.sample_id IN (SELECT sample_id FROM {pool_relation(dataset, parts)})")
    return scores_relation(scores, dataset, parts)


def write_selection(con, selection: str, method: str, k: float, *, dataset: str, parts: list[int], pool: str,
                    scores: str | None, seed: int) -> dict:
    """Compute and store one selection under its key, in one transaction."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose from {METHODS}")
    if method in ("global", "local") and scores is None:
        raise ValueError(f"method {method!r} needs scores: pass the key of the token scores to rank")
    cand = _candidates_sql(dataset, parts, scores if method in ("global", "local") else None)
    with transaction(con):
        n_cand = con.execute(f"SELECT count(*) FROM ({cand})").fetchone()[0]
        n_keep = n_cand if method == "full" else int(round(k * n_cand))
        threshold = None
        if method == "full":
            kept_sql = f"SELECT sample_id, pos FROM ({cand})"
        elif method == "global":
            # Exact threshold by a few aggregate passes, then a streamed filter: 3-4x faster and
            # 2.6x less memory than ORDER BY ... LIMIT at 1e8 tokens (docs/benchmarks.md).
            info = global_threshold(con, cand, n_keep, n_total=n_cand)
            kept_sql = global_topk_sql(cand, n_keep, info)
            threshold = info["threshold"]
        elif method == "random":
            # md5, not DuckDB's hash(): the same key must mean the same tokens in any DuckDB version
            kept_sql = f"""SELECT sample_id, pos FROM ({cand})
                           ORDER BY md5({int(seed)}::VARCHAR || ':' || sample_id::VARCHAR || ':' || pos::VARCHAR),
                                    sample_id, pos LIMIT {n_keep}"""
        else:  # local
            kept_sql = f"""SELECT sample_id, pos FROM (
                             SELECT sample_id, pos,
                                    row_number() OVER (PARTITION BY sample_id ORDER BY score DESC, pos) AS rn,
                                    count(*) OVER (PARTITION BY sample_id) AS n
                             FROM ({cand})) WHERE rn <= ceil({float(k)} * n)"""
        con.execute("DELETE FROM selected_tokens WHERE selection = ?", [selection])
        con.execute(f"INSERT INTO selected_tokens SELECT ?, sample_id, pos FROM ({kept_sql})", [selection])
        n_kept = con.execute("SELECT count(*) FROM selected_tokens WHERE selection = ?", [selection]).fetchone()[0]
        precision, recall = selection_quality(con, [selection], dataset, parts)
        n_bad = 0
        if scores is not None and method in ("global", "local"):
            n_bad = con.execute(f"SELECT count(*) FROM ({scores_relation(scores, dataset, parts, False)}) "
                                f"WHERE NOT isfinite(score)").fetchone()[0]
        # recorded as the key sees them: only the inputs this method uses (full ignores k, only random a seed)
        ranked = method in ("global", "local")
        con.execute("INSERT OR REPLACE INTO selections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [selection, method, None if method == "full" else k, seed if method == "random" else None,
                     scores if ranked else None, pool, dataset, sql_parts(parts), threshold, n_cand, n_kept,
                     n_bad, precision, recall])
    return {"method": method, "k": None if method == "full" else k, "threshold": threshold, "n_candidates": n_cand, "n_kept": n_kept,
            "n_nonfinite_skipped": n_bad, "precision": precision, "recall": recall}


def selection_quality(con, selections: list[str], dataset: str, parts: list[int]) -> tuple:
    """Precision/recall of kept tokens against ground-truth labels, when the data carries them.

    Several selections (the self-evolving iterations, each over its own D_t) are scored
    as their union over the union of their pools.
    """
    row = con.execute(
        f"""
        WITH pool AS (SELECT rt.sample_id, rt.pos, rt.truth FROM response_tokens rt
                      WHERE rt.sample_id IN (SELECT sample_id FROM {pool_relation(dataset, parts)})
                        AND rt.truth IS NOT NULL),
             kept AS (SELECT p.truth FROM pool p SEMI JOIN (SELECT DISTINCT sample_id, pos FROM selected_tokens
                      WHERE selection IN (SELECT unnest(?))) st USING (sample_id, pos))
        SELECT (SELECT count(*) FROM pool), (SELECT count(*) FILTER (WHERE truth = 1) FROM pool),
               (SELECT count(*) FROM kept), (SELECT count(*) FILTER (WHERE truth = 1) FROM kept)
        """, [list(selections)]).fetchone()
    n_pool, n_inf, n_kept, n_kept_inf = row
    if not n_pool:
        return None, None
    precision = n_kept_inf / n_kept if n_kept else math.nan
    recall = n_kept_inf / n_inf if n_inf else math.nan
    return precision, recall


def selected_rows(con, selection: str) -> list[tuple]:
    """(sample_id, input_ids, kept positions) of every sample with a kept token, ordered by sample id.

    Samples that lost every token are absent (the inner join drops them).
    """
    return con.execute(
        """SELECT s.sample_id, any_value(s.input_ids), list(st.pos ORDER BY st.pos) FROM selected_tokens st
           JOIN samples s USING (sample_id) WHERE st.selection = ? GROUP BY s.sample_id ORDER BY s.sample_id""",
        [selection]).fetchall()


def selection_digest(con, selection: str) -> tuple[int, str]:
    """(kept tokens, md5 of the sorted kept (sample_id, pos)): compare selections across databases by content."""
    return con.execute(
        """SELECT count(*), md5(coalesce(string_agg(s.uid || ':' || st.pos::VARCHAR, ',' ORDER BY s.uid, st.pos), ''))
           FROM selected_tokens st JOIN samples s USING (sample_id) WHERE st.selection = ?""", [selection]).fetchone()


def kept_positions(con, selection: str, sample_id: int) -> set[int]:
    return {r[0] for r in con.execute("SELECT pos FROM selected_tokens WHERE selection = ? AND sample_id = ?",
                                      [selection, sample_id]).fetchall()}
