"""Multi-node with no shared filesystem: the whole run through object storage.

The worker nodes (``tests.isolated_cluster``) see neither the driver's run directory nor each other's files; the
only thing shared is a bucket on a real S3-compatible endpoint (moto's server, loopback). The base model is in the
bucket too (``tokenclean publish-model``); the input files lie outside the hidden directory, as an image puts them
on every node (only ingest reads them).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.faults import STALL_TRAINING_ENV
from tests.isolated_cluster import IsolatedCluster, can_isolate, node_downloads
from tests.run_process import finish_run, start_run, wait_for_marker
from tests.run_snapshot import assert_same, nodes_of, snapshot
from tokenclean.config import RunConfig
from tokenclean.tasks import store

pytestmark = pytest.mark.skipif(can_isolate() is not None, reason=f"no private mount namespaces: {can_isolate()}")

BUCKET = "tc-nothing-shared"
MODEL = f"s3://{BUCKET}/models/tiny"
ADAPTERS = ("reference", "global", "self-evolving@1")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The bucket, with credentials from a credentials file (the standard chain); the non-secret names of the
    settings reach the workers through ``ray.env_vars``."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    credentials = tmp_path_factory.mktemp("sn-aws") / "credentials"
    credentials.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
    credentials.chmod(0o600)
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield sorted(env)
    server.stop()


@pytest.fixture(scope="module")
def data(small_pool):
    return small_pool


def _cfg(workdir: Path, data, name: str, mode: str = "both") -> dict:
    train, evals = data
    cfg = tiny_config(workdir, name=name, mode=mode, iterations=1, baselines=["global"])
    cfg["data"] = {"max_length": 256, "paths": [str(train)], "eval_paths": [str(evals)]}
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16}  # 4 shards per model: both nodes score
    cfg["eval"] = {"max_samples": 20, "max_new_tokens": 0}
    return cfg


@pytest.fixture(scope="module")
def local_run(tiny, data, tmp_path_factory):
    """The same run on the local single-node default: a local Ray cluster, the run directory for everything."""
    from tokenclean.flows.cleaning import run

    cfg = RunConfig.model_validate(_cfg(tmp_path_factory.mktemp("sn-local"), data, "local"))
    run(cfg)
    return snapshot(cfg, ADAPTERS)


@pytest.fixture(scope="module")
def cluster(local_run, tmp_path_factory):
    nodes = IsolatedCluster(tmp_path_factory.mktemp("sn-private"), workers=2)
    yield nodes
    nodes.shutdown()


def _remote_cfg(cluster, data, bucket, name: str, mode: str = "both") -> dict:
    cfg = _cfg(cluster.private / "runs", data, name, mode)  # the run directory: hidden from every worker node
    cfg["model"] = {"base": MODEL}  # the embedded model's files, published to the bucket
    cfg["storage"] = f"s3://{BUCKET}/runs"
    cfg["data"]["ingest_workers"] = 2  # input splits read and parts written on the worker nodes
    cfg["ray"] = {"address": cluster.address, "env_vars": bucket}
    return cfg


@pytest.fixture(scope="module")
def published(bucket, tiny) -> str:
    """The tiny base model in the bucket; its weights hash."""
    from tokenclean.tasks.storage import publish_model

    return publish_model(tiny.model, MODEL)


@pytest.fixture(scope="module")
def shared_nothing(cluster, data, bucket, published, tmp_path_factory):
    """The run on the isolated nodes, as ``tokenclean run``, and the loss of a node in it: the global adapter's
    training stops on its node right after its step-1 checkpoint reached the bucket, and that node is killed (an
    empty one joins)."""
    cfg = _remote_cfg(cluster, data, bucket, "nothing-shared")
    cfg["train"] = dict(cfg["train"], checkpoint_every=1, callbacks=["tests.faults:StallAfterCheckpoint"])
    here = tmp_path_factory.mktemp("sn-driver")  # outside the hidden directory: the test's own files
    marker = here / "stalled"
    proc, _ = start_run(cfg, here, {STALL_TRAINING_ENV: f"1:{marker}"})
    try:
        lost = wait_for_marker(marker, proc)["node"]
        cluster.kill_worker(lost)
        finish_run(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_cfg = RunConfig.model_validate(cfg)
    return run_cfg, snapshot(run_cfg, ADAPTERS), cluster.on_each_node(node_downloads), lost


def test_a_run_on_nodes_that_share_nothing_equals_the_local_run(shared_nothing, local_run, cluster):
    """Ingest, scoring, training (one node lost mid-way), evaluation and a self-evolving iteration on worker nodes
    that share only the bucket: the same losses, kept tokens, adapters and metrics as the local run. The lost
    training resumed at step 1 from the bucket on a node that never saw that checkpoint (no step ran twice). The
    driver's run directory holds its database alone; each node fetched the base model and each adapter it used
    once."""
    import s3fs

    cfg, snap, downloads, lost = shared_nothing
    assert_same(snap, local_run)
    train = next(d for d in snap["placement"] if d.get("key") and d.get("resumed_from") is not None)
    assert train["resumed_from"] == 1 and train["steps"] == train["steps_run"] + 1
    assert lost not in {p["node"] for p in train["placement"]}
    placed = nodes_of(snap["placement"])
    assert lost in placed and placed - {lost} <= set(cluster.node_ids()), (placed, lost)
    assert {p.name for p in cfg.run_dir.iterdir() if p.name != "ingest"} == {store.DB_FILE, "config.yaml"}
    assert not any((cfg.run_dir / "ingest").rglob("*.parquet"))  # staged parts are not kept here
    fetched = [d["dir"] for node in downloads.values() for d in node]
    assert fetched, downloads  # every stage read the base model, and adapters, from the bucket ...
    for node, got in downloads.items():  # ... each one once per node
        assert len({d["dir"] for d in got}) == len(got), (node, got)
        assert all(d["url"] == MODEL or d["url"].startswith(f"s3://{BUCKET}/runs/nothing-shared-") for d in got)
        assert [d["url"] for d in got].count(MODEL) == (len(got) > 0), (node, got)  # work there loaded the base
    fs = s3fs.S3FileSystem()
    con = store.connect(cfg.db_path, read_only=True)
    run_id, loaded = store.run_id(con), con.execute("SELECT count(*) FROM shards_done").fetchone()[0]
    con.close()
    written = fs.glob(f"{BUCKET}/runs/nothing-shared-{run_id}/shards/*/shard-*.parquet")
    assert len(written) == loaded > 0  # one object per loaded shard, under the run's id
    assert not fs.glob(f"{BUCKET}/runs/*/checkpoints/**")  # recorded adapters leave no checkpoints behind
    assert not fs.glob(f"{BUCKET}/runs/**/*.tmp*")


def test_fresh_nodes_reuse_every_stored_result_by_key(shared_nothing, cluster, data, bucket):
    """Every worker node is replaced by an empty one and the run is repeated: everything is found by its key,
    nothing is computed again and no node downloads anything."""
    from tokenclean.flows.cleaning import run

    cfg, snap, *_ = shared_nothing
    con = store.connect(cfg.db_path, read_only=True)
    stages = con.execute("SELECT count(*) FROM stage_log").fetchone()[0]
    con.close()
    cluster.replace_all()
    run(cfg)
    con = store.connect(cfg.db_path, read_only=True)
    assert con.execute("SELECT count(*) FROM stage_log").fetchone()[0] == stages  # no stage ran
    con.close()
    assert_same(snapshot(cfg, ADAPTERS), snap)
    assert cluster.on_each_node(node_downloads) == {node: [] for node in cluster.node_ids()}


def test_two_training_workers_lose_a_node_and_resume_from_the_bucket(cluster, bucket, published,
                                                                    tiny, tokenizer, data, tmp_path):
    """Data-parallel training (2 Ray Train workers, one per node) with its checkpoints, Ray Train's run state and
    the adapter in the bucket: the node of a rank that just committed its step-2 checkpoint is killed, Ray Train
    restarts the group on the surviving node and a new empty one, and training resumes at step 2 from the bucket.
    The adapter equals one process training the same rows (to DDP's summation order)."""
    import threading

    import pyarrow.parquet as pq
    import ray
    import s3fs
    from safetensors.torch import load_file

    from tests.ingest_helpers import ingest
    from tokenclean.config import RayConfig
    from tokenclean.flows.training import data_parallel, train_run_name
    from tokenclean.tasks.train import TrainJob, TrainSample, train_worker, training_table

    rows = ingest([str(data[0])], [], tokenizer, max_length=256, eval_fraction=0.0, n_parts=1, seed=0)
    rng = np.random.default_rng(0)
    samples = [TrainSample(np.array(r["input_ids"], np.int32),
                           np.array(r["response_mask"]) & (rng.random(len(r["input_ids"])) < 0.6))
               for r in rows.samples.to_pylist()[:64]]
    cfg = {"lr": 5e-3, "batch_size": 16, "per_device_batch_size": 4, "checkpoint_every": 1,
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    root = f"s3://{BUCKET}/two-workers"
    fs = s3fs.S3FileSystem()
    with fs.open(f"{BUCKET}/two-workers/train.parquet", "wb") as f:
        pq.write_table(training_table(samples), f)
    marker = tmp_path / "stalled"
    job = TrainJob(MODEL, cfg | {"callbacks": ["tests.faults:StallAfterCheckpoint"]}, f"{root}/train.parquet",
                   f"{root}/adapter", f"{root}/checkpoints", key="dp2", device="cpu", dtype="float32",
                   base_weights=published)
    env = {k: os.environ[k] for k in bucket} | {STALL_TRAINING_ENV: f"2:{marker}", "TRANSFORMERS_VERBOSITY": "error"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="ERROR")
    got = {}

    def train():
        try:
            got["stats"] = data_parallel(job, RayConfig(train_workers=2, train_max_failures=1), f"{root}/ray_train")
        except BaseException as e:  # noqa: BLE001 (reported by the test below)
            got["error"] = e

    try:
        training = threading.Thread(target=train, daemon=True)
        training.start()
        while not (marker.exists() and marker.read_text()):
            assert training.is_alive(), got
            time.sleep(0.2)
        lost = json.loads(marker.read_text())["node"]
        cluster.kill_worker(lost)
        training.join(timeout=300)
    finally:
        ray.shutdown()
    assert "stats" in got, got
    stats = got["stats"]
    assert stats["world_size"] == 2 and stats["resumed_from"] == 2 and stats["steps_run"] == stats["steps"] - 2
    assert lost not in {p["node"] for p in stats["placement"]}
    assert len({p["node"] for p in stats["placement"]}) == 2
    # Ray Train kept its run state where the flow removes it once the adapter is recorded; of the checkpoints of
    # steps 1-4 the bucket keeps the newest two, as the Trainer does on a disk
    assert fs.glob(f"{BUCKET}/two-workers/ray_train/{train_run_name('dp2')}/**")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/two-workers/checkpoints")) == [
        "checkpoint-3", "checkpoint-4"]
    single = train_worker(TrainJob(str(tiny.model), cfg, training_table(samples), str(tmp_path / "one"),
                                   str(tmp_path / "one.ckpt"), key="one", device="cpu", dtype="float32"))
    assert single["steps"] == stats["steps"] == 4
    with fs.open(f"{BUCKET}/two-workers/adapter/adapter_model.safetensors", "rb") as f:
        (tmp_path / "dp2.safetensors").write_bytes(f.read())
    dp, one = load_file(tmp_path / "dp2.safetensors"), load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert dp.keys() == one.keys()
    # tests/test_training_cluster.py measures DDP's order of summation against one process: 3.8e-5 (weights up
    # to 0.1); a gradient lost or counted twice, or a resume from the wrong step, moves weights by ~1e-2
    assert max(float((dp[k] - one[k]).abs().max()) for k in dp) < 2e-4
