"""A run's self-contained HTML report: inline CSS and SVG, no scripts, no network.

Sections: flow runs (status, durations, stage timings), run overview, score histograms on a
log count axis with global thresholds and local's per-sample thresholds, kept-token fraction
per source dataset, the comparison table, per-task exact match across self-evolving
iterations (the Matthew-effect view), scheduled-refresh history and sample responses with
kept tokens highlighted.

Every aggregate over token-level tables (``token_scores``, ``selected_tokens``) is
computed in DuckDB; Python only sees bins and per-group counts. Each section is built
on its own: a missing or broken piece becomes a note in the report, never an exception.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
import traceback
from pathlib import Path

from tokenclean.config import DB_FILE
from tokenclean.summary import current_selections

TREND_EPS = 0.01
N_BINS = 60
PALETTE = ["#d62728", "#1f77b4", "#9467bd", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#17becf"]

TREND_DEFINITION = (
    "Trend of answer exact match over the series reference (iteration 0), self-evolving iteration 1, …, T "
    f"(missing points skipped): <b>rising</b> = every step is non-decreasing and the net gain (last − first) "
    f"is &gt; {TREND_EPS}; <b>falling</b> = every step is non-increasing and the net loss (first − last) is "
    f"&gt; {TREND_EPS}; <b>flat</b> = all values lie within {TREND_EPS} of each other; <b>unstable</b> = "
    "anything else (the series changes direction, or moves monotonically by no more than the tolerance); "
    "<b>n/a</b> = fewer than two points."
)


def esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def classify_trend(values, eps: float = TREND_EPS) -> str:
    """rising / falling / flat / unstable / n/a for a series of metric values (None/NaN skipped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(xs) < 2:
        return "n/a"
    if max(xs) - min(xs) <= eps:
        return "flat"
    steps = [b - a for a, b in zip(xs, xs[1:])]
    net = xs[-1] - xs[0]
    if all(d >= 0 for d in steps) and net > eps:
        return "rising"
    if all(d <= 0 for d in steps) and -net > eps:
        return "falling"
    return "unstable"


def _fmt(v, fmt="{:.3f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else fmt.format(v)
    return str(v)


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _table(head: list[str], rows: list[list[str]], cls: str = "", attrs: list[str] | None = None) -> str:
    """Cells are already-escaped HTML; ``attrs``: each row's attributes (escaped), for readers of the HTML."""
    th = "".join(f"<th>{h}</th>" for h in head)
    attrs = attrs or [""] * len(rows)
    body = "".join(f"<tr{' ' + a if a else ''}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                   for r, a in zip(rows, attrs))
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


# --------------------------------------------------------------------------- sections

def _base_path(con) -> str | None:
    from tokenclean.summary import output_key
    from tokenclean.tasks import store

    key = output_key(con, "base", "model")
    return (store.model_inputs(con, key) or {}).get("path") if key else None


REFRESH_FLOW, REFRESH_VARIANT = "refresh-token-ranking", "refresh"  # flows/cleaning.py: the refresh flow and its name


def _when(ts) -> str:
    return "–" if ts is None else f"{ts:%Y-%m-%d %H:%M:%S}"


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    h, rest = divmod(round(s), 3600)
    return (f"{h} h " if h else "") + f"{rest // 60} min {rest % 60} s"


def _run_section(con) -> str:
    """The latest run of each flow (and the finished one the report reads, where the latest did not finish):
    status, start, duration, and what each stage computed and how long it took."""
    from tokenclean.tasks import store

    runs = store.report.flow_run_status(con)
    if not runs:
        return _note("No flow runs recorded in this database.")
    rows, attrs = [], []
    for r in runs:
        status = "finished" if r["finished_at"] is not None else "unfinished"
        rows.append([esc(r["flow"]), esc(r["name"]), f'<span class="status status-{status}">{status}</span>',
                     f"<code>{esc(r['flow_run'][:12])}</code>", f"<code>{esc(r['dataset'])}</code>",
                     esc(_when(r["started_at"])), esc(_duration(r["seconds"]))])
        attrs.append(f'data-flow-run="{esc(r["flow_run"])}" data-flow="{esc(r["flow"])}" data-status="{status}" '
                     f'data-seconds="{"" if r["seconds"] is None else repr(float(r["seconds"]))}"')
    out = [_table(["flow", "run name", "status", "flow run", "dataset", "started", "duration"], rows, "runs", attrs)]
    if any(r["finished_at"] is None for r in runs):
        out.append(_note("An unfinished run is still running or was killed: the other sections show the latest "
                         "finished run of each flow."))
    out += [_stage_table(con, r) for r in runs]
    return "".join(out)


def _stage_table(con, run: dict) -> str:
    """One flow run's stages by start: the computed ones with their times, then what it reused."""
    from tokenclean.tasks import store
    from tokenclean.tasks.names import label

    stages = store.report.stage_timings(con, run["flow_run"])
    reused = store.report.reused_outputs(con, run["flow_run"])
    status = "finished" if run["finished_at"] is not None else "unfinished"
    head = (f'<h3 data-stages-of="{esc(run["flow_run"])}">{esc(run["flow"])} ({status}) · started '
            f"{esc(_when(run['started_at']))} · {len(stages)} stages computed in "
            f"{esc(_duration(sum(s['seconds'] for s in stages)))}</h3>")
    rows = [[esc(_when(s["started_at"])), esc(s["stage"]), esc(s["name"]),
             f'<span class="num">{s["seconds"]:.2f}</span>', "computed", f"<code>{esc(s['key'])}</code>"]
            for s in stages]
    attrs = [f'class="stage" data-stage="{esc(s["stage"])}" data-name="{esc(s["name"])}" '
             f'data-start="{esc(s["started_at"].isoformat())}" data-seconds="{s["seconds"]!r}"' for s in stages]
    rows += [["–", esc(o["kind"]), esc(label(o["variant"], o["iteration"])), "–", "reused",
              f"<code>{esc(o['key'])}</code>"] for o in reused]
    attrs += [f'class="reused" data-stage="{esc(o["kind"])}"' for o in reused]
    if not rows:
        return head + _note("This flow run logged no stages and recorded no outputs.")
    return head + _table(["started", "stage", "name", "seconds", "computed", "key"], rows, "stages", attrs)


def _refresh_section(con) -> str:
    """One row per finished scheduled refresh: what changed in the inputs, what was scored, what it kept."""
    from tokenclean.tasks import store

    runs = store.report.refresh_history(con, REFRESH_FLOW, REFRESH_VARIANT)
    if not runs:
        return _note(f"No scheduled refresh ({REFRESH_FLOW}) has finished on this run.")
    rows, attrs = [], []
    for r in runs:
        sels = r["selections"] or []
        scored = ", ".join(f"{s['name']} {s['samples'] or 0:,}" for s in r["scored"] or []) or "nothing"
        kept = "; ".join(f"{s['name']}: {s['kept']:,} / {s['candidates']:,}" for s in sels) or "–"
        theta1 = "–" if r["retrained"] is None else "retrained" if r["retrained"] else "kept"
        rows.append([esc(_when(r["started_at"])), esc(_duration((r["finished_at"] - r["started_at"]).total_seconds())),
                     f"<code>{esc(r['dataset'])}</code>", esc(_inputs_change(r["ingest"])), esc(scored), esc(theta1),
                     esc(kept)])
        attrs.append(f'class="refresh" data-flow-run="{esc(r["flow_run"])}" data-dataset="{esc(r["dataset"])}" '
                     f'data-scored="{sum((s["samples"] or 0) for s in r["scored"] or [])}" '
                     f'data-kept="{sum(s["kept"] for s in sels)}" '
                     f'data-candidates="{sum(s["candidates"] for s in sels)}"')
    return ("<p>Each finished run of the refresh flow, oldest first. Samples scored: the samples each model scored "
            "in that refresh (stored losses of unchanged samples are reused, not rescored). Kept: the refresh "
            "selection's kept tokens of its candidate tokens.</p>"
            + _table(["started", "duration", "dataset", "inputs", "samples scored per model", "reference θ1",
                      "kept / candidates"],
                     rows, "refreshes", attrs))


def _inputs_change(ingest: dict | None) -> str:
    """What the refresh found in its inputs, from its ingest stage's detail."""
    if ingest is None:
        return "no dataset ingested (inputs unchanged, or as stored before)"
    changes = ingest.get("changes")
    if not changes:
        return "first ingest"
    return ", ".join(f"{k} {v:,}" for k, v in changes.items())


def _overview(con) -> str:
    from tokenclean.summary import run_overview

    ov = run_overview(con)
    parts = []
    ing = ov["ingest"]
    if ing:
        parts.append(_table(["ingest", "value"], [[esc(k), esc(v)] for k, v in ing.items()], "kv"))
    else:
        parts.append(_note("No ingest summary for the run's dataset."))
    part_names = {-1: "held-out (eval)"}
    parts.append(_table(["part", "samples"], [[esc(part_names.get(p, f"D{p}")), esc(n)]
                                              for p, n in ov["samples_by_part"].items()], "kv"))
    q = ov["quarantine_reasons"]
    if q:
        parts.append(_table(["quarantine reason (numbers and quoted values elided)", "rows"],
                            [[esc(r), esc(n)] for r, n in q.items()], "kv"))
    else:
        parts.append(_note("No quarantined rows."))
    if ov["token_losses"]:
        parts.append(_table(["model", "token losses"], [[esc(m), esc(n)] for m, n in ov["token_losses"].items()],
                            "kv"))
    base = _base_path(con)
    meta = f"<p>base model: <code>{esc(base)}</code></p>" if base else _note("No base model recorded by a flow run.")
    from tokenclean.tasks import store

    for r in store.unfinished_flow_runs(con):  # the report is of finished runs: say what it leaves out
        meta += _note(f"{r['flow']} started {r['started_at']:%Y-%m-%d %H:%M:%S}: unfinished (running or killed); "
                      "this report shows the latest finished run of each flow")
    return meta + '<div class="row">' + "".join(parts) + "</div>"


def _log_frac(count: float, top: float) -> float:
    """Height of ``count`` as a fraction of the plot on the log10(1 + count) axis that ends at ``top``."""
    return math.log10(1 + count) / math.log10(1 + top) if top > 0 else 0.0


def _count_ticks(top: int) -> list[int]:
    """0, the powers of ten up to ``top``, and ``top`` itself where it is not crowded by the last power."""
    ticks = [0] + [10 ** i for i in range(int(math.log10(top)) + 1)] if top >= 1 else [0]
    if top > 2 * ticks[-1]:
        ticks.append(top)
    return ticks


class _Frame:
    """A chart's plot area: pixel position of a score (x) and of a count on the log axis (y)."""

    def __init__(self, lo: float, hi: float, top: int, height: int):
        self.W, self.H, self.L, self.R, self.T, self.B = 820, height, 60, 20, 34, 42
        self.pw, self.ph = self.W - self.L - self.R, height - self.T - self.B
        self.lo, self.hi, self.top = lo, hi, top

    def x(self, v: float) -> float:
        return self.L + (v - self.lo) / (self.hi - self.lo) * self.pw if self.hi > self.lo else self.L + self.pw / 2

    def y(self, count: float) -> float:
        return self.T + self.ph - _log_frac(count, self.top) * self.ph


def _histogram_axes(f: _Frame, unit: str, xlabel: str) -> list[str]:
    out = []
    for t in _nice_ticks(f.lo, f.hi):
        x = f.x(t)
        out.append(f'<line x1="{x:.2f}" y1="{f.T + f.ph}" x2="{x:.2f}" y2="{f.T + f.ph + 5}" stroke="#555"/>'
                   f'<text x="{x:.2f}" y="{f.T + f.ph + 18}" text-anchor="middle" class="tick">{esc(f"{t:g}")}</text>')
    for c in _count_ticks(f.top):
        y = f.y(c)
        out.append(f'<line x1="{f.L - 4}" y1="{y:.2f}" x2="{f.L}" y2="{y:.2f}" stroke="#555"/>'
                   f'<text x="{f.L - 6}" y="{y + 4:.2f}" text-anchor="end" class="tick ytick" data-count="{c}">'
                   f'{c:,}</text>')
    if f.lo < 0 < f.hi:
        out.append(f'<line x1="{f.x(0):.2f}" y1="{f.T}" x2="{f.x(0):.2f}" y2="{f.T + f.ph}" stroke="#999" '
                   'stroke-dasharray="2 3"/>')
    mid = f.T + f.ph / 2
    out.append(f'<text x="{f.L + f.pw / 2}" y="{f.H - 6}" text-anchor="middle" class="axis">{esc(xlabel)}</text>'
               f'<text x="14" y="{mid}" text-anchor="middle" class="axis" transform="rotate(-90 14 {mid})">'
               f'{esc(unit)} (log scale)</text>')
    return out


def _threshold_marks(f: _Frame, lines: list[tuple[str, float, str]]) -> list[str]:
    """A dashed line per global threshold, its label, and the kept side (scores at or above it) shaded."""
    out = []
    for j, (name, thr, color) in enumerate(lines):
        x = f.x(thr)
        out.append(f'<rect class="kept-region" data-selection="{esc(name)}" x="{x:.2f}" y="{f.T}" '
                   f'width="{max(f.L + f.pw - x, 0):.2f}" height="{f.ph}" fill="{color}" fill-opacity="0.06"/>'
                   f'<line class="threshold" data-selection="{esc(name)}" x1="{x:.2f}" y1="{f.T - 4}" x2="{x:.2f}" '
                   f'y2="{f.T + f.ph}" stroke="{color}" stroke-width="2" stroke-dasharray="6 3">'
                   f'<title>{esc(f"{name}: keep score >= {thr:.4g}")}</title></line>')
        anchor = "start" if x < f.L + f.pw * 0.7 else "end"
        dx = 4 if anchor == "start" else -4
        out.append(f'<text x="{x + dx:.2f}" y="{f.T + 8 + 13 * j}" text-anchor="{anchor}" class="thr" '
                   f'fill="{color}">{esc(f"{name} ≥ {thr:.3g}")}</text>')
    return out


def _histogram_svg(bins: list[int], lo: float, hi: float, lines: list[tuple[str, float, str]], title: str, *,
                   unit: str = "tokens", xlabel: str = "score = loss_base − loss_ref", height: int = 260) -> str:
    """Bars on a log10(1 + count) axis: a bin of one token still shows beside a bin of a million, so the tail
    and the side of each threshold it falls on are visible."""
    f = _Frame(lo, hi, max(bins, default=0), height)
    out = [f'<svg class="chart" data-yscale="log10(1+count)" xmlns="http://www.w3.org/2000/svg" width="{f.W}" '
           f'height="{f.H}" viewBox="0 0 {f.W} {f.H}" role="img"><title>{esc(title)}</title>',
           f'<rect x="{f.L}" y="{f.T}" width="{f.pw}" height="{f.ph}" fill="#fafafa" stroke="#ccc"/>']
    bw = f.pw / max(len(bins), 1)
    for i, c in enumerate(bins):
        if c > 0:
            y = f.y(c)
            out.append(f'<rect class="bar" data-count="{c}" x="{f.L + i * bw:.2f}" y="{y:.2f}" '
                       f'width="{max(bw - 0.6, 0.5):.2f}" height="{f.T + f.ph - y:.2f}" fill="#7a9cc6">'
                       f'<title>{esc(f"bin {i}: {c} {unit}")}</title></rect>')
    out += _histogram_axes(f, unit, xlabel) + _threshold_marks(f, lines) + ["</svg>"]
    return "".join(out)


def _score_range(stats: tuple, lines: list[tuple[str, float, str]]) -> tuple[float, float]:
    """The histogram's x range: the 0.1–99.9% quantiles widened to every threshold, padded by 2%."""
    lo, hi = float(stats[4]), float(stats[5])
    for _, thr, _ in lines:
        lo, hi = min(lo, thr), max(hi, thr)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02
    return lo - pad, hi + pad


def _histograms(con) -> str:
    groups: dict[tuple, list[dict]] = {}  # (scores key, dataset, parts) -> the selections ranking them
    for sel in current_selections(con):
        if sel["scores"]:
            groups.setdefault((sel["scores"], sel["dataset"], sel["parts"]), []).append(sel)
    if not groups:
        return _note("No token scores in this run: no selection of the latest runs ranks scores yet.")
    out = [f"<p>Bins are computed in DuckDB ({N_BINS} equal-width bins over the 0.1–99.9% quantile range, widened to "
           "include every threshold; values outside fall into the edge bins). Counts are on a log scale "
           "(bar height ∝ log<sub>10</sub>(1 + count)), so single tokens in the tail stay visible. A dashed line "
           "marks each global selection's threshold; tokens scoring at or above it (the shaded side) were kept.</p>"]
    colors = iter(PALETTE * 4)
    for (scores, dataset, _parts_sql), sels in groups.items():
        out.append(_score_chart(con, scores, dataset, sels, colors))
    return "".join(out)


def _score_chart(con, scores: str, dataset: str, sels: list[dict], colors) -> str:
    """One pool's score histogram with its global thresholds, and the per-sample thresholds of its local ones."""
    from tokenclean.tasks import store

    parts = sels[0]["part_list"]
    title = f"scores of {' / '.join(s['name'] for s in sels)} over D{','.join(map(str, parts))}"
    stats = store.report.score_stats(con, scores, dataset, parts)
    n, bad, mn, mx, _, _, mean = stats
    lines = [(s["name"], float(s["threshold"]), next(colors)) for s in sels
             if s["threshold"] is not None and math.isfinite(s["threshold"])]
    if mn is None:
        return f"<h3>{esc(title)}</h3>" + _note(f"all {n} scores are non-finite")
    lo, hi = _score_range(stats, lines)
    w = (hi - lo) / N_BINS
    bins = [0] * N_BINS
    for b, c in store.report.score_bins(con, scores, dataset, parts, lo, w, N_BINS):
        bins[int(b)] = int(c)
    cap = (f"{title}: {n} scored tokens, mean {mean:.3f}, min {mn:.3f}, max {mx:.3f}"
           + (f", {bad} non-finite (not ranked)" if bad else "")
           + (" — range clipped, outliers in the edge bins" if mn < lo or mx > hi else ""))
    out = (f"<h3 data-scores=\"{esc(scores)}\">{esc(title)}</h3><figure>" + _histogram_svg(bins, lo, hi, lines, title)
           + f"<figcaption>{esc(cap)}</figcaption></figure>")
    local = [s for s in sels if s["method"] == "local"]
    if not lines:
        out += _note("No global selection with a threshold ranks these scores"
                     + (": local selections have a threshold per sample (below)." if local else "."))
    return out + "".join(_local_thresholds(con, s, dataset, lo, hi) for s in local)


def _local_thresholds(con, sel: dict, dataset: str, lo: float, hi: float) -> str:
    """A local selection's per-sample thresholds: what they mean, their spread, and their histogram."""
    from tokenclean.tasks import store

    name, scores = sel["name"], sel["scores"]
    st = store.report.sample_threshold_stats(con, sel["selection"], scores, dataset, sel["part_list"])
    text = (f"<b>{esc(name)}</b> keeps each sample's own top {esc(_fmt(sel['k'], '{:g}'))} of its response tokens, "
            "so it has no single threshold: each sample's threshold is the lowest score it keeps, and no line is "
            "drawn for it above.")
    if not st["keeping"]:
        return f'<p class="local-thresholds" data-selection="{esc(name)}">{text}</p>' + _note(
            f"{name} keeps no token.")
    spread = ", ".join(f"{k} {st[k]:.3f}" for k in ("min", "q10", "median", "q90", "max"))
    attrs = " ".join(f'data-{k}="{st[k]!r}"' for k in ("keeping", "min", "median", "max"))
    text += (f" Per-sample thresholds over the {st['keeping']} samples keeping a token ({spread})"
             + (f"; {st['samples'] - st['keeping']} samples keep none" if st["samples"] > st["keeping"] else "")
             + ".")
    w = (hi - lo) / N_BINS
    bins = [0] * N_BINS
    for b, c in store.report.sample_threshold_bins(con, sel["selection"], scores, lo, w, N_BINS):
        bins[int(b)] = int(c)
    title = f"per-sample thresholds of {name}"
    return (f'<p class="local-thresholds" data-selection="{esc(name)}" {attrs}>{text}</p>'
            f'<figure class="sample-thresholds" data-selection="{esc(name)}">'
            + _histogram_svg(bins, lo, hi, [], title, unit="samples", height=170,
                             xlabel=f"lowest kept score per sample ({name}), same score axis as above")
            + f"<figcaption>{esc(title)}: {st['keeping']} samples</figcaption></figure>")


def kept_by_source(con) -> list[dict]:
    """Kept tokens / response tokens per (selection, source) of the current selections.

    The denominator is every response token of that source in the selection's pool.
    """
    from tokenclean.tasks import store

    out = []
    for sel in current_selections(con):
        for src, k, p in store.report.kept_by_source(con, sel["selection"], sel["dataset"], sel["part_list"]):
            out.append({"selection": sel["name"], "method": sel["method"], "k": sel["k"], "source": src,
                        "kept": int(k), "pool": int(p), "fraction": (k / p) if p else None})
    return out


def kept_reasoning(con) -> list[dict]:
    """Per current selection: kept tokens among its pool's reasoning targets and among its answer targets (the
    rest: content, tool calls, end-of-turn tokens), and the kept share of each."""
    from tokenclean.tasks import store

    out = []
    for sel in current_selections(con):
        r = store.report.kept_reasoning(con, sel["selection"], sel["dataset"], sel["part_list"])
        out.append({"selection": sel["name"], "method": sel["method"], "k": sel["k"], **r,
                    "reasoning_share": r["reasoning_kept"] / r["reasoning"] if r["reasoning"] else None,
                    "answer_share": r["answer_kept"] / r["answer"] if r["answer"] else None})
    return out


def _reasoning_table(con) -> str:
    """Kept share of reasoning vs answer targets, where the data has reasoning (``data.template: model``)."""
    rows = kept_reasoning(con)
    if not any(r["reasoning"] for r in rows):
        return ""
    body = [[esc(r["selection"]), esc(r["method"]), esc(_fmt(r["k"], "{:g}")),
             f'<span class="num">{r["reasoning_kept"]}</span>', f'<span class="num">{r["reasoning"]}</span>',
             esc(_fmt(r["reasoning_share"])), f'<span class="num">{r["answer_kept"]}</span>',
             f'<span class="num">{r["answer"]}</span>', esc(_fmt(r["answer_share"]))] for r in rows]
    unrecorded = max(r["unrecorded"] for r in rows)
    return ("<p>Kept share of the reasoning the model generates (its think blocks, analysis channel) and of the "
            "rest of its targets (answer, tool calls, end-of-turn tokens).</p>"
            + _table(["selection", "method", "k", "reasoning kept", "reasoning tokens", "reasoning kept share",
                      "answer kept", "answer tokens", "answer kept share"], body, "reasoning")
            + (_note(f"{unrecorded} samples were ingested before reasoning was recorded: their targets count as "
                     "answer.") if unrecorded else ""))


def _kept_section(con) -> str:
    rows = kept_by_source(con)
    if not rows:
        return _note("No selections with kept tokens in this run.")
    body = []
    for r in rows:
        frac = r["fraction"]
        pct = 0.0 if frac is None else max(0.0, min(100.0, frac * 100))
        bar = (f'<div class="bar-cell"><div class="bar-fill" style="width:{pct:.1f}%"></div>'
               f'<span>{esc(_fmt(frac))}</span></div>')
        body.append([esc(r["selection"]), esc(r["method"]), esc(_fmt(r["k"], "{:g}")),
                     esc(r["source"]), f'<span class="num">{r["kept"]}</span>', f'<span class="num">{r["pool"]}</span>',
                     f'<span class="frac" data-selection="{esc(r["selection"])}" data-source="{esc(r["source"])}" '
                     f'data-fraction="{frac if frac is not None else ""}">{bar}</span>'])
    return ("<p>Fraction of a source's response tokens kept by each selection, over the parts (D<sub>t</sub>) the "
            "selection drew from. A global top-k keeps k of the whole pool, so sources can differ widely.</p>"
            + _table(["selection", "method", "k", "source", "kept", "response tokens", "kept fraction"], body,
                     "kept") + _reasoning_table(con))


def _comparison_section(con) -> str:
    from tokenclean.summary import comparison

    rows = comparison(con)
    if not rows:
        return _note("No variants evaluated or selected yet.")
    from tokenclean.summary import parts_text

    body = [[esc(r["variant"]), esc(_fmt(r["kept"])), esc(_fmt(parts_text(r["kept_by_part"]))),
             esc(_fmt(r["precision"])), esc(_fmt(r["recall"])), esc(_fmt(r["corrupted_kept"])),
             esc(_fmt(r["eval_loss"])), esc(_fmt(r["answer_match"])), esc(_fmt(r["cloze_match"]))] for r in rows]
    note = _note("Answer (generated): greedy decoding from the prompt, the answer found in the output. Cloze: "
                 "every answer token is the argmax given the gold prefix (the boilerplate before it is given). "
                 "Kept by part: the share of each split's response tokens kept.")
    if all(r["precision"] is None for r in rows):
        note += _note("No ground-truth token labels in this data: precision, recall and corrupted kept are not "
                      "available.")
    return _table(["variant", "kept/pool", "kept by part", "precision", "recall", "corrupted kept",
                   "held-out loss", "answer (generated)", "cloze EM"], body, "comparison") + note


def _curve_svg(curve: list[dict], metric: str, title: str) -> str:
    """``metric`` against k, one polyline per variant (``summary.k_curve`` rows)."""
    W, H, L, R, T, B = 820, 280, 60, 150, 24, 42
    pw, ph = W - L - R, H - T - B
    ks = sorted({r["k"] for r in curve})
    vals = [r[metric] for r in curve if r[metric] is not None and math.isfinite(r[metric])]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    kx = (lambda k: L + (k - ks[0]) / (ks[-1] - ks[0]) * pw) if len(ks) > 1 else (lambda k: L + pw / 2)
    vy = lambda v: T + ph - (v - lo) / (hi - lo) * ph  # noqa: E731
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img"><title>{esc(title)}</title>',
           f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for k in ks:
        out.append(f'<text x="{kx(k):.2f}" y="{T + ph + 18}" text-anchor="middle" class="tick">{esc(f"{k:g}")}</text>')
    for t in _nice_ticks(lo, hi, 4):
        out.append(f'<text x="{L - 6}" y="{vy(t) + 4:.2f}" text-anchor="end" class="tick">{esc(f"{t:g}")}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 6}" text-anchor="middle" class="axis">k (selected proportion)</text>')
    methods = list(dict.fromkeys(r["method"] for r in curve))
    for j, method in enumerate(methods):
        pts = [(kx(r["k"]), vy(r[metric])) for r in curve if r["method"] == method and r[metric] is not None
               and math.isfinite(r[metric])]
        color = PALETTE[j % len(PALETTE)]
        xy = " ".join(f"{x:.2f},{y:.2f}" for x, y in pts)
        out.append(f'<polyline class="curve" data-variant="{esc(method)}" points="{xy}" fill="none" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{L + pw + 8}" y="{T + 12 + 15 * j}" class="thr" fill="{color}">{esc(method)}</text>')
    out.append("</svg>")
    return "".join(out)


def _curve_section(con) -> str:
    from tokenclean.summary import comparison, k_curve

    curve = k_curve(comparison(con))
    if not curve:
        return _note("No k sweep in this run (select.k as a list, e.g. [0.3, 0.5, 0.7, 0.9], makes one).")
    charts = "".join(_curve_svg(curve, m, t) for m, t in (
        ("answer_match", "answer (generated) against k"), ("eval_loss", "held-out response loss against k")))
    body = [[esc(_fmt(r["k"], "{:g}")), esc(r["method"]), esc(_fmt(r["kept"])), esc(_fmt(r["precision"])),
             esc(_fmt(r["corrupted_kept"])), esc(_fmt(r["eval_loss"])), esc(_fmt(r["answer_match"])),
             esc(_fmt(r["cloze_match"]))] for r in curve]
    return (charts + _table(["k", "variant", "kept/pool", "precision", "corrupted kept", "held-out loss",
                             "answer (generated)", "cloze EM"], body, "curve")
            + _note("full and weighted keep every token whatever k is: they are the flat lines the others are read "
                    "against. self-evolving is its last iteration's model."))


def _sparkline(values: list) -> str:
    pts = [(i, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(float(v))]
    if len(pts) < 2:
        return ""
    W, H, P = 110, 26, 3
    n = len(values)
    ys = [v for _, v in pts]
    lo, hi = min(ys), max(ys)
    span = hi - lo or 1.0
    xy = " ".join(f"{P + i / max(n - 1, 1) * (W - 2 * P):.1f},{H - P - (v - lo) / span * (H - 2 * P):.1f}"
                  for i, v in pts)
    return (f'<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
            f'<polyline points="{xy}" fill="none" stroke="#333" stroke-width="1.5"/></svg>')


def task_trends(con, metric: str = "answer_match", variant: str = "self-evolving") -> dict:
    """Per task (None = all tasks) the series reference@0, ``variant``@1..T and its trend (``variant``: one
    self-evolving chain, ``self-evolving-k0.3`` in a sweep)."""
    from tokenclean.tasks import store

    evals = {(o["variant"], o["iteration"]): o["key"] for o in store.current_outputs(con) if o["kind"] == "eval"}
    iters = sorted(i for v, i in evals if v == variant)
    # the loop's theta_1: trained on D0 under its own name when the run also has a given reference
    theta1 = evals.get(("reference-d0", 0)) or evals.get(("reference", 0))
    ref = store.report.metric_by_task(con, theta1, metric) if theta1 else {}
    by_iter = {i: store.report.metric_by_task(con, evals[(variant, i)], metric) for i in iters}
    tasks = set().union(*by_iter.values()) if by_iter else set()
    tasks = sorted(tasks | (set(ref) if iters else set()), key=lambda t: (t is not None, t or ""))
    out = {}
    for t in tasks:
        series = [ref.get(t)] + [by_iter[i].get(t) for i in iters]
        out[t] = {"series": series, "trend": classify_trend(series)}
    return {"iterations": iters, "has_reference": bool(ref), "tasks": out}


def _trend_section(con) -> str:
    from tokenclean.tasks import store
    from tokenclean.tasks.names import SELF_EVOLVING, method_of, split_k

    chains = sorted({o["variant"] for o in store.current_outputs(con) if o["kind"] == "eval"
                     and method_of(o["variant"]) == SELF_EVOLVING}, key=lambda v: split_k(v)[1] or 0.0)
    tables = [(v, task_trends(con, variant=v)) for v in chains]
    tables = [(v, tr) for v, tr in tables if tr["iterations"]]
    if not tables:
        return _note("This run has no self-evolving iterations with answer exact match "
                     "(metrics variant 'self-evolving'): nothing to show across iterations.")
    if len(tables) == 1:
        return f"<p>{TREND_DEFINITION}</p>" + _trend_table(tables[0][1])
    return f"<p>{TREND_DEFINITION}</p>" + "".join(f"<h3>{esc(v)}</h3>" + _trend_table(tr) for v, tr in tables)


def _trend_table(tr: dict) -> str:
    """One self-evolving chain's per-task series (``task_trends``) as a table with sparklines."""
    parts = []
    if not tr["has_reference"]:
        parts.append(_note("No reference (theta_1) evaluation at iteration 0: series start at iteration 1."))
    head = ["task", "reference (0)"] + [f"iter {esc(i)}" for i in tr["iterations"]] + ["net Δ", "", "trend"]
    body, counts = [], {}
    for task, d in tr["tasks"].items():
        s = d["series"]
        xs = [v for v in s if v is not None]
        net = (xs[-1] - xs[0]) if len(xs) >= 2 else None
        counts[d["trend"]] = counts.get(d["trend"], 0) + (task is not None)
        label = "<i>all tasks</i>" if task is None else esc(task)
        body.append([label] + [esc(_fmt(v)) for v in s] + [esc(_fmt(net, "{:+.3f}")), _sparkline(s),
                     f'<span class="trend trend-{esc(d["trend"]).replace("/", "")}" data-task="{esc(task)}">'
                     f'{esc(d["trend"])}</span>'])
    parts.append(_table(head, body, "trends"))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n)
    if summary:
        parts.append(f"<p>Tasks: {esc(summary)}.</p>")
    return "".join(parts)


def _load_tokenizer(con):
    from tokenclean.tasks import store

    dataset = store.latest_dataset(con)
    inputs = store.artifact_inputs(con, "dataset", dataset) if dataset else None
    path = (inputs or {}).get("inputs", {}).get("tokenizer")
    if not path:
        return None, "no dataset recorded by a flow run: showing token ids instead of text"
    try:
        from tokenclean.tasks.template import load_tokenizer

        return load_tokenizer(path), None
    except Exception as e:  # a moved model directory must not stop the report
        return None, f"tokenizer at {path} could not be loaded ({type(e).__name__}: {e}); showing token ids"


def token_pieces(tok, ids: list[int]) -> list[tuple[list[int], str]]:
    """Incremental detokenisation: (token positions, text) groups that concatenate to the decoded text.

    A piece is the text a token adds to its predecessor's decode, so leading spaces survive
    (SentencePiece) and bytes of one character split over several tokens (byte-level BPE)
    are grouped instead of printed as replacement characters.
    """
    if tok is None:
        return [([i], f"[{t}]") for i, t in enumerate(ids)]

    def dec(x):
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, prefix, read, pending = [], 0, 0, []
    for i in range(len(ids)):
        pending.append(i)
        prefix_text = dec(ids[prefix:read])
        new_text = dec(ids[prefix:i + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out.append((pending, new_text[len(prefix_text):]))
            pending, prefix, read = [], read, i + 1
    if pending:
        out.append((pending, dec(ids[pending[0]:])))
    return out


def _pick_selection(con, selection: str) -> tuple[dict | None, str | None]:
    sels = sorted(current_selections(con), key=lambda r: (r["method"] != "global", r["name"]))
    for r in sels:
        if r["name"] == selection:
            return r, None
    if not sels:
        return None, f"selection {selection!r} not found and the run has no selections: samples shown unmarked"
    alt = sels[0]
    return alt, (f"selection {selection!r} not found; showing {alt['name']!r} instead "
                 f"(available: {', '.join(r['name'] for r in sels)})")


def _samples_section(con, selection: str, n_samples: int) -> str:
    from tokenclean.tasks import store

    sel, note = _pick_selection(con, selection)
    notes = [note] if note else []
    dataset = sel["dataset"] if sel else store.latest_dataset(con)
    if sel is not None:
        parts = sel["part_list"]
    else:
        parts = [p for p in (store.samples_by_part(con, dataset) if dataset else {}) if p >= 0]
    scores_key = sel["scores"] if sel else None
    if sel is not None and scores_key is None:
        notes.append(f"{sel['name']} ranks no scores: hover titles show no scores")
    if not parts or n_samples <= 0:
        return "".join(_note(n) for n in notes) + _note("No samples to show.")
    rows = store.report.pick_samples(con, dataset, parts, n_samples)
    kept_all, scores_all = _sample_marks(con, sel, scores_key, [r[0] for r in rows])
    tok, tnote = _load_tokenizer(con)
    if tnote:
        notes.append(tnote)
    if rows and all(r[7] is None for r in rows):
        notes.append("no ground-truth token labels in these samples")
    out = ["".join(_note(n) for n in notes),
           f"<p>{_selection_description(sel, scores_key)}. Legend: "
           '<span class="tk p">prompt</span> <span class="tk k">kept</span> <span class="tk d">dropped</span> '
           '<span class="tk k t1">informative fact</span> <span class="tk d t2">corrupted fact</span> '
           "(underlines only when the data has labels). Hover a token for its position and score.</p>"]
    for row in rows:
        sid = row[0]
        out.append(_sample_html(tok, row, kept_all.get(sid, set()), scores_all.get(sid, {})))
    return "".join(out)


def _sample_marks(con, sel: dict | None, scores_key: str | None,
                  ids_shown: list[int]) -> tuple[dict[int, set], dict[int, dict]]:
    """Per sample shown: the positions ``sel`` keeps, and each position's score under ``scores_key``."""
    from tokenclean.tasks import store

    kept_all: dict[int, set] = {}
    if sel:
        for sid, pos in store.report.kept_in(con, sel["selection"], ids_shown):
            kept_all.setdefault(sid, set()).add(pos)
    scores_all: dict[int, dict] = {}
    if scores_key:
        for sid, pos, score in store.report.scores_in(con, scores_key, ids_shown):
            scores_all.setdefault(sid, {})[pos] = score
    return kept_all, scores_all


def _selection_description(sel: dict | None, scores_key: str | None) -> str:
    if sel is None:
        return "Selection <b>–</b> (no kept tokens to mark)"
    return (f"Selection <b>{esc(sel['name'])}</b> (method {esc(sel['method'])}, k = {esc(_fmt(sel['k'], '{:g}'))}"
            + (f", scores <code>{esc(scores_key)}</code>" if scores_key else "")
            + (f", threshold {esc(_fmt(sel['threshold'], '{:.4g}'))}" if sel["threshold"] is not None else "")
            + f", key <code>{esc(sel['selection'])}</code>)")


def _token_class(group: list[int], mask, kept: set, truth) -> str:
    """CSS classes of a token piece: prompt, kept, dropped or mixed, and its ground-truth label if any."""
    resp = [p for p in group if mask[p]]
    if not resp:
        cls = "p"
    elif all(p in kept for p in resp):
        cls = "k"
    elif any(p in kept for p in resp):
        cls = "k mixed"
    else:
        cls = "d"
    if truth is not None:
        lab = max(truth[p] for p in group)
        if lab:
            cls += f" t{lab}"
    return cls


def _sample_html(tok, row: tuple, kept: set, scores: dict) -> str:
    """One sample's tokens, marked by ``_token_class``, with position, id and score on hover."""
    sid, uid, source, part, task, ids, mask, truth = row
    spans = []
    for group, text in token_pieces(tok, list(ids)):
        title = "; ".join(
            f"pos {p} · id {ids[p]}"
            + (f" · score {scores[p]:+.4f}" if p in scores and scores[p] is not None else "")
            + ("" if not mask[p] else " · kept" if p in kept else " · dropped") for p in group)
        spans.append(f'<span class="tk {_token_class(group, mask, kept, truth)}" title="{esc(title)}">'
                     f'{esc(text)}</span>')
    n_resp = sum(1 for m in mask if m)
    n_kept = sum(1 for p in kept if p < len(mask) and mask[p])
    head = (f"sample {sid} · uid {uid} · source {source} · D{part} · task {task or '–'} · "
            f"kept {n_kept}/{n_resp} response tokens")
    return (f'<div class="sample" data-sample-id="{esc(sid)}"><div class="shead">{esc(head)}</div>'
            f'<div class="toks">{"".join(spans)}</div></div>')


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',DejaVu Sans,sans-serif;margin:24px auto;max-width:1120px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin:18px 0 4px;font-size:1.05em}
table{border-collapse:collapse;margin:8px 16px 8px 0;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#f2f4f7}tbody tr:nth-child(even){background:#fafbfc}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}.note{color:#8a5a00;background:#fff8e6;
border-left:4px solid #f0b429;padding:6px 10px}
.sub{color:#666}figure{margin:4px 0}figcaption{color:#555;font-size:0.85em}
.tick{font-size:11px;fill:#444}.axis{font-size:12px;fill:#333}
.thr{font-size:12px;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px}
.bar-cell{position:relative;width:180px;height:18px;background:#eef1f5}
.bar-fill{position:absolute;left:0;top:0;bottom:0;background:#6cbf84}
.bar-cell span{position:relative;padding-left:6px;font-variant-numeric:tabular-nums}
.num{font-variant-numeric:tabular-nums}
.status-finished{color:#176b2c}.status-unfinished{color:#9b1c1c;font-weight:600}
.trend{font-weight:600;padding:1px 6px;border-radius:3px}.trend-rising{background:#d9f2df;color:#176b2c}
.trend-falling{background:#fbdada;color:#9b1c1c}.trend-unstable{background:#fff1c2;color:#7a5b00}
.trend-flat{background:#e8eaee;color:#444}.trend-na{color:#888}
.sample{border:1px solid #ddd;border-radius:6px;margin:12px 0;overflow:hidden}
.shead{background:#f2f4f7;padding:4px 10px;font-size:0.85em;color:#333}
.toks{padding:8px 10px;font-family:'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:13px;
white-space:pre-wrap;word-break:break-word;line-height:1.7}
.tk.k,.tk.d{box-shadow:inset -1px 0 0 #fff}.tk.p{color:#999}.tk.k{background:#c8efd0;color:#0d4a1c}
.tk.d{background:#fbd3d3;color:#8a1111;text-decoration:line-through}.tk.mixed{background:#e6efc0}
.tk.t1{border-bottom:2px solid #1f5fbf}.tk.t2{border-bottom:2px dotted #e07b00}
code{background:#f2f4f7;padding:1px 4px;border-radius:3px}
"""


def _section(title: str, anchor: str, build, *args) -> str:
    try:
        body = build(*args)
    except Exception as e:  # one broken piece must not lose the rest of the report
        body = _note(f"this section could not be built: {type(e).__name__}: {e}") + (
            f"<pre class='sub'>{esc(traceback.format_exc(limit=3))}</pre>")
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def build_report(db_path, out_path, *, selection: str = "global", n_samples: int = 8) -> Path:
    """Write the run's HTML report to ``out_path`` and return that path.

    ``db_path`` is the run's DuckDB file or its run directory; it is opened read-only.
    """
    from tokenclean.tasks.store import connect

    db_path = Path(db_path)
    if db_path.is_dir():
        db_path = db_path / DB_FILE
    if not db_path.exists():
        raise FileNotFoundError(f"no tokenclean database at {db_path}")
    out_path = Path(out_path)
    con = connect(db_path, read_only=True)
    try:
        sections = [
            _section("Flow runs: status, durations and stage timings", "runs", _run_section, con),
            _section("Run overview", "overview", _overview, con),
            _section("Token score histograms", "scores", _histograms, con),
            _section("Kept-token fraction per source dataset", "sources", _kept_section, con),
            _section("Comparison of variants", "comparison", _comparison_section, con),
            _section("Metrics against the selected proportion k", "k-curve", _curve_section, con),
            _section("Per-task exact match across self-evolving iterations (Matthew effect)", "trends",
                     _trend_section, con),
            _section("Scheduled refreshes", "refreshes", _refresh_section, con),
            _section(f"Sample responses ({n_samples})", "samples", _samples_section, con, selection, n_samples),
        ]
    finally:
        con.close()
    title = f"tokenclean report — {db_path.parent.name or db_path.name}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " · ".join(f'<a href="#{a}">{t}</a>' for a, t in [
        ("runs", "runs"), ("overview", "overview"), ("scores", "scores"), ("sources", "sources"),
        ("comparison", "comparison"), ("k-curve", "k curve"), ("trends", "trends"), ("refreshes", "refreshes"),
        ("samples", "samples")])
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
           f'<body><h1>{esc(title)}</h1><p class="sub">{esc(str(db_path))} · generated {esc(when)} · {nav}</p>'
           + "".join(sections) + "</body></html>\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out_path)
    return out_path
