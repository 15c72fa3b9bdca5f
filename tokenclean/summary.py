"""Read a run's database back into the comparison table, the overview and the artifact list.

Everything is read through the current outputs (``store.current_outputs``), so the table shows the configuration
that last ran to the end, never an earlier one's rows nor a killed run's half-made outputs.
"""
from __future__ import annotations

from tokenclean.tasks import store
from tokenclean.tasks.keys import K_FREE_METHODS
from tokenclean.tasks.names import REFERENCE, REFERENCE_D0, SELF_EVOLVING, label, method_of, split_k

VARIANTS = [  # (label, variant)
    ("base (no SFT)", "base"),
    ("reference theta_1 (D0, full)", "reference"),
    ("theta_1 on D0 (self-evolving)", "reference-d0"),
    ("full tokens", "full"),
    ("random k", "random"),
    ("RHO local top-k", "local"),
    ("fixed-model global top-k", "global"),
    ("sample-level (mean score)", "sample"),
    ("soft weights (score rank)", "weighted"),
    ("self-evolving (Alg. 1)", "self-evolving"),
    ("refreshed global ranking", "refresh"),
]


def outputs_named(con, name: str, kind: str) -> list[dict]:
    """The current outputs of ``kind`` that a user's name stands for, by iteration: the one place a name is
    resolved. A label (``global``, ``self-evolving@2``) names one output; ``self-evolving`` names every
    iteration's."""
    found = [o for o in store.current_outputs(con) if o["kind"] == kind
             and (label(o["variant"], o["iteration"]) == name
                  or name == o["variant"] and method_of(name) == SELF_EVOLVING)]
    return sorted(found, key=lambda o: o["iteration"])


def names_of(con, kind: str) -> str:
    """The names a user can give for ``kind`` in this run, for an error that lists them."""
    names = {label(o["variant"], o["iteration"]) for o in store.current_outputs(con) if o["kind"] == kind}
    if kind == "selection":
        names -= {REFERENCE, REFERENCE_D0}  # theta_1's training set, not a cleaning result
    return ", ".join(sorted(names)) or "none yet: run the pipeline first"


def output_key(con, name: str, kind: str) -> str | None:
    """Key of the current output ``name`` (a label) of ``kind``, or None."""
    return next((o["key"] for o in outputs_named(con, name, kind) if label(o["variant"], o["iteration"]) == name),
                None)


def current_selections(con) -> list[dict]:
    """Current selection outputs (the reference's aside) with their stored records and names."""
    out = []
    for o in store.current_outputs(con):
        if o["kind"] == "selection" and o["variant"] not in (REFERENCE, REFERENCE_D0):
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
    """One row per variant (per k of a sweep): kept/pool, kept share per part, label quality, held-out metrics.

    ``answer_match`` is greedy generation from the prompt (the headline); ``cloze_match``
    is teacher-forced from the gold prefix, kept beside it and named as such.
    """
    outputs = _by_variant(con)
    rows = []
    for lab, method in VARIANTS:
        names = sorted((v for v in outputs if method_of(v) == method), key=lambda v: split_k(v)[1] or 0.0)
        for name in names:
            k = split_k(name)[1]
            if method == REFERENCE and any(o["kind"] == "model" for o in outputs[name]):
                lab = "reference theta_1 (given)"  # model.reference, not trained here
            row = _variant_row(con, lab if k is None else f"{lab} k={name.rsplit('-k', 1)[1]}", method,
                               outputs[name])
            if row is not None:
                rows.append(row | {"name": name, "method": method, "k": k})
    return rows


def _variant_row(con, lab: str, method: str, outs: list[dict]) -> dict | None:
    """One variant's row of the comparison, or None when it has neither a selection nor an evaluation."""
    evals = sorted((o for o in outs if o["kind"] == "eval"), key=lambda o: o["iteration"])
    sels = [store.selection_record(con, o["key"]) for o in outs if o["kind"] == "selection"]
    sels = [s for s in sels if s is not None]
    if method in ("base", REFERENCE, REFERENCE_D0):
        sels = []  # the reference's D0 selection is its training set, not a cleaning result
    if not evals and not sels:
        return None
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
    return row


# The variants a k sweep compares, in column order; those k does not decide (full, weighted) recur at every k.
CURVE_METHODS = ("full", "random", "local", "global", "sample", "weighted", SELF_EVOLVING)


def k_curve(rows: list[dict]) -> list[dict]:
    """Metrics against k, one row per (k, variant), from ``comparison`` rows: empty unless k was swept.

    The variants k does not decide are repeated at every k, as the flat line each curve is read against.
    """
    ks = sorted({r["k"] for r in rows if r.get("k") is not None})
    out = []
    for k in ks:
        for method in CURVE_METHODS:
            flat = method in K_FREE_METHODS  # only these recur at every k; any other row belongs to its own k
            row = next((r for r in rows if r["method"] == method and (r["k"] is None if flat else r["k"] == k)),
                       None)
            if row is not None:
                out.append({"k": k, "method": method, **{c: row[c] for c in CURVE_METRICS}})
    return out


CURVE_METRICS = ("kept", "precision", "recall", "corrupted_kept", "eval_loss", "answer_match", "cloze_match")


def format_curve(curve: list[dict], metric: str) -> str:
    """One metric of ``k_curve`` as a k x variant table."""
    methods = [m for m in CURVE_METHODS if any(r["method"] == m for r in curve)]
    head = f"{metric:<14}" + "".join(f"{m:>15}" for m in methods)
    lines = [head, "-" * len(head)]
    for k in sorted({r["k"] for r in curve}):
        vals = {r["method"]: r[metric] for r in curve if r["k"] == k}
        lines.append(f"k={k:<12g}" + "".join(f"{'-' if vals.get(m) is None else f'{vals[m]:.3f}':>15}"
                                             for m in methods))
    return "\n".join(lines)


COLUMNS = [  # (row key, header, width)
    ("variant", "variant", 36), ("kept", "kept/pool", 15), ("by_part", "kept by part", 24),
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


def table_rows(rows: list[dict]) -> list[dict]:
    """``comparison`` rows as a table artifact's: the printed table's headers, labels and (3-decimal) values."""
    def cell(v):
        return round(v, 3) if isinstance(v, float) else v

    return [{head: cell(parts_text(r.get("kept_by_part")) if key == "by_part" else r[key])
             for key, head, _ in COLUMNS} for r in rows]


def comparison_text(con, rows: list[dict] | None = None) -> str:
    """The comparison table (of ``rows`` when given), and after a k sweep its curves: answer (generated), held-out
    loss, corrupted kept."""
    rows = comparison(con) if rows is None else rows
    curve = k_curve(rows)
    parts = [format_table(rows)]
    if curve:
        parts += ["", "metrics against k (full and weighted do not depend on k):"]
        parts += [format_curve(curve, m) + "\n" for m in ("answer_match", "eval_loss", "corrupted_kept")]
    return "\n".join(parts).rstrip()


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


def metrics_table(con, rows: list[dict] | None = None) -> list[dict]:
    """``metrics_rows`` in wide form, the dashboard's table: one row per model and task (``name`` as the commands take
    it, ``variant`` labelled as the comparison ``rows`` label it, in their order), a column per metric."""
    rows = comparison(con) if rows is None else rows
    labels = {r["name"]: r["variant"] for r in rows}
    order = {r["name"]: i for i, r in enumerate(rows)}
    out: dict[tuple, dict] = {}
    for r in metrics_rows(con):
        name = label(r["variant"], r["iteration"])
        task = r["task"] or "all"
        row = out.setdefault((r["variant"], name, task),
                             {"variant": labels.get(r["variant"], r["variant"]), "name": name, "task": task})
        row[r["metric"]] = r["value"]
    return [out[key] for key in sorted(out, key=lambda vnt: (order.get(vnt[0], len(order)), vnt))]


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
