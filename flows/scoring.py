"""Fan a model's scoring out over Ray, shard by shard, resumably.

Shards are deterministic (part, then sample_id order, ``score.shard_samples`` per
shard), so a restarted run asks for exactly the shards it asked for before and skips
those recorded in ``shards_done``. A shard's losses come back to the driver through
Ray's object store, are written to ``shards/<model>/shard-N.parquet`` atomically, then
loaded with delete-then-insert: a retried or re-run shard replaces, never duplicates.
"""
from __future__ import annotations

import contextlib
import re
import time

import numpy as np

from tasks import store
from tasks.score import ShardSample
from tasks.select import sql_parts
from tasks.steps import score_shard_task

SHARD_STRIDE = 1_000_000  # shard id = part * stride + index within the part


def plan_shards(con, parts: list[int], shard_samples: int) -> list[tuple[int, list[int]]]:
    plan = []
    for part in parts:
        ids = [r[0] for r in con.execute("SELECT sample_id FROM samples WHERE part = ? ORDER BY sample_id", [part]).fetchall()]
        for j in range(0, len(ids), shard_samples):
            plan.append((part * SHARD_STRIDE + j // shard_samples, ids[j : j + shard_samples]))
    return plan


def load_shard_samples(con, sample_ids: list[int]) -> list[ShardSample]:
    rows = con.execute(
        "SELECT sample_id, input_ids, response_mask FROM samples WHERE sample_id IN (SELECT unnest(?)) ORDER BY sample_id",
        [sample_ids],
    ).fetchall()
    return [ShardSample(r[0], np.asarray(r[1], dtype=np.int32), np.asarray(r[2], dtype=bool)) for r in rows]


def _placement(ctx):
    """Ray resource options for scoring tasks (GPUs per task), when running on Ray."""
    if not ctx.cfg.ray.enabled or not ctx.cfg.ray.num_gpus_per_task:
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=ctx.cfg.ray.num_gpus_per_task)


def score_model(ctx, model_key: str, adapter: str | None, parts: list[int], *, progress: bool = True,
                max_in_flight: int = 4) -> dict:
    """Ensure ``token_losses`` holds ``model_key``'s loss for every response token of ``parts``."""
    from prefect.futures import as_completed
    from tqdm.auto import tqdm

    con, cfg = ctx.con, ctx.cfg
    plan = plan_shards(con, parts, cfg.score.shard_samples)
    done = {r[0] for r in con.execute("SELECT shard FROM shards_done WHERE model = ?", [model_key]).fetchall()}
    shard_dir = ctx.run_dir / "shards" / model_key
    todo = []
    n_recovered = 0
    for shard, ids in plan:
        if shard in done:
            continue
        path = shard_dir / f"shard-{shard:08d}.parquet"
        if path.exists():  # written, but the run died before loading it
            store.load_loss_shard(con, model_key, shard, path)
            n_recovered += 1
        else:
            todo.append((shard, ids))
    lengths = dict(con.execute("SELECT sample_id, n_tokens FROM samples").fetchall()) if todo else {}
    total = sum(lengths[i] for _, ids in todo for i in ids)
    t0 = time.perf_counter()
    stats = {"model": model_key, "shards": len(plan), "skipped": len(plan) - len(todo) - n_recovered,
             "recovered": n_recovered, "scored": 0, "tokens": 0, "nonfinite": 0, "workers": {}}
    bar = tqdm(total=total, desc=f"score {model_key}", unit="tok", unit_scale=True, disable=not progress or not todo)
    artifact = _progress_artifact(model_key, len(todo)) if todo else None
    pending: dict = {}
    queue = list(todo)
    dev, dtype = cfg.model.device, cfg.model.dtype
    with _placement(ctx):
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                shard, ids = queue.pop(0)
                fut = score_shard_task.with_options(task_run_name=f"score-{model_key}-{shard}").submit(
                    ctx.base_path, adapter, model_key, shard, load_shard_samples(con, ids),
                    batch_tokens=cfg.score.batch_tokens,
                    chunk=cfg.score.lm_head_chunk, device=dev, dtype=dtype)
                pending[fut] = shard
            fut = next(iter(as_completed(list(pending))))
            pending.pop(fut)
            res = fut.result()
            path = shard_dir / f"shard-{res['shard']:08d}.parquet"
            store.write_parquet_atomic(res["table"], path)
            store.load_loss_shard(con, model_key, res["shard"], path)
            losses = res["table"].column("loss").to_numpy()
            stats["nonfinite"] += int((~np.isfinite(losses)).sum())
            stats["scored"] += 1
            stats["workers"].setdefault(str(res["pid"]), set()).add(res["model_id"])
            stats["tokens"] += res["n_tokens"]
            bar.update(res["n_tokens"])
            elapsed = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:,.0f}", shards=f"{stats['scored']}/{len(todo)}")
            if artifact is not None:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(artifact, 100.0 * stats["tokens"] / max(1, total),
                                         description=f"{stats['tokens'] / elapsed:,.0f} tok/s")
    bar.close()
    stats["workers"] = {pid: len(models) for pid, models in stats["workers"].items()}  # model loads per worker
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["tokens"] else 0.0
    if stats["scored"] or n_recovered:
        store.log_stage(con, "score", model_key, stats["seconds"], stats)
    return stats


def _progress_artifact(model_key: str, n_shards: int):
    """A Prefect progress artifact, so the UI shows scoring progress live (None outside a run)."""
    from prefect.artifacts import create_progress_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    key = "score-" + re.sub(r"[^a-z0-9-]+", "-", model_key.lower())
    return create_progress_artifact(0.0, key=key, description=f"scoring {model_key}: {n_shards} shards")


def check_integrity(con, model_key: str, parts: list[int]) -> dict:
    """Every response token of ``parts`` has exactly one loss for ``model_key``: no gaps, no duplicates."""
    in_parts = sql_parts(parts)
    missing, dupes, extra = con.execute(
        f"""
        WITH expected AS (SELECT rt.sample_id, rt.pos FROM response_tokens rt JOIN samples s USING (sample_id)
                          WHERE s.part IN ({in_parts})),
             got AS (SELECT sample_id, pos, count(*) AS n FROM token_losses WHERE model = ?
                     AND sample_id IN (SELECT sample_id FROM samples WHERE part IN ({in_parts})) GROUP BY ALL)
        SELECT (SELECT count(*) FROM expected e ANTI JOIN got g USING (sample_id, pos)),
               (SELECT count(*) FROM got WHERE n > 1),
               (SELECT count(*) FROM got g ANTI JOIN expected e USING (sample_id, pos))
        """,
        [model_key],
    ).fetchone()
    return {"model": model_key, "missing": missing, "duplicated": dupes, "unexpected": extra,
            "ok": missing == 0 and dupes == 0 and extra == 0}
