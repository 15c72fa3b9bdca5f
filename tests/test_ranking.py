"""Exact global top-k by threshold (tasks/store/ranking.py) against ORDER BY/LIMIT and numpy, on a real DuckDB file."""
import numpy as np
import pytest

from benchmarks import ranking_strategies
from tokenclean.tasks import store
from tokenclean.tasks.store import ranking
from tokenclean.tasks.store.ranking import global_threshold, global_topk_sql

DATASET, S1, S2 = "d0", "a1", "a2"  # keys of the hand-made dataset and its two score tables


def _candidates_sql(parts, scores_no):
    """The real candidate relation of a global selection: the pool's finite scores."""
    return store.scores_relation(S1 if scores_no == 1 else S2, DATASET, parts)

N_SAMPLES, N_POS = 1000, 100  # 1e5 candidate tokens


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """token_scores in the run schema: 2-decimal scores (many exact ties), a few NaN/inf, an all-equal iteration."""
    con = store.connect(tmp_path_factory.mktemp("ranking") / "run.duckdb")
    con.execute("INSERT INTO dataset_samples (dataset, sample_id, part) SELECT ?, i, (i % 2)::SMALLINT "
                "FROM range(?) t(i)", [DATASET, N_SAMPLES])
    rng = np.random.default_rng(0)
    n = N_SAMPLES * N_POS
    # Sample order in the table is shuffled so tie order must come from (sample_id, pos), not storage order.
    sid = np.repeat(rng.permutation(N_SAMPLES), N_POS).astype(np.int64)
    pos = np.tile(np.arange(3, 3 + N_POS), N_SAMPLES).astype(np.int32)
    score = np.round(rng.normal(0.0, 1.5, n), 2).astype(np.float32)
    score[rng.choice(n, 7, replace=False)] = np.nan
    score[rng.choice(n, 3, replace=False)] = np.inf
    score[rng.choice(n, 3, replace=False)] = -np.inf
    con.register("_s", {"sid": sid, "pos": pos, "score": score})
    con.execute("INSERT INTO token_scores SELECT ?, sid, pos, 0, 0, score FROM _s", [S1])
    con.execute("INSERT INTO token_scores SELECT ?, sid, pos, 0, 0, 0.25::FLOAT FROM _s", [S2])  # all equal
    con.unregister("_s")
    yield con
    con.close()


def _order_by_limit(con, rel, n_keep):
    return set(con.execute(f"SELECT sample_id, pos FROM ({rel}) ORDER BY score DESC, sample_id, pos "
                           f"LIMIT {n_keep}").fetchall())


def _numpy_topk(con, rel, n_keep):
    sid, pos, score = con.execute(f"SELECT sample_id, pos, score FROM ({rel})").fetchnumpy().values()
    order = np.lexsort((pos, sid, -score))[:n_keep]  # score desc, then sample_id, pos
    if n_keep:  # numpy's threshold by partition agrees with the full sort
        t = np.partition(score, len(score) - n_keep)[len(score) - n_keep]
        assert t == score[order[-1]]
    return set(zip(sid[order].tolist(), pos[order].tolist()))


def _kept(con, rel, n_keep, **kw):
    # the strategies kept for comparison (benchmarks/) are checked the same way as the production path
    threshold = ranking_strategies.global_threshold if "strategy" in kw else global_threshold
    info = threshold(con, rel, n_keep, **kw)
    rows = con.execute(global_topk_sql(rel, n_keep, info)).fetchall()
    assert len(rows) == len(set(rows)) == n_keep
    return set(rows), info


@pytest.mark.parametrize("frac", [0.0, 1e-5, 0.1, 0.6, 0.6001, 0.99999, 1.0])
def test_threshold_topk_equals_order_by_limit_and_numpy(scored, frac):
    rel = _candidates_sql([0, 1], 1)  # the real candidate relation: non-finite scores excluded
    n = scored.execute(f"SELECT count(*) FROM ({rel})").fetchone()[0]
    assert n == N_SAMPLES * N_POS - 13
    n_keep = round(frac * n)
    want = _order_by_limit(scored, rel, n_keep)
    assert want == _numpy_topk(scored, rel, n_keep)
    # the last one forces histogram refinement and the large-tie path (ties ranked by sample_id, then pos)
    for kw in ({}, {"n_total": n, "sample_size": 2000}, {"strategy": "quantile"}, {"strategy": "numpy"},
               {"strategy": "histogram", "buckets": 8, "exact_max": 50}):
        got, info = _kept(scored, rel, n_keep, **kw)
        assert got == want, kw
        if n_keep:
            assert info["n_above"] < n_keep <= info["n_above"] + info["n_ties"]


def test_one_part_and_all_equal_scores(scored):
    rel = _candidates_sql([1], 1)
    for n_keep in (0, 1, 12345, scored.execute(f"SELECT count(*) FROM ({rel})").fetchone()[0]):
        assert _kept(scored, rel, n_keep)[0] == _order_by_limit(scored, rel, n_keep)
    rel = _candidates_sql([0, 1], 2)  # every score 0.25: the ranking is pure (sample_id, pos)
    for n_keep in (0, 1, 777, 60000, N_SAMPLES * N_POS):
        for kw in ({}, {"strategy": "quantile"}, {"strategy": "numpy"},
                   {"strategy": "histogram", "buckets": 8, "exact_max": 50}):
            got, info = _kept(scored, rel, n_keep, **kw)
            assert got == _order_by_limit(scored, rel, n_keep), (n_keep, kw)
            assert info["threshold"] in (None, 0.25)


def test_bracket_that_misses_falls_back_exactly(scored, monkeypatch):
    """A sample too small for its bracket (no 6-sigma margin): t lands outside it; the answer stays exact."""
    monkeypatch.setattr(ranking, "_delta", lambda q, n, m: 0.0)
    rel = _candidates_sql([0, 1], 1)
    n = scored.execute(f"SELECT count(*) FROM ({rel})").fetchone()[0]
    strategies = set()
    for frac in (0.05, 0.3, 0.6, 0.9):
        n_keep = round(frac * n)
        got, info = _kept(scored, rel, n_keep, n_total=n, sample_size=16)
        assert got == _order_by_limit(scored, rel, n_keep)
        strategies.add(info["strategy"])
    assert "bracket->histogram" in strategies


def test_non_finite_and_bad_n_keep_rejected(scored):
    raw = f"SELECT sample_id, pos, score FROM token_scores WHERE scores = '{S1}'"
    with pytest.raises(ValueError, match="non-finite"):
        global_threshold(scored, raw, 10)
    rel = _candidates_sql([0], 1)
    with pytest.raises(ValueError, match="out of range"):
        global_threshold(scored, rel, 10**9)
    info = global_threshold(scored, rel, 5)
    with pytest.raises(ValueError, match="n_keep"):
        global_topk_sql(rel, 6, info)
