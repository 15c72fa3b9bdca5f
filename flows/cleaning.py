"""The two token-cleaning flows of Pang et al. (2025), written to read like the paper.

Adapters are named after the paper's thetas: ``theta-1`` is the base fine-tuned on the
warm-up split D0 (full tokens); ``theta-(t+1)`` is theta-t fine-tuned on cleaned D_t.
Token scores of iteration t are ``loss_base - loss_theta_t``. Base losses are scored
once per token and reused by every iteration and both flows.

Flows take the config as a plain dict (Prefect records flow parameters as JSON) and
open the run database themselves, so each flow run is self-contained and resumable:
ingest, shards, adapters and metrics already finished are reused, not redone.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.prepare import RunContext, ingest_summary, prepare
from flows.scoring import check_integrity, score_model
from tasks.select import load_selected, materialize_scores
from tasks.steps import evaluate_task, select_task, train_task
from tokenclean.config import RunConfig


def _train_digest(ctx: RunContext, selection: str, tcfg, init_adapter: str | None) -> str:
    """What an adapter was trained from: the kept tokens, the train config, the starting adapter."""
    n, h = ctx.con.execute("SELECT count(*), coalesce(sum(hash(sample_id, pos)) % 18446744073709551557, 0) "
                           "FROM selected_tokens WHERE selection = ?", [selection]).fetchone()
    parent = None
    if init_adapter and (Path(init_adapter) / "train.json").exists():
        parent = json.loads((Path(init_adapter) / "train.json").read_text()).get("digest")
    blob = json.dumps([n, str(h), tcfg.model_dump(mode="json"), ctx.base_path, parent], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train(ctx: RunContext, selection: str, name: str, init_adapter: str | None, warmup: bool = False) -> str:
    cfg = ctx.cfg
    tcfg = cfg.reference_train if warmup else cfg.train
    out = ctx.adapter_dir(name)
    stats = train_task(ctx.con, ctx.base_path, load_selected(ctx.con, selection), tcfg, out,
                       init_adapter=init_adapter, label=name, device=cfg.model.device, dtype=cfg.model.dtype,
                       digest=_train_digest(ctx, selection, tcfg, init_adapter))
    if not stats.get("reused"):
        # Losses scored by an earlier version of this adapter are stale: drop them so the
        # next scoring pass redoes them (adapter names double as model keys).
        ctx.con.execute("DELETE FROM token_losses WHERE model = ?", [name])
        ctx.con.execute("DELETE FROM shards_done WHERE model = ?", [name])
    return out


def _evaluate(ctx: RunContext, adapter: str | None, variant: str, iteration: int) -> dict:
    done = ctx.con.execute("SELECT count(*) FROM metrics WHERE variant = ? AND iteration = ?",
                           [variant, iteration]).fetchone()[0]
    if done:
        return {}
    cfg = ctx.cfg
    return evaluate_task(ctx.con, ctx.base_path, adapter, variant, iteration, batch_tokens=cfg.eval.batch_tokens,
                         max_samples=cfg.eval.max_samples, device=cfg.model.device, dtype=cfg.model.dtype)


def _score(ctx: RunContext, model_key: str, adapter: str | None, parts: list[int]) -> None:
    stats = score_model(ctx, model_key, adapter, parts)
    check = check_integrity(ctx.con, model_key, parts)
    get_run_logger().info("scored %s over D%s: %s; integrity %s", model_key, parts, stats, check)
    if not check["ok"]:
        raise RuntimeError(f"token_losses integrity check failed for {model_key}: {check}")
    if stats["nonfinite"]:
        get_run_logger().warning("%s: %d non-finite token losses; they are excluded from ranking",
                                 model_key, stats["nonfinite"])


def warmup_reference(ctx: RunContext) -> str:
    """theta_1 = base fine-tuned with LoRA on D0, every response token kept."""
    select_task(ctx.con, "warmup/D0", "full", 1.0, [0], iteration=None, seed=0)
    theta1 = _train(ctx, "warmup/D0", "theta-1", None, warmup=True)
    _evaluate(ctx, None, "base", 0)
    _evaluate(ctx, theta1, "reference", 0)
    return theta1


def run_fixed_model(ctx: RunContext) -> None:
    """Fixed-model cleaning and the baselines: one reference (theta_1) scores the whole pool once."""
    cfg, pool = ctx.cfg, ctx.train_parts
    theta1 = warmup_reference(ctx)
    if any(m in ("global", "local") for m in cfg.baselines):
        _score(ctx, "base", None, pool)
        _score(ctx, "theta-1", theta1, pool)
        materialize_scores(ctx.con, 1, "theta-1", pool)
    for method in cfg.baselines:
        selection = f"fixed/{method}"
        select_task(ctx.con, selection, method, cfg.select.k, pool,
                    iteration=1 if method in ("global", "local") else None, seed=cfg.select.seed)
        adapter = _train(ctx, selection, f"fixed-{method}", None)
        _evaluate(ctx, adapter, method, 1)


def run_self_evolving(ctx: RunContext) -> str:
    """Algorithm 1: for t = 1..T score D_t with (theta_0, theta_t), keep the top-k, train theta_t -> theta_{t+1}."""
    cfg = ctx.cfg
    theta = warmup_reference(ctx)  # theta_1
    _score(ctx, "base", None, list(range(1, cfg.iterations + 1)))  # base losses: once, reused every iteration
    for t in range(1, cfg.iterations + 1):
        _score(ctx, f"theta-{t}", theta, [t])
        materialize_scores(ctx.con, t, f"theta-{t}", [t])
        selection = f"self-evolving/iter-{t}"
        select_task(ctx.con, selection, "global", cfg.select.k, [t], iteration=t, seed=cfg.select.seed)
        theta = _train(ctx, selection, f"theta-{t + 1}", init_adapter=theta)
        _evaluate(ctx, theta, "self-evolving", t)
    return theta


def publish_summary(ctx: RunContext) -> None:
    """Prefect artifacts for the ops dashboard: the comparison table and per-task metrics."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tokenclean.summary import comparison, format_table

    rows = comparison(ctx.con)
    create_markdown_artifact(
        f"## Token cleaning: `{ctx.cfg.name}`\n\n```\n{format_table(rows)}\n```\n\n"
        f"k = {ctx.cfg.select.k}, T = {ctx.cfg.iterations}, base = `{ctx.base_path}`",
        key="token-cleaning-summary", description="variants compared on held-out data")
    metrics = ctx.con.execute(
        "SELECT variant, iteration, coalesce(task, 'all') AS task, metric, round(value, 4) AS value FROM metrics "
        "ORDER BY variant, iteration, task, metric").fetchall()
    if metrics:
        create_table_artifact([dict(zip(("variant", "iteration", "task", "metric", "value"), m)) for m in metrics],
                              key="token-cleaning-metrics", description="per-iteration, per-task evaluation")


def _with_context(cfg: RunConfig, body, refresh: bool = False):
    ctx = prepare(cfg, refresh=refresh)
    try:
        out = body(ctx)
        publish_summary(ctx)
        return out
    finally:
        ctx.con.close()


@flow(name="fixed-model-cleaning", log_prints=True)
def fixed_model_cleaning(config: dict) -> str:
    cfg = RunConfig.model_validate(config)
    _with_context(cfg, run_fixed_model)
    return str(cfg.run_dir)


@flow(name="self-evolving-cleaning", log_prints=True)
def self_evolving_cleaning(config: dict) -> str:
    cfg = RunConfig.model_validate(config)
    return _with_context(cfg, run_self_evolving)


@flow(name="score-pool", log_prints=True)
def score_pool(config: dict, model_key: str = "base", adapter: str | None = None) -> dict:
    """Score every training part with one model (base, or base + adapter), e.g. after a data refresh."""
    cfg = RunConfig.model_validate(config)

    def body(ctx):
        _score(ctx, model_key, adapter, ctx.train_parts)
        return check_integrity(ctx.con, model_key, ctx.train_parts)

    return _with_context(cfg, body)


def refresh_ranking(ctx: RunContext) -> dict:
    """A scheduled refresh: new/changed samples are scored (base losses reused), the pool re-ranked."""
    pool = ctx.train_parts
    theta1 = ctx.adapter_dir("theta-1")
    if not (Path(theta1) / "train.json").exists():
        theta1 = warmup_reference(ctx)
    # else: the reference stays fixed across refreshes, so its stored losses stay valid
    _score(ctx, "base", None, pool)
    _score(ctx, "theta-1", theta1, pool)
    materialize_scores(ctx.con, 1, "theta-1", pool)
    out = select_task(ctx.con, "fixed/global", "global", ctx.cfg.select.k, pool, iteration=1,
                      seed=ctx.cfg.select.seed)
    return {"refresh": ingest_summary(ctx.con).get("refresh"), "selection": out}


@flow(name="refresh-token-ranking", log_prints=True)
def refresh_token_ranking(config: dict) -> dict:
    """Re-read the inputs; score only what is new or changed; re-rank the whole pool globally."""
    cfg = RunConfig.model_validate(config)
    return _with_context(cfg, refresh_ranking, refresh=True)


@flow(name="scheduled-refresh", log_prints=True)
def scheduled_refresh(config: dict) -> dict:
    """Entry point for deployments: builds the configured Ray task runner, then refreshes."""
    from flows.runtime import task_runner

    cfg = RunConfig.model_validate(config)
    return refresh_token_ranking.with_options(task_runner=task_runner(cfg.ray))(config)


def refresh(cfg: RunConfig) -> dict:
    from flows.runtime import prefect_api

    with prefect_api():
        return scheduled_refresh(cfg.model_dump(mode="json"))


def run(cfg: RunConfig) -> None:
    """Run the flows the config's mode asks for, on the configured Ray task runner."""
    from flows.runtime import prefect_api, task_runner

    config = cfg.model_dump(mode="json")
    with prefect_api():
        if cfg.mode in ("fixed", "both"):
            fixed_model_cleaning.with_options(task_runner=task_runner(cfg.ray))(config)
        if cfg.mode in ("self_evolving", "both"):
            self_evolving_cleaning.with_options(task_runner=task_runner(cfg.ray))(config)
