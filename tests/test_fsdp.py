"""``train.strategy: fsdp`` on CPU workers: accepted, trains, and learns what one worker learns.

Two ranks of a real gloo process group (the group Ray Train forms on CPUs; ``tests/fsdp_child.py``) run
``train_worker`` with ``strategy: fsdp``, as Ray Train workers do. accelerate applies FSDP only on accelerators
(``AcceleratorState`` turns the FSDP plugin on for multi-GPU/XPU/NPU/... distributed types, not for multi-CPU):
on CPUs the group trains data parallel with every rank holding the whole model, which the probe records. The
adapter must equal one worker's at the same effective batch within the rounding that summation order alone
causes, measured here as the distance between two single-worker runs that differ only in micro-batch size.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.fsdp_child import PROBE_ENV

# no dropout: runs with different layouts can agree; 16 samples, 2 optimiser steps of 8
CFG = {"lr": 5e-3, "batch_size": 8, "per_device_batch_size": 4, "checkpoint_every": 0,
       "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


@pytest.fixture(scope="module")
def table(tiny, tokenizer):
    from tests.ingest_helpers import ingest
    from tokenclean.tasks.train import TrainSample, training_table

    res = ingest([str(tiny.train)], [], tokenizer, max_length=256, eval_fraction=0.0, n_parts=2, seed=0)
    rng = np.random.default_rng(0)
    rows = res.samples.to_pylist()[:16]
    return training_table([TrainSample(np.array(r["input_ids"], np.int32),
                                       np.array(r["response_mask"]) & (rng.random(len(r["input_ids"])) < 0.6))
                           for r in rows])


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _fsdp_group(tiny, table, root, world: int = 2) -> list[dict]:
    import pyarrow.parquet as pq

    pq.write_table(table, root / "data.parquet")
    spec = {"base": str(tiny.model), "data": str(root / "data.parquet"), "out": str(root / "fsdp"),
            "ckpt": str(root / "fsdp.ckpt"),
            "cfg": CFG | {"strategy": "fsdp", "callbacks": ["tests.fsdp_child:Probe"]}}
    (root / "job.json").write_text(json.dumps(spec))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{PROBE_ENV: str(root / "probe")})
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "fsdp_child.py"), str(root / "job.json")],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    return [json.loads((root / f"probe.{rank}").read_text()) for rank in range(world)]


def test_fsdp_trains_the_adapter_one_worker_trains(tiny, table, tmp_path):
    from tokenclean.config import RunConfig
    from tokenclean.tasks.train import TrainJob, train_worker

    assert RunConfig.model_validate({"train": {"strategy": "fsdp"}}).train.strategy == "fsdp"
    probes = _fsdp_group(tiny, table, tmp_path)
    stats = json.loads((tmp_path / "fsdp" / "train.json").read_text())
    assert (stats["world_size"], stats["accumulation"], stats["steps"]) == (2, 1, 2)

    def single(name, per_device):
        train_worker(TrainJob(str(tiny.model), CFG | {"per_device_batch_size": per_device}, table,
                              str(tmp_path / name), str(tmp_path / f"{name}.ckpt"), key=name, device="cpu",
                              dtype="float32"))
        return _weights(tmp_path / name)

    one, other = single("one", 4), single("one-8", 8)
    # rounding from summation order alone (Adam magnifies it on near-zero gradients), and one step's size:
    # Adam moves a weight by about lr per step, and LoRA's B starts at zero, so max |B| is the update's size
    rounding = _max_diff(one, other)
    update = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    tol = 4 * rounding
    assert 0 < tol < 0.05 * update, (rounding, update)  # the bound is far below what a wrong gradient moves
    assert _max_diff(_weights(tmp_path / "fsdp"), one) <= tol
    # what ran: accelerate trains FSDP on accelerators only; on CPUs every rank holds (and trains) the whole model
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny.model).parameters()) + \
        sum(v.numel() for v in one.values())  # the base and the LoRA factors
    assert [p["rank"] for p in probes] == [0, 1]
    assert [(p["fsdp_modules"], p["local_elements"]) for p in probes] == [(0, whole)] * 2, probes
