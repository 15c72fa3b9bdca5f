"""``score.linear_ce: liger`` (liger-kernel's fused linear cross-entropy) against the plain chunked path.

The agreement test runs liger's real Triton kernels: compiled on CUDA where there is
one, and on this CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which executes
the same kernel code with numpy. It needs only torch, transformers, numpy and liger, so
``benchmarks/device_issue12.sh`` runs it on a bare GPU machine (``--noconftest``). Both paths compute lm_head in the model dtype and the
softmax in fp32, so fp32 agrees to fp32 rounding and bf16 within bf16 rounding of the
logits.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# only the agreement test runs liger's kernels; the refusals below need no liger
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel is in requirements/ci.txt; install it to run")


def tolerance(dtype: str, max_abs_logit: float) -> float:
    """|liger - chunked| allowed per token.

    bf16 logits carry 8 significant bits: two matmul kernels may round a logit one ulp
    apart, so a loss (logsumexp - target logit) may move by about two ulps of the largest
    logit. fp32 agrees to its own rounding.
    """
    if dtype == "float32":
        return 1e-4
    return 2 * 2.0 ** (np.floor(np.log2(max_abs_logit)) - 7)

DEVICES = [pytest.param("cpu", id="cpu-triton-interpreter"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _scored(tmp_path, device: str, dtype: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / f"{device}-{dtype}.npz"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "linear_ce_child.py"), device, dtype, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


@needs_liger
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_liger_losses_match_the_chunked_path(tmp_path, device, dtype):
    got = _scored(tmp_path, device, dtype)
    for layout in ("packed", "padded"):
        plain = {k.split(".")[-1]: v for k, v in got.items() if k.startswith(f"chunked.{layout}.")}
        liger = {k.split(".")[-1]: v for k, v in got.items() if k.startswith(f"liger.{layout}.")}
        for col in ("sample_id", "pos", "token_id"):
            np.testing.assert_array_equal(liger[col], plain[col])
        assert len(plain["loss"]) > 500 and plain["loss"].std() > 1.0  # many targets, far-from-uniform logits
        finite = np.isfinite(plain["loss"])
        np.testing.assert_array_equal(np.isfinite(liger["loss"]), finite)
        np.testing.assert_allclose(liger["loss"][finite], plain["loss"][finite], rtol=0,
                                   atol=tolerance(dtype, float(got["max_abs_logit"])))
        # the exact-match flags agree wherever the two are not within rounding of a tie
        differ = liger["correct"] != plain["correct"]
        assert differ.mean() < 0.01, f"{layout}: {differ.sum()} of {len(differ)} argmax flags differ"
        assert plain["correct"].any()


def test_liger_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    """CPU workers without Triton's interpreter cannot run liger: refused before any work, saying what to set."""
    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import scorer_settings
    from tokenclean.tasks.score import ScoringModel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = RunConfig.model_validate({"score": {"linear_ce": "liger"}, "ray": {"num_gpus_per_task": 0}})
    with pytest.raises(ValueError, match="need CUDA"):
        scorer_settings(cfg)
    with pytest.raises(ValueError, match="need CUDA"):
        ScoringModel(str(tmp_path / "never-read"), device="cpu", linear_ce="liger")
    with pytest.raises(ValueError, match="transformers backend"):
        RunConfig.model_validate({"score": {"linear_ce": "liger", "backend": "vllm"}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"score": {"linear_ce": "fused"}})


def test_liger_without_liger_kernel_is_a_clear_error(tmp_path, monkeypatch):
    """Where the workers lack liger-kernel, asking for it is one error that says how to get it, raised before the
    model is read. liger is hidden from the import system here, so this runs whether or not it is installed."""
    from tokenclean.tasks.score import ScoringModel, check_linear_ce

    for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # `import liger_kernel...` now raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check: the kernel itself is what is missing
    with pytest.raises(RuntimeError, match="pip install liger-kernel"):
        check_linear_ce("liger", "cpu")
    with pytest.raises(RuntimeError, match="pip install liger-kernel"):
        ScoringModel(str(tmp_path / "never-read"), device="cpu", linear_ce="liger")
    check_linear_ce("liger", "cpu", load=False)  # the driver need not have it: only the workers load it
