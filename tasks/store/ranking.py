"""Exact global top-k over a scored relation, without sorting it.

``SELECT sample_id, pos FROM cand ORDER BY score DESC, sample_id, pos LIMIT n_keep`` is
the definition of the global selection. It sorts (or heaps) every candidate. The same set
is "every row with score > t, plus the first ``need`` rows with score = t in
(sample_id, pos) order", where t is the n_keep-th largest score. ``global_threshold``
finds t and the (sample_id, pos) of the last tie kept with a few aggregate passes; then
``global_topk_sql`` is a plain filter, streamed, no sort.

t is found in two passes (``global_threshold``): a reservoir sample brackets t, then exact
counts around the bracket plus the few values inside it. Other exact strategies, kept for
comparison, are in ``benchmarks/ranking_strategies.py``.

Finding the k-th largest value of a column (``kth_value``): one pass for count/min/max,
then an equal-width histogram of B buckets over [min, max] with each bucket's count,
min and max. The bucket holding rank k is located by cumulative counts; its actual
(min, max) bound it exactly, so the next pass filters ``key BETWEEN bmin AND bmax`` and
either refines again (bucket still large) or resolves it exactly with a GROUP BY key.
Exactness does not depend on float rounding of bucket edges: the bucket expression is
monotone non-decreasing in the key (so each bucket is a contiguous range of values), and
the next pass selects by the bucket's own stored min/max values, not by recomputed edges.
The same routine ranks a huge block of ties by sample_id and then pos.

Preconditions (the candidates of ``tokenclean.tasks.store.selection`` satisfy them): scores are finite and
not NULL (checked, ValueError otherwise), and (sample_id, pos) is unique in the relation.
"""
from __future__ import annotations

import math

BUCKETS = 4096
EXACT_MAX = 250_000  # resolve a range with GROUP BY once it holds at most this many rows


def _lit(x) -> str:
    """SQL literal that reproduces a key value exactly (ints as ints, floats via a round-trip string)."""
    if isinstance(x, bool) or x is None:
        raise TypeError(f"not a numeric key value: {x!r}")
    if isinstance(x, int):
        return str(int(x))
    # repr() round-trips a double exactly; DuckDB's VARCHAR -> DOUBLE cast is correctly rounded.
    # (A bare 0.1 literal would be parsed as DECIMAL first.) FLOAT scores are exact doubles.
    return f"'{float(x)!r}'::DOUBLE"


def kth_value(con, relation_sql: str, key: str, k: int, *, where: str = "TRUE", descending: bool = True,
              buckets: int = BUCKETS, exact_max: int = EXACT_MAX, stats: tuple | None = None) -> dict:
    """The k-th value (1-based) of ``key`` over the rows of ``relation_sql`` matching ``where``.

    Returns ``value``, ``n_before`` (rows strictly before value in that order), ``n_equal``
    (rows equal to value) and ``passes`` (scans made), with n_before < k <= n_before + n_equal.
    ``stats`` = (count, min, max) of key over those rows, when the caller already has them.
    """
    rel = f"({relation_sql}) AS _r"
    order = "DESC" if descending else "ASC"
    passes = 0
    if stats is None:
        stats = con.execute(f"SELECT count(*), min({key}), max({key}) FROM {rel} WHERE {where}").fetchone()
        passes = 1
    n, lo, hi = stats
    if not 1 <= k <= n:
        raise ValueError(f"rank {k} out of range: {n} rows")
    before = 0  # rows strictly before the current range [lo, hi] in the ranking order
    rng = "TRUE"  # the first range is every row
    while True:
        if n <= exact_max or lo == hi:
            # Exact: distinct values of the range with cumulative counts, first one reaching rank k.
            row = con.execute(
                f"""SELECT v, c, cum FROM (
                      SELECT v, c, sum(c) OVER (ORDER BY v {order} ROWS UNBOUNDED PRECEDING) AS cum FROM (
                        SELECT {key} AS v, count(*) AS c FROM {rel} WHERE ({where}) AND {rng} GROUP BY v))
                    WHERE cum >= {int(k - before)} ORDER BY v {order} LIMIT 1""").fetchone()
            passes += 1
            v, c, cum = row
            return {"value": v, "n_before": before + int(cum - c), "n_equal": int(c), "passes": passes}
        # Histogram: equal-width buckets over [lo, hi]; monotone in key, so buckets are value ranges.
        scale = buckets / (float(hi) - float(lo))
        bucket = f"least(floor(({key}::DOUBLE - {_lit(float(lo))}) * {_lit(scale)}), {buckets - 1})::BIGINT"
        rows = con.execute(
            f"""SELECT {bucket} AS b, count(*) AS c, min({key}), max({key}) FROM {rel}
                WHERE ({where}) AND {rng} GROUP BY b ORDER BY b {order}""").fetchall()
        passes += 1
        cum = before
        for _, c, bmin, bmax in rows:  # noqa: B007 (the bucket the loop stops at is read after it)
            if cum + c >= k:
                break
            cum += c
        if c == n:  # no progress (cannot happen with lo < hi; guard against numeric surprises)
            exact_max = n
        before, n, lo, hi = cum, c, bmin, bmax
        rng = f"{key} BETWEEN {_lit(lo)} AND {_lit(hi)}"


SAMPLE_SIZE = 1 << 17
_GRID = [j / 100 for j in range(101)]  # reservoir quantiles of the first pass when n is not known before it
NON_FINITE = "candidate scores include NULL or non-finite values; exclude them before ranking"


def _delta(q: float, n: int, sample_size: int) -> float:
    m = max(1, min(n, sample_size))
    return 6.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m


def _bracket_quantiles(n: int, n_keep: int, sample_size: int) -> list[float]:
    """Ascending quantiles of the sample that bracket t (the (n - n_keep + 1)-th smallest)."""
    q = (n - n_keep + 0.5) / n
    d = _delta(q, n, sample_size)
    return [max(0.0, q - d), min(1.0, q + d)]


def _bracket_from_grid(grid: list, n: int, n_keep: int, sample_size: int, lo, hi) -> tuple:
    q = (n - n_keep + 0.5) / n
    d = _delta(q, n, sample_size)
    g = len(grid) - 1
    ja, jb = math.floor((q - d) * g), math.ceil((q + d) * g)
    return (grid[ja] if ja > 0 else lo), (grid[jb] if jb < g else hi)


def _bracket(con, rel: str, n_keep: int, a, b) -> dict | None:
    """One pass: exact counts around a sampled bracket [a, b] of t and the values strictly inside it.

    Returns kth_value-style {value, n_before, n_equal}, or None when t is outside [a, b]
    (the caller then searches exactly). Only the rows strictly inside (a, b), about
    2*delta*n of them, travel to Python; ties at a or b are counted, never listed.
    """
    import numpy as np

    a_, b_ = _lit(float(a)), _lit(float(b))
    gt_b, eq_b, eq_a, inner = con.execute(
        f"SELECT count_if(score > {b_}), count_if(score = {b_}), count_if(score = {a_}), "
        f"list(score) FILTER (WHERE score > {a_} AND score < {b_}) FROM {rel}").fetchone()
    if a == b:
        eq_a, inner = 0, []
    inner = np.asarray(inner or [], dtype=np.float64)
    k = n_keep
    if k <= gt_b:
        return None
    if k <= gt_b + eq_b:
        return {"value": b, "n_before": gt_b, "n_equal": eq_b}
    if k <= gt_b + eq_b + len(inner):
        r = k - gt_b - eq_b  # rank inside (a, b), from the top
        t = np.partition(inner, len(inner) - r)[len(inner) - r].item()
        return {"value": t, "n_before": gt_b + eq_b + int(np.count_nonzero(inner > t)),
                "n_equal": int(np.count_nonzero(inner == t))}
    if k <= gt_b + eq_b + len(inner) + eq_a:
        return {"value": a, "n_before": gt_b + eq_b + len(inner), "n_equal": eq_a}
    return None


def score_stats(con, rel: str, quantiles: list[float] | None = None, sample_size: int = SAMPLE_SIZE) -> tuple:
    """The first pass: (count, min, max, reservoir ``quantiles`` of the scores or None); NULL or non-finite scores
    are refused."""
    # NULL shows in count(score); NaN sorts above +inf in DuckDB, so any NaN/inf shows in min/max.
    extra = f", reservoir_quantile(score, [{', '.join(map(repr, quantiles))}], {int(sample_size)})" if quantiles else ""
    n, n_val, lo, hi, *sampled = con.execute(
        f"SELECT count(*), count(score), min(score), max(score){extra} FROM {rel}").fetchone()
    if n - n_val + (n_val > 0 and not (math.isfinite(lo) and math.isfinite(hi))):
        raise ValueError(NON_FINITE)
    return n, lo, hi, (sampled[0] if quantiles else None)


def threshold_info(n: int, n_keep: int, strategy: str) -> dict:
    """``global_threshold``'s result before t is known (the one for n_keep = 0); n_keep checked against n."""
    n_keep = int(n_keep)
    if not 0 <= n_keep <= n:
        raise ValueError(f"n_keep={n_keep} out of range for {n} candidates")
    return {"n": n, "n_keep": n_keep, "threshold": None, "n_above": 0, "n_ties": 0, "need": 0,
            "last_tie": None, "strategy": strategy, "passes": 1}


def global_threshold(con, relation_sql: str, n_keep: int, *, buckets: int = BUCKETS, exact_max: int = EXACT_MAX,
                     sample_size: int = SAMPLE_SIZE, n_total: int | None = None) -> dict:
    """Exact threshold of the global top-``n_keep`` of ``relation_sql`` (columns sample_id, pos, score).

    Returns a dict: ``n`` candidates, ``n_keep``, ``threshold`` t (the n_keep-th largest
    score; None when n_keep == 0), ``n_above`` (score > t), ``n_ties`` (score = t),
    ``need`` (ties kept, 1..n_ties), ``last_tie`` ((sample_id, pos) of the last tie kept
    in (sample_id, pos) order, None when every tie is kept), ``strategy`` and ``passes`` (scans made).

    The first pass, which checks the scores, also draws a reservoir sample (``reservoir_quantile``)
    whose quantiles give a bracket [a, b] around rank n_keep, wide enough (6 sigma) that a miss is
    rare; a second pass counts the rows above b, at b and at a exactly and returns the values
    strictly between a and b, where numpy finds t. Exact whatever the sample: a miss falls back to
    bucket passes (``kth_value``). ``n_total``: the number of candidates if the caller has counted
    them (it only sharpens the bracket's sample).
    """
    rel = f"({relation_sql}) AS _r"
    known = n_total is not None and 0 < int(n_keep) <= int(n_total)
    qs = _bracket_quantiles(int(n_total), int(n_keep), sample_size) if known else _GRID
    n, lo, hi, sampled = score_stats(con, rel, qs, sample_size)
    info = threshold_info(n, n_keep, "bracket")
    n_keep = info["n_keep"]
    if n_keep == 0:
        return info
    if len(qs) == 2 and n_total == n:
        a, b = sampled
        a, b = (lo if qs[0] <= 0.0 else a), (hi if qs[1] >= 1.0 else b)  # the ends: true min/max
    else:  # no (or a wrong) n_total: bracket from the quantile grid
        a, b = _bracket_from_grid(sampled, n, n_keep, sample_size, lo, hi)
    kv = _bracket(con, rel, n_keep, a, b)
    info["passes"] += 1
    if kv is None:  # the sample missed (rare): search exactly
        info["strategy"] = "bracket->histogram"
        kv = kth_value(con, relation_sql, "score", n_keep, descending=True, buckets=buckets, exact_max=exact_max,
                       stats=(n, lo, hi))
    else:
        kv["passes"] = 0
    return resolve_ties(con, relation_sql, info, kv, buckets=buckets, exact_max=exact_max)


def resolve_ties(con, relation_sql: str, info: dict, kv: dict, *, buckets: int = BUCKETS,
                 exact_max: int = EXACT_MAX) -> dict:
    """``info`` completed from t (``kv``: kth_value-style) with the (sample_id, pos) of the last tie kept."""
    rel = f"({relation_sql}) AS _r"
    t, above, ties = kv["value"], kv["n_before"], kv["n_equal"]
    need = info["n_keep"] - above
    info.update(threshold=t, n_above=above, n_ties=ties, need=need, passes=info["passes"] + kv["passes"])
    if need == ties:
        return info
    at_t = f"score = {_lit(float(t))}"
    if ties <= exact_max:
        s, p = con.execute(f"SELECT sample_id, pos FROM {rel} WHERE {at_t} ORDER BY sample_id, pos "
                           f"LIMIT 1 OFFSET {need - 1}").fetchone()
        info["passes"] += 1
    else:  # a huge block of equal scores: rank the ties by sample_id, then by pos, the same way
        ks = kth_value(con, relation_sql, "sample_id", need, where=at_t, descending=False, buckets=buckets,
                       exact_max=exact_max)
        s = ks["value"]
        kp = kth_value(con, relation_sql, "pos", need - ks["n_before"], where=f"{at_t} AND sample_id = {int(s)}",
                       descending=False, buckets=buckets, exact_max=exact_max)
        p = kp["value"]
        info["passes"] += ks["passes"] + kp["passes"]
    info["last_tie"] = (int(s), int(p))
    return info


def global_topk_sql(relation_sql: str, n_keep: int, threshold_info: dict, columns: str = "sample_id, pos") -> str:
    """SQL selecting exactly the rows of ``ORDER BY score DESC, sample_id, pos LIMIT n_keep`` (unordered).

    A filter, not a sort: score > t, or score = t up to the last kept tie in (sample_id, pos) order.
    """
    if int(n_keep) != threshold_info["n_keep"]:
        raise ValueError(f"threshold_info was computed for n_keep={threshold_info['n_keep']}, not {n_keep}")
    base = f"SELECT {columns} FROM ({relation_sql}) AS _r"
    t = threshold_info["threshold"]
    if t is None:
        return f"{base} WHERE FALSE"
    t = _lit(float(t))
    if threshold_info["last_tie"] is None:
        return f"{base} WHERE score >= {t}"
    s, p = threshold_info["last_tie"]
    return (f"{base} WHERE score > {t} OR (score = {t} AND "
            f"(sample_id < {int(s)} OR (sample_id = {int(s)} AND pos <= {int(p)})))")
