"""Typed run configuration: one YAML file, overridable from the command line.

Every stage reads its own sub-model, so a stage can be tested with a config built in
Python and a run is reproducible from the YAML that is copied into its workdir.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenclean.secret_names import secret_looking


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly, not silently fall back to a default; nan and inf are
    # never a meaningful setting. Every numeric field carries its domain, so a bad value stops at load.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Seeds reach numpy (uint32) and DuckDB INTEGER columns.
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Count = Annotated[int, Field(ge=1)]
# A run's directory name: it must stay inside the workdir and be usable in a DuckDB path.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


DB_FILE = "tokenclean.duckdb"  # a run directory's database: the run's one source of truth

# The synthetic world's distinct names (synth.FIRST x synth.LAST; a test holds them equal).
MAX_PEOPLE = 312


class EmbeddedConfig(_Strict):
    """Size of the built-in default (tokenizer + tiny Llama + synthetic SFT set)."""

    n_people: int = Field(16, ge=1, le=MAX_PEOPLE, description="at most as many as the synthetic names")
    n_train: Count = 4000
    n_eval: Count = 400
    corrupt_fraction: float = Field(0.25, ge=0, le=1)
    pretrain_steps: Count = 250
    seed: Seed = 1234


class DataConfig(_Strict):
    paths: list[str] = Field(default_factory=list, description="JSONL / Parquet files, or hf:NAME[:split]")
    eval_paths: list[str] = Field(default_factory=list, description="held-out set; else eval_fraction of paths")
    warmup_paths: list[str] = Field(
        default_factory=list, description="the warm-up set D0 the reference is trained on, as its own files (the "
                                          "paper's layout); then data.paths is split over D1..DT only, so rows "
                                          "added to it never change D0. Empty: D0 is drawn from data.paths by id")
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: Count = 2048
    template: Literal["tulu", "model"] = Field(
        "tulu", description="tulu (the paper's), or model: the tokenizer's own chat template")
    empty_think: Literal["target", "prompt"] = Field(
        "target", description="data.template model: the empty think block a template writes for a turn without "
                              "reasoning (Qwen3's) is a target (served with thinking on) or prompt (served with "
                              "enable_thinking=False); part of the tokenization key")
    seed: Seed = 0
    ingest_workers: int = Field(1, ge=1, description="execution: Ray tasks reading and tokenising input splits at "
                                                     "once (1: in the flow process); the dataset is the same for any "
                                                     "number")


class RefreshConfig(_Strict):
    reference: Literal["keep", "retrain_if_changed"] = Field(
        "keep", description="a refresh whose warm-up set D0 changed: keep (the reference last trained stays in use, "
                            "named by its key; the changes are reported) or retrain_if_changed (the reference "
                            "follows D0's current content: retrained and the pool rescored). Runs (tokenclean run) "
                            "always follow the current D0")


class ModelConfig(_Strict):
    base: str = Field("embedded", description="HF model id/path, a URL in object storage (`tokenclean "
                                              "publish-model`), or 'embedded' for the built-in tiny Llama")
    tokenizer: str | None = Field(None, description="defaults to the base model's tokenizer (also a path, id or URL)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    reference: str | None = Field(
        None, description="an existing model (a local directory, a hub id in the Hugging Face cache, or a URL "
                          "in object storage) used as "
                          "the reference theta_1 of fixed-model cleaning instead of the base fine-tuned on D0 (as the "
                          "paper's Table 3 uses an instruct model). It must share the run's tokenizer (vocabulary "
                          "and bos/pad ids; checked before any work) and is keyed by its weights like the base. "
                          "Nothing is trained on D0 then, so D0 joins the fixed-model pool (D0..DT; with "
                          "data.warmup_paths those files are simply pool data)")
    reference_self_evolving: bool = Field(
        False, description="also theta_1 of the self-evolving loop: it scores D1, and theta_2 is the base with a "
                           "fresh LoRA on D1's kept tokens (the given weights are not the base's: there is no "
                           "adapter to continue); D0 is then unused. false: the loop's theta_1 stays the base "
                           "fine-tuned on D0")

    @model_validator(mode="after")
    def _reference_given(self):
        if self.reference_self_evolving and self.reference is None:
            raise ValueError("reference_self_evolving: true needs model.reference (the model to start the loop from)")
        return self


class ScoreConfig(_Strict):
    backend: str = Field("transformers", description="transformers, vllm, or package.module:Factory (a custom scorer)")
    batch_tokens: int = Field(16384, ge=1, description="token budget per forward batch (padding included)")
    lm_head_chunk_bytes: int = Field(256 << 20, ge=1 << 20, description="execution: memory for the logits of one "
                                     "lm_head+CE chunk in a scoring worker (8 bytes a logit); the rows per chunk "
                                     "follow from it and the model's vocabulary")
    lm_head_chunk: int | None = Field(None, ge=1, description="execution: at most this many rows per lm_head+CE chunk, "
                                                              "within lm_head_chunk_bytes (default: no cap)")
    shard_tokens: int = Field(
        4_194_304, ge=1, description="most tokens in one scoring shard (the unit of retry and resume); shards are "
                                     "sized to give each scoring slot about 4, within [16384, shard_tokens] tokens")
    shard_samples: int | None = Field(None, ge=1, description="most samples in one scoring shard (default: no limit)")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile norms/MLP/CE in the scoring workers (+17-34% tok/s on H100). auto: on "
                            "where the workers score on CUDA (needs Triton there), off on CPU")
    linear_ce: Literal["chunked", "liger"] = Field(
        "chunked", description="lm_head + cross-entropy in the scoring workers: chunked (plain PyTorch, "
                               "lm_head_chunk_bytes of logits at a time) or liger (liger-kernel's fused Triton "
                               "kernel; needs CUDA and pip install liger-kernel; per-token losses agree within "
                               "bf16 rounding)")


    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("transformers", "vllm") and ":" not in v:
            raise ValueError("backend must be transformers, vllm or package.module:Factory")
        return v

    @model_validator(mode="after")
    def _linear_ce_backend(self):
        if self.linear_ce != "chunked" and self.backend != "transformers":
            raise ValueError(f"linear_ce: {self.linear_ce} is the transformers backend's; backend is {self.backend}")
        return self


Fraction = Annotated[float, Field(gt=0, le=1)]


class SelectConfig(_Strict):
    k: Fraction | list[Fraction] = Field(
        0.6, description="fraction of response tokens kept; a list sweeps it: one run makes every k's selections, "
                         "fine-tunes and evaluations, scoring the pool once (the variants are named global-k0.3...)")
    seed: Seed = 0
    pool: Literal["auto", "exclude_warmup", "all"] = Field(
        "auto", description="fixed-model pool: D1..DT (exclude_warmup, as the paper's separate warm-up file), or "
                            "D0..DT (all). auto: exclude_warmup when theta_1 is trained on D0 (its scores of D0 are "
                            "inflated), all with a given model.reference (nothing was trained on D0)")

    @field_validator("k", mode="before")
    @classmethod
    def _fractions(cls, v):
        # before the union is tried, so a bad value is one error at select.k, not one per member of the union
        items = v if isinstance(v, list) else [v]
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x <= 1:
                raise ValueError(f"k must be a number in (0, 1] or a list of them, got {x!r}")
        if not items or len(set(items)) != len(items):
            raise ValueError(f"a list of k must be non-empty and name each value once, got {v}")
        return v

    @property
    def ks(self) -> list[float]:
        """The k values of the run, in the order given."""
        return list(self.k) if isinstance(self.k, list) else [self.k]

    @property
    def sweep(self) -> bool:
        """Several k: every k-dependent variant's name then says its k."""
        return len(self.ks) > 1


class LoraConfig(_Strict):
    r: Count = 64
    alpha: Count = 16
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(_Strict):
    """LoRA SFT on the kept tokens (transformers ``Trainer``, data parallel over Ray Train workers).

    ``batch_size`` samples per optimiser step = ``per_device_batch_size`` x gradient accumulation x
    ``ray.train_workers`` (the accumulation is derived and must come out whole). Fields marked *execution* are not
    part of an adapter's key unless LoRA dropout is on (``learning``; why: docs/design.md).
    """

    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the optimiser steps spent warming up")
    schedule: Literal["linear", "constant"] = "linear"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(48, description="effective batch in samples (the paper's 48)", ge=1)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: no clipping)")
    weight_decay: float = Field(0.0, ge=0)
    seed: Seed = 0
    lora: LoraConfig = Field(default_factory=LoraConfig)
    callbacks: list[str] = Field(default_factory=list,
                                 description="extra transformers TrainerCallbacks, as package.module:Class")
    per_device_batch_size: int = Field(8, ge=1, description="execution: samples packed into one micro-batch")
    gradient_checkpointing: bool = Field(False, description="execution: recompute activations in backward")
    checkpoint_every: int = Field(50, ge=0, description="execution: optimiser steps between checkpoints (0: none)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="execution: fsdp shards the base over workers")

    EXECUTION: ClassVar[frozenset[str]] = frozenset(
        {"per_device_batch_size", "gradient_checkpointing", "checkpoint_every", "strategy"})

    # what decides the dropout masks of a training run, beyond the seed (gradient checkpointing replays them)
    DROPOUT_LAYOUT: ClassVar[tuple[str, ...]] = ("per_device_batch_size", "strategy")

    def learning(self, workers: int = 1, dropout: float | None = None) -> dict:
        """The fields that decide what is learned: an adapter's key is derived from these.

        ``dropout``: the LoRA dropout the adapter trains with, when not ``lora.dropout``
        (a continued adapter keeps its parent's). Above 0, the layout that draws its masks
        (``DROPOUT_LAYOUT`` and ``workers``) is part of what is learned.
        """
        out = self.model_dump(mode="json", exclude=set(self.EXECUTION))
        if (self.lora.dropout if dropout is None else dropout) > 0:
            out["dropout_layout"] = {f: getattr(self, f) for f in self.DROPOUT_LAYOUT} | {"workers": int(workers)}
        return out

    def accumulation(self, workers: int) -> int:
        per_step = self.per_device_batch_size * workers
        if self.batch_size % per_step:
            raise ValueError(
                f"train.batch_size {self.batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x ray.train_workers {workers} = {per_step}: the effective batch "
                "must be a whole number of micro-batches")
        return self.batch_size // per_step


class EvalConfig(_Strict):
    batch_tokens: Count = 16384
    max_samples: int | None = Field(None, ge=1, description="evaluate on the first N held-out samples (None: all)")
    max_new_tokens: int = Field(128, ge=0, description="greedy generation budget of the answer metric (0: skip it)")


class RayConfig(_Strict):
    """Where work runs. The driver (flow process) only plans and writes DuckDB; scoring,
    training and evaluation are Ray work that declares the resources it needs."""

    address: str | None = Field(None, description="ray://host:10001 or 'auto'; None starts a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: this machine's)")
    num_gpus_per_task: float = Field(0.0, ge=0, description="GPUs per scoring task (1 pins one task per GPU)")
    train_workers: int = Field(1, ge=1, description="data-parallel training workers (Ray Train)")
    gpus_per_train_worker: float = Field(0.0, ge=0, description="GPUs per training worker")
    cpus_per_train_worker: float = Field(1.0, gt=0)
    gpus_per_eval_task: float = Field(0.0, ge=0, description="GPUs for an evaluation task")
    cpus_per_eval_task: float = Field(1.0, gt=0, description="CPUs for an evaluation task (torch threads on CPU)")
    train_max_failures: int = Field(2, ge=0, description="worker-group restarts (from the last checkpoint)")
    env_vars: list[str] = Field(
        default_factory=list, description="names of the driver's environment variables to give every worker, e.g. "
                                          "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION for s3 storage (values are read at "
                                          "run time, never written into the run's config). Never secrets: Ray logs "
                                          "them; workers take credentials from their node's own credential chain")
    dashboard: bool = Field(False, description="a local cluster (no address) starts the Ray dashboard, on "
                                               "127.0.0.1 only; each flow run's Prefect artifacts link to it")
    metrics_port: int | None = Field(None, ge=1024, le=65535, description="a local cluster exports Ray's and "
                                     "tokenclean's metrics for Prometheus at http://127.0.0.1:PORT/metrics (stage "
                                     "seconds, scoring tokens/s, kept fractions, quarantined rows)")
    enabled: bool = True

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, v: list[str]) -> list[str]:
        refused = secret_looking(v)
        if refused:
            raise ValueError(f"names secrets ({', '.join(refused)}): Ray writes a job's environment into its logs "
                             "in plain text. Give workers credentials through their node (instance role, a "
                             "credentials file such as AWS_SHARED_CREDENTIALS_FILE, or the environment the raylet "
                             "was started with)")
        return v


class RunConfig(_Strict):
    name: str = Field("default", description="the run directory's name under workdir: letters, digits, . _ -")
    workdir: str = "runs"
    mode: Literal["fixed", "self_evolving", "both"] = "both"
    iterations: int = Field(2, ge=1, description="T: the data is split into D0..DT")
    baselines: list[Literal["full", "random", "local", "global", "sample", "weighted"]] = Field(
        default_factory=lambda: ["full", "random", "local", "global"]
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    warmup_train: TrainConfig | None = Field(None, description="training of the reference on D0; defaults to train")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    storage: str | None = Field(
        None, description="where workers write shard files: unset = the run directory; a shared path (NFS) or an "
                          "fsspec URL (s3://bucket/prefix) that every node and the driver reach")
    db_memory_limit: str | None = Field(
        "2GB", description="DuckDB's memory limit in the flow process (it spills to disk beyond it); null: DuckDB's "
                           "default, 80% of RAM")
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError(f"run name {v!r} must be letters, digits, '.', '_' or '-' (not '.' or '..'): "
                             "it names a directory inside the workdir")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.name

    @property
    def db_path(self) -> Path:
        return self.run_dir / DB_FILE

    @property
    def reference_train(self) -> TrainConfig:
        return self.warmup_train or self.train


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for key in keys[:-1]:
        cur = cur.setdefault(key, {})
        if not isinstance(cur, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=3` strings -> nested dict; values are parsed as YAML so `k=0.5`, `paths=[a,b]` work."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: top level must be a mapping")
        # Relative data paths are relative to the YAML file, not to the caller's cwd.
        data = raw.get("data") or {}
        for key in ("paths", "eval_paths", "warmup_paths"):
            if key in data:
                data[key] = [_resolve(p.parent, x) for x in data[key]]
        # A model given as a directory next to the YAML is found there; anything else (a hub id,
        # an absolute path, 'embedded') is left as written.
        storage = raw.get("storage")
        if isinstance(storage, str) and "://" not in storage and not Path(storage).is_absolute():
            raw["storage"] = str((p.parent / storage).resolve())
        model = raw.get("model") or {}
        for key in ("base", "tokenizer", "reference"):
            if isinstance(model.get(key), str) and (p.parent / model[key]).is_dir():
                model[key] = str((p.parent / model[key]).resolve())
    raw = _merge(raw, parse_overrides(overrides or []))
    return RunConfig.model_validate(raw)


def _resolve(root: Path, entry: str) -> str:
    if entry.startswith("hf:") or Path(entry).is_absolute():
        return entry
    return str((root / entry).resolve())


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
