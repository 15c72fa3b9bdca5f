"""Multi-node with no shared filesystem: the whole run through object storage.

The worker nodes (``tests.isolated_cluster``) see neither the driver's run directory nor each other's files; the
only thing shared is a bucket on a real S3-compatible endpoint (moto's server, loopback). The base model and the
input files lie outside the hidden directory, as an image or a node-local model cache puts them on every node.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.faults import STALL_TRAINING_ENV
from tests.isolated_cluster import IsolatedCluster, can_isolate, node_downloads
from tests.run_process import finish_run, start_run, wait_for_marker
from tests.run_snapshot import assert_same, snapshot
from tokenclean.config import RunConfig
from tokenclean.tasks import store

pytestmark = pytest.mark.skipif(can_isolate() is not None, reason=f"no private mount namespaces: {can_isolate()}")

BUCKET = "tc-nothing-shared"
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
    cfg["storage"] = f"s3://{BUCKET}/runs"
    cfg["data"]["ingest_workers"] = 2  # input splits read and parts written on the worker nodes
    cfg["ray"] = {"address": cluster.address, "env_vars": bucket}
    return cfg


@pytest.fixture(scope="module")
def shared_nothing(cluster, data, bucket, tmp_path_factory):
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


def _placed_on(snap: dict) -> set[str]:
    out = set()
    for d in snap["placement"]:
        where = d.get("placement") or []
        out |= {p["node"] for p in (where if isinstance(where, list) else [where])}
    return out


def test_a_run_on_nodes_that_share_nothing_equals_the_local_run(shared_nothing, local_run, cluster):
    """Ingest, scoring, training (one node lost mid-way), evaluation and a self-evolving iteration on worker nodes
    that share only the bucket: the same losses, kept tokens, adapters and metrics as the local run. The lost
    training resumed at step 1 from the bucket on a node that never saw that checkpoint (no step ran twice). The
    driver's run directory holds its database alone; each node fetched each adapter it used once."""
    import s3fs

    cfg, snap, downloads, lost = shared_nothing
    assert_same(snap, local_run)
    train = next(d for d in snap["placement"] if d.get("key") and d.get("resumed_from") is not None)
    assert train["resumed_from"] == 1 and train["steps"] == train["steps_run"] + 1
    assert lost not in {p["node"] for p in train["placement"]}
    placed = _placed_on(snap)
    assert lost in placed and placed - {lost} <= set(cluster.node_ids()), (placed, lost)
    assert {p.name for p in cfg.run_dir.iterdir() if p.name != "ingest"} == {store.DB_FILE, "config.yaml"}
    assert not any((cfg.run_dir / "ingest").rglob("*.parquet"))  # staged parts are not kept here
    fetched = [d["dir"] for node in downloads.values() for d in node]
    assert fetched, downloads  # scoring, continued training and evaluation read adapters from the bucket ...
    for node, got in downloads.items():  # ... each one once per node
        assert len({d["dir"] for d in got}) == len(got), (node, got)
        assert all(d["url"].startswith(f"s3://{BUCKET}/runs/nothing-shared-") for d in got), got
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
