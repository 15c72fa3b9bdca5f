"""What one Prefect task on a Ray worker costs, against a bare Ray task: no-op tasks, 2 local CPUs.

    python benchmarks/task_overhead.py --tasks 40

Each task receives a payload shaped like the old scoring shard (512 per-sample objects of
36 tokens) and does nothing. Prints wall ms per task and the driver's submit ms per task.
``--profile`` runs 100 tasks on one worker under ``py-spy record`` (raw stacks to
``--profile-out``), which is how the per-task costs inside Prefect were found.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tokenclean.config import RayConfig  # noqa: E402
from tokenclean.flows.runtime import prefect_api, ray_session, task_runner  # noqa: E402
from tokenclean.tasks.score import ShardSample  # noqa: E402


@task(cache_policy=NO_CACHE)
def noop(samples, i):
    return os.getpid()


def payload():
    rng = np.random.default_rng(0)
    return [ShardSample(i, rng.integers(0, 4000, 36).astype(np.int32), np.ones(36, bool)) for i in range(512)]


@flow
def many(n: int, with_payload: bool = True):
    s = payload() if with_payload else None
    t0, submit = time.perf_counter(), 0.0
    futs = []
    for i in range(n):
        a = time.perf_counter()
        futs.append(noop.submit(s, i))
        submit += time.perf_counter() - a
    pids = [f.result() for f in futs]
    return time.perf_counter() - t0, submit, pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", default="task_overhead_worker.txt")
    args = ap.parse_args()
    import ray

    cfg = RayConfig(num_cpus=1 if args.profile else 2)
    with prefect_api(), ray_session(cfg):
        time.sleep(15)  # let the warm workers finish importing
        runner = task_runner(cfg)
        if args.profile:
            _, _, pids = many.with_options(task_runner=runner)(4, False)
            prof = subprocess.Popen(["py-spy", "record", "-p", str(pids[0]), "-r", "50", "--format", "raw",
                                     "-o", args.profile_out])
            time.sleep(2)
            dt, _, _ = many.with_options(task_runner=runner)(100, False)
            prof.send_signal(2)
            prof.wait()
            print(f"100 tasks on one worker under py-spy: {dt:.1f} s; stacks in {args.profile_out}")
            return
        dt, submit, _ = many.with_options(task_runner=runner)(args.tasks)
        print(f"prefect tasks: {args.tasks} in {dt:.2f} s -> {dt / args.tasks * 1000:.0f} ms/task wall "
              f"({submit / args.tasks * 1000:.0f} ms submit each)")
        bare = ray.remote(num_cpus=1)(lambda s, i: os.getpid())
        s = payload()
        t0 = time.perf_counter()
        ray.get([bare.remote(s, i) for i in range(args.tasks)])
        dt = time.perf_counter() - t0
        print(f"ray tasks: {args.tasks} in {dt:.2f} s -> {dt / args.tasks * 1000:.0f} ms/task")


if __name__ == "__main__":
    main()
