"""Adapters, evaluations, and what each flow run used and produced.

``run_outputs`` maps the names a user reads (``global``, ``self-evolving@2``) to the keys a flow run used; readers
show the latest *finished* run of each flow, never an earlier configuration's leftovers nor a killed run's
outputs. A flow run records its outputs as it goes and is marked finished last (docs/design.md, "The store").
"""
from __future__ import annotations

import json
import uuid

from tokenclean.tasks.store.db import transaction

# ---- adapters -------------------------------------------------------------------------


def adapter_record(con, adapter: str) -> dict | None:
    row = con.execute("SELECT model, path, inputs, stats FROM adapters WHERE adapter = ?", [adapter]).fetchone()
    if row is None:
        return None
    return {"adapter": adapter, "model": row[0], "path": row[1], "inputs": json.loads(row[2]),
            "stats": json.loads(row[3])}


def record_adapter(con, adapter: str, model: str, path: str, inputs: dict, stats: dict, model_inputs: dict) -> None:
    """An adapter (``path`` relative to the run directory) and the scoring model it defines, in one transaction."""
    with transaction(con):
        con.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, now())",
                    [adapter, model, path, json.dumps(inputs), json.dumps(stats)])
        con.execute("INSERT OR IGNORE INTO models VALUES (?, 'adapter', ?, now())", [model, json.dumps(model_inputs)])


# ---- evaluations ----------------------------------------------------------------------


def eval_done(con, eval_key: str) -> bool:
    return con.execute("SELECT count(*) FROM evals WHERE eval = ?", [eval_key]).fetchone()[0] > 0


def record_eval(con, eval_key: str, model: str, inputs: dict, rows: list[tuple[str, str | None, float]]) -> None:
    """All metrics of one evaluation ((metric, task, value) rows) and its record, in one transaction."""
    with transaction(con):
        con.execute("DELETE FROM metrics WHERE eval = ?", [eval_key])
        con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", [[eval_key, m, t, float(v)] for m, t, v in rows])
        con.execute("INSERT OR REPLACE INTO evals VALUES (?, ?, ?, now())", [eval_key, model, json.dumps(inputs)])


def eval_metrics(con, eval_key: str, task: str | None = None) -> dict[str, float]:
    return dict(con.execute("SELECT metric, value FROM metrics WHERE eval = ? AND task IS NOT DISTINCT FROM ?",
                            [eval_key, task]).fetchall())


def eval_metric_rows(con, eval_key: str) -> list[tuple]:
    return con.execute("SELECT coalesce(task, 'all'), metric, value FROM metrics WHERE eval = ? ORDER BY 1, 2",
                       [eval_key]).fetchall()


# ---- flow runs, outputs, stage log ---------------------------------------------------------


def start_flow_run(con, flow: str, config: dict, dataset: str) -> str:
    flow_run = uuid.uuid4().hex
    con.execute("INSERT INTO flow_runs VALUES (?, ?, ?, ?, now(), NULL)", [flow_run, flow, json.dumps(config), dataset])
    return flow_run


def finish_flow_run(con, flow_run: str) -> None:
    con.execute("UPDATE flow_runs SET finished_at = now() WHERE flow_run = ?", [flow_run])


def record_output(con, flow_run: str, variant: str, iteration: int, kind: str, key: str, computed: bool) -> None:
    con.execute("INSERT INTO run_outputs VALUES (?, ?, ?, ?, ?, ?)",
                [flow_run, variant, iteration, kind, key, computed])


def log_stage(con, flow_run: str | None, stage: str, name: str, key: str | None, seconds: float,
              detail: dict | None = None) -> None:
    con.execute("INSERT INTO stage_log VALUES (?, ?, ?, ?, ?, ?, now())",
                [flow_run, stage, name, key, seconds, json.dumps(detail or {}, default=str)])


# the latest finished run of each flow: what every reader (table, inspect, report, export) is made of
_LATEST_FINISHED = """SELECT * FROM (
    SELECT *, row_number() OVER (PARTITION BY flow ORDER BY started_at DESC) AS rn FROM flow_runs
    WHERE finished_at IS NOT NULL) WHERE rn = 1"""


def latest_flow_runs(con) -> list[dict]:
    """The latest finished run of each flow, newest first."""
    cur = con.execute(f"SELECT flow_run, flow, dataset, started_at, finished_at, config FROM ({_LATEST_FINISHED}) "
                      "ORDER BY started_at DESC")
    return [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]


def unfinished_flow_runs(con) -> list[dict]:
    """The latest run of each flow where it has not finished (still running, or killed), newest first:
    readers skip it and show its flow's latest finished run instead."""
    cur = con.execute(
        """SELECT flow_run, flow, dataset, started_at FROM (
             SELECT *, row_number() OVER (PARTITION BY flow ORDER BY started_at DESC) AS rn FROM flow_runs)
           WHERE rn = 1 AND finished_at IS NULL ORDER BY started_at DESC""")
    return [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]


def last_reference_selection(con, variant: str = "reference") -> dict | None:
    """The warm-up selection (D0, every token) of the reference the newest finished flow run used, with the
    dataset it was made on and that dataset's inputs: what ``refresh.reference: keep`` keeps."""
    row = con.execute(
        """SELECT o.key, s.dataset, s.pool, d.inputs FROM run_outputs o JOIN flow_runs f USING (flow_run)
           JOIN selections s ON s.selection = o.key JOIN datasets d ON d.dataset = s.dataset
           WHERE o.variant = ? AND o.iteration = 0 AND o.kind = 'selection' AND f.finished_at IS NOT NULL
           ORDER BY f.started_at DESC LIMIT 1""", [variant]).fetchone()
    if row is None:
        return None
    return {"selection": row[0], "dataset": row[1], "pool": row[2], "inputs": json.loads(row[3])}


def output_of(con, flow_run: str, variant: str, iteration: int, kind: str) -> tuple[str, bool] | None:
    """(key, computed) of what ``flow_run`` recorded for (variant, iteration, kind)."""
    row = con.execute("SELECT key, bool_or(computed) FROM run_outputs WHERE flow_run = ? AND variant = ? AND "
                      "iteration = ? AND kind = ? GROUP BY key", [flow_run, variant, iteration, kind]).fetchone()
    return (row[0], bool(row[1])) if row else None


def latest_dataset(con) -> str | None:
    """The dataset of the newest finished flow run."""
    row = con.execute("SELECT dataset FROM flow_runs WHERE finished_at IS NOT NULL "
                      "ORDER BY started_at DESC LIMIT 1").fetchone()
    return row[0] if row else None


def current_outputs(con) -> list[dict]:
    """What a user reads by name: each variant's outputs, all from one flow run.

    Among the latest finished run of each flow, a variant's outputs all come from the newest run that recorded
    it, never mixed across runs. lm-eval results are a group of their own, kept only while they are of the model
    the variant has now. ``dataset`` is the dataset the flow run worked on.
    """
    cur = con.execute(
        f"""WITH latest AS (SELECT flow_run, started_at, dataset FROM ({_LATEST_FINISHED})),
                cand AS (SELECT DISTINCT o.variant, o.iteration, o.kind, o.key, o.computed, o.flow_run,
                                l.started_at, l.dataset, o.kind = 'lm-eval' AS ext
                         FROM run_outputs o JOIN latest l USING (flow_run)),
                pick AS (SELECT variant, ext, arg_max(flow_run, started_at) AS flow_run FROM cand GROUP BY ALL)
           SELECT c.variant, c.iteration, c.kind, c.key, c.computed, c.flow_run, c.dataset,
                  coalesce(a.model, e.model) AS model
           FROM cand c JOIN pick p ON p.variant = c.variant AND p.ext = c.ext AND p.flow_run = c.flow_run
           LEFT JOIN adapters a ON c.kind = 'adapter' AND a.adapter = c.key
           LEFT JOIN evals e ON c.kind = 'lm-eval' AND e.eval = c.key
           ORDER BY c.variant, c.iteration, c.kind""")
    rows = [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]
    from tokenclean.tasks.names import label  # the name a user gives lm-eval: ``global``, ``self-evolving@2``

    # the model each name stands for now: an adapter's model, or the base model's key
    now = {label(r["variant"], r["iteration"]): r["key"] if r["kind"] == "model" else r["model"]
           for r in rows if r["kind"] in ("adapter", "model")}
    out = [r for r in rows if r["kind"] != "lm-eval" or now.get(r["variant"]) == r["model"]]
    for r in out:
        r.pop("model")
    return out


def stages_of(con, flow_runs: list[str]) -> list[dict]:
    """Stage log rows of the given flow runs: what those runs computed (a reused step logs nothing)."""
    cur = con.execute("SELECT flow_run, stage, name, key, seconds, detail FROM stage_log "
                      "WHERE flow_run IN (SELECT unnest(?)) ORDER BY finished_at", [flow_runs])
    return [dict(zip([d[0] for d in cur.description], r)) | {"detail": json.loads(r[5])} for r in cur.fetchall()]


def stage_times(con, flow_runs: list[str] | None = None) -> list[tuple[str, str, float]]:
    if flow_runs is None:
        return con.execute("SELECT stage, name, seconds FROM stage_log ORDER BY finished_at").fetchall()
    return con.execute("SELECT stage, name, seconds FROM stage_log WHERE flow_run IN (SELECT unnest(?)) "
                       "ORDER BY finished_at", [flow_runs]).fetchall()


def artifact_inputs(con, kind: str, key: str) -> dict | None:
    """What an artifact was derived from, as stored with it."""
    if kind == "selection":
        cur = con.execute("SELECT method, k, seed, scores, pool, dataset, parts, n_kept, n_candidates "
                          "FROM selections WHERE selection = ?", [key])
    elif kind == "adapter":
        cur = con.execute("SELECT inputs, model, path FROM adapters WHERE adapter = ?", [key])
    elif kind in ("eval", "lm-eval"):
        cur = con.execute("SELECT inputs, model FROM evals WHERE eval = ?", [key])
    elif kind == "model":
        cur = con.execute("SELECT kind, inputs FROM models WHERE model = ?", [key])
    elif kind == "scores":
        cur = con.execute("SELECT count(*) AS n_scores FROM token_scores WHERE scores = ?", [key])
    elif kind == "dataset":
        cur = con.execute("SELECT inputs, summary FROM datasets WHERE dataset = ?", [key])
    else:
        return None
    row = cur.fetchone()
    if row is None:
        return None
    out = {}
    for (name, *_), value in zip(cur.description, row):
        if name in ("inputs", "summary") and isinstance(value, str):
            value = json.loads(value)
        out[name] = value
    return out


def count_rows(con, table: str, column: str, key: str) -> int:
    if table not in ("token_losses", "token_scores", "selected_tokens", "metrics"):
        raise ValueError(table)
    return con.execute(f"SELECT count(*) FROM {table} WHERE {column} = ?", [key]).fetchone()[0]


def stages_since(con, since) -> list[dict]:
    """Every stage that computed something after ``since`` (from ``last_stage_time``): what a re-run did."""
    cur = con.execute("SELECT stage, name, key, detail FROM stage_log WHERE finished_at > ? ORDER BY finished_at",
                      [since])
    return [{"stage": r[0], "name": r[1], "key": r[2], "detail": json.loads(r[3])} for r in cur.fetchall()]


def last_stage_time(con):
    return con.execute("SELECT coalesce(max(finished_at), TIMESTAMP '1970-01-01') FROM stage_log").fetchone()[0]
