"""Thin Prefect tasks around the pure stage functions.

Each task does one stage for one unit of work and logs what it did; retries, caching
and placement (which Ray worker, how many GPUs) are decided here and in the flows,
never inside the stage functions. Tasks that touch the run's DuckDB run in the flow
process (DuckDB has one writer); only ``score_shard_task`` is shipped to Ray workers.
"""
from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import select as select_mod
from tasks.evaluate import evaluate_model, load_eval_samples, record_eval
from tasks.score import process_model
from tasks.store import log_stage
from tasks.train import train_lora


@task(name="score-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def score_shard_task(base_path: str, adapter: str | None, shard: int, samples: list, *, batch_tokens: int,
                     chunk: int, device: str, dtype: str) -> dict:
    """Runs on a Ray worker: losses come back through the object store, so no shared disk is needed."""
    t0 = time.perf_counter()
    sm = process_model(base_path, device, dtype)
    table = sm.losses(samples, adapter=adapter, batch_tokens=batch_tokens, chunk=chunk)
    return {"shard": shard, "table": table, "n_tokens": int(sum(len(s.input_ids) for s in samples)),
            "seconds": time.perf_counter() - t0}


@task(name="train-adapter", cache_policy=NO_CACHE)
def train_task(con, base_path: str, samples: list, cfg, out_dir: str, *, init_adapter: str | None, label: str,
               device: str, dtype: str) -> dict:
    stats = train_lora(base_path, samples, cfg, out_dir, init_adapter=init_adapter, device=device, dtype=dtype)
    if not stats.get("reused"):
        log_stage(con, "train", label, stats["seconds"], stats)
    get_run_logger().info("train %s: %s", label, {k: stats[k] for k in ("steps", "label_tokens", "final_loss")})
    return stats


@task(name="select-tokens", cache_policy=NO_CACHE)
def select_task(con, selection: str, method: str, k: float, parts: list[int], *, iteration: int | None,
                seed: int) -> dict:
    out = select_mod.select_tokens(con, selection, method, k, parts, iteration=iteration, seed=seed)
    log_stage(con, "select", selection, out["seconds"], out)
    get_run_logger().info("select %s: kept %d/%d precision=%s", selection, out["n_kept"], out["n_candidates"],
                          out["precision"])
    return out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(con, base_path: str, adapter: str | None, variant: str, iteration: int, *, batch_tokens: int,
                  max_samples: int | None, device: str, dtype: str) -> dict:
    t0 = time.perf_counter()
    samples, meta = load_eval_samples(con, max_samples)
    result = evaluate_model(base_path, adapter, samples, meta, batch_tokens=batch_tokens, device=device, dtype=dtype)
    record_eval(con, variant, iteration, result)
    log_stage(con, "evaluate", f"{variant}/{iteration}", time.perf_counter() - t0, result["overall"])
    get_run_logger().info("evaluate %s@%d: %s", variant, iteration, result["overall"])
    return result
