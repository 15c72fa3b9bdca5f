"""Fan a model's scoring out over Ray, shard by shard, resumably.

Work is planned from what is missing: samples with no losses yet for the model are
chunked into shards of ``score.shard_samples``. A restarted run and an incremental
refresh therefore send exactly the unscored samples. A shard's losses come back to the
driver through Ray's object store, are written to ``shards/<model>/shard-N.parquet``
atomically, then loaded in one transaction (delete-then-insert): a retried shard
replaces, never duplicates, and a sample has either all its losses or none.
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

def unscored_samples(con, model_key: str, parts: list[int]) -> list[int]:
    """Samples of ``parts`` with no loss yet under ``model_key`` (a shard loads all or nothing)."""
    return [r[0] for r in con.execute(
        f"""SELECT sample_id FROM samples WHERE part IN ({sql_parts(parts)}) AND sample_id NOT IN
            (SELECT DISTINCT sample_id FROM token_losses WHERE model = ?) ORDER BY part, sample_id""",
        [model_key]).fetchall()]


def plan_shards(con, model_key: str, parts: list[int], shard_samples: int) -> list[tuple[int, list[int]]]:
    """Chunks of the unscored samples, numbered after the shards already loaded.

    Planning from what is missing (not from a fixed list) is what makes a resumed run
    and an incremental refresh the same operation: only samples without losses are sent.
    """
    ids = unscored_samples(con, model_key, parts)
    start = con.execute("SELECT coalesce(max(shard) + 1, 0) FROM shards_done WHERE model = ?", [model_key]).fetchone()[0]
    return [(start + j // shard_samples, ids[j : j + shard_samples]) for j in range(0, len(ids), shard_samples)]


def recover_orphan_shards(con, model_key: str, shard_dir) -> tuple[int, int]:
    """Load shards written to Parquet but never loaded (the run died in between).

    A shard is loaded only if none of its samples has losses yet; otherwise it is stale
    (its samples were re-scored under another shard id) and is deleted.
    """
    import pyarrow.parquet as pq

    if not shard_dir.exists():
        return 0, 0
    done = {r[0] for r in con.execute("SELECT shard FROM shards_done WHERE model = ?", [model_key]).fetchall()}
    n_shards = n_samples = 0
    for path in sorted(shard_dir.glob("shard-*.parquet")):
        shard = int(path.stem.split("-")[1])
        if shard in done:
            continue
        ids = sorted(set(pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()))
        clash = con.execute("SELECT count(*) FROM token_losses WHERE model = ? AND sample_id IN (SELECT unnest(?))",
                            [model_key, ids]).fetchone()[0]
        if clash:
            path.unlink()
            continue
        store.load_loss_shard(con, model_key, shard, path)
        n_shards, n_samples = n_shards + 1, n_samples + len(ids)
    return n_shards, n_samples


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
    shard_dir = ctx.run_dir / "shards" / model_key
    n_total = con.execute(f"SELECT count(*) FROM samples WHERE part IN ({sql_parts(parts)})").fetchone()[0]
    rec_shards, rec_samples = recover_orphan_shards(con, model_key, shard_dir)
    todo = plan_shards(con, model_key, parts, cfg.score.shard_samples)
    n_todo = sum(len(ids) for _, ids in todo)
    lengths = dict(con.execute("SELECT sample_id, n_tokens FROM samples").fetchall()) if todo else {}
    total = sum(lengths[i] for _, ids in todo for i in ids)
    t0 = time.perf_counter()
    stats = {"model": model_key, "samples_total": n_total, "samples_skipped": n_total - n_todo - rec_samples,
             "shards_recovered": rec_shards, "samples_recovered": rec_samples, "shards_scored": 0,
             "samples_scored": 0, "tokens": 0, "nonfinite": 0, "workers": {}}
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
                    chunk=cfg.score.lm_head_chunk, device=dev, dtype=dtype, backend=cfg.score.backend,
                    compile=cfg.score.compile)
                pending[fut] = shard
            fut = next(iter(as_completed(list(pending))))
            pending.pop(fut)
            res = fut.result()
            path = shard_dir / f"shard-{res['shard']:08d}.parquet"
            store.write_parquet_atomic(res["table"], path)
            store.load_loss_shard(con, model_key, res["shard"], path)
            losses = res["table"].column("loss").to_numpy()
            stats["nonfinite"] += int((~np.isfinite(losses)).sum())
            stats["shards_scored"] += 1
            stats["samples_scored"] += res["n_samples"]
            stats["workers"].setdefault(str(res["pid"]), set()).add(res["model_id"])
            stats["tokens"] += res["n_tokens"]
            bar.update(res["n_tokens"])
            elapsed = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:,.0f}", shards=f"{stats['shards_scored']}/{len(todo)}")
            if artifact is not None:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(artifact, 100.0 * stats["tokens"] / max(1, total),
                                         description=f"{stats['tokens'] / elapsed:,.0f} tok/s")
    bar.close()
    stats["workers"] = {pid: len(models) for pid, models in stats["workers"].items()}  # model loads per worker
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["tokens"] else 0.0
    if stats["shards_scored"] or rec_shards:
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
