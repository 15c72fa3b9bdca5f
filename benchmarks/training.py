"""LoRA SFT throughput: tokenclean's Trainer path vs a plain transformers Trainer on padded batches.

Random-weight Llama models with the real Llama-3.2-1B / 3.2-3B / 3.1-8B shapes (bf16 on
GPU) train LoRA (r 64, alpha 16, all linear layers: the paper's setting) on the scoring
benchmark's SFT length mix (``benchmarks/scoring.py``: lognormal lengths in [16, 2048],
10-60% prompt), with 60% of the response tokens selected at random. Both variants run
in the same process on the same samples, the same micro-batch of samples and the same
number of optimiser steps:

* ``tokenclean`` -- ``tasks.train``'s ``SelectedTokenTrainer``: padding-free packing
  (``DataCollatorWithFlattening``), varlen attention, lm_head only at kept positions.
* ``padded``     -- ``transformers.Trainer`` with the model's own loss: samples padded to
  the micro-batch's longest (``pad_collate``), full logits.

Figures: tokens/s (real tokens: padding not counted), peak memory (GPU allocator; on CPU
the process's max RSS), and the ratio of the floor to the measured time. The floor is
``4 * params * tokens / peak`` (+ ``2 * params * tokens`` with ``--checkpointing``): a
forward (2 P T) plus the activation gradients (2 P T) through the frozen base, LoRA's own
FLOPs and attention not counted, every parameter (embeddings included) counted for every
token; ``peak`` is a large matmul in the model dtype measured in the same run. The
first ``--warmup`` steps are not timed.

Needs torch, transformers, peft, datasets. ``--cpu`` runs tiny shapes in fp32 on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scoring import ALIASES, SHAPES, build_model, matmul_peak, sft_lengths, sft_samples, sync  # noqa: E402
from tokenclean.tasks.train import IGNORE, TrainSample, _trainer_class, packing_collator, training_table  # noqa: E402


def selected_samples(lengths, vocab: int, seed: int, keep: float = 0.6) -> list[TrainSample]:
    rng = np.random.default_rng(seed + 2)
    out = []
    for s in sft_samples(lengths, vocab, seed):
        mask = s.target & (rng.random(len(s.target)) < keep)
        if mask.any():
            out.append(TrainSample(s.input_ids, mask))
    return out


def pad_collate(features: list[dict]) -> dict:
    """The baseline's batches: right-padded to the micro-batch's longest sample, labels -100 on padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class StepTimer:
    """A TrainerCallback timing optimiser steps after ``warmup`` (device-synchronised)."""

    def __new__(cls, warmup: int, device):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.t0 = None
                self.seconds = 0.0

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step >= warmup:
                    sync(device)
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if self.t0 is not None:
                    sync(device)
                    self.seconds += time.perf_counter() - self.t0
                    self.t0 = None

        return _Timer()


def run_variant(variant: str, name: str, args, device, dtype, samples, table) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = build_model(SHAPES[name], device, dtype, args.seed)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    steps = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=str(args.workdir / f"{name}-{variant}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="linear",
        warmup_steps=0.03, use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
        gradient_checkpointing=args.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.checkpointing else None,
        save_strategy="no", logging_steps=10**9, report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, seed=args.seed, data_seed=args.seed)
    timer = StepTimer(args.warmup, device)
    if variant == "tokenclean":
        trainer = _trainer_class()(model=model, args=targs, train_dataset=Dataset(table),
                                   data_collator=packing_collator(), callbacks=[timer])
    else:
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset(table), callbacks=[timer],
                          data_collator=pad_collate)
    # The exact samples of the timed steps, in the Trainer's own order: tokens are counted on them.
    loader = trainer.get_train_dataloader()
    n_tok = padded = 0
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        if i >= args.warmup:
            if variant == "tokenclean":
                n_tok += int(batch["input_ids"].numel())
            else:
                n_tok += int(batch["attention_mask"].sum())
                padded += int(batch["input_ids"].numel())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    flops_per_token = (6 if args.checkpointing else 4) * sum(p.numel() for p in model.parameters())
    res = {"model": name, "variant": variant, "tokens": n_tok, "seconds": timer.seconds,
           "tok_s": n_tok / timer.seconds, "floor_flops_per_token": flops_per_token,
           "pct_floor": flops_per_token * n_tok / timer.seconds / (args.peak * 1e12),
           "padding_waste": (padded - n_tok) / padded if padded else 0.0,
           "peak_mem_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30}
    del trainer, model, loader
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,3b,8b", help="comma list of 1b,3b,8b or SHAPES keys")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes, fp32, CPU")
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens in the sample set")
    ap.add_argument("--batch", type=int, default=8, help="samples per micro-batch (both variants)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (both variants)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tokenclean-bench-train"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap


def _device_and_models(ap: argparse.ArgumentParser, args):
    """Device, dtype and model shapes; sets ``args.peak`` (the measured matmul peak); ``--cpu`` shrinks the set."""
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        names = ["tiny-128", "tiny-256"]
        if args.tokens == ap.get_default("tokens"):
            args.tokens = 60_000
        args.peak = matmul_peak(device, dtype, 1024, 10)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu")
        device, dtype = torch.device("cuda"), torch.bfloat16
        names = [ALIASES.get(m, m) for m in args.models.split(",") if m]
        args.peak = matmul_peak(device, dtype, 8192, 30)
    return device, dtype, names


def _measure_pair(name: str, args, device, dtype) -> list[dict]:
    """Both variants on one model shape; an out-of-memory variant is reported, not raised."""
    vocab = SHAPES[name]["vocab_size"]
    samples = selected_samples(sft_lengths(args.tokens, args.seed), vocab, args.seed)
    table = training_table(samples)
    pair = {}
    for variant in ("tokenclean", "padded"):
        try:
            pair[variant] = run_variant(variant, name, args, device, dtype, samples, table)
        except torch.OutOfMemoryError as e:
            pair[variant] = {"model": name, "variant": variant, "error": f"OOM: {str(e)[:120]}"}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(pair[variant]), flush=True)
    if "tok_s" in pair["tokenclean"] and "tok_s" in pair["padded"]:
        pair["tokenclean"]["speedup_vs_padded"] = pair["tokenclean"]["tok_s"] / pair["padded"]["tok_s"]
    return list(pair.values())


def _print_table(results: list[dict]) -> None:
    print("\n| model | variant | tok/s | % of floor | vs padded | peak mem GiB | padding waste |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['variant']} | {r['error']} | | | | |")
            continue
        vs = f"{r['speedup_vs_padded']:.2f}x" if "speedup_vs_padded" in r else ""
        print(f"| {r['model']} | {r['variant']} | {r['tok_s']:,.0f} | {100 * r['pct_floor']:.1f}% | {vs} | "
              f"{r['peak_mem_gib']:.1f} | {100 * r['padding_waste']:.0f}% |")


def main(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    device, dtype, names = _device_and_models(ap, args)
    import transformers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype), "matmul_peak_tflops": args.peak,
            "argv": sys.argv[1:], "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"device={meta['device']} torch={meta['torch']} transformers={meta['transformers']} "
          f"matmul peak={args.peak:.2f} TFLOP/s", flush=True)
    results = []
    for name in names:
        results += _measure_pair(name, args, device, dtype)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    _print_table(results)
    return results


if __name__ == "__main__":
    main()
