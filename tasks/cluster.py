"""Joining Ray: a local cluster only this user on this host can reach, or the cluster at a given address.

A local cluster listens on 127.0.0.1 alone with Ray's token authentication on, the token readable by this user
alone; a cluster at an address is its operator's. Workers never get credentials through ``runtime_env`` (Ray logs
it in plain text). The security model: docs/design.md ("The cluster's security model").
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from tokenclean.secret_names import is_secret_name, secret_looking

# Ray's own switch for single-host clusters: with it off, Ray takes 127.0.0.1 as the node's address and its
# servers listen on loopback alone (Ray reads it at import, so ``loopback_only`` sets Ray's copy too).
_SINGLE_HOST = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Variables the workers need to find the Prefect API, the cache and custom scorer modules (PYTHONPATH).
PASSED = ("PREFECT_API_URL", "PREFECT_HOME", "TOKENCLEAN_CACHE", "TRANSFORMERS_VERBOSITY",
          "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE", "PREFECT_LOGGING_LEVEL", "PYTHONPATH")


def worker_env(env_vars=()) -> dict:
    """The environment every worker gets: ``PASSED``, this process's ``TOKENCLEAN_*`` settings (a custom scorer's,
    say) and the names in ``env_vars`` (``ray.env_vars``), never a variable whose name looks like a secret."""
    refused = secret_looking(env_vars)
    if refused:
        raise ValueError(f"ray.env_vars names secrets ({', '.join(refused)}): Ray writes a job's environment into "
                         "its logs in plain text. Give workers credentials through their node instead (instance "
                         "role, a credentials file, or the environment the raylet was started with)")
    missing = [k for k in env_vars if k not in os.environ]
    if missing:
        raise ValueError(f"ray.env_vars names variables this environment does not set: {missing}")
    names = [*PASSED, *(k for k in os.environ if k.startswith("TOKENCLEAN_")), *env_vars]
    env = {k: os.environ[k] for k in names if k in os.environ and not is_secret_name(k)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def init_kwargs(local: bool, num_cpus: int | None = None, env_vars=(), dashboard: bool = False,
                metrics_port: int | None = None) -> dict:
    """``ray.init`` keyword arguments: the workers' environment, and for a local cluster its size, its dashboard
    (off unless asked for: it wants extra ports and a process per node; on 127.0.0.1 when on) and the port its
    metrics are exported on. A cluster joined by address has its own dashboard and metrics settings."""
    init: dict = {"runtime_env": {"env_vars": worker_env(env_vars)}, "log_to_driver": True}
    if local:
        init |= {"include_dashboard": dashboard, "num_cpus": num_cpus or os.cpu_count() or 1}
        if dashboard:
            init["dashboard_host"] = "127.0.0.1"
        if metrics_port:
            init["_metrics_export_port"] = metrics_port
    return init


def private_token() -> None:
    """Make sure the token Ray uses for a local cluster is readable by this user alone (Ray writes it with the
    process's umask). A token the user gives (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) is left as it is."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator makes


@contextlib.contextmanager
def loopback_only():
    """For the duration: a Ray cluster started here listens on 127.0.0.1 alone. Token authentication is switched
    on for this process and stays on after (a later cluster it starts or joins keeps it)."""
    import ray._private.ray_constants as ray_constants
    from ray._raylet import Config

    saved_env, saved_constant = os.environ.get(_SINGLE_HOST), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_HOST] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    if os.environ.get("RAY_AUTH_MODE") != "token":  # also where the user's environment says "disabled"
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray's C++ side read RAY_AUTH_MODE at import; re-read it, as Ray's own switch does
    private_token()
    try:
        yield
    finally:  # the single-host switch only: a cluster joined later by address may span hosts
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_SINGLE_HOST, None)
        else:
            os.environ[_SINGLE_HOST] = saved_env


@contextlib.contextmanager
def connected(address: str | None, num_cpus: int | None = None, env_vars=(), dashboard: bool = False,
              metrics_port: int | None = None, **extra):
    """Hold a Ray connection for the duration: to ``address``, or to a new local cluster (loopback, token) that
    ends with it. Does nothing where Ray is already initialised (the caller's connection is used). Yields the
    ``ray.init`` context, or None."""
    import ray

    if ray.is_initialized():
        yield None
        return
    from tokenclean.tasks import watchdog

    local = address in (None, "local")
    kwargs = init_kwargs(local, num_cpus, env_vars, dashboard, metrics_port) | extra
    if local:
        watchdog.start()  # the cluster dies with this process, even a SIGKILLed one
    with loopback_only() if local else contextlib.nullcontext():
        # "local" forces a fresh cluster even if a stale /tmp/ray/ray_current_cluster points at a dead one
        context = ray.init(address="local" if local else address, **kwargs)
        try:
            yield context
        finally:
            ray.shutdown()
