"""Multi-node for real: the pipeline against a Ray cluster of several nodes, by address, and the
loss of a node (or of the driver) while it works.

The cluster is ``tests.conftest.MultiNode``: a head with no CPUs and two worker nodes, each
its own raylet (one has a logical GPU). Every disturbed run is compared with an undisturbed
run of the same config: token losses (by row id and position), the selection (its kept
tokens), the adapters (weights) and the evaluation metrics, with the tolerances of the rest
of the suite. Runs that are disturbed run as ``tokenclean run`` subprocesses (a driver the
test can kill, or that keeps running while the test kills a node under it).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.faults import BACKEND, FAULT_ENV, STALL_TRAINING_ENV, kill_tree, shard_first_ids
from tests.run_process import finish_run, start_run, wait_for_marker
from tests.run_snapshot import assert_same, nodes_of, snapshot
from tokenclean.config import RunConfig


@pytest.fixture(scope="module")
def data(small_pool):
    return small_pool


def _cfg(workdir: Path, data, multinode, name: str, **over) -> dict:
    train, evals = data
    cfg = tiny_config(workdir, name=name, mode="fixed", iterations=1, baselines=["global"])
    cfg["data"] = {"max_length": 256, "paths": [str(train)], "eval_paths": [str(evals)]}
    # small shards: the pool's 60-odd samples make 4 shards per model, enough to spread over the nodes
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16, "backend": BACKEND}
    cfg["eval"] = {"max_samples": 20, "max_new_tokens": 0}
    cfg["ray"] = {"address": multinode.address}
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def undisturbed(tiny, data, multinode, tmp_path_factory):
    """The config every disturbed run uses, run once without faults, in this process, by address."""
    from tokenclean.flows.cleaning import run

    config = _cfg(tmp_path_factory.mktemp("mn-calm"), data, multinode, "calm")
    config["data"]["ingest_workers"] = 2  # the disturbed runs ingest in their driver: the same dataset
    cfg = RunConfig.model_validate(config)
    run(cfg)
    return snapshot(cfg)


def test_scoring_spreads_over_the_nodes_of_a_cluster_given_by_address(undisturbed, multinode):
    scoring = [d for d in undisturbed["placement"] if "samples_scored" in d]
    assert len(scoring) == 2  # base and reference
    used = nodes_of(scoring)
    assert len(used) >= 2, used  # shards of one stage ran on more than one node
    assert used <= set(multinode.node_ids().values())  # and never on the head (no CPUs there)
    # every model was loaded once per worker process that scored with it, on whichever node
    for d in scoring:
        assert sum(d["workers"].values()) == len(d["workers"])


def test_ingest_reads_its_input_splits_on_the_worker_nodes(undisturbed, multinode):
    """With ``data.ingest_workers: 2`` the input splits are Ray tasks that read the files themselves, on the
    worker nodes: never in the driver, which attached at the head (no CPUs there). Which worker node takes
    which split is Ray's choice (spread, but the nodes are busy warming up while the driver ingests). The
    dataset equals the one every disturbed run ingests in its driver: their comparisons with this run are
    by sample id and content."""
    (ingest,) = undisturbed["ingest"]
    assert ingest["splits"] >= 2 and ingest["splits_reused"] == 0
    used = nodes_of([ingest])
    assert used and used <= set(multinode.node_ids().values()), used


def test_flow_runs_link_the_clusters_ray_dashboard(undisturbed, multinode):
    """The Prefect UI leads to the Ray dashboard of the cluster the flow ran on (a link artifact)."""
    import asyncio
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tokenclean.flows.runtime import artifact_key

    key = artifact_key("calm", "ray-dashboard")  # the undisturbed run's name

    async def links():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    found = asyncio.run(links())
    assert found, f"no {key} artifact"
    link = found[-1].data
    assert f":{multinode.dashboard_port}" in link
    url = link[link.index("(") + 1 : link.rindex(")")] if "](" in link else link
    # the dashboard answers with the cluster's token (Ray's own header helper), and refuses without it
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{url}/api/version", timeout=30)
    request = urllib.request.Request(f"{url}/api/version", headers=get_auth_headers_if_auth_enabled({}))
    assert json.loads(urllib.request.urlopen(request, timeout=30).read())["ray_version"]


def test_nodes_lost_while_scoring_and_while_training_the_run_finishes_and_equals_undisturbed(
        tiny, data, multinode, undisturbed, tmp_path):
    """One run loses two nodes. A shard of the base model stalls on some node, which is killed (raylet and
    workers) and replaced: Ray re-executes the lost task elsewhere. Then the global adapter's training stalls
    right after its step-1 checkpoint, and its node is killed too: Ray re-executes the training task on another
    node and the Trainer resumes at step 1 from the shared run directory (no step runs twice). The run finishes
    with clean integrity and the same losses, selection, adapters and metrics as the undisturbed run."""
    cfg = _cfg(tmp_path, data, multinode, "lost-nodes")
    cfg["train"] = dict(cfg["train"], checkpoint_every=1, callbacks=["tests.faults:StallAfterCheckpoint"])
    firsts = shard_first_ids(RunConfig.model_validate(cfg), [1])
    scoring, training = tmp_path / "stalled-scoring", tmp_path / "stalled-training"
    proc, _ = start_run(cfg, tmp_path, {FAULT_ENV: f"stall:base:{firsts[1]}:{scoring}",
                                        STALL_TRAINING_ENV: f"1:{training}"})
    try:
        in_scoring = wait_for_marker(scoring, proc)
        lost = multinode.kill(in_scoring["node"])
        assert in_scoring["node"] not in multinode.node_ids().values()  # the node that held the shard is gone
        in_training = wait_for_marker(training, proc)
        multinode.kill(in_training["node"])
        finish_run(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = snapshot(RunConfig.model_validate(cfg))
    assert_same(got, undisturbed)  # the lost shard was scored again elsewhere: integrity is clean
    base = next(d for d in got["placement"] if d.get("model") == "base")
    assert {p["node"] for p in base["placement"]} - {in_scoring["node"]}, f"{lost} node's shard never ran elsewhere"
    train = next(d for d in got["placement"] if d.get("key") and d.get("resumed_from") is not None)
    assert train["resumed_from"] == 1 and train["steps"] == train["steps_run"] + 1
    assert {p["node"] for p in train["placement"]} != {in_training["node"]}  # finished elsewhere


def test_driver_killed_mid_scoring_then_rerun_resumes(tiny, data, multinode, undisturbed, tmp_path):
    """The driver (the flow process, attached to the cluster) is SIGKILLed mid-scoring while the
    cluster keeps running; a second driver on the same database is refused while the first holds
    it; the re-run resumes: finished shards are not scored again, integrity is clean, and the
    results equal the undisturbed run's."""
    cfg = _cfg(tmp_path, data, multinode, "driver-killed")
    firsts = shard_first_ids(RunConfig.model_validate(cfg), [1])
    marker = tmp_path / "stalled"
    env = {FAULT_ENV: f"stall:base:{firsts[3]}:{marker}"}
    proc, cmd = start_run(cfg, tmp_path, env)
    shards = tmp_path / "driver-killed" / "shards"
    try:
        wait_for_marker(marker, proc)
        deadline = time.monotonic() + 300
        while len(list(shards.glob("*/*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        second = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "database busy" in second.stderr, second.stderr[-2000:]
    finally:
        kill_tree(proc)
    n_before = len(list(shards.glob("*/*.parquet")))
    assert n_before >= 2
    done = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = snapshot(RunConfig.model_validate(cfg))
    assert_same(got, undisturbed)
    base = [d for d in got["placement"] if d.get("model") == "base"]
    resumed = base[-1]
    assert resumed["samples_scored"] < resumed["samples_total"]  # finished shards were not scored again
    assert resumed["samples_scored"] + resumed["samples_skipped"] + resumed["samples_recovered"] == \
        resumed["samples_total"]
