"""A recording TrainerCallback for the training-defaults tests: what the optimiser really did, step by step.

Configured as ``train.callbacks: [tests.train_probes:Probe]`` (the plugin point a user's callback uses), so
it observes the Trainer that ``tasks/train.py`` builds, not a copy of it. Each instance appends its record to
``RECORDS``: the training runs in this process (Ray off), so the test reads it from there.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

RECORDS: list[dict] = []


def _grads(optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class Probe(TrainerCallback):
    """Per optimiser step: the learning rate it applies, the gradient norm it applies (after clipping), and
    for the first step the optimiser's state before and after; per forward pass, the input ids trained on."""

    def __init__(self):
        self.rec = {"lr": [], "applied_norm": [], "pre_norm": [], "inputs": [], "first": {}}
        RECORDS.append(self.rec)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.rec["seed"] = args.seed  # what the Trainer seeds torch's RNG with (LoRA dropout masks)
        def record(module, inputs, kwargs):
            self.rec["inputs"].append(tuple(kwargs["input_ids"][0].tolist()))

        model.register_forward_pre_hook(record, with_kwargs=True)

    def on_log(self, args, state, control, logs=None, **kw):
        if "grad_norm" in logs:  # the norm the Trainer measured before clipping (logging_steps=1: every step)
            self.rec["pre_norm"].append(logs["grad_norm"])

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        # after clipping, before the update (transformers' Trainer calls it between the two)
        self.rec["lr"].append(optimizer.param_groups[0]["lr"])
        self.rec["weight_decay"] = max(g["weight_decay"] for g in optimizer.param_groups)
        self.rec["applied_norm"].append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in _grads(optimizer)]))))
        if state.global_step == 0:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimiser
            self.rec["first"] = {"type": type(inner), "state_before": len(inner.state),
                                 "betas": optimizer.param_groups[0]["betas"]}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        if state.global_step == 0:  # the gradients are still there: zero_grad comes after this callback
            inner = getattr(optimizer, "optimizer", optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.rec["first"]["after"] = [(inner.state[p]["step"].item(), inner.state[p]["exp_avg"].clone(),
                                           inner.state[p]["exp_avg_sq"].clone(), p.grad.clone()) for p in params]
