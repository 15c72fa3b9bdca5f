"""Read a run's database back into the comparison table the demo prints."""
from __future__ import annotations

import json

from tasks.select import selection_quality

VARIANTS = [  # (label, metrics variant, its selections: names, a LIKE pattern, or None)
    ("base (no SFT)", "base", None),
    ("reference theta_1 (D0, full)", "reference", None),
    ("full tokens", "full", ["fixed/full"]),
    ("random k", "random", ["fixed/random"]),
    ("RHO local top-k", "local", ["fixed/local"]),
    ("fixed-model global top-k", "global", ["fixed/global"]),
    ("self-evolving (Alg. 1)", "self-evolving", "self-evolving/iter-%"),
]


def _metric(con, variant: str, metric: str, task: str | None = None):
    row = con.execute(
        "SELECT value FROM metrics WHERE variant = ? AND metric = ? AND task IS NOT DISTINCT FROM ? "
        "ORDER BY iteration DESC LIMIT 1", [variant, metric, task]).fetchone()
    return row[0] if row else None


def comparison(con) -> list[dict]:
    rows = []
    for label, variant, sels in VARIANTS:
        if sels is not None:  # only the selections this run actually made
            pattern = sels if isinstance(sels, str) else None
            sels = [r[0] for r in con.execute(
                "SELECT selection FROM selections WHERE (? IS NOT NULL AND selection LIKE ?) "
                "OR selection IN (SELECT unnest(?)) ORDER BY 1",
                [pattern, pattern, [] if pattern else sels]).fetchall()]
        if _metric(con, variant, "response_loss") is None and not sels:
            continue
        row = {"variant": label, "kept": None, "precision": None, "recall": None}
        if sels:
            stats = con.execute("SELECT sum(n_kept), sum(n_candidates), list(DISTINCT iteration) FROM selections "
                                "WHERE selection IN (SELECT unnest(?))", [sels]).fetchone()
            parts = [r[0] for r in con.execute(
                "SELECT DISTINCT s.part FROM selected_tokens st JOIN samples s USING (sample_id) "
                "WHERE st.selection IN (SELECT unnest(?))", [sels]).fetchall()]
            if "fixed/full" in sels:  # the pool is every training part, whatever was kept
                parts = [r[0] for r in con.execute("SELECT DISTINCT part FROM samples WHERE part >= 0").fetchall()]
            p, r = selection_quality(con, sels, parts) if parts else (None, None)
            row |= {"kept": f"{stats[0]}/{stats[1]}", "precision": p, "recall": r}
        row["eval_loss"] = _metric(con, variant, "response_loss")
        row["exact_match"] = _metric(con, variant, "answer_exact_match")
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


def stage_times(con) -> list[tuple[str, str, float]]:
    return con.execute("SELECT stage, key, seconds FROM stage_log ORDER BY finished_at").fetchall()


def run_overview(con) -> dict:
    from tasks.store import get_meta

    out = {"ingest": json.loads(get_meta(con, "ingest_summary") or "{}")}
    out["samples_by_part"] = dict(con.execute("SELECT part, count(*) FROM samples GROUP BY part ORDER BY part").fetchall())
    out["quarantine_reasons"] = dict(con.execute(
        "SELECT regexp_replace(reason, '''.*''|\\d+', '…', 'g') AS r, count(*) FROM quarantine GROUP BY r ORDER BY 2 DESC"
    ).fetchall())
    out["token_losses"] = dict(con.execute("SELECT model, count(*) FROM token_losses GROUP BY model ORDER BY 1").fetchall())
    return out
