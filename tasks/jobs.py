"""What a worker is handed: one frozen, picklable job object per stage, built by the flows.

Flows fill a job from the run's config and context; the task functions (``tasks/steps.py``)
and the work they run take it whole. ``TrainJob`` sits beside its worker in ``tasks/train.py``
(importing it here would load torch into every reader of this module).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScorerSpec:
    """The per-process scoring model: which base weights, and how it computes."""

    base_path: str
    base_key: str  # the base weights' key: the worker caches the model under it
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "transformers"  # transformers, vllm, or package.module:Factory
    compile: bool = False
    linear_ce: str = "chunked"  # the transformers backend's head/CE kernel
    base_weights: str | None = None  # the base's weights hash: a copy from object storage is checked against it


@dataclass(frozen=True)
class ScoreJob:
    """Scoring one model's shards: the same object goes with every shard of that model."""

    scorer: ScorerSpec
    model_key: str  # the losses' model: base, or base + adapter weights, and how they are computed
    adapter: str | None
    batch_tokens: int
    chunk: int | None  # most lm_head+CE rows per chunk, within chunk_bytes
    chunk_bytes: int
    adapter_model: str | None = None  # the adapter's model key (keys.adapter_model_key), which its copy must give

    @property
    def adapter_key(self) -> str | None:
        """What a worker caches the adapter under, and checks a copy from object storage against."""
        return self.adapter_model if self.adapter else None


@dataclass(frozen=True)
class EvalJob:
    """One model's held-out evaluation: the model, the eval samples, and how to run them."""

    base_path: str
    samples: list  # ShardSample of the held-out part
    meta: dict  # sample_id -> {"task", "answer": (start, end), "answer_text"}
    batch_tokens: int
    adapter: str | None = None
    base_key: str | None = None  # the worker caches the base model under it
    base_weights: str | None = None  # ... and checks a copy from object storage against this weights hash
    adapter_key: str | None = None  # ... and the adapter under its weights' key, never under its path
    device: str = "auto"
    dtype: str = "auto"
    tokenizer_path: str | None = None  # None: the base model's
    tokenizer_fingerprint: str | None = None  # the run's tokenizer: a tokenizer changed since is refused
    max_new_tokens: int = 128  # greedy generation budget of answer_match (0: skip it)
    chunk: int = 2048  # lm_head+CE rows per chunk
    label: str = ""  # the variant's name, for the log
