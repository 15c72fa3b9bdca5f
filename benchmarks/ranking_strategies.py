"""Other exact ways to find the global top-k threshold than the store's sampled bracket.

Kept for ``benchmarks/ranking.py`` (docs/benchmarks.md, Ranking) and as cross-checks of the production
path in ``tests/test_ranking.py``; ``tokenclean.tasks.store.ranking`` holds only what selections use.

* ``histogram``: bucket passes (``kth_value``) from the first pass's count/min/max.
* ``quantile``: a candidate t from DuckDB's ``quantile_disc``, proven by one counting pass
  (n_above < n_keep <= n_above + n_ties); histogram if the proof fails.
* ``numpy``: the score column fetched once (4 bytes a row in memory), t by an in-place
  ``np.partition``, counts by comparison; faster, not bounded in memory.

Ties past t are resolved in DuckDB as the production path resolves them.
"""
from __future__ import annotations

import numpy as np

from tokenclean.tasks.store import ranking
from tokenclean.tasks.store.ranking import (
    BUCKETS,
    EXACT_MAX,
    NON_FINITE,
    SAMPLE_SIZE,
    _lit,
    kth_value,
    resolve_ties,
    score_stats,
    threshold_info,
)

STRATEGIES = ("bracket", "histogram", "quantile", "numpy")


def global_threshold(con, relation_sql: str, n_keep: int, *, strategy: str = "bracket", buckets: int = BUCKETS,
                     exact_max: int = EXACT_MAX, sample_size: int = SAMPLE_SIZE, n_total: int | None = None) -> dict:
    """``ranking.global_threshold``'s result by ``strategy`` (``bracket``: the production path itself)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy == "bracket":
        return ranking.global_threshold(con, relation_sql, n_keep, buckets=buckets, exact_max=exact_max,
                                        sample_size=sample_size, n_total=n_total)
    rel = f"({relation_sql}) AS _r"
    if strategy == "numpy":
        info, kv = _numpy_threshold(con, rel, n_keep)
    else:
        n, lo, hi, _ = score_stats(con, rel)
        info = threshold_info(n, n_keep, strategy)
        if info["n_keep"] == 0:
            return info
        kv = _quantile_threshold(con, rel, info) if strategy == "quantile" else None
        if kv is None:
            kv = kth_value(con, relation_sql, "score", info["n_keep"], descending=True, buckets=buckets,
                           exact_max=exact_max, stats=(n, lo, hi))
    if info["n_keep"] == 0:
        return info
    return resolve_ties(con, relation_sql, info, kv, buckets=buckets, exact_max=exact_max)


def _numpy_threshold(con, rel: str, n_keep: int) -> tuple[dict, dict | None]:
    """t by ``np.partition`` of the fetched score column: (info, kth_value-style result or None when n_keep = 0)."""
    scores = con.execute(f"SELECT score FROM {rel}").fetchnumpy()["score"]
    if np.ma.isMaskedArray(scores):  # NULLs
        scores = scores.astype(np.float64).filled(np.nan)
    n = len(scores)
    if n - int(np.count_nonzero(np.isfinite(scores))):
        raise ValueError(NON_FINITE)
    info = threshold_info(n, n_keep, "numpy")
    n_keep = info["n_keep"]
    if n_keep == 0:
        return info, None
    if not scores.flags.writeable:
        scores = scores.copy()
    scores.partition(n - n_keep)  # in place: the multiset, hence every count, is unchanged
    t = scores[n - n_keep].item()
    above = int(np.count_nonzero(scores > t))
    ties = int(np.count_nonzero(scores == t))
    return info, {"value": t, "n_before": above, "n_equal": ties, "passes": 0}


def _quantile_threshold(con, rel: str, info: dict) -> dict | None:
    """t from ``quantile_disc``, proven by counts; None (and the strategy marked) when the proof fails."""
    n, n_keep = info["n"], info["n_keep"]
    # quantile_disc(q) is the ceil(n*q)-th smallest; q mid-way between ranks keeps rounding away.
    q = (n - n_keep + 0.5) / n
    (t,) = con.execute(f"SELECT quantile_disc(score, {_lit(q)}) FROM {rel}").fetchone()
    above, ties = con.execute(f"SELECT count_if(score > {_lit(float(t))}), count_if(score = {_lit(float(t))}) "
                              f"FROM {rel}").fetchone()
    info["passes"] += 2
    if above < n_keep <= above + ties:
        return {"value": t, "n_before": above, "n_equal": ties, "passes": 0}
    info["strategy"] = "quantile->histogram"
    return None
