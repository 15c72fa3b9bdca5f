"""Where a piece of work ran: recorded beside its result, so a test or an operator can check
that work asking for GPUs landed on a GPU node and not on the driver."""
from __future__ import annotations

import os
import socket
import sys


def where() -> dict:
    """This process: its Ray node id (the host name off Ray) and its process id. Ray is consulted only if this
    process has imported it (every Ray worker has): importing it just to ask costs memory."""
    ray = sys.modules.get("ray")
    try:
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - placement is informational
        node = None
    return {"node": node or socket.gethostname(), "pid": os.getpid()}


def use_assigned_cpus() -> int | None:
    """Give torch as many intra-op threads as CPUs Ray assigned to the running task; returns that number (None
    outside Ray). Torch reads ``OMP_NUM_THREADS`` once per process, and Ray reuses a worker for tasks of any size."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray task (driver, plain process)
        return None
    if not cpus or cpus < 1:
        return None
    import torch

    n = int(cpus)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
