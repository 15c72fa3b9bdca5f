"""Shared fixtures: a real (tiny) embedded model, built once per test session.

Everything the tests touch is the real component: the tokenizer is trained, the Llama
is pretrained (briefly), DuckDB files are on disk, Prefect flows run against a local
API server and scoring runs on a local Ray cluster.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = {"n_people": 6, "n_train": 300, "n_eval": 60, "pretrain_steps": 60, "corrupt_fraction": 0.25, "seed": 7}


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Keep Prefect's database and our model cache out of the user's home."""
    root = tmp_path_factory.mktemp("homes")
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ.setdefault("TOKENCLEAN_CACHE", str(root / "cache"))
    yield


@pytest.fixture(scope="session")
def tiny():
    """The embedded default at test size: tokenizer + tiny pretrained Llama + synthetic SFT data."""
    from tokenclean.embedded import EmbeddedSpec, build
    from tokenclean.synth import SynthSpec

    spec = EmbeddedSpec(synth=SynthSpec(n_people=TINY["n_people"], n_train=TINY["n_train"], n_eval=TINY["n_eval"],
                                        corrupt_fraction=TINY["corrupt_fraction"], seed=TINY["seed"]),
                        pretrain_steps=TINY["pretrain_steps"])
    return build(spec, progress=False)


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.model)


def tiny_config(workdir: Path, name: str = "t", **overrides) -> dict:
    cfg = {
        "name": name, "workdir": str(workdir), "iterations": 2, "mode": "both",
        "model": {"base": "embedded"}, "embedded": dict(TINY),
        "data": {"max_length": 256},
        "score": {"batch_tokens": 4096, "shard_samples": 64},
        "train": {"lr": 2e-3, "batch_tokens": 2048, "lora": {"r": 8, "alpha": 16}},
        # the reference must learn the facts of D0 to score with, as in the demo config
        "warmup_train": {"lr": 5e-3, "batch_tokens": 1024, "epochs": 3, "lora": {"r": 16, "alpha": 64}},
        "ray": {"num_cpus": 2},
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg
