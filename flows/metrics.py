"""What a run reports to Prometheus: Ray metrics (``ray.util.metrics``) recorded in the flow process, exported with
Ray's own on the cluster's metrics endpoint (``ray.metrics_port`` for a local cluster: http://127.0.0.1:PORT/metrics,
which Ray's stock Grafana dashboards and any Prometheus scrape). Every series carries the run's name.

Ray's metrics rather than a Prometheus client of our own: the cluster already runs an exporter per node, and its
dashboards and scrape configuration (``infra/README.md``) then cover tokenclean's series too.
"""
from __future__ import annotations

import threading

GAUGES = {  # name: (description, tag keys besides ``run``)
    "tokenclean_stage_seconds": ("seconds a step took when it computed something", ("stage", "name")),
    "tokenclean_scoring_tokens_per_second": ("tokens a scoring stage scored per second", ("model",)),
    "tokenclean_kept_fraction": ("kept share of the pool's response tokens of a selection", ("selection",)),
    "tokenclean_quarantined_rows": ("input rows ingest refused, of the run's dataset", ()),
}
# Ray's exporter drops a gauge series about 15 s after its last set (measured, Ray 2.60): the last values are set
# again every few seconds while the connection lasts, so a scrape at any interval finds them.
REFRESH_S = 5.0
_made: dict = {}
_last: dict = {}  # (metric, job, tags) -> value
_lock = threading.Lock()


def record(metric: str, value: float, run: str, **tags: str) -> None:
    """Set gauge ``metric`` for ``run``; nothing without a Ray connection (Ray off: no endpoint serves it)."""
    import ray

    if not ray.is_initialized():
        return
    keys = GAUGES[metric][1]
    job = ray.get_runtime_context().get_job_id()  # a gauge belongs to one connection
    labels = (("run", run), *((k, str(tags[k])) for k in keys))
    with _lock:
        first = not _last
        _last[(metric, job, labels)] = float(value)
    _set(metric, job, labels, float(value))
    if first:
        threading.Thread(target=_keep_alive, name="tokenclean-metrics", daemon=True).start()


def _set(metric: str, job: str, labels: tuple, value: float) -> None:
    from ray.util.metrics import Gauge

    if (metric, job) not in _made:
        description, keys = GAUGES[metric]
        _made[(metric, job)] = Gauge(metric, description=description, tag_keys=("run", *keys))
    _made[(metric, job)].set(value, tags=dict(labels))


def _keep_alive() -> None:
    """Set the last values again until the Ray connection ends; then forget them."""
    import time

    import ray

    while True:
        time.sleep(REFRESH_S)
        try:
            if not ray.is_initialized():
                break
            job = ray.get_runtime_context().get_job_id()
            with _lock:
                current = [(key, v) for key, v in _last.items() if key[1] == job]
            for (metric, _, labels), value in current:
                _set(metric, job, labels, value)
        except Exception:  # the connection ended while setting: nothing left to export to
            break
    with _lock:
        _last.clear()

