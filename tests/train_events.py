"""Training events recorded by the trainings themselves, for tests that assert order, not seconds.

``train.callbacks: [tests.train_events:Rendezvous]``: every training appends ``begin`` and ``end`` to
``train-events.jsonl`` in its run directory (one ``O_APPEND`` write per line, so the file's order is the order
in which the events happened, across processes), and at ``begin`` it holds until a second training has begun.
Where trainings run at the same time the hold is brief (the second begins while the first waits); where they
run one after another the first waits in vain and fails after ``WAIT_S``, so the run fails: a test of
concurrency that cannot pass by luck of timing, and cannot pass at all without concurrency.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

EVENTS = "train-events.jsonl"
WAIT_S = 180


def run_dir_of(output_dir: str) -> Path:
    """The run directory of a training's checkpoint directory (``<run>/checkpoints/<train key>/<layout>``)."""
    return Path(output_dir).parents[2]


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _append(output_dir: str, event: str) -> None:
    line = json.dumps({"event": event, "key": Path(output_dir).parent.name, "pid": os.getpid()}) + "\n"
    fd = os.open(run_dir_of(output_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Rendezvous:
    def __new__(cls):
        from transformers import TrainerCallback

        class _Rendezvous(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if args.process_index:
                    return  # rank 0 speaks for its worker group
                _append(args.output_dir, "begin")
                deadline = time.monotonic() + WAIT_S
                while len({e["key"] for e in read_events(run_dir_of(args.output_dir)) if e["event"] == "begin"}) < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no other training began within {WAIT_S} s of this one: "
                                           "the trainings run one at a time")
                    time.sleep(0.05)

            def on_train_end(self, args, state, control, **kw):
                if not args.process_index:
                    _append(args.output_dir, "end")

        return _Rendezvous()
