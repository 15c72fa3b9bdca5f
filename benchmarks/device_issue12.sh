#!/usr/bin/env bash
# Issue 12's GPU checks as one prepared run on a bare CUDA machine (torch, transformers, peft).
#
#   here:    bash scripts/device_wheels.sh
#   device:  bash benchmarks/device_issue12.sh          (device tool: carry=[".device-wheels"])
#
# 1. score.linear_ce: liger against the plain chunked path on CUDA, fp32 and bf16
#    (tests/test_linear_ce.py's CUDA cases; --noconftest: they need no Prefect or Ray);
# 2. the scorer at Llama-3.2-1B and 3.1-8B shapes: packed (compile off), packed+liger,
#    packed+compile (the CUDA default, score.compile: auto) and packed+compile+liger,
#    each as % of the arithmetic floor, in one process per model.
# Results go to $OUT (the device tool's folder that comes back), else /tmp/issue12.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/issue12}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-index .device-wheels/*.whl
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c 'import torch, transformers, triton, liger_kernel, importlib.metadata as m
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__,
      "liger-kernel", m.version("liger-kernel"))'; } 2>&1 | tee "$OUT/env.txt"
python -m pytest -q --noconftest -p no:cacheprovider -rA tests/test_linear_ce.py -k cuda 2>&1 | tee "$OUT/agreement.txt"
for m in ${MODELS:-1b 8b}; do
  python benchmarks/scoring.py --models "$m" --tokens "${TOKENS:-262144}" --repeats 2 --compile --liger \
    --skip bucketed,naive --out "$OUT/scoring_$m.json" 2>&1 | tee "$OUT/scoring_$m.txt"
done
