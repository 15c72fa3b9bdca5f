"""What an on-call engineer reads in the Prefect UI: artifact keys kept apart by run name, checked through the API of
the session's real Prefect server. (Flow-run names and tags, task-run names of a whole run: tests/test_flows.py.)"""
from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from tests.conftest import tiny_config
from tokenclean.config import RunConfig
from tokenclean.flows.runtime import ARTIFACT_KEY_MAX, artifact_key
from tokenclean.tasks import store

# valid run names (letters, digits, '.', '_', '-') that a slug alone would merge or a length cap would cut alike
NAMES = ["demo", "Demo", "DEMO", "de.mo", "de_mo", "de-mo", "a" * 200, "a" * 199 + "b", "A" * 200, "x.y_z-1",
         "nightly-2025.06", "nightly-2025-06", "run_" + "long" * 40, "run-" + "long" * 40]
WHATS = ["token-cleaning-summary", "token-cleaning-metrics", "token-cleaning-k-curve", "token-cleaning-refresh",
         "token-cleaning-comparison", "score-base", "score-self-evolving@2", "ray-dashboard"]


def test_artifact_keys_are_what_prefect_accepts_and_never_shared_by_two_run_names():
    from prefect.client.schemas.actions import ArtifactCreate

    for name in NAMES:
        RunConfig.model_validate(tiny_config("w", name=name))  # every name above is one a user can give
    keys = {(n, w): artifact_key(n, w) for n, w in itertools.product(NAMES, WHATS)}
    for key in keys.values():
        ArtifactCreate(key=key, type="markdown", data="")  # Prefect's own validation of a key
        assert len(key) <= ARTIFACT_KEY_MAX, key
    assert len(set(keys.values())) == len(keys)  # no two (run name, artifact) pairs share a key
    assert artifact_key("demo", "score-self-evolving@2") == "demo-score-self-evolving-2"  # a plain name reads as is


def _publish_under_a_flow_run(name: str, workdir: str) -> None:
    """``publish_summary`` inside a flow run, as the cleaning flows call it (the run's database has no outputs)."""
    from prefect import flow

    from tokenclean.flows.cleaning import publish_summary

    @flow(name="ops-view-publish")
    def publish(name: str, workdir: str) -> None:
        cfg = RunConfig.model_validate(tiny_config(workdir, name=name))
        con = store.connect(cfg.db_path)
        try:
            publish_summary(con, cfg, "base-path")
        finally:
            con.close()

    publish(name, workdir)


def test_two_runs_with_different_names_keep_separate_latest_summaries(tmp_path):
    """Two pipelines on one server: the later one's summary does not replace the earlier one's latest artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    first, second = (f"ops-{side}-{uuid.uuid4().hex[:6]}" for side in ("a", "b"))
    _publish_under_a_flow_run(first, str(tmp_path / "a"))
    _publish_under_a_flow_run(second, str(tmp_path / "b"))
    wanted = {artifact_key(n, "token-cleaning-summary"): n for n in (first, second)}

    async def latest():
        async with get_client() as c:
            return await c.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=list(wanted))))

    found = {a.key: a.data for a in asyncio.run(latest())}
    assert set(found) == set(wanted), found
    for key, name in wanted.items():
        assert f"`{name}`" in found[key]  # each key's latest summary is its own run's


def test_the_cli_keeps_the_terminal_quiet_and_the_flow_run_logs_at_info():
    """What ``tokenclean`` sets for its own process (``cli.QUIET_ENV``), as Prefect's logging reads it in a fresh
    process: flow and task run loggers at INFO (their lines reach the Prefect UI), the terminal at WARNING."""
    import json
    import os
    import subprocess
    import sys

    from tokenclean.cli import QUIET_ENV

    probe = ("import json, logging; from prefect.logging.configuration import setup_logging; setup_logging(); "
             "print(json.dumps([logging.getLogger(n).getEffectiveLevel() for n in "
             "('prefect.flow_runs', 'prefect.task_runs', 'prefect.client')] + "
             "[h.level for h in logging.getLogger().handlers]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")} | QUIET_ENV
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flow_runs, task_runs, client, *console = json.loads(out.stdout.strip().splitlines()[-1])
    assert (flow_runs, task_runs, client) == (20, 20, 30) and console == [30]


def _series(body: str, name: str, *keys: str) -> dict[str, float]:
    """{the values of ``keys`` joined by '/': value} of one gauge in a Prometheus text page, with each series' run."""
    import re

    out = {}
    for labels, value in re.findall(rf"^ray_{name}{{(.*)}} (\S+)$", body, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out["/".join([tags["run"], *(tags[k] for k in keys)])] = float(value)
    return out


def _scrape(url: str, ready, timeout_s: float = 90) -> str:
    """The metrics endpoint's text once ``ready(text)`` holds (Ray exports every few seconds, not all at once)."""
    import time
    import urllib.request

    deadline, body = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            body = ""
        if ready(body):
            return body
        time.sleep(2)
    return body


def test_a_runs_metrics_reach_the_local_clusters_prometheus_endpoint_on_loopback(tiny, tmp_path):
    """A run on a local cluster with ``ray.metrics_port``: its stage seconds, scoring rate, kept fractions and
    quarantined rows are Prometheus series at http://127.0.0.1:PORT/metrics, named with the run, and that port
    listens on loopback only."""
    import socket

    import psutil

    from tokenclean.flows.cleaning import run
    from tokenclean.flows.runtime import ray_session

    for name, n in (("train.jsonl", 48), ("eval.jsonl", 8)):  # the series are the point, not the model
        src = tiny.train if name == "train.jsonl" else tiny.eval
        (tmp_path / name).write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(tmp_path / "runs", name="metered", mode="fixed", baselines=["global"], iterations=1)
    cfg["data"] = {"paths": [str(tmp_path / "train.jsonl")], "eval_paths": [str(tmp_path / "eval.jsonl")],
                   "max_length": 256}
    cfg["ray"] = {"num_cpus": 2, "metrics_port": port}
    cfg["eval"] = {"max_new_tokens": 0}
    cfg = RunConfig.model_validate(cfg)
    with ray_session(cfg.ray):  # held here, so the endpoint outlives the run: run() joins this session
        run(cfg)
        stages = {"metered/train/reference", "metered/train/global", "metered/evaluate/global",
                  "metered/select/global"}
        body = _scrape(f"http://127.0.0.1:{port}/metrics",
                       lambda text: stages <= set(_series(text, "tokenclean_stage_seconds", "stage", "name")))
        listeners = [c.laddr.ip for p in psutil.Process().children(recursive=True) for c in _inet(p)
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert stages <= set(_series(body, "tokenclean_stage_seconds", "stage", "name")), _series(body, "tokenclean_stage_seconds", "stage", "name")
    assert _series(body, "tokenclean_kept_fraction", "selection")["metered/global"] == pytest.approx(0.6, abs=1e-3)
    assert {"metered/base", "metered/reference"} <= set(_series(body, "tokenclean_scoring_tokens_per_second", "model"))
    assert _series(body, "tokenclean_quarantined_rows") == {"metered": 0.0}
    assert listeners and all(ip.startswith(("127.", "::ffff:127.")) for ip in listeners), listeners


def _inet(p):
    import psutil

    try:
        return p.net_connections(kind="inet")
    except psutil.Error:
        return []
