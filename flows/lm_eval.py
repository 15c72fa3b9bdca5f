"""`tokenclean lm-eval`: lm-evaluation-harness on a run's base model or one of its variants' adapters.

The flow finds the model through the latest run's outputs by the variant's name, hands one
``LmEvalJob`` to this process or a Ray task (``tasks/lm_eval.py`` runs it), and stores the
results under the key of the exact model evaluated, as the ``lm-eval`` output of an
``lm-eval:<name>`` flow run.
"""
from __future__ import annotations

import math
from pathlib import Path

from tokenclean.config import load_config
from tokenclean.flows.export import open_run, verified_base
from tokenclean.summary import names_of, output_key
from tokenclean.synth import ATTRS, World
from tokenclean.tasks import keys, storage, store
from tokenclean.tasks.lm_eval import FACTS_TASK, LmEvalJob, fact_docs, run_job


def facts_rows(n_people: int, seed: int) -> list[dict]:
    """The ``tokenclean_facts`` docs of the synthetic world ``World.make(n_people, seed)``."""
    world = World.make(n_people, seed)
    return fact_docs(world.people, world.facts, ATTRS)


def record_lm_eval(con, model_key: str, name: str, tasks: list[str], limit: int | None,
                   results: dict[str, dict[str, float]], settings: dict | None = None,
                   sources: str | None = None) -> str:
    """Store ``run_lm_eval`` results under their eval key; returns the key.

    The key covers the model, the task sources (``task_sources_digest``), the limit and the
    settings that change the numbers (device, dtype, batch size, few-shot). Recorded as the
    ``lm-eval`` output of an ``lm-eval:<name>`` flow run, so ``inspect`` and the dashboard
    list it beside (never instead of) the run's own evaluation of that model.
    """
    key = keys.eval_key(model_key, sources or keys.digest("lm-eval-tasks", sorted(tasks)),
                        {"harness": "lm-eval", "limit": limit, **(settings or {})})
    rows = [(metric, f"lm-eval:{task}", float(value)) for task, metrics in results.items()
            for metric, value in metrics.items() if value is not None and math.isfinite(float(value))]
    store.record_eval(con, key, model_key, {"model": model_key, "tasks": sorted(tasks), "limit": limit}, rows)
    flow_run = store.start_flow_run(con, f"lm-eval:{name}", {"tasks": tasks, "limit": limit},
                                    store.latest_dataset(con))
    store.record_output(con, flow_run, name, 0, "lm-eval", key, True)
    store.finish_flow_run(con, flow_run)
    return key


def _model_to_evaluate(run_dir: Path, adapter: str | None) -> tuple[tuple[str, str, str], str, str | None]:
    """((base path, weights hash, key), model key, adapter dir or None) of the run's base or of the variant
    ``adapter``."""
    con = open_run(run_dir)
    try:
        base_key = output_key(con, "base", "model")
        if base_key is None:
            raise ValueError(f"{run_dir / store.DB_FILE} has no finished flow run: run the pipeline first")
        base = (*verified_base(con, base_key), base_key)
        if not adapter:
            return base, base_key, None
        train_key = output_key(con, adapter, "adapter")
        if train_key is None:
            raise ValueError(f"no adapter named {adapter!r} in the latest runs of {run_dir} "
                             f"(names: {names_of(con, 'adapter')})")
        rec = store.adapter_record(con, train_key)
        return base, rec["model"], storage.under(run_dir, rec["path"])
    finally:
        con.close()


def _run_world_facts(run_dir: Path, tasks: list[str]) -> list[dict] | None:
    """The facts docs of the run's own world, for a run on the embedded default asked for ``tokenclean_facts``."""
    cfg_path = run_dir / "config.yaml"
    if FACTS_TASK not in tasks or not cfg_path.exists():
        return None
    cfg = load_config(cfg_path)
    if cfg.model.base != "embedded":
        return None
    return facts_rows(cfg.embedded.n_people, cfg.embedded.seed)


def _run_job(job: LmEvalJob, ray_address: str | None, gpus: float) -> tuple[dict, str]:
    """The job in this process, or as a Ray task asking for ``gpus`` GPUs on the cluster at ``ray_address``."""
    if ray_address is None:
        return run_job(job)
    import ray

    from tokenclean.tasks.cluster import connected

    with connected(ray_address):
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(run_job)
        return ray.get(remote.remote(job))


def run_lm_eval_for_run(run_dir: str | Path, adapter: str | None, tasks: list[str], *, limit: int | None = None,
                        batch_size: int | str = 8, device: str = "cpu", task_dirs: list[str] | None = None,
                        ray_address: str | None = None, gpus: float = 0.0) -> dict[str, dict[str, float]]:
    """lm-eval on a run's base model or a variant's adapter (``global``, ``self-evolving@2``); records the metrics.

    For a run on the embedded default the ``tokenclean_facts`` data is regenerated for that run's world.
    With ``ray_address`` the harness runs as a Ray task asking for ``gpus`` GPUs (the model
    and adapter paths must be visible on that node); otherwise in this process.
    """
    run_dir = Path(run_dir)
    base, model_key, adapter_dir = _model_to_evaluate(run_dir, adapter)
    job = LmEvalJob(base=base[0], base_weights=base[1], base_key=base[2], adapter_key=model_key,
                    adapter_dir=adapter_dir, tasks=tasks, task_dirs=task_dirs, limit=limit, batch_size=batch_size,
                    device=device, facts=_run_world_facts(run_dir, tasks))
    results, sources = _run_job(job, ray_address, gpus)
    con = store.connect(run_dir / store.DB_FILE, wait_s=30)
    try:
        record_lm_eval(con, model_key, adapter or "base", tasks, limit, results,
                       {"device": device, "dtype": "float32", "batch_size": batch_size}, sources)
    finally:
        con.close()
    return results
