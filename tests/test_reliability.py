"""Faults lose nothing: SIGKILL mid-run, a Ray worker dying mid-shard, concurrent runs,
NaN/inf losses. Each test runs the real pipeline (Prefect + Ray + DuckDB + tiny model)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tokenclean.tasks import store
from tokenclean.config import RunConfig
from tokenclean.summary import output_key
from tests.conftest import tiny_config
from tests.faults import BACKEND, FAULT_ENV, shard_first_ids


def _cfg(tmp_path, name, **kw):
    # D0 in the pool (select.pool: all): the faults below are placed in shards of parts 0..2
    cfg = tiny_config(tmp_path, name=name, mode="fixed", baselines=["global"], select={"pool": "all"},
                      eval={"max_new_tokens": 0}, **kw)  # faults in scoring are the point: no generation
    # The fault-injecting scorer wraps the real one; faults fire only where TOKENCLEAN_FAULT says.
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16, "backend": BACKEND}
    return cfg


def _read(cfg: RunConfig, fn):
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return fn(con)
    finally:
        con.close()


def _losses(cfg: RunConfig, name: str):
    """(uid, pos, loss) of the current model ``name``: comparable across run directories."""
    return _read(cfg, lambda con: store.losses_by_uid(con, output_key(con, name, "losses"),
                                                      output_key(con, "data", "dataset")))


def _kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    family = parent.children(recursive=True) + [parent]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def test_sigkill_mid_scoring_then_rerun_resumes_with_exact_integrity(tiny, tmp_path):
    cfg = _cfg(tmp_path, "killed")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tokenclean.cli", "run", str(path)]
    run_cfg = RunConfig.model_validate(cfg)
    firsts = shard_first_ids(run_cfg, [0, 1, 2])  # ingests, so the run below reuses the dataset
    # Shard 3 stalls on its first attempt, so the run is certainly mid-scoring when killed.
    env = dict(os.environ, **{FAULT_ENV: f"stall:base:{firsts[3]}:{tmp_path / 'stalled'}"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    busy_checked = False
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            stalled = (tmp_path / "stalled").exists()
            if stalled and len(list(shards.glob("*/*.parquet"))) >= 2:
                break
            assert proc.poll() is None, "run finished before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("scoring never started")
        # The run is certainly mid-scoring, holding the database: a second run on it is refused clearly.
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "database busy" in second.stderr, second.stderr[-2000:]
        busy_checked = True
    finally:
        _kill_tree(proc)
    assert busy_checked and (tmp_path / "stalled").exists()
    n_before = len(list(shards.glob("*/*.parquet")))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    con = store.connect(run_cfg.db_path, read_only=True)
    try:
        import json

        dataset = output_key(con, "data", "dataset")
        for name in ("base", "reference"):
            check = store.check_integrity(con, output_key(con, name, "losses"), dataset, [0, 1, 2])
            assert check["ok"], check
        details = [json.loads(d) for (d,) in con.execute(
            "SELECT detail FROM stage_log WHERE stage = 'score' AND name = 'base'").fetchall()]
    finally:
        con.close()
    resumed = details[-1]
    assert n_before * 16 < resumed["samples_total"]  # the kill really was mid-scoring
    kept = resumed["samples_skipped"] + resumed["samples_recovered"]
    assert kept >= 16 * (n_before - 1)  # finished shards were not scored again
    assert resumed["samples_scored"] + kept == resumed["samples_total"]


@pytest.fixture(scope="module")
def undisturbed(tiny, tmp_path_factory):
    from tokenclean.flows.cleaning import run

    cfg = RunConfig.model_validate(_cfg(tmp_path_factory.mktemp("calm"), "calm"))
    run(cfg)
    return cfg


def test_worker_death_is_retried_and_nan_losses_never_ranked(tiny, tmp_path, undisturbed, monkeypatch):
    """A Ray worker SIGKILLed mid-shard (base, shard 1) is retried with identical losses; two losses
    poisoned with NaN/inf (reference, shard 0) are counted, reported and never ranked."""
    from tokenclean.flows.cleaning import run

    cfg = RunConfig.model_validate(_cfg(tmp_path, "faulty"))
    firsts = shard_first_ids(cfg, [0, 1, 2])
    monkeypatch.setenv(FAULT_ENV, f"kill:base:{firsts[1]}:{tmp_path / 'killed'},nan:adapter:{firsts[0]}:-")
    run(cfg)
    assert (tmp_path / "killed").exists()  # the worker really died once
    assert _losses(cfg, "base") == _losses(undisturbed, "base")  # bit-identical after the retry
    ref, calm = _losses(cfg, "reference"), _losses(undisturbed, "reference")
    differ = [i for i, (a, b) in enumerate(zip(ref, calm)) if a != b]
    assert len(ref) == len(calm) and len(differ) == 2  # only the two poisoned losses
    poisoned = {(ref[i][0], ref[i][1]) for i in differ}
    assert all(not math.isfinite(ref[i][2]) for i in differ)

    def check(con):
        stage = [json.loads(d) for (d,) in con.execute(
            "SELECT detail FROM stage_log WHERE stage = 'score' AND name = 'reference'").fetchall()]
        sel = store.selection_record(con, output_key(con, "global", "selection"))
        kept = {(uid, pos) for uid, pos in con.execute(
            "SELECT s.uid, st.pos FROM selected_tokens st JOIN samples s USING (sample_id) WHERE st.selection = ?",
            [sel["selection"]]).fetchall()}
        return stage[-1]["nonfinite"], sel, kept

    nonfinite, sel, kept = _read(cfg, check)
    assert nonfinite == 2 and sel["n_nonfinite"] == 2
    assert sel["n_candidates"] == len(ref) - 2 and not (poisoned & kept)
