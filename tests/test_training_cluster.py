"""Training as cluster work: data parallel on Ray Train, resumed after a worker is killed,
placed where its resources are, and fed labels only on kept tokens.

Real components throughout: the multi-node test cluster (``tests.conftest.MultiNode``: two
worker nodes, one with a logical GPU), Ray Train with the gloo backend between the nodes,
transformers' Trainer on the tiny pretrained model.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.faults import KILL_TRAINING_ENV
from tokenclean.config import RayConfig
from tokenclean.tasks.train import IGNORE, TrainJob, TrainSample, packing_collator, train_worker, training_table

CFG = {"lr": 5e-3, "batch_size": 16, "per_device_batch_size": 4, "checkpoint_every": 0,
       "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}  # no dropout: runs with different layouts can agree


@pytest.fixture(scope="module")
def samples(tiny, tokenizer):
    from tests.ingest_helpers import ingest

    res = ingest([str(tiny.train)], [], tokenizer, max_length=256, eval_fraction=0.0, n_parts=2, seed=0)
    rng = np.random.default_rng(0)
    rows = res.samples.to_pylist()[:96]
    return [TrainSample(np.array(r["input_ids"], np.int32),
                        np.array(r["response_mask"]) & (rng.random(len(r["input_ids"])) < 0.6)) for r in rows]


@pytest.fixture(scope="module")
def local_ray(multinode, tmp_path_factory):
    """This process as a driver of the multi-node test cluster (two worker nodes of one CPU each,
    so a 2-worker Ray Train group has one worker per node)."""
    import ray

    marker_dir = tmp_path_factory.mktemp("markers")
    env = {"PYTHONPATH": os.environ["PYTHONPATH"], KILL_TRAINING_ENV: f"1:4:{marker_dir / 'killed'}",
           "TRANSFORMERS_VERBOSITY": "error"}
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=multinode.address, runtime_env={"env_vars": env})
    yield marker_dir / "killed"
    ray.shutdown()


def _job(tiny, samples, root: Path, name: str, **cfg) -> TrainJob:
    return TrainJob(str(tiny.model), CFG | cfg, training_table(samples), str(root / name), str(root / f"{name}.ckpt"),
                    key=name, device="cpu", dtype="float32")


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_workers(tiny, samples, local_ray, tmp_path_factory):
    import dataclasses

    import pyarrow.parquet as pq

    from tokenclean.flows.training import data_parallel

    root = tmp_path_factory.mktemp("dp")
    job = _job(tiny, samples, root, "dp2")
    pq.write_table(job.data, root / "train.parquet")  # as the flows hand it: a training set in storage
    job = dataclasses.replace(job, data=str(root / "train.parquet"))
    stats = data_parallel(job, RayConfig(train_workers=2), root / "ray")
    return root / "dp2", stats


def test_two_workers_train_the_same_adapter_as_one(tiny, samples, two_workers, tmp_path):
    """DDP over 2 Ray Train workers (gloo) = 1 worker at the same effective batch of 16 samples."""
    single = train_worker(_job(tiny, samples, tmp_path, "one"))
    path, dp = two_workers
    assert (dp["world_size"], dp["accumulation"], single["world_size"], single["accumulation"]) == (2, 2, 1, 4)
    assert dp["steps"] == single["steps"] == 6
    assert len({p["pid"] for p in dp["placement"]}) == 2  # two processes really trained ...
    assert len({p["node"] for p in dp["placement"]}) == 2  # ... on two nodes (DDP over gloo between raylets)
    # DDP sums the same gradients in another order (micro-batches grouped per worker, then all-reduced).
    # What that order alone does is measured here: one process, the same step split into 8 micro-batches
    # of 2 instead of 4 of 4. Adam divides by sqrt(v), so rounding on a near-zero gradient moves that weight
    # by up to a whole step: measured 3.6e-5 for the re-split and 3.8e-5 for DDP (weights up to 0.1).
    # 4x the re-split's difference leaves room for another CPU's rounding; a real error (a worker's
    # gradient dropped or counted twice, a wrong token count) moves the weights by ~1e-2.
    resplit = train_worker(_job(tiny, samples, tmp_path, "resplit", per_device_batch_size=2))
    assert resplit["accumulation"] == 8
    rounding = _max_diff(_weights(tmp_path / "resplit"), _weights(tmp_path / "one"))
    assert 0 < rounding < 1e-3
    assert _max_diff(_weights(path), _weights(tmp_path / "one")) <= 4 * rounding
    # the losses are float32 means of the same tokens: measured 1e-8 apart
    assert dp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-6)


def test_killed_worker_resumes_from_its_last_checkpoint(tiny, samples, two_workers, local_ray, tmp_path):
    """SIGKILL of rank 1 right after the step-4 checkpoint: Ray Train restarts the group, the
    Trainer resumes at step 4, no step runs twice, and the adapter equals the undisturbed one."""
    from tokenclean.flows.training import data_parallel

    marker = local_ray
    job = _job(tiny, samples, tmp_path, "killed", checkpoint_every=2, callbacks=["tests.faults:KillAfterCheckpoint"])
    stats = data_parallel(job, RayConfig(train_workers=2, train_max_failures=1), tmp_path / "ray")
    assert marker.exists()  # the kill happened
    steps = [json.loads(line) for line in open(tmp_path / "killed.ckpt" / "steps.jsonl")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # each step once, across two attempts
    assert len({s["pid"] for s in steps[:4]} & {s["pid"] for s in steps[4:]}) == 0  # ... in different processes
    assert stats["resumed_from"] == 4 and stats["steps_run"] == 2 and stats["steps"] == 6
    path, _ = two_workers
    assert _max_diff(_weights(tmp_path / "killed"), _weights(path)) < 1e-5


def test_exported_batches_label_only_kept_response_tokens(tiny, samples):
    """Every labelled position of every packed micro-batch is a kept (hence response) token of
    its sample and carries that token; every kept token is labelled exactly once."""
    rng = np.random.default_rng(3)
    table = training_table(samples)
    kept = [s for s in samples if s.label_mask.any()]
    collate = packing_collator()
    feats = table.to_pylist()
    for _ in range(5):
        order = rng.permutation(len(feats))
        labelled = 0
        for i in range(0, len(order), 7):
            idx = order[i : i + 7]
            batch = collate([feats[j] for j in idx])
            cu = batch["cu_seq_lens_q"].tolist()
            labels, ids = batch["labels"][0], batch["input_ids"][0]
            for n, j in enumerate(idx):
                lab = labels[cu[n] : cu[n + 1]].numpy()
                s = kept[j]
                assert np.array_equal(ids[cu[n] : cu[n + 1]].numpy(), s.input_ids)
                assert lab[0] == IGNORE  # never a target across the sample boundary
                on = lab != IGNORE
                assert np.array_equal(on, s.label_mask)  # kept tokens only (prompt tokens are never kept)
                assert np.array_equal(lab[on], s.input_ids[on])
                labelled += int(on.sum())
        assert labelled == sum(int(s.label_mask.sum()) for s in kept)


def test_flow_places_training_and_evaluation_on_the_gpu_node(tiny, multinode, tmp_path):
    """The multi-node cluster: the head (where the flow's driver attaches) has no CPU or GPU, one
    node has a CPU only, the other also a GPU (a logical GPU: this machine has none, so the work
    computes on CPU). Scoring, training and evaluation ask for a GPU and must all run on the GPU node."""
    import ray

    from tokenclean.config import RunConfig
    from tokenclean.flows.cleaning import run
    from tokenclean.tasks import store

    if ray.is_initialized():
        ray.shutdown()
    try:
        cfg = tiny_config(tmp_path, name="placed", mode="fixed", iterations=1, baselines=["global"])
        cfg["model"]["device"] = "cpu"  # the logical GPU has no device behind it
        # a small pool in one shard per model: placement is the point, and every task here
        # queues for the one (logical) GPU
        rows = open(tiny.train).read().splitlines()[:120]
        (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
        cfg["data"] = {"max_length": 256, "paths": [str(tmp_path / "train.jsonl")], "eval_paths": [str(tiny.eval)]}
        cfg["score"] = {"batch_tokens": 4096, "shard_samples": 512}
        cfg["eval"] = {"max_samples": 20}
        cfg["warmup_train"]["epochs"] = 1  # placement is the point here, not a well-trained reference
        cfg["ray"] = {"address": multinode.address, "num_gpus_per_task": 1, "gpus_per_train_worker": 1,
                      "gpus_per_eval_task": 1}
        run(RunConfig.model_validate(cfg))
        con = store.connect(RunConfig.model_validate(cfg).db_path, read_only=True)
        stages = store.stages_since(con, datetime.datetime(1970, 1, 1))
        con.close()
        placed = {(s["stage"], s["name"]): s["detail"] for s in stages if s["stage"] in ("train", "evaluate", "score")}
        assert {k for k in placed if k[0] == "train"} == {("train", "reference"), ("train", "global")}
        assert {k for k in placed if k[0] == "evaluate"} == {("evaluate", n) for n in ("base", "reference", "global")}
        nodes = set()
        for detail in placed.values():
            where = detail["placement"]
            nodes |= {p["node"] for p in where} if isinstance(where, list) else {where["node"]}
        assert nodes == {multinode.nodes["gpu"].node_id}
    finally:
        if ray.is_initialized():
            ray.shutdown()
