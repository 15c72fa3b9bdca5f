#!/usr/bin/env bash
# Wheels a bare GPU machine (torch + transformers + peft, no network) needs for
# benchmarks/device_issue12.sh, downloaded here into .device-wheels/ (git-ignored; the
# device tool carries it: carry=[".device-wheels"]). All are pure-Python wheels, about
# 1.4 MB together; Triton comes with the device's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .device-wheels && mkdir -p .device-wheels
"$PY" -m pip download -q --no-deps -d .device-wheels \
  "liger-kernel==$("$PY" -c 'import importlib.metadata as m; print(m.version("liger-kernel"))')" \
  pytest pluggy iniconfig
ls -l .device-wheels
