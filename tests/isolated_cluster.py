"""A Ray cluster whose worker nodes share no files with the driver or with each other.

The head (no CPUs: no work lands on it) runs beside the driver. Each worker node is ``ray start --address``
inside its own mount namespace (``unshare --mount``) with a private tmpfs over ``private``, the directory
that holds the driver's run directories, and its temporary directory inside it: what a worker writes there
no other node sees, and the driver's files there are hidden from it, as on a KubeRay pod or a cloud VM.
Paths outside ``private`` (the Python environment, the base model, the input files) stay visible, as a
container image and a node-local model cache make them. Loopback only.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def can_isolate() -> str | None:
    """Why this machine cannot give a process its own mount namespace, or None."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --mount: {probe.stderr.strip()}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_downloads() -> list[dict]:
    """What this node fetched from object storage (``storage.open_dir``'s log), run on the node (as a Ray task)."""
    from tokenclean.tasks import storage

    log = storage.node_cache() / "downloads.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class IsolatedCluster:
    def __init__(self, private: Path, workers: int = 2, env: dict | None = None):
        self.private, self.env = Path(private), dict(os.environ) | (env or {})
        self.private.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # --block and a session of its own: killing the group stops this cluster, and no other on the machine
        self.head = subprocess.Popen([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                                      "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats", "--block"],
                                     env=self.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers: dict[str, subprocess.Popen] = {}  # node id -> its namespace's process group
        self.seen: set[str] = set()
        for _ in range(workers):
            self.add_worker()

    def add_worker(self) -> str:
        """A worker node in its own mount namespace, with an empty private tmpfs over ``private``; its node id.
        Its temporary directory and its cache of object-storage copies (``TOKENCLEAN_NODE_CACHE``) are inside."""
        tmp = self.private / ".node-tmp"
        script = (f"mount -t tmpfs tmpfs {self.private} && mkdir -p {tmp} && "
                  f"exec {sys.executable} -m tests.isolated_node {self.address}")
        env = self.env | {"TMPDIR": str(tmp), "TOKENCLEAN_NODE_CACHE": str(tmp / "node-cache")}
        before = self.seen  # a killed node can stay "alive" in Ray's table for a while: never take it as new
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (node,) = self._wait_for_new(before)
        self.workers[node] = proc
        self.seen.add(node)
        return node

    def node_ids(self) -> list[str]:
        return list(self.workers)

    def _wait_for_new(self, before: set[str], timeout: float = 90) -> set[str]:
        """The ids of worker nodes alive now and not in ``before``, once there is one (asked from a short-lived
        driver, so the caller's stays free)."""
        code = (f"import json, ray, time\nt = time.time()\n"
                f"while True:\n"  # the head may still be starting
                f"    try:\n        ray.init(address='{self.address}', logging_level='ERROR'); break\n"
                f"    except ConnectionError:\n        assert time.time() - t < {timeout}; time.sleep(1)\n"
                f"while True:\n"
                f"    new = {{n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) > 0}}"
                f" - set({sorted(before)!r})\n"
                f"    if new: print(json.dumps(sorted(new))); break\n"
                f"    assert time.time() - t < {timeout}, 'the worker node did not join'\n"
                f"    time.sleep(0.5)\n")
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"isolated cluster at {self.address}: {done.stderr[-2000:]}")
        return set(json.loads(done.stdout.strip().splitlines()[-1]))

    def kill_worker(self, node: str) -> str:
        """Kill worker node ``node`` whole (raylet and its workers, no drain) and start a fresh, empty one in its
        place, as an autoscaler would; the new node's id."""
        proc = self.workers.pop(node)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return self.add_worker()

    def on_each_node(self, fn) -> dict:
        """``fn()`` run on every worker node (a Ray task pinned there), by node id."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray.init(address=self.address, logging_level="ERROR")
        try:
            remote = ray.remote(num_cpus=0)(fn)
            return {node: ray.get(remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                                  .remote()) for node in self.node_ids()}
        finally:
            ray.shutdown()

    def replace_all(self) -> list[str]:
        """Every worker node swapped for a fresh one (empty disk, empty caches)."""
        return [self.kill_worker(node) for node in list(self.workers)]

    def shutdown(self) -> None:
        for proc in [*self.workers.values(), self.head]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
