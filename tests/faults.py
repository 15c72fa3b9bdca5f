"""A fault-injecting scorer for the reliability tests; production code has no chaos hook.

Configured as ``score.backend: tests.faults:FaultyScorer`` (a custom scorer, the same
plugin point any user scorer uses). It wraps the real transformers scorer and, per
``TOKENCLEAN_FAULT=kind:model:sample_id:marker[,...]``, injects a fault into the shard
whose first sample is ``sample_id`` when scored by ``model`` (``base`` or ``adapter``):

* ``kill``: SIGKILL the worker the first time it scores that shard (the marker file
  makes it happen once);
* ``stall``: hold that shard for 120 s, once (a run that is reliably mid-scoring; the
  marker says on which Ray node, so a test can kill that node);
* ``nan``: poison the shard's first two losses with NaN/inf.

``shard_first_ids`` tells a test which sample ids start the shards of a prepared run.
"""
from __future__ import annotations

import os
import signal
import time
from datetime import UTC
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokenclean.tasks.score import process_model

FAULT_ENV = "TOKENCLEAN_FAULT"
BACKEND = "tests.faults:FaultyScorer"


class FaultyScorer:
    def __init__(self, base_path: str, *, device: str, dtype: str, compile: bool = False):
        self.inner = process_model(base_path, device, dtype, compile)
        self.numerics = self.inner.numerics

    def losses(self, samples, *, adapter=None, adapter_key=None, **kw):
        which = "base" if adapter is None else "adapter"
        specs = [s.split(":", 3) for s in filter(None, os.environ.get(FAULT_ENV, "").split(","))]
        mine = [(kind, marker) for kind, model, sid, marker in specs
                if model == which and samples and int(sid) == samples[0].sample_id]
        for kind, marker in mine:
            if kind in ("kill", "stall") and not Path(marker).exists():
                _mark(marker)
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(120)
        table = self.inner.losses(samples, adapter=adapter, adapter_key=adapter_key, **kw)
        if any(kind == "nan" for kind, _ in mine) and table.num_rows >= 2:
            loss = table.column("loss").to_numpy().copy()
            loss[:2] = [np.nan, np.inf]
            table = table.set_column(table.schema.get_field_index("loss"), "loss", pa.array(loss, pa.float32()))
        return table


def _mark(marker: str) -> None:
    """Write where this process runs (Ray node id, pid) to ``marker``, atomically: a test that sees
    the file can kill exactly that node."""
    import json

    from tokenclean.tasks.placement import where

    tmp = f"{marker}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(where()))
    os.replace(tmp, marker)


def shard_first_ids(cfg, parts: list[int]) -> list[int]:
    """First sample id of each shard a fresh scoring of ``parts`` would send (prepares the run)."""
    from tokenclean.flows.prepare import prepare
    from tokenclean.flows.scoring import MIN_SHARD_TOKENS, chunk_shards
    from tokenclean.tasks import store

    ctx = prepare(cfg, progress=False)
    try:
        ids, lengths = store.unscored_lengths(ctx.con, ctx.base_model, ctx.dataset, parts)
    finally:
        ctx.con.close()
    # the token budget depends on the cluster's slots; these tests set shard_samples so that it cannot bind
    assert cfg.score.shard_samples and cfg.score.shard_samples * int(lengths.max()) <= MIN_SHARD_TOKENS, \
        "set score.shard_samples so that a shard stays under MIN_SHARD_TOKENS tokens"
    return [int(shard_ids[0]) for _, shard_ids in chunk_shards(ids, lengths, 0, MIN_SHARD_TOKENS,
                                                               cfg.score.shard_samples)]


KILL_TRAINING_ENV = "TOKENCLEAN_KILL_TRAINING"


class KillAfterCheckpoint:
    """``train.callbacks: [tests.faults:KillAfterCheckpoint]``: SIGKILL one training worker, once.

    ``TOKENCLEAN_KILL_TRAINING=rank:step:marker``: the worker of that rank kills itself
    right after the checkpoint of ``step`` is saved, if ``marker`` does not exist yet
    (it is created first, so the fault happens once across restarts). Killing right
    after a save means a correct resume repeats no step.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _Kill(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                spec = os.environ.get(KILL_TRAINING_ENV)
                if not spec:
                    return
                rank, step, marker = spec.split(":", 2)
                if args.process_index != int(rank) or state.global_step != int(step):
                    return
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


STALL_TRAINING_ENV = "TOKENCLEAN_STALL_TRAINING"


class StallAfterCheckpoint:
    """``train.callbacks: [tests.faults:StallAfterCheckpoint]``: hold a training worker, once.

    ``TOKENCLEAN_STALL_TRAINING=step:marker``: right after the checkpoint of ``step`` is
    saved, the worker writes where it runs (Ray node id, pid) to ``marker`` and sleeps, if
    ``marker`` does not exist yet; a test then kills that worker's node. A resumed attempt
    (on another node) finds the marker and trains on.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _Stall(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                spec = os.environ.get(STALL_TRAINING_ENV)
                if not spec:
                    return
                step, marker = spec.split(":", 1)
                if state.global_step != int(step) or Path(marker).exists():
                    return
                _mark(marker)
                time.sleep(600)

        return _Stall()


def kill_tree(proc) -> None:
    """SIGKILL a driver started with ``subprocess.Popen`` and every process it started, and wait for them:
    a driver *and* its cluster lost at once (where only the driver dies, its watchdog ends the rest)."""
    import psutil

    parent = psutil.Process(proc.pid)
    family = parent.children(recursive=True) + [parent]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def crash_flow_runs_since(started: float) -> int:
    """Mark the Prefect flow runs begun since ``started`` (a time.time()) that a killed driver left RUNNING as
    CRASHED, as Prefect's own crash detection would: the test session's Prefect database is shared, and a test
    that reads every flow run must not find a killed test's run forever "running". Returns how many."""
    import asyncio
    from datetime import datetime

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    since = datetime.fromtimestamp(started, tz=UTC)

    async def crash() -> int:
        n = 0
        async with get_client() as client:
            for run in await client.read_flow_runs():
                if run.state_type and run.state_type.value in ("RUNNING", "PENDING", "SCHEDULED") \
                        and run.created and run.created >= since:
                    await client.set_flow_run_state(run.id, Crashed(message="the test killed its driver"),
                                                    force=True)
                    n += 1
        return n

    return asyncio.run(crash())
