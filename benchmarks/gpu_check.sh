#!/usr/bin/env bash
# Issue 26's GPU check as one prepared run on a bare CUDA machine (torch, transformers, peft, accelerate, triton,
# pyarrow; no Ray, Prefect or DuckDB, so every stage runs in process). What it runs and checks:
# benchmarks/gpu_check.py (agreement on CUDA, FSDP at world size 1, scoring and LoRA training at 1B and 8B).
#
#   here:    bash scripts/device_wheels.sh      (.device-wheels/: liger-kernel, datasets, pydantic, ...; about 5 MB)
#   device:  bash benchmarks/gpu_check.sh       (device tool: carry=[".device-wheels"], timeout_s=560)
#
# Sizes and time limits: GPU_CHECK_<KEY> variables (benchmarks/gpu_check.py's DEFAULTS); the defaults fit one
# 8-minute call. Extra arguments go to gpu_check.py (e.g. --parts agreement,fsdp; --cpu for the dry run).
# GPU_CHECK_INSTALL=0 uses the Python environment as it is (PY=.venv/bin/python on a developer's machine).
# Results go to $OUT (the device tool's folder that comes back), else /tmp/gpu_check: gpu_check.json,
# gpu_check.md (the tables, also printed), gpu_check.log (every part's output) and env.txt.
# Exit status: gpu_check.py's (1 when an agreement check fails or a part does not finish).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
  if compgen -G ".device-wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index .device-wheels/*.whl
  fi
  # editable as on a developer's machine; a plain install where the image's setuptools cannot build one
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
    "$PY" -m pip install -q --no-deps --no-build-isolation . >/dev/null
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import importlib.metadata as m, platform
print("python", platform.python_version())
for p in ("torch", "transformers", "peft", "accelerate", "triton", "liger-kernel", "datasets", "pydantic", "pyarrow"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "missing")'; } 2>&1 | tee "$OUT/env.txt"
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
