"""Token selection, as SQL over DuckDB: global top-k and the three baselines.

* ``global``: the paper's rule. Rank every candidate token of the pool by score and keep
  exactly round(k * N); a sample may lose all its tokens.
* ``local``: RHO-1 style, top ceil(k * n_i) tokens within each sample.
* ``random``: exactly round(k * N) tokens chosen by a seeded hash (reproducible).
* ``full``: every response token.

Ties are broken by (sample_id, pos), so a selection is a pure function of its inputs.
Tokens whose score is NaN/inf are never ranked; they are counted and reported.
"""
from __future__ import annotations

import math
import time

from tasks.ranking import global_threshold, global_topk_sql

METHODS = ("global", "local", "random", "full")


def sql_parts(parts: list[int]) -> str:
    """SQL list literal of part numbers (ints only, so safe to inline)."""
    return ",".join(str(int(p)) for p in parts)


def materialize_scores(con, iteration: int, ref_model: str, parts: list[int], base_model: str = "base") -> dict:
    """token_scores for one iteration: join stored base and reference losses (base computed once)."""
    in_parts = sql_parts(parts)
    # Only this pool's rows are replaced: iteration t means "scored by theta_t", and the
    # fixed-model and self-evolving flows share theta_1's scores over different pools.
    con.execute(f"DELETE FROM token_scores WHERE iteration = ? AND sample_id IN "
                f"(SELECT sample_id FROM samples WHERE part IN ({in_parts}))", [iteration])
    con.execute(
        f"""
        INSERT INTO token_scores
        SELECT ?, b.sample_id, b.pos, b.token_id, b.loss, r.loss, b.loss - r.loss
        FROM token_losses b
        JOIN token_losses r ON r.sample_id = b.sample_id AND r.pos = b.pos AND r.model = ?
        JOIN samples s ON s.sample_id = b.sample_id
        WHERE b.model = ? AND s.part IN ({in_parts})
        """,
        [iteration, ref_model, base_model],
    )
    n, bad = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE NOT isfinite(score)) FROM token_scores WHERE iteration = ? "
        f"AND sample_id IN (SELECT sample_id FROM samples WHERE part IN ({in_parts}))", [iteration],
    ).fetchone()
    return {"n_scores": n, "n_nonfinite": bad}


def _candidates_sql(parts: list[int], iteration: int | None) -> str:
    """Candidate tokens of the pool: with scores when an iteration is given, else every response token."""
    in_parts = sql_parts(parts)
    if iteration is None:
        return f"""SELECT rt.sample_id, rt.pos, NULL::FLOAT AS score FROM response_tokens rt
                   JOIN samples s USING (sample_id) WHERE s.part IN ({in_parts})"""
    return f"""SELECT ts.sample_id, ts.pos, ts.score FROM token_scores ts JOIN samples s USING (sample_id)
               WHERE ts.iteration = {int(iteration)} AND s.part IN ({in_parts}) AND isfinite(ts.score)"""


def select_tokens(con, selection: str, method: str, k: float, parts: list[int], *, iteration: int | None = None,
                  seed: int = 0) -> dict:
    """Write the kept (sample_id, pos) of one selection to ``selected_tokens``; return its summary."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose from {METHODS}")
    if method in ("global", "local") and iteration is None:
        raise ValueError(f"method {method!r} needs scores: pass the iteration whose token_scores to rank")
    t0 = time.perf_counter()
    cand = _candidates_sql(parts, iteration if method in ("global", "local") else None)
    n_cand = con.execute(f"SELECT count(*) FROM ({cand})").fetchone()[0]
    n_keep = n_cand if method == "full" else int(round(k * n_cand))
    con.execute("DELETE FROM selected_tokens WHERE selection = ?", [selection])
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
        kept_sql = f"""SELECT sample_id, pos FROM ({cand})
                       ORDER BY hash({int(seed)}, sample_id, pos), sample_id, pos LIMIT {n_keep}"""
    else:  # local
        kept_sql = f"""SELECT sample_id, pos FROM (
                         SELECT sample_id, pos,
                                row_number() OVER (PARTITION BY sample_id ORDER BY score DESC, pos) AS rn,
                                count(*) OVER (PARTITION BY sample_id) AS n
                         FROM ({cand})) WHERE rn <= ceil({float(k)} * n)"""
    con.execute(f"INSERT INTO selected_tokens SELECT ?, sample_id, pos FROM ({kept_sql})", [selection])
    n_kept = con.execute("SELECT count(*) FROM selected_tokens WHERE selection = ?", [selection]).fetchone()[0]
    precision, recall = selection_quality(con, selection, parts)
    n_bad = 0
    if iteration is not None:
        n_bad = con.execute(
            f"SELECT count(*) FROM token_scores ts JOIN samples s USING (sample_id) WHERE ts.iteration = ? "
            f"AND s.part IN ({sql_parts(parts)}) AND NOT isfinite(ts.score)", [iteration]
        ).fetchone()[0]
    con.execute("DELETE FROM selections WHERE selection = ?", [selection])
    con.execute(
        "INSERT INTO selections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
        [selection, method, k, iteration, threshold, n_cand, n_kept, precision, recall],
    )
    return {"selection": selection, "method": method, "k": k, "iteration": iteration, "threshold": threshold,
            "n_candidates": n_cand, "n_kept": n_kept, "n_nonfinite_skipped": n_bad, "precision": precision,
            "recall": recall, "seconds": time.perf_counter() - t0}


def selection_quality(con, selection: str | list[str], parts: list[int]) -> tuple[float | None, float | None]:
    """Precision/recall of kept tokens against ground-truth labels, when the data carries them.

    Several selections (the self-evolving iterations, each over its own D_t) are scored
    as their union over the union of their pools.
    """
    in_parts = sql_parts(parts)
    names = [selection] if isinstance(selection, str) else list(selection)
    row = con.execute(
        f"""
        WITH pool AS (SELECT rt.sample_id, rt.pos, rt.truth FROM response_tokens rt JOIN samples s USING (sample_id)
                      WHERE s.part IN ({in_parts}) AND rt.truth IS NOT NULL),
             kept AS (SELECT p.truth FROM pool p JOIN selected_tokens st
                      ON st.sample_id = p.sample_id AND st.pos = p.pos AND st.selection IN (SELECT unnest(?)))
        SELECT (SELECT count(*) FROM pool), (SELECT count(*) FILTER (WHERE truth = 1) FROM pool),
               (SELECT count(*) FROM kept), (SELECT count(*) FILTER (WHERE truth = 1) FROM kept)
        """,
        [names],
    ).fetchone()
    n_pool, n_inf, n_kept, n_kept_inf = row
    if not n_pool:
        return None, None
    precision = n_kept_inf / n_kept if n_kept else math.nan
    recall = n_kept_inf / n_inf if n_inf else math.nan
    return precision, recall


def load_selected(con, selection: str):
    """Training samples of a selection: input ids with a label mask at the kept positions.

    Samples that lost every token are absent (the inner join drops them).
    """
    import numpy as np

    from tasks.train import TrainSample

    rows = con.execute(
        """SELECT s.sample_id, any_value(s.input_ids), list(st.pos) FROM selected_tokens st
           JOIN samples s USING (sample_id) WHERE st.selection = ? GROUP BY s.sample_id ORDER BY s.sample_id""",
        [selection],
    ).fetchall()
    out = []
    for _, ids, pos in rows:
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.asarray(pos, dtype=np.int64)] = True
        out.append(TrainSample(ids, mask))
    return out
