"""Faults lose nothing: SIGKILL mid-run, a Ray worker dying mid-shard, concurrent runs,
NaN/inf losses. Each test runs the real pipeline (Prefect + Ray + DuckDB + tiny model)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tasks import store
from tokenclean.config import RunConfig
from tests.conftest import tiny_config


def _cfg(tmp_path, name, **kw):
    cfg = tiny_config(tmp_path, name=name, mode="fixed", baselines=["global"], **kw)
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16}
    return cfg


def _losses(cfg: RunConfig, model: str):
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return con.execute("SELECT sample_id, pos, token_id, loss FROM token_losses WHERE model = ? "
                           "ORDER BY sample_id, pos", [model]).fetchall()
    finally:
        con.close()


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
    # Shard 3 stalls on its first attempt, so the run is certainly mid-scoring when killed.
    env = dict(os.environ, TOKENCLEAN_FAULT=f"stall:base:3:{tmp_path / 'stalled'}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = tmp_path / "killed" / "shards" / "base"
    busy_checked = False
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if not busy_checked and (tmp_path / "killed" / "tokenclean.duckdb").exists():
                # A second run on the same database is refused with a clear message.
                second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                assert second.returncode == 2 and "database busy" in second.stderr, second.stderr[-2000:]
                busy_checked = True
            stalled = (tmp_path / "stalled").exists()
            if stalled and shard_dir.exists() and len(list(shard_dir.glob("*.parquet"))) >= 2:
                break
            assert proc.poll() is None, "run finished before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("scoring never started")
    finally:
        _kill_tree(proc)
    assert busy_checked and (tmp_path / "stalled").exists()
    n_before = len(list(shard_dir.glob("*.parquet")))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run_cfg = RunConfig.model_validate(cfg)
    con = store.connect(run_cfg.db_path, read_only=True)
    try:
        import json

        from flows.scoring import check_integrity

        for model in ("base", "theta-1"):
            check = check_integrity(con, model, [0, 1, 2])
            assert check["ok"], check
        details = [json.loads(d) for (d,) in con.execute(
            "SELECT detail FROM stage_log WHERE stage = 'score' AND key = 'base'").fetchall()]
    finally:
        con.close()
    resumed = details[-1]
    assert n_before * 16 < resumed["samples_total"]  # the kill really was mid-scoring
    kept = resumed["samples_skipped"] + resumed["samples_recovered"]
    assert kept >= 16 * (n_before - 1)  # finished shards were not scored again
    assert resumed["samples_scored"] + kept == resumed["samples_total"]
