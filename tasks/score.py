"""Teacher-forced per-token losses: the math of scoring, with no orchestration in it.

Throughput: by default samples are *packed* (``tokenclean.tasks.packing``): several samples share
one row of up to ``batch_tokens`` tokens, ``position_ids`` restart per sample and
attention is block-diagonal causal (PyTorch's flash varlen kernel on CUDA, per-sample
SDPA elsewhere), so no FLOP is spent on padding. The older length-sorted padded batches,
kept as a baseline and a test oracle, are in ``benchmarks/padded_scoring.py``.

Memory discipline: the decoder's hidden states are gathered at target positions only,
then pushed through lm_head + cross-entropy in chunks whose rows follow from a byte budget
and the vocabulary (``lm_head_rows``: ``score.lm_head_chunk_bytes``), so the (tokens x vocab)
fp32 logits tensor never exists (at 128k vocab and 16k tokens it would be 8 GiB) and a
152k vocabulary costs no more than a 32k one. The decoder runs with ``use_cache=False``
(no KV cache is kept).
``linear_ce="liger"`` hands lm_head + cross-entropy to liger-kernel's fused Triton kernel
instead (``LINEAR_CE``); the default stays the plain chunked path.

One process holds the base weights once; a reference model is the same weights with
a LoRA adapter switched on (``ScoringModel``), so base and reference share memory.

pyarrow is imported lazily (``score_samples`` and the schemas), so the torch-level
functions (``score_arrays`` and below) run where only torch + transformers exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenclean.tasks import storage
from tokenclean.tasks.packing import (
    VARLEN_ATTN,
    attn_implementation,
    pack_arrays,
    plan_packs,
    register_varlen_attention,
)

__all__ = [  # noqa: F822 (the two schemas come from the module __getattr__ below)
    "LOSS_SCHEMA", "EVAL_SCHEMA", "ShardSample", "SampleBatch", "resolve_device", "resolve_dtype", "chunked_token_nll",
    "LM_HEAD_CHUNK_BYTES", "LOGIT_BYTES", "lm_head_rows", "head_vocab",
    "LINEAR_CE", "check_linear_ce", "liger_token_nll", "token_nll", "compile_pointwise", "plan_packs",
    "packed_token_losses", "LossColumns", "score_arrays", "score_samples", "ScoringModel", "process_model",
]

_SCHEMAS: dict = {}


def _schemas() -> dict:
    if not _SCHEMAS:
        import pyarrow as pa

        loss = pa.schema([("sample_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()),
                          ("loss", pa.float32())])
        _SCHEMAS["LOSS_SCHEMA"] = loss
        _SCHEMAS["EVAL_SCHEMA"] = loss.append(pa.field("correct", pa.bool_()))
    return _SCHEMAS


def __getattr__(name: str):  # PEP 562: LOSS_SCHEMA / EVAL_SCHEMA without importing pyarrow at module load
    if name in ("LOSS_SCHEMA", "EVAL_SCHEMA"):
        return _schemas()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def numerics(device: str = "auto", dtype: str = "auto") -> list[str]:
    """(device type, torch dtype) that ``device``/``dtype`` resolve to in this process: what changes the numbers."""
    dev = resolve_device(device)
    return [dev.type, str(resolve_dtype(dtype, dev)).removeprefix("torch.")]


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, with_correct: bool):
    """fp32 NLL (logsumexp - target logit) of one chunk of model-dtype logits, and optionally argmax == target."""
    logits = logits.float()
    loss = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)
    return loss, (logits.argmax(-1) == targets) if with_correct else None


_CE = {"fn": _ce_chunk}

# Bytes one logit of a chunk costs at the chunk's peak: its fp32 value and logsumexp's temporary of the same
# size (docs/benchmarks.md, scoring memory).
LOGIT_BYTES = 8
LM_HEAD_CHUNK_BYTES = 256 << 20  # the default of score.lm_head_chunk_bytes (docs/benchmarks.md: scoring memory)


def lm_head_rows(chunk_bytes: int, vocab: int, cap: int | None = None) -> int:
    """Rows of hidden states per lm_head + CE chunk: as many as fit ``chunk_bytes`` at ``vocab`` logits a row
    (``LOGIT_BYTES`` each), at least 1, at most ``cap`` (``score.lm_head_chunk``, when set)."""
    rows = max(1, int(chunk_bytes) // (int(vocab) * LOGIT_BYTES))
    return min(rows, int(cap)) if cap else rows


def head_vocab(head: torch.nn.Module) -> int:
    """Logits per row that ``head`` (an lm_head, or ``ScaledHead`` around one) computes."""
    head = getattr(head, "head", head)
    return int(head.weight.shape[0])


def chunked_token_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, chunk: int,
                      with_correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL of ``targets`` (N,) given ``hidden`` (N, H): lm_head + CE in fp32, ``chunk`` rows at a time.

    Per chunk: logits = lm_head(h) in the model dtype (as an HF forward computes them),
    upcast to fp32, loss = logsumexp(logits) - logits[target] (no log-softmax tensor is
    written). Peak extra memory is ``chunk x vocab x LOGIT_BYTES``.

    ``with_correct`` also returns whether the target is the argmax (greedy decoding's
    choice), which is what the teacher-forced exact-match metric needs.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device) if with_correct else None
    ce = _CE["fn"]
    for i in range(0, hidden.shape[0], chunk):
        loss, ok = ce(lm_head(hidden[i : i + chunk]), targets[i : i + chunk], with_correct)
        out[i : i + chunk] = loss
        if with_correct:
            correct[i : i + chunk] = ok
    return out, correct


LINEAR_CE = ("chunked", "liger")


def _liger_fn():
    """liger-kernel's fused linear cross-entropy, or a clear error saying how to get it."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise RuntimeError("score.linear_ce: liger needs liger-kernel (and Triton) where the scoring workers run: "
                           "pip install liger-kernel, or set score.linear_ce: chunked") from e
    return liger_fused_linear_cross_entropy


def check_linear_ce(linear_ce: str, device_type: str, *, load: bool = True) -> None:
    """Refuse a head/CE implementation that cannot run on ``device_type``, before any work.

    liger's kernels are Triton: they run on CUDA, or on the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1``, numpy-speed, which is how the CPU tests check them).
    ``load`` also imports the kernel (where the workers run; the driver need not have it).
    """
    import os

    if linear_ce not in LINEAR_CE:
        raise ValueError(f"linear_ce {linear_ce!r}: use one of {', '.join(LINEAR_CE)}")
    if linear_ce == "liger":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"score.linear_ce: liger runs Triton kernels, which need CUDA; the scoring workers "
                             f"run on {device_type} (set score.linear_ce: chunked there)")
        if load:
            _liger_fn()


def liger_token_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                    with_correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunked_token_nll``'s contract through liger-kernel's fused linear cross-entropy.

    liger multiplies ``hidden`` by the head in the model dtype (as lm_head does) and runs
    the softmax, the target's log-probability and the argmax in one fp32 Triton kernel
    over the logits chunk in place, so no fp32 copy of the logits is written. It picks its
    own chunk (about hidden-sized logits). ``reduction="none"`` gives the per-token loss;
    ``return_token_accuracy`` gives argmax == target, the exact-match metric's need.
    """
    if isinstance(lm_head, ScaledHead):  # (W h) / s = W (h / s): liger takes the weight, not the module
        if getattr(lm_head.head, "bias", None) is not None:
            raise NotImplementedError("score.linear_ce: liger with a biased, scaled lm_head")
        hidden, lm_head = hidden / lm_head.divisor, lm_head.head
    out = _liger_fn()(hidden, lm_head.weight, targets, bias=getattr(lm_head, "bias", None), reduction="none",
                      return_token_accuracy=with_correct)
    if not with_correct:
        return (out if isinstance(out, torch.Tensor) else out.loss).float(), None
    return out.loss.float(), out.token_accuracy > 0.5


def token_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, chunk: int,
              with_correct: bool = False, linear_ce: str = "chunked"):
    """NLL of ``targets`` given ``hidden`` by the chosen head/CE implementation (``LINEAR_CE``).

    No rows (a padded batch of prompt-only samples) takes the chunked path, which returns
    empty tensors; liger sizes its chunks from the row count and is not asked for zero.
    """
    if linear_ce == "liger" and hidden.shape[0]:
        return liger_token_nll(hidden, targets, lm_head, with_correct)
    return chunked_token_nll(hidden, targets, lm_head, chunk, with_correct)


def compile_pointwise(model) -> None:
    """``torch.compile`` (dynamic shapes) each decoder layer's RMSNorms and MLP, and the chunk CE.

    On by default where scoring runs on CUDA (``score.compile: auto``); off on CPU.

    Fuses what eager runs as separate memory-bound kernels (RMSNorm's fp32 upcast/pow/
    mean/rsqrt/mul chain, SiLU(gate) * up, the CE's upcast + logsumexp + gather);
    the matmuls stay cuBLAS. Attention is not compiled (the varlen call takes host
    lists). Affects this process's chunk CE for every model. Costs compile time at the
    first batches; worth it only for long runs.
    """
    decoder, _ = decoder_and_head(model)
    for layer in decoder.layers:
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            mod = getattr(layer, name, None)
            if mod is not None:
                mod.compile(dynamic=True)
    decoder.norm.compile(dynamic=True)
    _CE["fn"] = torch.compile(_ce_chunk, dynamic=True)


class ScaledHead(torch.nn.Module):
    """lm_head followed by a division, as models with ``logits_scaling`` (Granite) compute their logits."""

    def __init__(self, head: torch.nn.Module, divisor: float):
        super().__init__()
        self.head, self.divisor = head, float(divisor)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.divisor


def decoder_and_head(model):
    """Decoder and the function from hidden states to logits of a (PEFT-wrapped) causal LM.

    That is ``lm_head``, or ``ScaledHead`` where the config divides the logits
    (``logits_scaling``); models whose logits are anything else (softcapped, multiplied
    by ``logit_scale``) are refused rather than scored wrong.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"model config sets {attr}; the chunked scorer assumes logits = lm_head(h)")
    head = base.get_output_embeddings()
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        head = ScaledHead(head, scaling)
    return base.get_decoder(), head


def _nan_where(losses: torch.Tensor, first: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A target at position 0 has no context to be predicted from: its loss is NaN (never ranked)."""
    if isinstance(first, np.ndarray):
        if not first.any():
            return losses
        first = torch.from_numpy(first).to(losses.device)
    return losses.masked_fill(first, float("nan"))


@torch.no_grad()
def packed_token_losses(model, ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                        cu_host: list[int], max_len: int, target_index: torch.Tensor, chunk: int,
                        with_correct: bool = False, linear_ce: str = "chunked"):
    """Per-target losses for one packed row (see ``tokenclean.tasks.packing``).

    ``ids``/``position_ids``: (1, T); ``cu_seqlens``: (n+1,) int32 on the device and the
    same as a host list; ``target_index``: (K,) positions in the row whose token is a
    target (its loss comes from the hidden state one position earlier, which must be in
    the same sample: callers NaN out targets at a sample's position 0).
    """
    decoder, head = decoder_and_head(model)
    register_varlen_attention()
    with attn_implementation(decoder.config, VARLEN_ATTN):
        hidden = decoder(input_ids=ids, position_ids=position_ids, use_cache=False, tc_cu_seqlens=cu_seqlens,
                         tc_cu_host=cu_host, tc_max_len=max_len).last_hidden_state[0]  # (T, H)
    h = hidden[(target_index - 1).clamp_min(0)]
    return token_nll(h, ids[0, target_index], head, chunk, with_correct, linear_ce)


@dataclass
class ShardSample:
    sample_id: int
    input_ids: np.ndarray
    target: np.ndarray  # bool mask over input_ids


@dataclass
class SampleBatch:
    """A shard's samples as four flat arrays: what travels from the driver to a scoring worker.

    One object of four numpy arrays pickles and ships in a few milliseconds; a list of one
    small object per sample made Prefect walk and pickle thousands of them per task.
    ``samples()`` gives the per-sample view (``ShardSample``, array slices, no copies).
    """

    sample_id: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n + 1]: sample i is input_ids[offsets[i]:offsets[i + 1]]
    input_ids: np.ndarray  # int32 [tokens]
    target: np.ndarray  # bool [tokens]

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def samples(self) -> list[ShardSample]:
        o = self.offsets
        return [ShardSample(int(sid), self.input_ids[o[i]:o[i + 1]], self.target[o[i]:o[i + 1]])
                for i, sid in enumerate(self.sample_id)]


class LossColumns:
    """Per-target rows gathered batch by batch: host columns as numpy, losses left on the device until
    ``columns()`` (one transfer, no per-batch sync)."""

    def __init__(self, with_correct: bool):
        self.with_correct = with_correct
        self.host: dict[str, list[np.ndarray]] = {"sample_id": [], "pos": [], "token_id": []}
        self.loss: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def add(self, sample_id: np.ndarray, pos: np.ndarray, token_id: np.ndarray, losses: torch.Tensor,
            correct: torch.Tensor | None) -> None:
        self.host["sample_id"].append(sample_id)
        self.host["pos"].append(pos.astype(np.int32))
        self.host["token_id"].append(token_id.astype(np.int32))
        self.loss.append(losses)
        if self.with_correct:
            self.correct.append(correct)

    def columns(self) -> dict[str, np.ndarray]:
        out = {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64 if k == "sample_id" else np.int32))
               for k, v in self.host.items()}
        out["loss"] = (torch.cat(self.loss).cpu().numpy().astype(np.float32, copy=False) if self.loss
                       else np.zeros(0, dtype=np.float32))
        if self.with_correct:
            out["correct"] = torch.cat(self.correct).cpu().numpy() if self.correct else np.zeros(0, dtype=bool)
        return out


def _score_pack(model, samples: list[ShardSample], sids: np.ndarray, pack: np.ndarray, cols: LossColumns, *,
                device: torch.device, chunk: int, with_correct: bool, linear_ce: str) -> int:
    """Score one pack of ``samples`` into ``cols``; returns its number of tokens."""
    ids, pos, cu, max_len, t_index, t_row, t_pos = pack_arrays(
        [samples[i].input_ids for i in pack], [samples[i].target for i in pack])
    if len(t_index) == 0:
        return int(len(ids))
    d_ids = torch.from_numpy(ids).to(device)[None]
    d_pos = torch.from_numpy(pos).to(device)[None]
    d_cu = torch.from_numpy(cu).to(device)
    d_t = torch.from_numpy(t_index).to(device)
    losses, correct = packed_token_losses(model, d_ids, d_pos, d_cu, cu.tolist(), max_len, d_t, chunk,
                                          with_correct, linear_ce)
    cols.add(sids[pack][t_row], t_pos, ids[t_index], _nan_where(losses, t_pos == 0), correct)
    return len(ids)


def score_arrays(model, samples: list[ShardSample], *, batch_tokens: int, device: torch.device,
                 chunk: int | None = None, chunk_bytes: int = LM_HEAD_CHUNK_BYTES, progress=None,
                 with_correct: bool = False, linear_ce: str = "chunked") -> dict[str, np.ndarray]:
    """Losses of every target token of ``samples`` as numpy columns (no pyarrow needed).

    Keys: sample_id (int64), pos (int32), token_id (int32), loss (float32)[, correct (bool)].
    Rows come pack by pack; order within is by sample then position.
    ``progress(n)`` is called after each pack with its number of real tokens.
    ``linear_ce`` picks the head/CE implementation (``token_nll``). lm_head + CE run ``lm_head_rows`` rows at
    a time: as many as ``chunk_bytes`` holds at this model's vocabulary, at most ``chunk`` when given.
    """
    device = torch.device(device)
    chunk = lm_head_rows(chunk_bytes, head_vocab(decoder_and_head(model)[1]), chunk)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    sids = np.array([s.sample_id for s in samples], dtype=np.int64)
    cols = LossColumns(with_correct)
    for pack in plan_packs(lengths, batch_tokens):
        n_real = _score_pack(model, samples, sids, pack, cols, device=device, chunk=chunk,
                             with_correct=with_correct, linear_ce=linear_ce)
        if progress is not None:
            progress(n_real)
    return cols.columns()


def score_samples(model, samples: list[ShardSample], *, batch_tokens: int, device: torch.device,
                  chunk: int | None = None, chunk_bytes: int = LM_HEAD_CHUNK_BYTES, progress=None,
                  with_correct: bool = False, linear_ce: str = "chunked"):
    """Losses of every target token of ``samples`` as an Arrow table (sample_id, pos, token_id, loss[, correct])."""
    import pyarrow as pa

    cols = score_arrays(model, samples, batch_tokens=batch_tokens, chunk=chunk, chunk_bytes=chunk_bytes,
                        device=device, progress=progress, with_correct=with_correct, linear_ce=linear_ce)
    schema = _schemas()["EVAL_SCHEMA" if with_correct else "LOSS_SCHEMA"]
    return pa.table([cols[f.name] for f in schema], schema=schema)


class ScoringModel:
    """Base weights loaded once per process; adapters are attached by name and toggled.

    ``losses(samples, adapter=None)`` scores with the base model, ``adapter=path``
    with base + that LoRA adapter. Loading a second adapter reuses the base weights.
    ``compile=True`` applies ``compile_pointwise`` (faster on GPU after a one-time compile).
    ``linear_ce`` picks how lm_head + cross-entropy run for ``losses`` (``token_nll``);
    it is checked against the device here, before the weights load.
    """

    def __init__(self, base_path: str, *, device: str = "auto", dtype: str = "auto", compile: bool = False,
                 linear_ce: str = "chunked", base_key: str | None = None):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        check_linear_ce(linear_ce, self.device.type)
        self.linear_ce = linear_ce
        self.base_path, self.base_key = base_path, base_key  # an adapter's key is checked against the base's
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype).to(self.device).eval()
        if compile:
            if self.device.type == "cuda":
                from torch.utils._triton import has_triton

                if not has_triton():
                    raise RuntimeError("score.compile is on (the default on CUDA) but Triton is not installed where "
                                       "this worker runs; install it (pip install triton) or set score.compile: false")
            compile_pointwise(self.model)
        self._adapters: dict[str, str] = {}  # adapter key -> peft adapter name
        self.numerics = [self.device.type, str(self.dtype).removeprefix("torch.")]

    def _activate(self, adapter: str | None, adapter_key: str | None = None):
        """Switch to ``adapter``; cached under ``adapter_key`` (its weights' hash) when given.

        Without a key the resolved path is the cache key, which is only safe when nothing
        rewrites that directory during this process's life (tests and benchmarks).
        """
        if adapter is None:
            return None
        from peft import PeftModel

        key = adapter_key or str(Path(adapter).resolve())
        if key not in self._adapters:
            # object storage: this node's copy, if it is still the adapter keyed adapter_key
            name, adapter = f"a{len(self._adapters)}", storage.open_adapter(adapter, adapter_key, self.base_key)
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, adapter, adapter_name=name).eval()
            else:
                self.model.load_adapter(adapter, adapter_name=name)
            self._adapters[key] = name
        self.model.set_adapter(self._adapters[key])
        return self._adapters[key]

    def losses(self, samples: list[ShardSample], *, adapter: str | None, batch_tokens: int, chunk: int | None = None,
               chunk_bytes: int = LM_HEAD_CHUNK_BYTES, progress=None, with_correct: bool = False,
               adapter_key: str | None = None):
        """Arrow table of per-target losses (see ``score_samples``) with base or base + ``adapter``."""
        name = self._activate(adapter, adapter_key)
        kw = dict(batch_tokens=batch_tokens, chunk=chunk, chunk_bytes=chunk_bytes, device=self.device,
                  progress=progress, with_correct=with_correct, linear_ce=self.linear_ce)
        if name is None and self._adapters:
            with self.model.disable_adapter():
                return score_samples(self.model, samples, **kw)
        return score_samples(self.model, samples, **kw)

    def generate(self, prompts, *, adapter: str | None, tokenizer, max_new_tokens: int, stop_ids: list[int],
                 adapter_key: str | None = None, batch_size: int = 64) -> list[str]:
        """Greedy continuations (``generate.generate_responses``) with base or base + ``adapter``."""
        from tokenclean.tasks.generate import generate_responses

        name = self._activate(adapter, adapter_key)
        kw = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, device=self.device, batch_size=batch_size)
        if name is None and self._adapters:
            with self.model.disable_adapter():
                return generate_responses(self.model, tokenizer, prompts, **kw)
        return generate_responses(self.model, tokenizer, prompts, **kw)


_PROCESS_MODELS: dict[tuple, ScoringModel] = {}


def process_model(base_path: str, device: str = "auto", dtype: str = "auto", compile: bool = False,
                  model_key: str | None = None, linear_ce: str = "chunked", weights: str | None = None) -> ScoringModel:
    """One ScoringModel per worker process: Ray reuses workers, so weights load once.

    Cached under ``model_key`` (the base weights' content hash) when given, so a model
    directory rewritten in place is loaded again rather than served from the cache. A model in
    object storage loads from this node's copy, checked against ``weights`` (``storage.open_model``).
    """
    key = (model_key or str(base_path), device, dtype, compile, linear_ce)
    if key not in _PROCESS_MODELS:
        _PROCESS_MODELS.clear()  # a new base replaces the old one instead of doubling memory
        _PROCESS_MODELS[key] = ScoringModel(storage.open_model(base_path, weights), device=device, dtype=dtype,
                                            compile=compile, linear_ce=linear_ce, base_key=model_key)
    return _PROCESS_MODELS[key]
