"""Faults lose nothing: a Ray worker dying mid-shard, NaN/inf losses. Each test runs the real
pipeline (Prefect + Ray + DuckDB + tiny model). Killed drivers and lost nodes are in
test_multinode.py, on a multi-node cluster."""
import json
import math

import pytest

from tests.conftest import tiny_config
from tests.faults import BACKEND, FAULT_ENV, shard_first_ids
from tests.store_reads import losses_by_uid, read_run
from tokenclean.config import RunConfig
from tokenclean.summary import output_key
from tokenclean.tasks import store


def _cfg(tmp_path, name, **kw):
    # D0 in the pool (select.pool: all): the faults below are placed in shards of parts 0..2
    cfg = tiny_config(tmp_path, name=name, mode="fixed", baselines=["global"], select={"pool": "all"},
                      eval={"max_new_tokens": 0}, **kw)  # faults in scoring are the point: no generation
    # The fault-injecting scorer wraps the real one; faults fire only where TOKENCLEAN_FAULT says.
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16, "backend": BACKEND}
    return cfg


def _losses(cfg: RunConfig, name: str):
    """(uid, pos, loss) of the current model ``name``: comparable across run directories."""
    return read_run(cfg, lambda con: losses_by_uid(con, output_key(con, name, "losses"),
                                                      output_key(con, "data", "dataset")))


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

    nonfinite, sel, kept = read_run(cfg, check)
    assert nonfinite == 2 and sel["n_nonfinite"] == 2
    assert sel["n_candidates"] == len(ref) - 2 and not (poisoned & kept)


def test_a_failed_prefect_start_is_retried_on_a_new_port(monkeypatch):
    """Reliability case 8: a local Prefect API server whose start fails (here: its first start is given 0.5 s,
    less than any start takes, as a slow first migration on a busy machine exceeds the real timeout) is stopped
    and started once more, as a new server on another port, with the explicit start-up timeout both times."""
    import socket

    import httpx
    from prefect.server.api.server import SubprocessASGIServer

    from tokenclean.flows import runtime

    # a registry of our own: Prefect keeps one server per requested port, and this session's server is in its registry
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    real_start = SubprocessASGIServer.start
    attempts, held = [], []

    def start(self, timeout=None):
        attempts.append({"server": self, "timeout": timeout})
        try:
            return real_start(self, timeout=0.5 if len(attempts) == 1 else timeout)
        except RuntimeError:
            attempts[-1] |= {"port": self.port, "process": self.server_process}
            # the failed attempt's port stays taken (as by whatever raced us to it): the retry cannot land there
            sock = socket.socket()
            sock.bind(("127.0.0.1", self.port))
            held.append(sock)
            raise

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    server = runtime.start_local_server()
    try:
        assert len(attempts) == 2 and "process" in attempts[0] and "process" not in attempts[1]
        assert [a["timeout"] for a in attempts] == [runtime.STARTUP_TIMEOUT_S] * 2
        assert attempts[0]["process"].poll() is not None  # the failed server was stopped, not left running
        assert attempts[1]["server"] is server is not attempts[0]["server"]
        assert server.port != attempts[0]["port"]
        assert httpx.get(f"{server.api_url}/health", timeout=30).status_code == 200
    finally:
        server.stop()
        for sock in held:
            sock.close()
