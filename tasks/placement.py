"""Where a piece of work ran: recorded beside its result, so a test or an operator can check
that work asking for GPUs landed on a GPU node and not on the driver."""
from __future__ import annotations

import os
import socket


def where() -> dict:
    """This process: its Ray node id (the host name off Ray) and its process id."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - placement is informational
        node = None
    return {"node": node or socket.gethostname(), "pid": os.getpid()}
