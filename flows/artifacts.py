"""Build-system steps: make sure an artifact exists under its key, computing it only if not.

Each ``ensure_*`` derives the artifact's key from the keys of its inputs
(``tokenclean.tasks.keys``), returns the stored artifact if that key is complete, and
otherwise runs the Prefect task that computes it and stores it under the key. Every
call records (variant, iteration, kind) -> key for the current flow run, so readers
(the comparison table, ``inspect``, the report) see this run's results by name, and
logs a stage only when something was computed: the stage log of a re-run is exactly
the set of steps its changes reached.

Why not Prefect's task cache: it remembers that a task ran with some inputs, not that
the rows it wrote are in this run's DuckDB file, and it would need the artifact's full
key as the cache key anyway. The database itself is the record of what exists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from tokenclean.config import TrainConfig
from tokenclean.flows import metrics
from tokenclean.flows.prepare import RunContext
from tokenclean.flows.runtime import submit_placed
from tokenclean.flows.scoring import score_model
from tokenclean.flows.training import submit_training, train_run_name
from tokenclean.tasks import keys, storage, store
from tokenclean.tasks.evaluate import load_eval_samples, metric_rows
from tokenclean.tasks.jobs import EvalJob
from tokenclean.tasks.names import label
from tokenclean.tasks.select import write_training_set
from tokenclean.tasks.steps import evaluate_task, select_task
from tokenclean.tasks.train import TrainJob
from tokenclean.tasks.versions import METRICS_VERSION


@dataclass(frozen=True)
class Model:
    """A scored/evaluated model: the base, base + one saved adapter, or another whole model (a given reference)."""

    key: str  # model key: base weights (+ adapter weights), or the other model's weights
    adapter: str | None = None  # adapter directory, None for the base
    train_key: str | None = None  # the adapter's training key, None for the base
    path: str | None = None  # the directory of a whole model that is not the base; None: the base (+ adapter)

    @property
    def weights(self) -> tuple[str, str] | None:
        """(directory, key) the workers load in the base's place (``score_job``), None for the base."""
        return (self.path, self.key) if self.path else None


@dataclass(frozen=True)
class AdapterRequest:
    """An adapter a flow asks for: ``variant`` at ``iteration``, trained with ``train`` on the kept tokens of
    ``selection``, from the base or continuing ``parent``'s adapter."""

    variant: str
    iteration: int
    selection: str  # selection key
    train: TrainConfig
    parent: Model | None = None


@dataclass(frozen=True)
class EvalRequest:
    """An evaluation a flow asks for: ``model`` on the held-out set, recorded as ``variant`` at ``iteration``."""

    variant: str
    iteration: int
    model: Model


def _output(ctx: RunContext, variant: str, iteration: int, kind: str, key: str, computed: bool) -> None:
    store.record_output(ctx.con, ctx.flow_run, variant, iteration, kind, key, computed)
    if not computed:  # what was computed has its line from _stage, with its time
        get_run_logger().info("%s %s: reused %s", kind, label(variant, iteration), key)


def _stage(ctx: RunContext, stage: str, name: str, key: str, seconds: float, detail: dict) -> None:
    """Record a step that computed something, and say so in the flow run's log (the Prefect UI's Logs tab)."""
    store.log_stage(ctx.con, ctx.flow_run, stage, name, key, seconds, detail)
    get_run_logger().info("%s %s: computed %s in %.1f s", stage, name, key, seconds)
    metrics.record("tokenclean_stage_seconds", seconds, ctx.cfg.name, stage=stage, name=name)


def base(ctx: RunContext) -> Model:
    return Model(ctx.base_model)


def given_reference(ctx: RunContext) -> Model:
    """``model.reference``: a whole model, keyed by its name and weights as the base is (``prepare``)."""
    if ctx.reference_model is None:
        raise ValueError("no model.reference is set: theta_1 is trained on D0")
    return Model(ctx.reference_model, path=ctx.reference_path)


def scorer(ctx: RunContext, model: Model) -> str:
    """Key of ``model``'s token losses: the model and how the scoring workers compute (``ctx.scorer``)."""
    key = keys.scorer_key(model.key, ctx.scorer)
    store.record_model(ctx.con, key, "scorer", {"model": model.key, **ctx.scorer})
    return key


def ensure_losses(ctx: RunContext, variant: str, iteration: int, model: Model, parts: list[int]) -> dict:
    """Losses of ``model`` for every response token of the pool; only unscored samples are scored."""
    name = label(variant, iteration)
    key = scorer(ctx, model)
    stats = score_model(ctx, name, key, model.adapter, parts, base=model.weights,
                        adapter_model=model.key if model.adapter else None)
    check = store.check_integrity(ctx.con, key, ctx.dataset, parts)
    log = get_run_logger()
    log.info("scored %s over D%s: %s; integrity %s", name, parts, stats, check)
    if not check["ok"]:
        raise RuntimeError(f"token_losses integrity check failed for {name} ({key}): {check}")
    if stats["nonfinite"]:
        log.warning("%s: %d non-finite token losses; they are excluded from ranking", name, stats["nonfinite"])
    if stats["samples_scored"]:
        metrics.record("tokenclean_scoring_tokens_per_second", stats["tokens_per_s"], ctx.cfg.name, model=name)
    _output(ctx, variant, iteration, "losses", key, bool(stats["samples_scored"] or stats["samples_recovered"]))
    return stats


def ensure_scores(ctx: RunContext, variant: str, iteration: int, ref: Model, parts: list[int]) -> str:
    """score = loss_base - loss_ref for the pool, under the key of the two models' losses."""
    base_losses, ref_losses = scorer(ctx, base(ctx)), scorer(ctx, ref)
    key = keys.scores_key(base_losses, ref_losses)
    t0 = time.perf_counter()
    out = store.ensure_scores(ctx.con, key, base_losses, ref_losses, ctx.dataset, parts)
    if out["n_added"]:
        _stage(ctx, "scores", label(variant, iteration), key, time.perf_counter() - t0, out)
    _output(ctx, variant, iteration, "scores", key, bool(out["n_added"]))
    return key


def ensure_selection(ctx: RunContext, variant: str, iteration: int, method: str, parts: list[int],
                     scores: str | None = None, k: float | None = None) -> str:
    """``method``'s selection of the pool ``parts`` at ``k`` (None for the methods that keep every token)."""
    cfg = ctx.cfg
    if k is None and method not in keys.K_FREE_METHODS:
        raise ValueError(f"selection {method!r} needs a k")
    pool = store.pool_digest(ctx.con, ctx.dataset, parts)
    key = keys.selection_key(method, k, cfg.select.seed, scores, pool)
    computed = store.selection_record(ctx.con, key) is None
    if computed:
        name = label(variant, iteration)
        select = select_task.with_options(task_run_name=f"select/{name}")
        out = select(ctx.con, key, method, k, dataset=ctx.dataset, parts=parts, pool=pool,
                     scores=scores, seed=cfg.select.seed, label=name)
        _stage(ctx, "select", name, key, out.pop("seconds"), out)
    _output(ctx, variant, iteration, "selection", key, computed)
    rec = store.selection_record(ctx.con, key)
    if rec["n_candidates"]:
        metrics.record("tokenclean_kept_fraction", rec["n_kept"] / rec["n_candidates"], cfg.name,
                       selection=label(variant, iteration))
    return key


def _lora_of_continued(ctx: RunContext, name: str, tcfg, parent: Model) -> dict:
    """What a continued adapter's LoRA is: its parent's shape (PEFT loads the parent's config).

    The key records the shape actually inherited, read from the parent's saved config, so
    digest and adapter agree; a ``train.lora`` that asks for something else is reported,
    because it cannot apply to a stage that continues an existing adapter.
    """
    from tokenclean.tasks.train import lora_shape

    inherited = lora_shape(parent.adapter)
    asked = tcfg.lora.model_dump(mode="json")
    differs = [f for f in ("r", "alpha", "dropout") if asked[f] != inherited[f]]
    if isinstance(asked["target_modules"], list) and sorted(asked["target_modules"]) != inherited["target_modules"]:
        differs.append("target_modules")
    if differs:
        get_run_logger().warning(
            "%s continues its parent adapter and keeps the parent's LoRA shape %s; train.lora %s differs in %s "
            "and applies only to adapters trained from the base", name, inherited, asked, differs)
    return {"inherited_from_parent": inherited}


@dataclass
class _AdapterStep:
    """One adapter of ``ensure_adapters``: its key and inputs, and the training job if it must be trained."""

    variant: str
    iteration: int
    key: str
    inputs: dict
    out: str  # the adapter's directory: in the run directory, or in object storage (``RunContext.remote``)
    computed: bool  # not recorded complete under its key: trained now, or found saved and recorded now
    job: TrainJob | None = None  # None: nothing to train (recorded, or saved by a run that died before recording)
    stats: dict | None = None


def _adapter_step(ctx: RunContext, req: AdapterRequest) -> _AdapterStep:
    cfg, tcfg, parent = ctx.cfg, req.train, req.parent
    name = label(req.variant, req.iteration)
    lora = _lora_of_continued(ctx, name, tcfg, parent) if parent is not None else None
    train_cfg = tcfg.learning(cfg.ray.train_workers if cfg.ray.enabled else 1,
                              lora["inherited_from_parent"]["dropout"] if lora else None)
    if lora is not None:
        train_cfg["lora"] = lora
    train_cfg["numerics"] = ctx.train_numerics
    # keyed by the kept tokens, not by how they were chosen: a selection recomputed with the same content
    # (other scoring numerics, a k that keeps as many tokens) finds its adapter and evaluation
    kept = store.selection_content(ctx.con, req.selection)
    key = keys.train_key(ctx.base_model, kept, train_cfg, parent.key if parent else None)
    inputs = {"base_model": ctx.base_model, "selection": req.selection, "kept_tokens": kept, "train": train_cfg,
              "parent": parent.train_key if parent else None, "parent_model": parent.key if parent else None}
    rec = store.adapter_record(ctx.con, key)
    out = ctx.adapter_dir(key)
    # an adapter recorded before the run moved to object storage is in the driver's run directory, where no worker
    # reads: it is found in (or trained again into) the bucket
    elsewhere = rec is not None and ctx.remote and not storage.is_remote(rec["path"])
    step = _AdapterStep(req.variant, req.iteration, key, inputs, out,
                        rec is None or elsewhere or not _saved(storage.under(ctx.run_dir, rec["path"])))
    if step.computed:
        step.stats = storage.read_json(storage.join(out, "train.json")) if _saved(out) else None
        if step.stats is None or step.stats.get("key") != key:  # else: saved, but the run died before recording it
            layout = {f: getattr(tcfg, f) for f in sorted(tcfg.EXECUTION)} | {"workers": cfg.ray.train_workers}
            checkpoints = ctx.checkpoint_dir(key, keys.digest("layout", layout))
            data = ctx.training_set(key)
            write_training_set(ctx.con, req.selection, data)
            step.job = TrainJob(base_path=ctx.base_path, cfg=tcfg.model_dump(mode="json"), data=data, out_dir=out,
                                checkpoint_dir=checkpoints, key=key, label=name,
                                init_adapter=parent.adapter if parent else None, device=cfg.model.device,
                                dtype=cfg.model.dtype, base_weights=ctx.model_weights(ctx.base_model),
                                base_key=ctx.base_model, init_adapter_key=parent.key if parent else None)
    return step


def ensure_adapters(ctx: RunContext, requests: list[AdapterRequest]) -> list[Model]:
    """``ensure_adapter`` for independent adapters: the ones not stored train at the same time, as many at
    once as the cluster has the declared resources for (``flows/training.py``), and each is recorded under
    its key.

    The fixed-model variants are independent once the reference has scored the pool, so
    this is what lets them share the cluster instead of queueing behind each other.
    """
    cfg = ctx.cfg
    steps = [_adapter_step(ctx, r) for r in requests]
    jobs = {step.key: step.job for step in steps if step.job}  # one training per key, whoever asks for it
    running = {key: submit_training(job, cfg.ray, ctx.ray_train_dir()) for key, job in jobs.items()}
    for step in steps:
        if step.job is None:
            continue
        step.stats = running[step.key].result()
        name = label(step.variant, step.iteration)
        if step.stats["numerics"] != ctx.train_numerics:
            raise RuntimeError(
                f"training {name}: the workers computed with {step.stats['numerics']} but the adapter's key says "
                f"{ctx.train_numerics}; set model.device / model.dtype (and ray.gpus_per_train_worker) to match")
        if jobs.pop(step.key, None) is not None:
            _stage(ctx, "train", name, step.key, step.stats["seconds"], step.stats)
    return [_record_adapter(ctx, step) for step in steps]


def _record_adapter(ctx: RunContext, step: _AdapterStep) -> Model:
    if step.computed:
        weights = storage.weights_hash(step.out)  # in object storage: from its manifest, nothing downloaded
        model_key = keys.adapter_model_key(ctx.base_model, weights)
        # stored relative to the run directory, so a moved or copied run keeps finding its adapters (a URL as is)
        path = step.out if ctx.remote else str(Path(step.out).relative_to(ctx.run_dir))
        store.record_adapter(ctx.con, step.key, model_key, path, step.inputs,
                             step.stats, {"base_model": ctx.base_model, "adapter": step.key, "weights": weights})
        # The adapter is recorded: its optimiser checkpoints, and Ray Train's state of its group, have served
        for done in (ctx.checkpoint_root(step.key), storage.join(ctx.ray_train_dir(), train_run_name(step.key))):
            try:
                storage.remove_tree(done)
            except OSError as e:  # only space is lost: the adapter is recorded
                get_run_logger().warning("could not remove %s of %s: %s", storage.shown(done), step.key, e)
        storage.remove(ctx.training_set(step.key))  # ... and so has its training set
    rec = store.adapter_record(ctx.con, step.key)
    _output(ctx, step.variant, step.iteration, "adapter", step.key, step.computed)
    return Model(rec["model"], storage.under(ctx.run_dir, rec["path"]), step.key)


def _saved(adapter_dir: str) -> bool:
    """Whole: renamed into place with its ``train.json`` last, or, in object storage, its manifest committed."""
    if storage.is_remote(adapter_dir):
        return storage.read_manifest(adapter_dir) is not None
    return storage.exists(storage.join(adapter_dir, "train.json"))


def ensure_adapter(ctx: RunContext, request: AdapterRequest) -> Model:
    """LoRA fine-tune of the base (or of ``parent``'s adapter) on the selection's kept tokens.

    Keyed by what is learned (``TrainConfig.learning``, the LoRA shape actually used, the
    numerics the training workers resolve to, the parent); the execution layout (workers,
    micro-batch, checkpointing) keys only the checkpoints, so a resumed run continues
    only under the layout that wrote them. Training is Ray work (``flows/training.py``).
    """
    return ensure_adapters(ctx, [request])[0]


def ensure_evals(ctx: RunContext, requests: list[EvalRequest]) -> list[str]:
    """Held-out loss and answer metrics of each requested model, under the key of the model and the eval set;
    the evaluations not stored run at the same time, as many at once as the cluster has
    ``ray.cpus_per_eval_task`` / ``ray.gpus_per_eval_task`` for.

    An evaluation is a Ray task: the eval samples go out in its job, the metrics come
    back; the driver only records them.
    """
    cfg = ctx.cfg
    eval_set = store.pool_digest(ctx.con, ctx.dataset, [store.EVAL_PART], limit=cfg.eval.max_samples)
    settings = {"max_samples": cfg.eval.max_samples, "metrics": METRICS_VERSION,
                "max_new_tokens": cfg.eval.max_new_tokens, "numerics": ctx.eval_numerics}
    evals = [(r, keys.eval_key(r.model.key, eval_set, settings)) for r in requests]
    todo: dict[str, EvalRequest] = {}  # one evaluation per key, named by the first request for it
    for r, key in evals:
        if key not in todo and not store.eval_done(ctx.con, key):
            todo[key] = r
    running = _submit_evals(ctx, todo)
    for key, (t0, future) in running.items():
        result = future.result()
        name = label(todo[key].variant, todo[key].iteration)
        placement = result.pop("placement")
        if placement["numerics"] != ctx.eval_numerics:
            raise RuntimeError(f"evaluating {name}: the worker computed with {placement['numerics']} but the key "
                               f"says {ctx.eval_numerics}; set model.device / model.dtype (and ray.gpus_per_eval_task)")
        model = todo[key].model.key
        store.record_eval(ctx.con, key, model, {"model": model, "eval_set": eval_set,
                                                "max_samples": cfg.eval.max_samples}, metric_rows(result))
        _stage(ctx, "evaluate", name, key, time.perf_counter() - t0, result["overall"] | {"placement": placement})
    for r, key in evals:
        _output(ctx, r.variant, r.iteration, "eval", key, key in todo)
    return [key for _, key in evals]


def _submit_evals(ctx: RunContext, todo: dict[str, EvalRequest]) -> dict:
    """Start one evaluation task per key: {key: (start time, future of its metrics)}."""
    if not todo:
        return {}
    cfg = ctx.cfg
    samples, meta = load_eval_samples(ctx.con, ctx.dataset, cfg.eval.max_samples)
    running = {}
    for key, r in todo.items():
        model = r.model
        path, base_key = model.weights or (ctx.base_path, ctx.base_model)
        job = EvalJob(path, samples, meta, batch_tokens=cfg.eval.batch_tokens, adapter=model.adapter,
                      base_key=base_key, base_weights=ctx.model_weights(base_key),
                      adapter_key=model.key if model.adapter else None,
                      device=cfg.model.device, dtype=cfg.model.dtype, tokenizer_path=ctx.tokenizer_path,
                      tokenizer_fingerprint=ctx.tokenizer_fingerprint,
                      max_new_tokens=cfg.eval.max_new_tokens, label=label(r.variant, r.iteration))
        task = evaluate_task.with_options(task_run_name=f"evaluate/{job.label}")
        running[key] = (time.perf_counter(), submit_placed(task, cfg.ray, cfg.ray.cpus_per_eval_task,
                                                           cfg.ray.gpus_per_eval_task, job, keep_worker=True))
    return running


def ensure_eval(ctx: RunContext, request: EvalRequest) -> str:
    """``ensure_evals`` for one model."""
    return ensure_evals(ctx, [request])[0]
