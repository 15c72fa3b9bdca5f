#!/usr/bin/env bash
# Lint before the tests: ruff, and the import layering (import-linter contracts in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check flows tasks tokenclean infra benchmarks tests scripts
# flows/, tasks/ and infra/ install into the tokenclean namespace (package-dir), which import-linter's graph
# builder cannot follow; it reads the same files assembled as one tree.
view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
cp -r tokenclean "$view/tokenclean"
for d in flows tasks infra; do cp -r "$d" "$view/tokenclean/$d"; done
(cd "$view" && PYTHONPATH="$view" "$OLDPWD/.venv/bin/lint-imports" "$OLDPWD/pyproject.toml" --no-cache)
