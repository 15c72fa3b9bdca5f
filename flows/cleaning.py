"""The two token-cleaning flows of Pang et al. (2025), written to read like the paper.

Names follow the variants a user compares: ``base``, ``reference`` (theta_1: the base
fine-tuned on the warm-up split D0, full tokens), the fixed-model variants ``full``,
``random``, ``local``, ``global``, and ``self-evolving@t`` (theta_(t+1) = theta_t fine-tuned
on cleaned D_t). The same name is used for a variant's selection, adapter, losses and
metrics. Token scores of a reference are ``loss_base - loss_ref``; base losses are
scored once per sample and reused by every iteration and both flows.

Every step goes through ``tokenclean.flows.artifacts``: its result is stored under a key
derived from its inputs and reused only under that key, so a re-run with a changed
setting recomputes exactly what the setting reaches.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, tags

from tokenclean.config import RunConfig
from tokenclean.flows import metrics
from tokenclean.flows.artifacts import (
    AdapterRequest,
    EvalRequest,
    Model,
    base,
    ensure_adapter,
    ensure_adapters,
    ensure_eval,
    ensure_evals,
    ensure_losses,
    ensure_scores,
    ensure_selection,
    given_reference,
)
from tokenclean.flows.prepare import RunContext, prepare
from tokenclean.flows.runtime import artifact_key, flow_run_name, invocation_tag, run_tags, tag_flow_run
from tokenclean.tasks import keys, store
from tokenclean.tasks.names import REFERENCE, REFERENCE_D0, SELF_EVOLVING, at_k


def warmup_reference(ctx: RunContext, policy: str = "retrain_if_changed", *, given: bool | None = None) -> Model:
    """theta_1 = base fine-tuned with LoRA on D0, every response token kept; or the given ``model.reference``.

    ``policy`` (``refresh.reference``) decides when D0's content differs from the warm-up set
    of the reference this run last used: ``retrain_if_changed`` follows the current D0 (a
    new theta_1, and the pool rescored by it); ``keep`` keeps the last one, by its selection's
    key. Which one is used, and why, is recorded in ``ctx.reference``.
    ``given``: theta_1 is ``model.reference`` (None: whenever one is set; the self-evolving loop
    passes ``model.reference_self_evolving``). Nothing is trained then; it is evaluated as ``reference``.
    """
    if ctx.cfg.model.reference is not None and given is not False:
        return _given_theta1(ctx, policy)
    # beside a given reference, the theta_1 trained on D0 (the self-evolving loop's) has a name of its own
    name = REFERENCE if ctx.cfg.model.reference is None else REFERENCE_D0
    d0, ctx.reference = _warmup_selection(ctx, policy, name)
    if d0 is None:
        d0 = ensure_selection(ctx, name, 0, "full", [0])
    theta1 = ensure_adapter(ctx, AdapterRequest(name, 0, d0, ctx.cfg.reference_train))
    _, retrained = store.output_of(ctx.con, ctx.flow_run, name, 0, "adapter")
    ctx.reference |= {"name": name, "key": theta1.train_key, "retrained": retrained}
    ensure_evals(ctx, [EvalRequest("base", 0, base(ctx)), EvalRequest(name, 0, theta1)])
    return theta1


def _given_theta1(ctx: RunContext, policy: str) -> Model:
    """theta_1 = ``model.reference`` as it is: recorded as the reference's model and evaluated beside the base."""
    theta1 = given_reference(ctx)
    ctx.reference = {"name": REFERENCE, "given": ctx.cfg.model.reference, "key": theta1.key, "path": theta1.path,
                     "retrained": False, "reason": "model.reference given", "policy": policy}
    store.record_output(ctx.con, ctx.flow_run, REFERENCE, 0, "model", theta1.key, False)
    ensure_evals(ctx, [EvalRequest("base", 0, base(ctx)), EvalRequest("reference", 0, theta1)])
    return theta1


def _warmup_selection(ctx: RunContext, policy: str, name: str) -> tuple[str | None, dict]:
    """(the kept warm-up selection, or None to follow the current D0; what happened to the warm-up set)."""
    info = {"policy": policy}
    last = store.last_reference_selection(ctx.con, name)
    if last is None:
        return None, info | {"reason": "first reference of this run"}
    if last["pool"] == store.pool_digest(ctx.con, ctx.dataset, [0]):
        return None, info | {"reason": "warm-up set unchanged"}
    now = store.dataset_inputs(ctx.con, ctx.dataset)
    if any(last["inputs"].get(f) != now.get(f) for f in ("tokenization", "split")):
        # another tokenization or split is another experiment, not a data refresh: nothing to keep
        return None, info | {"reason": "tokenization or split changed"}
    changes = {k: v for k, v in store.dataset_diff(ctx.con, last["dataset"], ctx.dataset, [0]).items()
               if k != "unchanged" and v}
    info |= {"warmup_changes": changes}
    if policy == "keep":
        store.record_output(ctx.con, ctx.flow_run, name, 0, "selection", last["selection"], False)
        get_run_logger().warning("the warm-up set D0 changed (%s); refresh.reference: keep uses the reference "
                                 "trained before it (set refresh.reference: retrain_if_changed to retrain)", changes)
        return last["selection"], info | {"reason": "warm-up set changed; kept"}
    return None, info | {"reason": "warm-up set changed"}


def fixed_variants(cfg: RunConfig) -> list[tuple[str, str, float | None]]:
    """(name, method, k) of each fixed-model variant: one per k of a sweep for the methods k decides."""
    out = []
    for method in cfg.baselines:
        for k in [None] if method in keys.K_FREE_METHODS else cfg.select.ks:
            out.append((at_k(method, k if cfg.select.sweep else None), method, k))
    return out


def run_fixed_model(ctx: RunContext) -> None:
    """Fixed-model cleaning and the baselines: one reference (theta_1) scores the pool once.

    The pool is D1..DT by default (``select.pool: exclude_warmup``): theta_1 was trained on
    D0, as the paper's reference is trained on a separate warm-up file. Every k of a sweep
    selects from the same scores.
    """
    cfg, pool = ctx.cfg, ctx.pool_parts
    theta1 = warmup_reference(ctx)
    scores = None
    if any(m in keys.SCORED_METHODS for m in cfg.baselines):
        ensure_losses(ctx, "base", 0, base(ctx), pool)
        ensure_losses(ctx, "reference", 0, theta1, pool)
        scores = ensure_scores(ctx, "reference", 0, theta1, pool)
    variants = fixed_variants(cfg)
    # independent of each other from here: they train (and are evaluated) at the same time
    kept = [ensure_selection(ctx, name, 1, method, pool, scores, k) for name, method, k in variants]
    adapters = ensure_adapters(ctx, [AdapterRequest(name, 1, sel, cfg.train)
                                     for (name, _, _), sel in zip(variants, kept)])
    ensure_evals(ctx, [EvalRequest(name, 1, adapter) for (name, _, _), adapter in zip(variants, adapters)])


def run_self_evolving(ctx: RunContext) -> Model:
    """Algorithm 1, once per k of the run: theta_1 and the base's losses are shared by every k."""
    cfg = ctx.cfg
    theta1 = warmup_reference(ctx, given=cfg.model.reference_self_evolving)
    ensure_losses(ctx, "base", 0, base(ctx), list(range(1, cfg.iterations + 1)))  # once, reused every iteration
    for k in cfg.select.ks:
        theta = evolve(ctx, theta1, k, at_k(SELF_EVOLVING, k if cfg.select.sweep else None))
    return theta


def evolve(ctx: RunContext, theta: Model, k: float, variant: str) -> Model:
    """Algorithm 1: for t = 1..T score D_t with (theta_0, theta_t), keep the top-k, train theta_t -> theta_(t+1)."""
    cfg = ctx.cfg
    for t in range(1, cfg.iterations + 1):
        scorer = (ctx.reference["name"], 0) if t == 1 else (variant, t - 1)  # theta_t
        ensure_losses(ctx, *scorer, theta, [t])
        scores = ensure_scores(ctx, variant, t, theta, [t])
        kept = ensure_selection(ctx, variant, t, "global", [t], scores, k)
        # a given theta_1's weights are not the base's: there is no adapter to continue, so theta_2 is a fresh LoRA
        parent = theta if theta.adapter else None
        theta = ensure_adapter(ctx, AdapterRequest(variant, t, kept, cfg.train, parent=parent))
        ensure_eval(ctx, EvalRequest(variant, t, theta))
    return theta


def publish_summary(con, cfg: RunConfig, base_path: str) -> None:
    """Prefect artifacts for the ops dashboard, under keys of the run's name: the comparison (a table, one row per
    variant, and as the printed text), a sweep's curves, per-task metrics."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tokenclean.summary import comparison, comparison_text, k_curve, metrics_table, table_rows

    rows = comparison(con)  # read once: every artifact below is made from it
    ks = ", ".join(f"{k:g}" for k in cfg.select.ks)
    create_markdown_artifact(
        f"## Token cleaning: `{cfg.name}`\n\n```\n{comparison_text(con, rows)}\n```\n\n"
        f"k = {ks}, T = {cfg.iterations}, base = `{base_path}`",
        key=artifact_key(cfg.name, "token-cleaning-summary"), description="variants compared on held-out data")
    if rows:
        create_table_artifact(table_rows(rows), key=artifact_key(cfg.name, "token-cleaning-comparison"),
                              description=f"{cfg.name}: variants compared on held-out data, one row per variant")
    curve = k_curve(rows)
    if curve:
        create_table_artifact(curve, key=artifact_key(cfg.name, "token-cleaning-k-curve"),
                              description="metrics against k, per variant")
    metrics = metrics_table(con, rows)
    if metrics:
        create_table_artifact(metrics, key=artifact_key(cfg.name, "token-cleaning-metrics"),
                              description="held-out metrics per model and task, one column per metric")


def publish_dashboard_link(run_name: str) -> None:
    """A Prefect link artifact to the Ray dashboard of the cluster this flow runs on, if it has one."""
    from prefect.artifacts import create_link_artifact

    from tokenclean.flows.runtime import ray_dashboard_url

    url = ray_dashboard_url()
    if url:
        create_link_artifact(url, link_text="Ray dashboard", key=artifact_key(run_name, "ray-dashboard"),
                             description="the Ray cluster running this flow's scoring, training and evaluation")


def _with_context(flow_name: str, cfg: RunConfig, body):
    """Open the run, record this flow run (its outputs are named under it), run ``body``, publish."""
    publish_dashboard_link(cfg.name)
    ctx = prepare(cfg)
    try:
        tag_flow_run(f"dataset:{ctx.dataset}")
        ctx.flow_run = store.start_flow_run(ctx.con, flow_name, cfg.model_dump(mode="json"), ctx.dataset)
        if ctx.ingest.get("ingested"):
            store.log_stage(ctx.con, ctx.flow_run, "ingest", "dataset", ctx.dataset, ctx.ingest["seconds"], ctx.ingest)
        _log_dataset(ctx)
        store.record_output(ctx.con, ctx.flow_run, "base", 0, "model", ctx.base_model, False)
        store.record_output(ctx.con, ctx.flow_run, "data", 0, "dataset", ctx.dataset, ctx.ingest.get("ingested", False))
        out = body(ctx)
        store.finish_flow_run(ctx.con, ctx.flow_run)
        publish_summary(ctx.con, cfg, ctx.base_path)
        return out
    finally:
        ctx.con.close()


def _log_dataset(ctx: RunContext) -> None:
    """The dataset this flow run works on, in its log: ingested or reused, its size, what was refused and why."""
    log, info = get_run_logger(), store.dataset_summary(ctx.con, ctx.dataset) or {}
    how = f"ingested in {ctx.ingest['seconds']:.1f} s" if ctx.ingest.get("ingested") else "reused"
    log.info("dataset %s: %s; %s samples, %s rows quarantined", ctx.dataset, how, info.get("samples"),
             info.get("quarantined", 0))
    metrics.record("tokenclean_quarantined_rows", info.get("quarantined", 0), ctx.cfg.name)
    reasons = store.quarantine_reasons(ctx.con, ctx.dataset)
    if reasons:
        log.warning("%d rows quarantined (tokenclean inspect %s --quarantine lists them): %s",
                    sum(reasons.values()), ctx.run_dir, reasons)


# The flows take the validated config itself: Prefect records it as JSON and passes the object through.
@flow(name="fixed-model-cleaning", flow_run_name=flow_run_name, log_prints=True)
def fixed_model_cleaning(config: RunConfig) -> str:
    _with_context("fixed-model-cleaning", config, run_fixed_model)
    return str(config.run_dir)


@flow(name="self-evolving-cleaning", flow_run_name=flow_run_name, log_prints=True)
def self_evolving_cleaning(config: RunConfig) -> str:
    _with_context("self-evolving-cleaning", config, run_self_evolving)
    return str(config.run_dir)


def refresh_ranking(ctx: RunContext) -> dict:
    """A scheduled refresh: the fixed-model global ranking over the current inputs.

    Keys make it incremental: unchanged samples keep their losses, only new or changed
    ones are scored. theta_1 is retrained only if D0 changed and ``refresh.reference`` says
    so; rows added to the inputs join D0 only when D0 is drawn from them (no
    ``data.warmup_paths``), about 1/(T+1) of them.
    """
    pool = ctx.pool_parts
    theta1 = warmup_reference(ctx, ctx.cfg.refresh.reference)
    n_pool, _ = store.count_pool(ctx.con, ctx.dataset, pool)
    scored = {}
    for name, model in (("base", base(ctx)), ("reference", theta1)):
        stats = ensure_losses(ctx, name, 0, model, pool)
        scored[name] = {"scored": stats["samples_scored"],
                        "reused": n_pool - stats["samples_scored"] - stats["samples_recovered"]}
    scores = ensure_scores(ctx, "reference", 0, theta1, pool)
    # its own name: the trained "global" variant keeps its selection, adapter and metrics together
    sweep = ctx.cfg.select.sweep
    kept = {at_k("refresh", k if sweep else None): ensure_selection(ctx, at_k("refresh", k if sweep else None), 1,
                                                                    "global", pool, scores, k)
            for k in ctx.cfg.select.ks}
    selections = {name: store.selection_record(ctx.con, key) for name, key in kept.items()}
    out = {"refresh": ctx.ingest.get("changes"), "reference": ctx.reference, "samples": scored,
           "selection": next(iter(selections.values())), "selections": selections}
    _publish_refresh(ctx.cfg.name, out)
    return out


def _publish_refresh(run_name: str, out: dict) -> None:
    """What the refresh did, as a Prefect artifact: rows changed, samples scored and reused per model, theta_1."""
    from prefect.artifacts import create_markdown_artifact

    ref = out["reference"]
    lines = [f"- inputs: {out['refresh'] or 'first ingest of this run'}",
             *(f"- {name}: scored {s['scored']:,} samples, reused {s['reused']:,}"
               for name, s in out["samples"].items()),
             f"- reference theta_1 `{ref['key']}`: {'retrained' if ref['retrained'] else 'reused'} "
             f"({ref['reason']}; refresh.reference: {ref['policy']})",
             *(f"- {name}: kept {sel['n_kept']:,} of {sel['n_candidates']:,} tokens"
               for name, sel in out["selections"].items())]
    if ref.get("warmup_changes"):
        lines.insert(1, f"- warm-up set D0: {ref['warmup_changes']}")
    create_markdown_artifact("## Refresh\n\n" + "\n".join(lines),
                             key=artifact_key(run_name, "token-cleaning-refresh"),
                             description="what this refresh recomputed and reused")


@flow(name="refresh-token-ranking", flow_run_name=flow_run_name, log_prints=True)
def refresh_token_ranking(config: RunConfig) -> dict:
    """Re-read the inputs; score only what is new or changed; re-rank the whole pool globally."""
    return _with_context("refresh-token-ranking", config, refresh_ranking)


@flow(name="scheduled-refresh", flow_run_name=flow_run_name, log_prints=True)
def scheduled_refresh(config: dict) -> dict:
    """Entry point for deployments: builds the configured Ray task runner, then refreshes.

    ``config`` is the JSON a deployment stores on the Prefect server (``tokenclean serve``); validated here, once.
    """
    from tokenclean.flows.runtime import ray_session, task_runner

    cfg = RunConfig.model_validate(config)
    # tagged here too: a deployment's runs start here, not in ``refresh``
    with ray_session(cfg.ray), tags(*run_tags(cfg)):
        return refresh_token_ranking.with_options(task_runner=task_runner(cfg.ray))(cfg)


def refresh(cfg: RunConfig) -> dict:
    from tokenclean.flows.runtime import prefect_api, ray_session

    with prefect_api(), ray_session(cfg.ray), tags(*run_tags(cfg), invocation_tag()):
        return scheduled_refresh(cfg.model_dump(mode="json"))


def run(cfg: RunConfig) -> None:
    """Run the flows the config's mode asks for, on the configured Ray task runner."""
    from tokenclean.flows.runtime import prefect_api, ray_session, task_runner

    # one set of tags on both flows: the UI's tag filter shows them together, and apart from another call's
    with prefect_api(), ray_session(cfg.ray), tags(*run_tags(cfg), invocation_tag()):
        if cfg.mode in ("fixed", "both"):
            fixed_model_cleaning.with_options(task_runner=task_runner(cfg.ray))(cfg)
        if cfg.mode in ("self_evolving", "both"):
            self_evolving_cleaning.with_options(task_runner=task_runner(cfg.ray))(cfg)
