"""Scheduled-refresh behaviour: only new/changed samples are scored, stored base losses
are reused, the pool is re-ranked globally; and `tokenclean serve` serves a deployment.
(Which steps a refresh recomputes, for each kind of change, is tested in test_keys.py.)"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_config
from tests.store_reads import losses_by_uid
from tokenclean.config import RunConfig
from tokenclean.tasks import store


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data(tiny, tmp_path):
    rows = _rows(tiny.train)[:160]
    train = tmp_path / "train.jsonl"
    _write(train, rows)
    return rows, train


def _cfg(tmp_path, train, tiny):
    cfg = tiny_config(tmp_path, name="r", mode="fixed", select={"pool": "all"})  # counts below span D0..D2
    cfg["data"] = {"paths": [str(train)], "eval_paths": [str(tiny.eval)], "max_length": 256}
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 32}
    return RunConfig.model_validate(cfg)


def _base_losses(cfg):
    from tokenclean.summary import output_key

    con = store.connect(cfg.db_path, read_only=True)
    try:
        return {(uid, pos): loss for uid, pos, loss in losses_by_uid(
            con, output_key(con, "base", "losses"), output_key(con, "data", "dataset"))}, con.execute(
            "SELECT detail FROM stage_log WHERE stage = 'score' AND name = 'base' ORDER BY finished_at").fetchall()
    finally:
        con.close()


def test_refresh_scores_only_new_and_changed_samples(tiny, tmp_path, data):
    from tokenclean.flows.cleaning import refresh

    rows, train = data
    cfg = _cfg(tmp_path, train, tiny)
    first = refresh(cfg)
    assert first["refresh"] is None and first["selection"]["n_kept"] > 0
    before, _ = _base_losses(cfg)

    changed = rows[:10]
    for r in changed:
        r["response"] = r["response"] + " Thanks!"
        r.pop("answer", None)
    removed = rows[150:155]
    added = [dict(r, id=f"new-{i}") for i, r in enumerate(_rows(tiny.train)[200:220])]
    _write(train, rows[:150] + rows[155:] + added)
    second = refresh(cfg)
    n_eval = len(_rows(tiny.eval))  # the held-out file is re-read too, unchanged
    assert second["refresh"] == {"unchanged": 145 + n_eval, "changed": 10, "added": 20, "removed": 5}
    # D0 is drawn by id here (no data.warmup_paths): the rows of each kind that landed in D0 are reported, and
    # refresh.reference: keep (the default) keeps theta_1
    from tokenclean.tasks.ingest import assign_part

    in_d0 = lambda rs: sum(assign_part(r["id"], 0, 0.0, cfg.iterations + 1, False) == 0 for r in rs)  # noqa: E731
    want = {k: v for k, v in (("changed", in_d0(changed)), ("added", in_d0(added)), ("removed", in_d0(removed)))
            if v}
    assert want and second["reference"]["warmup_changes"] == want
    assert second["reference"]["retrained"] is False and second["reference"]["key"] == first["reference"]["key"]

    after, log = _base_losses(cfg)
    last = json.loads(log[-1][0])
    from tokenclean.summary import output_key

    con = store.connect(cfg.db_path, read_only=True)
    try:
        ds = output_key(con, "data", "dataset")
        n_new_train = con.execute("SELECT count(*) FROM dataset_samples d JOIN samples s USING (sample_id) "
                                  "WHERE d.dataset = ? AND d.part >= 0 AND s.uid IN (SELECT unnest(?))",
                                  [ds, [r["id"] for r in changed + added]]).fetchone()[0]
        n_pool = con.execute("SELECT count(*) FROM response_tokens rt JOIN dataset_samples d USING (sample_id) "
                             "WHERE d.dataset = ? AND d.part >= 0", [ds]).fetchone()[0]
        kept = con.execute("SELECT n_kept, n_candidates FROM selections WHERE selection = ?",
                           [output_key(con, "refresh", "selection")]).fetchone()
        gone = con.execute("SELECT count(*) FROM dataset_samples d JOIN samples s USING (sample_id) "
                           "WHERE d.dataset = ? AND s.uid IN (SELECT unnest(?))",
                           [ds, [r["id"] for r in removed]]).fetchone()[0]
    finally:
        con.close()
    assert last["samples_scored"] == n_new_train  # nothing unchanged was scored again
    unchanged = {r["id"] for r in rows[10:150]}
    for (uid, pos), loss in before.items():
        if uid in unchanged:
            assert after[(uid, pos)] == loss  # stored base losses reused untouched
    assert gone == 0  # removed rows are not in the refreshed pool (their old losses stay, keyed, unused)
    assert kept == (round(cfg.select.k * n_pool), n_pool)  # re-ranked over the whole refreshed pool


def test_changed_input_is_a_new_dataset_not_a_refusal(tiny, tmp_path, data):
    """Edited inputs get a new dataset key; the unchanged samples keep their ids (and so their losses)."""
    from tokenclean.flows.prepare import prepare

    rows, train = data
    cfg = _cfg(tmp_path, train, tiny)
    first = prepare(cfg, progress=False)
    first.con.close()
    _write(train, rows[:100])
    second = prepare(cfg, progress=False)
    try:
        assert second.dataset != first.dataset and second.ingest["ingested"]
        assert second.ingest["changes"] == {"unchanged": 100 + len(_rows(tiny.eval)), "changed": 0, "added": 0,
                                            "removed": 60}
        assert second.ingest["new_samples"] == 0  # every remaining sample was already stored
    finally:
        second.con.close()
    again = prepare(cfg, progress=False)  # same inputs again: the dataset key is stored, ingest is skipped
    again.con.close()
    assert again.dataset == second.dataset and not again.ingest["ingested"]


def test_serve_registers_a_scheduled_deployment_that_runs(tiny, tmp_path, data, multinode):
    """`tokenclean serve` against a multi-node cluster given by address (infra/README.md, section 5):
    the deployment registers with its schedule, a triggered run completes, and its scoring spread
    over more than one node."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tokenclean.flows.runtime import prefect_api

    _, train = data
    cfg = _cfg(tmp_path, train, tiny)
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": multinode.address, "num_cpus": None})})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with prefect_api() as url:
        env = dict(os.environ, PREFECT_API_URL=url)
        proc = subprocess.Popen([sys.executable, "-m", "tokenclean.cli", "serve", str(path), "--cron", "0 3 * * 1",
                                 "--name", "weekly"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            async def deployment():
                async with get_client() as c:
                    for _ in range(240):
                        try:
                            return await c.read_deployment_by_name("scheduled-refresh/weekly")
                        except Exception:
                            await asyncio.sleep(0.5)
                    raise TimeoutError("deployment never registered")

            dep = asyncio.run(deployment())
            assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"]
            run = run_deployment("scheduled-refresh/weekly", timeout=600)
            assert run.state.is_completed(), run.state
        finally:
            proc.terminate()
            out = proc.communicate(timeout=60)[0]
    assert "serving deployment scheduled-refresh/weekly" in out
    con = store.connect(cfg.db_path, read_only=True)
    try:
        from tokenclean.summary import output_key

        assert con.execute("SELECT n_kept FROM selections WHERE selection = ?",
                           [output_key(con, "refresh", "selection")]).fetchone()[0] > 0
        scored = [json.loads(d) for (d,) in con.execute("SELECT detail FROM stage_log WHERE stage = 'score'").fetchall()]
    finally:
        con.close()
    nodes = {p["node"] for d in scored for p in d["placement"]}
    assert len(nodes) >= 2 and nodes <= set(multinode.node_ids().values()), nodes
