"""LoRA SFT that learns only from selected tokens.

Labels are the input ids at selected positions and ignored everywhere else; the loss is
the mean over selected tokens of a step (token-level mean, as in HF's causal LM loss),
so dropping tokens changes *what* is learned, not the per-token learning rate. Samples
with no selected token contribute nothing and are dropped before batching.

Self-evolving cleaning continues training the previous iteration's adapter
(``init_adapter``), so theta_{t+1} = theta_t fine-tuned on cleaned D_t.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenclean.tasks.score import decoder_and_head, plan_batches, resolve_device, resolve_dtype
from tokenclean.config import TrainConfig


@dataclass
class TrainSample:
    input_ids: np.ndarray
    label_mask: np.ndarray  # bool: tokens the loss is computed on


def _batches(samples: list[TrainSample], batch_tokens: int, seed: int) -> list[np.ndarray]:
    """Shuffled batches; within a window of ~50 batches, samples are length-grouped to cut padding."""
    lengths = np.array([len(s.input_ids) for s in samples])
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    window = max(1, 50 * max(1, batch_tokens // max(1, int(lengths.mean()))))
    out: list[np.ndarray] = []
    for i in range(0, len(order), window):
        idx = np.array(order[i : i + window])
        out += [idx[b] for b in plan_batches(lengths[idx], batch_tokens)]
    rng.shuffle(out)
    return out


def _lr_lambda(cfg: TrainConfig, total: int):
    warm = max(1, math.ceil(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def load_for_training(base_path: str, cfg: TrainConfig, init_adapter: str | None, device, dtype):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def train_lora(base_path: str, samples: list[TrainSample], cfg: TrainConfig, out_dir: str | Path, *,
               init_adapter: str | None = None, device: str = "auto", dtype: str = "auto",
               progress: bool = True, key: str | None = None, label: str | None = None) -> dict:
    """Train and save an adapter to ``out_dir`` (atomically: a temp directory renamed when complete).

    Whether to train at all is the caller's decision, by key (``tokenclean.flows.artifacts``);
    ``key`` is written into ``train.json`` so a directory can be matched to its key.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    samples = [s for s in samples if s.label_mask.any()]
    if not samples:
        raise ValueError("no sample has a selected token: nothing to train on (is k too small?)")
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device)
    model = load_for_training(base_path, cfg, init_adapter, dev, resolve_dtype(dtype, dev))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = [b for _ in range(cfg.epochs) for b in _batches(samples, cfg.batch_tokens, cfg.seed + _)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(plan)))
    decoder, head = decoder_and_head(model)
    t0, n_tok, n_lab, losses = time.perf_counter(), 0, 0, []
    bar = tqdm(plan, desc=f"train {label or out_dir.name}", disable=not progress, unit="step")
    for batch in bar:
        width = max(len(samples[i].input_ids) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        lab = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, i in enumerate(batch):
            s = samples[i]
            n = len(s.input_ids)
            ids[r, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
            attn[r, :n] = 1
            lab[r, :n] = torch.from_numpy(s.label_mask)
        ids, attn, lab = ids.to(dev), attn.to(dev), lab.to(dev)
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
        rows, cols = lab.nonzero(as_tuple=True)
        # Only selected positions reach lm_head: the (tokens x vocab) logits are never built.
        logits = head(hidden[rows, cols - 1]).float()
        loss = F.cross_entropy(logits, ids[rows, cols])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {len(losses)}")
        losses.append(loss.item())
        n_tok += int(attn.sum())
        n_lab += len(rows)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    seconds = time.perf_counter() - t0
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    stats = {"steps": len(plan), "samples": len(samples), "tokens": n_tok, "label_tokens": n_lab,
             "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])), "seconds": seconds,
             "tokens_per_s": n_tok / seconds if seconds else 0.0, "init_adapter": init_adapter, "key": key}
    (tmp / "train.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return stats
