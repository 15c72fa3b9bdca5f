"""One rank of a 2-process gloo group training with ``train.strategy: fsdp`` (``tests/test_fsdp.py``).

Usage: python tests/fsdp_child.py JOB.json  (with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set)

The process group is what Ray Train forms for its workers (gloo on CPUs); ``train_worker`` then runs as it
does on a Ray Train worker. ``Probe`` records what the Trainer actually trains: the model it wraps and how
many parameter elements this rank holds.
"""
from __future__ import annotations

import json
import os
import sys

PROBE_ENV = "TOKENCLEAN_TEST_FSDP_PROBE"


class Probe:
    """``train.callbacks: [tests.fsdp_child:Probe]``: at the first step, write this rank's view of the model."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Probe(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kw):
                if state.global_step:
                    return
                wrapped = [type(m).__name__ for m in model.modules() if "FullyShard" in type(m).__name__
                           or type(m).__name__ == "FSDPModule"]
                info = {"rank": args.process_index, "fsdp_modules": len(wrapped),
                        "local_elements": sum(p.numel() for p in model.parameters())}
                with open(f"{os.environ[PROBE_ENV]}.{args.process_index}", "w") as f:
                    json.dump(info, f)

        return _Probe()


def main(job_file: str) -> None:
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from tokenclean.tasks.train import TrainJob, train_worker

    spec = json.loads(open(job_file).read())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        train_worker(TrainJob(spec["base"], spec["cfg"], pq.read_table(spec["data"]), spec["out"], spec["ckpt"],
                              key="fsdp", device="cpu", dtype="float32"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
