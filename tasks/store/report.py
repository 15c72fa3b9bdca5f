"""Aggregates for the HTML report, computed in DuckDB (Python sees bins and per-group counts)."""
from __future__ import annotations

import json

from tokenclean.tasks.names import REFERENCE, REFERENCE_D0
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


# ---- per-sample thresholds of a local selection ----------------------------------------------

# each sample's lowest kept score: a local selection's threshold for that sample
_SAMPLE_THRESHOLDS = """SELECT st.sample_id, min(ts.score) AS thr FROM selected_tokens st
    JOIN token_scores ts ON ts.scores = $scores AND ts.sample_id = st.sample_id AND ts.pos = st.pos
    WHERE st.selection = $selection GROUP BY st.sample_id"""


def sample_threshold_stats(con, selection: str, scores: str, dataset: str, parts: list[int]) -> dict:
    """Spread of a selection's per-sample thresholds (each sample's lowest kept score under ``scores``):
    {samples (of the pool with a finite score), keeping (samples keeping a token), min, q10, median, q90, max}."""
    row = con.execute(
        f"""WITH t AS ({_SAMPLE_THRESHOLDS})
            SELECT (SELECT count(DISTINCT sample_id) FROM ({scores_relation(scores, dataset, parts)})),
                   count(*), min(thr), quantile_cont(thr, 0.1), quantile_cont(thr, 0.5), quantile_cont(thr, 0.9),
                   max(thr) FROM t""", {"scores": scores, "selection": selection}).fetchone()
    return dict(zip(("samples", "keeping", "min", "q10", "median", "q90", "max"), row))


def sample_threshold_bins(con, selection: str, scores: str, lo: float, width: float, n_bins: int) -> list:
    """(bin, samples) of the per-sample thresholds in ``n_bins`` equal bins from ``lo`` (edge bins take outliers)."""
    return con.execute(
        f"""SELECT least(greatest(floor((thr - $lo) / $width)::BIGINT, 0), {int(n_bins) - 1}) AS b, count(*)
            FROM ({_SAMPLE_THRESHOLDS}) GROUP BY b""",
        {"scores": scores, "selection": selection, "lo": lo, "width": width}).fetchall()


# ---- flow runs: status, durations, stage timings, refresh history -------------------------------


def _rows(cur) -> list[dict]:
    return [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]


def flow_run_status(con) -> list[dict]:
    """The latest run of each flow, and its latest finished run where the latest has not finished (what the
    readers show), oldest start first: flow_run, flow, name (the config's), dataset, started_at, finished_at,
    seconds (None while unfinished)."""
    return _rows(con.execute(
        """WITH r AS (SELECT *, row_number() OVER (PARTITION BY flow ORDER BY started_at DESC) AS latest,
                             row_number() OVER (PARTITION BY flow, finished_at IS NULL ORDER BY started_at DESC) AS nth
                      FROM flow_runs)
           SELECT flow_run, flow, json_extract_string(config, '$.name') AS name, dataset, started_at, finished_at,
                  epoch(finished_at) - epoch(started_at) AS seconds
           FROM r WHERE latest = 1 OR (finished_at IS NOT NULL AND nth = 1) ORDER BY started_at, flow"""))


def stage_timings(con, flow_run: str) -> list[dict]:
    """A flow run's logged stages (each computed something), by start (finished_at less its seconds)."""
    return _rows(con.execute(
        """SELECT stage, name, key, seconds, finished_at - to_microseconds(round(seconds * 1e6)::BIGINT) AS started_at
           FROM stage_log WHERE flow_run = ? ORDER BY started_at, finished_at""", [flow_run]))


def reused_outputs(con, flow_run: str) -> list[dict]:
    """What a flow run used without computing it (kind, variant, iteration, key): it has no stage log row."""
    return _rows(con.execute(
        """SELECT kind, variant, iteration, key FROM run_outputs WHERE flow_run = ? AND kind <> 'model'
           GROUP BY ALL HAVING NOT bool_or(computed) ORDER BY kind, variant, iteration""", [flow_run]))


def refresh_history(con, flow: str, variant: str, limit: int = 100) -> list[dict]:
    """The newest ``limit`` finished runs of the refresh ``flow``, oldest first: when, the dataset, the ingest's
    detail (None when no dataset was ingested), per model the samples scored, whether theta_1 was retrained, and
    the selections named ``variant`` (``variant-k0.3`` in a sweep) with kept and candidate tokens."""
    rows = _rows(con.execute(
        """WITH r AS (SELECT flow_run, dataset, started_at, finished_at FROM flow_runs
                      WHERE flow = $flow AND finished_at IS NOT NULL ORDER BY started_at DESC LIMIT $limit),
                ing AS (SELECT flow_run, any_value(detail) AS ingest FROM stage_log WHERE stage = 'ingest'
                        GROUP BY flow_run),
                sc AS (SELECT flow_run, list({'name': name, 'samples': json_extract(detail, '$.samples_scored')::BIGINT}
                                             ORDER BY finished_at) AS scored
                       FROM stage_log WHERE stage = 'score' GROUP BY flow_run),
                o AS (SELECT flow_run, variant, kind, key, bool_or(computed) AS computed FROM run_outputs
                      WHERE flow_run IN (SELECT flow_run FROM r) GROUP BY ALL),
                sel AS (SELECT o.flow_run, list({'name': o.variant, 'kept': s.n_kept, 'candidates': s.n_candidates}
                                                ORDER BY o.variant) AS selections
                        FROM o JOIN selections s ON s.selection = o.key
                        WHERE o.kind = 'selection' AND (o.variant = $variant OR o.variant LIKE $variant || '-k%')
                        GROUP BY o.flow_run),
                ref AS (SELECT flow_run, bool_or(computed) AS retrained FROM o
                        WHERE kind = 'adapter' AND variant IN ($ref, $ref_d0) GROUP BY flow_run)
           SELECT r.*, ing.ingest, sc.scored, sel.selections, ref.retrained FROM r
           LEFT JOIN ing USING (flow_run) LEFT JOIN sc USING (flow_run) LEFT JOIN sel USING (flow_run)
           LEFT JOIN ref USING (flow_run) ORDER BY r.started_at""",
        {"flow": flow, "variant": variant, "limit": limit, "ref": REFERENCE, "ref_d0": REFERENCE_D0}))
    for row in rows:
        row["ingest"] = json.loads(row["ingest"]) if row["ingest"] else None
    return rows
