"""Place LoRA training on the cluster: Ray Train workers, data parallel, restarted from checkpoints.

The driver (the flow process) never loads the model nor holds a selection: it streams the
training set (token ids + selection labels) from the store into a Parquet file in the run's
storage, which the workers read, and places the work with declared resources (``ray.cpus_per_train_worker`` /
``ray.gpus_per_train_worker``): one worker is a Ray task; ``ray.train_workers`` > 1 is a
``TorchTrainer`` (Ray Train) worker group. Ray Train forms the
process group (NCCL on GPUs, gloo on CPUs), and each worker runs
``tasks.train.train_worker``: transformers' ``Trainer``, which sees the process group
and trains DDP (or FSDP with ``train.strategy: fsdp``). A worker that dies makes Ray
Train restart the group (``ray.train_max_failures``); the restarted workers resume
from the newest complete Trainer checkpoint under the job's checkpoint directory, as
a re-run of the flow does.

The finished adapter is written by rank 0 to ``adapters/<train key>`` and checkpoints
to ``checkpoints/<train key>/<layout>``: in the run directory (shared by every node), or, with
``storage:`` an object-storage URL, in the bucket (``tasks/remote_checkpoints.py``; nodes then
share nothing else). Statistics are rank 0's ``train.json`` beside the adapter (Ray Train V2
keeps reported metrics only with a checkpoint).

With ``ray.enabled: false`` the same worker function runs in this process (one worker).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa

from tokenclean.config import RayConfig
from tokenclean.tasks import storage
from tokenclean.tasks.train import TrainJob, train_worker


def _ray_train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    train_worker(config["job"])


def submit_training(job: TrainJob, ray_cfg: RayConfig, train_dir: str):
    """Start training ``job`` where the config places it; a future of its statistics (with ``placement``).

    * Ray off: in this process (the future is done on return).
    * One worker: a Ray task (the ``train-adapter`` Prefect task submitted to the flow's
      Ray task runner) with the declared CPUs/GPUs, so independent adapters train at the
      same time wherever the cluster has room. No process group is needed, and the
      task lands on a warm Ray worker: starting a Ray Train worker group costs ~20 s on
      a 2-core machine, which is most of a small run. Ray re-executes a task whose
      worker died; the new attempt resumes from the last checkpoint.
    * Several workers: Ray Train (``data_parallel``); a group spans the workers it asks
      for, so groups train one after another (the future is done on return).
    """
    from tokenclean.flows.runtime import run_now, submit_placed
    from tokenclean.tasks.steps import train_task

    if not ray_cfg.enabled and ray_cfg.train_workers != 1:
        raise ValueError(f"ray.train_workers = {ray_cfg.train_workers} needs Ray (ray.enabled: true)")
    if ray_cfg.train_workers == 1:
        # named by stage and variant on the Prefect timeline (the label: ``global``, ``self-evolving@2``)
        task = train_task.with_options(task_run_name=f"train/{job.label}")
        return submit_placed(task, ray_cfg, ray_cfg.cpus_per_train_worker, ray_cfg.gpus_per_train_worker, job,
                             keep_worker=True)
    return run_now(data_parallel, job, ray_cfg, train_dir)


def train_run_name(key: str) -> str:
    """Ray Train's name for the group training adapter ``key``: its state is under ``<ray_train dir>/<name>``."""
    return f"train-{key}"


def data_parallel(job: TrainJob, ray_cfg: RayConfig, train_dir: str) -> dict:
    """``ray_cfg.train_workers`` Ray Train workers, DDP (or FSDP) over their process group."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = ray_cfg.gpus_per_train_worker
    resources = {"CPU": ray_cfg.cpus_per_train_worker} | ({"GPU": gpus} if gpus else {})
    if isinstance(job.data, pa.Table):  # tests hand a table; flows a training set in storage
        job = dataclasses.replace(job, data=ray.put(job.data))
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=ray_cfg.train_workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RunConfig(name=train_run_name(job.key), **_ray_train_storage(train_dir),
                             failure_config=FailureConfig(max_failures=ray_cfg.train_max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return storage.read_json(storage.join(job.out_dir, "train.json"))


def _ray_train_storage(train_dir: str) -> dict:
    """``RunConfig`` storage for Ray Train: a local path, or object storage through the fsspec filesystem the
    rest of the run uses (pyarrow's wrapper of it), so its endpoint and credentials settings apply here too."""
    if not storage.is_remote(train_dir):
        return {"storage_path": str(Path(train_dir).resolve())}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(train_dir)
    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}
