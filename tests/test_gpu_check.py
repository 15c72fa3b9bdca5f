"""The GPU check's dry run (issue 26): ``benchmarks/gpu_check.py --cpu`` runs every part the device run runs, on
tiny shapes, so the prepared script is known to work before any device time is spent.

One run of the real script (its own processes, torchrun included) is read back: every part finished, every
agreement check that can run on a CPU passed with its measured value within its stated tolerance, the CUDA-only
checks are the only ones skipped, and the timing parts produced a figure for every variant. It runs in a virtual
environment that sees every package of this one except those the device image lacks (Ray, Prefect, DuckDB), so
a part that needs one of them fails here as it would there.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

CHECKS = {
    "agreement": ["score_packed_vs_padded_fp32", "score_bf16_vs_fp32", "score_liger_bf16_vs_fp32",
                  "score_compiled_bf16_vs_fp32", "train_step_loss_packed_vs_fp32",
                  "train_step_lora_grads_packed_vs_fp32", "train_step_lora_grads_packed_checkpointing_vs_fp32",
                  "generate_eval_path_vs_plain_fp32"],
    "fsdp": ["fsdp_one_step", "fsdp_loss_vs_plain_forward", "fsdp_wrapped"],
    "scoring": [],
    "training": [],
}
CUDA_ONLY = {"score_liger_bf16_vs_fp32", "fsdp_wrapped"}
NOT_ON_DEVICE = {"ray", "prefect", "prefect_ray", "duckdb"}


def device_like_python(root: Path) -> str:
    """A venv whose site-packages links every entry of this one but the packages the device image lacks."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():  # .pth files too: the editable install
        if entry.name.lstrip("_").split("-")[0].split(".")[0].lower() not in NOT_ON_DEVICE:
            (site / entry.name).symlink_to(entry)
    python = str(root / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in ('ray', 'prefect', 'duckdb', 'torch') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split() == ["['torch']"]
    return python


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    python = device_like_python(root / "venv")
    proc = subprocess.run([python, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out",
                           str(root / "out"), "--workdir", str(root / "work")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    log = (root / "out" / "gpu_check.log").read_text() if (root / "out" / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-6000:]
    return json.loads((root / "out" / "gpu_check.json").read_text()), (root / "out" / "gpu_check.md").read_text()


def test_every_part_runs_and_every_check_passes_within_its_tolerance(dry_run):
    report, table = dry_run
    parts = report["parts"]
    assert list(parts) == list(CHECKS)
    assert {n: p["status"] for n, p in parts.items()} == dict.fromkeys(CHECKS, "ok")
    assert {n: [c["name"] for c in p["checks"]] for n, p in parts.items()} == CHECKS
    checks = [c for p in parts.values() for c in p["checks"]]
    assert {c["name"] for c in checks if "skipped" in c} == CUDA_ONLY
    for c in checks:
        if c["name"] in CUDA_ONLY:
            continue
        assert c["pass"] is True, c
        assert math.isfinite(c["tolerance"]) and 0 <= c["measured"] <= c["tolerance"], c
        assert f"| {c['name']} | " in table
    assert report["passed"] and not report["failed_checks"] and not report["run_errors"]


def test_the_timing_parts_give_a_figure_for_every_variant(dry_run):
    report, _ = dry_run
    scoring = report["parts"]["scoring"]["results"]
    assert [(r["model"], r["variant"]) for r in scoring] == [("tiny-128", "packed")]  # CPU: compile off, no liger
    training = report["parts"]["training"]["results"]
    assert sorted((r["variant"], r["checkpointing"]) for r in training) == sorted(
        (v, c) for v in ("tokenclean", "padded") for c in (False, True))
    for r in scoring + training:
        assert "error" not in r and r["tok_s"] > 0 and r["pct_floor"] > 0, r
