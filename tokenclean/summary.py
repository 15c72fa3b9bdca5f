"""Read a run's database back into the comparison table, the overview and the artifact list.

Everything is read through the current outputs (``store.current_outputs``), so the table shows the configuration
that last ran to the end, never an earlier one's rows nor a killed run's half-made outputs.
"""
from __future__ import annotations

from tokenclean.tasks import store
from tokenclean.tasks.names import label

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


def outputs_named(con, name: str, kind: str) -> list[dict]:
    """The current outputs of ``kind`` that a user's name stands for, by iteration: the one place a name is
    resolved. A label (``global``, ``self-evolving@2``) names one output; ``self-evolving`` names every
    iteration's."""
    found = [o for o in store.current_outputs(con) if o["kind"] == kind
             and (label(o["variant"], o["iteration"]) == name or name == "self-evolving" == o["variant"])]
    return sorted(found, key=lambda o: o["iteration"])


def output_key(con, name: str, kind: str) -> str | None:
    """Key of the current output ``name`` (a label) of ``kind``, or None."""
    return next((o["key"] for o in outputs_named(con, name, kind) if label(o["variant"], o["iteration"]) == name),
                None)


def current_selections(con) -> list[dict]:
    """Current selection outputs (the reference's aside) with their stored records and names."""
    out = []
    for o in store.current_outputs(con):
        if o["kind"] == "selection" and o["variant"] != "reference":
            rec = store.selection_record(con, o["key"])
            if rec is not None:
                # the dataset of the flow run that output it: a selection found by key may have been made
                # from another dataset with the same samples (the same rows under other file names)
                out.append(rec | {"name": label(o["variant"], o["iteration"]), "dataset": o["dataset"],
                                  "part_list": [int(p) for p in rec["parts"].split(",")]})
    return out


def _by_variant(con) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in store.current_outputs(con):
        out.setdefault(o["variant"], []).append(o)
    return out


def comparison(con) -> list[dict]:
    """One row per variant: kept/pool, kept share per part, label quality, held-out metrics.

    ``answer_match`` is greedy generation from the prompt (the headline); ``cloze_match``
    is teacher-forced from the gold prefix, kept beside it and named as such.
    """
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
        row = {"variant": lab, "kept": None, "kept_by_part": None, "precision": None, "recall": None,
               "corrupted_kept": None, "eval_loss": None, "answer_match": None, "cloze_match": None}
        if sels:  # measured on the pool of the flow run that made them (a reused selection may name an older one)
            parts = sorted({int(p) for s in sels for p in s["parts"].split(",")})
            names, dataset = [s["selection"] for s in sels], outs[0]["dataset"]
            row |= store.selection_quality(con, names, dataset, parts)
            row |= {"kept": f"{sum(s['n_kept'] for s in sels)}/{sum(s['n_candidates'] for s in sels)}",
                    "kept_by_part": {p: k / n for p, (k, n) in store.kept_by_part(con, names, dataset, parts).items()
                                     if n}}
        if evals:  # the last iteration's model is the variant's result
            m = store.eval_metrics(con, evals[-1]["key"])
            row |= {"eval_loss": m.get("response_loss"), "answer_match": m.get("answer_match"),
                    "cloze_match": m.get("answer_cloze_match")}
        rows.append(row)
    return rows


COLUMNS = [  # (row key, header, width)
    ("variant", "variant", 30), ("kept", "kept/pool", 15), ("by_part", "kept by part", 22),
    ("precision", "precision", 9), ("recall", "recall", 7), ("corrupted_kept", "corrupt kept", 12),
    ("eval_loss", "eval loss", 9), ("answer_match", "answer (gen)", 12), ("cloze_match", "cloze EM", 8),
]


def parts_text(kept_by_part: dict | None) -> str | None:
    return None if not kept_by_part else " ".join(f"D{p}:{v:.2f}" for p, v in sorted(kept_by_part.items()))


def format_table(rows: list[dict]) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

    head = " ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (_, h, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = r | {"by_part": parts_text(r.get("kept_by_part"))}
        lines.append(" ".join(f"{f(vals[k]):<{w}}" if i == 0 else f"{f(vals[k]):>{w}}"
                              for i, (k, _, w) in enumerate(COLUMNS)))
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
