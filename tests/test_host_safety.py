"""Safe on a shared host: a live ``tokenclean run`` on a local cluster, watched from outside as another process of
the host would see it.

One real run (a ``tokenclean run`` subprocess that starts its own Prefect API server and local Ray cluster, held
in its first training by the test-only ``StallAfterCheckpoint`` callback) is observed while live, then SIGKILLed:

* every socket any of its processes listens on is bound to loopback;
* a client without the cluster's token is refused on loopback (and one with it, the control, connects);
* once the driver is SIGKILLed, none of its descendants is alive 30 s later;
* secrets in the driver's environment appear in no file of the Ray session or the run directory, while a
  non-secret variable the workers are given does (the control: the search would find a forwarded secret).

Only loopback addresses are connected to.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import tiny_config
from tests.faults import STALL_TRAINING_ENV, crash_flow_runs_since

CANARIES = {"AWS_SECRET_ACCESS_KEY": "canary-aws-5f2b9c", "TOKENCLEAN_API_TOKEN": "canary-tc-81d3ae"}
VISIBLE = ("TOKENCLEAN_VISIBLE_MARK", "visible-3c9e70")  # forwarded to workers as every TOKENCLEAN_* setting is
REFUSED = "Authentication token is missing or incorrect"
LOOPBACK = ("127.", "::1", "::ffff:127.")


def _listening(procs) -> list[tuple[str, str, int]]:
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(gcs: str, env: dict, wait_s: float = 60) -> str:
    """Output of a process that joins the cluster at ``gcs`` and prints CONNECTED; killed after ``wait_s`` or as
    soon as Ray says it was refused (Ray retries a refused connection for minutes)."""
    code = f"import ray; ray.init(address={gcs!r}); print('CONNECTED', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    deadline = time.monotonic() + wait_s
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = (proc.stdout.read() or b"").decode(errors="replace")
            if chunk:
                seen.append(chunk)
                if "CONNECTED" in chunk or REFUSED in chunk:
                    break
            time.sleep(0.2)
        seen.append((proc.stdout.read() or b"").decode(errors="replace"))
    finally:
        proc.kill()
        proc.wait()
    return "".join(seen)


def _still_running(procs: list) -> list[str]:
    """Names of ``procs`` (process, creation time) still running: a reused pid is another process."""
    out = []
    for p, t in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.create_time() == t:
                out.append(p.name())
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    cfg = tiny_config(tmp / "runs", "live", mode="fixed", baselines=["full"], iterations=1)
    # with what a local cluster can add: its dashboard and a metrics endpoint, whose sockets are watched too
    cfg["ray"] = dict(cfg["ray"], dashboard=True, metrics_port=_free_port())
    # held in the reference's training, the first Ray work after ingest
    cfg["warmup_train"] = dict(cfg["warmup_train"], checkpoint_every=1,
                               callbacks=["tests.faults:StallAfterCheckpoint"])
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    marker = tmp / "stalled"
    # the run starts its own Prefect server and local cluster, with no help from the test session's settings
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    env |= CANARIES | {VISIBLE[0]: VISIBLE[1], STALL_TRAINING_ENV: f"1:{marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "tokenclean.cli", "run", str(tmp / "run.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict = {"run_dir": tmp / "runs" / "live", "metrics_port": cfg["ray"]["metrics_port"]}
    started = time.time()
    try:
        deadline = time.monotonic() + 600
        while not (marker.exists() and marker.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was held: {proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the run was never held mid-training"
            time.sleep(0.5)
        driver = psutil.Process(proc.pid)
        family = driver.children(recursive=True)
        seen["names"] = sorted({p.name() for p in family})
        seen["listening"] = _listening(family)
        gcs = next(p for p in family if p.name() == "gcs_server")
        seen["session"] = Path(re.search(r"(/\S+?/session_[^/\s]+)", " ".join(gcs.cmdline())).group(1))
        ports = sorted({port for name, _, port in _listening([gcs])})
        home = tmp / "another-home"  # a process of the host without this user's ~/.ray/auth_token
        home.mkdir()
        # the clients join by loopback too (Ray would otherwise swap 127.0.0.1 for the host's address)
        loop = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        bare = {k: v for k, v in env.items() if not k.startswith("RAY_")} | loop | {"HOME": str(home),
                                                                                    "RAY_AUTH_MODE": "disabled"}
        seen["without_token"] = _client(f"127.0.0.1:{ports[0]}", bare)
        seen["with_token"] = _client(f"127.0.0.1:{ports[0]}", {**env, **loop, "RAY_AUTH_MODE": "token"})
        # SIGKILL the driver alone, as the OOM killer would; its watchdog must end the rest
        alive_before = [(p, p.create_time()) for p in family]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # none may be alive 30 s later: done as soon as none is
        while (survivors := _still_running(alive_before)) and time.monotonic() < deadline:
            time.sleep(0.5)
        seen["survivors"] = survivors
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.Process().children(recursive=True):  # never leave the test's own run behind
            if any(c.endswith("run.yaml") for c in p.cmdline() if isinstance(c, str)):
                p.kill()
        crash_flow_runs_since(started)  # its flow run, in the session's Prefect database, died with it
    return seen


def test_every_socket_of_a_local_run_is_on_loopback(live):
    assert {"gcs_server", "raylet"} <= set(live["names"]), live["names"]  # the cluster was there to look at
    assert len(live["listening"]) >= 4, live["listening"]
    assert live["metrics_port"] in {port for _, _, port in live["listening"]}  # the metrics endpoint is watched too
    public = [s for s in live["listening"] if not s[1].startswith(LOOPBACK)]
    assert not public, public


def test_a_client_without_the_token_is_refused(live):
    assert REFUSED in live["without_token"] and "CONNECTED" not in live["without_token"], live["without_token"]
    assert "CONNECTED" in live["with_token"], live["with_token"][-3000:]


def test_no_process_outlives_a_sigkilled_driver(live):
    assert not live["survivors"], live["survivors"]


def test_secrets_of_the_drivers_environment_reach_no_file(live):
    files = [p for root in (live["session"], live["run_dir"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("runtime_env") for p in files)  # Ray's logs of the runtime environment are there
    found = {name: [str(p) for p in files if value.encode() in p.read_bytes()]
             for name, value in [*CANARIES.items(), VISIBLE]}
    assert found[VISIBLE[0]], "control: the workers' environment is written to the session's logs"
    assert not any(found[name] for name in CANARIES), found


def test_secret_looking_names_are_never_given_to_workers(monkeypatch):
    """``ray.env_vars`` naming a secret is refused when the config loads (and again where the workers' environment
    is made); a ``TOKENCLEAN_*`` setting that looks like a secret is not forwarded."""
    from pydantic import ValidationError

    from tokenclean.config import RayConfig
    from tokenclean.tasks.cluster import worker_env

    with pytest.raises(ValidationError, match="names secrets"):
        RayConfig(env_vars=["AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"])

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN", "DB_PASSWORD",
                 "OPENAI_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, "x")
        with pytest.raises(ValueError, match="names secrets"):
            worker_env([name])
    monkeypatch.setenv("TOKENCLEAN_S3_SECRET", "x")
    monkeypatch.setenv("TOKENCLEAN_CACHE", "/tmp/cache")
    allowed = ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "RAY_AUTH_TOKEN_PATH",
               "HF_HOME", "TOKENIZERS_PARALLELISM", "MY_KEYBOARD_LAYOUT"]
    for name in allowed:
        monkeypatch.setenv(name, "y")
    env = worker_env(allowed)
    assert {k: env[k] for k in allowed} == dict.fromkeys(allowed, "y")
    assert "TOKENCLEAN_S3_SECRET" not in env and env["TOKENCLEAN_CACHE"] == "/tmp/cache"
