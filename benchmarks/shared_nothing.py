"""Object storage against a shared filesystem, on the same cluster of worker nodes that share nothing.

The cluster is the tests' ``IsolatedCluster`` (each worker raylet in its own mount namespace, loopback only), the
bucket moto's S3 server in this process. The same run (the tests' tiny model, 120 rows, fixed-model + one
self-evolving iteration) runs ``--repeats`` times in each mode, alternating, each time in a fresh run directory:

* ``shared-fs``: the run directory outside the hidden directory, so every node sees it (no ``storage:``);
* ``object-storage``: the run directory hidden from the workers, ``storage: s3://…``, and the base model in the
  bucket too (``tokenclean publish-model``, once), so the nodes share nothing but the bucket.

Reported: wall time of each run (and the ratio), and what each node fetched from the bucket (``open_dir``'s log:
copies, bytes, seconds; the base model's copies apart). Needs the test extras (moto, boto3, s3fs) and ``unshare``
with private mounts.

    python benchmarks/shared_nothing.py --out /tmp/shared_nothing.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, as the tests run Ray
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _bucket(root: Path) -> list[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port).start()
    credentials = root / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="tc-bench")
    return sorted(env)


MODEL = "s3://tc-bench/models/tiny"


def _config(workdir: Path, data: tuple, name: str, cluster, env_vars: list[str], storage: str | None) -> dict:
    from tests.conftest import tiny_config

    cfg = tiny_config(workdir, name=name, mode="both", iterations=1, baselines=["global"])
    if storage:
        cfg["model"] = {"base": MODEL}
    cfg["data"] = {"max_length": 256, "paths": [str(data[0])], "eval_paths": [str(data[1])], "ingest_workers": 2}
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 16}
    cfg["eval"] = {"max_samples": 20, "max_new_tokens": 0}
    cfg["ray"] = {"address": cluster.address, "env_vars": env_vars}
    if storage:
        cfg["storage"] = storage
    return cfg


def _fetched(cluster, before: dict) -> dict:
    """Per node: the copies it made since ``before`` (``open_dir``'s log read on the node)."""
    from tests.isolated_cluster import node_downloads

    now = cluster.on_each_node(node_downloads)
    out = {}
    for node, log in now.items():
        new = log[len(before.get(node, [])):]
        model = [d for d in new if d["url"] == MODEL]
        out[node[:8]] = {"copies": len(new), "bytes": sum(d["bytes"] for d in new),
                         "seconds": round(sum(d["seconds"] for d in new), 3), "model_copies": len(model),
                         "model_bytes": sum(d["bytes"] for d in model)}
    return out, now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="/tmp/shared_nothing.json")
    args = ap.parse_args()

    from tests.conftest import TINY
    from tests.isolated_cluster import IsolatedCluster, can_isolate
    from tokenclean.config import EmbeddedConfig, RunConfig
    from tokenclean.embedded import EmbeddedSpec, build
    from tokenclean.flows.cleaning import run
    from tokenclean.flows.runtime import prefect_api

    if can_isolate():
        sys.exit(f"cannot isolate nodes here: {can_isolate()}")
    root = Path(tempfile.mkdtemp(prefix="tc-shared-nothing-"))
    tiny = build(EmbeddedSpec.of(EmbeddedConfig(**TINY)), progress=False)
    rows = open(tiny.train).read().splitlines()[:120]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    data = (root / "train.jsonl", Path(tiny.eval))
    env_vars = _bucket(root)
    from tokenclean.tasks.storage import publish_model

    publish_model(tiny.model, MODEL)
    cluster = IsolatedCluster(root / "private", workers=2)
    results, logs = [], {}
    try:
        with prefect_api():
            for i in range(args.repeats):
                for mode in ("shared-fs", "object-storage"):
                    remote = mode == "object-storage"
                    workdir = (root / "private" if remote else root / "visible") / f"runs-{i}"
                    cfg = _config(workdir, data, f"{mode}-{i}", cluster, env_vars,
                                  "s3://tc-bench/runs" if remote else None)
                    t0 = time.perf_counter()
                    run(RunConfig.model_validate(cfg))
                    seconds = time.perf_counter() - t0
                    fetched, logs = _fetched(cluster, logs)
                    results.append({"mode": mode, "repeat": i, "seconds": round(seconds, 1), "fetched": fetched})
                    print(json.dumps(results[-1]), flush=True)
    finally:
        cluster.shutdown()
    _report(results, args.out)


def _report(results: list[dict], out: str) -> None:
    print("\n| repeat | mode | wall s | vs shared-fs | per node: copies (of the model) / MB / s fetched |")
    print("|---:|---|---:|---:|---|")
    for r in results:
        base = next(x for x in results if x["repeat"] == r["repeat"] and x["mode"] == "shared-fs")["seconds"]
        nodes = "; ".join(f"{n}: {f['copies']} ({f['model_copies']}) / {f['bytes'] / 1e6:.2f} / {f['seconds']:.2f}"
                          for n, f in r["fetched"].items())
        print(f"| {r['repeat']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {nodes or '-'} |")
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
