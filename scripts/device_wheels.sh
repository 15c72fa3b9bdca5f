#!/usr/bin/env bash
# Wheels a bare GPU machine (torch + transformers + peft, no network) needs for
# benchmarks/device_issue12.sh and benchmarks/gpu_check.sh, downloaded here into .device-wheels/
# (git-ignored; the device tool carries it: carry=[".device-wheels"]). About 5 MB together;
# Triton comes with the device's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .device-wheels && mkdir -p .device-wheels
"$PY" -m pip download -q --no-deps -d .device-wheels \
  "liger-kernel==$("$PY" -c 'import importlib.metadata as m; print(m.version("liger-kernel"))')" \
  pytest pluggy iniconfig
# tasks/train.py (gpu_check's training and FSDP parts) imports pydantic (tokenclean.config) and datasets, which the
# device image lacks. pydantic-core is compiled: fetched for the device's CPython 3.12 on x86-64 Linux.
pin() { "$PY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device-wheels $(for p in pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess; do
    pin "$p"; done)
ls -l .device-wheels
du -sh .device-wheels
