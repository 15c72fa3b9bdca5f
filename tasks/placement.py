"""Where a piece of work ran: recorded beside its result, so a test or an operator can check
that work asking for GPUs landed on a GPU node and not on the driver."""
from __future__ import annotations

import os
import socket
import sys


def where() -> dict:
    """This process: its Ray node id (the host name off Ray) and its process id.

    Ray is consulted only if this process has imported it (every Ray worker has): importing
    it just to learn that it is not initialised costs about 100 MB of memory.
    """
    ray = sys.modules.get("ray")
    try:
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - placement is informational
        node = None
    return {"node": node or socket.gethostname(), "pid": os.getpid()}


def use_assigned_cpus() -> int | None:
    """Give torch as many intra-op threads as CPUs Ray assigned to the running task; returns that number.

    Ray sets ``OMP_NUM_THREADS`` when it starts a worker, and torch reads it once, at its
    first use in the process. Workers are reused across tasks of different sizes (and
    ``flows.runtime.warm_workers`` starts them with 1-CPU tasks), so a training task that
    asks for 2 CPUs ran with 1 thread: measured, ``torch.get_num_threads()`` is 1 in a
    reused worker whatever the task's ``num_cpus``. Outside Ray this does nothing.
    """
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
