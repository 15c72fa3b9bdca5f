"""Where flows run: a Prefect API every process can reach, and the Ray task runner.

Prefect's default ephemeral API lives inside the driver, out of the Ray workers' sight; so where no
``PREFECT_API_URL`` is configured a local API server subprocess is started and its URL exported before Ray starts.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from datetime import UTC, datetime

from tokenclean.config import RayConfig, RunConfig
from tokenclean.tasks import keys, watchdog

STARTUP_TIMEOUT_S = 180


def start_local_server(attempts: int = 2):
    """Start a local Prefect API server subprocess; return it once it answers /health.

    A first start runs migrations, slower than Prefect's default timeout, so the timeout is passed to ``start``
    (Prefect reads its settings at import); a failed start (a port taken meanwhile) is retried on a new port.
    """
    from prefect.server.api.server import SubprocessASGIServer

    for attempt in range(attempts):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=STARTUP_TIMEOUT_S)
            return server
        except Exception:  # not only Prefect's RuntimeError: a squatted port answers /health with a timeout or a 4xx
            server.stop()
            if attempt == attempts - 1:
                raise


@contextlib.contextmanager
def prefect_api():
    """Yield the API URL in use; start a local server for the duration if none is configured."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if url:
        yield url
        return
    watchdog.start()  # the server dies with this process, even a SIGKILLed one
    server = start_local_server()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server.api_url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send buffered run logs before the server goes away
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def run_logger():
    """The flow run's logger (the Prefect UI and the terminal), or a plain one outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("tokenclean")


# Prefect sets no length on artifact keys; past this the UI's artifact list cuts them off
ARTIFACT_KEY_MAX = 100


def artifact_key(run_name: str, what: str) -> str:
    """``<run>-<what>``: the server's artifact keys are global, so each run's latest artifacts are kept by its name.

    Keys allow lowercase letters, digits and dashes only: a name the slug changes (case, '.', '_') or that is too
    long is cut and ends in a digest of the name itself, so two run names never share a key.
    """
    what = re.sub(r"[^a-z0-9-]+", "-", what.lower()).strip("-")
    slug = re.sub(r"[^a-z0-9-]", "-", run_name.lower())
    room = ARTIFACT_KEY_MAX - len(what) - 1
    if slug != run_name or len(slug) > room:
        tail = "-" + keys.digest("run-name", run_name)[:8]
        slug = slug[:room - len(tail)].rstrip("-") + tail
    return f"{slug}-{what}"


def run_tags(cfg: RunConfig) -> list[str]:
    """Tags every flow run of ``cfg`` carries, for the UI's tag filter: the run's name and the digest of its config."""
    return ["tokenclean", f"run:{cfg.name}", f"config:{keys.digest('config', cfg.model_dump(mode='json'))}"]


def tag_flow_run(*new: str) -> None:
    """Add tags to the running flow run: its dataset key is known only once ingest has run, after the run began."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    ctx.flow_run.tags = sorted(set(ctx.flow_run.tags) | set(new))  # the update replaces the run's tags
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=ctx.flow_run.tags)


def invocation_tag() -> str:
    """A tag shared by the flows of one ``tokenclean run`` / ``refresh`` call, and by no other call."""
    return f"invocation:{uuid.uuid4().hex[:8]}"


def flow_run_name() -> str:
    """``<run name>/<flow>/<UTC start>``: a flow's ``flow_run_name``, resolved by Prefect as the run starts (the
    ``config`` parameter is the validated config, or its JSON where a deployment started the run)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    config = ctx.parameters["config"]
    name = config["name"] if isinstance(config, dict) else config.name
    return f"{name}/{ctx.flow.name}/{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"


def ray_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("TOKENCLEAN_RAY_ADDRESS") or None


def task_runner(cfg: RayConfig):
    """RayTaskRunner on a local cluster (default) or the given address; threads if Ray is off."""
    if not cfg.enabled:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_ray import RayTaskRunner

    from tokenclean.tasks.cluster import init_kwargs

    address = ray_address(cfg)
    # ray_session has joined the cluster already; these arguments apply only where it has not
    return RayTaskRunner(address=address or "local", init_kwargs=init_kwargs(
        address is None, cfg.num_cpus, cfg.env_vars, cfg.dashboard, cfg.metrics_port))


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Hold one Ray connection for everything inside: both flows of ``tokenclean run`` share it, so they start one
    cluster and keep the same workers and their model cache. Does nothing when Ray is off or already initialised
    by the caller."""
    if not cfg.enabled:
        yield
        return
    from tokenclean.tasks.cluster import connected

    with connected(ray_address(cfg), cfg.num_cpus, cfg.env_vars, cfg.dashboard, cfg.metrics_port) as context:
        if context is None:  # the caller's connection
            yield
            return
        _SESSION["dashboard"] = getattr(context, "dashboard_url", None) or None
        try:
            warm_workers()
            yield
        finally:
            _SESSION["dashboard"] = None


_SESSION: dict = {"dashboard": None}


def ray_dashboard_url() -> str | None:
    """http URL of the Ray dashboard of the cluster ``ray_session`` joined (None: no dashboard, or no session)."""
    url = _SESSION["dashboard"]
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _import_stages() -> int:
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import prefect.task_engine  # noqa: F401
    from transformers import Trainer, TrainingArguments  # noqa: F401  (lazy in transformers: accelerate & co.)

    import tokenclean.tasks.steps  # noqa: F401  (torch, transformers, the stage code)

    return os.getpid()


def warm_workers(limit: int = 8) -> list:
    """Start the job's CPU workers now and import the stage code in them, so that a worker's first-task imports
    overlap the driver's own preparation. Returns the refs (nothing waits on them)."""
    import ray

    n = int(min(limit, ray.cluster_resources().get("CPU", 1)))
    fn = ray.remote(num_cpus=1)(_import_stages)
    return [fn.remote() for _ in range(max(1, n))]


def scoring_slots(cfg: RayConfig) -> int:
    """How many scoring tasks the cluster runs at once: its GPUs over ``num_gpus_per_task``, else its CPUs.

    Read from the cluster the flow is connected to (1 when Ray is off or not started), so
    shard sizes and the number of shards kept in flight follow the cluster, not a constant.
    """
    if not cfg.enabled:
        return 1
    import ray

    if not ray.is_initialized():
        return 1
    res = ray.cluster_resources()
    if cfg.num_gpus_per_task:
        return max(1, int(res.get("GPU", 0) // cfg.num_gpus_per_task))
    return max(1, int(res.get("CPU", 1)))


def run_now(fn, *args, **kwargs):
    """Call ``fn`` here, now, and return a finished future of its result (or of its error, raised where
    the result is asked for, as from a Ray worker): for work that has no cluster to go to."""
    from concurrent.futures import Future

    done: Future = Future()
    try:
        done.set_result(fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - handed to whoever asks for the result
        done.set_exception(e)
    return done


def submit_placed(task, cfg: RayConfig, cpus: float, gpus: float, *args, keep_worker: bool = False, **kwargs):
    """Start a Prefect ``task`` on a Ray worker holding ``cpus``/``gpus`` (submitted to the flow's Ray task
    runner) and return its future; Ray runs as many at once as the cluster has those resources for.
    With Ray off it runs here, now, and the future is already done.

    ``keep_worker``: see ``placement_options``.
    """
    if not cfg.enabled:
        return run_now(task, *args, **kwargs)
    from prefect_ray.context import remote_options

    with remote_options(**placement_options(cpus, gpus, keep_worker)):
        return task.submit(*args, **kwargs)


def placement_options(cpus: float | None, gpus: float, keep_worker: bool) -> dict:
    """Ray resource options of a task; ``keep_worker`` keeps its worker process alive afterwards.

    Ray retires a worker after one GPU task, which would reload the model for every shard; a kept worker
    (``max_calls=0``) keeps the per-process model cache, and an idle one holds a copy of the base weights on its GPU.
    Why: docs/design.md ("Scheduling and placement").
    """
    out: dict = {"num_gpus": gpus}
    if cpus is not None:
        out["num_cpus"] = cpus
    if keep_worker and gpus:
        out["max_calls"] = 0
    return out
