"""LoRA SFT that learns only from selected tokens, on transformers' ``Trainer``.

What is ours and why (everything else is the Hugging Face stack):

* **Labels carry the selection.** ``labels[i] = input_ids[i]`` where token ``i`` was kept
  and -100 everywhere else (prompt tokens, dropped tokens), so an exported batch can be
  checked on its own. Samples with no kept token contribute nothing and are dropped.
* **Padding-free packing.** ``DataCollatorWithFlattening`` concatenates a micro-batch into
  one row with ``position_ids`` restarting per sample and a -100 label at each sample's
  first position (so no token is predicted across a sample boundary). Attention is the
  project's block-diagonal varlen attention (``tasks/packing.py``: PyTorch's flash varlen
  kernel on CUDA, per-sample SDPA elsewhere), the same one scoring uses.
* **Loss = token mean over the kept tokens of an optimiser step.** ``compute_loss`` runs the
  decoder, then ``lm_head`` only at kept positions (the tokens x vocab logits are never
  built), sums the cross-entropy, each token's times its weight (the ``weighted`` selection's
  ``weights`` column; 1.0 without one, the same arithmetic, so all-1 weights train exactly
  as no weights), and divides by ``num_items_in_batch``: the Trainer's count
  of labelled tokens over all micro-batches of the step and, with
  ``average_tokens_across_devices``, over all data-parallel workers. Dropping tokens
  therefore changes *what* is learned, not the per-token learning rate, and the result
  does not depend on how the batch is split into micro-batches or workers. Weights average
  1 over the pool, so a weighted run keeps full's per-token learning rate on average.
* **Checkpoints** are the Trainer's own (adapter, optimiser, scheduler, RNG, step), written
  every ``checkpoint_every`` steps under a directory keyed by the training key and the
  execution layout; a restarted worker group or a re-run resumes from the newest complete
  one (``resume_checkpoint``) and the Trainer skips the batches already consumed.

``train_worker`` runs unchanged on each Ray Train worker (``flows/training.py``: DDP over
the workers' process group, or FSDP) or in-process when Ray is off.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from tokenclean.config import TrainConfig
from tokenclean.tasks import keys, remote_checkpoints, storage
from tokenclean.tasks.packing import VARLEN_ATTN, attn_implementation, register_varlen_attention
from tokenclean.tasks.placement import use_assigned_cpus, where
from tokenclean.tasks.score import decoder_and_head, numerics, resolve_device, resolve_dtype

IGNORE = -100


@dataclass
class TrainSample:
    input_ids: np.ndarray
    label_mask: np.ndarray  # bool: tokens the loss is computed on
    weights: np.ndarray | None = None  # float32 per token, 0 where not labelled; None: every kept token weighs 1


def labels_of(sample: TrainSample) -> np.ndarray:
    """HF-convention (unshifted) labels: the token where it is kept, -100 elsewhere."""
    return np.where(sample.label_mask, sample.input_ids.astype(np.int64), IGNORE).astype(np.int32)


TRAINING_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
# A weighted selection's training rows: a per-token loss weight beside the labels (0 where the label is -100).
WEIGHTED_TRAINING_SCHEMA = TRAINING_SCHEMA.append(pa.field("weights", pa.list_(pa.float32())))


NOTHING_TO_TRAIN = "no sample has a selected token: nothing to train on (is k too small?)"


def training_batch(samples: list[TrainSample], weighted: bool | None = None) -> pa.RecordBatch:
    """Training rows (input_ids, labels[, weights]) of ``samples``: the one place samples become what the trainer
    reads. ``weighted`` (default: whether the samples carry weights) adds the weights column; without it an
    unweighted training set keeps its bytes."""
    if weighted is None:
        weighted = any(s.weights is not None for s in samples)
    cols = [pa.array([s.input_ids.astype(np.int32) for s in samples], pa.list_(pa.int32())),
            pa.array([labels_of(s) for s in samples], pa.list_(pa.int32()))]
    if not weighted:
        return pa.RecordBatch.from_arrays(cols, schema=TRAINING_SCHEMA)
    if any(s.weights is None for s in samples):
        raise ValueError("a weighted training set needs every sample's weights")
    cols.append(pa.array([s.weights.astype(np.float32) for s in samples], pa.list_(pa.float32())))
    return pa.RecordBatch.from_arrays(cols, schema=WEIGHTED_TRAINING_SCHEMA)


def training_table(samples: list[TrainSample]) -> pa.Table:
    """The training set as Arrow (input_ids, labels[, weights]); samples with no kept token are dropped."""
    kept = [s for s in samples if s.label_mask.any()]
    if not kept:
        raise ValueError(NOTHING_TO_TRAIN)
    return pa.Table.from_batches([training_batch(kept)])


@dataclass
class TrainJob:
    """Everything a training worker needs; built by the driver, identical on every worker."""

    base_path: str
    cfg: dict  # TrainConfig
    data: object  # a Parquet path or URL (tasks.storage), a pa.Table, or a Ray ObjectRef to one
    out_dir: str  # the finished adapter: <run>/adapters/<train key>
    checkpoint_dir: str  # <run>/checkpoints/<train key>/<execution digest>
    key: str
    label: str = ""
    init_adapter: str | None = None
    base_weights: str | None = None  # the base's weights hash: a copy from object storage is checked against it
    base_key: str | None = None  # ... and its model key, with init_adapter's, to check a copy of that adapter
    init_adapter_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = False
    extra: dict = field(default_factory=dict)  # recorded in train.json as is


def packing_collator():
    """The training collator: a micro-batch becomes one packed row (see the module docstring), its per-token
    ``weights`` (when the rows have them) flattened beside input_ids and labels."""
    from transformers import DataCollatorWithFlattening

    class WeightedFlattening(DataCollatorWithFlattening):
        def __call__(self, features, return_tensors=None, separator_id=None):
            weights = [f["weights"] for f in features] if "weights" in features[0] else None
            if weights is not None:
                features = [{k: v for k, v in f.items() if k != "weights"} for f in features]
            batch = super().__call__(features, return_tensors, separator_id)
            if weights is not None:  # 0 at each sample's first position, where the labels get the separator
                flat = np.concatenate([np.concatenate([[0.0], np.asarray(w, np.float32)[1:]]) for w in weights])
                batch["weights"] = torch.tensor(flat[None], dtype=torch.float32)
            return batch

    return WeightedFlattening(return_position_ids=True, return_flash_attn_kwargs=True, separator_id=IGNORE)


def _fetch(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, str):  # a training set streamed to storage by the flow (select.write_training_set)
        if not storage.exists(data):
            raise FileNotFoundError(
                f"the training set {data}, written by the driver, is not visible on this worker. On a cluster, set "
                "`storage:` to a location every node and the driver share (an NFS path mounted at the same place, "
                "or an fsspec URL such as s3://bucket/x)")
        return storage.read_table(data)
    import ray

    return ray.get(data)


def _load_model(job: TrainJob, cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(storage.open_model(job.base_path, job.base_weights), dtype=dtype)
    if job.init_adapter:
        parent = storage.open_adapter(job.init_adapter, job.init_adapter_key, job.base_key)
        return PeftModel.from_pretrained(model, parent, is_trainable=True)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def lr_at_step(step: int, warm: int, total: int, linear: bool) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based): (step+1)/warm while warming
    up, then linear decay to 0 at ``total`` (or constant)."""
    if step < warm:
        return (step + 1) / warm
    if not linear:
        return 1.0
    return max(0.0, (total - step) / max(1, total - warm))


def _trainer_class():
    from transformers import Trainer

    class SelectedTokenTrainer(Trainer):
        """``Trainer`` whose loss is the kept-token mean of a step (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Our compute_loss divides by num_items_in_batch itself: make the Trainer count
            # labelled tokens across micro-batches/workers and not divide by accumulation again.
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True
            self.attn_config = decoder_and_head(self.model)[0].config
            register_varlen_attention()

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            """Warm-up that starts at lr/warm, not 0 (``lr_at_step``): with transformers' step-0 rate of 0, a
            one-step stage (a continued self-evolving stage on a small D_t) would leave its parent unchanged."""
            if self.lr_scheduler is None:
                warm = self.args.get_warmup_steps(num_training_steps)
                linear = self.args.lr_scheduler_type == "linear"
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: lr_at_step(step, warm, num_training_steps, linear))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def training_step(self, *args, **kwargs):
            # The backward too: gradient checkpointing recomputes each layer's forward there, which must use the
            # same packed attention (with another, the recomputation fails or attends across samples).
            with attn_implementation(self.attn_config, VARLEN_ATTN):
                return super().training_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            if ids.shape[0] != 1:
                raise ValueError("expected one packed row per micro-batch (DataCollatorWithFlattening)")
            cu = inputs["cu_seq_lens_q"]
            # DataCollatorWithFlattening puts -100 at every sample's first position, so a
            # target at i+1 always has its context (hidden state i) in the same sample.
            pos = (labels[0, 1:] != IGNORE).nonzero(as_tuple=True)[0]
            targets = labels[0, pos + 1].long()
            # Through ``model`` (the DDP/FSDP wrapper: its forward is what syncs gradients);
            # ``logits_to_keep`` sends only the kept positions through lm_head.
            with attn_implementation(self.attn_config, VARLEN_ATTN):
                logits = model(input_ids=ids, position_ids=inputs["position_ids"], use_cache=False,
                               logits_to_keep=pos, tc_cu_seqlens=cu.to(torch.int32), tc_cu_host=cu.tolist(),
                               tc_max_len=int(inputs["max_length_q"])).logits[0].float()
            # One arithmetic for both: unweighted rows weigh 1.0, so all-1 weights reproduce them bit for bit.
            weights = (inputs["weights"][0, pos + 1].to(logits.dtype) if "weights" in inputs
                       else torch.ones(len(targets), dtype=logits.dtype, device=logits.device))
            loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
            if num_items_in_batch is None:
                loss = loss / max(1, len(targets))
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.args.world_size  # DDP averages gradients over workers
            return (loss, None) if return_outputs else loss

    return SelectedTokenTrainer


def _callbacks(names: list[str]) -> list:
    out = []
    for name in names:
        module, sep, attr = name.partition(":")
        if not sep:
            raise ValueError(f"train.callbacks entry {name!r}: use package.module:Class")
        out.append(getattr(importlib.import_module(module), attr)())
    return out


def _progress_callback(path: Path, rank: int):
    """Appends one JSON line per optimiser step to ``steps.jsonl`` (rank 0): a live progress
    record that also proves, after a resume, which steps ran in which attempt."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.steps_run = 0  # optimiser steps run by this attempt (fewer than the total after a resume)

        def on_step_end(self, args, state, control, **kw):
            self.steps_run += 1
            if rank == 0:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "of": state.max_steps, "pid": os.getpid(),
                                        "time": time.time()}) + "\n")

    return StepLog()


def resume_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """Newest *complete* Trainer checkpoint under ``checkpoint_dir`` (None: start fresh).

    Complete means its ``trainer_state.json`` (written after the weights and optimiser)
    is there; a checkpoint cut off mid-write by a kill is skipped, not resumed from.
    """
    root = Path(checkpoint_dir)
    found = []
    for d in root.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[1])
        except ValueError:
            continue
        if (d / "trainer_state.json").exists() and (d / "optimizer.pt").exists():
            found.append((step, d))
    return str(max(found)[1]) if found else None


_HEAP_FROZEN = {"done": False}


def freeze_import_heap() -> None:
    """Move every object alive now (mostly imported modules) to the collector's permanent generation, once per
    process, so the full ``gc.collect()`` that starts every ``Trainer.train`` does not rescan the imported stack
    (docs/benchmarks.md, Training). Done after one full collection, so no garbage is frozen; unfrozen at exit, so
    shutdown finalises those objects (DuckDB reports "leaked instances" otherwise)."""
    if not _HEAP_FROZEN["done"]:
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)
        _HEAP_FROZEN["done"] = True


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_worker(job: TrainJob) -> dict:
    """Train on this worker (one of ``world_size``); rank 0 saves the adapter atomically.

    Returns the run's statistics, the same on every rank; ``placement`` lists where each
    rank ran (``tasks.placement.where``).
    """
    from datasets import Dataset
    from transformers import set_seed

    # transformers 5.x renamed gradient_checkpointing -> activation_checkpointing; the old name
    # is kept because the GPU image's transformers (5.17) may predate the new one.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    freeze_import_heap()
    use_assigned_cpus()
    cfg = TrainConfig.model_validate(job.cfg)
    rank, world = _world()
    accumulation = cfg.accumulation(world)
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    remote = storage.is_remote(job.checkpoint_dir)  # no shared filesystem: checkpoints live in object storage
    ckpt_dir = remote_checkpoints.local_dir(job.checkpoint_dir, rank) if remote else Path(job.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    table = _fetch(job.data)
    dataset = Dataset(table)
    set_seed(cfg.seed)  # LoRA A is randomly initialised: the same seed gives the same adapter
    model = _load_model(job, cfg, device, dtype)
    if cfg.strategy == "fsdp" and device.type == "cpu":  # accelerate enables FSDP only on accelerator back-ends
        warnings.warn("train.strategy fsdp on CPU workers trains as DDP (every rank holds the whole model); the "
                      "adapter is the same", stacklevel=1)
    args = _training_arguments(cfg, accumulation, ckpt_dir, device, dtype, job.progress)
    steplog = _progress_callback(ckpt_dir / "steps.jsonl", rank)
    uploads = [remote_checkpoints.upload_callback(job.checkpoint_dir, rank, world)] if remote else []
    trainer = _trainer(model, args, dataset, [steplog, *uploads, *_callbacks(cfg.callbacks)], job.progress)
    resume = remote_checkpoints.newest(job.checkpoint_dir) if remote else resume_checkpoint(ckpt_dir)
    t0, started = time.perf_counter(), time.time()
    out = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    first_loss, final_loss = _logged_losses(trainer)
    n_tok, n_lab = _token_counts(table)
    stats = {"steps": trainer.state.global_step, "steps_run": steplog.steps_run,
             "resumed_from": resume and json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"],
             "samples": table.num_rows, "tokens": n_tok, "label_tokens": n_lab,
             "first_loss": first_loss, "final_loss": final_loss,
             "train_loss": out.training_loss, "seconds": seconds, "span": [started, time.time()],
             "tokens_per_s": n_tok * cfg.epochs / seconds if seconds and not resume else None,
             "world_size": world, "accumulation": accumulation, "init_adapter": job.init_adapter, "key": job.key,
             "numerics": numerics(str(device), job.dtype), **job.extra}
    stats["placement"] = _placement(world, device)
    if rank == 0:
        _save_adapter(trainer.model, job.out_dir, stats)
    if world > 1:
        torch.distributed.barrier()
    del trainer, model
    if remote:  # its checkpoints are in the bucket: this node's working copies have served
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if device.type == "cuda":  # the worker lives on (its scoring model cache too): give back what training held
        gc.collect()
        torch.cuda.empty_cache()
    return stats


def _training_arguments(cfg: TrainConfig, accumulation: int, ckpt_dir: Path, device: torch.device,
                        dtype: torch.dtype, progress: bool):
    """The Trainer's arguments: what is learned from the config, how from the execution layout."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=cfg.lr,
        lr_scheduler_type="linear" if cfg.schedule == "linear" else "constant_with_warmup",
        warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay, seed=cfg.seed, data_seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16 and device.type == "cuda", fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        save_strategy="steps" if cfg.checkpoint_every else "no", save_steps=cfg.checkpoint_every or 1,
        save_total_limit=remote_checkpoints.KEEP, logging_steps=1, logging_strategy="steps", report_to=[],
        disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
        average_tokens_across_devices=True, ddp_find_unused_parameters=False,
        fsdp="full_shard auto_wrap" if cfg.strategy == "fsdp" else "",
        fsdp_config={"use_orig_params": True} if cfg.strategy == "fsdp" else None,
    )


def _trainer(model, args, dataset, callbacks: list, progress: bool):
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=packing_collator(),
                               callbacks=callbacks)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; steps.jsonl has them
    return trainer


def _logged_losses(trainer) -> tuple[float | None, float | None]:
    """The first logged loss and the mean of the last ten; a non-finite one fails the run."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses and not all(np.isfinite(losses)):
        raise FloatingPointError(f"training loss became non-finite: {losses[-5:]}")
    return (losses[0], float(np.mean(losses[-10:]))) if losses else (None, None)


def _token_counts(table: pa.Table) -> tuple[int, int]:
    """Tokens and labelled (kept) tokens of the training set."""
    n_tok = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    n_lab = int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE)).as_py())
    return n_tok, n_lab


def _placement(world: int, device: torch.device) -> list:
    """Where each rank ran (``tasks.placement.where``), gathered from every rank."""
    here = where() | {"device": str(device)}
    if world == 1:
        return [here]
    placed: list = [None] * world
    torch.distributed.all_gather_object(placed, here)
    return placed


def _save_adapter(model, out_dir: str, stats: dict) -> None:
    """The adapter and its ``train.json``, written beside ``out_dir`` and renamed into place; or, to object
    storage, written on this node and published whole (``storage.publish_dir``)."""
    remote = storage.is_remote(out_dir)
    local = Path(storage.node_cache() / "staged" / keys.digest("adapter", out_dir) if remote else out_dir)
    tmp = local.with_name(local.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "train.json").write_text(json.dumps(stats, indent=2))
    if remote:
        storage.publish_dir(tmp, out_dir)
        shutil.rmtree(tmp)
        return
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)


def lora_shape(adapter_dir: str | Path) -> dict:
    """r, alpha, dropout and targets of a saved adapter (what a continued stage inherits)."""
    c = storage.read_json(storage.join(str(adapter_dir), "adapter_config.json"))
    targets = c.get("target_modules")
    return {"r": c.get("r"), "alpha": c.get("lora_alpha"), "dropout": c.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}
