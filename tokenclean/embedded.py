"""The embedded default: tokenizer, tiny Llama base model and SFT data, built locally (no model hub needed).

The build is cached under a hash of its spec and written to a temporary directory first, so an interrupted build
is never mistaken for a finished one (docs/design.md, "The embedded default").
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenclean.config import EmbeddedConfig
from tokenclean.synth import SynthSpec, generate, pretraining_text
from tokenclean.tasks.versions import BUILD_VERSION

SPECIAL = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass
class EmbeddedSpec:
    synth: SynthSpec = field(default_factory=SynthSpec)
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    context: int = 256
    pretrain_docs: int = 6000
    pretrain_steps: int = 250
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    seed: int = 0

    @classmethod
    def of(cls, e: EmbeddedConfig) -> EmbeddedSpec:
        """The build a config's ``embedded`` section asks for."""
        return cls(synth=SynthSpec(n_people=e.n_people, n_train=e.n_train, n_eval=e.n_eval,
                                   corrupt_fraction=e.corrupt_fraction, seed=e.seed),
                   pretrain_steps=e.pretrain_steps)

    def key(self) -> str:
        blob = json.dumps({"v": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Embedded:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def train(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "data" / "eval.jsonl"

    def info(self) -> dict:
        return json.loads((self.root / "build.json").read_text())


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENCLEAN_CACHE", Path.home() / ".cache" / "tokenclean"))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[3:])


def pretrain(spec: EmbeddedSpec, tokenizer, docs: list[str], progress: bool = True):
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                      intermediate_size=spec.intermediate, max_position_embeddings=spec.context * 8,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    stream: list[int] = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    data = torch.tensor(stream[: len(stream) // spec.context * spec.context]).view(-1, spec.context)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warm = max(1, spec.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.pretrain_steps))))
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    bar = tqdm(range(spec.pretrain_steps), desc="pretrain tiny llama", disable=not progress)
    for step in bar:
        idx = torch.randint(0, data.shape[0], (spec.pretrain_batch,), generator=g)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, float(loss.item()), int(data.numel())


def build(spec: EmbeddedSpec | None = None, root: Path | None = None, progress: bool = True) -> Embedded:
    """Build (or reuse) the embedded default and return where it lives."""
    spec = spec or EmbeddedSpec.of(EmbeddedConfig())
    root = root or cache_dir() / f"embedded-{spec.key()}"
    if (root / "build.json").exists():
        return Embedded(root)
    import torch

    t0 = time.perf_counter()
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    paths = generate(spec.synth, tmp / "data")
    docs = pretraining_text(spec.synth, spec.pretrain_docs, eos=SPECIAL[1])
    sft_rows = [json.loads(line) for line in paths["train"].open()]
    sft_text = [r["prompt"] + " " + r["response"] for r in sft_rows]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = train_tokenizer(docs + sft_text, spec.vocab_size)
    t_tok = time.perf_counter() - t0
    model, final_loss, n_tokens = pretrain(spec, tokenizer, docs, progress)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    info = {
        "spec": asdict(spec), "key": spec.key(), "params": sum(p.numel() for p in model.parameters()),
        "pretrain_tokens_seen": spec.pretrain_steps * spec.pretrain_batch * spec.context,
        "pretrain_corpus_tokens": n_tokens, "pretrain_final_loss": final_loss,
        "seconds": {"tokenizer": t_tok, "total": time.perf_counter() - t0},
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if root.exists():  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    return Embedded(root)
