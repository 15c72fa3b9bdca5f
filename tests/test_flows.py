"""Both flows end to end: a real Prefect flow run (local API server), scoring on a real
local Ray cluster, a real DuckDB file, the tiny real model. Then a rerun resumes."""
import json

import pytest

from tasks import store
from tokenclean.config import RunConfig
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    from flows.cleaning import run

    cfg = RunConfig.model_validate(tiny_config(tmp_path_factory.mktemp("runs")))
    run(cfg)
    return cfg


def _q(cfg, sql, params=None):
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def test_every_response_token_scored_once_per_model(finished_run):
    cfg = finished_run
    n_resp = _q(cfg, "SELECT count(*) FROM response_tokens rt JOIN samples s USING (sample_id) WHERE s.part >= 0")[0][0]
    by_model = dict(_q(cfg, "SELECT model, count(*) FROM token_losses GROUP BY model"))
    assert by_model["base"] == n_resp  # base scored once over the whole pool, shared by both flows
    assert by_model["theta-1"] == n_resp
    n_d2 = _q(cfg, "SELECT count(*) FROM response_tokens rt JOIN samples s USING (sample_id) WHERE s.part = 2")[0][0]
    assert by_model["theta-2"] == n_d2  # theta_2 only scores D2
    dupes = _q(cfg, "SELECT count(*) FROM (SELECT model, sample_id, pos FROM token_losses GROUP BY ALL "
                    "HAVING count(*) > 1)")[0][0]
    assert dupes == 0


def test_each_ray_worker_loads_the_model_once(finished_run):
    details = [json.loads(d) for (d,) in _q(finished_run, "SELECT detail FROM stage_log WHERE stage = 'score'")]
    assert details and all(d["workers"] for d in details)
    for d in details:  # worker pid -> distinct model objects that scored its shards
        assert set(d["workers"].values()) == {1}, d["workers"]
    assert sum(d["shards_scored"] for d in details) > sum(len(d["workers"]) for d in details)


def test_algorithm_1_artifacts(finished_run):
    cfg = finished_run
    adapters = sorted(p.name for p in (cfg.run_dir / "adapters").iterdir())
    assert adapters == ["fixed-full", "fixed-global", "fixed-local", "fixed-random", "theta-1", "theta-2", "theta-3"]
    t3 = json.loads((cfg.run_dir / "adapters" / "theta-3" / "train.json").read_text())
    assert t3["init_adapter"].endswith("theta-2")
    sels = {r[0]: r[1:] for r in _q(cfg, "SELECT selection, method, iteration, n_kept, n_candidates FROM selections")}
    assert sels["self-evolving/iter-1"][:2] == ("global", 1) and sels["self-evolving/iter-2"][:2] == ("global", 2)
    for name in ("fixed/global", "fixed/random", "self-evolving/iter-1"):
        kept, cand = sels[name][2:]
        assert kept == round(cfg.select.k * cand)
    # scores of iteration t are base - theta_t over D_t
    bad = _q(cfg, """SELECT count(*) FROM token_scores ts
                     JOIN token_losses b ON b.model='base' AND b.sample_id=ts.sample_id AND b.pos=ts.pos
                     JOIN token_losses r ON r.model='theta-2' AND r.sample_id=ts.sample_id AND r.pos=ts.pos
                     WHERE ts.iteration = 2 AND abs(ts.score - (b.loss - r.loss)) > 1e-6""")[0][0]
    assert bad == 0


def test_metrics_recorded_for_every_variant(finished_run):
    variants = {r[0] for r in _q(finished_run, "SELECT DISTINCT variant FROM metrics WHERE task IS NULL "
                                               "AND metric = 'answer_exact_match'")}
    assert variants == {"base", "reference", "full", "random", "local", "global", "self-evolving"}
    iters = [r[0] for r in _q(finished_run, "SELECT DISTINCT iteration FROM metrics WHERE variant='self-evolving' "
                                            "ORDER BY 1")]
    assert iters == [1, 2]


def test_cleaning_raises_precision_over_full_tokens(finished_run):
    """The claim of the method, on data with known labels: kept tokens are more often the informative ones."""
    prec = dict(_q(finished_run, "SELECT selection, precision FROM selections"))
    assert prec["fixed/global"] > prec["fixed/full"]


def test_rerun_resumes_without_rescoring_or_retraining(finished_run):
    from flows.cleaning import run

    before = _q(finished_run, "SELECT count(*) FROM stage_log WHERE stage IN ('score', 'train', 'ingest')")[0][0]
    run(finished_run)
    after = _q(finished_run, "SELECT count(*) FROM stage_log WHERE stage IN ('score', 'train', 'ingest')")[0][0]
    assert after == before


def test_flow_runs_are_recorded_in_prefect(finished_run):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.runtime import prefect_api

    async def read():
        async with get_client() as c:
            runs = await c.read_flow_runs()
            arts = await c.read_artifacts()
            return [(r.name, r.state_type.value) for r in runs], arts

    with prefect_api():
        runs, arts = asyncio.run(read())
    assert runs and all(state == "COMPLETED" for _, state in runs)
    by_key = {a.key: a for a in arts if a.key}
    assert "fixed/global" not in by_key  # keys are slugs
    summaries = [a.data for a in arts if a.key == "token-cleaning-summary"]
    assert len(summaries) >= 2  # one per flow run
    assert any("self-evolving (Alg. 1)" in d for d in summaries)
    assert any("fixed-model global top-k" in d for d in summaries)
    assert {"score-base", "score-theta-1", "token-cleaning-metrics"} <= set(by_key)
    progress = [a for a in arts if a.type == "progress" and a.key == "score-base"]
    assert progress and float(progress[0].data) == 100.0


def test_changed_max_length_is_refused(finished_run):
    from flows.prepare import prepare

    cfg = finished_run.model_copy(update={"data": finished_run.data.model_copy(update={"max_length": 128})})
    with pytest.raises(store.FingerprintMismatch, match="max_length"):
        prepare(cfg, progress=False)
