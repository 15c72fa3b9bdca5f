"""Read a run's database back into the comparison table, the overview and the artifact list.

Everything is read through the outputs of the latest run of each flow (variant name ->
key), so the table shows the results of the configuration that ran last, never rows
left over from an earlier one.
"""
from __future__ import annotations

from tokenclean.tasks import store

VARIANTS = [  # (label, variant)
    ("base (no SFT)", "base"),
    ("reference theta_1 (D0, full)", "reference"),
    ("full tokens", "full"),
    ("random k", "random"),
    ("RHO local top-k", "local"),
    ("fixed-model global top-k", "global"),
    ("self-evolving (Alg. 1)", "self-evolving"),
    ("refreshed global ranking", "refresh"),
]


def label(variant: str, iteration: int) -> str:
    """The one name a user reads for an output: ``global``, ``reference``, ``self-evolving@2``."""
    return f"{variant}@{iteration}" if variant == "self-evolving" else variant


def output_key(con, name: str, kind: str) -> str | None:
    """Key of the current output ``name`` (a label) of ``kind``, or None."""
    for o in store.current_outputs(con):
        if o["kind"] == kind and label(o["variant"], o["iteration"]) == name:
            return o["key"]
    return None


def _by_variant(con) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in store.current_outputs(con):
        out.setdefault(o["variant"], []).append(o)
    return out


def comparison(con) -> list[dict]:
    outputs = _by_variant(con)
    rows = []
    for lab, variant in VARIANTS:
        outs = outputs.get(variant, [])
        evals = sorted((o for o in outs if o["kind"] == "eval"), key=lambda o: o["iteration"])
        sels = [store.selection_record(con, o["key"]) for o in outs if o["kind"] == "selection"]
        sels = [s for s in sels if s is not None]
        if variant in ("base", "reference"):
            sels = []  # the reference's D0 selection is its training set, not a cleaning result
        if not evals and not sels:
            continue
        row = {"variant": lab, "kept": None, "precision": None, "recall": None, "eval_loss": None,
               "exact_match": None}
        if sels:  # measured on the pool of the flow run that made them (a reused selection may name an older one)
            parts = sorted({int(p) for s in sels for p in s["parts"].split(",")})
            p, r = store.selection_quality(con, [s["selection"] for s in sels], outs[0]["dataset"], parts)
            row |= {"kept": f"{sum(s['n_kept'] for s in sels)}/{sum(s['n_candidates'] for s in sels)}",
                    "precision": p, "recall": r}
        if evals:  # the last iteration's model is the variant's result
            m = store.eval_metrics(con, evals[-1]["key"])
            row |= {"eval_loss": m.get("response_loss"), "exact_match": m.get("answer_exact_match")}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

    head = f"{'variant':<30} {'kept/pool':>15} {'precision':>9} {'recall':>7} {'eval loss':>9} {'exact match':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<30} {f(r['kept']):>15} {f(r['precision']):>9} {f(r['recall']):>7} "
                     f"{f(r['eval_loss']):>9} {f(r['exact_match']):>11}")
    return "\n".join(lines)


def metrics_rows(con) -> list[dict]:
    """Per-variant, per-iteration, per-task metrics of the current outputs (the dashboard table)."""
    rows = []
    for o in store.current_outputs(con):
        if o["kind"] not in ("eval", "lm-eval"):
            continue
        for task, metric, value in store.eval_metric_rows(con, o["key"]):
            rows.append({"variant": o["variant"], "iteration": o["iteration"], "task": task, "metric": metric,
                         "value": round(value, 4)})
    return rows


def stage_times(con) -> list[tuple[str, str, float]]:
    runs = [r["flow_run"] for r in store.latest_flow_runs(con)]
    return store.stage_times(con, runs)


def run_overview(con) -> dict:
    dataset = store.latest_dataset(con)
    if dataset is None:
        return {"dataset": None}
    losses = {}
    for o in store.current_outputs(con):
        if o["kind"] == "losses":
            losses[label(o["variant"], o["iteration"])] = store.count_rows(con, "token_losses", "model", o["key"])
    return {"dataset": dataset, "ingest": store.dataset_summary(con, dataset) or {},
            "samples_by_part": store.samples_by_part(con, dataset),
            "quarantine_reasons": store.quarantine_reasons(con, dataset), "token_losses": losses}


def artifacts(con) -> list[dict]:
    """Every current output with its key, whether the latest run computed or reused it, and its inputs."""
    out = []
    for o in store.current_outputs(con):
        kind = "model" if o["kind"] == "losses" else o["kind"]
        out.append({"name": label(o["variant"], o["iteration"]),
                    "kind": o["kind"], "key": o["key"], "computed_by_latest_run": o["computed"],
                    "derived_from": store.artifact_inputs(con, kind, o["key"])})
    return out
