#!/usr/bin/env bash
# Check the layers contract in pyproject.toml with import-linter on the layout as installed:
# passes/ installs as onnxsqueeze.passes (a package-dir mapping), which import-linter cannot
# follow from the source tree, so the package is staged in a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
LINT=$(realpath "${LINT_IMPORTS:-.venv/bin/lint-imports}")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r onnxsqueeze "$stage/onnxsqueeze"
cp -r passes "$stage/onnxsqueeze/passes"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
cp pyproject.toml "$stage/"
# from the staging folder: lint-imports puts the working directory first on the path
cd "$stage"
PYTHONPATH="$stage" "$LINT" --no-cache
