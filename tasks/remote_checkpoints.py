"""Trainer checkpoints kept in object storage, for training nodes that share no filesystem.

The Trainer writes its checkpoints to this node's disk; after each save every rank uploads what it wrote and rank 0
commits the checkpoint's manifest (``storage.commit_dir``), so a checkpoint in the bucket is whole or ignored. A
restarted worker, on this node or another, resumes from the newest committed one. Hand-written rather than Ray
Train's checkpoint persistence: one adapter trains as a plain Ray task (no Ray Train session to report to: 20 s
cheaper per adapter), and both paths keep one checkpoint format, the Trainer's own.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from tokenclean.tasks import keys, storage

_RNG = re.compile(r"rng_state(_\d+)?\.pth")
KEEP = 2  # committed checkpoints kept in storage: the Trainer's save_total_limit (tasks/train.py)


def local_dir(url: str, rank: int) -> Path:
    """This rank's working directory for the checkpoints of ``url``, emptied: what is resumed comes from storage.
    One per rank: ranks on one node (or sharing a node cache) never write into each other's."""
    path = storage.node_cache() / "checkpoints" / keys.digest("checkpoints", url) / f"rank-{rank}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _checkpoints(url: str, pattern: str) -> list[tuple[int, str]]:
    """(step, name) of the checkpoints under ``url`` with a ``pattern`` entry, newest first."""
    fs, p = storage.filesystem(url)
    steps = []
    for found in fs.glob(f"{p.rstrip('/')}/checkpoint-*/{pattern}"):
        name = found.rstrip("/").split("/")[-2]
        if name.removeprefix("checkpoint-").isdigit():
            steps.append((int(name.removeprefix("checkpoint-")), name))
    return sorted(set(steps), reverse=True)


def newest(url: str) -> str | None:
    """A local copy of the newest committed checkpoint under ``url`` (None: start fresh)."""
    for _, name in _checkpoints(url, storage.COMPLETE):
        try:
            return storage.open_dir(storage.join(url, name))
        except OSError:  # a committed checkpoint that no longer matches its manifest: the next older one
            continue
    return None


def upload_callback(url: str, rank: int, world: int):
    """A ``TrainerCallback`` that puts each checkpoint the Trainer saves into ``url`` and commits it."""
    import torch
    from transformers import TrainerCallback

    class Upload(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            # rank 0 writes the weights and optimiser; every rank its own RNG state (``rng_state.pth`` alone)
            own = {f"rng_state_{rank}.pth"} | ({"rng_state.pth"} if rank == 0 else set())
            mine = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file()
                          and (f.name in own if _RNG.fullmatch(f.name) else rank == 0))
            part = storage.upload_files(local, storage.join(url, name), mine)
            parts = [part]
            if world > 1:
                parts = [None] * world
                torch.distributed.all_gather_object(parts, part)
            if rank == 0:
                storage.commit_dir(storage.join(url, name), {k: v for p in parts for k, v in p.items()})
                _prune(url, state.global_step)
            return control

    return Upload()


def _prune(url: str, step: int) -> None:
    """Keep the newest ``KEEP`` committed checkpoints up to ``step``, as the Trainer does on its disk: older ones,
    and uncommitted uploads older than ``step`` (an attempt killed mid-upload), are removed, manifest first."""
    committed = [s for s, _ in _checkpoints(url, storage.COMPLETE) if s <= step][:KEEP]
    for s, name in _checkpoints(url, "*"):
        if s < step and s not in committed:
            storage.remove(storage.join(url, name, storage.COMPLETE))
            storage.remove_tree(storage.join(url, name))
