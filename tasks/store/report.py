"""Aggregates for the HTML report, computed in DuckDB (Python sees bins and per-group counts)."""
from __future__ import annotations

from tokenclean.tasks.store.data import pool_relation
from tokenclean.tasks.store.losses import scores_relation


def score_stats(con, scores: str, dataset: str, parts: list[int]) -> tuple:
    """(n, non-finite, min, max, q0.001, q0.999, mean) of a pool's scores; quantiles over finite scores."""
    rel = scores_relation(scores, dataset, parts, finite_only=False)
    return con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE NOT isfinite(score)),
                   min(score) FILTER (WHERE isfinite(score)), max(score) FILTER (WHERE isfinite(score)),
                   approx_quantile(score, 0.001) FILTER (WHERE isfinite(score)),
                   approx_quantile(score, 0.999) FILTER (WHERE isfinite(score)),
                   avg(score) FILTER (WHERE isfinite(score)) FROM ({rel})""").fetchone()


def score_bins(con, scores: str, dataset: str, parts: list[int], lo: float, width: float, n_bins: int) -> list:
    """(bin, count) of finite scores in ``n_bins`` equal bins from ``lo``; outliers fall into the edge bins."""
    rel = scores_relation(scores, dataset, parts)
    return con.execute(
        f"""SELECT least(greatest(floor((score - ?) / ?)::BIGINT, 0), {int(n_bins) - 1}) AS b, count(*)
            FROM ({rel}) GROUP BY b""", [lo, width]).fetchall()


def kept_by_source(con, selection: str, dataset: str, parts: list[int]) -> list[tuple]:
    """(source, kept tokens, response tokens) of a selection's pool, per source file."""
    pool = pool_relation(dataset, parts)
    return con.execute(
        f"""WITH p AS (SELECT p.sample_id, p.source, s.n_response FROM {pool} p JOIN samples s USING (sample_id)),
                 k AS (SELECT p.source, count(*) AS n FROM selected_tokens st JOIN p USING (sample_id)
                       WHERE st.selection = ? GROUP BY ALL)
            SELECT p.source, coalesce(any_value(k.n), 0)::BIGINT, sum(p.n_response)::BIGINT
            FROM p LEFT JOIN k USING (source) GROUP BY p.source ORDER BY p.source""", [selection]).fetchall()


def metric_by_task(con, eval_key: str, metric: str) -> dict:
    """{task (None = overall): value} of one metric of one evaluation."""
    return dict(con.execute("SELECT task, value FROM metrics WHERE eval = ? AND metric = ?",
                            [eval_key, metric]).fetchall())


def pick_samples(con, dataset: str, parts: list[int], n: int) -> list[tuple]:
    """Up to ``n`` samples of a pool, round-robin over sources (first by sample id within each)."""
    return con.execute(
        f"""WITH pick AS (
              SELECT sample_id, source, part, row_number() OVER (PARTITION BY source ORDER BY sample_id) AS rn
              FROM {pool_relation(dataset, parts)} ORDER BY rn, source, sample_id LIMIT ?)
            SELECT s.sample_id, s.uid, pick.source, pick.part, s.task, s.input_ids, s.response_mask, s.truth
            FROM pick JOIN samples s USING (sample_id) ORDER BY pick.rn, pick.source, pick.sample_id""",
        [n]).fetchall()


def kept_in(con, selection: str, sample_ids: list[int]) -> list[tuple]:
    return con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = ? "
                       "AND sample_id IN (SELECT unnest(?))", [selection, sample_ids]).fetchall()


def scores_in(con, scores: str, sample_ids: list[int]) -> list[tuple]:
    return con.execute("SELECT sample_id, pos, score FROM token_scores WHERE scores = ? "
                       "AND sample_id IN (SELECT unnest(?))", [scores, sample_ids]).fetchall()


def kept_reasoning(con, selection: str, dataset: str, parts: list[int]) -> dict:
    """A selection's kept tokens among its pool's reasoning and answer targets: {reasoning, reasoning_kept,
    answer, answer_kept, unrecorded} (unrecorded: samples ingested before reasoning was recorded, counted as
    answer)."""
    pool = pool_relation(dataset, parts)
    row = con.execute(
        f"""WITH p AS (SELECT s.sample_id, s.n_response, s.reasoning_mask FROM samples s SEMI JOIN {pool} p
                       USING (sample_id)),
                 r AS (SELECT sample_id, pos FROM (
                         SELECT sample_id, generate_subscripts(reasoning_mask, 1) - 1 AS pos,
                                unnest(reasoning_mask) AS reasoning FROM p WHERE reasoning_mask IS NOT NULL)
                       WHERE reasoning),
                 k AS (SELECT st.sample_id, st.pos FROM selected_tokens st SEMI JOIN p USING (sample_id)
                       WHERE st.selection = ?)
            SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM k SEMI JOIN r USING (sample_id, pos)),
                   (SELECT coalesce(sum(n_response), 0) FROM p), (SELECT count(*) FROM k),
                   (SELECT count(*) FROM p WHERE reasoning_mask IS NULL)""", [selection]).fetchone()
    reasoning, reasoning_kept, targets, kept, unrecorded = (int(x) for x in row)
    return {"reasoning": reasoning, "reasoning_kept": reasoning_kept, "answer": targets - reasoning,
            "answer_kept": kept - reasoning_kept, "unrecorded": unrecorded}
