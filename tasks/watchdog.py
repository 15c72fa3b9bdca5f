"""Children die with the driver, also when it is SIGKILLed (the OOM killer, ``kill -9``).

A watchdog process per driver records the driver's descendants every second and, once it is re-parented (the
driver is gone), ends them: SIGTERM, then SIGKILL after ``GRACE_S``. A process is matched by PID and start time,
so a reused PID is never hit. Why: docs/design.md ("Processes that outlive the driver").
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 10.0

_started: dict = {}


def start() -> None:
    """Start this process's watchdog (once per process; where psutil is missing, nothing), in a session of its
    own so that a Ctrl-C to the terminal does not end it before it has looked."""
    if _started.get("pid") == os.getpid():
        return
    try:
        import psutil  # noqa: F401
    except ImportError:  # pragma: no cover - psutil is a dependency
        return
    _started["pid"] = os.getpid()
    _started["proc"] = subprocess.Popen(
        [sys.executable, "-m", "tokenclean.tasks.watchdog", str(os.getpid())], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def watch(driver_pid: int) -> None:
    import psutil

    me = os.getpid()
    known: dict[int, float] = {}  # pid -> create_time of every descendant seen
    last_scan = 0.0
    while os.getppid() == driver_pid:
        if time.monotonic() - last_scan >= 1.0:
            last_scan = time.monotonic()
            try:
                for p in psutil.Process(driver_pid).children(recursive=True):
                    if p.pid != me:
                        known.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        time.sleep(POLL_S)
    left = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                p.terminate()
                left.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
